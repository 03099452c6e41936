/* Hearth's whole batch-1 decode step in C: one call per token (the CPU analogue of the
 * CUDA decode graphs). A decode step of a small model eagerly in torch is ~900 tiny ops
 * (norms, RoPE, paged-attention gather/softmax, KV write, module calls) costing 20+ ms
 * of overhead per token on a 2-core CPU, more than the weights' streaming itself; here
 * the same step is one loop over the layers, with the int4/int8 block-dot rows of
 * hq_avx2.h/hq_scalar.h for quantized projections, an fp32 GEMV for float ones, and the
 * pool of hq_pool.h sharing each GEMV's rows (and, at long contexts, attention's chunks of
 * keys: flash-decoding) between threads.
 *
 * The model is the Llama family as engine/models/llama.py runs it (hearth_kernels/cpu_decode.py
 * fills the descriptor from plain tensors and mirrors these structs with ctypes: keep
 * them in step):
 *   res = embed[token]
 *   per layer: h = rmsnorm(res) -> qkv (+bias) -> [per-head rmsnorm of q and k: Qwen3] -> RoPE(q, k) (rotate-half, the runner's
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
    void *kv; /* [2, num_blocks, block_size, kv_heads, head_dim]: fp32, or e4m3 bytes (hd_model.kv_fp8) */
    const float *q_norm, *k_norm; /* [head_dim] each: per-head RMSNorm of q and k before RoPE (Qwen3), or NULL */
} hd_layer;

typedef struct {
    int32_t layers, hidden, heads, kv_heads, head_dim, inter, vocab, block_size;
    int32_t num_blocks, window, max_positions, isa; /* window 0: none; isa as hq_matmul's */
    int32_t split_min; /* split attention's keys over threads from context x heads this large */
    int32_t kv_fp8; /* the KV caches hold float8 e4m3 (torch.float8_e4m3fn) bytes, not fp32 */
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
    for (; i < n; i++) s = fmaf(a[i], b[i], s); /* (explicit: the same wherever it is inlined) */
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
        for (; i < k; i++) { /* fmaf: the same rounding in every function (not the compiler's choice) */
            s0 = fmaf(w0[i], x[i], s0);
            s1 = fmaf(w1[i], x[i], s1);
            s2 = fmaf(w2[i], x[i], s2);
            s3 = fmaf(w3[i], x[i], s3);
        }
        out[r - r0] = s0;
        out[r - r0 + 1] = s1;
        out[r - r0 + 2] = s2;
        out[r - r0 + 3] = s3;
    }
    for (; r < r1; r++) out[r - r0] = hd_dot_avx2(W + (size_t)r * k, x, k);
}
/* hd_f32_rows_avx2 for two x rows at once (each weight load feeds both): every output
 * element's arithmetic is that function's, in the same order, so the bits are the same. */
