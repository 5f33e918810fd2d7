#pragma once
// Rank policies: strategy objects that a training run calls at fixed points of a step and
// that change the rank, the type or the basis of the model's linear layers
// (docs/methods/README.md).
//
//     on_train_begin   once, after the model and the optimizer exist (convert layers)
//     before_forward   every step, before the forward pass        (SST: sample columns)
//     after_backward   every step, gradients are complete          (Frobenius decay, ...)
//     after_step       every step, after optimizer.step()          (InRank, ReLoRA, SST)
//     on_epoch_end     after each epoch                            (Cuttlefish)
//
// A policy sees the model through a TrainingContext: the model's linear slots (AnyLinear)
// with their roles, the optimizer, the LR schedule, the counters and the rank log. When it
// swaps a layer or changes a parameter's shape it goes through the context, which keeps
// the optimizer's groups and state consistent.
//
// Nobody calls the hooks by hand: lowrank::TrainingRun (<lowrank/train/run.hpp>) owns the
// order of a step, the counters, and save/resume (policies' state() before the weights on
// save, restore() before the weights on resume). docs/design.md explains the protocol.

#include <lowrank/core/error.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/nn/any_linear.hpp>
#include <lowrank/optim/optimizer.hpp>
#include <lowrank/optim/schedule.hpp>
#include <lowrank/policy/policy_state.hpp>
#include <lowrank/policy/rank_log.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

/// Names the layers a policy acts on: a regular expression that must match the whole
/// layer name (ECMAScript syntax) and, if `roles` is not empty, one of the roles.
struct LayerSelector {
    std::string pattern = ".*";
    std::vector<std::string> roles{};

    bool matches(const std::string& name, const std::string& role) const {
        if (!roles.empty() && std::find(roles.begin(), roles.end(), role) == roles.end()) return false;
        try {
            return std::regex_match(name, std::regex(pattern));
        } catch (const std::regex_error& e) {
            throw Error(detail::concat("LayerSelector: invalid pattern '", pattern, "': ", e.what()));
        }
    }
};

/// How long a run is, as the policies see it (0: unknown). Set once by the owner of the
/// run (TrainingRun), never changed during it.
struct TrainingPlan {
    std::int64_t steps_per_epoch = 0;
    std::int64_t total_steps = 0;
};

template <class T>
class TrainingContext;

namespace detail {
/// The counters of a context and the policy now acting are the training run's to move
/// (TrainingRun, PolicyList). A unit test of one policy in isolation sets them through
/// this too; nothing else does.
struct TrainingContextAccess {
    template <class T>
    static void set_counters(TrainingContext<T>& c, std::int64_t step, std::int64_t epoch) {
        check(step >= 0 && epoch >= 0, "TrainingContext", "expected step >= 0 and epoch >= 0, got step ", step,
              ", epoch ", epoch);
        c.step_ = step;
        c.epoch_ = epoch;
    }
    /// The policy whose hook runs now (index in its PolicyList), for the claims that
    /// select() records; npos when no list is calling.
    template <class T>
    static void set_acting_policy(TrainingContext<T>& c, std::size_t index) {
        c.acting_index_ = index;
    }
};
}  // namespace detail

/// What a rank policy sees of a run: the model's linear slots with their roles, the
/// optimizer, the LR schedule, the rank log and the counters. The counters are read-only
/// here: the training run (TrainingRun) advances them.
template <class T>
class TrainingContext {
public:
    static constexpr std::size_t npos = static_cast<std::size_t>(-1);

    TrainingContext(std::vector<LayerSlot<T>> layers, Optimizer<T>& optimizer, LrSchedule& schedule,
                    RankLog& log, TrainingPlan plan = {})
        : layers_(std::move(layers)),
          optimizer_(&optimizer),
          schedule_(&schedule),
          log_(&log),
          plan_(plan),
          claims_(layers_.size()) {
        for (std::size_t i = 0; i < layers_.size(); ++i)
            check(layers_[i].layer != nullptr, "TrainingContext", "layer slot ", i, " is null");
        check(plan.steps_per_epoch >= 0 && plan.total_steps >= 0, "TrainingContext",
              "expected steps_per_epoch >= 0 and total_steps >= 0, got ", plan.steps_per_epoch, " and ",
              plan.total_steps);
    }

    /// Optimizer steps taken so far.
    std::int64_t step() const { return step_; }
    /// The current epoch, 0-based.
    std::int64_t epoch() const { return epoch_; }
    /// Optimizer steps in an epoch; 0 if unknown.
    std::int64_t steps_per_epoch() const { return plan_.steps_per_epoch; }
    /// Optimizer steps in the whole run; 0 if unknown.
    std::int64_t total_steps() const { return plan_.total_steps; }

    std::vector<LayerSlot<T>>& layers() { return layers_; }
    Optimizer<T>& optimizer() { return *optimizer_; }
    LrSchedule& schedule() { return *schedule_; }
    RankLog& log() { return *log_; }

