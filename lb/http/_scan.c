/* lb.http._scan: the fast reading of a well-formed HTTP/1.x head, in one pass over its bytes.  [pure]
 *
 * `read_head(raw: bytes, request: bool)` returns `(start_line, fields, index)` for a head that the
 * grammar of `lb.http.head._read_well_formed` accepts, and None for any other, which the caller then
 * reads with the Python checks that name its fault.  The results are exactly the Python reading's:
 * `start_line` a tuple of three str, `fields` a tuple of (name, value) str pairs, `index` a dict of
 * lower-case name to the list of its values, every str decoded as latin-1
 * (tests/unit/test_http_head_scan.py holds the two readings equal on hostile input).
 *
 * `known_lowered` maps the header names it knows (as browsers and gateways spell them, and in lower case) to
 * their lower case, interned.
 *
 * Why C, by hand: a WebSocket handshake parses two heads, and reading them in Python (one regex
 * findall over the decoded head, then a dict built name by name) was about a fifth of the
 * instructions of the whole handshake.  No library reads a head into these objects in one call:
 * llhttp (httptools) calls back into Python per header, and it is more lenient than our rules.
 * This file only recognises, it never decides: every byte it does not expect is a None, and the
 * Python checks, unchanged, have the last word.  It reads a bytes object it does not modify,
 * never past its end (every scan stops at the CR of the head's final CRLFCRLF, which no byte class
 * below admits, and each index is also checked against the length), and allocates only the
 * Python objects it returns (for a head it refuses, those of the lines read before its fault, in a
 * tuple of MAX_PRESIZED slots at most).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* RFC 9110 §5.6.2 tchar: a method, a header name. */
static unsigned char TCHAR[256];
/* A field value's bytes, SP and HTAB included (RFC 9110 §5.5: VCHAR, obs-text); also a reason phrase's. */
static unsigned char VALUE[256];
/* A request target's: visible ASCII without `#` (lb.http.head._TARGET_CHAR). */
static unsigned char TARGET[256];

static void
fill_tables(void)
{
    for (int c = 0; c < 256; c++) {
        TCHAR[c] = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
                   || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
        VALUE[c] = c == '\t' || (c >= 0x20 && c <= 0x7e) || c >= 0x80;
        TARGET[c] = c == 0x21 || c == 0x22 || (c >= 0x24 && c <= 0x7e);
    }
}

/* A str of bytes that are all ASCII (a name, a method, a version): no decoding pass needed. */
static PyObject *
ascii_str(const unsigned char *start, Py_ssize_t length)
{
    PyObject *text = PyUnicode_New(length, 127);
    if (text != NULL) {
        memcpy(PyUnicode_1BYTE_DATA(text), start, (size_t)length);
    }
    return text;
}

/* The header names nearly every handshake carries, as interned str made once, in their usual
 * spelling and in lower case: such a field costs no str for its name and none for its index key,
 * and the key's hash is already known.  Any other name (or spelling) is made as it comes. */
static const char *const KNOWN_NAMES[] = {
    "Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Accept",
    "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions", "Origin", "Cookie", "Set-Cookie", "User-Agent",
    "Accept", "Accept-Encoding", "Accept-Language", "Cache-Control", "Pragma", "Authorization", "Referer",
    "Content-Length", "Content-Type", "Transfer-Encoding", "Date", "Server", "Keep-Alive", "Vary",
    "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP", "X-Request-Id", "X-LB-Affinity",
    "Sec-Fetch-Dest", "Sec-Fetch-Mode", "Sec-Fetch-Site",
};
#define KNOWN_COUNT ((Py_ssize_t)(sizeof(KNOWN_NAMES) / sizeof(KNOWN_NAMES[0])))
static PyObject *known_name[KNOWN_COUNT];   /* the usual spelling */
static PyObject *known_lower[KNOWN_COUNT];  /* its lower case */
static Py_ssize_t known_length[KNOWN_COUNT];
/* The start line's most common parts, likewise. */
static PyObject *http_11, *http_10, *method_get;

static PyObject *
interned_lower(const char *name)
{
    char lower[64];
    size_t length = strlen(name);
    if (length >= sizeof lower) {  /* a longer name added to KNOWN_NAMES: said at import, never overrun */
        PyErr_Format(PyExc_SystemError, "lb.http._scan: known header name too long: %s", name);
        return NULL;
    }
    for (size_t i = 0; i <= length; i++) {
        lower[i] = (name[i] >= 'A' && name[i] <= 'Z') ? (char)(name[i] + ('a' - 'A')) : name[i];
    }
    return PyUnicode_InternFromString(lower);
}

