/* Causal attention forward and backward on the CPU, in fp32 (and in bf16 where the CPU has AVX512-BF16:
 * the section at the end), for heads whose size is a multiple of 16.
 *
 * Why: PyTorch's CPU flash kernel multiplies small blocks through the BLAS, which at phi-1-tiny's
 * 32-dim heads runs far below the FMA units' rate (forward + backward ~18 ms per layer for 8 x 8 heads
 * x 256 tokens on 2 Ice Lake cores, for ~0.9 GFLOP). Here one thread owns one (batch, head) pair at a
 * time: its keys and values (T x D floats, 32 KB at T = 256) stay in the caches, the scores are
 * computed RF (forward) or RB (backward) queries at a time in registers, that many FMAs per key vector
 * loaded, and nothing is shared between threads, so no atomics and no reductions across them.
 * Measured side by side against that kernel (fp32, 2 Ice Lake cores, medians of 15): forward 1.3-1.7x
 * and backward 1.1-1.4x faster at 8 x 8 x 256 x 32, 4 x 8 x 1024 x 32 and 4 x 4 x 512 x 64.
 *
 * The arithmetic is FlashAttention's (Dao et al. 2022) without the tiling over keys, which a head this
 * small does not need: the forward keeps each query row's log-sum-exp, the backward recomputes
 *     P = exp(s q kᵀ − lse), dV = Pᵀ dO, dS = s P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K, dK = dSᵀ Q
 * with s = 1/√D. Queries attend to keys 0..i (causal, no mask, no dropout). Grouped-query heads share
 * a key/value head: one thread takes a key/value head with all its query heads, so dK and dV sum there.
 *
 * Layouts: q, k, v, dO are [B, heads, T, D] with any strides but a unit stride along D; O, dQ, dK, dV
 * are written as [B, T, heads, D] contiguous (what the output projection reads, and a free transpose
 * on the Python side); lse is [B, H, T] contiguous.
 */
#include <stdlib.h>

#include "cpu_vector.h"

#define RF 8 /* query rows per register block: forward */
#define RB 4 /* backward: its loops hold twice the accumulators (8 spilled registers and measured slower) */
#define DC 2 /* vectors of D per pass in the loops that run along D */

/* lanes c0 + j <= last are kept: an all-ones mask for them, zero past the causal limit */
static inline vi upto(int64_t c0, int64_t last) {
    vi iota; for (int j = 0; j < W; j++) iota[j] = j;
    return iota <= (vi){0} + (int32_t)(last - c0);
}

static float *alloc(int64_t n) { return aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64); }

/* 32-bit words of any type: a float, or a pair of bf16 values */
typedef uint32_t __attribute__((may_alias)) word;

/* Keys transposed in blocks of W: kt[c0 D + d W + j] = k[c0 + j, d] (zero past T), for D words a key,
 * the keys `row_bytes` apart (a bf16 key may start mid-word: each word is read with memcpy). One
 * vector holds W consecutive keys' d-th dims, and a block's D vectors are contiguous (a plain [D, T]
 * transpose put them T floats apart, which at T = 1024 maps all D into one L1 set). */
static void transpose(const void *src, int64_t row_bytes, int64_t T, int64_t D, int64_t tp, void *dst) {
    const char *k = src;
    word *kt = dst;
    memset(kt, 0, sizeof(word) * D * tp);
    for (int64_t c0 = 0; c0 < T; c0 += W)
        for (int64_t j = 0; j < W && c0 + j < T; j++)
            for (int64_t d = 0; d < D; d++)
                memcpy(kt + c0 * D + d * W + j, k + (c0 + j) * row_bytes + d * sizeof(word), sizeof(word));
}

