/* lb.ws._plain: the WebSocket handshake's two heads as browsers and gateways write them.  [pure]
 *
 * Each function says whether a head is one that every check of the ordinary path passes with
 * nothing to change, so that the connection may skip those checks (and for the 101, reading it
 * into objects at all).  False is always safe: the ordinary path then decides, and has the last word
 * (a 400, a 502, a field taken out).  tests/unit/test_ws_plain.py holds both to the ordinary path
 * on hostile heads, and to saying yes to what browsers and gateways send.
 *
 * `plain_upgrade(method: str, version: str, index: dict) -> bool`, for a request head that
 * lb.http.head.parse_request_head has accepted, given as it read it (`index`: lb.http.head.Head.index,
 * lower-case name to its values): whether it is a WebSocket upgrade (lb.ws.upgrade.is_websocket_upgrade)
 * that lb.ws.upgrade.check_upgrade passes: `GET`, `HTTP/1.1`, no body framing, `Upgrade` and
 * `Connection` lists naming websocket and Upgrade, one well-formed `Sec-WebSocket-Key` and one
 * `Sec-WebSocket-Version: 13`.  The values are the parser's (whitespace around them left out; a name
 * spelt with `_` is not there, the parser drops it).  Six lookups in the parsed head, where reading
 * its bytes again cost 2,700 instructions a handshake (`python -m bench.instructions_live --profile`).
 *
 * `plain_switch(raw: bytes, key: str) -> bool` says whether `raw`, a complete answer head (up to and
 * with its CRLFCRLF), is a WebSocket switch that every check of the Python path passes and that the
 * Python rendering would give the client byte for byte as it came, before our own fields:
 *   - `HTTP/1.1 101 ` and a reason phrase, then field lines `name: value` (one space after the
 *     colon, no whitespace after the value) in the grammar of lb.http.head;
 *   - exactly one `Upgrade: websocket` (any case), one `Connection: Upgrade` (or `upgrade`) and one
 *     `Sec-WebSocket-Accept` that answers `key` (RFC 6455 §4.2.2; the key read as switch_fault reads
 *     it, without SP or HTAB around it);
 *   - none of the fields the Python path would take out, change or have to judge against the
 *     client's offer: hop-by-hop ones, body framing, `Set-Cookie` (insert mode drops one of our name),
 *     `Sec-WebSocket-Protocol` and `Sec-WebSocket-Extensions`.
 * For such a head, lb.http.head.take_answer_head, lb.ws.upgrade.switch_fault and negotiation_fault
 * find nothing to refuse, and lb.http.forwarding.render_client_response writes `raw` less its last
 * CRLF, then our fields, then CRLF.
 * `accept(key: str) -> str | None` is the Sec-WebSocket-Accept for an exact str of ASCII (None otherwise),
 * which the same test holds to lb.ws.upgrade.accept_value.  Its SHA-1 runs on the CPU's SHA extensions
 * where CPUID says there are some (`sha_extensions()`); `accept_portable(key)` gives the same answer by the
 * portable SHA-1, which the test holds to it too, whatever the CPU it runs on.
 *
 * Why C, by hand: every WebSocket handshake checks its upgrade and reads its backend's 101.  In
 * compiled Python the upgrade's checks were a dozen lookups and splits of the parsed head (about
 * 8,500 instructions), and the 101 was read into objects, checked, its Accept's SHA-1 taken through
 * hashlib and written again (about 30,000), to learn that nothing was to be done.  Here the upgrade
 * is six lookups in the parsed head and no split, and the 101 one pass over its bytes (and a SHA-1 of
 * 60 bytes), and no object at all.  No library answers "is this head one we pass as it is": llhttp
 * calls back per field and judges nothing of ours.
 * It reads the objects it is given without modifying them, never past the end of `raw` (every scan
 * is bounded by its length) or of a str, and allocates nothing but `accept`'s result.  A hostile pass
 * (stop 44) ran 32 million mutated heads through both under AddressSanitizer, and 2.3 million through
 * the contract above against the ordinary path: its one finding (the key's whitespace) is mended.
 * (The upgrade was then read from the head's bytes; it reads the parser's objects now, the same
 * contract held by the same tests.)
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_SHA_EXTENSIONS_CODE 1
#ifndef bit_SHA
#define bit_SHA (1u << 29)  /* CPUID leaf 7, EBX: older cpuid.h headers do not name it */
#endif
#endif

