/* Decode kernels for CPUs: bf16 / int8 GEMV, the routed experts of one MoE layer, one MHA / MLA decode
 * step, RMSNorm, the router, and the vision tower's tanh-GELU.
 *
 * Batch-1 decode reads every activated weight once per token, so it is bound by memory bandwidth; on
 * the 2-core development machine torch's bf16 GEMV streams 45-75 % of the read bandwidth
 * (docs/performance.md). These kernels stream the weights four rows at a time, rows split over torch's
 * OpenMP threads (the extension links the libgomp torch has already loaded).
 *
 * One source, several builds (dsvl2/model/cpu_kernels.py compiles this file once per instruction set
 * and picks the build at run time):
 *   avx512   -DDSVL2_AVX512 -mavx512f/bw/vl/vnni/bf16: the two weight-streaming dot products use
 *            VDPBF16PS (pairs of bf16 products accumulated in fp32) and VPDPWSSD (int8 weights widened
 *            to int16, against int16 activations);
 *   avx2     -mavx2 -mfma -mf16c: everything in plain C that the compiler vectorises (bf16 widened to
 *            fp32 by a shift, FMA accumulation; int8 x int16 products summed in int32 by VPMADDWD);
 *   generic  no -m flag: the same plain C for the baseline ISA (x86-64 SSE2, arm64 NEON).
 * Only dot4() and dot4_i8() have an AVX512 form, and int4's dot4_q4() an AVX2 one (VPMADDUBSW; VPDPBUSD in
 * the avx512 build) beside its plain C; every other line of math is shared by all builds.
 * Plain loops carry `omp simd reduction` so that the compiler may reorder their fp32 sums (vectorise).
 *
 * Rounding follows the reference's rounding points (each projection rounded to bf16, SiLU and the
 * gate product rounded to bf16, expert outputs weighted in fp32 and summed slot by slot), but the
 * dot products accumulate in another order than torch's kernels (and each build in its own order):
 * bf16-close, not bit-identical. That is why the exact path (dsvl2.load(exact=True)) does not use them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifndef PREFETCH_AHEAD
/* Software prefetch of the next group of four rows at the same columns (rows of one matrix are read
 * four at a time, groups in order): 10-13 % more GB/s than a fixed distance along the row, in
 * interleaved A/B runs of GEMV and experts, bf16 and int8 (AVX512 build). */
#define PREFETCH_AHEAD(ld) (4 * (ld))
#endif
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)

#if defined(DSVL2_AVX512)
#define DSVL2_BUILD 2
#elif defined(__AVX2__) && defined(__FMA__)
#define DSVL2_BUILD 1
#else
#define DSVL2_BUILD 0
#endif

/* Which build this is: 0 generic, 1 avx2, 2 avx512 (cpu_kernels.py checks it against the file it loaded). */
int dsvl2_build(void) { return DSVL2_BUILD; }

/* What this CPU can run: bit 0 the avx2 build (AVX2, FMA, F16C), bit 1 the avx512 build (AVX512F/BW/VL,
 * VNNI, BF16). Called from the generic build only, whose own code runs on any CPU of its architecture. */
int dsvl2_cpu_features(void) {
    int f = 0;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) f |= 1;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16"))
        f |= 2;
#endif
    return f;
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's conversion */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline float u32_as_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t load_u32(const uint16_t *p) { /* two bf16 values, unaligned */
    uint32_t u;
    memcpy(&u, p, 4);
    return u;
}

/* sum_i a[i] * b[i] of two bf16 vectors, in fp32. */
static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += bf16_to_f32(a[i]) * bf16_to_f32(b[i]);
    return s;
}

/* acc[i] += p * row[i] (fp32 accumulators, bf16 row). */
static inline void axpy_bf16(float *acc, float p, const uint16_t *row, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) acc[i] += p * bf16_to_f32(row[i]);
}

#define BLOCK 512 /* columns per inner loop of the plain dot products: their prefetch step, and for int8 the
                   * longest int32 sum that cannot overflow (512 * 127 * 32767 < 2^31) */

#if defined(DSVL2_AVX512)
/* Dot products of four weight rows with x (n bf16 values each), accumulated in fp32 by VDPBF16PS. */
static inline void dot4(const uint16_t *w0, const uint16_t *w1, const uint16_t *w2, const uint16_t *w3,
                        const uint16_t *x, int64_t n, int64_t ahead, float out[4]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        PREFETCH(w0 + i + ahead);
        PREFETCH(w1 + i + ahead);
        PREFETCH(w2 + i + ahead);
        PREFETCH(w3 + i + ahead);
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + i), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + i), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + i), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + i), xv);
    }
    if (i < n) {
        __mmask32 m = (__mmask32)((1ull << (n - i)) - 1);
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + i);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w0 + i), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, w1 + i), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(m, w2 + i), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(m, w3 + i), xv);
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
}

/* Dot products of four int8 rows with int16 x (n values), as fp32 (unscaled): VPDPWSSD sums pairs of int16
 * products into 16 int32 lanes, flushed to fp32 every 2048 weights so no lane can overflow (128 products
 * per lane: 128 * 127 * 32767 < 2^31). */
static inline void dot4_i8(const int8_t *w0, const int8_t *w1, const int8_t *w2, const int8_t *w3,
                           const int16_t *x, int64_t n, int64_t ahead, float out[4]) {
    __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps(), f2 = _mm512_setzero_ps(), f3 = _mm512_setzero_ps();
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
#define WIDEN(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define FLUSH()                                                                             \
    do {                                                                                    \
        f0 = _mm512_add_ps(f0, _mm512_cvtepi32_ps(a0)); a0 = _mm512_setzero_si512();        \
        f1 = _mm512_add_ps(f1, _mm512_cvtepi32_ps(a1)); a1 = _mm512_setzero_si512();        \
        f2 = _mm512_add_ps(f2, _mm512_cvtepi32_ps(a2)); a2 = _mm512_setzero_si512();        \
        f3 = _mm512_add_ps(f3, _mm512_cvtepi32_ps(a3)); a3 = _mm512_setzero_si512();        \
    } while (0)
    for (; i + 32 <= n; i += 32) {
        if ((i & 63) == 0) {
            PREFETCH(w0 + i + ahead);
            PREFETCH(w1 + i + ahead);
            PREFETCH(w2 + i + ahead);
            PREFETCH(w3 + i + ahead);
        }
        __m512i xv = _mm512_loadu_si512(x + i);
        a0 = _mm512_dpwssd_epi32(a0, WIDEN(w0 + i), xv);
        a1 = _mm512_dpwssd_epi32(a1, WIDEN(w1 + i), xv);
        a2 = _mm512_dpwssd_epi32(a2, WIDEN(w2 + i), xv);
        a3 = _mm512_dpwssd_epi32(a3, WIDEN(w3 + i), xv);
        if ((i & 2047) == 2016) FLUSH(); /* every 2048 weights */
    }
#undef WIDEN
    if (i < n) {
        __mmask32 m = (__mmask32)((1ull << (n - i)) - 1);
        __m512i xv = _mm512_maskz_loadu_epi16(m, x + i);
#define WIDEN_M(p) _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, (p)))
        a0 = _mm512_dpwssd_epi32(a0, WIDEN_M(w0 + i), xv);
        a1 = _mm512_dpwssd_epi32(a1, WIDEN_M(w1 + i), xv);
        a2 = _mm512_dpwssd_epi32(a2, WIDEN_M(w2 + i), xv);
        a3 = _mm512_dpwssd_epi32(a3, WIDEN_M(w3 + i), xv);
#undef WIDEN_M
    }
    FLUSH();
#undef FLUSH
    out[0] = _mm512_reduce_add_ps(f0);
    out[1] = _mm512_reduce_add_ps(f1);
    out[2] = _mm512_reduce_add_ps(f2);
    out[3] = _mm512_reduce_add_ps(f3);
}
#else
/* Dot products of four weight rows with x (n bf16 values each), accumulated in fp32: plain loops the
 * compiler vectorises, BLOCK columns at a time with the next group's lines prefetched. Values are read in
 * pairs as 32-bit words: the even one is the word shifted left by 16, the odd one the word with its low
 * half cleared, so widening bf16 to fp32 takes one shift or AND and no shuffle (shuffles have one port on
 * x86; 10 % more GB/s than widening each value, AVX2 build). Even and odd columns sum separately.
 * Not inlined: gcc vectorised some inlined copies of this loop and left others scalar (seen in perf
 * annotate: the shared experts' rows ran 2.7x slower); one out-of-line copy is vectorised once. */
