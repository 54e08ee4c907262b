/* CPU fast paths of the kernels package.
 *
 * Plain C with no torch headers, so that it compiles in about a second on first use
 * (kernels/_native.py) and is called through ctypes, which releases the GIL. Every
 * function works on a half-open range [lo, hi) of its outer loop, split over OpenMP
 * threads. The library links libgomp.so.1 by soname, so inside a torch process it
 * shares torch's own OpenMP runtime: one pool, sized by torch.set_num_threads. (A
 * separate pool would fight torch's workers, which spin for a while after each op.)
 *
 * Values are float32 ("f32") or bfloat16 ("bf16", raw uint16 bits); every sum and
 * every optimizer state is float32.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float load_f32(const float *p) { return *p; }
static inline void store_f32(float *p, float x) { *p = x; }

static inline float load_bf16(const uint16_t *p) {
    uint32_t u = (uint32_t)(*p) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion does. */
static inline void store_bf16(uint16_t *p, float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        *p = (uint16_t)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    *p = (uint16_t)(u >> 16);
}

/* The gathers are bound by DRAM latency, not by arithmetic: each bag reads M random
 * rows. Two things keep enough misses in flight: a software prefetch of the first
 * lines of a row some slots ahead, and a column tile small enough that the inner loop
 * is loads and multiply-adds. The forward prefetches the first 512 bytes of a row (a
 * whole 256-wide bfloat16 row: the hardware prefetcher did not stream the rest on the
 * Intel VM, where 4 lines left the bfloat16 forward at half the speed of 8; a whole
 * float32 row, 16 lines, measured 20% slower than 8), 16 slots ahead for float32 rows
 * and 8 for bfloat16 ones; bag_dw and the optimizers' row updates prefetch 4 lines,
 * PREFETCH_AHEAD slots ahead. Distances and sizes were chosen by measurement against
 * torch's embedding_bag (docs/architecture.md, "Library first, measured"). */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 8
#endif
#define FORWARD_PREFETCH_LINES 8
#define UPDATE_PREFETCH_LINES 4
#define FORWARD_AHEAD_f32 16
#define FORWARD_AHEAD_bf16 8
#define TILE 128

static inline void prefetch_row(const void *row, int lines) {
    const char *c = (const char *)row;
    for (int l = 0; l < lines; ++l) __builtin_prefetch(c + 64 * l, 0, 3);
}

