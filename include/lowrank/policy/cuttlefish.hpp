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
//  - The detector defaults (w 3, L 2, tau 0.3) suit this library's short MLP runs; the
//    authors' CIFAR and ImageNet detectors are presets (CuttlefishPreset, docs page).
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

/// A named detector configuration of the authors (docs/methods/cuttlefish.md gives the
/// file of each value). A preset sets window, tail, threshold, the relaxation (relax_two,
/// relax_one and their counts), init_in_history and rank_floor; a field left at its default
/// takes the preset's value, a field set to anything else is an error.
enum class CuttlefishPreset {
    none,      // the options as given
    cifar,     // w 15, L 11, tau 0.1, relaxation x2.5 / x5, initial weight in the history
    imagenet,  // w 5, L 5, tau 0.33, x2.5 at 4-6 / x5 at 1-3 unstable, initial weight first, r >= d / 5
};

/// How the switch turns a layer's stable rank into its rank.
enum class CuttlefishRankRule {
    scaled,   // r = ceil(floor(srank(W)) * xi), xi = d / floor(srank(W_init)) (the paper's)
    vanilla,  // r = floor(srank(W)) (the authors' "vanilla-stable-rank" metric)
};

inline std::string_view to_string(CuttlefishPreset p) {
    switch (p) {
        case CuttlefishPreset::none: return "none";
        case CuttlefishPreset::cifar: return "cifar";
        case CuttlefishPreset::imagenet: return "imagenet";
    }
    return "?";
}

inline std::string_view to_string(CuttlefishRankRule r) {
    switch (r) {
        case CuttlefishRankRule::scaled: return "scaled";
        case CuttlefishRankRule::vanilla: return "vanilla";
    }
    return "?";
}

struct CuttlefishOptions {
    /// The layers that may be factorized (the MLP's hidden layers); also the tracked ones
    /// unless track_select is given.
    LayerSelector select{.pattern = ".*", .roles = {"hidden"}};
    /// The layers whose stable ranks decide the switch; unset: those of `select` (minus the
    /// keep_first_dense prefix). A tracked layer outside `select` is only read, never
    /// factorized (nor claimed: another policy may manage it); a layer of `select` that is not
    /// tracked is factorized at the switch at the rank of its own stable rank then.
    std::optional<LayerSelector> track_select{};
    /// The authors' detector values by name; see CuttlefishPreset.
    CuttlefishPreset preset = CuttlefishPreset::none;
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
    /// tau is multiplied by this when 2 tracked layers are still unstable (more generally:
    /// more than relax_one_upto and at most relax_two_upto).
    double relax_two = 2.5;
    /// ... and by this when 1 is (at most relax_one_upto, and at least 1).
    double relax_one = 5.0;
    /// The counts of unstable layers those multipliers apply to: relax_one for 1 ..
    /// relax_one_upto, relax_two above that up to relax_two_upto. 1 and 2: the authors' CIFAR
    /// rule; their ResNet-50 ImageNet script uses 3 and 6.
    Index relax_two_upto = 2;
    Index relax_one_upto = 1;
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
    /// Where that ramp starts, as a multiple of the schedule's factor, in [0, 1): 0 ramps from
    /// 0; the authors' main.py starts the low-rank optimizer at 1 / scale_factor = 1/4 of the
    /// dense phase's lr and ramps it back over 5 epochs (rewarm_start 0.25, rewarm_steps 5
    /// epochs).
    double rewarm_start = 0.0;
    /// The history starts with floor(srank(W_init)), as in both of the authors' scripts.
    /// Off by default: the drop from a random init dominates the first derivatives, and the
    /// default short-run detector (w 3) was chosen on histories without it.
    bool init_in_history = false;
    /// How the switch turns the stable rank into a rank (the clamp to [1, d] and rank_floor
    /// apply to both).
    CuttlefishRankRule rank_rule = CuttlefishRankRule::scaled;
    /// The factors' lr after the switch as a multiple of their dense weight's group lr (1:
    /// the same). The factors then have a group of their own even without Frobenius decay.
    double factor_lr_scale = 1.0;
    /// At the switch, zero the optimizer state of every parameter, not only the replaced
    /// layers' (the authors build a new optimizer for the low-rank model).
    bool reset_optimizer_at_switch = false;
};

