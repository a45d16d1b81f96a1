/* Compiled inner loops for the row-level hot paths (see kernels.py).
 *
 * Each function does in one pass what numpy does in several: diff's
 * comparison of changed rows (bitwise test, float64 delta, per-row sum of
 * squares, sum and max of |delta|), and the gather of scattered rows from a
 * memory-mapped tensor together with their row digests (rowdigest.py holds
 * the definition). The numpy code in diff.py and rowdigest.py is the
 * reference and the fallback; tests run both and compare them.
 *
 * Plain C with the buffer protocol: no numpy headers, so it builds wherever
 * CPython's headers and a C compiler are. Every loop runs with the GIL
 * released, so diff's comparison passes run on two threads at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* -- digests (formats/FORMAT.md, "Row digests") ------------------------------- */

#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline uint64_t fmix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDULL;
    h ^= h >> 33;
    h *= 0xC4CEB93E53CA34D1ULL;
    h ^= h >> 33;
    return h;
}

static inline uint64_t row_digest(const unsigned char *row, Py_ssize_t row_bytes) {
    /* Four partial sums: the sum is the same mod 2^64 in any order, and the
     * multiplies of neighbouring words then overlap instead of queueing. */
    uint64_t h0 = 0, h1 = 0, h2 = 0, h3 = 0;
    Py_ssize_t full = row_bytes / 8, j = 0;
    for (; j + 4 <= full; j += 4) {
        uint64_t w[4];
        memcpy(w, row + 8 * j, sizeof w); /* little-endian hosts only: checked at import */
        h0 += (w[0] ^ (w[0] >> 32)) * (((uint64_t)(j + 1) * GOLDEN) | 1);
        h1 += (w[1] ^ (w[1] >> 32)) * (((uint64_t)(j + 2) * GOLDEN) | 1);
        h2 += (w[2] ^ (w[2] >> 32)) * (((uint64_t)(j + 3) * GOLDEN) | 1);
        h3 += (w[3] ^ (w[3] >> 32)) * (((uint64_t)(j + 4) * GOLDEN) | 1);
    }
    for (; j < full; j++) {
        uint64_t w;
        memcpy(&w, row + 8 * j, 8);
        h0 += (w ^ (w >> 32)) * (((uint64_t)(j + 1) * GOLDEN) | 1);
    }
    if (row_bytes % 8) { /* the last word, zero-padded */
        uint64_t w = 0;
        memcpy(&w, row + 8 * full, (size_t)(row_bytes % 8));
        h0 += (w ^ (w >> 32)) * (((uint64_t)(full + 1) * GOLDEN) | 1);
    }
    return fmix64((h0 + h1) + (h2 + h3));
}

/* -- argument helpers -------------------------------------------------------- */

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: needs a C-contiguous%s buffer", what, writable ? " writable" : "");
        return -1;
    }
    return 0;
}

/* Several buffers of one call, released together (HOLD returns NULL from the caller on failure). */
#define MAX_BUFFERS 8

typedef struct {
    Py_buffer views[MAX_BUFFERS];
    int held;
} Buffers;

static void release_all(Buffers *held) {
    while (held->held > 0)
        PyBuffer_Release(&held->views[--held->held]);
}

/* The buffer of obj (NULL for None when optional), kept in held for release_all. */
static Py_buffer *hold(Buffers *held, PyObject *obj, int writable, int optional, const char *what) {
    if (obj == Py_None && optional)
        return NULL;
    Py_buffer *view = &held->views[held->held];
    if (get_buffer(obj, view, writable, what) < 0)
        return (Py_buffer *)-1;
    held->held++;
    return view;
}

#define HOLD(var, obj, writable, optional, what)                     \
    Py_buffer *var = hold(&held, obj, writable, optional, what);    \
    if (var == (Py_buffer *)-1) {                                   \
        release_all(&held);                                         \
        return NULL;                                                \
    }

/* -- gather_rows(src, row_bytes, index, out, digests) ------------------------ */

