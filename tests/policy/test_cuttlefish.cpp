// Cuttlefish: the convergence test on constructed histories, the rank rule, xi from the
// initial weights, the switch (function change = truncation error, optimizer groups,
// re-warm-up), the layers kept dense, Frobenius decay against autograd, and bad options;
// the authors' presets on constructed histories, the vanilla rank, the initial weight in
// the history, a tracked set apart from the factorized one, the factors' lr scale and the
// optimizer reset at the switch.
#include <catch2/catch.hpp>

#include "../test_support.hpp"

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/policy/cuttlefish.hpp>
#include <lowrank/train/run.hpp>

#include <Eigen/SVD>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_cuttlefish {

using namespace lowrank;
using lowrank::test::gaussian;
using CF = Cuttlefish<double>;
using Access = lowrank::detail::TrainingContextAccess;

namespace {

// An m x n matrix with the given singular values (the rest zero), in random bases.
MatrixD with_singular_values(Index m, Index n, const std::vector<double>& s, std::uint64_t seed) {
    const auto k = static_cast<Index>(s.size());
    const MatrixD qu = linalg::orthonormalize_columns<double>(gaussian(m, k, seed));
    const MatrixD qv = linalg::orthonormalize_columns<double>(gaussian(n, k, seed + 1));
    const Eigen::VectorXd sv = Eigen::Map<const Eigen::VectorXd>(s.data(), k);
    return qu * sv.asDiagonal() * qv.transpose();
}

// Singular values 1 (k times) and sqrt(1/2): stable rank k + 1/2, so floor(srank) = k.
MatrixD with_stable_rank(Index m, Index n, Index k, std::uint64_t seed) {
    std::vector<double> s(static_cast<std::size_t>(k), 1.0);
    s.push_back(std::sqrt(0.5));
    return with_singular_values(m, n, s, seed);
}

// Stable rank computed independently of the library.
double reference_stable_rank(const MatrixD& w) {
    const Eigen::MatrixXd a = w;
    Eigen::JacobiSVD<Eigen::MatrixXd> svd(a);
    const auto s = svd.singularValues();
    return s.squaredNorm() / (s(0) * s(0));
}

std::span<const double> span_of(const std::vector<double>& v) { return {v.data(), v.size()}; }

// A model, AdamW (decay on weights, none on biases) and a TrainingRun over them, whose
// context the tests of one decision hand to a policy directly.
struct Fixture {
    Rng rng{11};
    Mlp<double> model;
    std::unique_ptr<AdamW<double>> opt;
    std::unique_ptr<TrainingRun<double>> run;

