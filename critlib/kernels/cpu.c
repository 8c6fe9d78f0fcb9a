/* critlib's CPU summary of float32 scores: what `critlib.stats.summarize` computes for each step of a tensor
 * (count, float64 sum, M2, min, max, and the counts of the top 16 bits), in one read, on several threads.
 *
 * Loaded through ctypes by critlib/kernels/cpu.py, which compiles it on first use. The result does not depend
 * on the number of threads or on the CPU: each step is summed by one thread in the order written here (eight
 * float64 accumulators, folded pairwise), and histogram counts are integers. x*x is exact in float64, so
 * contracting it into a fused multiply-add cannot change a bit either.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define N_BINS 32768
#define MAX_THREADS 256
#ifndef FOLD_EVERY /* a thread's 32-bit counters are folded before they could overflow */
#define FOLD_EVERY ((int64_t)1 << 31)
#endif
#define FINITE_LIMIT 0x7F800000      /* bit patterns at or above: inf, NaN, or the sign bit set (their bins
                                       * are masked into range, then the whole result is refused) */

typedef struct {
    const float *x;
    int64_t n, step, block, first, last; /* this thread's steps: [first, last) */
    double *rows;
    float *maxima;                       /* NULL, or the maximum of every block of `block` scores */
    int64_t *hist;                       /* N_BINS counters of its own */
    int bad;
} job_t;

typedef struct {
    double s[8], q[8];
    int32_t lo[8], hi[8]; /* per lane; signed, so that a set sign bit shows as a minimum below 0 */
} acc_t;

/* Eight scores into the eight lanes; `top` keeps each lane's largest bit pattern of the current block. */
static inline void eight(const float *x, acc_t *a, int32_t *top, uint32_t *counts) {
    const int32_t *bits = (const int32_t *)x;
    for (int j = 0; j < 8; j++) {
        double v = x[j];
        a->s[j] += v;
        a->q[j] += v * v;
    }
    for (int j = 0; j < 8; j++) {
        int32_t u = bits[j];
        a->lo[j] = u < a->lo[j] ? u : a->lo[j];
        top[j] = u > top[j] ? u : top[j];
    }
    for (int j = 0; j < 8; j++)
        counts[((uint32_t)bits[j] >> 16) & (N_BINS - 1)]++;
}