namespace detail {
/// CuttlefishOptions as declared (a function outside the class template: GCC 12 fails on a
/// value-initialized CuttlefishOptions temporary inside its members).
inline const CuttlefishOptions& cuttlefish_defaults() {
    static const CuttlefishOptions defaults;
    return defaults;
}
}  // namespace detail

/// What the policy knows about one tracked layer.
struct CuttlefishLayer {
    std::string name;
    Index d = 0;                  // min(out, in)
    Index init_stable_rank = 0;   // floor(srank(W_init))
    double xi = 0.0;              // d / init_stable_rank
    std::vector<Index> history;   // floor(srank(W)) per tracking point (W_init first: init_in_history)
    bool tracked = true;          // its stability counts for the switch
    bool factorizable = true;     // in `select` (outside the keep_first_dense prefix)
    bool stable = false;
    bool factorized = false;      // switched to LowRankLinear
    Index rank = 0;               // d while dense; the chosen rank once factorized
    double speedup = 0.0;         // the cost ratio at the switch (0 before)
};

template <class T>
class Cuttlefish : public RankPolicy<T> {
public:
    using Options = CuttlefishOptions;

    explicit Cuttlefish(CuttlefishOptions options = {}) : options_(apply_preset(std::move(options))) {
        validate(options_);
    }

    /// The options a preset stands for, over `base` (CuttlefishPreset::none: base itself).
    static CuttlefishOptions preset_options(CuttlefishPreset preset, CuttlefishOptions base = {}) {
        base.preset = preset;
        return apply_preset(std::move(base));
    }

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

