/* lb.affinity._aead: the affinity token's AES-256-GCM, through the OpenSSL the interpreter has loaded.
 *
 * `AesGcm(key)` holds a 32-byte key; `seal(nonce, aad, *data)` returns `aad`, `nonce`, then the
 * ciphertext of the `data` pieces joined, followed by its 16-byte tag, as cryptography's
 * AESGCM.encrypt returns those two (an affinity token's bytes, its header the aad); and
 * `open(sealed, aad_length)` the data of such bytes, or None where AESGCM.decrypt raises InvalidTag (a
 * tag that does not match, or too few bytes for a nonce and a tag).  Nonces are 12 bytes (the token's).
 * tests/unit/test_aead.py holds both to cryptography's AESGCM, which lb.affinity.codec uses when this
 * module is not built or not loaded.
 *
 * Why C, by hand: each handshake seals one token (a new client) or opens one (a returning client),
 * and cryptography's AESGCM made a cipher context for every call (a new one, a copy of the key's,
 * the IV set, then freed), and passed in and out of Rust through pyo3: some 5,000 instructions a
 * call (`python -m bench.instructions_live --profile`), where the cipher itself is a few hundred.
 * Here each key keeps one context for sealing and one for opening, made once, and a call only sets
 * the nonce: the same EVP calls cryptography makes, on the same library.
 *
 * Which library: the libcrypto Python's own `_hashlib` is linked against (OpenSSL 1.1.1 or 3), found
 * through that module's handle (dlopen of the loaded file, RTLD_NOLOAD), so that building needs no
 * OpenSSL headers and the process holds no second OpenSSL.  The few EVP functions used are declared
 * here as OpenSSL declares them; their ABI has been stable since 1.1.0.  When `_hashlib` is built in, not
 * there, or lacks one of them, importing this module fails with ImportError, and the codec uses
 * cryptography.  The GIL is held throughout: a key's contexts are never used by two threads at once
 * (the admin thread's /lookup opens tokens too), and a call is too short to be worth releasing it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <limits.h>
#include <string.h>

#define KEY_BYTES 32
#define NONCE_BYTES 12
#define TAG_BYTES 16

/* OpenSSL's types, opaque here as they are to its users, and the controls used (include/openssl/evp.h). */
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct engine_st ENGINE;
#define EVP_CTRL_GCM_GET_TAG 0x10
#define EVP_CTRL_GCM_SET_TAG 0x11

typedef int (*init_function)(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, const unsigned char *,
                             const unsigned char *);
typedef int (*update_function)(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
typedef int (*final_function)(EVP_CIPHER_CTX *, unsigned char *, int *);

static EVP_CIPHER_CTX *(*ctx_new)(void);
static void (*ctx_free)(EVP_CIPHER_CTX *);
static int (*ctx_ctrl)(EVP_CIPHER_CTX *, int, int, void *);
static const EVP_CIPHER *(*aes_256_gcm)(void);
static init_function encrypt_init, decrypt_init;
static update_function encrypt_update, decrypt_update;
static final_function encrypt_final, decrypt_final;

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *seal; /* the key set; each call sets its nonce */
    EVP_CIPHER_CTX *open;
} AesGcm;

static PyObject *
openssl_failed(const char *what)
{
    PyErr_Format(PyExc_RuntimeError, "OpenSSL's %s failed", what);
    return NULL;
}

static int
aead_init(AesGcm *self, PyObject *args, PyObject *kwargs)
{
    Py_buffer key;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "AesGcm() takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "y*:AesGcm", &key)) {
        return -1;
    }
    int result = -1;
    if (key.len != KEY_BYTES) {
        PyErr_SetString(PyExc_ValueError, "AesGcm() takes a 32-byte key");
    }
    else if (self->seal != NULL || self->open != NULL) {
        PyErr_SetString(PyExc_TypeError, "AesGcm() is made once");
    }
    else {
        self->seal = ctx_new();
        self->open = ctx_new();
        if (self->seal == NULL || self->open == NULL) {
            PyErr_NoMemory();
        }
        else if (encrypt_init(self->seal, aes_256_gcm(), NULL, key.buf, NULL) != 1
                 || decrypt_init(self->open, aes_256_gcm(), NULL, key.buf, NULL) != 1) {
            openssl_failed("cipher set-up");
        }
        else {
            result = 0;
        }
        if (result < 0) { /* made halfway: no context is kept half keyed (seal and open each ask for theirs) */
            if (self->seal != NULL) {
                ctx_free(self->seal);
                self->seal = NULL;
            }
            if (self->open != NULL) {
                ctx_free(self->open);
                self->open = NULL;
            }
        }
    }
    PyBuffer_Release(&key);
    return result;
}