__attribute__((noinline)) static void dot4(const uint16_t *w0, const uint16_t *w1, const uint16_t *w2, const uint16_t *w3,
                        const uint16_t *x, int64_t n, int64_t ahead, float out[4]) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
    const uint32_t hi = 0xffff0000u;
    int64_t even = n & ~(int64_t)1;
    for (int64_t b = 0; b < even; b += BLOCK) {
        int64_t e = b + BLOCK < even ? b + BLOCK : even;
        for (int64_t i = b; i < e; i += 32) { /* one 64-byte line of each row */
            PREFETCH(w0 + i + ahead);
            PREFETCH(w1 + i + ahead);
            PREFETCH(w2 + i + ahead);
            PREFETCH(w3 + i + ahead);
        }
#pragma omp simd reduction(+ : s0, s1, s2, s3, t0, t1, t2, t3)
        for (int64_t i = b; i < e; i += 2) {
            uint32_t xu = load_u32(x + i), a0 = load_u32(w0 + i), a1 = load_u32(w1 + i), a2 = load_u32(w2 + i),
                     a3 = load_u32(w3 + i);
            float xe = u32_as_f32(xu << 16), xo = u32_as_f32(xu & hi);
            s0 += u32_as_f32(a0 << 16) * xe, t0 += u32_as_f32(a0 & hi) * xo;
            s1 += u32_as_f32(a1 << 16) * xe, t1 += u32_as_f32(a1 & hi) * xo;
            s2 += u32_as_f32(a2 << 16) * xe, t2 += u32_as_f32(a2 & hi) * xo;
            s3 += u32_as_f32(a3 << 16) * xe, t3 += u32_as_f32(a3 & hi) * xo;
        }
    }
    if (even < n) {
        float xv = bf16_to_f32(x[even]);
        s0 += bf16_to_f32(w0[even]) * xv, s1 += bf16_to_f32(w1[even]) * xv;
        s2 += bf16_to_f32(w2[even]) * xv, s3 += bf16_to_f32(w3[even]) * xv;
    }
    out[0] = s0 + t0, out[1] = s1 + t1, out[2] = s2 + t2, out[3] = s3 + t3;
}

/* Dot products of four int8 rows with int16 x (n values), as fp32 (unscaled): exact int32 sums of BLOCK
 * products (int8 widened to int16: the compiler's VPMADDWD), added up in fp32. */
static inline void dot4_i8(const int8_t *w0, const int8_t *w1, const int8_t *w2, const int8_t *w3,
                           const int16_t *x, int64_t n, int64_t ahead, float out[4]) {
    float f0 = 0.0f, f1 = 0.0f, f2 = 0.0f, f3 = 0.0f;
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t e = b + BLOCK < n ? b + BLOCK : n;
        for (int64_t i = b; i < e; i += 64) {
            PREFETCH(w0 + i + ahead);
            PREFETCH(w1 + i + ahead);
            PREFETCH(w2 + i + ahead);
            PREFETCH(w3 + i + ahead);
        }
        int16_t v0[BLOCK], v1[BLOCK], v2[BLOCK], v3[BLOCK]; /* widened first: int16 x int16 sums are VPMADDWD */
        for (int64_t i = 0; i < e - b; i++) v0[i] = w0[b + i], v1[i] = w1[b + i], v2[i] = w2[b + i], v3[i] = w3[b + i];
        const int16_t *xb = x + b;
        int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0; /* integer sums: vectorised without a pragma (one would
                                                  * hide the VPMADDWD pattern from gcc) */
        for (int64_t i = 0; i < e - b; i++) {
            s0 += v0[i] * xb[i];
            s1 += v1[i] * xb[i];
            s2 += v2[i] * xb[i];
            s3 += v3[i] * xb[i];
        }
        f0 += (float)s0, f1 += (float)s1, f2 += (float)s2, f3 += (float)s3;
    }
    out[0] = f0, out[1] = f1, out[2] = f2, out[3] = f3;
}
#endif

/* rows [r0, r1) of y = W x in fp32; W is (rows, n) with row stride ldw; a partial last group repeats row r1-1. */
static inline void rows_f32(const uint16_t *W, int64_t ldw, const uint16_t *x, int64_t n, int64_t r,
                                   int64_t rows, float *y) {
    int64_t last = rows - 1;
    const uint16_t *w0 = W + r * ldw;
    const uint16_t *w1 = W + (r + 1 <= last ? r + 1 : last) * ldw;
    const uint16_t *w2 = W + (r + 2 <= last ? r + 2 : last) * ldw;
    const uint16_t *w3 = W + (r + 3 <= last ? r + 3 : last) * ldw;
    float d[4];
    dot4(w0, w1, w2, w3, x, n, PREFETCH_AHEAD(ldw), d);
    for (int j = 0; j < 4 && r + j < rows; j++) y[j] = d[j];
}

/* y (O,) bf16 = W (O, I) bf16 @ x (I,) bf16, fp32 accumulation, rounded once. */
void dsvl2_gemv_bf16(const uint16_t *W, int64_t O, int64_t I, int64_t ldw, const uint16_t *x, uint16_t *y) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < O; r += 4) {
        float d[4] = {0};
        rows_f32(W, ldw, x, I, r, O, d);
        for (int j = 0; j < 4 && r + j < O; j++) y[r + j] = f32_to_bf16(d[j]);
    }
}

/* bf16(bf16(silu(bf16(g))) * bf16(u)): the SwiGLU of one row with the reference's rounding points. */
static inline float swiglu_bf16(float g, float u) {
    float gb = round_bf16(g);
    return round_bf16(round_bf16(gb / (1.0f + expf(-gb))) * round_bf16(u));
}

/* out[t] = bf16(sum_k w[t,k] * y[t,k]) over D columns, slot by slot in fp32 (the official combine's
 * order); with `shared` (T, D) (the shared experts' output, bf16 values held in fp32) the sum is rounded to
 * bf16 and added as the MoE layer adds them, out = bf16(bf16(sum) + shared). A worksharing loop: call it
 * from inside a parallel region, from every thread. */
static void combine_slots(const float *y, const float *w, int64_t T, int64_t K, int64_t D, const float *shared,
                          uint16_t *out) {
#pragma omp for schedule(static)
    for (int64_t td = 0; td < T * D; td++) {
        int64_t t = td / D, c = td % D;
        float acc = y[(t * K) * D + c] * w[t * K];
        for (int64_t k = 1; k < K; k++) acc += y[(t * K + k) * D + c] * w[t * K + k];
        out[td] = f32_to_bf16(shared ? round_bf16(acc) + shared[td] : acc);
    }
}

