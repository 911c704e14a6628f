/* Kernels of a decoding step (translator/native/kernels.py): attention, linear layers, LayerNorm.
 *
 * Attention of few queries per (sentence, head) over cached keys and values:
 * out = softmax(q k^T * scale, masked) v for q (B, H, T, Dh), k and v (B, H, S, Dh) and a mask
 * broadcast to (B, H, T, S), each given by its element strides (the last stride of q, k and v
 * must be 1); out is written (B, T, H, Dh) contiguous, the layout the output projection reads.
 * Each (sentence, head) pair is one item of an OpenMP loop: its scores, softmax and weighted sum
 * of values stay in registers and L1, and the next pair's keys and values are prefetched while
 * it computes (self-attention caches are position-major, so a pair's keys are S short runs a
 * batch apart, which the hardware prefetcher does not follow). Dh is a multiple of 8, at most 256.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

typedef float v8 __attribute__((vector_size(32)));

/* Row-wise passes (LayerNorm, greedy's argmax) over this many floats or more are split over the
   threads; below, waking a second thread costs more than it saves. */
#define THREADED_FROM (1 << 16)

static inline v8 load8(const float *p) { v8 x; memcpy(&x, p, sizeof x); return x; }
static inline void store8(float *p, v8 x) { memcpy(p, &x, sizeof x); }
static inline float hsum8(v8 x) {
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* exp(x) for x <= 0 (scores less their maximum): 2^n p(r), r = x - n ln2 in [-ln2/2, ln2/2]
   (n = x / ln2 to the nearest integer, by adding and subtracting 1.5 * 2^23: no libm call),
   p the degree-6 Taylor polynomial (relative error below 2e-7); 0 below -87.3. */
static inline float exp_nonpositive(float x) {
    if (x != x) return x;
    if (x < -87.3f) return 0.f;
    float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  /* rounded: + 1.5 * 2^23 - it */
    float r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
    float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 select8(v8i m, v8 a, v8 b) { return (v8)((m & (v8i)a) | (~m & (v8i)b)); }

/* exp_nonpositive of eight x at once. */
static inline v8 exp8_nonpositive(v8 x) {
    const v8 lo = {-87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f};
    const v8i under = x < lo;
    x = select8(under, lo, x);
    v8 n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    v8 r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
    v8 p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    return select8(under, (v8){0}, p * (v8)bits);
}

static void prefetch_pair(const float *k, const float *v, int64_t k_step, int64_t v_step, int64_t S, int64_t Dh) {
    for (int64_t j = 0; j < S; j++)
        for (int64_t c = 0; c < Dh; c += 16) {  /* one 64-byte line per 16 floats */
            __builtin_prefetch(k + j * k_step + c);
            __builtin_prefetch(v + j * v_step + c);
        }
}

/* One query qt (nv * 8 floats) over S keys and values a step apart: o = softmax(q k^T * scale) v
   over the keys mt allows (all when mt is NULL); key j is shift[j * shift_step] rows away (none
   when shift is NULL); p holds S floats of scratch. */
static inline __attribute__((always_inline)) void attend_one(
    const float *qt, const float *kb, int64_t k_step, const float *vb, int64_t v_step, const uint8_t *mt,
    int64_t m_step, const int64_t *shift, int64_t shift_step, int64_t k_row, int64_t v_row,
    float *o, int64_t S, const int64_t nv, float scale, float *p)
{
    v8 qv[32];
    for (int64_t i = 0; i < nv; i++) qv[i] = load8(qt + 8 * i) * scale;
    float top = -INFINITY;
    for (int64_t j = 0; j < S; j++) {
        float s = -INFINITY;
        if (!mt || mt[j * m_step]) {
            const float *kj = kb + j * k_step + (shift ? shift[j * shift_step] * k_row : 0);
            v8 a0 = qv[0] * load8(kj), a1 = {0};
            for (int64_t i = 1; i < nv; i += 2) {
                a1 += qv[i] * load8(kj + 8 * i);
                if (i + 1 < nv) a0 += qv[i + 1] * load8(kj + 8 * i + 8);
            }
            s = hsum8(a0 + a1);
        }
        p[j] = s;
        if (s > top) top = s;
    }
    if (top == -INFINITY) {
        memset(o, 0, sizeof(float) * 8 * nv);
        return;
    }
    v8 sums = {0};
    int64_t j = 0;
    for (; j + 8 <= S; j += 8) {
        v8 e = exp8_nonpositive(load8(p + j) - top);
        store8(p + j, e);
        sums += e;
    }
    float sum = hsum8(sums);
    for (; j < S; j++) {
        p[j] = exp_nonpositive(p[j] - top);
        sum += p[j];
    }
    const float inv = 1.f / sum;
    v8 acc[32];
    for (int64_t i = 0; i < nv; i++) acc[i] = (v8){0};
    for (int64_t j = 0; j < S; j++) {
        if (p[j] == 0.f) continue;
        const float w = p[j] * inv;
        const float *vj = vb + j * v_step + (shift ? shift[j * shift_step] * v_row : 0);
        for (int64_t i = 0; i < nv; i++) acc[i] += w * load8(vj + 8 * i);
    }
    for (int64_t i = 0; i < nv; i++) store8(o + 8 * i, acc[i]);
}

/* Returns 0, or 1 when Dh is not a multiple of 8 up to 256 (nothing written). scratch holds
   threads * 4 * S floats. A query that may attend to nothing gets zeros. rows_at (S, B) row-major,
   or NULL: sentence b's key and value at position j are those of sentence rows_at[j * B + b]
   (beams reordered without moving the cache). */
int few_query_attention(const float *q, const int64_t *qs, const float *k, const int64_t *ks,
                        const float *v, const int64_t *vs, const uint8_t *mask, const int64_t *ms,
                        float *out, int64_t B, int64_t H, int64_t T, int64_t S, int64_t Dh,
                        float scale, float *scratch, int threads, const int64_t *rows_at)
{
    if (Dh % 8 || Dh > 256 || Dh <= 0) return 1;
    const int64_t nv = Dh / 8;
    #pragma omp parallel num_threads(threads) if (B * H * T * S >= 2048)  /* less: not worth waking a thread */
    {
#ifdef _OPENMP
        float *p = scratch + (int64_t)omp_get_thread_num() * 4 * S;
#else
        float *p = scratch;
#endif
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            const float *kb = k + b * ks[0] + h * ks[1];
            const float *vb = v + b * vs[0] + h * vs[1];
            int64_t *shift = NULL;
            if (rows_at) {  /* row offsets of b's keys, position by position, in scratch after p */
                shift = (int64_t *)(p + 2 * S);  /* 8-byte aligned: 4 * S floats a thread */
                for (int64_t j = 0; j < S; j++) shift[j] = rows_at[j * B + b] - b;
            } else if (bh + 1 < B * H) {
                const int64_t b2 = (bh + 1) / H, h2 = (bh + 1) % H;
                prefetch_pair(k + b2 * ks[0] + h2 * ks[1], v + b2 * vs[0] + h2 * vs[1], ks[2], vs[2], S, Dh);
            }
            for (int64_t t = 0; t < T; t++) {
                const float *qt = q + b * qs[0] + h * qs[1] + t * qs[2];
                const uint8_t *mt = mask ? mask + b * ms[0] + h * ms[1] + t * ms[2] : NULL;
                float *o = out + ((b * T + t) * H + h) * Dh;
                if (nv == 8)  /* Dh 64: a constant, so that the query and the sums stay in registers */
                    attend_one(qt, kb, ks[2], vb, vs[2], mt, mask ? ms[3] : 0, shift, 1, ks[0], vs[0], o, S, 8, scale, p);
                else
                    attend_one(qt, kb, ks[2], vb, vs[2], mt, mask ? ms[3] : 0, shift, 1, ks[0], vs[0], o, S, nv, scale, p);
            }
        }
    }
    return 0;
}

/* Linear layers over weights packed once in panels of PANEL output columns: panel p holds
   w[p * PANEL + j, k] at wp[(p * K + k) * PANEL + j] (the last panel zero-padded), so that a
   product reads each weight once, in order, as two 8-float vectors per k, while six rows'
   sums stay in twelve registers. oneDNN's sgemm packs the weight again at every call; called
   the same way (benchmarks/gemm_backends.py), this runs a decoding step's 4 rows against 256 to
   512 columns 1.6x as fast, 16 rows 1.1-1.3x, 64 rows 1.02-1.07x, 1 and 320 rows even. */
#define PANEL 16
#define PANEL_ROWS 6

void pack_panels(const float *w, float *wp, int64_t N, int64_t K)
{
    for (int64_t p = 0; p < (N + PANEL - 1) / PANEL; p++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < PANEL; j++) {
                const int64_t n = p * PANEL + j;
                wp[(p * K + k) * PANEL + j] = n < N ? w[n * K + k] : 0.f;
            }
}

/* out[r, :cols] = x[r] . panel + bias (then ReLU), for `rows` (at most PANEL_ROWS) rows of x
   K floats apart and of out N floats apart; bias: this panel's cols floats, or NULL. */
static inline __attribute__((always_inline)) void panel_rows(
    const float *x, const float *wp, const float *bias, float *out, int64_t K, int64_t N, const int rows,
    int64_t cols, int relu)
{
    v8 acc[PANEL_ROWS][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = (v8){0};
    for (int64_t k = 0; k < K; k++) {
        const v8 w0 = load8(wp + k * PANEL), w1 = load8(wp + k * PANEL + 8);
        for (int r = 0; r < rows; r++) {
            const float xv = x[r * K + k];
            acc[r][0] += xv * w0;
            acc[r][1] += xv * w1;
        }
    }
    float b[PANEL] = {0};
    if (bias) memcpy(b, bias, sizeof(float) * cols);
    const v8 b0 = load8(b), b1 = load8(b + 8), zero = {0};
    for (int r = 0; r < rows; r++) {
        v8 o0 = acc[r][0] + b0, o1 = acc[r][1] + b1;
        if (relu) { o0 = select8(o0 > zero, o0, zero); o1 = select8(o1 > zero, o1, zero); }
        if (cols == PANEL) {
            store8(out + r * N, o0);
            store8(out + r * N + 8, o1);
        } else {
            float o[PANEL];
            store8(o, o0);
            store8(o + 8, o1);
            memcpy(out + r * N, o, sizeof(float) * cols);
        }
    }
}

/* Rows [0, M) of x against one panel w (its bias b, or NULL), into out's cols columns. */
static void panel_block(const float *x, const float *w, const float *b, float *out, int64_t M, int64_t N,
                        int64_t K, int64_t cols, int relu)
{
    int64_t m = 0;
    for (; m + PANEL_ROWS <= M; m += PANEL_ROWS)
        panel_rows(x + m * K, w, b, out + m * N, K, N, PANEL_ROWS, cols, relu);
    const float *xm = x + m * K;
    float *om = out + m * N;
    switch (M - m) {  /* each count its own unrolled copy */
    case 5: panel_rows(xm, w, b, om, K, N, 5, cols, relu); break;
    case 4: panel_rows(xm, w, b, om, K, N, 4, cols, relu); break;
    case 3: panel_rows(xm, w, b, om, K, N, 3, cols, relu); break;
    case 2: panel_rows(xm, w, b, om, K, N, 2, cols, relu); break;
    case 1: panel_rows(xm, w, b, om, K, N, 1, cols, relu); break;
    default: break;
    }
}

/* out (M, N) = x (M, K) @ w (N, K)^T + bias (N) (or none), then max(out, 0) if relu, for w as
   pack_panels left it in wp. The threads take whole panels, block by block of rows: a block's
   rows (256 KB of x) stay in each core's L2 while every panel passes over them (without blocks,
   6,400 x 256 x 256 ran at 53 GFLOP/s against oneDNN's 68). */
void panel_linear(const float *x, const float *wp, const float *bias, float *out, int64_t M, int64_t N,
                  int64_t K, int relu, int threads)
{
    const int64_t panels = (N + PANEL - 1) / PANEL;
    int64_t block = (65536 / (K ? K : 1)) / PANEL_ROWS * PANEL_ROWS;
    if (block < PANEL_ROWS) block = PANEL_ROWS;
    #pragma omp parallel num_threads(threads)
    for (int64_t m0 = 0; m0 < M; m0 += block) {
        const int64_t rows = M - m0 < block ? M - m0 : block;
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
            panel_block(x + m0 * K, wp + p * K * PANEL, bias ? bias + p * PANEL : NULL, out + m0 * N + p * PANEL,
                        rows, N, K, cols, relu);
        }
    }
}

/* out (M, D) = LayerNorm(x (M, D)) * weight + bias, rows normalised by their own mean and
   (biased) variance, as torch's layer_norm, in two passes over each row (mean, then the squared
   deviations), with four sums in flight where D is a multiple of 32. x may be out. */
static float row_sum(const float *r, int64_t D) {
    if (D % 32) {
        float s = 0.f;
        for (int64_t d = 0; d < D; d++) s += r[d];
        return s;
    }
    v8 a = {0}, b = {0}, c = {0}, e = {0};
    for (int64_t d = 0; d < D; d += 32) {
        a += load8(r + d); b += load8(r + d + 8); c += load8(r + d + 16); e += load8(r + d + 24);
    }
    return hsum8((a + b) + (c + e));
}

static float row_squared_deviations(const float *r, float mean, int64_t D) {
    if (D % 32) {
        float s = 0.f;
        for (int64_t d = 0; d < D; d++) s += (r[d] - mean) * (r[d] - mean);
        return s;
    }
    v8 a = {0}, b = {0}, c = {0}, e = {0};
    for (int64_t d = 0; d < D; d += 32) {
        v8 t0 = load8(r + d) - mean, t1 = load8(r + d + 8) - mean;
        v8 t2 = load8(r + d + 16) - mean, t3 = load8(r + d + 24) - mean;
        a += t0 * t0; b += t1 * t1; c += t2 * t2; e += t3 * t3;
    }
    return hsum8((a + b) + (c + e));
}

void layer_norm(const float *x, const float *weight, const float *bias, float *out, int64_t M,
                int64_t D, float eps, int threads)
{
    #pragma omp parallel for num_threads(threads) schedule(static) if (M * D >= THREADED_FROM)
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * D;
        float *o = out + m * D;
        const float mean = row_sum(r, D) / D;
        const float inv = 1.f / sqrtf(row_squared_deviations(r, mean, D) / D + eps);
        for (int64_t d = 0; d < D; d++) o[d] = (r[d] - mean) * inv * weight[d] + bias[d];
    }
}

