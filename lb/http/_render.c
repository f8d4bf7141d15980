/* lb.http._render: a head's bytes from its start line and fields, in one pass.  [pure]
 *
 * `render_head(start_line, fields)` returns `start_line CRLF (name ": " value CRLF)* CRLF` as bytes,
 * each str written as latin-1, for `fields` a list or tuple of (name, value) tuples of str whose
 * characters are all below 256 (exactly list, tuple and str: no subclass).  For anything else it returns None, and the caller
 * (lb.http.head.render_head) renders in Python, which raises what it raises (a character past
 * latin-1 is a UnicodeEncodeError there).  tests/unit/test_http_render.py holds the two equal.
 *
 * Why C, by hand: a WebSocket handshake renders two heads (the request to the backend, the `101`
 * to the client), and in compiled Python each field was a formatted str, then a join, then an
 * encode: about 400 instructions a field.  Here the fields' own str are copied once into the
 * bytes object returned.  It reads the objects it is given without modifying them (but for making
 * a legacy str ready, on 3.11) and allocates only its result.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* 1 for a str that latin-1 writes byte for byte (its characters are stored one byte each), 0 for
 * anything else, -1 with the exception set when a legacy str cannot be made ready (3.11 only; the
 * Python rendering raises the same).  Exactly a str: a subclass may format itself otherwise in the
 * f-string of the Python rendering. */
static int
one_byte(PyObject *text)
{
    if (!PyUnicode_CheckExact(text)) {
        return 0;
    }
    if (PyUnicode_READY(text) < 0) {
        return -1;
    }
    return PyUnicode_KIND(text) == PyUnicode_1BYTE_KIND;
}

/* Adds `more` to `*total`; 0 on overflow (the head could not be made anyway). */
static int
add(Py_ssize_t *total, Py_ssize_t more)
{
    if (more > PY_SSIZE_T_MAX - *total) {
        return 0;
    }
    *total += more;
    return 1;
}

static char *
put(char *out, PyObject *text)
{
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    memcpy(out, PyUnicode_1BYTE_DATA(text), (size_t)length);
    return out + length;
}

static PyObject *
render_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "render_head(start_line, fields) takes 2 arguments");
        return NULL;
    }
    PyObject *start = args[0], *fields = args[1];
    if (!(PyList_CheckExact(fields) || PyTuple_CheckExact(fields))) {
        Py_RETURN_NONE;
    }
    int usable = one_byte(start);
    if (usable <= 0) {
        return usable < 0 ? NULL : Py_NewRef(Py_None);
    }
    /* A list is not changed below (nothing here runs Python code), so its size and items hold. */
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fields);
    PyObject **items = PySequence_Fast_ITEMS(fields);
    Py_ssize_t total = PyUnicode_GET_LENGTH(start);
    if (!add(&total, 4)) { /* the start line's CRLF and the final CRLF */
        Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = items[i];
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
            Py_RETURN_NONE;
        }
        for (int j = 0; j < 2; j++) {
            usable = one_byte(PyTuple_GET_ITEM(pair, j));
            if (usable <= 0) {
                return usable < 0 ? NULL : Py_NewRef(Py_None);
            }
            if (!add(&total, PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(pair, j)))) {
                Py_RETURN_NONE;
            }
        }
        if (!add(&total, 4)) {
            Py_RETURN_NONE;
        }
    }
    PyObject *head = PyBytes_FromStringAndSize(NULL, total);
    if (head == NULL) {
        return NULL;
    }
    char *out = PyBytes_AS_STRING(head);
    out = put(out, start);
    memcpy(out, "\r\n", 2);
    out += 2;
    for (Py_ssize_t i = 0; i < count; i++) {
        out = put(out, PyTuple_GET_ITEM(items[i], 0));
        memcpy(out, ": ", 2);
        out = put(out + 2, PyTuple_GET_ITEM(items[i], 1));
        memcpy(out, "\r\n", 2);
        out += 2;
    }
    memcpy(out, "\r\n", 2);
    return head;
}

static PyMethodDef methods[] = {
    {"render_head", (PyCFunction)(void (*)(void))render_head, METH_FASTCALL,
     "render_head(start_line, fields) -> bytes | None: the head's bytes, or None (render it in Python)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "lb.http._render", "A head's bytes from its start line and fields.", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation, as mypyc's modules and lb.http._scan: one interpreter per process. */
PyMODINIT_FUNC
PyInit__render(void)
{
    return PyModule_Create(&module_definition);
}