/* Slots (t, k) grouped by expert: order[] lists the slots expert by expert, group g covers
 * order[start[g] .. start[g + 1]) and uses expert expert[g]. Returns the number of groups. */
static int64_t group_slots(const int64_t *idx, int64_t slots, int64_t *order, int64_t *start, int64_t *expert) {
    for (int64_t s = 0; s < slots; s++) {  /* insertion sort by expert, stable: a few dozen slots */
        int64_t j = s;
        while (j > 0 && idx[order[j - 1]] > idx[s]) { order[j] = order[j - 1]; j--; }
        order[j] = s;
    }
    int64_t groups = 0;
    for (int64_t i = 0; i < slots; i++)
        if (i == 0 || idx[order[i]] != idx[order[i - 1]]) { start[groups] = i; expert[groups++] = idx[order[i]]; }
    start[groups] = slots;
    return groups;
}

/* The routed experts of one MoE layer for T tokens, K slots each (decode: T = batch):
 *   out[t] = bf16( sum_k w[t,k] * bf16(down_e @ bf16(bf16(silu(bf16(gate_e @ x_t))) * bf16(up_e @ x_t))) )
 * with e = idx[t,k]. gate/up (E, I, D), down (E, D, I), contiguous. Scratch: h (T*K*I) bf16,
 * y (T*K*D) fp32. Three phases in one parallel region: gate/up rows, down rows, the combine. Jobs are
 * (expert, 4 rows): an expert chosen by several tokens is read once, its rows reused from L1.
 * With sgate != NULL the layer's shared experts (one SwiGLU MLP: sgate/sup (Is, D), sdown (D, Is); scratch
 * hs (T*Is) bf16, ys (T*D) fp32) run in the same phases, their rows after the routed ones, and are added as
 * MoE.forward adds them (combine_slots): one region per layer instead of two. */
void dsvl2_moe_bf16(const uint16_t *x, int64_t T, int64_t D, const uint16_t *gate, const uint16_t *up,
                    const uint16_t *down, int64_t I, const int64_t *idx, const float *w, int64_t K, uint16_t *h,
                    float *y, uint16_t *out, const uint16_t *sgate, const uint16_t *sup, const uint16_t *sdown,
                    int64_t Is, uint16_t *hs, float *ys) {
    int64_t slots = T * K, igroups = (I + 3) / 4, dgroups = (D + 3) / 4;
    int64_t sgroups = sgate ? (Is + 3) / 4 : 0, sdgroups = sgate ? dgroups : 0;
    int64_t *order = malloc((size_t)(3 * slots + 1) * sizeof(int64_t)), *start = order + slots, *expert = start + slots + 1;
    int64_t groups = group_slots(idx, slots, order, start, expert);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t job = 0; job < groups * igroups + sgroups; job++) {
            if (job >= groups * igroups) { /* shared experts: the same rows for every token */
                int64_t r = (job - groups * igroups) * 4;
                for (int64_t t = 0; t < T; t++) {
                    float gg[4], u[4];
                    rows_f32(sgate, D, x + t * D, D, r, Is, gg);
                    rows_f32(sup, D, x + t * D, D, r, Is, u);
                    for (int j = 0; j < 4 && r + j < Is; j++) hs[t * Is + r + j] = f32_to_bf16(swiglu_bf16(gg[j], u[j]));
                }
                continue;
            }
            int64_t g = job / igroups, r = (job % igroups) * 4, e = expert[g];
            for (int64_t i = start[g]; i < start[g + 1]; i++) {
                int64_t s = order[i], t = s / K;
                const uint16_t *xt = x + t * D;
                float gg[4], u[4];
                rows_f32(gate + e * I * D, D, xt, D, r, I, gg);
                rows_f32(up + e * I * D, D, xt, D, r, I, u);
                for (int j = 0; j < 4 && r + j < I; j++) h[s * I + r + j] = f32_to_bf16(swiglu_bf16(gg[j], u[j]));
            }
        }
#pragma omp for schedule(static)
        for (int64_t job = 0; job < groups * dgroups + sdgroups; job++) {
            if (job >= groups * dgroups) {
                int64_t r = (job - groups * dgroups) * 4;
                for (int64_t t = 0; t < T; t++) {
                    float d[4];
                    rows_f32(sdown, Is, hs + t * Is, Is, r, D, d);
                    for (int j = 0; j < 4 && r + j < D; j++) ys[t * D + r + j] = round_bf16(d[j]);
                }
                continue;
            }
            int64_t g = job / dgroups, r = (job % dgroups) * 4, e = expert[g];
            for (int64_t i = start[g]; i < start[g + 1]; i++) {
                int64_t s = order[i];
                float d[4] = {0};
                rows_f32(down + e * D * I, I, h + s * I, I, r, D, d);
                for (int j = 0; j < 4 && r + j < D; j++) y[s * D + r + j] = round_bf16(d[j]);
            }
        }
        combine_slots(y, w, T, K, D, sgate ? ys : NULL, out);
    }
    free(order);
}

/* ---- int8 weight-only (dsvl2/model/quant.py): q (rows, n) int8 with one bf16 scale per row ------------
 * Widening every int8 weight to fp32 costs two shuffles per 16 weights and left the GEMV compute-bound
 * (~10 GB/s of int8 on two cores). Instead the activations are quantized to int16 (one scale per
 * vector, |error| <= max|x| / 65534, ~256x finer than bf16's rounding of x itself) and the products
 * are summed exactly in int32 (dot4_i8), in fp32 beyond that. Each row's result (sum * x scale * row
 * scale) is rounded to bf16 once, as torch._weight_int8pack_mm's; the two agree to bf16 rounding
 * (tests/test_cpu_kernels.py). */

/* xq = round(x / s) with s = max|x| / 32767 (s = 1 for an all-zero x); returns s. x fp32, or bf16 (xb). */
static inline int16_t to_i16(float v) {
    long q = lrintf(v);
    return (int16_t)(q > 32767 ? 32767 : (q < -32767 ? -32767 : q));
}

/* (Written so that gcc 12's aarch64 vectoriser does not crash: fmaxf of a widened bf16 in a reduction does.) */
static float quantize_i16(const float *x, const uint16_t *xb, int64_t n, int16_t *xq) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(x ? x[i] : bf16_to_f32(xb[i]));
        m = a > m ? a : m; /* NaN-free inputs: as fmaxf */
    }
    float s = m > 0.0f ? m / 32767.0f : 1.0f, inv = 1.0f / s;
    if (x)
        for (int64_t i = 0; i < n; i++) xq[i] = to_i16(x[i] * inv);
    else
        for (int64_t i = 0; i < n; i++) xq[i] = to_i16(bf16_to_f32(xb[i]) * inv);
    return s;
}