/* Rows far apart in a large map each cost a TLB miss and a cache miss; asking
 * for rows a few iterations ahead keeps several misses in flight at once. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 16
#endif

static const char OUT_OF_RANGE[] = "row index out of range";
#define GATHER_BLOCK_BYTES (32 << 10)

static PyObject *gather_rows(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *src_obj, *index_obj, *out_obj, *digests_obj;
    Py_ssize_t row_bytes;
    if (!PyArg_ParseTuple(args, "OnOOO", &src_obj, &row_bytes, &index_obj, &out_obj, &digests_obj))
        return NULL;
    Py_buffer src, index, out, digests = {0};
    if (get_buffer(src_obj, &src, 0, "src") < 0)
        return NULL;
    if (get_buffer(index_obj, &index, 0, "index") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (get_buffer(out_obj, &out, 1, "out") < 0) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&index);
        return NULL;
    }
    int want_digests = digests_obj != Py_None;
    if (want_digests && get_buffer(digests_obj, &digests, 1, "digests") < 0) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&index);
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_ssize_t n = index.len / 8;
    const char *problem = NULL;
    if (row_bytes < 0 || index.len % 8)
        problem = "index must be int64 and row_bytes >= 0";
    else if (out.len != n * row_bytes)
        problem = "out must hold len(index) rows";
    else if (want_digests && digests.len != n * 8)
        problem = "digests must hold len(index) uint64";
    const int64_t *idx = (const int64_t *)index.buf;
    Py_ssize_t rows_in_src = row_bytes ? src.len / row_bytes : 0;
    if (!problem) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (idx[i] < 0 || idx[i] >= rows_in_src) {
                problem = OUT_OF_RANGE;
                break;
            }
        }
    }
    if (!problem) {
        const unsigned char *base = (const unsigned char *)src.buf;
        unsigned char *dst = (unsigned char *)out.buf;
        uint64_t *dig = want_digests ? (uint64_t *)digests.buf : NULL;
        Py_BEGIN_ALLOW_THREADS
        /* A block of rows is copied, then hashed while the copies are still in
         * cache: copying alone keeps many misses in flight, which hashing each
         * row as it arrives would not. */
        Py_ssize_t block = row_bytes ? GATHER_BLOCK_BYTES / row_bytes : n;
        block = block < 1 ? 1 : block;
        for (Py_ssize_t first = 0; first < n; first += block) {
            Py_ssize_t end = first + block < n ? first + block : n;
            for (Py_ssize_t i = first; i < end; i++) {
                if (i + PREFETCH_AHEAD < n) {
                    const unsigned char *ahead = base + idx[i + PREFETCH_AHEAD] * row_bytes;
                    for (Py_ssize_t o = 0; o < row_bytes; o += 64)
                        __builtin_prefetch(ahead + o, 0, 0);
                }
                memcpy(dst + i * row_bytes, base + idx[i] * row_bytes, (size_t)row_bytes);
            }
            if (dig) {
                for (Py_ssize_t i = first; i < end; i++)
                    dig[i] = row_digest(dst + i * row_bytes, row_bytes);
            }
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&index);
    PyBuffer_Release(&out);
    if (want_digests)
        PyBuffer_Release(&digests);
    if (problem) {
        PyErr_SetString(problem == OUT_OF_RANGE ? PyExc_IndexError : PyExc_ValueError, problem);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* -- row_digests(rows, row_bytes, out) --------------------------------------- */

static PyObject *row_digests(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *rows_obj, *out_obj;
    Py_ssize_t row_bytes;
    if (!PyArg_ParseTuple(args, "OnO", &rows_obj, &row_bytes, &out_obj))
        return NULL;
    Py_buffer rows, out;
    if (get_buffer(rows_obj, &rows, 0, "rows") < 0)
        return NULL;
    if (get_buffer(out_obj, &out, 1, "out") < 0) {
        PyBuffer_Release(&rows);
        return NULL;
    }
    Py_ssize_t n = out.len / 8;
    int ok = row_bytes >= 0 && out.len % 8 == 0 && rows.len == n * row_bytes;
    if (ok) {
        const unsigned char *base = (const unsigned char *)rows.buf;
        uint64_t *dig = (uint64_t *)out.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++)
            dig[i] = row_digest(base + i * row_bytes, row_bytes);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&rows);
    PyBuffer_Release(&out);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "rows must hold len(out) rows of row_bytes bytes");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* -- touch_rows(table, row_bytes, index) --------------------------------------
 *
 * Stores into each row of table named by index the byte it already holds, at
 * its first and its last byte (a row may straddle a page). The pages come out
 * mapped writable and dirty with their contents unchanged: the write faults a
 * row store into a clean page takes (page_mkwrite, ~3 us each) are taken here,
 * on another thread while the log's fsync waits, instead of by the row stores
 * that follow it. The caller must not write these rows meanwhile.
 */

