/* critlib's CPU summary of float32 scores: what `critlib.stats.summarize` computes for each step of a tensor
 * (count, float64 sum, M2, min, max, and the counts of the top 16 bits), in one read, on several threads.
 *
 * Loaded through ctypes by critlib/kernels/cpu.py, which compiles it on first use. The result does not depend
 * on the number of threads or on the CPU: each step is summed by one thread in the order written here (eight
 * float64 accumulators, folded pairwise), whether in plain C (`lanes`) or with AVX2 (`lanes_avx2`, chosen at
 * run time), and histogram counts are integers. x*x is exact in float64, so contracting it into a fused
 * multiply-add cannot change a bit either.
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
    int avx2, bad;
} job_t;

static float as_float(int32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

typedef struct {
    double s[8], q[8];
    int32_t lo[8], hi[8]; /* per lane, bit patterns; signed, so that a set sign bit shows as a minimum below 0 */
} acc_t;

/* The histogram is counted into SUBTABLES tables (lane j into table j % SUBTABLES), added up at the end: an
 * increment then seldom waits on the one before it to the same counter. */
#ifndef SUBTABLES
#define SUBTABLES 4
#endif

/* x[0:len] (len a multiple of 8 and of `block`) into the eight lanes (lane j takes x[8i + j], in order) and
 * the histogram; where `maxima` is given, maxima[b] = the largest of x[b*block .. (b+1)*block). A non-negative
 * float's bit pattern orders like its value, so minima and maxima are taken on the bits. */
static void lanes(const float *restrict x, int64_t len, int64_t block, float *restrict maxima, acc_t *restrict acc,
                  uint32_t *restrict counts) {
    const uint32_t *bits = (const uint32_t *)x;
    acc_t c = *acc, *a = &c; /* a local: kept in registers */
    for (int64_t b = 0; b < len; b += block) {
        int32_t top[8] = {0};
        for (int64_t i = b; i < b + block; i += 8) {
            for (int j = 0; j < 8; j++) {
                double v = x[i + j];
                a->s[j] += v;
                a->q[j] += v * v;
            }
            for (int j = 0; j < 8; j++) {
                int32_t u = (int32_t)bits[i + j];
                a->lo[j] = u < a->lo[j] ? u : a->lo[j];
                top[j] = u > top[j] ? u : top[j];
            }
            for (int j = 0; j < 8; j++)
                counts[(j % SUBTABLES) * N_BINS + ((bits[i + j] >> 16) & (N_BINS - 1))]++;
        }
        int32_t m = 0;
        for (int j = 0; j < 8; j++) {
            m = top[j] > m ? top[j] : m;
            a->hi[j] = top[j] > a->hi[j] ? top[j] : a->hi[j];
        }
        if (maxima)
            memcpy(maxima + b / block, &m, 4);
    }
    *acc = c;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CRITLIB_PORTABLE)
#include <immintrin.h>
#define HAVE_AVX2 1

/* `lanes` with AVX2 where the CPU has it (checked at run time): the same lanes in the same order, so the
 * same bits, about 1.5× as fast as the plain-C lanes on an Intel Xeon. */
__attribute__((target("avx2"))) static void lanes_avx2(const float *restrict x, int64_t len, int64_t block,
                                                       float *restrict maxima, acc_t *restrict a,
                                                       uint32_t *restrict counts) {
    const uint32_t *bits = (const uint32_t *)x;
    __m256d s0 = _mm256_loadu_pd(a->s), s1 = _mm256_loadu_pd(a->s + 4);
    __m256d q0 = _mm256_loadu_pd(a->q), q1 = _mm256_loadu_pd(a->q + 4);
    __m256i lo = _mm256_loadu_si256((const __m256i *)a->lo), hi = _mm256_loadu_si256((const __m256i *)a->hi);
    for (int64_t b = 0; b < len; b += block) {
        __m256i top = _mm256_setzero_si256();
        for (int64_t i = b; i < b + block; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            __m256i u = _mm256_castps_si256(v);
            __m256d v0 = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), v1 = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            s0 = _mm256_add_pd(s0, v0);
            s1 = _mm256_add_pd(s1, v1);
            q0 = _mm256_add_pd(q0, _mm256_mul_pd(v0, v0));
            q1 = _mm256_add_pd(q1, _mm256_mul_pd(v1, v1));
            lo = _mm256_min_epi32(lo, u);
            top = _mm256_max_epi32(top, u);
            for (int j = 0; j < 8; j++)
                counts[(j % SUBTABLES) * N_BINS + ((bits[i + j] >> 16) & (N_BINS - 1))]++;
        }
        hi = _mm256_max_epi32(hi, top);
        if (maxima) {
            __m128i m = _mm_max_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
            m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
            m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
            int32_t r = _mm_cvtsi128_si32(m);
            memcpy(maxima + b / block, &r, 4);
        }
    }
    _mm256_storeu_pd(a->s, s0);
    _mm256_storeu_pd(a->s + 4, s1);
    _mm256_storeu_pd(a->q, q0);
    _mm256_storeu_pd(a->q + 4, q1);
    _mm256_storeu_si256((__m256i *)a->lo, lo);
    _mm256_storeu_si256((__m256i *)a->hi, hi);
}
#endif