/* RFC 9110 §5.6.2 tchar: a field name. */
static unsigned char TCHAR[256];
/* A field value's bytes, SP and HTAB included (RFC 9110 §5.5: VCHAR, obs-text); a reason phrase's too. */
static unsigned char VALUE[256];

static void
fill_tables(void)
{
    for (int c = 0; c < 256; c++) {
        TCHAR[c] = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
                   || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
        VALUE[c] = c == '\t' || (c >= 0x20 && c <= 0x7e) || c >= 0x80;
    }
}

/* -- SHA-1 (FIPS 180-4), for one Sec-WebSocket-Accept: a key and the GUID, two blocks. -------------- */

static uint32_t
rotl(uint32_t x, int n)
{
    return (x << n) | (x >> (32 - n));
}

/* One 64-byte block into `state`: four loops of 20 rounds, so no round tests which function it uses. */
static void
sha1_block(uint32_t state[5], const unsigned char *p)
{
    uint32_t w[80];
    for (int i = 0; i < 16; i++) {
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8
               | (uint32_t)p[4 * i + 3];
    }
    for (int i = 16; i < 80; i++) {
        w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3], e = state[4], t;
#define ROUND(f, k, i) (t = rotl(a, 5) + (f) + e + (k) + w[i], e = d, d = c, c = rotl(b, 30), b = a, a = t)
    for (int i = 0; i < 20; i++) {
        ROUND((b & c) | (~b & d), 0x5A827999u, i);
    }
    for (int i = 20; i < 40; i++) {
        ROUND(b ^ c ^ d, 0x6ED9EBA1u, i);
    }
    for (int i = 40; i < 60; i++) {
        ROUND((b & c) | (b & d) | (c & d), 0x8F1BBCDCu, i);
    }
    for (int i = 60; i < 80; i++) {
        ROUND(b ^ c ^ d, 0xCA62C1D6u, i);
    }
#undef ROUND
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
}

#ifdef HAVE_SHA_EXTENSIONS_CODE
/* The same block with the CPU's SHA extensions (Intel SHA-NI, AMD since Zen), which most x86-64 servers of
 * the last years have: four rounds an instruction.  An accept value takes 138 ns rather than 681 (`python -m
 * timeit` on accept and accept_portable), some 4,000 instructions a handshake.  Chosen once, at import, by
 * CPUID (sha1_block_of_this_cpu); elsewhere, and under valgrind (whose CPUID says no), the portable block
 * runs.  Written from Intel's description of the instructions: SHA1RNDS4 runs four rounds on ABCD (A in the
 * high lane) given E plus the four message words, SHA1NEXTE derives the next E (A of four rounds before,
 * rotated by 30) and adds it to the next four words, and SHA1MSG1, a XOR and SHA1MSG2 extend the message
 * four words at a time (W[t] = rotl1(W[t-3] ^ W[t-8] ^ W[t-14] ^ W[t-16])). */
__attribute__((target("sha,ssse3,sse4.1"))) static void
sha1_block_sha_extensions(uint32_t state[5], const unsigned char *p)
{
    /* Reverses the 16 bytes: four big-endian words, the first in the high lane, as the instructions read them. */
    const __m128i order = _mm_set_epi64x(0x0001020304050607LL, 0x08090a0b0c0d0e0fLL);
    __m128i abcd = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)state), 0x1B);
    const __m128i abcd_before = abcd, e_before = _mm_set_epi32((int)state[4], 0, 0, 0);
    __m128i w[4];  /* the message's words 4j to 4j+3, in w[j % 4] */
    for (int j = 0; j < 4; j++) {
        w[j] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * j)), order);
    }
    __m128i e = _mm_add_epi32(e_before, w[0]), last = abcd;
    /* Rounds 4j to 4j+3: the words of group j (from 4 on, extended from the four before), then E, then the
     * rounds with function j / 5 (an immediate: each group is written out). */