/* One decoding step of a Transformer decoder layer for one new position per row, as
   translator.model.DecoderLayer.step computes it (pre- or post-norm), with its products through
   panel_linear (the *_w weights as pack_panels left them): self-attention over the row's cached
   positions (the new key and value written into the cache at slot `past` first),
   cross-attention over its source (`group` consecutive rows per source), feed-forward; x (R, D)
   is updated in place. */
/* layer_t and step_t: kernels.h. */

static void add_into(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* One layer's step; scratch as decoder_step's. Returns attention's status. */
static int layer_step(const step_t *st, const layer_t *L, float *x, float *scratch)
{
    const int64_t R = st->R, D = st->D, H = st->H, Dh = D / H, group = R / st->N, slots = st->past + 1;
    float *y = scratch, *q = y + R * D, *kv = q + R * D, *att = kv + 2 * R * D, *o = att + R * D;
    float *h = o + R * D, *tmp = h + R * st->F;
    int status = 0;
    const float *in;

    /* self-attention */
    in = x;
    if (st->norm_first) { layer_norm(x, L->norm_w[0], L->norm_b[0], y, R, D, st->eps, st->threads); in = y; }
    panel_linear(in, L->self_q_w, L->self_q_b, q, R, D, D, 0, st->threads);
    panel_linear(in, L->self_kv_w, L->self_kv_b, kv, R, 2 * D, D, 0, st->threads);
    for (int64_t r = 0; r < R; r++) {
        memcpy(L->self_k + st->past * L->self_slot_stride + r * L->self_row_stride, kv + r * 2 * D, sizeof(float) * D);
        memcpy(L->self_v + st->past * L->self_slot_stride + r * L->self_row_stride, kv + r * 2 * D + D, sizeof(float) * D);
    }
    const int64_t qs[4] = {D, Dh, D, 1};
    const int64_t ks[4] = {L->self_row_stride, Dh, L->self_slot_stride, 1};
    status |= few_query_attention(q, qs, L->self_k, ks, L->self_v, ks, st->self_mask, st->self_mask_strides,
                                  att, R, H, 1, slots, Dh, 1.f / sqrtf((float)Dh), tmp, st->threads, st->self_rows);
    panel_linear(att, L->self_out_w, L->self_out_b, o, R, D, D, 0, st->threads);
    add_into(x, o, R * D);
    if (!st->norm_first) layer_norm(x, L->norm_w[0], L->norm_b[0], x, R, D, st->eps, st->threads);

    /* cross-attention: the group rows of a source are its queries */
    in = x;
    if (st->norm_first) { layer_norm(x, L->norm_w[1], L->norm_b[1], y, R, D, st->eps, st->threads); in = y; }
    panel_linear(in, L->cross_q_w, L->cross_q_b, q, R, D, D, 0, st->threads);
    const int64_t cqs[4] = {group * D, Dh, D, 1};
    status |= few_query_attention(q, cqs, L->cross_k, L->cross_k_strides, L->cross_v, L->cross_v_strides,
                                  st->src_mask, st->src_mask_strides, att, st->N, H, group, st->S, Dh,
                                  1.f / sqrtf((float)Dh), tmp, st->threads, NULL);
    panel_linear(att, L->cross_out_w, L->cross_out_b, o, R, D, D, 0, st->threads);
    add_into(x, o, R * D);
    if (!st->norm_first) layer_norm(x, L->norm_w[1], L->norm_b[1], x, R, D, st->eps, st->threads);

    /* feed-forward */
    in = x;
    if (st->norm_first) { layer_norm(x, L->norm_w[2], L->norm_b[2], y, R, D, st->eps, st->threads); in = y; }
    panel_linear(in, L->ff_in_w, L->ff_in_b, h, R, st->F, D, 1, st->threads);
    panel_linear(h, L->ff_out_w, L->ff_out_b, o, R, D, st->F, 0, st->threads);
    add_into(x, o, R * D);
    if (!st->norm_first) layer_norm(x, L->norm_w[2], L->norm_b[2], x, R, D, st->eps, st->threads);
    return status;
}

/* The n layers' step, in order, in one call: the caller's Python waits for none of them (each call
   from Python releases and takes back its lock, and any thread holding it then delays the step).
   scratch: R * (6 * D + F) + threads * 4 * max(S, past + 1) floats. Returns attention's status. */
int decoder_step(const step_t *st, const layer_t *layers, int64_t n, float *x, float *scratch)
{
    int status = 0;
    for (int64_t i = 0; i < n; i++) status |= layer_step(st, layers + i, x, scratch);
    return status;
}

/* Move rows within tensors in place: in each of the n tensors, row movers[i] is copied onto row
   holes[i] (no row both). A row of tensor t is blocks[t] runs of run[t] floats, block_stride[t]
   floats apart, from base[t] + row * row_stride[t]. */
void move_rows(int64_t n, float *const *base, const int64_t *row_stride, const int64_t *blocks,
               const int64_t *block_stride, const int64_t *run, const int64_t *holes,
               const int64_t *movers, int64_t moves)
{
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < moves; i++) {
            float *dst = base[t] + holes[i] * row_stride[t];
            const float *src = base[t] + movers[i] * row_stride[t];
            for (int64_t b = 0; b < blocks[t]; b++)
                memcpy(dst + b * block_stride[t], src + b * block_stride[t], sizeof(float) * run[t]);
        }
}

