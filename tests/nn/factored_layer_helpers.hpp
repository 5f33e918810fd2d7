// Helpers shared by the tests of the factored layer types.
#pragma once

#include <catch2/catch.hpp>

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/nn/any_linear.hpp>

#include "../test_support.hpp"

namespace lowrank::test {


// A loss in which every output entry matters: sum(y .* R) for a fixed random R.
template <class Layer>
auto weighted_sum_loss(Layer& layer, Parameter<double>& x, const MatrixD& weights) {
    return [&layer, &x, &weights](Graph<double>& g) {
        auto y = layer.forward(g, g.param(x));
        return sum(g, mul(g, y, g.input(weights)));
    };
}

// Checks the gradient of every trainable parameter of the layer and of its input.
template <class Layer>
void check_gradients(Layer& layer, Index tokens = 4) {
    Parameter<double> x("x", gaussian(tokens, layer.in_features(), 77));
    const MatrixD weights = gaussian(tokens, layer.out_features(), 78);
    ParameterList<double> wrt{&x};
    for (auto* p : layer.parameters())
        if (p->trainable) wrt.push_back(p);
    const auto result = gradcheck(weighted_sum_loss(layer, x, weights), wrt);
    INFO(result.report);
    CHECK(result.passed);
}

inline MatrixD forward_value(auto& layer, const MatrixD& x) {
    Graph<double> g;
    return layer.forward(g, g.input(x)).value();
}

}  // namespace lowrank::test
