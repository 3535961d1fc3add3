/* Decode kernels for x86 CPUs with AVX512-BF16: bf16 GEMV and the routed experts of one MoE layer.
 *
 * Batch-1 decode reads every activated weight once per token, so it is bound by memory bandwidth; on
 * the 2-core development machine torch's bf16 GEMV streams 45-75 % of the read bandwidth
 * (docs/performance.md). These kernels stream the weights with 64-byte loads and VDPBF16PS (pairs of
 * bf16 products accumulated in fp32), four rows at a time, rows split over torch's OpenMP threads
 * (the extension links the libgomp torch has already loaded).
 *
 * Rounding follows the reference's rounding points (each projection rounded to bf16, SiLU and the
 * gate product rounded to bf16, expert outputs weighted in fp32 and summed slot by slot), but the
 * dot products accumulate in another order than torch's kernels: bf16-close, not bit-identical. That
 * is why the Python side keeps them opt-in (dsvl2/model/cpu_kernels.py).
 *
 * Built by dsvl2/model/cpu_kernels.py with: gcc -O3 -shared -fPIC -fopenmp (no -march: the kernels
 * carry their own target attribute, and dsvl2_cpu_supported() checks the CPU at run time).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))
#ifndef PREFETCH_AHEAD
/* Software prefetch of the next group of four rows at the same columns (rows of one matrix are read
 * four at a time, groups in order): 10-13 % more GB/s than a fixed distance along the row, in
 * interleaved A/B runs of GEMV and experts, bf16 and int8. */
#define PREFETCH_AHEAD(ld) (4 * (ld))
#endif

int dsvl2_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
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

/* Dot products of four weight rows with x (n bf16 values each), accumulated in fp32. */
KERNEL static inline void dot4(const uint16_t *w0, const uint16_t *w1, const uint16_t *w2, const uint16_t *w3,
                               const uint16_t *x, int64_t n, int64_t ahead, float out[4]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        _mm_prefetch((const char *)(w0 + i + ahead), _MM_HINT_T0);
        _mm_prefetch((const char *)(w1 + i + ahead), _MM_HINT_T0);
        _mm_prefetch((const char *)(w2 + i + ahead), _MM_HINT_T0);
        _mm_prefetch((const char *)(w3 + i + ahead), _MM_HINT_T0);
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

/* rows [r0, r1) of y = W x in fp32; W is (rows, n) with row stride ldw; a partial last group repeats row r1-1. */
KERNEL static inline void rows_f32(const uint16_t *W, int64_t ldw, const uint16_t *x, int64_t n, int64_t r,
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
KERNEL void dsvl2_gemv_bf16(const uint16_t *W, int64_t O, int64_t I, int64_t ldw, const uint16_t *x, uint16_t *y) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < O; r += 4) {
        float d[4];
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
 * order). A worksharing loop: call it from inside a parallel region, from every thread. */
static void combine_slots(const float *y, const float *w, int64_t T, int64_t K, int64_t D, uint16_t *out) {
#pragma omp for schedule(static)
    for (int64_t td = 0; td < T * D; td++) {
        int64_t t = td / D, c = td % D;
        float acc = y[(t * K) * D + c] * w[t * K];
        for (int64_t k = 1; k < K; k++) acc += y[(t * K + k) * D + c] * w[t * K + k];
        out[td] = f32_to_bf16(acc);
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
 * (expert, 4 rows): an expert chosen by several tokens is read once, its rows reused from L1. */
KERNEL void dsvl2_moe_bf16(const uint16_t *x, int64_t T, int64_t D, const uint16_t *gate, const uint16_t *up,
                           const uint16_t *down, int64_t I, const int64_t *idx, const float *w, int64_t K,
                           uint16_t *h, float *y, uint16_t *out) {
    int64_t slots = T * K, igroups = (I + 3) / 4, dgroups = (D + 3) / 4;
    int64_t *order = malloc((size_t)(3 * slots + 1) * sizeof(int64_t)), *start = order + slots, *expert = start + slots + 1;
    int64_t groups = group_slots(idx, slots, order, start, expert);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t job = 0; job < groups * igroups; job++) {
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
        for (int64_t job = 0; job < groups * dgroups; job++) {
            int64_t g = job / dgroups, r = (job % dgroups) * 4, e = expert[g];
            for (int64_t i = start[g]; i < start[g + 1]; i++) {
                int64_t s = order[i];
                float d[4] = {0};
                rows_f32(down + e * D * I, I, h + s * I, I, r, D, d);
                for (int j = 0; j < 4 && r + j < D; j++) y[s * D + r + j] = round_bf16(d[j]);
            }
        }
        combine_slots(y, w, T, K, D, out);
    }
    free(order);
}

/* ---- int8 weight-only (dsvl2/model/quant.py): q (rows, n) int8 with one bf16 scale per row ------------
 * Widening every int8 weight to fp32 costs two shuffles per 16 weights and left the GEMV compute-bound
 * (~10 GB/s of int8 on two cores). Instead the activations are quantized to int16 (one scale per
 * vector, |error| <= max|x| / 65534, ~256x finer than bf16's rounding of x itself) and VPDPWSSD sums
 * pairs of int16 products into 16 int32 lanes, flushed to fp32 every 2048 weights so no lane can
 * overflow (128 products per lane: 128 * 127 * 32767 < 2^31). Each row's result (sum * x scale * row
 * scale) is rounded to bf16 once, as torch._weight_int8pack_mm's; the two agree to bf16 rounding
 * (tests/test_cpu_kernels.py). */

/* xq = round(x / s) with s = max|x| / 32767 (s = 1 for an all-zero x); returns s. x fp32, or bf16 (xb). */
static float quantize_i16(const float *x, const uint16_t *xb, int64_t n, int16_t *xq) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) m = fmaxf(m, fabsf(x ? x[i] : bf16_to_f32(xb[i])));
    float s = m > 0.0f ? m / 32767.0f : 1.0f, inv = 1.0f / s;
    for (int64_t i = 0; i < n; i++) {
        long v = lrintf((x ? x[i] : bf16_to_f32(xb[i])) * inv);
        xq[i] = (int16_t)(v > 32767 ? 32767 : (v < -32767 ? -32767 : v));
    }
    return s;
}