#define GROUP(j)                                                                                            \
    do {                                                                                                    \
        if ((j) >= 4) {                                                                                     \
            w[(j) % 4] = _mm_sha1msg2_epu32(                                                               \
                _mm_xor_si128(_mm_sha1msg1_epu32(w[(j) % 4], w[((j) + 1) % 4]), w[((j) + 2) % 4]),       \
                w[((j) + 3) % 4]);                                                                          \
        }                                                                                                   \
        if ((j) > 0) {                                                                                      \
            e = _mm_sha1nexte_epu32(last, w[(j) % 4]);                                                      \
        }                                                                                                   \
        last = abcd;                                                                                        \
        abcd = _mm_sha1rnds4_epu32(abcd, e, (j) / 5);                                                       \
    } while (0)
    GROUP(0); GROUP(1); GROUP(2); GROUP(3); GROUP(4); GROUP(5); GROUP(6); GROUP(7); GROUP(8); GROUP(9);
    GROUP(10); GROUP(11); GROUP(12); GROUP(13); GROUP(14); GROUP(15); GROUP(16); GROUP(17); GROUP(18); GROUP(19);
#undef GROUP
    e = _mm_sha1nexte_epu32(last, e_before);  /* E after the 80 rounds, plus the E the block began with */
    abcd = _mm_shuffle_epi32(_mm_add_epi32(abcd, abcd_before), 0x1B);
    _mm_storeu_si128((__m128i *)state, abcd);
    state[4] = (uint32_t)_mm_extract_epi32(e, 3);
}
#endif

typedef void (*sha1_block_function)(uint32_t state[5], const unsigned char *p);

/* The block this CPU runs fastest: with the SHA extensions when CPUID says it has them (and the SSSE3 and
 * SSE4.1 the byte order and the last lane are read with), else the portable one. */
static sha1_block_function
sha1_block_of_this_cpu(void)
{
#ifdef HAVE_SHA_EXTENSIONS_CODE
    unsigned int eax, ebx, ecx, edx;
    /* __get_cpuid_max and __cpuid_count, not __get_cpuid_count: every GCC and clang that builds the rest has them. */
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_SSSE3) && (ecx & bit_SSE4_1)
        && __get_cpuid_max(0, NULL) >= 7) {
        __cpuid_count(7, 0, eax, ebx, ecx, edx);
        if (ebx & bit_SHA) {
            return sha1_block_sha_extensions;
        }
    }
#endif
    return sha1_block;
}

static sha1_block_function sha1_block_fastest = sha1_block;  /* set by PyInit__plain */

