/* lb.state._tally: one more for a key of a dict of counts.
 *
 * `add_one(tally, key)` is `tally[key] = tally.get(key, 0) + 1` for a dict (lb.state.tally.Tally, a dict
 * subclass whose missing keys count 0, or any dict): the key is hashed once, looked up without the
 * subclass's `__missing__`, and its count stored back under the same hash.  A subclass with item access
 * of its own (`__getitem__`, `__setitem__`) gets `tally[key] += 1` as written, through it.  A key that cannot be hashed
 * raises TypeError, a `tally` that is not a dict TypeError, and a count that is not an int adds 1 as `+`
 * does (whatever that raises, it raises), as `tally[key] += 1` would.
 *
 * Why C: a handshake counts itself twice (lb_handshakes_total and lb_affinity_decisions_total, each
 * under a (pool, backend, label) key).  Compiled, `tally[key] += 1` on a dict subclass takes the
 * generic paths: the item looked up through the mapping protocol, the sum through the number protocol,
 * the item stored through the mapping protocol again, and the key tuple made and hashed for each of
 * the two: about 1,700 instructions a count (`python -m bench.instructions_live --profile`).  Here it
 * is one hash, one lookup and one store.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* 3.13 moved the store under a known hash into the internal headers (still exported, no longer
 * declared): from there on the store hashes the key again. */
#if PY_VERSION_HEX >= 0x030D0000
#define STORE(tally, key, value, hash) PyDict_SetItem((tally), (key), (value))
#else
#define STORE(tally, key, value, hash) _PyDict_SetItem_KnownHash((tally), (key), (value), (hash))
#endif

/* `tally[key] += 1` as written: for a dict subclass that reads or stores its items its own way (a
 * `__getitem__` or `__setitem__` of its own, as a test's Tally that fails on one key), which the fast
 * path below would go round. */
static PyObject *
add_one_by_its_items(PyObject *tally, PyObject *key)
{
    PyObject *count = PyObject_GetItem(tally, key);
    if (count == NULL) {
        return NULL;
    }
    PyObject *one = PyLong_FromLong(1);
    PyObject *next = one == NULL ? NULL : PyNumber_InPlaceAdd(count, one);
    Py_XDECREF(one);
    Py_DECREF(count);
    if (next == NULL) {
        return NULL;
    }
    int stored = PyObject_SetItem(tally, key, next);
    Py_DECREF(next);
    if (stored < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
add_one(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add_one(tally, key) takes 2 arguments");
        return NULL;
    }
    PyObject *tally = args[0], *key = args[1];
    if (!PyDict_Check(tally)) {
        PyErr_Format(PyExc_TypeError, "add_one(): a dict of counts, not %.100s", Py_TYPE(tally)->tp_name);
        return NULL;
    }
    PyMappingMethods *own = Py_TYPE(tally)->tp_as_mapping, *dicts = PyDict_Type.tp_as_mapping;
    if (own->mp_subscript != dicts->mp_subscript || own->mp_ass_subscript != dicts->mp_ass_subscript) {
        return add_one_by_its_items(tally, key);
    }
    Py_hash_t hash = PyObject_Hash(key);
    if (hash == -1) {
        return NULL;
    }
    PyObject *count = _PyDict_GetItem_KnownHash(tally, key, hash); /* borrowed */
    PyObject *next;
    if (count == NULL) {
        if (PyErr_Occurred()) {
            return NULL; /* a key's __eq__ raised */
        }
        next = PyLong_FromLong(1);
    } else {
        int overflow = 0;
        long value = PyLong_CheckExact(count) ? PyLong_AsLongAndOverflow(count, &overflow) : 0;
        if (PyLong_CheckExact(count) && !overflow && value < LONG_MAX) {
            next = PyLong_FromLong(value + 1);
        } else {
            /* A big int, or not an int at all: `+`, which may run Python, so the count is held. */
            Py_INCREF(count);
            PyObject *one = PyLong_FromLong(1);
            next = one == NULL ? NULL : PyNumber_Add(count, one);
            Py_XDECREF(one);
            Py_DECREF(count);
        }
    }
    if (next == NULL) {
        return NULL;
    }
    int stored = STORE(tally, key, next, hash);
    Py_DECREF(next);
    if (stored < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_one", (PyCFunction)(void (*)(void))add_one, METH_FASTCALL,
     "add_one(tally, key): tally[key] = tally.get(key, 0) + 1, the key hashed once."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "lb.state._tally", "One more for a key of a dict of counts.", -1,
    methods, NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation, as lb.http._scan. */
PyMODINIT_FUNC
PyInit__tally(void)
{
    return PyModule_Create(&module_definition);
}
