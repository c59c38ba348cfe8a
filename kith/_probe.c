/* The compiled probe of kith's lookup arrays (HashArrays in
 * kith/services/lookup_table.py, which describes the layout).
 *
 * find(hashes, table, keys, refs, text, k1, k2, shift) -> dict: the mxid of each of
 * `hashes` that is bound, as HashArrays answers with numpy, but in one pass over the
 * batch instead of some forty array operations of a microsecond or more each.
 * find_json(...) -> (bytes, count): the same answer written as a JSON object straight
 * from the arrays, without a str for each mxid or a dict to hold them (which, at 10M
 * bindings, cost as much again as the probe itself).  The
 * hashes are probed a group at a time, stage by stage (bucket, key and packed word,
 * text), each stage prefetching what the next one reads, so that the cache misses of a
 * group overlap.  Only exact str objects can match (a subclass could run Python code
 * while the dict is filled).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define HASH_LENGTH 43
#define KEY 48
#define BUCKET 8
#define GROUP 32
#define REF_SHIFT 24
#define REF_LENGTH ((1u << 24) - 1)
#define NOT_FOUND (-1)
#define ABSENT (-2)   /* no slot of its bucket matches, and the bucket has room */

/* 1: a character of URL-safe base64; 3: one that can also end a sha256 digest. */
static unsigned char alphabet[256];

static void init_alphabet(void) {
    const char *chars =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const char *last = "AEIMQUYcgkosw048";
    for (const char *c = chars; *c; c++) alphabet[(unsigned char)*c] = 1;
    for (const char *c = last; *c; c++) alphabet[(unsigned char)*c] |= 2;
}

typedef struct {
    PyObject *hash;         /* borrowed from the sequence */
    unsigned char key[KEY];
    uint64_t mixed;
    int64_t row;            /* NOT_FOUND, or ABSENT once its bucket says so */
    int64_t ref;
} probe_t;

/* `hash`'s key, if it can be one: an exact str of 43 ASCII characters.  Whether those
 * are a lookup hash's is asked only of a hash whose key was found (`is_lookup_hash`):
 * most addresses asked are not bound, and the check costs as much as their probe. */
static int key_of(PyObject *hash, unsigned char *key) {
    if (!PyUnicode_CheckExact(hash) || !PyUnicode_IS_COMPACT_ASCII(hash)
            || PyUnicode_GET_LENGTH(hash) != HASH_LENGTH)
        return 0;
    memcpy(key, PyUnicode_DATA(hash), HASH_LENGTH);
    memcpy(key + HASH_LENGTH, "\n    ", KEY - HASH_LENGTH);
    return 1;
}

/* Whether a key's 43 characters are URL-safe base64 that a sha256 digest encodes to
 * (its last character carries 4 bits of the digest and two zero bits). */
static int is_lookup_hash(const unsigned char *key) {
    unsigned char all = 1;
    for (int i = 0; i < HASH_LENGTH - 1; i++) all &= alphabet[key[i]];
    return all && (alphabet[key[HASH_LENGTH - 1]] & 2);
}

/* The row of `p`'s key, or NOT_FOUND: its bucket's slots in order, and the next bucket's
 * while one is full. */
static int64_t locate(const probe_t *p, const uint64_t *slots, uint64_t buckets,
                      unsigned int shift, const unsigned char *key_bytes, uint64_t rows) {
    uint64_t fingerprint = (p->mixed & 0xFFFFFFFFu) | 1;
    uint64_t bucket = p->mixed >> shift;
    for (uint64_t tries = 0; tries < buckets; tries++) {
        const uint64_t *line = slots + bucket * BUCKET;
        for (int s = 0; s < BUCKET; s++) {
            uint64_t slot = line[s];
            if (slot == 0) return NOT_FOUND;
            uint64_t row = slot & 0xFFFFFFFFu;
            if (slot >> 32 == fingerprint && row < rows
                    && memcmp(key_bytes + row * KEY, p->key, KEY) == 0)
                return (int64_t)row;
        }
        bucket = (bucket + 1) & (buckets - 1);
    }
    return NOT_FOUND;
}

/* What a probe hands each bound hash it finds to: the hash asked, its row, and its
 * mxid's UTF-8 bytes.  0 on success, -1 with an exception set. */
typedef int (*emit_t)(void *sink, PyObject *hash, int64_t row, const unsigned char *mxid,
                      uint64_t length);

/* Probe `args` (hashes, table, keys, refs, text, k1, k2, shift), emitting each bound
 * hash found, in the order asked.  0 on success, -1 with an exception set. */
