#pragma once
// ReLora: LoRA in rounds (Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank
// Updates", arXiv 2307.05695), in the form the SST paper (arXiv 2405.15481) compares
// against as "ReLoRA*": no full-rank warm start.
//
// The layers start as in Lora (lora.hpp): W = W0 + s·U·Vᵀ, W0 frozen, U = 0, V random.
// Every `period` optimizer steps (counted by TrainingContext::step, in after_step):
//
//     W0 <- W0 + s·U·Vᵀ          the merge; the network's function does not change
//     U = 0, V redrawn            a fresh rank-r subspace for the next round
//     optimizer state of U, V     reset (carry_state reset_all), or magnitude-pruned
//     learning rate               re-warmed over `rewarm_steps` steps
//
// so the sum of the rounds' updates can reach a rank above r. Right after a restart
// ∂L/∂V = xᵀ·(s·dy·U) = 0 exactly (U = 0): V only starts to move once U has; the saddle
// SST points at. Each restart writes one "restart" event per layer whose statistic is
// the Frobenius norm of the merged update s·U·Vᵀ.
//
// Where this differs from the authors' code and why:
//  - No full-rank warm start (their runs first train the dense model for thousands of
//    steps): this is the SST paper's ReLoRA*, LoRA from the first step.
//  - Optimizer state: the authors prune 99% of Adam's moments by magnitude and keep the
//    step count; the default here is a full reset (state_reset = 1: moments and step count
//    zeroed, so bias correction restarts; docs/methods/relora.md). state_reset < 1 prunes
//    that fraction of each moment by magnitude, as their code does, keeping the step.
//  - The re-warm-up multiplies whatever schedule the run uses by a linear ramp
//    (LrSchedule::rewarm); their "cosine_restarts" is the same shape on a cosine.
//  - α defaults to r and the bias trains; see lora.hpp.
//
// Page: docs/methods/relora.md.

#include <lowrank/core/error.hpp>
#include <lowrank/policy/lora.hpp>
#include <lowrank/policy/rank_policy.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

struct ReLoraOptions {
    // The LoRA part, as in LoraOptions.
    Index rank = 8;                 // r, in [1, min(out, in)] of every selected layer
    std::optional<double> alpha{};  // α, scale s = α / r; unset: α = r (s = 1); must be > 0
    bool freeze_base = true;        // W0 frozen between merges; false also trains W0
    bool train_bias = true;         // the copied bias keeps training
    LayerSelector select{.pattern = ".*", .roles = {"hidden"}};  // the layers made low-rank
    std::optional<std::size_t> group{};  // optimizer group of U, V; unset: the dense weight's
    std::uint64_t seed = 0;              // seeds the draws of V, at the start and at restarts
    // The restarts.
    std::int64_t period = 500;       // T: optimizer steps per round (about one epoch of a batch-128
                                     // Fashion-MNIST run: 9 restarts in 10 epochs, 4690 steps)
    std::int64_t rewarm_steps = 50;  // LR re-warm-up after a restart, in [0, period]; 0: none
    double state_reset = 1.0;        // share of each U/V moment zeroed at a restart, in [0, 1]:
                                     // 1 resets all (and the step count); below 1 zeroes the
                                     // smallest-magnitude entries and keeps the step (0.99: ReLoRA's code)

    LoraOptions lora() const {
        return LoraOptions{.rank = rank,
                            .alpha = alpha,
                            .freeze_base = freeze_base,
                            .train_bias = train_bias,
                            .select = select,
                            .group = group,
                            .seed = seed};
    }
};

namespace detail {

/// Zeroes the `fraction` of m's entries with the smallest magnitudes (ties at the cut are
/// zeroed too, as a quantile threshold does).
template <class T>
void prune_smallest(Matrix<T>& m, double fraction) {
    const Index n = m.size();
    const auto k = static_cast<Index>(std::floor(fraction * static_cast<double>(n)));
    if (k <= 0) return;
    if (k >= n) {
        m.setZero();
        return;
    }
    std::vector<T> magnitude(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) magnitude[static_cast<std::size_t>(i)] = std::abs(m.data()[i]);
    std::nth_element(magnitude.begin(), magnitude.begin() + (k - 1), magnitude.end());
    const T cut = magnitude[static_cast<std::size_t>(k - 1)];
    for (Index i = 0; i < n; ++i)
        if (std::abs(m.data()[i]) <= cut) m.data()[i] = T(0);
}

}  // namespace detail

/// ReLoRA: LoRA whose update is merged into the frozen base every `period` steps.
template <class T>
class ReLora : public RankPolicy<T> {
public:
    using Options = ReLoraOptions;

    explicit ReLora(ReLoraOptions options = {})
        : options_(validated(options)), adapters_(options.lora(), "relora") {}

    std::string_view name() const override { return "relora"; }

    /// Refuses a run that ends before the first restart (it would be LoRA), then converts.
    void on_train_begin(TrainingContext<T>& ctx) override {
        check(ctx.total_steps() == 0 || ctx.total_steps() >= options_.period, "ReLora", "the run has ",
              ctx.total_steps(), " optimizer steps (total_steps) but the first restart comes after step ",
              options_.period, " (option period): the run would be plain LoRA; lower period or use Lora");
        adapters_.convert(ctx);
    }

