// The SST policy: the sampler, the conversion, the optimizer bookkeeping of a column swap,
// clamping and renormalisation, the re-SVD at a round end, the enhanced gradient, a small
// training run, and option errors; top-r and sequential sampling, sigma alone, the re-warm
// of the spectral group alone, and pruning; the random initialisation (the SVD ablation).
#include <catch2/catch.hpp>

#include "../test_support.hpp"

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/optim/sgd.hpp>
#include <lowrank/policy/sst.hpp>
#include <lowrank/train/run.hpp>

#include "policy_test_support.hpp"

#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <memory>
#include <set>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_sst {

using namespace lowrank;
using lowrank::test::gaussian;
using lowrank::test::Probe;
using Access = lowrank::detail::TrainingContextAccess;

namespace {

// An Mlp with AdamW (decay on weights, none on biases) and the TrainingRun that steps it
// (constant schedule, no clipping).
struct Fixture {
    Rng rng;
    Mlp<double> model;
    std::unique_ptr<Optimizer<double>> opt;
    std::unique_ptr<TrainingRun<double>> run;

    explicit Fixture(std::vector<Index> sizes, std::uint64_t seed = 3, double lr = 1e-2)
        : rng(seed), model(MlpOptions{.sizes = std::move(sizes)}, rng) {
        ParameterList<double> weights, biases;
        for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
        opt = std::make_unique<AdamW<double>>(weights, AdamOptions{.lr = lr, .weight_decay = 0.01});
        opt->add_group(biases, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
        run = std::make_unique<TrainingRun<double>>(model, *opt);
    }

    TrainingContext<double>& ctx() { return run->context(); }
    const LrSchedule& schedule() const { return run->schedule(); }
    const RankLog& log() const { return run->rank_log(); }

    MatrixD output(const MatrixD& x) {
        Graph<double> g;
        return model.forward(g, g.input(x)).value();
    }

    // One training step of the run; returns the loss before the step.
    double step(const MatrixD& x, const std::vector<std::int32_t>& y) {
        return run->step([&](Graph<double>& g) { return cross_entropy(g, model.forward(g, g.input(x)), y); })
            .loss;
    }
};

// Labels from a fixed random linear teacher: a task the MLP can learn.
std::vector<std::int32_t> teacher_labels(const MatrixD& x, Index classes, std::uint64_t seed) {
    const MatrixD w = gaussian(x.cols(), classes, seed);
    const MatrixD scores = x * w;
    std::vector<std::int32_t> y(static_cast<std::size_t>(x.rows()));
    for (Index i = 0; i < x.rows(); ++i) {
        Index best = 0;
        scores.row(i).maxCoeff(&best);
        y[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(best);
    }
    return y;
}

int count_events(const RankLog& log, const std::string& event) {
    int n = 0;
    for (const auto& e : log.events()) n += e.event == event;
    return n;
}

}  // namespace

TEST_CASE("sst_probabilities gives each scheme's p", "[policy][sst]") {
    const MatrixD sigma{{4.0, 3.0, 2.0, 1.0, 0.0}};
    const auto ps = sst_probabilities<double>(sigma, SstSampling::sigma);
    const auto pm = sst_probabilities<double>(sigma, SstSampling::mixed);
    const auto pu = sst_probabilities<double>(sigma, SstSampling::uniform);
    for (std::size_t i = 0; i < 5; ++i) {
        CHECK(ps[i] == Approx(sigma(0, static_cast<Index>(i)) / 10.0));
        CHECK(pm[i] == Approx(0.5 * (0.2 + sigma(0, static_cast<Index>(i)) / 10.0)));
        CHECK(pu[i] == Approx(0.2));
    }
    CHECK(ps[4] == 0.0);
    CHECK(pm[4] == Approx(0.1));  // the mix never starves a zero singular value
    // Negative entries count as zero; an all-zero sigma falls back to uniform.
    const auto neg = sst_probabilities<double>(MatrixD{{-1.0, 1.0}}, SstSampling::sigma);
    CHECK(neg == std::vector<double>{0.0, 1.0});
    const auto zero = sst_probabilities<double>(MatrixD::Zero(1, 4), SstSampling::sigma);
    for (const double p : zero) CHECK(p == Approx(0.25));
}

TEST_CASE("sst_sample draws r distinct positions, zero weights only when nothing else is left", "[policy][sst]") {
    Rng rng(7);
    const std::vector<double> w{0.0, 5.0, 0.0, 1.0, 2.0, 0.0, 3.0};
    for (int trial = 0; trial < 200; ++trial) {
        const auto s = sst_sample(w, 4, rng);
        REQUIRE(s.size() == 4);
        // Four positive weights and r = 4: exactly those are drawn.
        CHECK(std::set<Index>(s.begin(), s.end()) == std::set<Index>{1, 3, 4, 6});
        const auto all = sst_sample(w, 7, rng);
        CHECK(std::set<Index>(all.begin(), all.end()).size() == 7);
    }
    CHECK(sst_sample(w, 0, rng).empty());
    CHECK_THROWS_WITH(sst_sample(w, 8, rng), Catch::Contains("sst_sample") && Catch::Contains("got r = 8"));
    const std::vector<double> bad{1.0, -1.0};
    CHECK_THROWS_WITH(sst_sample(bad, 1, rng), Catch::Contains("finite and >= 0") && Catch::Contains("position 1"));
}

TEST_CASE("sst_sample frequencies follow p for each scheme", "[policy][sst]") {
    // d = 5, r = 2. Successive draws renormalised: P(i then j) = p_i p_j / (1 - p_i), so the
    // chance that i is in the set is p_i + sum_{j != i} p_j p_i / (1 - p_j).
    const MatrixD sigma{{4.0, 3.0, 2.0, 1.0, 0.0}};
    constexpr int draws = 20000;
    for (const auto scheme : {SstSampling::sigma, SstSampling::mixed, SstSampling::uniform}) {
        INFO("scheme " << to_string(scheme));
        const auto p = sst_probabilities<double>(sigma, scheme);
        std::vector<double> included(5, 0.0);
        for (std::size_t i = 0; i < 5; ++i) {
            included[i] = p[i];
            for (std::size_t j = 0; j < 5; ++j)
                if (j != i) included[i] += p[j] * p[i] / (1.0 - p[j]);
        }
        Rng rng(100 + static_cast<std::uint64_t>(scheme));
        std::vector<int> first(5, 0), in_set(5, 0);
        for (int t = 0; t < draws; ++t) {
            const auto s = sst_sample(p, 2, rng);
            REQUIRE(s[0] != s[1]);
            ++first[static_cast<std::size_t>(s[0])];
            for (const Index k : s) ++in_set[static_cast<std::size_t>(k)];
        }
        for (std::size_t i = 0; i < 5; ++i) {
            INFO("position " << i);
            // Each count is binomial: allow 5 standard deviations.
            const auto tolerance = [&](double q) { return 5.0 * std::sqrt(q * (1.0 - q) / draws) + 1e-12; };
            CHECK(std::abs(first[i] / double(draws) - p[i]) <= tolerance(p[i]));
            CHECK(std::abs(in_set[i] / double(draws) - included[i]) <= tolerance(included[i]));
        }
        if (scheme == SstSampling::sigma) CHECK(in_set[4] == 0);
    }
}

TEST_CASE("Sst converts the selected layers without changing the network", "[policy][sst]") {
    Fixture f({6, 10, 8, 3});
    const MatrixD x = gaussian(5, 6, 1);
    const MatrixD before = f.output(x);
    auto& sst = f.run->add<Sst<double>>({.rank = 3});
    f.run->begin();
    CHECK((f.output(x) - before).norm() < 1e-12);
    REQUIRE(sst.num_layers() == 2);
    CHECK(std::string(f.model.layers()[0].kind()) == "spectral");
    CHECK(std::string(f.model.layers()[1].kind()) == "spectral");
    CHECK(std::string(f.model.layers()[2].kind()) == "dense");  // the output layer is not selected
    CHECK(sst.layer(0).active_rank() == 3);
    CHECK(sst.layer(0).options().enhanced_gradient);
    // T2 = ceil(d / r): d = 6 -> 2, d = 8 -> 3.
    CHECK(sst.round_iterations(0) == 2);
    CHECK(sst.round_iterations(1) == 3);
    // The new parameters are in the optimizer, the bias still in its no-decay group.
    CHECK(f.opt->group_of(sst.layer(0).sigma) == 0);
    CHECK(f.opt->group_of(sst.layer(0).bias) == 1);
    REQUIRE(f.log().size() == 2);
    const auto& e = f.log().events()[0];
    CHECK(e.policy == "sst");
    CHECK(e.event == "init");
    CHECK(e.layer == "layers.0");
    CHECK(e.new_rank == 6);
    // (r (m + n) + d + m) / (m n + m) = (3 * 16 + 6 + 10) / 70.
    CHECK(e.value == Approx(64.0 / 70.0));
}

TEST_CASE("Sst puts U, V and sigma in the group it is given, the bias in its own", "[policy][sst]") {
    Fixture f({6, 10, 3});
    f.opt->add_group({}, GroupOptions{.lr = 1e-3, .name = "spectral"});
    CHECK_THROWS_WITH(Sst<double>({.rank = 2, .group = 3}).on_train_begin(f.ctx()),
                      Catch::Contains("group must be < 3") && Catch::Contains("got 3"));
    CHECK(std::string(f.model.layers()[0].kind()) == "dense");
    Sst<double> sst({.rank = 2, .group = 2});
    sst.on_train_begin(f.ctx());
    auto& l = sst.layer(0);
    CHECK(f.opt->group_of(l.U_active) == 2);
    CHECK(f.opt->group_of(l.V_active) == 2);
    CHECK(f.opt->group_of(l.sigma) == 2);
    CHECK(f.opt->group_of(l.bias) == 1);
}

TEST_CASE("Sst rejects bad options with messages that name them", "[policy][sst][errors]") {
    CHECK_THROWS_WITH(Sst<double>({.rank = 0}), Catch::Contains("Sst") && Catch::Contains("rank (r) must be >= 1, got 0"));
    CHECK_THROWS_WITH(Sst<double>({.iteration_steps = 0}),
                      Catch::Contains("iteration_steps (T3) must be >= 1, got 0"));
    CHECK_THROWS_WITH(Sst<double>({.round_iterations = -1}), Catch::Contains("round_iterations (T2)"));
    CHECK_THROWS_WITH(Sst<double>({.iteration_steps = 10, .rewarm_steps = 11}),
                      Catch::Contains("rewarm_steps must be in [0, iteration_steps = 10], got 11"));
    CHECK_THROWS_WITH(Sst<double>({.sampling = static_cast<SstSampling>(7)}), Catch::Contains("sampling"));

    // r > d for the second hidden layer (4 x 10): an error, and no layer was converted.
    Fixture f({6, 10, 4, 3});
    Sst<double> sst({.rank = 5});
    CHECK_THROWS_WITH(sst.on_train_begin(f.ctx()), Catch::Contains("rank (r) must be <= min(out, in) = 4") &&
                                                      Catch::Contains("'layers.1'") && Catch::Contains("got 5"));
    CHECK(std::string(f.model.layers()[0].kind()) == "dense");
    CHECK(f.log().empty());
}

TEST_CASE("Sst at an iteration start resets only the swapped columns and moves sigma's state with it", "[policy][sst]") {
    Fixture f({10, 12, 3});
    const MatrixD x = gaussian(16, 10, 2);
    const auto y = teacher_labels(x, 3, 3);
    auto& sst = f.run->add<Sst<double>>(
        {.rank = 5, .iteration_steps = 3, .round_iterations = 100, .rewarm_steps = 2, .seed = 9});
    f.run->begin();
    auto& l = sst.layer(0);
    for (int i = 0; i < 3; ++i) f.step(x, y);  // state exists; the next step starts an iteration

    int kept = 0, reset = 0;
    for (int iteration = 0; iteration < 4; ++iteration) {
        REQUIRE(f.ctx().step() % 3 == 0);
        const MatrixD u = l.U_active.value, s = l.sigma.value;
        const auto su = *f.opt->state_of(l.U_active);
        const auto sv = *f.opt->state_of(l.V_active);
        const auto ss = *f.opt->state_of(l.sigma);
        const MatrixD out = f.output(x);
        // The sampling alone (the run's next step calls it again: a no-op within a step).
        sst.before_forward(f.ctx());
        CHECK((f.output(x) - out).norm() < 1e-12);  // sampling is a relabelling only
        const auto* nu = f.opt->state_of(l.U_active);
        const auto* nv = f.opt->state_of(l.V_active);
        const auto* ns = f.opt->state_of(l.sigma);
        for (Index j = 0; j < 5; ++j) {
            if (l.U_active.value.col(j) == u.col(j)) {
                ++kept;
                CHECK(nu->exp_avg.col(j) == su.exp_avg.col(j));
                CHECK(nu->exp_avg_sq.col(j) == su.exp_avg_sq.col(j));
                CHECK(nv->exp_avg.col(j) == sv.exp_avg.col(j));
                CHECK(nu->exp_avg.col(j).norm() > 0.0);
            } else {
                ++reset;
                CHECK(nu->exp_avg.col(j).norm() == 0.0);
                CHECK(nu->exp_avg_sq.col(j).norm() == 0.0);
                CHECK(nv->exp_avg.col(j).norm() == 0.0);
                CHECK(nv->exp_avg_sq.col(j).norm() == 0.0);
            }
        }
        CHECK(nu->step == su.step);  // a partial reset keeps the step count
        // Each singular value keeps its moments wherever it now sits (values are distinct).
        for (Index k = 0; k < l.full_rank(); ++k) {
            Index from = -1;
            for (Index q = 0; q < s.cols(); ++q)
                if (s(0, q) == l.sigma.value(0, k)) from = q;
            REQUIRE(from >= 0);
            CHECK(ns->exp_avg(0, k) == ss.exp_avg(0, from));
            CHECK(ns->exp_avg_sq(0, k) == ss.exp_avg_sq(0, from));
        }
        // The LR re-warms from this step on.
        CHECK(f.schedule().factor(f.ctx().step()) == Approx(0.5));
        // The optimizer accepts the new layout.
        for (int i = 0; i < 3; ++i) CHECK_NOTHROW(f.step(x, y));
    }
    CHECK(kept > 0);
    CHECK(reset > 0);
    CHECK(count_events(f.log(), "sample") == 5);
    for (const auto& e : f.log().events())
        if (e.event == "sample") {
            CHECK(e.statistic == "sigma_mass_active");
            CHECK(e.value > 0.0);
            CHECK(e.value < 1.0);
        }
}

TEST_CASE("A column swap without carry_state makes the optimizer refuse to step", "[policy][sst][errors]") {
    Fixture f({6, 6, 2});
    auto& sst = f.run->add<Sst<double>>({.rank = 2, .iteration_steps = 5, .rewarm_steps = 5});
    const MatrixD x = gaussian(4, 6, 4);
    const auto y = teacher_labels(x, 2, 5);
    f.step(x, y);
    auto& l = sst.layer(0);
    const Index a = l.active_rank();
    REQUIRE(!l.activate({a, a + 1}).empty());  // behind the policy's back
    // Step 1 starts no iteration, so nothing carries the state: the optimizer step throws.
    CHECK_THROWS_WITH(f.step(x, y), Catch::Contains("U_active") && Catch::Contains("without carry_state"));
}

TEST_CASE("Sst after a step: sigma is never negative and the active vectors have unit length", "[policy][sst]") {
    Fixture f({8, 8, 2});
    Sst<double> sst({.rank = 3, .iteration_steps = 10, .rewarm_steps = 0});
    sst.on_train_begin(f.ctx());
    auto& l = sst.layer(0);
    // A plain SGD step with a gradient that drives sigma below zero and U/V off the sphere.
    Sgd<double> sgd({&l.U_active, &l.V_active, &l.sigma}, SgdOptions{.lr = 1.0});
    l.sigma.grad = MatrixD::Constant(1, 8, 10.0);
    l.U_active.grad = gaussian(8, 3, 6);
    l.V_active.grad = gaussian(8, 3, 7);
    sgd.step();
    REQUIRE(l.sigma.value.minCoeff() < 0.0);
    REQUIRE(std::abs(l.U_active.value.col(0).norm() - 1.0) > 1e-3);
    // after_step after optimizer step 1 (no round ends there), called alone.
    Access::set_counters(f.ctx(), 1, 0);
    sst.after_step(f.ctx());
    CHECK(l.sigma.value.minCoeff() == 0.0);
    for (Index j = 0; j < 3; ++j) {
        CHECK(l.U_active.value.col(j).norm() == Approx(1.0).epsilon(1e-12));
        CHECK(l.V_active.value.col(j).norm() == Approx(1.0).epsilon(1e-12));
    }
}

TEST_CASE("Sst re-SVD at a round end keeps the function, restores orthonormality and resets all state", "[policy][sst]") {
    Fixture f({9, 7, 3}, 4, 5e-2);
    const MatrixD x = gaussian(12, 9, 8);
    const auto y = teacher_labels(x, 3, 9);
    // d = 7, r = 3: T2 = 3 iterations of 2 steps, so the round ends after step 6.
    // The probe's after_step runs between the sixth optimizer step and Sst's after_step, so
    // the function can be compared right before and after the re-SVD.
    auto& probe = f.run->add<Probe>();
    auto& sst = f.run->add<Sst<double>>({.rank = 3, .iteration_steps = 2, .rewarm_steps = 1, .seed = 1});
    f.run->begin();
    REQUIRE(sst.round_iterations(0) == 3);
    auto& l = sst.layer(0);
    for (int i = 0; i < 5; ++i) f.step(x, y);
    CHECK(count_events(f.log(), "resvd") == 0);

    MatrixD out;
    double drift = 0.0;
    probe.hooks.after_step = [&](TrainingContext<double>& ctx) {
        REQUIRE(ctx.step() == 6);
        l.clamp_sigma();  // what after_step does anyway; idempotent
        l.renormalize_active();
        out = f.output(x);
        drift = Sst<double>::orthogonality_error(l);
    };
    f.step(x, y);
    probe.hooks.after_step = {};
    REQUIRE(out.size() > 0);
    REQUIRE(drift > 1e-6);  // the round moved the factors off orthonormal

    CHECK((f.output(x) - out).norm() < 1e-10);
    CHECK(Sst<double>::orthogonality_error(l) < 1e-10);
    for (Index i = 1; i < l.full_rank(); ++i) CHECK(l.sigma.value(0, i - 1) >= l.sigma.value(0, i));
    for (Parameter<double>* p : {&l.U_active, &l.V_active, &l.sigma}) {
        const auto* s = f.opt->state_of(*p);
        REQUIRE(s != nullptr);
        CHECK(s->step == 0);
        CHECK(s->exp_avg.norm() == 0.0);
        CHECK(s->exp_avg_sq.norm() == 0.0);
    }
    CHECK(f.opt->state_of(l.bias)->step == 6);  // the bias is not touched
    REQUIRE(count_events(f.log(), "resvd") == 1);
    const auto& e = f.log().events().back();
    CHECK(e.event == "resvd");
    CHECK(e.step == 6);
    CHECK(e.statistic == "orthogonality_error");
    CHECK(e.value == Approx(drift));
    // Training goes on: the next iteration samples and steps.
    CHECK_NOTHROW(f.step(x, y));
}

TEST_CASE("Sst's enhanced_gradient option reaches the layer: U/V gradients without the sigma_i factor", "[policy][sst]") {
    const MatrixD x = gaussian(6, 7, 10);
    const auto y = teacher_labels(x, 2, 11);
    auto gradients = [&](bool enhanced) {
        Fixture f({7, 5, 2}, 12);
        auto& sst = f.run->add<Sst<double>>({.rank = 2, .enhanced_gradient = enhanced, .seed = 13});
        f.run->begin();
        sst.before_forward(f.ctx());  // the draw of step 0, alone
        auto& l = sst.layer(0);
        CHECK(l.options().enhanced_gradient == enhanced);
        Graph<double> g;
        f.opt->zero_grad();
        g.backward(cross_entropy(g, f.model.forward(g, g.input(x)), y));
        return std::tuple{MatrixD(l.U_active.grad), MatrixD(l.V_active.grad), MatrixD(l.sigma.grad),
                          MatrixD(l.sigma.value)};
    };
    const auto [u1, v1, s1, sigma] = gradients(true);
    const auto [u0, v0, s0, sigma0] = gradients(false);
    REQUIRE(sigma == sigma0);  // the same draw in both runs
    CHECK((s1 - s0).norm() < 1e-14);
    REQUIRE(u0.norm() > 0.0);
    double largest_difference = 0.0;
    for (Index j = 0; j < 2; ++j) {
        const double sj = sigma(0, j);
        CHECK((u1.col(j) * sj - u0.col(j)).norm() < 1e-12);
        CHECK((v1.col(j) * sj - v0.col(j)).norm() < 1e-12);
        largest_difference = std::max(largest_difference, (u1.col(j) - u0.col(j)).norm());
    }
    CHECK(largest_difference > 1e-3);  // the option made a difference
}

TEST_CASE("Sst trains a small MLP in double: the loss goes down", "[policy][sst]") {
    Fixture f({10, 16, 16, 3}, 21, 2e-2);
    const MatrixD x = gaussian(64, 10, 22);
    const auto y = teacher_labels(x, 3, 23);
    auto& sst = f.run->add<Sst<double>>({.rank = 4, .iteration_steps = 5, .rewarm_steps = 2, .seed = 24});
    std::vector<double> losses;
    for (int i = 0; i < 80; ++i) {
        losses.push_back(f.step(x, y));
        for (std::size_t k = 0; k < sst.num_layers(); ++k) REQUIRE(sst.layer(k).sigma.value.minCoeff() >= 0.0);
    }
    INFO("first loss " << losses.front() << ", last " << losses.back());
    CHECK(losses.back() < 0.5 * losses.front());
    CHECK(std::isfinite(losses.back()));
    // 16 iterations; T2 = ceil(10 / 4) = 3 for layer 0 and ceil(16 / 4) = 4 for layer 1.
    CHECK(count_events(f.log(), "sample") == 2 * 16);
    CHECK(count_events(f.log(), "resvd") == 5 + 4);
}


TEST_CASE("sst_top takes the largest sigma, sst_sequential the next r in order", "[policy][sst]") {
    MatrixD sigma(1, 5);
    sigma << 0.5, 3, 1, 3, 2;
    CHECK(sst_top<double>(sigma, 3) == std::vector<Index>{1, 3, 4});  // tie at 3: the lower position first
    CHECK(sst_top<double>(sigma, 0).empty());
    CHECK(sst_sequential(0, 3, 8) == std::vector<Index>{0, 1, 2});
    CHECK(sst_sequential(1, 3, 8) == std::vector<Index>{3, 4, 5});
    CHECK(sst_sequential(2, 3, 8) == std::vector<Index>{6, 7, 0});  // wraps around d
    CHECK_THROWS_WITH(sst_sequential(0, 9, 8), Catch::Contains("1 <= r <= d"));
}

namespace {

// Which of the columns of `reference` (unit vectors) each column of `u` is, up to sign.
std::set<Index> pairs_of(const MatrixD& u, const MatrixD& reference) {
    std::set<Index> out;
    for (Index c = 0; c < u.cols(); ++c) {
        Index best = 0;
        (reference.transpose() * u.col(c)).cwiseAbs().maxCoeff(&best);
        CHECK(std::abs(reference.col(best).dot(u.col(c))) == Approx(1.0).epsilon(1e-9));
        out.insert(best);
    }
    return out;
}

}  // namespace

TEST_CASE("Sst's sequential sampling cycles through the pairs in order, round after round", "[policy][sst]") {
    // d = 10, r = 3: T2 = 4 iterations of 2 steps; iteration j activates pairs 3j .. 3j + 2
    // (mod 10) of the SVD's order, whatever positions the swaps have moved them to.
    Fixture f({10, 12, 3});
    const MatrixD x = gaussian(16, 10, 2);
    const auto y = teacher_labels(x, 3, 3);
    auto& sst = f.run->add<Sst<double>>(
        {.rank = 3, .sampling = SstSampling::sequential, .iteration_steps = 2, .rewarm_steps = 1});
    f.run->begin();
    f.opt->set_group_lr(0, 0.0);  // the vectors stay put: each can be recognised
    f.opt->set_group_lr(1, 0.0);
    REQUIRE(sst.round_iterations(0) == 4);
    const MatrixD reference = sst.layer(0).full_u();
    for (int iteration = 0; iteration < 6; ++iteration) {
        INFO("iteration " << iteration);
        sst.before_forward(f.ctx());
        const Index j = iteration % 4;
        std::set<Index> expected;
        for (Index t = 0; t < 3; ++t) expected.insert((3 * j + t) % 10);
        CHECK(pairs_of(sst.layer(0).U_active.value, reference) == expected);
        f.step(x, y);
        f.step(x, y);
    }
    CHECK(count_events(f.log(), "resvd") == 1);  // after iteration 3; the order restarts
}

TEST_CASE("Sst's top sampling is deterministic, multinomial sampling follows the seed", "[policy][sst]") {
    MatrixD s(1, 10);
    s << 1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 5, 6, 7;
    const auto first_draw = [&](SstSampling sampling, std::uint64_t seed) {
        Fixture f({10, 12, 3});
        Sst<double> sst({.rank = 3, .sampling = sampling, .seed = seed});
        sst.on_train_begin(f.ctx());
        sst.layer(0).sigma.value = s;
        sst.before_forward(f.ctx());
        const MatrixD active = sst.layer(0).sigma.value.leftCols(3);
        return std::make_pair(sst.sampled(0), active);
    };
    for (const std::uint64_t seed : {1u, 2u}) {
        const auto [sampled, active] = first_draw(SstSampling::top, seed);
        CHECK(sampled == std::vector<Index>{9, 8, 7});
        CHECK(std::set<double>(active.data(), active.data() + 3) == std::set<double>{5, 6, 7});
    }
    // Multinomial: the same seed draws the same positions, and those of sst_sample with a
    // generator of that seed over the same p.
    for (const SstSampling sampling : {SstSampling::sigma, SstSampling::mixed, SstSampling::uniform}) {
        INFO("sampling " << to_string(sampling));
        Rng rng(5);
        const auto expected = sst_sample(sst_probabilities<double>(s, sampling), 3, rng);
        CHECK(first_draw(sampling, 5).first == expected);
        CHECK(first_draw(sampling, 5).first == first_draw(sampling, 5).first);
    }
    CHECK(first_draw(SstSampling::mixed, 5).first != first_draw(SstSampling::mixed, 6).first);
}

TEST_CASE("Sst's sigma_only trains sigma and leaves U and V exactly as they were", "[policy][sst]") {
    Fixture f({10, 12, 3});
    const MatrixD x = gaussian(16, 10, 2);
    const auto y = teacher_labels(x, 3, 3);
    auto& sst = f.run->add<Sst<double>>(
        {.rank = 3, .iteration_steps = 2, .round_iterations = 1, .rewarm_steps = 1, .sigma_only = true});
    f.run->begin();
    auto& l = sst.layer(0);
    const MatrixD ua = l.U_active.value, va = l.V_active.value, uf = l.U_frozen.value, vf = l.V_frozen.value,
                  s0 = l.sigma.value;
    CHECK_FALSE(l.U_active.trainable);
    CHECK_FALSE(l.V_active.trainable);
    for (int i = 0; i < 6; ++i) f.step(x, y);
    CHECK(l.U_active.value == ua);
    CHECK(l.V_active.value == va);
    CHECK(l.U_frozen.value == uf);
    CHECK(l.V_frozen.value == vf);
    CHECK((l.sigma.value - s0).norm() > 1e-6);
    CHECK(l.sigma.value.minCoeff() >= 0.0);
    CHECK_FALSE(f.opt->has_state(l.U_active.id()));
    CHECK(f.opt->has_state(l.sigma.id()));
    CHECK(count_events(f.log(), "sample") == 0);
    CHECK(count_events(f.log(), "resvd") == 0);
    CHECK_FALSE(f.schedule().rewarm_state().active());
}

TEST_CASE("Sst's spectral re-warm ramps the SST layers' group alone while the default re-warms the schedule",
          "[policy][sst]") {
    const MatrixD x = gaussian(16, 10, 2);
    const auto y = teacher_labels(x, 3, 3);
    for (const SstRewarmScope scope : {SstRewarmScope::spectral, SstRewarmScope::all}) {
        INFO("rewarm_scope " << to_string(scope));
        Fixture f({10, 12, 12, 3});
        auto& sst = f.run->add<Sst<double>>({.rank = 3,
                                            .iteration_steps = 4,
                                            .rewarm_steps = 2,
                                            .select = {.pattern = "layers\\.0", .roles = {"hidden"}},
                                            .rewarm_scope = scope});
        f.run->begin();
        const bool spectral = scope == SstRewarmScope::spectral;
        REQUIRE(sst.spectral_group().has_value() == spectral);
        const std::size_t groups = f.opt->groups().size();
        CHECK(groups == (spectral ? 3u : 2u));
        auto& l = sst.layer(0);
        const double lr = 1e-2;
        if (spectral) {
            const std::size_t g = *sst.spectral_group();
            CHECK(f.opt->group(g).options.name == "sst.spectral");
            CHECK(f.opt->group(g).options.weight_decay == 0.01);  // as the weights' group
            CHECK(f.opt->group_of(l.U_active) == g);
            CHECK(f.opt->group_of(l.sigma) == g);
            CHECK(f.opt->group_of(l.bias) == 1);
            CHECK(f.opt->group_of(f.model.layers()[1].get<Linear<double>>().weight) == 0);  // dense
        }
        for (int i = 0; i < 4; ++i) f.step(x, y);
        f.step(x, y);  // step 4: an iteration start, the ramp's first step
        CHECK(f.opt->group(0).options.lr == lr);  // the dense layer's group never moves
        CHECK(f.schedule().rewarm_state().active() == !spectral);
        if (spectral) {
            CHECK(f.opt->group(*sst.spectral_group()).options.lr == lr / 2);
            f.step(x, y);  // step 5: the ramp's end
            CHECK(f.opt->group(*sst.spectral_group()).options.lr == lr);
            for (int i = 0; i < 3; ++i) f.step(x, y);  // step 8: the next iteration start
            CHECK(f.opt->group(*sst.spectral_group()).options.lr == lr / 2);
            CHECK(f.opt->group(0).options.lr == lr);
        } else {
            CHECK(f.schedule().rewarm_state() == LrSchedule::Rewarm{4, 2});
        }
    }
}

TEST_CASE("Sst's pruning zeroes exactly the singular values below the threshold", "[policy][sst]") {
    Fixture f({6, 5, 3});
    Sst<double> sst({.rank = 2});
    sst.on_train_begin(f.ctx());
    auto& l = sst.layer(0);
    MatrixD s(1, 5);
    s << 3, 0.5, 0.01, 0.2, 0;
    l.sigma.value = s;
    const MatrixD u = l.full_u(), v = l.full_v(), w = l.dense_weight();
    CHECK(sst.prune(f.ctx(), 0.25) == 2);
    MatrixD pruned(1, 5);
    pruned << 3, 0.5, 0, 0, 0;
    CHECK(l.sigma.value == pruned);
    const MatrixD removed = 0.01 * u.col(2) * v.col(2).transpose() + 0.2 * u.col(3) * v.col(3).transpose();
    CHECK((l.dense_weight() - (w - removed)).norm() < 1e-12);
    const auto events = f.log().of_event("prune");
    REQUIRE(events.size() == 1);
    CHECK(events[0].old_rank == 4);
    CHECK(events[0].new_rank == 2);
    CHECK(events[0].value == 0.25);
    CHECK(sst.prune(f.ctx(), 0.25) == 0);  // nothing left below it
    CHECK_THROWS_WITH(sst_prune_sigma(l, -1.0), Catch::Contains("threshold >= 0, got -1"));
}

TEST_CASE("Sst rejects bad values of its newer options", "[policy][sst][errors]") {
    CHECK_THROWS_WITH(Sst<double>({.sampling = static_cast<SstSampling>(9)}),
                      Catch::Contains("option sampling must be sigma, mixed, uniform, top or sequential") &&
                          Catch::Contains("got the value 9"));
    CHECK_THROWS_WITH(Sst<double>({.rewarm_scope = static_cast<SstRewarmScope>(4)}),
                      Catch::Contains("option rewarm_scope must be all or spectral, got the value 4"));
    CHECK_THROWS_WITH(Sst<double>({.init = static_cast<SstInit>(5)}),
                      Catch::Contains("Sst") && Catch::Contains("option init must be svd or random, got the value 5"));
}

namespace {
// max over the columns of |norm - 1|.
double unit_column_error(const MatrixD& m) {
    double e = 0.0;
    for (Index j = 0; j < m.cols(); ++j) e = std::max(e, std::abs(m.col(j).norm() - 1.0));
    return e;
}
}  // namespace

TEST_CASE("Sst's init svd is the weight's exact SVD, init random keeps only its singular values",
          "[policy][sst][init]") {
    const std::vector<Index> sizes{6, 10, 8, 3};
    std::vector<MatrixD> dense;
    {
        Fixture probe(sizes);
        for (Index k = 0; k < 2; ++k) dense.push_back(probe.model.layers()[static_cast<std::size_t>(k)].dense_weight());
    }
    Fixture svd(sizes);
    auto& exact = svd.run->add<Sst<double>>({.rank = 3, .seed = 5});
    CHECK(exact.options().init == SstInit::svd);  // the default
    svd.run->begin();
    Fixture rnd(sizes);
    auto& drawn = rnd.run->add<Sst<double>>({.rank = 3, .seed = 5, .init = SstInit::random});
    rnd.run->begin();
    REQUIRE(drawn.num_layers() == 2);
    for (std::size_t k = 0; k < 2; ++k) {
        INFO("layer " << k);
        const MatrixD& w = dense[k];
        CHECK((exact.layer(k).dense_weight() - w).norm() < 1e-12 * w.norm());
        CHECK(Sst<double>::orthogonality_error(exact.layer(k)) < 1e-12);
        auto& l = drawn.layer(k);
        // sigma: the dense weight's singular values, in the SVD's (descending) order.
        const Eigen::JacobiSVD<MatrixD> reference(w);
        const MatrixD expected = reference.singularValues().transpose();
        REQUIRE(l.sigma.value.cols() == expected.cols());
        CHECK((l.sigma.value - expected).norm() < 1e-12 * expected.norm());
        // U and V: every column of unit length, but not orthogonal, not the weight's bases.
        CHECK(unit_column_error(l.full_u()) < 1e-12);
        CHECK(unit_column_error(l.full_v()) < 1e-12);
        CHECK(Sst<double>::orthogonality_error(l) > 0.1);
        CHECK((l.dense_weight() - w).norm() > 0.1 * w.norm());
        // The bias is the dense layer's, untouched.
        CHECK(l.bias.value == exact.layer(k).bias.value);
    }
    // The network is no longer the dense one at the switch (the ablation's point).
    const MatrixD x = gaussian(5, 6, 1);
    CHECK((rnd.output(x) - svd.output(x)).norm() > 1e-3);
    // The bases come from the policy's generator: the same seed draws the same ones.
    Fixture again(sizes);
    auto& same = again.run->add<Sst<double>>({.rank = 3, .seed = 5, .init = SstInit::random});
    again.run->begin();
    CHECK(same.layer(1).full_u() == drawn.layer(1).full_u());
    CHECK(same.layer(1).full_v() == drawn.layer(1).full_v());
    Fixture other(sizes);
    auto& reseeded = other.run->add<Sst<double>>({.rank = 3, .seed = 6, .init = SstInit::random});
    other.run->begin();
    CHECK(reseeded.layer(1).full_u() != drawn.layer(1).full_u());
}

TEST_CASE("Sst with init random trains and keeps its invariants after every step", "[policy][sst][init]") {
    Fixture f({10, 16, 16, 3}, 21, 2e-2);
    const MatrixD x = gaussian(64, 10, 22);
    const auto y = teacher_labels(x, 3, 23);
    auto& sst = f.run->add<Sst<double>>(
        {.rank = 4, .iteration_steps = 5, .rewarm_steps = 2, .seed = 24, .init = SstInit::random});
    std::vector<double> losses;
    for (int i = 0; i < 80; ++i) {
        losses.push_back(f.step(x, y));
        REQUIRE(std::isfinite(losses.back()));
        for (std::size_t k = 0; k < sst.num_layers(); ++k) {
            const auto& l = sst.layer(k);
            REQUIRE(l.sigma.value.minCoeff() >= 0.0);
            // Active columns are renormalised each step, frozen ones are never changed: every
            // column of U and V stays at unit length, from the random start as from a re-SVD.
            REQUIRE(unit_column_error(l.full_u()) < 1e-12);
            REQUIRE(unit_column_error(l.full_v()) < 1e-12);
        }
    }
    INFO("first loss " << losses.front() << ", last " << losses.back());
    CHECK(losses.back() < 0.5 * losses.front());
    // The same schedule as with the SVD start: 16 iterations; T2 = 3 and 4.
    CHECK(count_events(f.log(), "sample") == 2 * 16);
    CHECK(count_events(f.log(), "resvd") == 5 + 4);
    // Layer 1's fourth round ended with step 80: its re-SVD made U and V orthonormal.
    CHECK(Sst<double>::orthogonality_error(sst.layer(1)) < 1e-10);
}

}  // namespace test_sst
