#pragma once
// TrainingRun: the one owner of the training step (docs/design.md, "The training run").
//
// The caller keeps an explicit loop over their own data and loss, in llm.c's manner, and
// hands each step's forward pass to run.step():
//
//     lowrank::TrainingRun<float> run(model, opt, {.schedule = sched, .clip_grad_norm = 1.0});
//     run.add<lowrank::Cuttlefish<float>>({.select = {.pattern = "fc[12]"}});
//     for (auto& [x, y] : batches)
//         run.step([&](lowrank::Graph<float>& g) {
//             return lowrank::cross_entropy(g, model.forward(g, g.input(x)), y);
//         });
//
// A step is, in this order and nowhere else spelled out:
//
//     policies.before_forward -> clear the tape -> the caller's loss -> non-finite check
//     -> zero_grad -> backward -> [gradient reducer] -> policies.after_backward -> gradient
//     norm (non-finite check) -> clip -> schedule -> optimizer step -> counters
//     -> policies.after_step -> at an epoch's end: policies.on_epoch_end -> callbacks
//
// The counters (optimizer steps, epoch, steps into the epoch) are the run's; policies read
// them through the TrainingContext. With steps_per_epoch set, the run ends each epoch
// itself (end_epoch() at the boundary is then a no-op); without it, the caller calls
// end_epoch(). save() and resume() write and restore everything a run needs to continue
// bit for bit, in the one valid order (see resume()).

#include <lowrank/autograd/graph.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/json_read.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/io/checkpoint.hpp>
#include <lowrank/nn/module.hpp>
#include <lowrank/optim/clip.hpp>
#include <lowrank/optim/optimizer.hpp>
#include <lowrank/optim/schedule.hpp>
#include <lowrank/policy/rank_log.hpp>
#include <lowrank/policy/rank_policy.hpp>
#include <lowrank/train/gradient_reducer.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

/// What a step does when the loss or the gradient is not finite.
enum class NonFinite {
    stop,  // throw an Error naming the step and the first parameter that is not finite
    skip,  // zero the gradients, leave the parameters and counters alone, report skipped
};

inline std::string_view to_string(NonFinite n) { return n == NonFinite::stop ? "stop" : "skip"; }

struct RunOptions {
    /// The LR schedule, as a multiplier of every group's lr (copied into the run).
    LrSchedule schedule{};
    /// Clip the global gradient norm to this (0: no clipping; the norm is reported anyway).
    double clip_grad_norm = 0.0;
    NonFinite on_non_finite = NonFinite::stop;
    /// Optimizer steps in an epoch: the run then ends epochs itself. 0: the caller calls
    /// end_epoch().
    std::int64_t steps_per_epoch = 0;
    /// Optimizer steps in the run (what policies see as total_steps; resume refuses a
    /// checkpoint past it). 0: the schedule's total_steps.
    std::int64_t total_steps = 0;
    /// Seed of the tape's generator (dropout).
    std::uint64_t seed = 0;
    /// The caller's settings that must not change across a resume (method, data, seed,
    /// batch size, ...): a JSON object, merged with what the run derives itself.
    nlohmann::json identity = nlohmann::json::object();
};

/// What a step reports: what a logger needs.
struct StepResult {
    std::int64_t step = 0;   // optimizer steps taken after this one
    std::int64_t epoch = 0;  // the epoch the step ran in, 0-based
    double loss = std::numeric_limits<double>::quiet_NaN();
    double grad_norm = std::numeric_limits<double>::quiet_NaN();  // before clipping
    double lr = 0.0;        // the optimizer's base lr times the schedule's factor
    double lr_scale = 0.0;  // the schedule's factor
    double seconds = 0.0;   // wall time of the whole step, forward included
    bool clipped = false;
    bool skipped = false;  // NonFinite::skip: no update was made
};

struct ResumeOptions {
    /// Identity keys allowed to differ from the checkpoint's (a key allows everything under
    /// it), e.g. {"total_steps", "schedule"} to extend a run. Anything else that differs is
    /// refused.
    std::vector<std::string> allow_changed{};
};

template <class T>
class TrainingRun;