    explicit Fixture(std::vector<Index> sizes, RunOptions options = {})
        : model(MlpOptions{.sizes = std::move(sizes)}, rng) {
        ParameterList<double> weights, biases;
        for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
        opt = std::make_unique<AdamW<double>>(weights, AdamOptions{.lr = 1e-3, .weight_decay = 0.1});
        opt->add_group(biases, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
        run = std::make_unique<TrainingRun<double>>(model, *opt, std::move(options));
    }
    TrainingContext<double>& ctx() { return run->context(); }
    const LrSchedule& schedule() const { return run->schedule(); }
    AnyLinear<double>& layer(std::size_t i) { return model.layers()[i]; }
    MatrixD& weight(std::size_t i) { return layer(i).get<Linear<double>>().weight.value; }
    MatrixD forward(const MatrixD& x) {
        Graph<double> g;
        return model.forward(g, g.input(x)).value();
    }
    std::vector<RankEvent> events(const std::string& kind) const { return run->rank_log().of_event(kind); }
};

}  // namespace

TEST_CASE("Cuttlefish EMA and derivative match a hand-worked history", "[policy][cuttlefish]") {
    // w = 3: alpha = 1/2. EMA of {0, 0, 3} = {0, 0, 1.5}; |gradient| = {0, 0.75, 1.5}.
    const std::vector<double> h{0.0, 0.0, 3.0};
    CHECK(CF::ema(span_of(h), 0.5) == std::vector<double>{0.0, 0.0, 1.5});
    const std::vector<double> y{0.0, 0.0, 1.5};
    CHECK(CF::abs_derivative(span_of(y)) == std::vector<double>{0.0, 0.75, 1.5});
    // Central differences inside, one-sided ends, absolute values.
    const std::vector<double> falling{4.0, 3.0, 1.0, 0.0};
    CHECK(CF::abs_derivative(span_of(falling)) == std::vector<double>{1.0, 1.5, 1.5, 1.0});
    const std::vector<double> one{5.0};
    CHECK(CF::abs_derivative(span_of(one)) == std::vector<double>{0.0});
    // Mean of the last L = 2 derivatives.
    CHECK(CF::convergence_statistic(span_of(h), 3, 2) == 1.125);
    CHECK(CF::convergence_statistic(span_of(h), 3, 3) == Approx(0.75));
    CHECK_THROWS_WITH(CF::ema(span_of(h), 0.0), Catch::Contains("alpha in (0, 1]"));
}

TEST_CASE("Cuttlefish convergence: flat is stable, moving is not, and fewer than w entries never are",
          "[policy][cuttlefish]") {
    const std::vector<double> flat{7, 7, 7, 7};
    CHECK(CF::is_converged(span_of(flat), 4, 3, 0.1));
    CHECK(CF::convergence_statistic(span_of(flat), 4, 3) == 0.0);
    // Three flat entries are not enough for w = 4, whatever the threshold.
    const std::vector<double> short_flat{7, 7, 7};
    CHECK_FALSE(CF::is_converged(span_of(short_flat), 4, 3, 100.0));
    // Still falling by one rank per point: the smoothed slope is far above tau.
    const std::vector<double> moving{12, 11, 10, 9, 8, 7, 6, 5};
    CHECK(CF::convergence_statistic(span_of(moving), 4, 3) > 0.8);
    CHECK_FALSE(CF::is_converged(span_of(moving), 4, 3, 0.1));
    // A history that has just stopped still carries the EMA's memory of the fall: stable
    // only once the smoothed curve has flattened too.
    const std::vector<double> settling{20, 12, 10, 10, 10, 10, 10, 10};
    const double stat = CF::convergence_statistic(span_of(settling), 3, 2);
    // EMA ... 10.375, 10.1875, 10.09375: |gradient| ends in 0.140625, 0.09375.
    CHECK(stat == Approx((0.140625 + 0.09375) / 2.0));
    CHECK_FALSE(CF::is_converged(span_of(settling), 3, 2, 0.1));
    CHECK(CF::is_converged(span_of(settling), 3, 2, 0.2));
}

TEST_CASE("Cuttlefish relaxes tau by 2.5 with two layers left and by 5 with one", "[policy][cuttlefish]") {
    CHECK(CF::relaxed_threshold(0.1, 5) == 0.1);
    CHECK(CF::relaxed_threshold(0.1, 3) == 0.1);
    CHECK(CF::relaxed_threshold(0.1, 2) == Approx(0.25));
    CHECK(CF::relaxed_threshold(0.1, 1) == Approx(0.5));
    CHECK(CF::relaxed_threshold(0.1, 2, 3.0, 7.0) == Approx(0.3));
    CHECK(CF::relaxed_threshold(0.1, 1, 3.0, 7.0) == Approx(0.7));

    // {2, 2, 6, 6} with w = 3, L = 2: EMA {2, 2, 4, 5}, |gradient| {0, 1, 1.5, 1}, statistic 1.25.
    const std::vector<double> h{2, 2, 6, 6};
    REQUIRE(CF::convergence_statistic(span_of(h), 3, 2) == 1.25);
    const double tau = 0.26;
    CHECK_FALSE(CF::is_converged(span_of(h), 3, 2, CF::relaxed_threshold(tau, 3)));
    CHECK_FALSE(CF::is_converged(span_of(h), 3, 2, CF::relaxed_threshold(tau, 2)));  // 0.65
    CHECK(CF::is_converged(span_of(h), 3, 2, CF::relaxed_threshold(tau, 1)));        // 1.3
}

TEST_CASE("Cuttlefish counts the unstable layers to relax the test during training", "[policy][cuttlefish]") {
    // Two tracked layers: A stays flat, B follows {2, 2, 6, 6}. With tau = 0.26: at point 3
    // both are unstable (tau x 2.5 = 0.65): A passes, B (1.5) does not; at point 4 only B
    // is left (tau x 5 = 1.3) and its 1.25 passes, so the switch happens there. Without
    // relaxation B would still fail (1.25 > 0.26).
    for (const bool relax : {true, false}) {
        Fixture f({12, 12, 12, 3});
        CF policy(CuttlefishOptions{.window = 3,
                                    .tail = 2,
                                    .threshold = 0.26,
                                    .relax_two = relax ? 2.5 : 1.0,
                                    .relax_one = relax ? 5.0 : 1.0,
                                    .min_speedup = 0.1});
        policy.on_train_begin(f.ctx());
        const Index b_history[] = {2, 2, 6, 6};
        for (int point = 0; point < 4; ++point) {
            Access::set_counters(f.ctx(), 0, point);
            f.weight(0) = with_stable_rank(12, 12, 3, 100 + 2 * static_cast<std::uint64_t>(point));
            f.weight(1) = with_stable_rank(12, 12, b_history[point], 200 + 2 * static_cast<std::uint64_t>(point));
            CHECK(policy.current_threshold() == Approx(0.26 * (relax ? (point < 3 ? 2.5 : 5.0) : 1.0)));
            policy.on_epoch_end(f.ctx());
            if (point < 3) CHECK_FALSE(policy.switched());
        }
        CHECK(policy.layers()[0].history == std::vector<Index>{3, 3, 3, 3});
        CHECK(policy.layers()[1].history == std::vector<Index>{2, 2, 6, 6});
        const auto stable = f.events("stable");
        REQUIRE(stable.size() == (relax ? 2u : 1u));
        CHECK(stable[0].layer == "layers.0");
        CHECK(stable[0].epoch == 2);
        CHECK(policy.switched() == relax);
        if (relax) {
            CHECK(stable[1].layer == "layers.1");
            CHECK(stable[1].epoch == 3);
            CHECK(policy.switch_epoch() == 3);
        }
    }
}

TEST_CASE("Cuttlefish's rank is ceil(srank * xi), clamped to d and raised to the floor", "[policy][cuttlefish]") {
    // srank above its initial value: the unclamped ceil(4 * 10 / 3) = 14 exceeds d = 10.
    CHECK(CF::switch_rank(4, 3, 10) == 10);
    CHECK(CF::switch_rank(3, 3, 10) == 10);  // unchanged srank: full rank, exactly
    CHECK(CF::switch_rank(2, 4, 10) == 5);   // 2 * 2.5
    CHECK(CF::switch_rank(1, 3, 10) == 4);   // ceil(3.33)
    CHECK(CF::switch_rank(1, 4, 10, 0.3) == 3);
    CHECK(CF::switch_rank(1, 4, 10, 0.35) == 4);  // floor ceil(3.5) = 4 wins over 3
    CHECK(CF::switch_rank(0, 4, 10) == 1);
    CHECK(CF::switch_rank(1, 4, 10, 1.0) == 10);
    CHECK_THROWS_WITH(CF::switch_rank(1, 0, 10), Catch::Contains("init_srank >= 1"));
}

TEST_CASE("Cuttlefish computes xi from the initial weights", "[policy][cuttlefish]") {
    Fixture f({8, 10, 6, 3});
    std::vector<double> init_srank;
    for (std::size_t i = 0; i < 2; ++i) init_srank.push_back(reference_stable_rank(f.weight(i)));
    CF policy;
    policy.on_train_begin(f.ctx());
    REQUIRE(policy.layers().size() == 2);  // the hidden layers; the output layer is not selected
    const Index d[] = {8, 6};
    for (std::size_t i = 0; i < 2; ++i) {
        const auto& l = policy.layers()[i];
        INFO("layer " << i);
        CHECK(l.d == d[i]);
        CHECK(l.init_stable_rank == static_cast<Index>(std::floor(init_srank[i])));
        CHECK(l.xi == Approx(static_cast<double>(d[i]) / std::floor(init_srank[i])));
        CHECK(l.history.empty());
        CHECK(std::string(f.layer(i).kind()) == "dense");  // layers stay dense until the switch
    }
    const auto init = f.events("init");
    REQUIRE(init.size() == 2);
    CHECK(init[1].layer == "layers.1");
    CHECK(init[1].statistic == "stable_rank");
    CHECK(init[1].value == Approx(init_srank[1]));
    // Training moves the weights; xi stays what the initial weights gave.
    const double xi0 = policy.layers()[0].xi;
    f.weight(0) = with_stable_rank(10, 8, 1, 5);
    policy.on_epoch_end(f.ctx());
    CHECK(policy.layers()[0].xi == xi0);
    CHECK(policy.layers()[0].history == std::vector<Index>{1});
}

namespace {

// One 6 -> 5 layer (the output role) with an initial weight of stable rank 2.125 (xi = 5 / 2),
// trained to singular values {3, 1, 0.5, 0.2, 0.1} (stable rank 1.1444): the switch at the
// first tracking point (w = L = 1) picks r = ceil(1 * 2.5) = 3, dropping 0.2^2 + 0.1^2.
struct SwitchFixture : Fixture {
    CF policy;
    MatrixD x = MatrixD::Identity(6, 6);
    MatrixD before, after, bias;

