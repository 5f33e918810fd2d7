// linear_cross_entropy, the LM head fused with its loss and computed a chunk of tokens at
// a time: gradients against central differences in double, the loss and every gradient
// against the unfused cross_entropy(linear(...)) in double and float (ragged last chunks,
// a vocabulary that is no multiple of the SIMD width, ignored rows, inputs without a
// gradient), the same bits on a repeated step and at 1 and 2 threads, and its errors.
// Derivation: docs/derivations/fused_linear_cross_entropy.md.

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/core/threads.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_linear_cross_entropy {

using Catch::Contains;
using lowrank::GradcheckOptions;
using lowrank::Graph;
using lowrank::Index;
using lowrank::LinearCrossEntropyOptions;
using lowrank::Matrix;
using lowrank::MatrixD;
using lowrank::Parameter;
using lowrank::ParameterList;
using lowrank::Rng;
using lowrank::Var;

namespace {

template <class T>
Matrix<T> random_matrix(Index rows, Index cols, Rng& rng, double stddev = 1.0) {
    Matrix<T> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<T>(rng.normal(0.0, stddev));
    return m;
}

std::vector<std::int32_t> random_targets(Index n, Index vocab, Rng& rng) {
    std::vector<std::int32_t> out(static_cast<std::size_t>(n));
    for (auto& t : out) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab)));
    return out;
}

/// x, W, b and targets of one head, the loss computed both ways on the same parameters.
template <class T>
struct Head {
    Parameter<T> x, w, b;
    std::vector<std::int32_t> targets;
    bool bias = true;

    Head(Index n, Index c, Index vocab, bool with_bias, std::uint64_t seed)
        : bias(with_bias) {
        Rng rng(seed);
        x = Parameter<T>("x", random_matrix<T>(n, c, rng));
        w = Parameter<T>("w", random_matrix<T>(vocab, c, rng, 0.5));
        b = Parameter<T>("b", random_matrix<T>(1, vocab, rng, 0.5));
        targets = random_targets(n, vocab, rng);
    }

    ParameterList<T> params() { return bias ? ParameterList<T>{&x, &w, &b} : ParameterList<T>{&x, &w}; }
    Var<T> bias_var(Graph<T>& g) { return bias ? g.param(b) : Var<T>{}; }

    Var<T> fused(Graph<T>& g, const LinearCrossEntropyOptions& options) {
        return lowrank::linear_cross_entropy(g, g.param(x), g.param(w), bias_var(g), targets, options);
    }
    Var<T> unfused(Graph<T>& g, std::int32_t ignore_index) {
        return lowrank::cross_entropy(g, lowrank::linear(g, g.param(x), g.param(w), bias_var(g)), targets,
                                      ignore_index);
    }
};

/// The loss and every gradient of one backward pass.
template <class T>
struct Result {
    T loss = 0;
    std::vector<Matrix<T>> grads;
};

template <class T, class Fn>
Result<T> run(ParameterList<T> params, Fn&& record, T dout = T(1)) {
    for (auto* p : params) p->grad.setZero(p->value.rows(), p->value.cols());
    Graph<T> g;
    Var<T> loss = record(g);
    Result<T> r{loss.item(), {}};
    if (dout != T(1)) loss = lowrank::scale(g, loss, dout);
    g.backward(loss);
    for (auto* p : params) r.grads.push_back(p->grad);
    return r;
}

template <class T>
double relative_error(const Matrix<T>& a, const Matrix<T>& b) {
    const double scale = std::max(1e-30, static_cast<double>(b.cwiseAbs().maxCoeff()));
    return static_cast<double>((a - b).cwiseAbs().maxCoeff()) / scale;
}

}  // namespace

