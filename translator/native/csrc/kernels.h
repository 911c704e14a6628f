/* The ABI of the decoding kernels (kernels.c), as translator/native/abi.py mirrors it in ctypes.
 *
 * Python loads the library with ctypes and checks it before any call: nmt_kernels_abi() must
 * return NMT_KERNELS_ABI_VERSION, and the sizes and field offsets it writes must equal those of
 * the ctypes Structures. Change a struct or a signature here and in abi.py together, and bump
 * the version: a library built from other sources is then refused, not misread.
 */
#ifndef NMT_KERNELS_H
#define NMT_KERNELS_H

#include <stdint.h>

#define NMT_KERNELS_ABI_VERSION 2

/* One decoder layer's weights and caches for decoder_step. */
typedef struct {
    const float *norm_w[3], *norm_b[3];
    const float *self_q_w, *self_q_b, *self_kv_w, *self_kv_b, *self_out_w, *self_out_b;
    const float *cross_q_w, *cross_q_b, *cross_out_w, *cross_out_b;
    const float *ff_in_w, *ff_in_b, *ff_out_w, *ff_out_b;  /* *_w: in panels */
    float *self_k, *self_v;            /* (capacity, rows, H, Dh): slot and row strides below */
    int64_t self_slot_stride, self_row_stride;
    const float *cross_k, *cross_v;    /* (N, H, S, Dh) by their strides */
    int64_t cross_k_strides[4], cross_v_strides[4];
} layer_t;

/* The shapes and masks one decoding step shares across layers. */
typedef struct {
    int64_t R, D, H, F, N, S, past;    /* rows, d_model, heads, d_ff, sources, source length, filled slots */
    int norm_first, threads;
    float eps;
    const uint8_t *self_mask;          /* (R, 1, 1, past + 1) broadcast strides, or NULL: every slot */
    int64_t self_mask_strides[4];
    const uint8_t *src_mask;           /* (N, 1, 1, S) broadcast strides */
    int64_t src_mask_strides[4];
    const int64_t *self_rows;          /* (past + 1, R): cache row of each row's slot, or NULL: its own */
} step_t;

/* NMT_KERNELS_ABI_VERSION; writes up to `capacity` values to layout: sizeof(layer_t), the offset
   of each of its fields in order, sizeof(step_t), the offset of each of its fields in order.
   Returns the version; *count gets the number of values the full layout has. */
int64_t nmt_kernels_abi(int64_t *layout, int64_t capacity, int64_t *count);

int few_query_attention(const float *q, const int64_t *qs, const float *k, const int64_t *ks,
                        const float *v, const int64_t *vs, const uint8_t *mask, const int64_t *ms,
                        float *out, int64_t B, int64_t H, int64_t T, int64_t S, int64_t Dh,
                        float scale, float *scratch, int threads, const int64_t *rows_at);
void pack_panels(const float *w, float *wp, int64_t N, int64_t K);
void panel_linear(const float *x, const float *wp, const float *bias, float *out, int64_t M, int64_t N,
                  int64_t K, int relu, int threads);
void layer_norm(const float *x, const float *weight, const float *bias, float *out, int64_t M,
                int64_t D, float eps, int threads);
int decoder_step(const step_t *st, const layer_t *layers, int64_t n, float *x, float *scratch);
void move_rows(int64_t n, float *const *base, const int64_t *row_stride, const int64_t *blocks,
               const int64_t *block_stride, const int64_t *run, const int64_t *holes,
               const int64_t *movers, int64_t moves);
void argmax_log_prob(const float *x, int64_t n, int64_t V, int64_t row_stride, int64_t *idx, float *lp,
                     int threads);

#endif
