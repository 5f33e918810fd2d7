// The fused causal self-attention op: forward against explicit loops, gradients by finite
// differences in double, causality, thread-count independence, buffer reuse and errors.
// Derivation: docs/derivations/attention.md.

#include <lowrank/autograd/gradcheck.hpp>
#include <lowrank/autograd/ops_attention.hpp>
#include <lowrank/autograd/ops_basic.hpp>
#include <lowrank/core/threads.hpp>

#include "../test_support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using Catch::Contains;
using lowrank::Graph;
using lowrank::Index;
using lowrank::MatrixD;
using lowrank::Parameter;
using lowrank::Var;

namespace {

struct Shape {
    Index batch, seq_len, n_head, head_dim;
    Index channels() const { return n_head * head_dim; }
    Index rows() const { return batch * seq_len; }
};

/// Attention written out with scalar loops: scores, explicit mask, softmax, weighted sum.
MatrixD reference_attention(const MatrixD& qkv, const Shape& s) {
    const Index c = s.channels(), hd = s.head_dim;
    MatrixD y = MatrixD::Zero(s.rows(), c);
    for (Index b = 0; b < s.batch; ++b)
        for (Index h = 0; h < s.n_head; ++h)
            for (Index t = 0; t < s.seq_len; ++t) {
                const Index row = b * s.seq_len + t;
                std::vector<double> score(static_cast<std::size_t>(s.seq_len));
                double largest = -std::numeric_limits<double>::infinity();
                for (Index u = 0; u < s.seq_len; ++u) {
                    if (u > t) continue;  // the future is masked
                    double dot = 0;
                    for (Index d = 0; d < hd; ++d)
                        dot += qkv(row, h * hd + d) * qkv(b * s.seq_len + u, c + h * hd + d);
                    score[static_cast<std::size_t>(u)] = dot / std::sqrt(static_cast<double>(hd));
                    largest = std::max(largest, score[static_cast<std::size_t>(u)]);
                }
                double total = 0;
                for (Index u = 0; u <= t; ++u)
                    total += std::exp(score[static_cast<std::size_t>(u)] - largest);
                for (Index u = 0; u <= t; ++u) {
                    const double p = std::exp(score[static_cast<std::size_t>(u)] - largest) / total;
                    for (Index d = 0; d < hd; ++d)
                        y(row, h * hd + d) += p * qkv(b * s.seq_len + u, 2 * c + h * hd + d);
                }
            }
    return y;
}

Var<double> weighted_sum(Graph<double>& g, const Var<double>& out, const MatrixD& weights) {
    return lowrank::sum(g, lowrank::mul(g, out, g.input(weights)));
}

}  // namespace

TEST_CASE("causal_self_attention forward equals explicit loops", "[autograd][attention]") {
    const auto s = GENERATE(Shape{1, 1, 1, 3}, Shape{2, 1, 2, 2}, Shape{2, 5, 2, 3}, Shape{1, 9, 3, 4},
                            Shape{3, 17, 2, 8});
    INFO("B " << s.batch << ", T " << s.seq_len << ", heads " << s.n_head << ", hd " << s.head_dim);
    const MatrixD qkv = 2.0 * lowrank::test::gaussian(s.rows(), 3 * s.channels(), 21);
    Graph<double> g;
    const auto y = lowrank::causal_self_attention(g, g.input(qkv), s.batch, s.seq_len, s.n_head);
    REQUIRE(y.rows() == s.rows());
    REQUIRE(y.cols() == s.channels());
    const MatrixD expected = reference_attention(qkv, s);
    CHECK((y.value() - expected).cwiseAbs().maxCoeff() < 1e-13);
    // With T = 1 a row attends only to itself: y is its own v.
    if (s.seq_len == 1) CHECK(y.value() == qkv.rightCols(s.channels()));
}

