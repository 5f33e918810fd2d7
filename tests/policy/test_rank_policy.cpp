// The rank-policy plumbing: selectors, layer swaps that keep the optimizer consistent,
// the rank log, and the order in which a PolicyList calls its policies.
#include <catch2/catch.hpp>

#include <lowrank/autograd/ops_loss.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/policy/rank_policy.hpp>
#include <lowrank/train/run.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_rank_policy {

using namespace lowrank;
using Access = lowrank::detail::TrainingContextAccess;

namespace {

struct Fixture {
    Rng rng{5};
    Mlp<double> model{MlpOptions{.sizes = {6, 8, 8, 3}}, rng};
    ParameterList<double> weights, biases;
    std::unique_ptr<AdamW<double>> opt;
    LrSchedule schedule;
    RankLog log;

    Fixture() {
        for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
        opt = std::make_unique<AdamW<double>>(weights, AdamOptions{.lr = 1e-2, .weight_decay = 0.1});
        opt->add_group(biases, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
    }
    TrainingContext<double> context() { return {model.layer_slots(), *opt, schedule, log}; }
};

// Records the hooks it sees, into a shared trace.
class Tracer : public RankPolicy<double> {
public:
    Tracer(std::string tag, std::vector<std::string>& trace) : tag_(std::move(tag)), trace_(&trace) {}
    std::string_view name() const override { return "tracer"; }
    void on_train_begin(TrainingContext<double>&) override { trace_->push_back(tag_ + ":begin"); }
    void before_forward(TrainingContext<double>&) override { trace_->push_back(tag_ + ":forward"); }
    void after_backward(TrainingContext<double>&) override { trace_->push_back(tag_ + ":backward"); }
    void after_step(TrainingContext<double>&) override { trace_->push_back(tag_ + ":step"); }
    void on_epoch_end(TrainingContext<double>&) override { trace_->push_back(tag_ + ":epoch"); }

private:
    std::string tag_;
    std::vector<std::string>* trace_;
};

}  // namespace

TEST_CASE("LayerSelector matches whole names and roles", "[policy]") {
    Fixture f;
    auto ctx = f.context();
    REQUIRE(ctx.layers().size() == 3);
    CHECK(ctx.layers()[0].role == "hidden");
    CHECK(ctx.layers()[2].role == "output");

    CHECK(ctx.select(LayerSelector{.roles = {"hidden"}}, "test").size() == 2);
    CHECK(ctx.select(LayerSelector{}, "test").size() == 3);
    const auto one = ctx.select(LayerSelector{.pattern = "layers\\.1"}, "test");
    REQUIRE(one.size() == 1);
    CHECK(one[0]->layer->name() == "layers.1");
    // The pattern must match the whole name: "layers" alone matches nothing.
    CHECK_THROWS_WITH(ctx.select(LayerSelector{.pattern = "layers"}, "inrank"),
                      Catch::Contains("inrank") && Catch::Contains("matches no layer") &&
                          Catch::Contains("layers.0 (hidden)"));
    CHECK_THROWS_WITH(ctx.select(LayerSelector{.pattern = "(("}, "sst"), Catch::Contains("invalid pattern '(('"));
}

TEST_CASE("replace_layer moves the optimizer to the new parameters, keeping groups by name", "[policy]") {
    Fixture f;
    auto ctx = f.context();
    AnyLinear<double>& slot = *ctx.layers()[1].layer;
    // Give the old parameters optimizer state.
    for (auto* p : f.model.parameters()) p->grad = MatrixD::Ones(p->rows(), p->cols());
    f.opt->step();
    const auto old_params = slot.parameters();
    REQUIRE(f.opt->num_states() == 6);

    const MatrixD w = slot.dense_weight();
    const MatrixD b = *slot.bias();
    ctx.replace_layer(slot, LowRankLinear<double>::from_dense("layers.1", w, 8, &b));
    CHECK(std::string(slot.kind()) == "low_rank");
    CHECK(f.opt->num_states() == 4);  // the two old ones are dropped

    auto& lr = slot.get<LowRankLinear<double>>();
    CHECK(f.opt->group_of(lr.U) == 0);
    CHECK(f.opt->group_of(lr.V) == 0);
    CHECK(f.opt->group_of(lr.bias) == 1);  // the bias stays in the no-decay group
    CHECK(f.opt->parameters().size() == 7);
    CHECK_FALSE(f.opt->has_state(lr.U.id()));

    // The optimizer steps the new parameters (and no dangling old ones).
    for (auto* p : f.model.parameters()) p->grad = MatrixD::Ones(p->rows(), p->cols());
    const MatrixD u_before = lr.U.value;
    f.opt->step();
    CHECK((lr.U.value - u_before).norm() > 0.0);

    // An explicit group wins for the parameters without a namesake.
    f.opt->add_group({}, GroupOptions{.lr = 1e-3, .name = "factors"});
    ctx.replace_layer(slot, Linear<double>("layers.1", 8, 8, f.rng), 2);
    auto& dense = slot.get<Linear<double>>();
    CHECK(f.opt->group_of(dense.weight) == 2);
    CHECK(f.opt->group_of(dense.bias) == 1);
}

TEST_CASE("Optimizer::remove_parameters and add_to_group reject what they cannot do", "[policy][errors]") {
    Fixture f;
    Parameter<double> stray("stray", MatrixD::Ones(2, 2));
    CHECK_THROWS_WITH(f.opt->remove_parameters({&stray}), Catch::Contains("'stray'") &&
                                                              Catch::Contains("in no group"));
    CHECK_THROWS_WITH(f.opt->add_to_group(5, {&stray}), Catch::Contains("expected group < 2, got 5"));
    CHECK_THROWS_WITH(f.opt->add_to_group(0, {f.weights[0]}), Catch::Contains("already in a group"));
}

TEST_CASE("RankLog records step, epoch and statistic and writes JSON lines atomically", "[policy]") {
    Fixture f;
    auto ctx = f.context();
    Access::set_counters(ctx, 12, 1);
    ctx.record("inrank", "layers.0", "grow", 2, 5, "explained_ratio", 0.93);
    ctx.record("inrank", "layers.1", "init", 0, 2);
    REQUIRE(f.log.size() == 2);
    CHECK(f.log.events()[0].step == 12);
    CHECK(f.log.of_layer("layers.1").size() == 1);

    const auto path = std::filesystem::temp_directory_path() / "lowrank_rank_log_test.jsonl";
    f.log.write_jsonl(path);
    std::ifstream in(path);
    std::string first, second, extra;
    std::getline(in, first);
    std::getline(in, second);
    CHECK_FALSE(std::getline(in, extra));
    CHECK(first ==
          R"({"epoch":1,"event":"grow","layer":"layers.0","new_rank":5,"old_rank":2,"policy":"inrank",)"
          R"("statistic":"explained_ratio","step":12,"value":0.93})");
    CHECK(second.find("\"statistic\"") == std::string::npos);  // no statistic, no field
    std::filesystem::remove(path);
    CHECK_THROWS_WITH(f.log.write_jsonl("/nonexistent-dir/log.jsonl"),
                      Catch::Contains("RankLog::write_jsonl") && Catch::Contains("/nonexistent-dir/log.jsonl") &&
                          Catch::Contains("cannot create the temporary file"));
}

TEST_CASE("PolicyList calls its policies in order at every hook, and rewarm restarts the warm-up", "[policy]") {
    Fixture f;
    std::vector<std::string> trace;
    PolicyList<double> list;
    list.add<Tracer>("a", trace);
    list.add<Tracer>("b", trace);
    {
        // One step and one epoch of a run that holds the list.
        TrainingRun<double> run(f.model, *f.opt);
        run.add(std::move(list));
        const MatrixD x = MatrixD::Ones(2, 6);
        const std::vector<std::int32_t> y{0, 2};
        run.step([&](Graph<double>& g) { return cross_entropy(g, f.model.forward(g, g.input(x)), y); });
        run.end_epoch();
    }
    CHECK(trace == std::vector<std::string>{"a:begin", "b:begin", "a:forward", "b:forward", "a:backward",
                                            "b:backward", "a:step", "b:step", "a:epoch", "b:epoch"});
    auto ctx = f.context();
    Access::set_counters(ctx, 40, 0);
    ctx.rewarm(4);
    CHECK(f.schedule.factor(39) == 1.0);
    CHECK(f.schedule.factor(40) == 0.25);
    CHECK(f.schedule.factor(43) == 1.0);
}


// A policy of another type than Tracer, to tell find<> apart from "the first policy".
class Other : public RankPolicy<double> {
public:
    std::string_view name() const override { return "other"; }
};

TEST_CASE("PolicyList::find returns the first policy of the asked type, or null", "[policy]") {
    std::vector<std::string> trace;
    PolicyList<double> list;
    CHECK(list.find<Tracer>() == nullptr);
    list.add<Other>();
    Tracer& first = list.add<Tracer>("first", trace);
    list.add<Tracer>("second", trace);
    CHECK(list.find<Tracer>() == &first);
    CHECK(list.find<Other>() == &list[0]);
    CHECK(list.find<RankPolicy<double>>() == &list[0]);
    PolicyList<double> without;
    without.add<Other>();
    CHECK(without.find<Tracer>() == nullptr);
}

}  // namespace test_rank_policy
