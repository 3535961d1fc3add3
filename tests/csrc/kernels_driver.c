/* Deterministic inputs through the C kernels, outputs printed one per line ("kernel value"): built for the
 * host and for arm64 by tests/test_cpu_kernels.py, which compares the two. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
void dsvl2_gemv_bf16(const uint16_t *W, int64_t O, int64_t I, int64_t ldw, const uint16_t *x, uint16_t *y);
void dsvl2_gemm_int8(const void *Q, int64_t O, int64_t I, int64_t ldq, const uint16_t *scale, const uint16_t *x, int64_t T, uint16_t *y, int64_t group);
void dsvl2_gelu_tanh_bf16(const uint16_t *x, int64_t n, uint16_t *y);
void dsvl2_rmsnorm_bf16(const uint16_t *x, int64_t R, int64_t n, const uint16_t *w, float eps, uint16_t *y);
void dsvl2_moe_bf16(const uint16_t *x, int64_t T, int64_t D, const uint16_t *gate, const uint16_t *up, const uint16_t *down, int64_t I, const int64_t *idx, const float *w, int64_t K, uint16_t *h, float *y, uint16_t *out, const uint16_t *sgate, const uint16_t *sup, const uint16_t *sdown, int64_t Is, uint16_t *hs, float *ys);
int dsvl2_build(void); int dsvl2_cpu_features(void);
static uint32_t s = 12345;
static float rnd(void) { s = s * 1664525u + 1013904223u; return ((s >> 8) / 16777216.0f) * 2.0f - 1.0f; }
static uint16_t bf(float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16); }
static float fl(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
int main(void) {
    printf("build %d features %d\n", dsvl2_build(), dsvl2_cpu_features());
    enum { O = 67, I = 1037, E = 4, D = 96, F = 72 };
    uint16_t *W = malloc(O * I * 2), x[I], y[O], sc[O];
    int8_t *Q = malloc(O * I);
    for (int i = 0; i < O * I; i++) { W[i] = bf(rnd()); Q[i] = (int8_t)(rnd() * 127); }
    for (int i = 0; i < I; i++) x[i] = bf(rnd() * 3);
    for (int i = 0; i < O; i++) sc[i] = bf(0.01f + 0.001f * i);
    dsvl2_gemv_bf16(W, O, I, I, x, y);
    for (int i = 0; i < O; i++) printf("gemv %.9g\n", fl(y[i]));
    dsvl2_gemm_int8(Q, O, I, I, sc, x, 1, y, 0);
    for (int i = 0; i < O; i++) printf("int8 %.9g\n", fl(y[i]));
    for (int group = 32; group <= 64; group += 32) { /* int4: 1344 columns = 21 groups of 64 / 42 of 32 */
        enum { I4 = 1344 };
        uint8_t *Q4 = malloc(O * I4 / 2);
        uint16_t s4[O * (I4 / 32)], x4[I4];
        for (int i = 0; i < O * I4 / 2; i++) Q4[i] = (uint8_t)(rnd() * 128 + 128);
        for (int i = 0; i < O * (I4 / group); i++) s4[i] = bf(0.01f + 0.0001f * i);
        for (int i = 0; i < I4; i++) x4[i] = bf(rnd() * (1 + i % 7));
        dsvl2_gemm_int8(Q4, O, I4, I4 / 2, s4, x4, 1, y, group);
        for (int i = 0; i < O; i++) printf("int4 %.9g\n", fl(y[i]));
        free(Q4);
    }
    uint16_t g[2000], gy[2000];
    for (int i = 0; i < 2000; i++) g[i] = bf((i - 1000) / 80.0f);
    dsvl2_gelu_tanh_bf16(g, 2000, gy);
    for (int i = 0; i < 2000; i++) printf("gelu %.9g\n", fl(gy[i]));
    uint16_t nw[I], ny[I];
    for (int i = 0; i < I; i++) nw[i] = bf(1 + rnd() * 0.5f);
    dsvl2_rmsnorm_bf16(x, 1, I, nw, 1e-6f, ny);
    for (int i = 0; i < I; i++) printf("rms %.9g\n", fl(ny[i]));
    uint16_t *gt = malloc(E * F * D * 2), *up = malloc(E * F * D * 2), *dn = malloc(E * D * F * 2), mx[2 * D], h[2 * 2 * F], out[2 * D];
    for (int i = 0; i < E * F * D; i++) { gt[i] = bf(rnd() * 0.1f); up[i] = bf(rnd() * 0.1f); dn[i] = bf(rnd() * 0.1f); }
    for (int i = 0; i < 2 * D; i++) mx[i] = bf(rnd());
    int64_t idx[4] = {2, 0, 3, 2};
    float wt[4] = {0.6f, 0.4f, 0.7f, 0.3f}, yy[2 * 2 * D];
    dsvl2_moe_bf16(mx, 2, D, gt, up, dn, F, idx, wt, 2, h, yy, out, NULL, NULL, NULL, 0, NULL, NULL);
    for (int i = 0; i < 2 * D; i++) printf("moe %.9g\n", fl(out[i]));
    return 0;
}