static float as_float(int32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static int32_t lane_max(const int32_t *v) {
    int32_t m = v[0];
    for (int j = 1; j < 8; j++)
        m = v[j] > m ? v[j] : m;
    return m;
}

/* One step of n scores: its row, its counts, and (where `maxima` is given) the maxima of its blocks; a
 * non-negative float's bit pattern orders like its value, so maxima and min/max are taken on the bits. */
static void one_step(const float *x, int64_t n, int64_t block, double *row, float *maxima, uint32_t *counts,
                     int *bad) {
    const int32_t *bits = (const int32_t *)x;
    acc_t a = {{0}, {0}, {0}, {0}};
    int32_t top[8];
    for (int j = 0; j < 8; j++) {
        a.lo[j] = INT32_MAX;
        a.hi[j] = top[j] = INT32_MIN;
    }
    int64_t i = 0;
    if (maxima)
        for (int64_t b = 0; b < n / block; b++) {
            for (int64_t end = i + block; i < end; i += 8)
                eight(x + i, &a, top, counts);
            maxima[b] = as_float(lane_max(top));
            for (int j = 0; j < 8; j++) {
                a.hi[j] = top[j] > a.hi[j] ? top[j] : a.hi[j];
                top[j] = INT32_MIN;
            }
        }
    for (; i + 8 <= n; i += 8)
        eight(x + i, &a, a.hi, counts);
    double sum = ((a.s[0] + a.s[1]) + (a.s[2] + a.s[3])) + ((a.s[4] + a.s[5]) + (a.s[6] + a.s[7]));
    double sq = ((a.q[0] + a.q[1]) + (a.q[2] + a.q[3])) + ((a.q[4] + a.q[5]) + (a.q[6] + a.q[7]));
    int32_t lo = -lane_max((int32_t[8]){-a.lo[0], -a.lo[1], -a.lo[2], -a.lo[3], -a.lo[4], -a.lo[5], -a.lo[6],
                                        -a.lo[7]});
    int32_t hi = lane_max(a.hi);
    for (; i < n; i++) {
        double v = x[i];
        int32_t u = bits[i];
        sum += v;
        sq += v * v;
        lo = u < lo ? u : lo;
        hi = u > hi ? u : hi;
        counts[((uint32_t)u >> 16) & (N_BINS - 1)]++;
    }
    if (lo < 0 || hi >= FINITE_LIMIT) { /* the caller falls back to torch, which reports such scores as before */
        *bad = 1;
        return;
    }
    if (maxima && n % block) { /* the tensor's last, partial block */
        int32_t last = 0;
        for (int64_t j = n / block * block; j < n; j++)
            last = bits[j] > last ? bits[j] : last;
        maxima[n / block] = as_float(last);
    }
    double m2 = sq - sum * sum / (double)n;
    row[0] = (double)n;
    row[1] = sum;
    row[2] = m2 > 0 ? m2 : 0;
    row[3] = as_float(lo);
    row[4] = as_float(hi);
}

static void fold(uint32_t *counts, int64_t *hist) {
    for (int b = 0; b < N_BINS; b++)
        hist[b] += counts[b];
    memset(counts, 0, N_BINS * sizeof(uint32_t));
}

static void *work(void *arg) {
    job_t *job = arg;
    uint32_t *counts = calloc(N_BINS, sizeof(uint32_t));
    if (!counts) {
        job->bad = 2;
        return NULL;
    }
    int64_t since_fold = 0;
    for (int64_t c = job->first; c < job->last && !job->bad; c++) {
        int64_t start = c * job->step, n = job->n - start < job->step ? job->n - start : job->step;
        if (since_fold + n >= FOLD_EVERY) {
            fold(counts, job->hist);
            since_fold = 0;
        }
        one_step(job->x + start, n, job->block, job->rows + 5 * c,
                 job->maxima ? job->maxima + start / job->block : NULL, counts, &job->bad);
        since_fold += n;
    }
    fold(counts, job->hist);
    free(counts);
    return NULL;
}

/* How many threads share `steps` steps: `threads`, at most MAX_THREADS and at most one per step. */
static int thread_count(int threads, int64_t steps) {
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > steps)
        threads = (int)steps;
    return threads < 1 ? 1 : threads;
}

/* fn(&jobs[t]) for t < threads (jobs of `size` bytes each), the calling thread among them. Returns 0, or 2
 * when a thread could not be started (the calling thread then runs nothing). Built with OpenMP, the jobs run
 * on the OpenMP threads torch's own kernels use (one libgomp in the process): a thread of their own would
 * share the cores with those threads while they spin after torch's last kernel. */
#ifdef _OPENMP
static int run_jobs(void *(*fn)(void *), void *jobs, size_t size, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++)
        fn((char *)jobs + t * size);
    return 0;
}
#else
static int run_jobs(void *(*fn)(void *), void *jobs, size_t size, int threads) {
    pthread_t ids[MAX_THREADS];
    int started = 1, status = 0;
    for (int t = 1; t < threads; t++, started++)
        if (pthread_create(&ids[t], NULL, fn, (char *)jobs + t * size)) {
            status = 2;
            break;
        }
    if (!status)
        fn(jobs);
    for (int t = 1; t < started; t++)
        pthread_join(ids[t], NULL);
    return status;
}
#endif

/* Summarise x[0:n] in steps of `step` elements: rows[5*c .. 5*c+4] = (count, sum, M2, min, max) of step c,
 * hist[N_BINS] += the counts of every score's top 16 bits, and, where `maxima` is not NULL, maxima[b] = the
 * largest of x[b*block .. (b+1)*block) (`block` a multiple of 8 that divides `step`; the ranking's block
 * maxima, critlib.rank). Returns 0; 1 when a score is negative (or -0.0), infinite or NaN (the outputs are
 * then incomplete); 2 when memory or a thread could not be had; 3 when `block` does not fit `step`. */
