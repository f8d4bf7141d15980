/* lb.proxy._reading: the first bytes of the read buffer, copied out as `bytes`.
 *
 * `copy_out(buffer, nbytes: int) -> bytes` is the first `nbytes` bytes of a C-contiguous buffer (as
 * lb.proxy.reading.READ_VIEW is), copied: `view[:nbytes].tobytes()`, what a transport has just read into
 * it.  Anything else raises as the buffer protocol says (TypeError: no buffer; BufferError: not
 * contiguous; ValueError: a released memoryview), and `nbytes` out of range ValueError: never a read
 * past the buffer, and the buffer is held (not released under the copy) while it is read.
 *
 * Why C: every read of the data plane (a handshake's two heads, and each message of a tunnel) is
 * copied out of the one read buffer.  In compiled Python that is a slice object, a new memoryview, a
 * method looked up and called and both objects freed, around one copy: about 450 instructions a read
 * (`python -m bench.instructions_live --profile`).  Here it is the copy.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
copy_out(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "copy_out(buffer, nbytes) takes 2 arguments");
        return NULL;
    }
    Py_ssize_t nbytes = PyLong_AsSsize_t(args[1]);
    if (nbytes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer buffer;
    if (PyObject_GetBuffer(args[0], &buffer, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *copied = NULL;
    if (nbytes < 0 || nbytes > buffer.len) {
        PyErr_SetString(PyExc_ValueError, "copy_out(): nbytes out of the buffer's range");
    } else {
        copied = PyBytes_FromStringAndSize((const char *)buffer.buf, nbytes);
    }
    PyBuffer_Release(&buffer);
    return copied;
}

static PyMethodDef methods[] = {
    {"copy_out", (PyCFunction)(void (*)(void))copy_out, METH_FASTCALL,
     "copy_out(buffer, nbytes) -> bytes: the first nbytes bytes of a C-contiguous buffer, copied."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "lb.proxy._reading", "The first bytes of the read buffer, copied out as bytes.", -1,
    methods, NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation, as lb.http._scan. */
PyMODINIT_FUNC
PyInit__reading(void)
{
    return PyModule_Create(&module_definition);
}