static int
make_known(void)
{
    for (Py_ssize_t i = 0; i < KNOWN_COUNT; i++) {
        known_length[i] = (Py_ssize_t)strlen(KNOWN_NAMES[i]);
        known_name[i] = PyUnicode_InternFromString(KNOWN_NAMES[i]);
        known_lower[i] = interned_lower(KNOWN_NAMES[i]);
        if (known_name[i] == NULL || known_lower[i] == NULL) {
            return -1;
        }
    }
    http_11 = PyUnicode_InternFromString("HTTP/1.1");
    http_10 = PyUnicode_InternFromString("HTTP/1.0");
    method_get = PyUnicode_InternFromString("GET");
    return http_11 != NULL && http_10 != NULL && method_get != NULL ? 0 : -1;
}

/* The known name these bytes spell in any case (its index), or -1. */
static Py_ssize_t
known_index(const unsigned char *start, Py_ssize_t length)
{
    for (Py_ssize_t i = 0; i < KNOWN_COUNT; i++) {
        if (known_length[i] != length) {
            continue;
        }
        const char *name = KNOWN_NAMES[i];
        Py_ssize_t j = 0;
        while (j < length && (start[j] | 0x20) == ((unsigned char)name[j] | 0x20)) {
            j++;  /* tchar bytes only: `| 0x20` folds letters and leaves `-` and digits as they are */
        }
        if (j == length) {
            return i;
        }
    }
    return -1;
}

/* A str of these bytes, the interned one when it is `common`. */
static PyObject *
ascii_or(PyObject *common, const unsigned char *start, Py_ssize_t length)
{
    if (common != NULL && PyUnicode_GET_LENGTH(common) == length
        && memcmp(PyUnicode_1BYTE_DATA(common), start, (size_t)length) == 0) {
        Py_INCREF(common);
        return common;
    }
    return ascii_str(start, length);
}

/* `name` in lower case: the same object when it has no capital (most of a client's don't). */
static PyObject *
lower_name(PyObject *name, const unsigned char *start, Py_ssize_t length)
{
    Py_ssize_t i = 0;
    while (i < length && !(start[i] >= 'A' && start[i] <= 'Z')) {
        i++;
    }
    if (i == length) {
        Py_INCREF(name);
        return name;
    }
    PyObject *lower = PyUnicode_New(length, 127);
    if (lower == NULL) {
        return NULL;
    }
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(lower);
    for (i = 0; i < length; i++) {
        unsigned char c = start[i];
        out[i] = (c >= 'A' && c <= 'Z') ? (Py_UCS1)(c + ('a' - 'A')) : (Py_UCS1)c;
    }
    return lower;
}

/* `HTTP/1.1` or `HTTP/1.0` at `s + p`: its length (8), or 0. */
static Py_ssize_t
version_at(const unsigned char *s, Py_ssize_t p, Py_ssize_t n)
{
    if (n - p >= 8 && memcmp(s + p, "HTTP/1.", 7) == 0 && (s[p + 7] == '0' || s[p + 7] == '1')) {
        return 8;
    }
    return 0;
}

static int
is_crlf(const unsigned char *s, Py_ssize_t p, Py_ssize_t n)
{
    return p + 1 < n && s[p] == '\r' && s[p + 1] == '\n';
}

/* `method SP target SP version CRLF`, origin-form or absolute-form (`OPTIONS *` is left to Python).
 * Returns the index after the CRLF and sets `parts`, or returns 0 (not this grammar) with `parts` unset. */
static Py_ssize_t
request_line(const unsigned char *s, Py_ssize_t n, PyObject **parts)
{
    Py_ssize_t p = 0;
    while (p < n && TCHAR[s[p]]) {
        p++;
    }
    Py_ssize_t method_end = p;
    if (method_end == 0 || p >= n || s[p] != ' ') {
        return 0;
    }
    Py_ssize_t target = ++p;
    while (p < n && TARGET[s[p]]) {
        p++;
    }
    Py_ssize_t target_end = p;
    Py_ssize_t length = target_end - target;
    int origin = length >= 1 && s[target] == '/';
    int absolute = 0;
    if (!origin && length >= 7 && (s[target] | 0x20) == 'h' && (s[target + 1] | 0x20) == 't'
        && (s[target + 2] | 0x20) == 't' && (s[target + 3] | 0x20) == 'p') {
        Py_ssize_t q = target + 4;
        if ((s[q] | 0x20) == 's') {
            q++;
        }
        absolute = target_end - q >= 3 && memcmp(s + q, "://", 3) == 0;
    }
    if (!(origin || absolute) || p >= n || s[p] != ' ') {
        return 0;
    }
    Py_ssize_t version = ++p;
    Py_ssize_t version_length = version_at(s, version, n);
    if (version_length == 0 || !is_crlf(s, version + version_length, n)) {
        return 0;
    }
    /* Each part only once the one before it exists: after a failed allocation, no more calls. */
    if ((parts[0] = ascii_or(method_get, s, method_end)) != NULL
        && (parts[1] = ascii_str(s + target, length)) != NULL) {
        parts[2] = ascii_or(s[version + 7] == '1' ? http_11 : http_10, s + version, version_length);
    }
    return version + version_length + 2;
}