#define DEFINE_BAG_KERNELS(SFX, T)                                                         \
    /* acc[0..width) += wp * v[0..width); inlined with width = TILE it unrolls. */        \
    static inline void axpy_##SFX(float *restrict acc, const T *restrict v, float wp,    \
                                  int64_t width) {                                       \
        for (int64_t d = 0; d < width; ++d) acc[d] += wp * load_##SFX(v + d);            \
    }                                                                                    \
    static inline void bag_tile_##SFX(const T *values, int64_t ld, const int64_t *rows,  \
                                      const float *w, int64_t p0, int64_t p1,            \
                                      int64_t last, int64_t c0, int64_t width,           \
                                      float *restrict acc) {                             \
        for (int64_t d = 0; d < width; ++d) acc[d] = 0.0f;                               \
        for (int64_t p = p0; p < p1; ++p) {                                              \
            if (c0 == 0 && p + FORWARD_AHEAD_##SFX < last)                               \
                prefetch_row(values + rows[p + FORWARD_AHEAD_##SFX] * ld,                \
                             FORWARD_PREFETCH_LINES);                                    \
            const T *v = values + rows[p] * ld + c0;                                     \
            if (width == TILE)                                                           \
                axpy_##SFX(acc, v, w[p], TILE);                                          \
            else                                                                         \
                axpy_##SFX(acc, v, w[p], width);                                         \
        }                                                                                \
    }                                                                                    \
    /* Sixteen partial sums: a single float accumulator would not vectorise.   */      \
    static inline float dot_##SFX(const T *restrict v, const float *restrict g,          \
                                  int64_t dim) {                                         \
        float part[16] = {0};                                                            \
        int64_t d = 0;                                                                   \
        for (; d + 16 <= dim; d += 16)                                                   \
            for (int l = 0; l < 16; ++l) part[l] += load_##SFX(v + d + l) * g[d + l];    \
        float acc = 0.0f;                                                                \
        for (int l = 0; l < 16; ++l) acc += part[l];                                     \
        for (; d < dim; ++d) acc += load_##SFX(v + d) * g[d];                            \
        return acc;                                                                      \
    }                                                                                    \
    /* out[b] = sum_{p in bag b} w[p] * values[rows[p]]                                 \
       values: (R, ld) rows: (P,) w: (P,) offsets: (B+1,) out: (B, dim) */            \
    void bag_forward_##SFX(const T *values, int64_t ld, const int64_t *rows,             \
                           const float *w, const int64_t *offsets, int64_t dim,          \
                           float *out, int64_t lo, int64_t hi) {                         \
        const int64_t last = offsets[hi];                                                \
        _Pragma("omp parallel") {                                                   \
        float acc[TILE];                                                                 \
        _Pragma("omp for schedule(static)")                                       \
        for (int64_t b = lo; b < hi; ++b) {                                              \
            for (int64_t c0 = 0; c0 < dim; c0 += TILE) {                                 \
                const int64_t width = dim - c0 < TILE ? dim - c0 : TILE;                 \
                bag_tile_##SFX(values, ld, rows, w, offsets[b], offsets[b + 1], last,    \
                               c0, width, acc);                                          \
                memcpy(out + b * dim + c0, acc, sizeof(float) * width);                  \
            }                                                                            \
        }                                                                                \
        }                                                                                \
    }                                                                                    \
    /* dw[p] = <values[rows[p]], dy[b]> for every slot p of bag b.                       \
       dy: (B, dim) dw: (P,) */                                                          \
    void bag_dw_##SFX(const T *values, int64_t ld, const int64_t *rows,                  \
                      const int64_t *offsets, const float *dy, int64_t dim, float *dw,   \
                      int64_t lo, int64_t hi) {                                          \
        const int64_t last = offsets[hi];                                                \
        _Pragma("omp parallel for schedule(static)")                                     \
        for (int64_t b = lo; b < hi; ++b) {                                              \
            const float *restrict g = dy + b * dim;                                      \
            for (int64_t p = offsets[b]; p < offsets[b + 1]; ++p) {                      \
                if (p + PREFETCH_AHEAD < last)                                           \
                    prefetch_row(values + rows[p + PREFETCH_AHEAD] * ld,                 \
                                 UPDATE_PREFETCH_LINES);                                     \
                const T *restrict v = values + rows[p] * ld;                             \
                dw[p] = dot_##SFX(v, g, dim);                                            \
            }                                                                            \
        }                                                                                \
    }

DEFINE_BAG_KERNELS(f32, float)
DEFINE_BAG_KERNELS(bf16, uint16_t)

/* Group slots [lo, hi) by block-local row, stably: O(P + R) against O(P log P) for a
 * comparison sort, which dominated a shard's push. Two forms: a counting sort, for
 * blocks of no more rows than slots, and an LSD radix sort over the bits of R for
 * larger blocks, where sweeping R counters costs more than a few passes over the
 * slots (the caller picks, kernels/row_grads.py).
 * rows: (P,) in [0, R)  counts: (R,) zeroed scratch, left zeroed  order: (P,) slot
 * of each sorted position  uniq: (U,) sorted unique rows  seg: (U+1,)  n_uniq: (1,) */
void group_rows(const int64_t *rows, int64_t R, int32_t *counts, int64_t *order,
                int64_t *uniq, int64_t *seg, int64_t *n_uniq, int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) counts[rows[p]]++;
    int64_t U = 0, acc = 0;
    for (int64_t r = 0; r < R; ++r) {
        const int32_t c = counts[r];
        if (c) {
            uniq[U] = r;
            seg[U++] = acc;
            counts[r] = (int32_t)acc; /* from here on: the next free position of row r */
            acc += c;
        }
    }
    seg[U] = acc;
    for (int64_t p = lo; p < hi; ++p) order[counts[rows[p]]++] = p - lo;
    for (int64_t u = 0; u < U; ++u) counts[uniq[u]] = 0;
    *n_uniq = U;
}

#define RADIX_MAX_BITS 11

/* One stable pass of the radix sort: keys and order scattered by the digit at shift. */
static void radix_pass(const uint32_t *keys, const int64_t *order, uint32_t *keys_out,
                       int64_t *order_out, int64_t P, int shift, int width) {
    int64_t next[1 << RADIX_MAX_BITS];
    const uint32_t mask = (1u << width) - 1u;
    const int64_t buckets = (int64_t)1 << width;
    memset(next, 0, sizeof(int64_t) * buckets);
    for (int64_t p = 0; p < P; ++p) next[(keys[p] >> shift) & mask]++;
    int64_t acc = 0;
    for (int64_t b = 0; b < buckets; ++b) {
        const int64_t c = next[b];
        next[b] = acc;
        acc += c;
    }
    for (int64_t p = 0; p < P; ++p) {
        const int64_t q = next[(keys[p] >> shift) & mask]++;
        keys_out[q] = keys[p];
        order_out[q] = order[p];
    }
}

