// Resuming: for every policy, a TrainingRun saved to a file after K steps (run.save) and
// resumed from it (run.resume) in a freshly built model, optimizer and run continues bit
// for bit as the uninterrupted run: the same parameters, the same rank log (the saved
// events and the later ones) and the same policy state. And restore refuses states it
// cannot take, with messages that say why.
#include <catch2/catch.hpp>

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/policy/policies.hpp>
#include <lowrank/train/run.hpp>

#include <nlohmann/json.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <unistd.h>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_resume {

using namespace lowrank;
using Json = nlohmann::json;

namespace {

// How to build one run: a name for its checkpoint files, the MLP, the lr, the epoch length,
// the policies (the same in the original and the resumed run) and what the original run
// does to its model right after on_train_begin (part of its history, which the resumed run
// gets from the checkpoint).
struct Setup {
    std::string name;
    std::vector<Index> sizes = {6, 10, 10, 3};
    double lr = 1e-2;
    std::int64_t steps_per_epoch = 1000;
    std::function<void(PolicyList<double>&)> policies;
    std::function<void(Mlp<double>&)> prepare = {};
};

// A model, AdamW (weights decayed in group 0, biases in group 1) and a TrainingRun with a
// warm-up + cosine schedule, epochs of `steps_per_epoch` steps and the policies, begun
// (on_train_begin has run). Step s trains on a batch drawn from seed 1000 + s, so two runs
// at the same step see the same data.
struct Run {
    Rng rng{7};
    Mlp<double> model;
    std::unique_ptr<AdamW<double>> opt;
    std::unique_ptr<TrainingRun<double>> training;