/* rows r < nr of O (stride so apart) = inv[r] * sum_c p[r, c] v[c], nd vectors of D (a constant once inlined) */
static inline __attribute__((always_inline)) void pv(const float *p, int64_t tp, const float *v, int64_t svt,
                                                      int64_t ncols, int64_t nr, const float *inv, float *o,
                                                      int64_t so, const int nd) {
    vf acc[RF][DC] = {{{0}}};
    for (int64_t c = 0; c < ncols; c++) {
        vf vv[DC];
        for (int j = 0; j < nd; j++) vv[j] = load(v + c * svt + j * W);
        for (int r = 0; r < RF; r++) {
            const float pr = p[r * tp + c];
            for (int j = 0; j < nd; j++) acc[r][j] += pr * vv[j];
        }
    }
    for (int64_t r = 0; r < nr; r++)
        for (int j = 0; j < nd; j++) store(o + r * so + j * W, acc[r][j] * inv[r]);
}

/* for one block of RB query rows: dQ rows (stride so apart) = sum_c dS[r, c] k[c]; and for every key c,
 * dK[c] += sum_r dS[r, c] q[r], dV[c] += sum_r P[r, c] dO[r]; nd vectors of D */
static inline __attribute__((always_inline)) void grads(const float *p, const float *ds, int64_t tp,
                                                         const float *qs, const float *dos, int64_t D,
                                                         const float *k, int64_t skt, float *gk, float *gv,
                                                         int64_t ncols, int64_t nr, float *dq, int64_t so,
                                                         const int nd) {
    vf acc[RB][DC] = {{{0}}};
    for (int64_t c = 0; c < ncols; c++) {
        vf kv[DC], gkc[2][DC], gvc[2][DC];   /* two partial sums each: half the FMA chain's latency */
        for (int j = 0; j < nd; j++) {
            kv[j] = load(k + c * skt + j * W);
            gkc[0][j] = load(gk + c * D + j * W);
            gvc[0][j] = load(gv + c * D + j * W);
            gkc[1][j] = gvc[1][j] = splat(0.0f);
        }
        for (int r = 0; r < RB; r++) {
            const float dsr = ds[r * tp + c], pr = p[r * tp + c];
            for (int j = 0; j < nd; j++) {
                acc[r][j] += dsr * kv[j];                          /* dQ = dS K */
                gkc[r & 1][j] += dsr * load(qs + r * D + j * W);   /* dK += dSᵀ Q */
                gvc[r & 1][j] += pr * load(dos + r * D + j * W);   /* dV += Pᵀ dO */
            }
        }
        for (int j = 0; j < nd; j++) {
            store(gk + c * D + j * W, gkc[0][j] + gkc[1][j]);
            store(gv + c * D + j * W, gvc[0][j] + gvc[1][j]);
        }
    }
    for (int64_t r = 0; r < nr; r++)
        for (int j = 0; j < nd; j++) store(dq + r * so + j * W, acc[r][j]);
}

typedef struct { int64_t b, h, t; } strides;

