#pragma once
// Cuttlefish: train dense, watch each layer's stable rank settle, then switch the layers to
// low rank at a rank derived from that stable rank (Wang et al., "Cuttlefish: Low-rank
// model training without all the tuning", arXiv 2305.02538). Page: docs/methods/cuttlefish.md.
//
//   on_train_begin  per selected (dense) layer: xi = d / floor(srank(W_init)).
//   tracking point  (on_epoch_end, or every N steps in after_step) append floor(srank(W))
//                   to each layer's history; a layer whose smoothed history has stopped
//                   moving is "stable" for good. When every tracked layer is stable:
//                   r = min(ceil(floor(srank(W)) * xi), d), raised to the optional floor;
//                   layers where factorizing pays are replaced by the balanced SVD split of
//                   their trained weight (LowRankLinear::from_dense, bias kept), with fresh
//                   optimizer state and an LR re-warm-up; the others stay dense.
//   after_backward  after the switch: Frobenius decay, the gradient of
//                   lambda/2 ||U V^T||_F^2, added to the factors' gradients.
//
// Differences from the authors' code, and why:
//  - Which layers to factorize: the authors keep a hand-profiled prefix of K layers dense.
//    Here each layer is judged at the switch by its own cost (forward FLOPs, or a timed
//    forward pass) at the rank it would get, and stays dense when the saving is below
//    min_speedup; keep_first_dense forces a fixed prefix as well.
//  - The convergence test requires at least w entries (the CIFAR script waits for w + 1
//    epochs), and L <= w is enforced so the mean always spans L derivatives.
//  - The factors go into an optimizer group of their own with weight decay 0, so the
//    Frobenius decay is the only decay on them (see the docs page).

#include <lowrank/core/error.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/nn/linear.hpp>
#include <lowrank/nn/low_rank_linear.hpp>
#include <lowrank/policy/rank_policy.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

/// How the switch judges whether factorizing a layer pays.
enum class CuttlefishCost {
    flops,  // forward FLOPs per token, dense / low-rank at the chosen rank (reproducible)
    time,   // measured forward time of the two on a batch (machine-dependent, noisy)
};

struct CuttlefishOptions {
    /// The layers that are tracked and may be factorized (the MLP's hidden layers).
    LayerSelector select{.pattern = ".*", .roles = {"hidden"}};
    /// w: span of the EMA (alpha = 2 / (w + 1)) and the fewest history entries before a
    /// layer may be called stable. The authors: 15 (CIFAR), 5 (ImageNet, DeiT). The default
    /// suits a ~10-epoch Fashion-MNIST MLP run, whose stable ranks settle within 1-2 epochs.
    Index window = 3;
    /// L: how many of the latest derivatives are averaged; 1 <= L <= w. The authors: 11
    /// (CIFAR), 5 (ImageNet, DeiT).
    Index tail = 2;
    /// tau: a layer is stable when that mean is <= tau (in ranks per tracking point). The
    /// authors: 0.1 (CIFAR), 0.33-0.41 (ImageNet, DeiT).
    double threshold = 0.3;
    /// tau is multiplied by this when exactly 2 tracked layers are still unstable.
    double relax_two = 2.5;
    /// ... and by this when exactly 1 is.
    double relax_one = 5.0;
    /// 0: one tracking point per epoch (on_epoch_end). N > 0: one every N optimizer steps
    /// (after_step, when the step count is a multiple of N); on_epoch_end is then ignored.
    std::int64_t track_every_steps = 0;
    /// The rank is at least ceil(rank_floor * d); 0 disables, 1 keeps full rank.
    double rank_floor = 0.0;
    /// The first K selected layers (model order) are never factorized nor tracked.
    Index keep_first_dense = 0;
    /// A layer is factorized only if dense cost / low-rank cost >= min_speedup.
    double min_speedup = 1.1;
    CuttlefishCost cost = CuttlefishCost::flops;
    /// With cost == time: tokens in the timed batch and timed repetitions (the median counts).
    Index timing_tokens = 128;
    int timing_repeats = 7;
    /// lambda of the Frobenius decay on the factors after the switch; 0 disables it (the
    /// factors then keep the weight decay of the group their dense weight was in).
    double frobenius_decay = 1e-4;
    /// Steps of LR re-warm-up after the switch (0: none).
    std::int64_t rewarm_steps = 100;
};