static PyObject *touch_rows(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *table_obj, *index_obj;
    Py_ssize_t row_bytes;
    if (!PyArg_ParseTuple(args, "OnO", &table_obj, &row_bytes, &index_obj))
        return NULL;
    Buffers held = {.held = 0};
    HOLD(table, table_obj, 1, 0, "table");
    HOLD(index, index_obj, 0, 0, "index");
    Py_ssize_t n = index->len / 8, rows = row_bytes > 0 ? table->len / row_bytes : 0;
    const int64_t *idx = (const int64_t *)index->buf;
    int shaped = row_bytes > 0 && index->len % 8 == 0, ok = shaped;
    for (Py_ssize_t i = 0; ok && i < n; i++)
        ok = idx[i] >= 0 && idx[i] < rows;
    if (ok) {
        volatile unsigned char *base = (volatile unsigned char *)table->buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            volatile unsigned char *first = base + idx[i] * row_bytes, *last = first + row_bytes - 1;
            *first = *first;
            *last = *last;
        }
        Py_END_ALLOW_THREADS
    }
    release_all(&held);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, shaped ? OUT_OF_RANGE : "bad row_bytes or index");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* -- shuffle_planes(src, itemsize, out, xor_with) ------------------------------
 *
 * The byte planes of a record's value sections (codec.py): out[j*n + i] =
 * byte j of element i of src, XORed first with the same byte of xor_with when
 * it is given (the undo section). One pass, GIL released, so a record's
 * sections are shuffled on several threads at once; numpy needs a copy per
 * plane, and a whole XORed temporary before that.
 */

#define SHUFFLE_BLOCK 4096

static inline void planes4(const unsigned char *restrict a, Py_ssize_t n, unsigned char *restrict o0,
                           unsigned char *restrict o1, unsigned char *restrict o2, unsigned char *restrict o3) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t w;
        memcpy(&w, a + 4 * i, 4);
        o0[i] = (unsigned char)w;
        o1[i] = (unsigned char)(w >> 8);
        o2[i] = (unsigned char)(w >> 16);
        o3[i] = (unsigned char)(w >> 24);
    }
}

static void shuffle_loop(const unsigned char *restrict a, const unsigned char *restrict b, unsigned char *restrict o,
                         Py_ssize_t n, Py_ssize_t itemsize) {
    if (itemsize == 4) { /* float32, the common case: whole words, four stores */
        unsigned char *restrict o0 = o, *restrict o1 = o + n, *restrict o2 = o + 2 * n, *restrict o3 = o + 3 * n;
        if (b) { /* XOR a block into L1 first: the two simple loops vectorize, the fused one does not */
            uint32_t block[SHUFFLE_BLOCK];
            for (Py_ssize_t start = 0; start < n; start += SHUFFLE_BLOCK) {
                Py_ssize_t m = n - start < SHUFFLE_BLOCK ? n - start : SHUFFLE_BLOCK;
                for (Py_ssize_t i = 0; i < m; i++) {
                    uint32_t w, x;
                    memcpy(&w, a + 4 * (start + i), 4);
                    memcpy(&x, b + 4 * (start + i), 4);
                    block[i] = w ^ x;
                }
                planes4((const unsigned char *)block, m, o0 + start, o1 + start, o2 + start, o3 + start);
            }
        } else {
            planes4(a, n, o0, o1, o2, o3);
        }
        return;
    }
    for (Py_ssize_t j = 0; j < itemsize; j++) {
        unsigned char *plane = o + j * n;
        if (b)
            for (Py_ssize_t i = 0; i < n; i++)
                plane[i] = a[i * itemsize + j] ^ b[i * itemsize + j];
        else
            for (Py_ssize_t i = 0; i < n; i++)
                plane[i] = a[i * itemsize + j];
    }
}

/* The Python side of shuffle_planes and join_planes: (src, itemsize, out, xor_with), the
 * buffers checked to be the same whole number of items, ``loop`` run without the GIL. */
typedef void (*PlanesLoop)(const unsigned char *restrict, const unsigned char *restrict, unsigned char *restrict,
                           Py_ssize_t, Py_ssize_t);

static PyObject *planes_call(PyObject *args, PlanesLoop loop, const char *src_name) {
    PyObject *src_obj, *out_obj, *xor_obj;
    Py_ssize_t itemsize;
    if (!PyArg_ParseTuple(args, "OnOO", &src_obj, &itemsize, &out_obj, &xor_obj))
        return NULL;
    Buffers held = {.held = 0};
    HOLD(src, src_obj, 0, 0, src_name);
    HOLD(out, out_obj, 1, 0, "out");
    HOLD(with, xor_obj, 0, 1, "xor_with");
    int ok = itemsize >= 1 && src->len % itemsize == 0 && out->len == src->len && (!with || with->len == src->len);
    if (ok) {
        const unsigned char *a = (const unsigned char *)src->buf;
        const unsigned char *b = with ? (const unsigned char *)with->buf : NULL;
        unsigned char *o = (unsigned char *)out->buf;
        Py_BEGIN_ALLOW_THREADS
        loop(a, b, o, src->len / itemsize, itemsize);
        Py_END_ALLOW_THREADS
    }
    release_all(&held);
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s, out (and xor_with) must be the same whole number of items", src_name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *shuffle_planes(PyObject *Py_UNUSED(self), PyObject *args) {
    return planes_call(args, shuffle_loop, "src");
}