void phitrain_attention_forward(const float *q, const float *k, const float *v, float *o, float *lse,
                                int64_t B, int64_t H, int64_t HKV, int64_t T, int64_t D,
                                strides sq, strides sk, strides sv, int threads) {
    const int64_t tp = (T + 2 * W - 1) / (2 * W) * (2 * W), group = H / HKV;   /* keys padded to 2W */
    const float scale = LOG2E / sqrtf((float)D);   /* scores in base 2: 2^(s log2 e) = e^s */
#pragma omp parallel num_threads(threads)
    {
        float *kt = alloc(D * tp), *s = alloc(RF * tp), *qs = alloc(RF * D);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H, hk = h / group;
            const float *qh = q + b * sq.b + h * sq.h;
            const float *vh = v + b * sv.b + hk * sv.h;
            transpose(k + b * sk.b + hk * sk.h, sk.t * sizeof(float), T, D, tp, kt);
            for (int64_t i0 = 0; i0 < T; i0 += RF) {
                const int64_t nr = T - i0 < RF ? T - i0 : RF, ncols = i0 + nr;
                for (int64_t r = 0; r < nr; r++)
                    for (int64_t d = 0; d < D; d++) qs[r * D + d] = qh[(i0 + r) * sq.t + d] * scale;
                if (nr < RF) memset(qs + nr * D, 0, sizeof(float) * (RF - nr) * D);
                vf mx[RF];
                for (int r = 0; r < RF; r++) mx[r] = splat(-INFINITY);
                for (int64_t c0 = 0; c0 < ncols; c0 += 2 * W) {       /* scores: RF rows x 2W keys per pass */
                    vf acc[RF][2] = {{{0}}};
                    for (int64_t d = 0; d < D; d++) {
                        vf k0 = load(kt + c0 * D + d * W), k1 = load(kt + (c0 + W) * D + d * W);
                        for (int r = 0; r < RF; r++) { acc[r][0] += qs[r * D + d] * k0; acc[r][1] += qs[r * D + d] * k1; }
                    }
                    for (int r = 0; r < RF; r++)
                        for (int j = 0; j < 2; j++) {
                            const int64_t cj = c0 + j * W;
                            if (cj + W - 1 > i0 + r) {                  /* keys past query i0 + r: -inf */
                                acc[r][j] = select(upto(cj, i0 + r), acc[r][j], splat(-INFINITY));
                            }
                            mx[r] = select(acc[r][j] > mx[r], acc[r][j], mx[r]);
                            store(s + r * tp + cj, acc[r][j]);
                        }
                }
                float inv[RF];
                for (int64_t r = 0; r < nr; r++) {                     /* softmax of row i over keys 0..i */
                    float *row = s + r * tp;
                    const float m = hmax(mx[r]);
                    vf l = {0};
                    for (int64_t c0 = 0; c0 < ncols; c0 += W) {
                        vf p = vexp2(load(row + c0) - m);
                        store(row + c0, p);
                        l += p;
                    }
                    const float sum = hsum(l);
                    inv[r] = 1.0f / sum;
                    lse[(b * H + h) * T + i0 + r] = (m + log2f(sum)) * LN2;
                }
                for (int64_t r = nr; r < RF; r++) { inv[r] = 0.0f; memset(s + r * tp, 0, sizeof(float) * tp); }
                for (int64_t d0 = 0; d0 < D; d0 += DC * W) {           /* O = P V, DC vectors of D at a time */
                    float *orow = o + ((b * T + i0) * H + h) * D + d0;
                    if (D - d0 >= DC * W) pv(s, tp, vh + d0, sv.t, ncols, nr, inv, orow, H * D, DC);
                    else pv(s, tp, vh + d0, sv.t, ncols, nr, inv, orow, H * D, 1);
                }
            }
        }
        free(kt); free(s); free(qs);
    }
}