/// What the policy knows about one tracked layer.
struct CuttlefishLayer {
    std::string name;
    Index d = 0;                  // min(out, in)
    Index init_stable_rank = 0;   // floor(srank(W_init))
    double xi = 0.0;              // d / init_stable_rank
    std::vector<Index> history;   // floor(srank(W)) at each tracking point
    bool stable = false;
    bool factorized = false;      // switched to LowRankLinear
    Index rank = 0;               // d while dense; the chosen rank once factorized
    double speedup = 0.0;         // the cost ratio at the switch (0 before)
};

template <class T>
class Cuttlefish : public RankPolicy<T> {
public:
    using Options = CuttlefishOptions;

    explicit Cuttlefish(CuttlefishOptions options = {}) : options_(std::move(options)) { validate(options_); }

    std::string_view name() const override { return "cuttlefish"; }
    const CuttlefishOptions& options() const { return options_; }

    // --- the convergence test, usable without a model ---

    /// EMA with s_0 = x_0, s_t = alpha x_t + (1 - alpha) s_{t-1} (pandas' ewm(adjust=False)).
    static std::vector<double> ema(std::span<const double> x, double alpha) {
        check(alpha > 0.0 && alpha <= 1.0, "Cuttlefish::ema", "expected alpha in (0, 1], got ", alpha);
        std::vector<double> s(x.size());
        for (std::size_t t = 0; t < x.size(); ++t) s[t] = t == 0 ? x[0] : alpha * x[t] + (1.0 - alpha) * s[t - 1];
        return s;
    }

    /// |dy/dt| with unit spacing: central differences inside, one-sided at the two ends
    /// (numpy.gradient). One entry gives {0}.
    static std::vector<double> abs_derivative(std::span<const double> y) {
        const std::size_t n = y.size();
        std::vector<double> d(n, 0.0);
        if (n < 2) return d;
        d[0] = std::abs(y[1] - y[0]);
        d[n - 1] = std::abs(y[n - 1] - y[n - 2]);
        for (std::size_t i = 1; i + 1 < n; ++i) d[i] = std::abs(y[i + 1] - y[i - 1]) / 2.0;
        return d;
    }

    /// The mean of the last `tail` absolute derivatives of the EMA (span `window`) of the
    /// history (all of them if there are fewer). NaN for an empty history.
    static double convergence_statistic(std::span<const double> history, Index window, Index tail) {
        check(window >= 1 && tail >= 1, "Cuttlefish::convergence_statistic",
              "expected window >= 1 and tail >= 1, got window = ", window, ", tail = ", tail);
        if (history.empty()) return std::nan("");
        const auto d = abs_derivative(ema(history, 2.0 / (static_cast<double>(window) + 1.0)));
        const std::size_t k = std::min(d.size(), static_cast<std::size_t>(tail));
        double sum = 0.0;
        for (std::size_t i = d.size() - k; i < d.size(); ++i) sum += d[i];
        return sum / static_cast<double>(k);
    }

    /// tau, relaxed by relax_two when 2 layers remain unstable and by relax_one when 1 does.
    static double relaxed_threshold(double tau, Index unstable, double relax_two = 2.5, double relax_one = 5.0) {
        if (unstable == 2) return tau * relax_two;
        if (unstable == 1) return tau * relax_one;
        return tau;
    }

    /// Stable: at least `window` entries, and the statistic is <= threshold.
    static bool is_converged(std::span<const double> history, Index window, Index tail, double threshold) {
        if (static_cast<Index>(history.size()) < window) return false;
        return convergence_statistic(history, window, tail) <= threshold;
    }