    explicit SwitchFixture(double lambda, double rewarm_start = 0.0)
        : Fixture({6, 5}),
          policy(CuttlefishOptions{.select = {.pattern = ".*", .roles = {"output"}},
                                   .window = 1,
                                   .tail = 1,
                                   .min_speedup = 0.5,
                                   .frobenius_decay = lambda,
                                   .rewarm_steps = 7,
                                   .rewarm_start = rewarm_start}) {
        weight(0) = with_singular_values(5, 6, {2, 1.5, 1, 1, 0.5}, 21);
        policy.on_train_begin(ctx());
        weight(0) = with_singular_values(5, 6, {3, 1, 0.5, 0.2, 0.1}, 23);
        bias = gaussian(1, 5, 25);
        layer(0).get<Linear<double>>().bias.value = bias;
        before = forward(x);
        Access::set_counters(ctx(), 40, 2);
        policy.on_epoch_end(ctx());
        after = forward(x);
    }
    LowRankLinear<double>& low() { return layer(0).get<LowRankLinear<double>>(); }
};

}  // namespace

TEST_CASE("Cuttlefish's switch changes the function by exactly the truncation error", "[policy][cuttlefish]") {
    SwitchFixture f(1e-4);
    REQUIRE(f.policy.layers()[0].xi == 2.5);
    REQUIRE(f.policy.switched());
    REQUIRE(std::string(f.layer(0).kind()) == "low_rank");
    CHECK(f.low().rank() == 3);
    CHECK(f.policy.layers()[0].rank == 3);
    // With x = I the output rows are W^T + b: the squared change is ||W - U V^T||_F^2.
    CHECK((f.before - f.after).squaredNorm() == Approx(0.2 * 0.2 + 0.1 * 0.1).epsilon(1e-10));
    REQUIRE(f.low().has_bias());
    CHECK(f.low().bias.value == f.bias);  // the bias moves over unchanged

    const auto sw = f.events("switch");
    REQUIRE(sw.size() == 1);
    CHECK(sw[0].old_rank == 5);
    CHECK(sw[0].new_rank == 3);
    CHECK(sw[0].statistic == "stable_rank");
    CHECK(sw[0].value == 1.0);
    CHECK(sw[0].step == 40);
    CHECK(f.policy.switch_step() == 40);
    CHECK(f.policy.switch_epoch() == 2);
}

TEST_CASE("Cuttlefish's switch gives the factors fresh state, their own decay-free group and a re-warm-up",
          "[policy][cuttlefish]") {
    SwitchFixture f(1e-4);
    auto& opt = *f.opt;
    REQUIRE(f.policy.factor_group().has_value());
    const std::size_t g = *f.policy.factor_group();
    CHECK(opt.group(g).options.name == "cuttlefish.factors");
    CHECK(opt.group(g).options.weight_decay == 0.0);  // the Frobenius decay replaces it
    CHECK(opt.group(g).options.lr == 1e-3);           // the lr of the dense weight's group
    CHECK(opt.group_of(f.low().U) == g);
    CHECK(opt.group_of(f.low().V) == g);
    CHECK(opt.group(opt.group_of(f.low().bias)).options.name == "no_decay");
    CHECK(opt.parameters().size() == 3);
    CHECK_FALSE(opt.has_state(f.low().U.id()));
    CHECK(f.schedule().rewarm_state() == LrSchedule::Rewarm{40, 7});
    CHECK(f.schedule().factor(40) == Approx(1.0 / 7.0));

    // The authors' ramp: from a quarter of the lr back to all of it (rewarm_start 0.25).
    SwitchFixture quarter(1e-4, 0.25);
    CHECK(quarter.schedule().rewarm_state() == LrSchedule::Rewarm{40, 7, 0.25});
    CHECK(quarter.schedule().factor(40) == Approx(0.25 + 0.75 / 7.0));
    CHECK(quarter.schedule().factor(43) == Approx(0.25 + 0.75 * 4.0 / 7.0));
    CHECK(quarter.schedule().factor(46) == Approx(1.0));
    CHECK(quarter.schedule().factor(47) == 1.0);

    // With the decay off, the factors keep the weight decay of the dense weight's group.
    SwitchFixture plain(0.0);
    CHECK_FALSE(plain.policy.factor_group().has_value());
    CHECK(plain.opt->group(plain.opt->group_of(plain.low().U)).options.weight_decay == 0.1);
}

TEST_CASE("Cuttlefish's Frobenius decay is the autograd gradient of lambda/2 ||U V^T||_F^2", "[policy][cuttlefish]") {
    const double lambda = 0.3;
    SwitchFixture f(lambda);
    auto& low = f.low();
    // Make the factors unbalanced so that U (V^T V) and V (U^T U) differ from the split's.
    low.U.value.col(0) *= 3.0;
    low.V.value.col(1) *= 0.5;
    const MatrixD g_u = gaussian(low.U.rows(), low.U.cols(), 31);
    const MatrixD g_v = gaussian(low.V.rows(), low.V.cols(), 32);
    low.U.grad = g_u;
    low.V.grad = g_v;
    f.policy.after_backward(f.ctx());

    Parameter<double> u("U", low.U.value), v("V", low.V.value);
    Graph<double> g;
    const auto product = linear(g, g.param(u), g.param(v));  // U V^T (m x n), formed densely here
    g.backward(scale(g, sum(g, mul(g, product, product)), lambda / 2.0));
    CHECK((low.U.grad - (g_u + u.grad)).norm() < 1e-12 * (1.0 + u.grad.norm()));
    CHECK((low.V.grad - (g_v + v.grad)).norm() < 1e-12 * (1.0 + v.grad.norm()));
    CHECK(u.grad.norm() > 1e-2);  // the decay is not negligible in this check

    // lambda = 0 leaves the gradients alone.
    SwitchFixture off(0.0);
    off.low().U.grad = g_u;
    off.policy.after_backward(off.ctx());
    CHECK(off.low().U.grad == g_u);
}

TEST_CASE("Cuttlefish applies no decay to dense layers before the switch", "[policy][cuttlefish]") {
    Fixture f({6, 8, 3});
    CF policy(CuttlefishOptions{.frobenius_decay = 0.5});
    policy.on_train_begin(f.ctx());
    auto& w = f.layer(0).get<Linear<double>>().weight;
    w.grad = gaussian(8, 6, 3);
    const MatrixD before = w.grad;
    policy.after_backward(f.ctx());
    CHECK(w.grad == before);
}

TEST_CASE("Cuttlefish switches by itself during training once the histories are flat", "[policy][cuttlefish]") {
    for (const std::int64_t every : {std::int64_t{0}, std::int64_t{2}}) {
        INFO("track_every_steps = " << every);
        Fixture f({16, 16, 16, 4}, {.steps_per_epoch = 3});
        auto& policy = f.run->add<CF>({.track_every_steps = every});  // defaults: w = 3, L = 2
        f.run->begin();
        // Trained-looking hidden weights (stable rank 1.5); a tiny lr keeps them flat.
        f.weight(0) = with_stable_rank(16, 16, 1, 41);
        f.weight(1) = with_stable_rank(16, 16, 1, 43);
        f.opt->set_group_lr(0, 1e-7);
        const MatrixD x = gaussian(20, 16, 45), target = gaussian(20, 4, 46);
        const auto loss = [&](Graph<double>& g) { return mse(g, f.model.forward(g, g.input(x)), target); };
        double last_loss = 0.0;
        for (int epoch = 0; epoch < 4; ++epoch) {
            for (int b = 0; b < 3; ++b) {
                last_loss = f.run->step(loss).loss;
                // Step-based: tracking points at steps 2, 4, 6; the third one switches.
                if (every > 0) CHECK(policy.switched() == (f.run->global_step() >= 6));
            }
            // The run ended the epoch in its third step. Epoch-based: points at the ends of
            // epochs 0, 1, 2; the third one switches.
            REQUIRE(f.run->epoch() == epoch + 1);
            if (every == 0) CHECK(policy.switched() == (epoch >= 2));
        }
        REQUIRE(policy.switched());
        CHECK(policy.switch_step() == (every > 0 ? 6 : 9));
        CHECK(std::isfinite(last_loss));
        for (std::size_t i = 0; i < 2; ++i) {
            const auto& l = policy.layers()[i];
            INFO("layer " << i);
            CHECK(l.history == std::vector<Index>{1, 1, 1});  // no tracking after the switch
            CHECK(l.stable);
            CHECK(l.factorized);
            CHECK(l.rank == CF::switch_rank(1, l.init_stable_rank, 16));
            CHECK(f.layer(i).rank() == l.rank);
            CHECK(std::string(f.layer(i).kind()) == "low_rank");
        }
        CHECK(std::string(f.layer(2).kind()) == "dense");  // the output layer is not selected
        CHECK(f.events("switch").size() == 2);
        CHECK(f.events("track").size() == 6);
        // The optimizer steps the new factors after the switch.
        CHECK(f.opt->has_state(f.layer(0).get<LowRankLinear<double>>().U.id()));
    }
}

TEST_CASE("Cuttlefish keeps dense the layers where factorizing does not pay", "[policy][cuttlefish]") {
    for (const auto cost : {CuttlefishCost::flops, CuttlefishCost::time}) {
        Fixture f({16, 16, 16, 16, 4});
        CF policy(CuttlefishOptions{.keep_first_dense = 1, .cost = cost, .timing_tokens = 8, .timing_repeats = 3});
        policy.on_train_begin(f.ctx());
        REQUIRE(policy.layers().size() == 2);  // layers.0 is never tracked
        CHECK(policy.layers()[0].name == "layers.1");
        // layers.1 settles at a low stable rank; layers.2 keeps its initial weight, so its
        // rank comes out at d and a factorization would cost more than the dense layer.
        f.weight(1) = with_stable_rank(16, 16, 1, 51);
        for (int point = 0; point < 3; ++point) policy.on_epoch_end(f.ctx());
        REQUIRE(policy.switched());
        CHECK(std::string(f.layer(0).kind()) == "dense");
        const auto keep = f.events("keep_dense");
        REQUIRE(keep.size() >= 1);
        CHECK(keep[0].layer == "layers.0");
        CHECK(keep[0].statistic == "keep_first_dense");
        for (std::size_t i = 0; i < 2; ++i) {
            const auto& l = policy.layers()[i];
            CHECK(l.speedup > 0.0);
            CHECK(std::isfinite(l.speedup));
            // The decision follows the measured cost (timings vary; the rule may not).
            CHECK(l.factorized == (l.speedup >= 1.1));
            CHECK(std::string(f.layer(i + 1).kind()) == (l.factorized ? "low_rank" : "dense"));
        }
        if (cost == CuttlefishCost::flops) {
            CHECK(std::string(f.layer(1).kind()) == "low_rank");
            CHECK(policy.layers()[1].rank == 16);
            CHECK(std::string(f.layer(2).kind()) == "dense");
            REQUIRE(keep.size() == 2);
            CHECK(keep[1].layer == "layers.2");
            CHECK(keep[1].statistic == "speedup");
            CHECK(keep[1].value == Approx(CF::flops_speedup(16, 16, 16, true)));
            CHECK(keep[1].value < 1.0);
            CHECK(policy.layers()[0].speedup == Approx(CF::flops_speedup(16, 16, policy.layers()[0].rank, true)));
        }
    }
}

TEST_CASE("Cuttlefish rejects bad options and layers it cannot start from", "[policy][cuttlefish][errors]") {
    using O = CuttlefishOptions;
    auto fails = [](const O& o, const std::string& option, const std::string& got) {
        INFO(option);
        CHECK_THROWS_WITH(CF(o), Catch::Contains("Cuttlefish") && Catch::Contains(option) && Catch::Contains(got));
    };
    fails(O{.window = 0}, "window", "got 0");
    fails(O{.window = 3, .tail = 4}, "tail", "got 4");
    fails(O{.tail = 0}, "tail", "got 0");
    fails(O{.threshold = -0.1}, "threshold", "got -0.1");
    fails(O{.threshold = std::nan("")}, "threshold", "got nan");
    fails(O{.relax_two = 0.5}, "relax_two", "got 0.5");
    fails(O{.relax_one = 0.0}, "relax_one", "got 0");
    fails(O{.rewarm_start = 1.0}, "rewarm_start", "got 1");
    fails(O{.rewarm_start = -0.25}, "rewarm_start", "got -0.25");
    fails(O{.track_every_steps = -1}, "track_every_steps", "got -1");
    fails(O{.rank_floor = 1.5}, "rank_floor", "got 1.5");
    fails(O{.keep_first_dense = -2}, "keep_first_dense", "got -2");
    fails(O{.min_speedup = 0.0}, "min_speedup", "got 0");
    fails(O{.timing_repeats = 0}, "timing_repeats", "got 0");
    fails(O{.frobenius_decay = -1e-4}, "frobenius_decay", "got -0.0001");
    fails(O{.rewarm_steps = -5}, "rewarm_steps", "got -5");

    Fixture f({6, 8, 8, 3});
    CHECK_THROWS_WITH(CF(O{.keep_first_dense = 2}).on_train_begin(f.ctx()),
                      Catch::Contains("keep_first_dense = 2") && Catch::Contains("none of the 2"));
    const MatrixD w = f.layer(1).dense_weight();
    f.ctx().replace_layer(f.layer(1), LowRankLinear<double>::from_dense("layers.1", w, 4));
    CHECK_THROWS_WITH(CF().on_train_begin(f.ctx()),
                      Catch::Contains("'layers.1' must be dense") && Catch::Contains("low_rank"));
}


TEST_CASE("Cuttlefish's presets are the authors' CIFAR and ImageNet detectors", "[policy][cuttlefish]") {
    const CuttlefishOptions c = CF::preset_options(CuttlefishPreset::cifar);
    CHECK(c.window == 15);
    CHECK(c.tail == 11);
    CHECK(c.threshold == 0.1);
    CHECK(c.relax_two == 2.5);
    CHECK(c.relax_one == 5.0);
    CHECK(c.relax_two_upto == 2);
    CHECK(c.relax_one_upto == 1);
    CHECK(c.init_in_history);
    CHECK(c.rank_floor == 0.0);
    CHECK(c.track_every_steps == 0);  // once per epoch
    const CuttlefishOptions i = CF::preset_options(CuttlefishPreset::imagenet);
    CHECK(i.window == 5);
    CHECK(i.tail == 5);
    CHECK(i.threshold == 0.33);
    CHECK(i.relax_two == 2.5);
    CHECK(i.relax_one == 5.0);
    CHECK(i.relax_two_upto == 6);
    CHECK(i.relax_one_upto == 3);
    CHECK(i.init_in_history);
    CHECK(i.rank_floor == 0.2);
    // The constructor applies the preset; the other options pass through.
    const CF policy(CuttlefishOptions{.preset = CuttlefishPreset::cifar, .min_speedup = 2.0});
    CHECK(policy.options().window == 15);
    CHECK(policy.options().min_speedup == 2.0);
    // A detector field set to another value than the preset's is a conflict, not overwritten.
    CHECK_THROWS_WITH(CF(CuttlefishOptions{.preset = CuttlefishPreset::cifar, .window = 7}),
                      Catch::Contains("option window = 7 conflicts with preset cifar") &&
                          Catch::Contains("which sets 15"));
    CHECK_NOTHROW(CF(CuttlefishOptions{.preset = CuttlefishPreset::imagenet, .tail = 5}));
    CHECK(CF::relaxed_threshold(0.33, 3, 2.5, 5.0, 6, 3) == Approx(1.65));
    CHECK(CF::relaxed_threshold(0.33, 6, 2.5, 5.0, 6, 3) == Approx(0.825));
    CHECK(CF::relaxed_threshold(0.33, 7, 2.5, 5.0, 6, 3) == 0.33);
}

namespace {

// Three tracked 12 x 12 hidden layers whose initial weights have floor(srank) = `init` and
// whose stable ranks at tracking point p are history(layer, p); tracked per epoch until the
// switch. Returns the epoch of the switch (-1: none within `points`).
template <class History>
std::int64_t switch_epoch_on(CF& policy, Fixture& f, Index init, History history, int points = 30) {
    for (std::size_t i = 0; i < 3; ++i) f.weight(i) = with_stable_rank(12, 12, init, 300 + 2 * i);
    policy.on_train_begin(f.ctx());
    for (int p = 0; p < points && !policy.switched(); ++p) {
        Access::set_counters(f.ctx(), 0, p);
        for (std::size_t i = 0; i < 3; ++i)
            f.weight(i) = with_stable_rank(12, 12, history(i, p), 400 + 10 * static_cast<std::uint64_t>(p) + 2 * i);
        policy.on_epoch_end(f.ctx());
    }
    return policy.switch_epoch();
}

}  // namespace

TEST_CASE("Cuttlefish's CIFAR preset switches on a constructed history where the authors' rule does",
          "[policy][cuttlefish]") {
    // A and B stay at 3 (their init too); C jumps from 3 to 6 at point 9. The authors' rule
    // (EMA of span 15, numpy.gradient, mean of the last 11, tau 0.1, x5 with one layer left;
    // worked out independently): A and B pass at point 13, when their histories (the
    // initial weight first) reach 15 entries; C's statistic is 0.159 at point 14, above 0.1
    // but below the relaxed 0.5, so the switch comes there.
    Fixture f({12, 12, 12, 12, 3});
    CF policy(CuttlefishOptions{.preset = CuttlefishPreset::cifar, .min_speedup = 0.1});
    const auto history = [](std::size_t i, int p) -> Index { return i < 2 || p < 9 ? 3 : 6; };
    CHECK(switch_epoch_on(policy, f, 3, history) == 14);
    const auto stable = f.events("stable");
    REQUIRE(stable.size() == 3);
    CHECK(stable[0].epoch == 13);
    CHECK(stable[1].epoch == 13);
    CHECK(stable[2].layer == "layers.2");
    CHECK(stable[2].epoch == 14);
    REQUIRE(policy.layers()[0].history.size() == 16);
    CHECK(policy.layers()[0].history.front() == 3);  // the initial weight
    std::vector<double> c(policy.layers()[2].history.begin(), policy.layers()[2].history.end());
    CHECK(CF::convergence_statistic(span_of(c), 15, 11) == Approx(0.1591).epsilon(1e-3));
}

TEST_CASE("Cuttlefish's ImageNet preset relaxes by the authors' counts and floors the rank at d / 5",
          "[policy][cuttlefish]") {
    // Initial floor(srank) 6 (xi = 2); A and B train to 2, C to 2 and then 4 from point 3.
    // With three layers unstable the ImageNet rule already relaxes x5 (1.65): all pass at
    // point 3, the first with w = 5 entries. The CIFAR counts (x5 for one, x2.5 for two)
    // keep tau = 0.33 there: C passes at 5 and A, B at 6.
    const auto history = [](std::size_t i, int p) -> Index { return i < 2 || p < 3 ? 2 : 4; };
    for (const auto rule : {CuttlefishRankRule::scaled, CuttlefishRankRule::vanilla}) {
        INFO("rank rule " << to_string(rule));
        Fixture f({12, 12, 12, 12, 3});
        CF policy(CuttlefishOptions{.preset = CuttlefishPreset::imagenet, .min_speedup = 0.1, .rank_rule = rule});
        CHECK(switch_epoch_on(policy, f, 6, history) == 3);
        // scaled: ceil(2 * 2) = 4 and ceil(4 * 2) = 8; vanilla: 2 and 4; the floor ceil(0.2 * 12) = 3.
        const bool scaled = rule == CuttlefishRankRule::scaled;
        CHECK(policy.layers()[0].rank == (scaled ? 4 : 3));
        CHECK(policy.layers()[2].rank == (scaled ? 8 : 4));
        CHECK(f.layer(2).rank() == policy.layers()[2].rank);
    }
    Fixture f({12, 12, 12, 12, 3});
    CF counts(CuttlefishOptions{
        .window = 5, .tail = 5, .threshold = 0.33, .min_speedup = 0.1, .init_in_history = true});
    CHECK(switch_epoch_on(counts, f, 6, history) == 6);
}

TEST_CASE("Cuttlefish's vanilla rank is floor(srank), the scaled one ceil(floor(srank) * xi)",
          "[policy][cuttlefish]") {
    // A 10 x 8 weight with singular values {2, 1, 1, 1}: srank = 7 / 4 = 1.75, floor 1.
    const MatrixD w = with_singular_values(10, 8, {2, 1, 1, 1}, 51);
    const auto s = static_cast<Index>(std::floor(reference_stable_rank(w)));
    REQUIRE(s == 1);
    CHECK(CF::vanilla_rank(s, 8) == 1);
    CHECK(CF::switch_rank(s, 2, 8) == 4);  // xi = 8 / 2
    CHECK(CF::vanilla_rank(s, 8, 0.3) == 3);
    CHECK(CF::vanilla_rank(0, 8) == 1);
    CHECK(CF::vanilla_rank(12, 8) == 8);
}

TEST_CASE("Cuttlefish starts the history with the initial weight when asked", "[policy][cuttlefish]") {
    Fixture f({8, 10, 6, 3});
    const double init = reference_stable_rank(f.weight(0));
    CF policy(CuttlefishOptions{.init_in_history = true});
    policy.on_train_begin(f.ctx());
    CHECK(policy.layers()[0].history == std::vector<Index>{static_cast<Index>(std::floor(init))});
    f.weight(0) = with_stable_rank(10, 8, 1, 5);
    policy.on_epoch_end(f.ctx());
    CHECK(policy.layers()[0].history == std::vector<Index>{static_cast<Index>(std::floor(init)), 1});
}

TEST_CASE("Cuttlefish tracks a set of layers other than the one it factorizes", "[policy][cuttlefish]") {
    // layers.0 (factorized) stays at 1; layers.1 (tracked only) goes 2, 4, 4, 4. With w = 2,
    // L = 1, tau = 0.3 layers.0 alone switches at point 1; tracking layers.1 as well waits
    // for it: |EMA'| at its last entry is 0.44 at point 2 and 0.15 at point 3.
    const auto run = [](std::optional<LayerSelector> track) {
        Fixture f({12, 12, 12, 3});
        CF policy(CuttlefishOptions{.select = {.pattern = "layers\\.0", .roles = {"hidden"}},
                                    .track_select = std::move(track),
                                    .window = 2,
                                    .tail = 1,
                                    .threshold = 0.3,
                                    .relax_two = 1.0,
                                    .relax_one = 1.0,
                                    .min_speedup = 0.1});
        policy.on_train_begin(f.ctx());
        const Index b[] = {2, 4, 4, 4};
        for (int p = 0; p < 4 && !policy.switched(); ++p) {
            Access::set_counters(f.ctx(), 0, p);
            f.weight(0) = with_stable_rank(12, 12, 1, 500 + 2 * static_cast<std::uint64_t>(p));
            f.weight(1) = with_stable_rank(12, 12, b[p], 600 + 2 * static_cast<std::uint64_t>(p));
            policy.on_epoch_end(f.ctx());
        }
        return std::make_pair(policy.switch_epoch(), std::vector<CuttlefishLayer>(policy.layers()));
    };
    const auto [alone, alone_layers] = run(std::nullopt);
    CHECK(alone == 1);
    CHECK(alone_layers.size() == 1);
    const auto [both, layers] = run(LayerSelector{.pattern = "layers\\.[01]"});
    CHECK(both == 3);
    REQUIRE(layers.size() == 2);
    CHECK(layers[0].factorizable);
    CHECK(layers[0].factorized);
    CHECK_FALSE(layers[1].factorizable);
    CHECK_FALSE(layers[1].factorized);  // read, never replaced
    CHECK(layers[1].history == std::vector<Index>{2, 4, 4, 4});
    // A factorized layer that is not tracked gets the rank of its stable rank at the switch.
    const auto [other, other_layers] = run(LayerSelector{.pattern = "layers\\.1"});
    CHECK(other == 3);
    REQUIRE(other_layers.size() == 2);
    CHECK_FALSE(other_layers[0].tracked);
    CHECK(other_layers[0].factorized);
    CHECK(other_layers[0].rank == CF::switch_rank(1, other_layers[0].init_stable_rank, 12));
}

TEST_CASE("Cuttlefish's lr scale after the switch acts on the factors' group alone, and the reset on every state",
          "[policy][cuttlefish]") {
    for (const bool reset : {false, true}) {
        INFO("reset_optimizer_at_switch = " << reset);
        Fixture f({6, 6, 6, 3}, {.steps_per_epoch = 1});
        auto& policy = f.run->add<CF>({.select = {.pattern = "layers\\.0", .roles = {"hidden"}},
                                       .window = 1,
                                       .tail = 1,
                                       .min_speedup = 0.1,
                                       .frobenius_decay = 0.0,
                                       .rewarm_steps = 0,
                                       .factor_lr_scale = 0.5,
                                       .reset_optimizer_at_switch = reset});
        f.run->begin();
        f.weight(0) = with_stable_rank(6, 6, 1, 61);
        const MatrixD x = gaussian(10, 6, 62), target = gaussian(10, 3, 63);
        const auto loss = [&](Graph<double>& g) { return mse(g, f.model.forward(g, g.input(x)), target); };
        const double dense_lr = f.opt->group(0).options.lr, bias_lr = f.opt->group(1).options.lr;
        f.run->step(loss);  // its epoch end switches
        REQUIRE(policy.switched());
        auto& low = f.layer(0).get<LowRankLinear<double>>();
        REQUIRE(policy.factor_group().has_value());  // without Frobenius decay: the lr scale asks for it
        const auto& g = f.opt->group(*policy.factor_group()).options;
        CHECK(g.lr == 0.5 * dense_lr);
        CHECK(g.weight_decay == 0.1);  // no Frobenius decay: the dense group's decay stays
        CHECK(f.opt->group_of(low.U) == *policy.factor_group());
        CHECK(f.opt->group(0).options.lr == dense_lr);  // the dense layers' group is untouched
        CHECK(f.opt->group(1).options.lr == bias_lr);
        CHECK(f.opt->group_of(f.layer(1).get<Linear<double>>().weight) == 0);
        const auto* w1 = f.opt->state_of(f.layer(1).get<Linear<double>>().weight);
        const auto* b1 = f.opt->state_of(f.layer(1).get<Linear<double>>().bias);
        REQUIRE(w1 != nullptr);
        REQUIRE(b1 != nullptr);
        CHECK(w1->step == (reset ? 0 : 1));
        CHECK(b1->step == (reset ? 0 : 1));  // in the no-decay group
        for (const auto moment : f.opt->moment_names())
            CHECK((w1->moment(moment).norm() == 0.0) == reset);
        CHECK(f.events("reset_optimizer").size() == (reset ? 1u : 0u));
        f.run->step(loss);  // and training goes on
        CHECK(f.opt->state_of(low.U)->step == 1);
    }
}

TEST_CASE("Cuttlefish rejects bad values of its newer options", "[policy][cuttlefish][errors]") {
    using O = CuttlefishOptions;
    CHECK_THROWS_WITH(CF(O{.factor_lr_scale = 0.0}), Catch::Contains("factor_lr_scale") && Catch::Contains("got 0"));
    CHECK_THROWS_WITH(CF(O{.relax_two_upto = 1, .relax_one_upto = 2}),
                      Catch::Contains("relax_one_upto") && Catch::Contains("got 2 and 1"));
    CHECK_THROWS_WITH(CF(O{.preset = static_cast<CuttlefishPreset>(9)}),
                      Catch::Contains("option preset") && Catch::Contains("got the value 9"));
    CHECK_THROWS_WITH(CF(O{.rank_rule = static_cast<CuttlefishRankRule>(7)}),
                      Catch::Contains("option rank_rule") && Catch::Contains("got the value 7"));
    Fixture f({6, 8, 8, 3});
    CHECK_THROWS_WITH(CF(O{.track_select = LayerSelector{.pattern = "nothing"}}).on_train_begin(f.ctx()),
                      Catch::Contains("track_select") && Catch::Contains("'nothing'"));
}

}  // namespace test_cuttlefish