void phitrain_attention_backward(const float *q, const float *k, const float *v, const float *o,
                                 const float *dout, const float *lse, float *dq, float *dk, float *dv,
                                 int64_t B, int64_t H, int64_t HKV, int64_t T, int64_t D,
                                 strides sq, strides sk, strides sv, strides sdo, int threads) {
    const int64_t tp = (T + W - 1) / W * W, group = H / HKV;
    const float scale = 1.0f / sqrtf((float)D), scale2 = LOG2E * scale;
#pragma omp parallel num_threads(threads)
    {
        float *kt = alloc(D * tp), *vt = alloc(D * tp), *gk = alloc(tp * D), *gv = alloc(tp * D);
        float *p = alloc(RB * tp), *ds = alloc(RB * tp), *qs = alloc(RB * D), *dos = alloc(RB * D);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bk = 0; bk < B * HKV; bk++) {
            const int64_t b = bk / HKV, hk = bk % HKV;
            const float *kh = k + b * sk.b + hk * sk.h;
            transpose(kh, sk.t * sizeof(float), T, D, tp, kt);
            transpose(v + b * sv.b + hk * sv.h, sv.t * sizeof(float), T, D, tp, vt);
            memset(gk, 0, sizeof(float) * tp * D);
            memset(gv, 0, sizeof(float) * tp * D);
            for (int64_t h = hk * group; h < (hk + 1) * group; h++) {
                const float *qh = q + b * sq.b + h * sq.h, *doh = dout + b * sdo.b + h * sdo.h;
                for (int64_t i0 = 0; i0 < T; i0 += RB) {
                    const int64_t nr = T - i0 < RB ? T - i0 : RB, ncols = i0 + nr;
                    float l[RB], delta[RB];   /* log-sum-exp in base 2; rowsum(dO ∘ O) */
                    for (int64_t r = 0; r < RB; r++) {
                        const int64_t i = i0 + r;
                        float dd = 0.0f;
                        if (r < nr)
                            for (int64_t d = 0; d < D; d++) {
                                qs[r * D + d] = qh[i * sq.t + d];
                                dos[r * D + d] = doh[i * sdo.t + d];
                                dd += dos[r * D + d] * o[((b * T + i) * H + h) * D + d];
                            }
                        else {
                            memset(qs + r * D, 0, sizeof(float) * D);
                            memset(dos + r * D, 0, sizeof(float) * D);
                        }
                        delta[r] = dd;
                        l[r] = r < nr ? lse[(b * H + h) * T + i] * LOG2E : INFINITY;
                    }
                    for (int64_t c0 = 0; c0 < ncols; c0 += W) {       /* P and dS, RB rows x W keys per pass */
                        vf sc[RB] = {{0}}, dp[RB] = {{0}};
                        for (int64_t d = 0; d < D; d++) {
                            vf kv = load(kt + c0 * D + d * W), vv = load(vt + c0 * D + d * W);
                            for (int r = 0; r < RB; r++) { sc[r] += qs[r * D + d] * kv; dp[r] += dos[r * D + d] * vv; }
                        }
                        for (int r = 0; r < RB; r++) {
                            vf pr = (vf)((vi)vexp2(sc[r] * scale2 - l[r]) & upto(c0, i0 + r));
                            store(p + r * tp + c0, pr);
                            store(ds + r * tp + c0, pr * (dp[r] - delta[r]) * scale);
                        }
                    }
                    for (int64_t d0 = 0; d0 < D; d0 += DC * W) {       /* DC vectors of D at a time */
                        float *dqrow = dq + ((b * T + i0) * H + h) * D + d0;
                        if (D - d0 >= DC * W) grads(p, ds, tp, qs + d0, dos + d0, D, kh + d0, sk.t, gk + d0, gv + d0, ncols, nr, dqrow, H * D, DC);
                        else grads(p, ds, tp, qs + d0, dos + d0, D, kh + d0, sk.t, gk + d0, gv + d0, ncols, nr, dqrow, H * D, 1);
                    }
                }
            }
            for (int64_t c = 0; c < T; c++) {
                memcpy(dk + ((b * T + c) * HKV + hk) * D, gk + c * D, sizeof(float) * D);
                memcpy(dv + ((b * T + c) * HKV + hk) * D, gv + c * D, sizeof(float) * D);
            }
        }
        free(kt); free(vt); free(gk); free(gv); free(p); free(ds); free(qs); free(dos);
    }
}

/* ---- bf16 inputs on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later) ---------------------
 *
 * Under bf16 autocast q, k, v arrive in bf16, and a bf16 flash kernel computes each of its matmuls
 * from bf16 operands with fp32 accumulation: scores = q kᵀ and O = P V with P rounded to bf16; in the
 * backward dP = dO Vᵀ, dV = Pᵀ dO, dQ = dS K, dK = dSᵀ Q with P and dS rounded to bf16. The softmax,
 * its sums, lse, rowsum(dO ∘ O) and the dK/dV sums stay fp32; O, dQ, dK, dV are rounded to bf16 once.
 * The same arithmetic here, on VDPBF16PS: each of its 16 fp32 lanes adds the products of a pair of
 * bf16 values, 32 products an instruction where an fp32 FMA does 16. So every operand is stored with
 * the two members of a pair of its reduction index side by side in one 32-bit word:
 *   along D (scores, dP): keys/values transposed in blocks of W keys as in the fp32 kernel, a word
 *     being two adjacent dims, and the query (or dO) row's word broadcast;
 *   along keys (O = P V, dQ = dS K): values/keys as words of two adjacent keys per dim, and the word
 *     of two adjacent P (dS) entries of a row broadcast;
 *   along queries (dV = Pᵀ dO, dK = dSᵀ Q): dO/q as words of two adjacent rows per dim, and the word
 *     of two rows' P (dS) for one key broadcast.
 * Layouts are the fp32 kernel's, with bf16 q, k, v, dO, O, dQ, dK, dV and fp32 lse. */