/// A callback: every hook is optional. Attach with TrainingRun::attach.
template <class T>
class RunCallback {
public:
    virtual ~RunCallback() = default;
    /// Once, when the run begins (after the policies' on_train_begin, so the layers are as
    /// the policies converted them), or at attach() for a run that has begun already.
    virtual void on_train_begin(TrainingRun<T>&) {}
    /// After every step (skipped ones included), after the epoch it closed, if any.
    virtual void on_step_end(TrainingRun<T>&, const StepResult&) {}
    /// After the policies' on_epoch_end; run.epoch() is already the next epoch.
    virtual void on_epoch_end(TrainingRun<T>&) {}
    /// From TrainingRun::finish().
    virtual void on_train_end(TrainingRun<T>&) {}
};

namespace detail {

/// The first place two identity documents differ, as "key: the checkpoint has X, this run
/// has Y"; empty if they agree. Keys listed in `allowed` (or below one) are skipped.
inline std::string identity_difference(const nlohmann::json& saved, const nlohmann::json& now,
                                       const std::string& path, const std::vector<std::string>& allowed) {
    for (const auto& a : allowed)
        if (!path.empty() && (path == a || path.starts_with(a + ".") || path.starts_with(a + "["))) return {};
    // A key on one side only is compared with null, which names it as "null".
    static const nlohmann::json missing = nullptr;
    if (saved.is_object() && now.is_object()) {
        std::set<std::string> keys;
        for (const auto& [k, v] : saved.items()) keys.insert(k);
        for (const auto& [k, v] : now.items()) keys.insert(k);
        for (const auto& k : keys) {
            const auto a = saved.find(k);
            const auto b = now.find(k);
            std::string d =
                identity_difference(a == saved.end() ? missing : *a, b == now.end() ? missing : *b,
                                    path.empty() ? k : path + "." + k, allowed);
            if (!d.empty()) return d;
        }
        return {};
    }
    // Arrays of arrays or objects are walked, so that the message names the entry; an array
    // of plain values (a shape) is reported whole.
    const auto flat = [](const nlohmann::json& a) {
        return std::all_of(a.begin(), a.end(), [](const nlohmann::json& v) { return v.is_primitive(); });
    };
    if (saved.is_array() && now.is_array() && saved.size() == now.size() && !(flat(saved) && flat(now))) {
        for (std::size_t i = 0; i < saved.size(); ++i) {
            std::string d = identity_difference(saved[i], now[i], concat(path, "[", i, "]"), allowed);
            if (!d.empty()) return d;
        }
        return {};
    }
    if (saved == now) return {};
    return concat("'", clip(path, 120), "': the checkpoint has ", json_value_excerpt(saved, 120), ", this run has ",
                  json_value_excerpt(now, 120));
}

/// The tape in evaluation mode (no gradients, no dropout) for as long as it lives.
template <class T>
class EvalScope {
public:
    explicit EvalScope(Graph<T>& g) : g_(g), grad_enabled_(g.grad_enabled()), training_(g.training()) {
        g_.set_grad_enabled(false);
        g_.set_training(false);
    }
    ~EvalScope() {  // back to what it was, so scopes nest
        g_.set_grad_enabled(grad_enabled_);
        g_.set_training(training_);
    }
    EvalScope(const EvalScope&) = delete;
    EvalScope& operator=(const EvalScope&) = delete;

private:
    Graph<T>& g_;
    bool grad_enabled_;
    bool training_;
};

}  // namespace detail

template <class T>
class TrainingRun {
public:
    using Clock = std::chrono::steady_clock;
    /// A lambda callback: every(n, f) calls f(run, result) after every n-th step.
    using StepFunction = std::function<void(TrainingRun&, const StepResult&)>;

    /// Version of the "run" document a checkpoint holds; resume refuses any other.
    static constexpr int kStateVersion = 1;

