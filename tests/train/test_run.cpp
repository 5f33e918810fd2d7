// TrainingRun: the order of a step, the counters and epochs, clipping and the schedule as
// a hand-written loop would apply them, non-finite handling, policies' claims on layers,
// save/resume bit for bit (and refused for another run, naming the key), the callbacks,
// and Module, the registry a user's own model takes a policy through.
#include <catch2/catch.hpp>

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/nn/module.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/optim/clip.hpp>
#include <lowrank/policy/policies.hpp>
#include <lowrank/train/callbacks.hpp>
#include <lowrank/train/run.hpp>

#include "../test_support.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_run {

using namespace lowrank;
using Catch::Matchers::Contains;

namespace {

// A batch of step s: 12 Gaussian rows and labels, from seed 1000 + s.
struct Batch {
    MatrixD x;
    std::vector<std::int32_t> y;
};
Batch batch_for(std::int64_t s, Index in = 6, Index classes = 3) {
    Batch b{test::gaussian(12, in, 1000 + static_cast<std::uint64_t>(s)), {}};
    Rng r(2000 + static_cast<std::uint64_t>(s));
    for (Index i = 0; i < b.x.rows(); ++i) b.y.push_back(static_cast<std::int32_t>(r.below(classes)));
    return b;
}

// A policy that writes down when each hook runs, and the counters it sees.
class Tracer : public RankPolicy<double> {
public:
    struct Options {
        std::vector<std::string>* trace = nullptr;
    };
    explicit Tracer(Options o) : trace_(o.trace) {}
    std::string_view name() const override { return "tracer"; }
    void on_train_begin(TrainingContext<double>& c) override { put("begin", c); }
    void before_forward(TrainingContext<double>& c) override { put("forward", c); }
    void after_backward(TrainingContext<double>& c) override { put("backward", c); }
    void after_step(TrainingContext<double>& c) override { put("step", c); }
    void on_epoch_end(TrainingContext<double>& c) override { put("epoch", c); }

private:
    void put(const char* hook, TrainingContext<double>& c) {
        trace_->push_back(std::string(hook) + "@" + std::to_string(c.step()) + "/" +
                          std::to_string(c.epoch()));
    }
    std::vector<std::string>* trace_;
};

struct Setup {
    std::vector<Index> sizes = {6, 10, 10, 3};
    double lr = 1e-2;
    RunOptions options{
        .schedule = LrSchedule(ScheduleOptions{
            .kind = ScheduleKind::warmup_cosine, .warmup_steps = 3, .total_steps = 40, .min_factor = 0.1}),
        .clip_grad_norm = 0.5};
    std::function<void(TrainingRun<double>&)> policies = [](TrainingRun<double>&) {};
};

// Model, AdamW (weights decayed, biases not), and the run.
struct Harness {
    Rng rng{7};
    Mlp<double> model;
    std::unique_ptr<AdamW<double>> opt;
    std::unique_ptr<TrainingRun<double>> run;