HQ_AVX2 static void hd_f32_rows2_avx2(const float *W, int k, const float *x, const float *y, int r0, int r1,
                                      float *ox, float *oy) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w0 = W + (size_t)r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        int i = 0;
        for (; i + 8 <= k; i += 8) {
            const __m256 xv = _mm256_loadu_ps(x + i), yv = _mm256_loadu_ps(y + i);
            const __m256 v0 = _mm256_loadu_ps(w0 + i), v1 = _mm256_loadu_ps(w1 + i);
            const __m256 v2 = _mm256_loadu_ps(w2 + i), v3 = _mm256_loadu_ps(w3 + i);
            a0 = _mm256_fmadd_ps(v0, xv, a0);
            a1 = _mm256_fmadd_ps(v1, xv, a1);
            a2 = _mm256_fmadd_ps(v2, xv, a2);
            a3 = _mm256_fmadd_ps(v3, xv, a3);
            b0 = _mm256_fmadd_ps(v0, yv, b0);
            b1 = _mm256_fmadd_ps(v1, yv, b1);
            b2 = _mm256_fmadd_ps(v2, yv, b2);
            b3 = _mm256_fmadd_ps(v3, yv, b3);
        }
        float s0 = hq_hsum_avx2(a0), s1 = hq_hsum_avx2(a1), s2 = hq_hsum_avx2(a2), s3 = hq_hsum_avx2(a3);
        float t0 = hq_hsum_avx2(b0), t1 = hq_hsum_avx2(b1), t2 = hq_hsum_avx2(b2), t3 = hq_hsum_avx2(b3);
        for (; i < k; i++) { /* fmaf: the same rounding in every function (not the compiler's choice) */
            s0 = fmaf(w0[i], x[i], s0);
            s1 = fmaf(w1[i], x[i], s1);
            s2 = fmaf(w2[i], x[i], s2);
            s3 = fmaf(w3[i], x[i], s3);
            t0 = fmaf(w0[i], y[i], t0);
            t1 = fmaf(w1[i], y[i], t1);
            t2 = fmaf(w2[i], y[i], t2);
            t3 = fmaf(w3[i], y[i], t3);
        }
        ox[r - r0] = s0;
        ox[r - r0 + 1] = s1;
        ox[r - r0 + 2] = s2;
        ox[r - r0 + 3] = s3;
        oy[r - r0] = t0;
        oy[r - r0 + 1] = t1;
        oy[r - r0 + 2] = t2;
        oy[r - r0 + 3] = t3;
    }
    for (; r < r1; r++) {
        ox[r - r0] = hd_dot_avx2(W + (size_t)r * k, x, k);
        oy[r - r0] = hd_dot_avx2(W + (size_t)r * k, y, k);
    }
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

/* ---- fp32 rows: out [m, n] = x [m, k] . W^T (+ bias) for an fp32 W ---------------------
 * Each output element is computed exactly as the decode step's GEMV computes it (the same
 * function over the same 4-aligned row blocks), so a row's logits have the same bits alone,
 * beside other rows, and in the C decode step: the float LM head of a CPU load runs here
 * (engine.layers.linear.CpuRowsF32). Threads take chunks of weight rows; within a chunk,
 * blocks of 16 weight rows (cache-resident) meet every x row. `call` as hq_matmul's. */
typedef struct {
    const hq_weight *w;
    const float *x;
    float *out;
    int m, isa, chunk_rows, nchunks;
    atomic_int next;
} hd_f32_task;

static void hd_f32_worker(void *p, int worker) {
    (void)worker;
    hd_f32_task *t = (hd_f32_task *)p;
    const hq_weight *w = t->w;
    const float *W = (const float *)w->q;
    const int n = w->n, k = w->k;
    for (;;) {
        const int c = atomic_fetch_add_explicit(&t->next, 1, memory_order_relaxed);
        if (c >= t->nchunks) return;
        const int r0 = c * t->chunk_rows;
        const int r1 = r0 + t->chunk_rows < n ? r0 + t->chunk_rows : n;
        for (int s0 = r0; s0 < r1; s0 += 16) {
            const int s1 = s0 + 16 < r1 ? s0 + 16 : r1;
            for (int mi = 0; mi < t->m; mi++) {
                const float *x = t->x + (size_t)mi * k;
                float *o = t->out + (size_t)mi * n;
#if defined(HQ_HAVE_AVX2_PATH)
                if (t->isa == HQ_ISA_AVX2 && mi + 1 < t->m) {
                    hd_f32_rows2_avx2(W, k, x, x + k, s0, s1, o + s0, o + n + s0);
                    mi++;
                } else if (t->isa == HQ_ISA_AVX2)
                    hd_f32_rows_avx2(W, k, x, s0, s1, o + s0);
                else
#endif
                    for (int r = s0; r < s1; r++) o[r] = hd_dot(W + (size_t)r * k, x, k, t->isa);
            }
            if (w->bias)
                for (int mi = 0; mi < t->m; mi++)
                    for (int r = s0; r < s1; r++) t->out[(size_t)mi * n + r] += w->bias[r];
        }
    }
}

