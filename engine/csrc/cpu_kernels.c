/* CPU kernels for the decode step (engine/cpu_kernels.py loads them with ctypes):
 * 1. products with GGUF block-quantized weights, dequantized in cache, computed in float32;
 * 2. decode attention over the paged KV pool, read in place (at the end of the file).
 *
 * 1.
 * y[M, N] = x[M, K] @ W[N, K]^T (+ bias) where W's rows are blocks of 32 weights, GGUF's
 * blocks repacked at load (QuantWeight.from_gguf) with their half-float scales widened to
 * float32, which is exact:
 *   Q4_1 (24 bytes: f32 d, f32 m, 16 bytes of nibbles): w = d * q + m
 *        (weight i is the low nibble of byte i, weight 16 + i its high nibble)
 *   Q8_0 (36 bytes: f32 d, 32 int8):                     w = d * q
 * Each weight is rebuilt in float32 with the same roundings as gguf-py's dequantize (the
 * reference: transformers loads GGUF files through it), so the weights are bit-identical to
 * a float32 checkpoint of the same file; only the summation order of the dot products differs,
 * as between any two matmul kernels. A decode step reads 0.75 (Q4_1) or 1.1 (Q8_0) bytes per
 * weight instead of 4: on a CPU that is what bounds small-batch decode.
 *
 * Every y[m, n] is one 8-lane accumulator chain over k in steps of 8, then a fixed horizontal
 * sum: a row's result does not depend on M, on the rows around it, or on the instruction set
 * (batch invariance; tested).
 *
 * Threads: one OpenMP team (libgomp.so.1, the library torch itself loads, so the two share one
 * pool of threads). For several rows of x each thread dequantizes 3 rows of W at a time into
 * its own buffer (L1/L2) and multiplies every row of x against them; for one row the weights
 * go from the blocks to the FMAs in registers.
 *
 * Build: cc -O3 -mavx2 -mfma -mf16c -ffp-contract=off -fopenmp -shared -fPIC ... -lm
 * (-ffp-contract=off: the compiler fuses nothing on its own; every rounding is the source's: the
 * RMSNorm, RoPE and softmax below follow torch's operations one rounding at a time.)
 */
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NR 3 /* rows of W per group */
#define WIDE __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

enum { KIND_Q4_1 = 0, KIND_Q8_0 = 1 };
enum { Q4_1_BYTES = 24, Q8_0_BYTES = 36 };

static inline size_t block_bytes(int kind) { return kind == KIND_Q4_1 ? Q4_1_BYTES : Q8_0_BYTES; }

int pdserve_kernels_abi(void) { return 4; }

static inline float f32_at(const uint8_t* p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

/* Bytes ahead in a row of blocks to prefetch while rebuilding rows for several rows of x:
   without it a product of 8-bit blocks read memory at a quarter of the rate a plain streaming
   read gets (the hardware prefetcher alone did not keep up with several rows read side by
   side). 256 measured best of 128-4096 on the Intel machine of the first runs; on the AMD
   machine since, 2 KB made the batch-16 decode step about 5 % faster (13 alternating runs of
   the engine against 256, medians 1.05 and 1.07; 0.5, 1 and 4 KB less). */
#define PREFETCH_AHEAD 2048

static inline void prefetch_block(const uint8_t* blk) {
    _mm_prefetch((const char*)blk + PREFETCH_AHEAD, _MM_HINT_T0);
}

/* The one-row products (a batch-1 decode step) spend a few cycles per block, so a line asked
   for 256 bytes ahead came too late: every layer's products (80 MB of SmolLM2's Q4_1 blocks, in
   a loop of their shapes) read 16-18 GB/s on two cores asking 256 bytes ahead, 20-24 GB/s asking
   4 KB ahead (2-8 KB measured best). A matrix's rows are contiguous, so the prefetch runs on into
   the next rows. The engine's batch-1 decode: 1.16x faster (median of 8 alternating runs). */
#define PREFETCH_AHEAD_ROW 4096

static inline void prefetch_row_block(const uint8_t* blk) {
    _mm_prefetch((const char*)blk + PREFETCH_AHEAD_ROW, _MM_HINT_T0);
}

static int has_avx512(void) {
    static int known = -1;
    if (known < 0)
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                && __builtin_cpu_supports("avx512vl") && !getenv("PDSERVE_NO_AVX512");
    return known;
}

/* The 32 weights of block b of a row, rebuilt in registers (w[0..8), w[8..16), w[16..24),
   w[24..32)): Q4_1 d * q + m, Q8_0 d * q, as gguf-py's dequantize (a float32 multiply, then
   an add). d is a half float (11 significant bits) and q has at most 8, so d * q is exact in
   float32: a fused multiply-add rounds once where gguf-py rounds twice, to the same number. */
static inline void block_weights(int kind, const uint8_t* row, int b, __m256 w[4]) {
    if (kind == KIND_Q4_1) {
        const uint8_t* blk = row + (size_t)b * Q4_1_BYTES;
        const __m256 d = _mm256_set1_ps(f32_at(blk)), m = _mm256_set1_ps(f32_at(blk + 4));
        const __m128i low = _mm_set1_epi8(0x0F);
        const __m128i q = _mm_loadu_si128((const __m128i*)(blk + 8));
        const __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int i = 0; i < 4; i++)
            w[i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), m);
    } else {
        const uint8_t* blk = row + (size_t)b * Q8_0_BYTES;
        const __m256 d = _mm256_set1_ps(f32_at(blk));
        const __m128i q0 = _mm_loadu_si128((const __m128i*)(blk + 4));
        const __m128i q1 = _mm_loadu_si128((const __m128i*)(blk + 20));
        const __m128i parts[4] = {q0, _mm_srli_si128(q0, 8), q1, _mm_srli_si128(q1, 8)};
        for (int i = 0; i < 4; i++)
            w[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])));
    }
}