/* SHA-1 of `first` then `second` (any lengths) into `digest`, `block_function` taking each 64 bytes. */
static void
sha1_of_two(sha1_block_function block_function, const unsigned char *first, size_t first_length,
            const unsigned char *second, size_t second_length, unsigned char digest[20])
{
    uint32_t state[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
    unsigned char block[64];
    size_t used = 0;
    const unsigned char *parts[2] = {first, second};
    size_t lengths[2] = {first_length, second_length};
    for (int part = 0; part < 2; part++) {
        const unsigned char *p = parts[part];
        size_t n = lengths[part];
        while (n > 0) {
            size_t take = 64 - used < n ? 64 - used : n;
            memcpy(block + used, p, take);
            used += take;
            p += take;
            n -= take;
            if (used == 64) {
                block_function(state, block);
                used = 0;
            }
        }
    }
    /* The padding: 0x80, zeros up to 56 bytes into a block, and the message's length in bits. */
    block[used++] = 0x80;
    if (used > 56) {
        memset(block + used, 0, 64 - used);
        block_function(state, block);
        used = 0;
    }
    memset(block + used, 0, 56 - used);
    uint64_t bits = ((uint64_t)first_length + (uint64_t)second_length) * 8;
    for (int i = 0; i < 8; i++) {
        block[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
    }
    block_function(state, block);
    for (int i = 0; i < 5; i++) {
        digest[4 * i] = (unsigned char)(state[i] >> 24);
        digest[4 * i + 1] = (unsigned char)(state[i] >> 16);
        digest[4 * i + 2] = (unsigned char)(state[i] >> 8);
        digest[4 * i + 3] = (unsigned char)state[i];
    }
}

/* -- The accept value ----------------------------------------------------------------------------- */

#define ACCEPT_LENGTH 28  /* base64 of a 20-byte digest: 27 characters and one `=` */

static const char GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";  /* RFC 6455 §1.3 */
static const char BASE64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* base64(SHA-1(key GUID)) into `out` (RFC 6455 §4.2.2 step 5.4), `block_function` taking each 64 bytes. */
static void
accept_with(sha1_block_function block_function, const unsigned char *key, size_t length, char out[ACCEPT_LENGTH])
{
    unsigned char digest[21];
    sha1_of_two(block_function, key, length, (const unsigned char *)GUID, sizeof GUID - 1, digest);
    digest[20] = 0;  /* the last group's missing byte: zero bits under the `=` */
    for (int i = 0, j = 0; i < 21; i += 3, j += 4) {
        uint32_t group = (uint32_t)digest[i] << 16 | (uint32_t)digest[i + 1] << 8 | (uint32_t)digest[i + 2];
        out[j] = BASE64[group >> 18];
        out[j + 1] = BASE64[(group >> 12) & 63];
        out[j + 2] = BASE64[(group >> 6) & 63];
        out[j + 3] = BASE64[group & 63];
    }
    out[ACCEPT_LENGTH - 1] = '=';
}

/* The key's bytes when it is an exact str of ASCII characters, else NULL (no error set). */
static const unsigned char *
ascii_key(PyObject *key, Py_ssize_t *length)
{
    if (!PyUnicode_CheckExact(key) || PyUnicode_READY(key) < 0) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(key)) {
        return NULL;
    }
    *length = PyUnicode_GET_LENGTH(key);
    return PyUnicode_1BYTE_DATA(key);
}

/* -- The backend's 101 ------------------------------------------------------------------------------ */

/* Whether the field name at `s` (`length` bytes of tchar) is `lower` in any case.  For tchar, `| 0x20`
 * turns only A-Z into letters, so it matches exactly the names str.lower() would. */
static int
name_is(const unsigned char *s, Py_ssize_t length, const char *lower)
{
    Py_ssize_t i = 0;
    for (; lower[i] != '\0'; i++) {
        if (i >= length || (s[i] | 0x20) != (unsigned char)lower[i]) {
            return 0;
        }
    }
    return i == length;
}

/* Names the Python path takes out of a 101, changes, or judges against the client's offer. */
static const char *const NOT_PLAIN[] = {
    "keep-alive", "proxy-connection", "te", "proxy-authorization", "transfer-encoding", "content-length",
    "trailer", "set-cookie", "sec-websocket-protocol", "sec-websocket-extensions",
};
#define NOT_PLAIN_COUNT (sizeof NOT_PLAIN / sizeof NOT_PLAIN[0])

static int
is_plain(const unsigned char *s, Py_ssize_t n, const char accept[ACCEPT_LENGTH])
{
    static const char STATUS[] = "HTTP/1.1 101 ";
    const Py_ssize_t status_length = (Py_ssize_t)sizeof STATUS - 1;
    if (n < status_length + 4 || memcmp(s, STATUS, (size_t)status_length) != 0
        || memcmp(s + n - 4, "\r\n\r\n", 4) != 0) {
        return 0;
    }
    Py_ssize_t p = status_length;
    while (p < n && VALUE[s[p]]) {
        p++;
    }
    if (p + 1 >= n || s[p] != '\r' || s[p + 1] != '\n') {
        return 0;
    }
    p += 2;
    int upgrades = 0, connections = 0, accepts = 0;
    for (;;) {
        if (p + 1 < n && s[p] == '\r' && s[p + 1] == '\n') {
            return p + 2 == n && upgrades == 1 && connections == 1 && accepts == 1;
        }
        Py_ssize_t name = p;
        while (p < n && TCHAR[s[p]]) {
            p++;
        }
        Py_ssize_t name_length = p - name;
        /* `: ` and then a value with no whitespace at either end (as rendered again), maybe empty. */
        if (name_length == 0 || p + 1 >= n || s[p] != ':' || s[p + 1] != ' ') {
            return 0;
        }
        p += 2;
        Py_ssize_t value = p;
        while (p < n && VALUE[s[p]]) {
            p++;
        }
        Py_ssize_t value_length = p - value;
        if (p + 1 >= n || s[p] != '\r' || s[p + 1] != '\n') {
            return 0;
        }
        p += 2;
        if (value_length > 0 && (s[value] == ' ' || s[value] == '\t' || s[value + value_length - 1] == ' '
                                 || s[value + value_length - 1] == '\t')) {
            return 0;
        }
        const unsigned char *field = s + name;
        const unsigned char *text = s + value;
        if (name_is(field, name_length, "upgrade")) {
            if (++upgrades > 1 || !name_is(text, value_length, "websocket")) {
                return 0;
            }
        } else if (name_is(field, name_length, "connection")) {
            if (++connections > 1 || value_length != 7
                || (memcmp(text, "Upgrade", 7) != 0 && memcmp(text, "upgrade", 7) != 0)) {
                return 0;
            }
        } else if (name_is(field, name_length, "sec-websocket-accept")) {
            if (++accepts > 1 || value_length != ACCEPT_LENGTH || memcmp(text, accept, ACCEPT_LENGTH) != 0) {
                return 0;
            }
        } else {
            for (size_t i = 0; i < NOT_PLAIN_COUNT; i++) {
                if (name_is(field, name_length, NOT_PLAIN[i])) {
                    return 0;
                }
            }
        }
    }
}

/* -- The upgrade request ---------------------------------------------------------------------------- */

static int
is_ows(unsigned char c)
{
    return c == ' ' || c == '\t';
}

/* Whether the comma-separated list at `s` names `lower` (lower case letters), any element of it with
 * the whitespace around it left out, in any case: Head.has_token's reading of one value. */
static int
lists(const unsigned char *s, Py_ssize_t length, const char *lower)
{
    Py_ssize_t start = 0;
    while (start <= length) {
        Py_ssize_t end = start;
        while (end < length && s[end] != ',') {
            end++;
        }
        Py_ssize_t a = start, b = end;
        while (a < b && is_ows(s[a])) {
            a++;
        }
        while (b > a && is_ows(s[b - 1])) {
            b--;
        }
        if (name_is(s + a, b - a, lower)) {
            return 1;
        }
        start = end + 1;
    }
    return 0;
}

/* RFC 6455 §4.1: 22 base64 characters and `==` (lb.ws.upgrade.is_websocket_key). */
static int
is_key(const unsigned char *s, Py_ssize_t length)
{
    if (length != 24 || s[22] != '=' || s[23] != '=') {
        return 0;
    }
    for (Py_ssize_t i = 0; i < 22; i++) {
        unsigned char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '/')) {
            return 0;
        }
    }
    return 1;
}

