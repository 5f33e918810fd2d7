// GaLore (the policy): its basis is the gradient's top singular vectors on the shorter
// side, taken exactly every `gap` steps; it trains; it composes with a rank policy on other
// layers and refuses a layer another policy manages, a layer that is not dense and an
// optimizer that cannot project. (The projected step itself: tests/optim/galore_test.cpp;
// resume: tests/policy/test_resume.cpp.)
#include <catch2/catch.hpp>

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/optim/sgd.hpp>
#include <lowrank/policy/galore.hpp>
#include <lowrank/policy/lora.hpp>
#include <lowrank/train/run.hpp>

#include "policy_test_support.hpp"

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

// Every member compiles, and warning-free, for the training scalar too.
template class lowrank::GaLore<float>;

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_galore {

using namespace lowrank;
using Catch::Matchers::Contains;
using lowrank::test::Probe;

namespace {

// A 6-12-8-3 MLP (hidden weights 12 x 6, right side, and 8 x 12, left side) with AdamW or
// SGD and a TrainingRun on a fixed batch.
struct Run {
    Rng rng{5};
    Mlp<double> model{MlpOptions{.sizes = {6, 12, 8, 3}}, rng};
    std::unique_ptr<Optimizer<double>> opt;
    std::unique_ptr<TrainingRun<double>> training;
    MatrixD x;
    std::vector<std::int32_t> y;

    explicit Run(bool sgd = false) {
        if (sgd)
            opt = std::make_unique<Sgd<double>>(model.parameters(), SgdOptions{.lr = 0.1});
        else
            opt = std::make_unique<AdamW<double>>(model.parameters(), AdamOptions{.lr = 1e-2, .weight_decay = 0.1});
        training = std::make_unique<TrainingRun<double>>(model, *opt);
        Rng data(9);
        x.resize(32, 6);
        init::normal<double>(x, data);
        for (Index i = 0; i < x.rows(); ++i) y.push_back(static_cast<std::int32_t>(data.below(3)));
    }

    StepResult step() {
        return training->step(
            [&](Graph<double>& tape) { return cross_entropy(tape, model.forward(tape, tape.input(x)), y); });
    }
    Parameter<double>& weight(std::size_t i) { return model.layers()[i].get<Linear<double>>().weight; }
};

}  // namespace

TEST_CASE("GaLore's basis is the gradient's top singular vectors, refreshed every gap steps",
          "[policy][galore]") {
    Run run;
    std::map<std::string, MatrixD> grads;  // each weight's gradient at the step now running
    run.training->add<Probe>({.after_backward = [&](TrainingContext<double>&) {
        for (std::size_t i = 0; i < 2; ++i) grads[run.weight(i).name()] = run.weight(i).grad;
    }});
    auto& galore = run.training->add<GaLore<double>>({.rank = 3, .gap = 4});
    run.training->begin();
    REQUIRE(galore.weights().size() == 2);
    CHECK(run.opt->projection_of(run.weight(0))->side == ProjectionSide::right);  // 12 x 6
    CHECK(run.opt->projection_of(run.weight(1))->side == ProjectionSide::left);   // 8 x 12
    CHECK(run.opt->projection_of(run.model.layers()[2].get<Linear<double>>().weight) == nullptr);  // output
    CHECK(run.opt->projection_of(run.model.layers()[0].get<Linear<double>>().bias) == nullptr);

    std::map<std::string, MatrixD> basis;
    std::vector<std::int64_t> refresh_steps;
    for (int t = 0; t < 10; ++t) {
        const std::int64_t step = run.training->global_step();
        const std::size_t events = run.training->rank_log().size();
        run.step();
        const bool refreshed = run.training->rank_log().size() > events;
        if (refreshed) refresh_steps.push_back(step);
        for (std::size_t i = 0; i < 2; ++i) {
            const Parameter<double>& w = run.weight(i);
            const MatrixD& P = run.opt->state_of(w)->projector;
            INFO(w.name() << " at step " << step);
            if (refreshed) {
                const auto svd = linalg::thin_svd<double>(grads.at(w.name()));
                const bool left = i == 1;
                CHECK(P == (left ? svd.U : svd.V).leftCols(3));  // the same SVD of the same gradient
                basis[w.name()] = P;
            } else {
                CHECK(P == basis.at(w.name()));  // kept, bit for bit
            }
        }
    }
    CHECK(refresh_steps == std::vector<std::int64_t>{0, 4, 8});
    const auto refreshes = run.training->rank_log().of_event("refresh");
    REQUIRE(refreshes.size() == 6);
    for (const auto& e : refreshes) {
        CHECK(e.statistic == "captured_energy");
        CHECK(e.value > 0.0);
        CHECK(e.value <= 1.0 + 1e-12);
    }
    CHECK(run.training->rank_log().of_event("project").size() == 2);
}

TEST_CASE("GaLore trains, and keeps less optimizer state than AdamW", "[policy][galore]") {
    Run dense, projected;
    projected.training->add<GaLore<double>>({.rank = 2, .gap = 10, .scale = 1.0});
    const double first = projected.step().loss;
    dense.step();
    double last = first;
    for (int t = 0; t < 60; ++t) {
        last = projected.step().loss;
        dense.step();
    }
    CHECK(last < 0.8 * first);
    // 12 x 6 at r 2: 2·2·12 + 6·2 = 60 instead of 144; 8 x 12: 2·2·12 + 8·2 = 64 instead of 192.
    const std::size_t saved = (144 - 60 + 192 - 64) * sizeof(double);
    CHECK(projected.opt->state_bytes() + saved == dense.opt->state_bytes());
}

TEST_CASE("GaLore composes with a rank policy on other layers and refuses theirs", "[policy][galore][errors]") {
    SECTION("LoRA on layers.1, GaLore on layers.0") {
        Run run;
        run.training->add<Lora<double>>({.rank = 2, .select = {.pattern = "layers\\.1"}});
        run.training->add<GaLore<double>>({.rank = 2, .select = {.pattern = "layers\\.0"}});
        const double first = run.step().loss;
        for (int t = 0; t < 20; ++t) run.step();
        CHECK(run.step().loss < first);
        CHECK(run.opt->projection_of(run.weight(0)) != nullptr);
        CHECK(run.model.layers()[1].holds<LowRankLinear<double>>());
    }
    SECTION("the same layer, either order") {
        const bool galore_first = GENERATE(true, false);
        Run run;
        if (galore_first) run.training->add<GaLore<double>>({.rank = 2});
        run.training->add<Lora<double>>({.rank = 2});
        if (!galore_first) run.training->add<GaLore<double>>({.rank = 2});
        CHECK_THROWS_WITH(run.training->begin(), Contains("layer 'layers.0' is already managed by") &&
                                                     Contains("two policies cannot act on one layer"));
    }
    SECTION("a layer that is not dense") {
        Run run;
        Rng scratch(1);
        run.model.layers()[0].replace(LowRankLinear<double>("layers.0", 6, 12, scratch, LowRankOptions{.rank = 2}));
        run.training.reset();
        run.opt = std::make_unique<AdamW<double>>(run.model.parameters(), AdamOptions{.lr = 1e-2});
        run.training = std::make_unique<TrainingRun<double>>(run.model, *run.opt);
        run.training->add<GaLore<double>>({.rank = 2});
        CHECK_THROWS_WITH(run.training->begin(), Contains("layer 'layers.0' holds a low_rank layer") &&
                                                     Contains("dense Linear"));
    }
    SECTION("an optimizer that cannot project, and a rank above a layer's") {
        Run sgd(true);
        sgd.training->add<GaLore<double>>({.rank = 2});
        CHECK_THROWS_WITH(sgd.training->begin(), Contains("the optimizer is Sgd") && Contains("use Adam or AdamW"));
        Run wide;
        wide.training->add<GaLore<double>>({.rank = 7});
        CHECK_THROWS_WITH(wide.training->begin(), Contains("expected <= min(out, in) = 6 of layer 'layers.0'"));
        CHECK_THROWS_WITH(GaLore<double>({.gap = 0}), Contains("option gap: expected >= 1, got 0"));
        CHECK_THROWS_WITH(GaLore<double>({.scale = -1.0}), Contains("option scale"));
    }
}

}  // namespace test_galore
