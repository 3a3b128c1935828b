/* styletune's CPU kernels for the work of a decode step between its matrix products, and (on x86-64
 * CPUs with AVX-512 VNNI or AVX2, at the end of this file) for its int4 and int8 products.
 *
 * At one token per row, the norms, the rotation, attention and the SwiGLU gate of a 135M model (GPT-2's
 * LayerNorm, attention and GELU likewise) are a few thousand floats each: PyTorch spends far longer
 * dispatching them (about 35 operations per layer, a few microseconds each) than computing them. These
 * do each group of them in one call, on the step's own buffers (see kernels.py, which builds this file
 * on first use with the system's C compiler, for this machine, and fast.py, whose step calls it).
 *
 * Arithmetic is in fp32, as the PyTorch step's; tensors the products read or write may be bf16
 * (dtype code 2) or fp32 (code 1), rounded to nearest even as torch rounds them.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { F32 = 1, BF16 = 2 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* n values of src (dtype dt) from element `at`, into dst as fp32 */
static void load(const void *src, int dt, long at, int n, float *dst) {
    if (dt == BF16) {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)src + at, sizeof(float) * n);
    }
}

/* n fp32 values into dst (dtype dt) from element `at` */
static void store(const float *src, int n, void *dst, int dt, long at) {
    if (dt == BF16) {
        uint16_t *d = (uint16_t *)dst + at;
        for (int i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)dst + at, src, sizeof(float) * n);
    }
}

/* exp(x): Cody-Waite range reduction and Cephes' degree-6 polynomial (within 2 ulp), written so that
 * the compiler vectorises the loops that call it (check with -fopt-info-vec). */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x; /* comparisons, not fminf/fmaxf: those keep loops from vectorising */
    x = x > 88.0f ? 88.0f : x;
    /* n = round(x / ln 2), by adding and taking away 1.5 * 2^23 (floorf would keep loops scalar) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* Row b of x (B, C), fp32, updated in place: x += add (dtype add_dt; none where add_dt is 0). */
static inline float *add_row(float *x, const void *add, int add_dt, int b, int C, float *scratch) {
    float *xb = x + (long)b * C;
    if (add_dt) {
        load(add, add_dt, (long)b * C, C, scratch);
        for (int i = 0; i < C; i++) xb[i] += scratch[i];
    }
    return xb;
}

/* For each of B rows of x (B, C), fp32, updated in place: x += add (dtype add_dt; none where add_dt is
 * 0), then out = w * (x * rsqrt(mean(x^2) + eps)) (Llama's RMSNorm), written in dtype out_dt. */
void st_add_rms(float *x, const void *add, int add_dt, const float *w, void *out, int out_dt,
                int B, int C, float eps, float *scratch) {
    for (int b = 0; b < B; b++) {
        float *xb = add_row(x, add, add_dt, b, C, scratch);
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < C; i++) ss += xb[i] * xb[i];
        float r = 1.0f / sqrtf(ss / (float)C + eps);
        for (int i = 0; i < C; i++) scratch[i] = w[i] * (xb[i] * r);
        store(scratch, C, out, out_dt, (long)b * C);
    }
}

/* out (B, I) = silu(gu[:, :I]) * gu[:, I:] (SwiGLU after one product for gate and up), gu in dtype
 * in_dt, out in out_dt. */
void st_silu_mul(const void *gu, int in_dt, void *out, int out_dt, int B, int I, float *scratch) {
    float *g = scratch, *u = scratch + I;
    for (int b = 0; b < B; b++) {
        load(gu, in_dt, (long)b * 2 * I, 2 * I, g);
#pragma omp simd
        for (int i = 0; i < I; i++) g[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
        store(g, I, out, out_dt, (long)b * I);
    }
}

/* As st_add_rms with LayerNorm (GPT-2's): out = (x - mean(x)) * rsqrt(var(x) + eps) * w + bias, the
 * variance the biased one, as torch's layer_norm. */
void st_add_layer_norm(float *x, const void *add, int add_dt, const float *w, const float *bias, void *out,
                       int out_dt, int B, int C, float eps, float *scratch) {
    for (int b = 0; b < B; b++) {
        float *xb = add_row(x, add, add_dt, b, C, scratch);
        float sum = 0.0f, ss = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < C; i++) sum += xb[i];
        const float mean = sum / (float)C;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < C; i++) ss += (xb[i] - mean) * (xb[i] - mean);
        const float r = 1.0f / sqrtf(ss / (float)C + eps);
        for (int i = 0; i < C; i++) scratch[i] = (xb[i] - mean) * r * w[i] + bias[i];
        store(scratch, C, out, out_dt, (long)b * C);
    }
}