static inline void dequant_row(int kind, const uint8_t* row, int nb, float* out) {
    __m256 w[4];
    const size_t bytes = block_bytes(kind);
    for (int b = 0; b < nb; b++, out += 32) {
        prefetch_block(row + (size_t)b * bytes);
        block_weights(kind, row, b, w);
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(out + 8 * i, w[i]);
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[m, 0..nr) = x[m] . w[r] for every row m of x, nr rows of dequantized weights (K each) */
static void dots(const float* x, int M, int K, const float* w, int nr, float* y, int ldy) {
    int m = 0;
    if (nr == NR) {
        const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K;
        for (; m + 4 <= M; m += 4) { /* 4 rows of x x 3 rows of w: 12 chains */
            const float* x0 = x + (size_t)m * K;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
            __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
            for (int k = 0; k < K; k += 8) {
                const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k), v2 = _mm256_loadu_ps(w2 + k);
                __m256 xv = _mm256_loadu_ps(x0 + k);
                a00 = _mm256_fmadd_ps(xv, v0, a00); a01 = _mm256_fmadd_ps(xv, v1, a01); a02 = _mm256_fmadd_ps(xv, v2, a02);
                xv = _mm256_loadu_ps(x0 + K + k);
                a10 = _mm256_fmadd_ps(xv, v0, a10); a11 = _mm256_fmadd_ps(xv, v1, a11); a12 = _mm256_fmadd_ps(xv, v2, a12);
                xv = _mm256_loadu_ps(x0 + 2 * K + k);
                a20 = _mm256_fmadd_ps(xv, v0, a20); a21 = _mm256_fmadd_ps(xv, v1, a21); a22 = _mm256_fmadd_ps(xv, v2, a22);
                xv = _mm256_loadu_ps(x0 + 3 * K + k);
                a30 = _mm256_fmadd_ps(xv, v0, a30); a31 = _mm256_fmadd_ps(xv, v1, a31); a32 = _mm256_fmadd_ps(xv, v2, a32);
            }
            float* y0 = y + (size_t)m * ldy;
            y0[0] = hsum(a00); y0[1] = hsum(a01); y0[2] = hsum(a02); y0 += ldy;
            y0[0] = hsum(a10); y0[1] = hsum(a11); y0[2] = hsum(a12); y0 += ldy;
            y0[0] = hsum(a20); y0[1] = hsum(a21); y0[2] = hsum(a22); y0 += ldy;
            y0[0] = hsum(a30); y0[1] = hsum(a31); y0[2] = hsum(a32);
        }
    }
    for (; m < M; m++) { /* the same chains, one row of x at a time */
        const float* x0 = x + (size_t)m * K;
        if (nr == NR) { /* 3 independent chains: a lone row is not bound by FMA latency */
            const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0;
            for (int k = 0; k < K; k += 8) {
                const __m256 xv = _mm256_loadu_ps(x0 + k);
                a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + k), a0);
                a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w1 + k), a1);
                a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w2 + k), a2);
            }
            float* y0 = y + (size_t)m * ldy;
            y0[0] = hsum(a0); y0[1] = hsum(a1); y0[2] = hsum(a2);
            continue;
        }
        for (int r = 0; r < nr; r++) {
            const float* wr = w + (size_t)r * K;
            __m256 a = _mm256_setzero_ps();
            for (int k = 0; k < K; k += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), _mm256_loadu_ps(wr + k), a);
            y[(size_t)m * ldy + r] = hsum(a);
        }
    }
}

/* Rebuilds row n of a quantized W [N, K] into out (K floats). */
typedef void (*row_fn)(const void* w, int n, int K, float* out);

/* y [M, N] = x [M, K] . W^T (+ bias), W rebuilt NR rows at a time into a thread's buffer.
   Returns 0, or -2 when a thread's buffer could not be allocated (y is then incomplete). */
static int rebuilt_linear(const float* x, int M, int K, row_fn row, const void* w, int N,
                          const float* bias, float* y, int nthreads) {
    const int groups = (N + NR - 1) / NR;
    int failed = 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > groups) nthreads = groups > 0 ? groups : 1;
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = aligned_alloc(64, sizeof(float) * NR * (size_t)K);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int g = 0; g < groups; g++) {
            if (!buf) continue;
            const int n0 = g * NR, nr = N - n0 < NR ? N - n0 : NR;
            for (int r = 0; r < nr; r++) row(w, n0 + r, K, buf + (size_t)r * K);
            dots(x, M, K, buf, nr, y + n0, N);
            if (bias)
                for (int m = 0; m < M; m++)
                    for (int r = 0; r < nr; r++) y[(size_t)m * N + n0 + r] += bias[n0 + r];
        }
        free(buf);
    }
    return failed ? -2 : 0;
}

typedef struct { int kind; const uint8_t* blocks; size_t rowbytes; } GgufRows;

/* dequant_row with AVX-512: the same weights (bit for bit: gguf_dots1_wide's table, d * q + m
   by one fused multiply-add per block for all 16 values of q, picked by nibble; Q8_0 d * q), at
   about half the instructions. At batch 16 rebuilding the weights was a quarter of a product. */
WIDE static void dequant_row_wide(int kind, const uint8_t* row, int nb, float* out) {
    const size_t bytes = block_bytes(kind);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int b = 0; b < nb; b++, out += 32) {
        const uint8_t* blk = row + (size_t)b * bytes;
        prefetch_block(blk);
        if (kind == KIND_Q4_1) {
            const __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(f32_at(blk)), iota,
                                                 _mm512_set1_ps(f32_at(blk + 4)));
            /* the permute reads an index's low 4 bits: byte i's low nibble is weight i */
            const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + 8)));
            _mm512_storeu_ps(out, _mm512_permutexvar_ps(q, table));
            _mm512_storeu_ps(out + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table));
        } else {
            const __m512 d = _mm512_set1_ps(f32_at(blk));
            for (int h = 0; h < 2; h++)
                _mm512_storeu_ps(out + 16 * h, _mm512_mul_ps(d, _mm512_cvtepi32_ps(
                    _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 4 + 16 * h))))));
        }
    }
}

static void gguf_row(const void* w, int n, int K, float* out) {
    const GgufRows* g = w;
    const uint8_t* row = g->blocks + (size_t)n * g->rowbytes;
    if (has_avx512()) dequant_row_wide(g->kind, row, K / 32, out);
    else dequant_row(g->kind, row, K / 32, out);
}

/* y[0..nr) = x . w[n0 + r] for ONE row of x: the weights rebuilt in registers and used at once,
   never stored. The same chains as dots() with M = 1 over the rebuilt rows (one 8-lane
   accumulator per row of W, k in steps of 8, then hsum): the same bits, batch invariance kept. */
