// The low-rank layers next to the dense one at the same shape (d x d weight, bias, N tokens):
// forward alone and forward + backward, with the GEMM FLOP rate and the speed-up over dense.
// bench/pytorch_bench.py times LowRankLinear's composition x V U^T + b in PyTorch.
//
//   BM_LowRankLinear_fwdbwd/d:1024/N:4096/r:128        U (d x r), V (d x r): the fused node
//   BM_LowRankLinear_gemm_fwdbwd/d:1024/N:4096/r:8     the same with the one-pass (token-tiled)
//                                                      backward switched off: four whole-matrix
//                                                      GEMMs, the plain composition
//   BM_LowRankLinear_onepass_fwdbwd/.../r:64           the one-pass backward forced on above
//                                                      the default threshold
//   BM_SpectralLinear_<fwd|fwdbwd>/.../r:R             r active pairs of a full spectrum
//   BM_IncrementalRankLinear_<fwd|fwdbwd>/.../r:R      r active columns of capacity floor(d/2)
//   BM_DeepLowRankLinear_<fwd|fwdbwd>/.../r:R          depth 3, compressed at rank r: the chain
//                                                      P^T (2r x d), three 2r x 2r, Q (d x 2r)
//
// Counters:
//   GFLOPs                GEMM FLOPs per iteration (below) over wall-clock time
//   tokens_per_second     N over wall-clock time
//   speedup_vs_dense      the dense layer's time at the same d, N and mode over this time
//   speedup_vs_dense_cpu  the same by process CPU time: the work done with one thread, less
//                         disturbed by other processes sharing the cores
//   flop_ratio            the dense layer's GEMM FLOPs over this layer's: the ideal speed-up
//
// The dense time is Linear<float> (d x d, bias) stepped exactly as here and as
// BM_Linear_fwd / BM_Linear_fwdbwd step it: the mean wall-clock and CPU time per step over at
// least 0.5 s after a warm-up step. The benchmarks run in groups of one (d, N, r), all
// layers' fwd, then all fwdbwd; the first benchmark of a group and mode times the dense
// layer (before its own timing) and the rest of the group reuses that figure. So every
// ratio divides by a dense time taken seconds before, not minutes: on a shared machine the
// load drifts. Each run of the program (a round of scripts/bench.sh) measures it afresh.
//
// Each step, as in bench_linear.cpp: g.clear(); x = g.input(X, requires_grad = true);
// y = layer.forward(g, x); zero_grad of the layer's parameters; g.backward(sum(g, y)).
// dx is computed, as for an inner layer of a network. Layers are built once per (d, r) (the
// IncrementalRankLinear once per d, its active rank set per benchmark) and
// inputs once per (N, d), so that the SVDs behind their initialisation stay out of the
// repeated setup Google Benchmark runs.

#include "bench_common.hpp"

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_basic.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/nn/deep_low_rank_linear.hpp>
#include <lowrank/nn/incremental_rank_linear.hpp>
#include <lowrank/nn/linear.hpp>
#include <lowrank/nn/low_rank_linear.hpp>
#include <lowrank/nn/spectral_linear.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <ctime>
#include <limits>
#include <map>
#include <memory>
#include <tuple>
#include <utility>

