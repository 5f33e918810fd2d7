#pragma once
// Rank policies: strategy objects that the training loop calls at fixed points of a step
// and that change the rank, the type or the basis of the model's linear layers (DESIGN.md
// section 5).
//
//     on_train_begin   once, after the model and the optimizer exist (convert layers)
//     before_forward   every step, before the forward pass        (SST: sample columns)
//     after_backward   every step, gradients are complete          (Frobenius decay, ...)
//     after_step       every step, after optimizer.step()          (InRank, ReLoRA, SST)
//     on_epoch_end     after each epoch                            (Cuttlefish)
//
// A policy sees the model through a TrainingContext: the model's linear slots (AnyLinear)
// with their roles, the optimizer, the LR schedule, the step counters and the rank log.
// When it swaps a layer or changes a parameter's shape it goes through the context, which
// keeps the optimizer's groups and state consistent.
//
// The loop, with `policies` a PolicyList and `ctx` its context:
//
//     policies.on_train_begin(ctx);
//     for each epoch: for each batch:
//         policies.before_forward(ctx);
//         forward; optimizer.zero_grad(); backward;
//         policies.after_backward(ctx);
//         schedule.apply(optimizer, ctx.step); optimizer.step();
//         ++ctx.step; policies.after_step(ctx);
//       policies.on_epoch_end(ctx); ++ctx.epoch;

#include <lowrank/core/error.hpp>
#include <lowrank/nn/any_linear.hpp>
#include <lowrank/optim/optimizer.hpp>
#include <lowrank/optim/schedule.hpp>
#include <lowrank/policy/rank_log.hpp>

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

template <class T>
class TrainingContext {
public:
    TrainingContext(std::vector<LayerSlot<T>> layers, Optimizer<T>& optimizer, LrSchedule& schedule,
                    RankLog& log)
        : layers_(std::move(layers)), optimizer_(&optimizer), schedule_(&schedule), log_(&log) {
        for (std::size_t i = 0; i < layers_.size(); ++i)
            check(layers_[i].layer != nullptr, "TrainingContext", "layer slot ", i, " is null");
    }

    std::int64_t step = 0;             // optimizer steps taken so far
    std::int64_t epoch = 0;            // current epoch, 0-based
    std::int64_t steps_per_epoch = 0;  // 0 if unknown
    std::int64_t total_steps = 0;      // 0 if unknown

    std::vector<LayerSlot<T>>& layers() { return layers_; }
    Optimizer<T>& optimizer() { return *optimizer_; }
    LrSchedule& schedule() { return *schedule_; }
    RankLog& log() { return *log_; }

    /// The slots a selector names, in model order. An empty result is an error: a policy
    /// that silently acts on nothing is a configuration mistake.
    std::vector<LayerSlot<T>*> select(const LayerSelector& selector, std::string_view policy) {
        std::vector<LayerSlot<T>*> out;
        for (auto& s : layers_)
            if (selector.matches(s.layer->name(), s.role)) out.push_back(&s);
        if (out.empty()) {
            std::string names;
            for (const auto& s : layers_) names += (names.empty() ? "" : ", ") + s.layer->name() + " (" + s.role + ")";
            throw Error(detail::concat(policy, ": the selector (pattern '", selector.pattern,
                                       "') matches no layer; the model has: ", names));
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
        log_->add(RankEvent{step, epoch, std::string(policy), layer, std::string(event), old_rank, new_rank,
                            std::string(statistic), value});
    }

    /// Restarts the LR warm-up at the next step for `length` steps (0: nothing).
    void rewarm(std::int64_t length) {
        if (length > 0) schedule_->rewarm(step, length);
    }

private:
    std::vector<LayerSlot<T>> layers_;
    Optimizer<T>* optimizer_;
    LrSchedule* schedule_;
    RankLog* log_;
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
    void add(std::unique_ptr<RankPolicy<T>> p) { policies_.push_back(std::move(p)); }

    void on_train_begin(TrainingContext<T>& c) { each([&](auto& p) { p.on_train_begin(c); }); }
    void before_forward(TrainingContext<T>& c) { each([&](auto& p) { p.before_forward(c); }); }
    void after_backward(TrainingContext<T>& c) { each([&](auto& p) { p.after_backward(c); }); }
    void after_step(TrainingContext<T>& c) { each([&](auto& p) { p.after_step(c); }); }
    void on_epoch_end(TrainingContext<T>& c) { each([&](auto& p) { p.on_epoch_end(c); }); }

    std::size_t size() const { return policies_.size(); }
    bool empty() const { return policies_.empty(); }
    RankPolicy<T>& operator[](std::size_t i) { return *policies_.at(i); }

private:
    template <class F>
    void each(F&& f) {
        for (auto& p : policies_) f(*p);
    }
    std::vector<std::unique_ptr<RankPolicy<T>>> policies_;
};

}  // namespace lowrank