    explicit Run(const Setup& setup) : model(MlpOptions{.sizes = setup.sizes}, rng) {
        ParameterList<double> weights, biases;
        for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
        opt = std::make_unique<AdamW<double>>(weights, AdamOptions{.lr = setup.lr, .weight_decay = 0.1});
        opt->add_group(biases, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
        training = std::make_unique<TrainingRun<double>>(
            model, *opt,
            RunOptions{.schedule = LrSchedule(ScheduleOptions{.kind = ScheduleKind::warmup_cosine,
                                                              .warmup_steps = 3,
                                                              .total_steps = 80,
                                                              .min_factor = 0.1}),
                       .steps_per_epoch = setup.steps_per_epoch});
        PolicyList<double> list;
        setup.policies(list);
        training->add(std::move(list));
        training->begin();
    }

    void step() {
        const Index in = model.layers().front().in_features(), out = model.layers().back().out_features();
        Rng data(1000 + static_cast<std::uint64_t>(training->global_step()));
        MatrixD x(12, in);
        init::normal<double>(x, data);
        std::vector<std::int32_t> y;
        for (Index i = 0; i < x.rows(); ++i)
            y.push_back(static_cast<std::int32_t>(data.below(static_cast<std::uint64_t>(out))));
        training->step([&](Graph<double>& g) { return cross_entropy(g, model.forward(g, g.input(x)), y); });
    }

    void steps(std::int64_t n) {
        for (std::int64_t i = 0; i < n; ++i) step();
    }

    PolicyList<double>& policies() { return training->policies(); }
    TrainingContext<double>& ctx() { return training->context(); }
    const RankLog& log() const { return training->rank_log(); }

    std::map<std::string, Parameter<double>*> by_name() {
        std::map<std::string, Parameter<double>*> out;
        for (auto* p : model.parameters()) out.emplace(p->name(), p);
        return out;
    }

    std::vector<RankEvent> events_from(std::size_t first) const {
        return {log().events().begin() + static_cast<std::ptrdiff_t>(first), log().events().end()};
    }
    bool has_event(const std::string& kind) const {
        for (const auto& e : log().events())
            if (e.event == kind) return true;
        return false;
    }
};

// A checkpoint file in the temp folder's lowrank-test-resume/, removed when the test is
// done. The process id keeps concurrent test processes apart.
class TempCheckpoint {
public:
    explicit TempCheckpoint(const std::string& name) {
        const auto dir = std::filesystem::temp_directory_path() / "lowrank-test-resume";
        std::filesystem::create_directories(dir);
        path_ = (dir / (name + "-" + std::to_string(::getpid()) + ".safetensors")).string();
    }
    ~TempCheckpoint() {
        std::error_code ec;
        std::filesystem::remove(path_, ec);
    }
    TempCheckpoint(const TempCheckpoint&) = delete;
    TempCheckpoint& operator=(const TempCheckpoint&) = delete;
    const std::string& path() const { return path_; }

private:
    std::string path_;
};

// Every parameter's name, shape, active columns, trainable flag and optimizer group, and
// the groups' names, lr and weight decay: what a strict checkpoint load requires.
Json structure_of(Run& run) {
    Json params = Json::array();
    for (auto* p : run.model.parameters())
        params.push_back(
            {p->name(), p->rows(), p->cols(), p->active_cols(), p->trainable, run.opt->group_of(*p)});
    Json groups = Json::array();
    for (const auto& grp : run.opt->groups()) {
        Json names = Json::array();
        for (const auto* p : grp.params) names.push_back(p->name());
        groups.push_back({grp.options.name, grp.options.lr, grp.options.weight_decay, names});
    }
    return {{"parameters", params}, {"groups", groups}};
}

// What a trainer does on --resume: `saved` writes its run to the file, a fresh run (model,
// optimizer, policies, on_train_begin) resumes from it. `before_resume` sees the fresh run
// before that (a control test takes a policy's fresh generator from it).
std::unique_ptr<Run> save_and_resume(Run& saved, const Setup& setup, const TempCheckpoint& file,
                                     const std::function<void(Run&)>& before_resume = {}) {
    saved.training->save(file.path());
    auto run = std::make_unique<Run>(setup);
    if (before_resume) before_resume(*run);
    run->training->resume(file.path());
    return run;
}

bool same_value(double a, double b) {
    return std::bit_cast<std::uint64_t>(a) == std::bit_cast<std::uint64_t>(b) ||
           (std::isnan(a) && std::isnan(b));
}

void check_same_events(const std::vector<RankEvent>& a, const std::vector<RankEvent>& b) {
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
        INFO("event " << i << ": " << RankLog::to_json(a[i]).dump() << " vs " << RankLog::to_json(b[i]).dump());
        CHECK(a[i].step == b[i].step);
        CHECK(a[i].epoch == b[i].epoch);
        CHECK(a[i].policy == b[i].policy);
        CHECK(a[i].layer == b[i].layer);
        CHECK(a[i].event == b[i].event);
        CHECK(a[i].old_rank == b[i].old_rank);
        CHECK(a[i].new_rank == b[i].new_rank);
        CHECK(a[i].statistic == b[i].statistic);
        CHECK(same_value(a[i].value, b[i].value));
    }
}

// The outcome of a save after K steps and N more steps on the original and on the resumed run.
struct Outcome {
    std::unique_ptr<Run> original, resumed;
    std::vector<RankEvent> later;  // the original run's events after the save
};

// Trains K steps, saves to a file, resumes from it, trains both N more steps, and checks
// that the resumed run is the original one: the structure and the counters right after the
// resume, every parameter bit for bit, the whole rank log (the restored events and the
// later ones) and the final policy state.
Outcome check_resume(const Setup& setup, std::int64_t k, std::int64_t n) {
    Outcome o;
    o.original = std::make_unique<Run>(setup);
    if (setup.prepare) setup.prepare(o.original->model);
    o.original->steps(k);
    const TempCheckpoint file(setup.name + "-after" + std::to_string(k));
    o.resumed = save_and_resume(*o.original, setup, file);
    CHECK(structure_of(*o.resumed) == structure_of(*o.original));
    CHECK(o.resumed->training->global_step() == k);
    CHECK(o.resumed->training->epoch() == o.original->training->epoch());
    CHECK(o.resumed->training->steps_in_epoch() == o.original->training->steps_in_epoch());
    CHECK(o.resumed->training->schedule().rewarm_state() == o.original->training->schedule().rewarm_state());
    const std::size_t mark = o.original->log().size();
    check_same_events(o.resumed->log().events(), o.original->log().events());

    o.original->steps(n);
    o.resumed->steps(n);
    auto a = o.original->by_name();
    auto b = o.resumed->by_name();
    REQUIRE(b.size() == a.size());
    for (auto& [name, p] : a) {
        INFO("parameter " << name);
        REQUIRE(b.count(name) == 1);
        REQUIRE(b.at(name)->rows() == p->rows());
        REQUIRE(b.at(name)->cols() == p->cols());
        CHECK(b.at(name)->value == p->value);  // bit for bit
    }
    CHECK(structure_of(*o.resumed) == structure_of(*o.original));
    o.later = o.original->events_from(mark);
    check_same_events(o.resumed->events_from(mark), o.later);
    check_same_events(o.resumed->log().events(), o.original->log().events());
    CHECK(o.resumed->policies().state().dump() == o.original->policies().state().dump());
    return o;
}

std::size_t count(const std::vector<RankEvent>& events, const std::string& kind) {
    std::size_t n = 0;
    for (const auto& e : events) n += e.event == kind ? 1 : 0;
    return n;
}

// An m x n matrix with singular values 1 and sqrt(1/2) (stable rank 1.5) in random bases.
MatrixD stable_rank_one(Index m, Index n, std::uint64_t seed) {
    Rng rng(seed);
    MatrixD a(m, 2), b(n, 2);
    init::normal<double>(a, rng);
    init::normal<double>(b, rng);
    const MatrixD qa = linalg::orthonormalize_columns<double>(a),
                  qb = linalg::orthonormalize_columns<double>(b);
    return qa * Eigen::Vector2d(1.0, std::sqrt(0.5)).asDiagonal() * qb.transpose();
}

Setup lora_setup() {
    return {.name = "lora", .policies = [](PolicyList<double>& l) {
                l.add<Lora<double>>(LoraOptions{.rank = 3, .seed = 11});
            }};
}

Setup relora_setup() {
    return {.name = "relora", .policies = [](PolicyList<double>& l) {
                l.add<ReLora<double>>(ReLoraOptions{.rank = 3, .seed = 12, .period = 4, .rewarm_steps = 2});
            }};
}

Setup inrank_setup(bool keep_base = false) {
    return {.name = keep_base ? "inrank-base" : "inrank",
            .sizes = {16, 24, 24, 4},
            .policies = [keep_base](PolicyList<double>& l) {
                l.add<InRank<double>>(InRankOptions{.initial_rank = 1,
                                                    .buffer = 3,
                                                    .warmup = 1,
                                                    .gap = 2,
                                                    .keep_base = keep_base,
                                                    .stage1_steps = 9,
                                                    .seed = 13});
            }};
}

Setup cuttlefish_setup(std::int64_t track_every_steps, double rewarm_start = 0.0) {
    return {.name = "cuttlefish-every" + std::to_string(track_every_steps) + (rewarm_start > 0.0 ? "-ramp" : ""),
            .sizes = {16, 16, 16, 4},
            .lr = 1e-3,
            .steps_per_epoch = 3,
            .policies =
                [track_every_steps, rewarm_start](PolicyList<double>& l) {
                    l.add<Cuttlefish<double>>(CuttlefishOptions{
                        .track_every_steps = track_every_steps, .rewarm_steps = 2, .rewarm_start = rewarm_start});
                },
            // Trained-looking hidden weights whose stable ranks stay put: a switch at rank < d.
            .prepare =
                [](Mlp<double>& m) {
                    m.layers()[0].get<Linear<double>>().weight.value = stable_rank_one(16, 16, 41);
                    m.layers()[1].get<Linear<double>>().weight.value = stable_rank_one(16, 16, 43);
                }};
}

// The newer options: the initial weight in the history, the vanilla rank, the output layer
// tracked but not factorized, the factors at twice the lr and every state reset at the switch.
Setup cuttlefish_options_setup(double factor_lr_scale = 2.0) {
    return {.name = "cuttlefish-options",
            .sizes = {16, 16, 16, 4},
            .lr = 1e-3,
            .steps_per_epoch = 3,
            .policies =
                [factor_lr_scale](PolicyList<double>& l) {
                    l.add<Cuttlefish<double>>(CuttlefishOptions{.track_select = LayerSelector{.pattern = ".*"},
                                                                .window = 2,
                                                                .tail = 1,
                                                                .track_every_steps = 2,
                                                                .rewarm_steps = 2,
                                                                .init_in_history = true,
                                                                .rank_rule = CuttlefishRankRule::vanilla,
                                                                .factor_lr_scale = factor_lr_scale,
                                                                .reset_optimizer_at_switch = true});
                },
            .prepare =
                [](Mlp<double>& m) {
                    m.layers()[0].get<Linear<double>>().weight.value = stable_rank_one(16, 16, 41);
                    m.layers()[1].get<Linear<double>>().weight.value = stable_rank_one(16, 16, 43);
                    m.layers()[2].get<Linear<double>>().weight.value = stable_rank_one(4, 16, 45);
                }};
}

Setup sst_setup() {
    return {.name = "sst", .sizes = {8, 12, 12, 3}, .policies = [](PolicyList<double>& l) {
                l.add<Sst<double>>(SstOptions{
                    .rank = 2, .iteration_steps = 3, .round_iterations = 2, .rewarm_steps = 1, .seed = 14});
            }};
}

// The newer options: sequential sampling (whose pair numbering the state carries) with the
// re-warm on the spectral group alone, and sigma alone.
Setup sst_options_setup(SstSampling sampling = SstSampling::sequential, bool sigma_only = false) {
    return {.name = sigma_only ? "sst-sigma-only" : "sst-options",
            .sizes = {8, 12, 12, 3},
            .policies = [sampling, sigma_only](PolicyList<double>& l) {
                l.add<Sst<double>>(SstOptions{.rank = 2,
                                              .sampling = sampling,
                                              .iteration_steps = 3,
                                              .rewarm_steps = 2,
                                              .seed = 14,
                                              .sigma_only = sigma_only,
                                              .rewarm_scope = SstRewarmScope::spectral});
            }};
}

// The initialisation ablation: random bases, sigma from the weight's SVD.
Setup sst_init_setup(SstInit init) {
    return {.name = init == SstInit::random ? "sst-random-init" : "sst-svd-init",
            .sizes = {8, 12, 12, 3},
            .policies = [init](PolicyList<double>& l) {
                l.add<Sst<double>>(SstOptions{
                    .rank = 2, .iteration_steps = 3, .round_iterations = 2, .rewarm_steps = 1, .seed = 14, .init = init});
            }};
}

Setup deep_lora_setup(double gamma = 0.01) {
    return {.name = gamma > 0.0 ? "deeplora" : "deeplora-gamma0",
            .sizes = {8, 12, 12, 3},
            .policies = [gamma](PolicyList<double>& l) {
                l.add<DeepLora<double>>(
                    DeepLoraOptions{.rank = 2, .gamma = gamma, .compress = true, .seed = 15});
            }};
}

// A policy without state()/restore(): the defaults.
class Stateless : public RankPolicy<double> {
public:
    std::string_view name() const override { return "stateless"; }
};

}  // namespace