    /// The slots a selector names, in model order. An empty result is an error: a policy
    /// that silently acts on nothing is a configuration mistake. So is a slot that another
    /// policy of the same list has selected already: two policies never act on one layer.
    std::vector<LayerSlot<T>*> select(const LayerSelector& selector, std::string_view policy) {
        std::vector<LayerSlot<T>*> out;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            LayerSlot<T>& s = layers_[i];
            if (!selector.matches(s.layer->name(), s.role)) continue;
            claim(i, policy);
            out.push_back(&s);
        }
        if (out.empty()) {
            std::string names;
            for (const auto& s : layers_) names += (names.empty() ? "" : ", ") + s.layer->name() + " (" + s.role + ")";
            throw Error(detail::concat(policy, ": the selector (pattern '", selector.pattern,
                                       "') matches no layer; the model has: ",
                                       names.empty() ? std::string("no linear slots") : names));
        }
        return out;
    }

    /// Puts `layer` in the slot and updates the optimizer: the old layer's parameters leave
    /// their groups with their state; each new parameter joins the group of the old
    /// parameter with the same name (a bias keeps its no-decay group), the others join the
    /// group of the old layer's first parameter, or `group` when given.
    template <class Layer>
    void replace_layer(AnyLinear<T>& slot, Layer layer, std::optional<std::size_t> group = std::nullopt) {
        const ParameterList<T> old_params = slot.parameters();
        std::vector<std::string> old_names;
        for (const auto* p : old_params) old_names.push_back(p->name());
        const std::vector<std::size_t> old_groups = optimizer_->remove_parameters(old_params);
        slot.replace(std::move(layer));
        const std::size_t fallback = group ? *group : (old_groups.empty() ? 0 : old_groups.front());
        for (Parameter<T>* p : slot.parameters()) {
            std::size_t g = fallback;
            for (std::size_t i = 0; i < old_names.size(); ++i)
                if (old_names[i] == p->name()) g = old_groups[i];
            optimizer_->add_to_group(g, {p});
        }
    }

    /// Records a decision in the rank log, stamped with the current step and epoch.
    void record(std::string_view policy, const std::string& layer, std::string_view event, Index old_rank,
                Index new_rank, std::string_view statistic = {}, double value = std::nan("")) {
        log_->add(RankEvent{step_, epoch_, std::string(policy), layer, std::string(event), old_rank, new_rank,
                            std::string(statistic), value});
    }

    /// Restarts the LR warm-up at the next step for `length` steps (0: nothing), ramping from
    /// `start` times the schedule's factor (LrSchedule::rewarm).
    void rewarm(std::int64_t length, double start = 0.0) {
        if (length > 0) schedule_->rewarm(step_, length, start);
    }

private:
    friend struct detail::TrainingContextAccess;

    // Who manages slot i: the acting policy's index in its list (or, for a policy called
    // outside a list, its name alone) and its name.
    struct Claim {
        bool taken = false;
        std::size_t index = npos;
        std::string name;
    };

    void claim(std::size_t slot, std::string_view policy) {
        Claim& c = claims_[slot];
        const std::size_t index = acting_index_;
        const bool same = c.taken && (index != npos || c.index != npos ? c.index == index : c.name == policy);
        if (c.taken && !same) {
            const auto label = [](const Claim& k) {
                return k.index == npos ? detail::concat("'", k.name, "'")
                                       : detail::concat("'", k.name, "' (policy ", k.index + 1, " of the run)");
            };
            throw Error(detail::concat(policy, ": layer '", layers_[slot].layer->name(), "' is already managed by ",
                                       label(c), "; this is ", label(Claim{true, index, std::string(policy)}),
                                       ": two policies cannot act on one layer (narrow their selectors)"));
        }
        c = Claim{true, index, std::string(policy)};
    }

    std::vector<LayerSlot<T>> layers_;
    Optimizer<T>* optimizer_;
    LrSchedule* schedule_;
    RankLog* log_;
    TrainingPlan plan_;
    std::int64_t step_ = 0;
    std::int64_t epoch_ = 0;
    std::size_t acting_index_ = npos;
    std::vector<Claim> claims_;
};

template <class T>
class RankPolicy {
public:
    virtual ~RankPolicy() = default;
    /// Short lower-case name used in the rank log ("inrank", "cuttlefish", ...).
    virtual std::string_view name() const = 0;

    virtual void on_train_begin(TrainingContext<T>&) {}
    virtual void before_forward(TrainingContext<T>&) {}
    virtual void after_backward(TrainingContext<T>&) {}
    virtual void after_step(TrainingContext<T>&) {}
    virtual void on_epoch_end(TrainingContext<T>&) {}

    /// Everything the policy needs to continue exactly as if never interrupted (counters,
    /// generators, histories, per-layer decisions) and the structure of each layer it
    /// manages, as a JSON object that survives dump() and parse() bit for bit. The default,
    /// for a policy that keeps no state, is an empty object.
    virtual nlohmann::json state() const { return nlohmann::json::object(); }

