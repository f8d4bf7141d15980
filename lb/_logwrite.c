/* lb._logwrite: access lines, rendered and written straight to a descriptor, in one call.
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
 * `write_fields(fd, created, middle, keys, values)` is the same, its text rendered here: each key
 * (`" status="`) followed by its value as lb.access_log.plain_value prints it (an int or a float
 * as str() writes it; a str as is when `bare`, else as json.dumps quotes it; anything else as
 * its str(), so).  `bare(text)` is that check alone, for lb.access_log's generic path.
 * tests/unit/test_access_log.py holds all three to lb.access_log's Python.
 *
 * Why C, by hand: a WebSocket handshake logs two access lines, and writing one through Python
 * (the timestamp, three concatenations, the handler's lock, the stream's write and flush) was
 * about 8,000 instructions, 7 % of a handshake for both.  Rendering the text in compiled Python
 * (an f-string, a `bare` call per value, str() of each number) cost another 3,000 to 4,000 a line.
 * Here it is one call, the timestamp formatted once per second, and a copy into one buffer.
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

/* The first two arguments of either writer: a descriptor and a time; -1 with an exception set. */
static int
read_fd_and_time(PyObject *const *args, int *fd, double *created)
{
    long number = PyLong_AsLong(args[0]);
    if (number == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (number < 0 || number > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "a log line's writer takes a descriptor");
        return -1;
    }
    *fd = (int)number;
    *created = PyFloat_AsDouble(args[1]);
    return *created == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *
write_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "write_line(fd, created, middle, text) takes 4 arguments");
        return NULL;
    }
    int fd;
    double created;
    if (read_fd_and_time(args, &fd, &created) < 0) {
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
        result = write_all(fd, line, length);
    }
    if (line != on_stack) {
        PyMem_Free(line);
    }
    if (result < 0) {
        return NULL;
    }
    return PyBool_FromLong(result == 0);
}

/* -- write_fields: the line's `key=value` text rendered here too ---------------------------------- */

/* Visible ASCII (0x21-0x7E) without `"` and `=`: a value printed as is. */
static unsigned char BARE[128];

/* json.dumps, for a value that must be quoted (lb.access_log._plain quotes with it). */
static PyObject *json_dumps = NULL;

/* A line being built: on the caller's stack until it outgrows it, then on the heap. */
typedef struct {
    char *data;
    Py_ssize_t length;
    Py_ssize_t capacity;
    int on_heap;
} Line;

static int
line_add(Line *line, const char *bytes, Py_ssize_t count)
{
    if (count > PY_SSIZE_T_MAX / 4 - line->length) {
        PyErr_NoMemory();
        return -1;
    }
    if (line->length + count > line->capacity) {
        Py_ssize_t capacity = (line->length + count) * 2;
        char *grown = line->on_heap ? PyMem_Realloc(line->data, (size_t)capacity) : PyMem_Malloc((size_t)capacity);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        if (!line->on_heap) {
            memcpy(grown, line->data, (size_t)line->length);
        }
        line->data = grown;
        line->capacity = capacity;
        line->on_heap = 1;
    }
    memcpy(line->data + line->length, bytes, (size_t)count);
    line->length += count;
    return 0;
}

/* A str as UTF-8 (an access line's is ASCII: a quoted value is JSON with its escapes). */
static int
line_add_str(Line *line, PyObject *text)
{
    Py_ssize_t count;
    const char *bytes = PyUnicode_AsUTF8AndSize(text, &count);
    return bytes == NULL ? -1 : line_add(line, bytes, count);
}

static int
is_bare(PyObject *text)
{
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    if (length == 0 || !PyUnicode_IS_ASCII(text)) {
        return 0;
    }
    const unsigned char *chars = PyUnicode_1BYTE_DATA(text);
    for (Py_ssize_t i = 0; i < length; i++) {
        if (!BARE[chars[i]]) {
            return 0;
        }
    }
    return 1;
}

/* bare(text) -> bool: whether lb.access_log._plain prints `text` as is.  The check in compiled Python
 * (isascii, isprintable and three substring searches, each a method call) was about 900
 * instructions a value, and the generic path of lb.access_log checks every value it prints. */
static PyObject *
bare(PyObject *module, PyObject *text)
{
    (void)module;
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "bare() takes a str");
        return NULL;
    }
    if (PyUnicode_READY(text) < 0) { /* a no-op but for a legacy str made from wchar_t */
        return NULL;
    }
    return PyBool_FromLong(is_bare(text));
}