/* out (B, I) = gelu(in) with the tanh approximation (GPT-2's "gelu_new"):
 * 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), computed as x / (1 + exp(-2u)), the same
 * function in one exp. in in dtype in_dt, out in out_dt; scratch holds I floats. */
void st_gelu_tanh(const void *in, int in_dt, void *out, int out_dt, int B, int I, float *scratch) {
    for (int b = 0; b < B; b++) {
        load(in, in_dt, (long)b * I, I, scratch);
#pragma omp simd
        for (int i = 0; i < I; i++) {
            const float x = scratch[i], u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            scratch[i] = x / (1.0f + exp_f32(-2.0f * u));
        }
        store(scratch, I, out, out_dt, (long)b * I);
    }
}

/* One token per row b of a batch, after the q/k/v product r (B, H + 2K, D), in dtype r_dt:
 *  - rotate its q and k heads at position pos[b] (tables cos and sin_signed (positions, D): rotate_half
 *    with the first half's sign folded into sin_signed), q also multiplied by `scale`; where cos is NULL
 *    (learned positions, GPT-2's), no rotation: q is multiplied by `scale` only;
 *  - write its k and v heads into slot slots[b] of the cache kv (2, S, K, T, D) at position
 *    wpos[b * wstride];
 *  - attend, each q head h to kv head h / (H / K), over the first `upto` positions of the slot (those
 *    where mask (B, upto) is nonzero, or all where mask is NULL), softmax in fp32;
 *  - write the heads' outputs to out (B, H * D) in dtype out_dt.
 * scratch holds (H + 2K) * D + (H / K) * (T + D) floats. */
static inline __attribute__((always_inline)) void
rope_attend(const void *r, int r_dt, const int64_t *pos, const float *cos, const float *sin_signed,
            float *kv, int S, int T, const int64_t *slots, const int64_t *wpos, int wstride,
            const uint8_t *mask, int upto, void *out, int out_dt,
            int B, int H, int K, int D, float scale, float *scratch) {
    const int G = H / K, half = D / 2, heads = H + 2 * K;
    float *row = scratch;                  /* (heads, D): this row's q, k, v heads */
    float *scores = row + heads * D;       /* (G, T) */
    float *acc = scores + (long)G * T;     /* (G, D) */
    const long plane = (long)S * K * T * D; /* keys, then values */
    for (int b = 0; b < B; b++) {
        load(r, r_dt, (long)b * heads * D, heads * D, row);
        const long slot = slots[b], at = wpos[(long)b * wstride];
        if (cos) {
            const float *c = cos + pos[b] * D, *s = sin_signed + pos[b] * D;
            for (int h = 0; h < H + K; h++) { /* v * cos + rotate_half(v) * sin, in place */
                float *v = row + (long)h * D;
                const float a = h < H ? scale : 1.0f;
                for (int j = 0; j < half; j++) {
                    const float lo = v[j], hi = v[j + half];
                    v[j] = lo * (c[j] * a) + hi * (s[j] * a);
                    v[j + half] = hi * (c[j + half] * a) + lo * (s[j + half] * a);
                }
            }
        } else {
            for (int i = 0; i < H * D; i++) row[i] *= scale;
        }
        for (int kh = 0; kh < K; kh++) {
            float *cell = kv + ((slot * K + kh) * T + at) * D;
            memcpy(cell, row + (long)(H + kh) * D, sizeof(float) * D);
            memcpy(cell + plane, row + (long)(H + K + kh) * D, sizeof(float) * D);
        }
        const uint8_t *allowed = mask ? mask + (long)b * upto : NULL;
        for (int kh = 0; kh < K; kh++) {
            const float *keys = kv + (slot * K + kh) * (long)T * D, *values = keys + plane;
            const float *q = row + (long)kh * G * D;
            for (int t = 0; t < upto; t++) {
                const float *k = keys + (long)t * D;
                for (int g = 0; g < G; g++) {
                    const float *qg = q + (long)g * D;
                    float d = 0.0f;
#pragma omp simd reduction(+ : d)
                    for (int j = 0; j < D; j++) d += qg[j] * k[j];
                    scores[(long)g * T + t] = d;
                }
            }
            if (allowed)
                for (int t = 0; t < upto; t++)
                    if (!allowed[t])
                        for (int g = 0; g < G; g++) scores[(long)g * T + t] = -INFINITY;
            for (int g = 0; g < G; g++) {
                float *sg = scores + (long)g * T, m = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : m)
                for (int t = 0; t < upto; t++) m = sg[t] > m ? sg[t] : m;
#pragma omp simd reduction(+ : sum)
                for (int t = 0; t < upto; t++) {
                    float e = sg[t] == -INFINITY ? 0.0f : exp_f32(sg[t] - m);
                    sg[t] = e;
                    sum += e;
                }
                for (int t = 0; t < upto; t++) sg[t] /= sum;
            }
            memset(acc, 0, sizeof(float) * G * D);
            for (int t = 0; t < upto; t++) {
                const float *v = values + (long)t * D;
                for (int g = 0; g < G; g++) {
                    const float p = scores[(long)g * T + t];
                    float *ag = acc + (long)g * D;
#pragma omp simd
                    for (int j = 0; j < D; j++) ag[j] += p * v[j];
                }
            }
            store(acc, G * D, out, out_dt, (long)b * H * D + (long)kh * G * D);
        }
    }
}

