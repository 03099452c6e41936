/* Hearth's CPU quantized matmul: out [m, n] = x [m, k] . W^T for W in Hearth's canonical
 * int4/int8 group layout (see hq_common.h), fast at batch 1 (decode).
 *
 * Built by hearth_kernels/cpu_quant.py with the system C compiler on first use and loaded with
 * ctypes: plain C, no Python or torch headers, so no ABI coupling. One shared object
 * holds a portable scalar path and an AVX2+FMA+F16C path; hq_best_isa() picks at run time.
 *
 * A call quantizes x once to int8 blocks of 32 (hq_acts), then threads take chunks of
 * output rows from an atomic counter; each chunk runs every activation row over the same
 * weight rows, so for m > 1 the weights are read from memory once and re-read from cache.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "hq_avx2.h"
#include "hq_common.h"
#include "hq_pool.h"
#include "hq_scalar.h"

enum { HQ_ISA_SCALAR = 1, HQ_ISA_AVX2 = 2 };
enum { HQ_OK = 0, HQ_ERR_ISA = 1, HQ_ERR_NOMEM = 2, HQ_ERR_SHAPE = 3 };

#if defined(HQ_HAVE_AVX2_PATH)
#include <cpuid.h>
static int hq_cpu_has_avx2(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && avx && f16c)) return 0;
    unsigned lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6u) != 6u) return 0; /* the OS must save the YMM registers */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 5) & 1;
}
#else
static int hq_cpu_has_avx2(void) { return 0; }
#endif

/* The fastest path this CPU runs (HQ_ISA_AVX2 or HQ_ISA_SCALAR). Cached: in a VM,
   CPUID traps to the hypervisor and can cost ~100 µs, longer than a decode matmul. */
int hq_best_isa(void) {
    static atomic_int best = 0;
    int b = atomic_load_explicit(&best, memory_order_relaxed);
    if (!b) {
        b = hq_cpu_has_avx2() ? HQ_ISA_AVX2 : HQ_ISA_SCALAR;
        atomic_store_explicit(&best, b, memory_order_relaxed);
    }
    return b;
}

static int hq_pick_isa(int isa) {
    if (isa == 0) return hq_best_isa();
    if (isa == HQ_ISA_AVX2 && hq_best_isa() != HQ_ISA_AVX2) return -1;
    return isa;
}

static int hq_check(const hq_weight *w) {
    if ((w->bits != 4 && w->bits != 8) || w->n <= 0 || w->k <= 0 || w->kp % HQ_BLOCK || w->kp < w->k ||
        w->group <= 0 || (w->group % HQ_BLOCK && !HQ_G16(w)) || w->kp % w->group || !w->q || !w->scales)
        return HQ_ERR_SHAPE;
    return HQ_OK;
}

/* How long idle helper threads spin (µs) before they sleep; 0 = sleep at once. */
void hq_set_spin_us(long long us) {
    atomic_store(&hq_spin_ns, us < 0 ? 0 : us * 1000LL);
    hq_spin_set = 1;
}

/* Quantize x [m, k] (row stride k) into acts (buffers sized by the caller); exported for tests. */
int hq_quantize_acts(const float *x, int m, int k, int kp, int group, int isa, int8_t *q, float *d, float *gs,
                     int32_t *isum) {
    isa = hq_pick_isa(isa);
    if (isa < 0) return HQ_ERR_ISA;
    const int nb = kp / HQ_BLOCK, ng = kp / group, bpg = group / HQ_BLOCK;
    for (int i = 0; i < m; i++) {
        int8_t *qi = q + (size_t)i * kp;
        float *di = d + (size_t)i * nb;
        int32_t *si = isum + (size_t)i * nb;
#if defined(HQ_HAVE_AVX2_PATH)
        if (isa == HQ_ISA_AVX2)
            hq_quantize_row_avx2(x + (size_t)i * k, k, kp, qi, di, si);
        else
#endif
            hq_quantize_row_scalar(x + (size_t)i * k, k, kp, qi, di, si);
        for (int g = 0; bpg && g < ng; g++) {
            float s = 0.0f;
            for (int j = 0; j < bpg; j++) s += di[g * bpg + j] * (float)si[g * bpg + j];
            gs[(size_t)i * ng + g] = s;
        }
        if (group == 16) /* each half block's sum (for int8 in groups of 16 with mins) */
            for (int b = 0; b < nb; b++) {
                int32_t lo = 0;
                for (int j = 0; j < 16; j++) lo += qi[(size_t)b * HQ_BLOCK + j];
                gs[(size_t)i * ng + 2 * b] = di[b] * (float)lo;
                gs[(size_t)i * ng + 2 * b + 1] = di[b] * (float)(si[b] - lo);
            }
    }
    return HQ_OK;
}

typedef struct {
    const hq_weight *w;
    const hq_acts *a;
    float *out;
    int isa;
    int chunk_rows;
    int nchunks;
    atomic_int next;
} hq_matmul_task;

