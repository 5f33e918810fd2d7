// Gradient clipping by global norm.
#include <lowrank/optim/clip.hpp>  // first: the header compiles on its own

#include <lowrank/core/rng.hpp>
#include <lowrank/core/threads.hpp>

#include "optim_test_support.hpp"

#include <cmath>
#include <limits>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_clip {

using namespace lowrank;
using Catch::Matchers::Contains;

TEST_CASE("the global norm covers every trainable gradient as one vector", "[optim][clip]") {
    Parameter<float> a("a", MatrixF::Zero(1, 2)), b("b", MatrixF::Zero(2, 1)), frozen("f", MatrixF::Zero(1, 1));
    Parameter<float> no_grad("n", MatrixF::Zero(3, 3));
    a.grad = MatrixF{{3.0f, 0.0f}};
    b.grad = MatrixF{{0.0f}, {4.0f}};
    frozen.grad = MatrixF{{100.0f}};
    frozen.trainable = false;
    const ParameterList<float> params{&a, &b, &frozen, &no_grad};
    CHECK(grad_global_norm(params) == 5.0);

    // Many entries, accumulated in double: no loss from float partial sums.
    Rng rng(7);
    Parameter<float> big("big", MatrixF::Zero(37, 101));
    big.grad.resize(37, 101);
    double expected = 0.0;
    for (Index k = 0; k < big.grad.size(); ++k) {
        big.grad.data()[k] = static_cast<float>(rng.normal());
        expected += static_cast<double>(big.grad.data()[k]) * big.grad.data()[k];
    }
    CHECK(grad_global_norm(ParameterList<float>{&big}) == Approx(std::sqrt(expected)).epsilon(1e-14));
}

TEST_CASE("the global norm of a gradient in many blocks has the same bits at 1 and 2 threads", "[optim][clip]") {
    // 5 * 2^16 + 123 entries: six blocks of the parallel sum (the last one short), each a
    // serial sum, added in block order whatever the thread count.
    Rng rng(11);
    Parameter<float> big("big", MatrixF::Zero(1, 5 * 65536 + 123));
    big.grad.resize(1, big.value.cols());
    double expected = 0.0;
    for (Index k = 0; k < big.grad.size(); ++k) {
        big.grad.data()[k] = static_cast<float>(rng.normal());
        expected += static_cast<double>(big.grad.data()[k]) * big.grad.data()[k];
    }
    const ParameterList<float> params{&big};
    const int saved = num_threads();
    set_num_threads(1);
    const double one = grad_global_norm(params);
    set_num_threads(2);
    const double two = grad_global_norm(params);
    set_num_threads(saved);
    CHECK(one == two);
    CHECK(one == Approx(std::sqrt(expected)).epsilon(1e-13));
}

TEST_CASE("clipping scales the gradients to the target norm", "[optim][clip]") {
    Parameter<double> a("a", MatrixD::Zero(1, 2)), b("b", MatrixD::Zero(2, 1));
    a.grad = MatrixD{{3.0, 0.0}};
    b.grad = MatrixD{{0.0}, {4.0}};
    const ParameterList<double> params{&a, &b};
    const double before = clip_grad_norm(params, 1.0);
    CHECK(before == 5.0);
    CHECK(grad_global_norm(params) == Approx(1.0).epsilon(1e-6));
    const double coef = 1.0 / (5.0 + 1e-6);  // PyTorch's coefficient
    CHECK(a.grad(0, 0) == Approx(3.0 * coef).epsilon(1e-15));
    CHECK(b.grad(1, 0) == Approx(4.0 * coef).epsilon(1e-15));
}

TEST_CASE("gradients below the threshold are left exactly as they were", "[optim][clip]") {
    Parameter<float> a("a", MatrixF::Zero(2, 2));
    a.grad = MatrixF{{0.1f, -0.2f}, {0.3f, 0.05f}};
    const MatrixF g0 = a.grad;
    const double norm = clip_grad_norm(ParameterList<float>{&a}, 1.0);
    CHECK(norm == Approx(std::sqrt(0.01 + 0.04 + 0.09 + 0.0025)).epsilon(1e-6));
    CHECK(a.grad == g0);
}

TEST_CASE("a non-finite gradient norm throws and leaves the gradients alone", "[optim][clip]") {
    Parameter<float> a("a", MatrixF::Zero(1, 2)), b("h.2.mlp.fc.U", MatrixF::Zero(1, 2));
    a.grad = MatrixF{{1.0f, 2.0f}};
    b.grad = MatrixF{{std::numeric_limits<float>::quiet_NaN(), 1.0f}};
    const ParameterList<float> params{&a, &b};
    CHECK(std::isnan(grad_global_norm(params)));
    CHECK_THROWS_WITH(clip_grad_norm(params, 1.0),
                      Contains("the gradient norm is not finite") && Contains("'h.2.mlp.fc.U'"));
    CHECK(a.grad == MatrixF{{1.0f, 2.0f}});

    b.grad = MatrixF{{std::numeric_limits<float>::infinity(), 1.0f}};
    CHECK_THROWS_WITH(clip_grad_norm(params, 1.0), Contains("not finite (inf)"));
    CHECK_THROWS_WITH(clip_grad_norm(params, 0.0), Contains("max_norm > 0"));
}

}  // namespace test_clip