    /// The restarts done, the step of the last one, the generator of the V draws and each
    /// converted layer's structure.
    nlohmann::json state() const override {
        nlohmann::json out = detail::policy_state_header(name());
        out["restarts"] = restarts_;
        out["last_restart"] = last_restart_;
        adapters_.save(out);
        return out;
    }

    /// Nothing to reshape (a restart keeps every shape): checks the layers, takes the
    /// counters and the generator back.
    void restore(TrainingContext<T>&, const nlohmann::json& state) override {
        const auto r = detail::open_policy_state(name(), state);
        const std::int64_t restarts = r.integer("restarts", 0, std::numeric_limits<std::int64_t>::max());
        const std::int64_t last = r.integer("last_restart", -1, std::numeric_limits<std::int64_t>::max());
        const Rng::State rng = adapters_.check_saved(r);
        restarts_ = restarts;
        last_restart_ = last;
        adapters_.rng().set_state(rng);
    }

    /// Restarts when the optimizer steps taken so far are a positive multiple of `period`.
    void after_step(TrainingContext<T>& ctx) override {
        check(adapters_.started(), "relora", "after_step called before on_train_begin");
        if (ctx.step() <= 0 || ctx.step() % options_.period != 0 || ctx.step() == last_restart_) return;
        restart(ctx);
    }

    /// One restart now: merge, re-initialise, reset the factors' optimizer state, re-warm.
    void restart(TrainingContext<T>& ctx) {
        check(adapters_.started(), "relora", "restart called before on_train_begin");
        Optimizer<T>& opt = ctx.optimizer();
        for (std::size_t i = 0; i < adapters_.layers().size(); ++i) {
            LowRankLinear<T>& l = adapters_.layer(i);
            const T s = static_cast<T>(l.scale());
            // ‖s·U·Vᵀ‖_F² = s²·Σ (UᵀU) ∘ (VᵀV): from r × r Gram matrices, not the m × n product.
            const Matrix<T> gu = l.U.value.transpose() * l.U.value;
            const Matrix<T> gv = l.V.value.transpose() * l.V.value;
            const double norm = std::abs(static_cast<double>(s)) *
                                std::sqrt(std::max(0.0, static_cast<double>(gu.cwiseProduct(gv).sum())));
            l.base.value.noalias() += (s * l.U.value) * l.V.value.transpose();
            l.U.value.setZero();
            adapters_.draw_v(l.V.value);
            // New factors: a new basis for the optimizer (the base keeps its shape and basis).
            l.U.bump_layout();
            l.V.bump_layout();
            carry(opt, l.U);
            carry(opt, l.V);
            ctx.record(name(), l.name(), "restart", l.rank(), l.rank(), "merged_update_norm", norm);
        }
        ctx.rewarm(options_.rewarm_steps);
        last_restart_ = ctx.step();
        ++restarts_;
    }

    const ReLoraOptions& options() const { return options_; }
    Index rank() const { return adapters_.rank(); }
    double alpha() const { return adapters_.alpha(); }
    /// s = α / r.
    double scale() const { return adapters_.scale(); }
    std::int64_t period() const { return options_.period; }
    /// Restarts done so far.
    std::int64_t restarts() const { return restarts_; }
    /// The converted slots, in model order (empty before on_train_begin).
    const std::vector<AnyLinear<T>*>& layers() const { return adapters_.layers(); }
    /// The generator of the V draws (a checkpoint saves its state).
    Rng& rng() { return adapters_.rng(); }

private:
    static const ReLoraOptions& validated(const ReLoraOptions& o) {
        check(o.period >= 1, "relora", "option period: expected >= 1 optimizer step, got ", o.period);
        check(o.rewarm_steps >= 0 && o.rewarm_steps <= o.period, "relora",
              "option rewarm_steps: expected in [0, period = ", o.period, "] (a longer one never lets the ",
              "learning rate reach its peak), got ", o.rewarm_steps);
        check(o.state_reset >= 0.0 && o.state_reset <= 1.0, "relora",
              "option state_reset: expected a fraction in [0, 1], got ", o.state_reset);
        return o;
    }

    void carry(Optimizer<T>& opt, const Parameter<T>& p) const {
        if (options_.state_reset >= 1.0) {
            opt.carry_state(p, StateCarry::reset_all());
            return;
        }
        const OptimizerState<T>* current = opt.state_of(p);
        if (current == nullptr) return;  // never stepped: its first step starts fresh
        OptimizerState<T> s = *current;
        for (auto moment : opt.moment_names()) detail::prune_smallest(s.moment(moment), options_.state_reset);
        opt.set_state(p, std::move(s));  // stamps the new layout version
    }

    ReLoraOptions options_;
    detail::LoraAdapters<T> adapters_;
    std::int64_t restarts_ = 0;
    std::int64_t last_restart_ = -1;
};

}  // namespace lowrank