TEST_CASE("Lora resumes exactly", "[policy][resume][lora]") {
    const Outcome o = check_resume(lora_setup(), 3, 4);
    CHECK(o.original->policies().state()[0]["state"]["layers"].size() == 2);
}

TEST_CASE("ReLora resumes exactly after a restart: counters and the V generator",
          "[policy][resume][relora]") {
    const Outcome o = check_resume(relora_setup(), 6, 7);
    auto& policy = dynamic_cast<ReLora<double>&>(o.resumed->policies()[0]);
    CHECK(policy.restarts() == 3);              // at 4 (before the save), 8 and 12
    CHECK(count(o.later, "restart") == 2 * 2);  // two layers, two restarts after the save
    CHECK(o.resumed->training->schedule().rewarm_state().at_step == 12);
}

TEST_CASE("A resumed ReLora without its restored generator diverges at the next restart",
          "[policy][resume][relora]") {
    // The control: the comparison of check_resume is sharp enough to see a missed state.
    // The resumed run gets everything back but the generator, which is left as the fresh
    // policy's on_train_begin left it.
    const Setup setup = relora_setup();
    Run original(setup);
    original.steps(6);
    const TempCheckpoint file("relora-control");
    Rng::State fresh;
    auto resumed = save_and_resume(original, setup, file, [&](Run& r) {
        fresh = dynamic_cast<ReLora<double>&>(r.policies()[0]).rng().state();
    });
    auto& policy = dynamic_cast<ReLora<double>&>(resumed->policies()[0]);
    REQUIRE(policy.rng().state() != fresh);  // the resume did restore it
    policy.rng().set_state(fresh);
    original.steps(4);
    resumed->steps(4);
    CHECK(resumed->model.layers()[0].get<LowRankLinear<double>>().V.value !=
          original.model.layers()[0].get<LowRankLinear<double>>().V.value);
}