/* group_rows by an LSD radix sort, for R < 2^31: passes of at most RADIX_MAX_BITS bits
 * (their 2^bits counters live in L1) over the bits that R - 1 needs.
 * keys, keys_tmp: (P,) scratch  order_tmp: (P,) scratch; the other arguments as above. */
void group_rows_radix(const int64_t *rows, int64_t R, uint32_t *keys, uint32_t *keys_tmp,
                      int64_t *order, int64_t *order_tmp, int64_t *uniq, int64_t *seg,
                      int64_t *n_uniq, int64_t lo, int64_t hi) {
    const int64_t P = hi - lo;
    int bits = 0;
    while (((int64_t)1 << bits) < R) ++bits;
    const int passes = (bits + RADIX_MAX_BITS - 1) / RADIX_MAX_BITS;
    const int width = passes ? (bits + passes - 1) / passes : 0;
    uint32_t *k = keys, *k_out = keys_tmp;
    int64_t *o = order, *o_out = order_tmp;
    for (int64_t p = 0; p < P; ++p) {
        k[p] = (uint32_t)rows[lo + p];
        o[p] = p;
    }
    for (int pass = 0; pass < passes; ++pass) {
        radix_pass(k, o, k_out, o_out, P, pass * width, width);
        uint32_t *kt = k; k = k_out; k_out = kt;
        int64_t *ot = o; o = o_out; o_out = ot;
    }
    if (o != order) memcpy(order, o, sizeof(int64_t) * P);
    int64_t U = 0;
    for (int64_t p = 0; p < P; ++p)
        if (p == 0 || k[p] != k[p - 1]) {
            uniq[U] = k[p];
            seg[U++] = p;
        }
    seg[U] = P;
    *n_uniq = U;
}

/* The gradient of each unique row of a step, kept in factored form: the slots that
 * feed row u are [seg[u], seg[u+1]) of the slot arrays (sorted by row), and
 * g_u = sum_q slot_w[q] * dy[slot_bag[q]]. The optimizers sum a row's slots into
 * an L1-resident scratch row just before updating it, so the (U, dim) gradient
 * never goes to memory; ``grads`` (dense (U, dim)) is used instead when given. */
typedef struct {
    const float *grads;      /* (U, dim) or NULL */
    const int64_t *seg;      /* (U+1,) */
    const int64_t *slot_bag; /* (P,) */
    const float *slot_w;     /* (P,) */
    const float *dy;         /* (B, dim) */
} RowGrads;

static void sum_slots(const RowGrads *rg, int64_t u, int64_t dim, float *restrict out) {
    for (int64_t d = 0; d < dim; ++d) out[d] = 0.0f;
    for (int64_t q = rg->seg[u]; q < rg->seg[u + 1]; ++q) {
        const float wq = rg->slot_w[q];
        const float *restrict g = rg->dy + rg->slot_bag[q] * dim;
        for (int64_t d = 0; d < dim; ++d) out[d] += wq * g[d];
    }
}

/* Dense row gradients without atomics: one thread owns each unique row. out: (U, dim) */
void row_grads(const RowGrads *rg, int64_t dim, float *out, int64_t lo, int64_t hi) {
#pragma omp parallel for schedule(static)
    for (int64_t u = lo; u < hi; ++u) sum_slots(rg, u, dim, out + u * dim);
}

static inline const float *grad_of(const RowGrads *rg, int64_t u, int64_t dim, float *scratch) {
    if (rg->grads) return rg->grads + u * dim;
    sum_slots(rg, u, dim, scratch);
    return scratch;
}

static inline float *scratch_for(const RowGrads *rg, int64_t dim) {
    return rg->grads ? NULL : malloc(sizeof(float) * dim);
}

/* Prefetch the rows of update u + PREFETCH_AHEAD: the updates are random row
 * read-modify-writes, as latency bound as the gathers. */
static inline void prefetch_update(const void *base, int64_t stride_bytes, const int64_t *rows,
                                   int64_t u, int64_t hi) {
    if (base && u + PREFETCH_AHEAD < hi)
        prefetch_row((const char *)base + rows[u + PREFETCH_AHEAD] * stride_bytes,
                     UPDATE_PREFETCH_LINES);
}

