// What the machine can do, measured in the same run as the benchmarks it is compared with
// (scripts/bench_table.py prints GEMM-bound figures as a fraction of these):
//
//   BM_Peak_FMA_<avx2|avx512>/threads:<1|all>   FP32 FMA peak: independent chains of
//                                               _mm256_fmadd_ps (12 accumulators, 16
//                                               registers) or _mm512_fmadd_ps (24 of 32),
//                                               enough to cover the FMA latency on every
//                                               x86 core; counter GFLOPs
//   BM_Bandwidth_triad/threads:<1|all>          a[i] = b[i] + s c[i] over 3 x 64 MiB,
//                                               counter GBps (bytes read and written,
//                                               without the write-allocate reads)
//
// The kernels carry their own target attribute, so a -march=x86-64-v3 build measures the
// AVX-512 peak too where the CPU has it; each variant is registered only when the CPU runs
// it (__builtin_cpu_supports). "all" is every processor the OS offers (omp_get_num_procs),
// whatever LOWRANK_THREADS says: the peak of the machine, not of the run's thread count.

#include "bench_common.hpp"

#include <benchmark/benchmark.h>

#include <immintrin.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cstdint>
#include <string>
#include <vector>

namespace {

constexpr std::int64_t kFmaSteps = 1 << 22;  // iterations of the FMA loop per call and thread

// Each step is one FMA on each of the independent accumulators (named variables, so that
// they live in registers, not in an array on the stack); x = x / 2 + 1/2 keeps them finite
// and normal, the multiplier and addend are hidden from the optimiser (an empty asm) so
// that it cannot fold them, and the sum is returned so that the loop is not removed.
__attribute__((target("avx2,fma"))) float fma_avx2(std::int64_t steps) {
    __m256 a0 = _mm256_set1_ps(0.0f), a1 = _mm256_set1_ps(1.0f), a2 = _mm256_set1_ps(2.0f),
           a3 = _mm256_set1_ps(3.0f), a4 = _mm256_set1_ps(4.0f), a5 = _mm256_set1_ps(5.0f),
           a6 = _mm256_set1_ps(6.0f), a7 = _mm256_set1_ps(7.0f), a8 = _mm256_set1_ps(8.0f),
           a9 = _mm256_set1_ps(9.0f), a10 = _mm256_set1_ps(10.0f), a11 = _mm256_set1_ps(11.0f);
    __m256 mul = _mm256_set1_ps(0.5f), add = _mm256_set1_ps(0.5f);
    __asm__("" : "+x"(mul), "+x"(add));
    for (std::int64_t s = 0; s < steps; ++s) {
        a0 = _mm256_fmadd_ps(a0, mul, add);
        a1 = _mm256_fmadd_ps(a1, mul, add);
        a2 = _mm256_fmadd_ps(a2, mul, add);
        a3 = _mm256_fmadd_ps(a3, mul, add);
        a4 = _mm256_fmadd_ps(a4, mul, add);
        a5 = _mm256_fmadd_ps(a5, mul, add);
        a6 = _mm256_fmadd_ps(a6, mul, add);
        a7 = _mm256_fmadd_ps(a7, mul, add);
        a8 = _mm256_fmadd_ps(a8, mul, add);
        a9 = _mm256_fmadd_ps(a9, mul, add);
        a10 = _mm256_fmadd_ps(a10, mul, add);
        a11 = _mm256_fmadd_ps(a11, mul, add);
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7),
                         "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                                 _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7))),
                                   _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    alignas(32) float out[8];
    _mm256_store_ps(out, sum);
    return out[0];
}

__attribute__((target("avx512f"))) float fma_avx512(std::int64_t steps) {
    __m512 a0 = _mm512_set1_ps(0.0f), a1 = _mm512_set1_ps(1.0f), a2 = _mm512_set1_ps(2.0f),
           a3 = _mm512_set1_ps(3.0f), a4 = _mm512_set1_ps(4.0f), a5 = _mm512_set1_ps(5.0f),
           a6 = _mm512_set1_ps(6.0f), a7 = _mm512_set1_ps(7.0f), a8 = _mm512_set1_ps(8.0f),
           a9 = _mm512_set1_ps(9.0f), a10 = _mm512_set1_ps(10.0f), a11 = _mm512_set1_ps(11.0f),
           a12 = _mm512_set1_ps(12.0f), a13 = _mm512_set1_ps(13.0f), a14 = _mm512_set1_ps(14.0f),
           a15 = _mm512_set1_ps(15.0f), a16 = _mm512_set1_ps(16.0f), a17 = _mm512_set1_ps(17.0f),
           a18 = _mm512_set1_ps(18.0f), a19 = _mm512_set1_ps(19.0f), a20 = _mm512_set1_ps(20.0f),
           a21 = _mm512_set1_ps(21.0f), a22 = _mm512_set1_ps(22.0f), a23 = _mm512_set1_ps(23.0f);
    __m512 mul = _mm512_set1_ps(0.5f), add = _mm512_set1_ps(0.5f);
    __asm__("" : "+v"(mul), "+v"(add));
    for (std::int64_t s = 0; s < steps; ++s) {
        a0 = _mm512_fmadd_ps(a0, mul, add);
        a1 = _mm512_fmadd_ps(a1, mul, add);
        a2 = _mm512_fmadd_ps(a2, mul, add);
        a3 = _mm512_fmadd_ps(a3, mul, add);
        a4 = _mm512_fmadd_ps(a4, mul, add);
        a5 = _mm512_fmadd_ps(a5, mul, add);
        a6 = _mm512_fmadd_ps(a6, mul, add);
        a7 = _mm512_fmadd_ps(a7, mul, add);
        a8 = _mm512_fmadd_ps(a8, mul, add);
        a9 = _mm512_fmadd_ps(a9, mul, add);
        a10 = _mm512_fmadd_ps(a10, mul, add);
        a11 = _mm512_fmadd_ps(a11, mul, add);
        a12 = _mm512_fmadd_ps(a12, mul, add);
        a13 = _mm512_fmadd_ps(a13, mul, add);
        a14 = _mm512_fmadd_ps(a14, mul, add);
        a15 = _mm512_fmadd_ps(a15, mul, add);
        a16 = _mm512_fmadd_ps(a16, mul, add);
        a17 = _mm512_fmadd_ps(a17, mul, add);
        a18 = _mm512_fmadd_ps(a18, mul, add);
        a19 = _mm512_fmadd_ps(a19, mul, add);
        a20 = _mm512_fmadd_ps(a20, mul, add);
        a21 = _mm512_fmadd_ps(a21, mul, add);
        a22 = _mm512_fmadd_ps(a22, mul, add);
        a23 = _mm512_fmadd_ps(a23, mul, add);
        __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7),
                         "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));
        __asm__ volatile("" : "+v"(a12), "+v"(a13), "+v"(a14), "+v"(a15), "+v"(a16), "+v"(a17), "+v"(a18),
                         "+v"(a19), "+v"(a20), "+v"(a21), "+v"(a22), "+v"(a23));
    }
    __m512 sum = a0;
    for (const __m512 x : {a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
                           a20, a21, a22, a23})
        sum = _mm512_add_ps(sum, x);
    return _mm512_reduce_add_ps(sum);
}