/* ---- int4 weight-only, group-wise scales (quant.py, quantize="int4") ------------------------------------
 * A row is groups of `group` columns (group even, <= MAX_GROUP), packed two to a byte: byte j of a group
 * holds column j in its low nibble and column j + group / 2 in its high one, value = nibble - 8; one bf16
 * scale per row and group.
 *
 * The activations are quantized to int8 per group of the same columns (llama.cpp's Q4_0 x Q8_0 scheme):
 * symmetric, xs[g] = max|x_g| / 127, xq = round(x / xs[g]), with sum8[g] = 8 * sum of the group's xq
 * precomputed once per vector (quantize_q8). Per row and group the exact int32 sum
 * sum_j (nibble_j - 8) * xq_j = sum_j nibble_j * xq_j - sum8[g] is then scaled in fp32:
 * acc += (w_scale[g] * xs[g]) * isum. Unpacking nibbles to int16 against int16 activations (the int8
 * weights' scheme) left the GEMV compute-bound at ~8.5 GB/s of int4; here one VPMADDUBSW (unsigned nibble
 * times signed int8, pairs <= 2 * 15 * 127: no saturation) and one VPMADDWD by ones give a group's sum in
 * 8 int32 lanes (the avx512 build: two VPDPBUSD), eight groups' lanes are reduced at once into one vector
 * of 8 group sums (VPHADDD), and each row keeps one fp32 accumulator vector reduced once at the end.
 * gcc does not emit VPMADDUBSW from plain C, hence the intrinsics (x86 builds, group 64: every real
 * model's width is a multiple of 64); the generic build and other group sizes run the same math in plain
 * C (dot4_q4_c), so every build computes the same exact int32 group sums and differs only in the order
 * of the fp32 sums. The activation error (<= xs[g] / 2 per value, relative 1 / 254 of the group's largest)
 * stays well below the weights' own (1 / 14 of theirs). */
#define MAX_GROUP 256

/* xq = round(x / s) per group of `group` values with s = max|x_g| / 127 (1 for an all-zero group);
 * xs[g] = s, sum8[g] = 8 * sum of the group's xq. x fp32, or bf16 (xb). */
static void quantize_q8(const float *x, const uint16_t *xb, int64_t n, int64_t group, int8_t *xq, float *xs,
                        int32_t *sum8) {
    for (int64_t c = 0, g = 0; c < n; c += group, g++) {
        float m = 0.0f;
        for (int64_t i = c; i < c + group; i++) {
            float a = fabsf(x ? x[i] : bf16_to_f32(xb[i]));
            m = a > m ? a : m;
        }
        float s = m > 0.0f ? m / 127.0f : 1.0f, inv = 1.0f / s;
        int32_t sum = 0;
        for (int64_t i = c; i < c + group; i++) { /* rintf: round half to even, inlined (lrintf is a call) */
            float v = rintf((x ? x[i] : bf16_to_f32(xb[i])) * inv);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            xq[i] = (int8_t)v;
            sum += (int32_t)v;
        }
        xs[g] = s;
        sum8[g] = 8 * sum;
    }
}

/* Plain C for any group: per group the exact int32 sum of (nibble - 8) * xq, times w_scale * xs in fp32. */
__attribute__((always_inline)) static inline void dot4_q4_group(
    const uint8_t *w0, const uint8_t *w1, const uint8_t *w2, const uint8_t *w3, const uint16_t *s0,
    const uint16_t *s1, const uint16_t *s2, const uint16_t *s3, const int8_t *x, const float *xs,
    const int32_t *sum8, int64_t n, const int64_t group, int64_t ahead, float out[4]) {
    float f0 = 0.0f, f1 = 0.0f, f2 = 0.0f, f3 = 0.0f;
    int64_t half = group / 2;
    for (int64_t c = 0, g = 0; c < n; c += group, g++) {
        const uint8_t *b0 = w0 + c / 2, *b1 = w1 + c / 2, *b2 = w2 + c / 2, *b3 = w3 + c / 2;
        PREFETCH(b0 + ahead);
        PREFETCH(b1 + ahead);
        PREFETCH(b2 + ahead);
        PREFETCH(b3 + ahead);
        const int8_t *xl = x + c, *xh = x + c + half;
        int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0; /* <= 256 * 15 * 127 < 2^31 */
        for (int64_t j = 0; j < half; j++) {
            a0 += (b0[j] & 15) * xl[j] + (b0[j] >> 4) * xh[j];
            a1 += (b1[j] & 15) * xl[j] + (b1[j] >> 4) * xh[j];
            a2 += (b2[j] & 15) * xl[j] + (b2[j] >> 4) * xh[j];
            a3 += (b3[j] & 15) * xl[j] + (b3[j] >> 4) * xh[j];
        }
        float d = xs[g];
        f0 += (bf16_to_f32(s0[g]) * d) * (float)(a0 - sum8[g]);
        f1 += (bf16_to_f32(s1[g]) * d) * (float)(a1 - sum8[g]);
        f2 += (bf16_to_f32(s2[g]) * d) * (float)(a2 - sum8[g]);
        f3 += (bf16_to_f32(s3[g]) * d) * (float)(a3 - sum8[g]);
    }
    out[0] = f0, out[1] = f1, out[2] = f2, out[3] = f3;
}

static inline void dot4_q4_c(const uint8_t *w0, const uint8_t *w1, const uint8_t *w2, const uint8_t *w3,
                             const uint16_t *s0, const uint16_t *s1, const uint16_t *s2, const uint16_t *s3,
                             const int8_t *x, const float *xs, const int32_t *sum8, int64_t n, int64_t group,
                             int64_t ahead, float out[4]) {
    if (group == 64) dot4_q4_group(w0, w1, w2, w3, s0, s1, s2, s3, x, xs, sum8, n, 64, ahead, out);
    else dot4_q4_group(w0, w1, w2, w3, s0, s1, s2, s3, x, xs, sum8, n, group, ahead, out);
}

#if defined(__AVX2__)
/* 8 int32 lanes summing to sum_j nibble_j * xq_j over one group of 64: w its 32 bytes, x its 64 values. */
static inline __m256i q4_lanes(const uint8_t *w, const int8_t *x) {
    const __m256i m = _mm256_set1_epi8(15);
    __m256i b = _mm256_loadu_si256((const __m256i *)w);
    __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    __m256i xl = _mm256_loadu_si256((const __m256i *)x), xh = _mm256_loadu_si256((const __m256i *)(x + 32));
#if defined(DSVL2_AVX512)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh);
#else
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)); /* <= 7620 */
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

/* acc + (w_scale[g] * xs[g]) * (sum_j nibble_j * xq_j - sum8[g]) for the cnt (<= 8) groups from w / ws / x,
 * group k in lane k (VPHADDD reduces the 8 groups' lanes together). */
