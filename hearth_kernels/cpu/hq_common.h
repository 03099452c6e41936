/* Shared definitions: the weight descriptor Python fills (hearth_kernels/cpu_quant.py mirrors it
 * with ctypes; keep the two in step), and the quantized-activation scratch. */
#ifndef HQ_COMMON_H
#define HQ_COMMON_H

#include <stddef.h>
#include <stdint.h>

#define HQ_BLOCK 32 /* inputs per activation block (and per int4 packing block) */

/* One quantized weight W [n, k] in Hearth's canonical layout (engine/quant/qweight.py):
 *   w[r, i] = code[r, i] * scale[r, i / group] + min[r, i / group]   (min 0 when mins NULL)
 * bits 4: q is uint8 [n, kp / 2], GGUF order (in each block of 32 inputs, byte j holds
 *         input j in its low nibble and input j + 16 in its high nibble), codes 0..15.
 * bits 8: q is int8 [n, kp], signed codes.
 * kp is k rounded up to a multiple of 32: rows are zero-padded by the binding when k is
 * not (int8 per-channel only); group is then kp (a single group). scales and mins are
 * fp16 bit patterns [n, kp / group]; group is a multiple of 32, or 16 for int8 (GGUF
 * Q6_K's sub-blocks: two scales per block of 32; with mins, a fused q/k/v of Q4_K and Q6_K
 * tensors held in one form, engine/loader/gguf.py). The layer's bias, if any,
 * travels here too (one pointer less per call: every ctypes argument costs ~0.4 µs). */
typedef struct {
    int32_t bits;
    int32_t n;
    int32_t k;
    int32_t kp;
    int32_t group;
    int32_t reserved;
    const uint8_t *q;
    const uint16_t *scales;
    const uint16_t *mins;
    const float *bias; /* fp32 [n] added to every output row, or NULL */
} hq_weight;

/* int8 in groups of 16 inputs: two scales (and mins) per block of 32 */
#define HQ_G16(w) ((w)->group == 16 && (w)->bits == 8)

/* The activations x [m, k] quantized once per call: per block of 32 inputs an fp32 scale
 * d and int8 codes (x ~= d * code, code = round(x / d), d = max|x| / 127); per group the
 * sum of the dequantized block values (d * sum(code); groups of 16: each half block's),
 * which the mins multiply. Using
 * the quantized sum (not the float one) makes the result exactly W . x_hat (x_hat the
 * dequantized activations), whose error is bounded by |W| . |x - x_hat|. */
typedef struct {
    int32_t m;
    int32_t kp;
    int32_t ngroups;
    const int8_t *q;  /* [m, kp] */
    const float *d;   /* [m, kp / 32] */
    const float *gs;  /* [m, ngroups] */
} hq_acts;

static inline float hq_half_to_float(uint16_t h) {
    /* Portable IEEE binary16 -> binary32, exact, for the scalar path: move exponent and
       mantissa into place and rescale by 2^(127 - 15); this also turns half subnormals
       into the right (normal) floats, since float subnormals are exact. Inf/NaN keep an
       all-ones exponent. */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    union { uint32_t u; float f; } v = {(uint32_t)(h & 0x7FFFu) << 13};
    if ((h & 0x7C00u) == 0x7C00u) {
        v.u |= 0x7F800000u;
    } else {
        v.f *= 0x1p112f;
    }
    v.u |= sign;
    return v.f;
}

#endif