/* Fused sparse optimizer steps over the unique rows of a block.
 * values: (R, ld)  states: (R, dim) or (R,)  rows: (U,) block-local, unique.
 * Each touched row of values and state is read and written once. */
#define DEFINE_OPTIMIZERS(SFX, T)                                                         \
    void sgd_##SFX(T *values, int64_t ld, const int64_t *rows, const RowGrads *rg,       \
                   int64_t dim, float lr, float weight_decay, int64_t lo, int64_t hi) {  \
        _Pragma("omp parallel") {                                                   \
        float *scratch = scratch_for(rg, dim);                                           \
        _Pragma("omp for schedule(static)")                                       \
        for (int64_t u = lo; u < hi; ++u) {                                              \
            prefetch_update(values, ld * (int64_t)sizeof(T), rows, u, hi);               \
            T *restrict v = values + rows[u] * ld;                                       \
            const float *restrict g = grad_of(rg, u, dim, scratch);                      \
            for (int64_t d = 0; d < dim; ++d) {                                          \
                const float x = load_##SFX(v + d);                                       \
                store_##SFX(v + d, x - lr * (g[d] + weight_decay * x));                  \
            }                                                                            \
        }                                                                                \
        free(scratch);                                                                   \
        }                                                                                \
    }                                                                                    \
    void adagrad_##SFX(T *values, int64_t ld, float *sum, const int64_t *rows,           \
                       const RowGrads *rg, int64_t dim, float clr, float eps,            \
                       int64_t lo, int64_t hi) {                                         \
        _Pragma("omp parallel") {                                                   \
        float *scratch = scratch_for(rg, dim);                                           \
        _Pragma("omp for schedule(static)")                                       \
        for (int64_t u = lo; u < hi; ++u) {                                              \
            prefetch_update(values, ld * (int64_t)sizeof(T), rows, u, hi);               \
            prefetch_update(sum, dim * (int64_t)sizeof(float), rows, u, hi);             \
            T *restrict v = values + rows[u] * ld;                                       \
            float *restrict s = sum + rows[u] * dim;                                     \
            const float *restrict g = grad_of(rg, u, dim, scratch);                      \
            for (int64_t d = 0; d < dim; ++d) {                                          \
                const float sd = s[d] + g[d] * g[d];                                     \
                s[d] = sd;                                                               \
                store_##SFX(v + d, load_##SFX(v + d) - clr * g[d] / (sqrtf(sd) + eps));  \
            }                                                                            \
        }                                                                                \
        free(scratch);                                                                   \
        }                                                                                \
    }                                                                                    \
    void rowwise_adagrad_##SFX(T *values, int64_t ld, float *sum, const int64_t *rows,   \
                               const RowGrads *rg, int64_t dim, float lr, float eps,     \
                               int64_t lo, int64_t hi) {                                 \
        _Pragma("omp parallel") {                                                   \
        float *scratch = scratch_for(rg, dim);                                           \
        _Pragma("omp for schedule(static)")                                       \
        for (int64_t u = lo; u < hi; ++u) {                                              \
            prefetch_update(values, ld * (int64_t)sizeof(T), rows, u, hi);               \
            T *restrict v = values + rows[u] * ld;                                       \
            const float *restrict g = grad_of(rg, u, dim, scratch);                      \
            float sq = 0.0f;                                                             \
            for (int64_t d = 0; d < dim; ++d) sq += g[d] * g[d];                         \
            const float s = sum[rows[u]] + sq / (float)dim;                              \
            sum[rows[u]] = s;                                                            \
            const float scale = lr / (sqrtf(s) + eps);                                   \
            for (int64_t d = 0; d < dim; ++d)                                            \
                store_##SFX(v + d, load_##SFX(v + d) - scale * g[d]);                    \
        }                                                                                \
        free(scratch);                                                                   \
        }                                                                                \
    }                                                                                    \
    /* Lazy Adam; omb = 1 - beta, from double; shrink = 1 - lr*wd for AdamW. */        \
    void adam_##SFX(T *values, int64_t ld, float *exp_avg, float *exp_avg_sq,            \
                    const int64_t *rows, const RowGrads *rg, int64_t dim, float beta1,   \
                    float beta2, float omb1, float omb2, float step_size,                \
                    float eps_term, float shrink, int64_t lo, int64_t hi) {              \
        _Pragma("omp parallel") {                                                   \
        float *scratch = scratch_for(rg, dim);                                           \
        const int64_t state_stride = dim * (int64_t)sizeof(float);                       \
        _Pragma("omp for schedule(static)")                                       \
        for (int64_t u = lo; u < hi; ++u) {                                              \
            prefetch_update(values, ld * (int64_t)sizeof(T), rows, u, hi);               \
            prefetch_update(exp_avg, state_stride, rows, u, hi);                         \
            prefetch_update(exp_avg_sq, state_stride, rows, u, hi);                      \
            T *restrict v = values + rows[u] * ld;                                       \
            float *restrict m = exp_avg + rows[u] * dim;                                 \
            float *restrict s = exp_avg_sq + rows[u] * dim;                              \
            const float *restrict g = grad_of(rg, u, dim, scratch);                      \
            for (int64_t d = 0; d < dim; ++d) {                                          \
                const float md = m[d] * beta1 + omb1 * g[d];                             \
                const float sd = s[d] * beta2 + omb2 * g[d] * g[d];                      \
                m[d] = md;                                                               \
                s[d] = sd;                                                               \
                const float x = load_##SFX(v + d) * shrink;                              \
                store_##SFX(v + d, x - step_size * md / (sqrtf(sd) + eps_term));         \
            }                                                                            \
        }                                                                                \
        free(scratch);                                                                   \
        }                                                                                \
    }