static int probe(PyObject *args, emit_t emit, void *sink) {
    PyObject *hashes, *table_obj, *keys_obj, *refs_obj, *text_obj;
    unsigned long long k1, k2;
    unsigned int shift;
    if (!PyArg_ParseTuple(args, "OOOOOKKI", &hashes, &table_obj, &keys_obj, &refs_obj,
                          &text_obj, &k1, &k2, &shift))
        return -1;
    if (shift < 1 || shift > 63) {
        PyErr_SetString(PyExc_ValueError, "shift out of range");
        return -1;
    }
    /* (a tuple of its own: nothing run meanwhile can change what `items` points at) */
    PyObject *seq = PySequence_Tuple(hashes);
    if (seq == NULL) return -1;
    Py_buffer table = {0}, keys = {0}, refs = {0}, text = {0};
    int status = -1;
    if (PyObject_GetBuffer(table_obj, &table, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(keys_obj, &keys, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(refs_obj, &refs, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(text_obj, &text, PyBUF_C_CONTIGUOUS) < 0) goto done;
    uint64_t buckets = (uint64_t)1 << (64 - shift);
    if ((uint64_t)table.len != buckets * BUCKET * sizeof(uint64_t)) {
        PyErr_SetString(PyExc_ValueError, "table size does not match shift");
        goto done;
    }
    const uint64_t *slots = (const uint64_t *)table.buf;
    const unsigned char *key_bytes = (const unsigned char *)keys.buf;
    const int64_t *ref_words = (const int64_t *)refs.buf;
    const unsigned char *text_bytes = (const unsigned char *)text.buf;
    uint64_t rows = (uint64_t)keys.len / KEY;
    if ((uint64_t)refs.len / sizeof(int64_t) < rows) rows = (uint64_t)refs.len / sizeof(int64_t);

    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    probe_t group[GROUP];
    for (Py_ssize_t first = 0; first < n; first += GROUP) {
        int count = 0;
        /* 1. each hash's key and bucket; the bucket's line fetched */
        for (Py_ssize_t i = first; i < n && i < first + GROUP; i++) {
            probe_t *p = &group[count];
            if (!key_of(items[i], p->key)) continue;
            uint64_t w0, w1;
            memcpy(&w0, p->key, 8);
            memcpy(&w1, p->key + 8, 8);
            p->mixed = ((w0 * k1) ^ w1) * k2;
            p->hash = items[i];
            __builtin_prefetch(slots + (p->mixed >> shift) * BUCKET);
            count++;
        }
        /* 2. each one's candidate row, the first whose fingerprint matches in its
         * bucket; that row's key and packed word fetched */
        for (int j = 0; j < count; j++) {
            probe_t *p = &group[j];
            const uint64_t *line = slots + (p->mixed >> shift) * BUCKET;
            uint64_t fingerprint = (p->mixed & 0xFFFFFFFFu) | 1;
            p->row = NOT_FOUND;
            p->ref = 0;
            for (int s = 0; s < BUCKET; s++) {
                if (line[s] >> 32 == fingerprint) {
                    p->row = (int64_t)(line[s] & 0xFFFFFFFFu);
                    break;
                }
            }
            if (p->row == NOT_FOUND && line[BUCKET - 1] == 0) {
                p->row = ABSENT;
                continue;
            }
            if (p->row >= 0 && (uint64_t)p->row < rows) {
                __builtin_prefetch(key_bytes + p->row * KEY);
                __builtin_prefetch(key_bytes + p->row * KEY + KEY - 1);
                __builtin_prefetch(ref_words + p->row);
            }
        }
        /* 3. the candidate's whole key compared (another key with the same fingerprint,
         * or a full bucket whose hashes overflowed onward: probed slot by slot); each
         * found row's packed word read and the start of its text fetched */
        for (int j = 0; j < count; j++) {
            probe_t *p = &group[j];
            if (p->row == ABSENT) continue;
            if (p->row < 0 || (uint64_t)p->row >= rows
                    || memcmp(key_bytes + p->row * KEY, p->key, KEY) != 0)
                p->row = locate(p, slots, buckets, shift, key_bytes, rows);
            if (p->row < 0 || !is_lookup_hash(p->key)) continue;
            p->ref = ref_words[p->row];
            if (p->ref) __builtin_prefetch(text_bytes + ((uint64_t)p->ref >> REF_SHIFT));
        }
        /* 4. the mxids */
        for (int j = 0; j < count; j++) {
            probe_t *p = &group[j];
            if (!p->ref) continue;
            uint64_t start = (uint64_t)p->ref >> REF_SHIFT;
            uint64_t length = (uint64_t)p->ref & REF_LENGTH;
            if (start + length > (uint64_t)text.len) {
                PyErr_SetString(PyExc_ValueError, "an mxid lies outside the text");
                goto done;
            }
            if (emit(sink, p->hash, p->row, text_bytes + start, length) < 0) goto done;
        }
    }
    status = 0;
done:
    if (table.obj) PyBuffer_Release(&table);
    if (keys.obj) PyBuffer_Release(&keys);
    if (refs.obj) PyBuffer_Release(&refs);
    if (text.obj) PyBuffer_Release(&text);
    Py_DECREF(seq);
    return status;
}

static int emit_to_dict(void *sink, PyObject *hash, int64_t Py_UNUSED(row),
                        const unsigned char *mxid_bytes, uint64_t length) {
    PyObject *mxid = PyUnicode_DecodeUTF8((const char *)mxid_bytes, (Py_ssize_t)length,
                                          "strict");
    if (mxid == NULL) return -1;
    int status = PyDict_SetItem((PyObject *)sink, hash, mxid);
    Py_DECREF(mxid);
    return status;
}

static PyObject *find(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *result = PyDict_New();
    if (result != NULL && probe(args, emit_to_dict, result) < 0) Py_CLEAR(result);
    return result;
}

/* find_json's answer as it is written: a JSON object, and the rows already in it (a
 * hash asked twice is answered once). */
typedef struct {
    char *buf;
    size_t used, size;
    Py_ssize_t count;
    uint64_t *seen;     /* open addressing: row + 1, 0 free */
    uint64_t seen_mask;
} json_t;

static int json_room(json_t *out, size_t more) {
    if (out->used + more <= out->size) return 0;
    size_t size = out->size ? out->size : 4096;
    while (size < out->used + more) size *= 2;
    char *buf = PyMem_Realloc(out->buf, size);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->buf = buf;
    out->size = size;
    return 0;
}

static const char HEX[] = "0123456789abcdef";

/* `"hash":"mxid"`, after a comma unless first; the mxid's bytes as JSON wants them (a
 * quote, a backslash and control characters escaped; UTF-8 as it is). */
static int emit_json(void *sink, PyObject *hash, int64_t row, const unsigned char *mxid,
                     uint64_t length) {
    json_t *out = (json_t *)sink;
    uint64_t slot = ((uint64_t)row * 0x9E3779B97F4A7C15u) >> 32 & out->seen_mask;
    while (out->seen[slot]) {
        if (out->seen[slot] == (uint64_t)row + 1) return 0;
        slot = (slot + 1) & out->seen_mask;
    }
    out->seen[slot] = (uint64_t)row + 1;
    /* the worst case: every byte of the mxid as \u00XX */
    if (json_room(out, HASH_LENGTH + 6 + 6 * length) < 0) return -1;
    char *w = out->buf + out->used;
    if (out->count) *w++ = ',';
    *w++ = '"';
    memcpy(w, PyUnicode_DATA(hash), HASH_LENGTH);
    w += HASH_LENGTH;
    *w++ = '"';
    *w++ = ':';
    *w++ = '"';
    for (uint64_t i = 0; i < length; i++) {
        unsigned char c = mxid[i];
        if (c == '"' || c == '\\') {
            *w++ = '\\';
            *w++ = (char)c;
        } else if (c < 0x20) {
            memcpy(w, "\\u00", 4);
            w[4] = HEX[c >> 4];
            w[5] = HEX[c & 15];
            w += 6;
        } else {
            *w++ = (char)c;
        }
    }
    *w++ = '"';
    out->used = (size_t)(w - out->buf);
    out->count++;
    return 0;
}

static PyObject *find_json(PyObject *Py_UNUSED(module), PyObject *args) {
    json_t out = {0};
    PyObject *hashes = PyTuple_Size(args) > 0 ? PyTuple_GetItem(args, 0) : NULL;
    Py_ssize_t n = hashes == NULL ? -1 : PySequence_Size(hashes);
    if (n < 0) return NULL;
    uint64_t size = 16;
    while (size < (uint64_t)n * 2) size *= 2;
    out.seen = PyMem_Calloc(size, sizeof(uint64_t));
    if (out.seen == NULL) return PyErr_NoMemory();
    out.seen_mask = size - 1;
    PyObject *result = NULL;
    if (json_room(&out, 1) == 0) {
        out.buf[out.used++] = '{';
        if (probe(args, emit_json, &out) == 0 && json_room(&out, 1) == 0) {
            out.buf[out.used++] = '}';
            result = Py_BuildValue("(y#n)", out.buf, (Py_ssize_t)out.used, out.count);
        }
    }
    PyMem_Free(out.seen);
    PyMem_Free(out.buf);
    return result;
}

static PyMethodDef methods[] = {
    {"find", find, METH_VARARGS,
     "find(hashes, table, keys, refs, text, k1, k2, shift) -> dict of the bound hashes"},
    {"find_json", find_json, METH_VARARGS,
     "find_json(hashes, table, keys, refs, text, k1, k2, shift) -> (a JSON object of the "
     "bound hashes, UTF-8, how many)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "kith._probe", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__probe(void) {
    init_alphabet();
    return PyModule_Create(&module);
}