#if defined(__AVX512BF16__)
#define RBH 4 /* query rows per register block in the backward (an even number: pairs of rows) */

static bf16 *alloc_bf16(int64_t n) { return (bf16 *)alloc((n + 1) / 2); }
static inline __m512i loadw(const void *p) { return _mm512_loadu_si512(p); }
static inline __m512i bcast(const void *p) { word x; memcpy(&x, p, sizeof x); return _mm512_set1_epi32((int)x); }
/* acc + the products of each lane's pair of a and b */
static inline vf dot(vf acc, __m512i a, __m512i b) {
    return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
}
static inline __m256i to_bf16(vf x) { return (__m256i)_mm512_cvtneps_pbh((__m512)x); }   /* round to nearest even */
/* 16 words (a[j], b[j]) */
static inline __m512i interleave(__m256i a, __m256i b) {
    return _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

/* Rows in pairs of keys: xp[c D + 2 d + e] = x[c + e, d] for even c (zero past T), tp even. */
static void pair_keys(const bf16 *x, int64_t st, int64_t T, int64_t D, int64_t tp, bf16 *xp) {
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t c = 0; c < tp; c += 2)
        for (int64_t d0 = 0; d0 < D; d0 += W) {
            __m256i a = c < T ? _mm256_loadu_si256((const __m256i *)(x + c * st + d0)) : zero;
            __m256i b = c + 1 < T ? _mm256_loadu_si256((const __m256i *)(x + (c + 1) * st + d0)) : zero;
            _mm512_storeu_si512(xp + c * D + 2 * d0, interleave(a, b));
        }
}

/* rows r < nr of O (stride so apart) = inv[r] * sum_c p[r, c] v[c] over npairs pairs of keys (vp: pairs
 * of keys, offset to this pass's first dim), nd vectors of D */
static inline __attribute__((always_inline)) void pv_bf16(const bf16 *p, int64_t tp, const bf16 *vp, int64_t D,
                                                           int64_t npairs, int64_t nr, const float *inv, bf16 *o,
                                                           int64_t so, const int nd) {
    vf acc[RF][DC] = {{{0}}};
    for (int64_t c = 0; c < 2 * npairs; c += 2) {
        __m512i vv[DC];
        for (int j = 0; j < nd; j++) vv[j] = loadw(vp + c * D + 2 * j * W);
        for (int r = 0; r < RF; r++) {
            const __m512i pr = bcast(p + r * tp + c);
            for (int j = 0; j < nd; j++) acc[r][j] = dot(acc[r][j], vv[j], pr);
        }
    }
    for (int64_t r = 0; r < nr; r++)
        for (int j = 0; j < nd; j++) store_bf16(o + r * so + j * W, acc[r][j] * inv[r]);
}

/* For one block of RBH query rows: dQ rows (stride so apart) = sum_c dS[r, c] k[c] (kp: pairs of keys);
 * for every key c, dK[c] += sum_r dS[r, c] q[r] and dV[c] += sum_r P[r, c] dO[r] (qr, dor: pairs of
 * rows; dsr, pr: the two rows' dS and P for each key); nd vectors of D, all offset to this pass's dims */