/* The head size and the query heads per KV head as constants where they are the common ones, so that
 * the compiler unrolls and vectorises the loops over them without remainders: about half the time of
 * the general code for SmolLM2's heads (64 wide, 3 per KV head), measured in a C harness. */
void st_rope_attend(const void *r, int r_dt, const int64_t *pos, const float *cos, const float *sin_signed,
                    float *kv, int S, int T, const int64_t *slots, const int64_t *wpos, int wstride,
                    const uint8_t *mask, int upto, void *out, int out_dt,
                    int B, int H, int K, int D, float scale, float *scratch) {
#define ROPE_ATTEND(h, d) rope_attend(r, r_dt, pos, cos, sin_signed, kv, S, T, slots, wpos, wstride, mask, upto, \
                                      out, out_dt, B, h, K, d, scale, scratch)
    if (D == 64 && H == 3 * K) ROPE_ATTEND(3 * K, 64);
    else if (D == 64 && H == 4 * K) ROPE_ATTEND(4 * K, 64);
    else if (D == 64) ROPE_ATTEND(H, 64);
    else if (D == 128 && H == 4 * K) ROPE_ATTEND(4 * K, 128);
    else if (D == 128) ROPE_ATTEND(H, 128);
    else ROPE_ATTEND(H, D);
#undef ROPE_ATTEND
}

/* A LoRA-tuned projection after its base product: out (B, N), fp32, = y + (x @ a_t) @ b_t, where y (B, N)
 * is the base product (dtype y_dt), x (B, In) its input (dtype x_dt), and a_t (In, R), b_t (R, N) the
 * update's two factors, fp32. scratch holds In + R floats. */
void st_low_rank(const void *x, int x_dt, const float *a_t, const float *b_t, const void *y, int y_dt,
                 float *out, int B, int In, int R, int N, float *scratch) {
    float *xr = scratch, *t = scratch + In;
    for (int b = 0; b < B; b++) {
        load(x, x_dt, (long)b * In, In, xr);
        memset(t, 0, sizeof(float) * R);
        for (int i = 0; i < In; i++) {
            const float xi = xr[i], *a = a_t + (long)i * R;
#pragma omp simd
            for (int r = 0; r < R; r++) t[r] += xi * a[r];
        }
        float *o = out + (long)b * N;
        load(y, y_dt, (long)b * N, N, o);
        for (int r = 0; r < R; r++) {
            const float tr = t[r], *row = b_t + (long)r * N;
#pragma omp simd
            for (int n = 0; n < N; n++) o[n] += tr * row[n];
        }
    }
}