static void gguf_dots1(const float* x, int K, const GgufRows* g, int n0, int nr, float* y) {
    const int nb = K / 32;
    const size_t bytes = block_bytes(g->kind);
    __m256 acc[NR], w[4];
    const uint8_t* rows[NR];
    for (int r = 0; r < nr; r++) {
        acc[r] = _mm256_setzero_ps();
        rows[r] = g->blocks + (size_t)(n0 + r) * g->rowbytes;
    }
    for (int b = 0; b < nb; b++) {
        const float* xb = x + (size_t)b * 32;
        const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
        const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
        for (int r = 0; r < nr; r++) {
            prefetch_row_block(rows[r] + (size_t)b * bytes);
            block_weights(g->kind, rows[r], b, w);
            acc[r] = _mm256_fmadd_ps(x0, w[0], acc[r]);
            acc[r] = _mm256_fmadd_ps(x1, w[1], acc[r]);
            acc[r] = _mm256_fmadd_ps(x2, w[2], acc[r]);
            acc[r] = _mm256_fmadd_ps(x3, w[3], acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) y[r] = hsum(acc[r]);
}

/* gguf_dots1 with AVX-512 (the products stay 8-lane FMAs in the same order: the same chains,
   the same bits), where the CPU has it. A Q4_1 block's 16 possible weights d * q + m (q =
   0..15, rounded as in block_weights) are made once, as two 8-lane registers, and
   each weight is picked from them by its nibble: one two-table permute per 8 weights instead
   of a conversion, a multiply and an add. Q8_0 rebuilds 16 weights per instruction. */
WIDE static void gguf_dots1_wide(const float* x, int K, const GgufRows* g, int n0, int nr,
                                 float* y) {
    const int nb = K / 32;
    const size_t bytes = block_bytes(g->kind);
    const __m256 iota_lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 iota_hi = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    __m256 acc[NR];
    const uint8_t* rows[NR];
    for (int r = 0; r < nr; r++) {
        acc[r] = _mm256_setzero_ps();
        rows[r] = g->blocks + (size_t)(n0 + r) * g->rowbytes;
    }
    for (int b = 0; b < nb; b++) {
        const float* xb = x + (size_t)b * 32;
        const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
        const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
        for (int r = 0; r < nr; r++) {
            __m256 w0, w1, w2, w3;
            prefetch_row_block(rows[r] + (size_t)b * bytes);
            if (g->kind == KIND_Q4_1) {
                const uint8_t* blk = rows[r] + (size_t)b * Q4_1_BYTES;
                const __m256 d = _mm256_set1_ps(f32_at(blk)), m = _mm256_set1_ps(f32_at(blk + 4));
                const __m256 t_lo = _mm256_fmadd_ps(d, iota_lo, m); /* d * q exact: see */
                const __m256 t_hi = _mm256_fmadd_ps(d, iota_hi, m); /* block_weights */
                /* byte i -> lane: the permute reads the low 4 bits, the low nibble */
                const __m256i q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 8)));
                const __m256i q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 16)));
                w0 = _mm256_permutex2var_ps(t_lo, q0, t_hi);
                w1 = _mm256_permutex2var_ps(t_lo, q1, t_hi);
                w2 = _mm256_permutex2var_ps(t_lo, _mm256_srli_epi32(q0, 4), t_hi);
                w3 = _mm256_permutex2var_ps(t_lo, _mm256_srli_epi32(q1, 4), t_hi);
            } else {
                const uint8_t* blk = rows[r] + (size_t)b * Q8_0_BYTES;
                const __m512 d = _mm512_set1_ps(f32_at(blk));
                const __m512 a = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                        _mm_loadu_si128((const __m128i*)(blk + 4)))));
                const __m512 c = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                        _mm_loadu_si128((const __m128i*)(blk + 20)))));
                w0 = _mm512_castps512_ps256(a);
                w1 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
                w2 = _mm512_castps512_ps256(c);
                w3 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1));
            }
            acc[r] = _mm256_fmadd_ps(x0, w0, acc[r]);
            acc[r] = _mm256_fmadd_ps(x1, w1, acc[r]);
            acc[r] = _mm256_fmadd_ps(x2, w2, acc[r]);
            acc[r] = _mm256_fmadd_ps(x3, w3, acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) y[r] = hsum(acc[r]);
}

/* Returns 0; -1 for a kind or shape it does not take; -2 as rebuilt_linear. */
int pdserve_qlinear(int kind, const float* x, int M, int K, const uint8_t* wq, int N,
                    const float* bias, float* y, int nthreads) {
    if ((kind != KIND_Q4_1 && kind != KIND_Q8_0) || K <= 0 || K % 32 || M < 0 || N < 0)
        return -1;
    const GgufRows g = {kind, wq, (size_t)(K / 32) * block_bytes(kind)};
    if (M != 1) return rebuilt_linear(x, M, K, gguf_row, &g, N, bias, y, nthreads);
    /* One row of x (a batch-1 decode step): rebuilding weights into a buffer and reading
       them back was most of the step; here they go from the blocks to the FMAs. */
    const int groups = (N + NR - 1) / NR, wide = has_avx512();
    if (nthreads < 1) nthreads = 1;
    if (nthreads > groups) nthreads = groups > 0 ? groups : 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int gi = 0; gi < groups; gi++) {
        const int n0 = gi * NR, nr = N - n0 < NR ? N - n0 : NR;
        if (wide) gguf_dots1_wide(x, K, &g, n0, nr, y + n0);
        else gguf_dots1(x, K, &g, n0, nr, y + n0);
        if (bias)
            for (int r = 0; r < nr; r++) y[n0 + r] += bias[n0 + r];
    }
    return 0;
}

/* y[i] = x . W[rows[i]] for one row of x and the listed rows of W (engine/csrc/greedy_head.c's
   exact logits): each the same chain as every other product of these blocks, so the same bits
   as the full product's y[n]. */