static void
aead_dealloc(AesGcm *self)
{
    if (self->seal != NULL) {
        ctx_free(self->seal);
    }
    if (self->open != NULL) {
        ctx_free(self->open);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* seal(nonce, aad, *data): a token's bytes, `aad | nonce | ciphertext | tag`, the plaintext being the
 * `data` pieces one after another.  One allocation: the pieces are copied where their ciphertext goes
 * and encrypted in place (EVP_EncryptUpdate allows it), where encrypt(nonce, data, aad) and the
 * codec's `+` made the plaintext, the ciphertext and the token each a bytes of its own (five
 * concatenations and a call: about 1,100 instructions a new client's handshake with the Claim the
 * codec no longer makes, `python -m bench.instructions_live`). */
static PyObject *
aead_seal(AesGcm *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "seal(nonce, aad, *data) takes at least 2 arguments");
        return NULL;
    }
    Py_ssize_t length = 0;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        if (!PyBytes_Check(args[i])) {
            PyErr_SetString(PyExc_TypeError, "seal() takes bytes");
            return NULL;
        }
        if (i >= 2) {
            if (PyBytes_GET_SIZE(args[i]) > INT_MAX - TAG_BYTES - length) {
                PyErr_SetString(PyExc_OverflowError, "seal(): data too long");
                return NULL;
            }
            length += PyBytes_GET_SIZE(args[i]);
        }
    }
    if (PyBytes_GET_SIZE(args[0]) != NONCE_BYTES) {
        PyErr_SetString(PyExc_ValueError, "seal() takes a 12-byte nonce");
        return NULL;
    }
    Py_ssize_t aad_length = PyBytes_GET_SIZE(args[1]);
    if (aad_length > INT_MAX - NONCE_BYTES - TAG_BYTES - length) { /* the whole token's length fits an int */
        PyErr_SetString(PyExc_OverflowError, "seal(): aad too long");
        return NULL;
    }
    if (self->seal == NULL) {
        PyErr_SetString(PyExc_TypeError, "AesGcm() was not given its key");
        return NULL;
    }
    const unsigned char *nonce = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    PyObject *sealed = PyBytes_FromStringAndSize(NULL, aad_length + NONCE_BYTES + length + TAG_BYTES);
    if (sealed == NULL) {
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(sealed);
    memcpy(out, PyBytes_AS_STRING(args[1]), (size_t)aad_length);
    memcpy(out + aad_length, nonce, NONCE_BYTES);
    unsigned char *cipher = out + aad_length + NONCE_BYTES, *at = cipher;
    for (Py_ssize_t i = 2; i < nargs; i++) {
        memcpy(at, PyBytes_AS_STRING(args[i]), (size_t)PyBytes_GET_SIZE(args[i]));
        at += PyBytes_GET_SIZE(args[i]);
    }
    int written = 0, last = 0;
    if (encrypt_init(self->seal, NULL, NULL, NULL, nonce) != 1
        || (aad_length > 0 && encrypt_update(self->seal, NULL, &last, out, (int)aad_length) != 1)
        || (length > 0 && encrypt_update(self->seal, cipher, &written, cipher, (int)length) != 1)
        || encrypt_final(self->seal, cipher + written, &last) != 1 || written + last != length
        || ctx_ctrl(self->seal, EVP_CTRL_GCM_GET_TAG, TAG_BYTES, cipher + length) != 1) {
        Py_DECREF(sealed);
        return openssl_failed("AES-GCM encryption");
    }
    return sealed;
}

/* open(sealed, aad_length): what seal(nonce, aad, *data) sealed, from its bytes: `data` joined, or None where
 * AESGCM.decrypt raises InvalidTag (a tag that does not match, or bytes too short to hold a nonce and a
 * tag after the aad).  The aad, the nonce and the ciphertext are read where they lie, where the codec's
 * slices made a bytes of each. */