static void hq_matmul_worker(void *p, int worker) {
    (void)worker;
    hq_matmul_task *t = (hq_matmul_task *)p;
    const int n = t->w->n;
    float buf[512];
    for (;;) {
        const int c = atomic_fetch_add_explicit(&t->next, 1, memory_order_relaxed);
        if (c >= t->nchunks) return;
        const int r0 = c * t->chunk_rows;
        const int r1 = r0 + t->chunk_rows < n ? r0 + t->chunk_rows : n;
#if defined(HQ_HAVE_AVX2_PATH)
        if (t->isa == HQ_ISA_AVX2 && t->a->m > 1 && !HQ_G16(t->w)) { /* tiles: each weight block read once for 4 rows */
            hq_rows_multi_avx2(t->w, t->a, r0, r1, t->out, (size_t)n);
            if (t->w->bias)
                for (int mi = 0; mi < t->a->m; mi++)
                    for (int r = r0; r < r1; r++) t->out[(size_t)mi * n + r] += t->w->bias[r];
            continue;
        }
#endif
        for (int mi = 0; mi < t->a->m; mi++) {
#if defined(HQ_HAVE_AVX2_PATH)
            if (t->isa == HQ_ISA_AVX2)
                hq_rows_avx2(t->w, t->a, mi, r0, r1, buf);
            else
#endif
                hq_rows_scalar(t->w, t->a, mi, r0, r1, buf);
            float *o = t->out + (size_t)mi * n;
            for (int r = r0; r < r1; r++) o[r] = buf[r - r0] + (t->w->bias ? t->w->bias[r] : 0.0f);
        }
    }
}

/* out [m, n] = x [m, k] . W^T (+ w->bias), x and out fp32 row-major contiguous.
   `call` packs the rest (few ctypes arguments: each costs ~0.4 µs, a decode matmul ~30):
   bits 0..31 m, 32..39 threads (<= 1: the calling thread only), 40..47 isa (0 = best).
   Returns HQ_OK or an error code. */
int hq_matmul(const hq_weight *w, const float *x, float *out, int64_t call) {
    const int m = (int)(call & 0x7FFFFFFF);
    int nthreads = (int)((call >> 32) & 0xFF);
    int isa = (int)((call >> 40) & 0xFF);
    if (hq_check(w) != HQ_OK) return HQ_ERR_SHAPE;
    if (m == 0) return HQ_OK;
    isa = hq_pick_isa(isa);
    if (isa < 0) return HQ_ERR_ISA;
    const int nb = w->kp / HQ_BLOCK, ng = w->kp / w->group;
    /* one allocation for the quantized activations (small: about 1.2 bytes per input) */
    const size_t qbytes = ((size_t)m * w->kp + 63) & ~(size_t)63;
    char *mem = (char *)malloc(qbytes + sizeof(float) * (size_t)m * (2 * nb + ng));
    if (!mem) return HQ_ERR_NOMEM;
    int8_t *q = (int8_t *)mem;
    float *d = (float *)(mem + qbytes);
    int32_t *isum = (int32_t *)(d + (size_t)m * nb);
    float *gs = (float *)(isum + (size_t)m * nb);
    hq_quantize_acts(x, m, w->k, w->kp, w->group, isa, q, d, gs, isum);
    hq_acts a = {m, w->kp, ng, q, d, gs};

    hq_matmul_task t;
    t.w = w;
    t.a = &a;
    t.out = out;
    t.isa = isa;
    if (nthreads < 1) nthreads = 1;
    /* ~8 chunks per thread so a descheduled thread's share is taken over, 16..256 rows
       (a multiple of 4 for the 4-row kernels; at most the 512-float row buffer) */
    int rows = w->n / (8 * nthreads);
    rows = rows < 16 ? 16 : rows > 256 ? 256 : rows;
    rows &= ~3;
    t.chunk_rows = rows;
    t.nchunks = (w->n + rows - 1) / rows;
    atomic_init(&t.next, 0);
    hq_parallel(hq_matmul_worker, &t, nthreads < t.nchunks ? nthreads : t.nchunks);
    free(mem);
    return HQ_OK;
}

typedef struct {
    const hq_weight *w;
    float *out;
    int isa;
    int chunk_rows;
    int nchunks;
    atomic_int next;
} hq_dequant_task;

static void hq_dequant_worker(void *p, int worker) {
    (void)worker;
    hq_dequant_task *t = (hq_dequant_task *)p;
    for (;;) {
        const int c = atomic_fetch_add_explicit(&t->next, 1, memory_order_relaxed);
        if (c >= t->nchunks) return;
        const int r0 = c * t->chunk_rows;
        const int r1 = r0 + t->chunk_rows < t->w->n ? r0 + t->chunk_rows : t->w->n;
        float *o = t->out + (size_t)r0 * t->w->k;
#if defined(HQ_HAVE_AVX2_PATH)
        if (t->isa == HQ_ISA_AVX2)
            hq_dequant_rows_avx2(t->w, r0, r1, o);
        else
#endif
            hq_dequant_rows_scalar(t->w, r0, r1, o);
    }
}

/* out [n, k] fp32 = W (dequantized, padding dropped). */
int hq_dequantize(const hq_weight *w, float *out, int nthreads, int isa) {
    if (hq_check(w) != HQ_OK) return HQ_ERR_SHAPE;
    isa = hq_pick_isa(isa);
    if (isa < 0) return HQ_ERR_ISA;
    hq_dequant_task t;
    t.w = w;
    t.out = out;
    t.isa = isa;
    t.chunk_rows = 64;
    t.nchunks = (w->n + 63) / 64;
    atomic_init(&t.next, 0);
    if (nthreads < 1) nthreads = 1;
    hq_parallel(hq_dequant_worker, &t, nthreads < t.nchunks ? nthreads : t.nchunks);
    return HQ_OK;
}

/* The whole batch-1 decode step (hearth_kernels/cpu_decode.py), in this translation unit so it
   shares the one thread pool and the block-dot kernels above. */
#include "hq_decode.h"