    /// tau, relaxed by relax_one when 1 .. one_upto layers remain unstable and by relax_two
    /// when one_upto + 1 .. two_upto do (by default: 1 and 2 layers).
    static double relaxed_threshold(double tau, Index unstable, double relax_two = 2.5, double relax_one = 5.0,
                                    Index two_upto = 2, Index one_upto = 1) {
        if (unstable >= 1 && unstable <= one_upto) return tau * relax_one;
        if (unstable > one_upto && unstable <= two_upto) return tau * relax_two;
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

    /// The vanilla rule: r = floor(srank(W)), then at least ceil(rank_floor * d), within [1, d].
    static Index vanilla_rank(Index srank, Index d, double rank_floor = 0.0) {
        check(d >= 1 && srank >= 0, "Cuttlefish::vanilla_rank", "expected d >= 1 and srank >= 0, got d = ", d,
              ", srank = ", srank);
        const auto floor_rank = static_cast<Index>(std::ceil(rank_floor * static_cast<double>(d) - 1e-9));
        return std::clamp(std::max(srank, floor_rank), Index{1}, d);
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
        for (const auto& l : layers_) n += l.tracked && !l.stable ? 1 : 0;
        return n;
    }
    /// The threshold the next tracking point will use.
    double current_threshold() const {
        return relaxed_threshold(options_.threshold, unstable_count(), options_.relax_two, options_.relax_one,
                                 options_.relax_two_upto, options_.relax_one_upto);
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
        out["options"] = saved_options(options_);
        nlohmann::json layers = nlohmann::json::array();
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            const auto& l = layers_[i];
            layers.push_back({{"name", l.name},
                              {"d", l.d},
                              {"init_stable_rank", l.init_stable_rank},
                              {"history", l.history},
                              {"tracked", l.tracked},
                              {"factorizable", l.factorizable},
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
        check_saved_options(r);
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
            l.tracked = e.has("tracked") ? e.boolean("tracked") : true;
            l.factorizable = e.has("factorizable") ? e.boolean("factorizable") : true;
            if (l.tracked != layers_[i].tracked || l.factorizable != layers_[i].factorizable)
                e.error("expected tracked = ", layers_[i].tracked ? "true" : "false", " and factorizable = ",
                        layers_[i].factorizable ? "true" : "false", " (this policy's select and track_select), got ",
                        l.tracked ? "true" : "false", " and ", l.factorizable ? "true" : "false");
            l.stable = e.boolean("stable");
            l.factorized = e.boolean("factorized");
            l.rank = e.integer("rank", 1, l.d);
            l.speedup = e.number("speedup");
            if (l.factorized && !switched) e.error("factorized before the switch: the state is inconsistent");
            if (l.factorized && !l.factorizable) e.error("factorized, but the layer is not in select");
            if (!l.factorized && l.rank != l.d) e.error("a dense layer has rank d = ", l.d, ", got ", l.rank);
            any_factorized = any_factorized || l.factorized;
        }
        if (group.has_value() != (any_factorized && needs_factor_group()))
            r.error("factor_group is ", group ? std::to_string(*group) : std::string("null"), ", but ",
                    any_factorized ? "some" : "no", " layer is factorized, frobenius_decay is ",
                    options_.frobenius_decay, " and factor_lr_scale is ", options_.factor_lr_scale,
                    " (a factor group exists exactly when a layer is factorized and either option asks for it)");
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
            const std::int64_t points = ctx.total_steps() / every + (options_.init_in_history ? 1 : 0);
            check(points >= options_.window, "Cuttlefish", "the run's ", ctx.total_steps(),
                  " optimizer steps (total_steps) hold ", points, " tracking point(s), one every ", every,
                  options_.track_every_steps > 0 ? " steps (track_every_steps)" : " steps (an epoch)",
                  options_.init_in_history ? " and the initial weight" : "", ", but a layer needs window = ",
                  options_.window,
                  " before it can be called stable: the run could never switch to low rank; lower window or "
                  "track more often");
        }
        // Model order over the union of the factorizable and the tracked layers.
        auto& all = ctx.layers();
        std::vector<bool> in_select(all.size(), false), kept_dense(all.size(), false);
        for (std::size_t k = 0; k < selected.size(); ++k) {
            const auto i = static_cast<std::size_t>(selected[k] - all.data());
            in_select[i] = static_cast<Index>(k) >= options_.keep_first_dense;
            kept_dense[i] = !in_select[i];
        }
        Index tracked = 0, factorizable = 0;
        for (std::size_t i = 0; i < all.size(); ++i) {
            AnyLinear<T>& slot = *all[i].layer;
            const Index d = std::min(slot.in_features(), slot.out_features());
            if (kept_dense[i])
                ctx.record(name(), slot.name(), "keep_dense", d, d, "keep_first_dense",
                           static_cast<double>(options_.keep_first_dense));
            const bool track = options_.track_select ? options_.track_select->matches(slot.name(), all[i].role)
                                                     : in_select[i];
            if (!track && !in_select[i]) continue;
            if (in_select[i])
                check(slot.template holds<Linear<T>>(), "Cuttlefish", "layer '", slot.name(),
                      "' must be dense (Linear) at the start of training, got a ", slot.kind(), " layer");
            const double srank = linalg::stable_rank<T>(slot.dense_weight());
            const auto init = static_cast<Index>(std::floor(srank));
            check(init >= 1, "Cuttlefish", "layer '", slot.name(),
                  "': the initial weight has stable rank ", srank, " (a zero weight?); expected >= 1");
            CuttlefishLayer l;
            l.name = slot.name();
            l.d = d;
            l.init_stable_rank = init;
            l.xi = static_cast<double>(d) / static_cast<double>(init);
            l.rank = d;
            l.tracked = track;
            l.factorizable = in_select[i];
            if (options_.init_in_history) l.history.push_back(init);
            tracked += track ? 1 : 0;
            factorizable += in_select[i] ? 1 : 0;
            layers_.push_back(std::move(l));
            slots_.push_back(&slot);
            ctx.record(name(), slot.name(), "init", d, d, "stable_rank", srank);
        }
        check(factorizable > 0, "Cuttlefish", "keep_first_dense = ", options_.keep_first_dense,
              " leaves none of the ", selected.size(), " selected layers to factorize");
        check(tracked > 0, "Cuttlefish", "option track_select (pattern '",
              options_.track_select ? options_.track_select->pattern : std::string(),
              "') matches no layer: nothing would decide the switch");
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
        check(o.relax_one_upto >= 1 && o.relax_two_upto >= o.relax_one_upto, what,
              "options relax_one_upto and relax_two_upto must satisfy 1 <= relax_one_upto <= relax_two_upto, got ",
              o.relax_one_upto, " and ", o.relax_two_upto);
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
        check(o.rewarm_start >= 0.0 && o.rewarm_start < 1.0, what,
              "option rewarm_start must be in [0, 1), got ", o.rewarm_start);
        check(o.preset == CuttlefishPreset::none || o.preset == CuttlefishPreset::cifar ||
                  o.preset == CuttlefishPreset::imagenet,
              what, "option preset must be none, cifar or imagenet, got the value ", static_cast<int>(o.preset));
        check(o.rank_rule == CuttlefishRankRule::scaled || o.rank_rule == CuttlefishRankRule::vanilla, what,
              "option rank_rule must be scaled or vanilla, got the value ", static_cast<int>(o.rank_rule));
        check(std::isfinite(o.factor_lr_scale) && o.factor_lr_scale > 0.0, what,
              "option factor_lr_scale must be finite and > 0, got ", o.factor_lr_scale);
    }

    /// Sets the preset's detector fields; a field the caller moved off its default to another
    /// value than the preset's is a conflict, not silently overwritten.
    static CuttlefishOptions apply_preset(CuttlefishOptions o) {
        if (o.preset == CuttlefishPreset::none) return o;
        const CuttlefishOptions& d = detail::cuttlefish_defaults();
        CuttlefishOptions p = o;
        if (o.preset == CuttlefishPreset::cifar) {
            p.window = 15, p.tail = 11, p.threshold = 0.1, p.rank_floor = 0.0;
        } else if (o.preset == CuttlefishPreset::imagenet) {
            p.window = 5, p.tail = 5, p.threshold = 0.33, p.rank_floor = 0.2;
            p.relax_two_upto = 6, p.relax_one_upto = 3;
        } else {
            return o;  // validate reports the bad value
        }
        p.relax_two = 2.5, p.relax_one = 5.0, p.init_in_history = true;
        const auto conflict = [&](std::string_view field, auto given, auto def, auto preset) {
            check(given == def || given == preset, "Cuttlefish", "option ", field, " = ", given,
                  " conflicts with preset ", to_string(o.preset), " (which sets ", preset,
                  "); leave it at its default ", def, " or give the preset's value");
        };
        conflict("window", o.window, d.window, p.window);
        conflict("tail", o.tail, d.tail, p.tail);
        conflict("threshold", o.threshold, d.threshold, p.threshold);
        conflict("relax_two", o.relax_two, d.relax_two, p.relax_two);
        conflict("relax_one", o.relax_one, d.relax_one, p.relax_one);
        conflict("rank_floor", o.rank_floor, d.rank_floor, p.rank_floor);
        conflict("relax_two_upto", o.relax_two_upto, d.relax_two_upto, p.relax_two_upto);
        conflict("relax_one_upto", o.relax_one_upto, d.relax_one_upto, p.relax_one_upto);
        return p;
    }

    bool needs_factor_group() const {
        return options_.frobenius_decay > 0.0 || options_.factor_lr_scale != 1.0;
    }

    /// The options a resumed run must share with the saved one beyond what the layers show.
    static nlohmann::json saved_options(const CuttlefishOptions& o) {
        return {{"preset", std::string(to_string(o.preset))},
                {"init_in_history", o.init_in_history},
                {"rank_rule", std::string(to_string(o.rank_rule))},
                {"factor_lr_scale", o.factor_lr_scale},
                {"reset_optimizer_at_switch", o.reset_optimizer_at_switch}};
    }

    /// Refuses a state saved under other options (a state without them: the defaults).
    void check_saved_options(const detail::PolicyStateReader& r) const {
        const nlohmann::json mine = saved_options(options_);
        nlohmann::json saved = saved_options(detail::cuttlefish_defaults());
        if (r.has("options")) {
            const auto o = r.object("options");
            for (auto it = mine.begin(); it != mine.end(); ++it)
                if (o.has(it.key())) saved[it.key()] = o.at(it.key(), "the saved option");
        }
        for (auto it = mine.begin(); it != mine.end(); ++it)
            if (saved[it.key()] != it.value())
                r.error("option ", it.key(), " is ", it.value().dump(), " here but ", saved[it.key()].dump(),
                        " in the saved run: resume with the saved run's options");
    }

    /// One tracking point: histories, convergence, and the switch when all are stable.
    void track(TrainingContext<T>& ctx) {
        // Relaxation counts the layers unstable before this point's decisions.
        const double tau = current_threshold();
        std::vector<double> srank(layers_.size());
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            auto& l = layers_[i];
            if (l.factorizable) {
                check(slots_[i]->template holds<Linear<T>>(), "Cuttlefish", "tracked layer '", l.name,
                      "' must stay dense until the switch, but its slot holds a ", slots_[i]->kind(), " layer");
                srank[i] = linalg::stable_rank<T>(slots_[i]->template get<Linear<T>>().weight.value);
            } else {
                srank[i] = linalg::stable_rank<T>(slots_[i]->dense_weight());
            }
            l.history.push_back(static_cast<Index>(std::floor(srank[i])));
            ctx.record(name(), l.name, "track", l.d, l.d, "stable_rank", srank[i]);
            if (l.stable || !l.tracked) continue;
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
            if (!l.factorizable) continue;
            AnyLinear<T>& slot = *slots_[i];
            const Linear<T>& dense = slot.template get<Linear<T>>();
            const Index r = options_.rank_rule == CuttlefishRankRule::vanilla
                                ? vanilla_rank(l.history.back(), l.d, options_.rank_floor)
                                : switch_rank(l.history.back(), l.init_stable_rank, l.d, options_.rank_floor);
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
        if (options_.reset_optimizer_at_switch) {
            Optimizer<T>& opt = ctx.optimizer();
            for (std::size_t g = 0; g < opt.groups().size(); ++g)
                for (Parameter<T>* p : opt.group(g).params)
                    // A projected (GaLore) gradient's state belongs to its projection: left alone.
                    if (opt.has_state(p->id()) && opt.projection_of(*p) == nullptr)
                        opt.carry_state(*p, StateCarry::reset_all());
            ctx.record(name(), "", "reset_optimizer", 0, 0);
        }
        switched_ = true;
        switch_step_ = ctx.step();
        switch_epoch_ = ctx.epoch();
        ctx.rewarm(options_.rewarm_steps, options_.rewarm_start);
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
        if (needs_factor_group()) {
            if (!factor_group_) {
                // The factors' lr follows the group their dense weight was in, times the scale;
                // their weight decay too unless the Frobenius decay replaces it.
                const GroupOptions& dense_group = opt.group(opt.group_of(dense.weight)).options;
                const double lr = dense_group.lr * options_.factor_lr_scale;
                const double wd = options_.frobenius_decay > 0.0 ? 0.0 : dense_group.weight_decay;
                opt.add_group({}, GroupOptions{.lr = lr, .weight_decay = wd, .name = "cuttlefish.factors"});
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