    explicit Harness(const Setup& s) : model(MlpOptions{.sizes = s.sizes}, rng) {
        ParameterList<double> weights, biases;
        for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
        opt = std::make_unique<AdamW<double>>(weights, AdamOptions{.lr = s.lr, .weight_decay = 0.1});
        opt->add_group(biases, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
        run = std::make_unique<TrainingRun<double>>(model, *opt, s.options);
        s.policies(*run);
    }

    StepResult step() {
        const Batch b = batch_for(run->global_step(), model.layers().front().in_features(),
                                  model.layers().back().out_features());
        return run->step(
            [&](Graph<double>& g) { return cross_entropy(g, model.forward(g, g.input(b.x)), b.y); });
    }
    void steps(std::int64_t n) {
        for (std::int64_t i = 0; i < n; ++i) step();
    }
    std::vector<MatrixD> values() {
        std::vector<MatrixD> out;
        for (auto* p : model.parameters()) out.push_back(p->value);
        return out;
    }
};

std::filesystem::path temp_path(const std::string& name) {
    const auto dir = std::filesystem::temp_directory_path() / "lowrank-test-run";
    std::filesystem::create_directories(dir);
    return dir / name;
}

bool bitwise_equal(const std::vector<MatrixD>& a, const std::vector<MatrixD>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (a[i].rows() != b[i].rows() || a[i].cols() != b[i].cols() ||
            std::memcmp(a[i].data(), b[i].data(), sizeof(double) * static_cast<std::size_t>(a[i].size())) !=
                0)
            return false;
    return true;
}

}  // namespace

TEST_CASE("run: a step calls the hooks in their order and the counters move between them", "[train][run]") {
    std::vector<std::string> trace;
    Setup s;
    s.options.steps_per_epoch = 2;
    s.policies = [&](TrainingRun<double>& r) { r.add<Tracer>({.trace = &trace}); };
    Harness h(s);
    bool loss_ran = false;
    h.run->step([&](Graph<double>& g) {
        trace.push_back("loss");
        loss_ran = true;
        const Batch b = batch_for(0);
        return cross_entropy(g, h.model.forward(g, g.input(b.x)), b.y);
    });
    REQUIRE(loss_ran);
    CHECK(trace == std::vector<std::string>{"begin@0/0", "forward@0/0", "loss", "backward@0/0", "step@1/0"});
    trace.clear();
    h.step();
    // The second step closes the epoch of two steps: on_epoch_end, then the next epoch.
    CHECK(trace == std::vector<std::string>{"forward@1/0", "backward@1/0", "step@2/0", "epoch@2/0"});
    CHECK(h.run->epoch() == 1);
    CHECK(h.run->steps_in_epoch() == 0);
    h.run->end_epoch();  // right after the boundary: nothing more happens
    CHECK(h.run->epoch() == 1);
    h.step();
    CHECK_THROWS_WITH(h.run->end_epoch(),
                      Contains("ends its epochs itself") && Contains("epoch 1 has run 1"));
}

TEST_CASE("run: peak_tape_bytes is the largest step's tape, read after each backward", "[train][run]") {
    Harness h(Setup{});
    CHECK(h.run->peak_tape_bytes() == 0);
    h.step();
    const std::size_t full = h.run->graph().tape_bytes();
    CHECK(full > 0);
    CHECK(h.run->peak_tape_bytes() == full);
    // A step on 3 rows records a smaller tape; the peak keeps the 12-row step's.
    const Batch b = batch_for(h.run->global_step());
    const MatrixD x = b.x.topRows(3);
    const std::vector<std::int32_t> y(b.y.begin(), b.y.begin() + 3);
    h.run->step([&](Graph<double>& g) { return cross_entropy(g, h.model.forward(g, g.input(x)), y); });
    CHECK(h.run->graph().tape_bytes() < full);
    CHECK(h.run->peak_tape_bytes() == full);
}

TEST_CASE("run: without steps_per_epoch the caller ends epochs", "[train][run]") {
    std::vector<std::string> trace;
    Setup s;
    s.policies = [&](TrainingRun<double>& r) { r.add<Tracer>({.trace = &trace}); };
    Harness h(s);
    h.steps(3);
    CHECK(h.run->epoch() == 0);
    h.run->end_epoch();
    CHECK(trace.back() == "epoch@3/0");
    CHECK(h.run->epoch() == 1);
}

TEST_CASE("run: the same trajectory as the loop written out by hand (clip, schedule, AdamW)",
          "[train][run]") {
    Setup s;
    Harness h(s);
    StepResult last;
    for (int i = 0; i < 12; ++i) last = h.step();

    Rng rng{7};
    Mlp<double> model(MlpOptions{.sizes = s.sizes}, rng);
    ParameterList<double> weights, biases;
    for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
    AdamW<double> opt(weights, AdamOptions{.lr = s.lr, .weight_decay = 0.1});
    opt.add_group(biases, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
    LrSchedule schedule = s.options.schedule;
    Graph<double> g;
    double norm = 0.0, loss_value = 0.0;
    for (std::int64_t step = 0; step < 12; ++step) {
        const Batch b = batch_for(step);
        g.clear();
        const auto loss = cross_entropy(g, model.forward(g, g.input(b.x)), b.y);
        loss_value = loss.item();
        opt.zero_grad();
        g.backward(loss);
        norm = clip_grad_norm(model.parameters(), 0.5);
        schedule.apply(opt, step);
        opt.step();
    }
    std::vector<MatrixD> expected;
    for (auto* p : model.parameters()) expected.push_back(p->value);
    CHECK(bitwise_equal(h.values(), expected));
    CHECK(last.step == 12);
    CHECK(last.loss == loss_value);
    CHECK(last.grad_norm == norm);
    CHECK(last.clipped == (norm > 0.5));
    CHECK(last.lr == s.lr * schedule.factor(11));
}

TEST_CASE("run: a non-finite loss stops the run naming the step and the parameter, or skips the step",
          "[train][run]") {
    SECTION("stop") {
        Setup s;
        Harness h(s);
        h.steps(2);
        h.model.parameters()[2]->value(0, 0) = std::numeric_limits<double>::quiet_NaN();
        CHECK_THROWS_WITH(h.step(), Contains("non-finite loss") && Contains("at step 2") &&
                                        Contains("parameter 'layers.1.weight' has non-finite values"));
    }
    SECTION("skip") {
        Setup s;
        s.options.on_non_finite = NonFinite::skip;
        Harness h(s);
        h.steps(2);
        const auto before = h.values();
        const StepResult r = h.run->step([&](Graph<double>& g) {
            const Batch b = batch_for(0);
            const auto loss = cross_entropy(g, h.model.forward(g, g.input(b.x)), b.y);
            return scale(g, loss, std::numeric_limits<double>::infinity());
        });
        CHECK(r.skipped);
        CHECK(h.run->global_step() == 2);
        CHECK(h.run->skipped_steps() == 1);
        CHECK(bitwise_equal(h.values(), before));
        h.step();
        CHECK(h.run->global_step() == 3);
    }
}

TEST_CASE("run: two policies on one layer is an error naming both and the layer", "[train][run]") {
    Setup s;
    s.policies = [](TrainingRun<double>& r) {
        r.add<Lora<double>>({.rank = 2, .select = {.pattern = "layers\\.[01]"}});
        r.add<Sst<double>>({.rank = 2, .select = {.pattern = "layers\\.1"}});
    };
    Harness h(s);
    CHECK_THROWS_WITH(h.run->begin(), Contains("sst") && Contains("'layers.1'") &&
                                          Contains("'lora' (policy 1") &&
                                          Contains("two policies cannot act on one layer"));
}

TEST_CASE("run: policies are added before the first step only", "[train][run]") {
    Harness h(Setup{});
    h.step();
    CHECK_THROWS_WITH(h.run->add<Lora<double>>({.rank = 2}), Contains("before the first step"));
}

TEST_CASE("run: save and resume continue bit for bit, for a policy that swaps layers", "[train][run]") {
    Setup s;
    s.options.steps_per_epoch = 4;
    s.options.identity = {{"method", "cuttlefish"}, {"seed", 7}};
    s.policies = [](TrainingRun<double>& r) {
        r.add<Cuttlefish<double>>(
            {.select = {.roles = {"hidden"}}, .window = 2, .tail = 1, .threshold = 1e9, .min_speedup = 1e-6});
    };
    Harness full(s);
    full.steps(20);
    REQUIRE(full.model.layers()[0].kind() == std::string("low_rank"));  // it did switch

    const auto path = temp_path("cuttlefish.safetensors");
    Harness first(s);
    first.steps(9);
    Rng data(123);
    first.run->track_rng("data", data);
    data.next_u64();
    first.run->save(path.string(), {{"note", "mine"}});

    Harness second(s);
    Rng data2(0);
    second.run->track_rng("data", data2);
    const nlohmann::json extra = second.run->resume(path.string());
    CHECK(extra == nlohmann::json{{"note", "mine"}});
    CHECK(data2.state().s == data.state().s);
    CHECK(second.run->global_step() == 9);
    CHECK(second.run->epoch() == 2);
    CHECK(second.run->steps_in_epoch() == 1);
    second.steps(11);
    CHECK(bitwise_equal(second.values(), full.values()));
    CHECK(second.run->rank_log().to_json() == full.run->rank_log().to_json());
}

// The optimizer state a checkpoint holds is the state of what the method trains, in the
// shapes it trains: nothing for a frozen base (LoRA), the factors and never the dense
// weight they replaced (Cuttlefish after its switch, SST), only the active columns
// (InRank's capacity). AdamW: two moments of rows x active columns per trained parameter.
TEST_CASE("run: a checkpoint's optimizer state covers only what the method trains, in its shapes",
          "[train][run]") {
    struct Case {
        const char* method;
        std::function<void(TrainingRun<double>&)> policies;
    };
    const std::vector<Case> cases{
        {"dense", [](TrainingRun<double>&) {}},
        {"lora", [](TrainingRun<double>& r) { r.add<Lora<double>>({.rank = 2}); }},
        {"cuttlefish",
         [](TrainingRun<double>& r) {
             r.add<Cuttlefish<double>>(
                 {.select = {.roles = {"hidden"}}, .window = 2, .tail = 1, .threshold = 1e9, .min_speedup = 1e-6});
         }},
        {"sst", [](TrainingRun<double>& r) { r.add<Sst<double>>({.rank = 2, .iteration_steps = 3, .rewarm_steps = 1}); }},
        {"inrank",
         [](TrainingRun<double>& r) {
             r.add<InRank<double>>({.initial_rank = 2, .buffer = 2, .warmup = 3, .gap = 2, .capacity = 5, .two_stage = false});
         }},
    };
    Index dense_state = 0;
    for (const Case& c : cases) {
        INFO("method " << c.method);
        Setup s;
        s.options.steps_per_epoch = 4;
        s.policies = c.policies;
        Harness h(s);
        h.steps(9);
        const auto path = temp_path(std::string(c.method) + "-state.safetensors");
        h.run->save(path.string());
        SafetensorsReader file(path.string());

        Index state = 0, frozen = 0, inactive = 0;
        for (const Parameter<double>* p : h.run->parameters()) {
            const Index elements = p->rows() * p->active_cols();
            for (const char* moment : {"exp_avg", "exp_avg_sq"}) {
                const std::string name = std::string("optimizer.") + moment + "." + p->name();
                INFO("parameter " << p->name());
                if (!p->trainable) {
                    CHECK_FALSE(file.contains(name));
                    continue;
                }
                REQUIRE(file.contains(name));
                std::int64_t n = 1;
                for (auto d : file.shape(name)) n *= d;
                CHECK(n == elements);
                state += static_cast<Index>(n);
            }
            if (!p->trainable) frozen += elements;
            inactive += p->rows() * (p->cols() - p->active_cols());
        }
        // Every state tensor belongs to a parameter the model has now and trains: none is
        // left over from a weight a policy replaced.
        std::set<std::string> trained_names;
        for (const Parameter<double>* p : h.run->parameters())
            if (p->trainable) trained_names.insert(p->name());
        Index state_tensors = 0;
        for (const auto& name : file.names()) {
            if (!name.starts_with("optimizer.")) continue;
            ++state_tensors;
            const std::string rest = name.substr(std::string("optimizer.").size());
            const std::string param = rest.substr(rest.find('.') + 1);
            INFO("state tensor " << name);
            CHECK(trained_names.count(param) == 1);
        }
        CHECK(state_tensors == 2 * static_cast<Index>(trained_names.size()));
        const std::string method = c.method;
        if (method == "dense") dense_state = state;
        if (method == "lora") CHECK(frozen > 0);      // the bases: weights in the file, no state
        if (method == "inrank") CHECK(inactive > 0);  // the capacity beyond the active columns
        if (method == "cuttlefish") REQUIRE(h.model.layers()[0].kind() == std::string("low_rank"));  // switched
        if (method == "lora" || method == "inrank") CHECK(state < dense_state);
    }
}

TEST_CASE("run: resume refuses another run, naming the key and both values", "[train][run]") {
    Setup s;
    s.options.identity = {{"method", "lora"}};
    s.policies = [](TrainingRun<double>& r) {
        r.add<Lora<double>>({.rank = 2, .select = {.roles = {"hidden"}}});
    };
    Harness a(s);
    a.steps(3);
    const auto path = temp_path("lora.safetensors");
    a.run->save(path.string());

    SECTION("the caller's key") {
        Setup t = s;
        t.options.identity = {{"method", "relora"}};
        Harness b(t);
        CHECK_THROWS_WITH(b.run->resume(path.string()),
                          Contains("'method': the checkpoint has \"lora\", this run has \"relora\""));
        CHECK_THROWS_WITH(b.step(), Contains("a resume failed"));
    }
    SECTION("a key of 100 KB that this run does not have: named by a short excerpt") {
        const nlohmann::json saved = {{std::string(100000, 'k'), 1}};
        const std::string d = detail::identity_difference(saved, nlohmann::json::object(), "", {});
        CHECK_THAT(d, Contains("'kkkk") && Contains("(100000 bytes)': the checkpoint has 1, this run has null"));
        CHECK(d.size() < 300);
    }
    SECTION("a derived key: the clip norm") {
        Setup t = s;
        t.options.clip_grad_norm = 1.0;
        Harness b(t);
        CHECK_THROWS_WITH(b.run->resume(path.string()),
                          Contains("'clip_grad_norm': the checkpoint has 0.5, this run has 1.0"));
    }
    SECTION("the schedule's length, unless allowed") {
        Setup t = s;
        t.options.schedule = LrSchedule(ScheduleOptions{
            .kind = ScheduleKind::warmup_cosine, .warmup_steps = 3, .total_steps = 80, .min_factor = 0.1});
        Harness b(t);
        CHECK_THROWS_WITH(b.run->resume(path.string()),
                          Contains("'schedule.total_steps': the checkpoint has 40, this run has 80"));
        Harness c(t);
        CHECK_NOTHROW(c.run->resume(path.string(), {.allow_changed = {"schedule", "total_steps"}}));
        CHECK(c.run->global_step() == 3);
    }
    SECTION("the rank") {
        Setup t = s;
        t.policies = [](TrainingRun<double>& r) {
            r.add<Lora<double>>({.rank = 3, .select = {.roles = {"hidden"}}});
        };
        Harness b(t);
        CHECK_THROWS_WITH(
            b.run->resume(path.string()),
            Contains("'parameters.layers.0.U': the checkpoint has [10,2,true], this run has [10,3,true]"));
    }
    SECTION("a checkpoint past the run's end") {
        Setup shorter = s;
        shorter.options.total_steps = 2;
        Harness c(shorter);
        CHECK_THROWS_WITH(c.run->resume(path.string(), {.allow_changed = {"total_steps"}}),
                          Contains("at step 3, past this run's total_steps 2"));
    }
    SECTION("after a step") {
        Harness b(s);
        b.step();
        CHECK_THROWS_WITH(b.run->resume(path.string()), Contains("before its first step"));
    }
}

TEST_CASE("run: callbacks: every n steps, metrics, checkpoints keeping the last K, early stopping",
          "[train][run]") {
    Setup s;
    Harness h(s);
    std::vector<std::int64_t> seen;
    h.run->every(3, [&](TrainingRun<double>&, const StepResult& r) { seen.push_back(r.step); });
    const auto dir = temp_path("checkpoints");
    std::filesystem::remove_all(dir);
    auto& ckpt = h.run->attach<CheckpointEvery<double>>(
        CheckpointEvery<double>::Options{.dir = dir, .every = 2, .keep_last = 2});
    const auto metrics_path = temp_path("metrics.jsonl");
    MetricsLog log(metrics_path);
    h.run->attach<MetricsEvery<double>>(log, 4);
    int calls = 0;
    h.run->attach<EarlyStopping<double>>(
        1, [&](TrainingRun<double>&) { return ++calls < 3 ? 1.0 / calls : 5.0; }, 2);
    while (!h.run->should_stop()) h.step();
    CHECK(h.run->global_step() == 4);  // improved at 1, 2; worse at 3, 4: stop
    CHECK_THROWS_WITH(h.step(), Contains("asked to stop") && Contains("early stopping"));
    h.run->finish();
    CHECK(seen == std::vector<std::int64_t>{3});
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(dir))
        names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    CHECK(names == std::vector<std::string>{"checkpoint-step00000002.safetensors",
                                            "checkpoint-step00000004.safetensors"});
    CHECK(ckpt.latest().filename() == "checkpoint-step00000004.safetensors");
    log.close();
    std::ifstream in(metrics_path);
    std::string line;
    std::getline(in, line);
    CHECK_THAT(line, Contains("\"step\":4") && Contains("\"grad_norm\":") && Contains("\"ms_per_step\":"));
}

TEST_CASE("run: what a run writes is checked before its first step", "[train][run]") {
    CHECK_THROWS_WITH(check_writable("/nonexistent-folder/x.safetensors", "--save"),
                      Contains("--save") && Contains("'/nonexistent-folder' does not exist"));
    CHECK_THROWS_WITH(check_writable(std::filesystem::temp_directory_path(), "--save"),
                      Contains("expected a file, got a directory"));
    CHECK_THROWS_WITH(CheckpointEvery<double>(CheckpointEvery<double>::Options{.dir = "/proc/no/such"}),
                      Contains("CheckpointEvery") && Contains("/proc/no/such"));
}

TEST_CASE("module: a user's model registers its slots by name and takes two policies", "[train][module]") {
    struct Net : Module<double> {
        AnyLinear<double>& fc1;
        AnyLinear<double>& fc2;
        AnyLinear<double>& head;
        explicit Net(Rng& rng)
            : fc1(linear("fc1", 6, 12, rng)),
              fc2(linear("fc2", 12, 12, rng)),
              head(linear("head", 12, 3, rng)) {}
        Var<double> forward(Graph<double>& g, const Var<double>& x) {
            return head.forward(g, relu(g, fc2.forward(g, relu(g, fc1.forward(g, x)))));
        }
    };
    Rng rng(3);
    Net net(rng);
    CHECK_THROWS_WITH(net.linear("fc1", 2, 2, rng), Contains("'fc1' is taken"));
    AdamW<double> opt(net.parameters(), AdamOptions{.lr = 1e-2});
    TrainingRun<double> run(net, opt, {.steps_per_epoch = 2});
    run.add<Lora<double>>({.rank = 2, .select = {.pattern = "fc1"}});
    run.add<Cuttlefish<double>>(
        {.select = {.pattern = "fc2"}, .window = 2, .tail = 1, .threshold = 1e9, .min_speedup = 1e-6});
    run.begin();
    CHECK(net.fc1.kind() == std::string("low_rank"));
    for (int i = 0; i < 12; ++i) {
        const Batch b = batch_for(i);
        run.step([&](Graph<double>& g) { return cross_entropy(g, net.forward(g, g.input(b.x)), b.y); });
    }
    CHECK(net.fc2.kind() == std::string("low_rank"));  // Cuttlefish switched it
    // parameters() follows the swap, and the run re-read it.
    bool has_factor = false;
    for (const auto* p : run.parameters()) has_factor = has_factor || p->name() == "fc2.U";
    CHECK(has_factor);
    CHECK(run.parameters().size() == net.parameters().size());
    CHECK_FALSE(run.rank_log().empty());
}

}  // namespace test_run