    /// r = min(ceil(srank * d / init_srank), d) (exact integer arithmetic; xi = d /
    /// init_srank), then at least ceil(rank_floor * d) and at least 1. The clamp matters:
    /// the unclamped formula exceeds d as soon as srank > init_srank.
    static Index switch_rank(Index srank, Index init_srank, Index d, double rank_floor = 0.0) {
        check(d >= 1 && init_srank >= 1 && srank >= 0, "Cuttlefish::switch_rank",
              "expected d >= 1, init_srank >= 1, srank >= 0, got d = ", d, ", init_srank = ", init_srank,
              ", srank = ", srank);
        Index r = std::min((srank * d + init_srank - 1) / init_srank, d);
        const auto floor_rank = static_cast<Index>(std::ceil(rank_floor * static_cast<double>(d) - 1e-9));
        return std::clamp(std::max(r, floor_rank), Index{1}, d);
    }

    /// Forward FLOPs per token dense / low-rank at rank r for an out x in layer.
    static double flops_speedup(Index out, Index in, Index r, bool bias) {
        const double m = static_cast<double>(out), n = static_cast<double>(in);
        const double b = bias ? m : 0.0;
        return (2.0 * m * n + b) / (2.0 * static_cast<double>(r) * (m + n) + b);
    }

    // --- state ---

    /// The tracked layers, in model order (the keep_first_dense prefix is not tracked).
    const std::vector<CuttlefishLayer>& layers() const { return layers_; }
    bool switched() const { return switched_; }
    /// The step and epoch of the switch (-1 before).
    std::int64_t switch_step() const { return switch_step_; }
    std::int64_t switch_epoch() const { return switch_epoch_; }
    /// Tracked layers not yet stable.
    Index unstable_count() const {
        Index n = 0;
        for (const auto& l : layers_) n += l.stable ? 0 : 1;
        return n;
    }
    /// The threshold the next tracking point will use.
    double current_threshold() const {
        return relaxed_threshold(options_.threshold, unstable_count(), options_.relax_two, options_.relax_one);
    }
    /// The optimizer group of the factors (set at the switch when Frobenius decay is on).
    std::optional<std::size_t> factor_group() const { return factor_group_; }

    // --- resuming ---

