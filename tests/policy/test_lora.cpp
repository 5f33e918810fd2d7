// LoRA (Lora) and ReLoRA (ReLora): the conversion keeps the function, only the factors
// and the bias train, a restart merges exactly, leaves dL/dV = 0, resets the factors'
// optimizer state and re-warms the learning rate, every `period` optimizer steps.
#include <catch2/catch.hpp>

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/policy/lora.hpp>
#include <lowrank/policy/relora.hpp>
#include <lowrank/train/run.hpp>

#include "policy_test_support.hpp"

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

// Every member compiles, and warning-free, for the training scalar too.
template class lowrank::Lora<float>;
template class lowrank::ReLora<float>;

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_lora {

using namespace lowrank;
using lowrank::test::Probe;

namespace {

// A 6-8-8-3 MLP with AdamW, weights in group 0 (decay), biases in group 1 (no decay), a
// fixed batch, and the TrainingRun that steps it (constant schedule, no clipping).
struct Run {
    Rng rng{5};
    Mlp<double> model{MlpOptions{.sizes = {6, 8, 8, 3}}, rng};
    std::unique_ptr<AdamW<double>> opt;
    std::unique_ptr<TrainingRun<double>> training;
    MatrixD x;
    std::vector<std::int32_t> y;
    Graph<double> g;  // for outputs and gradients read outside the run's steps

    explicit Run(std::uint64_t data_seed = 9) {
        ParameterList<double> weights, biases;
        for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
        opt = std::make_unique<AdamW<double>>(weights, AdamOptions{.lr = 1e-2, .weight_decay = 0.1});
        opt->add_group(biases, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
        training = std::make_unique<TrainingRun<double>>(model, *opt);
        Rng data(data_seed);
        x.resize(16, 6);
        init::normal<double>(x, data);
        for (Index i = 0; i < x.rows(); ++i) y.push_back(static_cast<std::int32_t>(data.below(3)));
    }

    template <class Policy>
    Policy& add(typename Policy::Options options = {}) {
        return training->add<Policy>(std::move(options));
    }
    // The policies' on_train_begin.
    void begin() { training->begin(); }
    // One training step of the run on the fixed batch.
    StepResult step() {
        return training->step(
            [&](Graph<double>& tape) { return cross_entropy(tape, model.forward(tape, tape.input(x)), y); });
    }

    TrainingContext<double>& ctx() { return training->context(); }
    const LrSchedule& schedule() const { return training->schedule(); }
    const RankLog& log() const { return training->rank_log(); }

    MatrixD output() {
        g.clear();
        return model.forward(g, g.input(x)).value();
    }

    // Forward and backward only: the gradients of the current parameters.
    void backward() {
        g.clear();
        auto loss = cross_entropy(g, model.forward(g, g.input(x)), y);
        opt->zero_grad();
        g.backward(loss);
    }

    LowRankLinear<double>& low_rank(std::size_t i) { return model.layers()[i].get<LowRankLinear<double>>(); }
};

std::vector<RankEvent> events(const RankLog& log, const std::string& kind) {
    std::vector<RankEvent> out;
    for (const auto& e : log.events())
        if (e.event == kind) out.push_back(e);
    return out;
}

double relative(const MatrixD& a, const MatrixD& b) { return (a - b).norm() / b.norm(); }

}  // namespace

TEST_CASE("Lora turns the selected layers into a frozen base plus a zero low-rank update",
          "[policy][lora]") {
    Run run;
    const MatrixD before = run.output();
    std::vector<MatrixD> dense, bias;
    for (auto& l : run.model.layers()) {
        dense.push_back(l.dense_weight());
        bias.push_back(*l.bias());
    }
    auto& lora = run.add<Lora<double>>({.rank = 3, .alpha = 6.0, .seed = 11});
    run.begin();

    CHECK(std::string(run.model.layers()[0].kind()) == "low_rank");
    CHECK(std::string(run.model.layers()[1].kind()) == "low_rank");
    CHECK(std::string(run.model.layers()[2].kind()) == "dense");  // the output layer is not selected
    REQUIRE(lora.layers().size() == 2);
    CHECK(lora.scale() == 2.0);
    for (std::size_t i = 0; i < 2; ++i) {
        auto& l = run.low_rank(i);
        CHECK(l.rank() == 3);
        CHECK(l.scale() == 2.0);
        CHECK(l.base.value == dense[i]);  // W0 is the dense weight, bit for bit
        CHECK(l.bias.value == bias[i]);
        CHECK(l.U.value.isZero(0.0));   // B = 0
        CHECK(l.V.value.norm() > 0.0);  // A random, U(+-1/sqrt(in))
        CHECK(l.V.value.cwiseAbs().maxCoeff() <= 1.0 / std::sqrt(static_cast<double>(l.in_features())));
    }
    CHECK(relative(run.output(), before) < 1e-14);  // the function is unchanged

    const auto init = events(run.log(), "init");
    REQUIRE(init.size() == 2);
    CHECK(init[0].policy == "lora");
    CHECK(init[0].layer == "layers.0");
    CHECK(init[0].old_rank == 6);
    CHECK(init[0].new_rank == 3);
    CHECK(init[1].old_rank == 8);

    // The draws of A come from the policy's seed alone.
    Run same, other;
    auto& lora_same = same.add<Lora<double>>({.rank = 3, .seed = 11});
    other.add<Lora<double>>({.rank = 3, .seed = 12});
    same.begin();
    other.begin();
    CHECK(same.low_rank(1).V.value == run.low_rank(1).V.value);
    CHECK(other.low_rank(1).V.value != run.low_rank(1).V.value);
    // Unset alpha means alpha = r: scale 1.
    CHECK(lora_same.scale() == 1.0);
    CHECK(same.low_rank(0).scale() == 1.0);
}

TEST_CASE("Lora trains only U, V and the bias: r(m+n)+m per layer, frozen base, bias in its group",
          "[policy][lora]") {
    Run run;
    run.add<Lora<double>>({.rank = 3});
    run.begin();
    const Index output_layer = 3 * 8 + 3;
    const Index expected = (3 * (8 + 6) + 8) + (3 * (8 + 8) + 8) + output_layer;
    CHECK(count_parameters(run.model.parameters(), /*trainable_only=*/true) == expected);
    CHECK(count_parameters(run.opt->parameters(), /*trainable_only=*/true) == expected);
    for (std::size_t i = 0; i < 2; ++i) {
        auto& l = run.low_rank(i);
        CHECK(run.opt->group_of(l.U) == 0);
        CHECK(run.opt->group_of(l.V) == 0);
        CHECK(run.opt->group_of(l.bias) == 1);  // the no-decay group
    }

    auto& l = run.low_rank(1);
    const MatrixD base = l.base.value, u = l.U.value, v = l.V.value, b = l.bias.value;
    for (int i = 0; i < 4; ++i) run.step();
    CHECK(l.base.value == base);     // never stepped
    CHECK(l.base.grad.size() == 0);  // and keeps no gradient
    CHECK_FALSE(run.opt->has_state(l.base.id()));
    CHECK(l.U.value != u);
    CHECK(l.V.value != v);
    CHECK(l.bias.value != b);
    CHECK(run.log().size() == 2);  // no decisions after the start

    SECTION("train_bias = false freezes the bias") {
        Run frozen;
        frozen.add<Lora<double>>({.rank = 3, .train_bias = false});
        frozen.begin();
        CHECK(count_parameters(frozen.model.parameters(), true) == expected - 8 - 8);
        const MatrixD b0 = frozen.low_rank(0).bias.value;
        frozen.step();
        CHECK(frozen.low_rank(0).bias.value == b0);
    }
    SECTION("freeze_base = false trains the base too") {
        Run dense;
        dense.add<Lora<double>>({.rank = 3, .freeze_base = false});
        dense.begin();
        CHECK(count_parameters(dense.model.parameters(), true) == expected + 8 * 6 + 8 * 8);
        const MatrixD w0 = dense.low_rank(0).base.value;
        dense.step();
        CHECK(dense.low_rank(0).base.value != w0);
    }
    SECTION("an explicit group takes the factors, the bias keeps its own") {
        Run grouped;
        grouped.opt->add_group({}, GroupOptions{.lr = 1e-3, .name = "factors"});
        grouped.add<Lora<double>>({.rank = 3, .group = 2});
        grouped.begin();
        CHECK(grouped.opt->group_of(grouped.low_rank(0).U) == 2);
        CHECK(grouped.opt->group_of(grouped.low_rank(0).V) == 2);
        CHECK(grouped.opt->group_of(grouped.low_rank(0).bias) == 1);
    }
}

TEST_CASE("A ReLora restart merges s U V^T into the base exactly and redraws the factors",
          "[policy][relora]") {
    Run run;
    // The probe's after_step runs right before ReLora's: between the fifth optimizer step
    // and its restart, so the function can be compared across the restart alone.
    auto& probe = run.add<Probe>();
    auto& relora =
        run.add<ReLora<double>>({.rank = 3, .alpha = 6.0, .seed = 3, .period = 5, .rewarm_steps = 2});
    for (int i = 0; i < 4; ++i) run.step();
    REQUIRE(relora.restarts() == 0);

    for (std::size_t i = 0; i < 2; ++i) REQUIRE(run.low_rank(i).U.value.norm() > 0.0);
    const MatrixD before = run.output();
    std::vector<MatrixD> expected_base, v_old;
    std::vector<double> expected_norm;
    MatrixD just_before;
    probe.hooks.after_step = [&](TrainingContext<double>& ctx) {
        REQUIRE(ctx.step() == 5);
        REQUIRE(relora.restarts() == 0);
        for (std::size_t i = 0; i < 2; ++i) {
            auto& l = run.low_rank(i);
            const MatrixD update = 2.0 * l.U.value * l.V.value.transpose();
            expected_base.push_back(l.base.value + update);
            expected_norm.push_back(update.norm());
            v_old.push_back(l.V.value);
        }
        just_before = run.output();
    };
    run.step();
    REQUIRE(just_before.size() > 0);
    CHECK(relative(just_before, before) > 1e-6);  // the step did move the model
    REQUIRE(relora.restarts() == 1);

    CHECK(relative(run.output(), just_before) < 1e-13);  // the merge is exact
    for (std::size_t i = 0; i < 2; ++i) {
        auto& l = run.low_rank(i);
        CHECK(relative(l.base.value, expected_base[i]) < 1e-15);
        CHECK(l.U.value.isZero(0.0));
        CHECK(l.V.value != v_old[i]);
        CHECK(l.V.value.cwiseAbs().maxCoeff() <= 1.0 / std::sqrt(static_cast<double>(l.in_features())));
    }
    const auto restarts = events(run.log(), "restart");
    REQUIRE(restarts.size() == 2);
    CHECK(restarts[0].policy == "relora");
    CHECK(restarts[0].step == 5);
    CHECK(restarts[0].layer == "layers.0");
    CHECK(restarts[0].old_rank == 3);
    CHECK(restarts[0].new_rank == 3);
    CHECK(restarts[0].statistic == "merged_update_norm");
    CHECK(restarts[0].value == Approx(expected_norm[0]).epsilon(1e-12));
    CHECK(restarts[1].value == Approx(expected_norm[1]).epsilon(1e-12));
}

TEST_CASE("Right after a ReLora restart dL/dV is exactly zero and dL/dU is not", "[policy][relora]") {
    Run run;
    auto& relora = run.add<ReLora<double>>({.rank = 3, .period = 3, .rewarm_steps = 1});
    for (int i = 0; i < 2; ++i) run.step();
    run.backward();
    for (std::size_t i = 0; i < 2; ++i) CHECK(run.low_rank(i).V.grad.norm() > 0.0);  // mid-round: V moves

    run.step();  // the third step ends the round
    REQUIRE(relora.restarts() == 1);
    run.backward();
    for (std::size_t i = 0; i < 2; ++i) {
        INFO("layer " << i);
        CHECK(run.low_rank(i).V.grad.isZero(0.0));  // the saddle: dL/dV = x^T (s dy U) with U = 0
        CHECK(run.low_rank(i).U.grad.norm() > 0.0);
    }
}

TEST_CASE("A ReLora restart resets the factors' optimizer state and re-warms the learning rate",
          "[policy][relora]") {
    Run run;
    auto& relora = run.add<ReLora<double>>({.rank = 3, .period = 4, .rewarm_steps = 3});
    for (int i = 0; i < 3; ++i) run.step();
    auto& l = run.low_rank(0);
    REQUIRE(run.opt->state_of(l.U) != nullptr);
    CHECK(run.opt->state_of(l.U)->step == 3);
    CHECK(run.opt->state_of(l.V)->exp_avg_sq.norm() > 0.0);

    run.step();  // step 4: restart
    REQUIRE(relora.restarts() == 1);
    for (const Parameter<double>* p : {&l.U, &l.V}) {
        INFO(p->name());
        const auto* s = run.opt->state_of(*p);
        REQUIRE(s != nullptr);
        CHECK(s->step == 0);
        CHECK(s->exp_avg.isZero(0.0));
        CHECK(s->exp_avg_sq.isZero(0.0));
    }
    // The bias is not part of the adapter: its state goes on.
    CHECK(run.opt->state_of(l.bias)->step == 4);
    CHECK(run.opt->state_of(l.bias)->exp_avg.norm() > 0.0);
    CHECK_FALSE(run.opt->has_state(l.base.id()));
    // The learning rate ramps up again from the next step.
    CHECK(run.schedule().rewarm_state() == LrSchedule::Rewarm{4, 3});
    CHECK(run.schedule().factor(4) == Approx(1.0 / 3.0));
    CHECK(run.schedule().factor(7) == 1.0);
    // The optimizer accepts the new factors (their layout change was carried).
    REQUIRE_NOTHROW(run.step());
    CHECK(run.opt->state_of(l.U)->step == 1);

    SECTION("state_reset below 1 prunes the smallest moments and keeps the step count") {
        Run pruned;
        // The probe reads the moments of step 4 between the update and the restart.
        auto& probe = pruned.add<Probe>();
        auto& policy =
            pruned.add<ReLora<double>>({.rank = 3, .period = 4, .rewarm_steps = 1, .state_reset = 0.5});
        for (int i = 0; i < 3; ++i) pruned.step();
        auto& p = pruned.low_rank(1).V;
        MatrixD m;
        probe.hooks.after_step = [&](TrainingContext<double>& ctx) {
            REQUIRE(ctx.step() == 4);
            m = pruned.opt->state_of(p)->exp_avg;
        };
        pruned.step();
        REQUIRE(m.size() > 0);
        REQUIRE(policy.restarts() == 1);
        const auto* s = pruned.opt->state_of(p);
        CHECK(s->step == 4);
        const Index n = m.size();
        Index zeros = 0;
        const double smallest_kept = (s->exp_avg.array() != 0.0).select(m.array().abs(), 1e300).minCoeff();
        const double largest_cut = (s->exp_avg.array() == 0.0).select(m.array().abs(), -1.0).maxCoeff();
        for (Index i = 0; i < n; ++i) {
            if (s->exp_avg.data()[i] == 0.0)
                ++zeros;
            else
                CHECK(s->exp_avg.data()[i] == m.data()[i]);  // survivors are untouched
        }
        CHECK(zeros == n / 2);
        CHECK(largest_cut < smallest_kept);  // by magnitude
        probe.hooks.after_step = {};
        CHECK_NOTHROW(pruned.step());
    }
}

TEST_CASE("ReLora restarts every period optimizer steps, and only then", "[policy][relora]") {
    Run run;
    auto& relora = run.add<ReLora<double>>({.rank = 2, .period = 3, .rewarm_steps = 1});
    run.begin();
    auto& l = run.low_rank(1);
    std::vector<MatrixD> bases;
    for (int i = 0; i < 7; ++i) {
        bases.push_back(l.base.value);
        // What is not an optimizer step never counts: an epoch's end, a stray hook call.
        run.training->end_epoch();
        relora.before_forward(run.ctx());
        run.step();
    }
    bases.push_back(l.base.value);
    relora.after_step(run.ctx());  // a repeated call at the same step does not restart twice
    CHECK(relora.restarts() == 2);
    const auto restarts = events(run.log(), "restart");
    REQUIRE(restarts.size() == 4);  // two layers, two restarts
    CHECK(restarts[0].step == 3);
    CHECK(restarts[2].step == 6);
    // The base changes at the restarts only: after steps 3 and 6 (bases[3], bases[6]).
    for (std::size_t i = 1; i < bases.size(); ++i) {
        INFO("after step " << i);
        CHECK((bases[i] != bases[i - 1]) == (i == 3 || i == 6));
    }
}

TEST_CASE("LoRA and ReLoRA reject bad options with a message naming the option", "[policy][errors]") {
    using Catch::Contains;
    CHECK_THROWS_WITH(Lora<double>({.rank = 0}),
                      Contains("lora") && Contains("option rank") && Contains("expected >= 1, got 0"));
    CHECK_THROWS_WITH(Lora<double>({.alpha = 0.0}), Contains("option alpha") && Contains("got 0"));
    CHECK_THROWS_WITH(Lora<double>({.alpha = std::nan("")}), Contains("option alpha"));
    CHECK_THROWS_WITH(ReLora<double>({.rank = -2}), Contains("relora") && Contains("option rank"));
    CHECK_THROWS_WITH(ReLora<double>({.period = 0}),
                      Contains("relora") && Contains("option period") && Contains("got 0"));
    CHECK_THROWS_WITH(ReLora<double>({.rewarm_steps = -1}),
                      Contains("option rewarm_steps") && Contains("got -1"));
    CHECK_THROWS_WITH(ReLora<double>({.period = 10, .rewarm_steps = 11}),
                      Contains("option rewarm_steps") && Contains("period = 10") && Contains("got 11"));
    CHECK_THROWS_WITH(ReLora<double>({.state_reset = 1.5}),
                      Contains("option state_reset") && Contains("1.5"));
    CHECK_THROWS_WITH(ReLora<double>({.state_reset = -0.1}), Contains("option state_reset"));

    // A rank too large for a layer: named, and no layer is converted.
    Run run;
    Lora<double> too_big({.rank = 7});
    CHECK_THROWS_WITH(too_big.on_train_begin(run.ctx()), Contains("lora") && Contains("'layers.0'") &&
                                                            Contains("min(out, in) = 6") &&
                                                            Contains("got 7"));
    CHECK(std::string(run.model.layers()[0].kind()) == "dense");
    CHECK(std::string(run.model.layers()[1].kind()) == "dense");
    // A selector that names no layer.
    Lora<double> nothing({.select = {.pattern = "attn.*"}});
    CHECK_THROWS_WITH(nothing.on_train_begin(run.ctx()), Contains("lora") && Contains("matches no layer"));
    // Hooks out of order.
    ReLora<double> early({.rank = 2});
    CHECK_THROWS_WITH(early.after_step(run.ctx()), Contains("relora") && Contains("before on_train_begin"));
    Lora<double> twice({.rank = 2});
    twice.on_train_begin(run.ctx());
    CHECK_THROWS_WITH(twice.on_train_begin(run.ctx()), Contains("called twice"));
}

}  // namespace test_lora
