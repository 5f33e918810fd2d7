// After its first step an optimizer allocates nothing, and neither does a whole training
// step of a TrainingRun (tape, policies, clipping, schedule, optimizer) once its shapes
// are settled: the steady-state step is the hot loop of training, and fresh memory is
// expensive on these machines (DATA.md).
//
// malloc is replaced here (glibc allows it; the real allocator stays reachable as
// __libc_malloc), which counts Eigen's allocations as well as operator new's. It is left
// out under sanitizers, which own malloc themselves.
#include <lowrank/autograd/autograd.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/optim.hpp>
#include <lowrank/policy/galore.hpp>
#include <lowrank/policy/lora.hpp>
#include <lowrank/train/run.hpp>

#include "optim_test_support.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_no_allocation {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define LOWRANK_TEST_COUNT_MALLOC 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define LOWRANK_TEST_COUNT_MALLOC 0
#endif
#endif
#if !defined(LOWRANK_TEST_COUNT_MALLOC)
#if defined(__GLIBC__)
#define LOWRANK_TEST_COUNT_MALLOC 1
#else
#define LOWRANK_TEST_COUNT_MALLOC 0
#endif
#endif

#if LOWRANK_TEST_COUNT_MALLOC

namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};

void count() {
    if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
}

/// Calls f and returns how many allocations it made.
template <class F>
long allocations_in(F&& f) {
    allocations = 0;
    counting = true;
    f();
    counting = false;
    return allocations.load();
}
}  // namespace

extern "C" {
void* __libc_malloc(std::size_t size);
void* __libc_calloc(std::size_t n, std::size_t size);
void* __libc_realloc(void* p, std::size_t size);
void __libc_free(void* p);

void* malloc(std::size_t size) noexcept {
    count();
    return __libc_malloc(size);
}
void* calloc(std::size_t n, std::size_t size) noexcept {
    count();
    return __libc_calloc(n, size);
}
void* realloc(void* p, std::size_t size) noexcept {
    count();
    return __libc_realloc(p, size);
}
void free(void* p) noexcept { __libc_free(p); }
}

using namespace lowrank;
using lowrank::test::make_param;
using lowrank::test::set_grad;

