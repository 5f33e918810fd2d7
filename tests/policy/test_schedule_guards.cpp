// Guards against a schedule that cannot act within the run (docs/methods/README.md, "A
// schedule that cannot act"): ReLoRA without a restart and Cuttlefish without enough
// tracking points are refused at on_train_begin, naming the numbers; SST with a single
// iteration records a "schedule" event. InRank's guards are in test_inrank.cpp.
#include <catch2/catch.hpp>

#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/policy/cuttlefish.hpp>
#include <lowrank/policy/relora.hpp>
#include <lowrank/policy/sst.hpp>
#include <lowrank/train/run.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_schedule_guards {

using namespace lowrank;

namespace {

// A 6-8-8-3 MLP with AdamW and a TrainingRun of the given length.
struct Fixture {
    Rng rng{17};
    Mlp<double> model{MlpOptions{.sizes = {6, 8, 8, 3}}, rng};
    std::unique_ptr<AdamW<double>> opt;
    std::unique_ptr<TrainingRun<double>> run;

    Fixture(std::int64_t total_steps, std::int64_t steps_per_epoch = 0) {
        opt = std::make_unique<AdamW<double>>(model.parameters(), AdamOptions{.lr = 1e-2});
        run = std::make_unique<TrainingRun<double>>(
            model, *opt, RunOptions{.steps_per_epoch = steps_per_epoch, .total_steps = total_steps});
    }
    std::vector<RankEvent> events(const std::string& kind) const { return run->rank_log().of_event(kind); }
};

}  // namespace

TEST_CASE("ReLora refuses a run that ends before its first restart", "[policy][relora][errors]") {
    using Catch::Contains;
    Fixture f(499);
    f.run->add<ReLora<double>>({.rank = 2});  // period 500
    CHECK_THROWS_WITH(f.run->begin(), Contains("ReLora: the run has 499 optimizer steps (total_steps)") &&
                                          Contains("first restart comes after step 500 (option period)") &&
                                          Contains("plain LoRA"));
    CHECK(std::string(f.model.layers()[0].kind()) == "dense");  // nothing converted
    Fixture g(500);
    g.run->add<ReLora<double>>({.rank = 2});
    CHECK_NOTHROW(g.run->begin());
    Fixture unknown(0);  // a run of unknown length is not judged
    unknown.run->add<ReLora<double>>({.rank = 2});
    CHECK_NOTHROW(unknown.run->begin());
}

TEST_CASE("Cuttlefish refuses a run with fewer tracking points than its window",
          "[policy][cuttlefish][errors]") {
    using Catch::Contains;
    SECTION("tracking per epoch") {
        Fixture f(20, 10);  // two epochs, window 3
        f.run->add<Cuttlefish<double>>({});
        CHECK_THROWS_WITH(
            f.run->begin(),
            Contains("Cuttlefish: the run's 20 optimizer steps (total_steps) hold 2 tracking") &&
                Contains("one every 10 steps (an epoch)") && Contains("window = 3") &&
                Contains("could never switch"));
        CHECK(f.run->rank_log().empty());
        Fixture g(30, 10);
        g.run->add<Cuttlefish<double>>({});
        CHECK_NOTHROW(g.run->begin());
    }
    SECTION("tracking every N steps") {
        Fixture f(20, 0);
        f.run->add<Cuttlefish<double>>({.window = 5, .tail = 2, .track_every_steps = 5});
        CHECK_THROWS_WITH(f.run->begin(), Contains("hold 4 tracking point(s), one every 5 steps "
                                                   "(track_every_steps)") &&
                                              Contains("window = 5"));
        Fixture g(25, 0);
        g.run->add<Cuttlefish<double>>({.window = 5, .tail = 2, .track_every_steps = 5});
        CHECK_NOTHROW(g.run->begin());
    }
    SECTION("epochs of unknown length are not judged") {
        Fixture f(20, 0);
        f.run->add<Cuttlefish<double>>({});
        CHECK_NOTHROW(f.run->begin());
    }
}

TEST_CASE("Sst records a run no longer than one iteration as a schedule event", "[policy][sst]") {
    Fixture f(200);  // T3 = 200: the first sample trains throughout
    f.run->add<Sst<double>>({.rank = 2});
    f.run->begin();
    const auto events = f.events("schedule");
    REQUIRE(events.size() == 1);
    CHECK(events[0].policy == "sst");
    CHECK(events[0].layer.empty());
    CHECK(events[0].statistic == "iteration_steps");
    CHECK(events[0].value == 200.0);
    Fixture g(201);
    g.run->add<Sst<double>>({.rank = 2});
    g.run->begin();
    CHECK(g.events("schedule").empty());
}

}  // namespace test_schedule_guards