/* For each of the n rows of x (n, V), row_stride floats apart: idx, the first index of the row's
   maximum, and lp, the log-probability there, -log(sum_j exp(x_j - max)): greedy search's
   argmax of log_softmax and its gather in two reads of the row, nothing written per element.
   A row holding NaN, or only -inf, gets index 0 and a NaN log-probability, as torch's
   log_softmax and argmax give. */
void argmax_log_prob(const float *x, int64_t n, int64_t V, int64_t row_stride, int64_t *idx, float *lp,
                     int threads)
{
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * V >= THREADED_FROM)
    for (int64_t i = 0; i < n; i++) {
        const float *row = x + i * row_stride;
        const int64_t whole = V / 8 * 8;
        /* per lane: its largest value so far and the first index holding it */
        v8 best = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
        v8i at = {-1, -1, -1, -1, -1, -1, -1, -1}, lane = {0, 1, 2, 3, 4, 5, 6, 7};
        v8i nans = {0};
        for (int64_t j = 0; j < whole; j += 8) {
            v8 v = load8(row + j);
            v8i more = v > best;
            nans |= v != v;
            best = select8(more, v, best);
            at = (more & (lane + (int32_t)j)) | (~more & at);
        }
        float top = -INFINITY;
        int64_t arg = -1;
        int nan = 0;
        for (int l = 0; l < 8; l++) {
            nan |= nans[l] != 0;
            if (at[l] >= 0 && (best[l] > top || (best[l] == top && at[l] < arg))) top = best[l], arg = at[l];
        }
        for (int64_t j = whole; j < V; j++) {
            if (row[j] != row[j]) nan = 1;
            if (row[j] > top) top = row[j], arg = j;
        }
        if (nan || arg < 0) {  /* NaN anywhere, or every value -inf: a row of NaN in log_softmax */
            idx[i] = 0;
            lp[i] = NAN;
            continue;
        }
        v8 acc = {0};
        for (int64_t j = 0; j < whole; j += 8) acc += exp8_nonpositive(load8(row + j) - top);
        float sum = hsum8(acc);
        for (int64_t j = whole; j < V; j++) sum += exp_nonpositive(row[j] - top);
        idx[i] = arg;
        lp[i] = -logf(sum);
    }
}