int hd_f32_matmul(const hq_weight *w, const float *x, float *out, int64_t call) {
    const int m = (int)(call & 0x7FFFFFFF);
    int nthreads = (int)((call >> 32) & 0xFF);
    int isa = (int)((call >> 40) & 0xFF);
    if (w->bits != HD_FLOAT32 || w->n <= 0 || w->k <= 0 || !w->q) return HQ_ERR_SHAPE;
    if (m == 0) return HQ_OK;
    isa = hq_pick_isa(isa);
    if (isa < 0) return HQ_ERR_ISA;
    if (nthreads < 1) nthreads = 1;
    hd_f32_task t;
    t.w = w;
    t.x = x;
    t.out = out;
    t.m = m;
    t.isa = isa;
    int rows = w->n / (8 * nthreads); /* as hd_gemv: 16..256 rows, a multiple of 4 */
    rows = rows < 16 ? 16 : rows > 256 ? 256 : rows;
    t.chunk_rows = rows & ~3;
    t.nchunks = (w->n + t.chunk_rows - 1) / t.chunk_rows;
    atomic_init(&t.next, 0);
    hq_parallel(hd_f32_worker, &t, nthreads < t.nchunks ? nthreads : t.nchunks);
    return HQ_OK;
}

/* ---- the float8 e4m3 KV cache (torch.float8_e4m3fn) ------------------------------------
 * Written as engine.layers.attention.to_fp8 does (saturated at +-448, rounded to nearest,
 * ties to even; NaN stays NaN), read through a table of the 256 values (exact in fp32). */
#define HD_E4M3_MAX_HEAD 256 /* the widest head the conversion scratch holds */
/* Every code's value (torch's float8_e4m3fn: bias 7, subnormals below 2^-6, 0x7F/0xFF NaN),
 * written out (tests/engine/test_cpu_decode_step.py checks it against torch). */