    template <TrainableModel<T> Model>
    TrainingRun(Model& model, Optimizer<T>& optimizer, RunOptions options = {})
        : read_parameters_([&model] { return ParameterList<T>(model.parameters()); }),
          optimizer_(&optimizer),
          options_(std::move(options)),
          schedule_(options_.schedule),
          ctx_(model.layer_slots(), optimizer, schedule_, log_,
               TrainingPlan{options_.steps_per_epoch, options_.total_steps > 0
                                                          ? options_.total_steps
                                                          : options_.schedule.options().total_steps}),
          graph_(options_.seed) {
        constexpr std::string_view what = "TrainingRun";
        check(std::isfinite(options_.clip_grad_norm) && options_.clip_grad_norm >= 0.0, what,
              "expected clip_grad_norm >= 0 (0: off), got ", options_.clip_grad_norm);
        check(options_.identity.is_object(), what, "expected identity to be a JSON object, got a JSON ",
              options_.identity.type_name());
        for (const auto& [key, value] : options_.identity.items())
            check(!derived_identity_keys().count(key), what, "identity key '", key,
                  "' is one the run records itself; choose another name");
        refresh_parameters();
    }
    TrainingRun(const TrainingRun&) = delete;
    TrainingRun& operator=(const TrainingRun&) = delete;
    TrainingRun(TrainingRun&&) = delete;  // the context refers to the run's members
    TrainingRun& operator=(TrainingRun&&) = delete;

    // --- policies and callbacks -----------------------------------------------------

    /// Adds a rank policy (called in the order added). Before the first step only.
    template <class Policy>
    Policy& add(typename Policy::Options options = {}) {
        check_can_add("add");
        return policies_.template add<Policy>(std::move(options));
    }
    /// Adds a policy built from any constructor arguments (a policy without an Options type).
    template <class Policy, class... Args>
    Policy& emplace(Args&&... args) {
        check_can_add("emplace");
        return policies_.template add<Policy>(std::forward<Args>(args)...);
    }
    /// Adds every policy of a list (e.g. one built from a command line).
    void add(PolicyList<T> list) {
        check_can_add("add");
        policies_.append(std::move(list));
    }

    /// Attaches a callback; the run owns it. Returns it, for reading its results later.
    template <class Callback, class... Args>
    Callback& attach(Args&&... args) {
        auto c = std::make_unique<Callback>(std::forward<Args>(args)...);
        Callback& ref = *c;
        callbacks_.push_back(std::move(c));
        if (begun_) ref.on_train_begin(*this);
        return ref;
    }
    /// Calls f(run, result) after every n-th step (n >= 1).
    void every(std::int64_t n, StepFunction f) {
        check(n >= 1, "TrainingRun::every", "expected n >= 1, got ", n);
        check(static_cast<bool>(f), "TrainingRun::every", "the function is empty");
        every_.push_back({n, std::move(f)});
    }

    /// Hands every step's gradients and loss to `reducer` after backward (data-parallel
    /// training: <lowrank/dist/data_parallel.hpp>). Before the first step only; it must
    /// outlive the run.
    void set_gradient_reducer(GradientReducer<T>& reducer) {
        check(!stepped_, "TrainingRun::set_gradient_reducer", "set the reducer before the first step");
        reducer_ = &reducer;
    }

    /// A generator the caller's loop draws from (data order, augmentation): saved and
    /// restored with the run, under `name`. It must outlive the run.
    void track_rng(const std::string& name, Rng& rng) {
        check(!name.empty(), "TrainingRun::track_rng", "expected a name, got an empty one");
        for (const auto& r : rngs_)
            check(r.name != name, "TrainingRun::track_rng", "a generator named '", name,
                  "' is tracked already");
        rngs_.push_back({name, &rng});
    }

    // --- the loop -------------------------------------------------------------------

    /// Calls the policies' on_train_begin and fixes the run's identity. The first step,
    /// save() and resume() do it if nobody did; call it yourself to see the converted
    /// model (parameter counts) before training.
    void begin() {
        if (begun_) return;
        check_usable();
        check_finite("before the first step (as initialised or loaded)");
        policies_.on_train_begin(ctx_);
        begun_ = true;
        refresh_parameters();
        identity_ = derive_identity();
        for (auto& c : callbacks_) c->on_train_begin(*this);
    }