/* Dot products of four int8 rows with int16 x (n values), as fp32 (unscaled). */
KERNEL static inline void dot4_i8(const int8_t *w0, const int8_t *w1, const int8_t *w2, const int8_t *w3,
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
            _mm_prefetch((const char *)(w0 + i + ahead), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + i + ahead), _MM_HINT_T0);
            _mm_prefetch((const char *)(w2 + i + ahead), _MM_HINT_T0);
            _mm_prefetch((const char *)(w3 + i + ahead), _MM_HINT_T0);
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

/* rows [r, r+4) of y = diag(scale) Q x * sx in fp32 (scale bf16, one per row); partial groups as rows_f32. */
KERNEL static inline void rows_i8(const int8_t *Q, int64_t ldq, const uint16_t *scale, const int16_t *x, float sx,
                                  int64_t n, int64_t r, int64_t rows, float *y) {
    int64_t last = rows - 1;
    const int8_t *w0 = Q + r * ldq;
    const int8_t *w1 = Q + (r + 1 <= last ? r + 1 : last) * ldq;
    const int8_t *w2 = Q + (r + 2 <= last ? r + 2 : last) * ldq;
    const int8_t *w3 = Q + (r + 3 <= last ? r + 3 : last) * ldq;
    float d[4];
    dot4_i8(w0, w1, w2, w3, x, n, PREFETCH_AHEAD(ldq), d);
    for (int j = 0; j < 4 && r + j < rows; j++) y[j] = d[j] * sx * bf16_to_f32(scale[r + j]);
}

/* y (T, O) bf16 = (x (T, I) bf16 @ Q^T) * scale, Q (O, I) int8 with row scales (O,) bf16. Each group of
 * four weight rows is read from memory once and reused from L1 for the T rows of x (decode batches). */
KERNEL void dsvl2_gemm_int8(const int8_t *Q, int64_t O, int64_t I, int64_t ldq, const uint16_t *scale,
                            const uint16_t *x, int64_t T, uint16_t *y) {
    int16_t *xq = malloc((size_t)(T * I) * sizeof(int16_t));
    float *sx = malloc((size_t)T * sizeof(float));
    for (int64_t t = 0; t < T; t++) sx[t] = quantize_i16(NULL, x + t * I, I, xq + t * I);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < O; r += 4) {
        for (int64_t t = 0; t < T; t++) {
            float d[4] = {0};
            rows_i8(Q, ldq, scale, xq + t * I, sx[t], I, r, O, d);
            for (int j = 0; j < 4 && r + j < O; j++) y[t * O + r + j] = f32_to_bf16(d[j]);
        }
    }
    free(xq);
    free(sx);
}

/* dsvl2_moe_bf16 with int8 experts: gate/up (E, I, D) int8 with scales (E, I), down (E, D, I) int8 with
 * scales (E, D), all bf16 scales; x (T, D) bf16. Scratch h (T*K*I) fp32, y (T*K*D) fp32. Rounding as
 * quant.Int8Experts: each projection rounded to bf16, SiLU and the product rounded to bf16. */