TEST_CASE("InRank resumes exactly in stage 1 after a grow, through the next checks and the truncation",
          "[policy][resume][inrank]") {
    for (const bool keep_base : {false, true}) {
        INFO("keep_base = " << keep_base);
        Run probe(inrank_setup(keep_base));
        probe.steps(5);
        REQUIRE(probe.has_event("grow"));  // the save comes after a grow
        const Outcome o = check_resume(inrank_setup(keep_base), 5, 8);
        auto& policy = dynamic_cast<InRank<double>&>(o.resumed->policies()[0]);
        CHECK(policy.stage() == 2);
        CHECK(count(o.later, "truncate") == 2);
        CHECK(policy.checks() == 4);  // after steps 3, 5 (before the save), 7 and 9; none in stage 2
    }
}

TEST_CASE("InRank resumes exactly in stage 2, at the truncated shapes", "[policy][resume][inrank]") {
    for (const bool keep_base : {false, true}) {
        INFO("keep_base = " << keep_base);
        const Outcome o = check_resume(inrank_setup(keep_base), 11, 5);
        auto& policy = dynamic_cast<InRank<double>&>(o.resumed->policies()[0]);
        CHECK(policy.stage() == 2);
        const auto& l = o.resumed->model.layers()[0].get<IncrementalRankLinear<double>>();
        CHECK(l.U.cols() == policy.layers()[0].rank);  // the capacity was freed
        CHECK(policy.layers()[0].rank > 1);            // it grew in stage 1
        CHECK(l.capacity() == l.rank());
    }
}

TEST_CASE("Cuttlefish resumes exactly before and after its switch, tracking by steps and by epochs",
          "[policy][resume][cuttlefish]") {
    // Step-based points at 2, 4, 6 (the switch); epoch-based at 3, 6, 9 (the switch).
    struct Case {
        std::int64_t every, k, n, switch_step;
    };
    for (const Case c : {Case{2, 3, 6, 6}, Case{2, 7, 6, 6}, Case{0, 4, 8, 9}, Case{0, 10, 4, 9}}) {
        INFO("track_every_steps = " << c.every << ", saved after " << c.k << " steps");
        const Outcome o = check_resume(cuttlefish_setup(c.every), c.k, c.n);
        auto& policy = dynamic_cast<Cuttlefish<double>&>(o.resumed->policies()[0]);
        REQUIRE(policy.switched());
        CHECK(policy.switch_step() == c.switch_step);
        CHECK(count(o.later, "switch") == (c.k < c.switch_step ? 2u : 0u));
        for (std::size_t i = 0; i < 2; ++i) {
            CHECK(policy.layers()[i].factorized);
            CHECK(policy.layers()[i].rank < 16);
            CHECK(o.resumed->model.layers()[i].rank() == policy.layers()[i].rank);
            CHECK(policy.layers()[i].history.size() == 3);
        }
        REQUIRE(policy.factor_group().has_value());
        CHECK(o.resumed->opt->group(*policy.factor_group()).options.name == "cuttlefish.factors");
    }
}

TEST_CASE("Cuttlefish's re-warm-up from a quarter of the lr resumes in the middle of its ramp",
          "[policy][resume][cuttlefish]") {
    // The switch at step 6 starts a 2-step ramp from 0.25: saved after 7 steps, one step of it is left.
    const Outcome o = check_resume(cuttlefish_setup(2, 0.25), 7, 4);
    const auto& rw = o.resumed->training->schedule().rewarm_state();
    CHECK(rw.length == 2);
    CHECK(rw.start == 0.25);
    CHECK(dynamic_cast<Cuttlefish<double>&>(o.resumed->policies()[0]).switch_step() == 6);
}