    /// One training step; `loss_fn(graph)` records the forward pass on the run's tape and
    /// returns the scalar loss. Allocates nothing in the steady state (beyond what the
    /// caller's forward pass and the policies' decisions allocate).
    template <class LossFn>
    StepResult step(LossFn&& loss_fn) {
        begin();
        check_usable();
        check(!stop_requested_, "TrainingRun::step", "the run was asked to stop (", stop_reason_, ")");
        const auto start = Clock::now();
        StepResult r;
        r.step = ctx_.step();
        r.epoch = ctx_.epoch();

        policies_.before_forward(ctx_);
        refresh_if_changed();
        graph_.clear();
        const Var<T> loss = loss_fn(graph_);
        if (loss.rows() != 1 || loss.cols() != 1)  // the message is built only when it is needed
            throw Error(detail::concat("TrainingRun::step: expected the loss to be a (1 x 1) scalar, got ",
                                       shape_string(loss.rows(), loss.cols())));
        r.loss = static_cast<double>(loss.item());
        // With a reducer, one process's non-finite loss must reach the others before anyone
        // leaves the step, or they would wait for it in the reduction.
        const bool finite_loss = std::isfinite(r.loss);
        if (!finite_loss && reducer_ == nullptr) return non_finite(r, start, "loss");

        optimizer_->zero_grad();
        if (finite_loss) graph_.backward(loss);
        peak_tape_bytes_ = std::max(peak_tape_bytes_, graph_.tape_bytes());
        if (reducer_ != nullptr) {
            r.loss = reducer_->reduce(params_, r.loss);
            if (!std::isfinite(r.loss)) return non_finite(r, start, "loss");
        }
        policies_.after_backward(ctx_);
        refresh_if_changed();
        r.grad_norm = grad_global_norm(params_);
        if (!std::isfinite(r.grad_norm)) return non_finite(r, start, "gradient");
        if (options_.clip_grad_norm > 0.0)
            r.clipped = detail::scale_grad_to_norm(params_, r.grad_norm, options_.clip_grad_norm);

        r.lr_scale = schedule_.apply(*optimizer_, ctx_.step());
        r.lr = optimizer_->base_lr() * r.lr_scale;
        optimizer_->step();
        ++steps_in_epoch_;
        detail::TrainingContextAccess::set_counters(ctx_, ctx_.step() + 1, ctx_.epoch());
        policies_.after_step(ctx_);
        refresh_if_changed();
        r.step = ctx_.step();
        if (options_.steps_per_epoch > 0 && steps_in_epoch_ == options_.steps_per_epoch) close_epoch();
        r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
        finish_step(r);
        return r;
    }

    /// Ends the current epoch: the policies' on_epoch_end, then the epoch counter. With
    /// steps_per_epoch set, the run does this itself at each boundary: a call right after
    /// the boundary does nothing, a call inside an epoch is an error.
    void end_epoch() {
        begin();
        check_usable();
        if (options_.steps_per_epoch > 0) {
            if (steps_in_epoch_ == 0 && ctx_.step() > 0) return;  // ended by the last step
            throw Error(
                detail::concat("TrainingRun::end_epoch: the run ends its epochs itself (steps_per_epoch = ",
                               options_.steps_per_epoch, "), and epoch ", ctx_.epoch(), " has run ",
                               steps_in_epoch_, " of its steps"));
        }
        close_epoch();
    }

    /// Calls the callbacks' on_train_end (a final checkpoint, the progress bar's end).
    void finish() {
        for (auto& c : callbacks_) c->on_train_end(*this);
    }

    /// Runs f(graph) with the tape in evaluation mode (no gradients, no dropout) and
    /// returns its result: validation passes reuse the run's buffers.
    template <class F>
    decltype(auto) evaluate(F&& f) {
        const detail::EvalScope<T> scope(graph_);
        graph_.clear();
        return f(graph_);
    }

    /// Asks the loop to stop (early stopping); should_stop() then says so.
    void request_stop(std::string reason) {
        stop_requested_ = true;
        stop_reason_ = std::move(reason);
    }
    bool should_stop() const { return stop_requested_; }
    const std::string& stop_reason() const { return stop_reason_; }

    // --- what the run holds ---------------------------------------------------------

    std::int64_t global_step() const { return ctx_.step(); }
    std::int64_t epoch() const { return ctx_.epoch(); }
    std::int64_t steps_in_epoch() const { return steps_in_epoch_; }
    std::int64_t skipped_steps() const { return skipped_; }
    std::int64_t total_steps() const { return ctx_.total_steps(); }
    const StepResult& last() const { return last_; }