static const float hd_e4m3_table[256] = {
    0x0p+0f, 0x1p-9f, 0x1p-8f, 0x1.8p-8f, 0x1p-7f, 0x1.4p-7f, 0x1.8p-7f, 0x1.cp-7f,
    0x1p-6f, 0x1.2p-6f, 0x1.4p-6f, 0x1.6p-6f, 0x1.8p-6f, 0x1.ap-6f, 0x1.cp-6f, 0x1.ep-6f,
    0x1p-5f, 0x1.2p-5f, 0x1.4p-5f, 0x1.6p-5f, 0x1.8p-5f, 0x1.ap-5f, 0x1.cp-5f, 0x1.ep-5f,
    0x1p-4f, 0x1.2p-4f, 0x1.4p-4f, 0x1.6p-4f, 0x1.8p-4f, 0x1.ap-4f, 0x1.cp-4f, 0x1.ep-4f,
    0x1p-3f, 0x1.2p-3f, 0x1.4p-3f, 0x1.6p-3f, 0x1.8p-3f, 0x1.ap-3f, 0x1.cp-3f, 0x1.ep-3f,
    0x1p-2f, 0x1.2p-2f, 0x1.4p-2f, 0x1.6p-2f, 0x1.8p-2f, 0x1.ap-2f, 0x1.cp-2f, 0x1.ep-2f,
    0x1p-1f, 0x1.2p-1f, 0x1.4p-1f, 0x1.6p-1f, 0x1.8p-1f, 0x1.ap-1f, 0x1.cp-1f, 0x1.ep-1f,
    0x1p+0f, 0x1.2p+0f, 0x1.4p+0f, 0x1.6p+0f, 0x1.8p+0f, 0x1.ap+0f, 0x1.cp+0f, 0x1.ep+0f,
    0x1p+1f, 0x1.2p+1f, 0x1.4p+1f, 0x1.6p+1f, 0x1.8p+1f, 0x1.ap+1f, 0x1.cp+1f, 0x1.ep+1f,
    0x1p+2f, 0x1.2p+2f, 0x1.4p+2f, 0x1.6p+2f, 0x1.8p+2f, 0x1.ap+2f, 0x1.cp+2f, 0x1.ep+2f,
    0x1p+3f, 0x1.2p+3f, 0x1.4p+3f, 0x1.6p+3f, 0x1.8p+3f, 0x1.ap+3f, 0x1.cp+3f, 0x1.ep+3f,
    0x1p+4f, 0x1.2p+4f, 0x1.4p+4f, 0x1.6p+4f, 0x1.8p+4f, 0x1.ap+4f, 0x1.cp+4f, 0x1.ep+4f,
    0x1p+5f, 0x1.2p+5f, 0x1.4p+5f, 0x1.6p+5f, 0x1.8p+5f, 0x1.ap+5f, 0x1.cp+5f, 0x1.ep+5f,
    0x1p+6f, 0x1.2p+6f, 0x1.4p+6f, 0x1.6p+6f, 0x1.8p+6f, 0x1.ap+6f, 0x1.cp+6f, 0x1.ep+6f,
    0x1p+7f, 0x1.2p+7f, 0x1.4p+7f, 0x1.6p+7f, 0x1.8p+7f, 0x1.ap+7f, 0x1.cp+7f, 0x1.ep+7f,
    0x1p+8f, 0x1.2p+8f, 0x1.4p+8f, 0x1.6p+8f, 0x1.8p+8f, 0x1.ap+8f, 0x1.cp+8f, NAN,
    -0x0p+0f, -0x1p-9f, -0x1p-8f, -0x1.8p-8f, -0x1p-7f, -0x1.4p-7f, -0x1.8p-7f, -0x1.cp-7f,
    -0x1p-6f, -0x1.2p-6f, -0x1.4p-6f, -0x1.6p-6f, -0x1.8p-6f, -0x1.ap-6f, -0x1.cp-6f, -0x1.ep-6f,
    -0x1p-5f, -0x1.2p-5f, -0x1.4p-5f, -0x1.6p-5f, -0x1.8p-5f, -0x1.ap-5f, -0x1.cp-5f, -0x1.ep-5f,
    -0x1p-4f, -0x1.2p-4f, -0x1.4p-4f, -0x1.6p-4f, -0x1.8p-4f, -0x1.ap-4f, -0x1.cp-4f, -0x1.ep-4f,
    -0x1p-3f, -0x1.2p-3f, -0x1.4p-3f, -0x1.6p-3f, -0x1.8p-3f, -0x1.ap-3f, -0x1.cp-3f, -0x1.ep-3f,
    -0x1p-2f, -0x1.2p-2f, -0x1.4p-2f, -0x1.6p-2f, -0x1.8p-2f, -0x1.ap-2f, -0x1.cp-2f, -0x1.ep-2f,
    -0x1p-1f, -0x1.2p-1f, -0x1.4p-1f, -0x1.6p-1f, -0x1.8p-1f, -0x1.ap-1f, -0x1.cp-1f, -0x1.ep-1f,
    -0x1p+0f, -0x1.2p+0f, -0x1.4p+0f, -0x1.6p+0f, -0x1.8p+0f, -0x1.ap+0f, -0x1.cp+0f, -0x1.ep+0f,
    -0x1p+1f, -0x1.2p+1f, -0x1.4p+1f, -0x1.6p+1f, -0x1.8p+1f, -0x1.ap+1f, -0x1.cp+1f, -0x1.ep+1f,
    -0x1p+2f, -0x1.2p+2f, -0x1.4p+2f, -0x1.6p+2f, -0x1.8p+2f, -0x1.ap+2f, -0x1.cp+2f, -0x1.ep+2f,
    -0x1p+3f, -0x1.2p+3f, -0x1.4p+3f, -0x1.6p+3f, -0x1.8p+3f, -0x1.ap+3f, -0x1.cp+3f, -0x1.ep+3f,
    -0x1p+4f, -0x1.2p+4f, -0x1.4p+4f, -0x1.6p+4f, -0x1.8p+4f, -0x1.ap+4f, -0x1.cp+4f, -0x1.ep+4f,
    -0x1p+5f, -0x1.2p+5f, -0x1.4p+5f, -0x1.6p+5f, -0x1.8p+5f, -0x1.ap+5f, -0x1.cp+5f, -0x1.ep+5f,
    -0x1p+6f, -0x1.2p+6f, -0x1.4p+6f, -0x1.6p+6f, -0x1.8p+6f, -0x1.ap+6f, -0x1.cp+6f, -0x1.ep+6f,
    -0x1p+7f, -0x1.2p+7f, -0x1.4p+7f, -0x1.6p+7f, -0x1.8p+7f, -0x1.ap+7f, -0x1.cp+7f, -0x1.ep+7f,
    -0x1p+8f, -0x1.2p+8f, -0x1.4p+8f, -0x1.6p+8f, -0x1.8p+8f, -0x1.ap+8f, -0x1.cp+8f, -NAN,
};

