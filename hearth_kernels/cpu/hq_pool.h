/* A tiny persistent thread pool for µs-scale parallel calls (one matmul per call).
 *
 * Why not OpenMP: torch's wheels ship their own libgomp; a second OpenMP runtime in the
 * process would start a second set of spinning threads. Why not a fork/join per call:
 * creating threads costs ~50 µs, longer than a whole decode matmul.
 *
 * The calling thread is worker 0 and always takes part. Idle workers spin for a short
 * while (HEARTH_CPU_SPIN_US or hq_set_spin_us, default 100 µs, yielding the core to any
 * other runnable thread as they go) so back-to-back matmuls of one decode step start
 * without a wake-up, then sleep on a condition variable so an idle app burns no CPU.
 * Work inside a call is handed out in chunks through an atomic counter, and a helper
 * joins a call only while it is open: one that wakes late finds the call done (the
 * caller took its chunks) and goes back to waiting, so the caller never waits for a
 * sleeping helper. It does wait for a helper that the OS preempts in the middle of a
 * chunk (a busy shared machine): measure 1 against 2 threads there. pthread_atfork
 * resets the pool in a forked child (its threads are gone).
 */
#ifndef HQ_POOL_H
#define HQ_POOL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define HQ_MAX_THREADS 64

typedef void (*hq_task_fn)(void *arg, int worker);

static struct {
    pthread_mutex_t lock;      /* guards sleeping workers' wait */
    pthread_cond_t wake;
    pthread_mutex_t call_lock; /* one parallel call at a time (several Python threads may call) */
    atomic_uint generation;    /* bumped once per parallel call */
    atomic_uint state;         /* (generation & 0xFFFFFF) << 8 | closed << 7 | helpers joined */
    atomic_int sleeping;       /* workers blocked on `wake` */
    atomic_int finished;       /* helpers done with the current call */
    int started;               /* helper threads alive */
    atomic_int active;         /* at most this many helpers join the current call */
    hq_task_fn fn;
    void *arg;
} hq_pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .call_lock = PTHREAD_MUTEX_INITIALIZER};

#define HQ_CLOSED 0x80u
#define HQ_JOINED 0x7Fu

static atomic_llong hq_spin_ns = 100000; /* how long an idle helper spins before sleeping */
static atomic_int hq_spin_set = 0;          /* hq_set_spin_us was called: the env var no longer applies */

static inline void hq_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline long long hq_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Join call `gen` if it is still open and wants more helpers; returns the worker id or 0. */
static int hq_try_join(unsigned gen) {
    unsigned s = atomic_load(&hq_pool.state);
    for (;;) {
        if ((s >> 8) != (gen & 0xFFFFFFu) || (s & HQ_CLOSED)) return 0;
        if ((int)(s & HQ_JOINED) >= atomic_load_explicit(&hq_pool.active, memory_order_relaxed)) return 0;
        if (atomic_compare_exchange_weak(&hq_pool.state, &s, s + 1)) return (int)(s & HQ_JOINED) + 1;
    }
}

static void *hq_worker_main(void *unused) {
    (void)unused;
    unsigned seen = atomic_load(&hq_pool.generation);
    for (;;) {
        /* Spin first: the next matmul of a decode step usually comes within µs. */
        long long deadline = hq_now_ns() + atomic_load_explicit(&hq_spin_ns, memory_order_relaxed);
        int spins = 0;
        while (atomic_load_explicit(&hq_pool.generation, memory_order_acquire) == seen) {
            hq_cpu_relax();
            if (++spins == 128) {
                spins = 0;
                if (hq_now_ns() > deadline) break;
                /* Polite spinning: between our matmuls torch runs its own ops (with its own
                   threads); a runnable thread waiting for this core gets it at once. */
                sched_yield();
            }
        }
        if (atomic_load(&hq_pool.generation) == seen) {
            pthread_mutex_lock(&hq_pool.lock);
            atomic_fetch_add(&hq_pool.sleeping, 1);
            /* seq_cst: the caller bumps `generation` then reads `sleeping`; we do the
               reverse, so one of us sees the other and no wake-up is lost. */
            while (atomic_load(&hq_pool.generation) == seen)
                pthread_cond_wait(&hq_pool.wake, &hq_pool.lock);
            atomic_fetch_sub(&hq_pool.sleeping, 1);
            pthread_mutex_unlock(&hq_pool.lock);
        }
        seen = atomic_load(&hq_pool.generation);
        /* A helper that woke late finds the call closed (the caller did the work) and
           goes back to waiting: the caller never waits for a sleeping helper. */
        int id = hq_try_join(seen);
        if (id) {
            hq_pool.fn(hq_pool.arg, id);
            atomic_fetch_add_explicit(&hq_pool.finished, 1, memory_order_release);
        }
    }
    return NULL;
}

static void hq_pool_after_fork(void) {
    /* The child has only the forking thread: start afresh. */
    pthread_mutex_init(&hq_pool.lock, NULL);
    pthread_cond_init(&hq_pool.wake, NULL);
    pthread_mutex_init(&hq_pool.call_lock, NULL);
    atomic_store(&hq_pool.sleeping, 0);
    hq_pool.started = 0;
}

/* Start helper threads up to `want`; returns how many exist. */
static int hq_pool_grow(int want) {
    static int configured = 0;
    if (want > HQ_MAX_THREADS - 1) want = HQ_MAX_THREADS - 1;
    if (!configured) {
        const char *s = getenv("HEARTH_CPU_SPIN_US");
        if (s && !hq_spin_set) atomic_store(&hq_spin_ns, atoll(s) * 1000LL);
        pthread_atfork(NULL, NULL, hq_pool_after_fork);
        configured = 1;
    }
    while (hq_pool.started < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, hq_worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* run with what we have */
        hq_pool.started++;
    }
    return hq_pool.started;
}

/* Run fn(arg, w) on up to `nthreads` workers (w = 0 on the calling thread, which always
   runs it); fn must share out its work dynamically (any worker may find none left).
   Returns when every worker that joined is done. */
static void hq_parallel(hq_task_fn fn, void *arg, int nthreads) {
    if (nthreads <= 1) {
        fn(arg, 0);
        return;
    }
    pthread_mutex_lock(&hq_pool.call_lock);
    int helpers = hq_pool_grow(nthreads - 1);
    if (helpers > nthreads - 1) helpers = nthreads - 1;
    hq_pool.fn = fn;
    hq_pool.arg = arg;
    atomic_store_explicit(&hq_pool.active, helpers, memory_order_relaxed);
    atomic_store(&hq_pool.finished, 0);
    unsigned gen = atomic_load(&hq_pool.generation) + 1;
    atomic_store(&hq_pool.state, (gen & 0xFFFFFFu) << 8);
    atomic_store(&hq_pool.generation, gen); /* seq_cst, see hq_worker_main */
    if (atomic_load(&hq_pool.sleeping) > 0) {
        pthread_mutex_lock(&hq_pool.lock);
        pthread_cond_broadcast(&hq_pool.wake);
        pthread_mutex_unlock(&hq_pool.lock);
    }
    fn(arg, 0);
    unsigned joined = atomic_fetch_or(&hq_pool.state, HQ_CLOSED) & HQ_JOINED;
    while ((unsigned)atomic_load_explicit(&hq_pool.finished, memory_order_acquire) < joined) hq_cpu_relax();
    pthread_mutex_unlock(&hq_pool.call_lock);
}

#endif