__attribute__((always_inline)) static inline __m256 q4_block(__m256 acc, const uint8_t *w, const uint16_t *ws,
                                                             const int8_t *x, const float *xs, const int32_t *sum8,
                                                             const int cnt) {
    __m256i v[8];
    for (int k = 0; k < 8; k++) v[k] = k < cnt ? q4_lanes(w + 32 * k, x + 64 * k) : _mm256_setzero_si256();
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    /* a = groups 0-3 (first 128-bit half: their lanes 0-3, second: lanes 4-7), b = groups 4-7 */
    __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
    if (cnt < 8) { /* the row's last groups, in scalar fp32 (a 16-bit masked load does not exist in AVX2, and
                    * a vector loaded from narrow stores stalls) */
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        float f[8], t = 0.0f;
        _mm256_storeu_ps(f, _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, _mm256_maskload_epi32(sum8, mask))));
        for (int k = 0; k < cnt; k++) t += (bf16_to_f32(ws[k]) * xs[k]) * f[k];
        return _mm256_add_ps(acc, _mm256_setr_ps(t, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f));
    }
    __m256 wsf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)ws)), 16));
    __m256 isum = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, _mm256_loadu_si256((const __m256i *)sum8))); /* exact */
    return _mm256_fmadd_ps(_mm256_mul_ps(wsf, _mm256_loadu_ps(xs)), isum, acc);
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline void dot4_q4(const uint8_t *w0, const uint8_t *w1, const uint8_t *w2, const uint8_t *w3,
                           const uint16_t *s0, const uint16_t *s1, const uint16_t *s2, const uint16_t *s3,
                           const int8_t *x, const float *xs, const int32_t *sum8, int64_t n, int64_t group,
                           int64_t ahead, float out[4]) {
    if (group != 64) {
        dot4_q4_c(w0, w1, w2, w3, s0, s1, s2, s3, x, xs, sum8, n, group, ahead, out);
        return;
    }
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t ng = n / 64, g = 0;
    for (; g + 8 <= ng; g += 8) { /* 256 bytes of each row: four cache lines */
        for (int l = 0; l < 256; l += 64) {
            PREFETCH(w0 + g * 32 + l + ahead);
            PREFETCH(w1 + g * 32 + l + ahead);
            PREFETCH(w2 + g * 32 + l + ahead);
            PREFETCH(w3 + g * 32 + l + ahead);
        }
        a0 = q4_block(a0, w0 + g * 32, s0 + g, x + g * 64, xs + g, sum8 + g, 8);
        a1 = q4_block(a1, w1 + g * 32, s1 + g, x + g * 64, xs + g, sum8 + g, 8);
        a2 = q4_block(a2, w2 + g * 32, s2 + g, x + g * 64, xs + g, sum8 + g, 8);
        a3 = q4_block(a3, w3 + g * 32, s3 + g, x + g * 64, xs + g, sum8 + g, 8);
    }
    if (g < ng) {
        int cnt = (int)(ng - g);
        for (int l = 0; l < cnt * 32; l += 64) {
            PREFETCH(w0 + g * 32 + l + ahead);
            PREFETCH(w1 + g * 32 + l + ahead);
            PREFETCH(w2 + g * 32 + l + ahead);
            PREFETCH(w3 + g * 32 + l + ahead);
        }
        a0 = q4_block(a0, w0 + g * 32, s0 + g, x + g * 64, xs + g, sum8 + g, cnt);
        a1 = q4_block(a1, w1 + g * 32, s1 + g, x + g * 64, xs + g, sum8 + g, cnt);
        a2 = q4_block(a2, w2 + g * 32, s2 + g, x + g * 64, xs + g, sum8 + g, cnt);
        a3 = q4_block(a3, w3 + g * 32, s3 + g, x + g * 64, xs + g, sum8 + g, cnt);
    }
    out[0] = hsum256(a0), out[1] = hsum256(a1), out[2] = hsum256(a2), out[3] = hsum256(a3);
}
#else
#define dot4_q4 dot4_q4_c
#endif

/* Quantized activation rows, as rows_q reads them: int16 with one scale per row (int8 weights, group 0;
 * quantize_i16) or int8 with a scale and sum8 per group (int4; quantize_q8). One allocation for R rows of
 * n values: row r at q + 2 * n * r bytes, its scales at s + ng * r, its group sums at sum8 + ng * r. */
typedef struct {
    float *s;
    int32_t *sum8;
    int8_t *q;
    int64_t n, group, ng;
} qacts;

static qacts qacts_new(int64_t R, int64_t n, int64_t group) {
    qacts a = {NULL, NULL, NULL, n, group, group ? n / group : 1};
    a.s = malloc((size_t)(R * a.ng) * (sizeof(float) + sizeof(int32_t)) + (size_t)(2 * n * R));
    a.sum8 = (int32_t *)(a.s + R * a.ng);
    a.q = (int8_t *)(a.sum8 + R * a.ng);
    return a;
}

/* Quantizes row r from x fp32, or bf16 (xb). */
static void qacts_set(const qacts *a, int64_t r, const float *x, const uint16_t *xb) {
    int8_t *q = a->q + 2 * a->n * r;
    if (a->group) quantize_q8(x, xb, a->n, a->group, q, a->s + a->ng * r, a->sum8 + a->ng * r);
    else a->s[r] = quantize_i16(x, xb, a->n, (int16_t *)q);
}

/* rows [r, r+4) of y = Q x in fp32 for quantized rows and activation row ar of a: int8 with one bf16 scale
 * per row (a->group 0; ldq bytes per row) or int4 with one per row and group (ldq = n / 2); partial groups
 * as rows_f32. */
static inline void rows_q(const void *Q, int64_t ldq, const uint16_t *scale, const qacts *a, int64_t ar,
                          int64_t r, int64_t rows, float *y) {
    int64_t last = rows - 1, rr[4], n = a->n;
    for (int j = 0; j < 4; j++) rr[j] = r + j <= last ? r + j : last;
    float d[4];
    const int8_t *x = a->q + 2 * n * ar;
    if (a->group == 0) {
        const int8_t *q = (const int8_t *)Q;
        float sx = a->s[ar];
        dot4_i8(q + rr[0] * ldq, q + rr[1] * ldq, q + rr[2] * ldq, q + rr[3] * ldq, (const int16_t *)x, n,
                PREFETCH_AHEAD(ldq), d);
        for (int j = 0; j < 4 && r + j < rows; j++) y[j] = d[j] * sx * bf16_to_f32(scale[r + j]);
    } else {
        const uint8_t *q = (const uint8_t *)Q;
        int64_t ng = a->ng;
        dot4_q4(q + rr[0] * ldq, q + rr[1] * ldq, q + rr[2] * ldq, q + rr[3] * ldq, scale + rr[0] * ng,
                scale + rr[1] * ng, scale + rr[2] * ng, scale + rr[3] * ng, x, a->s + ng * ar, a->sum8 + ng * ar,
                n, a->group, PREFETCH_AHEAD(ldq), d);
        for (int j = 0; j < 4 && r + j < rows; j++) y[j] = d[j];
    }
}

/* y (T, O) = x (T, I) bf16 @ dequant(Q)^T: Q (O, I) int8 with row scales (O,) bf16 (group 0), or int4
 * packed (O, I / 2) with scales (O, I / group). Each group of four weight rows is read from memory once and
 * reused from L1 for the T rows of x (decode batches). y bf16 (rounded once), or fp32 (yf: the unrounded
 * sums, for tests). */
static void gemm_q(const void *Q, int64_t O, int64_t I, int64_t ldq, const uint16_t *scale, const uint16_t *x,
                   int64_t T, uint16_t *y, float *yf, int64_t group) {
    qacts a = qacts_new(T, I, group);
    for (int64_t t = 0; t < T; t++) qacts_set(&a, t, NULL, x + t * I);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < O; r += 4) {
        for (int64_t t = 0; t < T; t++) {
            float d[4] = {0};
            rows_q(Q, ldq, scale, &a, t, r, O, d);
            for (int j = 0; j < 4 && r + j < O; j++) {
                if (yf) yf[t * O + r + j] = d[j];
                else y[t * O + r + j] = f32_to_bf16(d[j]);
            }
        }
    }
    free(a.s);
}

void dsvl2_gemm_int8(const void *Q, int64_t O, int64_t I, int64_t ldq, const uint16_t *scale,
                     const uint16_t *x, int64_t T, uint16_t *y, int64_t group) {
    gemm_q(Q, O, I, ldq, scale, x, T, y, NULL, group);
}

void dsvl2_gemm_q_f32(const void *Q, int64_t O, int64_t I, int64_t ldq, const uint16_t *scale,
                      const uint16_t *x, int64_t T, float *y, int64_t group) {
    gemm_q(Q, O, I, ldq, scale, x, T, NULL, y, group);
}

