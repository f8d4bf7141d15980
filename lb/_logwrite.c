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
 * tests/unit/test_access_log.py holds all three to lb.access_log's Python.  `AccessSink` (below)
 * makes the checks lb.log.AccessLineWriter makes around each line, and takes its lock, as well
 * (where another thread could want it: sink_write_fields).
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
 * write that blocks (a full pipe) holds up the thread that logs, not every thread.  Unless there is
 * no other thread to hold up (`alone`): then releasing and taking it back is all the release does,
 * some 800 instructions a handshake's two lines.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
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

/* Whether this is the only thread of the only interpreter: no other thread could want the GIL while
 * a write(2) waits.  Another thread's state is made while this one holds the GIL (threading), or by a
 * thread of C code on its way to take the GIL (PyGILState_Ensure), which waits for the write either
 * way.  The lists are read as debuggers read them (the Tool Support API), without their lock: one
 * being added as they are read is seen or not, and either is an answer above. */
static int
alone(PyThreadState *mine)
{
    PyInterpreterState *only = PyInterpreterState_Head();
    return PyInterpreterState_Next(only) == NULL && PyInterpreterState_ThreadHead(only) == mine
        && PyThreadState_Next(mine) == NULL;
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
    PyThreadState *mine = PyThreadState_Get();
    while (length > 0) {
        ssize_t written;
        int error = 0;
        /* Asked again for each write: a signal handler (PyErr_CheckSignals below) may have started a
         * thread since, one that may be what the write waits for (a pipe's reader). */
        int releases = !alone(mine);
        if (releases) {
            PyEval_SaveThread();
        }
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
        if (releases) {
            PyEval_RestoreThread(mine);
        }
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

/* repr(x) for a float that is a whole number of milliseconds below 10**12 s, k / 1000 (a tunnel's
 * duration, which lb.proxy.tunnel rounds so): the length written to `out`, or -1 for any other float.
 * By hand, as the ints below: PyOS_double_to_string's shortest-text search cost about 1,200
 * instructions a tunnel's line (`python -m bench.instructions_live`: 183,600 a handshake before,
 * 182,400 after).  The text is k's digits with the point three places in, the zeros that end it
 * dropped but one (`2.0`, as repr writes it).  It is the shortest that reads back as x, so repr's:
 * any other text that did would be a decimal within half a unit in the last place of x (at most
 * 2**-14 below 10**12), where every decimal of three places or fewer but k / 1000 is at least 0.001
 * away, and one of more places has more digits. */
static Py_ssize_t
millis_text(double x, char out[32])
{
    if (!(x >= 0.0 && x < 1e12) || signbit(x)) { /* NaN, negative, -0.0, or too large */
        return -1;
    }
    long long k = (long long)(x * 1000.0 + 0.5); /* the nearest whole number of milliseconds */
    if ((double)k / 1000.0 != x) {
        return -1;
    }
    char digits[24];
    char *end = digits + sizeof digits, *at = end;
    unsigned long long whole = (unsigned long long)(k / 1000);
    do {
        *--at = (char)('0' + whole % 10);
        whole /= 10;
    } while (whole != 0);
    Py_ssize_t length = end - at;
    memcpy(out, at, (size_t)length);
    out[length++] = '.';
    int fraction = (int)(k % 1000);
    char places[3] = {(char)('0' + fraction / 100), (char)('0' + fraction / 10 % 10), (char)('0' + fraction % 10)};
    int kept = 3;
    while (kept > 1 && places[kept - 1] == '0') {
        kept--;
    }
    memcpy(out + length, places, (size_t)kept);
    return length + kept;
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
        char millis[32];
        Py_ssize_t length = millis_text(PyFloat_AS_DOUBLE(value), millis);
        if (length > 0) {
            return line_add(line, millis, length);
        }
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

/* The line `<time><middle>` and each key followed by its value, to `fd`: as write_all (0 written,
 * 1 dropped on a full non-blocking descriptor, -1 with an exception set). */
static int
render_and_write(int fd, double created, PyObject *middle, PyObject *keys, PyObject *values)
{
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
    return result;
}

static int
keys_and_values(PyObject *keys, PyObject *values)
{
    if (!PyTuple_Check(keys) || !PyTuple_Check(values) || PyTuple_GET_SIZE(keys) != PyTuple_GET_SIZE(values)) {
        PyErr_SetString(PyExc_TypeError, "write_fields() takes two tuples of one length");
        return -1;
    }
    return 0;
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
    if (!PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "write_fields() takes a str for middle");
        return NULL;
    }
    if (keys_and_values(args[3], args[4]) < 0) {
        return NULL;
    }
    int result = render_and_write(fd, created, args[2], args[3], args[4]);
    if (result < 0) {
        return NULL;
    }
    return PyBool_FromLong(result == 0);
}

/* -- AccessSink: the checks around a line, made here too --------------------------------------------
 *
 * lb.log.AccessLineWriter writes a line straight to the descriptor only while logging is as
 * setup_logging left it (`applies()`: nine attributes of three loggers and the handler), the access
 * logger is enabled at INFO, and the handler's stream is the one the descriptor was found for and
 * is still open; and it takes the handler's lock around the write.  In compiled Python that was
 * about 5,500 instructions a line around the 3,000 of the line itself (each attribute a generic
 * lookup, each call to the lock a method looked up by name), and a handshake logs two lines.
 * Here each attribute is one lookup in its object's own __dict__ (lb.log makes a sink only for
 * objects whose classes define none of these names, so that is where Python finds them too), the
 * lock's methods are bound once, and the time is read as time.time() reads it.
 *
 * Anything not exactly as set up (a handler added, a filter, a level, a stream replaced, a logger's
 * cache without the answer) is not judged here: `write_fields` returns None and the caller takes
 * its Python path, which decides as before.  So a sink can only be more conservative than
 * `applies()`, never less; tests/unit/test_log.py holds the two to each other.  Measured by
 * `python -m bench.instructions_live`: 207,800 instructions a handshake before, 205,400 after.
 */

/* What the last look that found everything as set up saw (sink_as_set_up), on Pythons whose dicts
 * carry PEP 509's version tag: a dict's tag changes with every change to the dict, and a new dict's is
 * one no dict had, so while each object's __dict__ is the same dict with the same tag, every attribute
 * it holds is as it was.  The lists those dicts hold (`handlers`, `filters`) have no tag: their
 * lengths, and root's one handler, are looked at each time, and so is the stream's file (`closed` is
 * not in a __dict__).  Then a line's checks are five tag comparisons and five list lengths, where the
 * full look is fourteen lookups in those dicts: 195,000 instructions a handshake before, 190,300 after
 * (`python -m bench.instructions_live`; a handshake logs two lines, and the handler's dict is looked at
 * again under the lock).
 *
 * The tag is deprecated from 3.12 on (dict watchers replace it), so there the full look is made every
 * time, as before.  Pointers here are borrowed and only compared, but for the lists and
 * lb.access's `_cache`: they are read only once their holder's dict is found the same dict with the
 * same tag, which it can only be while it still holds them. */
#if PY_VERSION_HEX < 0x030C0000
#define SINK_REMEMBERS 1
#else
#define SINK_REMEMBERS 0
#endif
enum { ROOT, LB, ACCESS, HANDLER, OBJECTS };

typedef struct {
    int valid;                 /* 1 after a look that found all as set up, 0 after any other */
    PyObject *dicts[OBJECTS];  /* root's, lb's, lb.access's and the handler's __dict__ */
    uint64_t tags[OBJECTS];
    PyObject *cache;           /* lb.access's `_cache` dict, and its tag */
    uint64_t cache_tag;
    PyObject *root_handlers;   /* lists, each held by one of the dicts above */
    PyObject *empty[4];        /* lb.access's and lb's handlers, lb.access's and the handler's filters */
} Remembered;

typedef struct {
    PyObject_HEAD
    int fd;
    PyObject *middle;    /* str: " INFO lb.access: " */
    PyObject *root;      /* the root logger, "lb" and "lb.access" */
    PyObject *lb;
    PyObject *access;
    PyObject *handler;   /* the one handler, its formatter, its stream and the FileIO under it */
    PyObject *formatter;
    PyObject *stream;
    PyObject *raw;
    PyObject *lock;      /* the handler's lock, and its bound acquire and release */
    PyObject *acquire;
    PyObject *release;
    int lock_is_rlock;   /* the lock is a _thread.RLock (see sink_write_fields) */
    PyObject *flush;     /* the stream's flush, called before each line (a buffered layer's part line
                          * goes first), or None */
    Remembered remembered; /* valid only where SINK_REMEMBERS */
} AccessSink;

/* _thread.RLock, the type of logging's handler locks. */
static PyTypeObject *rlock_type = NULL;

/* Names looked up in the objects' __dict__s, and INFO (20) as the key of a logger's `_cache`. */
static PyObject *NAME_HANDLERS, *NAME_PROPAGATE, *NAME_FILTERS, *NAME_DISABLED, *NAME_CACHE, *NAME_LEVEL,
    *NAME_FORMATTER, *NAME_STREAM, *NAME_LOCK, *NAME_CLOSED, *NAME_TERMINATOR, *LEVEL_INFO;

/* `obj`'s own attribute `name` (borrowed: its __dict__, which `obj` keeps, holds it), or NULL: absent
 * (no exception) or an error (exception set). */
static PyObject *
own_attribute(PyObject *obj, PyObject *name)
{
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL) {
        return NULL;
    }
    PyObject *value = PyDict_Check(dict) ? PyDict_GetItemWithError(dict, name) : NULL;
    Py_DECREF(dict);
    return value;
}

/* Whether `obj.name is expected`: 1, 0, -1. */
static int
attribute_is(PyObject *obj, PyObject *name, PyObject *expected)
{
    PyObject *value = own_attribute(obj, name);
    if (value == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    return value == expected;
}

#define NOT_WANTED 2 /* sink_as_set_up: lb.access is not enabled at INFO, and no line is to be written */

#if SINK_REMEMBERS
#define DICT_TAG(dict) (((PyDictObject *)(dict))->ma_version_tag)
#else
#define DICT_TAG(dict) ((uint64_t)0)
#endif

/* Whether `obj`'s __dict__ is `seen` with tag `tag` (1, else 0), or -1 on an error: only compared. */
static int
same_dict(PyObject *obj, PyObject *seen, uint64_t tag)
{
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL) {
        return -1;
    }
    int same = dict == seen && PyDict_Check(dict) && DICT_TAG(dict) == tag;
    Py_DECREF(dict);
    return same;
}

/* 1 while the file under the handler's stream is open, 0 when closed, -1 on an error. */
static int
sink_file_open(AccessSink *self)
{
    PyObject *closed = PyObject_GetAttr(self->raw, NAME_CLOSED);
    if (closed == NULL) {
        return -1;
    }
    Py_DECREF(closed);
    return closed == Py_False;
}

/* 1 while the handler's stream is the one the sink was made for and the file under it is open, 0 when
 * not, -1 on an error.  Asked again once the lock is held, as the Python path asks it: a thread that
 * held the lock may have replaced the stream and closed the old one (its descriptor's number may
 * belong to another file by now). */
static int
sink_stream_as_set_up(AccessSink *self)
{
    Remembered *remembered = &self->remembered;
    int as_set_up = remembered->valid ? same_dict(self->handler, remembered->dicts[HANDLER], remembered->tags[HANDLER])
                                      : 0;
    if (as_set_up == 0) {
        remembered->valid = 0;
        as_set_up = attribute_is(self->handler, NAME_STREAM, self->stream);
    }
    return as_set_up != 1 ? as_set_up : sink_file_open(self);
}

/* The objects' __dict__s and their tags, now, into `seen`: 0, or -1 on an error. */
static int
sink_snapshot(AccessSink *self, Remembered *seen)
{
    PyObject *objects[OBJECTS] = {self->root, self->lb, self->access, self->handler};
    for (int i = 0; i < OBJECTS; i++) {
        PyObject *dict = PyObject_GenericGetDict(objects[i], NULL);
        if (dict == NULL) {
            return -1;
        }
        seen->dicts[i] = dict; /* only compared: the object holds it, or held it */
        seen->tags[i] = PyDict_Check(dict) ? DICT_TAG(dict) : 0;
        Py_DECREF(dict);
    }
    return 0;
}

/* Whether everything the last full look found as set up is as it was (1), not (0: look again), or -1. */
static int
sink_as_remembered(AccessSink *self)
{
    Remembered *remembered = &self->remembered;
    if (!remembered->valid) {
        return 0;
    }
    PyObject *objects[OBJECTS] = {self->root, self->lb, self->access, self->handler};
    for (int i = 0; i < OBJECTS; i++) {
        int same = same_dict(objects[i], remembered->dicts[i], remembered->tags[i]);
        if (same != 1) {
            return same;
        }
    }
    /* Each dict holds what it held: lb.access's `_cache` and the lists are alive, and may be read. */
    if (DICT_TAG(remembered->cache) != remembered->cache_tag || PyList_GET_SIZE(remembered->root_handlers) != 1
        || PyList_GET_ITEM(remembered->root_handlers, 0) != self->handler) {
        return 0;
    }
    for (int i = 0; i < 4; i++) {
        if (PyList_GET_SIZE(remembered->empty[i]) != 0) {
            return 0;
        }
    }
    return 1;
}

/* Whether `obj.name` is an empty list (a logger's or handler's `handlers`, `filters`): 1, 0, -1; the list
 * into *seen. */
static int
empty_list_seen(PyObject *obj, PyObject *name, PyObject **seen)
{
    PyObject *value = own_attribute(obj, name);
    if (value == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    *seen = value;
    return PyList_CheckExact(value) && PyList_GET_SIZE(value) == 0;
}

/* The full look (see sink_as_set_up), the lists and lb.access's `_cache` it read into `seen`. */
static int
sink_look(AccessSink *self, Remembered *seen)
{
    int as_set_up;
    /* lb.access_log.access_enabled: not disabled, and the logger's own cache has the answer. */
    PyObject *disabled = own_attribute(self->access, NAME_DISABLED);
    if (disabled != Py_False) {
        return disabled == Py_True ? NOT_WANTED : PyErr_Occurred() ? -1 : 0;
    }
    PyObject *cache = own_attribute(self->access, NAME_CACHE);
    if (cache == NULL || !PyDict_CheckExact(cache)) {
        return PyErr_Occurred() ? -1 : 0;
    }
    seen->cache = cache;
    seen->cache_tag = DICT_TAG(cache); /* before the lookup, which could (with a hostile key) change it */
    Py_INCREF(cache); /* its keys are ints, but held all the same while it is looked in */
    PyObject *enabled = PyDict_GetItemWithError(cache, LEVEL_INFO);
    Py_DECREF(cache);
    if (enabled != Py_True) {
        return enabled == Py_False ? NOT_WANTED : PyErr_Occurred() ? -1 : 0;
    }
    /* lb.log.AccessLineWriter.applies, term by term. */
    PyObject *handlers = own_attribute(self->root, NAME_HANDLERS);
    if (handlers == NULL || !PyList_CheckExact(handlers) || PyList_GET_SIZE(handlers) != 1
        || PyList_GET_ITEM(handlers, 0) != self->handler) {
        return PyErr_Occurred() ? -1 : 0;
    }
    seen->root_handlers = handlers;
    if ((as_set_up = empty_list_seen(self->access, NAME_HANDLERS, &seen->empty[0])) != 1
        || (as_set_up = empty_list_seen(self->lb, NAME_HANDLERS, &seen->empty[1])) != 1
        || (as_set_up = attribute_is(self->access, NAME_PROPAGATE, Py_True)) != 1
        || (as_set_up = attribute_is(self->lb, NAME_PROPAGATE, Py_True)) != 1
        || (as_set_up = empty_list_seen(self->access, NAME_FILTERS, &seen->empty[2])) != 1
        || (as_set_up = empty_list_seen(self->handler, NAME_FILTERS, &seen->empty[3])) != 1
        || (as_set_up = attribute_is(self->handler, NAME_FORMATTER, self->formatter)) != 1
        || (as_set_up = attribute_is(self->handler, NAME_LOCK, self->lock)) != 1
        || (as_set_up = attribute_is(self->handler, NAME_STREAM, self->stream)) != 1) {
        return as_set_up;
    }
    /* Lines end as the handler's class ends them (`\n`, which lb.log found when it made the sink): no
     * `terminator` of the handler's own. */
    PyObject *terminator = own_attribute(self->handler, NAME_TERMINATOR);
    if (terminator != NULL || PyErr_Occurred()) {
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *level = own_attribute(self->handler, NAME_LEVEL);
    int overflow = 0;
    if (level == NULL || !PyLong_CheckExact(level) || PyLong_AsLongAndOverflow(level, &overflow) != 0
        || overflow) { /* not logging.NOTSET: an exact int can neither fail nor overflow but by being large */
        return PyErr_Occurred() ? -1 : 0;
    }
    return 1;
}

/* 1 while everything is as the sink was made for (see above), NOT_WANTED when lb.access says for sure
 * that it logs nothing at INFO, 0 when anything is not as set up, -1 on an error.  What a look that
 * found it all as set up saw is remembered, where dicts have tags, when nothing changed while it looked
 * (a lookup in a dict holding a hostile key could run code). */
static int
sink_as_set_up(AccessSink *self)
{
    Remembered *remembered = &self->remembered;
    int as_set_up = sink_as_remembered(self);
    if (as_set_up != 0) {
        return as_set_up < 0 ? -1 : sink_file_open(self);
    }
    remembered->valid = 0;
    Remembered seen = {0};
    if (SINK_REMEMBERS && sink_snapshot(self, &seen) < 0) {
        return -1;
    }
    as_set_up = sink_look(self, &seen);
    if (as_set_up != 1) {
        return as_set_up;
    }
    if (SINK_REMEMBERS) {
        Remembered after = seen;
        if (sink_snapshot(self, &after) < 0) {
            return -1;
        }
        if (memcmp(after.dicts, seen.dicts, sizeof seen.dicts) == 0 && memcmp(after.tags, seen.tags, sizeof seen.tags) == 0
            && DICT_TAG(seen.cache) == seen.cache_tag) {
            seen.valid = 1;
            *remembered = seen;
        }
    }
    return sink_file_open(self);
}

/* time.time(), as it reads the clock. */
static double
wall_clock(void)
{
    struct timespec now;
    (void)clock_gettime(CLOCK_REALTIME, &now);
    long long nanoseconds = (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
    return (double)nanoseconds / 1e9;
}

/* The handler's lock released, keeping an exception already set (the line's error survives the release):
 * 0, or -1 with the release's own exception. */
static int
sink_release(AccessSink *self)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *released = PyObject_CallNoArgs(self->release);
    if (released == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return -1;
    }
    Py_DECREF(released);
    PyErr_Restore(type, value, traceback);
    return 0;
}

/* The handler's lock taken, and the stream looked at again under it (see sink_stream_as_set_up): 1 with the
 * lock held; 0, not as set up, the lock given back (the caller's Python path decides); -1, an error set,
 * the lock given back if it was taken. */
static int
sink_lock_and_look(AccessSink *self)
{
    PyObject *taken = PyObject_CallNoArgs(self->acquire);
    if (taken == NULL) {
        return -1;
    }
    Py_DECREF(taken);
    int result = sink_stream_as_set_up(self);
    if (result != 1 && sink_release(self) < 0) {
        return -1;
    }
    return result;
}

static PyObject *
sink_write_fields(AccessSink *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write_fields(keys, values) takes 2 arguments");
        return NULL;
    }
    if (keys_and_values(args[0], args[1]) < 0) {
        return NULL;
    }
    if (self->access == NULL) {
        PyErr_SetString(PyExc_TypeError, "AccessSink() was not given its objects");
        return NULL;
    }
    int as_set_up = sink_as_set_up(self);
    if (as_set_up != 1) {
        return as_set_up < 0 ? NULL : Py_NewRef(as_set_up == NOT_WANTED ? Py_True : Py_None);
    }
    double created = wall_clock();
    /* The handler's lock, as the logging path takes it: no other thread's line lands inside this one.
     * Not when there is no other thread (`alone`) and the lock is an RLock, which the one thread may
     * always take, held or not: then taking it excludes no one, and nothing can have changed since the
     * look above (no Python code ran).  About 1,000 instructions a line: the RLock's acquire parses its
     * arguments, and the look under the lock reads the file's `closed` again.  (A lock a thread took and
     * then ended without releasing is not waited for here, where the logging path would wait for ever.) */
    int locks = !(self->lock_is_rlock && alone(PyThreadState_Get()));
    if (locks) {
        int held = sink_lock_and_look(self);
        if (held != 1) {
            return held < 0 ? NULL : Py_NewRef(Py_None);
        }
    }
    int result = 0;
    if (self->flush != Py_None) {
        PyObject *flushed = PyObject_CallNoArgs(self->flush);
        result = flushed == NULL ? -1 : 0;
        Py_XDECREF(flushed);
        if (result == 0 && !locks && !alone(PyThreadState_Get())) {
            /* The stream's flush may be Python of its own, and it started a thread: the lock after all, and
             * the look under it, as the locked path takes them (the values' own str(), for a value that is
             * not an int, a float or a str, is the one Python left to run unlocked: lb logs none). */
            int held = sink_lock_and_look(self);
            if (held != 1) {
                return held < 0 ? NULL : Py_NewRef(Py_None);
            }
            locks = 1;
        }
    }
    if (result == 0) {
        result = render_and_write(self->fd, created, self->middle, args[0], args[1]);
    }
    if ((locks && sink_release(self) < 0) || result < 0) {
        return NULL;
    }
    return PyBool_FromLong(result == 0);
}

static int
sink_init(AccessSink *self, PyObject *args, PyObject *kwargs)
{
    int fd;
    PyObject *middle, *root, *lb, *access, *handler, *formatter, *stream, *raw, *flush;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "AccessSink() takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "iUOOOOOOOO:AccessSink", &fd, &middle, &root, &lb, &access, &handler, &formatter,
                          &stream, &raw, &flush)) {
        return -1;
    }
    if (flush != Py_None && !PyCallable_Check(flush)) {
        PyErr_SetString(PyExc_TypeError, "AccessSink() takes a callable or None to flush");
        return -1;
    }
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "AccessSink() takes a descriptor");
        return -1;
    }
    if (self->access != NULL) { /* a call in progress reads its fields from the object: made once */
        PyErr_SetString(PyExc_TypeError, "AccessSink() is made once");
        return -1;
    }
    PyObject *lock = own_attribute(handler, NAME_LOCK);
    if (lock == NULL || lock == Py_None) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "AccessSink() takes a handler with its lock");
        }
        return -1;
    }
    Py_INCREF(lock);
    PyObject *acquire = PyObject_GetAttrString(lock, "acquire");
    PyObject *release = acquire == NULL ? NULL : PyObject_GetAttrString(lock, "release");
    if (release == NULL) {
        Py_DECREF(lock);
        Py_XDECREF(acquire);
        return -1;
    }
    self->fd = fd;
    Py_XSETREF(self->middle, Py_NewRef(middle));
    Py_XSETREF(self->root, Py_NewRef(root));
    Py_XSETREF(self->lb, Py_NewRef(lb));
    Py_XSETREF(self->access, Py_NewRef(access));
    Py_XSETREF(self->handler, Py_NewRef(handler));
    Py_XSETREF(self->formatter, Py_NewRef(formatter));
    Py_XSETREF(self->stream, Py_NewRef(stream));
    Py_XSETREF(self->raw, Py_NewRef(raw));
    Py_XSETREF(self->lock, lock);
    Py_XSETREF(self->acquire, acquire);
    Py_XSETREF(self->release, release);
    self->lock_is_rlock = Py_IS_TYPE(lock, rlock_type);
    Py_XSETREF(self->flush, Py_NewRef(flush));
    return 0;
}

