// Parameter identity and layout versions, the initialisers, and the error helpers'
// messages.

#include <lowrank/core/error.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/parameter.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_parameter_init {

using Catch::Contains;
using lowrank::Index;
using lowrank::MatrixD;
using lowrank::MatrixF;
using lowrank::Parameter;
using lowrank::Rng;

// --- Parameter -------------------------------------------------------------------------

TEST_CASE("Parameter ids are unique and stable", "[core][parameter]") {
    std::vector<Parameter<double>> params;
    params.reserve(100);
    for (int i = 0; i < 100; ++i) {
        std::string name = "p";
        name += std::to_string(i);
        params.emplace_back(std::move(name), MatrixD::Zero(2, 2));
    }
    std::set<std::uint64_t> ids;
    for (const auto& p : params) ids.insert(p.id());
    CHECK(ids.size() == 100);
    CHECK(ids.count(0) == 0);  // 0 is never an id

    Parameter<double>& p = params[7];
    const auto id = p.id();
    p.value.setOnes();
    p.zero_grad();
    p.set_value(MatrixD::Ones(3, 5));
    p.bump_layout();
    p.set_name("renamed");
    CHECK(p.id() == id);

    // Moving keeps the id (a model moved into a container is the same model)...
    Parameter<double> moved(std::move(p));
    CHECK(moved.id() == id);
    // ...and a float parameter draws from the same never-reused sequence.
    Parameter<float> f("f", MatrixF::Zero(1, 1));
    CHECK(ids.count(f.id()) == 0);
    CHECK(f.id() != id);
}

TEST_CASE("a copied Parameter is a different parameter with a new id", "[core][parameter]") {
    Parameter<double> a("layer.weight", MatrixD::Constant(2, 3, 1.5));
    a.zero_grad();
    a.grad(0, 1) = 4.0;
    a.set_active_cols(2);
    a.bump_layout();
    const Parameter<double> b(a);
    CHECK(b.id() != a.id());
    CHECK(b.name() == "layer.weight");
    CHECK(b.value == a.value);
    CHECK(b.grad == a.grad);
    CHECK(b.trainable);
    CHECK(b.active_cols() == 2);
    CHECK(b.layout_version() == a.layout_version());

    // Copy-assignment keeps the target's identity, takes the contents, and marks the
    // layout changed (the optimizer's state for the target no longer fits its value).
    Parameter<double> c("other", MatrixD::Zero(1, 1));
    const auto c_id = c.id();
    const auto c_version = c.layout_version();
    c = a;
    CHECK(c.id() == c_id);
    CHECK(c.name() == "layer.weight");
    CHECK(c.value == a.value);
    CHECK(c.active_cols() == 2);
    CHECK(c.layout_version() == c_version + 1);

    const Parameter<double> frozen("frozen", MatrixD::Ones(2, 2), /*trainable=*/false);
    CHECK_FALSE(Parameter<double>(frozen).trainable);
}

TEST_CASE("set_value bumps the layout version and sizes the gradient", "[core][parameter]") {
    Parameter<double> p("u", MatrixD::Ones(4, 2));
    CHECK(p.layout_version() == 0);
    CHECK(p.grad.size() == 0);
    p.zero_grad();
    CHECK(p.grad.rows() == 4);
    CHECK(p.grad.cols() == 2);
    CHECK(p.grad.isZero(0.0));
    CHECK(p.layout_version() == 0);  // zeroing the gradient is not a layout change

    p.grad.setConstant(3.0);
    p.set_value(MatrixD::Constant(4, 5, 2.0));
    CHECK(p.layout_version() == 1);
    CHECK(p.rows() == 4);
    CHECK(p.cols() == 5);
    CHECK(p.size() == 20);
    CHECK(p.grad.rows() == 4);
    CHECK(p.grad.cols() == 5);
    CHECK(p.grad.isZero(0.0));
    p.bump_layout();
    CHECK(p.layout_version() == 2);
}

TEST_CASE("a frozen Parameter keeps no gradient buffer", "[core][parameter]") {
    Parameter<double> p("w0", MatrixD::Ones(3, 3), /*trainable=*/false);
    p.zero_grad();
    CHECK(p.grad.size() == 0);
    p.grad = MatrixD::Ones(3, 3);  // e.g. left over from when it was trainable
    p.set_value(MatrixD::Ones(4, 4));
    CHECK(p.grad.size() == 0);
    CHECK(p.layout_version() == 1);
}