int critlib_summarize(const float *x, int64_t n, int64_t step, int threads, double *rows, int64_t *hist,
                      float *maxima, int64_t block) {
    if (maxima && (block <= 0 || block % 8 || step % block))
        return 3;
    int64_t steps = (n + step - 1) / step;
    threads = thread_count(threads, steps);
    job_t jobs[MAX_THREADS];
    int64_t *own = calloc((size_t)threads * N_BINS, sizeof(int64_t));
    if (!own)
        return 2;
    for (int t = 0; t < threads; t++)
        jobs[t] = (job_t){x, n, step, block, steps * t / threads, steps * (t + 1) / threads, rows, maxima,
                          own + (size_t)t * N_BINS, 0};
    int status = run_jobs(work, jobs, sizeof(job_t), threads);
    for (int t = 0; t < threads && !status; t++)
        status = jobs[t].bad;
    if (!status)
        for (int t = 0; t < threads; t++)
            for (int b = 0; b < N_BINS; b++)
                hist[b] += own[(size_t)t * N_BINS + b];
    free(own);
    return status;
}

/* Pass 2 of the statistics keeps the scores whose top-16-bit bin is marked in keep[N_BINS] (1 = keep), in
 * their order, so that what is summed from them is summed in the same order as by torch's path. Two reads:
 * critlib_kept_counts counts each step's kept scores; critlib_kept_write copies them to out, step c starting
 * at offsets[c]. */
typedef struct {
    const uint32_t *bits;
    int64_t n, step, first, last;
    const uint8_t *keep;
    int64_t *offsets; /* counts (first call) or write offsets (second call), one per step */
    float *out;       /* NULL: count only */
} kept_t;

static void *kept_work(void *arg) {
    kept_t *job = arg;
    for (int64_t c = job->first; c < job->last; c++) {
        int64_t start = c * job->step, end = job->n - start < job->step ? job->n : start + job->step;
        const uint32_t *b = job->bits;
        if (job->out) {
            float *o = job->out + job->offsets[c];
            for (int64_t i = start; i < end; i++)
                if (job->keep[(b[i] >> 16) & (N_BINS - 1)]) /* a branch: a few scores in a hundred are kept */
                    memcpy(o++, &b[i], 4);
        } else {
            int64_t count = 0;
            for (int64_t i = start; i < end; i++)
                count += job->keep[(b[i] >> 16) & (N_BINS - 1)];
            job->offsets[c] = count;
        }
    }
    return NULL;
}

static int kept_run(const float *x, int64_t n, int64_t step, const uint8_t *keep, int threads, int64_t *offsets,
                    float *out) {
    int64_t steps = (n + step - 1) / step;
    threads = thread_count(threads, steps);
    kept_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++)
        jobs[t] = (kept_t){(const uint32_t *)x, n, step, steps * t / threads, steps * (t + 1) / threads, keep,
                           offsets, out};
    return run_jobs(kept_work, jobs, sizeof(kept_t), threads);
}

/* counts[c] = how many scores of step c lie in kept bins. Returns 0, or 2 when a thread could not be had. */
int critlib_kept_counts(const float *x, int64_t n, int64_t step, const uint8_t *keep, int threads,
                        int64_t *counts) {
    return kept_run(x, n, step, keep, threads, counts, NULL);
}

/* out[offsets[c] ...] = the kept scores of step c, in order. Returns 0, or 2 when a thread could not be had. */
int critlib_kept_write(const float *x, int64_t n, int64_t step, const uint8_t *keep, int threads,
                       const int64_t *offsets, float *out) {
    return kept_run(x, n, step, keep, threads, (int64_t *)offsets, out);
}