int pdserve_gguf_rows_dot(int kind, const float* x, int K, const uint8_t* wq, const int* rows,
                          int n, float* y) {
    if ((kind != KIND_Q4_1 && kind != KIND_Q8_0) || K <= 0 || K % 32 || n < 0) return -1;
    const GgufRows g = {kind, wq, (size_t)(K / 32) * block_bytes(kind)};
    const int wide = has_avx512();
    for (int i = 0; i < n; i++) {
        if (wide) gguf_dots1_wide(x, K, &g, rows[i], 1, y + i);
        else gguf_dots1(x, K, &g, rows[i], 1, y + i);
    }
    return 0;
}

/* W as float32 [N, K] */
int pdserve_dequant(int kind, const uint8_t* wq, int N, int K, float* out) {
    if ((kind != KIND_Q4_1 && kind != KIND_Q8_0) || K <= 0 || K % 32 || N < 0) return -1;
    const int nb = K / 32;
    const size_t rowbytes = (size_t)nb * block_bytes(kind);
    for (int n = 0; n < N; n++) dequant_row(kind, wq + (size_t)n * rowbytes, nb, out + (size_t)n * K);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * FP8 e4m3 weights with block scales (DeepSeek's checkpoint format): W [N, K] one byte each,
 * scales [ceil(N / bn), ceil(K / bk)] float32; weight (n, k) = e4m3(W[n, k]) * s[n / bn][k / bk].
 *
 * An e4m3 byte's bits moved into a half float (sign to bit 15, exponent and mantissa shifted
 * left by 7) are its value times 2^-8, exactly, for normal and subnormal numbers alike (NaN,
 * 0x7F, does not occur in weights); the F16C conversion then gives float32, and one multiply
 * by 256 * s (exact) gives w * s with the single rounding of DeepSeek's formula: the weights
 * rebuilt are bit for bit the float32 dequantization's.
 * ------------------------------------------------------------------------------------- */
/* 8 e4m3 bytes, each in the high byte of a 16-bit lane (b << 8), -> 8 floats times s256 */
static inline __m256 fp8x8_hi(__m128i h, __m256 s256) {
    const __m128i sign = _mm_and_si128(h, _mm_set1_epi16((short)0x8000));
    const __m128i mag = _mm_srli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7F00)), 1);
    return _mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(sign, mag)), s256);
}

static void dequant_fp8_row(const uint8_t* row, int K, const float* srow, int bk, float* out) {
    const __m128i zero = _mm_setzero_si128();
    for (int k0 = 0, j = 0; k0 < K; k0 += bk, j++) {  /* one scale per block of bk columns */
        const __m256 s256 = _mm256_set1_ps(srow[j] * 256.0f);
        const int k1 = k0 + bk < K ? k0 + bk : K;
        int k = k0;
        for (; k + 16 <= k1; k += 16) {
            const __m128i b = _mm_loadu_si128((const __m128i*)(row + k));
            _mm256_storeu_ps(out + k, fp8x8_hi(_mm_unpacklo_epi8(zero, b), s256));
            _mm256_storeu_ps(out + k + 8, fp8x8_hi(_mm_unpackhi_epi8(zero, b), s256));
        }
        for (; k < k1; k += 8) {
            const __m128i b = _mm_loadl_epi64((const __m128i*)(row + k));
            _mm256_storeu_ps(out + k, fp8x8_hi(_mm_unpacklo_epi8(zero, b), s256));
        }
    }
}

typedef struct { const uint8_t* w; const float* s; int bn, bk, sk; } Fp8Rows;

static void fp8_row(const void* w, int n, int K, float* out) {
    const Fp8Rows* f = w;
    dequant_fp8_row(f->w + (size_t)n * K, K, f->s + (size_t)(n / f->bn) * f->sk, f->bk, out);
}

/* y [M, N] = x [M, K] . W^T (+ bias). Returns 0; -1 for a shape it does not take (K and bk
   multiples of 8); -2 as rebuilt_linear. */
int pdserve_fp8_linear(const float* x, int M, int K, const uint8_t* w, int N, const float* s,
                       int bn, int bk, const float* bias, float* y, int nthreads) {
    if (K <= 0 || K % 8 || bn <= 0 || bk <= 0 || bk % 8 || M < 0 || N < 0) return -1;
    const Fp8Rows f = {w, s, bn, bk, (K + bk - 1) / bk};
    return rebuilt_linear(x, M, K, fp8_row, &f, N, bias, y, nthreads);
}

/* W as float32 [N, K], by the same rebuild */
int pdserve_fp8_dequant(const uint8_t* w, int N, int K, const float* s, int bn, int bk,
                        float* out) {
    if (K <= 0 || K % 8 || bn <= 0 || bk <= 0 || bk % 8 || N < 0) return -1;
    const int sk = (K + bk - 1) / bk;
    for (int n = 0; n < N; n++)
        dequant_fp8_row(w + (size_t)n * K, K, s + (size_t)(n / bn) * sk, bk, out + (size_t)n * K);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Decode attention over the paged pool, read in place.
 *
 * kv: the pool, float32 or float16 [P, L, Bt, 2 * KVH * hd] (a row is [K heads | V heads]; a
 * float16 pool is read 8 halves at a time, widened to float32, and computed as a float32 one
 * holding the same values); q: [T, H, hd] float32;
 * for each decode sequence s: its query row q_rows[s], its context length ctx_lens[s] (the new
 * token's K/V already written), its pages tables[table_off[s] .. table_off[s + 1]).
 * out[q_rows[s]] = softmax(q . K^T * scale) V per query head, query head h reading KV head
 * h / (H / KVH) (grouped-query attention).
 *
 * One task per sequence (per sequence and KV head when there are fewer sequences than
 * threads). A task walks its rows in order twice: the K halves (scores), then the V halves
 * (weighted sum), each row's part read as one run so that the hardware prefetcher streams
 * it (reading one head's 256 bytes out of each 1.5 KB row ran at a fifth of the bandwidth).
 * A thread takes a contiguous range of tasks; while it computes one, the rows of its next come
 * in, a few cache lines after each block of 8 scores (12-14 % less time over a batch-16 step's
 * 30 layers than fetching each task's rows before computing it; the same bits).
 * Each query head's result is one fixed chain of operations whatever the batch.
 * ------------------------------------------------------------------------------------- */

/* e^x for x <= 0 (softmax after the max is taken out), float32, within 2 ulp: x = n ln2 + r,
   |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes' expf coefficients), times 2^n. */
static inline __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* 8 values of a KV row from element i, as float32 (f16: a float16 pool; a constant at every
   call once inlined, so each body is compiled for one element type) */
__attribute__((always_inline)) static inline __m256 kv8(const void* row, size_t i, const int f16) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)row + i)));
    return _mm256_loadu_ps((const float*)row + i);
}

