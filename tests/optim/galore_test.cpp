// Gradient projection (GaLore) in Adam and AdamW: the identities that define it, the shape
// and size of its state, when the basis is refreshed, what a reset does, the refusals, and
// a checkpoint round trip. The bases here are given by the test (any orthonormal P); the
// GaLore policy, which takes them from the gradient's SVD, is tested in
// tests/policy/test_galore.cpp.
#include <lowrank/io/checkpoint.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/optim/sgd.hpp>
#include <lowrank/policy/galore.hpp>

#include "../test_support.hpp"
#include "optim_test_support.hpp"

#include <Eigen/QR>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_galore_optim {

using namespace lowrank;
using Catch::Matchers::Contains;
using lowrank::test::make_param;
using lowrank::test::set_grad;

namespace {

// An (n x r) matrix with orthonormal columns, from its own seed.
MatrixD orthonormal(Index n, Index r, std::uint64_t seed) {
    Rng rng(seed);
    Eigen::MatrixXd a(n, r);
    for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < r; ++j) a(i, j) = rng.normal();
    Eigen::HouseholderQR<Eigen::MatrixXd> qr(a);
    return MatrixD(qr.householderQ() * Eigen::MatrixXd::Identity(n, r));
}

MatrixD target_of(Index m, Index n) {
    MatrixD t(m, n);
    for (Index i = 0; i < m; ++i)
        for (Index j = 0; j < n; ++j) t(i, j) = std::cos(0.3 * static_cast<double>(i) + 0.7 * static_cast<double>(j));
    return t;
}

template <class Opt>
std::unique_ptr<Optimizer<double>> make(ParameterList<double> params, AdamOptions o) {
    return std::make_unique<Opt>(std::move(params), o);
}

}  // namespace

TEST_CASE("a projection at full rank with a fixed basis is Adam on the rotated weight",
          "[optim][galore]") {
    // With P square orthogonal (r = min(m, n)) and never refreshed, W = P·W' (left) or
    // W'·Pᵀ (right) for W' = PᵀW (or W·P), and the gradient of W' is PᵀG (or G·P): GaLore's
    // step on W is the plain optimizer's step on W', scaled. Decoupled decay (1 - lr·wd)
    // and a step lr·α are AdamW on W' with lr' = lr·α and wd' = wd/α; Adam's L2 term λ·W
    // projects to λ·W', so Adam with lr' = lr·α and the same λ.
    const bool decoupled = GENERATE(true, false);
    const bool left = GENERATE(true, false);
    INFO((decoupled ? "AdamW" : "Adam") << ", " << (left ? "left (m < n)" : "right (m >= n)"));
    const Index m = left ? 4 : 7, n = left ? 7 : 4, r = std::min(m, n);
    const double lr = 0.05, wd = 0.1, alpha = 0.5;
    const MatrixD target = target_of(m, n);
    const MatrixD P = orthonormal(left ? m : n, r, 5);

    auto w = make_param<double>("w", m, n);
    Parameter<double> rotated("w'", left ? MatrixD(P.transpose() * w.value) : MatrixD(w.value * P));
    rotated.zero_grad();
    const AdamOptions o{.lr = lr, .weight_decay = wd};
    const AdamOptions ref_o{.lr = lr * alpha, .weight_decay = decoupled ? wd / alpha : wd};
    auto opt = decoupled ? make<AdamW<double>>({&w}, o) : make<Adam<double>>({&w}, o);
    auto ref = decoupled ? make<AdamW<double>>({&rotated}, ref_o) : make<Adam<double>>({&rotated}, ref_o);
    opt->set_projection(w, {.rank = r, .gap = 1000, .scale = alpha,
                            .side = left ? ProjectionSide::left : ProjectionSide::right});
    for (int t = 0; t < 25; ++t) {
        w.grad = w.value - target;
        const MatrixD full = left ? MatrixD(P * rotated.value) : MatrixD(rotated.value * P.transpose());
        rotated.grad = left ? MatrixD(P.transpose() * (full - target)) : MatrixD((full - target) * P);
        if (t == 0) opt->set_projector(w, P);
        opt->step();
        ref->step();
    }
    const MatrixD expect = left ? MatrixD(P * rotated.value) : MatrixD(rotated.value * P.transpose());
    CHECK(lowrank::test::close<double>(w.value, expect, 1e-12));
    CHECK_FALSE(lowrank::test::close<double>(w.value, make_param<double>("w0", m, n).value, 1e-3));  // it moved
}

