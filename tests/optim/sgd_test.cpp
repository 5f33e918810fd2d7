// SGD against torch.optim.SGD's formulas, recomputed here in double.
#include <lowrank/optim/sgd.hpp>  // first: the header compiles on its own

#include "optim_test_support.hpp"

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_sgd {

using namespace lowrank;
using lowrank::test::make_param;
using lowrank::test::set_grad;

namespace {

/// torch.optim.SGD, written out element by element in double.
MatrixD sgd_reference(const SgdOptions& o, Index rows, Index cols, int steps) {
    MatrixD w(rows, cols), buf = MatrixD::Zero(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) w(i, j) = test::value_at(i, j);
    for (int t = 0; t < steps; ++t)
        for (Index i = 0; i < rows; ++i)
            for (Index j = 0; j < cols; ++j) {
                double d = test::grad_at(t, i, j) + o.weight_decay * w(i, j);
                if (o.momentum != 0.0) {
                    buf(i, j) = t == 0 ? d : o.momentum * buf(i, j) + (1.0 - o.dampening) * d;
                    d = o.nesterov ? d + o.momentum * buf(i, j) : buf(i, j);
                }
                w(i, j) -= o.lr * d;
            }
    return w;
}

}  // namespace

TEMPLATE_TEST_CASE("Sgd matches torch.optim.SGD's update over three steps", "[optim][sgd]", float,
                   double) {
    using T = TestType;
    const auto [label, options] = GENERATE(table<const char*, SgdOptions>({
        {"plain", SgdOptions{.lr = 0.1}},
        {"weight decay", SgdOptions{.lr = 0.1, .weight_decay = 0.05}},
        {"momentum + dampening + wd",
         SgdOptions{.lr = 0.1, .momentum = 0.9, .dampening = 0.1, .weight_decay = 0.01}},
        {"nesterov + wd", SgdOptions{.lr = 0.05, .momentum = 0.8, .weight_decay = 0.02, .nesterov = true}},
    }));
    INFO(label);
    auto p = make_param<T>("w", 2, 3);
    Sgd<T> opt({&p}, options);
    for (int t = 0; t < 3; ++t) {
        set_grad(p, t);
        opt.step();
        CHECK(test::close(p.value, sgd_reference(options, 2, 3, t + 1), test::tol<T>()));
    }
    REQUIRE(opt.state_of(p) != nullptr);
    CHECK(opt.state_of(p)->step == 3);
    CHECK(opt.state_of(p)->momentum.size() == (options.momentum != 0.0 ? 6 : 0));
}

TEST_CASE("Sgd momentum by hand: the buffer starts as the gradient, without dampening",
          "[optim][sgd]") {
    Parameter<double> p("w", MatrixD::Constant(1, 1, 1.0));
    Sgd<double> heavy({&p}, SgdOptions{.lr = 0.1, .momentum = 0.5, .dampening = 0.5});
    p.grad.setConstant(1, 1, 1.0);
    heavy.step();  // buf = 1; w = 1 - 0.1
    CHECK(p.value(0, 0) == Approx(0.9).epsilon(1e-15));
    heavy.step();  // buf = 0.5 * 1 + 0.5 * 1 = 1; w = 0.9 - 0.1
    CHECK(p.value(0, 0) == Approx(0.8).epsilon(1e-15));

    Parameter<double> q("w", MatrixD::Constant(1, 1, 1.0));
    Sgd<double> nesterov({&q}, SgdOptions{.lr = 0.1, .momentum = 0.5, .nesterov = true});
    q.grad.setConstant(1, 1, 1.0);
    nesterov.step();  // buf = 1; d = 1 + 0.5 * 1; w = 1 - 0.15
    CHECK(q.value(0, 0) == Approx(0.85).epsilon(1e-15));
    nesterov.step();  // buf = 1.5; d = 1 + 0.75; w = 0.85 - 0.175
    CHECK(q.value(0, 0) == Approx(0.675).epsilon(1e-15));
}

TEST_CASE("Sgd rejects bad options with a message naming the option", "[optim][sgd]") {
    auto p = make_param<float>("w", 1, 1);
    using Catch::Matchers::Contains;
    CHECK_THROWS_WITH(Sgd<float>({&p}, SgdOptions{.lr = -1.0}), Contains("lr >= 0"));
    CHECK_THROWS_WITH(Sgd<float>({&p}, SgdOptions{.momentum = -0.1}), Contains("momentum >= 0"));
    CHECK_THROWS_WITH(Sgd<float>({&p}, SgdOptions{.weight_decay = -1.0}), Contains("weight_decay"));
    CHECK_THROWS_WITH(Sgd<float>({&p}, SgdOptions{.nesterov = true}),
                      Contains("nesterov needs momentum > 0 and dampening = 0"));
    CHECK_THROWS_WITH(Sgd<float>({&p}, SgdOptions{.momentum = 0.9, .dampening = 0.1, .nesterov = true}),
                      Contains("dampening = 0.1"));
    CHECK_THROWS_AS(Sgd<float>({&p}, SgdOptions{.lr = std::nan("")}), Error);
    CHECK_NOTHROW(Sgd<float>({&p}, SgdOptions{.momentum = 0.9, .nesterov = true}));
}

TEST_CASE("Sgd without momentum keeps only a step count", "[optim][sgd]") {
    auto p = make_param<float>("w", 2, 2);
    Sgd<float> opt({&p}, SgdOptions{.lr = 0.1});
    CHECK(opt.moment_names().empty());
    set_grad(p, 0);
    opt.step();
    REQUIRE(opt.state_of(p) != nullptr);
    CHECK(opt.state_of(p)->momentum.size() == 0);
    CHECK(opt.type_name() == "Sgd");
}

}  // namespace test_sgd