TEST_CASE("Cuttlefish resumes exactly with its newer options, before and after the switch",
          "[policy][resume][cuttlefish]") {
    for (const std::int64_t k : {std::int64_t{3}, std::int64_t{9}}) {
        INFO("saved after " << k << " steps");
        const Outcome o = check_resume(cuttlefish_options_setup(), k, 6);
        auto& policy = dynamic_cast<Cuttlefish<double>&>(o.resumed->policies()[0]);
        REQUIRE(policy.switched());
        REQUIRE(policy.layers().size() == 3);
        CHECK(policy.layers()[0].factorized);
        CHECK(policy.layers()[0].rank == 1);  // vanilla: floor(1.5)
        CHECK_FALSE(policy.layers()[2].factorizable);
        CHECK(std::string(o.resumed->model.layers()[2].kind()) == "dense");
        REQUIRE(policy.factor_group().has_value());
        CHECK(o.resumed->opt->group(*policy.factor_group()).options.lr == 2e-3);
    }
}

TEST_CASE("Cuttlefish refuses a resume under other options", "[policy][resume][cuttlefish][errors]") {
    Run original(cuttlefish_options_setup(2.0));
    original.steps(1);
    const TempCheckpoint file("cuttlefish-other-scale");
    CHECK_THROWS_WITH(save_and_resume(original, cuttlefish_options_setup(1.0), file),
                      Catch::Matchers::Contains("option factor_lr_scale is 1.0 here but 2.0 in the saved run"));
}

TEST_CASE("Sst resumes exactly mid-iteration after a re-SVD and at an iteration start",
          "[policy][resume][sst]") {
    // Iterations of 3 steps, rounds of 2: samples at 0, 3, 6, ...; re-SVDs after 6, 12, ...
    for (const std::int64_t k : {std::int64_t{7}, std::int64_t{9}}) {
        INFO("saved after " << k << " steps");
        Run probe(sst_setup());
        probe.steps(k);
        REQUIRE(probe.has_event("resvd"));
        const Outcome o = check_resume(sst_setup(), k, 8);
        CHECK(count(o.later, "sample") >= 2 * 2);
        CHECK(count(o.later, "resvd") == 2);  // at 12 (and 18 is beyond)
        auto& policy = dynamic_cast<Sst<double>&>(o.resumed->policies()[0]);
        CHECK(policy.sampled(0).size() == 2);
    }
}

TEST_CASE("Sst resumes exactly with sequential sampling, the spectral re-warm and sigma alone",
          "[policy][resume][sst]") {
    // T2 = ceil(8 / 2) = 4 and ceil(12 / 2) = 6: a re-SVD of layer 0 after step 12.
    for (const std::int64_t k : {std::int64_t{4}, std::int64_t{10}, std::int64_t{13}}) {
        INFO("saved after " << k << " steps");
        const Outcome o = check_resume(sst_options_setup(), k, 6);
        auto& policy = dynamic_cast<Sst<double>&>(o.resumed->policies()[0]);
        REQUIRE(policy.spectral_group().has_value());
        CHECK(o.resumed->opt->group(*policy.spectral_group()).options.lr ==
              o.original->opt->group(*policy.spectral_group()).options.lr);
    }
    const Outcome o = check_resume(sst_options_setup(SstSampling::mixed, true), 4, 4);
    CHECK(count(o.later, "sample") == 0);
}

TEST_CASE("Sst refuses a resume under other options", "[policy][resume][sst][errors]") {
    Run original(sst_options_setup(SstSampling::sequential));
    original.steps(4);
    const TempCheckpoint file("sst-other-sampling");
    CHECK_THROWS_WITH(save_and_resume(original, sst_options_setup(SstSampling::top), file),
                      Catch::Matchers::Contains("option sampling is top here but sequential in the saved run"));
    // sigma_only: the run refuses the checkpoint first (U, V trainable there, frozen here);
    // the policy's own state names the option.
    Run sigma(sst_options_setup(SstSampling::mixed, true));
    sigma.steps(2);
    const TempCheckpoint other("sst-other-sigma-only");
    CHECK_THROWS_WITH(save_and_resume(sigma, sst_options_setup(SstSampling::mixed, false), other),
                      Catch::Matchers::Contains("layers.0.U_active") && Catch::Matchers::Contains("[12,2,false]"));
    Run trained(sst_options_setup(SstSampling::mixed, false));
    CHECK_THROWS_WITH(trained.policies()[0].restore(trained.ctx(), sigma.policies()[0].state()),
                      Catch::Matchers::Contains("option sigma_only is false here but true in the saved run"));
}

TEST_CASE("Sst with init random resumes exactly and refuses a resume under init svd", "[policy][resume][sst]") {
    // Before and after the first re-SVD (after step 6): the random bases come back with the
    // parameter values, not from a second draw.
    for (const std::int64_t k : {std::int64_t{4}, std::int64_t{7}}) {
        INFO("saved after " << k << " steps");
        const Outcome o = check_resume(sst_init_setup(SstInit::random), k, 6);
        CHECK(count(o.later, "resvd") >= 2);
    }
    Run random(sst_init_setup(SstInit::random));
    random.steps(2);
    Run svd(sst_init_setup(SstInit::svd));
    CHECK_THROWS_WITH(svd.policies()[0].restore(svd.ctx(), random.policies()[0].state()),
                      Catch::Matchers::Contains("option init is svd here but random in the saved run"));
    // A state saved before the option existed counts as svd.
    nlohmann::json old = svd.policies()[0].state();
    old.erase("init");
    CHECK_NOTHROW(svd.policies()[0].restore(svd.ctx(), old));
    CHECK_THROWS_WITH(random.policies()[0].restore(random.ctx(), old),
                      Catch::Matchers::Contains("option init is random here but svd in the saved run"));
}