namespace {

using lowrank::Index;
using Mat = lowrank::Matrix<float>;

/// The dense reference is timed as long as Google Benchmark times a sample (its default
/// --benchmark_min_time).
constexpr double kDenseMinTime = 0.5;

const Mat& input(Index n, Index d) {
    static std::map<std::pair<Index, Index>, Mat> cache;
    auto [it, fresh] = cache.try_emplace({n, d});
    if (fresh) {
        lowrank::Rng rng(7);
        it->second.resize(n, d);
        lowrank::init::normal<float>(it->second, rng);
    }
    return it->second;
}

/// One training-style step of `layer` on the tape, the same for every layer and dense.
template <bool Backward, class Layer>
void step(Layer& layer, lowrank::Graph<float>& g, const Mat& x, const lowrank::ParameterList<float>& params) {
    g.clear();
    const auto xv = g.input(x, /*requires_grad=*/Backward);
    const auto y = layer.forward(g, xv);
    if constexpr (Backward) {
        lowrank::zero_grad(params);
        g.backward(lowrank::sum(g, y));
    }
    benchmark::DoNotOptimize(y.value().data());
    benchmark::ClobberMemory();
}

/// Wall-clock and process CPU seconds.
struct Times {
    double wall = 0, cpu = 0;
};

Times now() {
    timespec cpu{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
    return {std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(),
            static_cast<double>(cpu.tv_sec) + 1e-9 * static_cast<double>(cpu.tv_nsec)};
}

/// Mean seconds per step of the dense layer (d x d, bias) on N tokens, timed once per group
/// (d, N, r) and mode; see the file comment.
Times dense_times(Index d, Index n, Index r, bool backward) {
    static std::map<std::tuple<Index, Index, Index, bool>, Times> cache;
    const auto key = std::make_tuple(d, n, r, backward);
    if (const auto it = cache.find(key); it != cache.end()) return it->second;
    lowrank::Rng rng(42);
    lowrank::Linear<float> layer("dense", d, d, rng);
    lowrank::Graph<float> g;
    g.set_grad_enabled(backward);
    const auto params = layer.parameters();
    const Mat& x = input(n, d);
    auto once = [&] { backward ? step<true>(layer, g, x, params) : step<false>(layer, g, x, params); };
    once();  // warm-up, as the benchmarks do
    const Times start = now();
    Times t;
    long steps = 0;
    do {
        once();
        ++steps;
        const Times end = now();
        t = {end.wall - start.wall, end.cpu - start.cpu};
    } while (t.wall < kDenseMinTime || steps < 2);
    return cache[key] = {t.wall / static_cast<double>(steps), t.cpu / static_cast<double>(steps)};
}

// --- the layers, built once per (d, r) -------------------------------------------------

template <class Layer>
using Cache = std::map<std::pair<Index, Index>, std::unique_ptr<Layer>>;

lowrank::LowRankLinear<float>& low_rank_layer(Index d, Index r) {
    static Cache<lowrank::LowRankLinear<float>> cache;
    auto& p = cache[{d, r}];
    if (!p) {
        lowrank::Rng rng(42);
        p = std::make_unique<lowrank::LowRankLinear<float>>("lr", d, d, rng, lowrank::LowRankOptions{.rank = r});
    }
    return *p;
}

lowrank::SpectralLinear<float>& spectral_layer(Index d, Index r) {
    static Cache<lowrank::SpectralLinear<float>> cache;
    auto& p = cache[{d, r}];
    if (!p) {
        lowrank::Rng rng(42);
        p = std::make_unique<lowrank::SpectralLinear<float>>("sst", d, d, rng, lowrank::SpectralOptions{.rank = r});
    }
    return *p;
}

/// One layer per d at the default capacity floor(d / 2); the benchmark sets its active rank.
lowrank::IncrementalRankLinear<float>& incremental_layer(Index d) {
    static std::map<Index, std::unique_ptr<lowrank::IncrementalRankLinear<float>>> cache;
    auto& p = cache[d];
    if (!p) {
        lowrank::Rng rng(42);
        p = std::make_unique<lowrank::IncrementalRankLinear<float>>("inrank", d, d, rng,
                                                                   lowrank::IncrementalRankOptions{.rank = 1});
    }
    return *p;
}

/// Depth 3 at width d, compressed at rank r with a Gaussian stand-in for dL/dW1 (the
/// bases' values do not change the cost): inner width 2r, so it costs about what a rank-2r
/// factorisation does, plus three 2r x 2r products.
lowrank::DeepLowRankLinear<float>& deep_layer(Index d, Index r) {
    static Cache<lowrank::DeepLowRankLinear<float>> cache;
    auto& p = cache[{d, r}];
    if (!p) {
        lowrank::Rng rng(42);
        p = std::make_unique<lowrank::DeepLowRankLinear<float>>("deep", d, d, rng);
        Mat grad(p->factors().front().rows(), d);
        lowrank::init::normal<float>(grad, rng);
        p->compress(r, grad);
    }
    return *p;
}

// --- GEMM FLOPs per token (bias, sum and the sigma scaling are not counted) -------------

double dense_flops(double d, bool backward) { return (backward ? 3.0 : 1.0) * 2.0 * d * d; }

/// x V, (x V) U^T; backward: dy U, dy^T (x V), x^T (dy U), (dy U) V^T.
double low_rank_flops(double d, double r, bool backward) { return (backward ? 3.0 : 1.0) * 4.0 * d * r; }

/// Forward: x [V_a | V_f] and (x V sigma) [U_a | U_f]^T over all d pairs. Backward:
/// dy [U_a | U_f] and its product with [V_a | V_f]^T (all d pairs again, for dx), plus the
/// gradients of the r active pairs, dy^T (x V_a) and x^T (dy U_a).
double spectral_flops(double d, double r, bool backward) {
    return backward ? 8.0 * d * d + 4.0 * d * r : 4.0 * d * d;
}

/// Each factor of the chain a linear node: forward 2 rows cols, backward twice that (dx, dW).
double deep_flops(const lowrank::DeepLowRankLinear<float>& layer, bool backward) {
    double f = 0;
    for (const auto& p : layer.factors()) f += 2.0 * static_cast<double>(p.rows()) * static_cast<double>(p.cols());
    return (backward ? 3.0 : 1.0) * f;
}

// --- the benchmark body ------------------------------------------------------------------

template <bool Backward, class Layer>
void run(benchmark::State& state, Layer& layer, double flops_per_token) {
    const Index d = state.range(0);
    const Index n = state.range(1);
    const Times dense = dense_times(d, n, state.range(2), Backward);  // before the timing, cached
    const Mat& x = input(n, d);
    lowrank::Graph<float> g;
    g.set_grad_enabled(Backward);
    const auto params = layer.parameters();

    step<Backward>(layer, g, x, params);  // warm-up: sizes every buffer the steady state reuses
    const Times start = now();
    for (auto _ : state) step<Backward>(layer, g, x, params);
    const Times end = now();

    const double tokens = static_cast<double>(n), iterations = static_cast<double>(state.iterations());
    lowrank::bench::set_rate_counters(state, flops_per_token * tokens, tokens, "tokens_per_second");
    // The loop's own clock readings: the same interval Google Benchmark times, give or take
    // the two calls, so that the ratios are plain numbers rather than rates.
    state.counters["speedup_vs_dense"] = dense.wall * iterations / (end.wall - start.wall);
    state.counters["speedup_vs_dense_cpu"] = dense.cpu * iterations / (end.cpu - start.cpu);
    state.counters["flop_ratio"] = dense_flops(static_cast<double>(d), Backward) / flops_per_token;
}

/// Sets detail::low_rank_one_pass_max_rank() for one benchmark and restores it after.
class OnePassLimit {
public:
    explicit OnePassLimit(Index limit) : saved_(lowrank::detail::low_rank_one_pass_max_rank()) {
        lowrank::detail::low_rank_one_pass_max_rank() = limit;
    }
    ~OnePassLimit() { lowrank::detail::low_rank_one_pass_max_rank() = saved_; }
    OnePassLimit(const OnePassLimit&) = delete;
    OnePassLimit& operator=(const OnePassLimit&) = delete;

private:
    Index saved_;
};

enum class Path { default_, gemm, one_pass };

template <bool Backward, Path P = Path::default_>
void low_rank(benchmark::State& state) {
    const Index d = state.range(0), r = state.range(2);
    const Index limit = P == Path::gemm       ? 0
                        : P == Path::one_pass ? std::numeric_limits<Index>::max()
                                              : lowrank::detail::low_rank_one_pass_max_rank();
    OnePassLimit scope(limit);
    run<Backward>(state, low_rank_layer(d, r), low_rank_flops(static_cast<double>(d), static_cast<double>(r), Backward));
}

template <bool Backward>
void spectral(benchmark::State& state) {
    const Index d = state.range(0), r = state.range(2);
    run<Backward>(state, spectral_layer(d, r), spectral_flops(static_cast<double>(d), static_cast<double>(r), Backward));
}

template <bool Backward>
void incremental(benchmark::State& state) {
    const Index d = state.range(0), r = state.range(2);
    auto& layer = incremental_layer(d);
    layer.U.set_active_cols(r);  // grow() only grows; the shapes visit ranks out of order
    layer.V.set_active_cols(r);
    run<Backward>(state, layer, low_rank_flops(static_cast<double>(d), static_cast<double>(r), Backward));
}

template <bool Backward>
void deep(benchmark::State& state) {
    const Index d = state.range(0), r = state.range(2);
    auto& layer = deep_layer(d, r);
    run<Backward>(state, layer, deep_flops(layer, Backward));
}

constexpr int kDims[] = {768, 1024};
constexpr int kTokens[] = {512, 4096};
constexpr int kRanks[] = {8, 32, 64, 128, 256};  // all <= floor(d / 2): IncrementalRankLinear's
                                                 // capacity, and 2r <= d for DeepLowRankLinear

/// Every shape is registered on its own, grouped by (d, N, r), so that the layers and paths
/// compared with each other run back to back and right after the dense reference of their
/// group.
bool register_all() {
    using lowrank::bench::add_shape;
    const Index one_pass_limit = lowrank::detail::low_rank_one_pass_max_rank();
    for (const int d : kDims)
        for (const int n : kTokens)
            for (const int r : kRanks) {
                add_shape("BM_LowRankLinear_fwd", low_rank<false>, d, n, r);
                add_shape("BM_IncrementalRankLinear_fwd", incremental<false>, d, n, r);
                add_shape("BM_SpectralLinear_fwd", spectral<false>, d, n, r);
                add_shape("BM_DeepLowRankLinear_fwd", deep<false>, d, n, r);
                add_shape("BM_LowRankLinear_fwdbwd", low_rank<true>, d, n, r);
                // LowRankLinear's other backward path at the same shape: the GEMMs forced where
                // the default is the one-pass kernel, the one-pass kernel forced above it.
                if (r <= one_pass_limit)
                    add_shape("BM_LowRankLinear_gemm_fwdbwd", low_rank<true, Path::gemm>, d, n, r);
                else if (r <= 128)
                    add_shape("BM_LowRankLinear_onepass_fwdbwd", low_rank<true, Path::one_pass>, d, n, r);
                add_shape("BM_IncrementalRankLinear_fwdbwd", incremental<true>, d, n, r);
                add_shape("BM_SpectralLinear_fwdbwd", spectral<true>, d, n, r);
                add_shape("BM_DeepLowRankLinear_fwdbwd", deep<true>, d, n, r);
            }
    return true;
}

const bool kRegistered = register_all();

}  // namespace