TEST_CASE("a projected weight keeps moments of r x max(m, n) and its basis", "[optim][galore]") {
    CHECK(projection_side_for(3, 4) == ProjectionSide::left);
    CHECK(projection_side_for(4, 4) == ProjectionSide::right);  // square: right, as the authors'
    CHECK(projection_side_for(5, 4) == ProjectionSide::right);
    const bool left = GENERATE(true, false);
    const Index m = left ? 6 : 11, n = left ? 11 : 6, r = 2;
    auto w = make_param<double>("w", m, n);
    auto b = make_param<double>("b", 1, m);
    AdamW<double> opt({&w, &b}, {.lr = 0.01});
    opt.set_projection(w, {.rank = r, .gap = 5, .side = projection_side_for(m, n)});
    CHECK((opt.moment_shape(w) == (left ? std::pair<Index, Index>{r, n} : std::pair<Index, Index>{m, r})));
    CHECK((opt.projector_shape(w) == std::pair<Index, Index>{6, r}));
    CHECK((opt.moment_shape(b) == std::pair<Index, Index>{1, m}));
    set_grad(w, 0);
    set_grad(b, 0);
    opt.set_projector(w, orthonormal(6, r, 9));
    opt.step();
    const auto* s = opt.state_of(w);
    REQUIRE(s != nullptr);
    CHECK(s->exp_avg.rows() == opt.moment_shape(w).first);
    CHECK(s->exp_avg.cols() == opt.moment_shape(w).second);
    CHECK(s->exp_avg_sq.size() == s->exp_avg.size());
    CHECK(s->projector.rows() == 6);
    CHECK(s->projector.cols() == r);
    // The formula, and the byte count: the projected weight's state plus the bias's 2·m.
    CHECK(galore_state_count(m, n, r) == 2 * r * 11 + 6 * r);
    CHECK(opt.state_bytes() ==
          static_cast<std::size_t>(galore_state_count(m, n, r) + 2 * m) * sizeof(double));
    CHECK(static_cast<std::int64_t>(opt.state_bytes()) < 2 * (m * n + m) * static_cast<std::int64_t>(sizeof(double)));
}

TEST_CASE("the basis is taken exactly every gap steps and kept in between", "[optim][galore]") {
    auto w = make_param<double>("w", 5, 8);
    AdamW<double> opt({&w}, {.lr = 0.01});
    opt.set_projection(w, {.rank = 3, .gap = 3});
    std::vector<int> refreshed;
    MatrixD last;
    for (int t = 0; t < 10; ++t) {
        set_grad(w, t);
        if (opt.projection_refresh_due(w)) {
            refreshed.push_back(t + 1);  // the step about to be taken, counted from 1
            last = orthonormal(5, 3, 100 + static_cast<std::uint64_t>(t));
            opt.set_projector(w, last);
        } else {
            CHECK_THROWS_WITH(opt.set_projector(w, orthonormal(5, 3, 1)), Contains("not a refresh"));
        }
        opt.step();
        CHECK(opt.state_of(w)->projector == last);  // bit for bit: the given basis, until the next
    }
    CHECK(refreshed == std::vector<int>{1, 4, 7, 10});
}

TEST_CASE("a step at a refresh without a basis is refused before any parameter moves",
          "[optim][galore]") {
    auto a = make_param<double>("a", 3, 3);
    auto w = make_param<double>("w", 4, 6);
    AdamW<double> opt({&a, &w}, {.lr = 0.01});
    opt.set_projection(w, {.rank = 2, .gap = 2});
    set_grad(a, 0);
    set_grad(w, 0);
    const MatrixD before = a.value;
    CHECK_THROWS_WITH(opt.step(), Contains("'w'") && Contains("no basis was given"));
    CHECK(a.value == before);
}