TEST_CASE("causal_self_attention gradients pass gradcheck in double", "[autograd][attention]") {
    const auto s = GENERATE(Shape{1, 1, 1, 3}, Shape{2, 1, 2, 2}, Shape{2, 5, 2, 3}, Shape{1, 7, 3, 2},
                            Shape{2, 4, 1, 4});
    INFO("B " << s.batch << ", T " << s.seq_len << ", heads " << s.n_head << ", hd " << s.head_dim);
    Parameter<double> qkv("qkv", lowrank::test::gaussian(s.rows(), 3 * s.channels(), 31));
    const MatrixD r = lowrank::test::gaussian(s.rows(), s.channels(), 32);
    lowrank::GradcheckOptions opt;
    opt.samples_per_tensor = 0;
    const auto result = lowrank::gradcheck(
        [&](Graph<double>& g) {
            return weighted_sum(
                g, lowrank::causal_self_attention(g, g.param(qkv), s.batch, s.seq_len, s.n_head), r);
        },
        {&qkv}, opt);
    INFO("worst: " << result.worst << "\n" << result.report);
    CHECK(result.passed);
    CHECK(result.checked == qkv.size());
    // Every part gets a gradient, except q and k when T = 1 (a one-entry softmax is constant).
    const Index c = s.channels();
    CHECK(qkv.grad.rightCols(c).norm() > 0);
    if (s.seq_len > 1)
        CHECK(qkv.grad.leftCols(2 * c).norm() > 0);
    else
        CHECK(qkv.grad.leftCols(2 * c).norm() == 0);
}

