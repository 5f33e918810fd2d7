// Each optimizer minimises Rosenbrock's function and a least-squares problem to the known
// minimiser in a bounded number of steps (learning rates tuned once, here).
#include <lowrank/optim/optim.hpp>

#include <lowrank/core/init.hpp>
#include <lowrank/core/rng.hpp>

#include "optim_test_support.hpp"

#include <Eigen/Cholesky>

#include <cmath>
#include <memory>
#include <string>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_convergence {

using namespace lowrank;

namespace {

template <class T>
std::unique_ptr<Optimizer<T>> make_optimizer(const std::string& kind, Parameter<T>& p, double lr,
                                             double adamw_decay) {
    ParameterList<T> params{&p};
    if (kind == "sgd-momentum")
        return std::make_unique<Sgd<T>>(params, SgdOptions{.lr = lr, .momentum = 0.9});
    if (kind == "sgd-nesterov")
        return std::make_unique<Sgd<T>>(params, SgdOptions{.lr = lr, .momentum = 0.9, .nesterov = true});
    if (kind == "adam") return std::make_unique<Adam<T>>(params, AdamOptions{.lr = lr});
    return std::make_unique<AdamW<T>>(params, AdamOptions{.lr = lr, .weight_decay = adamw_decay});
}

}  // namespace

TEST_CASE("every optimizer minimises Rosenbrock's function from (-1.5, 2)", "[optim][convergence]") {
    // f(x, y) = (1 - x)^2 + 100 (y - x^2)^2, minimum at (1, 1) in a long curved valley.
    // Adam needs more steps than momentum SGD here, and a cosine decay to settle.
    const auto [kind, lr, steps, cosine] = GENERATE(table<std::string, double, int, bool>({
        {"sgd-momentum", 1e-3, 4000, false},
        {"sgd-nesterov", 1e-3, 4000, false},
        {"adam", 1e-2, 20000, true},
        {"adamw", 1e-2, 20000, true},  // with weight decay 1e-4, which moves the minimum by ~1e-6
    }));
    INFO(kind);
    Parameter<double> p("xy", MatrixD{{-1.5, 2.0}});
    p.zero_grad();
    auto opt = make_optimizer<double>(kind, p, lr, 1e-4);
    const LrSchedule schedule =
        cosine ? LrSchedule(ScheduleOptions{.kind = ScheduleKind::warmup_cosine, .total_steps = steps})
               : LrSchedule();
    for (int t = 0; t < steps; ++t) {
        const double x = p.value(0, 0), y = p.value(0, 1);
        p.grad(0, 0) = -2.0 * (1.0 - x) - 400.0 * x * (y - x * x);
        p.grad(0, 1) = 200.0 * (y - x * x);
        schedule.apply(*opt, t);
        opt->step();
    }
    INFO("ended at (" << p.value(0, 0) << ", " << p.value(0, 1) << ")");
    CHECK(std::hypot(p.value(0, 0) - 1.0, p.value(0, 1) - 1.0) < 1e-3);
}

TEMPLATE_TEST_CASE("every optimizer solves least squares to the normal-equation solution",
                   "[optim][convergence]", float, double) {
    using T = TestType;
    const std::string kind = GENERATE("sgd-momentum", "sgd-nesterov", "adam", "adamw");
    INFO(kind);
    // min ||A x - b||^2, A 20 x 5; the gradient is 2 A^T (A x - b).
    Rng rng(42);
    MatrixD a(20, 5), b(20, 1);
    init::normal<double>(a, rng);
    init::normal<double>(b, rng);
    const MatrixD solution = (a.transpose() * a).ldlt().solve(a.transpose() * b);
    const Matrix<T> a_t = a.cast<T>(), b_t = b.cast<T>();

    Parameter<T> x("x", Matrix<T>::Zero(5, 1));
    x.zero_grad();
    const bool sgd = kind.rfind("sgd", 0) == 0;
    auto opt = make_optimizer<T>(kind, x, sgd ? 3e-3 : 3e-2, 0.0);
    for (int t = 0; t < 1000; ++t) {
        x.grad.noalias() = T(2) * a_t.transpose() * (a_t * x.value - b_t);
        opt->step();
    }
    const double error = (x.value.template cast<double>() - solution).norm();
    INFO("error " << error << ", |solution| " << solution.norm());
    CHECK(error < (std::is_same_v<T, float> ? 1e-5 : 1e-10));
}

}  // namespace test_convergence