TEST_CASE("a projected update lies in the span of the basis", "[optim][galore]") {
    const bool left = GENERATE(true, false);
    const Index m = left ? 5 : 9, n = left ? 9 : 5, r = 2;
    auto w = make_param<double>("w", m, n);
    Adam<double> opt({&w}, {.lr = 0.02});
    opt.set_projection(w, {.rank = r, .gap = 4, .side = projection_side_for(m, n)});
    for (int t = 0; t < 6; ++t) {
        set_grad(w, t);
        if (opt.projection_refresh_due(w)) opt.set_projector(w, orthonormal(5, r, 40 + static_cast<std::uint64_t>(t)));
        const MatrixD before = w.value;
        opt.step();
        const MatrixD& P = opt.state_of(w)->projector;
        const MatrixD delta = w.value - before;
        const MatrixD outside = left ? MatrixD(delta - P * (P.transpose() * delta))
                                     : MatrixD(delta - (delta * P) * P.transpose());
        INFO("step " << t + 1);
        CHECK(delta.norm() > 1e-4);
        CHECK(outside.norm() < 1e-14 * (1.0 + delta.norm()));
    }
}

TEST_CASE("the moments are kept across a refresh, or reset with reset_moments", "[optim][galore]") {
    const bool reset = GENERATE(false, true);
    INFO("reset_moments " << reset);
    const double beta1 = 0.9, beta2 = 0.999, lr = 0.01, eps = 1e-8;
    auto w = make_param<double>("w", 4, 6);
    AdamW<double> opt({&w}, {.lr = lr, .beta1 = beta1, .beta2 = beta2, .eps = eps});
    opt.set_projection(w, {.rank = 2, .gap = 2, .scale = 1.0, .reset_moments = reset});
    MatrixD m_prev, v_prev;
    for (int t = 0; t < 3; ++t) {
        set_grad(w, t);
        if (opt.projection_refresh_due(w)) opt.set_projector(w, orthonormal(4, 2, 70 + static_cast<std::uint64_t>(t)));
        if (t == 2) {
            m_prev = opt.state_of(w)->exp_avg;
            v_prev = opt.state_of(w)->exp_avg_sq;
        }
        const MatrixD before = w.value;
        opt.step();
        if (t != 2) continue;
        // Step 3 refreshes the basis (gap 2).
        const MatrixD& P = opt.state_of(w)->projector;
        const MatrixD R = P.transpose() * w.grad;
        const MatrixD m = reset ? MatrixD((1 - beta1) * R) : MatrixD(beta1 * m_prev + (1 - beta1) * R);
        const MatrixD v = reset ? MatrixD((1 - beta2) * R.cwiseProduct(R))
                                : MatrixD(beta2 * v_prev + (1 - beta2) * R.cwiseProduct(R));
        CHECK(lowrank::test::close<double>(opt.state_of(w)->exp_avg, m, 1e-14));
        CHECK(lowrank::test::close<double>(opt.state_of(w)->exp_avg_sq, v, 1e-14));
        // Bias correction restarts with the moments: t = 1 after a reset, 3 without.
        const double k = reset ? 1.0 : 3.0;
        const MatrixD N = (m / (1 - std::pow(beta1, k))).array() /
                          ((v / (1 - std::pow(beta2, k))).array().sqrt() + eps);
        CHECK(lowrank::test::close<double>(w.value, MatrixD(before - lr * P * N), 1e-13));
    }
}

