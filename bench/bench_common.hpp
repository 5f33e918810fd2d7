#pragma once
// What every benchmark in lowrank-bench shares: allocator tuning, the thread count
// (LOWRANK_THREADS, default 1), and the run's context in the JSON output.

#include <lowrank/core/memory.hpp>
#include <lowrank/core/threads.hpp>

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace lowrank::bench {

/// LOWRANK_THREADS as a positive integer; 1 when unset or empty. A malformed value stops
/// the program: a benchmark that silently ran with another thread count would mislead.
inline int threads_from_env() {
    const char* s = std::getenv("LOWRANK_THREADS");
    if (s == nullptr || *s == '\0') return 1;
    char* end = nullptr;
    const long n = std::strtol(s, &end, 10);
    if (*end != '\0' || n < 1 || n > 1024) {
        std::fprintf(stderr, "lowrank-bench: LOWRANK_THREADS must be a positive integer, got '%s'\n", s);
        std::exit(2);
    }
    return static_cast<int>(n);
}

inline bool setup() {
    // Without this, glibc unmaps Eigen's GEMM packing buffers (they are malloc'd per
    // product above 128 KiB) and every step pays fresh-page faults for them again.
    const bool tuned = tune_allocator();
    const int threads = threads_from_env();
    set_num_threads(threads);
    benchmark::AddCustomContext("lowrank_threads", std::to_string(threads));
    benchmark::AddCustomContext("lowrank_tune_allocator", tuned ? "applied" : "not applied");
    benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                     std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                     std::to_string(EIGEN_MINOR_VERSION));
    benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
    // The widest vector ISA the build compiles for (Eigen's string says "AVX" for AVX2 too):
    // which FMA peak of bench/bench_machine.cpp its figures are held to.
#if defined(__AVX512F__)
    benchmark::AddCustomContext("simd_isa", "avx512");
#elif defined(__AVX2__) && defined(__FMA__)
    benchmark::AddCustomContext("simd_isa", "avx2");
#else
    benchmark::AddCustomContext("simd_isa", "other");
#endif
#ifdef EIGEN_USE_BLAS
    benchmark::AddCustomContext("gemm_backend", "BLAS (EIGEN_USE_BLAS)");
#else
    benchmark::AddCustomContext("gemm_backend", "Eigen");
#endif
    return tuned;
}

/// Runs setup() once per program, before main(): an inline variable is initialised once
/// however many benchmark files include this header.
inline const bool kSetupDone = setup();

/// Sets the counters users compare: GFLOP/s (the rate of `flops_per_iteration`) and
/// `<unit>_per_second` (the rate of `items_per_iteration`). Rates are over wall-clock
/// time: every benchmark uses UseRealTime(), since CPU time would count one thread only.
inline void set_rate_counters(benchmark::State& state, double flops_per_iteration, double items_per_iteration,
                              const char* items_name) {
    const auto iterations = static_cast<double>(state.iterations());
    state.counters["GFLOPs"] =
        benchmark::Counter(iterations * flops_per_iteration * 1e-9, benchmark::Counter::kIsRate);
    state.counters[items_name] =
        benchmark::Counter(iterations * items_per_iteration, benchmark::Counter::kIsRate);
}

/// Registers one shape of a layer or product benchmark as `name/d:D/N:N/r:R`, timed by
/// wall clock, in milliseconds: the names scripts/bench_table.py and the docs select by.
inline void add_shape(const char* name, void (*fn)(benchmark::State&), int d, int n, int r) {
    benchmark::RegisterBenchmark(name, fn)
        ->ArgNames({"d", "N", "r"})
        ->Args({d, n, r})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
}

}  // namespace lowrank::bench
