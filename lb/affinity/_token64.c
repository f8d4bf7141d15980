/* lb.affinity._token64: an affinity token's text, unpadded base64url, both ways in one pass.  [pure]
 *
 * `encode(raw: bytes) -> str` is `raw` as unpadded base64url (RFC 4648 §5, no `=`).
 * `decode(token: str) -> bytes | None` is its inverse on exactly the strings `encode` makes: None for
 * an empty string, a character outside `A-Za-z0-9-_`, a length of 4k+1, or spare bits in the last
 * character that are not zero (so one token has exactly one spelling, and a client cannot make
 * variants of one cookie that all open).  lb.affinity.codec keeps the same two in Python for a
 * checkout without a C compiler; tests/unit/test_token64.py holds the pairs equal on hypothesis
 * bytes and text and on every near miss (each alphabet's edge, each spare bit).
 *
 * Why C, by hand: every handshake that carries a token decodes it, and every one that is issued a
 * token encodes one.  In compiled Python the decode was a regex match, an encode, a translate, the
 * padding, `binascii.a2b_base64` and a second encode to prove the spelling canonical: about 11,000
 * instructions, 5 % of a handshake that checks a cookie; the encode about 3,500.  Here each is a
 * table lookup per character.  No library does "canonical unpadded base64url, or nothing":
 * binascii and pybase64 want padding and ignore non-zero spare bits.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

static const char ALPHABET[64] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* A character's six bits, or 0xFF for one outside the alphabet (every byte, so a lookup of any
 * 1-byte character is in range). */
static unsigned char VALUE[256];

static void
fill_table(void)
{
    memset(VALUE, 0xFF, sizeof VALUE);
    for (int i = 0; i < 64; i++) {
        VALUE[(unsigned char)ALPHABET[i]] = (unsigned char)i;
    }
}

static PyObject *
encode(PyObject *module, PyObject *raw)
{
    (void)module;
    if (!PyBytes_Check(raw)) {
        PyErr_SetString(PyExc_TypeError, "encode() takes bytes");
        return NULL;
    }
    Py_ssize_t length = PyBytes_GET_SIZE(raw);
    if (length > (PY_SSIZE_T_MAX - 2) / 4) {
        return PyErr_NoMemory();
    }
    const unsigned char *in = (const unsigned char *)PyBytes_AS_STRING(raw);
    Py_ssize_t chars = (length * 4 + 2) / 3; /* unpadded */
    PyObject *text = PyUnicode_New(chars, 127);
    if (text == NULL) {
        return NULL;
    }
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
    Py_ssize_t i = 0;
    for (; i + 3 <= length; i += 3) {
        unsigned int group = (unsigned int)in[i] << 16 | (unsigned int)in[i + 1] << 8 | in[i + 2];
        *out++ = (Py_UCS1)ALPHABET[group >> 18];
        *out++ = (Py_UCS1)ALPHABET[(group >> 12) & 63];
        *out++ = (Py_UCS1)ALPHABET[(group >> 6) & 63];
        *out++ = (Py_UCS1)ALPHABET[group & 63];
    }
    if (length - i == 1) {
        *out++ = (Py_UCS1)ALPHABET[in[i] >> 2];
        *out++ = (Py_UCS1)ALPHABET[(in[i] & 3) << 4];
    } else if (length - i == 2) {
        unsigned int group = (unsigned int)in[i] << 8 | in[i + 1];
        *out++ = (Py_UCS1)ALPHABET[group >> 10];
        *out++ = (Py_UCS1)ALPHABET[(group >> 4) & 63];
        *out++ = (Py_UCS1)ALPHABET[(group & 15) << 2];
    }
    return text;
}

static PyObject *
decode(PyObject *module, PyObject *token)
{
    (void)module;
    if (!PyUnicode_Check(token)) {
        PyErr_SetString(PyExc_TypeError, "decode() takes a str");
        return NULL;
    }
    if (PyUnicode_READY(token) < 0) { /* a no-op but for a legacy str made from wchar_t */
        return NULL;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(token);
    /* An ASCII str is stored one byte a character; anything else has a character past 0x7F. */
    if (length == 0 || length % 4 == 1 || !PyUnicode_IS_ASCII(token)) {
        Py_RETURN_NONE;
    }
    const unsigned char *in = PyUnicode_1BYTE_DATA(token);
    Py_ssize_t tail = length % 4;
    if (tail) { /* the last character's spare bits: 4 of them after 2 characters, 2 after 3 */
        unsigned char last = VALUE[in[length - 1]];
        if (last != 0xFF && (last & (tail == 2 ? 15 : 3))) {
            Py_RETURN_NONE;
        }
    }
    PyObject *raw = PyBytes_FromStringAndSize(NULL, length / 4 * 3 + (tail ? tail - 1 : 0));
    if (raw == NULL) {
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(raw);
    Py_ssize_t i = 0;
    for (; i + 4 <= length; i += 4) {
        unsigned int a = VALUE[in[i]], b = VALUE[in[i + 1]], c = VALUE[in[i + 2]], d = VALUE[in[i + 3]];
        if ((a | b | c | d) & 0x80) {
            goto refused;
        }
        unsigned int group = a << 18 | b << 12 | c << 6 | d;
        *out++ = (unsigned char)(group >> 16);
        *out++ = (unsigned char)(group >> 8);
        *out++ = (unsigned char)group;
    }
    if (tail) {
        unsigned int a = VALUE[in[i]], b = VALUE[in[i + 1]], c = tail == 3 ? VALUE[in[i + 2]] : 0;
        if ((a | b | c) & 0x80) {
            goto refused;
        }
        *out++ = (unsigned char)(a << 2 | b >> 4);
        if (tail == 3) {
            *out++ = (unsigned char)((b & 15) << 4 | c >> 2);
        }
    }
    return raw;
refused:
    Py_DECREF(raw);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"encode", (PyCFunction)encode, METH_O, "encode(raw) -> str: unpadded base64url."},
    {"decode", (PyCFunction)decode, METH_O,
     "decode(token) -> bytes | None: the bytes of canonical unpadded base64url, else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "lb.affinity._token64", "An affinity token's text: unpadded base64url.", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation, as mypyc's modules and lb.http._scan: one interpreter per process. */
PyMODINIT_FUNC
PyInit__token64(void)
{
    fill_table();
    return PyModule_Create(&module_definition);
}
