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

/* Adds a list or tuple of (name, value) str pairs to `total`: 1, 0 (not one-byte, or too large: render in
 * Python), -1 on an error. */
static int
measure_pairs(PyObject *pairs, Py_ssize_t *total)
{
    if (!(PyList_CheckExact(pairs) || PyTuple_CheckExact(pairs))) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(pairs); i++) {
        PyObject *pair = PySequence_Fast_ITEMS(pairs)[i];
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
            return 0;
        }
        for (int j = 0; j < 2; j++) {
            int usable = one_byte(PyTuple_GET_ITEM(pair, j));
            if (usable <= 0) {
                return usable;
            }
            if (!add(total, PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(pair, j)))) {
                return 0;
            }
        }
        if (!add(total, 4)) {
            return 0;
        }
    }
    return 1;
}

static char *
put_field(char *out, PyObject *name, PyObject *value)
{
    out = put(out, name);
    memcpy(out, ": ", 2);
    out = put(out + 2, value);
    memcpy(out, "\r\n", 2);
    return out + 2;
}

static char *
put_pairs(char *out, PyObject *pairs)
{
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(pairs); i++) {
        PyObject *pair = PySequence_Fast_ITEMS(pairs)[i];
        out = put_field(out, PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1));
    }
    return out;
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
    int usable = one_byte(start);
    if (usable <= 0) {
        return usable < 0 ? NULL : Py_NewRef(Py_None);
    }
    /* A list is not changed below (nothing here runs Python code), so its size and items hold. */
    Py_ssize_t total = PyUnicode_GET_LENGTH(start);
    if (!add(&total, 4)) { /* the start line's CRLF and the final CRLF */
        Py_RETURN_NONE;
    }
    usable = measure_pairs(fields, &total);
    if (usable <= 0) {
        return usable < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *head = PyBytes_FromStringAndSize(NULL, total);
    if (head == NULL) {
        return NULL;
    }
    char *out = PyBytes_AS_STRING(head);
    out = put(out, start);
    memcpy(out, "\r\n", 2);
    out = put_pairs(out + 2, fields);
    memcpy(out, "\r\n", 2);
    return head;
}

/* -- forward_request: the request a backend receives, its client's fields filtered as they are copied -- */

/* A field kept for the forwarded head (a reference to each: `rewrite` may change the list they came from). */
typedef struct {
    PyObject *name;
    PyObject *value;
} Kept;

#define KEPT_ON_STACK 64

/* `name` in lower case, as lb.http.head.field_name_lowered gives it: a new reference, from `lowered`
 * (the names lb.http._scan knows) or made here; NULL with no exception for a name that is not ASCII
 * (no token is: the caller renders in Python), NULL with one on an error. */
static PyObject *
lower_name(PyObject *lowered, PyObject *name)
{
    PyObject *known = PyDict_GetItemWithError(lowered, name);
    if (known != NULL) {
        return PyUnicode_CheckExact(known) ? Py_NewRef(known) : NULL; /* not a str: render it in Python */
    }
    if (PyErr_Occurred() || !PyUnicode_IS_ASCII(name)) {
        return NULL;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(name);
    PyObject *lower = PyUnicode_New(length, 127);
    if (lower == NULL) {
        return NULL;
    }
    const Py_UCS1 *from = PyUnicode_1BYTE_DATA(name);
    Py_UCS1 *to = PyUnicode_1BYTE_DATA(lower);
    for (Py_ssize_t i = 0; i < length; i++) {
        to[i] = from[i] >= 'A' && from[i] <= 'Z' ? (Py_UCS1)(from[i] + 32) : from[i];
    }
    return lower;
}

/* Which of the client's fields pass, into `kept` (room for all of them), counted in `*count`: 1, 0 to
 * render in Python, -1 on an error.  Runs `rewrite` (Python) on each Cookie field, which could change
 * `fields` (ours never do): the list's size and items are read again each time, each kept name and
 * value is held, and a list that grew past `room` is rendered in Python. */
static int
keep_fields(PyObject *fields, PyObject *dropped, PyObject *lowered, PyObject *rewrite, Kept *kept,
            Py_ssize_t room, Py_ssize_t *count, Py_ssize_t *total)
{
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fields); i++) {
        if (i >= room) {
            return 0;
        }
        PyObject *pair = PySequence_Fast_ITEMS(fields)[i];
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
            return 0;
        }
        /* Held: a lookup below may run Python (a key's __eq__), which could take it out of the list. */
        Py_INCREF(pair);
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        int usable = one_byte(name);
        if (usable > 0) {
            usable = one_byte(value);
        }
        PyObject *lower = usable > 0 ? lower_name(lowered, name) : NULL;
        if (lower == NULL) {
            Py_DECREF(pair);
            return usable < 0 || PyErr_Occurred() ? -1 : 0;
        }
        int drop = PySet_Contains(dropped, lower);
        int cookie = drop == 0 && rewrite != Py_None && PyUnicode_CompareWithASCIIString(lower, "cookie") == 0;
        Py_DECREF(lower);
        if (drop != 0) {
            Py_DECREF(pair);
            if (drop < 0) {
                return -1;
            }
            continue;
        }
        Py_INCREF(name);
        if (cookie) {
            value = PyObject_CallOneArg(rewrite, value);
            if (value == NULL || value == Py_None) {
                Py_DECREF(pair);
                Py_DECREF(name);
                Py_XDECREF(value);
                if (value == NULL) {
                    return -1;
                }
                continue;
            }
            usable = one_byte(value);
            if (usable <= 0) {
                Py_DECREF(pair);
                Py_DECREF(name);
                Py_DECREF(value);
                return usable;
            }
        }
        else {
            Py_INCREF(value);
        }
        Py_DECREF(pair); /* its name and value are held now */
        kept[*count].name = name;
        kept[*count].value = value;
        *count += 1;
        if (!add(total, PyUnicode_GET_LENGTH(name)) || !add(total, PyUnicode_GET_LENGTH(value)) || !add(total, 4)) {
            return 0;
        }
    }
    return 1;
}