TEST_CASE("projection options and misuse are refused with clear errors", "[optim][galore]") {
    auto w = make_param<double>("w", 4, 6);
    SECTION("an optimizer that cannot project") {
        Sgd<double> sgd({&w}, {.lr = 0.1});
        CHECK_FALSE(sgd.supports_projection());
        CHECK_THROWS_WITH(sgd.set_projection(w, {.rank = 2}), Contains("Sgd cannot step a projected gradient"));
    }
    AdamW<double> opt({&w}, {.lr = 0.01});
    SECTION("rank, gap and scale") {
        CHECK_THROWS_WITH(opt.set_projection(w, {.rank = 0}), Contains("rank in [1, min(m, n)] = [1, 4]"));
        CHECK_THROWS_WITH(opt.set_projection(w, {.rank = 5}), Contains("got 5"));
        CHECK_THROWS_WITH(opt.set_projection(w, {.rank = 2, .gap = 0}), Contains("gap >= 1, got 0"));
        CHECK_THROWS_WITH(opt.set_projection(w, {.rank = 2, .scale = 0.0}), Contains("scale > 0"));
    }
    SECTION("a frozen weight, a weight in no group, a weight with state") {
        auto other = make_param<double>("other", 4, 6);
        CHECK_THROWS_WITH(opt.set_projection(other, {.rank = 2}), Contains("'other' is in no group"));
        w.trainable = false;
        CHECK_THROWS_WITH(opt.set_projection(w, {.rank = 2}), Contains("frozen"));
        w.trainable = true;
        set_grad(w, 0);
        opt.step();
        CHECK_THROWS_WITH(opt.set_projection(w, {.rank = 2}), Contains("already has optimizer state"));
    }
    SECTION("a basis of the wrong shape, and a projected weight whose shape changes") {
        opt.set_projection(w, {.rank = 2});
        CHECK_THROWS_WITH(opt.set_projector(w, orthonormal(6, 2, 1)), Contains("'w'"));
        auto plain = make_param<double>("plain", 3, 3);
        opt.add_to_group(0, {&plain});
        CHECK_THROWS_WITH(opt.set_projector(plain, orthonormal(3, 2, 1)), Contains("no projected gradient"));
        set_grad(w, 0);
        opt.set_projector(w, orthonormal(4, 2, 1));
        opt.step();
        CHECK_THROWS_WITH(opt.carry_state(w, StateCarry::reset_all()), Contains("projected gradient (GaLore)"));
        w.set_value(MatrixD::Zero(4, 5));
        set_grad(w, 1);
        CHECK_THROWS_WITH(opt.step(), Contains("'w'") && Contains("must not be managed by a rank policy"));
    }
}

TEST_CASE("a checkpoint restores a projected weight's moments and basis", "[optim][galore][checkpoint]") {
    const lowrank::test::TempDir dir;
    const std::string path = (dir / "ckpt.safetensors").string();
    const bool reset = GENERATE(false, true);
    INFO("reset_moments " << reset);
    const auto build = [reset](Parameter<double>& w, Parameter<double>& b) {
        auto opt = std::make_unique<AdamW<double>>(ParameterList<double>{&w, &b}, AdamOptions{.lr = 0.01});
        opt->set_projection(w, {.rank = 2, .gap = 3, .side = ProjectionSide::right, .reset_moments = reset});
        return opt;
    };
    auto w = make_param<double>("w", 7, 4);
    auto b = make_param<double>("b", 1, 7);
    auto opt = build(w, b);
    const auto train = [](Optimizer<double>& o, Parameter<double>& w, Parameter<double>& b, int from, int to) {
        for (int t = from; t < to; ++t) {
            set_grad(w, t);
            set_grad(b, t);
            if (o.projection_refresh_due(w)) o.set_projector(w, orthonormal(4, 2, 200 + static_cast<std::uint64_t>(t)));
            o.step();
        }
    };
    train(*opt, w, b, 0, 4);
    save_checkpoint(path, ParameterList<double>{&w, &b}, opt.get(), 4, nlohmann::json::object());

    auto w2 = make_param<double>("w", 7, 4);
    auto b2 = make_param<double>("b", 1, 7);
    auto opt2 = build(w2, b2);
    load_checkpoint(path, ParameterList<double>{&w2, &b2}, opt2.get());
    CHECK(opt2->state_of(w2)->projector == opt->state_of(w)->projector);
    CHECK(opt2->state_of(w2)->exp_avg == opt->state_of(w)->exp_avg);
    CHECK(opt2->state_of(w2)->step == 4);
    train(*opt, w, b, 4, 9);
    train(*opt2, w2, b2, 4, 9);
    CHECK(w2.value == w.value);  // bit for bit
    CHECK(b2.value == b.value);

    SECTION("into an optimizer that does not project the weight") {
        auto w3 = make_param<double>("w", 7, 4);
        auto b3 = make_param<double>("b", 1, 7);
        AdamW<double> plain({&w3, &b3}, {.lr = 0.01});
        CHECK_THROWS_WITH(load_checkpoint(path, ParameterList<double>{&w3, &b3}, &plain),
                          Contains("'w'") && Contains("exp_avg has shape [7, 2], expected [7, 4]"));
    }
}

}  // namespace test_galore_optim