/* `version SP 3DIGIT [SP reason] CRLF`, the status from 100 to 599; as request_line. */
static Py_ssize_t
status_line(const unsigned char *s, Py_ssize_t n, PyObject **parts)
{
    Py_ssize_t version_length = version_at(s, 0, n);
    Py_ssize_t p = version_length;
    if (version_length == 0 || n - p < 5 || s[p] != ' ' || s[p + 1] < '1' || s[p + 1] > '5'
        || s[p + 2] < '0' || s[p + 2] > '9' || s[p + 3] < '0' || s[p + 3] > '9') {
        return 0;
    }
    Py_ssize_t status = p + 1;
    p += 4;
    Py_ssize_t reason = p, reason_end = p;
    if (p < n && s[p] == ' ') {
        reason = ++p;
        while (p < n && VALUE[s[p]]) {
            p++;
        }
        reason_end = p;
    }
    if (!is_crlf(s, p, n)) {
        return 0;
    }
    if ((parts[0] = ascii_or(s[7] == '1' ? http_11 : http_10, s, version_length)) != NULL
        && (parts[1] = ascii_str(s + status, 3)) != NULL) {
        parts[2] = PyUnicode_DecodeLatin1((const char *)s + reason, reason_end - reason, NULL);
    }
    return p + 2;
}

/* The dict is sized for at most this many names: a head of a thousand lines of one name (a hostile client's)
 * must not make an index of a thousand slots that its connection keeps. */
#define MAX_PRESIZED 32

/* How many field lines the head has from `p` on, if it is this grammar (one LF each, less the blank line's:
 * its CRLFCRLF end is checked), counted up to MAX_PRESIZED.  So `fields` is a tuple of that size from the
 * start and `index` a dict sized for as many names, where a list grown by appends was copied into a tuple
 * at the end and the dict grew as names came (a browser's dozen names: two resizes).  Counted no further:
 * a head of thousands of LFs that the grammar refuses at its first line (a hostile client's) costs no pass
 * over them and no tuple of their size; a longer head that passes grows its tuple as it goes
 * (field_lines).  Wrong only for a head the grammar refuses (a bare LF), which field_lines then finds. */
static Py_ssize_t
field_count(const unsigned char *s, Py_ssize_t n, Py_ssize_t p)
{
    Py_ssize_t count = 0;
    const unsigned char *at = s + p, *end = s + n;
    while (count <= MAX_PRESIZED && (at = memchr(at, '\n', (size_t)(end - at))) != NULL) {
        count++;
        at++;
    }
    return count > 0 ? count - 1 : 0;
}

/* Each `name ":" OWS value OWS CRLF` from `p` to the blank line that ends the head (and `raw`), into the
 * tuple at `fields_at` (ours alone: doubled when full, cut to its fields at the end) and `index`.  Returns
 * 1, 0 (not this grammar) or -1 (a Python error is set; `*fields_at` may then be NULL). */