/* dsvl2_moe_bf16 with quantized experts: gate/up (E, I, D) int8 with scales (E, I), down (E, D, I) int8
 * with scales (E, D) (groups 0), or int4 packed (E, I, D / 2), (E, D, I / 2) with scales (E, I, D / group),
 * (E, D, I / group_down); all bf16 scales; x (T, D) bf16. Scratch h (T*K*I) fp32, y (T*K*D) fp32. Rounding as
 * quant.QuantExperts: each projection rounded to bf16, SiLU and the product rounded to bf16. With sgate !=
 * NULL the layer's shared experts (quantized as the routed ones: sgate/sup (Is, D) with `group`, sdown (D, Is)
 * with group_sdown; scratch hs (T*Is), ys (T*D) fp32) run in the same phases and are added as in
 * dsvl2_moe_bf16: one parallel region per MoE layer. */
void dsvl2_moe_int8(const uint16_t *x, int64_t T, int64_t D, const void *gate, const uint16_t *gate_s,
                    const void *up, const uint16_t *up_s, const void *down, const uint16_t *down_s,
                    int64_t I, const int64_t *idx, const float *w, int64_t K, float *h, float *y,
                    uint16_t *out, int64_t group, int64_t group_down, const void *sgate, const uint16_t *sgate_s,
                    const void *sup, const uint16_t *sup_s, const void *sdown, const uint16_t *sdown_s, int64_t Is,
                    int64_t group_sdown, float *hs, float *ys) {
    /* per expert: bytes of weights and number of scales of gate/up and of down */
    int64_t gu_ld = group ? D / 2 : D, dn_ld = group_down ? I / 2 : I, sdn_ld = group_sdown ? Is / 2 : Is;
    int64_t gu_ns = group ? I * (D / group) : I, dn_ns = group_down ? D * (I / group_down) : D;
    const uint8_t *gb = gate, *ub = up, *db = down;
    int64_t slots = T * K, igroups = (I + 3) / 4, dgroups = (D + 3) / 4;
    int64_t sgroups = sgate ? (Is + 3) / 4 : 0, sdgroups = sgate ? dgroups : 0, srows = sgate ? T : 0;
    qacts xq = qacts_new(T, D, group), hq = qacts_new(slots, I, group_down), hsq = qacts_new(srows, Is, group_sdown);
    int64_t *order = malloc((size_t)(3 * slots + 1) * sizeof(int64_t)), *start = order + slots, *expert = start + slots + 1;
    int64_t groups = group_slots(idx, slots, order, start, expert);
    for (int64_t t = 0; t < T; t++) qacts_set(&xq, t, NULL, x + t * D);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t job = 0; job < groups * igroups + sgroups; job++) {
            if (job >= groups * igroups) { /* shared experts: the same rows for every token */
                int64_t r = (job - groups * igroups) * 4;
                for (int64_t t = 0; t < T; t++) {
                    float gg[4] = {0}, u[4] = {0};
                    rows_q(sgate, gu_ld, sgate_s, &xq, t, r, Is, gg);
                    rows_q(sup, gu_ld, sup_s, &xq, t, r, Is, u);
                    for (int j = 0; j < 4 && r + j < Is; j++) hs[t * Is + r + j] = swiglu_bf16(gg[j], u[j]);
                }
                continue;
            }
            int64_t g = job / igroups, r = (job % igroups) * 4, e = expert[g];
            for (int64_t i = start[g]; i < start[g + 1]; i++) {
                int64_t s = order[i], t = s / K;
                float gg[4] = {0}, u[4] = {0};
                rows_q(gb + e * I * gu_ld, gu_ld, gate_s + e * gu_ns, &xq, t, r, I, gg);
                rows_q(ub + e * I * gu_ld, gu_ld, up_s + e * gu_ns, &xq, t, r, I, u);
                for (int j = 0; j < 4 && r + j < I; j++) h[s * I + r + j] = swiglu_bf16(gg[j], u[j]);
            }
        }
#pragma omp for schedule(static)
        for (int64_t s = 0; s < slots + srows; s++) {
            if (s < slots) qacts_set(&hq, s, h + s * I, NULL);
            else qacts_set(&hsq, s - slots, hs + (s - slots) * Is, NULL);
        }
#pragma omp for schedule(static)
        for (int64_t job = 0; job < groups * dgroups + sdgroups; job++) {
            if (job >= groups * dgroups) {
                int64_t r = (job - groups * dgroups) * 4;
                for (int64_t t = 0; t < T; t++) {
                    float d[4] = {0};
                    rows_q(sdown, sdn_ld, sdown_s, &hsq, t, r, D, d);
                    for (int j = 0; j < 4 && r + j < D; j++) ys[t * D + r + j] = round_bf16(d[j]);
                }
                continue;
            }
            int64_t g = job / dgroups, r = (job % dgroups) * 4, e = expert[g];
            for (int64_t i = start[g]; i < start[g + 1]; i++) {
                int64_t s = order[i];
                float d[4] = {0};
                rows_q(db + e * D * dn_ld, dn_ld, down_s + e * dn_ns, &hq, s, r, D, d);
                for (int j = 0; j < 4 && r + j < D; j++) y[s * D + r + j] = round_bf16(d[j]);
            }
        }
        combine_slots(y, w, T, K, D, sgate ? ys : NULL, out);
    }
    free(xq.s);
    free(hq.s);
    free(hsq.s);
    free(order);
}