TEST_CASE("A resumed Sst without its restored generator draws other vectors", "[policy][resume][sst]") {
    // The control, as for ReLora: everything restored but the generator.
    const Setup setup = sst_setup();
    Run original(setup);
    original.steps(7);
    const TempCheckpoint file("sst-control");
    Rng::State fresh;
    auto resumed = save_and_resume(original, setup, file, [&](Run& r) {
        fresh = dynamic_cast<Sst<double>&>(r.policies()[0]).rng().state();
    });
    auto& policy = dynamic_cast<Sst<double>&>(resumed->policies()[0]);
    REQUIRE(policy.rng().state() != fresh);  // the resume did restore it
    policy.rng().set_state(fresh);
    original.steps(3);
    resumed->steps(3);
    CHECK(resumed->model.layers()[1].get<SpectralLinear<double>>().U_active.value !=
          original.model.layers()[1].get<SpectralLinear<double>>().U_active.value);
}

TEST_CASE("DeepLora resumes exactly after its compression, and before it", "[policy][resume][deeplora]") {
    for (const double gamma : {0.01, 0.0}) {
        INFO("gamma = " << gamma);
        const Outcome o = check_resume(deep_lora_setup(gamma), 3, 4);
        auto& policy = dynamic_cast<DeepLora<double>&>(o.resumed->policies()[0]);
        CHECK(policy.compressed());
        CHECK(policy.ranks() == std::vector<Index>{4, 4});
        CHECK(policy.layers()[0].output_side);  // layers.0 is 12 x 8
        CHECK(policy.outer_groups().size() == 1);
    }
    // Saved at step 0: the resumed run compresses at its first step, from the same gradient.
    const Outcome o = check_resume(deep_lora_setup(), 0, 3);
    CHECK(count(o.later, "compress") == 2);
    CHECK(dynamic_cast<DeepLora<double>&>(o.resumed->policies()[0]).compressed());
}

TEST_CASE("GaLore resumes exactly between refreshes and at one, with its bases and moments",
          "[policy][resume][galore]") {
    for (const bool reset : {false, true}) {
        INFO("reset_moments " << reset);
        const Setup setup{.name = reset ? "galore-reset" : "galore", .policies = [reset](PolicyList<double>& l) {
                              l.add<GaLore<double>>(GaLoreOptions{.rank = 3, .gap = 4, .scale = 0.5,
                                                                  .reset_moments = reset});
                          }};
        // Saved mid-interval (after 6 steps: the next refresh is the 9th step) and right
        // before a refresh (after 8).
        for (const std::int64_t k : {6, 8}) {
            INFO("saved after " << k << " steps");
            const Outcome o = check_resume(setup, k, 6);
            // Two layers, refreshed at the 9th step (and the 13th, in the run saved after 8).
            CHECK(count(o.later, "refresh") == 2 * (k == 6 ? 1 : 2));
            auto original = o.original->by_name();
            for (const auto* w : dynamic_cast<GaLore<double>&>(o.resumed->policies()[0]).weights()) {
                INFO(w->name());
                const auto* a = o.original->opt->state_of(*original.at(w->name()));
                const auto* b = o.resumed->opt->state_of(*w);
                REQUIRE((a != nullptr && b != nullptr));
                CHECK(b->projector == a->projector);
                CHECK(b->exp_avg == a->exp_avg);
                CHECK(b->exp_avg.rows() == 10);  // right side: 10 x 3 (layers.0, 10 x 6; layers.1, 10 x 10)
                CHECK(b->exp_avg.cols() == 3);
            }
        }
    }
}

TEST_CASE("GaLore refuses a resume with other options", "[policy][resume][galore][errors]") {
    const auto with_rank = [](Index r) {
        return Setup{.name = "galore-rank", .policies = [r](PolicyList<double>& l) {
                         l.add<GaLore<double>>(GaLoreOptions{.rank = r, .gap = 4});
                     }};
    };
    Run original(with_rank(3));
    original.steps(2);
    const TempCheckpoint file("galore-other-rank");
    CHECK_THROWS_WITH(save_and_resume(original, with_rank(2), file),
                      Catch::Matchers::Contains("galore: restore: key 'rank': the run was saved with 3, this run has 2"));
}

TEST_CASE("Policy states are JSON that round-trips through text, RNG words exactly", "[policy][resume]") {
    Run run(relora_setup());
    run.steps(5);
    const Json state = run.policies().state();
    REQUIRE(state.is_array());
    REQUIRE(state.size() == 1);
    CHECK(state[0]["policy"] == "relora");
    const Json& s = state[0]["state"];
    CHECK(s["policy"] == "relora");
    CHECK(s["version"] == 1);
    CHECK(s["restarts"] == 1);
    CHECK(s["last_restart"] == 4);
    const Json& words = s["rng"]["s"];
    REQUIRE(words.size() == 4);
    auto& policy = dynamic_cast<ReLora<double>&>(run.policies()[0]);
    for (std::size_t i = 0; i < 4; ++i) {
        const std::string w = words[i].get<std::string>();
        CHECK(w.size() == 18);
        CHECK(std::stoull(w.substr(2), nullptr, 16) == policy.rng().state().s[i]);
    }
    CHECK(Json::parse(state.dump()) == state);
    // The layer's structure: kind and every parameter's shape.
    const Json& st = s["layers"][0]["structure"];
    CHECK(st["kind"] == "low_rank");
    CHECK(st["parameters"][0]["name"] == "layers.0.U");
    CHECK(st["parameters"][0]["cols"] == 3);
}

