/* Greedy decoding without the whole LM head (engine/greedy_head.py loads it with the other
 * kernels: one library).
 *
 * A greedy sequence needs only the argmax of its logits. The head's product is a fifth of a
 * batch-16 decode step on a CPU (49,152 x 576 weights per row of x), and nearly all of its
 * outputs are far below the best. So, for a head in Q8_0 blocks (w = d * q, q int8):
 *
 * 1. Screen. x is quantized per block of 32 to int8 (x ~ s * xq), and every logit is
 *    estimated in integer arithmetic, A = sum_b d_b s_b (q_b . xq_b) (AVX-512 VNNI: 64
 *    multiply-adds per instruction where float32 FMAs do 16), with a bound B on how far the
 *    float32 product can be from A:
 *        |A - L| <= sum_b e_b |W_b|_1 + g * max|W_row| * |x|_1
 *    e_b = max |x_i - s_b xq_i| over the block (the quantization error, measured), |W_b|_1 the
 *    block's absolute sum, and the second term covers every float32 rounding of both A and the
 *    exact product L (g = (K + 64) 2^-23: several times the worst case of chains of K / 8 + 21
 *    roundings). The weights are GGUF's own integers: only x is approximated.
 * 2. Keep. With LB = max over the row of A - B, a token whose A + B < LB has an exact logit
 *    below some other token's: it is not the argmax. The others (a handful to a few hundred)
 *    are computed exactly, by the same accumulation chain as the full product
 *    (pdserve_gguf_rows_dot), so their logits are the same bits; the rest of the row is -inf.
 *    The row's argmax (first index among equals) is the full product's, always.
 *
 * Layout (engine/greedy_head.py packs it at load): rows in tiles of 16, each tile's blocks
 * one after another, a block as 8 x 64 bytes (step j: the 16 rows' weights 4j..4j+3, each
 * q + 128 as an unsigned byte, VNNI's unsigned operand); per tile and block the 16 rows'
 * d and |W_b|_1 as float32; per row max |W|. x's int8 is the signed operand, so each block's
 * sum carries 128 * sum(xq), taken off before the scales.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#define TILE 16
#define MG 8 /* rows of x per pass over a tile: 8 independent integer chains */
#define KIND_Q8_0 1 /* cpu_kernels.c's kind of the head's blocks */

int pdserve_gguf_rows_dot(int kind, const float* x, int K, const uint8_t* wq, const int* rows,
                          int n, float* y);

int pdserve_greedy_head_usable(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")
           && !getenv("PDSERVE_NO_AVX512");
}

/* x [Mp, K] float32 -> xq int8 [Mp, nb, 32], per block: s, e, 128 * sum(xq); per row |x|_1.
   Returns 0, or 1 when x holds a value that is not finite. */
static int quantize_x(const float* x, int M, int Mp, int K, int8_t* xq, float* s, float* e,
                      int32_t* corr, float* x1) {
    const int nb = K / 32;
    memset(xq, 0, (size_t)Mp * K);
    memset(s, 0, sizeof(float) * (size_t)Mp * nb);
    memset(e, 0, sizeof(float) * (size_t)Mp * nb);
    memset(corr, 0, sizeof(int32_t) * (size_t)Mp * nb);
    memset(x1, 0, sizeof(float) * (size_t)Mp);
    for (int m = 0; m < M; m++) {
        float l1 = 0.0f;
        for (int b = 0; b < nb; b++) {
            const float* xb = x + (size_t)m * K + (size_t)b * 32;
            int8_t* qb = xq + (size_t)m * K + (size_t)b * 32;
            float mx = 0.0f;
            for (int i = 0; i < 32; i++) {
                if (!isfinite(xb[i])) return 1;
                mx = fmaxf(mx, fabsf(xb[i]));
                l1 += fabsf(xb[i]);
            }
            const size_t at = (size_t)m * nb + b;
            if (mx == 0.0f) continue; /* xq 0, s 0, e 0: exact */
            const float sc = mx / 127.0f, inv = 127.0f / mx;
            float err = 0.0f;
            int32_t sum = 0;
            for (int i = 0; i < 32; i++) {
                long v = lrintf(xb[i] * inv);
                v = v > 127 ? 127 : v < -127 ? -127 : v;
                qb[i] = (int8_t)v;
                sum += (int32_t)v;
                err = fmaxf(err, fabsf(xb[i] - sc * (float)v));
            }
            s[at] = sc;
            e[at] = err;
            corr[at] = 128 * sum;
        }
        x1[m] = l1;
    }
    return 0;
}

