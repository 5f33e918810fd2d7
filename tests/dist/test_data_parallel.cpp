// Data-parallel training (lowrank/dist/): run under mpirun with 1, 2 and 3 processes
// (tests/dist/CMakeLists.txt). The gradient and loss of a sharded global batch against one
// process on the whole batch (double), uneven shards, buckets, frozen parameters staying
// home, every policy's decisions identical across processes and equal to one process's,
// replica checks that fail loudly, a non-finite loss on one process, sharded evaluation,
// checkpoints written by 2 processes and resumed on 1 and 3, and (hidden, driven by
// dies_test.sh) a process that fails or dies while the others wait for it.
//
// Every process runs the same test cases in the same order, so their collectives match.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/dist/data_parallel.hpp>
#include <lowrank/dist/mpi.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/policy/policies.hpp>
#include <lowrank/train/evaluate.hpp>
#include <lowrank/train/run.hpp>

#include "../test_support.hpp"

#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace test_data_parallel {

using namespace lowrank;
using Catch::Matchers::Contains;

const MpiEnvironment* g_mpi = nullptr;
const Communicator& world() { return g_mpi->world(); }

// The global batch of step s: `rows` Gaussian rows and labels, the same on every process.
struct Batch {
    MatrixD x;
    std::vector<std::int32_t> y;
};
Batch batch_for(std::int64_t s, Index rows) {
    Batch b{test::gaussian(rows, 10, 1000 + static_cast<std::uint64_t>(s)), {}};
    Rng r(2000 + static_cast<std::uint64_t>(s));
    for (Index i = 0; i < rows; ++i) b.y.push_back(static_cast<std::int32_t>(r.below(4)));
    return b;
}

using Policies = std::function<void(TrainingRun<double>&)>;

// A model, AdamW and a run, built alike on every process; `parallel` adds DataParallel.
struct Replica {
    Rng rng{7};
    Mlp<double> model{MlpOptions{.sizes = {10, 12, 12, 4}}, rng};
    std::unique_ptr<AdamW<double>> opt;
    std::unique_ptr<TrainingRun<double>> run;
    std::unique_ptr<DataParallel<double>> dp;
    Index rows;

    Replica(bool parallel, Index global_rows, const Policies& policies, RunOptions options = {},
            DataParallelOptions dp_options = {})
        : rows(global_rows) {
        opt = std::make_unique<AdamW<double>>(model.parameters(),
                                              AdamOptions{.lr = 1e-2, .weight_decay = 0.01});
        if (options.schedule.options().total_steps == 0 && options.total_steps == 0) options.total_steps = 40;
        options.clip_grad_norm = 1.0;
        run = std::make_unique<TrainingRun<double>>(model, *opt, options);
        policies(*run);
        if (parallel) dp = std::make_unique<DataParallel<double>>(*run, world(), dp_options);
    }

    StepResult step() {
        const Batch b = batch_for(run->global_step(), rows);
        Shard s{0, rows};
        if (dp) s = dp->shard(rows);
        const MatrixD x = b.x.middleRows(s.begin, s.count);
        const std::span<const std::int32_t> y(b.y.data() + s.begin, static_cast<std::size_t>(s.count));
        return run->step([&](Graph<double>& g) { return cross_entropy(g, model.forward(g, g.input(x)), y); });
    }

    std::vector<MatrixD> values() {
        std::vector<MatrixD> out;
        for (auto* p : run->parameters()) out.push_back(p->value);
        return out;
    }
    std::vector<MatrixD> grads() {
        std::vector<MatrixD> out;
        for (auto* p : run->parameters())
            if (p->trainable) out.push_back(p->grad);
        return out;
    }
};

double max_difference(const std::vector<MatrixD>& a, const std::vector<MatrixD>& b) {
    REQUIRE(a.size() == b.size());
    double d = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        REQUIRE(a[i].rows() == b[i].rows());
        REQUIRE(a[i].cols() == b[i].cols());
        if (a[i].size() > 0) d = std::max(d, (a[i] - b[i]).cwiseAbs().maxCoeff());
    }
    return d;
}

// Every test batch is 7 rows: uneven over 2 (4 + 3) and 3 (3 + 2 + 2) processes.
constexpr Index kRows = 7;

const Policies no_policy = [](TrainingRun<double>&) {};

}  // namespace test_data_parallel

using namespace test_data_parallel;