    Graph<T>& graph() { return graph_; }
    /// The largest Graph::tape_bytes() of the steps this run has taken (read after each
    /// backward): the activations of its largest step and their gradients.
    std::size_t peak_tape_bytes() const { return peak_tape_bytes_; }
    Optimizer<T>& optimizer() { return *optimizer_; }
    const LrSchedule& schedule() const { return schedule_; }
    RankLog& rank_log() { return log_; }
    const RankLog& rank_log() const { return log_; }
    PolicyList<T>& policies() { return policies_; }
    TrainingContext<T>& context() { return ctx_; }
    const RunOptions& options() const { return options_; }

    /// The model's parameters now (re-read whenever a policy changed the model).
    const ParameterList<T>& parameters() {
        refresh_if_changed();
        return params_;
    }
    /// Scalars in the model now (trainable_only: those the optimizer updates).
    Index parameter_count(bool trainable_only = false) {
        return count_parameters(parameters(), trainable_only);
    }

    /// What must agree for a resume: the caller's identity and what the run derives (the
    /// optimizer type, the policies, the schedule, clipping, the plan, every parameter's
    /// name and shape after on_train_begin).
    const nlohmann::json& identity() {
        begin();
        return identity_;
    }

    // --- save and resume ------------------------------------------------------------

    /// Writes the whole run atomically to `path` (a safetensors checkpoint): weights,
    /// optimizer state, the policies' state, the schedule's re-warm-up, the rank log, the
    /// counters, the tape's and every tracked generator, the identity, and the caller's
    /// `extra` (a JSON object, handed back by resume()).
    void save(const std::filesystem::path& file, const nlohmann::json& extra = nlohmann::json::object()) {
        const std::string path = file.string();
        begin();
        check_usable();
        check(extra.is_object() || extra.is_null(), "TrainingRun::save",
              "expected extra to be a JSON object, got a JSON ", extra.type_name());
        nlohmann::json run;
        run["version"] = kStateVersion;
        run["identity"] = identity_;
        run["step"] = ctx_.step();
        run["epoch"] = ctx_.epoch();
        run["steps_in_epoch"] = steps_in_epoch_;
        run["skipped_steps"] = skipped_;
        run["rewarm"] = {{"at_step", schedule_.rewarm_state().at_step},
                         {"length", schedule_.rewarm_state().length},
                         {"start", schedule_.rewarm_state().start}};
        run["graph_rng"] = rng_state_to_json(graph_.rng().state());
        nlohmann::json rngs = nlohmann::json::object();
        for (const auto& r : rngs_) rngs[r.name] = rng_state_to_json(r.rng->state());
        run["rngs"] = rngs;
        run["policies"] = policies_.state();
        run["rank_log"] = log_.to_json();
        const nlohmann::json doc{{"run", run}, {"user", extra.is_null() ? nlohmann::json::object() : extra}};
        save_checkpoint(path, parameters(), optimizer_, ctx_.step(), doc);
    }

