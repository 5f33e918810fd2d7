// Parameter groups, the lr scale, non-trainable parameters and zero_grad.
#include <lowrank/optim/sgd.hpp>

#include <lowrank/optim/adam.hpp>

#include "optim_test_support.hpp"

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_groups {

using namespace lowrank;
using Catch::Matchers::Contains;
using lowrank::test::make_param;
using lowrank::test::set_grad;

TEST_CASE("each group steps with its own lr and weight decay", "[optim][groups]") {
    auto w = make_param<double>("fc.weight", 2, 3);
    auto b = make_param<double>("fc.bias", 1, 3);
    auto u = make_param<double>("fc.U", 3, 2);
    Sgd<double> opt({&w}, SgdOptions{.lr = 0.1, .weight_decay = 0.01});
    opt.add_group({&b}, GroupOptions{.weight_decay = 0.0, .name = "no decay"});  // lr inherited
    opt.add_group({&u}, GroupOptions{.lr = 0.5, .weight_decay = 0.2, .name = "factors"});
    REQUIRE(opt.groups().size() == 3);
    CHECK(opt.group(1).options.lr == 0.1);
    CHECK(opt.group(1).options.name == "no decay");
    CHECK(opt.group(2).options.lr == 0.5);
    CHECK(opt.parameters() == ParameterList<double>{&w, &b, &u});

    const MatrixD w0 = w.value, b0 = b.value, u0 = u.value;
    set_grad(w, 0);
    set_grad(b, 0);
    set_grad(u, 0);
    opt.set_lr_scale(0.5);
    opt.step();
    // Plain SGD: p -= lr * scale * (g + wd * p).
    CHECK(w.value.isApprox(w0 - 0.05 * (w.grad + 0.01 * w0), 1e-15));
    CHECK(b.value.isApprox(b0 - 0.05 * b.grad, 1e-15));
    CHECK(u.value.isApprox(u0 - 0.25 * (u.grad + 0.2 * u0), 1e-15));

    opt.set_group_lr(2, 1.0);
    opt.set_group_weight_decay(2, 0.0);
    opt.set_lr_scale(1.0);
    const MatrixD u1 = u.value;
    opt.step();
    CHECK(u.value.isApprox(u1 - 1.0 * u.grad, 1e-15));
}

TEST_CASE("Adam groups: the lr scale multiplies every group's lr", "[optim][groups]") {
    // Adam's first step moves each entry by lr * sign(g) (eps = 0), which shows the lr used.
    Parameter<double> a("a", MatrixD{{0.0}}), b("b", MatrixD{{0.0}});
    a.grad = MatrixD{{3.0}};
    b.grad = MatrixD{{-2.0}};
    Adam<double> opt({&a}, AdamOptions{.lr = 0.1, .eps = 0.0});
    opt.add_group({&b}, GroupOptions{.lr = 0.01});
    opt.set_lr_scale(0.5);
    opt.step();
    CHECK(a.value(0, 0) == Approx(-0.05).epsilon(1e-14));
    CHECK(b.value(0, 0) == Approx(0.005).epsilon(1e-14));
}

TEST_CASE("non-trainable parameters and parameters without a gradient are not touched",
          "[optim][groups]") {
    auto frozen = make_param<float>("w0", 2, 2);
    auto live = make_param<float>("u", 2, 2);
    auto unused = make_param<float>("unused", 2, 2);
    frozen.trainable = false;
    unused.grad.resize(0, 0);  // never written by a backward pass (PyTorch: grad is None)
    AdamW<float> opt({&frozen, &live, &unused}, AdamOptions{.lr = 0.1, .weight_decay = 0.5});
    set_grad(frozen, 0);
    set_grad(live, 0);
    const MatrixF frozen0 = frozen.value, live0 = live.value, unused0 = unused.value;
    opt.step();
    CHECK(frozen.value == frozen0);
    CHECK(unused.value == unused0);
    CHECK(live.value != live0);
    CHECK_FALSE(opt.has_state(frozen.id()));
    CHECK_FALSE(opt.has_state(unused.id()));
    CHECK(opt.has_state(live.id()));
    CHECK(opt.num_states() == 1);

    // zero_grad reaches every parameter: it sizes empty gradients of trainable ones and
    // releases the gradient of a frozen one (a frozen parameter keeps no gradient buffer).
    opt.zero_grad();
    CHECK(frozen.grad.size() == 0);
    CHECK(live.grad.isZero(0.0));
    CHECK(unused.grad.rows() == 2);
    CHECK(unused.grad.isZero(0.0));
}

TEST_CASE("groups are validated", "[optim][groups]") {
    auto a = make_param<float>("a", 1, 1);
    auto b = make_param<float>("b", 1, 1);
    Sgd<float> opt({&a}, SgdOptions{});
    CHECK_THROWS_WITH(opt.add_group({&a}, GroupOptions{.lr = 0.1, .name = "again"}),
                      Contains("parameter 'a' appears in more than one group"));
    CHECK_THROWS_WITH(opt.add_group({&b, &b}, GroupOptions{.lr = 0.1}), Contains("appears in more than one"));
    CHECK_THROWS_WITH(opt.add_group({nullptr}, GroupOptions{.lr = 0.1, .name = "bad"}),
                      Contains("group 'bad': parameter 0 is null"));
    CHECK_THROWS_WITH(opt.add_group({&b}, GroupOptions{.lr = -0.1}), Contains("expected lr >= 0"));
    CHECK_THROWS_WITH(opt.add_group({&b}, GroupOptions{.weight_decay = -1.0}), Contains("weight_decay"));
    CHECK(opt.groups().size() == 1);  // nothing was added by the failed calls
    CHECK_THROWS_WITH(opt.set_lr_scale(-1.0), Contains("scale >= 0"));
    CHECK_THROWS_WITH(opt.set_group_lr(3, 0.1), Contains("expected group < 1, got 3"));
}

TEST_CASE("a gradient of the wrong shape is reported by name before any update", "[optim][groups]") {
    auto a = make_param<float>("a", 2, 2);
    auto b = make_param<float>("blocks.1.fc.V", 2, 2);
    Sgd<float> opt({&a, &b}, SgdOptions{});
    set_grad(a, 0);
    b.grad.setZero(2, 3);
    const MatrixF a0 = a.value;
    CHECK_THROWS_WITH(opt.step(), Contains("parameter 'blocks.1.fc.V': gradient shape (2 x 3) does not "
                                           "match value shape (2 x 2)"));
    CHECK(a.value == a0);
}

}  // namespace test_groups