namespace test_run {

// The README's ten-line program, on Gaussian blobs instead of Fashion-MNIST: it must run
// as written, and Cuttlefish must have switched the hidden layers by the end.
TEST_CASE("run: the README's program trains and its policy switches the hidden layers", "[train][run]") {
    Rng data_rng(11);
    std::vector<std::pair<lowrank::Matrix<float>, std::vector<std::int32_t>>> batches;
    for (int b = 0; b < 8; ++b) {
        lowrank::Matrix<float> x(32, 784);
        std::vector<std::int32_t> y(32);
        for (Index i = 0; i < 32; ++i) {
            y[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(data_rng.below(10));
            for (Index j = 0; j < 784; ++j)
                x(i, j) = static_cast<float>(data_rng.normal() +
                                             (j % 10 == y[static_cast<std::size_t>(i)] ? 2.0 : 0.0));
        }
        batches.emplace_back(std::move(x), std::move(y));
    }
    const auto steps_per_epoch = static_cast<std::int64_t>(batches.size());
    const auto path = temp_path("mlp.safetensors");

    lowrank::Rng rng(0);
    lowrank::Mlp<float> model({.sizes = {784, 256, 256, 10}}, rng);
    lowrank::AdamW<float> opt(model.parameters(), {.lr = 1e-3, .weight_decay = 0.01});
    lowrank::TrainingRun<float> run(model, opt, {.clip_grad_norm = 1.0, .steps_per_epoch = steps_per_epoch});
    run.add<lowrank::Cuttlefish<float>>(
        {.select = {.roles = {"hidden"}}});  // dense, then LowRankLinear at the stable rank
    for (int epoch = 0; epoch < 10; ++epoch)
        for (auto& [x, y] : batches)
            run.step([&](lowrank::Graph<float>& g) {
                return lowrank::cross_entropy(g, model.forward(g, g.input(x)), y);
            });
    run.save(path.string());

    CHECK(model.layers()[0].kind() == std::string("low_rank"));
    CHECK(model.layers()[1].kind() == std::string("low_rank"));
    CHECK(run.last().loss < 0.5);
    CHECK(run.global_step() == 80);
    CHECK(std::filesystem::exists(path));
}

TEST_CASE("run: a non-finite weight before the first step is refused naming it", "[train][run]") {
    Harness h(Setup{});
    h.model.parameters()[1]->value(0, 0) = std::numeric_limits<double>::infinity();
    CHECK_THROWS_WITH(h.run->begin(), Contains("parameter 'layers.0.bias' has non-finite values before the first step"));
}

}  // namespace test_run
