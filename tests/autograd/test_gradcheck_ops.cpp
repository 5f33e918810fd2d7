// Every op's backward against central differences, in double, for every input that can
// take a gradient. A loss that is not a scalar is reduced with sum(out .* R) for a fixed
// random R, so that every output entry (and a wrong sign or transpose in any of them)
// shows up in the checked gradient. Derivations: docs/derivations/.

#include <lowrank/autograd/autograd.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_gradcheck_ops {

using lowrank::GradcheckOptions;
using lowrank::GradcheckResult;
using lowrank::Graph;
using lowrank::Index;
using lowrank::MatrixD;
using lowrank::Parameter;
using lowrank::ParameterList;
using lowrank::Rng;
using lowrank::Var;

namespace {

MatrixD random_matrix(Index rows, Index cols, Rng& rng, double stddev = 1.0) {
    MatrixD m(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = rng.normal(0.0, stddev);
    return m;
}

/// Entries of magnitude at least `gap`: ReLU's kink stays far from every perturbation.
MatrixD away_from_zero(Index rows, Index cols, Rng& rng, double gap = 0.1) {
    MatrixD m = random_matrix(rows, cols, rng);
    for (Index i = 0; i < m.size(); ++i) {
        double& v = m.data()[i];
        v = v < 0 ? v - gap : v + gap;
    }
    return m;
}

Parameter<double> random_param(const std::string& name, Index rows, Index cols, Rng& rng,
                               double stddev = 1.0) {
    return Parameter<double>(name, random_matrix(rows, cols, rng, stddev));
}

/// sum(out .* weights): a scalar in which every entry of `out` has its own weight.
Var<double> weighted_sum(Graph<double>& g, const Var<double>& out, const MatrixD& weights) {
    return lowrank::sum(g, lowrank::mul(g, out, g.input(weights)));
}

GradcheckOptions every_coordinate() {
    GradcheckOptions opt;
    opt.samples_per_tensor = 0;
    return opt;
}

/// Runs gradcheck on every coordinate and requires that it passes, that it checked every
/// coordinate, and that the analytic gradient is not identically zero (a check of two
/// zeros proves nothing). gradcheck leaves the analytic gradient in Parameter::grad.
template <class Fn>
void require_gradients(Fn&& loss_fn, const ParameterList<double>& wrt, bool allow_zero = false) {
    const GradcheckResult r = lowrank::gradcheck(loss_fn, wrt, every_coordinate());
    INFO("worst: " << r.worst << "\nfailures:\n" << r.report);
    CHECK(r.passed);
    CHECK(r.max_error <= every_coordinate().tolerance);
    Index expected = 0;
    for (const auto* p : wrt) expected += p->size();
    CHECK(r.checked == expected);
    if (!allow_zero)
        for (const auto* p : wrt) {
            INFO("parameter " << p->name());
            CHECK(p->grad.norm() > 0.0);
        }
}

}  // namespace

TEST_CASE("gradcheck: matmul, both operands and a shared operand", "[autograd][gradcheck]") {
    Rng rng(11);
    auto a = random_param("a", 5, 7, rng);
    auto b = random_param("b", 7, 4, rng);
    const MatrixD r = random_matrix(5, 4, rng);
    require_gradients(
        [&](Graph<double>& g) { return weighted_sum(g, lowrank::matmul(g, g.param(a), g.param(b)), r); },
        {&a, &b});

    // a * a: the same node on both sides, so both branches of the backward add into one grad.
    auto s = random_param("s", 6, 6, rng);
    const MatrixD rs = random_matrix(6, 6, rng);
    require_gradients(
        [&](Graph<double>& g) {
            const auto v = g.param(s);
            return weighted_sum(g, lowrank::matmul(g, v, v), rs);
        },
        {&s});
}

TEST_CASE("gradcheck: add and sub, same shape and row broadcast", "[autograd][gradcheck]") {
    Rng rng(12);
    auto a = random_param("a", 5, 7, rng);
    auto b = random_param("b", 5, 7, rng);
    auto row = random_param("row", 1, 7, rng);
    const MatrixD r = random_matrix(5, 7, rng);
    SECTION("add, same shape") {
        require_gradients(
            [&](Graph<double>& g) { return weighted_sum(g, lowrank::add(g, g.param(a), g.param(b)), r); },
            {&a, &b});
    }
    SECTION("add, (1 x C) broadcast over rows") {
        require_gradients(
            [&](Graph<double>& g) { return weighted_sum(g, lowrank::add(g, g.param(a), g.param(row)), r); },
            {&a, &row});
    }
    SECTION("sub, same shape") {
        require_gradients(
            [&](Graph<double>& g) { return weighted_sum(g, lowrank::sub(g, g.param(a), g.param(b)), r); },
            {&a, &b});
    }
    SECTION("sub, (1 x C) broadcast over rows") {
        require_gradients(
            [&](Graph<double>& g) { return weighted_sum(g, lowrank::sub(g, g.param(a), g.param(row)), r); },
            {&a, &row});
    }
    SECTION("add of a value to itself") {
        require_gradients(
            [&](Graph<double>& g) {
                const auto v = g.param(a);
                return weighted_sum(g, lowrank::add(g, v, v), r);
            },
            {&a});
    }
}

TEST_CASE("gradcheck: element-wise mul, including x * x", "[autograd][gradcheck]") {
    Rng rng(13);
    auto a = random_param("a", 5, 7, rng);
    auto b = random_param("b", 5, 7, rng);
    const MatrixD r = random_matrix(5, 7, rng);
    require_gradients(
        [&](Graph<double>& g) { return weighted_sum(g, lowrank::mul(g, g.param(a), g.param(b)), r); },
        {&a, &b});
    require_gradients(
        [&](Graph<double>& g) {
            const auto v = g.param(a);
            return weighted_sum(g, lowrank::mul(g, v, v), r);
        },
        {&a});
}

TEST_CASE("gradcheck: scale, sum and mean", "[autograd][gradcheck]") {
    Rng rng(14);
    auto a = random_param("a", 5, 7, rng);
    const MatrixD r = random_matrix(5, 7, rng);
    require_gradients([&](Graph<double>& g) { return weighted_sum(g, lowrank::scale(g, g.param(a), -1.7), r); },
                      {&a});
    // sum and mean reduce to a scalar themselves; feed them a product so the gradient is not
    // a constant, then check sum/mean directly on a parameter too.
    require_gradients(
        [&](Graph<double>& g) {
            const auto v = g.param(a);
            return lowrank::sum(g, lowrank::mul(g, v, g.input(r)));
        },
        {&a});
    require_gradients([&](Graph<double>& g) { return lowrank::sum(g, g.param(a)); }, {&a});
    require_gradients([&](Graph<double>& g) { return lowrank::mean(g, g.param(a)); }, {&a});
    require_gradients(
        [&](Graph<double>& g) {
            const auto m = lowrank::mean(g, lowrank::mul(g, g.param(a), g.input(r)));
            return lowrank::mul(g, m, m);  // the mean's output gradient is not 1
        },
        {&a});
}

TEST_CASE("gradcheck: linear with and without bias, w.r.t. x, W and b", "[autograd][gradcheck]") {
    Rng rng(15);
    auto x = random_param("x", 5, 7, rng);
    auto w = random_param("w", 4, 7, rng);
    auto b = random_param("b", 1, 4, rng);
    const MatrixD r = random_matrix(5, 4, rng);
    SECTION("with bias") {
        require_gradients(
            [&](Graph<double>& g) {
                return weighted_sum(g, lowrank::linear(g, g.param(x), g.param(w), g.param(b)), r);
            },
            {&x, &w, &b});
    }
    SECTION("without bias") {
        require_gradients(
            [&](Graph<double>& g) { return weighted_sum(g, lowrank::linear(g, g.param(x), g.param(w)), r); },
            {&x, &w});
    }
}

TEST_CASE("gradcheck: relu, gelu and tanh", "[autograd][gradcheck]") {
    Rng rng(16);
    const MatrixD r = random_matrix(5, 7, rng);
    SECTION("relu, inputs kept away from the kink") {
        Parameter<double> x("x", away_from_zero(5, 7, rng));
        require_gradients([&](Graph<double>& g) { return weighted_sum(g, lowrank::relu(g, g.param(x)), r); },
                          {&x});
        // Some entries are negative, so the zero branch of the mask is exercised too.
        CHECK((x.value.array() < 0).count() > 0);
        CHECK((x.grad.array() == 0).count() == (x.value.array() < 0).count());
    }
    SECTION("gelu") {
        auto x = random_param("x", 5, 7, rng, 2.0);
        require_gradients([&](Graph<double>& g) { return weighted_sum(g, lowrank::gelu(g, g.param(x)), r); },
                          {&x});
    }
    SECTION("tanh") {
        auto x = random_param("x", 5, 7, rng);
        require_gradients(
            [&](Graph<double>& g) { return weighted_sum(g, lowrank::tanh(g, g.param(x)), r); }, {&x});
    }
}

TEST_CASE("gradcheck: softmax and log_softmax over rows", "[autograd][gradcheck]") {
    Rng rng(17);
    auto x = random_param("x", 5, 7, rng, 2.0);
    const MatrixD r = random_matrix(5, 7, rng);
    require_gradients([&](Graph<double>& g) { return weighted_sum(g, lowrank::softmax(g, g.param(x)), r); },
                      {&x});
    require_gradients(
        [&](Graph<double>& g) { return weighted_sum(g, lowrank::log_softmax(g, g.param(x)), r); }, {&x});
}

TEST_CASE("gradcheck: cross_entropy with ignored rows", "[autograd][gradcheck]") {
    Rng rng(18);
    auto logits = random_param("logits", 6, 5, rng, 2.0);
    SECTION("default ignore index") {
        const std::vector<std::int32_t> targets{3, lowrank::kIgnoreIndex, 0, 4, lowrank::kIgnoreIndex, 3};
        require_gradients([&](Graph<double>& g) { return lowrank::cross_entropy(g, g.param(logits), targets); },
                          {&logits});
        // Ignored rows get exactly no gradient.
        CHECK(logits.grad.row(1).norm() == 0.0);
        CHECK(logits.grad.row(4).norm() == 0.0);
        CHECK(logits.grad.row(0).norm() > 0.0);
    }
    SECTION("a custom ignore index, and an output gradient that is not 1") {
        const std::vector<std::int32_t> targets{3, 1, 0, 4, 1, 2};
        require_gradients(
            [&](Graph<double>& g) {
                const auto l = lowrank::cross_entropy(g, g.param(logits), targets, 1);
                return lowrank::scale(g, lowrank::mul(g, l, l), 0.5);
            },
            {&logits});
        CHECK(logits.grad.row(1).norm() == 0.0);
        CHECK(logits.grad.row(4).norm() == 0.0);
    }
    SECTION("every row ignored: zero loss and zero gradient") {
        const std::vector<std::int32_t> targets(6, lowrank::kIgnoreIndex);
        auto loss_fn = [&](Graph<double>& g) { return lowrank::cross_entropy(g, g.param(logits), targets); };
        require_gradients(loss_fn, {&logits}, /*allow_zero=*/true);
        CHECK(logits.grad.isZero(0.0));
        Graph<double> g;
        CHECK(loss_fn(g).item() == 0.0);
    }
}

TEST_CASE("gradcheck: mse", "[autograd][gradcheck]") {
    Rng rng(19);
    auto pred = random_param("pred", 5, 7, rng);
    const MatrixD target = random_matrix(5, 7, rng);
    require_gradients([&](Graph<double>& g) { return lowrank::mse(g, g.param(pred), target); }, {&pred});
}

TEST_CASE("gradcheck: layer_norm with and without beta", "[autograd][gradcheck]") {
    Rng rng(20);
    // A non-zero mean and a non-unit spread, so the normalisation really does something.
    Parameter<double> x("x", (random_matrix(5, 7, rng, 3.0).array() + 1.5).matrix());
    auto gamma = random_param("gamma", 1, 7, rng);
    auto beta = random_param("beta", 1, 7, rng);
    const MatrixD r = random_matrix(5, 7, rng);
    SECTION("with beta") {
        require_gradients(
            [&](Graph<double>& g) {
                return weighted_sum(g, lowrank::layer_norm(g, g.param(x), g.param(gamma), g.param(beta)), r);
            },
            {&x, &gamma, &beta});
    }
    SECTION("without beta") {
        require_gradients(
            [&](Graph<double>& g) {
                return weighted_sum(g, lowrank::layer_norm(g, g.param(x), g.param(gamma)), r);
            },
            {&x, &gamma});
    }
}

TEST_CASE("gradcheck: embedding with repeated ids", "[autograd][gradcheck]") {
    Rng rng(21);
    auto table = random_param("table", 10, 4, rng);
    const std::vector<std::int32_t> ids{3, 1, 3, 7, 3, 0, 9};
    const MatrixD r = random_matrix(static_cast<Index>(ids.size()), 4, rng);
    require_gradients([&](Graph<double>& g) { return weighted_sum(g, lowrank::embedding(g, g.param(table), ids), r); },
                      {&table});
    // Row 3 is looked up three times: its gradient is the sum of three output rows; unused
    // rows get nothing.
    CHECK((table.grad.row(3) - (r.row(0) + r.row(2) + r.row(4))).norm() < 1e-14);
    CHECK(table.grad.row(2).norm() == 0.0);
}

TEST_CASE("gradcheck: dropout with a fixed mask", "[autograd][gradcheck]") {
    Rng rng(22);
    auto x = random_param("x", 5, 7, rng);
    const MatrixD r = random_matrix(5, 7, rng);
    // gradcheck restores the graph's generator before every evaluation, so each call draws
    // the same mask; without that the finite differences would be noise.
    require_gradients([&](Graph<double>& g) { return weighted_sum(g, lowrank::dropout(g, g.param(x), 0.4), r); },
                      {&x});
    // The gradient is r .* mask: some entries dropped, the others scaled by 1 / (1 - p).
    const auto dropped = (x.grad.array() == 0).count();
    CHECK(dropped > 0);
    CHECK(dropped < x.grad.size());
    for (Index i = 0; i < x.grad.size(); ++i) {
        const double gv = x.grad.data()[i];
        if (gv != 0.0) CHECK(gv == Approx(r.data()[i] / 0.6).epsilon(1e-12));
    }
}

TEST_CASE("gradcheck: concat_cols and slice_cols", "[autograd][gradcheck]") {
    Rng rng(23);
    auto a = random_param("a", 5, 3, rng);
    auto b = random_param("b", 5, 4, rng);
    auto c = random_param("c", 5, 2, rng);
    SECTION("concat of three parts, one of them twice") {
        const MatrixD r = random_matrix(5, 12, rng);
        require_gradients(
            [&](Graph<double>& g) {
                const auto va = g.param(a);
                return weighted_sum(g, lowrank::concat_cols(g, {va, g.param(b), g.param(c), va}), r);
            },
            {&a, &b, &c});
    }
    SECTION("concat with a constant part in the middle") {
        // The column offset must advance past parts that take no gradient.
        const MatrixD constant = random_matrix(5, 4, rng);
        const MatrixD r = random_matrix(5, 9, rng);
        require_gradients(
            [&](Graph<double>& g) {
                return weighted_sum(g, lowrank::concat_cols(g, {g.param(a), g.input(constant), g.param(c)}), r);
            },
            {&a, &c});
    }
    SECTION("slice") {
        auto x = random_param("x", 5, 7, rng);
        const MatrixD r = random_matrix(5, 3, rng);
        require_gradients(
            [&](Graph<double>& g) { return weighted_sum(g, lowrank::slice_cols(g, g.param(x), 2, 3), r); },
            {&x});
        CHECK(x.grad.middleCols(2, 3).isApprox(r));
        CHECK(x.grad.leftCols(2).isZero(0.0));
        CHECK(x.grad.rightCols(2).isZero(0.0));
    }
    SECTION("slices of a concat recover the parts") {
        const MatrixD r = random_matrix(5, 4, rng);
        require_gradients(
            [&](Graph<double>& g) {
                const auto cat = lowrank::concat_cols(g, {g.param(a), g.param(b)});
                return weighted_sum(g, lowrank::mul(g, lowrank::slice_cols(g, cat, 1, 4),
                                                    lowrank::slice_cols(g, cat, 3, 4)),
                                    r);
            },
            {&a, &b});
    }
}

TEST_CASE("gradcheck: two-layer MLP with gelu, layer_norm and cross_entropy", "[autograd][gradcheck]") {
    Rng rng(24);
    auto x = random_param("x", 6, 5, rng);
    auto w1 = random_param("w1", 8, 5, rng, 0.5);
    auto b1 = random_param("b1", 1, 8, rng, 0.5);
    auto gamma = random_param("gamma", 1, 8, rng);
    auto beta = random_param("beta", 1, 8, rng);
    auto w2 = random_param("w2", 4, 8, rng, 0.5);
    auto b2 = random_param("b2", 1, 4, rng, 0.5);
    const std::vector<std::int32_t> targets{2, 0, lowrank::kIgnoreIndex, 3, 1, 2};
    require_gradients(
        [&](Graph<double>& g) {
            auto h = lowrank::linear(g, g.param(x), g.param(w1), g.param(b1));
            h = lowrank::gelu(g, h);
            h = lowrank::layer_norm(g, h, g.param(gamma), g.param(beta));
            const auto logits = lowrank::linear(g, h, g.param(w2), g.param(b2));
            return lowrank::cross_entropy(g, logits, targets);
        },
        {&x, &w1, &b1, &gamma, &beta, &w2, &b2});
}

// --- the checker itself -------------------------------------------------------------------

namespace {

/// y = s * a whose backward is off by `factor`: a stand-in for a buggy op.
struct MisscaledNode final : lowrank::Node<double> {
    lowrank::Node<double>* a = nullptr;
    double s = 1.0;
    double factor = 1.0;
    void backward() override { *a->grad += factor * s * this->dout; }
};

Var<double> misscaled(Graph<double>& g, const Var<double>& a, double s, double factor) {
    g.check_owned(a, "misscaled");
    auto& n = g.record<MisscaledNode>();
    n.a = a.node();
    n.s = s;
    n.factor = factor;
    lowrank::detail::ensure_shape(n.out, a.rows(), a.cols());
    n.out = s * a.value();
    n.requires_grad = g.any_requires_grad(a);
    return Var<double>(&n);
}

}  // namespace

TEST_CASE("gradcheck fails on a backward that is off by a factor", "[autograd][gradcheck]") {
    Rng rng(25);
    auto x = random_param("x", 5, 7, rng);
    const MatrixD r = random_matrix(5, 7, rng);
    auto loss_with = [&](double factor) {
        return [&, factor](Graph<double>& g) { return weighted_sum(g, misscaled(g, g.param(x), 2.0, factor), r); };
    };

    // The same custom node with a correct backward passes: the failure below is the factor's.
    const auto good = lowrank::gradcheck(loss_with(1.0), {&x}, every_coordinate());
    CHECK(good.passed);

    const auto bad = lowrank::gradcheck(loss_with(1.01), {&x}, every_coordinate());
    CHECK_FALSE(bad.passed);
    CHECK(bad.checked == x.size());
    // error = |a - n| / max(|a|, |n|) = 0.01 / 1.01 for every coordinate.
    CHECK(bad.max_error == Approx(0.01 / 1.01).epsilon(1e-4));
    CHECK_THAT(bad.worst, Catch::Contains("x["));
    CHECK_THAT(bad.report, Catch::Contains("analytic") && Catch::Contains("numeric"));
    // One report line per failing coordinate.
    CHECK(std::count(bad.report.begin(), bad.report.end(), '\n') == x.size());

    // A loose enough tolerance accepts it: the options are honoured.
    GradcheckOptions loose = every_coordinate();
    loose.tolerance = 0.02;
    CHECK(lowrank::gradcheck(loss_with(1.01), {&x}, loose).passed);
}

TEST_CASE("gradcheck samples coordinates and validates its options", "[autograd][gradcheck]") {
    Rng rng(26);
    auto a = random_param("a", 9, 8, rng);
    auto b = random_param("b", 1, 5, rng);
    const MatrixD r = random_matrix(9, 8, rng);
    auto loss_fn = [&](Graph<double>& g) {
        return lowrank::add(g, weighted_sum(g, lowrank::tanh(g, g.param(a)), r), lowrank::sum(g, g.param(b)));
    };
    GradcheckOptions opt;
    opt.samples_per_tensor = 10;
    // 10 of a's 72 entries, all 5 of b's (fewer than the sample size).
    const auto result = lowrank::gradcheck(loss_fn, {&a, &b}, opt);
    CHECK(result.passed);
    CHECK(result.checked == 15);

    opt.eps = 0.0;
    CHECK_THROWS_AS(lowrank::gradcheck(loss_fn, {&a}, opt), lowrank::Error);
    CHECK_THROWS_WITH(lowrank::gradcheck(loss_fn, {}, GradcheckOptions{}),
                      Catch::Contains("gradcheck") && Catch::Contains("none"));
    // A frozen parameter has no gradient to compare: refused, not read out of an empty buffer.
    b.trainable = false;
    CHECK_THROWS_WITH(lowrank::gradcheck(loss_fn, {&a, &b}, GradcheckOptions{}),
                      Catch::Contains("gradcheck") && Catch::Contains("b is not trainable"));
}

}  // namespace test_gradcheck_ops