/* ---- Products of group-wise int4 and int8 matrices with int8 activations ----
 *
 * A weight matrix (N, In) in groups of 32 inputs, each with an fp16 scale s (and for int4 a center z):
 * int4 w = (q - 8) * s + z, q in 0..15 (the grid of a Q4_0/Q4_1 GGUF, as fast._int4_groups reads it);
 * int8 w = q * s, q in -127..127 (Q8_0's). Each input row is quantised per group of 32 to int8, x ~ qx * d
 * with d = max|x| / 127 (llama.cpp's Q8 activations), and in a second pass (fast.py takes two) the
 * remainder the same way, so that each group's dot product is one or two runs of integer multiply-adds
 * (AVX-512 VNNI: 64 a instruction; AVX2: 32 in two); the int4 center is applied to the exact sum. One pass moved the
 * bundled model's perplexity on the tests' passage by +1.1%; two by less than 0.01%, for about 4% more
 * time on the products (bound by reading the weights from memory).
 * Per 16 output rows ("a block", one vector of 16 sums), the codes are interleaved so that one 64-byte
 * load holds 4 consecutive inputs of each of the 16 rows: int4 codes, a byte holding inputs c..c+3 in
 * its low nibbles and c+4..c+7 in its high ones (so 8 inputs a load); int8 codes stored as q + 128.
 * Scales (and centers) are per block and group: 16 fp16 scales, then for int4 16 fp16 centers.
 * fast._pack_int4 and fast._pack_int8 lay them out, and say the same in PyTorch terms.
 */
#define QGROUP 32

/* A row's int8 activations: per group of 32 inputs, `passes` (1 or 2) runs of codes q_p with scales d_p and
 * the codes' sums, x ~ q_0 * d_0 + q_1 * d_1 (the second pass, where taken, the first's remainder: about
 * 15 bits in all, finer than the bf16 inputs of PyTorch's int4 kernel), and the group's exact sum. */
typedef struct {
    int8_t *q[2];
    float *d[2], *qsum[2], *xs;
} acts_t;

