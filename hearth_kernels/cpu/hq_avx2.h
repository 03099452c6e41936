/* The x86-64 AVX2 + FMA + F16C path (compiled with target attributes, chosen at run time).
 *
 * Per block of 32 inputs: the int4 codes (0..15, unsigned) times the int8 activation codes
 * with _mm256_maddubs_epi16 (u8 x s8 pairs -> s16: at most 2 * 15 * 127, no saturation),
 * then _mm256_madd_epi16 against ones -> 8 int32 partial sums, converted to fp32 and
 * multiplied into the accumulator by one scale (weight scale x activation scale). int8
 * weights use the sign trick (|w| as u8, sign(w) moved onto x): 2 * 128 * 127 < 32767.
 * Four output rows share each activation block load and give four independent FMA
 * chains (one row alone would wait on FMA latency every block).
 */
#ifndef HQ_AVX2_H
#define HQ_AVX2_H

#if defined(__x86_64__) || defined(__i386__)
#define HQ_HAVE_AVX2_PATH 1

#include <immintrin.h>
#include <string.h>

#include "hq_common.h"

#ifndef HQ_PREFETCH_ROWS
#define HQ_PREFETCH_ROWS 8 /* prefetch weight codes this many rows ahead (0: none) */
#endif

#define HQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#define HQ_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) static inline
/* round to nearest even, no exceptions: a macro, as clang takes only a constant expression here */
#define HQ_ROUND (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

HQ_AVX2_INLINE float hq_hsum_avx2(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

HQ_AVX2_INLINE float hq_h2f_avx2(uint16_t h) { return _cvtsh_ss(h); }

/* sum_i a[i] * b[i] with a fp16: the mins times the group sums. */
HQ_AVX2_INLINE float hq_dot_f16_avx2(const uint16_t *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i))), _mm256_loadu_ps(b + i), acc);
    float s = hq_hsum_avx2(acc);
    for (; i < n; i++) s += hq_h2f_avx2(a[i]) * b[i];
    return s;
}

/* Same result as hq_quantize_row_scalar (same fp32 ops, round-half-even). */
HQ_AVX2 static void hq_quantize_row_avx2(const float *x, int k, int kp, int8_t *q, float *d, int32_t *isum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    float tail[HQ_BLOCK];
    for (int b = 0; b < kp / HQ_BLOCK; b++) {
        const float *src = x + (size_t)b * HQ_BLOCK;
        if ((b + 1) * HQ_BLOCK > k) { /* the last, partial block: zero-padded copy */
            for (int i = 0; i < HQ_BLOCK; i++) tail[i] = b * HQ_BLOCK + i < k ? src[i] : 0.0f;
            src = tail;
        }
        __m256 v0 = _mm256_loadu_ps(src), v1 = _mm256_loadu_ps(src + 8);
        __m256 v2 = _mm256_loadu_ps(src + 16), v3 = _mm256_loadu_ps(src + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float db = amax / 127.0f;
        const float id = db != 0.0f ? 1.0f / db : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), HQ_ROUND));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), HQ_ROUND));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), HQ_ROUND));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), HQ_ROUND));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        /* packs work per 128-bit lane: fix the order with one cross-lane permute */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, order);
        _mm256_storeu_si256((__m256i *)(q + (size_t)b * HQ_BLOCK), p);
        d[b] = db;
        isum[b] = _mm_cvtsi128_si32(s4);
    }
}

HQ_AVX2_INLINE __m256i hq_unpack_q4_avx2(const uint8_t *p) {
    /* the 16 bytes in both lanes (a load, no shuffle), the high lane shifted by 4: low
       lane = low nibbles = inputs 0..15, high lane = high nibbles = inputs 16..31 */
    const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    const __m256i shifted = _mm256_srlv_epi64(raw, _mm256_setr_epi64x(0, 0, 4, 4));
    return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
}

HQ_AVX2_INLINE __m256 hq_block_dot_avx2(const uint8_t *w, int bits, __m256i y) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p;
    if (bits == 4) {
        p = _mm256_maddubs_epi16(hq_unpack_q4_avx2(w), y);
    } else {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)w);
        p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(y, wv));
    }
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
}

