// Adam and AdamW against torch.optim.Adam / AdamW's formulas, recomputed here in double.
#include <lowrank/optim/adam.hpp>  // first: the header compiles on its own

#include "optim_test_support.hpp"

#include <cmath>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_adam {

using namespace lowrank;
using lowrank::test::make_param;
using lowrank::test::set_grad;

namespace {

/// torch.optim.Adam (decoupled = false) or AdamW (decoupled = true) in double.
MatrixD adam_reference(const AdamOptions& o, bool decoupled, Index rows, Index cols, int steps) {
    MatrixD w(rows, cols), m = MatrixD::Zero(rows, cols), v = MatrixD::Zero(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) w(i, j) = test::value_at(i, j);
    for (int t = 1; t <= steps; ++t) {
        const double bc1 = 1.0 - std::pow(o.beta1, t), bc2 = 1.0 - std::pow(o.beta2, t);
        for (Index i = 0; i < rows; ++i)
            for (Index j = 0; j < cols; ++j) {
                double g = test::grad_at(t - 1, i, j);
                if (decoupled)
                    w(i, j) *= 1.0 - o.lr * o.weight_decay;
                else
                    g += o.weight_decay * w(i, j);
                m(i, j) = o.beta1 * m(i, j) + (1.0 - o.beta1) * g;
                v(i, j) = o.beta2 * v(i, j) + (1.0 - o.beta2) * g * g;
                const double m_hat = m(i, j) / bc1, v_hat = v(i, j) / bc2;
                // PyTorch puts eps outside the bias-corrected square root.
                w(i, j) -= o.lr * m_hat / (std::sqrt(v_hat) + o.eps);
            }
    }
    return w;
}

}  // namespace

TEMPLATE_TEST_CASE("Adam and AdamW match PyTorch's formulas over three steps", "[optim][adam]", float,
                   double) {
    using T = TestType;
    const auto options = GENERATE(AdamOptions{}, AdamOptions{.lr = 0.01, .weight_decay = 0.1},
                                  AdamOptions{.lr = 0.05, .beta1 = 0.5, .beta2 = 0.9, .eps = 1e-3,
                                              .weight_decay = 0.3});
    INFO("lr " << options.lr << " wd " << options.weight_decay);
    auto p = make_param<T>("w", 2, 3);
    auto q = make_param<T>("w", 2, 3);
    Adam<T> adam({&p}, options);
    AdamW<T> adamw({&q}, options);
    for (int t = 0; t < 3; ++t) {
        set_grad(p, t);
        set_grad(q, t);
        adam.step();
        adamw.step();
        // The bias-corrected step has a 1 / (sqrt(v_hat) + eps) factor, which loses a
        // little more in float than SGD does.
        CHECK(test::close(p.value, adam_reference(options, false, 2, 3, t + 1), 4 * test::tol<T>()));
        CHECK(test::close(q.value, adam_reference(options, true, 2, 3, t + 1), 4 * test::tol<T>()));
    }
    CHECK(adam.state_of(p)->step == 3);
    CHECK(adamw.state_of(q)->step == 3);
}

TEST_CASE("Adam's first step moves every entry by lr against the gradient's sign", "[optim][adam]") {
    // m_hat = g and v_hat = g^2 after one step, so the update is lr * g / (|g| + eps).
    Parameter<double> p("w", MatrixD{{1.0, 1.0, 1.0}});
    p.grad = MatrixD{{2.0, -0.5, 1e-3}};
    Adam<double> opt({&p}, AdamOptions{.lr = 0.1, .eps = 0.0});
    opt.step();
    CHECK(p.value(0, 0) == Approx(0.9).epsilon(1e-14));
    CHECK(p.value(0, 1) == Approx(1.1).epsilon(1e-14));
    CHECK(p.value(0, 2) == Approx(0.9).epsilon(1e-14));
}

TEST_CASE("AdamW takes AdamOptions and its decay is decoupled from the moments", "[optim][adam]") {
    Parameter<double> p("w", MatrixD{{2.0}});
    p.grad = MatrixD{{0.0}};
    // With a zero gradient the moments stay zero, so only the decay moves the value:
    // w = 2 * (1 - lr * wd). Adam's L2 decay would instead go through the moments.
    AdamW<double> opt({&p}, AdamOptions{.lr = 0.1, .weight_decay = 0.5});
    opt.step();
    CHECK(p.value(0, 0) == Approx(2.0 * (1.0 - 0.05)).epsilon(1e-15));
    CHECK(opt.state_of(p)->exp_avg(0, 0) == 0.0);

    // The consumer example's call: AdamOptions designated initializers, wd 0 by default.
    auto q = make_param<float>("q", 1, 1);
    lowrank::AdamW<float> consumer(ParameterList<float>{&q}, lowrank::AdamOptions{.lr = 1e-2});
    CHECK(consumer.options().weight_decay == 0.0);
    CHECK(consumer.type_name() == "AdamW");
}

TEST_CASE("Adam rejects bad options with a message naming the option", "[optim][adam]") {
    auto p = make_param<float>("w", 1, 1);
    using Catch::Matchers::Contains;
    CHECK_THROWS_WITH(Adam<float>({&p}, AdamOptions{.lr = -1.0}), Contains("Adam: expected lr >= 0"));
    CHECK_THROWS_WITH(Adam<float>({&p}, AdamOptions{.beta1 = 1.0}), Contains("beta1"));
    CHECK_THROWS_WITH(AdamW<float>({&p}, AdamOptions{.beta2 = -0.1}), Contains("AdamW: expected 0 <= beta2"));
    CHECK_THROWS_WITH(Adam<float>({&p}, AdamOptions{.eps = -1.0}), Contains("eps"));
    CHECK_THROWS_WITH(AdamW<float>({&p}, AdamOptions{.weight_decay = -0.1}), Contains("weight_decay"));
}

}  // namespace test_adam