static __attribute__((unused)) void quantize_rows(const void *x, int x_dt, int B, int In, int passes, const acts_t *a,
                                                  float *row) {
    const int G = In / QGROUP;
    for (int b = 0; b < B; b++) {
        load(x, x_dt, (long)b * In, In, row);
        for (int g = 0; g < G; g++) {
            float *v = row + g * QGROUP, sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < QGROUP; i++) sum += v[i];
            a->xs[(long)b * G + g] = sum;
            for (int p = 0; p < passes; p++) { /* v: then the remainder of the first pass */
                float amax = 0.0f;
#pragma omp simd reduction(max : amax)
                for (int i = 0; i < QGROUP; i++) {
                    const float m = v[i] < 0 ? -v[i] : v[i];
                    amax = m > amax ? m : amax;
                }
                const float d = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
                int8_t *q = a->q[p] + (long)b * In + g * QGROUP;
                int isum = 0;
#pragma omp simd reduction(+ : isum)
                for (int i = 0; i < QGROUP; i++) { /* round to nearest even, as exp_f32's trick */
                    const int c = (int)((v[i] * inv + 12582912.0f) - 12582912.0f);
                    q[i] = (int8_t)c;
                    isum += c;
                    v[i] -= (float)c * d;
                }
                a->d[p][(long)b * G + g] = d;
                a->qsum[p][(long)b * G + g] = (float)isum;
            }
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define INT_PRODUCTS 512

static inline __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* RB blocks from `blk` (16 * RB output rows) times NR input rows (from row j0), PASSES runs of activation
 * codes: RB * NR * PASSES * 2 independent integer sums, so that the multiply-adds do not wait on each
 * other. bits is 4 or 8. */
static inline __attribute__((always_inline)) void
int_tile(const uint8_t *codes, const uint16_t *sc, const acts_t *a, long j0, float *y, int In, int N, long blk,
         const int RB, const int NR, const int PASSES, const int bits) {
    const int G = In / QGROUP, per = bits == 4 ? 8 : 4, loads = QGROUP / per; /* inputs per load, loads per group */
    const long block_bytes = (long)In / per * 64, sc_stride = bits == 4 ? 32 : 16;
    const float offset = bits == 4 ? 8.0f : 128.0f; /* int4 codes are q, int8 ones q + 128 */
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512 acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < NR; j++) acc[r][j] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512i s[4][4][2][2];
        for (int r = 0; r < RB; r++)
            for (int j = 0; j < NR; j++)
                for (int p = 0; p < PASSES; p++) s[r][j][p][0] = s[r][j][p][1] = _mm512_setzero_si512();
        for (int c = 0; c < loads; c++) {
            for (int r = 0; r < RB; r++) {
                const uint8_t *at = codes + (blk + r) * block_bytes + ((long)g * loads + c) * 64;
                /* the next tile's line: the weights stream from memory, once a token */
                _mm_prefetch((const char *)(at + RB * block_bytes), _MM_HINT_T0);
                const __m512i w = _mm512_loadu_si512(at);
                const __m512i lo = bits == 4 ? _mm512_and_si512(w, m4) : w;
                const __m512i hi = bits == 4 ? _mm512_and_si512(_mm512_srli_epi16(w, 4), m4) : w;
                for (int j = 0; j < NR; j++)
                    for (int p = 0; p < PASSES; p++) {
                        const int8_t *xp = a->q[p] + (j0 + j) * In + g * QGROUP + c * per;
                        if (bits == 4) {
                            s[r][j][p][0] = _mm512_dpbusd_epi32(s[r][j][p][0], lo, bcast4(xp));
                            s[r][j][p][1] = _mm512_dpbusd_epi32(s[r][j][p][1], hi, bcast4(xp + 4));
                        } else {
                            s[r][j][p][c & 1] = _mm512_dpbusd_epi32(s[r][j][p][c & 1], w, bcast4(xp));
                        }
                    }
            }
        }
        for (int r = 0; r < RB; r++) {
            const uint16_t *p16 = sc + ((blk + r) * G + g) * sc_stride;
            _mm_prefetch((const char *)(p16 + RB * G * sc_stride), _MM_HINT_T0);
            const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p16));
            for (int j = 0; j < NR; j++) {
                const long jg = (j0 + j) * G + g;
                for (int p = 0; p < PASSES; p++) { /* (sum(codes * qx) - offset * sum(qx)) * scale * d */
                    const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s[r][j][p][0], s[r][j][p][1]));
                    const __m512 centered = _mm512_sub_ps(dot, _mm512_set1_ps(offset * a->qsum[p][jg]));
                    acc[r][j] = _mm512_fmadd_ps(centered, _mm512_mul_ps(scale, _mm512_set1_ps(a->d[p][jg])), acc[r][j]);
                }
                if (bits == 4) { /* + center * the exact sum */
                    const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p16 + 16)));
                    acc[r][j] = _mm512_fmadd_ps(z, _mm512_set1_ps(a->xs[jg]), acc[r][j]);
                }
            }
        }
    }
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < NR; j++) _mm512_storeu_ps(y + (j0 + j) * N + (blk + r) * 16, acc[r][j]);
}
#define INT_RB1 4 /* blocks per tile at one input row */

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define INT_PRODUCTS 256

static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* The same tile with AVX2 alone (no VNNI: AMD's Zen 2 and 3, Intel's Haswell to Comet Lake): each block as
 * two vectors of 8 rows, the first and second 32 bytes of each 64-byte load, and each 4-input integer
 * multiply-add as two instructions. int4: vpmaddubsw (codes 0..15 times qx, adjacent pairs summed to int16,
 * at most 2 * 15 * 127 = 3810, no saturation), summed in int16 over a group (8 of them: at most 30480),
 * then vpmaddwd by 1 to int32 once a group. int8: the codes turned back into q (xor 128, so offset 0) and
 * multiplied as llama.cpp's AVX2 Q8_0 product does, |qx| times q with qx's sign (pairs at most
 * 2 * 127 * 127 = 32258), then vpmaddwd by 1 to int32 each load: the AVX-512 tile's integer sums, and the
 * same float arithmetic after them. Several input rows (int_tile_rows): one half of each load a sweep, the
 * sums so far waiting in y, not in registers (AVX2 has 16, and the sums take up to 8: kept in registers,
 * they were spilled inside the loop, and eight rows took 16% longer). At one row the products read the
 * weights at the speed memory gives them; at four or more they wait on vpmaddubsw (about one a cycle
 * measured), and fp16 weights through FBGEMM (fp32 multiply-adds) run about as fast. */