int64_t nmt_kernels_abi(int64_t *layout, int64_t capacity, int64_t *count)
{
    const int64_t values[] = {
        sizeof(layer_t),
        offsetof(layer_t, norm_w), offsetof(layer_t, norm_b),
        offsetof(layer_t, self_q_w), offsetof(layer_t, self_q_b), offsetof(layer_t, self_kv_w),
        offsetof(layer_t, self_kv_b), offsetof(layer_t, self_out_w), offsetof(layer_t, self_out_b),
        offsetof(layer_t, cross_q_w), offsetof(layer_t, cross_q_b), offsetof(layer_t, cross_out_w),
        offsetof(layer_t, cross_out_b), offsetof(layer_t, ff_in_w), offsetof(layer_t, ff_in_b),
        offsetof(layer_t, ff_out_w), offsetof(layer_t, ff_out_b), offsetof(layer_t, self_k),
        offsetof(layer_t, self_v), offsetof(layer_t, self_slot_stride), offsetof(layer_t, self_row_stride),
        offsetof(layer_t, cross_k), offsetof(layer_t, cross_v), offsetof(layer_t, cross_k_strides),
        offsetof(layer_t, cross_v_strides),
        sizeof(step_t),
        offsetof(step_t, R), offsetof(step_t, D), offsetof(step_t, H), offsetof(step_t, F),
        offsetof(step_t, N), offsetof(step_t, S), offsetof(step_t, past), offsetof(step_t, norm_first),
        offsetof(step_t, threads), offsetof(step_t, eps), offsetof(step_t, self_mask),
        offsetof(step_t, self_mask_strides), offsetof(step_t, src_mask), offsetof(step_t, src_mask_strides),
        offsetof(step_t, self_rows),
    };
    const int64_t n = sizeof values / sizeof values[0];
    for (int64_t i = 0; i < n && i < capacity; i++) layout[i] = values[i];
    *count = n;
    return NMT_KERNELS_ABI_VERSION;
}
