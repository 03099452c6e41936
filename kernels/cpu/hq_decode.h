/* Hearth's whole batch-1 decode step in C: one call per token (the CPU analogue of the
 * CUDA decode graphs). A decode step of a small model eagerly in torch is ~900 tiny ops
 * (norms, RoPE, paged-attention gather/softmax, KV write, module calls) costing 20+ ms
 * of overhead per token on a 2-core CPU, more than the weights' streaming itself; here
 * the same step is one loop over the layers, with the int4/int8 block-dot rows of
 * hq_avx2.h/hq_scalar.h for quantized projections, an fp32 GEMV for float ones, and the
 * pool of hq_pool.h sharing each GEMV's rows (and, at long contexts, attention's chunks of
 * keys: flash-decoding) between threads.
 *
 * The model is the Llama family as engine/models/llama.py runs it (kernels/cpu_decode.py
 * fills the descriptor from plain tensors and mirrors these structs with ctypes: keep
 * them in step):
 *   res = embed[token]
 *   per layer: h = rmsnorm(res) -> qkv (+bias) -> RoPE(q, k) (rotate-half, the runner's
 *     cos/sin tables) -> K/V written at the slot of `pos` in the layer's paged cache
 *     [2, num_blocks, block_size, kv_heads, head_dim] -> causal GQA attention over the
 *     sequence's blocks (optional sliding window) -> o -> res += ...;
 *     h = rmsnorm(res) -> gate_up -> silu(gate) * up -> down -> res += ...
 *   logits = head(rmsnorm(res))
 * Included at the end of hq_quant.c (one translation unit: one thread pool).
 */
#ifndef HQ_DECODE_H
#define HQ_DECODE_H

#include <math.h>

#define HD_FLOAT32 32 /* hq_weight.bits for an fp32 [n, k] matrix (q points at the floats) */

typedef struct {
    const float *input_norm;
    const float *post_norm;
    hq_weight qkv, o, gate_up, down;
    float *kv; /* [2, num_blocks, block_size, kv_heads, head_dim] fp32 */
} hd_layer;

typedef struct {
    int32_t layers, hidden, heads, kv_heads, head_dim, inter, vocab, block_size;
    int32_t num_blocks, window, max_positions, isa; /* window 0: none; isa as hq_matmul's */
    int32_t split_min; /* split attention's keys over threads from context x heads this large */
    float eps, scale;
    const float *cos, *sin; /* [max_positions, head_dim] */
    const float *final_norm;
    hq_weight embed, head;
    const hd_layer *layer;
} hd_model;

/* ---- small vector helpers (AVX2 where the CPU has it) ---------------------------- */
#if defined(HQ_HAVE_AVX2_PATH)
HQ_AVX2 static float hd_dot_avx2(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hq_hsum_avx2(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out[r - r0] = W[r] . x for fp32 W [n, k]: four rows share each load of x. */
HQ_AVX2 static void hd_f32_rows_avx2(const float *W, int k, const float *x, int r0, int r1, float *out) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w0 = W + (size_t)r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int i = 0;
        for (; i + 8 <= k; i += 8) {
            const __m256 xv = _mm256_loadu_ps(x + i);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
        }
        float s0 = hq_hsum_avx2(a0), s1 = hq_hsum_avx2(a1), s2 = hq_hsum_avx2(a2), s3 = hq_hsum_avx2(a3);
        for (; i < k; i++) {
            s0 += w0[i] * x[i];
            s1 += w1[i] * x[i];
            s2 += w2[i] * x[i];
            s3 += w3[i] * x[i];
        }
        out[r - r0] = s0;
        out[r - r0 + 1] = s1;
        out[r - r0 + 2] = s2;
        out[r - r0 + 3] = s3;
    }
    for (; r < r1; r++) out[r - r0] = hd_dot_avx2(W + (size_t)r * k, x, k);
}
#endif