KERNEL void dsvl2_moe_int8(const uint16_t *x, int64_t T, int64_t D, const int8_t *gate, const uint16_t *gate_s,
                           const int8_t *up, const uint16_t *up_s, const int8_t *down, const uint16_t *down_s,
                           int64_t I, const int64_t *idx, const float *w, int64_t K, float *h, float *y,
                           uint16_t *out) {
    int64_t slots = T * K, igroups = (I + 3) / 4, dgroups = (D + 3) / 4;
    int16_t *xq = malloc((size_t)(T * D + slots * I) * sizeof(int16_t)), *hq = xq + T * D;
    float *sx = malloc((size_t)(T + slots) * sizeof(float)), *sh = sx + T;
    int64_t *order = malloc((size_t)(3 * slots + 1) * sizeof(int64_t)), *start = order + slots, *expert = start + slots + 1;
    int64_t groups = group_slots(idx, slots, order, start, expert);
    for (int64_t t = 0; t < T; t++) sx[t] = quantize_i16(NULL, x + t * D, D, xq + t * D);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t job = 0; job < groups * igroups; job++) {
            int64_t g = job / igroups, r = (job % igroups) * 4, e = expert[g];
            for (int64_t i = start[g]; i < start[g + 1]; i++) {
                int64_t s = order[i], t = s / K;
                float gg[4] = {0}, u[4] = {0};
                rows_i8(gate + e * I * D, D, gate_s + e * I, xq + t * D, sx[t], D, r, I, gg);
                rows_i8(up + e * I * D, D, up_s + e * I, xq + t * D, sx[t], D, r, I, u);
                for (int j = 0; j < 4 && r + j < I; j++) h[s * I + r + j] = swiglu_bf16(gg[j], u[j]);
            }
        }
#pragma omp for schedule(static)
        for (int64_t s = 0; s < slots; s++) sh[s] = quantize_i16(h + s * I, NULL, I, hq + s * I);
#pragma omp for schedule(static)
        for (int64_t job = 0; job < groups * dgroups; job++) {
            int64_t g = job / dgroups, r = (job % dgroups) * 4, e = expert[g];
            for (int64_t i = start[g]; i < start[g + 1]; i++) {
                int64_t s = order[i];
                float d[4] = {0};
                rows_i8(down + e * D * I, I, down_s + e * D, hq + s * I, sh[s], I, r, D, d);
                for (int j = 0; j < 4 && r + j < D; j++) y[s * D + r + j] = round_bf16(d[j]);
            }
        }
        combine_slots(y, w, T, K, D, out);
    }
    free(xq);
    free(sx);
    free(order);
}

/* ---- one decode step of plain multi-head attention (Tiny), batch 1 ------------------------------------
 * x (D,) bf16 -> out (D,) bf16: q, k, v projections (bf16 weights, or int8 with row scales when
 * *_s is not NULL), half-split RoPE on q and k rounded as the reference (bf16(bf16(x cos) +
 * bf16(rotate_half(x) sin))), k and v written at position pos of the layer's cache (H, ld_t, hd),
 * attention over positions 0..pos as SDPA computes it (fp32 scores scaled by 1/scale_div, fp32
 * softmax, probabilities rounded to bf16 for the product with v, fp32 sums, one bf16 rounding),
 * then the output projection. hd a multiple of 16, at most 256. Scratch: 4 * D bf16 + H * (pos + 1) fp32. */
/* 16 bf16 values widened to fp32 (exact). */
KERNEL static inline __m512 widen_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static void project(const void *W, const uint16_t *s, int64_t O, int64_t I, const uint16_t *x, uint16_t *y) {
    if (s) dsvl2_gemm_int8((const int8_t *)W, O, I, I, s, x, 1, y);
    else dsvl2_gemv_bf16((const uint16_t *)W, O, I, I, x, y);
}

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