static inline __attribute__((always_inline)) void grads_bf16(const bf16 *dsb, const word *dsr, const word *pr,
                                                              int64_t tp, const word *qr, const word *dor,
                                                              int64_t D, const bf16 *kp, float *gk, float *gv,
                                                              int64_t npairs, int64_t nr, bf16 *dq, int64_t so,
                                                              const int nd) {
    vf acc[RBH][DC] = {{{0}}};
    __m512i qv[RBH / 2][DC], dov[RBH / 2][DC];
    for (int rp = 0; rp < RBH / 2; rp++)
        for (int j = 0; j < nd; j++) { qv[rp][j] = loadw(qr + rp * D + j * W); dov[rp][j] = loadw(dor + rp * D + j * W); }
    for (int64_t c = 0; c < 2 * npairs; c += 2) {
        __m512i kv[DC];
        for (int j = 0; j < nd; j++) kv[j] = loadw(kp + c * D + 2 * j * W);
        for (int r = 0; r < RBH; r++) {                                   /* dQ = dS K */
            const __m512i s = bcast(dsb + r * tp + c);
            for (int j = 0; j < nd; j++) acc[r][j] = dot(acc[r][j], kv[j], s);
        }
        for (int64_t e = c; e < c + 2; e++) {
            vf a[DC], b[DC];
            for (int j = 0; j < nd; j++) { a[j] = load(gk + e * D + j * W); b[j] = load(gv + e * D + j * W); }
            for (int rp = 0; rp < RBH / 2; rp++) {
                const __m512i s = _mm512_set1_epi32((int)dsr[rp * tp + e]), p = _mm512_set1_epi32((int)pr[rp * tp + e]);
                for (int j = 0; j < nd; j++) {
                    a[j] = dot(a[j], qv[rp][j], s);                          /* dK += dSᵀ Q */
                    b[j] = dot(b[j], dov[rp][j], p);                         /* dV += Pᵀ dO */
                }
            }
            for (int j = 0; j < nd; j++) { store(gk + e * D + j * W, a[j]); store(gv + e * D + j * W, b[j]); }
        }
    }
    for (int64_t r = 0; r < nr; r++)
        for (int j = 0; j < nd; j++) store_bf16(dq + r * so + j * W, acc[r][j]);
}

int phitrain_attention_has_bf16(void) { return 1; }

void phitrain_attention_forward_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse,
                                     int64_t B, int64_t H, int64_t HKV, int64_t T, int64_t D,
                                     strides sq, strides sk, strides sv, int threads) {
    const int64_t tp = (T + 2 * W - 1) / (2 * W) * (2 * W), group = H / HKV, D2 = D / 2;
    const float scale = LOG2E / sqrtf((float)D);   /* applied to the fp32 scores: base 2, as the fp32 kernel */
#pragma omp parallel num_threads(threads)
    {
        bf16 *kt = alloc_bf16(D * tp), *vp = alloc_bf16(D * tp), *pb = alloc_bf16(RF * tp), *qs = alloc_bf16(RF * D);
        float *s = alloc(RF * tp);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H, hk = h / group;
            const bf16 *qh = q + b * sq.b + h * sq.h;
            transpose(k + b * sk.b + hk * sk.h, sk.t * sizeof(bf16), T, D2, tp, kt);   /* words of two dims */
            pair_keys(v + b * sv.b + hk * sv.h, sv.t, T, D, tp, vp);
            for (int64_t i0 = 0; i0 < T; i0 += RF) {
                const int64_t nr = T - i0 < RF ? T - i0 : RF, ncols = i0 + nr;
                for (int64_t r = 0; r < RF; r++)
                    if (r < nr) memcpy(qs + r * D, qh + (i0 + r) * sq.t, sizeof(bf16) * D);
                    else memset(qs + r * D, 0, sizeof(bf16) * D);
                vf mx[RF];
                for (int r = 0; r < RF; r++) mx[r] = splat(-INFINITY);
                for (int64_t c0 = 0; c0 < ncols; c0 += 2 * W) {       /* scores: RF rows x 2W keys per pass */
                    vf acc[RF][2] = {{{0}}};
                    for (int64_t d = 0; d < D2; d++) {
                        const __m512i k0 = loadw(kt + c0 * D + 2 * d * W), k1 = loadw(kt + (c0 + W) * D + 2 * d * W);
                        for (int r = 0; r < RF; r++) {
                            const __m512i qr = bcast(qs + r * D + 2 * d);
                            acc[r][0] = dot(acc[r][0], k0, qr);
                            acc[r][1] = dot(acc[r][1], k1, qr);
                        }
                    }
                    for (int r = 0; r < RF; r++)
                        for (int j = 0; j < 2; j++) {
                            const int64_t cj = c0 + j * W;
                            if (cj + W - 1 > i0 + r) acc[r][j] = select(upto(cj, i0 + r), acc[r][j], splat(-INFINITY));
                            mx[r] = select(acc[r][j] > mx[r], acc[r][j], mx[r]);
                            store(s + r * tp + cj, acc[r][j]);
                        }
                }
                float inv[RF];
                for (int64_t r = 0; r < nr; r++) {                     /* softmax in fp32; P rounded to bf16 */
                    const float *row = s + r * tp;
                    const float m = hmax(mx[r]) * scale;
                    vf l = {0};
                    for (int64_t c0 = 0; c0 < ncols; c0 += W) {
                        vf p = vexp2(load(row + c0) * scale - m);
                        store_bf16(pb + r * tp + c0, p);
                        l += p;
                    }
                    const float sum = hsum(l);
                    inv[r] = 1.0f / sum;
                    lse[(b * H + h) * T + i0 + r] = (m + log2f(sum)) * LN2;
                }
                for (int64_t r = nr; r < RF; r++) { inv[r] = 0.0f; memset(pb + r * tp, 0, sizeof(bf16) * tp); }
                const int64_t npairs = (ncols + 1) / 2;                 /* P is zero past the causal limit */
                for (int64_t d0 = 0; d0 < D; d0 += DC * W) {
                    bf16 *orow = o + ((b * T + i0) * H + h) * D + d0;
                    if (D - d0 >= DC * W) pv_bf16(pb, tp, vp + 2 * d0, D, npairs, nr, inv, orow, H * D, DC);
                    else pv_bf16(pb, tp, vp + 2 * d0, D, npairs, nr, inv, orow, H * D, 1);
                }
            }
        }
        free(kt); free(vp); free(pb); free(qs); free(s);
    }
}