DEFINE_OPTIMIZERS(f32, float)
DEFINE_OPTIMIZERS(bf16, uint16_t)

/* ---- product-key top-k selection ------------------------------------------------ */

/* The total order of the spec: higher score first, then the smaller index. */
static inline int better(float s1, int64_t i1, float s2, int64_t i2) {
    return s1 > s2 || (s1 == s2 && i1 < i2);
}


static inline void insert_half(float *val, int32_t *pos, int64_t *len, int64_t kk, float xt,
                               int32_t t) {
    int64_t at = *len < kk ? (*len)++ : kk - 1;
    while (at > 0 && val[at - 1] < xt) {
        val[at] = val[at - 1];
        pos[at] = pos[at - 1];
        --at;
    }
    val[at] = xt;
    pos[at] = t;
}

/* Top-kk of x[0..n) into (val, pos), sorted by the total order. Elements arrive in
 * increasing position, so an element equal to the current worst loses. */
static void top_of_half_scan(const float *x, int64_t n, int64_t kk, float *val, int32_t *pos) {
    int64_t len = 0;
    for (int64_t t = 0; t < n; ++t)
        if (len < kk || x[t] > val[kk - 1]) insert_half(val, pos, &len, kk, x[t], (int32_t)t);
}

#define BLOCK 16

/* Same result as top_of_half_scan, faster for n >= BLOCK·kk. The kk-th largest of
 * the block maxima is a lower bound of the kk-th largest element (kk blocks hold an
 * element at least that large), so one predictable pass keeps only the few elements
 * at or above it, and only those pay for the insertion. bm: scratch of n/BLOCK. */
static void top_of_half(const float *x, int64_t n, int64_t kk, float *val, int32_t *pos,
                        float *bm) {
    const int64_t nb = n / BLOCK;
    if (nb < kk) {
        top_of_half_scan(x, n, kk, val, pos);
        return;
    }
    for (int64_t b = 0; b < nb; ++b) {
        float m = x[b * BLOCK];
        for (int l = 1; l < BLOCK; ++l) m = x[b * BLOCK + l] > m ? x[b * BLOCK + l] : m;
        bm[b] = m;
    }
    int64_t len = 0;
    for (int64_t b = 0; b < nb; ++b)
        if (len < kk || bm[b] > val[kk - 1]) insert_half(val, pos, &len, kk, bm[b], 0);
    const float bound = val[kk - 1];
    len = 0;
    for (int64_t t = 0; t < n; ++t)
        if (x[t] >= bound && (len < kk || x[t] > val[kk - 1]))
            insert_half(val, pos, &len, kk, x[t], (int32_t)t);
}

/* Insert (s, index) into the sorted list (val, idx) of at most k entries. */
static inline void insert_best(float *val, int64_t *idx, int64_t *len, int64_t k, float s,
                               int64_t index) {
    if (*len == k && !better(s, index, val[k - 1], idx[k - 1])) return;
    int64_t at = *len < k ? (*len)++ : k - 1;
    while (at > 0 && better(s, index, val[at - 1], idx[at - 1])) {
        val[at] = val[at - 1];
        idx[at] = idx[at - 1];
        --at;
    }
    val[at] = s;
    idx[at] = index;
}