    /// Whether and when the switch happened, the factors' optimizer group and, per tracked
    /// layer, d, the initial stable rank, the history, stable, factorized, the rank, the
    /// speedup at the switch and the structure (dense, or the factors' shapes).
    nlohmann::json state() const override {
        nlohmann::json out = detail::policy_state_header(name());
        out["switched"] = switched_;
        out["switch_step"] = switch_step_;
        out["switch_epoch"] = switch_epoch_;
        out["factor_group"] = factor_group_ ? nlohmann::json(*factor_group_) : nlohmann::json(nullptr);
        nlohmann::json layers = nlohmann::json::array();
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            const auto& l = layers_[i];
            layers.push_back({{"name", l.name},
                              {"d", l.d},
                              {"init_stable_rank", l.init_stable_rank},
                              {"history", l.history},
                              {"stable", l.stable},
                              {"factorized", l.factorized},
                              {"rank", l.rank},
                              {"speedup", l.speedup},
                              {"structure", detail::layer_structure(*slots_[i])}});
        }
        out["layers"] = layers;
        return out;
    }

    /// Takes back the histories and decisions; after the switch, factorizes the layers that
    /// were, at their saved ranks, through the same path as the switch (same optimizer
    /// groups, in the same order; placeholder values). The LR re-warm-up is the schedule's
    /// state, not the policy's: the caller restores it with the schedule.
    void restore(TrainingContext<T>& ctx, const nlohmann::json& state) override {
        check(!slots_.empty(), "cuttlefish", "restore called before on_train_begin: select the layers first");
        check(!switched_, "cuttlefish",
              "restore expects the policy as on_train_begin left it, but it has switched");
        const auto r = detail::open_policy_state(name(), state);
        const bool switched = r.boolean("switched");
        const std::int64_t step = r.integer("switch_step", -1, std::numeric_limits<std::int64_t>::max());
        const std::int64_t epoch = r.integer("switch_epoch", -1, std::numeric_limits<std::int64_t>::max());
        std::optional<std::size_t> group;
        if (!r.at("factor_group", "a group index or null").is_null())
            group = static_cast<std::size_t>(
                r.integer("factor_group", 0, std::numeric_limits<std::int64_t>::max()));
        if (switched != (step >= 0))
            r.error("switched is ", switched ? "true" : "false", " but switch_step is ", step,
                    " (expected >= 0 exactly when switched)");
        std::vector<std::string> names;
        for (const auto& l : layers_) names.push_back(l.name);
        const auto entries = detail::matched_layers(r, names);
        std::vector<CuttlefishLayer> saved(layers_.size());
        bool any_factorized = false;
        for (std::size_t i = 0; i < entries.size(); ++i) {
            const auto& e = entries[i];
            CuttlefishLayer& l = saved[i];
            l.name = layers_[i].name;
            l.d = e.integer("d", 1, std::numeric_limits<Index>::max());
            if (l.d != layers_[i].d) e.error("expected d = min(out, in) = ", layers_[i].d, ", got ", l.d);
            l.init_stable_rank = e.integer("init_stable_rank", 1, l.d);
            l.xi = static_cast<double>(l.d) / static_cast<double>(l.init_stable_rank);
            for (const std::int64_t h : e.integers("history")) {
                if (h < 0) e.error("expected a history of stable ranks >= 0, got ", h);
                l.history.push_back(h);
            }
            l.stable = e.boolean("stable");
            l.factorized = e.boolean("factorized");
            l.rank = e.integer("rank", 1, l.d);
            l.speedup = e.number("speedup");
            if (l.factorized && !switched) e.error("factorized before the switch: the state is inconsistent");
            if (!l.factorized && l.rank != l.d) e.error("a dense layer has rank d = ", l.d, ", got ", l.rank);
            any_factorized = any_factorized || l.factorized;
        }
        if (group.has_value() != (any_factorized && options_.frobenius_decay > 0.0))
            r.error("factor_group is ", group ? std::to_string(*group) : std::string("null"), ", but ",
                    any_factorized ? "some" : "no", " layer is factorized and frobenius_decay is ",
                    options_.frobenius_decay, " (a factor group exists exactly when both hold)");
        // Everything read and checked: reshape, in the switch's order.
        for (std::size_t i = 0; i < saved.size(); ++i) {
            layers_[i] = saved[i];
            if (saved[i].factorized) factorize(ctx, i, saved[i].rank, /*placeholder=*/true);
        }
        if (factor_group_ != group) {
            const auto show = [](const std::optional<std::size_t>& g) {
                return g ? std::to_string(*g) : std::string("none");
            };
            throw Error(detail::concat("cuttlefish: restore: expected the factors' optimizer group ",
                                       show(group), " (saved), got ", show(factor_group_),
                                       ": the optimizer's groups differ from the saved run's"));
        }
        for (std::size_t i = 0; i < entries.size(); ++i)
            detail::check_layer_structure(entries[i], *slots_[i]);
        switched_ = switched;
        switch_step_ = step;
        switch_epoch_ = epoch;
    }

    // --- hooks ---

    void on_train_begin(TrainingContext<T>& ctx) override {
        layers_.clear();
        slots_.clear();
        switched_ = false;
        switch_step_ = switch_epoch_ = -1;
        factor_group_.reset();
        const auto selected = ctx.select(options_.select, name());
        // A layer is stable only with `window` history entries: a run with fewer tracking
        // points can never switch (it would be dense training under another name).
        const std::int64_t every =
            options_.track_every_steps > 0 ? options_.track_every_steps : ctx.steps_per_epoch();
        if (ctx.total_steps() > 0 && every > 0) {
            const std::int64_t points = ctx.total_steps() / every;
            check(points >= options_.window, "Cuttlefish", "the run's ", ctx.total_steps(),
                  " optimizer steps (total_steps) hold ", points, " tracking point(s), one every ", every,
                  options_.track_every_steps > 0 ? " steps (track_every_steps)" : " steps (an epoch)",
                  ", but a layer needs window = ", options_.window,
                  " before it can be called stable: the run could never switch to low rank; lower window or "
                  "track more often");
        }
        for (std::size_t i = 0; i < selected.size(); ++i) {
            AnyLinear<T>& slot = *selected[i]->layer;
            check(slot.template holds<Linear<T>>(), "Cuttlefish", "layer '", slot.name(),
                  "' must be dense (Linear) at the start of training, got a ", slot.kind(), " layer");
            const Index d = std::min(slot.in_features(), slot.out_features());
            if (static_cast<Index>(i) < options_.keep_first_dense) {
                ctx.record(name(), slot.name(), "keep_dense", d, d, "keep_first_dense",
                           static_cast<double>(options_.keep_first_dense));
                continue;
            }
            const double srank = linalg::stable_rank<T>(slot.template get<Linear<T>>().weight.value);
            const auto init = static_cast<Index>(std::floor(srank));
            check(init >= 1, "Cuttlefish", "layer '", slot.name(),
                  "': the initial weight has stable rank ", srank, " (a zero weight?); expected >= 1");
            CuttlefishLayer l;
            l.name = slot.name();
            l.d = d;
            l.init_stable_rank = init;
            l.xi = static_cast<double>(d) / static_cast<double>(init);
            l.rank = d;
            layers_.push_back(std::move(l));
            slots_.push_back(&slot);
            ctx.record(name(), slot.name(), "init", d, d, "stable_rank", srank);
        }
        check(!layers_.empty(), "Cuttlefish", "keep_first_dense = ", options_.keep_first_dense,
              " leaves none of the ", selected.size(), " selected layers to track");
    }

    void after_backward(TrainingContext<T>&) override {
        if (!switched_ || options_.frobenius_decay == 0.0) return;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            if (!layers_[i].factorized) continue;
            auto* lr = slots_[i]->template get_if<LowRankLinear<T>>();
            check(lr != nullptr, "Cuttlefish", "layer '", layers_[i].name,
                  "' was factorized but its slot now holds a ", slots_[i]->kind(), " layer");
            apply_frobenius_decay(*lr, options_.frobenius_decay, gram_);
        }
    }

    void after_step(TrainingContext<T>& ctx) override {
        if (options_.track_every_steps > 0 && !switched_ && ctx.step() > 0 && ctx.step() % options_.track_every_steps == 0)
            track(ctx);
    }

    void on_epoch_end(TrainingContext<T>& ctx) override {
        if (options_.track_every_steps == 0 && !switched_) track(ctx);
    }

    /// Adds lambda s^2 U (V^T V) to dL/dU and lambda s^2 V (U^T U) to dL/dV: the gradient of
    /// lambda/2 ||s U V^T||_F^2 through r x r Gram matrices, never forming U V^T. A factor
    /// whose gradient is not allocated (not in this step's graph) is left alone.
    static void apply_frobenius_decay(LowRankLinear<T>& layer, double lambda, Matrix<T>& gram) {
        const T c = static_cast<T>(lambda * layer.scale() * layer.scale());
        Parameter<T>& u = layer.U;
        Parameter<T>& v = layer.V;
        const bool du = u.trainable && u.grad.rows() == u.rows() && u.grad.cols() == u.cols();
        const bool dv = v.trainable && v.grad.rows() == v.rows() && v.grad.cols() == v.cols();
        if (du) {
            gram.noalias() = v.value.transpose() * v.value;
            u.grad.noalias() += c * u.value * gram;
        }
        if (dv) {
            gram.noalias() = u.value.transpose() * u.value;
            v.grad.noalias() += c * v.value * gram;
        }
    }