/* A text value as lb.access_log._plain prints it: as is when bare, else as a JSON string. */
static int
line_add_text(Line *line, PyObject *text)
{
    if (PyUnicode_READY(text) < 0) {
        return -1;
    }
    if (is_bare(text)) {
        return line_add(line, (const char *)PyUnicode_1BYTE_DATA(text), PyUnicode_GET_LENGTH(text));
    }
    PyObject *quoted = PyObject_CallOneArg(json_dumps, text);
    if (quoted == NULL) {
        return -1;
    }
    int result = PyUnicode_Check(quoted) ? line_add_str(line, quoted) : -1;
    if (result < 0 && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_TypeError, "json.dumps gave no str");
    }
    Py_DECREF(quoted);
    return result;
}

/* A value as lb.access_log.plain_value prints it: an int or a float as str() writes it (always
 * plain), anything else as its str(), printed as is or quoted. */
static int
line_add_value(Line *line, PyObject *value)
{
    if (PyUnicode_CheckExact(value)) {
        return line_add_text(line, value);
    }
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (!overflow && !(number == -1 && PyErr_Occurred())) {
            /* By hand: snprintf's format parsing cost about 700 instructions a number. */
            char digits[24];
            char *end = digits + sizeof digits, *at = end;
            unsigned long long magnitude = number < 0 ? 0ULL - (unsigned long long)number : (unsigned long long)number;
            do {
                *--at = (char)('0' + magnitude % 10);
                magnitude /= 10;
            } while (magnitude != 0);
            if (number < 0) {
                *--at = '-';
            }
            return line_add(line, at, end - at);
        }
        PyErr_Clear();
        PyObject *text = PyObject_Str(value);
        int result = text == NULL ? -1 : line_add_str(line, text);
        Py_XDECREF(text);
        return result;
    }
    if (PyFloat_CheckExact(value)) {
        /* repr(float), which str() is: the shortest text that reads back as the same float. */
        char *text = PyOS_double_to_string(PyFloat_AS_DOUBLE(value), 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (text == NULL) {
            return -1;
        }
        int result = line_add(line, text, (Py_ssize_t)strlen(text));
        PyMem_Free(text);
        return result;
    }
    PyObject *text = PyObject_Str(value);
    if (text == NULL) {
        return -1;
    }
    int result = line_add_text(line, text);
    Py_DECREF(text);
    return result;
}

static PyObject *
write_fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "write_fields(fd, created, middle, keys, values) takes 5 arguments");
        return NULL;
    }
    int fd;
    double created;
    if (read_fd_and_time(args, &fd, &created) < 0) {
        return NULL;
    }
    PyObject *middle = args[2], *keys = args[3], *values = args[4];
    if (!PyUnicode_Check(middle) || !PyTuple_Check(keys) || !PyTuple_Check(values)
        || PyTuple_GET_SIZE(keys) != PyTuple_GET_SIZE(values)) {
        PyErr_SetString(PyExc_TypeError, "write_fields() takes a str and two tuples of one length");
        return NULL;
    }
    char on_stack[ON_STACK];
    Line line = {on_stack, STAMP_LENGTH, ON_STACK, 0};
    int result = format_stamp(created, line.data);
    if (result == 0) {
        result = line_add_str(&line, middle);
    }
    for (Py_ssize_t i = 0; result == 0 && i < PyTuple_GET_SIZE(keys); i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        if (!PyUnicode_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "write_fields() takes str keys");
            result = -1;
            break;
        }
        result = line_add_str(&line, key);
        if (result == 0) {
            result = line_add_value(&line, PyTuple_GET_ITEM(values, i));
        }
    }
    if (result == 0) {
        result = line_add(&line, "\n", 1);
    }
    if (result == 0) {
        result = write_all(fd, line.data, line.length);
    }
    if (line.on_heap) {
        PyMem_Free(line.data);
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
    {"bare", (PyCFunction)bare, METH_O,
     "bare(text) -> bool: not empty, and only visible ASCII without '\"' and '=' (printed as is)."},
    {"write_fields", (PyCFunction)(void (*)(void))write_fields, METH_FASTCALL,
     "write_fields(fd, created, middle, keys, values) -> bool: as write_line, the text being each key "
     "followed by its value as lb.access_log.plain_value prints it."},
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
    for (int c = 0; c < 128; c++) {
        BARE[c] = c >= 0x21 && c <= 0x7e && c != '"' && c != '=';
    }
    PyObject *json = PyImport_ImportModule("json");
    if (json == NULL) {
        return NULL;
    }
    json_dumps = PyObject_GetAttrString(json, "dumps");
    Py_DECREF(json);
    if (json_dumps == NULL) {
        return NULL;
    }
    return PyModule_Create(&module_definition);
}