/* Pass 1 over one tile of 16 rows for MG rows of x. lb[i]: the highest A - B row m0 + i has seen
   so far, this tile's included (any lower bound of the row's best logit is one of its best).
   Writes y[m][n] = A + B where that reaches lb, else -inf (rows n < N only). */
VNNI static void screen_tile(const uint8_t* wt, const float* dt, const float* lt,
                             const float* wmax, int t, int nb, int N, const int8_t* xq,
                             const float* s, const float* e, const int32_t* corr,
                             const float* x1, int m0, int M, int K, float g, float* y,
                             float* lb) {
    __m512 acc[MG], bq[MG];
    for (int i = 0; i < MG; i++) acc[i] = bq[i] = _mm512_setzero_ps();
    const uint8_t* wtile = wt + (size_t)t * nb * 8 * 64;
    for (int b = 0; b < nb; b++) {
        __m512i dot[MG];
        for (int i = 0; i < MG; i++) dot[i] = _mm512_setzero_si512();
        const uint8_t* wb = wtile + (size_t)b * 8 * 64;
        /* the stream of tiles 8 blocks ahead (a prefetch past the end faults nothing): the
           hardware's prefetcher alone left the screen waiting on memory, 12 % slower */
        for (int j = 0; j < 8; j++) _mm_prefetch((const char*)(wb + 4096 + 64 * j), _MM_HINT_T0);
        for (int j = 0; j < 8; j++) {
            const __m512i w = _mm512_loadu_si512((const void*)(wb + 64 * j));
            for (int i = 0; i < MG; i++) {
                int32_t four;
                memcpy(&four, xq + (size_t)(m0 + i) * K + (size_t)b * 32 + 4 * j, 4);
                dot[i] = _mm512_dpbusd_epi32(dot[i], w, _mm512_set1_epi32(four));
            }
        }
        const __m512 d = _mm512_loadu_ps(dt + ((size_t)t * nb + b) * TILE);
        const __m512 l = _mm512_loadu_ps(lt + ((size_t)t * nb + b) * TILE);
        for (int i = 0; i < MG; i++) {
            const size_t at = (size_t)(m0 + i) * nb + b;
            const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[i], _mm512_set1_epi32(corr[at])));
            acc[i] = _mm512_fmadd_ps(v, _mm512_mul_ps(d, _mm512_set1_ps(s[at])), acc[i]);
            bq[i] = _mm512_fmadd_ps(l, _mm512_set1_ps(e[at]), bq[i]);
        }
    }
    const int n0 = t * TILE, rows = N - n0 < TILE ? N - n0 : TILE;
    const __mmask16 valid = (__mmask16)((1u << rows) - 1u);
    const __m512 wm = _mm512_loadu_ps(wmax + n0);
    /* a relative margin over the quantization term: its own roundings (a few ulp) */
    const __m512 slack = _mm512_set1_ps(1.0f + 1.0f / 65536.0f);
    for (int i = 0; i < MG && m0 + i < M; i++) {
        const int m = m0 + i;
        const __m512 bound = _mm512_fmadd_ps(bq[i], slack,
                                             _mm512_mul_ps(wm, _mm512_set1_ps(g * x1[m])));
        const float low = _mm512_mask_reduce_max_ps(valid, _mm512_sub_ps(acc[i], bound));
        if (low > lb[i]) lb[i] = low;
        const __m512 up = _mm512_add_ps(acc[i], bound);
        const __mmask16 keep = _mm512_cmp_ps_mask(up, _mm512_set1_ps(lb[i]), _CMP_GE_OQ);
        _mm512_mask_storeu_ps(y + (size_t)m * N + n0, valid,
                              _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), up));
    }
}

/* Pass 2 for one row of x: the tokens whose A + B reaches the final lower bound get their
   exact logits, the others -inf. list, got: scratch of N each. Returns how many it kept. */