TEST_CASE("active columns set the size in use and mark the layout changed", "[core][parameter]") {
    Parameter<double> u("fc.U", MatrixD::Ones(6, 8));
    CHECK(u.active_cols() == 8);
    CHECK(u.size() == 48);
    u.set_active_cols(3);
    CHECK(u.active_cols() == 3);
    CHECK(u.size() == 18);
    CHECK(u.cols() == 8);  // the storage is unchanged
    CHECK(u.layout_version() == 1);
    CHECK_THROWS_WITH(u.set_active_cols(9), Contains("fc.U") && Contains("[0, 8]") && Contains("got 9"));
    CHECK_THROWS_AS(u.set_active_cols(-1), lowrank::Error);
    // A new value makes every column active again.
    u.set_value(MatrixD::Ones(6, 4));
    CHECK(u.active_cols() == 4);
}

TEST_CASE("zero_grad and count_parameters act on a parameter list", "[core][parameter]") {
    Parameter<double> a("a", MatrixD::Ones(3, 4));
    Parameter<double> b("b", MatrixD::Ones(1, 4), /*trainable=*/false);
    Parameter<double> c("c", MatrixD::Ones(2, 5));
    c.set_active_cols(1);
    a.grad = MatrixD::Constant(3, 4, 2.0);
    const lowrank::ParameterList<double> list{&a, &b, &c};
    lowrank::zero_grad(list);
    CHECK(a.grad.isZero(0.0));
    CHECK(b.grad.size() == 0);
    CHECK(c.grad.rows() == 2);
    CHECK(c.grad.cols() == 5);
    CHECK(lowrank::count_parameters(list) == 12 + 4 + 2);
    CHECK(lowrank::count_parameters(list, /*trainable_only=*/true) == 12 + 2);
}

// --- initialisers ------------------------------------------------------------------------

TEST_CASE("init::orthogonal gives orthonormal columns (tall) or rows (wide) times scale", "[core][init]") {
    Rng rng(1);
    const double scale = GENERATE(1.0, 2.5);
    INFO("scale " << scale);
    SECTION("tall: columns") {
        MatrixD m(40, 7);
        lowrank::init::orthogonal<double>(m, rng, scale);
        CHECK((m.transpose() * m - scale * scale * MatrixD::Identity(7, 7)).cwiseAbs().maxCoeff() < 1e-10);
    }
    SECTION("wide: rows") {
        MatrixD m(6, 30);
        lowrank::init::orthogonal<double>(m, rng, scale);
        CHECK((m * m.transpose() - scale * scale * MatrixD::Identity(6, 6)).cwiseAbs().maxCoeff() < 1e-10);
    }
    SECTION("square: both") {
        MatrixD m(9, 9);
        lowrank::init::orthogonal<double>(m, rng, scale);
        const MatrixD target = scale * scale * MatrixD::Identity(9, 9);
        CHECK((m.transpose() * m - target).cwiseAbs().maxCoeff() < 1e-10);
        CHECK((m * m.transpose() - target).cwiseAbs().maxCoeff() < 1e-10);
    }
    SECTION("float, to float precision") {
        MatrixF m(20, 5);
        lowrank::init::orthogonal<float>(m, rng, scale);
        const MatrixD md = m.cast<double>();
        CHECK((md.transpose() * md - scale * scale * MatrixD::Identity(5, 5)).cwiseAbs().maxCoeff() < 1e-5);
    }
}

TEST_CASE("init::orthogonal is seeded, random and fine with empty matrices", "[core][init]") {
    Rng a(5), b(5), c(6);
    MatrixD ma(8, 3), mb(8, 3), mc(8, 3);
    lowrank::init::orthogonal<double>(ma, a);
    lowrank::init::orthogonal<double>(mb, b);
    lowrank::init::orthogonal<double>(mc, c);
    CHECK(ma == mb);
    CHECK(ma != mc);
    // Signs follow R's diagonal, so Q is Haar distributed rather than biased towards the
    // Gaussian matrix's orientation; over many draws entry (0, 0) averages near 0.
    double mean00 = 0;
    for (int i = 0; i < 400; ++i) {
        lowrank::init::orthogonal<double>(ma, a);
        mean00 += ma(0, 0) / 400.0;
    }
    CHECK(std::abs(mean00) < 0.06);  // std of one entry ~ 1/sqrt(8), of the mean ~ 0.018

    MatrixD empty(0, 4);
    lowrank::init::orthogonal<double>(empty, a);
    CHECK(empty.size() == 0);
}