__attribute__((always_inline)) static inline float dot_kv(const float* a, const void* row,
                                                         size_t off, int n, const int f16) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), kv8(row, off + i, f16), acc);
    return hsum(acc);
}

/* the 8 horizontal sums of a[0..8) as one vector */
static inline __m256 hsum8(const __m256* a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* softmax in place over p[0..n): exp(p - max), the sum returned instead of divided in */
static float softmax_unnormalised(float* p, int n) {
    float mx = p[0];
    for (int j = 1; j < n; j++) mx = p[j] > mx ? p[j] : mx;
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(p + j), m8));
        _mm256_storeu_ps(p + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    if (j < n) { /* the tail through the same vector code, padded with -inf (exp 0) */
        float t[8];
        for (int i = 0; i < 8; i++) t[i] = j + i < n ? p[j + i] - mx : -INFINITY;
        _mm256_storeu_ps(t, exp_neg(_mm256_loadu_ps(t)));
        for (int i = 0; j + i < n; i++) { p[j + i] = t[i]; sum += t[i]; }
    }
    return sum;
}

/* The next task's rows, prefetched a few cache lines at a time while this task computes. */
typedef struct { const void* const* rows; int n, lines_per_row, row, line; } Ahead;

static inline void ahead_some(Ahead* a, int lines) {
    for (; lines > 0 && a->row < a->n; lines--) { /* a division per line cost a fifth of
                                                     attention with its keys in cache */
        _mm_prefetch((const char*)a->rows[a->row] + 64 * a->line, _MM_HINT_T1);
        if (++a->line == a->lines_per_row) { a->line = 0; a->row++; }
    }
}

/* rows[j] = row j of sequence s's context at the layer (its page's base + layer + slot);
   strides in elements of `esize` bytes */
static inline void task_rows(const void** rows, const char* kv, const int* pages, int ctx,
                             long long page_stride, long long layer_offset, int Bt, int row,
                             size_t esize) {
    for (int j = 0; j < ctx; j++)
        rows[j] = kv + ((size_t)pages[j / Bt] * page_stride + layer_offset
                        + (size_t)(j % Bt) * row) * esize;
}

/* One KV head c of one sequence: its G query heads qh [G][hd] -> oh [G][hd]. rows[j] points at
   row j of the layer (K heads then V heads); p: G * ctx floats of scratch. Accumulators stay
   in registers (an accumulator kept in memory across rows stalled on false store-to-load
   dependencies with the rows being read). */
__attribute__((always_inline)) static inline void attend_body(
        const float* qh, const void* const* rows, int ctx, int c, int G, int hd, int half,
        float scale, float* p, float* oh, Ahead* ah, int per8, const int f16) {
    const __m256 sc = _mm256_set1_ps(scale);
    for (int g = 0; g < G; g++) {
        const float* qg = qh + (size_t)g * hd;
        float* pg = p + (size_t)g * ctx;
        int j = 0;
        for (; j + 8 <= ctx; j += 8) { /* 8 rows at a time, 8 chains, one vector of scores */
            __m256 a[8];
            for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
            for (int d = 0; d < hd; d += 8) {
                const __m256 qv = _mm256_loadu_ps(qg + d);
                for (int r = 0; r < 8; r++)
                    a[r] = _mm256_fmadd_ps(qv, kv8(rows[j + r], (size_t)c * hd + d, f16), a[r]);
            }
            _mm256_storeu_ps(pg + j, _mm256_mul_ps(hsum8(a), sc));
            ahead_some(ah, per8);
        }
        for (; j < ctx; j++) pg[j] = dot_kv(qg, rows[j], (size_t)c * hd, hd, f16) * scale;
    }
    for (int g = 0; g < G; g++) {
        float* pg = p + (size_t)g * ctx;
        const __m256 total = _mm256_set1_ps(softmax_unnormalised(pg, ctx));
        float* o = oh + (size_t)g * hd;
        for (int d0 = 0; d0 < hd; d0 += 64) { /* 8 accumulators: 64 lanes of the head */
            const int w = (hd - d0 < 64 ? hd - d0 : 64) / 8;
            __m256 a[8];
            for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
            for (int jj = 0; jj < ctx; jj++) {
                const __m256 pj = _mm256_set1_ps(pg[jj]);
                const size_t v = (size_t)half + (size_t)c * hd + d0;
                for (int r = 0; r < w; r++) a[r] = _mm256_fmadd_ps(pj, kv8(rows[jj], v + 8 * r, f16), a[r]);
            }
            for (int r = 0; r < w; r++) _mm256_storeu_ps(o + d0 + 8 * r, _mm256_div_ps(a[r], total));
        }
    }
}

static void attend_kv_head(const float* qh, const void* const* rows, int ctx, int c, int G,
                           int hd, int half, float scale, float* p, float* oh, Ahead* ah, int per8,
                           int f16) {
    if (f16) attend_body(qh, rows, ctx, c, G, hd, half, scale, p, oh, ah, per8, 1);
    else attend_body(qh, rows, ctx, c, G, hd, half, scale, p, oh, ah, per8, 0);
}

/* attend_kv_head with AVX-512's 32 registers, where the CPU has it: up to 3 query heads of the
   group at once, so each key row is read once per 3 heads instead of once per head, and each
   value row once per 3 heads (32 lanes of the head at a time). Every score and every output
   lane is the same chain as attend_kv_head's (a score: 8-lane FMAs over the head's dims, then
   hsum8 over 8 rows; an output lane: FMAs over the context in order, then the division): the
   same bits. At batch 16 a task's keys (about 40 KB) do not stay in L1 between heads.
   NG (1..3) is a constant at each call, so the accumulators stay in registers. */
#define INLINE_WIDE __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) static inline

