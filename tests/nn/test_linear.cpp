// The dense Linear layer: shapes and counts, names, PyTorch's initialisation, its forward
// against x * W^T + b, gradients by finite differences, and its errors.

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/nn/linear.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <string>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_linear {

using Catch::Contains;
using lowrank::Graph;
using lowrank::Index;
using lowrank::Linear;
using lowrank::LinearOptions;
using lowrank::MatrixD;
using lowrank::Rng;

namespace {

MatrixD random_matrix(Index rows, Index cols, Rng& rng) {
    MatrixD m(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = rng.normal();
    return m;
}

}  // namespace

TEST_CASE("Linear reports its shape, parameter count and FLOPs", "[nn][linear]") {
    Rng rng(1);
    Linear<double> fc("fc", 7, 4, rng);
    CHECK(fc.in_features() == 7);
    CHECK(fc.out_features() == 4);
    CHECK(fc.has_bias());
    CHECK(fc.weight.rows() == 4);
    CHECK(fc.weight.cols() == 7);
    CHECK(fc.bias.rows() == 1);
    CHECK(fc.bias.cols() == 4);
    CHECK(fc.rank() == 4);
    CHECK(fc.parameter_count() == 4 * 7 + 4);
    CHECK(fc.trainable_count() == 4 * 7 + 4);
    CHECK(fc.flops_per_token() == 2.0 * 7 * 4 + 4);
    CHECK(&fc.dense_weight() == &fc.weight.value);

    Linear<double> nb("nb", 3, 9, rng, LinearOptions{.bias = false});
    CHECK_FALSE(nb.has_bias());
    CHECK(nb.bias.size() == 0);
    CHECK(nb.rank() == 3);
    CHECK(nb.parameter_count() == 27);
    CHECK(nb.flops_per_token() == 2.0 * 3 * 9);

    fc.weight.trainable = false;
    CHECK(fc.trainable_count() == 4);
    CHECK(fc.parameter_count() == 32);
}

TEST_CASE("Linear names its parameters <name>.weight and <name>.bias", "[nn][linear]") {
    Rng rng(2);
    Linear<double> fc("layers.0", 5, 3, rng);
    CHECK(fc.name() == "layers.0");
    const auto params = fc.parameters();
    REQUIRE(params.size() == 2);
    CHECK(params[0] == &fc.weight);
    CHECK(params[1] == &fc.bias);
    CHECK(params[0]->name() == "layers.0.weight");
    CHECK(params[1]->name() == "layers.0.bias");
    CHECK(params[0]->id() != params[1]->id());

    Linear<double> nb("h.3.mlp.fc", 5, 3, rng, LinearOptions{.bias = false});
    const auto only = nb.parameters();
    REQUIRE(only.size() == 1);
    CHECK(only[0]->name() == "h.3.mlp.fc.weight");
}

TEST_CASE("Linear initialises W and b uniformly in +-1/sqrt(in), from the generator", "[nn][linear]") {
    Rng rng(3);
    const Index in = 100, out = 64;
    Linear<double> fc("fc", in, out, rng);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    CHECK(fc.weight.value.cwiseAbs().maxCoeff() <= bound);
    CHECK(fc.bias.value.cwiseAbs().maxCoeff() <= bound);
    // Spread over the whole interval: U(-b, b) has variance b^2 / 3; 6400 draws pin it to 5%.
    CHECK(fc.weight.value.cwiseAbs().maxCoeff() > 0.95 * bound);
    CHECK(fc.weight.value.array().square().mean() == Approx(bound * bound / 3).epsilon(0.05));
    CHECK(std::abs(fc.weight.value.mean()) < 0.05 * bound);
    CHECK(fc.bias.value.cwiseAbs().maxCoeff() > 0.5 * bound);

    // The same seed gives the same layer; another seed a different one.
    Rng same(3), other(4);
    Linear<double> twin("fc", in, out, same);
    Linear<double> stranger("fc", in, out, other);
    CHECK(twin.weight.value == fc.weight.value);
    CHECK(twin.bias.value == fc.bias.value);
    CHECK(stranger.weight.value != fc.weight.value);
}

TEST_CASE("Linear forward is x * W^T + b", "[nn][linear]") {
    Rng rng(5);
    Linear<double> fc("fc", 7, 4, rng);
    Linear<double> nb("nb", 7, 4, rng, LinearOptions{.bias = false});
    const MatrixD x = random_matrix(5, 7, rng);
    Graph<double> g;
    const auto y = fc.forward(g, g.input(x));
    REQUIRE(y.rows() == 5);
    REQUIRE(y.cols() == 4);
    MatrixD expected = x * fc.weight.value.transpose();
    expected.rowwise() += fc.bias.value.row(0);
    CHECK(y.value().isApprox(expected, 1e-14));
    CHECK(nb.forward(g, g.input(x)).value().isApprox(x * nb.weight.value.transpose(), 1e-14));

    // float computes the same layer to float precision.
    Rng frng(5);
    Linear<float> ff("fc", 7, 4, frng);
    Graph<float> gf;
    const auto yf = ff.forward(gf, gf.input(x.cast<float>()));
    CHECK((yf.value().cast<double>() - expected).cwiseAbs().maxCoeff() < 1e-5);
}

TEST_CASE("Linear gradients pass gradcheck with and without bias", "[nn][linear]") {
    Rng rng(6);
    const bool bias = GENERATE(true, false);
    INFO("bias = " << bias);
    Linear<double> fc("fc", 7, 4, rng, LinearOptions{.bias = bias});
    lowrank::Parameter<double> x("x", random_matrix(5, 7, rng));
    const MatrixD r = random_matrix(5, 4, rng);
    auto wrt = fc.parameters();
    wrt.push_back(&x);
    lowrank::GradcheckOptions opt;
    opt.samples_per_tensor = 0;
    const auto result = lowrank::gradcheck(
        [&](Graph<double>& g) {
            return lowrank::sum(g, lowrank::mul(g, fc.forward(g, g.param(x)), g.input(r)));
        },
        wrt, opt);
    INFO(result.report);
    CHECK(result.passed);
    CHECK(result.checked == fc.parameter_count() + x.size());
    // And the analytic gradients are the closed forms: dW = r^T x, db = column sums of r.
    CHECK(fc.weight.grad.isApprox(r.transpose() * x.value, 1e-13));
    if (bias) CHECK(fc.bias.grad.isApprox(r.colwise().sum(), 1e-13));
}

TEST_CASE("Linear rejects bad sizes and inputs of the wrong width", "[nn][linear]") {
    Rng rng(7);
    CHECK_THROWS_WITH(Linear<double>("proj", 0, 4, rng),
                      "proj: expected positive in and out features, got in = 0, out = 4");
    CHECK_THROWS_WITH(Linear<double>("proj", 4, -1, rng), Contains("proj: ") && Contains("out = -1"));
    CHECK_THROWS_AS(Linear<double>("proj", 4, 0, rng), lowrank::Error);

    Linear<double> fc("fc", 7, 4, rng);
    Graph<double> g;
    CHECK_THROWS_WITH(fc.forward(g, g.input(MatrixD::Ones(5, 6))),
                      "fc: expected input with 7 features, got (5 x 6)");
}

}  // namespace test_linear
