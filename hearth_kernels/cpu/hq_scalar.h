/* The portable path: plain C, any CPU (ARM included), the same arithmetic as the AVX2
 * path (int8 activations, exact integer block dots, one fp32 scale per block). */
#ifndef HQ_SCALAR_H
#define HQ_SCALAR_H

#include <math.h>

#include "hq_common.h"

/* Quantize one activation row x [k] into codes [kp] (zero beyond k), block scales d
 * [kp/32] and integer block sums isum [kp/32]. */
static void hq_quantize_row_scalar(const float *x, int k, int kp, int8_t *q, float *d, int32_t *isum) {
    for (int b = 0; b < kp / HQ_BLOCK; b++) {
        const int lo = b * HQ_BLOCK;
        float amax = 0.0f;
        for (int i = lo; i < lo + HQ_BLOCK && i < k; i++) {
            float a = fabsf(x[i]);
            amax = a > amax ? a : amax;
        }
        const float db = amax / 127.0f;
        const float id = db != 0.0f ? 1.0f / db : 0.0f;
        int32_t s = 0;
        for (int i = lo; i < lo + HQ_BLOCK; i++) {
            int c = i < k ? (int)rintf(x[i] * id) : 0;
            q[i] = (int8_t)c;
            s += c;
        }
        d[b] = db;
        isum[b] = s;
    }
}

/* Two plain 16-wide loops (not one mixed loop) so compilers auto-vectorise them. */
static inline int32_t hq_block_dot_q4_scalar(const uint8_t *w, const int8_t *y) {
    int32_t lo = 0, hi = 0;
    for (int j = 0; j < HQ_BLOCK / 2; j++) lo += (int32_t)(w[j] & 0x0F) * y[j];
    for (int j = 0; j < HQ_BLOCK / 2; j++) hi += (int32_t)(w[j] >> 4) * y[j + HQ_BLOCK / 2];
    return lo + hi;
}

static inline int32_t hq_block_dot_q8_scalar(const int8_t *w, const int8_t *y) {
    int32_t s = 0;
    for (int j = 0; j < HQ_BLOCK; j++) s += w[j] * y[j];
    return s;
}

/* out[r] = W[row r] . x_hat for rows [r0, r1) of activation row `mi`. */
static void hq_rows_scalar(const hq_weight *w, const hq_acts *a, int mi, int r0, int r1, float *out) {
    const int ng = w->kp / w->group, bpg = w->group / HQ_BLOCK;
    const int8_t *xq = a->q + (size_t)mi * a->kp;
    const float *xd = a->d + (size_t)mi * (a->kp / HQ_BLOCK);
    const float *gs = a->gs + (size_t)mi * a->ngroups;
    const size_t row_bytes = w->bits == 4 ? (size_t)w->kp / 2 : (size_t)w->kp;
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = w->q + (size_t)r * row_bytes;
        const uint16_t *sr = w->scales + (size_t)r * ng;
        float acc = 0.0f;
        if (HQ_G16(w)) { /* two halves of each block, each with its scale */
            for (int b = 0; b < w->kp / HQ_BLOCK; b++) {
                const int8_t *wq = (const int8_t *)qr + (size_t)b * HQ_BLOCK, *y = xq + (size_t)b * HQ_BLOCK;
                int32_t lo = 0, hi = 0;
                for (int j = 0; j < 16; j++) lo += wq[j] * y[j];
                for (int j = 16; j < 32; j++) hi += wq[j] * y[j];
                acc += xd[b] * (hq_half_to_float(sr[2 * b]) * (float)lo + hq_half_to_float(sr[2 * b + 1]) * (float)hi);
            }
        }
        for (int g = 0; !HQ_G16(w) && g < ng; g++) {
            float gacc = 0.0f;
            for (int j = 0; j < bpg; j++) {
                const int b = g * bpg + j;
                int32_t dot = w->bits == 4 ? hq_block_dot_q4_scalar(qr + (size_t)b * 16, xq + (size_t)b * HQ_BLOCK)
                                           : hq_block_dot_q8_scalar((const int8_t *)qr + (size_t)b * HQ_BLOCK,
                                                                    xq + (size_t)b * HQ_BLOCK);
                gacc += xd[b] * (float)dot;
            }
            acc += hq_half_to_float(sr[g]) * gacc;
        }
        if (w->mins) {
            const uint16_t *mr = w->mins + (size_t)r * ng;
            for (int g = 0; g < ng; g++) acc += hq_half_to_float(mr[g]) * gs[g];
        }
        out[r - r0] = acc;
    }
}

/* Rows [r0, r1) of W as fp32 into out [(r1 - r0), k] (row stride k; padding dropped). */
static void hq_dequant_rows_scalar(const hq_weight *w, int r0, int r1, float *out) {
    const int ng = w->kp / w->group;
    const size_t row_bytes = w->bits == 4 ? (size_t)w->kp / 2 : (size_t)w->kp;
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = w->q + (size_t)r * row_bytes;
        float *o = out + (size_t)(r - r0) * w->k;
        for (int i = 0; i < w->k; i++) {
            const int g = i / w->group;
            int code;
            if (w->bits == 4) {
                const int b = i / HQ_BLOCK, j = i % HQ_BLOCK;
                const uint8_t byte = qr[b * 16 + (j & 15)];
                code = j < 16 ? (byte & 0x0F) : (byte >> 4);
            } else {
                code = ((const int8_t *)qr)[i];
            }
            float v = (float)code * hq_half_to_float(w->scales[(size_t)r * ng + g]);
            if (w->mins) v += hq_half_to_float(w->mins[(size_t)r * ng + g]);
            o[i] = v;
        }
    }
}

#endif