static int
field_lines(const unsigned char *s, Py_ssize_t n, Py_ssize_t p, PyObject **fields_at, PyObject *index)
{
    for (Py_ssize_t filled = 0;; filled++) {
        if (is_crlf(s, p, n)) {
            if (p + 2 != n) {
                return 0;
            }
            return filled == PyTuple_GET_SIZE(*fields_at) || _PyTuple_Resize(fields_at, filled) == 0 ? 1 : -1;
        }
        if (filled == PyTuple_GET_SIZE(*fields_at) && _PyTuple_Resize(fields_at, filled ? 2 * filled : 1) < 0) {
            return -1;
        }
        PyObject *fields = *fields_at;
        Py_ssize_t name = p;
        while (p < n && TCHAR[s[p]]) {
            p++;
        }
        Py_ssize_t name_end = p;
        if (name_end == name || p >= n || s[p] != ':') {
            return 0;
        }
        p++;
        while (p < n && (s[p] == ' ' || s[p] == '\t')) {
            p++;
        }
        Py_ssize_t value = p;
        while (p < n && VALUE[s[p]]) {
            p++;
        }
        if (!is_crlf(s, p, n)) {
            return 0;
        }
        Py_ssize_t value_end = p;
        while (value_end > value && (s[value_end - 1] == ' ' || s[value_end - 1] == '\t')) {
            value_end--;
        }
        p += 2;

        Py_ssize_t known = known_index(s + name, name_end - name);
        PyObject *name_text = known < 0 ? ascii_str(s + name, name_end - name)
                                        : ascii_or(known_name[known], s + name, name_end - name);
        PyObject *value_text = name_text == NULL
            ? NULL : PyUnicode_DecodeLatin1((const char *)s + value, value_end - value, NULL);
        PyObject *pair = NULL, *key = NULL;
        int failed = 1;
        if (name_text != NULL && value_text != NULL && (pair = PyTuple_Pack(2, name_text, value_text)) != NULL) {
            Py_INCREF(pair);
            PyTuple_SET_ITEM(fields, filled, pair);  /* the tuple's reference; `pair` is let go below */
        }
        if (pair != NULL
            && (key = known < 0 ? lower_name(name_text, s + name, name_end - name)
                                : (Py_INCREF(known_lower[known]), known_lower[known])) != NULL) {
            PyObject *values = PyDict_GetItemWithError(index, key);  /* borrowed */
            if (values != NULL) {
                failed = PyList_Append(values, value_text) != 0;
            } else if (!PyErr_Occurred()) {
                PyObject *fresh = PyList_New(1);
                if (fresh != NULL) {
                    Py_INCREF(value_text);
                    PyList_SET_ITEM(fresh, 0, value_text);
                    failed = PyDict_SetItem(index, key, fresh) != 0;
                    Py_DECREF(fresh);
                }
            }
        }
        Py_XDECREF(name_text);
        Py_XDECREF(value_text);
        Py_XDECREF(pair);
        Py_XDECREF(key);
        if (failed) {
            return -1;
        }
    }
}

static PyObject *
read_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read_head(raw: bytes, request: bool)");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[0])) {
        Py_RETURN_NONE;  /* another bytes-like object: the Python reading takes it */
    }
    int request = PyObject_IsTrue(args[1]);
    if (request < 0) {
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    if (n < 4 || memcmp(s + n - 4, "\r\n\r\n", 4) != 0) {
        Py_RETURN_NONE;
    }
    PyObject *parts[3] = {NULL, NULL, NULL};
    Py_ssize_t p = request ? request_line(s, n, parts) : status_line(s, n, parts);
    if (p == 0) {
        Py_RETURN_NONE;
    }
    PyObject *result = NULL, *start = NULL, *fields = NULL, *index = NULL;
    if (parts[0] == NULL || parts[1] == NULL || parts[2] == NULL) {
        goto done;
    }
    Py_ssize_t count = field_count(s, n, p);
    if ((start = PyTuple_Pack(3, parts[0], parts[1], parts[2])) == NULL || (fields = PyTuple_New(count)) == NULL
        || (index = _PyDict_NewPresized(count < MAX_PRESIZED ? count : MAX_PRESIZED)) == NULL) {
        goto done;
    }
    int read = field_lines(s, n, p, &fields, index);
    if (read < 0) {
        goto done;
    }
    if (read == 0) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    result = PyTuple_Pack(3, start, fields, index);
done:
    Py_XDECREF(parts[0]);
    Py_XDECREF(parts[1]);
    Py_XDECREF(parts[2]);
    Py_XDECREF(start);
    Py_XDECREF(fields);  /* a tuple left part-filled (not this grammar) frees the pairs it holds */
    Py_XDECREF(index);
    return result;
}

/* `buffer.find(b"\r\n\r\n", start, stop)` for an exact bytes or bytearray and two integers (not None,
 * which find also takes), read as find reads them (negative from the end, clamped to the buffer).  Why:
 * every handshake looks for the end of two heads, and find's generic search took some 1,300 instructions
 * over a browser's head or a gateway's 101; a memchr for each LF (one a line) takes about 150 (`python -m
 * bench.instructions_live --profile`: 2,500 fewer a handshake). */