TEST_CASE("uniform, kaiming and linear_default initialisers respect their bounds", "[core][init]") {
    Rng rng(2);
    MatrixD m(200, 400);

    lowrank::init::uniform<double>(m, rng, -0.25, 0.75);
    CHECK(m.minCoeff() >= -0.25);
    CHECK(m.maxCoeff() < 0.75);
    CHECK(m.mean() == Approx(0.25).margin(0.01));

    lowrank::init::kaiming_uniform<double>(m, rng);
    const double kb = std::sqrt(6.0 / 400.0);
    CHECK(m.cwiseAbs().maxCoeff() <= kb);
    CHECK(m.cwiseAbs().maxCoeff() > 0.99 * kb);
    // Var of U(-b, b) = b^2 / 3 = 2 / fan_in: Kaiming's variance for a ReLU layer.
    CHECK(m.array().square().mean() == Approx(2.0 / 400.0).epsilon(0.02));

    lowrank::init::kaiming_normal<double>(m, rng);
    CHECK(m.array().square().mean() == Approx(2.0 / 400.0).epsilon(0.02));
    CHECK(std::abs(m.mean()) < 0.001);

    lowrank::init::normal<double>(m, rng, 3.0, 0.5);
    CHECK(m.mean() == Approx(3.0).margin(0.01));
    CHECK((m.array() - m.mean()).square().mean() == Approx(0.25).epsilon(0.02));

    lowrank::init::linear_default<double>(m, rng, 25);
    CHECK(m.cwiseAbs().maxCoeff() <= 0.2);
    CHECK(m.cwiseAbs().maxCoeff() > 0.19);

    MatrixF f(10, 10);
    lowrank::init::kaiming_uniform<float>(f, rng);
    CHECK(f.cwiseAbs().maxCoeff() <= static_cast<float>(std::sqrt(0.6)));
}

TEST_CASE("initialisers reject bad arguments with a message naming them", "[core][init]") {
    Rng rng(3);
    MatrixD m(3, 3);
    CHECK_THROWS_WITH(lowrank::init::uniform<double>(m, rng, 2.0, 1.0),
                      Contains("init::uniform") && Contains("lo = 2") && Contains("hi = 1"));
    MatrixD no_fan_in(3, 0);
    CHECK_THROWS_WITH(lowrank::init::kaiming_uniform<double>(no_fan_in, rng),
                      Contains("init::kaiming_uniform") && Contains("got 0"));
    CHECK_THROWS_WITH(lowrank::init::kaiming_normal<double>(no_fan_in, rng),
                      Contains("init::kaiming_normal") && Contains("got 0"));
    CHECK_THROWS_WITH(lowrank::init::linear_default<double>(m, rng, -4),
                      Contains("init::linear_default") && Contains("got -4"));
}

// --- errors --------------------------------------------------------------------------------

TEST_CASE("check and check_shape name the thing, the expected and the actual value", "[core][error]") {
    CHECK_NOTHROW(lowrank::check(true, "never", "thrown"));
    try {
        lowrank::check(1 + 1 == 3, "Trainer", "expected ", 3, " epochs, got ", 2.5);
        FAIL("check did not throw");
    } catch (const lowrank::Error& e) {
        CHECK(std::string(e.what()) == "Trainer: expected 3 epochs, got 2.5");
    }

    const MatrixD m(2, 3);
    CHECK_NOTHROW(lowrank::check_shape(m, 2, 3, "fine"));
    try {
        lowrank::check_shape(m, 4, 5, "h.0.attn.weight");
        FAIL("check_shape did not throw");
    } catch (const lowrank::Error& e) {
        CHECK(std::string(e.what()) == "h.0.attn.weight: expected shape (4 x 5), got (2 x 3)");
    }
    CHECK_THROWS_AS(lowrank::check_shape(m.transpose(), 2, 3, "t"), lowrank::Error);

    CHECK(lowrank::shape_string(7, 0) == "(7 x 0)");
    CHECK(lowrank::shape_string(m) == "(2 x 3)");
}

TEST_CASE("FormatError is an Error is a runtime_error", "[core][error]") {
    CHECK_THROWS_AS(throw lowrank::FormatError("bad file"), lowrank::Error);
    CHECK_THROWS_AS(throw lowrank::Error("bad"), std::runtime_error);
    CHECK_THROWS_WITH(throw lowrank::FormatError("model.safetensors: truncated header"),
                      "model.safetensors: truncated header");
}

}  // namespace test_parameter_init
