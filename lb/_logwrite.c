/* lb._logwrite: one timestamped log line written straight to a descriptor, in one call.
 *
 * `write_line(fd, created, middle, text)` writes `<time><middle><text>\n` to `fd` with write(2),
 * all of it, or none of it when `fd` is non-blocking and full (False; `write_all` says why):
 * `<time>` is `created` (epoch seconds) as lb.log.iso_utc formats it
 * (`2026-12-02T06:30:00.123Z`, milliseconds truncated), and `middle` and `text` are str
 * (written as UTF-8; an access line is ASCII).  A write that fails raises OSError as os.write
 * would, a time before 1970 or past 9999 ValueError (lb.log.iso_utc would format it: a line is
 * lost only with a clock that far off), and the caller (lb.log.AccessLineWriter) reports either
 * as logging reports a failed line.
 *
 * Why C, by hand: a WebSocket handshake logs two access lines, and writing one through Python
 * (the timestamp, three concatenations, the handler's lock, the stream's write and flush) was
 * about 8,000 instructions, 7 % of a handshake for both.  Here it is one call, the timestamp
 * formatted once per second, and a copy into one buffer.
 *
 * The caller holds the logging handler's lock, as the ordinary logging path does, so no other
 * thread's line lands inside this one even where one write(2) would not keep it whole (a pipe,
 * past PIPE_BUF bytes).  The GIL is released around each write(2), as os.write releases it: a
 * write that blocks (a full pipe) holds up the thread that logs, not every thread.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define STAMP_LENGTH 24 /* 2026-12-02T06:30:00.123Z */
#define ON_STACK 2048   /* a line up to this long needs no allocation */

/* The last second formatted: one gmtime and strftime per second, not per line (single-phase module,
 * one interpreter; only touched with the GIL held). */
static long long last_second = -1;
static char second_text[20]; /* 2026-12-02T06:30:00 and its NUL */

/* `created` as lb.log.iso_utc formats it, into `out` (STAMP_LENGTH bytes, no NUL); -1 with an
 * exception set when it is out of range. */
static int
format_stamp(double created, char *out)
{
    if (!(created >= 0.0 && created < 253402300800.0)) { /* 0001-... to 9999-12-31: four-digit years */
        PyErr_SetString(PyExc_ValueError, "time out of range for a log line");
        return -1;
    }
    long long milli = (long long)(created * 1000.0); /* int(created * 1000): truncated, as in Python */
    long long seconds = milli / 1000;
    if (seconds != last_second) {
        time_t whole = (time_t)seconds;
        struct tm parts;
        char text[sizeof second_text];
        if ((long long)whole != seconds || gmtime_r(&whole, &parts) == NULL
            || strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &parts) != 19) {
            PyErr_SetString(PyExc_ValueError, "time out of range for a log line");
            return -1;
        }
        memcpy(second_text, text, sizeof text); /* the cache changes only once the text is whole */
        last_second = seconds;
    }
    int rest = (int)(milli - seconds * 1000);
    memcpy(out, second_text, 19);
    out[19] = '.';
    out[20] = (char)('0' + rest / 100);
    out[21] = (char)('0' + rest / 10 % 10);
    out[22] = (char)('0' + rest % 10);
    out[23] = 'Z';
    return 0;
}

/* How long the rest of a line begun on a full non-blocking descriptor may wait for room (ms). */
#define FINISH_WAIT_MS 1000

/* All of `data` to `fd`: 0; or 1 when `fd` is non-blocking and full before the first byte (the line
 * is dropped: lb.log counts it, lb.log_stream says so); -1 with OSError set (or the exception a
 * signal handler raised).
 *
 * lb.log_stream makes stderr non-blocking when it is a pipe or a socket, so that a log reader that stalls
 * (a wedged log shipper) costs log lines, not the event loop.  A line is dropped whole or written
 * whole: a pipe takes up to PIPE_BUF bytes at once or nothing, and once part of a longer line (or a
 * socket's) is in, the rest waits for room, FINISH_WAIT_MS at most, so the next line does not
 * start inside it. */
static int
write_all(int fd, const char *data, Py_ssize_t length)
{
    int begun = 0;
    int waited_ms = 0;
    while (length > 0) {
        ssize_t written;
        int error = 0;
        Py_BEGIN_ALLOW_THREADS
        written = write(fd, data, (size_t)length);
        if (written < 0) {
            error = errno; /* read before the GIL is taken back */
        }
        else if (written == 0) {
            error = EIO; /* nothing taken of a non-empty buffer: an error, not a reason to spin */
            written = -1;
        }
        if (written < 0 && (error == EAGAIN || error == EWOULDBLOCK) && begun && waited_ms < FINISH_WAIT_MS) {
            struct pollfd room = {fd, POLLOUT, 0};
            (void)poll(&room, 1, 50);
            waited_ms += 50;
            error = EINTR; /* try again (signals checked, as for an interrupted write) */
        }
        Py_END_ALLOW_THREADS
        if (written < 0) {
            if (error == EINTR) {
                if (PyErr_CheckSignals() < 0) { /* as os.write: a handler's exception ends it (PEP 475) */
                    return -1;
                }
                continue;
            }
            if ((error == EAGAIN || error == EWOULDBLOCK) && !begun) {
                return 1;
            }
            errno = error;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        begun = 1;
        data += written;
        length -= written;
    }
    return 0;
}

static PyObject *
write_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "write_line(fd, created, middle, text) takes 4 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "write_line() takes a descriptor");
        return NULL;
    }
    double created = PyFloat_AsDouble(args[1]);
    if (created == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyUnicode_Check(args[2]) || !PyUnicode_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "write_line() takes str for middle and text");
        return NULL;
    }
    Py_ssize_t middle_length, text_length;
    const char *middle = PyUnicode_AsUTF8AndSize(args[2], &middle_length);
    const char *text = middle == NULL ? NULL : PyUnicode_AsUTF8AndSize(args[3], &text_length);
    if (text == NULL) {
        return NULL;
    }
    if (middle_length > PY_SSIZE_T_MAX / 2 - STAMP_LENGTH - 1 || text_length > PY_SSIZE_T_MAX / 2) {
        return PyErr_NoMemory();
    }
    Py_ssize_t length = STAMP_LENGTH + middle_length + text_length + 1;
    char on_stack[ON_STACK];
    char *line = length <= ON_STACK ? on_stack : PyMem_Malloc((size_t)length);
    if (line == NULL) {
        return PyErr_NoMemory();
    }
    int result = format_stamp(created, line);
    if (result == 0) {
        memcpy(line + STAMP_LENGTH, middle, (size_t)middle_length);
        memcpy(line + STAMP_LENGTH + middle_length, text, (size_t)text_length);
        line[length - 1] = '\n';
        result = write_all((int)fd, line, length);
    }
    if (line != on_stack) {
        PyMem_Free(line);
    }
    if (result < 0) {
        return NULL;
    }
    return PyBool_FromLong(result == 0);
}

static PyMethodDef methods[] = {
    {"write_line", (PyCFunction)(void (*)(void))write_line, METH_FASTCALL,
     "write_line(fd, created, middle, text) -> bool: `<time><middle><text>\\n`, all of it, to fd "
     "(False: fd is non-blocking and full, and the line was dropped)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "lb._logwrite", "One timestamped log line written straight to a descriptor.", -1,
    methods, NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation, as mypyc's modules and lb.http._scan: one interpreter per process. */
PyMODINIT_FUNC
PyInit__logwrite(void)
{
    return PyModule_Create(&module_definition);
}