    /// Continues the run saved at `path`, on a run built as at step 0 (same model, same
    /// optimizer, same policies added, same generators tracked) that has not stepped.
    /// Refuses a checkpoint whose identity differs, naming the key and both values. The
    /// order is the only one that works: the policies first (they bring each layer to its
    /// saved structure), then weights and optimizer state by name, then the schedule, the
    /// counters, the generators and the rank log. Returns the `extra` given to save().
    /// After a failed resume the run is unusable: build a new one.
    nlohmann::json resume(const std::filesystem::path& file, const ResumeOptions& options = {}) {
        const std::string path = file.string();
        const std::string what = detail::concat("TrainingRun::resume: '", path, "'");
        check(!stepped_ && !resumed_, what, "resume a run before its first step, and only once");
        begin();
        check_usable();
        try {
            const nlohmann::json extra = read_checkpoint_extra(path);
            const detail::PolicyStateReader doc(what, extra);
            if (!doc.has("run"))
                throw Error(detail::concat(what,
                                           ": the checkpoint holds no training run (it was not written by "
                                           "TrainingRun::save); load its weights with load_checkpoint"));
            const detail::PolicyStateReader run = doc.object("run");
            const std::int64_t version = run.integer("version");
            check(version == kStateVersion, what, "expected run state version ", kStateVersion, ", got ",
                  version);
            const std::string diff = detail::identity_difference(run.at("identity", "an object"), identity_,
                                                                 "", options.allow_changed);
            if (!diff.empty())
                throw Error(detail::concat(what, ": the checkpoint was written by a different run: ", diff));
            const std::int64_t step = run.integer("step", 0, std::numeric_limits<std::int64_t>::max());
            if (ctx_.total_steps() > 0 && step > ctx_.total_steps())
                throw Error(detail::concat(what, ": the checkpoint is at step ", step,
                                           ", past this run's total_steps ", ctx_.total_steps()));
            const std::int64_t epoch = run.integer("epoch", 0, std::numeric_limits<std::int64_t>::max());
            const std::int64_t in_epoch =
                run.integer("steps_in_epoch", 0, std::numeric_limits<std::int64_t>::max());
            const std::int64_t skipped =
                run.integer("skipped_steps", 0, std::numeric_limits<std::int64_t>::max());
            const detail::PolicyStateReader rewarm = run.object("rewarm");
            const LrSchedule::Rewarm rw{
                rewarm.integer("at_step", 0, std::numeric_limits<std::int64_t>::max()),
                rewarm.integer("length", 0, std::numeric_limits<std::int64_t>::max()),
                rewarm.has("start") ? rewarm.number("start") : 0.0};  // a state without it: a ramp from 0
            const Rng::State graph_rng = run.rng("graph_rng");
            const detail::PolicyStateReader rngs = run.object("rngs");
            std::vector<Rng::State> rng_states;
            for (const auto& r : rngs_) {
                if (!rngs.has(r.name))
                    throw Error(detail::concat(what, ": the run tracks a generator '", r.name,
                                               "' that the checkpoint does not have"));
                rng_states.push_back(rngs.rng(r.name));
            }
            check(rngs.json().size() == rngs_.size(), what, "the checkpoint has ", rngs.json().size(),
                  " tracked generator(s), the run tracks ", rngs_.size());
            RankLog log = RankLog::from_json(run.at("rank_log", "an array"));

            // The one order that works: the policies reshape the layers, then the tensors
            // find their parameters by name and shape.
            policies_.restore(ctx_, run.at("policies", "an array"));
            refresh_parameters();
            const CheckpointInfo info = load_checkpoint(path, params_, optimizer_);
            check_finite(detail::concat("in the checkpoint '", path, "'"));
            check(info.step == step, what, "the checkpoint's step ", info.step, " and its run's step ", step,
                  " differ");
            schedule_.set_rewarm_state(rw);
            detail::TrainingContextAccess::set_counters(ctx_, step, epoch);
            steps_in_epoch_ = in_epoch;
            skipped_ = skipped;
            graph_.rng().set_state(graph_rng);
            for (std::size_t i = 0; i < rngs_.size(); ++i) rngs_[i].rng->set_state(rng_states[i]);
            log_ = std::move(log);
            resumed_ = true;
            return doc.at("user", "an object");
        } catch (...) {
            // The policies or the optimizer may be half restored: nothing may train on it.
            broken_ = true;
            throw;
        }
    }

private:
    struct Every {
        std::int64_t n;
        StepFunction f;
    };
    struct TrackedRng {
        std::string name;
        Rng* rng;
    };

    static const std::set<std::string>& derived_identity_keys() {
        static const std::set<std::string> keys{"optimizer",      "policies",   "schedule",
                                                "clip_grad_norm", "non_finite", "steps_per_epoch",
                                                "total_steps",    "parameters"};
        return keys;
    }

    nlohmann::json derive_identity() {
        nlohmann::json id = options_.identity;
        id["optimizer"] = std::string(optimizer_->type_name());
        nlohmann::json names = nlohmann::json::array();
        for (std::size_t i = 0; i < policies_.size(); ++i) names.push_back(std::string(policies_[i].name()));
        id["policies"] = names;
        const ScheduleOptions& s = schedule_.options();
        id["schedule"] = {{"kind", std::string(to_string(s.kind))},
                          {"warmup_steps", s.warmup_steps},
                          {"total_steps", s.total_steps},
                          {"min_factor", s.min_factor}};
        id["clip_grad_norm"] = options_.clip_grad_norm;
        id["non_finite"] = std::string(to_string(options_.on_non_finite));
        id["steps_per_epoch"] = ctx_.steps_per_epoch();
        id["total_steps"] = ctx_.total_steps();
        // By name, so that a difference names the parameter: [rows, cols, trainable].
        nlohmann::json params = nlohmann::json::object();
        for (const Parameter<T>* p : params_) params[p->name()] = {p->rows(), p->cols(), p->trainable};
        id["parameters"] = params;
        return id;
    }