int all_processors() {
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

/// Runs body(thread) on `threads` threads at once (one OpenMP team), or on this one.
template <class F>
void on_threads(int threads, F&& body) {
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        body(omp_get_thread_num());
        return;
    }
#endif
    body(0);
}

template <float (*Kernel)(std::int64_t), int Floats>
void peak(benchmark::State& state, int threads) {
    std::vector<float> sink(static_cast<std::size_t>(threads) * 16);
    for (auto _ : state) {
        on_threads(threads, [&](int t) { sink[static_cast<std::size_t>(t) * 16] = Kernel(kFmaSteps); });
        benchmark::DoNotOptimize(sink.data());
    }
    const double per_call = 2.0 * Floats * (Floats == 8 ? 12 : 24) * static_cast<double>(kFmaSteps) * threads;
    state.counters["GFLOPs"] =
        benchmark::Counter(static_cast<double>(state.iterations()) * per_call * 1e-9, benchmark::Counter::kIsRate);
    state.counters["threads"] = threads;
}

void triad(benchmark::State& state, int threads) {
    const std::int64_t n = std::int64_t{64} << 20 >> 2;  // 64 MiB of floats per array
    std::vector<float> a(static_cast<std::size_t>(n)), b(static_cast<std::size_t>(n), 1.0f),
        c(static_cast<std::size_t>(n), 2.0f);
    auto pass = [&] {
        on_threads(threads, [&](int t) {
            const std::int64_t first = n * t / threads, last = n * (t + 1) / threads;
            float* __restrict pa = a.data();
            const float* __restrict pb = b.data();
            const float* __restrict pc = c.data();
            for (std::int64_t i = first; i < last; ++i) pa[i] = pb[i] + 0.5f * pc[i];
        });
        benchmark::DoNotOptimize(a.data());
        benchmark::ClobberMemory();
    };
    pass();  // every page touched before timing (first touch is slow on these machines)
    for (auto _ : state) pass();
    state.counters["GBps"] = benchmark::Counter(static_cast<double>(state.iterations()) * 3.0 * 4.0 *
                                                    static_cast<double>(n) * 1e-9,
                                                benchmark::Counter::kIsRate);
    state.counters["threads"] = threads;
}

void add(const char* name, void (*fn)(benchmark::State&, int)) {
    benchmark::RegisterBenchmark((std::string(name) + "/threads:1").c_str(), fn, 1)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    if (const int all = all_processors(); all > 1)
        benchmark::RegisterBenchmark((std::string(name) + "/threads:all").c_str(), fn, all)
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
}

bool register_all() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        add("BM_Peak_FMA_avx2", peak<fma_avx2, 8>);
    if (__builtin_cpu_supports("avx512f")) add("BM_Peak_FMA_avx512", peak<fma_avx512, 16>);
    add("BM_Bandwidth_triad", triad);
    return true;
}

const bool kRegistered = register_all();

}  // namespace