/* The names plain_upgrade looks up, interned as lb.http._scan interns the names it reads (so that a
 * lookup finds its key by identity). */
static PyObject *NAME_UPGRADE, *NAME_CONNECTION, *NAME_KEY, *NAME_VERSION, *NAME_LENGTH, *NAME_CODING;

/* The values of `name` in `index` as a list of 1-byte str (borrowed), NULL when there are none; sets
 * *odd when they are not what the parser makes (not a list, not str), or on an error. */
static PyObject *
values_of(PyObject *index, PyObject *name, int *odd)
{
    PyObject *values = PyDict_GetItemWithError(index, name);
    if (values == NULL) {
        *odd |= PyErr_Occurred() != NULL;
        return NULL;
    }
    if (!PyList_CheckExact(values)) {
        *odd = 1;
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(values); i++) {
        PyObject *value = PyList_GET_ITEM(values, i);
        if (!PyUnicode_CheckExact(value) || PyUnicode_READY(value) < 0 || PyUnicode_KIND(value) != PyUnicode_1BYTE_KIND) {
            *odd = 1;
            return NULL;
        }
    }
    return values;
}

/* Whether any of `values` lists `lower` (Head.has_token's reading). */
static int
any_lists(PyObject *values, const char *lower)
{
    for (Py_ssize_t i = 0; values != NULL && i < PyList_GET_SIZE(values); i++) {
        PyObject *value = PyList_GET_ITEM(values, i);
        if (lists(PyUnicode_1BYTE_DATA(value), PyUnicode_GET_LENGTH(value), lower)) {
            return 1;
        }
    }
    return 0;
}

/* The one value of `values` (borrowed), or NULL when there are none or several. */
static PyObject *
only_value(PyObject *values)
{
    return values != NULL && PyList_GET_SIZE(values) == 1 ? PyList_GET_ITEM(values, 0) : NULL;
}