/* scores of rows j..j+7 for query heads qh[0..NG) (each hd floats apart) into p[g * ctx + j] */
INLINE_WIDE void scores8(const int NG, const float* qh, const void* const* rows, int j,
                         size_t koff, int hd, __m256 sc, float* p, int ctx, const int f16) {
    __m256 a[3][8];
    for (int g = 0; g < NG; g++)
        for (int r = 0; r < 8; r++) a[g][r] = _mm256_setzero_ps();
    for (int d = 0; d < hd; d += 8) { /* 24 accumulators, 3 queries, 1 key row */
        __m256 qv[3];
        for (int g = 0; g < NG; g++) qv[g] = _mm256_loadu_ps(qh + (size_t)g * hd + d);
        for (int r = 0; r < 8; r++) {
            const __m256 k = kv8(rows[j + r], koff + d, f16);
            for (int g = 0; g < NG; g++) a[g][r] = _mm256_fmadd_ps(qv[g], k, a[g][r]);
        }
    }
    for (int g = 0; g < NG; g++)
        _mm256_storeu_ps(p + (size_t)g * ctx + j, _mm256_mul_ps(hsum8(a[g]), sc));
}

/* lanes d0..d0+8W of the outputs of query heads [0..NG): sum over the context of p * v, / total */
INLINE_WIDE void values32(const int NG, const int w, const float* p, int ctx,
                          const void* const* rows, size_t voff, const float* total, float* oh,
                          int hd, const int f16) {
    __m256 a[3][4];
    for (int g = 0; g < NG; g++)
        for (int r = 0; r < 4; r++) a[g][r] = _mm256_setzero_ps();
    for (int jj = 0; jj < ctx; jj++) {
        __m256 vv[4];
        for (int r = 0; r < w; r++) vv[r] = kv8(rows[jj], voff + 8 * r, f16);
        for (int g = 0; g < NG; g++) {
            const __m256 pj = _mm256_set1_ps(p[(size_t)g * ctx + jj]);
            for (int r = 0; r < w; r++) a[g][r] = _mm256_fmadd_ps(pj, vv[r], a[g][r]);
        }
    }
    for (int g = 0; g < NG; g++) {
        const __m256 t = _mm256_set1_ps(total[g]);
        for (int r = 0; r < w; r++) _mm256_storeu_ps(oh + (size_t)g * hd + 8 * r, _mm256_div_ps(a[g][r], t));
    }
}

INLINE_WIDE void attend_wide_body(const float* qh, const void* const* rows, int ctx, int c,
                                  int G, int hd, int half, float scale, float* p, float* oh,
                                  Ahead* ah, int per8, const int f16) {
    const __m256 sc = _mm256_set1_ps(scale);
    const size_t koff = (size_t)c * hd;
    for (int g0 = 0; g0 < G; g0 += 3) {
        const int ng = G - g0 < 3 ? G - g0 : 3;
        const float* q0 = qh + (size_t)g0 * hd;
        float* p0 = p + (size_t)g0 * ctx;
        int j = 0;
        for (; j + 8 <= ctx; j += 8) {
            if (ng == 3) scores8(3, q0, rows, j, koff, hd, sc, p0, ctx, f16);
            else if (ng == 2) scores8(2, q0, rows, j, koff, hd, sc, p0, ctx, f16);
            else scores8(1, q0, rows, j, koff, hd, sc, p0, ctx, f16);
            ahead_some(ah, per8 * ng);
        }
        for (; j < ctx; j++)
            for (int g = 0; g < ng; g++)
                p0[(size_t)g * ctx + j] = dot_kv(q0 + (size_t)g * hd, rows[j], koff, hd, f16) * scale;
    }
    float total[64];
    for (int g = 0; g < G; g++) total[g] = softmax_unnormalised(p + (size_t)g * ctx, ctx);
    for (int g0 = 0; g0 < G; g0 += 3) {
        const int ng = G - g0 < 3 ? G - g0 : 3;
        for (int d0 = 0; d0 < hd; d0 += 32) {
            const int w = (hd - d0 < 32 ? hd - d0 : 32) / 8;
            const float* p0 = p + (size_t)g0 * ctx;
            const size_t voff = (size_t)half + koff + d0;
            float* o = oh + (size_t)g0 * hd + d0;
            if (w == 4 && ng == 3) values32(3, 4, p0, ctx, rows, voff, total + g0, o, hd, f16);
            else if (w == 4 && ng == 2) values32(2, 4, p0, ctx, rows, voff, total + g0, o, hd, f16);
            else if (w == 4) values32(1, 4, p0, ctx, rows, voff, total + g0, o, hd, f16);
            else /* a head's last lanes (hd not a multiple of 32): 8 at a time */
                for (int g = 0; g < ng; g++)
                    for (int r = 0; r < w; r++)
                        values32(1, 1, p0 + (size_t)g * ctx, ctx, rows, voff + 8 * r,
                                 total + g0 + g, o + (size_t)g * hd + 8 * r, hd, f16);
        }
    }
}

WIDE static void attend_kv_head_wide(const float* qh, const void* const* rows, int ctx, int c,
                                     int G, int hd, int half, float scale, float* p, float* oh,
                                     Ahead* ah, int per8, int f16) {
    if (f16) attend_wide_body(qh, rows, ctx, c, G, hd, half, scale, p, oh, ah, per8, 1);
    else attend_wide_body(qh, rows, ctx, c, G, hd, half, scale, p, oh, ah, per8, 0);
}

