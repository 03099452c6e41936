/* The decode step's attention over the paged KV cache (included by hq_decode.h, after
 * hd_model; see there). */
#ifndef HQ_DECODE_ATTN_H
#define HQ_DECODE_ATTN_H

#include <math.h>

/* ---- attention over the paged cache ----------------------------------------------------
 * Work units are (KV head, chunk of keys): each reads its keys and values once for all the
 * query heads of its group (GQA), computes the chunk's scores, their max m and the sum l
 * of exp(score - m), and the unnormalised sum of exp(score - m) * v; the units' partials
 * are merged per head afterwards (flash-decoding). Threads take units from a counter. */
typedef struct {
    const hd_model *m;
    const float *q; /* [heads, head_dim], rotated */
    const char *kv; /* the layer's cache: fp32, or e4m3 bytes (esize 1) */
    size_t esize;
    const int32_t *table;
    float *partial; /* [units, group, head_dim + 2]: acc, then m, l */
    float *scores;  /* [threads, group * chunk] */
    int lo, len, chunk, nchunks, nunits, isa;
    atomic_int next;
} hd_attn_task;

/* Where token tok's row of KV head kvh starts in plane p (0: K, 1: V) of the cache. */
static inline const char *hd_kv_at(const hd_attn_task *t, int p, int tok, int kvh) {
    const hd_model *m = t->m;
    const size_t plane = (size_t)m->num_blocks * m->block_size * m->kv_heads * m->head_dim;
    const size_t row = ((size_t)t->table[tok / m->block_size] * m->block_size + tok % m->block_size) * m->kv_heads + kvh;
    return t->kv + ((size_t)p * plane + row * m->head_dim) * t->esize;
}

/* That row as fp32: the cache's own floats, or its e4m3 bytes widened into buf [head_dim]. */
static const float *hd_kv_row(const hd_attn_task *t, int p, int tok, int kvh, float *buf) {
    const char *at = hd_kv_at(t, p, tok, kvh);
    if (t->esize == sizeof(float)) return (const float *)at;
    const uint8_t *b = (const uint8_t *)at;
    for (int d = 0; d < t->m->head_dim; d++) buf[d] = hd_e4m3_table[b[d]];
    return buf;
}

#if defined(HQ_HAVE_AVX2_PATH)
HQ_AVX2 static const float *hd_kv_row_avx2(const hd_attn_task *t, int p, int tok, int kvh, float *buf) {
    const char *at = hd_kv_at(t, p, tok, kvh);
    if (t->esize == sizeof(float)) return (const float *)at;
    for (int d = 0; d < t->m->head_dim; d += 8) /* (head_dim % 8 == 0 on this path) */
        _mm256_storeu_ps(buf + d, _mm256_i32gather_ps(hd_e4m3_table, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(at + d))), 4));
    return buf;
}

/* e^x for x <= 0 (softmax) or any x (SiLU), Cephes' polynomial: ~1e-7 relative. */
HQ_AVX2_INLINE __m256 hd_exp_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* The sums of 8 vectors, as one vector (element i: the sum of v[i]'s lanes). */
HQ_AVX2_INLINE __m256 hd_hsum8_avx2(const __m256 *v) {
    const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
    const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    /* lanes: ab = [s0lo s1lo s2lo s3lo | s0hi s1hi s2hi s3hi], cd likewise for 4..7 */
    const __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20), hi = _mm256_permute2f128_ps(ab, cd, 0x31);
    return _mm256_add_ps(lo, hi);
}

HQ_AVX2 static void hd_attn_unit_avx2(hd_attn_task *t, int unit, float *s) {
    const hd_model *m = t->m;
    const int hd = m->head_dim, group = m->heads / m->kv_heads;
    const int kvh = unit / t->nchunks, c = unit % t->nchunks;
    const int j0 = c * t->chunk, n = t->len - j0 < t->chunk ? t->len - j0 : t->chunk;
    const int row_bytes = hd * (int)t->esize;
    const float *q0 = t->q + (size_t)kvh * group * hd;
    const __m256 scale = _mm256_set1_ps(m->scale);
    const float *krow[8];
    float kbuf[8 * HD_E4M3_MAX_HEAD], vbuf[HD_E4M3_MAX_HEAD]; /* an e4m3 cache's rows, widened */
    int j = 0;
    for (; j < n; j += 8) { /* scores of 8 keys at a time, for every head of the group */
        const int nk = n - j < 8 ? n - j : 8;
        for (int i = 0; i < 8; i++) {
            const int tok = t->lo + j0 + j + (i < nk ? i : 0);
            krow[i] = hd_kv_row_avx2(t, 0, tok, kvh, kbuf + (size_t)i * HD_E4M3_MAX_HEAD);
        }
        if (j + 8 < n) /* the next 8 keys' rows: strided by the KV heads, scattered by blocks */
            for (int i = 0; i < 8 && j + 8 + i < n; i++) {
                const char *nx = hd_kv_at(t, 0, t->lo + j0 + j + 8 + i, kvh);
                for (int b = 0; b < row_bytes; b += 64) _mm_prefetch(nx + b, _MM_HINT_T0);
            }
        for (int g = 0; g < group; g++) {
            const float *qg = q0 + (size_t)g * hd;
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int d = 0; d < hd; d += 8) {
                const __m256 qv = _mm256_loadu_ps(qg + d);
                for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(krow[i] + d), acc[i]);
            }
            float tmp[8];
            _mm256_storeu_ps(tmp, _mm256_mul_ps(hd_hsum8_avx2(acc), scale));
            for (int i = 0; i < nk; i++) s[(size_t)g * t->chunk + j + i] = tmp[i];
        }
    }
    float *part = t->partial + (size_t)unit * group * (hd + 2);
    for (int g = 0; g < group; g++) { /* exp(score - max) in place, and their sum */
        float *sg = s + (size_t)g * t->chunk;
        float mx = -INFINITY;
        for (int i = 0; i < n; i++) mx = sg[i] > mx ? sg[i] : mx;
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 vsum = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 e = hd_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sg + i), vmx));
            _mm256_storeu_ps(sg + i, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hq_hsum_avx2(vsum);
        for (; i < n; i++) {
            sg[i] = expf(sg[i] - mx);
            sum += sg[i];
        }
        float *pg = part + (size_t)g * (hd + 2);
        for (int d = 0; d < hd; d++) pg[d] = 0.0f;
        pg[hd] = mx;
        pg[hd + 1] = sum;
    }
    for (j = 0; j < n; j++) { /* acc += p * v, each value row read once for the group */
        const int tok = t->lo + j0 + j;
        const float *v = hd_kv_row_avx2(t, 1, tok, kvh, vbuf);
        if (j + 4 < n) {
            const char *nx = hd_kv_at(t, 1, tok + 4, kvh);
            for (int b = 0; b < row_bytes; b += 64) _mm_prefetch(nx + b, _MM_HINT_T0);
        }
        for (int g = 0; g < group; g++) {
            const __m256 p = _mm256_set1_ps(s[(size_t)g * t->chunk + j]);
            float *pg = part + (size_t)g * (hd + 2);
            for (int d = 0; d < hd; d += 8)
                _mm256_storeu_ps(pg + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + d), _mm256_loadu_ps(pg + d)));
        }
    }
}
#endif