/* s plus the products of one 32-byte half of a load (int4: its low and high nibbles lo and hi; int8: its
 * codes as q) with the activation codes at xp, 4 (int8) or 8 (int4) of them. */
static inline __attribute__((always_inline)) __m256i
dot_add(__m256i s, __m256i lo, __m256i hi, __m256i q, const int8_t *xp, const int bits) {
    if (bits == 4)
        return _mm256_add_epi16(s, _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xp)),
                                                    _mm256_maddubs_epi16(hi, bcast4(xp + 4))));
    const __m256i xb = bcast4(xp);
    const __m256i d = _mm256_maddubs_epi16(_mm256_sign_epi8(xb, xb), _mm256_sign_epi8(q, xb));
    return _mm256_add_epi32(s, _mm256_madd_epi16(d, _mm256_set1_epi16(1)));
}

/* A group's sums s[p] for one input row (activation figures at jg) and 8 outputs (their scales, and for int4
 * centers 16 further, at p16), scaled and added to out, y's sums so far (the first group's start them). */
static inline __attribute__((always_inline)) void
half_out(const __m256i *s, const uint16_t *p16, const acts_t *a, long jg, float *out, int g, const int PASSES,
         const int bits) {
    const float offset = bits == 4 ? 8.0f : 0.0f; /* int4 codes are q + 8; int8 ones q (turned back) */
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p16));
    __m256 acc = g == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out);
    for (int p = 0; p < PASSES; p++) {
        const __m256i sum = bits == 4 ? _mm256_madd_epi16(s[p], _mm256_set1_epi16(1)) : s[p];
        const __m256 centered = _mm256_sub_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(offset * a->qsum[p][jg]));
        acc = _mm256_fmadd_ps(centered, _mm256_mul_ps(scale, _mm256_set1_ps(a->d[p][jg])), acc);
    }
    if (bits == 4) {
        const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p16 + 16)));
        acc = _mm256_fmadd_ps(z, _mm256_set1_ps(a->xs[jg]), acc);
    }
    _mm256_storeu_ps(out, acc);
}

static inline __attribute__((always_inline)) void
int_tile_rows(const uint8_t *codes, const uint16_t *sc, const acts_t *a, long j0, float *y, int In, int N, long blk,
              const int RB, const int NR, const int PASSES, const int bits) {
    const int G = In / QGROUP, per = bits == 4 ? 8 : 4, loads = QGROUP / per;
    const long block_bytes = (long)In / per * 64, sc_stride = bits == 4 ? 32 : 16;
    const __m256i m4 = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8((char)0x80);
    for (int g = 0; g < G; g++) {
        for (int h = 0; h < 2; h++) { /* rows 0..7 of each block, then 8..15 */
            __m256i s[4][4][2];
            for (int r = 0; r < RB; r++)
                for (int j = 0; j < NR; j++)
                    for (int p = 0; p < PASSES; p++) s[r][j][p] = _mm256_setzero_si256();
            for (int c = 0; c < loads; c++) {
                for (int r = 0; r < RB; r++) {
                    const uint8_t *at = codes + (blk + r) * block_bytes + ((long)g * loads + c) * 64;
                    if (h == 0) _mm_prefetch((const char *)(at + RB * block_bytes), _MM_HINT_T0);
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(at + 32 * h));
                    const __m256i lo = _mm256_and_si256(w, m4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
                    const __m256i q = _mm256_xor_si256(w, flip);
                    for (int j = 0; j < NR; j++)
                        for (int p = 0; p < PASSES; p++)
                            s[r][j][p] = dot_add(s[r][j][p], lo, hi, q,
                                                 a->q[p] + (j0 + j) * In + g * QGROUP + c * per, bits);
                }
            }
            for (int r = 0; r < RB; r++) {
                const uint16_t *p16 = sc + ((blk + r) * G + g) * sc_stride + 8 * h;
                if (h == 0) _mm_prefetch((const char *)(p16 + RB * G * sc_stride), _MM_HINT_T0);
                for (int j = 0; j < NR; j++)
                    half_out(s[r][j], p16, a, (j0 + j) * G + g, y + (j0 + j) * N + (blk + r) * 16 + 8 * h, g,
                             PASSES, bits);
            }
        }
    }
}