/* R (1..4) rows from r0 for activation row mi; BITS and BPG (blocks per group, 0 = any)
   are compile-time constants at each call site so the loops specialise. */
HQ_AVX2_INLINE void hq_rows_avx2_impl(const hq_weight *w, const hq_acts *a, int mi, int r0, float *out, const int R,
                                      const int BITS, const int BPG) {
    const int ng = w->kp / w->group;
    const int bpg = BPG ? BPG : w->group / HQ_BLOCK;
    const size_t row_bytes = BITS == 4 ? (size_t)w->kp / 2 : (size_t)w->kp;
    const size_t block_bytes = BITS == 4 ? HQ_BLOCK / 2 : HQ_BLOCK;
    const int8_t *xq = a->q + (size_t)mi * a->kp;
    const float *xd = a->d + (size_t)mi * (a->kp / HQ_BLOCK);
    const uint8_t *q[4];
    const uint16_t *sc[4];
    __m256 acc[4];
    float comb[4][8] __attribute__((aligned(32)));
    for (int r = 0; r < R; r++) {
        q[r] = w->q + (size_t)(r0 + r) * row_bytes;
        sc[r] = w->scales + (size_t)(r0 + r) * ng;
        acc[r] = _mm256_setzero_ps();
    }
    if (HQ_PREFETCH_ROWS) { /* the scales and mins of the rows as far ahead (R rows: contiguous) */
        const char *sp = (const char *)(sc[0] + (size_t)HQ_PREFETCH_ROWS * ng);
        const char *mp = w->mins ? (const char *)(w->mins + (size_t)(r0 + HQ_PREFETCH_ROWS) * ng) : NULL;
        for (size_t off = 0; off < (size_t)R * ng * 2; off += 64) {
            _mm_prefetch(sp + off, _MM_HINT_T0);
            if (mp) _mm_prefetch(mp + off, _MM_HINT_T0);
        }
    }
    /* Per block of 32: acc += (weight scale x activation scale) * block dot, the combined
       scales built per window of 8 blocks exactly as hq_tile_avx2_impl builds them, so one
       activation row gets the same bits here as in a tile of several (a prompt's rows must
       not depend on how many rows share the call: prefix-cache hits, chunking, batching). */
    const int nb = w->kp / HQ_BLOCK;
    for (int b = 0; b < nb; b++) {
        if ((b & 7) == 0) {
            if (bpg == 1 && b + 8 <= nb) { /* GGUF Q4_1 / Q8_0: 8 scales converted at a time */
                const __m256 dx8 = _mm256_loadu_ps(xd + b);
                for (int r = 0; r < R; r++)
                    _mm256_store_ps(comb[r], _mm256_mul_ps(
                        _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc[r] + b))), dx8));
            } else {
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < 8 && b + i < nb; i++) comb[r][i] = hq_h2f_avx2(sc[r][(b + i) / bpg]) * xd[b + i];
            }
        }
        const __m256i y = _mm256_loadu_si256((const __m256i *)(xq + (size_t)b * HQ_BLOCK));
        if (HQ_PREFETCH_ROWS && ((b * block_bytes) & 63) == 0)
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)(q[r] + (size_t)b * block_bytes + HQ_PREFETCH_ROWS * row_bytes),
                             _MM_HINT_T0);
        for (int r = 0; r < R; r++) {
            const __m256 p = hq_block_dot_avx2(q[r] + (size_t)b * block_bytes, BITS, y);
            acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&comb[r][b & 7]), p, acc[r]);
        }
    }
    const float *gs = a->gs + (size_t)mi * a->ngroups;
    for (int r = 0; r < R; r++) {
        float v = hq_hsum_avx2(acc[r]);
        if (w->mins) v += hq_dot_f16_avx2(w->mins + (size_t)(r0 + r) * ng, gs, ng);
        out[r] = v;
    }
}

#define HQ_DEFINE_ROWS(BITS, BPG, NAME)                                                              \
    HQ_AVX2 static void NAME(const hq_weight *w, const hq_acts *a, int mi, int r0, int r1, float *out) { \
        int r = r0;                                                                                    \
        for (; r + 4 <= r1; r += 4) hq_rows_avx2_impl(w, a, mi, r, out + (r - r0), 4, BITS, BPG);      \
        for (; r < r1; r++) hq_rows_avx2_impl(w, a, mi, r, out + (r - r0), 1, BITS, BPG);              \
    }