/* -- join_planes(planes, itemsize, out, xor_with) ------------------------------
 *
 * The inverse of shuffle_planes: out[i*itemsize + j] =
 * planes[j*n + i], XORed with the same byte of xor_with when it is given (an
 * undo section decoded against the new values, a chunk's values against the
 * destination's). Every record read decodes its value sections this way;
 * numpy needs a strided copy per plane (~1.5 GB/s here) and a second pass
 * for the XOR.
 */

static inline void words4(const unsigned char *restrict p0, const unsigned char *restrict p1,
                          const unsigned char *restrict p2, const unsigned char *restrict p3, Py_ssize_t n,
                          const unsigned char *restrict b, unsigned char *restrict o) {
    if (b) {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t w = (uint32_t)p0[i] | (uint32_t)p1[i] << 8 | (uint32_t)p2[i] << 16 | (uint32_t)p3[i] << 24, x;
            memcpy(&x, b + 4 * i, 4);
            w ^= x;
            memcpy(o + 4 * i, &w, 4);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t w = (uint32_t)p0[i] | (uint32_t)p1[i] << 8 | (uint32_t)p2[i] << 16 | (uint32_t)p3[i] << 24;
            memcpy(o + 4 * i, &w, 4);
        }
    }
}

static void join_loop(const unsigned char *restrict p, const unsigned char *restrict b, unsigned char *restrict o,
                      Py_ssize_t n, Py_ssize_t itemsize) {
    if (itemsize == 4) { /* float32, the common case: four loads, one word store */
        words4(p, p + n, p + 2 * n, p + 3 * n, n, b, o);
        return;
    }
    for (Py_ssize_t j = 0; j < itemsize; j++) {
        const unsigned char *plane = p + j * n;
        if (b)
            for (Py_ssize_t i = 0; i < n; i++)
                o[i * itemsize + j] = plane[i] ^ b[i * itemsize + j];
        else
            for (Py_ssize_t i = 0; i < n; i++)
                o[i * itemsize + j] = plane[i];
    }
}

static PyObject *join_planes(PyObject *Py_UNUSED(self), PyObject *args) {
    return planes_call(args, join_loop, "planes");
}

/* -- compare_rows(a, b, row_bytes, kind, index, a_digests, b_digests, status, squares) --
 *
 * Compares rows of A and B in place (a and b may be whole memory-mapped
 * tensors, index the rows to visit) or contiguous copies (index None).
 * For each row: status 0 when a and b hold the same bytes, 1 when they
 * differ and every element's float64 delta b - a is finite with a finite sum
 * of squares, 2 otherwise (NaN or infinity involved, squares past 1e308, or
 * an element type without a loop here, KIND_BITS: diff.py computes those
 * rows' numbers with numpy). For status 1 rows squares gets sum(delta^2),
 * and the returned sum and max of |delta| cover them; status 0 and 2 rows
 * contribute nothing here. Returns (sum_abs, max_abs, bad_a, bad_b): bad_x
 * is the first position whose row does not match its stored digest, or -1.
 *
 * Deltas are exact: the difference of two float32 (or bfloat16) values is
 * exact in float64. Sums are in float64, in lanes of two.
 */

enum { KIND_F32 = 0, KIND_F64 = 1, KIND_BF16 = 2, KIND_BITS = 3 };

/* Vectors of two doubles (SSE2 on x86-64, NEON on arm64) through GCC/Clang
 * vector extensions: plain C loops with several float accumulators are not
 * vectorized without -ffast-math, which would also change the results. */