/* e^x in fp32 for x <= 0 (GELU's argument after the sign flip below), in plain C the compiler vectorises:
 * n = round(x log2 e) (by the 1.5 * 2^23 trick), r = x - n ln 2 (two-part ln 2), a degree-6 polynomial
 * for e^r on |r| <= ln 2 / 2 (relative error ~2e-7), times 2^n built in the exponent bits. x is clamped
 * to -87 (2^n stays normal): e^-87 ~ 1.6e-38, which the caller only divides by. */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : (x > 0.0f ? 0.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* ---- one decode step of plain multi-head attention (Tiny), batch 1 ------------------------------------
 * x (D,) bf16 -> out (D,) bf16: q, k, v projections (bf16 weights, or int8 / int4 (group > 0) when
 * *_s is not NULL), half-split RoPE on q and k rounded as the reference (bf16(bf16(x cos) +
 * bf16(rotate_half(x) sin))), k and v written at position pos of the layer's cache (H, ld_t, hd),
 * attention over positions 0..pos as SDPA computes it (fp32 scores scaled by 1/scale_div, fp32
 * softmax, probabilities rounded to bf16 for the product with v, fp32 sums, one bf16 rounding),
 * then the output projection. hd a multiple of 16, at most 256. Scratch: 4 * D bf16 + H * (pos + 1) fp32. */
/* y = W x: bf16 W (s NULL), or quantized with scales s: int8 (group 0) or int4 in groups of `group`. */
static void rope(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t hd) {
    int64_t half = hd / 2;
    float rotated[hd];
    for (int64_t i = 0; i < half; i++) {
        rotated[i] = -bf16_to_f32(x[i + half]);
        rotated[i + half] = bf16_to_f32(x[i]);
    }
    for (int64_t i = 0; i < hd; i++) {
        float a = round_bf16(bf16_to_f32(x[i]) * bf16_to_f32(cos[i]));
        float b = round_bf16(rotated[i] * bf16_to_f32(sin[i]));
        x[i] = f32_to_bf16(a + b);
    }
}

/* Rows [r, r + 4) of y = W x rounded to bf16: bf16 weights (s NULL) against x, or quantized ones with scales
 * s (int8, or int4 in groups of xq->group) against xq, x quantized once; as dsvl2_gemv_bf16 / dsvl2_gemm_int8
 * compute them. */
static inline void project_rows(const void *W, const uint16_t *s, int64_t O, int64_t I, const uint16_t *x,
                                const qacts *xq, int64_t r, uint16_t *y) {
    float d[4] = {0};
    if (s) rows_q(W, xq->group ? I / 2 : I, s, xq, 0, r, O, d);
    else rows_f32((const uint16_t *)W, I, x, I, r, O, d);
    for (int j = 0; j < 4 && r + j < O; j++) y[r + j] = f32_to_bf16(d[j]);
}

/* acc[i] += sum_j p[j] * v_j[i] over four bf16 rows (the value rows of four cache positions). */
static inline void axpy4_bf16(float *acc, const float p[4], const uint16_t *v0, const uint16_t *v1,
                              const uint16_t *v2, const uint16_t *v3, int64_t n) {
    float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        acc[i] += p0 * bf16_to_f32(v0[i]) + p1 * bf16_to_f32(v1[i]) + p2 * bf16_to_f32(v2[i]) + p3 * bf16_to_f32(v3[i]);
}

/* One head over cache positions 0..T-1: scores = K q / scale_div (fp32), softmax in fp32, o = bf16(sum of
 * bf16(p) * v / sum p). Keys and values four positions at a time (dot4 / axpy4_bf16); sc: T floats. */
static void attend_head(const uint16_t *qh, const uint16_t *kh, const uint16_t *vh, int64_t T, int64_t hd,
                        float inv, float *sc, uint16_t *o) {
    float m = -INFINITY, sum = 0.0f, acc[256] = {0}; /* hd <= 256 (checked by the caller) */
    for (int64_t t = 0; t < T; t += 4) {
        const uint16_t *k[4];
        for (int j = 0; j < 4; j++) k[j] = kh + (t + j < T ? t + j : T - 1) * hd;
        float d[4];
        dot4(k[0], k[1], k[2], k[3], qh, hd, 4 * hd, d);
        for (int j = 0; j < 4 && t + j < T; j++) sc[t + j] = d[j] * inv;
    }
    for (int64_t t = 0; t < T; t++) m = fmaxf(m, sc[t]);
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < T; t++) {
        float p = exp_neg(sc[t] - m);
        sum += p;
        sc[t] = round_bf16(p);
    }
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) axpy4_bf16(acc, sc + t, vh + t * hd, vh + (t + 1) * hd, vh + (t + 2) * hd, vh + (t + 3) * hd, hd);
    for (; t < T; t++) axpy_bf16(acc, sc[t], vh + t * hd, hd);
    for (int64_t i = 0; i < hd; i++) o[i] = f32_to_bf16(acc[i] / sum);
}

/* One parallel region (each one wakes the second thread: tens of microseconds, as long as a 1280-wide
 * projection): q, k and v rows in one loop, RoPE and the cache write per head, attention per head, then the
 * output projection. */
void dsvl2_mha_decode(const uint16_t *x, int64_t D, int64_t H, int64_t hd, const void *wq, const uint16_t *sq,
                      const void *wk, const uint16_t *sk, const void *wv, const uint16_t *sv, const void *wo,
                      const uint16_t *so, const uint16_t *cos, const uint16_t *sin, uint16_t *kc, uint16_t *vc,
                      int64_t ld_t, int64_t pos, float scale_div, uint16_t *out, int64_t group) {
    int64_t T = pos + 1, groups = (D + 3) / 4;
    uint16_t *buf = malloc((size_t)(4 * D) * sizeof(uint16_t)), *q = buf, *k = buf + D, *v = buf + 2 * D, *o = buf + 3 * D;
    float *scores = malloc((size_t)(H * T) * sizeof(float));
    qacts xq = qacts_new(1, D, group), oq = qacts_new(1, D, group);
    if (sq || sk || sv) qacts_set(&xq, 0, NULL, x);
    float inv = 1.0f / scale_div;
    const void *w[3] = {wq, wk, wv};
    const uint16_t *ws[3] = {sq, sk, sv};
    uint16_t *y[3] = {q, k, v};
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t job = 0; job < 3 * groups; job++) {
            int64_t p = job / groups;
            project_rows(w[p], ws[p], D, D, x, &xq, (job % groups) * 4, y[p]);
        }
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++) {
            rope(q + h * hd, cos, sin, hd);
            rope(k + h * hd, cos, sin, hd);
            memcpy(kc + (h * ld_t + pos) * hd, k + h * hd, (size_t)hd * sizeof(uint16_t));
            memcpy(vc + (h * ld_t + pos) * hd, v + h * hd, (size_t)hd * sizeof(uint16_t));
        }
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++)
            attend_head(q + h * hd, kc + h * ld_t * hd, vc + h * ld_t * hd, T, hd, inv, scores + h * T, o + h * hd);
#pragma omp single
        if (so) qacts_set(&oq, 0, NULL, o);
#pragma omp for schedule(static)
        for (int64_t job = 0; job < groups; job++) project_rows(wo, so, D, D, o, &oq, job * 4, out);
    }
    free(buf);
    free(scores);
    free(xq.s);
    free(oq.s);
}

/* ---- one decode step of Multi-head Latent Attention (Small / Base), batch 1, absorbed form ---------------
 * As MLA.forward with MLA._attend_latents_fp32 (the reference's CPU decode path), rounding where it
 * rounds: q and the kv_a projection (bf16, int8 or int4 weights); kv_a_layernorm; the interleaved RoPE of
 * q_pe and k_pe; latent and rotary key written at pos; q_lat = q_nope @ W_UK per head; scores
 * bf16(bf16(bf16(q_pe . k_pe) + bf16(q_lat . latent)) * scale), fp32 softmax rounded to bf16,
 * o_lat = probs @ latents, o = o_lat @ W_UV^T per head, then o_proj. Dot products accumulate in fp32 in
 * another order than torch's kernels: bf16-close. */
static void rope_interleaved(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t n) {
    uint16_t t[n];
    for (int64_t i = 0; i < n / 2; i++) t[i] = x[2 * i], t[n / 2 + i] = x[2 * i + 1];
    memcpy(x, t, (size_t)n * sizeof(uint16_t));
    rope(x, cos, sin, n);
}