static PyObject *
plain_upgrade(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "plain_upgrade(method: str, version: str, index: dict)");
        return NULL;
    }
    PyObject *method = args[0], *version = args[1], *index = args[2];
    if (!PyUnicode_CheckExact(method) || !PyUnicode_CheckExact(version) || !PyDict_CheckExact(index)
        || PyUnicode_CompareWithASCIIString(method, "GET") != 0
        || PyUnicode_CompareWithASCIIString(version, "HTTP/1.1") != 0) {
        Py_RETURN_FALSE;
    }
    int odd = 0;
    /* A body's framing, even a length of 0: the ordinary path reads it. */
    /* No second lookup once the first has raised (`odd`): it could run a key's __eq__ with the error set. */
    if (values_of(index, NAME_LENGTH, &odd) != NULL || odd || values_of(index, NAME_CODING, &odd) != NULL || odd) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_FALSE;
    }
    /* Each lookup's values are read before the next lookup, which could run a key's __eq__ (none of the
     * parser's keys has one) and so change the dict: nothing borrowed is held across one. */
    int plain = any_lists(values_of(index, NAME_UPGRADE, &odd), "websocket") && !odd
        && any_lists(values_of(index, NAME_CONNECTION, &odd), "upgrade") && !odd;
    PyObject *key = plain ? only_value(values_of(index, NAME_KEY, &odd)) : NULL;
    plain = key != NULL && !odd && is_key(PyUnicode_1BYTE_DATA(key), PyUnicode_GET_LENGTH(key));
    PyObject *version_value = plain ? only_value(values_of(index, NAME_VERSION, &odd)) : NULL;
    plain = version_value != NULL && !odd && PyUnicode_GET_LENGTH(version_value) == 2
        && PyUnicode_1BYTE_DATA(version_value)[0] == '1' && PyUnicode_1BYTE_DATA(version_value)[1] == '3';
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyBool_FromLong(plain);
}

static PyObject *
plain_switch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "plain_switch(raw: bytes, key: str)");
        return NULL;
    }
    Py_ssize_t key_length;
    const unsigned char *key = ascii_key(args[1], &key_length);
    if (!PyBytes_CheckExact(args[0]) || key == NULL) {
        Py_RETURN_FALSE;
    }
    /* The key as switch_fault reads it: SP and HTAB around it left out (the parser's reading has none). */
    while (key_length > 0 && is_ows(key[0])) {
        key++;
        key_length--;
    }
    while (key_length > 0 && is_ows(key[key_length - 1])) {
        key_length--;
    }
    char accept[ACCEPT_LENGTH];
    accept_with(sha1_block_fastest, key, (size_t)key_length, accept);
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    return PyBool_FromLong(is_plain(s, PyBytes_GET_SIZE(args[0]), accept));
}

static PyObject *
accept_by(sha1_block_function block_function, PyObject *key)
{
    Py_ssize_t length;
    const unsigned char *bytes = ascii_key(key, &length);
    if (bytes == NULL) {
        Py_RETURN_NONE;
    }
    char out[ACCEPT_LENGTH];
    accept_with(block_function, bytes, (size_t)length, out);
    return PyUnicode_FromStringAndSize(out, ACCEPT_LENGTH);
}

static PyObject *
accept(PyObject *module, PyObject *key)
{
    (void)module;
    return accept_by(sha1_block_fastest, key);
}

static PyObject *
accept_portable(PyObject *module, PyObject *key)
{
    (void)module;
    return accept_by(sha1_block, key);
}

static PyObject *
sha_extensions(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyBool_FromLong(sha1_block_fastest != sha1_block);
}

static PyMethodDef methods[] = {
    {"plain_upgrade", (PyCFunction)(void (*)(void))plain_upgrade, METH_FASTCALL,
     "plain_upgrade(method, version, index) -> bool: whether a parsed request head is a WebSocket upgrade "
     "that passes every check."},
    {"plain_switch", (PyCFunction)(void (*)(void))plain_switch, METH_FASTCALL,
     "plain_switch(raw, key) -> bool: whether a backend's 101 passes to the client as it came."},
    {"accept", accept, METH_O, "accept(key) -> str | None: the Sec-WebSocket-Accept for an ASCII key."},
    {"accept_portable", accept_portable, METH_O,
     "accept_portable(key) -> str | None: accept's answer by the portable SHA-1, whatever this CPU has."},
    {"sha_extensions", sha_extensions, METH_NOARGS,
     "sha_extensions() -> bool: whether the SHA-1 runs on this CPU's SHA extensions."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "lb.ws._plain", "The WebSocket handshake's two heads as browsers and gateways write them.", -1,
    methods, NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation, as lb.http._scan. */
PyMODINIT_FUNC
PyInit__plain(void)
{
    fill_tables();
    sha1_block_fastest = sha1_block_of_this_cpu();
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&NAME_UPGRADE, "upgrade"},     {&NAME_CONNECTION, "connection"}, {&NAME_KEY, "sec-websocket-key"},
        {&NAME_VERSION, "sec-websocket-version"}, {&NAME_LENGTH, "content-length"},
        {&NAME_CODING, "transfer-encoding"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if ((*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&module_definition);
}