    /// Takes back a state() on a freshly built model and optimizer, after on_train_begin:
    /// reinstates the internal state and reshapes the managed layers to the saved structure
    /// (parameter names, shapes, active columns, trainable flags and optimizer groups as in
    /// the saved run). Parameter values and optimizer state are the caller's to load after.
    /// Throws an Error naming the policy, the key and the expected and actual values on a
    /// state it cannot take. The default accepts only an empty state (null or {}), so a
    /// policy that does not implement this cannot resume wrongly in silence.
    virtual void restore(TrainingContext<T>& ctx, const nlohmann::json& state) {
        (void)ctx;
        if (state.is_null() || (state.is_object() && state.empty())) return;
        throw Error(detail::concat(name(),
                                   ": restore: this policy keeps no resumable state, but the saved state is ",
                                   detail::PolicyStateReader::excerpt(state)));
    }
};

/// Several policies on one model, called in the order they were added.
template <class T>
class PolicyList {
public:
    template <class Policy, class... Args>
    Policy& add(Args&&... args) {
        auto p = std::make_unique<Policy>(std::forward<Args>(args)...);
        Policy& ref = *p;
        policies_.push_back(std::move(p));
        return ref;
    }
    void add(std::unique_ptr<RankPolicy<T>> p) {
        check(p != nullptr, "PolicyList::add", "the policy is null");
        policies_.push_back(std::move(p));
    }
    /// Moves every policy of `other` to the end of this list.
    void append(PolicyList&& other) {
        for (auto& p : other.policies_) policies_.push_back(std::move(p));
        other.policies_.clear();
    }

    void on_train_begin(TrainingContext<T>& c) { each(c, [&](auto& p) { p.on_train_begin(c); }); }
    void before_forward(TrainingContext<T>& c) { each(c, [&](auto& p) { p.before_forward(c); }); }
    void after_backward(TrainingContext<T>& c) { each(c, [&](auto& p) { p.after_backward(c); }); }
    void after_step(TrainingContext<T>& c) { each(c, [&](auto& p) { p.after_step(c); }); }
    void on_epoch_end(TrainingContext<T>& c) { each(c, [&](auto& p) { p.on_epoch_end(c); }); }

    /// One entry per policy, in order: {"policy": name(), "state": state()}.
    nlohmann::json state() const {
        nlohmann::json out = nlohmann::json::array();
        for (const auto& p : policies_)
            out.push_back({{"policy", std::string(p->name())}, {"state", p->state()}});
        return out;
    }

    /// Restores each policy from a state() of the same list: the count and the names must
    /// match, in order (checked for all before any policy is touched).
    void restore(TrainingContext<T>& c, const nlohmann::json& saved) {
        constexpr std::string_view what = "PolicyList: restore";
        std::string names;
        for (const auto& p : policies_) names += (names.empty() ? "" : ", ") + std::string(p->name());
        check(saved.is_array(), what, "expected an array of {policy, state} entries, got ",
              detail::PolicyStateReader::excerpt(saved));
        detail::ProblemList saved_list;  // a checkpoint can list any number of entries
        for (const auto& e : saved)
            saved_list.add(e.is_object() && e.contains("policy") && e.at("policy").is_string()
                               ? detail::clip(e.at("policy").template get_ref<const std::string&>())
                               : std::string("?"));
        const std::string saved_names = saved_list.str();
        check(saved.size() == policies_.size(), what, "expected ", policies_.size(), " policy state(s) (",
              names, "), got ", saved.size(), " (", saved_names, ")");
        for (std::size_t i = 0; i < saved.size(); ++i) {
            const auto& e = saved[i];
            check(e.is_object() && e.contains("policy") && e.at("policy").is_string() && e.contains("state"),
                  what, "entry ", i, ": expected an object with \"policy\" (a name) and \"state\", got ",
                  detail::PolicyStateReader::excerpt(e));
            const std::string saved_name = e.at("policy").template get<std::string>();
            check(saved_name == policies_[i]->name(), what, "entry ", i, ": expected policy '",
                  policies_[i]->name(), "', got '", detail::clip(saved_name), "' (the saved list: ", saved_names, ")");
        }
        each(c, [&, i = std::size_t{0}](RankPolicy<T>& p) mutable { p.restore(c, saved[i++].at("state")); });
    }

    std::size_t size() const { return policies_.size(); }
    bool empty() const { return policies_.empty(); }
    RankPolicy<T>& operator[](std::size_t i) { return *policies_.at(i); }

    /// The first policy of the list whose type is Policy (or derives from it), or nullptr:
    /// how a trainer reaches one method's own calls, e.g. Sst<T>::prune after training.
    template <class Policy>
    Policy* find() {
        for (auto& p : policies_)
            if (auto* found = dynamic_cast<Policy*>(p.get())) return found;
        return nullptr;
    }

private:
    // Each policy in turn, the context told which one acts (its claims on layers name it).
    template <class F>
    void each(TrainingContext<T>& c, F&& f) {
        struct Done {
            TrainingContext<T>& c;
            ~Done() { detail::TrainingContextAccess::set_acting_policy(c, TrainingContext<T>::npos); }
        } done{c};
        for (std::size_t i = 0; i < policies_.size(); ++i) {
            detail::TrainingContextAccess::set_acting_policy(c, i);
            f(*policies_[i]);
        }
    }
    std::vector<std::unique_ptr<RankPolicy<T>>> policies_;
};

}  // namespace lowrank
