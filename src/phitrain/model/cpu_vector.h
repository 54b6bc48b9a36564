/* Vector helpers shared by phitrain's CPU kernels (cpu_attention.c, cpu_gelu.c): 16-lane fp32 vectors
 * in GCC's portable vector extension (AVX-512 registers under -march=native where the CPU has them,
 * pairs of AVX2 registers elsewhere), a polynomial 2^x, and bf16 loads and stores. */
#ifndef PHITRAIN_CPU_VECTOR_H
#define PHITRAIN_CPU_VECTOR_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define W 16 /* floats per vector */
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
typedef uint16_t bf16;

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){0} + x; }
/* a where the mask's lanes are all ones, b where they are zero */
static inline vf select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* 2^x for x <= 0: x = n + f, |f| <= 1/2, 2^f by its Taylor series to f^6 (relative error < 2e-7),
 * 2^n by the exponent bits; 0 below -126. */
static inline vf vexp2(vf x) {
    const vi live = x >= -126.0f;
    x = select(live, x, splat(-126.0f));
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x + magic) - magic, f = x - n;
    vf p = splat(1.5403530393381606e-4f);           /* ln2^6 / 6! ... ln2 / 1!, 1 */
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.618129107628477e-3f;
    p = p * f + 5.550410866482158e-2f;
    p = p * f + 0.2402265069591007f;
    p = p * f + 0.6931471805599453f;
    p = p * f + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)bits) & live);
}

#ifdef __AVX512F__
#include <immintrin.h>
static inline float hmax(vf v) { return _mm512_reduce_max_ps((__m512)v); }
static inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#else
static inline float hmax(vf v) { float m = v[0]; for (int j = 1; j < W; j++) m = v[j] > m ? v[j] : m; return m; }
static inline float hsum(vf v) { float s = 0; for (int j = 0; j < W; j++) s += v[j]; return s; }
#endif

/* 16 bf16 values widened to fp32 (exact) */
static inline vf load_bf16(const bf16 *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

/* 16 fp32 values rounded to bf16, to nearest even as torch rounds; a NaN keeps its sign and top bits,
 * made quiet (as VCVTNEPS2BF16 and torch's vectorized conversion do) */
static inline void store_bf16(bf16 *p, vf x) {
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh((__m512)x));
#else
    const vu b = (vu)x;
    const vu nan = (vu)((b & 0x7FFFFFFFu) > 0x7F800000u);   /* all ones where x is a NaN */
    const vu r = (((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16) & ~nan) | (((b >> 16) | 0x40u) & nan);
    const vh h = __builtin_convertvector(r, vh);
    memcpy(p, &h, sizeof h);
#endif
}

#endif