static PyObject *
head_end(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || !(PyBytes_CheckExact(args[0]) || PyByteArray_CheckExact(args[0]))) {
        PyErr_SetString(PyExc_TypeError, "head_end(buffer: bytes | bytearray, start: int, stop: int)");
        return NULL;
    }
    Py_ssize_t start = PyNumber_AsSsize_t(args[1], NULL);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t stop = PyNumber_AsSsize_t(args[2], NULL);
    if (stop == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const char *s = PyBytes_CheckExact(args[0]) ? PyBytes_AS_STRING(args[0]) : PyByteArray_AS_STRING(args[0]);
    Py_ssize_t n = Py_SIZE(args[0]);
    /* As find reads them: clamped to a Py_ssize_t (PyNumber_AsSsize_t without an exception), then ADJUST_INDICES. */
    if (stop > n) {
        stop = n;
    } else if (stop < 0 && (stop += n) < 0) {
        stop = 0;
    }
    if (start < 0 && (start += n) < 0) {
        start = 0;
    }
    if (start >= stop || stop - start < 4) {  /* no room for a match (and start + 3 below cannot overflow) */
        return PyLong_FromLong(-1);
    }
    /* Each LF that could end a match (at start + 3 or later, before stop), then the three bytes before it. */
    Py_ssize_t at = start + 3;
    while (at < stop) {
        const char *lf = memchr(s + at, '\n', (size_t)(stop - at));
        if (lf == NULL) {
            break;
        }
        Py_ssize_t found = (lf - s) - 3;
        if (s[found] == '\r' && s[found + 1] == '\n' && s[found + 2] == '\r') {
            return PyLong_FromSsize_t(found);
        }
        at = found + 4;
    }
    return PyLong_FromLong(-1);
}

/* Whether a key of the dict `index` (a head's, lower-case name to values) has a `_`.  Why: a returning
 * client's cookie nearly always holds a `_`, and then every name was looked at, through
 * `"".join(index)` (a list, then a str: about 2,300 instructions a handshake) or a loop of `in` (1,600);
 * a memchr a name takes about 700 in all, the call included.  A key that is not a str raises TypeError
 * when it is reached (a `_` in a key before it answers first). */
static PyObject *
any_underscored(PyObject *module, PyObject *index)
{
    (void)module;
    if (!PyDict_Check(index)) {
        PyErr_SetString(PyExc_TypeError, "any_underscored(index: dict[str, list[str]])");
        return NULL;
    }
    Py_ssize_t at = 0;
    PyObject *name;
    while (PyDict_Next(index, &at, &name, NULL)) {
        if (!PyUnicode_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "any_underscored: a name that is not a str");
            return NULL;
        }
        Py_ssize_t length = PyUnicode_GET_LENGTH(name);
        if (PyUnicode_KIND(name) == PyUnicode_1BYTE_KIND) {
            if (memchr(PyUnicode_1BYTE_DATA(name), '_', (size_t)length) != NULL) {
                Py_RETURN_TRUE;
            }
            continue;
        }
        Py_ssize_t at_char = PyUnicode_FindChar(name, '_', 0, length, 1);
        if (at_char == -2) {  /* an error (a str not ready), already set */
            return NULL;
        }
        if (at_char >= 0) {
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"read_head", (PyCFunction)(void (*)(void))read_head, METH_FASTCALL,
     "read_head(raw, request) -> (start_line, fields, index) | None: a well-formed head's reading, or None."},
    {"head_end", (PyCFunction)(void (*)(void))head_end, METH_FASTCALL,
     "head_end(buffer, start, stop) -> int: buffer.find(b'\\r\\n\\r\\n', start, stop)."},
    {"any_underscored", (PyCFunction)any_underscored, METH_O,
     "any_underscored(index) -> bool: whether a key (a header name) has a '_'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "lb.http._scan", "The fast reading of a well-formed HTTP/1.x head.", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation, as mypyc's modules: one interpreter per process (no sub-interpreters),
 * and the interned strings above live as long as it does. */
PyMODINIT_FUNC
PyInit__scan(void)
{
    fill_tables();
    if (make_known() < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_definition);
    PyObject *lowered = module == NULL ? NULL : PyDict_New();
    if (lowered == NULL) {
        Py_XDECREF(module);
        return NULL;
    }
    /* `known_lowered`: each known name, in its usual spelling and in lower case, to the interned lower case
     * (whose hash is known): lb.http.forwarding looks a field's name up here before it lowers one. */
    for (Py_ssize_t i = 0; i < KNOWN_COUNT; i++) {
        if (PyDict_SetItem(lowered, known_name[i], known_lower[i]) < 0
            || PyDict_SetItem(lowered, known_lower[i], known_lower[i]) < 0) {
            Py_DECREF(lowered);
            Py_DECREF(module);
            return NULL;
        }
    }
    if (PyModule_AddObject(module, "known_lowered", lowered) < 0) {
        Py_DECREF(lowered);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