    void check_can_add(std::string_view what) const {
        check(!begun_, detail::concat("TrainingRun::", what),
              "add policies before the first step (on_train_begin has run)");
    }
    void check_usable() const {
        check(!broken_, "TrainingRun", "a resume failed on this run; build a new run to train");
    }

    // Throws naming the first parameter with a NaN or an infinity: a bad initialisation or
    // file would otherwise surface steps later as a non-finite loss with the wrong cause.
    void check_finite(std::string_view when) {
        for (const Parameter<T>* p : params_)
            if (!p->value.allFinite())
                throw Error(
                    detail::concat("TrainingRun: parameter '", p->name(), "' has non-finite values ", when));
    }

    void refresh_parameters() {
        params_ = read_parameters_();
        seen_membership_ = optimizer_->membership_version();
    }
    void refresh_if_changed() {
        if (optimizer_->membership_version() != seen_membership_) refresh_parameters();
    }

    void close_epoch() {
        policies_.on_epoch_end(ctx_);
        refresh_if_changed();
        detail::TrainingContextAccess::set_counters(ctx_, ctx_.step(), ctx_.epoch() + 1);
        steps_in_epoch_ = 0;
        for (auto& c : callbacks_) c->on_epoch_end(*this);
    }

    void finish_step(const StepResult& r) {
        stepped_ = true;
        last_ = r;
        for (auto& c : callbacks_) c->on_step_end(*this, r);
        for (auto& e : every_)
            if (!r.skipped && r.step % e.n == 0) e.f(*this, r);
    }

    StepResult non_finite(StepResult& r, Clock::time_point start, std::string_view which) {
        const std::string where =
            detail::concat("TrainingRun: non-finite ", which, " (", which == "loss" ? r.loss : r.grad_norm,
                           ") at step ", ctx_.step(), " (epoch ", ctx_.epoch(), ")");
        if (options_.on_non_finite == NonFinite::stop) {
            for (const Parameter<T>* p : params_)
                if (!p->value.allFinite())
                    throw Error(detail::concat(where, ": parameter '", p->name(), "' has non-finite values"));
            for (const Parameter<T>* p : params_)
                if (detail::has_gradient(*p) && !p->grad.allFinite())
                    throw Error(
                        detail::concat(where, ": parameter '", p->name(), "' has a non-finite gradient"));
            throw Error(detail::concat(where,
                                       ": every parameter is finite, so the inputs or the step size are the "
                                       "cause (try a smaller lr, or NonFinite::skip)"));
        }
        optimizer_->zero_grad();
        ++skipped_;
        r.skipped = true;
        r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
        finish_step(r);
        return r;
    }

    std::function<ParameterList<T>()> read_parameters_;
    Optimizer<T>* optimizer_;
    RunOptions options_;
    LrSchedule schedule_;
    RankLog log_;
    TrainingContext<T> ctx_;
    PolicyList<T> policies_;
    Graph<T> graph_;
    ParameterList<T> params_;
    std::uint64_t seen_membership_ = 0;
    nlohmann::json identity_;
    std::vector<std::unique_ptr<RunCallback<T>>> callbacks_;
    std::vector<Every> every_;
    std::vector<TrackedRng> rngs_;
    GradientReducer<T>* reducer_ = nullptr;
    StepResult last_;
    std::size_t peak_tape_bytes_ = 0;
    std::int64_t steps_in_epoch_ = 0;
    std::int64_t skipped_ = 0;
    bool begun_ = false;
    bool stepped_ = false;
    bool resumed_ = false;
    bool broken_ = false;
    bool stop_requested_ = false;
    std::string stop_reason_;
};

}  // namespace lowrank