private:
    static void validate(const CuttlefishOptions& o) {
        constexpr std::string_view what = "Cuttlefish";
        check(o.window >= 1, what, "option window (w) must be >= 1, got ", o.window);
        check(o.tail >= 1 && o.tail <= o.window, what, "option tail (L) must be in [1, window = ", o.window,
              "], got ", o.tail);
        check(std::isfinite(o.threshold) && o.threshold >= 0.0, what,
              "option threshold (tau) must be finite and >= 0, got ", o.threshold);
        check(std::isfinite(o.relax_two) && o.relax_two >= 1.0, what, "option relax_two must be >= 1, got ",
              o.relax_two);
        check(std::isfinite(o.relax_one) && o.relax_one >= 1.0, what, "option relax_one must be >= 1, got ",
              o.relax_one);
        check(o.track_every_steps >= 0, what, "option track_every_steps must be >= 0 (0: per epoch), got ",
              o.track_every_steps);
        check(o.rank_floor >= 0.0 && o.rank_floor <= 1.0, what, "option rank_floor must be in [0, 1], got ",
              o.rank_floor);
        check(o.keep_first_dense >= 0, what, "option keep_first_dense must be >= 0, got ", o.keep_first_dense);
        check(std::isfinite(o.min_speedup) && o.min_speedup > 0.0, what,
              "option min_speedup must be finite and > 0, got ", o.min_speedup);
        check(o.timing_tokens >= 1, what, "option timing_tokens must be >= 1, got ", o.timing_tokens);
        check(o.timing_repeats >= 1, what, "option timing_repeats must be >= 1, got ", o.timing_repeats);
        check(std::isfinite(o.frobenius_decay) && o.frobenius_decay >= 0.0, what,
              "option frobenius_decay must be finite and >= 0, got ", o.frobenius_decay);
        check(o.rewarm_steps >= 0, what, "option rewarm_steps must be >= 0, got ", o.rewarm_steps);
    }

    /// One tracking point: histories, convergence, and the switch when all are stable.
    void track(TrainingContext<T>& ctx) {
        // Relaxation counts the layers unstable before this point's decisions.
        const double tau = current_threshold();
        std::vector<double> srank(layers_.size());
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            auto& l = layers_[i];
            auto* dense = slots_[i]->template get_if<Linear<T>>();
            check(dense != nullptr, "Cuttlefish", "tracked layer '", l.name,
                  "' must stay dense until the switch, but its slot holds a ", slots_[i]->kind(), " layer");
            srank[i] = linalg::stable_rank<T>(dense->weight.value);
            l.history.push_back(static_cast<Index>(std::floor(srank[i])));
            ctx.record(name(), l.name, "track", l.d, l.d, "stable_rank", srank[i]);
            if (l.stable) continue;
            const std::vector<double> h(l.history.begin(), l.history.end());
            if (is_converged(h, options_.window, options_.tail, tau)) {
                l.stable = true;
                ctx.record(name(), l.name, "stable", l.d, l.d, "stable_rank", static_cast<double>(l.history.back()));
            }
        }
        if (unstable_count() == 0) switch_to_low_rank(ctx);
    }

    void switch_to_low_rank(TrainingContext<T>& ctx) {
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            auto& l = layers_[i];
            AnyLinear<T>& slot = *slots_[i];
            const Linear<T>& dense = slot.template get<Linear<T>>();
            const Index r = switch_rank(l.history.back(), l.init_stable_rank, l.d, options_.rank_floor);
            l.speedup = options_.cost == CuttlefishCost::flops
                            ? flops_speedup(dense.out_features(), dense.in_features(), r, dense.has_bias())
                            : timed_speedup(dense, r);
            if (l.speedup < options_.min_speedup) {
                ctx.record(name(), l.name, "keep_dense", l.d, l.d, "speedup", l.speedup);
                continue;
            }
            factorize(ctx, i, r);
            ctx.record(name(), l.name, "switch", l.d, r, "stable_rank", static_cast<double>(l.history.back()));
        }
        switched_ = true;
        switch_step_ = ctx.step();
        switch_epoch_ = ctx.epoch();
        ctx.rewarm(options_.rewarm_steps);
    }

    /// Replaces tracked layer i (dense) by the balanced rank-r split of its weight, the
    /// factors in the Frobenius-decay group (created at the first factorized layer). With
    /// `placeholder` (a restore, whose values the checkpoint overwrites) the factors are
    /// only allocated: the same parameters and shapes without the SVD of a large weight.
    void factorize(TrainingContext<T>& ctx, std::size_t i, Index r, bool placeholder = false) {
        Optimizer<T>& opt = ctx.optimizer();
        auto& l = layers_[i];
        AnyLinear<T>& slot = *slots_[i];
        const Linear<T>& dense = slot.template get<Linear<T>>();
        std::optional<std::size_t> group;
        if (options_.frobenius_decay > 0.0) {
            if (!factor_group_) {
                // The factors' lr follows the group their dense weight was in.
                const double lr = opt.group(opt.group_of(dense.weight)).options.lr;
                opt.add_group({}, GroupOptions{.lr = lr, .weight_decay = 0.0, .name = "cuttlefish.factors"});
                factor_group_ = opt.groups().size() - 1;
            }
            group = factor_group_;
        }
        const Matrix<T>* bias = dense.has_bias() ? &dense.bias.value : nullptr;
        if (placeholder) {
            Rng scratch(0);
            LowRankLinear<T> low(
                l.name, dense.in_features(), dense.out_features(), scratch,
                LowRankOptions{.rank = r, .bias = bias != nullptr, .init = LowRankInit::lora});
            if (bias) low.bias.value = *bias;
            ctx.replace_layer(slot, std::move(low), group);
        } else {
            ctx.replace_layer(slot, LowRankLinear<T>::from_dense(l.name, dense.weight.value, r, bias), group);
        }
        l.factorized = true;
        l.rank = r;
    }

    /// Median forward time dense / low-rank on a batch of timing_tokens rows.
    double timed_speedup(const Linear<T>& dense, Index r) const {
        const Index m = dense.out_features(), n = dense.in_features(), N = options_.timing_tokens;
        const Matrix<T> x = Matrix<T>::Constant(N, n, T(0.5));
        const Matrix<T> u = Matrix<T>::Constant(m, r, T(0.25)), v = Matrix<T>::Constant(n, r, T(0.25));
        Matrix<T> y(N, m), xv(N, r);
        const auto& w = dense.weight.value;
        const double t_dense = median_seconds([&] { y.noalias() = x * w.transpose(); });
        const double t_low = median_seconds([&] {
            xv.noalias() = x * v;
            y.noalias() = xv * u.transpose();
        });
        return t_low > 0.0 ? t_dense / t_low : 1.0;
    }

    template <class F>
    double median_seconds(F&& f) const {
        using Clock = std::chrono::steady_clock;
        f();  // warm-up: first touch of the buffers, GEMM packing
        std::vector<double> t(static_cast<std::size_t>(options_.timing_repeats));
        for (auto& s : t) {
            const auto t0 = Clock::now();
            f();
            s = std::chrono::duration<double>(Clock::now() - t0).count();
        }
        std::nth_element(t.begin(), t.begin() + static_cast<std::ptrdiff_t>(t.size() / 2), t.end());
        return t[t.size() / 2];
    }

    CuttlefishOptions options_;
    std::vector<CuttlefishLayer> layers_;
    std::vector<AnyLinear<T>*> slots_;
    bool switched_ = false;
    std::int64_t switch_step_ = -1;
    std::int64_t switch_epoch_ = -1;
    std::optional<std::size_t> factor_group_;
    Matrix<T> gram_;  // r x r workspace of the Frobenius decay
};

}  // namespace lowrank