KERNEL void dsvl2_mha_decode(const uint16_t *x, int64_t D, int64_t H, int64_t hd, const void *wq, const uint16_t *sq,
                             const void *wk, const uint16_t *sk, const void *wv, const uint16_t *sv, const void *wo,
                             const uint16_t *so, const uint16_t *cos, const uint16_t *sin, uint16_t *kc, uint16_t *vc,
                             int64_t ld_t, int64_t pos, float scale_div, uint16_t *out) {
    int64_t T = pos + 1;
    uint16_t *buf = malloc((size_t)(4 * D) * sizeof(uint16_t)), *q = buf, *k = buf + D, *v = buf + 2 * D, *o = buf + 3 * D;
    float *scores = malloc((size_t)(H * T) * sizeof(float));
    project(wq, sq, D, D, x, q);
    project(wk, sk, D, D, x, k);
    project(wv, sv, D, D, x, v);
    for (int64_t h = 0; h < H; h++) {
        rope(q + h * hd, cos, sin, hd);
        rope(k + h * hd, cos, sin, hd);
        memcpy(kc + (h * ld_t + pos) * hd, k + h * hd, (size_t)hd * sizeof(uint16_t));
        memcpy(vc + (h * ld_t + pos) * hd, v + h * hd, (size_t)hd * sizeof(uint16_t));
    }
    float inv = 1.0f / scale_div;
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < H; h++) { /* hd is a multiple of 16 (checked by the caller) */
        const uint16_t *qh = q + h * hd, *kh = kc + h * ld_t * hd, *vh = vc + h * ld_t * hd;
        float *sc = scores + h * T, m = -INFINITY, sum = 0.0f;
        __m512 acc[16];
        int64_t nv = hd / 16;
        for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t t = 0; t < T; t++) {
            const uint16_t *kt = kh + t * hd;
            __m512 d = _mm512_setzero_ps();
            for (int64_t j = 0; j < nv; j++)
                d = _mm512_fmadd_ps(widen_bf16(qh + 16 * j), widen_bf16(kt + 16 * j), d);
            sc[t] = _mm512_reduce_add_ps(d) * inv;
            m = fmaxf(m, sc[t]);
        }
        for (int64_t t = 0; t < T; t++) {
            float p = expf(sc[t] - m);
            sum += p;
            __m512 pb = _mm512_set1_ps(round_bf16(p));
            const uint16_t *vt = vh + t * hd;
            for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_fmadd_ps(pb, widen_bf16(vt + 16 * j), acc[j]);
        }
        float r[16];
        for (int64_t j = 0; j < nv; j++) {
            _mm512_storeu_ps(r, acc[j]);
            for (int i = 0; i < 16; i++) o[h * hd + 16 * j + i] = f32_to_bf16(r[i] / sum);
        }
    }
    project(wo, so, D, D, o, out);
    free(buf);
    free(scores);
}

/* ---- one decode step of Multi-head Latent Attention (Small / Base), batch 1, absorbed form ---------------
 * As MLA.forward with MLA._attend_latents_fp32 (the reference's CPU decode path), rounding where it
 * rounds: q and the kv_a projection (bf16 or int8 weights); kv_a_layernorm; the interleaved RoPE of
 * q_pe and k_pe; latent and rotary key written at pos; q_lat = q_nope @ W_UK per head; scores
 * bf16(bf16(bf16(q_pe . k_pe) + bf16(q_lat . latent)) * scale), fp32 softmax rounded to bf16,
 * o_lat = probs @ latents, o = o_lat @ W_UV^T per head, then o_proj. Dot products accumulate in fp32 in
 * another order than torch's kernels: bf16-close. */
KERNEL static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(widen_bf16(a + i), widen_bf16(b + i), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) s += bf16_to_f32(a[i]) * bf16_to_f32(b[i]);
    return s;
}

KERNEL static inline void axpy_bf16(float *acc, float p, const uint16_t *row, int64_t n) {
    __m512 pv = _mm512_set1_ps(p);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, widen_bf16(row + i), _mm512_loadu_ps(acc + i)));
    for (; i < n; i++) acc[i] += p * bf16_to_f32(row[i]);
}

static void rope_interleaved(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t n) {
    uint16_t t[n];
    for (int64_t i = 0; i < n / 2; i++) t[i] = x[2 * i], t[n / 2 + i] = x[2 * i + 1];
    memcpy(x, t, (size_t)n * sizeof(uint16_t));
    rope(x, cos, sin, n);
}