/* One step of n scores: its row, its counts, and (where `maxima` is given) the maxima of its blocks. */
static void one_step(const float *x, int64_t n, int64_t block, double *row, float *maxima, uint32_t *counts,
                     int avx2, int *bad) {
    const uint32_t *bits = (const uint32_t *)x;
    acc_t a;
    memset(&a, 0, sizeof a);
    for (int j = 0; j < 8; j++)
        a.lo[j] = INT32_MAX;
    /* the whole blocks (with their maxima), then the rest in eights: the same lanes with or without maxima */
    int64_t full = maxima ? n / block * block : 0, whole = n / 8 * 8;
    void (*run)(const float *, int64_t, int64_t, float *, acc_t *, uint32_t *) = lanes;
#ifdef HAVE_AVX2
    if (avx2)
        run = lanes_avx2;
#endif
    (void)avx2;
    run(x, full, block, maxima, &a, counts);
    run(x + full, whole - full, 8, NULL, &a, counts);
    double sum = ((a.s[0] + a.s[1]) + (a.s[2] + a.s[3])) + ((a.s[4] + a.s[5]) + (a.s[6] + a.s[7]));
    double sq = ((a.q[0] + a.q[1]) + (a.q[2] + a.q[3])) + ((a.q[4] + a.q[5]) + (a.q[6] + a.q[7]));
    int32_t lo = a.lo[0], hi = a.hi[0], last = 0;
    for (int j = 1; j < 8; j++) {
        lo = a.lo[j] < lo ? a.lo[j] : lo;
        hi = a.hi[j] > hi ? a.hi[j] : hi;
    }
    for (int64_t i = whole; i < n; i++) { /* the last, fewer than 8 scores */
        double v = x[i];
        int32_t u = (int32_t)bits[i];
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
    if (maxima && full < n) { /* the last, partial block */
        for (int64_t i = full; i < n; i++)
            last = (int32_t)bits[i] > last ? (int32_t)bits[i] : last;
        memcpy(maxima + full / block, &last, 4);
    }
    double m2 = sq - sum * sum / (double)n;
    row[0] = (double)n;
    row[1] = sum;
    row[2] = m2 > 0 ? m2 : 0;
    row[3] = as_float(lo);
    row[4] = as_float(hi);
}

static void fold(uint32_t *counts, int64_t *hist) {
    for (int t = 0; t < SUBTABLES; t++)
        for (int b = 0; b < N_BINS; b++)
            hist[b] += counts[t * N_BINS + b];
    memset(counts, 0, SUBTABLES * N_BINS * sizeof(uint32_t));
}

static void *work(void *arg) {
    job_t *job = arg;
    uint32_t *counts = calloc(SUBTABLES * N_BINS, sizeof(uint32_t));
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
                 job->maxima ? job->maxima + start / job->block : NULL, counts, job->avx2, &job->bad);
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

/* 1 where the AVX2 lanes run (built for x86-64, on a CPU that has AVX2), else 0. */
int critlib_avx2(void) {
#ifdef HAVE_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}

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
    int avx2 = critlib_avx2();
    job_t jobs[MAX_THREADS];
    int64_t *own = calloc((size_t)threads * N_BINS, sizeof(int64_t));
    if (!own)
        return 2;
    for (int t = 0; t < threads; t++)
        jobs[t] = (job_t){x, n, step, block, steps * t / threads, steps * (t + 1) / threads, rows, maxima,
                          own + (size_t)t * N_BINS, avx2, 0};
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
 * their order, so that what is summed from them is summed in the same order as by torch's path. One read:
 * each thread copies the kept scores of its steps (a contiguous range) into a buffer of its own; the buffers
 * are then joined in order. */
typedef struct {
    const uint32_t *bits;
    int64_t start, end; /* this thread's scores */
    const uint8_t *keep;
    float *buf;
    int64_t count, capacity;
    int bad;
} kept_t;

static void *kept_work(void *arg) {
    kept_t *job = arg;
    const uint32_t *b = job->bits;
    for (int64_t i = job->start; i < job->end; i++)
        if (job->keep[(b[i] >> 16) & (N_BINS - 1)]) { /* a branch: a few scores in a hundred are kept */
            if (job->count == job->capacity) {
                int64_t capacity = job->capacity ? 2 * job->capacity : 4096;
                float *grown = realloc(job->buf, (size_t)capacity * sizeof(float));
                if (!grown) {
                    job->bad = 2;
                    return NULL;
                }
                job->buf = grown;
                job->capacity = capacity;
            }
            memcpy(job->buf + job->count++, &b[i], 4);
        }
    return NULL;
}

/* *out = a buffer (to be given to critlib_free) of the *count kept scores of x[0:n], in order; the work is
 * shared among `threads` threads in whole steps of `step` scores. Returns 0, or 2 when memory or a thread
 * could not be had (*out is then NULL). */
int critlib_kept(const float *x, int64_t n, int64_t step, const uint8_t *keep, int threads, float **out,
                 int64_t *count) {
    int64_t steps = (n + step - 1) / step;
    threads = thread_count(threads, steps);
    kept_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        int64_t start = steps * t / threads * step, end = steps * (t + 1) / threads * step;
        jobs[t] = (kept_t){(const uint32_t *)x, start, end < n ? end : n, keep, NULL, 0, 0, 0};
    }
    int status = run_jobs(kept_work, jobs, sizeof(kept_t), threads);
    int64_t total = 0;
    for (int t = 0; t < threads; t++) {
        status = status ? status : jobs[t].bad;
        total += jobs[t].count;
    }
    float *all = status ? NULL : malloc((size_t)(total ? total : 1) * sizeof(float));
    if (!status && !all)
        status = 2;
    int64_t at = 0;
    for (int t = 0; t < threads; t++) {
        if (all && jobs[t].count)
            memcpy(all + at, jobs[t].buf, (size_t)jobs[t].count * sizeof(float));
        at += jobs[t].count;
        free(jobs[t].buf);
    }
    *out = all;
    *count = all ? total : 0;
    return status;
}

void critlib_free(void *p) {
    free(p);
}

/* Pass 2's counts of one group's kept scores x[0:n], in order, on one thread: where row = slot[b] < rows,
 * fine[row << 16 | lo] += 1; where b >= floor, high[b] += the sum of those scores in bin b (b: a score's top 16
 * bits, lo: its low 16). Each bin's scores are added in index order starting from 0.0, then to high[b], as
 * `high += torch.bincount(..., weights=)` adds them, so the sums are the same bits. Returns 0; 1 when a score is
 * negative (its bin would lie outside slot); 2 when memory could not be had. */
int critlib_count_kept(const float *x, int64_t n, const int64_t *slot, int64_t rows, int64_t floor, int64_t *fine,
                       double *high) {
    const uint32_t *bits = (const uint32_t *)x;
    for (int64_t i = 0; i < n; i++)
        if (bits[i] >> 31)
            return 1;
    double *sums = calloc(N_BINS, sizeof(double));
    if (!sums)
        return 2;
    for (int64_t i = 0; i < n; i++) {
        uint32_t b = bits[i] >> 16;
        int64_t row = slot[b];
        if (row < rows)
            fine[(row << 16) | (bits[i] & 0xFFFF)]++;
        if ((int64_t)b >= floor)
            sums[b] += x[i];
    }
    for (int64_t b = floor < 0 ? 0 : floor; b < N_BINS; b++)
        high[b] += sums[b];
    free(sums);
    return 0;
}
