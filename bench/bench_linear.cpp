// The dense layer y = x * W^T + b (d x d, bias) on a reused tape: forward alone, and
// forward + backward. bench/pytorch_bench.py times the same shapes in PyTorch.
//
//   BM_Gemm/d:1024/N:4096            the bare GEMM y = x * W^T, no tape, no bias (the kernel)
//   BM_Linear_fwd/d:1024/N:4096      tape recorded with gradients off (inference)
//   BM_Linear_fwdbwd/d:1024/N:4096   dx, dW and db, as for an inner layer of a network
//   BM_LinearCrossEntropy_fwdbwd/N:1024/C:256/V:50257
//                                    GPT-2 tiny's LM head and loss (linear_cross_entropy,
//                                    the fused node) with dx and dW: B 8 x T 128 tokens
//
// What one fwdbwd iteration does, all through the public API:
//   g.clear(); x = g.input(X, requires_grad = true)   copies X (N x d) into a reused buffer
//   y = layer.forward(g, x)                           GEMM + bias
//   weight/bias zero_grad()                           as an optimizer's zero_grad would
//   g.backward(sum(g, y))                             seeds dy = ones, then the linear
//                                                     node's dx and dW GEMMs and db
// Besides the three GEMMs the time includes memory-bound passes over (N x d) that a
// seeded PyTorch backward (y.backward(ones)) does not make: the input copy, sum's forward,
// Graph::backward zero-filling dy and dx before accumulating, and sum's backward filling
// dy. Measured alone they take 0.13 ms at d = 768, N = 512 and 6 ms at d = 1024, N = 4096:
// 1-3% of the step (docs/performance.md).

#include "bench_common.hpp"

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_basic.hpp>
#include <lowrank/autograd/ops_linear_cross_entropy.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/nn/linear.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <vector>

namespace {

using lowrank::Index;

template <bool Backward>
void run_linear(benchmark::State& state) {
    const Index d = state.range(0);
    const Index n = state.range(1);

    lowrank::Rng rng(42);
    lowrank::Linear<float> layer("fc", d, d, rng);
    lowrank::Matrix<float> x(n, d);
    lowrank::init::normal<float>(x, rng);

    lowrank::Graph<float> g;
    g.set_grad_enabled(Backward);

    auto step = [&] {
        g.clear();
        const auto xv = g.input(x, /*requires_grad=*/Backward);
        const auto y = layer.forward(g, xv);
        if constexpr (Backward) {
            layer.weight.zero_grad();
            layer.bias.zero_grad();
            g.backward(lowrank::sum(g, y));
        }
        benchmark::DoNotOptimize(y.value().data());
        benchmark::ClobberMemory();
    };

    step();  // warm-up: sizes (and first-touches) every buffer the steady state reuses
    for (auto _ : state) step();

    const double fwd_flops = 2.0 * static_cast<double>(n) * static_cast<double>(d) * static_cast<double>(d);
    lowrank::bench::set_rate_counters(state, Backward ? 3.0 * fwd_flops : fwd_flops, static_cast<double>(n),
                                      "tokens_per_second");
}

void BM_Linear_fwd(benchmark::State& state) { run_linear<false>(state); }
void BM_Linear_fwdbwd(benchmark::State& state) { run_linear<true>(state); }

/// The bare product y = x * W^T into a preallocated y: Eigen's GEMM kernel alone, the
/// floor under BM_Linear_fwd (and, in PyTorch, torch.mm(..., out=y): OpenBLAS's kernel).
void BM_Gemm(benchmark::State& state) {
    const Index d = state.range(0);
    const Index n = state.range(1);
    lowrank::Rng rng(42);
    lowrank::Matrix<float> x(n, d), w(d, d), y(n, d);
    lowrank::init::normal<float>(x, rng);
    lowrank::init::normal<float>(w, rng);
    y.setZero();
    auto step = [&] {
        y.noalias() = x * w.transpose();
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    };
    step();
    for (auto _ : state) step();
    lowrank::bench::set_rate_counters(
        state, 2.0 * static_cast<double>(n) * static_cast<double>(d) * static_cast<double>(d),
        static_cast<double>(n), "tokens_per_second");
}

/// The LM head and its loss, fused (linear_cross_entropy, its default chunk of 128 tokens),
/// forward and backward: x (N x C) and the tied weight W (V x C) both get gradients. In
/// PyTorch the composition F.cross_entropy(x @ W.T, targets) (no bias, as GPT-2's head).
void BM_LinearCrossEntropy_fwdbwd(benchmark::State& state) {
    const Index n = state.range(0), c = state.range(1), vocab = state.range(2);
    lowrank::Rng rng(42);
    lowrank::Matrix<float> x(n, c), wv(vocab, c);
    lowrank::init::normal<float>(x, rng);
    lowrank::init::normal<float>(wv, rng, 0.0, 0.02);
    lowrank::Parameter<float> w("wte", wv);
    std::vector<std::int32_t> targets(static_cast<std::size_t>(n));
    for (auto& t : targets) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab)));
    lowrank::Graph<float> g;
    auto step = [&] {
        g.clear();
        const auto xv = g.input(x, /*requires_grad=*/true);
        w.zero_grad();
        const auto loss = lowrank::linear_cross_entropy(g, xv, g.param(w), targets);
        g.backward(loss);
        benchmark::DoNotOptimize(w.grad.data());
        benchmark::ClobberMemory();
    };
    step();
    for (auto _ : state) step();
    lowrank::bench::set_rate_counters(
        state, 6.0 * static_cast<double>(n) * static_cast<double>(c) * static_cast<double>(vocab),
        static_cast<double>(n), "tokens_per_second");
}

void linear_shapes(benchmark::internal::Benchmark* b) {
    b->ArgNames({"d", "N"});
    for (const int d : {768, 1024})
        for (const int n : {512, 4096}) b->Args({d, n});
    b->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_Gemm)->Apply(linear_shapes);
BENCHMARK(BM_Linear_fwd)->Apply(linear_shapes);
BENCHMARK(BM_Linear_fwdbwd)->Apply(linear_shapes);
BENCHMARK(BM_LinearCrossEntropy_fwdbwd)
    ->ArgNames({"N", "C", "V"})
    ->Args({1024, 256, 50257})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