/* For each (b, h) in [lo, hi) (row t = b*H + h): the exact top-k of s1[i] + s2[j].
 * half scores: element (b, h, part, x) at s + b*sb + h*sh + part*sp + x.
 * out_scores, out_index: (B*H, k).
 * The k best pairs lie among the top-k of each half. Those kk² candidates are
 * scanned with the spec's total order (a rounded sum can tie two pairs whose half
 * scores differ, so no enumeration order can stand in for it); the scan stops early
 * once a sum falls below the current k-th best, as both halves are sorted. */
void pk_topk(const float *s, int64_t H, int64_t sb, int64_t sh, int64_t sp, int64_t n,
             int64_t k, float *out_scores, int64_t *out_index, int64_t lo, int64_t hi) {
    const int64_t kk = k < n ? k : n;
#pragma omp parallel
    {
    float *va = malloc(sizeof(float) * kk * 2);
    float *bm = malloc(sizeof(float) * (n / BLOCK + 1));
    int32_t *pa = malloc(sizeof(int32_t) * kk * 2);
    float *vb = va + kk;
    int32_t *pb = pa + kk;
#pragma omp for schedule(static)
    for (int64_t t = lo; t < hi; ++t) {
        const float *x = s + (t / H) * sb + (t % H) * sh;
        float *val = out_scores + t * k;
        int64_t *idx = out_index + t * k;
        top_of_half(x, n, kk, va, pa, bm);
        top_of_half(x + sp, n, kk, vb, pb, bm);
        int64_t len = 0;
        for (int64_t i = 0; i < kk; ++i) {
            if (len == k && va[i] + vb[0] < val[k - 1]) break;
            for (int64_t j = 0; j < kk; ++j) {
                const float sum = va[i] + vb[j];
                if (len == k && sum < val[k - 1]) break;
                insert_best(val, idx, &len, k, sum, (int64_t)pa[i] * n + pb[j]);
            }
        }
    }
    free(va);
    free(pa);
    free(bm);
    }
}

/* Backward of the selected scores s[t, r] = <q1[t], K1[h, i]> + <q2[t], K2[h, j]>,
 * (i, j) = divmod(index[t, r], n), t = b*H + h. Only the k selected sub-key pairs of a
 * query get a gradient, so this costs O(B·H·k·Dk) where autograd through the dense half
 * scores would cost two (B·H) x Dk x n matmuls. Sub-key gradients collide across
 * tokens: each thread accumulates into its own copy, and the copies are summed.
 * q, dq: (B*H, 2*hd)  keys, dkeys: (H, 2, n, hd)  index: (B*H, k) int64  ds: (B*H, k) */
void pk_scores_backward(const float *q, const float *keys, const int64_t *index,
                        const float *ds, int64_t H, int64_t n, int64_t hd, int64_t k,
                        float *dq, float *dkeys, int64_t lo, int64_t hi) {
    const int64_t nk = H * 2 * n * hd;
    const int threads = omp_get_max_threads();
    float *part = calloc((size_t)threads * (size_t)nk, sizeof(float));
#pragma omp parallel
    {
        float *mine = part + (int64_t)omp_get_thread_num() * nk;
#pragma omp for schedule(static)
        for (int64_t t = lo; t < hi; ++t) {
            const int64_t h = t % H;
            const float *restrict q1 = q + t * 2 * hd;
            const float *restrict q2 = q1 + hd;
            float *restrict dq1 = dq + t * 2 * hd;
            float *restrict dq2 = dq1 + hd;
            for (int64_t d = 0; d < 2 * hd; ++d) dq1[d] = 0.0f;
            for (int64_t r = 0; r < k; ++r) {
                const float g = ds[t * k + r];
                const int64_t i = index[t * k + r] / n, j = index[t * k + r] % n;
                const float *restrict k1 = keys + ((h * 2) * n + i) * hd;
                const float *restrict k2 = keys + ((h * 2 + 1) * n + j) * hd;
                float *restrict d1 = mine + ((h * 2) * n + i) * hd;
                float *restrict d2 = mine + ((h * 2 + 1) * n + j) * hd;
                for (int64_t d = 0; d < hd; ++d) {
                    dq1[d] += g * k1[d];
                    dq2[d] += g * k2[d];
                    d1[d] += g * q1[d];
                    d2[d] += g * q2[d];
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t e = 0; e < nk; ++e) {
            float acc = 0.0f;
            for (int th = 0; th < threads; ++th) acc += part[(int64_t)th * nk + e];
            dkeys[e] = acc;
        }
    }
    free(part);
}