TEST_CASE("linear_cross_entropy passes gradcheck in double w.r.t. x, W and b", "[autograd][gradcheck]") {
    const bool bias = GENERATE(true, false);
    const Index chunk = GENERATE(1, 3, 64);  // one row, ragged (7 = 3 + 3 + 1), all in one chunk
    INFO("bias " << bias << ", chunk_rows " << chunk);
    Head<double> head(7, 5, 11, bias, 31);
    head.targets[2] = lowrank::kIgnoreIndex;
    GradcheckOptions opt;
    opt.samples_per_tensor = 0;
    for (const bool squared : {false, true}) {
        INFO("loss squared (an output gradient that is not 1): " << squared);
        const auto r = lowrank::gradcheck(
            [&](Graph<double>& g) {
                const auto l = head.fused(g, {.chunk_rows = chunk});
                return squared ? lowrank::scale(g, lowrank::mul(g, l, l), 0.5) : l;
            },
            head.params(), opt);
        INFO("worst: " << r.worst << "\n" << r.report);
        CHECK(r.passed);
        CHECK(r.checked == 7 * 5 + 11 * 5 + (bias ? 11 : 0));
        for (const auto* p : head.params()) {
            INFO(p->name());
            CHECK(p->grad.norm() > 0.0);
        }
        CHECK(head.x.grad.row(2).norm() == 0.0);  // the ignored row
    }
}

TEST_CASE("linear_cross_entropy equals cross_entropy(linear(...)) in loss and every gradient",
          "[autograd][graph]") {
    // N = 37 in chunks of 8 leaves a last chunk of 5; V = 203 is no multiple of 4, 8 or 16.
    const bool bias = GENERATE(true, false);
    const Index chunk = GENERATE(8, 37, 100);
    const std::int32_t ignore = GENERATE(lowrank::kIgnoreIndex, 5);
    INFO("bias " << bias << ", chunk_rows " << chunk << ", ignore_index " << ignore);
    const Index n = 37, c = 24, vocab = 203;
    SECTION("double") {
        Head<double> head(n, c, vocab, bias, 41);
        head.targets[0] = ignore;
        head.targets[20] = ignore;
        for (const double dout : {1.0, -2.5}) {
            const auto params = head.params();
            const auto fused = run<double>(
                params, [&](Graph<double>& g) { return head.fused(g, {.ignore_index = ignore, .chunk_rows = chunk}); },
                dout);
            const auto unfused =
                run<double>(params, [&](Graph<double>& g) { return head.unfused(g, ignore); }, dout);
            CHECK(fused.loss == Approx(unfused.loss).epsilon(1e-13));
            for (std::size_t k = 0; k < params.size(); ++k) {
                INFO(params[k]->name() << ", dL " << dout);
                CHECK(relative_error(fused.grads[k], unfused.grads[k]) < 1e-12);
            }
        }
    }
    SECTION("float") {
        Head<float> head(n, c, vocab, bias, 42);
        head.targets[3] = ignore;
        const auto params = head.params();
        const auto fused = run<float>(
            params, [&](Graph<float>& g) { return head.fused(g, {.ignore_index = ignore, .chunk_rows = chunk}); });
        const auto unfused = run<float>(params, [&](Graph<float>& g) { return head.unfused(g, ignore); });
        CHECK(fused.loss == Approx(unfused.loss).epsilon(1e-6));
        for (std::size_t k = 0; k < params.size(); ++k) {
            INFO(params[k]->name());
            CHECK(relative_error(fused.grads[k], unfused.grads[k]) < 1e-5);
        }
    }
}

