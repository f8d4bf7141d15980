/* lb.proxy._coroutine: one step of a coroutine, as a Task takes it, without a StopIteration.
 *
 * `send(coroutine) -> object` sends None into `coroutine` with PyIter_Send, as asyncio's Task (in C)
 * steps the coroutine it runs: it returns what the coroutine yielded (the future it awaits now, or
 * None for a bare `yield`), or `RETURNED` once it has returned (its result is let go of); what the
 * coroutine raised, it raises.  lb.proxy.connecting steps a backend's connect with it.
 *
 * Why C: the end of a coroutine stepped from Python is an exception.  `coroutine.send(None)`
 * raises StopIteration with the result, and the compiled caller that catches it records a
 * traceback entry and saves and restores the exception state: about 4,500 instructions a
 * handshake (`python -m bench.instructions_live`), 2 % of it, to learn that a connect has ended.
 * PyIter_Send returns the end as a value (PYGEN_RETURN), which no Python-level call can; a
 * coroutine that implements `am_send` (CPython's, and uvloop's, which Cython writes) never makes
 * the exception at all.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *RETURNED;

static PyObject *
send(PyObject *module, PyObject *coroutine)
{
    PyObject *result = NULL;
    (void)module;
    switch (PyIter_Send(coroutine, Py_None, &result)) {
    case PYGEN_NEXT:
        return result;
    case PYGEN_RETURN:
        Py_DECREF(result);
        Py_INCREF(RETURNED);
        return RETURNED;
    default:  /* PYGEN_ERROR: the exception is set */
        return NULL;
    }
}

static PyMethodDef methods[] = {
    {"send", send, METH_O,
     "send(coroutine) -> object: send None in; what it yielded, or RETURNED once it has returned."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "lb.proxy._coroutine", "One step of a coroutine, without a StopIteration.", -1,
    methods, NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation, as lb.http._scan. */
PyMODINIT_FUNC
PyInit__coroutine(void)
{
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL) {
        return NULL;
    }
    /* A marker no coroutine yields: a plain object, as `object()` makes. */
    RETURNED = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    if (RETURNED == NULL || PyModule_AddObjectRef(module, "RETURNED", RETURNED) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