static void hd_attn_unit_scalar(hd_attn_task *t, int unit, float *s) {
    const hd_model *m = t->m;
    const int hd = m->head_dim, group = m->heads / m->kv_heads;
    const int kvh = unit / t->nchunks, c = unit % t->nchunks;
    const int j0 = c * t->chunk, n = t->len - j0 < t->chunk ? t->len - j0 : t->chunk;
    float *part = t->partial + (size_t)unit * group * (hd + 2);
    float buf[HD_E4M3_MAX_HEAD]; /* an e4m3 cache's row, widened */
    for (int g = 0; g < group; g++) {
        const float *qg = t->q + ((size_t)kvh * group + g) * hd;
        float *sg = s + (size_t)g * t->chunk, *pg = part + (size_t)g * (hd + 2);
        float mx = -INFINITY, sum = 0.0f;
        for (int j = 0; j < n; j++) {
            const int tok = t->lo + j0 + j;
            const float *k = hd_kv_row(t, 0, tok, kvh, buf);
            float dot = 0.0f;
            for (int d = 0; d < hd; d++) dot += qg[d] * k[d];
            sg[j] = dot * m->scale;
            mx = sg[j] > mx ? sg[j] : mx;
        }
        for (int d = 0; d < hd; d++) pg[d] = 0.0f;
        for (int j = 0; j < n; j++) {
            const float *v = hd_kv_row(t, 1, t->lo + j0 + j, kvh, buf);
            const float p = expf(sg[j] - mx);
            sum += p;
            for (int d = 0; d < hd; d++) pg[d] += p * v[d];
        }
        pg[hd] = mx;
        pg[hd + 1] = sum;
    }
}

static void hd_attn_worker(void *p, int worker) {
    hd_attn_task *t = (hd_attn_task *)p;
    const int group = t->m->heads / t->m->kv_heads;
    float *s = t->scores + (size_t)worker * group * t->chunk;
    for (;;) {
        const int unit = atomic_fetch_add_explicit(&t->next, 1, memory_order_relaxed);
        if (unit >= t->nunits) return;
#if defined(HQ_HAVE_AVX2_PATH)
        if (t->isa == HQ_ISA_AVX2 && t->m->head_dim % 8 == 0) {
            hd_attn_unit_avx2(t, unit, s);
            continue;
        }
#endif
        hd_attn_unit_scalar(t, unit, s);
    }
}

/* Merge the chunks' partials of every head into out [heads, head_dim]. */
static void hd_attn_merge(const hd_attn_task *t, float *out) {
    const hd_model *m = t->m;
    const int hd = m->head_dim, group = m->heads / m->kv_heads;
    for (int h = 0; h < m->heads; h++) {
        const int kvh = h / group, g = h % group;
        float mx = -INFINITY;
        for (int c = 0; c < t->nchunks; c++) {
            const float *pg = t->partial + ((size_t)(kvh * t->nchunks + c) * group + g) * (hd + 2);
            mx = pg[hd] > mx ? pg[hd] : mx;
        }
        float *o = out + (size_t)h * hd, sum = 0.0f;
        for (int d = 0; d < hd; d++) o[d] = 0.0f;
        for (int c = 0; c < t->nchunks; c++) {
            const float *pg = t->partial + ((size_t)(kvh * t->nchunks + c) * group + g) * (hd + 2);
            const float w = expf(pg[hd] - mx);
            sum += w * pg[hd + 1];
            for (int d = 0; d < hd; d++) o[d] += w * pg[d];
        }
        const float inv = 1.0f / sum;
        for (int d = 0; d < hd; d++) o[d] *= inv;
    }
}

#endif