TEST_CASE("linear_cross_entropy: inputs without a gradient, every row ignored, gradients disabled",
          "[autograd][graph]") {
    Head<double> head(9, 6, 17, true, 51);
    SECTION("a constant input: only W and b get gradients, equal to the unfused ones") {
        const MatrixD x = head.x.value;
        const ParameterList<double> params{&head.w, &head.b};
        const auto fused = run<double>(params, [&](Graph<double>& g) {
            return lowrank::linear_cross_entropy(g, g.input(x), g.param(head.w), g.param(head.b), head.targets,
                                                 {.chunk_rows = 4});
        });
        const auto unfused = run<double>(params, [&](Graph<double>& g) {
            return lowrank::cross_entropy(g, lowrank::linear(g, g.input(x), g.param(head.w), g.param(head.b)),
                                          head.targets);
        });
        CHECK(fused.loss == Approx(unfused.loss).epsilon(1e-13));
        for (std::size_t k = 0; k < params.size(); ++k) CHECK(relative_error(fused.grads[k], unfused.grads[k]) < 1e-12);
    }
    SECTION("a frozen weight: only x gets a gradient") {
        head.w.trainable = false;
        head.b.trainable = false;
        const auto fused = run<double>({&head.x}, [&](Graph<double>& g) { return head.fused(g, {.chunk_rows = 4}); });
        head.w.trainable = true;
        head.b.trainable = true;
        const auto unfused = run<double>({&head.x}, [&](Graph<double>& g) { return head.unfused(g, lowrank::kIgnoreIndex); });
        CHECK(relative_error(fused.grads[0], unfused.grads[0]) < 1e-12);
    }
    SECTION("every row ignored: zero loss and zero gradients") {
        head.targets.assign(9, lowrank::kIgnoreIndex);
        const auto fused = run<double>(head.params(), [&](Graph<double>& g) { return head.fused(g, {}); });
        CHECK(fused.loss == 0.0);
        for (const auto& grad : fused.grads) CHECK(grad.isZero(0.0));
    }
    SECTION("gradients disabled (evaluation): the same loss, nothing to back-propagate") {
        Graph<double> g;
        g.set_grad_enabled(false);
        const auto l = head.fused(g, {.chunk_rows = 4});
        CHECK_FALSE(l.requires_grad());
        Graph<double> h;
        CHECK(l.item() == Approx(head.unfused(h, lowrank::kIgnoreIndex).item()).epsilon(1e-13));
    }
}

TEST_CASE("linear_cross_entropy gives the same bits on a repeated step and at 1 and 2 threads",
          "[autograd][graph]") {
    // Large enough that every loop takes its parallel path: three blocks of the vocabulary
    // (1024 rows each) for the softmax statistics, the thin-product kernels split over rows
    // or columns of their result, and 300 tokens in chunks of 128, the last one (44) padded
    // to whole SIMD packets. No sum is split by thread, so the bits do not change.
    Head<float> head(300, 64, 2500, true, 61);
    const auto params = head.params();
    const auto record = [&](Graph<float>& g) { return head.fused(g, {.chunk_rows = 128}); };
    const int saved = lowrank::num_threads();
    std::vector<Result<float>> first;
    for (const int threads : {1, 2}) {
        INFO(threads << " threads");
        lowrank::set_num_threads(threads);
        const auto one = run<float>(params, record);
        const auto again = run<float>(params, record);
        CHECK(one.loss == again.loss);
        for (std::size_t k = 0; k < params.size(); ++k) {
            INFO(params[k]->name());
            CHECK(one.grads[k] == again.grads[k]);
            if (!first.empty()) CHECK(one.grads[k] == first[0].grads[k]);
        }
        if (!first.empty()) CHECK(one.loss == first[0].loss);
        first.push_back(one);
    }
    lowrank::set_num_threads(saved);
}

TEST_CASE("linear_cross_entropy rejects bad targets, shapes and chunk sizes, naming them", "[autograd][graph]") {
    Head<double> head(4, 3, 5, true, 71);
    Graph<double> g;
    const auto x = g.param(head.x), w = g.param(head.w), b = g.param(head.b);
    auto targets = head.targets;
    targets[1] = 5;
    CHECK_THROWS_WITH(lowrank::linear_cross_entropy(g, x, w, b, targets),
                      Contains("linear_cross_entropy") && Contains("target at row 1") && Contains("got 5"));
    targets.pop_back();
    CHECK_THROWS_WITH(lowrank::linear_cross_entropy(g, x, w, b, targets),
                      Contains("expected 4 targets") && Contains("got 3"));
    CHECK_THROWS_WITH(lowrank::linear_cross_entropy(g, x, w, b, head.targets, {.chunk_rows = 0}),
                      Contains("chunk_rows > 0"));
    CHECK_THROWS_WITH(lowrank::linear_cross_entropy(g, x, g.param(head.b), head.targets),
                      Contains("expects"));
    Parameter<double> sb("short", MatrixD::Zero(1, 4));
    CHECK_THROWS_WITH(lowrank::linear_cross_entropy(g, x, w, g.param(sb), head.targets), Contains("bias"));
}

}  // namespace test_linear_cross_entropy