static int
sink_traverse(AccessSink *self, visitproc visit, void *arg)
{
    Py_VISIT(self->middle);
    Py_VISIT(self->root);
    Py_VISIT(self->lb);
    Py_VISIT(self->access);
    Py_VISIT(self->handler);
    Py_VISIT(self->formatter);
    Py_VISIT(self->stream);
    Py_VISIT(self->raw);
    Py_VISIT(self->lock);
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->flush);
    return 0;
}

static int
sink_clear(AccessSink *self)
{
    Py_CLEAR(self->middle);
    Py_CLEAR(self->root);
    Py_CLEAR(self->lb);
    Py_CLEAR(self->access);
    Py_CLEAR(self->handler);
    Py_CLEAR(self->formatter);
    Py_CLEAR(self->stream);
    Py_CLEAR(self->raw);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->flush);
    return 0;
}

static void
sink_dealloc(AccessSink *self)
{
    PyObject_GC_UnTrack(self);
    (void)sink_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef sink_methods[] = {
    {"write_fields", (PyCFunction)(void (*)(void))sink_write_fields, METH_FASTCALL,
     "write_fields(keys, values) -> bool | None: the line, as the module's write_fields writes it, now, under "
     "the handler's lock: True (also when lb.access logs nothing at INFO, so no line is due), False (dropped, "
     "the descriptor being full), or None, nothing written, when logging is not exactly as the sink was made "
     "for (the caller decides)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AccessSinkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lb._logwrite.AccessSink",
    .tp_basicsize = sizeof(AccessSink),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "AccessSink(fd, middle, root, lb, access, handler, formatter, stream, raw, flush): access lines "
              "written to fd (after flush(), unless it is None), with the checks lb.log.AccessLineWriter makes "
              "around each made here.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sink_init,
    .tp_dealloc = (destructor)sink_dealloc,
    .tp_traverse = (traverseproc)sink_traverse,
    .tp_clear = (inquiry)sink_clear,
    .tp_methods = sink_methods,
};

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
    PyObject *thread = PyImport_ImportModule("_thread");
    PyObject *rlock = thread == NULL ? NULL : PyObject_GetAttrString(thread, "RLock");
    Py_XDECREF(thread);
    if (rlock == NULL) {
        return NULL;
    }
    if (!PyType_Check(rlock)) {
        Py_DECREF(rlock);
        PyErr_SetString(PyExc_TypeError, "_thread.RLock is not a type");
        return NULL;
    }
    rlock_type = (PyTypeObject *)rlock; /* kept for the module's life */
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&NAME_HANDLERS, "handlers"}, {&NAME_PROPAGATE, "propagate"}, {&NAME_FILTERS, "filters"},
        {&NAME_DISABLED, "disabled"}, {&NAME_CACHE, "_cache"},        {&NAME_LEVEL, "level"},
        {&NAME_FORMATTER, "formatter"}, {&NAME_STREAM, "stream"},      {&NAME_LOCK, "lock"},
        {&NAME_CLOSED, "closed"},       {&NAME_TERMINATOR, "terminator"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if ((*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL) {
            return NULL;
        }
    }
    if ((LEVEL_INFO = PyLong_FromLong(20)) == NULL || PyType_Ready(&AccessSinkType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObject(module, "AccessSink", Py_NewRef((PyObject *)&AccessSinkType)) < 0) {
        Py_DECREF(&AccessSinkType);
        Py_DECREF(module);
        return NULL;
    }
    /* The names a sink reads from the loggers' and the handler's own __dict__s (not `closed`, the
     * FileIO's, nor `terminator`, which the handler's class defines and its own __dict__ must not):
     * lb.log makes a sink only for objects whose classes define none of them. */
    PyObject *read = PyTuple_New(sizeof names / sizeof names[0] - 2);
    if (read == NULL) {
        Py_DECREF(module);
        return NULL;
    }
    for (size_t i = 0, at = 0; i < sizeof names / sizeof names[0]; i++) {
        if (*names[i].name != NAME_CLOSED && *names[i].name != NAME_TERMINATOR) {
            PyTuple_SET_ITEM(read, at++, Py_NewRef(*names[i].name));
        }
    }
    if (PyModule_AddObject(module, "SINK_READS", read) < 0) {
        Py_DECREF(read);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