static float hd_dot(const float *a, const float *b, int n, int isa) {
#if defined(HQ_HAVE_AVX2_PATH)
    if (isa == HQ_ISA_AVX2) return hd_dot_avx2(a, b, n);
#endif
    (void)isa;
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ---- GEMV: out [n] = W . x (+ bias), rows shared between threads --------------------- */
typedef struct {
    const hq_weight *w;
    const hq_acts *a; /* the quantized x (quantized weights) */
    const float *x;   /* the float x (fp32 weights) */
    float *out;
    int isa, chunk_rows, nchunks;
    atomic_int next;
} hd_gemv_task;

static void hd_gemv_worker(void *p, int worker) {
    (void)worker;
    hd_gemv_task *t = (hd_gemv_task *)p;
    const hq_weight *w = t->w;
    for (;;) {
        const int c = atomic_fetch_add_explicit(&t->next, 1, memory_order_relaxed);
        if (c >= t->nchunks) return;
        const int r0 = c * t->chunk_rows;
        const int r1 = r0 + t->chunk_rows < w->n ? r0 + t->chunk_rows : w->n;
        float *o = t->out + r0;
        if (w->bits == HD_FLOAT32) {
            const float *W = (const float *)w->q;
#if defined(HQ_HAVE_AVX2_PATH)
            if (t->isa == HQ_ISA_AVX2)
                hd_f32_rows_avx2(W, w->k, t->x, r0, r1, o);
            else
#endif
                for (int r = r0; r < r1; r++) o[r - r0] = hd_dot(W + (size_t)r * w->k, t->x, w->k, t->isa);
        } else {
#if defined(HQ_HAVE_AVX2_PATH)
            if (t->isa == HQ_ISA_AVX2)
                hq_rows_avx2(w, t->a, 0, r0, r1, o);
            else
#endif
                hq_rows_scalar(w, t->a, 0, r0, r1, o);
        }
        if (w->bias)
            for (int r = r0; r < r1; r++) o[r - r0] += w->bias[r];
    }
}

typedef struct {
    int8_t *q;
    float *d, *gs;
    int32_t *isum;
} hd_act_buf;

static void hd_gemv(const hq_weight *w, const float *x, float *out, hd_act_buf *buf, int isa, int nthreads) {
    hq_acts a = {1, w->kp, 1, buf->q, buf->d, buf->gs};
    if (w->bits != HD_FLOAT32) {
        a.ngroups = w->kp / w->group;
        hq_quantize_acts(x, 1, w->k, w->kp, w->group, isa, buf->q, buf->d, buf->gs, buf->isum);
    }
    hd_gemv_task t;
    t.w = w;
    t.a = &a;
    t.x = x;
    t.out = out;
    t.isa = isa;
    int rows = w->n / (8 * (nthreads > 0 ? nthreads : 1));
    rows = rows < 16 ? 16 : rows > 256 ? 256 : rows;
    t.chunk_rows = rows & ~3;
    t.nchunks = (w->n + t.chunk_rows - 1) / t.chunk_rows;
    atomic_init(&t.next, 0);
    hq_parallel(hd_gemv_worker, &t, nthreads < t.nchunks ? nthreads : t.nchunks);
}

/* ---- attention over the paged cache ----------------------------------------------------
 * Work units are (KV head, chunk of keys): each reads its keys and values once for all the
 * query heads of its group (GQA), computes the chunk's scores, their max m and the sum l
 * of exp(score - m), and the unnormalised sum of exp(score - m) * v; the units' partials
 * are merged per head afterwards (flash-decoding). Threads take units from a counter. */
typedef struct {
    const hd_model *m;
    const float *q; /* [heads, head_dim], rotated */
    const float *kv;
    const int32_t *table;
    float *partial; /* [units, group, head_dim + 2]: acc, then m, l */
    float *scores;  /* [threads, group * chunk] */
    int lo, len, chunk, nchunks, nunits, isa;
    atomic_int next;
} hd_attn_task;

#if defined(HQ_HAVE_AVX2_PATH)
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
    const int hd = m->head_dim, group = m->heads / m->kv_heads, bs = m->block_size;
    const int kvh = unit / t->nchunks, c = unit % t->nchunks;
    const int j0 = c * t->chunk, n = t->len - j0 < t->chunk ? t->len - j0 : t->chunk;
    const size_t plane = (size_t)m->num_blocks * bs * m->kv_heads * hd;
    const float *q0 = t->q + (size_t)kvh * group * hd;
    const __m256 scale = _mm256_set1_ps(m->scale);
    const float *krow[8];
    int j = 0;
    for (; j < n; j += 8) { /* scores of 8 keys at a time, for every head of the group */
        const int nk = n - j < 8 ? n - j : 8;
        for (int i = 0; i < 8; i++) {
            const int tok = t->lo + j0 + j + (i < nk ? i : 0);
            krow[i] = t->kv + (((size_t)t->table[tok / bs] * bs + tok % bs) * m->kv_heads + kvh) * hd;
        }
        if (j + 8 < n) /* the next 8 keys' rows: strided by the KV heads, scattered by blocks */
            for (int i = 0; i < 8 && j + 8 + i < n; i++) {
                const int tok = t->lo + j0 + j + 8 + i;
                const char *nx = (const char *)(t->kv + (((size_t)t->table[tok / bs] * bs + tok % bs) * m->kv_heads + kvh) * hd);
                for (int b = 0; b < hd * 4; b += 64) _mm_prefetch(nx + b, _MM_HINT_T0);
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
        const float *v = t->kv + plane + (((size_t)t->table[tok / bs] * bs + tok % bs) * m->kv_heads + kvh) * hd;
        if (j + 4 < n) {
            const int nt = tok + 4;
            const char *nx = (const char *)(t->kv + plane + (((size_t)t->table[nt / bs] * bs + nt % bs) * m->kv_heads + kvh) * hd);
            for (int b = 0; b < hd * 4; b += 64) _mm_prefetch(nx + b, _MM_HINT_T0);
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
    const int hd = m->head_dim, group = m->heads / m->kv_heads, bs = m->block_size;
    const int kvh = unit / t->nchunks, c = unit % t->nchunks;
    const int j0 = c * t->chunk, n = t->len - j0 < t->chunk ? t->len - j0 : t->chunk;
    const size_t plane = (size_t)m->num_blocks * bs * m->kv_heads * hd;
    float *part = t->partial + (size_t)unit * group * (hd + 2);
    for (int g = 0; g < group; g++) {
        const float *qg = t->q + ((size_t)kvh * group + g) * hd;
        float *sg = s + (size_t)g * t->chunk, *pg = part + (size_t)g * (hd + 2);
        float mx = -INFINITY, sum = 0.0f;
        for (int j = 0; j < n; j++) {
            const int tok = t->lo + j0 + j;
            const float *k = t->kv + (((size_t)t->table[tok / bs] * bs + tok % bs) * m->kv_heads + kvh) * hd;
            float dot = 0.0f;
            for (int d = 0; d < hd; d++) dot += qg[d] * k[d];
            sg[j] = dot * m->scale;
            mx = sg[j] > mx ? sg[j] : mx;
        }
        for (int d = 0; d < hd; d++) pg[d] = 0.0f;
        for (int j = 0; j < n; j++) {
            const int tok = t->lo + j0 + j;
            const float *v = t->kv + plane + (((size_t)t->table[tok / bs] * bs + tok % bs) * m->kv_heads + kvh) * hd;
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

/* ---- the rest: norms, RoPE, SiLU ---------------------------------------------------- */
/* out = x / sqrt(mean(x^2) + eps) * weight (fp32, as engine/layers/norm.py) */
static void hd_rmsnorm(const float *x, const float *weight, float eps, int n, float *out) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * r);
}

/* rotate-half RoPE of `heads` vectors of head_dim at one position (engine/layers/rotary.py) */
static void hd_rope(float *x, int heads, int hd, const float *cos, const float *sin) {
    const int half = hd / 2;
    for (int h = 0; h < heads; h++) {
        float *v = x + (size_t)h * hd;
        for (int i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/* Row `token` of the embedding as fp32 into out [hidden]. */
static void hd_embed(const hq_weight *e, int token, int isa, float *out) {
    if (e->bits == HD_FLOAT32) {
        memcpy(out, (const float *)e->q + (size_t)token * e->k, sizeof(float) * (size_t)e->k);
        return;
    }
#if defined(HQ_HAVE_AVX2_PATH)
    if (isa == HQ_ISA_AVX2) {
        hq_dequant_rows_avx2(e, token, token + 1, out);
        return;
    }
#endif
    (void)isa;
    hq_dequant_rows_scalar(e, token, token + 1, out);
}

/* act [n] = silu(gu[i]) * gu[n + i] (SwiGLU over [gate | up]) */
#if defined(HQ_HAVE_AVX2_PATH)
HQ_AVX2 static void hd_silu_mul_avx2(const float *gu, int n, float *act) {
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gu + i);
        const __m256 e = hd_exp_avx2(_mm256_xor_ps(g, neg));
        _mm256_storeu_ps(act + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(gu + n + i)));
    }
    for (; i < n; i++) act[i] = gu[i] / (1.0f + expf(-gu[i])) * gu[n + i];
}
#endif

static void hd_silu_mul(const float *gu, int n, float *act, int isa) {
#if defined(HQ_HAVE_AVX2_PATH)
    if (isa == HQ_ISA_AVX2) {
        hd_silu_mul_avx2(gu, n, act);
        return;
    }
#endif
    (void)isa;
    for (int i = 0; i < n; i++) act[i] = gu[i] / (1.0f + expf(-gu[i])) * gu[n + i];
}

/* One decode step of one sequence: token `token` at position `pos` (its K/V written at
 * block table[pos / block_size], offset pos % block_size; attention over positions
 * 0..pos, or the last `window`), logits [vocab] fp32 out. `threads` <= 1: the calling
 * thread only. Returns HQ_OK, HQ_ERR_SHAPE (bad token, position or table) or HQ_ERR_NOMEM. */
int hd_decode_step(const hd_model *m, int token, int pos, const int32_t *table, int ntable, float *logits,
                   int threads) {
    if (token < 0 || token >= m->vocab || pos < 0 || pos >= m->max_positions || pos / m->block_size >= ntable)
        return HQ_ERR_SHAPE;
    for (int b = 0; b <= pos / m->block_size; b++)
        if (table[b] < 0 || table[b] >= m->num_blocks) return HQ_ERR_SHAPE;
    int isa = hq_pick_isa(m->isa);
    if (isa < 0) return HQ_ERR_ISA;
    if (threads < 1) threads = 1;
    const int H = m->hidden, hd = m->head_dim, qsize = m->heads * hd, kvsize = m->kv_heads * hd;
    const int group = m->heads / m->kv_heads;
    const int lo = m->window > 0 && pos - m->window + 1 > 0 ? pos - m->window + 1 : 0, len = pos - lo + 1;
    /* Attention's split: short contexts one unit per KV head on this thread (µs of work,
       less than waking a helper); long ones about 4 units per thread. */
    int at_threads = 1, nchunks = 1, chunk = len;
    if ((size_t)len * m->heads >= (size_t)m->split_min && threads > 1) {
        at_threads = threads;
        nchunks = (4 * threads + m->kv_heads - 1) / m->kv_heads;
        chunk = (len + nchunks - 1) / nchunks;
        chunk = (chunk + 7) & ~7;
        nchunks = (len + chunk - 1) / chunk;
    }
    const int nunits = m->kv_heads * nchunks;
    int widest = H > 2 * m->inter ? H : 2 * m->inter;
    widest = (widest > qsize ? widest : qsize) + 64;
    const size_t n_scores = (size_t)at_threads * group * (chunk + 8), n_partial = (size_t)nunits * group * (hd + 2);
    const size_t floats = (size_t)4 * H + (qsize + 2 * kvsize) + qsize + 2 * (size_t)m->inter + m->inter + n_scores +
                          n_partial + 3 * ((size_t)widest / HQ_BLOCK + 1) + 64;
    char *mem = (char *)malloc(sizeof(float) * floats + (size_t)widest + 64);
    if (!mem) return HQ_ERR_NOMEM;
    float *res = (float *)mem, *h = res + H, *tmp = h + H, *qkv = tmp + 2 * H;
    float *attn = qkv + qsize + 2 * kvsize, *gu = attn + qsize, *act = gu + 2 * m->inter;
    float *scores = act + m->inter, *partial = scores + n_scores;
    hd_act_buf ab;
    ab.d = partial + n_partial;
    ab.gs = ab.d + widest / HQ_BLOCK + 1;
    ab.isum = (int32_t *)(ab.gs + widest / HQ_BLOCK + 1);
    ab.q = (int8_t *)(ab.isum + widest / HQ_BLOCK + 1);

    const float *cos = m->cos + (size_t)pos * hd, *sin = m->sin + (size_t)pos * hd;
    const int slot_block = table[pos / m->block_size], slot_off = pos % m->block_size;
    const size_t plane = (size_t)m->num_blocks * m->block_size * kvsize;

    hd_embed(&m->embed, token, isa, res);
    for (int l = 0; l < m->layers; l++) {
        const hd_layer *L = &m->layer[l];
        hd_rmsnorm(res, L->input_norm, m->eps, H, h);
        hd_gemv(&L->qkv, h, qkv, &ab, isa, threads);
        float *q = qkv, *k = qkv + qsize, *v = k + kvsize;
        hd_rope(q, m->heads, hd, cos, sin);
        hd_rope(k, m->kv_heads, hd, cos, sin);
        float *slot = L->kv + ((size_t)slot_block * m->block_size + slot_off) * kvsize;
        memcpy(slot, k, sizeof(float) * kvsize);
        memcpy(slot + plane, v, sizeof(float) * kvsize);

        hd_attn_task at;
        at.m = m;
        at.q = q;
        at.kv = L->kv;
        at.table = table;
        at.partial = partial;
        at.scores = scores;
        at.lo = lo;
        at.len = len;
        at.chunk = chunk;
        at.nchunks = nchunks;
        at.nunits = nunits;
        at.isa = isa;
        atomic_init(&at.next, 0);
        hq_parallel(hd_attn_worker, &at, at_threads < nunits ? at_threads : nunits);
        hd_attn_merge(&at, attn);

        hd_gemv(&L->o, attn, tmp, &ab, isa, threads);
        for (int i = 0; i < H; i++) res[i] = tmp[i] + res[i];
        hd_rmsnorm(res, L->post_norm, m->eps, H, h);
        hd_gemv(&L->gate_up, h, gu, &ab, isa, threads);
        hd_silu_mul(gu, m->inter, act, isa);
        hd_gemv(&L->down, act, tmp, &ab, isa, threads);
        for (int i = 0; i < H; i++) res[i] = tmp[i] + res[i];
    }
    hd_rmsnorm(res, m->final_norm, m->eps, H, h);
    hd_gemv(&m->head, h, logits, &ab, isa, threads);
    free(mem);
    return HQ_OK;
}

#endif
