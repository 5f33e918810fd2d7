// The Mlp model: forward against a hand-written Eigen forward, parameter names, gradients
// by finite differences (with dropout in training mode), eval mode, errors, and a few SGD
// steps that must lower the loss.

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/models/mlp.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <utility>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_mlp {

using Catch::Contains;
using lowrank::Activation;
using lowrank::Graph;
using lowrank::Index;
using lowrank::MatrixD;
using lowrank::Mlp;
using lowrank::MlpOptions;
using lowrank::Rng;

namespace {

MatrixD random_matrix(Index rows, Index cols, Rng& rng) {
    MatrixD m(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = rng.normal();
    return m;
}

double activate(Activation a, double x) {
    switch (a) {
        case Activation::relu: return x > 0 ? x : 0.0;
        case Activation::tanh: return std::tanh(x);
        case Activation::gelu: {
            const double k = std::sqrt(2.0 / std::numbers::pi);
            return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
        }
    }
    return 0.0;
}

/// The MLP written out with Eigen, from the layers' parameter values.
MatrixD reference_forward(Mlp<double>& mlp, const MatrixD& x) {
    MatrixD h = x;
    const auto& layers = mlp.layers();
    for (std::size_t i = 0; i < layers.size(); ++i) {
        MatrixD next = h * layers[i].dense_weight().transpose();
        if (const MatrixD* b = layers[i].bias()) next.rowwise() += b->row(0);
        h = std::move(next);
        if (i + 1 < layers.size())
            for (Index k = 0; k < h.size(); ++k) h.data()[k] = activate(mlp.options().activation, h.data()[k]);
    }
    return h;
}

const char* activation_name(Activation a) {
    switch (a) {
        case Activation::relu: return "relu";
        case Activation::gelu: return "gelu";
        case Activation::tanh: return "tanh";
    }
    return "?";
}

}  // namespace

TEST_CASE("Mlp forward equals a hand-written Eigen forward", "[models][mlp]") {
    const Activation act = GENERATE(Activation::relu, Activation::gelu, Activation::tanh);
    const bool bias = GENERATE(true, false);
    INFO("activation " << activation_name(act) << ", bias " << bias);
    Rng rng(1);
    Mlp<double> mlp(MlpOptions{.sizes = {6, 8, 5, 3}, .activation = act, .bias = bias}, rng);
    REQUIRE(mlp.layers().size() == 3);
    const MatrixD x = random_matrix(4, 6, rng);
    Graph<double> g;
    const auto y = mlp.forward(g, g.input(x));
    REQUIRE(y.rows() == 4);
    REQUIRE(y.cols() == 3);
    CHECK(y.value().isApprox(reference_forward(mlp, x), 1e-13));
}

TEST_CASE("Mlp names its parameters <name>.<i>.weight / .bias in order", "[models][mlp]") {
    Rng rng(2);
    Mlp<double> mlp(MlpOptions{.sizes = {6, 8, 3}}, rng);
    const auto params = mlp.parameters();
    REQUIRE(params.size() == 4);
    CHECK(params[0]->name() == "layers.0.weight");
    CHECK(params[1]->name() == "layers.0.bias");
    CHECK(params[2]->name() == "layers.1.weight");
    CHECK(params[3]->name() == "layers.1.bias");
    CHECK(params[0]->rows() == 8);
    CHECK(params[0]->cols() == 6);
    CHECK(params[2]->rows() == 3);
    CHECK(params[2]->cols() == 8);
    CHECK(lowrank::count_parameters(params) == 8 * 6 + 8 + 3 * 8 + 3);

    Mlp<double> named(MlpOptions{.sizes = {4, 4, 4, 2}, .bias = false, .name = "net"}, rng);
    const auto np = named.parameters();
    REQUIRE(np.size() == 3);
    CHECK(np[2]->name() == "net.2.weight");
}

TEST_CASE("Mlp parameters keep their addresses and ids when the model is moved", "[models][mlp]") {
    Rng rng(3);
    Mlp<double> mlp(MlpOptions{.sizes = {5, 7, 2}}, rng);
    const auto before = mlp.parameters();
    std::vector<std::uint64_t> ids;
    for (const auto* p : before) ids.push_back(p->id());
    Mlp<double> moved(std::move(mlp));
    const auto after = moved.parameters();
    REQUIRE(after.size() == before.size());
    for (std::size_t i = 0; i < after.size(); ++i) {
        CHECK(after[i] == before[i]);
        CHECK(after[i]->id() == ids[i]);
    }
}

TEST_CASE("Mlp gradients pass gradcheck, also with dropout in training mode", "[models][mlp]") {
    const Activation act = GENERATE(Activation::relu, Activation::gelu, Activation::tanh);
    const double p = GENERATE(0.0, 0.3);
    INFO("activation " << activation_name(act) << ", dropout " << p);
    Rng rng(4);
    Mlp<double> mlp(MlpOptions{.sizes = {5, 9, 6, 4}, .activation = act, .dropout = p}, rng);
    lowrank::Parameter<double> x("x", random_matrix(7, 5, rng));
    const std::vector<std::int32_t> targets{0, 3, 1, lowrank::kIgnoreIndex, 2, 2, 3};
    auto wrt = mlp.parameters();
    wrt.push_back(&x);
    lowrank::GradcheckOptions opt;
    opt.samples_per_tensor = 0;
    std::size_t nodes = 0;
    const auto result = lowrank::gradcheck(
        [&](Graph<double>& g) {
            const auto loss = lowrank::cross_entropy(g, mlp.forward(g, g.param(x)), targets);
            nodes = g.size();
            return loss;
        },
        wrt, opt);
    INFO(result.report);
    CHECK(result.passed);
    CHECK(result.checked == lowrank::count_parameters(wrt));
    for (const auto* param : wrt) {
        INFO(param->name());
        CHECK(param->grad.norm() > 0);
    }
    // Dropout in training mode is really on the tape: two more nodes (one per hidden layer).
    // x, 3 x (W, b, linear), 2 activations, cross_entropy = 13 nodes without dropout.
    CHECK(nodes == (p > 0 ? 15u : 13u));
}

TEST_CASE("Mlp in eval mode makes dropout the identity", "[models][mlp]") {
    Rng rng(5);
    Mlp<double> mlp(MlpOptions{.sizes = {6, 32, 32, 3}, .activation = Activation::gelu, .dropout = 0.5}, rng);
    const MatrixD x = random_matrix(8, 6, rng);
    const MatrixD reference = reference_forward(mlp, x);

    Graph<double> g(9);
    const MatrixD train1 = mlp.forward(g, g.input(x)).value();
    const auto train_nodes = g.size();
    CHECK_FALSE(train1.isApprox(reference, 1e-3));  // 64 hidden units at p = 0.5: some dropped

    g.clear();
    g.set_training(false);
    const MatrixD eval1 = mlp.forward(g, g.input(x)).value();
    CHECK(eval1.isApprox(reference, 1e-13));
    CHECK(g.size() == train_nodes - 2);  // no dropout nodes recorded

    // Eval is deterministic; training draws a new mask each step.
    g.clear();
    CHECK(mlp.forward(g, g.input(x)).value() == eval1);
    g.clear();
    g.set_training(true);
    CHECK(mlp.forward(g, g.input(x)).value() != train1);
}

TEST_CASE("Mlp rejects bad options", "[models][mlp]") {
    Rng rng(6);
    CHECK_THROWS_WITH(Mlp<double>(MlpOptions{.sizes = {4}}, rng), Contains("Mlp") && Contains("got 1"));
    CHECK_THROWS_WITH(Mlp<double>(MlpOptions{.sizes = {4, 0, 2}}, rng),
                      Contains("Mlp") && Contains("size 1") && Contains("got 0"));
    CHECK_THROWS_WITH(Mlp<double>(MlpOptions{.sizes = {4, 2}, .dropout = 1.0}, rng),
                      Contains("Mlp") && Contains("dropout") && Contains("got 1"));
    Mlp<double> mlp(MlpOptions{.sizes = {4, 3, 2}}, rng);
    Graph<double> g;
    CHECK_THROWS_WITH(mlp.forward(g, g.input(MatrixD::Ones(2, 5))),
                      Contains("layers.0") && Contains("4 features") && Contains("(2 x 5)"));
}

TEST_CASE("Mlp trained by plain SGD lowers its loss", "[models][mlp]") {
    // Three well-separated Gaussian blobs: a correct backward makes the loss drop fast.
    Rng rng(7);
    const Index n = 60;
    MatrixD x(n, 2);
    std::vector<std::int32_t> y(static_cast<std::size_t>(n));
    const double centers[3][2] = {{2.0, 0.0}, {-1.0, 1.7}, {-1.0, -1.7}};
    for (Index i = 0; i < n; ++i) {
        const auto c = static_cast<std::int32_t>(i % 3);
        y[static_cast<std::size_t>(i)] = c;
        x(i, 0) = centers[c][0] + 0.3 * rng.normal();
        x(i, 1) = centers[c][1] + 0.3 * rng.normal();
    }
    Mlp<double> mlp(MlpOptions{.sizes = {2, 16, 3}, .activation = Activation::tanh}, rng);
    const auto params = mlp.parameters();
    Graph<double> g;
    auto step = [&] {
        g.clear();
        lowrank::zero_grad(params);
        const auto loss = lowrank::cross_entropy(g, mlp.forward(g, g.input(x)), y);
        g.backward(loss);
        for (auto* p : params) p->value -= 0.5 * p->grad;
        return loss.item();
    };
    const double first = step();
    double last = first;
    for (int i = 0; i < 100; ++i) last = step();
    CHECK(first > 0.5);
    CHECK(last < 0.1 * first);
    g.clear();
    g.set_grad_enabled(false);
    const auto predicted = lowrank::argmax_rows(mlp.forward(g, g.input(x)).value());
    CHECK(predicted == y);
}

}  // namespace test_mlp