static uint8_t hd_e4m3_encode(float x) {
    const uint8_t sign = signbit(x) ? 0x80 : 0;
    if (x != x) return sign | 0x7F;
    const float a = fabsf(x);
    if (a >= 448.0f) return sign | 0x7E;
    if (a == 0.0f) return sign;
    int e;
    frexpf(a, &e); /* a = f * 2^e, f in [0.5, 1): a's binade is 2^(e - 1) */
    int E = e - 1 < -6 ? -6 : e - 1;
    float r = nearbyintf(ldexpf(a, 3 - E)); /* a in quanta of 2^(E - 3), to nearest, ties even */
    if (E == -6 && r < 8.0f) return sign | (uint8_t)r; /* subnormal (or zero) */
    if (r >= 16.0f) { /* carried into the next binade */
        r = 8.0f;
        E += 1;
    }
    if (E + 7 > 15 || (E + 7 == 15 && r > 14.0f)) return sign | 0x7E;
    return sign | (uint8_t)((E + 7) << 3) | (uint8_t)((int)r - 8);
}

/* For tests (hearth_kernels/cpu_decode.py): the codes of n floats, and the values of n codes. */
void hd_e4m3_encode_n(const float *x, uint8_t *out, int n) {
    for (int i = 0; i < n; i++) out[i] = hd_e4m3_encode(x[i]);
}

void hd_e4m3_decode_n(const uint8_t *b, float *out, int n) {
    for (int i = 0; i < n; i++) out[i] = hd_e4m3_table[b[i]];
}

#include "hq_decode_attn.h"

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

/* A projection of n rows: the GEMV for one (no allocation), else hq_matmul / hd_f32_matmul,
 * whose rows have the GEMV's bits (the 4-row tiles and pairs compute each row as it does). */
static int hd_project(const hq_weight *w, const float *x, int n, float *out, hd_act_buf *buf, int isa, int threads) {
    if (n == 1) {
        hd_gemv(w, x, out, buf, isa, threads);
        return HQ_OK;
    }
    const int64_t call = (int64_t)n | ((int64_t)(threads < 255 ? threads : 255) << 32) | ((int64_t)isa << 40);
    return w->bits == HD_FLOAT32 ? hd_f32_matmul(w, x, out, call) : hq_matmul(w, x, out, call);
}

/* Attention's split for a context of len keys: short contexts one unit per KV head on the
 * calling thread (µs of work, less than waking a helper); long ones about 4 units a thread. */
static void hd_attn_split(const hd_model *m, int len, int threads, int *at_threads, int *nchunks, int *chunk) {
    *at_threads = 1;
    *nchunks = 1;
    *chunk = len;
    if ((size_t)len * m->heads >= (size_t)m->split_min && threads > 1) {
        *at_threads = threads;
        *nchunks = (4 * threads + m->kv_heads - 1) / m->kv_heads;
        *chunk = (len + *nchunks - 1) / *nchunks;
        *chunk = (*chunk + 7) & ~7;
        *nchunks = (len + *chunk - 1) / *chunk;
    }
}

/* The decode steps of n sequences at once: row i is token tokens[i] at position
 * positions[i] of the sequence whose blocks are tables[i * table_stride ..] (ntables[i] of
 * them); its K/V written at its slot, attention over its positions 0..pos (or the last
 * `window`); logits [n, vocab] fp32 out. The projections read each weight once for all n
 * rows, and every row's logits have the bits hd_decode_step gives it alone (the same
 * functions on each row: the GEMV's 4-row tiles and fp32 pairs compute a row as the GEMV
 * does; attention, norms and RoPE run row by row). Rows must be of different sequences.
 * `threads` <= 1: the calling thread only. Returns HQ_OK, HQ_ERR_SHAPE (a bad token,
 * position or table) or HQ_ERR_NOMEM. */
