// The tape itself and the forward values of every op: values against direct Eigen (or
// scalar) formulas, gradient accumulation, node and buffer reuse across steps, no-grad and
// eval modes, misuse detection, and the error message of every op's shape check.

#include <lowrank/autograd/autograd.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_graph {

using Catch::Contains;
using lowrank::Graph;
using lowrank::Index;
using lowrank::MatrixD;
using lowrank::MatrixF;
using lowrank::Parameter;
using lowrank::Rng;
using lowrank::Var;

namespace {

MatrixD random_matrix(Index rows, Index cols, Rng& rng, double stddev = 1.0) {
    MatrixD m(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = rng.normal(0.0, stddev);
    return m;
}

/// GELU, tanh form, written out independently of the library.
double gelu_ref(double x) {
    const double k = std::sqrt(2.0 / std::numbers::pi);
    return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}

MatrixD softmax_ref(const MatrixD& x) {
    MatrixD y(x.rows(), x.cols());
    for (Index i = 0; i < x.rows(); ++i) {
        double total = 0;
        for (Index j = 0; j < x.cols(); ++j) total += std::exp(x(i, j));
        for (Index j = 0; j < x.cols(); ++j) y(i, j) = std::exp(x(i, j)) / total;
    }
    return y;
}

}  // namespace

// --- forward values ------------------------------------------------------------------------

TEST_CASE("basic ops compute their Eigen formulas", "[autograd][graph]") {
    Rng rng(1);
    const MatrixD a = random_matrix(5, 7, rng), b = random_matrix(5, 7, rng), c = random_matrix(7, 3, rng);
    const MatrixD row = random_matrix(1, 7, rng);
    Graph<double> g;
    const auto va = g.input(a), vb = g.input(b), vc = g.input(c), vr = g.input(row);

    CHECK(lowrank::matmul(g, va, vc).value().isApprox(a * c, 1e-14));
    CHECK(lowrank::add(g, va, vb).value() == a + b);
    CHECK(lowrank::sub(g, va, vb).value() == a - b);
    MatrixD plus = a, minus = a;
    for (Index i = 0; i < a.rows(); ++i) {
        plus.row(i) += row;
        minus.row(i) -= row;
    }
    CHECK(lowrank::add(g, va, vr).value() == plus);
    CHECK(lowrank::sub(g, va, vr).value() == minus);
    CHECK(lowrank::mul(g, va, vb).value() == a.cwiseProduct(b));
    CHECK(lowrank::scale(g, va, -2.5).value() == -2.5 * a);
    CHECK(lowrank::sum(g, va).item() == Approx(a.sum()).epsilon(1e-14));
    CHECK(lowrank::mean(g, va).item() == Approx(a.sum() / 35.0).epsilon(1e-14));

    const MatrixD p = random_matrix(5, 2, rng);
    const auto joined = lowrank::concat_cols(g, {va, g.input(p), va});
    REQUIRE(joined.cols() == 16);
    CHECK(joined.value().leftCols(7) == a);
    CHECK(joined.value().middleCols(7, 2) == p);
    CHECK(joined.value().rightCols(7) == a);
    CHECK(lowrank::slice_cols(g, va, 2, 3).value() == a.middleCols(2, 3));
    CHECK(lowrank::slice_cols(g, va, 7, 0).cols() == 0);
}

TEST_CASE("relu, tanh and gelu match their scalar formulas", "[autograd][graph]") {
    MatrixD x(1, 9);
    x << -3.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 3.0;
    Graph<double> g;
    const auto vx = g.input(x);
    const MatrixD r = lowrank::relu(g, vx).value();
    const MatrixD t = lowrank::tanh(g, vx).value();
    const MatrixD ge = lowrank::gelu(g, vx).value();
    for (Index j = 0; j < x.cols(); ++j) {
        INFO("x = " << x(0, j));
        CHECK(r(0, j) == std::max(x(0, j), 0.0));
        CHECK(t(0, j) == Approx(std::tanh(x(0, j))).epsilon(1e-15));
        CHECK(ge(0, j) == Approx(gelu_ref(x(0, j))).epsilon(1e-14));
    }
    CHECK(ge(0, 4) == 0.0);
    // Known values of the tanh form, from an independent Python evaluation (the erf form
    // would give gelu(1) = 0.841344746).
    CHECK(ge(0, 7) == Approx(0.8411919906082768).epsilon(1e-12));
    CHECK(ge(0, 0) == Approx(-0.0036373920817729943).epsilon(1e-9));

    // float agrees with double to float precision.
    Graph<float> gf;
    const MatrixF gef = lowrank::gelu(gf, gf.input(x.cast<float>())).value();
    CHECK((gef.cast<double>() - ge).cwiseAbs().maxCoeff() < 1e-6);
}

TEST_CASE("softmax rows are probabilities and log_softmax is their log", "[autograd][graph]") {
    Rng rng(2);
    const MatrixD x = random_matrix(6, 9, rng, 3.0);
    Graph<double> g;
    const auto vx = g.input(x);
    const MatrixD p = lowrank::softmax(g, vx).value();
    const MatrixD lp = lowrank::log_softmax(g, vx).value();
    CHECK(p.isApprox(softmax_ref(x), 1e-13));
    CHECK((p.rowwise().sum().array() - 1.0).abs().maxCoeff() < 1e-14);
    CHECK((p.array() > 0).all());
    CHECK(lp.isApprox(MatrixD(softmax_ref(x).array().log()), 1e-13));

    // Shift invariance and no overflow: logits near 1000 give the same result, not NaN.
    const MatrixD shifted = (x.array() + 1000.0).matrix();
    const auto vs = g.input(shifted);
    const MatrixD ps = lowrank::softmax(g, vs).value();
    const MatrixD lps = lowrank::log_softmax(g, vs).value();
    CHECK(ps.allFinite());
    CHECK(lps.allFinite());
    CHECK(ps.isApprox(p, 1e-12));
    CHECK(lps.isApprox(lp, 1e-10));
}

TEST_CASE("cross_entropy and mse equal an independent computation", "[autograd][graph]") {
    Rng rng(3);
    const MatrixD z = random_matrix(6, 5, rng, 2.0);
    const std::vector<std::int32_t> targets{4, lowrank::kIgnoreIndex, 0, 2, 2, lowrank::kIgnoreIndex};
    double expected = 0;
    int counted = 0;
    for (Index i = 0; i < z.rows(); ++i) {
        const auto t = targets[static_cast<std::size_t>(i)];
        if (t == lowrank::kIgnoreIndex) continue;
        double total = 0;
        for (Index j = 0; j < z.cols(); ++j) total += std::exp(z(i, j));
        expected += -std::log(std::exp(z(i, t)) / total);
        ++counted;
    }
    expected /= counted;
    Graph<double> g;
    CHECK(lowrank::cross_entropy(g, g.input(z), targets).item() == Approx(expected).epsilon(1e-13));

    // The log-sum-exp form stays exact when the target's probability underflows.
    MatrixD extreme(1, 3);
    extreme << 0.0, 800.0, -800.0;
    CHECK(lowrank::cross_entropy(g, g.input(extreme), std::vector<std::int32_t>{2}).item() ==
          Approx(1600.0).epsilon(1e-12));

    const MatrixD pred = random_matrix(5, 7, rng), target = random_matrix(5, 7, rng);
    CHECK(lowrank::mse(g, g.input(pred), target).item() ==
          Approx((pred - target).array().square().sum() / 35.0).epsilon(1e-14));
}

TEST_CASE("layer_norm rows have zero mean and unit variance before the affine part", "[autograd][graph]") {
    Rng rng(4);
    const MatrixD x = (random_matrix(5, 16, rng, 4.0).array() + 3.0).matrix();
    const MatrixD gamma = random_matrix(1, 16, rng), beta = random_matrix(1, 16, rng);
    const double eps = 1e-5;
    Graph<double> g;
    const auto vx = g.input(x);
    const MatrixD plain = lowrank::layer_norm(g, vx, g.input(MatrixD::Ones(1, 16))).value();
    for (Index i = 0; i < x.rows(); ++i) {
        const double mu = x.row(i).mean();
        const double var = (x.row(i).array() - mu).square().mean();  // biased, as PyTorch
        CHECK(std::abs(plain.row(i).mean()) < 1e-14);
        // var(out) = var / (var + eps): the eps is inside the square root.
        CHECK(plain.row(i).array().square().mean() == Approx(var / (var + eps)).epsilon(1e-12));
    }
    const MatrixD affine = lowrank::layer_norm(g, vx, g.input(gamma), g.input(beta), eps).value();
    MatrixD expected = plain;
    for (Index i = 0; i < x.rows(); ++i) expected.row(i) = plain.row(i).cwiseProduct(gamma) + beta;
    CHECK(affine.isApprox(expected, 1e-14));
    // A constant row normalises to zero (var = 0, the eps keeps it finite).
    const auto flat = lowrank::layer_norm(g, g.input(MatrixD::Constant(2, 4, 7.0)), g.input(MatrixD::Ones(1, 4)));
    CHECK(flat.value().isZero(0.0));
}

TEST_CASE("embedding gathers rows and dropout masks or scales", "[autograd][graph]") {
    Rng rng(5);
    const MatrixD table = random_matrix(10, 4, rng);
    const std::vector<std::int32_t> ids{9, 0, 9, 4};
    Graph<double> g(42);
    const MatrixD e = lowrank::embedding(g, g.input(table), ids).value();
    REQUIRE(e.rows() == 4);
    for (Index i = 0; i < 4; ++i) CHECK(e.row(i) == table.row(ids[static_cast<std::size_t>(i)]));

    const MatrixD x = MatrixD::Constant(200, 200, 2.0);
    const double p = 0.3;
    const MatrixD d = lowrank::dropout(g, g.input(x), p).value();
    const auto zeros = (d.array() == 0).count();
    const auto kept = (d.array() == 2.0 / (1.0 - p)).count();
    CHECK(zeros + kept == d.size());  // every entry is either dropped or scaled
    // 40000 Bernoulli(0.3) draws: the fraction is within 5 standard deviations (0.0115).
    CHECK(static_cast<double>(zeros) / static_cast<double>(d.size()) == Approx(p).margin(0.0115));
    // Inverted dropout keeps the expectation.
    CHECK(d.mean() == Approx(2.0).margin(0.05));

    // p = 0 and eval mode return the input itself and record nothing.
    const auto vx = g.input(x);
    const auto before = g.size();
    CHECK(lowrank::dropout(g, vx, 0.0).node() == vx.node());
    g.set_training(false);
    CHECK_FALSE(g.training());
    CHECK(lowrank::dropout(g, vx, 0.5).node() == vx.node());
    CHECK(g.size() == before);
}

TEST_CASE("dropout masks are reproducible from the graph's seed", "[autograd][graph]") {
    const MatrixD x = MatrixD::Ones(8, 8);
    auto mask_of = [&](std::uint64_t seed) {
        Graph<double> g(seed);
        return MatrixD(lowrank::dropout(g, g.input(x), 0.5).value());
    };
    CHECK(mask_of(7) == mask_of(7));
    CHECK(mask_of(7) != mask_of(8));
    // Two draws in one step differ (the generator advances).
    Graph<double> g(7);
    const auto vx = g.input(x);
    CHECK(lowrank::dropout(g, vx, 0.5).value() != lowrank::dropout(g, vx, 0.5).value());
}

TEST_CASE("row-wise kernels give the same values on the parallel path", "[autograd][graph]") {
    // 80 x 512 = 40960 scalars, above the threshold where the row loops fork.
    Rng rng(6);
    const MatrixD x = random_matrix(80, 512, rng, 2.0);
    Graph<double> g;
    const auto vx = g.input(x);
    CHECK(lowrank::softmax(g, vx).value().isApprox(softmax_ref(x), 1e-12));
    const MatrixD ge = lowrank::gelu(g, vx).value();
    double worst = 0;
    for (Index i = 0; i < x.size(); ++i)
        worst = std::max(worst, std::abs(ge.data()[i] - gelu_ref(x.data()[i])));
    CHECK(worst < 1e-14);
    const MatrixD ln = lowrank::layer_norm(g, vx, g.input(MatrixD::Ones(1, 512))).value();
    CHECK(ln.rowwise().mean().cwiseAbs().maxCoeff() < 1e-13);

    // Backward on the parallel path equals the same backward on a small (serial) slice.
    Parameter<double> big("big", x);
    Graph<double> g2;
    const MatrixD r = random_matrix(80, 512, rng);
    g2.backward(lowrank::sum(g2, lowrank::mul(g2, lowrank::softmax(g2, g2.param(big)), g2.input(r))));
    Parameter<double> small("small", x.topRows(3));
    g2.clear();
    g2.backward(lowrank::sum(
        g2, lowrank::mul(g2, lowrank::softmax(g2, g2.param(small)), g2.input(MatrixD(r.topRows(3))))));
    CHECK(big.grad.topRows(3).isApprox(small.grad, 1e-14));
}

// --- gradients ---------------------------------------------------------------------------

TEST_CASE("backward accumulates into Parameter::grad", "[autograd][graph]") {
    Rng rng(7);
    Parameter<double> w("w", random_matrix(4, 7, rng));
    const MatrixD x = random_matrix(5, 7, rng), r = random_matrix(5, 4, rng);
    // loss = sum((x W^T) .* r), so dL/dW = r^T x.
    const MatrixD expected = r.transpose() * x;
    Graph<double> g;
    auto step = [&] {
        g.clear();
        const auto y = lowrank::linear(g, g.input(x), g.param(w));
        g.backward(lowrank::sum(g, lowrank::mul(g, y, g.input(r))));
    };
    step();
    CHECK(w.grad.isApprox(expected, 1e-14));
    step();  // no zero_grad in between: the two steps add up
    CHECK(w.grad.isApprox(2 * expected, 1e-14));

    // Two backward calls on the same tape add up too.
    w.zero_grad();
    g.clear();
    const auto loss = lowrank::sum(g, lowrank::mul(g, lowrank::linear(g, g.input(x), g.param(w)), g.input(r)));
    g.backward(loss);
    g.backward(loss);
    CHECK(w.grad.isApprox(2 * expected, 1e-14));

    // A parameter used twice in one step (fan-out) gets both contributions.
    w.zero_grad();
    g.clear();
    const auto vx = g.input(x);
    const auto twice = lowrank::add(g, lowrank::linear(g, vx, g.param(w)), lowrank::linear(g, vx, g.param(w)));
    g.backward(lowrank::sum(g, lowrank::mul(g, twice, g.input(r))));
    CHECK(w.grad.isApprox(2 * expected, 1e-14));
}

TEST_CASE("tape_bytes counts the node outputs and output gradients the tape keeps", "[autograd][graph]") {
    Rng rng(3);
    Parameter<double> w("w", random_matrix(4, 7, rng));
    const MatrixD x = random_matrix(5, 7, rng), r = random_matrix(5, 4, rng);
    Graph<double> g;
    CHECK(g.tape_bytes() == 0);
    // Recorded one by one, so that the slots' order does not depend on the order in which
    // a call's arguments are evaluated.
    const auto vx = g.input(x);
    const auto vw = g.param(w);
    const auto y = lowrank::linear(g, vx, vw);
    const auto vr = g.input(r);
    const auto loss = lowrank::sum(g, lowrank::mul(g, y, vr));
    // Outputs: x 5x7, the parameter leaf none (its value is w's), x W^T 5x4, r 5x4, the
    // product 5x4, the sum 1x1.
    const std::size_t outputs = 35 + 20 + 20 + 20 + 1;
    CHECK(g.tape_bytes() == outputs * sizeof(double));
    g.backward(loss);
    // Gradients of the nodes that need one (not the inputs; the leaf's is w.grad).
    CHECK(g.tape_bytes() == (outputs + 20 + 20 + 1) * sizeof(double));
    // A one-row step of three nodes without backward: x 1x7, the leaf, x W^T 1x4 with the
    // 5x4 gradient buffer the last backward left it. The nodes past them, kept for reuse,
    // are not this step's and do not count.
    g.clear();
    const MatrixD x1 = x.topRows(1);
    const auto vx1 = g.input(x1);
    const auto vw1 = g.param(w);
    (void)lowrank::linear(g, vx1, vw1);
    CHECK(g.tape_bytes() == (7 + 4 + 20) * sizeof(double));
}

TEST_CASE("an input recorded with requires_grad gets its gradient in Var::grad", "[autograd][graph]") {
    Rng rng(8);
    const MatrixD x = random_matrix(5, 7, rng), b = random_matrix(7, 3, rng), r = random_matrix(5, 3, rng);
    Graph<double> g;
    const auto vx = g.input(x, true);
    const auto vb = g.input(b);  // a constant: no gradient
    CHECK(vx.requires_grad());
    CHECK_FALSE(vb.requires_grad());
    g.backward(lowrank::sum(g, lowrank::mul(g, lowrank::matmul(g, vx, vb), g.input(r))));
    CHECK(vx.grad().isApprox(r * b.transpose(), 1e-14));
    // Op gradients are recomputed, not accumulated, by a second backward.
    const auto loss = lowrank::sum(g, lowrank::mul(g, lowrank::matmul(g, vx, vb), g.input(r)));
    g.backward(loss);
    g.backward(loss);
    CHECK(vx.grad().isApprox(r * b.transpose(), 1e-14));
}

TEST_CASE("non-trainable parameters get no gradient but pass one through", "[autograd][graph]") {
    Rng rng(9);
    Parameter<double> frozen("frozen", random_matrix(4, 7, rng), /*trainable=*/false);
    Parameter<double> bias("bias", random_matrix(1, 4, rng));
    const MatrixD x = random_matrix(5, 7, rng), r = random_matrix(5, 4, rng);
    Graph<double> g;
    const auto vx = g.input(x, true);
    const auto vw = g.param(frozen);
    CHECK_FALSE(vw.requires_grad());
    g.backward(lowrank::sum(g, lowrank::mul(g, lowrank::linear(g, vx, vw, g.param(bias)), g.input(r))));
    CHECK(frozen.grad.size() == 0);  // never even sized
    CHECK(bias.grad.isApprox(r.colwise().sum(), 1e-14));
    CHECK(vx.grad().isApprox(r * frozen.value, 1e-14));

    // A graph of frozen parameters and constants only has nothing to differentiate.
    g.clear();
    const auto loss = lowrank::sum(g, lowrank::linear(g, g.input(x), g.param(frozen)));
    CHECK_FALSE(loss.requires_grad());
    CHECK_THROWS_WITH(g.backward(loss), Contains("Graph::backward") && Contains("does not depend"));
}

// --- tape reuse --------------------------------------------------------------------------

TEST_CASE("after clear() the same sequence of ops reuses every node and buffer", "[autograd][graph]") {
    Rng rng(10);
    Parameter<double> w("w", random_matrix(6, 5, rng));
    Parameter<double> b("b", random_matrix(1, 6, rng));
    Parameter<double> gamma("gamma", random_matrix(1, 6, rng));
    const std::vector<std::int32_t> targets{1, 5, 0, 2};
    Graph<double> g;
    std::vector<Var<double>> vars;
    auto step = [&](const MatrixD& x) {
        g.clear();
        vars.clear();
        vars.push_back(g.input(x));
        vars.push_back(lowrank::linear(g, vars.back(), g.param(w), g.param(b)));
        vars.push_back(lowrank::gelu(g, vars.back()));
        vars.push_back(lowrank::layer_norm(g, vars.back(), g.param(gamma)));
        vars.push_back(lowrank::cross_entropy(g, vars.back(), targets));
        g.backward(vars.back());
    };
    auto expected_loss = [&](const MatrixD& x) {
        MatrixD h = x * w.value.transpose();
        h.rowwise() += b.value.row(0);
        for (Index i = 0; i < h.size(); ++i) h.data()[i] = gelu_ref(h.data()[i]);
        for (Index i = 0; i < h.rows(); ++i) {
            const double mu = h.row(i).mean();
            const double var = (h.row(i).array() - mu).square().mean();
            h.row(i) = ((h.row(i).array() - mu) / std::sqrt(var + 1e-5) * gamma.value.row(0).array()).matrix();
        }
        double total = 0;
        for (Index i = 0; i < h.rows(); ++i)
            total += std::log(h.row(i).array().exp().sum()) - h(i, targets[static_cast<std::size_t>(i)]);
        return total / static_cast<double>(h.rows());
    };

    const MatrixD x1 = random_matrix(4, 5, rng), x2 = random_matrix(4, 5, rng);
    step(x1);
    const auto size1 = g.size();
    std::vector<const void*> nodes, buffers;
    for (const auto& v : vars) {
        nodes.push_back(v.node());
        buffers.push_back(v.value().data());
    }
    CHECK(vars.back().item() == Approx(expected_loss(x1)).epsilon(1e-12));

    const double* grad_buffer = w.grad.data();
    step(x2);
    CHECK(g.size() == size1);
    CHECK(w.grad.data() == grad_buffer);
    for (std::size_t i = 0; i < vars.size(); ++i) {
        INFO("var " << i);
        CHECK(vars[i].node() == nodes[i]);
        CHECK(vars[i].value().data() == buffers[i]);
    }
    CHECK(vars.back().item() == Approx(expected_loss(x2)).epsilon(1e-12));
}

TEST_CASE("after clear() a different sequence or different shapes work too", "[autograd][graph]") {
    Rng rng(11);
    const MatrixD x = random_matrix(5, 7, rng), y = random_matrix(3, 7, rng);
    Graph<double> g;
    const auto first = lowrank::tanh(g, g.input(x));
    CHECK(first.value().isApprox(MatrixD(x.array().tanh()), 1e-15));
    const std::size_t size_first = g.size();

    g.clear();
    CHECK(g.size() == 0);
    // Position 1 now holds a relu, and the input has fewer rows.
    const auto vy = g.input(y, true);
    const auto r = lowrank::relu(g, vy);
    const auto s = lowrank::softmax(g, r);
    CHECK(g.size() == 3);
    CHECK(r.value() == y.cwiseMax(0.0));
    CHECK(s.value().isApprox(softmax_ref(y.cwiseMax(0.0)), 1e-13));
    g.backward(lowrank::sum(g, lowrank::scale(g, s, 2.0)));
    // Rows of a softmax sum to 1 whatever the input, so this loss has zero gradient.
    CHECK(vy.grad().cwiseAbs().maxCoeff() < 1e-14);

    // And back to the first sequence.
    g.clear();
    const auto again = lowrank::tanh(g, g.input(x));
    CHECK(g.size() == size_first);
    CHECK(again.value().isApprox(MatrixD(x.array().tanh()), 1e-15));
}

TEST_CASE("the graph stays usable after an op throws", "[autograd][graph]") {
    // An op may throw after it has taken a node from the tape. A half-built node that kept
    // last step's requires_grad would be walked by backward with stale shapes and ids.
    Rng rng(12);
    Parameter<double> table("table", random_matrix(10, 3, rng));
    Graph<double> g;
    g.backward(lowrank::sum(g, lowrank::embedding(g, g.param(table), std::vector<std::int32_t>{1, 2})));
    table.zero_grad();

    g.clear();
    const auto t = g.param(table);
    CHECK_THROWS_AS(lowrank::embedding(g, t, std::vector<std::int32_t>{4, 4, 4, 4, 4, 4, 4, 99}), lowrank::Error);
    const std::vector<std::int32_t> ids{0, 0, 5};
    g.backward(lowrank::sum(g, lowrank::embedding(g, t, ids)));
    MatrixD expected = MatrixD::Zero(10, 3);
    expected.row(0).setConstant(2.0);
    expected.row(5).setConstant(1.0);
    CHECK(table.grad == expected);
}

// --- modes and misuse --------------------------------------------------------------------

TEST_CASE("no-grad mode gives the same values and refuses backward", "[autograd][graph]") {
    Rng rng(13);
    Parameter<double> w("w", random_matrix(4, 7, rng));
    const MatrixD x = random_matrix(5, 7, rng);
    const std::vector<std::int32_t> targets{0, 1, 2, 3, 0};
    auto forward = [&](Graph<double>& g) {
        return lowrank::cross_entropy(g, lowrank::gelu(g, lowrank::linear(g, g.input(x, true), g.param(w))),
                                      targets);
    };
    Graph<double> g;
    g.set_grad_enabled(false);
    CHECK_FALSE(g.grad_enabled());
    const auto loss = forward(g);
    CHECK_FALSE(loss.requires_grad());
    CHECK_THROWS_AS(g.backward(loss), lowrank::Error);
    CHECK_THROWS_WITH(g.backward(loss), Contains("Graph::backward") && Contains("disabled"));
    CHECK(w.grad.size() == 0);  // param() did not even size the gradient

    Graph<double> with_grad;
    CHECK(forward(with_grad).item() == loss.item());

    g.set_grad_enabled(true);
    g.clear();
    g.backward(forward(g));
    CHECK(w.grad.rows() == 4);
    CHECK(w.grad.norm() > 0);
}

TEST_CASE("backward needs a (1 x 1) loss and names the shape it got", "[autograd][graph]") {
    Graph<double> g;
    const auto x = g.input(MatrixD::Ones(5, 7), true);
    const auto y = lowrank::tanh(g, x);
    CHECK_THROWS_WITH(g.backward(y), Contains("Graph::backward") && Contains("(1 x 1)") && Contains("(5 x 7)"));
    CHECK_THROWS_WITH(y.item(), Contains("Var::item") && Contains("(5 x 7)"));
}

TEST_CASE("a Var from before clear() or from another graph is detected", "[autograd][graph]") {
    Graph<double> g, other;
    const auto x = g.input(MatrixD::Ones(2, 3), true);
    auto h = x;
    for (int i = 0; i < 4; ++i) h = lowrank::tanh(g, h);
    const auto stale = lowrank::sum(g, h);  // node 5
    g.clear();
    const auto fresh = g.input(MatrixD::Ones(2, 3), true);
    (void)lowrank::tanh(g, fresh);  // the new step is shorter: 2 nodes
    CHECK_THROWS_WITH(lowrank::relu(g, stale), Contains("relu") && Contains("cleared"));
    CHECK_THROWS_WITH(g.backward(stale), Contains("Graph::backward") && Contains("cleared"));
    CHECK_THROWS_WITH(lowrank::add(g, fresh, stale), Contains("add"));

    const auto foreign = other.input(MatrixD::Ones(2, 3));
    CHECK_THROWS_WITH(lowrank::mul(g, fresh, foreign), Contains("mul") && Contains("does not belong"));
    CHECK_THROWS_AS(lowrank::tanh(g, Var<double>{}), lowrank::Error);
}

TEST_CASE("every op's shape check names the op and the offending shapes or values", "[autograd][graph]") {
    Graph<double> g;
    const auto a = g.input(MatrixD::Ones(5, 7));
    const auto b = g.input(MatrixD::Ones(6, 3));
    const auto c = g.input(MatrixD::Ones(5, 6));

    CHECK_THROWS_WITH(lowrank::matmul(g, a, b), Contains("matmul") && Contains("(5 x 7)") && Contains("(6 x 3)"));
    CHECK_THROWS_WITH(lowrank::add(g, a, c), Contains("add") && Contains("(5 x 7)") && Contains("(5 x 6)"));
    CHECK_THROWS_WITH(lowrank::add(g, a, g.input(MatrixD::Ones(1, 6))),
                      Contains("add") && Contains("(1 x 6)"));
    CHECK_THROWS_WITH(lowrank::sub(g, a, c), Contains("sub") && Contains("(5 x 6)"));
    CHECK_THROWS_WITH(lowrank::mul(g, a, c), Contains("mul") && Contains("(5 x 7)") && Contains("(5 x 6)"));

    const auto w = g.input(MatrixD::Ones(4, 6));
    CHECK_THROWS_WITH(lowrank::linear(g, a, w),
                      Contains("linear") && Contains("7 features") && Contains("(4 x 6)") && Contains("expects 6"));
    const auto w7 = g.input(MatrixD::Ones(4, 7));
    CHECK_THROWS_WITH(lowrank::linear(g, a, w7, g.input(MatrixD::Ones(1, 3))),
                      Contains("linear: bias") && Contains("(1 x 4)") && Contains("(1 x 3)"));

    CHECK_THROWS_WITH(lowrank::cross_entropy(g, a, std::vector<std::int32_t>{0, 1, 2, 3}),
                      Contains("cross_entropy") && Contains("expected 5 targets") && Contains("got 4"));
    CHECK_THROWS_WITH(lowrank::cross_entropy(g, a, std::vector<std::int32_t>{0, 1, 9, 3, 4}),
                      Contains("cross_entropy") && Contains("row 2") && Contains("[0, 7)") && Contains("got 9"));
    CHECK_THROWS_WITH(lowrank::cross_entropy(g, a, std::vector<std::int32_t>{0, -1, 2, 3, 4}),
                      Contains("cross_entropy") && Contains("row 1") && Contains("got -1"));
    CHECK_THROWS_WITH(lowrank::mse(g, a, MatrixD::Ones(7, 5)),
                      Contains("mse: target") && Contains("(5 x 7)") && Contains("(7 x 5)"));

    CHECK_THROWS_WITH(lowrank::layer_norm(g, a, g.input(MatrixD::Ones(1, 6))),
                      Contains("layer_norm: gamma") && Contains("(1 x 7)") && Contains("(1 x 6)"));
    CHECK_THROWS_WITH(lowrank::layer_norm(g, a, g.input(MatrixD::Ones(1, 7)), g.input(MatrixD::Ones(2, 7))),
                      Contains("layer_norm: beta") && Contains("(1 x 7)") && Contains("(2 x 7)"));
    CHECK_THROWS_WITH(lowrank::layer_norm(g, a, g.input(MatrixD::Ones(1, 7)), {}, 0.0),
                      Contains("layer_norm") && Contains("eps"));

    const auto table = g.input(MatrixD::Ones(10, 4));
    CHECK_THROWS_WITH(lowrank::embedding(g, table, std::vector<std::int32_t>{3, 10}),
                      Contains("embedding") && Contains("position 1") && Contains("[0, 10)") && Contains("got 10"));
    CHECK_THROWS_WITH(lowrank::embedding(g, table, std::vector<std::int32_t>{-2}),
                      Contains("embedding") && Contains("got -2"));

    CHECK_THROWS_WITH(lowrank::slice_cols(g, a, 5, 4),
                      Contains("slice_cols") && Contains("[5, 9)") && Contains("(5 x 7)"));
    CHECK_THROWS_WITH(lowrank::slice_cols(g, a, -1, 2), Contains("slice_cols") && Contains("[-1, 1)"));
    CHECK_THROWS_WITH(lowrank::concat_cols(g, {a, b}),
                      Contains("concat_cols") && Contains("5 rows") && Contains("(6 x 3)"));
    CHECK_THROWS_WITH(lowrank::concat_cols(g, std::vector<Var<double>>{}), Contains("concat_cols"));
    CHECK_THROWS_WITH(lowrank::mean(g, g.input(MatrixD(0, 3))), Contains("mean") && Contains("(0 x 3)"));

    CHECK_THROWS_WITH(lowrank::dropout(g, a, 1.0), Contains("dropout") && Contains("[0, 1)") && Contains("got 1"));
    CHECK_THROWS_WITH(lowrank::dropout(g, a, -0.1), Contains("dropout") && Contains("got -0.1"));

    // Every one of them is a lowrank::Error.
    CHECK_THROWS_AS(lowrank::matmul(g, a, b), lowrank::Error);
    CHECK_THROWS_AS(lowrank::embedding(g, table, std::vector<std::int32_t>{10}), lowrank::Error);
}

TEST_CASE("add_product adds a weight gradient through either layout", "[autograd]") {
    // Tall, thin destinations (rows >= 4 cols, cols <= 256) go through a column-major
    // scratch; every other shape straight into the destination. Both must add the same
    // product, also into a block of a wider matrix (the active columns of a factor).
    Rng rng(5);
    lowrank::ColMatrix<double> scratch;
    for (auto [m, n] : {std::pair<Index, Index>{40, 6}, {6, 40}, {12, 10}, {300, 260}}) {
        INFO("dst " << m << " x " << n);
        MatrixD dy(50, m), x(50, n), dst(m, n + 3);
        lowrank::init::normal<double>(dy, rng);
        lowrank::init::normal<double>(x, rng);
        lowrank::init::normal<double>(dst, rng);
        MatrixD want = dst;
        want.leftCols(n) += 0.5 * dy.transpose() * x;
        lowrank::detail::add_product(dst.leftCols(n), 0.5 * dy.transpose() * x, scratch);
        CHECK((dst - want).cwiseAbs().maxCoeff() < 1e-12);
    }
}

}  // namespace test_graph