TEST_CASE("causal_self_attention backward accumulates into the input gradient", "[autograd][attention]") {
    const Shape s{2, 6, 2, 3};
    Parameter<double> qkv("qkv", lowrank::test::gaussian(s.rows(), 3 * s.channels(), 41));
    const MatrixD r = lowrank::test::gaussian(s.rows(), s.channels(), 42);
    Graph<double> g;
    qkv.zero_grad();
    auto step = [&] {
        g.clear();
        g.backward(weighted_sum(
            g, lowrank::causal_self_attention(g, g.param(qkv), s.batch, s.seq_len, s.n_head), r));
    };
    step();
    const MatrixD once = qkv.grad;
    REQUIRE(once.norm() > 0);
    step();
    CHECK((qkv.grad - 2.0 * once).cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("causal_self_attention output at t ignores every input after t", "[autograd][attention]") {
    const Shape s{2, 8, 2, 4};
    const Index c = s.channels();
    const MatrixD qkv = lowrank::test::gaussian(s.rows(), 3 * c, 51);
    Graph<double> g;
    const MatrixD base =
        lowrank::causal_self_attention(g, g.input(qkv), s.batch, s.seq_len, s.n_head).value();
    for (Index t = 0; t < s.seq_len; ++t) {
        INFO("changed positions after t = " << t);
        // Replace q, k and v of every position after t in sequence 1.
        MatrixD changed = qkv;
        for (Index u = t + 1; u < s.seq_len; ++u)
            changed.row(s.seq_len + u) =
                lowrank::test::gaussian(1, 3 * c, static_cast<std::uint64_t>(100 + u));
        g.clear();
        const MatrixD y =
            lowrank::causal_self_attention(g, g.input(changed), s.batch, s.seq_len, s.n_head).value();
        CHECK(y.topRows(s.seq_len) == base.topRows(s.seq_len));                      // sequence 0 untouched
        CHECK(y.middleRows(s.seq_len, t + 1) == base.middleRows(s.seq_len, t + 1));  // positions <= t
        if (t + 1 < s.seq_len) CHECK(y.bottomRows(s.seq_len - t - 1) != base.bottomRows(s.seq_len - t - 1));
    }
    // The converse: changing the key and value of position 0 changes every later output.
    MatrixD first = qkv;
    first.block(0, c, 1, 2 * c) *= -1.5;
    g.clear();
    const MatrixD y = lowrank::causal_self_attention(g, g.input(first), s.batch, s.seq_len, s.n_head).value();
    for (Index t = 0; t < s.seq_len; ++t) CHECK(y.row(t) != base.row(t));
}

TEST_CASE("causal_self_attention gives identical results on 1 and 2 threads", "[autograd][attention]") {
    // 2 * 4 pairs of 2 * 24^2 * 8 multiply-adds each: above the threshold where the loop forks.
    const Shape s{2, 24, 4, 8};
    REQUIRE(s.batch * s.n_head * 2 * s.seq_len * s.seq_len * s.head_dim >=
            lowrank::detail::kParallelThreshold);
    Parameter<double> qkv("qkv", lowrank::test::gaussian(s.rows(), 3 * s.channels(), 61));
    const MatrixD r = lowrank::test::gaussian(s.rows(), s.channels(), 62);
    auto run = [&](int threads, MatrixD& y, MatrixD& grad) {
        lowrank::set_num_threads(threads);
        Graph<double> g;
        qkv.zero_grad();
        const auto out = lowrank::causal_self_attention(g, g.param(qkv), s.batch, s.seq_len, s.n_head);
        y = out.value();
        g.backward(weighted_sum(g, out, r));
        grad = qkv.grad;
    };
    const int saved = lowrank::num_threads();
    MatrixD y1, g1, y2, g2;
    run(1, y1, g1);
    run(2, y2, g2);
    lowrank::set_num_threads(saved);
    CHECK(y1 == y2);
    CHECK(g1 == g2);
    CHECK((y1 - reference_attention(qkv.value, s)).cwiseAbs().maxCoeff() < 1e-13);
}

TEST_CASE("causal_self_attention reuses its buffers and keeps O(T^2) scratch per thread",
          "[autograd][attention]") {
    // Two attention ops in one graph (two layers) share the calling thread's scratch; the
    // sizes here are below the fork threshold, so everything runs on this thread.
    const Shape s{2, 6, 2, 3};
    Parameter<double> qkv("qkv", lowrank::test::gaussian(s.rows(), 3 * s.channels(), 71));
    Parameter<double> qkv2("qkv2", lowrank::test::gaussian(s.rows(), 3 * s.channels(), 72));
    const MatrixD r = lowrank::test::gaussian(s.rows(), s.channels(), 73);
    Graph<double> g;
    auto& scratch = lowrank::detail::attention_scratch<double>();
    const double* out = nullptr;
    const double* lse = nullptr;
    const double* probs = nullptr;
    auto step = [&] {
        g.clear();
        qkv.zero_grad();
        qkv2.zero_grad();
        const auto a = lowrank::causal_self_attention(g, g.param(qkv), s.batch, s.seq_len, s.n_head);
        const auto b = lowrank::causal_self_attention(g, g.param(qkv2), s.batch, s.seq_len, s.n_head);
        g.backward(lowrank::add(g, weighted_sum(g, a, r), weighted_sum(g, b, r)));
        return a;
    };
    for (int i = 0; i < 3; ++i) {
        const auto y = step();
        auto* node = dynamic_cast<lowrank::detail::CausalSelfAttentionNode<double>*>(y.node());
        REQUIRE(node != nullptr);
        // Per (b, h) only row statistics are kept: B * n_head * T numbers.
        CHECK(node->lse.size() == s.batch * s.n_head * s.seq_len);
        // One (T x T) probability buffer and one gradient buffer for the thread, whatever the
        // number of layers (at least T^2: an earlier test may have used a longer sequence).
        CHECK(scratch.p.size() >= s.seq_len * s.seq_len);
        CHECK(scratch.d.size() >= s.seq_len * s.seq_len);
        if (i > 0) {
            CHECK(y.value().data() == out);
            CHECK(node->lse.data() == lse);
            CHECK(scratch.p.data() == probs);
        }
        out = y.value().data();
        lse = node->lse.data();
        probs = scratch.p.data();
    }
}

TEST_CASE("causal_self_attention names the op, the expected and the actual sizes", "[autograd][attention]") {
    Graph<double> g;
    const auto x = g.input(MatrixD::Zero(6, 12));  // C = 4
    CHECK_THROWS_WITH(lowrank::causal_self_attention(g, g.input(MatrixD::Zero(6, 10)), 2, 3, 1),
                      Contains("causal_self_attention") && Contains("3C") && Contains("got 10"));
    CHECK_THROWS_WITH(lowrank::causal_self_attention(g, x, 2, 3, 3),
                      Contains("causal_self_attention") && Contains("C = 4") && Contains("n_head = 3"));
    CHECK_THROWS_WITH(lowrank::causal_self_attention(g, x, 2, 4, 2),
                      Contains("causal_self_attention") && Contains("8 rows") && Contains("got 6"));
    CHECK_THROWS_WITH(lowrank::causal_self_attention(g, x, 0, 3, 2),
                      Contains("causal_self_attention") && Contains("batch") && Contains("got 0"));
    CHECK_THROWS_WITH(lowrank::causal_self_attention(g, x, 2, -3, 2),
                      Contains("causal_self_attention") && Contains("sequence length") && Contains("got -3"));
    CHECK_THROWS_WITH(lowrank::causal_self_attention(g, x, 2, 3, 0),
                      Contains("causal_self_attention") && Contains("heads") && Contains("got 0"));
    CHECK_THROWS_WITH(lowrank::causal_self_attention(g, g.input(MatrixD::Zero(6, 0)), 2, 3, 1),
                      Contains("causal_self_attention") && Contains("got 0"));
    // The graph stays usable after a throw.
    const auto y = lowrank::causal_self_attention(g, x, 2, 3, 2);
    CHECK(y.rows() == 6);
    CHECK(y.cols() == 4);
}