TEST_CASE("dp: shards cover the batch in order, once, the first ones a row longer", "[dist][uneven]") {
    for (int size = 1; size <= 5; ++size)
        for (Index global : {Index(5), Index(7), Index(12)}) {
            Index next = 0;
            for (int r = 0; r < size; ++r) {
                const Shard s = shard_of(global, r, size);
                CHECK(s.begin == next);
                CHECK((s.count == global / size || s.count == global / size + 1));
                next += s.count;
            }
            CHECK(next == global);
        }
    CHECK_THROWS_WITH(shard_of(4, 3, 3), Contains("rank 3 of 3"));
}

TEST_CASE("dp: the averaged gradient and loss of the shards are one process's on the whole batch",
          "[dist][uneven]") {
    Replica dp(true, kRows, no_policy);
    Replica one(false, kRows, no_policy);
    for (int s = 0; s < 5; ++s) {
        const StepResult a = dp.step();
        const StepResult b = one.step();
        INFO("step " << s << " on " << world().size() << " processes");
        CHECK(std::abs(a.loss - b.loss) < 1e-13);
        CHECK(std::abs(a.grad_norm - b.grad_norm) < 1e-12);
        CHECK(max_difference(dp.grads(), one.grads()) < 1e-13);
        CHECK(max_difference(dp.values(), one.values()) < 1e-12);
    }
    dp.dp->check_replicas();  // and bit for bit the same on every process
    const Index trainable = dp.run->parameter_count(true);
    CHECK(dp.dp->bytes_per_step() == static_cast<std::uint64_t>(trainable + 1) * sizeof(double));
    CHECK(dp.dp->stats().steps == 5);
    CHECK(dp.dp->stats().buckets_per_step == (world().size() > 1 ? 1 : 0));  // one process sends nothing
    CHECK(dp.dp->stats().layouts == 1);  // laid out once: a steady step allocates nothing here
}

TEST_CASE("dp: small buckets give the same sums in more calls", "[dist]") {
    Replica big(true, kRows, no_policy);
    Replica small(true, kRows, no_policy, {}, {.bucket_bytes = 100 * sizeof(double)});
    for (int s = 0; s < 3; ++s) {
        big.step();
        small.step();
    }
    CHECK(max_difference(big.values(), small.values()) == 0.0);
    const auto n = static_cast<std::int64_t>(small.dp->stats().scalars_per_step);
    const std::int64_t calls = world().size() > 1 ? (n + 99) / 100 : 0;
    CHECK(small.dp->stats().buckets_per_step == calls);
    CHECK(small.dp->stats().calls == 3 * calls);
}

TEST_CASE("dp: a frozen base never travels; a LoRA layer sends its factors", "[dist]") {
    Replica dense(true, kRows, no_policy);
    Replica lora(true, kRows, [](TrainingRun<double>& r) { r.add<Lora<double>>({.rank = 2}); });
    dense.step();
    lora.step();
    Index trainable = 0;
    for (auto* p : lora.run->parameters())
        if (p->trainable) trainable += p->size();
    CHECK(lora.dp->bytes_per_step() == static_cast<std::uint64_t>(trainable + 1) * sizeof(double));
    CHECK(lora.dp->bytes_per_step() < dense.dp->bytes_per_step());
    lora.dp->check_replicas();
}

// A policy that rebuilds a layer with the same names and shapes may get other addresses on
// one process than on another (each heap has its own history). Laying the buffer out again
// is collective (the layouts are compared across processes), so it must be decided by what
// every process has alike, not by the addresses: here process 0's parameters move, the
// others' stay, and the reduction must go on as before.
TEST_CASE("dp: parameters rebuilt at other addresses on one process only are reduced as before", "[dist]") {
    Replica dp(true, kRows, no_policy);
    dp.step();
    REQUIRE(dp.dp->stats().layouts == 1);
    ParameterList<double> params = dp.run->parameters();
    std::vector<std::unique_ptr<Parameter<double>>> rebuilt;
    if (world().rank() == 0)
        for (Parameter<double>*& p : params) {
            rebuilt.push_back(std::make_unique<Parameter<double>>(*p));
            p = rebuilt.back().get();
        }
    for (Parameter<double>* p : params)
        if (p->trainable) p->grad.setConstant(1.0);
    // Each process's gradient is weighted by its share of the last step's batch: the
    // shares add up to 1, so a gradient of ones on every process reduces to ones.
    const double loss = dp.dp->reduce(params, 2.0);
    CHECK(std::abs(loss - 2.0) < 1e-15);
    double worst = 0.0;
    for (Parameter<double>* p : params)
        if (p->trainable) worst = std::max(worst, (p->grad.array() - 1.0).abs().maxCoeff());
    CHECK(worst < 1e-15);
    CHECK(dp.dp->stats().layouts == 1);  // the same layout: nothing to compare, nothing to allocate
    dp.dp->check_replicas();
}