void dsvl2_mla_decode(const uint16_t *x, int64_t D, int64_t H, int64_t nope, int64_t rp, int64_t vd, int64_t R,
                             const void *wq, const uint16_t *sq, const void *wa, const uint16_t *sa,
                             const uint16_t *norm_w, float eps, const uint16_t *wkvb, const void *wo,
                             const uint16_t *so, const uint16_t *cos, const uint16_t *sin, uint16_t *lat_cache,
                             uint16_t *pe_cache, int64_t pos, float scale, uint16_t *out, int64_t group,
                             int64_t group_o) {
    int64_t T = pos + 1, qd = nope + rp;
    uint16_t *q = malloc((size_t)(H * qd + R + rp + 2 * H * R + H * vd) * sizeof(uint16_t));
    uint16_t *a = q + H * qd, *qlat = a + R + rp, *olat = qlat + H * R, *o = olat + H * R;
    float *sc = malloc((size_t)(H * T + H * R) * sizeof(float)), *acc = sc + H * T;
    qacts xq = qacts_new(1, D, group), oq = qacts_new(1, H * vd, group_o);
    if (sq || sa) qacts_set(&xq, 0, NULL, x);
    int64_t gq = (H * qd + 3) / 4, ga = (R + rp + 3) / 4, go = (D + 3) / 4;
#pragma omp parallel /* one region, as dsvl2_mha_decode: each region wakes the second thread */
    {
#pragma omp for schedule(static)
        for (int64_t job = 0; job < gq + ga; job++) { /* the q and kv_a rows in one loop */
            if (job < gq) project_rows(wq, sq, H * qd, D, x, &xq, job * 4, q);
            else project_rows(wa, sa, R + rp, D, x, &xq, (job - gq) * 4, a);
        }
#pragma omp single
        {
            float ss = 0.0f; /* kv_a_layernorm: fp32 statistics, rounded to bf16, then the bf16 weight multiply */
            for (int64_t i = 0; i < R; i++) ss += bf16_to_f32(a[i]) * bf16_to_f32(a[i]);
            float inv = 1.0f / sqrtf(ss / (float)R + eps);
            for (int64_t i = 0; i < R; i++)
                a[i] = f32_to_bf16(bf16_to_f32(norm_w[i]) * round_bf16(bf16_to_f32(a[i]) * inv));
            rope_interleaved(a + R, cos, sin, rp);
            for (int64_t h = 0; h < H; h++) rope_interleaved(q + h * qd + nope, cos, sin, rp);
            memcpy(lat_cache + pos * R, a, (size_t)R * sizeof(uint16_t));
            memcpy(pe_cache + pos * rp, a + R, (size_t)rp * sizeof(uint16_t));
        }
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++) { /* q_lat[h] = q_nope[h] @ W_UK[h]: rows of kv_b_proj scaled and summed */
            float *ah = acc + h * R;
            memset(ah, 0, (size_t)R * sizeof(float));
            for (int64_t i = 0; i < nope; i++)
                axpy_bf16(ah, bf16_to_f32(q[h * qd + i]), wkvb + (h * (nope + vd) + i) * R, R);
            for (int64_t c = 0; c < R; c++) qlat[h * R + c] = f32_to_bf16(ah[c]);
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            for (int64_t h = 0; h < H; h++) {
                float s_pe = round_bf16(dot_bf16(q + h * qd + nope, pe_cache + t * rp, rp));
                float s_lat = round_bf16(dot_bf16(qlat + h * R, lat_cache + t * R, R));
                sc[h * T + t] = round_bf16(round_bf16(s_pe + s_lat) * scale);
            }
        }
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++) {
            float *sh = sc + h * T, m = -INFINITY, sum = 0.0f, *ah = acc + h * R;
            for (int64_t t = 0; t < T; t++) m = fmaxf(m, sh[t]);
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < T; t++) sum += (sh[t] = exp_neg(sh[t] - m));
            memset(ah, 0, (size_t)R * sizeof(float));
            for (int64_t t = 0; t < T; t++) axpy_bf16(ah, round_bf16(sh[t] / sum), lat_cache + t * R, R);
            for (int64_t c = 0; c < R; c++) olat[h * R + c] = f32_to_bf16(ah[c]);
            for (int64_t j = 0; j < vd; j++) /* o[h] = o_lat[h] @ W_UV[h]^T */
                o[h * vd + j] = f32_to_bf16(dot_bf16(olat + h * R, wkvb + (h * (nope + vd) + nope + j) * R, R));
        }
#pragma omp single
        if (so) qacts_set(&oq, 0, NULL, o);
#pragma omp for schedule(static)
        for (int64_t job = 0; job < go; job++) project_rows(wo, so, D, H * vd, o, &oq, job * 4, out);
    }
    free(q);
    free(sc);
    free(xq.s);
    free(oq.s);
}

/* RMSNorm of R rows of n bf16 values, as layers.RMSNorm: fp32 statistics, x * rsqrt(mean(x^2) + eps)
 * rounded to bf16, then the bf16 weight multiply rounded again (the mean sums in another order). */
void dsvl2_rmsnorm_bf16(const uint16_t *x, int64_t R, int64_t n, const uint16_t *w, float eps, uint16_t *y) {
    for (int64_t r = 0; r < R; r++) {
        const uint16_t *xr = x + r * n;
        uint16_t *yr = y + r * n;
        float ss = dot_bf16(xr, xr, n);
        float inv = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; i++) yr[i] = f32_to_bf16(bf16_to_f32(w[i]) * round_bf16(bf16_to_f32(xr[i]) * inv));
    }
}

/* The MoE router for one token (moe.Router, n_group = 1): fp32 logits of the bf16 weights (E, D), softmax
 * (greedy) or sigmoid plus the correction bias for the choice (noaux_tc), the top K in descending order
 * of the choice score (ties to the lower expert id), weights = scores of the chosen, normalised when
 * norm_topk, times scaling. scores (E,) receives the fp32 routing scores. */
void dsvl2_router(const uint16_t *x, int64_t D, const uint16_t *w, int64_t E, int64_t K, int noaux,
                         const float *bias, int norm_topk, float scaling, int64_t *idx, float *weight, float *scores) {
    float choice[E];
    int taken[E];
    float m = -INFINITY, sum = 0.0f;
    for (int64_t e = 0; e < E; e++) {
        scores[e] = dot_bf16(x, w + e * D, D);
        m = fmaxf(m, scores[e]);
        taken[e] = 0;
    }
    for (int64_t e = 0; e < E; e++) {
        if (noaux) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
        else sum += (scores[e] = expf(scores[e] - m));
    }
    for (int64_t e = 0; e < E; e++) {
        if (!noaux) scores[e] /= sum;
        choice[e] = noaux && bias ? scores[e] + bias[e] : scores[e];
    }
    float total = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || choice[e] > choice[best])) best = e;
        taken[best] = 1;
        idx[k] = best;
        weight[k] = scores[best];
        total += scores[best];
    }
    for (int64_t k = 0; k < K; k++)
        weight[k] = (K > 1 && norm_topk) ? weight[k] / (total + 1e-20f) * scaling : weight[k] * scaling;
}

/* tanh-GELU of n bf16 values (the ViT's MLP, F.gelu(approximate="tanh")), y may equal x. Computed in fp32 as
 * x * sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3), which equals 0.5 x (1 + tanh u) without its
 * cancellation for negative u; rounded to bf16 once. With e = e^-2|u| (never overflows):
 * sigmoid(2u) = 1 / (1 + e) for u >= 0 and e / (1 + e) for u < 0. torch evaluates the tanh form (Sleef
 * tanh), so the two differ by at most one bf16 step, and only where torch's own result is off by a
 * fraction of one. torch's bf16 kernel ran ~2 ns a value here, 4.5x its erf GELU: a third of the vision
 * tower's non-matmul time. */
void dsvl2_gelu_tanh_bf16(const uint16_t *x, int64_t n, uint16_t *y) {
    const int64_t block = 1 << 14;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; b += block) {
        int64_t end = b + block < n ? b + block : n;
#pragma omp simd
        for (int64_t i = b; i < end; i++) {
            float v = bf16_to_f32(x[i]);
            float u = 0.7978845608028654f * v * (1.0f + 0.044715f * v * v);
            float e = exp_neg(-2.0f * fabsf(u));
            float g = v * (u >= 0.0f ? 1.0f : e) / (1.0f + e);
            y[i] = f32_to_bf16(g);
        }
    }
}