int hd_decode_rows(const hd_model *m, int n, const int32_t *tokens, const int32_t *positions, const int32_t *tables,
                   int table_stride, const int32_t *ntables, float *logits, int threads) {
    if (n <= 0) return n == 0 ? HQ_OK : HQ_ERR_SHAPE;
    if (m->kv_fp8 && m->head_dim > HD_E4M3_MAX_HEAD) return HQ_ERR_SHAPE;
    int isa = hq_pick_isa(m->isa);
    if (isa < 0) return HQ_ERR_ISA;
    if (threads < 1) threads = 1;
    const int H = m->hidden, hd = m->head_dim, qsize = m->heads * hd, kvsize = m->kv_heads * hd;
    const int group = m->heads / m->kv_heads, qkv_w = qsize + 2 * kvsize;
    size_t n_scores = 0, n_partial = 0;
    for (int i = 0; i < n; i++) {
        const int token = tokens[i], pos = positions[i];
        const int32_t *table = tables + (size_t)i * table_stride;
        if (token < 0 || token >= m->vocab || pos < 0 || pos >= m->max_positions || pos / m->block_size >= ntables[i] ||
            ntables[i] > table_stride)
            return HQ_ERR_SHAPE;
        for (int b = 0; b <= pos / m->block_size; b++)
            if (table[b] < 0 || table[b] >= m->num_blocks) return HQ_ERR_SHAPE;
        const int lo = m->window > 0 && pos - m->window + 1 > 0 ? pos - m->window + 1 : 0, len = pos - lo + 1;
        int at_threads, nchunks, chunk;
        hd_attn_split(m, len, threads, &at_threads, &nchunks, &chunk);
        const size_t sc = (size_t)at_threads * group * (chunk + 8), pa = (size_t)m->kv_heads * nchunks * group * (hd + 2);
        n_scores = sc > n_scores ? sc : n_scores;
        n_partial = pa > n_partial ? pa : n_partial;
    }
    int widest = H > 2 * m->inter ? H : 2 * m->inter;
    widest = (widest > qsize ? widest : qsize) + 64;
    const size_t per_row = (size_t)4 * H + qkv_w + qsize + 2 * (size_t)m->inter + m->inter;
    const size_t floats = per_row * n + n_scores + n_partial + 4 * ((size_t)widest / HQ_BLOCK + 1) + 64;
    char *mem = (char *)malloc(sizeof(float) * floats + (size_t)widest + 64);
    if (!mem) return HQ_ERR_NOMEM;
    /* [n, width] each: the residual, the normed rows, a projection's output, q|k|v, ... */
    float *res = (float *)mem, *h = res + (size_t)n * H, *tmp = h + (size_t)n * H, *qkv = tmp + (size_t)n * 2 * H;
    float *attn = qkv + (size_t)n * qkv_w, *gu = attn + (size_t)n * qsize, *act = gu + (size_t)n * 2 * m->inter;
    float *scores = act + (size_t)n * m->inter, *partial = scores + n_scores;
    hd_act_buf ab;
    ab.d = partial + n_partial;
    ab.gs = ab.d + widest / HQ_BLOCK + 1;
    ab.isum = (int32_t *)(ab.gs + 2 * (widest / HQ_BLOCK + 1)); /* (groups of 16: two sums a block) */
    ab.q = (int8_t *)(ab.isum + widest / HQ_BLOCK + 1);
    const size_t plane = (size_t)m->num_blocks * m->block_size * kvsize;
    int rc = HQ_OK;

    for (int i = 0; i < n; i++) hd_embed(&m->embed, tokens[i], isa, res + (size_t)i * H);
    for (int l = 0; l < m->layers && rc == HQ_OK; l++) {
        const hd_layer *L = &m->layer[l];
        for (int i = 0; i < n; i++) hd_rmsnorm(res + (size_t)i * H, L->input_norm, m->eps, H, h + (size_t)i * H);
        if ((rc = hd_project(&L->qkv, h, n, qkv, &ab, isa, threads)) != HQ_OK) break;
        for (int i = 0; i < n; i++) {
            const int pos = positions[i];
            const int32_t *table = tables + (size_t)i * table_stride;
            float *q = qkv + (size_t)i * qkv_w, *k = q + qsize, *v = k + kvsize;
            if (L->q_norm) /* (in place: each element is read before it is written) */
                for (int j = 0; j < m->heads; j++) hd_rmsnorm(q + (size_t)j * hd, L->q_norm, m->eps, hd, q + (size_t)j * hd);
            if (L->k_norm)
                for (int j = 0; j < m->kv_heads; j++) hd_rmsnorm(k + (size_t)j * hd, L->k_norm, m->eps, hd, k + (size_t)j * hd);
            const float *cos = m->cos + (size_t)pos * hd, *sin = m->sin + (size_t)pos * hd;
            hd_rope(q, m->heads, hd, cos, sin);
            hd_rope(k, m->kv_heads, hd, cos, sin);
            const size_t at_slot = ((size_t)table[pos / m->block_size] * m->block_size + pos % m->block_size) * kvsize;
            if (m->kv_fp8) {
                uint8_t *slot = (uint8_t *)L->kv + at_slot;
                for (int j = 0; j < kvsize; j++) {
                    slot[j] = hd_e4m3_encode(k[j]);
                    slot[plane + j] = hd_e4m3_encode(v[j]);
                }
            } else {
                float *slot = (float *)L->kv + at_slot;
                memcpy(slot, k, sizeof(float) * kvsize);
                memcpy(slot + plane, v, sizeof(float) * kvsize);
            }
            const int lo = m->window > 0 && pos - m->window + 1 > 0 ? pos - m->window + 1 : 0, len = pos - lo + 1;
            int at_threads, nchunks, chunk;
            hd_attn_split(m, len, threads, &at_threads, &nchunks, &chunk);
            hd_attn_task at;
            at.m = m;
            at.q = q;
            at.kv = (const char *)L->kv;
            at.esize = m->kv_fp8 ? 1 : sizeof(float);
            at.table = table;
            at.partial = partial;
            at.scores = scores;
            at.lo = lo;
            at.len = len;
            at.chunk = chunk;
            at.nchunks = nchunks;
            at.nunits = m->kv_heads * nchunks;
            at.isa = isa;
            atomic_init(&at.next, 0);
            hq_parallel(hd_attn_worker, &at, at_threads < at.nunits ? at_threads : at.nunits);
            hd_attn_merge(&at, attn + (size_t)i * qsize);
        }
        if ((rc = hd_project(&L->o, attn, n, tmp, &ab, isa, threads)) != HQ_OK) break;
        for (size_t j = 0; j < (size_t)n * H; j++) res[j] = tmp[j] + res[j];
        for (int i = 0; i < n; i++) hd_rmsnorm(res + (size_t)i * H, L->post_norm, m->eps, H, h + (size_t)i * H);
        if ((rc = hd_project(&L->gate_up, h, n, gu, &ab, isa, threads)) != HQ_OK) break;
        for (int i = 0; i < n; i++)
            hd_silu_mul(gu + (size_t)i * 2 * m->inter, m->inter, act + (size_t)i * m->inter, isa);
        if ((rc = hd_project(&L->down, act, n, tmp, &ab, isa, threads)) != HQ_OK) break;
        for (size_t j = 0; j < (size_t)n * H; j++) res[j] = tmp[j] + res[j];
    }
    if (rc == HQ_OK) {
        for (int i = 0; i < n; i++) hd_rmsnorm(res + (size_t)i * H, m->final_norm, m->eps, H, h + (size_t)i * H);
        rc = hd_project(&m->head, h, n, logits, &ab, isa, threads);
    }
    free(mem);
    return rc;
}

/* One decode step of one sequence: token `token` at position `pos` (its K/V written at
 * block table[pos / block_size], offset pos % block_size; attention over positions
 * 0..pos, or the last `window`), logits [vocab] fp32 out: hd_decode_rows of one row. */
int hd_decode_step(const hd_model *m, int token, int pos, const int32_t *table, int ntable, float *logits,
                   int threads) {
    const int32_t t = token, p = pos, nt = ntable;
    return hd_decode_rows(m, 1, &t, &p, table, ntable, &nt, logits, threads);
}

#endif