namespace {

std::unique_ptr<Optimizer<float>> make_optimizer(const std::string& kind, ParameterList<float> params) {
    if (kind == "sgd") return std::make_unique<Sgd<float>>(std::move(params), SgdOptions{.lr = 0.01});
    if (kind == "sgd-nesterov")
        return std::make_unique<Sgd<float>>(std::move(params),
                                            SgdOptions{.lr = 0.01, .momentum = 0.9, .nesterov = true});
    if (kind == "adam") return std::make_unique<Adam<float>>(std::move(params), AdamOptions{});
    return std::make_unique<AdamW<float>>(std::move(params), AdamOptions{.weight_decay = 0.01});
}

struct Batch {
    MatrixF x;
    std::vector<std::int32_t> y;
};

// 32 Gaussian rows of 16 features and labels in [0, 4), from its own seed.
Batch make_batch(std::uint64_t seed) {
    Rng rng(seed);
    Batch b{MatrixF(32, 16), {}};
    init::normal<float>(b.x, rng);
    for (Index i = 0; i < b.x.rows(); ++i) b.y.push_back(static_cast<std::int32_t>(rng.below(4)));
    return b;
}

// A 16-32-32-4 MLP in float with AdamW (weights decayed, biases not) in a TrainingRun with
// a warm-up + cosine schedule and a clipping norm every gradient exceeds, `add(run)` adding
// its policies. Runs three steps (the tape's nodes, the optimizer's state, the policies'
// first decisions) and returns the allocations of the next eight, on batches made before:
// steps 3 to 10, across the warm-up's end and into the cosine.
template <class AddPolicies>
long steady_state_run_allocations(AddPolicies&& add) {
    Rng rng(3);
    Mlp<float> model(MlpOptions{.sizes = {16, 32, 32, 4}}, rng);
    ParameterList<float> weights, biases;
    for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
    AdamW<float> opt(weights, AdamOptions{.lr = 1e-3, .weight_decay = 0.01});
    opt.add_group(biases, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
    TrainingRun<float> run(model, opt,
                           {.schedule = LrSchedule(ScheduleOptions{
                                .kind = ScheduleKind::warmup_cosine, .warmup_steps = 5, .total_steps = 20}),
                            .clip_grad_norm = 1e-3});
    add(run);
    std::vector<Batch> data;
    for (std::uint64_t i = 0; i < 4; ++i) data.push_back(make_batch(100 + i));
    std::size_t next = 0;
    const auto step = [&] {
        const Batch& b = data[next++ % data.size()];
        return run.step(
            [&](Graph<float>& g) { return cross_entropy(g, model.forward(g, g.input(b.x)), b.y); });
    };
    for (int i = 0; i < 3; ++i) step();
    int clipped = 0;
    const long n = allocations_in([&] {
        for (int i = 0; i < 8; ++i) clipped += step().clipped ? 1 : 0;
    });
    CHECK(clipped == 8);  // the clipping path ran at every counted step
    CHECK(run.global_step() == 11);
    return n;
}

}  // namespace

TEST_CASE("the allocation counter sees Eigen's and the standard library's allocations",
          "[optim][alloc]") {
    // Without this the next test could not fail.
    CHECK(allocations_in([] { MatrixF m(64, 64); m.setZero(); }) >= 1);
    CHECK(allocations_in([] { std::string s(100, 'x'); }) >= 1);
}

TEST_CASE("a steady-state step allocates nothing", "[optim][alloc]") {
    const std::string kind = GENERATE("sgd", "sgd-nesterov", "adam", "adamw");
    INFO(kind);
    // One parameter large enough to take the blocked (possibly parallel) path.
    auto a = make_param<float>("a", 300, 200);
    auto b = make_param<float>("b", 1, 7);
    auto c = make_param<float>("c", 5, 3);
    auto opt = make_optimizer(kind, {&a, &b});
    opt->add_group({&c}, GroupOptions{.lr = 1e-4, .weight_decay = 0.1});
    LrSchedule schedule(ScheduleOptions{.kind = ScheduleKind::warmup_cosine, .warmup_steps = 2, .total_steps = 10});
    for (auto* p : opt->parameters()) set_grad(*p, 0);
    schedule.apply(*opt, 0);
    opt->step();  // allocates the state
    opt->step();
    const ParameterList<float> params = opt->parameters();
    const long n = allocations_in([&] {
        for (std::int64_t step = 2; step < 6; ++step) {
            for (auto* p : params) set_grad(*p, static_cast<int>(step));
            schedule.apply(*opt, step);
            clip_grad_norm(params, 1.0);
            opt->step();
            opt->zero_grad();
        }
    });
    CHECK(n == 0);
}

TEST_CASE("a steady-state TrainingRun step of a dense MLP allocates nothing", "[optim][alloc][train]") {
    CHECK(steady_state_run_allocations([](TrainingRun<float>&) {}) == 0);
}

TEST_CASE("a steady-state TrainingRun step with LoRA on the hidden layers allocates nothing",
          "[optim][alloc][train]") {
    const auto lora = [](TrainingRun<float>& run) { run.add<Lora<float>>({.rank = 4}); };
    CHECK(steady_state_run_allocations(lora) == 0);
}

TEST_CASE("a steady-state TrainingRun step with GaLore between refreshes allocates nothing",
          "[optim][alloc][train][galore]") {
    // Gap 100: the basis is taken at the first step, before the counted ones. A refresh
    // allocates (its SVD and the new basis), once per gap; the steps between allocate nothing.
    const auto galore = [](TrainingRun<float>& run) { run.add<GaLore<float>>({.rank = 4, .gap = 100}); };
    CHECK(steady_state_run_allocations(galore) == 0);
}

TEST_CASE("a steady-state step through linear_cross_entropy allocates nothing", "[optim][alloc]") {
    // 45 tokens in chunks of 16 (a ragged last chunk of 13), a vocabulary of 37, one ignored
    // row, a bias: the node's block, its unit gradients and its per-row losses are reused.
    auto w1 = make_param<float>("w1", 16, 12);
    auto w2 = make_param<float>("w2", 37, 16);
    auto b2 = make_param<float>("b2", 1, 37);
    Rng rng(5);
    MatrixF x(45, 12);
    init::normal<float>(x, rng);
    std::vector<std::int32_t> y;
    for (Index i = 0; i < x.rows(); ++i) y.push_back(static_cast<std::int32_t>(rng.below(37)));
    y[7] = kIgnoreIndex;
    AdamW<float> opt({&w1, &w2, &b2}, AdamOptions{.lr = 1e-3, .weight_decay = 0.01});
    Graph<float> g;
    const auto step = [&] {
        g.clear();
        opt.zero_grad();
        const auto h = gelu(g, linear(g, g.input(x), g.param(w1)));
        g.backward(linear_cross_entropy(g, h, g.param(w2), g.param(b2), y, {.chunk_rows = 16}));
        opt.step();
    };
    for (int i = 0; i < 2; ++i) step();
    CHECK(allocations_in([&] {
              for (int i = 0; i < 4; ++i) step();
          }) == 0);
}

#else

TEST_CASE("a steady-state step allocates nothing", "[optim][alloc]") {
    WARN("not checked: malloc is not replaceable in this build (sanitizer or not glibc)");
}

#endif

}  // namespace test_no_allocation