static int decode_attention(const float* q, const void* kv_pool, int f16, long long page_stride,
                            long long layer_offset, int Bt, int H, int KVH, int hd, int nseq,
                            const int* q_rows, const int* ctx_lens, const int* table_off,
                            const int* tables, float scale, float* out, int nthreads) {
    const char* kv = kv_pool;
    const size_t esize = f16 ? 2 : 4;
    if (hd <= 0 || hd % 8 || KVH <= 0 || H % KVH || Bt <= 0 || nseq < 0) return -1;
    const int G = H / KVH, half = KVH * hd, row = 2 * half;
    const int wide = has_avx512() && G <= 64;
    int max_ctx = 0;
    for (int s = 0; s < nseq; s++) {
        if (ctx_lens[s] <= 0 || (ctx_lens[s] + Bt - 1) / Bt > table_off[s + 1] - table_off[s]) return -1;
        if (ctx_lens[s] > max_ctx) max_ctx = ctx_lens[s];
    }
    if (nthreads < 1) nthreads = 1;
    const int split = nseq < nthreads ? KVH : 1; /* KV heads per sequence split into tasks */
    const int tasks = nseq * split;
    if (tasks == 0) return 0;
    if (nthreads > tasks) nthreads = tasks > 0 ? tasks : 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* scores [G][max_ctx], row pointers [max_ctx] of this task and of the next */
        float* p = malloc(sizeof(float) * (size_t)G * (size_t)max_ctx
                          + 2 * sizeof(float*) * (size_t)max_ctx);
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        const int t0 = (int)((long long)tasks * tid / nth), t1 = (int)((long long)tasks * (tid + 1) / nth);
        const void** rows = p ? (const void**)(p + (size_t)G * max_ctx) : NULL;
        const void** next = p ? rows + max_ctx : NULL;
        const int lines = (int)(((size_t)row * esize + 63) / 64);
        int have_next = 0;
        for (int t = t0; t < t1 && p; t++) {
            const int s = t / split, ctx = ctx_lens[s];
            const int kv0 = split == 1 ? 0 : t % split, kv1 = split == 1 ? KVH : kv0 + 1;
            if (have_next) { const void** tmp = rows; rows = next; next = tmp; }
            else { /* a thread's first task: its rows fetched ahead of its compute */
                task_rows(rows, kv, tables + table_off[s], ctx, page_stride, layer_offset, Bt, row,
                          esize);
                for (int j = 0; j < ctx; j++)
                    for (size_t b = 0; b < (size_t)row * esize; b += 64)
                        _mm_prefetch((const char*)rows[j] + b, _MM_HINT_T1);
            }
            Ahead ah = {next, 0, lines, 0, 0};
            have_next = 0;
            if (t + 1 < t1) {
                const int s2 = (t + 1) / split;
                task_rows(next, kv, tables + table_off[s2], ctx_lens[s2], page_stride,
                          layer_offset, Bt, row, esize);
                ah.n = ctx_lens[s2];
                have_next = 1;
            }
            /* the next task's lines spread over this task's blocks of 8 scores */
            const int blocks8 = (kv1 - kv0) * G * (ctx / 8);
            const int per8 = blocks8 ? (ah.n * lines + blocks8 - 1) / blocks8 : 0;
            for (int c = kv0; c < kv1; c++) {
                const size_t at = (size_t)q_rows[s] * H * hd + (size_t)c * G * hd;
                if (wide) attend_kv_head_wide(q + at, rows, ctx, c, G, hd, half, scale, p, out + at, &ah, per8, f16);
                else attend_kv_head(q + at, rows, ctx, c, G, hd, half, scale, p, out + at, &ah, per8, f16);
            }
            ahead_some(&ah, 1 << 30);
        }
        free(p);
    }
    return failed ? -2 : 0;
}

/* kv_f16: 0 for a float32 pool, 1 for a float16 one */
int pdserve_decode_attention(const float* q, const void* kv, int kv_f16, long long page_stride,
                             long long layer_offset, int Bt, int H, int KVH, int hd, int nseq,
                             const int* q_rows, const int* ctx_lens, const int* table_off,
                             const int* tables, float scale, float* out, int nthreads) {
    return decode_attention(q, kv, kv_f16 != 0, page_stride, layer_offset, Bt, H, KVH, hd, nseq,
                            q_rows, ctx_lens, table_off, tables, scale, out, nthreads);
}

/* ---------------------------------------------------------------------------------------
 * 3. One Llama decoder layer for a decode step (one new token per sequence), every product
 * from GGUF blocks: RMSNorm, q|k|v, RoPE, K/V into their slots, attention over the pages,
 * o + residual, RMSNorm, gate|up, SiLU(gate) * up, down + residual. The same operations as
 * engine/llama.py in the same order; one call per layer instead of some twenty torch calls
 * (at batch 16 those cost a fifth of the step on two cores).
 * ------------------------------------------------------------------------------------- */
typedef struct {
    int kind;
    int n, k;
    const uint8_t* blocks;
    const float* bias; /* or NULL */
} QWeight;

typedef struct {
    const float* in_norm;
    const float* post_norm;
    QWeight qkv, o, gate_up, down;
} LlamaLayer;

typedef struct {
    float* h;                         /* [T, D] the residual stream, updated in place */
    const float* cos; const float* sin; /* [T, hd] */
    void* kv;                         /* the pool [P, L, Bt, 2 * KVH * hd], float32 or float16 */
    const int* slot_pages; const int* slot_offsets; /* [T] where each new token's K/V goes */
    const int* q_rows; const int* ctx_lens; const int* table_off; const int* tables;
    float* scratch;                   /* T * (D + (H + 2 KVH) hd + 2 H hd + 2 I) floats */
    long long page_stride;
    float eps, scale;
    int T, D, H, KVH, hd, I, L, Bt, nthreads;
    int kv_f16;                       /* the pool holds float16 (K/V rounded to nearest even) */
} DecodeStep;

/* the structs' sizes, checked against the ctypes mirrors at load */
void pdserve_llama_struct_sizes(long long* out) {
    out[0] = sizeof(QWeight); out[1] = sizeof(LlamaLayer); out[2] = sizeof(DecodeStep);
}

/* e^x, float32, for any x (clamped to the float range): as exp_neg */
static inline __m256 exp_any(__m256 x) {
    return exp_neg(_mm256_min_ps(x, _mm256_set1_ps(88.3f)));
}

static void rms_norm_rows(const float* x, const float* w, int T, int D, float eps, float* y) {
    for (int t = 0; t < T; t++) {
        const float* xr = x + (size_t)t * D;
        float* yr = y + (size_t)t * D;
        float ss;
        if (D % 8 == 0) {
            __m256 a = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8) { const __m256 v = _mm256_loadu_ps(xr + d); a = _mm256_fmadd_ps(v, v, a); }
            ss = hsum(a);
        } else {
            ss = 0.f;
            for (int d = 0; d < D; d++) ss += xr[d] * xr[d];
        }
        const float r = 1.f / sqrtf(ss / (float)D + eps);
        for (int d = 0; d < D; d++) yr[d] = (xr[d] * r) * w[d];
    }
}