TEST_CASE("restore refuses a state of another policy, other layers, missing or wrong keys",
          "[policy][resume][errors]") {
    Run sst_run(sst_setup());
    sst_run.steps(2);
    const Json sst_state = sst_run.policies().state();

    SECTION("another policy, through the list and directly") {
        Run lora(lora_setup());
        CHECK_THROWS_WITH(lora.policies().restore(lora.ctx(), sst_state),
                          Catch::Contains("PolicyList: restore") &&
                              Catch::Contains("expected policy 'lora'") && Catch::Contains("got 'sst'"));
        CHECK_THROWS_WITH(lora.policies()[0].restore(lora.ctx(), sst_state[0]["state"]),
                          Catch::Contains("lora: restore") && Catch::Contains("saved by policy 'sst'") &&
                              Catch::Contains("expected 'lora'"));
    }
    SECTION("another number of policies") {
        Run fresh(sst_setup());
        Json two = sst_state;
        two.push_back(sst_state[0]);
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), two),
                          Catch::Contains("expected 1 policy state(s) (sst)") && Catch::Contains("got 2"));
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), Json::object()),
                          Catch::Contains("expected an array"));
    }
    SECTION("another layer name") {
        Run fresh(sst_setup());
        Json bad = sst_state;
        bad[0]["state"]["layers"][1]["name"] = "layers.7";
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), bad),
                          Catch::Contains("sst: restore") && Catch::Contains("layers[1].name") &&
                              Catch::Contains("expected layer 'layers.1'") &&
                              Catch::Contains("got 'layers.7'"));
    }
    SECTION("other layers: a policy selecting one layer") {
        Setup one = sst_setup();
        one.policies = [](PolicyList<double>& l) {
            l.add<Sst<double>>(SstOptions{.rank = 2,
                                          .iteration_steps = 3,
                                          .round_iterations = 2,
                                          .rewarm_steps = 1,
                                          .select = {.pattern = "layers\\.0", .roles = {"hidden"}},
                                          .seed = 14});
        };
        Run fresh(one);
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), sst_state),
                          Catch::Contains("the state has 2 layer(s) (layers.0, layers.1)") &&
                              Catch::Contains("manages 1 (layers.0)"));
    }
    SECTION("a missing key") {
        Run fresh(sst_setup());
        Json bad = sst_state;
        bad[0]["state"].erase("rng");
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), bad),
                          Catch::Contains("sst: restore: missing key 'rng'"));
        bad = sst_state;
        bad[0]["state"]["layers"][0].erase("round_iterations");
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), bad),
                          Catch::Contains("missing key 'layers[0].round_iterations'"));
    }
    SECTION("a wrong type or value") {
        Run fresh(sst_setup());
        Json bad = sst_state;
        bad[0]["state"]["rng"]["s"][2] = -5;
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), bad),
                          Catch::Contains("key 'rng.s[2]'") && Catch::Contains("expected a 64-bit word") &&
                              Catch::Contains("got -5"));
        bad = sst_state;
        bad[0]["state"]["version"] = 2;
        CHECK_THROWS_WITH(
            fresh.policies().restore(fresh.ctx(), bad),
            Catch::Contains("sst: restore: key 'version': expected 1") && Catch::Contains("got 2"));
        bad = sst_state;
        bad[0]["state"]["layers"][0]["round_iterations"] = 5;
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), bad),
                          Catch::Contains("expected round_iterations (T2) = 2") && Catch::Contains("got 5"));
        bad = sst_state;
        bad[0]["state"]["layers"][0]["sampled"] = Json::array({0, 0});
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), bad),
                          Catch::Contains("distinct sampled positions"));
    }
    SECTION("a saved structure that does not fit") {
        Run fresh(sst_setup());
        Json bad = sst_state;
        bad[0]["state"]["layers"][0]["structure"]["parameters"][0]["cols"] = 3;
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), bad),
                          Catch::Contains("layer 'layers.0': parameter 0") &&
                              Catch::Contains("\"name\":\"layers.0.U_active\"") &&
                              Catch::Contains("(saved)") && Catch::Contains("after restoring"));
    }
    SECTION("before on_train_begin") {
        Sst<double> unstarted(SstOptions{.rank = 2});
        CHECK_THROWS_WITH(unstarted.restore(sst_run.ctx(), sst_state[0]["state"]),
                          Catch::Contains("before on_train_begin"));
    }
}