HQ_DEFINE_ROWS(4, 1, hq_rows_q4_g32_avx2)
HQ_DEFINE_ROWS(4, 0, hq_rows_q4_avx2)
HQ_DEFINE_ROWS(8, 1, hq_rows_q8_g32_avx2)
HQ_DEFINE_ROWS(8, 0, hq_rows_q8_avx2)

/* int8 in groups of 16 (GGUF Q6_K): per block of 32, the block dot's low lane (inputs
   0..15) takes the first scale and its high lane (16..31) the second; mins multiply the
   half-block sums. Four rows share each activation block load. */
HQ_AVX2_INLINE void hq_rows_q8_g16_impl(const hq_weight *w, const hq_acts *a, int mi, int r0, float *out, const int R) {
    const int nb = w->kp / HQ_BLOCK, ng = w->kp / 16;
    const int8_t *xq = a->q + (size_t)mi * a->kp;
    const float *xd = a->d + (size_t)mi * nb;
    const uint8_t *q[4];
    const uint16_t *sc[4];
    __m256 acc[4];
    for (int r = 0; r < R; r++) {
        q[r] = w->q + (size_t)(r0 + r) * w->kp;
        sc[r] = w->scales + (size_t)(r0 + r) * ng;
        acc[r] = _mm256_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const __m256i y = _mm256_loadu_si256((const __m256i *)(xq + (size_t)b * HQ_BLOCK));
        if (HQ_PREFETCH_ROWS && ((b * HQ_BLOCK) & 63) == 0)
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)(q[r] + (size_t)b * HQ_BLOCK + HQ_PREFETCH_ROWS * (size_t)w->kp),
                             _MM_HINT_T0);
        const __m128 dx = _mm_set1_ps(xd[b]);
        for (int r = 0; r < R; r++) {
            /* the two fp16 scales, as [s0 s0 s0 s0 | s1 s1 s1 s1] times the block's x scale */
            int32_t two;
            memcpy(&two, sc[r] + 2 * b, sizeof two);
            const __m128 s2 = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
            const __m256 sv = _mm256_set_m128(_mm_mul_ps(_mm_shuffle_ps(s2, s2, 0x55), dx),
                                              _mm_mul_ps(_mm_shuffle_ps(s2, s2, 0x00), dx));
            acc[r] = _mm256_fmadd_ps(sv, hq_block_dot_avx2(q[r] + (size_t)b * HQ_BLOCK, 8, y), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        out[r] = hq_hsum_avx2(acc[r]);
        if (w->mins)
            out[r] += hq_dot_f16_avx2(w->mins + (size_t)(r0 + r) * ng, a->gs + (size_t)mi * a->ngroups, ng);
    }
}

HQ_AVX2 static void hq_rows_q8_g16_avx2(const hq_weight *w, const hq_acts *a, int mi, int r0, int r1, float *out) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) hq_rows_q8_g16_impl(w, a, mi, r, out + (r - r0), 4);
    for (; r < r1; r++) hq_rows_q8_g16_impl(w, a, mi, r, out + (r - r0), 1);
}

HQ_AVX2 static void hq_rows_avx2(const hq_weight *w, const hq_acts *a, int mi, int r0, int r1, float *out) {
    if (HQ_G16(w)) {
        hq_rows_q8_g16_avx2(w, a, mi, r0, r1, out);
        return;
    }
    const int g32 = w->group == HQ_BLOCK;
    if (w->bits == 4)
        (g32 ? hq_rows_q4_g32_avx2 : hq_rows_q4_avx2)(w, a, mi, r0, r1, out);
    else
        (g32 ? hq_rows_q8_g32_avx2 : hq_rows_q8_avx2)(w, a, mi, r0, r1, out);
}

