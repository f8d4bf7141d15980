/* lb._logfmt: which access-log values may be printed bare, in one pass over their characters.  [pure]
 *
 * `bare(text: str) -> bool` is True exactly when `text` is not empty and every character is visible
 * ASCII other than `"` and `=` (the pattern `[!#-<>-~]+`): such a value is written as is in a plain
 * `key=value` line, any other is quoted (lb.access_log._plain; tests/unit/test_access_log.py holds
 * the two answers equal on every ASCII character and on hypothesis-generated text).
 *
 * Why C, by hand: a WebSocket handshake logs two lines with eleven such values, and the check in
 * compiled Python (isascii, isprintable and three substring searches, each a method call) was about
 * 900 instructions a value, 4 % of the handshake.  Here it is a call and a table lookup per
 * character.  It reads a str it does not modify and allocates nothing.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Visible ASCII (0x21-0x7E) without `"` and `=`. */
static unsigned char BARE[128];

static void
fill_table(void)
{
    for (int c = 0; c < 128; c++) {
        BARE[c] = c >= 0x21 && c <= 0x7e && c != '"' && c != '=';
    }
}

static PyObject *
bare(PyObject *module, PyObject *text)
{
    (void)module;
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "bare() takes a str");
        return NULL;
    }
    if (PyUnicode_READY(text) < 0) {  /* a no-op but for a legacy str made from wchar_t */
        return NULL;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    /* An ASCII str is stored one byte a character; anything else has a character past 0x7F. */
    if (length == 0 || !PyUnicode_IS_ASCII(text)) {
        Py_RETURN_FALSE;
    }
    const unsigned char *chars = PyUnicode_1BYTE_DATA(text);
    for (Py_ssize_t i = 0; i < length; i++) {
        if (!BARE[chars[i]]) {
            Py_RETURN_FALSE;
        }
    }
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"bare", (PyCFunction)bare, METH_O,
     "bare(text) -> bool: not empty, and only visible ASCII without '\"' and '=' (printed as is)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "lb._logfmt", "Which access-log values may be printed bare.", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation, as mypyc's modules and lb.http._scan: one interpreter per process. */
PyMODINIT_FUNC
PyInit__logfmt(void)
{
    fill_table();
    return PyModule_Create(&module_definition);
}