/* One input row: both halves of each load in one sweep, over INT_RB1 blocks, so that each line is read once
 * and in order (the products of one row 9-11% faster than int_tile_rows' half a sweep over 4 blocks; for more
 * rows the sums of both halves would not fit in AVX2's 16 registers). */
static inline __attribute__((always_inline)) void
int_tile_row(const uint8_t *codes, const uint16_t *sc, const acts_t *a, long j0, float *y, int In, int N, long blk,
             const int RB, const int PASSES, const int bits) {
    const int G = In / QGROUP, per = bits == 4 ? 8 : 4, loads = QGROUP / per;
    const long block_bytes = (long)In / per * 64, sc_stride = bits == 4 ? 32 : 16;
    const __m256i m4 = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8((char)0x80);
    for (int g = 0; g < G; g++) {
        __m256i s[4][2][2]; /* [block][half][pass] */
        for (int r = 0; r < RB; r++)
            for (int h = 0; h < 2; h++)
                for (int p = 0; p < PASSES; p++) s[r][h][p] = _mm256_setzero_si256();
        for (int c = 0; c < loads; c++)
            for (int r = 0; r < RB; r++) {
                const uint8_t *at = codes + (blk + r) * block_bytes + ((long)g * loads + c) * 64;
                _mm_prefetch((const char *)(at + RB * block_bytes), _MM_HINT_T0);
                for (int h = 0; h < 2; h++) {
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(at + 32 * h));
                    const __m256i lo = _mm256_and_si256(w, m4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
                    const __m256i q = _mm256_xor_si256(w, flip);
                    for (int p = 0; p < PASSES; p++)
                        s[r][h][p] = dot_add(s[r][h][p], lo, hi, q, a->q[p] + j0 * In + g * QGROUP + c * per, bits);
                }
            }
        for (int r = 0; r < RB; r++) {
            const uint16_t *p16 = sc + ((blk + r) * G + g) * sc_stride;
            _mm_prefetch((const char *)(p16 + RB * G * sc_stride), _MM_HINT_T0);
            for (int h = 0; h < 2; h++)
                half_out(s[r][h], p16 + 8 * h, a, j0 * G + g, y + j0 * N + (blk + r) * 16 + 8 * h, g, PASSES, bits);
        }
    }
}

static inline __attribute__((always_inline)) void
int_tile(const uint8_t *codes, const uint16_t *sc, const acts_t *a, long j0, float *y, int In, int N, long blk,
         const int RB, const int NR, const int PASSES, const int bits) {
    if (NR == 1) int_tile_row(codes, sc, a, j0, y, In, N, blk, RB, PASSES, bits);
    else int_tile_rows(codes, sc, a, j0, y, In, N, blk, RB, NR, PASSES, bits);
}
#define INT_RB1 2
#else
#define INT_PRODUCTS 0
#endif

#if INT_PRODUCTS
/* Blocks of 16 outputs per tile for B input rows: INT_RB1 for one row, 2 for two, 1 for more. */
static inline long tile_blocks(int B) { return B == 1 ? INT_RB1 : B == 2 ? 2 : 1; }

/* Tiles first..last-1 of all B input rows by all N outputs. Tile shapes: one row over INT_RB1 blocks, two over 2,
 * more rows over 1 block, four rows at a time (so that a block's codes, read from memory once, serve every
 * row from cache); the blocks left over after the last whole tile, one tile each. */
static inline __attribute__((always_inline)) void
int_tiles(const uint8_t *codes, const uint16_t *sc, const acts_t *a, int B, float *y, int In, int N,
          long first, long last, const int PASSES, const int bits) {
    const long rb = tile_blocks(B), tiles = N / 16 / rb;
    for (long t = first; t < last; t++) {
        const long blk = t < tiles ? t * rb : tiles * rb + (t - tiles);
#define TILE(rb, n) int_tile(codes, sc, a, j, y, In, N, blk, rb, n, PASSES, bits)
        for (long j = 0; j < B; j += 4) {
            const int nr = B - j < 4 ? (int)(B - j) : 4;
            if (t < tiles && B == 1) TILE(INT_RB1, 1);
            else if (t < tiles && B == 2) TILE(2, 2);
            else if (nr == 1) TILE(1, 1);
            else if (nr == 2) TILE(1, 2);
            else if (nr == 3) TILE(1, 3);
            else TILE(1, 4);
        }
#undef TILE
    }
}

