#pragma once
// Helpers shared by the policy tests.

#include <lowrank/policy/rank_policy.hpp>

#include <functional>
#include <string_view>
#include <utility>

namespace lowrank::test {

/// The functions a Probe runs at its hooks (empty: nothing).
struct ProbeHooks {
    using Hook = std::function<void(TrainingContext<double>&)>;
    Hook before_forward = {};
    Hook after_backward = {};
    Hook after_step = {};
    Hook on_epoch_end = {};
};

/// A policy that manages no layer and runs the test's functions at its hooks. Added to a
/// TrainingRun before the policy under test, each of its hooks runs at that point of the
/// run's own step, right before the other policy's: its after_step sees the model after
/// the optimizer step and before the tested policy decides on it. So a test can look
/// inside a step without writing the step out by hand.
class Probe : public RankPolicy<double> {
public:
    using Options = ProbeHooks;
    using Hook = ProbeHooks::Hook;

    explicit Probe(Options options = {}) : hooks(std::move(options)) {}

    std::string_view name() const override { return "probe"; }
    void before_forward(TrainingContext<double>& c) override { call(hooks.before_forward, c); }
    void after_backward(TrainingContext<double>& c) override { call(hooks.after_backward, c); }
    void after_step(TrainingContext<double>& c) override { call(hooks.after_step, c); }
    void on_epoch_end(TrainingContext<double>& c) override { call(hooks.on_epoch_end, c); }

    /// Settable after the probe was added to a run (the run owns it).
    Options hooks;

private:
    static void call(const Hook& f, TrainingContext<double>& c) {
        if (f) f(c);
    }
};

}  // namespace lowrank::test
