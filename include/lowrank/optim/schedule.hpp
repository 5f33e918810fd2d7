#pragma once
// Learning-rate schedules as a multiplier of every group's lr: constant, linear warm-up
// then cosine or linear decay, and a re-warm-up that a rank policy can trigger after a
// restart (ReLoRA, SST, Cuttlefish reset optimizer state and must not take a full-lr
// step on freshly zeroed moments).

#include <lowrank/core/error.hpp>
#include <lowrank/optim/optimizer.hpp>

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string_view>

namespace lowrank {

enum class ScheduleKind {
    constant,       // 1 after the warm-up
    warmup_cosine,  // warm-up, then half a cosine from 1 down to min_factor at total_steps
    warmup_linear,  // warm-up, then a straight line from 1 down to min_factor at total_steps
};

inline std::string_view to_string(ScheduleKind kind) {
    switch (kind) {
        case ScheduleKind::constant: return "constant";
        case ScheduleKind::warmup_cosine: return "warmup_cosine";
        case ScheduleKind::warmup_linear: return "warmup_linear";
    }
    return "?";
}

struct ScheduleOptions {
    ScheduleKind kind = ScheduleKind::constant;
    /// Steps of linear warm-up: factor (step + 1) / warmup_steps for step < warmup_steps,
    /// so the first step already moves and step warmup_steps - 1 reaches 1. Applies to
    /// every kind (constant with a warm-up is HuggingFace's constant_with_warmup).
    std::int64_t warmup_steps = 0;
    /// The step at which a decaying schedule reaches min_factor and stays there.
    std::int64_t total_steps = 0;
    double min_factor = 0.0;
};

/// Maps the optimizer step (0-based: the number of steps taken before this one) to a
/// multiplier of the base lr. Use it as `opt.set_lr_scale(schedule.factor(step))` before
/// each `opt.step()`, or `schedule.apply(opt, step)`.
class LrSchedule {
public:
    /// A pending or running re-warm-up. length == 0 means none. This and options() are
    /// the whole state of a schedule: a checkpoint saves both.
    struct Rewarm {
        std::int64_t at_step = 0;
        std::int64_t length = 0;
        double start = 0.0;  // the ramp's floor: it rises from this multiple of the factor, in [0, 1)
        bool active() const { return length > 0; }
        bool operator==(const Rewarm&) const = default;
    };

    /// Constant 1, no warm-up.
    LrSchedule() = default;

    explicit LrSchedule(const ScheduleOptions& options) : options_(options) {
        constexpr std::string_view what = "LrSchedule";
        check(options.warmup_steps >= 0, what, "expected warmup_steps >= 0, got ", options.warmup_steps);
        check(options.total_steps >= 0, what, "expected total_steps >= 0, got ", options.total_steps);
        check(options.min_factor >= 0.0 && options.min_factor <= 1.0, what,
              "expected 0 <= min_factor <= 1, got ", options.min_factor);
        check(options.kind == ScheduleKind::constant || options.total_steps > options.warmup_steps, what,
              to_string(options.kind), " needs total_steps > warmup_steps, got total_steps = ",
              options.total_steps, ", warmup_steps = ", options.warmup_steps);
    }

    const ScheduleOptions& options() const { return options_; }

    double factor(std::int64_t step) const {
        check(step >= 0, "LrSchedule::factor", "expected step >= 0, got ", step);
        double f = base_factor(step);
        if (rewarm_.active() && step >= rewarm_.at_step && step - rewarm_.at_step < rewarm_.length)
            f *= rewarm_.start + (1.0 - rewarm_.start) * static_cast<double>(step - rewarm_.at_step + 1) /
                                     static_cast<double>(rewarm_.length);
        return f;
    }

    /// Ramps the factor linearly again over [at_step, at_step + length): at step s in
    /// that range it is multiplied by start + (1 - start)·(s - at_step + 1) / length, so
    /// start = 0 ramps from 0 and start = 0.25 from a quarter of the factor (Cuttlefish's
    /// authors' ramp after the switch). Replaces an earlier one.
    void rewarm(std::int64_t at_step, std::int64_t length, double start = 0.0) {
        set_rewarm_state(Rewarm{at_step, length, start});
    }
    void clear_rewarm() { rewarm_ = Rewarm{}; }

    const Rewarm& rewarm_state() const { return rewarm_; }
    /// Restores a saved re-warm-up (length 0 clears it).
    void set_rewarm_state(const Rewarm& r) {
        check(r.at_step >= 0, "LrSchedule::rewarm", "expected at_step >= 0, got ", r.at_step);
        check(r.length >= 0, "LrSchedule::rewarm", "expected length >= 0, got ", r.length);
        check(r.start >= 0.0 && r.start < 1.0, "LrSchedule::rewarm", "expected 0 <= start < 1, got ", r.start);
        rewarm_ = r;
    }

    /// Sets opt's lr scale to factor(step) and returns it.
    template <class T>
    double apply(Optimizer<T>& opt, std::int64_t step) const {
        const double f = factor(step);
        opt.set_lr_scale(f);
        return f;
    }

private:
    double base_factor(std::int64_t step) const {
        const auto& o = options_;
        if (step < o.warmup_steps)
            return static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
        if (o.kind == ScheduleKind::constant) return 1.0;
        if (step >= o.total_steps) return o.min_factor;
        const double progress = static_cast<double>(step - o.warmup_steps) /
                                static_cast<double>(o.total_steps - o.warmup_steps);
        const double shape = o.kind == ScheduleKind::warmup_cosine
                                 ? 0.5 * (1.0 + std::cos(std::numbers::pi * progress))
                                 : 1.0 - progress;
        return o.min_factor + (1.0 - o.min_factor) * shape;
    }

    ScheduleOptions options_;
    Rewarm rewarm_;
};

}  // namespace lowrank
