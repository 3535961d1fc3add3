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
#include <string.h>

#define KERNEL __attribute__((target("avx512f,avx512bw,avx512bf16")))
#ifndef PREFETCH
#define PREFETCH 512 /* bf16 values ahead of the loads, per row stream */
#endif

int dsvl2_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
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
                               const uint16_t *x, int64_t n, float out[4]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        _mm_prefetch((const char *)(w0 + i + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w1 + i + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w2 + i + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w3 + i + PREFETCH), _MM_HINT_T0);
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
    dot4(w0, w1, w2, w3, x, n, d);
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

/* The routed experts of one MoE layer for T tokens, K slots each (decode: T = batch):
 *   out[t] = bf16( sum_k w[t,k] * bf16(down_e @ bf16(bf16(silu(bf16(gate_e @ x_t))) * bf16(up_e @ x_t))) )
 * with e = idx[t,k]. gate/up (E, I, D), down (E, D, I), contiguous. Scratch: h (T*K*I) bf16,
 * y (T*K*D) fp32. Three phases in one parallel region: gate/up rows, down rows, the combine. */
KERNEL void dsvl2_moe_bf16(const uint16_t *x, int64_t T, int64_t D, const uint16_t *gate, const uint16_t *up,
                           const uint16_t *down, int64_t I, const int64_t *idx, const float *w, int64_t K,
                           uint16_t *h, float *y, uint16_t *out) {
    int64_t slots = T * K, igroups = (I + 3) / 4, dgroups = (D + 3) / 4;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t job = 0; job < slots * igroups; job++) {
            int64_t s = job / igroups, r = (job % igroups) * 4, t = s / K, e = idx[s];
            const uint16_t *xt = x + t * D;
            float g[4], u[4];
            rows_f32(gate + e * I * D, D, xt, D, r, I, g);
            rows_f32(up + e * I * D, D, xt, D, r, I, u);
            for (int j = 0; j < 4 && r + j < I; j++) {
                float gb = round_bf16(g[j]);
                float act = round_bf16(gb / (1.0f + expf(-gb)));
                h[s * I + r + j] = f32_to_bf16(act * round_bf16(u[j]));
            }
        }
#pragma omp for schedule(static)
        for (int64_t job = 0; job < slots * dgroups; job++) {
            int64_t s = job / dgroups, r = (job % dgroups) * 4, e = idx[s];
            float d[4];
            rows_f32(down + e * D * I, I, h + s * I, I, r, D, d);
            for (int j = 0; j < 4 && r + j < D; j++) y[s * D + r + j] = round_bf16(d[j]);
        }
#pragma omp for schedule(static)
        for (int64_t td = 0; td < T * D; td++) {
            int64_t t = td / D, c = td % D;
            float acc = y[(t * K) * D + c] * w[t * K];
            for (int64_t k = 1; k < K; k++) acc += y[(t * K + k) * D + c] * w[t * K + k];
            out[td] = f32_to_bf16(acc);
        }
    }
}