static PyObject *
aead_open(AesGcm *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "open(sealed, aad_length) takes 2 arguments");
        return NULL;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "open() takes bytes");
        return NULL;
    }
    Py_ssize_t aad_length = PyLong_AsSsize_t(args[1]);
    if (aad_length == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    if (aad_length < 0 || aad_length > size) {
        PyErr_SetString(PyExc_ValueError, "open(): aad_length outside the sealed bytes");
        return NULL;
    }
    if (size > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "open(): sealed bytes too long");
        return NULL;
    }
    if (self->open == NULL) {
        PyErr_SetString(PyExc_TypeError, "AesGcm() was not given its key");
        return NULL;
    }
    if (size - aad_length < NONCE_BYTES + TAG_BYTES) {
        Py_RETURN_NONE;
    }
    const unsigned char *aad = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    const unsigned char *nonce = aad + aad_length, *data = nonce + NONCE_BYTES;
    int length = (int)(size - aad_length - NONCE_BYTES - TAG_BYTES);
    unsigned char tag[TAG_BYTES]; /* SET_TAG takes a pointer it does not write through, typed writable */
    memcpy(tag, data + length, TAG_BYTES);
    PyObject *plain = PyBytes_FromStringAndSize(NULL, length);
    if (plain == NULL) {
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(plain);
    int written = 0, last = 0;
    if (decrypt_init(self->open, NULL, NULL, NULL, nonce) != 1
        || (aad_length > 0 && decrypt_update(self->open, NULL, &last, aad, (int)aad_length) != 1)
        || (length > 0 && decrypt_update(self->open, out, &written, data, length) != 1) || written != length
        || ctx_ctrl(self->open, EVP_CTRL_GCM_SET_TAG, TAG_BYTES, tag) != 1) {
        Py_DECREF(plain);
        return openssl_failed("AES-GCM decryption");
    }
    if (decrypt_final(self->open, out + written, &last) != 1) { /* the tag does not match */
        Py_DECREF(plain);
        Py_RETURN_NONE;
    }
    return plain;
}

static PyMethodDef aead_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))aead_seal, METH_FASTCALL,
     "seal(nonce, aad, *data) -> bytes: aad, nonce, then cryptography's AESGCM.encrypt(nonce, b''.join(data), aad)."},
    {"open", (PyCFunction)(void (*)(void))aead_open, METH_FASTCALL,
     "open(sealed, aad_length) -> bytes | None: what seal sealed in `sealed` (its aad the first aad_length bytes), "
     "or None where AESGCM.decrypt raises InvalidTag."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AesGcmType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lb.affinity._aead.AesGcm",
    .tp_basicsize = sizeof(AesGcm),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "AesGcm(key): AES-256-GCM with a 32-byte key, its OpenSSL contexts made once.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)aead_init,
    .tp_dealloc = (destructor)aead_dealloc,
    .tp_methods = aead_methods,
};

/* The EVP functions, from the libcrypto `_hashlib` was loaded with: 0, or -1 with ImportError set. */
static int
find_libcrypto(void)
{
    PyObject *hashlib = PyImport_ImportModule("_hashlib");
    if (hashlib == NULL) {
        return -1;
    }
    PyObject *file = PyObject_GetAttrString(hashlib, "__file__");
    Py_DECREF(hashlib);
    const char *path = file == NULL ? NULL : PyUnicode_AsUTF8(file);
    void *handle = path == NULL ? NULL : dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    Py_XDECREF(file);
    if (handle == NULL) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ImportError, "lb.affinity._aead: no loaded _hashlib module to find OpenSSL through");
        return -1;
    }
    struct {
        void **slot;
        const char *name;
    } wanted[] = {
        {(void **)&ctx_new, "EVP_CIPHER_CTX_new"},         {(void **)&ctx_free, "EVP_CIPHER_CTX_free"},
        {(void **)&ctx_ctrl, "EVP_CIPHER_CTX_ctrl"},       {(void **)&aes_256_gcm, "EVP_aes_256_gcm"},
        {(void **)&encrypt_init, "EVP_EncryptInit_ex"},    {(void **)&encrypt_update, "EVP_EncryptUpdate"},
        {(void **)&encrypt_final, "EVP_EncryptFinal_ex"}, {(void **)&decrypt_init, "EVP_DecryptInit_ex"},
        {(void **)&decrypt_update, "EVP_DecryptUpdate"},   {(void **)&decrypt_final, "EVP_DecryptFinal_ex"},
    };
    for (size_t i = 0; i < sizeof wanted / sizeof wanted[0]; i++) {
        if ((*wanted[i].slot = dlsym(handle, wanted[i].name)) == NULL) {
            PyErr_Format(PyExc_ImportError, "lb.affinity._aead: OpenSSL has no %s", wanted[i].name);
            return -1; /* the handle stays open: _hashlib holds the library anyway */
        }
    }
    return 0;
}

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "lb.affinity._aead", "AES-256-GCM with contexts kept per key.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation, as mypyc's modules and lb.http._scan: one interpreter per process. */
PyMODINIT_FUNC
PyInit__aead(void)
{
    if (find_libcrypto() < 0 || PyType_Ready(&AesGcmType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObject(module, "AesGcm", Py_NewRef((PyObject *)&AesGcmType)) < 0) {
        Py_DECREF(&AesGcmType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
