#pragma once
// Row-parallel loops for element-wise and row-wise kernels. Static scheduling keeps the
// split, and so the results, identical from run to run for a given thread count.

#include <lowrank/core/types.hpp>

#include <algorithm>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lowrank::detail {

/// Below this many scalars a kernel runs on one thread: the fork costs more than it saves.
inline constexpr Index kParallelThreshold = 1 << 15;

/// The threads a loop started here may use: 1 inside a parallel region (nested regions
/// would only add forks), else the pool's size.
inline Index available_threads() {
#ifdef _OPENMP
    return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
    return 1;
#endif
}

/// Calls f(i) for i in [0, n), in parallel when n * work_per_item is large enough (and not
/// already inside a parallel region).
template <class F>
void parallel_for(Index n, Index work_per_item, F&& f) {
#ifdef _OPENMP
    if (n > 1 && n * work_per_item >= kParallelThreshold && !omp_in_parallel()) {
#pragma omp parallel for schedule(static)
        for (Index i = 0; i < n; ++i) f(i);
        return;
    }
#else
    (void)work_per_item;
#endif
    for (Index i = 0; i < n; ++i) f(i);
}

/// Calls f(begin, end) for the blocks [k * block, min(n, (k + 1) * block)) of [0, n), in
/// parallel when n is large enough. The cut depends on n and block only, never on the
/// thread count, so a per-block partial result combined in block order is deterministic.
template <class F>
void parallel_blocks(Index n, Index block, F&& f) {
    const Index blocks = (n + block - 1) / block;
    parallel_for(blocks, block, [&](Index k) { f(k * block, std::min(n, (k + 1) * block)); });
}

/// parallel_blocks in blocks of 2^14 entries: for element-wise passes over a flat buffer
/// (optimizer updates, gradient scaling), where how the range is split changes no result.
template <class F>
void for_each_block(Index n, F&& f) {
    parallel_blocks(n, Index{1} << 14, std::forward<F>(f));
}

/// x[0, n) = value, split over threads when n is large (gradients of a whole model).
template <class T>
void parallel_fill(T* x, Index n, T value) {
    for_each_block(n, [&](Index b, Index e) { std::fill(x + b, x + e, value); });
}

}  // namespace lowrank::detail