void phitrain_attention_backward_bf16(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *o,
                                      const bf16 *dout, const float *lse, bf16 *dq, bf16 *dk, bf16 *dv,
                                      int64_t B, int64_t H, int64_t HKV, int64_t T, int64_t D,
                                      strides sq, strides sk, strides sv, strides sdo, int threads) {
    const int64_t tp = (T + W - 1) / W * W, group = H / HKV, D2 = D / 2;
    const float scale = 1.0f / sqrtf((float)D), scale2 = LOG2E * scale;
#pragma omp parallel num_threads(threads)
    {
        bf16 *kt = alloc_bf16(D * tp), *vt = alloc_bf16(D * tp), *kp = alloc_bf16(D * tp);
        bf16 *qs = alloc_bf16(RBH * D), *dos = alloc_bf16(RBH * D), *dsb = alloc_bf16(RBH * tp);
        word *qr = (word *)alloc(RBH / 2 * D), *dor = (word *)alloc(RBH / 2 * D);
        word *pr = (word *)alloc(RBH / 2 * tp), *dsr = (word *)alloc(RBH / 2 * tp);
        float *gk = alloc(tp * D), *gv = alloc(tp * D);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bk = 0; bk < B * HKV; bk++) {
            const int64_t b = bk / HKV, hk = bk % HKV;
            const bf16 *kh = k + b * sk.b + hk * sk.h;
            transpose(kh, sk.t * sizeof(bf16), T, D2, tp, kt);
            transpose(v + b * sv.b + hk * sv.h, sv.t * sizeof(bf16), T, D2, tp, vt);
            pair_keys(kh, sk.t, T, D, tp, kp);
            memset(gk, 0, sizeof(float) * tp * D);
            memset(gv, 0, sizeof(float) * tp * D);
            for (int64_t h = hk * group; h < (hk + 1) * group; h++) {
                const bf16 *qh = q + b * sq.b + h * sq.h, *doh = dout + b * sdo.b + h * sdo.h;
                for (int64_t i0 = 0; i0 < T; i0 += RBH) {
                    const int64_t nr = T - i0 < RBH ? T - i0 : RBH, ncols = i0 + nr;
                    float l[RBH], delta[RBH];   /* log-sum-exp in base 2; rowsum(dO ∘ O) */
                    for (int64_t r = 0; r < RBH; r++) {
                        const int64_t i = i0 + r;
                        vf dd = {0};
                        if (r < nr) {
                            memcpy(qs + r * D, qh + i * sq.t, sizeof(bf16) * D);
                            memcpy(dos + r * D, doh + i * sdo.t, sizeof(bf16) * D);
                            for (int64_t d0 = 0; d0 < D; d0 += W)
                                dd += load_bf16(dos + r * D + d0) * load_bf16(o + ((b * T + i) * H + h) * D + d0);
                        } else {
                            memset(qs + r * D, 0, sizeof(bf16) * D);
                            memset(dos + r * D, 0, sizeof(bf16) * D);
                        }
                        delta[r] = hsum(dd);
                        l[r] = r < nr ? lse[(b * H + h) * T + i] * LOG2E : INFINITY;
                    }
                    for (int rp = 0; rp < RBH / 2; rp++)                /* q and dO in pairs of rows */
                        for (int64_t d0 = 0; d0 < D; d0 += W) {
                            const bf16 *q0 = qs + 2 * rp * D + d0, *o0 = dos + 2 * rp * D + d0;
                            _mm512_storeu_si512(qr + rp * D + d0, interleave(_mm256_loadu_si256((const __m256i *)q0),
                                                                             _mm256_loadu_si256((const __m256i *)(q0 + D))));
                            _mm512_storeu_si512(dor + rp * D + d0, interleave(_mm256_loadu_si256((const __m256i *)o0),
                                                                              _mm256_loadu_si256((const __m256i *)(o0 + D))));
                        }
                    for (int64_t c0 = 0; c0 < ncols; c0 += W) {       /* P and dS, RBH rows x W keys per pass */
                        vf sc[RBH] = {{0}}, dp[RBH] = {{0}}, pv[RBH];
                        for (int64_t d = 0; d < D2; d++) {
                            const __m512i kv = loadw(kt + c0 * D + 2 * d * W), vv = loadw(vt + c0 * D + 2 * d * W);
                            for (int r = 0; r < RBH; r++) {
                                sc[r] = dot(sc[r], kv, bcast(qs + r * D + 2 * d));
                                dp[r] = dot(dp[r], vv, bcast(dos + r * D + 2 * d));
                            }
                        }
                        for (int r = 0; r < RBH; r++) {
                            pv[r] = (vf)((vi)vexp2(sc[r] * scale2 - l[r]) & upto(c0, i0 + r));
                            dp[r] = pv[r] * (dp[r] - delta[r]) * scale;          /* dS */
                            store_bf16(dsb + r * tp + c0, dp[r]);
                        }
                        for (int rp = 0; rp < RBH / 2; rp++) {
                            _mm512_storeu_si512(pr + rp * tp + c0, interleave(to_bf16(pv[2 * rp]), to_bf16(pv[2 * rp + 1])));
                            _mm512_storeu_si512(dsr + rp * tp + c0, interleave(to_bf16(dp[2 * rp]), to_bf16(dp[2 * rp + 1])));
                        }
                    }
                    const int64_t npairs = (ncols + 1) / 2;             /* P, dS are zero past the causal limit */
                    for (int64_t d0 = 0; d0 < D; d0 += DC * W) {
                        bf16 *dqrow = dq + ((b * T + i0) * H + h) * D + d0;
                        if (D - d0 >= DC * W)
                            grads_bf16(dsb, dsr, pr, tp, qr + d0, dor + d0, D, kp + 2 * d0, gk + d0, gv + d0, npairs, nr, dqrow, H * D, DC);
                        else
                            grads_bf16(dsb, dsr, pr, tp, qr + d0, dor + d0, D, kp + 2 * d0, gk + d0, gv + d0, npairs, nr, dqrow, H * D, 1);
                    }
                }
            }
            for (int64_t c = 0; c < T; c++)
                for (int64_t d0 = 0; d0 < D; d0 += W) {
                    store_bf16(dk + ((b * T + c) * HKV + hk) * D + d0, load(gk + c * D + d0));
                    store_bf16(dv + ((b * T + c) * HKV + hk) * D + d0, load(gv + c * D + d0));
                }
        }
        free(kt); free(vt); free(kp); free(qs); free(dos); free(dsb); free(qr); free(dor); free(pr); free(dsr);
        free(gk); free(gv);
    }
}
#else
int phitrain_attention_has_bf16(void) { return 0; }
#endif