// Each policy, GaLore's too, with options that make it decide within a few steps: on every
// process the same decisions as one process on the whole batch, and replicas identical at
// every step.
TEST_CASE("dp: every policy decides as one process does, identically on every process", "[dist][uneven]") {
    struct Case {
        const char* name;
        Policies add;
        std::int64_t steps_per_epoch;
        bool decides;
    };
    const std::vector<Case> cases{
        {"lora", [](TrainingRun<double>& r) { r.add<Lora<double>>({.rank = 2}); }, 0, false},
        {"relora",
         [](TrainingRun<double>& r) { r.add<ReLora<double>>({.rank = 2, .period = 3, .rewarm_steps = 1}); },
         0, true},
        {"inrank",
         [](TrainingRun<double>& r) {
             r.add<InRank<double>>(
                 {.buffer = 2, .threshold = 0.99, .warmup = 2, .gap = 2, .two_stage = false});
         },
         0, true},
        {"cuttlefish",
         [](TrainingRun<double>& r) {
             r.add<Cuttlefish<double>>({.window = 2, .tail = 1, .threshold = 1e9, .min_speedup = 1e-6});
         },
         2, true},
        {"sst",
         [](TrainingRun<double>& r) {
             r.add<Sst<double>>({.rank = 2, .iteration_steps = 2, .round_iterations = 2, .rewarm_steps = 1});
         },
         0, true},
        {"deeplora", [](TrainingRun<double>& r) { r.add<DeepLora<double>>({.rank = 2, .compress = true}); },
         0, true},
        // The trainers' default: uncompressed at full width, every factor trained.
        {"deeplora wide", [](TrainingRun<double>& r) { r.add<DeepLora<double>>({}); }, 0, false},
        // The basis of the averaged gradient, refreshed at steps 0, 3, 6, 9.
        {"galore", [](TrainingRun<double>& r) { r.add<GaLore<double>>({.rank = 2, .gap = 3}); }, 0, true},
    };
    for (const Case& c : cases) {
        INFO(c.name << " on " << world().size() << " processes");
        RunOptions o;
        o.steps_per_epoch = c.steps_per_epoch;
        Replica dp(true, kRows, c.add, o);
        Replica one(false, kRows, c.add, o);
        for (int s = 0; s < 10; ++s) {
            dp.step();
            one.step();
            dp.dp->check_replicas();
        }
        CHECK(dp.run->rank_log().to_json().size() == one.run->rank_log().to_json().size());
        if (c.decides) CHECK(!dp.run->rank_log().empty());
        for (std::size_t i = 0; i < dp.run->rank_log().size(); ++i) {
            const RankEvent& a = dp.run->rank_log().events()[i];
            const RankEvent& b = one.run->rank_log().events()[i];
            CHECK(a.step == b.step);
            CHECK(a.layer == b.layer);
            CHECK(a.event == b.event);
            CHECK(a.new_rank == b.new_rank);
        }
        CHECK(max_difference(dp.values(), one.values()) < 1e-9);
    }
}

TEST_CASE("dp: a replica that differs is named by the check, and broadcast_parameters mends it", "[dist]") {
    if (world().size() < 2) return;
    Replica dp(true, kRows, no_policy);
    dp.step();
    if (world().rank() == 1) dp.model.parameters()[2]->value(0, 0) += 1e-12;
    const std::string name = dp.model.parameters()[2]->name();
    CHECK_THROWS_WITH(dp.dp->check_replicas(), Contains("parameter '" + name + "'") &&
                                                   Contains("process(es) 1") && Contains("step 1"));
    dp.dp->broadcast_parameters();
    dp.dp->check_replicas();
    dp.step();
    dp.dp->check_replicas();
}

TEST_CASE("dp: a non-finite loss on one process is every process's; all skip the step", "[dist]") {
    RunOptions o;
    o.on_non_finite = NonFinite::skip;
    Replica dp(true, kRows, no_policy, o);
    dp.step();
    const auto before = dp.values();
    const Batch b = batch_for(1, kRows);
    const Shard s = dp.dp->shard(kRows);
    MatrixD x = b.x.middleRows(s.begin, s.count);
    if (world().rank() == world().size() - 1) x(0, 0) = std::numeric_limits<double>::quiet_NaN();
    const std::span<const std::int32_t> y(b.y.data() + s.begin, static_cast<std::size_t>(s.count));
    const StepResult r =
        dp.run->step([&](Graph<double>& g) { return cross_entropy(g, dp.model.forward(g, g.input(x)), y); });
    CHECK(r.skipped);
    CHECK(max_difference(dp.values(), before) == 0.0);
    dp.dp->check_replicas();
}