static PyObject *
forward_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "forward_request(method, target, version, fields, dropped, lowered, rewrite_cookie, added, "
                        "tail) takes 9 arguments");
        return NULL;
    }
    PyObject *method = args[0], *target = args[1], *version = args[2], *fields = args[3], *dropped = args[4],
             *lowered = args[5], *rewrite = args[6], *added = args[7], *tail = args[8];
    if (!(PyList_CheckExact(fields) || PyTuple_CheckExact(fields))
        || !(PyFrozenSet_CheckExact(dropped) || PySet_CheckExact(dropped)) /* a subclass's `in` may differ */
        || !PyDict_CheckExact(lowered) || (rewrite != Py_None && !PyCallable_Check(rewrite))) {
        Py_RETURN_NONE;
    }
    Py_ssize_t total = 0;
    for (int i = 0; i < 3; i++) {
        int usable = one_byte(args[i]);
        if (usable <= 0) {
            return usable < 0 ? NULL : Py_NewRef(Py_None);
        }
        if (!add(&total, PyUnicode_GET_LENGTH(args[i]))) {
            Py_RETURN_NONE;
        }
    }
    if (!add(&total, 6)) { /* two spaces, the start line's CRLF and the final CRLF */
        Py_RETURN_NONE;
    }
    Py_INCREF(fields); /* held while `rewrite` runs Python */
    Py_ssize_t room = PySequence_Fast_GET_SIZE(fields);
    Kept on_stack[KEPT_ON_STACK];
    Kept *kept = room <= KEPT_ON_STACK ? on_stack : PyMem_New(Kept, (size_t)room);
    PyObject *head = NULL;
    if (kept == NULL) {
        Py_DECREF(fields);
        return PyErr_NoMemory();
    }
    Py_ssize_t count = 0;
    int usable = keep_fields(fields, dropped, lowered, rewrite, kept, room, &count, &total);
    if (usable == 0) {
        head = Py_NewRef(Py_None);
    }
    else if (usable > 0) {
        usable = measure_pairs(added, &total);
        if (usable > 0) {
            usable = measure_pairs(tail, &total);
        }
        if (usable <= 0) {
            head = usable < 0 ? NULL : Py_NewRef(Py_None);
        }
        else if ((head = PyBytes_FromStringAndSize(NULL, total)) != NULL) {
            char *out = PyBytes_AS_STRING(head);
            out = put(out, method);
            *out++ = ' ';
            out = put(out, target);
            *out++ = ' ';
            out = put(out, version);
            memcpy(out, "\r\n", 2);
            out += 2;
            for (Py_ssize_t i = 0; i < count; i++) {
                out = put_field(out, kept[i].name, kept[i].value);
            }
            out = put_pairs(put_pairs(out, added), tail);
            memcpy(out, "\r\n", 2);
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_DECREF(kept[i].name);
        Py_DECREF(kept[i].value);
    }
    if (kept != on_stack) {
        PyMem_Free(kept);
    }
    Py_DECREF(fields);
    return head;
}

static PyMethodDef methods[] = {
    {"render_head", (PyCFunction)(void (*)(void))render_head, METH_FASTCALL,
     "render_head(start_line, fields) -> bytes | None: the head's bytes, or None (render it in Python)."},
    {"forward_request", (PyCFunction)(void (*)(void))forward_request, METH_FASTCALL,
     "forward_request(method, target, version, fields, dropped, lowered, rewrite_cookie, added, tail) -> bytes | "
     "None: render_head(f'{method} {target} {version}', kept + added + tail), `kept` being the fields whose "
     "lower-case name is not in `dropped`, each Cookie's value passed through rewrite_cookie (None: dropped) "
     "unless it is None; or None (render it in Python)."},
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
