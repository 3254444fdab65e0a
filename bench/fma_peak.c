/* The float32 FMA rate this machine's cores sustain: 8-lane FMAs on 12 independent chains in
 * registers (no memory), on `threads` OpenMP threads. bench/bench_engine.py builds and runs it
 * for the compute ceiling of a batched decode step; prints fused multiply-add lanes per second.
 * Build: cc -O3 -funroll-loops -mavx2 -mfma -fopenmp fma_peak.c -o fma_peak */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char** argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    const long iters = argc > 2 ? atol(argv[2]) : 50000000L;
    float sink = 0.f;
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        __m256 a[12];
        const __m256 x = _mm256_set1_ps(1.0000001f), y = _mm256_set1_ps(0.9999999f);
        for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i);
        for (long it = 0; it < iters; it++)
            for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], x, y);
        __m256 s = a[0];
        for (int i = 1; i < 12; i++) s = _mm256_add_ps(s, a[i]);
        float out[8];
        _mm256_storeu_ps(out, s);
        sink += out[0];
    }
    const double t = omp_get_wtime() - t0;
    printf("%.6e %f\n", (double)threads * iters * 12 * 8 / t, sink);
    return 0;
}