typedef double v2d __attribute__((vector_size(16)));
typedef long long v2i __attribute__((vector_size(16)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef uint32_t v4u __attribute__((vector_size(16)));

/* Elements j .. j+3 of a row as float64, in two vectors of two. */
static inline void load4(const unsigned char *row, Py_ssize_t j, const int kind, v2d *lo, v2d *hi) {
    if (kind == KIND_F64) {
        memcpy(lo, row + 8 * j, sizeof *lo);
        memcpy(hi, row + 8 * j + 16, sizeof *hi);
        return;
    }
    v4f f;
    if (kind == KIND_F32) {
        memcpy(&f, row + 4 * j, sizeof f);
    } else {
        uint16_t half[4];
        memcpy(half, row + 2 * j, sizeof half);
        v4u bits = {half[0], half[1], half[2], half[3]};
        bits <<= 16; /* bfloat16 is the top half of a float32 */
        memcpy(&f, &bits, sizeof f);
    }
    v4d wide = __builtin_convertvector(f, v4d); /* cvtps2pd on x86-64 */
    memcpy(lo, &wide, sizeof *lo);
    memcpy(hi, (const char *)&wide + sizeof *lo, sizeof *hi);
}

static inline double load1(const unsigned char *row, Py_ssize_t j, const int kind) {
    if (kind == KIND_F64) {
        double x;
        memcpy(&x, row + 8 * j, sizeof x);
        return x;
    }
    float f;
    if (kind == KIND_F32) {
        memcpy(&f, row + 4 * j, sizeof f);
    } else {
        uint16_t half;
        memcpy(&half, row + 2 * j, sizeof half);
        uint32_t bits = (uint32_t)half << 16;
        memcpy(&f, &bits, sizeof f);
    }
    return (double)f;
}

static inline v2d vabs(v2d x) {
    return (v2d)((v2i)x & (v2i){INT64_MAX, INT64_MAX});
}

static inline v2d vmax(v2d x, v2d y) {
    v2i greater = x > y; /* lane-wise: all ones where x > y */
    return (v2d)(((v2i)x & greater) | ((v2i)y & ~greater));
}

/* Four independent chains of two lanes: eight elements per step, and the
 * latency of each floating-point add is hidden behind the others. */
static inline void compare_row(const unsigned char *ra, const unsigned char *rb, Py_ssize_t row_elems, const int kind,
                               double *row_sq, double *row_abs, double *row_max) {
    v2d q0 = {0, 0}, q1 = q0, q2 = q0, q3 = q0, s0 = q0, s1 = q0, s2 = q0, s3 = q0, m0 = q0, m1 = q0;
    Py_ssize_t j = 0;
    for (; j + 8 <= row_elems; j += 8) {
        v2d a0, a1, a2, a3, b0, b1, b2, b3;
        load4(ra, j, kind, &a0, &a1);
        load4(ra, j + 4, kind, &a2, &a3);
        load4(rb, j, kind, &b0, &b1);
        load4(rb, j + 4, kind, &b2, &b3);
        v2d d0 = b0 - a0, d1 = b1 - a1, d2 = b2 - a2, d3 = b3 - a3;
        q0 += d0 * d0;
        q1 += d1 * d1;
        q2 += d2 * d2;
        q3 += d3 * d3;
        d0 = vabs(d0);
        d1 = vabs(d1);
        d2 = vabs(d2);
        d3 = vabs(d3);
        s0 += d0;
        s1 += d1;
        s2 += d2;
        s3 += d3;
        m0 = vmax(m0, vmax(d0, d1));
        m1 = vmax(m1, vmax(d2, d3));
    }
    q0 = (q0 + q1) + (q2 + q3);
    s0 = (s0 + s1) + (s2 + s3);
    m0 = vmax(m0, m1);
    double sq = q0[0] + q0[1], sa = s0[0] + s0[1], mx = m0[0] > m0[1] ? m0[0] : m0[1];
    for (; j < row_elems; j++) {
        double d = load1(rb, j, kind) - load1(ra, j, kind), ad = fabs(d);
        sq += d * d;
        sa += ad;
        mx = ad > mx ? ad : mx;
    }
    *row_sq = sq;
    *row_abs = sa;
    *row_max = mx;
}

/* Rows to compare: row r of each side starts at a + r * row_bytes (b alike);
 * the rows visited are index[0..n) (ascending), or 0..n-1 when index is NULL.
 * Stored digests, when given, are checked for every row visited. */
typedef struct {
    const unsigned char *a, *b;
    const int64_t *index;
    const uint64_t *a_digests, *b_digests;
    Py_ssize_t n, row_elems, row_bytes;
    uint8_t *status;
    double *squares;
    /* results */
    double sum_abs, max_abs;
    Py_ssize_t bad_a, bad_b; /* first position whose row does not match its digest, or -1 */
} Comparison;

/* Scattered rows are compared a block at a time: the block's rows of both
 * sides are first copied into a small scratch area (independent loads, so
 * many cache and TLB misses are in flight at once; each row is hashed for
 * its digest while it is in L1), then compared there. Comparing in place
 * instead measured 2-4x slower: the arithmetic between two rows' loads
 * leaves too few misses in flight. */
#define BLOCK_ROWS 512 /* at most, whatever the row size */
#ifndef SCRATCH_BYTES
#define SCRATCH_BYTES (32 << 10) /* per side: both sides' blocks stay in L1/L2 */
#endif

static inline void prefetch_row(const Comparison *c, Py_ssize_t i) {
    Py_ssize_t r = (Py_ssize_t)c->index[i];
    for (Py_ssize_t o = 0; o < c->row_bytes; o += 64) {
        __builtin_prefetch(c->a + r * c->row_bytes + o, 0, 2);
        __builtin_prefetch(c->b + r * c->row_bytes + o, 0, 2);
    }
    if (c->a_digests)
        __builtin_prefetch(c->a_digests + r, 0, 2);
    if (c->b_digests)
        __builtin_prefetch(c->b_digests + r, 0, 2);
}

/* Compares rows first .. first+m (held at xa, xb). While it computes, the
 * rows of the next block (from position ahead on, when ahead >= 0) are
 * fetched into L2, one per row compared: the misses overlap the arithmetic. */
static inline void compare_block(Comparison *c, Py_ssize_t first, Py_ssize_t m, const unsigned char *xa,
                                 const unsigned char *xb, const int kind, double *total, double *top,
                                 Py_ssize_t ahead) {
    const Py_ssize_t row_bytes = c->row_bytes;
    for (Py_ssize_t k = 0; k < m; k++) {
        Py_ssize_t i = first + k;
        if (ahead >= 0 && ahead + k < c->n)
            prefetch_row(c, ahead + k);
        const unsigned char *ra = xa + k * row_bytes, *rb = xb + k * row_bytes;
        c->squares[i] = 0.0;
        if (memcmp(ra, rb, (size_t)row_bytes) == 0) {
            c->status[i] = 0;
            continue;
        }
        if (kind == KIND_BITS) { /* a dtype without a loop here: the caller computes its numbers */
            c->status[i] = 2;
            continue;
        }
        double row_sq, row_abs, row_max;
        compare_row(ra, rb, c->row_elems, kind, &row_sq, &row_abs, &row_max);
        if (!isfinite(row_sq)) { /* NaN or inf in a delta, or squares past 1e308, all show here */
            c->status[i] = 2;
            continue;
        }
        c->status[i] = 1;
        c->squares[i] = row_sq;
        *total += row_abs;
        *top = row_max > *top ? row_max : *top;
    }
}

/* Copies rows index[first .. first+m) of src into scratch; the first whose
 * digest mismatches goes to *bad. The copies and the stored digests are
 * fetched first, in a loop of independent loads (many misses in flight);
 * the rows are hashed after, from L1. */
static inline void gather_block(const unsigned char *src, const int64_t *index, const uint64_t *digests,
                                Py_ssize_t first, Py_ssize_t m, Py_ssize_t row_bytes, unsigned char *scratch,
                                uint64_t *stored, Py_ssize_t *bad) {
    for (Py_ssize_t k = 0; k < m; k++) {
        Py_ssize_t r = (Py_ssize_t)index[first + k];
        memcpy(scratch + k * row_bytes, src + r * row_bytes, (size_t)row_bytes);
        if (digests)
            stored[k] = digests[r];
    }
    if (digests && *bad < 0) {
        for (Py_ssize_t k = 0; k < m; k++) {
            if (row_digest(scratch + k * row_bytes, row_bytes) != stored[k]) {
                *bad = first + k;
                break;
            }
        }
    }
}

/* Returns -1 when the scratch area cannot be allocated. */
static inline int compare_loop(Comparison *c, const int kind) {
    double total = 0.0, top = 0.0;
    if (!c->index) { /* contiguous rows: compared where they are */
        compare_block(c, 0, c->n, c->a, c->b, kind, &total, &top, -1);
    } else {
        Py_ssize_t block = SCRATCH_BYTES / c->row_bytes;
        block = block < 1 ? 1 : block > BLOCK_ROWS ? BLOCK_ROWS : block;
        unsigned char *scratch = PyMem_RawMalloc((size_t)(2 * block * c->row_bytes));
        if (!scratch)
            return -1;
        unsigned char *xa = scratch, *xb = scratch + block * c->row_bytes;
        uint64_t stored[BLOCK_ROWS];
        for (Py_ssize_t first = 0; first < c->n; first += block) {
            Py_ssize_t m = c->n - first < block ? c->n - first : block;
            gather_block(c->a, c->index, c->a_digests, first, m, c->row_bytes, xa, stored, &c->bad_a);
            gather_block(c->b, c->index, c->b_digests, first, m, c->row_bytes, xb, stored, &c->bad_b);
            compare_block(c, first, m, xa, xb, kind, &total, &top, first + m);
        }
        PyMem_RawFree(scratch);
    }
    c->sum_abs = total;
    c->max_abs = top;
    return 0;
}

static Py_ssize_t kind_itemsize(int kind) {
    switch (kind) {
    case KIND_F32:
        return 4;
    case KIND_F64:
        return 8;
    case KIND_BF16:
        return 2;
    case KIND_BITS:
        return 1;
    default:
        return 0;
    }
}

/* compare_rows(a, b, row_bytes, kind, index, a_digests, b_digests, status, squares)
 *   -> (sum_abs, max_abs, bad_a, bad_b) */
static PyObject *compare_rows(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *a_obj, *b_obj, *index_obj, *a_dig_obj, *b_dig_obj, *status_obj, *squares_obj;
    Py_ssize_t row_bytes;
    int kind;
    if (!PyArg_ParseTuple(args, "OOniOOOOO", &a_obj, &b_obj, &row_bytes, &kind, &index_obj, &a_dig_obj, &b_dig_obj,
                          &status_obj, &squares_obj))
        return NULL;
    Py_ssize_t itemsize = kind_itemsize(kind);
    if (!itemsize || row_bytes <= 0 || row_bytes % itemsize) {
        PyErr_SetString(PyExc_ValueError, "unknown element kind, or row_bytes not a positive multiple of its size");
        return NULL;
    }
    Buffers held = {.held = 0};
    HOLD(a, a_obj, 0, 0, "a")
    HOLD(b, b_obj, 0, 0, "b")
    HOLD(index, index_obj, 0, 1, "index")
    HOLD(a_dig, a_dig_obj, 0, 1, "a_digests")
    HOLD(b_dig, b_dig_obj, 0, 1, "b_digests")
    HOLD(status, status_obj, 1, 0, "status")
    HOLD(squares, squares_obj, 1, 0, "squares")
    Comparison c = {
        .a = a->buf, .b = b->buf, .index = index ? index->buf : NULL,
        .a_digests = a_dig ? a_dig->buf : NULL, .b_digests = b_dig ? b_dig->buf : NULL,
        .n = status->len, .row_elems = row_bytes / itemsize, .row_bytes = row_bytes,
        .status = status->buf, .squares = squares->buf, .bad_a = -1, .bad_b = -1,
    };
    Py_ssize_t rows_a = a->len / row_bytes, rows_b = b->len / row_bytes;
    const char *problem = NULL;
    if (a->len % row_bytes || b->len % row_bytes)
        problem = "a and b must hold whole rows";
    else if (squares->len != c.n * 8)
        problem = "status and squares must have one entry per row";
    else if (index && index->len != c.n * 8)
        problem = "index must be int64, one per row";
    else if (!index && (rows_a != c.n || rows_b != c.n))
        problem = "without an index, a and b must hold len(status) rows";
    else if (!index && (a_dig || b_dig))
        problem = "digests are checked only with an index (rows read in place)";
    else if ((a_dig && a_dig->len != rows_a * 8) || (b_dig && b_dig->len != rows_b * 8))
        problem = "digests must be uint64, one per row of their side";
    if (!problem && index) {
        for (Py_ssize_t i = 0; i < c.n; i++) {
            if (c.index[i] < 0 || c.index[i] >= rows_a || c.index[i] >= rows_b) {
                problem = OUT_OF_RANGE;
                break;
            }
        }
    }
    if (!problem) {
        int failed;
        Py_BEGIN_ALLOW_THREADS
        switch (kind) { /* a constant kind per call: each loop is compiled for its own element type */
        case KIND_F32:
            failed = compare_loop(&c, KIND_F32);
            break;
        case KIND_F64:
            failed = compare_loop(&c, KIND_F64);
            break;
        case KIND_BF16:
            failed = compare_loop(&c, KIND_BF16);
            break;
        default:
            failed = compare_loop(&c, KIND_BITS);
        }
        Py_END_ALLOW_THREADS
        if (failed) {
            release_all(&held);
            return PyErr_NoMemory();
        }
    }
    release_all(&held);
    if (problem) {
        PyErr_SetString(problem == OUT_OF_RANGE ? PyExc_IndexError : PyExc_ValueError, problem);
        return NULL;
    }
    return Py_BuildValue("ddnn", c.sum_abs, c.max_abs, c.bad_a, c.bad_b);
}

/* -- row_abs_sums(old, new, kind, row_elems, out) ------------------------------
 *
 * Per row, sum |new - old| in float64 (a record's significance,
 * dtypes.row_significance): float32 rows subtract in float32, float64 rows
 * in float64, as the numpy reference does; a NaN counts 0 and an infinity
 * the type's cap. The sums may differ from numpy's (which sums pairwise) in
 * their last bits, which no contract depends on: the significance only
 * ranks buckets. Four partial sums per row (they overlap instead of
 * queueing); only a row whose sum is not finite (a NaN or an infinity in it:
 * rare) is summed again with the caps. */
#define ABS_SUMS(name, T, ABS, CAP)                                                              \
    static void name(const T *a, const T *b, Py_ssize_t n, Py_ssize_t m, double *out) {          \
        for (Py_ssize_t i = 0; i < n; i++, a += m, b += m) {                                      \
            double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;                                        \
            Py_ssize_t j = 0;                                                                     \
            for (; j + 4 <= m; j += 4) {                                                          \
                s0 += (double)ABS(b[j] - a[j]);                                                   \
                s1 += (double)ABS(b[j + 1] - a[j + 1]);                                           \
                s2 += (double)ABS(b[j + 2] - a[j + 2]);                                           \
                s3 += (double)ABS(b[j + 3] - a[j + 3]);                                           \
            }                                                                                     \
            for (; j < m; j++)                                                                    \
                s0 += (double)ABS(b[j] - a[j]);                                                   \
            double sum = (s0 + s1) + (s2 + s3);                                                   \
            if (!isfinite(sum)) {                                                                 \
                sum = 0.0;                                                                        \
                for (j = 0; j < m; j++) {                                                         \
                    T d = ABS(b[j] - a[j]);                                                       \
                    sum += isnan(d) ? 0.0 : isinf(d) ? (double)(CAP) : (double)d;                 \
                }                                                                                 \
            }                                                                                     \
            out[i] = sum;                                                                         \
        }                                                                                         \
    }

ABS_SUMS(abs_sums_f32, float, fabsf, 3.4028234663852886e38f)
ABS_SUMS(abs_sums_f64, double, fabs, 1e300)

static PyObject *row_abs_sums(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *old_obj, *new_obj, *out_obj;
    int kind;
    Py_ssize_t row_elems;
    if (!PyArg_ParseTuple(args, "OOinO", &old_obj, &new_obj, &kind, &row_elems, &out_obj))
        return NULL;
    Py_ssize_t itemsize = kind == KIND_F32 || kind == KIND_F64 ? kind_itemsize(kind) : 0;  /* floats only */
    if (!itemsize || row_elems <= 0) {
        PyErr_SetString(PyExc_ValueError, "row_abs_sums: float32 or float64 rows of at least one element");
        return NULL;
    }
    Buffers held = {.held = 0};
    HOLD(old, old_obj, 0, 0, "old")
    HOLD(new, new_obj, 0, 0, "new")
    HOLD(out, out_obj, 1, 0, "out")
    Py_ssize_t n = out->len / 8;
    if (out->len % 8 || old->len != n * row_elems * itemsize || new->len != old->len) {
        release_all(&held);
        PyErr_SetString(PyExc_ValueError, "row_abs_sums: old and new must hold len(out) rows");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (kind == KIND_F32)
        abs_sums_f32(old->buf, new->buf, n, row_elems, out->buf);
    else
        abs_sums_f64(old->buf, new->buf, n, row_elems, out->buf);
    Py_END_ALLOW_THREADS
    release_all(&held);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"row_abs_sums", row_abs_sums, METH_VARARGS,
     "row_abs_sums(old, new, kind, row_elems, out): out[i] = sum |new - old| of row i, in float64."},
    {"gather_rows", gather_rows, METH_VARARGS,
     "gather_rows(src, row_bytes, index, out, digests): copy rows index[i] of src into out; digests[i] "
     "gets each row's digest (digests may be None)."},
    {"row_digests", row_digests, METH_VARARGS, "row_digests(rows, row_bytes, out): the digest of each row."},
    {"touch_rows", touch_rows, METH_VARARGS,
     "touch_rows(table, row_bytes, index): store into rows index[i] of table the bytes they hold (pages "
     "come out writable and dirty, contents unchanged)."},
    {"shuffle_planes", shuffle_planes, METH_VARARGS,
     "shuffle_planes(src, itemsize, out, xor_with): out gets the byte planes of src (XORed with xor_with "
     "unless None)."},
    {"join_planes", join_planes, METH_VARARGS,
     "join_planes(planes, itemsize, out, xor_with): the elements of byte planes (shuffle_planes' inverse)."},
    {"compare_rows", compare_rows, METH_VARARGS,
     "compare_rows(a, b, row_bytes, kind, index, a_digests, b_digests, status, squares) -> "
     "(sum_abs, max_abs, bad_a, bad_b): see _kernels.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "deltalog's compiled inner loops.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    const uint16_t probe = 1;
    if (*(const unsigned char *)&probe != 1) { /* the formats are little-endian; so is every loop here */
        PyErr_SetString(PyExc_ImportError, "deltalog._kernels needs a little-endian host");
        return NULL;
    }
    return PyModule_Create(&module);
}