/* One function per format and number of passes, its arguments plain values: called from an OpenMP region,
 * whose outlined body reads what it shares through memory, an inlined loop ran 2-2.6x slower (the
 * compiler no longer knew that the output's stores leave those values alone). */
typedef void (*tiles_fn)(const uint8_t *, const uint16_t *, acts_t, int, float *, int, int, long, long);
#define TILES(name, passes, bits)                                                                              \
    static __attribute__((noinline)) void name(const uint8_t *codes, const uint16_t *sc, acts_t a, int B,       \
                                               float *y, int In, int N, long first, long last) {                \
        int_tiles(codes, sc, &a, B, y, In, N, first, last, passes, bits);                                       \
    }
TILES(q4_tiles_1, 1, 4)
TILES(q4_tiles_2, 2, 4)
TILES(q8_tiles_1, 1, 8)
TILES(q8_tiles_2, 2, 8)
#undef TILES

static void int_mm(const void *x, int x_dt, const uint8_t *codes, const uint16_t *sc, float *y,
                   int B, int In, int N, void *scratch, int threads, int passes, const int bits) {
    const long BG = (long)B * (In / QGROUP);
    float *f = (float *)scratch, *row = f + 5 * BG;
    int8_t *q = (int8_t *)(row + In);
    const acts_t a = {{q, q + (long)B * In}, {f, f + BG}, {f + 2 * BG, f + 3 * BG}, f + 4 * BG};
    passes = passes == 2 ? 2 : 1;
    quantize_rows(x, x_dt, B, In, passes, &a, row);
    const tiles_fn fn = bits == 4 ? (passes == 2 ? q4_tiles_2 : q4_tiles_1) : (passes == 2 ? q8_tiles_2 : q8_tiles_1);
    const long blocks = N / 16, rb = tile_blocks(B), count = blocks / rb + blocks % rb;
#ifdef _OPENMP
    /* the tiles shared out among `threads` threads: built with -fopenmp, GCC's libgomp, which resolves to the
     * copy torch has already loaded, so these are the threads PyTorch's operations use */
#pragma omp parallel num_threads(threads) if (threads > 1 && count > 1)
    {
        const long n = omp_get_num_threads(), i = omp_get_thread_num();
        fn(codes, sc, a, B, y, In, N, count * i / n, count * (i + 1) / n);
    }
#else
    (void)threads;
    fn(codes, sc, a, B, y, In, N, 0, count);
#endif
}
#else
static void int_mm(const void *x, int x_dt, const uint8_t *codes, const uint16_t *sc, float *y,
                   int B, int In, int N, void *scratch, int threads, int passes, const int bits) {
    (void)x, (void)x_dt, (void)codes, (void)sc, (void)y, (void)B, (void)In, (void)N, (void)scratch, (void)threads,
        (void)passes, (void)bits;
}
#endif

/* The products' vector width where this build has them, 512 (AVX-512 VNNI) or 256 (AVX2); 0 where they do
 * nothing (fast.py then keeps PyTorch's kernels). */
int st_int_products(void) { return INT_PRODUCTS; }

/* y (B, N) fp32 = x (B, In) (dtype x_dt) @ W.T for an int4 (st_q4_mm) or int8 (st_q8_mm) W as laid out
 * above, with `passes` (1 or 2) runs of int8 activation codes, on up to `threads` threads; N a multiple
 * of 16, In of 32. scratch holds 5 * B * In / 32 + In floats and 2 * B * In bytes. */
void st_q4_mm(const void *x, int x_dt, const uint8_t *codes, const uint16_t *sc, float *y, int B, int In, int N,
              void *scratch, int threads, int passes) {
    int_mm(x, x_dt, codes, sc, y, B, In, N, scratch, threads, passes, 4);
}

void st_q8_mm(const void *x, int x_dt, const uint8_t *codes, const uint16_t *sc, float *y, int B, int In, int N,
              void *scratch, int threads, int passes) {
    int_mm(x, x_dt, codes, sc, y, B, In, N, scratch, threads, passes, 8);
}