KERNEL void dsvl2_mla_decode(const uint16_t *x, int64_t D, int64_t H, int64_t nope, int64_t rp, int64_t vd, int64_t R,
                             const void *wq, const uint16_t *sq, const void *wa, const uint16_t *sa,
                             const uint16_t *norm_w, float eps, const uint16_t *wkvb, const void *wo,
                             const uint16_t *so, const uint16_t *cos, const uint16_t *sin, uint16_t *lat_cache,
                             uint16_t *pe_cache, int64_t pos, float scale, uint16_t *out) {
    int64_t T = pos + 1, qd = nope + rp;
    uint16_t *q = malloc((size_t)(H * qd + R + rp + 2 * H * R + H * vd) * sizeof(uint16_t));
    uint16_t *a = q + H * qd, *qlat = a + R + rp, *olat = qlat + H * R, *o = olat + H * R;
    float *sc = malloc((size_t)(H * T + H * R) * sizeof(float)), *acc = sc + H * T;
    project(wq, sq, H * qd, D, x, q);
    project(wa, sa, R + rp, D, x, a);
    float ss = 0.0f; /* kv_a_layernorm: fp32 statistics, rounded to bf16, then the bf16 weight multiply */
    for (int64_t i = 0; i < R; i++) ss += bf16_to_f32(a[i]) * bf16_to_f32(a[i]);
    float inv = 1.0f / sqrtf(ss / (float)R + eps);
    for (int64_t i = 0; i < R; i++) a[i] = f32_to_bf16(bf16_to_f32(norm_w[i]) * round_bf16(bf16_to_f32(a[i]) * inv));
    rope_interleaved(a + R, cos, sin, rp);
    for (int64_t h = 0; h < H; h++) rope_interleaved(q + h * qd + nope, cos, sin, rp);
    memcpy(lat_cache + pos * R, a, (size_t)R * sizeof(uint16_t));
    memcpy(pe_cache + pos * rp, a + R, (size_t)rp * sizeof(uint16_t));
#pragma omp parallel
    {
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
            for (int64_t t = 0; t < T; t++) sum += (sh[t] = expf(sh[t] - m));
            memset(ah, 0, (size_t)R * sizeof(float));
            for (int64_t t = 0; t < T; t++) axpy_bf16(ah, round_bf16(sh[t] / sum), lat_cache + t * R, R);
            for (int64_t c = 0; c < R; c++) olat[h * R + c] = f32_to_bf16(ah[c]);
            for (int64_t j = 0; j < vd; j++) /* o[h] = o_lat[h] @ W_UV[h]^T */
                o[h * vd + j] = f32_to_bf16(dot_bf16(olat + h * R, wkvb + (h * (nope + vd) + nope + j) * R, R));
        }
    }
    project(wo, so, D, H * vd, o, out);
    free(q);
    free(sc);
}

/* RMSNorm of R rows of n bf16 values, as layers.RMSNorm: fp32 statistics, x * rsqrt(mean(x^2) + eps)
 * rounded to bf16, then the bf16 weight multiply rounded again (the mean sums in another order). */
KERNEL void dsvl2_rmsnorm_bf16(const uint16_t *x, int64_t R, int64_t n, const uint16_t *w, float eps, uint16_t *y) {
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
KERNEL void dsvl2_router(const uint16_t *x, int64_t D, const uint16_t *w, int64_t E, int64_t K, int noaux,
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

/* exp of 16 fp32 lanes: n = round(x log2 e), r = x - n ln 2 (two-part ln 2), a degree-6 polynomial for
 * e^r on |r| <= ln 2 / 2 (relative error ~2e-7), times 2^n (scalef: 0 and inf beyond the fp32 range). */
KERNEL static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(104.0f)), _mm512_set1_ps(-104.0f)); /* 2^n saturates to inf / 0 */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* tanh-GELU of n bf16 values (the ViT's MLP, F.gelu(approximate="tanh")), y may equal x. Computed in fp32 as
 * x * sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3), which equals 0.5 x (1 + tanh u) without its
 * cancellation for negative u; rounded to bf16 once. torch evaluates the tanh form (Sleef tanh), so the
 * two differ by at most one bf16 step, and only where torch's own result is off by a fraction of one.
 * torch's bf16 kernel ran ~2 ns a value here, 4.5x its erf GELU: a third of the vision tower's non-matmul time. */
KERNEL void dsvl2_gelu_tanh_bf16(const uint16_t *x, int64_t n, uint16_t *y) {
    const int64_t block = 1 << 14;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; b += block) {
        int64_t end = b + block < n ? b + block : n;
        for (int64_t i = b; i < end; i += 16) {
            __mmask16 m = end - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (end - i)) - 1);
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x + i)), 16));
            __m512 u = _mm512_mul_ps(v, _mm512_fmadd_ps(_mm512_mul_ps(v, v), _mm512_set1_ps(0.044715f), _mm512_set1_ps(1.0f)));
            u = _mm512_mul_ps(u, _mm512_set1_ps(-2.0f * 0.7978845608028654f));
            __m512 g = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(u)));
            _mm256_mask_storeu_epi16(y + i, m, (__m256i)_mm512_cvtneps_pbh(g));
        }
    }
}
