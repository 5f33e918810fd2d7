// One training step of a 784-1024-1024-10 ReLU MLP (Fashion-MNIST's shape) at batch B:
// input copy, forward, softmax-cross-entropy, zero_grad, backward, AdamW step. The batch
// is fixed (no data loading). bench/pytorch_bench.py times the same step in PyTorch.
// Besides samples/s it reports the time of each phase (forward_ms, backward_ms,
// optimizer_ms), which pytorch_bench.py reports too.

#include "bench_common.hpp"

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_loss.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/models/mlp.hpp>

#if __has_include(<lowrank/optim/adam.hpp>)
#include <lowrank/optim/adam.hpp>
#define LOWRANK_BENCH_HAVE_ADAMW 1
#endif

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <vector>

namespace {

using lowrank::Index;

constexpr Index kIn = 784, kHidden = 1024, kClasses = 10;

#ifdef LOWRANK_BENCH_HAVE_ADAMW
constexpr const char* kOptimizer = "AdamW(lr=1e-3, weight_decay=0.01)";
#else
constexpr const char* kOptimizer = "SGD (include/lowrank/optim/adam.hpp not found)";
#endif
// The context is printed before the first benchmark runs, so it is added at start-up.
const bool kOptimizerNamed = (benchmark::AddCustomContext("mlp_optimizer", kOptimizer), true);

void BM_Mlp_train_step(benchmark::State& state) {
    const Index batch = state.range(0);

    lowrank::Rng rng(7);
    lowrank::Mlp<float> mlp(lowrank::MlpOptions{.sizes = {kIn, kHidden, kHidden, kClasses}}, rng);
    lowrank::Matrix<float> x(batch, kIn);
    lowrank::init::uniform<float>(x, rng, 0.0, 1.0);
    std::vector<std::int32_t> targets(static_cast<std::size_t>(batch));
    for (auto& t : targets) t = static_cast<std::int32_t>(rng.below(kClasses));

    lowrank::Graph<float> g;
#ifdef LOWRANK_BENCH_HAVE_ADAMW
    lowrank::AdamW<float> opt(mlp.parameters(), lowrank::AdamOptions{.lr = 1e-3, .weight_decay = 0.01});
#else
    // Stand-in until include/lowrank/optim exists: plain SGD, one pass per parameter.
    const auto params = mlp.parameters();
#endif

    // Phase times (wall clock, summed over the timed iterations): forward = input copy,
    // forward and loss; backward = zero_grad and backward; optimizer = step. Four clock
    // reads per step cost well under a microsecond.
    using Clock = std::chrono::steady_clock;
    double phase_ms[3] = {0.0, 0.0, 0.0};
    auto step = [&] {
        const auto t0 = Clock::now();
        g.clear();
        const auto xv = g.input(x);
        const auto logits = mlp.forward(g, xv);
        const auto loss = lowrank::cross_entropy(g, logits, targets);
        const auto t1 = Clock::now();
#ifdef LOWRANK_BENCH_HAVE_ADAMW
        opt.zero_grad();
        g.backward(loss);
        const auto t2 = Clock::now();
        opt.step();
#else
        lowrank::zero_grad(params);
        g.backward(loss);
        const auto t2 = Clock::now();
        for (auto* p : params) p->value -= 1e-3f * p->grad;
#endif
        benchmark::DoNotOptimize(loss.item());
        benchmark::ClobberMemory();
        const auto t3 = Clock::now();
        phase_ms[0] += std::chrono::duration<double, std::milli>(t1 - t0).count();
        phase_ms[1] += std::chrono::duration<double, std::milli>(t2 - t1).count();
        phase_ms[2] += std::chrono::duration<double, std::milli>(t3 - t2).count();
    };

    step();  // warm-up: sizes every buffer and creates the optimizer state
    phase_ms[0] = phase_ms[1] = phase_ms[2] = 0.0;
    for (auto _ : state) step();

    state.counters["forward_ms"] = benchmark::Counter(phase_ms[0], benchmark::Counter::kAvgIterations);
    state.counters["backward_ms"] = benchmark::Counter(phase_ms[1], benchmark::Counter::kAvgIterations);
    state.counters["optimizer_ms"] = benchmark::Counter(phase_ms[2], benchmark::Counter::kAvgIterations);

    // GEMM FLOPs: forward 2*B*sum(in*out); backward twice that, less the input gradient of
    // the first layer, which nothing needs (the input does not require grad).
    const double b = static_cast<double>(batch);
    const double fwd = 2.0 * b * static_cast<double>(kIn * kHidden + kHidden * kHidden + kHidden * kClasses);
    const double train = 3.0 * fwd - 2.0 * b * static_cast<double>(kIn * kHidden);
    lowrank::bench::set_rate_counters(state, train, b, "samples_per_second");
}

}  // namespace

BENCHMARK(BM_Mlp_train_step)->ArgName("B")->Arg(128)->UseRealTime()->Unit(benchmark::kMillisecond);