/* Several activation rows (prefill chunks, batched decode): R weight rows x MT activation
   rows per pass, so each weight block is loaded and unpacked once for MT rows (R = 2,
   MT <= 4: 8 accumulators + 2 weights + constants fit the 16 ymm registers). Writes
   out[(m0 + j) * ldo + r0 + i]. Combined scales (weight x activation) are built per
   window of 8 blocks, vectorised when a window is 8 whole groups of 32. */
HQ_AVX2_INLINE void hq_tile_avx2_impl(const hq_weight *w, const hq_acts *a, int m0, int r0, float *out, size_t ldo,
                                      const int R, const int MT, const int BITS) {
    const int ng = w->kp / w->group, nb = w->kp / HQ_BLOCK;
    const int bpg = w->group / HQ_BLOCK;
    const size_t row_bytes = BITS == 4 ? (size_t)w->kp / 2 : (size_t)w->kp;
    const size_t block_bytes = BITS == 4 ? HQ_BLOCK / 2 : HQ_BLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *q[2];
    const uint16_t *sc[2];
    const int8_t *xq[4];
    const float *xd[4];
    __m256 acc[2][4];
    float comb[2][4][8] __attribute__((aligned(32)));
    for (int r = 0; r < R; r++) {
        q[r] = w->q + (size_t)(r0 + r) * row_bytes;
        sc[r] = w->scales + (size_t)(r0 + r) * ng;
        for (int j = 0; j < MT; j++) acc[r][j] = _mm256_setzero_ps();
    }
    for (int j = 0; j < MT; j++) {
        xq[j] = a->q + (size_t)(m0 + j) * a->kp;
        xd[j] = a->d + (size_t)(m0 + j) * nb;
    }
    for (int b = 0; b < nb; b++) {
        if ((b & 7) == 0) {
            if (bpg == 1 && b + 8 <= nb) {
                for (int r = 0; r < R; r++) {
                    const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc[r] + b)));
                    for (int j = 0; j < MT; j++) _mm256_store_ps(comb[r][j], _mm256_mul_ps(s8, _mm256_loadu_ps(xd[j] + b)));
                }
            } else {
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < 8 && b + i < nb; i++) {
                        const float s = hq_h2f_avx2(sc[r][(b + i) / bpg]);
                        for (int j = 0; j < MT; j++) comb[r][j][i] = s * xd[j][b + i];
                    }
            }
        }
        if (HQ_PREFETCH_ROWS && ((b * block_bytes) & 63) == 0)
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)(q[r] + b * block_bytes + HQ_PREFETCH_ROWS * row_bytes), _MM_HINT_T0);
        __m256i wv[2], wabs[2];
        for (int r = 0; r < R; r++) {
            if (BITS == 4) {
                wv[r] = hq_unpack_q4_avx2(q[r] + (size_t)b * block_bytes);
            } else {
                wv[r] = _mm256_loadu_si256((const __m256i *)(q[r] + (size_t)b * block_bytes));
                wabs[r] = _mm256_sign_epi8(wv[r], wv[r]);
            }
        }
        for (int j = 0; j < MT; j++) {
            const __m256i y = _mm256_loadu_si256((const __m256i *)(xq[j] + (size_t)b * HQ_BLOCK));
            for (int r = 0; r < R; r++) {
                const __m256i p16 = BITS == 4 ? _mm256_maddubs_epi16(wv[r], y)
                                              : _mm256_maddubs_epi16(wabs[r], _mm256_sign_epi8(y, wv[r]));
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                acc[r][j] = _mm256_fmadd_ps(_mm256_broadcast_ss(&comb[r][j][b & 7]), p, acc[r][j]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < MT; j++) {
            float v = hq_hsum_avx2(acc[r][j]);
            if (w->mins)
                v += hq_dot_f16_avx2(w->mins + (size_t)(r0 + r) * ng, a->gs + (size_t)(m0 + j) * a->ngroups, ng);
            out[(size_t)(m0 + j) * ldo + r0 + r] = v;
        }
}

#define HQ_TILE_CASES(BITS, R)                                                          \
    switch (mt) {                                                                       \
    case 4: hq_tile_avx2_impl(w, a, m0, r, out, ldo, R, 4, BITS); break;                \
    case 3: hq_tile_avx2_impl(w, a, m0, r, out, ldo, R, 3, BITS); break;                \
    case 2: hq_tile_avx2_impl(w, a, m0, r, out, ldo, R, 2, BITS); break;                \
    default: hq_tile_avx2_impl(w, a, m0, r, out, ldo, R, 1, BITS); break;               \
    }

#define HQ_DEFINE_TILES(BITS, NAME)                                                                  \
    HQ_AVX2 static void NAME(const hq_weight *w, const hq_acts *a, int r0, int r1, float *out, size_t ldo) { \
        for (int m0 = 0; m0 < a->m; m0 += 4) {                                                       \
            const int mt = a->m - m0 < 4 ? a->m - m0 : 4;                                            \
            int r = r0;                                                                              \
            for (; r + 2 <= r1; r += 2) { HQ_TILE_CASES(BITS, 2) }                                   \
            for (; r < r1; r++) { HQ_TILE_CASES(BITS, 1) }                                           \
        }                                                                                            \
    }

HQ_DEFINE_TILES(4, hq_tiles_q4_avx2)
HQ_DEFINE_TILES(8, hq_tiles_q8_avx2)

/* All activation rows of a->m (> 1) for weight rows [r0, r1), into out [m, ldo]. */
HQ_AVX2 static void hq_rows_multi_avx2(const hq_weight *w, const hq_acts *a, int r0, int r1, float *out, size_t ldo) {
    (w->bits == 4 ? hq_tiles_q4_avx2 : hq_tiles_q8_avx2)(w, a, r0, r1, out, ldo);
}

/* Rows [r0, r1) of W as fp32 into out [(r1 - r0), k] (row stride k). */
HQ_AVX2 static void hq_dequant_rows_avx2(const hq_weight *w, int r0, int r1, float *out) {
    const int ng = w->kp / w->group, bpg = w->group / HQ_BLOCK, g16 = HQ_G16(w);
    const size_t row_bytes = w->bits == 4 ? (size_t)w->kp / 2 : (size_t)w->kp;
    float tmp[HQ_BLOCK];
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = w->q + (size_t)r * row_bytes;
        float *o = out + (size_t)(r - r0) * w->k;
        for (int b = 0; b < w->kp / HQ_BLOCK; b++) {
            const int g = g16 ? 2 * b : b / bpg; /* groups of 16: the second half takes g + 1 */
            const __m256 s = _mm256_set1_ps(hq_h2f_avx2(w->scales[(size_t)r * ng + g]));
            const __m256 s_hi = g16 ? _mm256_set1_ps(hq_h2f_avx2(w->scales[(size_t)r * ng + g + 1])) : s;
            const __m256 m = _mm256_set1_ps(w->mins ? hq_h2f_avx2(w->mins[(size_t)r * ng + g]) : 0.0f);
            const __m256 m_hi = g16 && w->mins ? _mm256_set1_ps(hq_h2f_avx2(w->mins[(size_t)r * ng + g + 1])) : m;
            __m256i codes; /* 32 codes as bytes, input order */
            if (w->bits == 4) {
                codes = hq_unpack_q4_avx2(qr + (size_t)b * 16);
            } else {
                codes = _mm256_loadu_si256((const __m256i *)(qr + (size_t)b * HQ_BLOCK));
            }
            float *dst = (b + 1) * HQ_BLOCK <= w->k ? o + (size_t)b * HQ_BLOCK : tmp;
            const __m128i c16[2] = {_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1)};
            for (int h = 0; h < 2; h++) {
                for (int e = 0; e < 2; e++) {
                    const __m128i c8 = e ? _mm_srli_si128(c16[h], 8) : c16[h];
                    const __m256i c32 = w->bits == 4 ? _mm256_cvtepu8_epi32(c8) : _mm256_cvtepi8_epi32(c8);
                    _mm256_storeu_ps(dst + h * 16 + e * 8,
                                     _mm256_fmadd_ps(_mm256_cvtepi32_ps(c32), h ? s_hi : s, h ? m_hi : m));
                }
            }
            if (dst == tmp)
                for (int i = 0; b * HQ_BLOCK + i < w->k; i++) o[b * HQ_BLOCK + i] = tmp[i];
        }
    }
}

#endif /* x86 */
#endif