TEST_CASE("restore messages stay short on a hostile state: 10,000 entries, 100 KB names",
          "[policy][resume][errors][hostile]") {
    Run sst_run(sst_setup());
    sst_run.steps(2);
    const Json sst_state = sst_run.policies().state();
    Run fresh(sst_setup());
    const std::string big(100000, 'q');
    const auto message = [&](const Json& state) {
        try {
            fresh.policies().restore(fresh.ctx(), state);
        } catch (const Error& e) {
            return std::string(e.what());
        }
        FAIL("a hostile state was restored");
        return std::string();
    };

    SECTION("10,000 policies") {
        Json many = Json::array();
        for (int i = 0; i < 10000; ++i) many.push_back({{"policy", i == 0 ? big : "p" + std::to_string(i)}, {"state", {}}});
        const std::string msg = message(many);
        CHECK_THAT(msg, Catch::Contains("got 10000 (qqqq") && Catch::Contains("(100000 bytes)") &&
                            Catch::Contains("p9, ... and 9990 more)"));
        CHECK(msg.size() < 1000);
    }
    SECTION("10,000 layers") {
        Json bad = sst_state;
        Json layers = Json::array();
        for (int i = 0; i < 10000; ++i) layers.push_back({{"name", i == 0 ? big : "l" + std::to_string(i)}});
        bad[0]["state"]["layers"] = layers;
        const std::string msg = message(bad);
        CHECK_THAT(msg, Catch::Contains("the state has 10000 layer(s) (qqqq") &&
                            Catch::Contains("l9, ... and 9990 more)") && Catch::Contains("manages 2"));
        CHECK(msg.size() < 1000);
    }
    SECTION("a policy name, a layer name and a saved structure of 100 KB") {
        Json bad = sst_state;
        bad[0]["state"]["policy"] = big;
        std::string msg;
        try {
            fresh.policies()[0].restore(fresh.ctx(), bad[0]["state"]);
        } catch (const Error& e) {
            msg = e.what();
        }
        CHECK_THAT(msg, Catch::Contains("saved by policy 'qqqq") && Catch::Contains("(100000 bytes)"));
        CHECK(msg.size() < 600);
        bad = sst_state;
        bad[0]["state"]["layers"][1]["name"] = big;
        msg = message(bad);
        CHECK_THAT(msg, Catch::Contains("expected layer 'layers.1'") && Catch::Contains("got 'qqqq"));
        CHECK(msg.size() < 600);
        bad = sst_state;
        bad[0]["state"]["layers"][0]["structure"]["parameters"][0]["name"] = big;
        msg = message(bad);
        CHECK_THAT(msg, Catch::Contains("layer 'layers.0': parameter 0") && Catch::Contains("qqqq"));
        CHECK(msg.size() < 1000);
        bad = sst_state;
        bad[0]["state"]["layers"][0]["structure"]["kind"] = big;
        msg = message(bad);
        CHECK_THAT(msg, Catch::Contains("layer 'layers.0': expected a \"qqqq"));
        CHECK(msg.size() < 600);
    }
}

TEST_CASE("restore refuses states whose shapes other options would not give", "[policy][resume][errors]") {
    SECTION("InRank with another buffer") {
        Run saved(inrank_setup());
        saved.steps(5);
        Setup other = inrank_setup();
        other.policies = [](PolicyList<double>& l) {
            l.add<InRank<double>>(
                InRankOptions{.initial_rank = 1, .buffer = 2, .warmup = 1, .gap = 2, .stage1_steps = 9});
        };
        Run fresh(other);
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), saved.policies().state()),
                          Catch::Contains("inrank: restore: 'layers[0]'") &&
                              Catch::Contains("expected buffer 2") && Catch::Contains("got buffer 3"));
    }
    SECTION("Lora with another rank") {
        Run saved(lora_setup());
        Setup other = lora_setup();
        other.policies = [](PolicyList<double>& l) {
            l.add<Lora<double>>(LoraOptions{.rank = 2, .seed = 11});
        };
        Run fresh(other);
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), saved.policies().state()),
                          Catch::Contains("lora: restore: layer 'layers.0': parameter 0") &&
                              Catch::Contains("\"cols\":3") && Catch::Contains("\"cols\":2"));
    }
    SECTION("DeepLora saved compressed, restored with compression off") {
        Run saved(deep_lora_setup());
        saved.steps(1);
        Setup other = deep_lora_setup();
        other.policies = [](PolicyList<double>& l) {
            l.add<DeepLora<double>>(DeepLoraOptions{.rank = 2, .compress = false, .seed = 15});
        };
        Run fresh(other);
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), saved.policies().state()),
                          Catch::Contains("deeplora: restore") && Catch::Contains("compress is off"));
    }
    SECTION("Cuttlefish with a history of another layer's width") {
        Run saved(cuttlefish_setup(2));
        Json state = saved.policies().state();
        state[0]["state"]["layers"][1]["d"] = 12;
        Run fresh(cuttlefish_setup(2));
        CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), state),
                          Catch::Contains("cuttlefish: restore: 'layers[1]'") &&
                              Catch::Contains("expected d = min(out, in) = 16, got 12"));
    }
}

TEST_CASE("A policy without state()/restore() saves {} and refuses any other state", "[policy][resume]") {
    Setup setup = lora_setup();
    setup.policies = [](PolicyList<double>& l) { l.add<Stateless>(); };
    Run run(setup);
    const Json state = run.policies().state();
    CHECK(state == Json::array({Json{{"policy", "stateless"}, {"state", Json::object()}}}));
    Run fresh(setup);
    CHECK_NOTHROW(fresh.policies().restore(fresh.ctx(), Json::parse(state.dump())));
    Json bad = state;
    bad[0]["state"]["counter"] = 3;
    CHECK_THROWS_WITH(fresh.policies().restore(fresh.ctx(), bad),
                      Catch::Contains("stateless: restore: this policy keeps no resumable state") &&
                          Catch::Contains("counter"));
}

}  // namespace test_resume