TEST_CASE("dp: sharded evaluation combines into the whole set's", "[dist][uneven]") {
    Replica dp(true, kRows, no_policy);
    dp.step();
    const Batch test = batch_for(99, 23);
    ClassifierEvaluator<double> eval(5);
    const EvalResult whole = eval(dp.model, test.x, test.y);
    const Shard s = shard_of(23, world().rank(), world().size());
    const EvalResult mine =
        eval(dp.model, test.x.middleRows(s.begin, s.count),
             std::span<const std::int32_t>(test.y.data() + s.begin, static_cast<std::size_t>(s.count)));
    const EvalResult all = dp.dp->combine(mine);
    CHECK(all.samples == 23);
    CHECK(all.correct == whole.correct);
    CHECK(std::abs(all.loss - whole.loss) < 1e-13);
}

// --- checkpoints: written by 2 processes, resumed on 1 and 3 ------------------------------

namespace test_data_parallel {

std::filesystem::path checkpoint_path() {
    const char* dir = std::getenv("LOWRANK_DIST_TEST_DIR");
    const std::filesystem::path d =
        dir ? dir : (std::filesystem::temp_directory_path() / "lowrank-test-dist");
    std::filesystem::create_directories(d);
    return d / "dp_checkpoint.safetensors";
}

// InRank grows its layers during the run, so the resume must restore the structure too.
const Policies checkpoint_policies = [](TrainingRun<double>& r) {
    r.add<InRank<double>>({.buffer = 2, .threshold = 0.99, .warmup = 2, .gap = 2, .two_stage = false});
};
RunOptions checkpoint_options() {
    RunOptions o;
    o.identity = {{"batch", kRows}, {"method", "inrank"}};
    return o;
}

}  // namespace test_data_parallel

TEST_CASE("dp: 2 processes train 4 steps and write a checkpoint", "[.checkpoint-save]") {
    REQUIRE(world().size() == 2);
    Replica dp(true, kRows, checkpoint_policies, checkpoint_options());
    for (int s = 0; s < 4; ++s) dp.step();
    dp.dp->check_replicas();
    if (dp.dp->is_root()) dp.run->save(checkpoint_path(), {{"written_by", world().size()}});
    world().barrier();
}

TEST_CASE("dp: a checkpoint of 2 processes resumes on this many and ends as one uninterrupted process",
          "[.checkpoint-resume]") {
    Replica dp(true, kRows, checkpoint_policies, checkpoint_options());
    const nlohmann::json extra = dp.run->resume(checkpoint_path());
    CHECK(extra.at("written_by") == 2);
    CHECK(dp.run->global_step() == 4);
    for (int s = 0; s < 4; ++s) dp.step();
    dp.dp->check_replicas();

    Replica one(false, kRows, checkpoint_policies, checkpoint_options());
    for (int s = 0; s < 8; ++s) one.step();
    REQUIRE(!one.run->rank_log().empty());
    CHECK(dp.run->rank_log().size() == one.run->rank_log().size());
    CHECK(max_difference(dp.values(), one.values()) < 1e-10);
}

// --- a process that fails or dies (hidden: dies_test.sh runs them and expects an error) -----

TEST_CASE("dp: the last process fails at step 2 while the others wait in the reduction", "[.dies-error]") {
    Replica dp(true, kRows, no_policy);
    for (int s = 0; s < 4; ++s) {
        try {
            if (s == 2 && world().rank() == world().size() - 1) throw Error("the test's failure at step 2");
            dp.step();
        } catch (const std::exception& e) {
            g_mpi->fail(e.what());  // what a trainer's catch block does
        }
    }
}

TEST_CASE("dp: the last process is killed at step 2 while the others wait in the reduction",
          "[.dies-signal]") {
    Replica dp(true, kRows, no_policy);
    for (int s = 0; s < 4; ++s) {
        if (s == 2 && world().rank() == world().size() - 1) std::raise(SIGKILL);
        dp.step();
    }
}

int main(int argc, char** argv) {
    MpiEnvironment mpi(&argc, &argv);
    g_mpi = &mpi;
    const int failed = Catch::Session().run(argc, argv);
    // One verdict for the job: a failure on any process fails every process.
    double any = failed == 0 ? 0.0 : 1.0;
    mpi.world().all_reduce_sum(std::span<double>(&any, 1));
    return any > 0.0 ? 1 : 0;
}