VNNI static int keep_row(const float* x, int K, const uint8_t* wq, int N, float lb, float* ym,
                         int* list, float* got) {
    int c = 0, n = 0;
    const __m512 low = _mm512_set1_ps(lb), none = _mm512_set1_ps(-INFINITY);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; n + 16 <= N; n += 16, idx = _mm512_add_epi32(idx, step)) {
        const __m512 v = _mm512_loadu_ps(ym + n);
        const __mmask16 keep = _mm512_cmp_ps_mask(v, low, _CMP_GE_OQ);
        if (keep) {
            _mm512_mask_compressstoreu_epi32(list + c, keep, idx);
            c += __builtin_popcount(keep);
        }
        _mm512_mask_storeu_ps(ym + n, (__mmask16)~keep, none);
    }
    for (; n < N; n++) {
        if (ym[n] >= lb) list[c++] = n;
        else ym[n] = -INFINITY;
    }
    pdserve_gguf_rows_dot(KIND_Q8_0, x, K, wq, list, c, got);
    for (int i = 0; i < c; i++) ym[list[i]] = got[i];
    return c;
}

/* y [M, N]: for each row of x, exact logits (the bits of the full product) at every token that
   can be the argmax, -inf elsewhere. wq: the head's Q8_0 blocks as the other kernels take them
   (for the exact logits); kept [M] (out): how many tokens each row computed exactly.
   Returns 0; 1 when x holds a non-finite value (y untouched: do the
   full product); -1 for arguments it does not take; -2 when memory ran out. */
VNNI int pdserve_greedy_head(const float* x, int M, int K, const uint8_t* wt, const float* dt,
                             const float* lt, const float* wmax, const uint8_t* wq, int N,
                             float* y, int* kept, int nthreads) {
    if (M <= 0 || K <= 0 || K % 32 || N <= 0) return -1;
    const int nb = K / 32, Mp = (M + MG - 1) / MG * MG, tiles = (N + TILE - 1) / TILE;
    if (nthreads < 1) nthreads = 1;
    int8_t* xq = aligned_alloc(64, (size_t)Mp * K);
    /* s, e, x1, lb, then each thread's lower bounds */
    float* fs = malloc(sizeof(float) * ((size_t)3 * Mp * nb + (size_t)(2 + nthreads) * Mp));
    int32_t* corr = malloc(sizeof(int32_t) * (size_t)Mp * nb);
    int rc = 0;
    if (!xq || !fs || !corr) rc = -2;
    float *s = fs, *e = fs + (size_t)Mp * nb, *x1 = fs + (size_t)2 * Mp * nb, *lb = x1 + Mp;
    if (rc == 0) rc = quantize_x(x, M, Mp, K, xq, s, e, corr, x1);
    if (rc == 0) {
        const float g = (float)(K + 64) / 8388608.0f;
        for (int m = 0; m < (1 + nthreads) * Mp; m++) lb[m] = -INFINITY;
#pragma omp parallel num_threads(nthreads)
        {
            /* Every group of MG rows of x over a tile while its weights (nb * 512 bytes) are
               in L1: the head's 28 MB are read once per step, not once per group. */
            float* mine = lb + (size_t)(1 + omp_get_thread_num()) * Mp;
#pragma omp for schedule(static)
            for (int t = 0; t < tiles; t++)
                for (int m0 = 0; m0 < Mp; m0 += MG)
                    screen_tile(wt, dt, lt, wmax, t, nb, N, xq, s, e, corr, x1, m0, M, K, g, y,
                                mine + m0);
#pragma omp critical
            for (int m = 0; m < Mp; m++)
                if (mine[m] > lb[m]) lb[m] = mine[m];
#pragma omp barrier
            /* pass 2: per row of x, the candidates exactly, -inf for the rest */
            int* list = malloc(sizeof(int) * (size_t)N);
            float* got = malloc(sizeof(float) * (size_t)N);
#pragma omp for schedule(dynamic, 1)
            for (int m = 0; m < M; m++) {
                float* ym = y + (size_t)m * N;
                if (list && got) {
                    kept[m] = keep_row(x + (size_t)m * K, K, wq, N, lb[m], ym, list, got);
                } else { /* no scratch: this row computes every logit exactly */
                    for (int n = 0; n < N; n++)
                        pdserve_gguf_rows_dot(KIND_Q8_0, x + (size_t)m * K, K, wq, &n, 1, ym + n);
                    kept[m] = N;
                }
            }
            free(list);
            free(got);
        }
    }
    free(xq);
    free(fs);
    free(corr);
    return rc;
}