/* x * cos + rotate_half(x) * sin on n heads of hd at x (rotate_half(x) = [-x2, x1]) */
static void rope_heads(float* x, int n, int hd, const float* cos, const float* sin) {
    const int h2 = hd / 2;
    for (int i = 0; i < n; i++, x += hd) {
        for (int d = 0; d < h2; d++) {
            const float x1 = x[d], x2 = x[d + h2];
            x[d] = x1 * cos[d] + (-x2) * sin[d];
            x[d + h2] = x2 * cos[d + h2] + x1 * sin[d + h2];
        }
    }
}

/* Where the decode layers' time goes, while switched on (bench/step_profile.py): wall time of
   each part of pdserve_llama_decode_layer, summed over layers and calls, read and reset by
   pdserve_layer_timers. Off, a part costs one test of a flag. The counters are plain globals:
   meant for one engine in a process, the only caller of the layers. */
enum { T_NORM, T_QKV, T_ROPE_KV, T_ATTENTION, T_O, T_RESIDUAL_NORM, T_GATE_UP, T_SILU, T_DOWN,
       T_RESIDUAL, N_TIMERS };
static int timers_on;
static unsigned long long timer_ns[N_TIMERS];

static inline unsigned long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

/* out[0..N_TIMERS): nanoseconds per part since the last call (then zeroed), when out is not
   NULL; timing on from now if on. Returns N_TIMERS. */
int pdserve_layer_timers(int on, unsigned long long* out) {
    if (out) {
        memcpy(out, timer_ns, sizeof timer_ns);
        memset(timer_ns, 0, sizeof timer_ns);
    }
    timers_on = on != 0;
    return N_TIMERS;
}

/* in a layer: `timing` read once at its start, `t_` the end of the part before */
#define MARK(part) do { if (timing) { const unsigned long long n_ = now_ns(); \
                                      timer_ns[part] += n_ - t_; t_ = n_; } } while (0)

static int qw_linear(const QWeight* w, const float* x, int M, float* y, int nthreads) {
    return pdserve_qlinear(w->kind, x, M, w->k, w->blocks, w->n, w->bias, y, nthreads);
}

int pdserve_llama_decode_layer(const LlamaLayer* w, const DecodeStep* s, int layer) {
    const int T = s->T, D = s->D, H = s->H, KVH = s->KVH, hd = s->hd, I = s->I;
    const int nq = H * hd, nk = KVH * hd, nqkv = nq + 2 * nk;
    if (w->qkv.n != nqkv || w->qkv.k != D || w->o.n != D || w->o.k != nq || w->gate_up.n != 2 * I
        || w->gate_up.k != D || w->down.n != D || w->down.k != I || hd % 2 || layer < 0 || layer >= s->L)
        return -1;
    float* x = s->scratch;                  /* [T, D] */
    float* qkv = x + (size_t)T * D;         /* [T, nqkv] */
    float* att = qkv + (size_t)T * nqkv;    /* [T, nq] */
    float* gu = att + (size_t)T * nq;       /* [T, 2I] */
    float* q = s->scratch + (size_t)T * (D + nqkv + nq + 2 * I); /* [T, nq] contiguous queries */
    const long long layer_offset = (long long)layer * s->Bt * 2 * nk;
    int rc;
    const int timing = timers_on;
    unsigned long long t_ = timing ? now_ns() : 0;
    rms_norm_rows(s->h, w->in_norm, T, D, s->eps, x);
    MARK(T_NORM);
    if ((rc = qw_linear(&w->qkv, x, T, qkv, s->nthreads))) return rc;
    MARK(T_QKV);
    for (int t = 0; t < T; t++) {
        float* r = qkv + (size_t)t * nqkv;
        rope_heads(r, H + KVH, hd, s->cos + (size_t)t * hd, s->sin + (size_t)t * hd); /* q and k */
        memcpy(q + (size_t)t * nq, r, sizeof(float) * nq);
        const size_t slot = (size_t)s->slot_pages[t] * s->page_stride + layer_offset
                            + (size_t)s->slot_offsets[t] * 2 * nk; /* [K heads | V heads] */
        if (s->kv_f16) { /* as torch's float -> half: to nearest even (2 nk: a multiple of 8) */
            uint16_t* dst = (uint16_t*)s->kv + slot;
            for (int i = 0; i < 2 * nk; i += 8)
                _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(r + nq + i),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else {
            memcpy((float*)s->kv + slot, r + nq, sizeof(float) * 2 * nk);
        }
    }
    MARK(T_ROPE_KV);
    if ((rc = pdserve_decode_attention(q, s->kv, s->kv_f16, s->page_stride, layer_offset, s->Bt, H, KVH, hd, T,
                                       s->q_rows, s->ctx_lens, s->table_off, s->tables, s->scale,
                                       att, s->nthreads)))
        return rc;
    MARK(T_ATTENTION);
    if ((rc = qw_linear(&w->o, att, T, x, s->nthreads))) return rc;
    MARK(T_O);
    for (size_t i = 0; i < (size_t)T * D; i++) s->h[i] = s->h[i] + x[i];
    rms_norm_rows(s->h, w->post_norm, T, D, s->eps, x);
    MARK(T_RESIDUAL_NORM);
    if ((rc = qw_linear(&w->gate_up, x, T, gu, s->nthreads))) return rc;
    MARK(T_GATE_UP);
    for (int t = 0; t < T; t++) { /* silu(gate) * up, over the first I floats of each row */
        const float* g = gu + (size_t)t * 2 * I;
        float* a = gu + (size_t)t * 2 * I; /* in place: row t's first I floats */
        int i = 0;
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 e = exp_any(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
            _mm256_storeu_ps(a + i, _mm256_mul_ps(silu, _mm256_loadu_ps(g + I + i)));
        }
        for (; i < I; i++) a[i] = g[i] / (1.f + expf(-g[i])) * g[I + i];
    }
    /* down reads rows of I floats with a stride of 2I: compact them first */
    for (int t = 1; t < T; t++) memmove(gu + (size_t)t * I, gu + (size_t)t * 2 * I, sizeof(float) * I);
    MARK(T_SILU);
    if ((rc = qw_linear(&w->down, gu, T, x, s->nthreads))) return rc;
    MARK(T_DOWN);
    for (size_t i = 0; i < (size_t)T * D; i++) s->h[i] = s->h[i] + x[i];
    MARK(T_RESIDUAL);
    return 0;
}
