#pragma once
// InRank: incremental low-rank learning (Zhao et al., "InRank: Incremental Low-Rank
// Learning", arXiv 2306.11250). The cumulative weight update of a layer grows in rank
// gradually during training, so the policy holds each selected layer as a low-rank product
// and raises its rank only when the spectrum of the product asks for it.
//
// Each selected layer becomes an IncrementalRankLinear with capacity R columns allocated,
// k = r + b of them trained (r the rank, b a buffer of extra columns that are always
// trained, so that new directions can appear in them). At each rank check (every `gap`
// after `warmup`, in the cadence's unit) the policy takes the singular values s of the
// active product, zero padded to length d = min(out, in), and scans k' = r, r + 1, ...
// for the first explained ratio
//
//     ratio(k') = 1 - Var(s with its first k' entries zeroed) / Var(s)
//
// above the threshold, scanning at most up to r + b - 1 and the cap R - b - 1; then
// r <- k'. The rank never shrinks, grows by at most b - 1 per check and never exceeds
// R - b - 1. Newly activated columns keep their initial values; their optimizer state
// starts at zero. Every check records a "check" event per layer with the explained ratio,
// and a "grow" event when the rank rose.
//
// The efficient two-stage recipe (the default): stage 1 grows the ranks for a short early
// phase (`stage1_steps` optimizer steps, or else `stage1_epochs` epochs). At its end each
// layer is cut to rank r by truncated SVD of its active product (balanced split), the
// capacity and the buffer are freed, the optimizer moments are sliced to the new shapes,
// and stage 2 trains at fixed rank r.
//
// The cadence: by default warmup and gap count forward calls, as the authors' layer does
// (its counter grows on every forward, gradient-accumulation micro-batches included), with
// `forward_calls_per_step` calls per optimizer step. The check the authors run before
// forward call c (c > warmup, c % gap == 0) runs here in before_forward of the step that
// makes that call, so it sees the weights after floor((c - 1) / F) optimizer steps. With
// cadence = optimizer_steps they count optimizer steps instead (a check after step s when
// s > warmup and (s - warmup) % gap == 0). docs/methods/inrank.md gives the conversion.
//
// Guards (at on_train_begin, docs/methods/inrank.md): a two-stage run whose stage 1 ends
// before its first rank check, and a run whose total_steps end before it, are refused with
// an Error naming the options; a stage-1 cut that falls after the run's end is recorded as
// a "schedule" event. The efficient form records a "discard" event per layer: the model's
// weight (trained or loaded) is not kept.
//
// Where this differs from the authors' released code (see docs/methods/inrank.md):
// - The forward calls are counted per optimizer step (F of them), not by the layer: an
//   evaluation pass or a skipped step does not move the schedule.
// - The singular values come from the thin factors (QR of each, SVD of the k x k core),
//   never from the dense product; they are the same numbers.
// - A spectrum with zero variance (an all-zero update, possible with a base at the start)
//   explains everything: ratio 1, no growth. The authors' division gives NaN there, which
//   fails every comparison and grows the rank to the limit.
// - The buffer defaults to max(2, d / 8) per layer instead of a fixed 100: d / 8 is 96 at
//   GPT-2 small's d = 768, while 100 would take most of a small layer's capacity.
// - Both stages run in one training run with the optimizer moments sliced at the switch;
//   the authors run stage 2 as a separate job from a pruned checkpoint.
// - The converted layer keeps the model's bias (the authors' layer starts it at zero;
//   zero_bias does that).

#include <lowrank/core/error.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/nn/incremental_rank_linear.hpp>
#include <lowrank/policy/rank_policy.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

/// How the factors of the efficient form (no base) start.
enum class InRankInit {
    /// Independent random factors, as the authors' layer (PyTorch's Kaiming-uniform with
    /// a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) on each factor), times init_scale.
    /// The start product is small, so the learned update dominates its spectrum.
    factors,
    /// The balanced truncated SVD of the model's dense weight at capacity R: the active
    /// product starts as the best rank-k approximation of that weight.
    dense_svd,
};

/// The unit of InRank's warmup and gap.
enum class InRankCadence {
    /// Forward calls, as the authors' layer counts them, `forward_calls_per_step` per
    /// optimizer step: the check before call c (c > warmup, c % gap == 0) sees the weights
    /// after floor((c - 1) / forward_calls_per_step) optimizer steps.
    forward_calls,
    /// Optimizer steps: a check after step s when s > warmup and (s - warmup) % gap == 0.
    optimizer_steps,
};

/// Options of InRank; every field has the default shown. d = min(out, in) of each layer.
struct InRankOptions {
    Index initial_rank = 2;     // r at the start (authors: 2)
    Index buffer = 0;           // b, extra trained columns; 0: max(2, d / 8) per layer (authors: 100)
    double threshold = 0.9;     // alpha, the explained ratio to exceed, in (0, 1) (authors: 0.9)
    std::int64_t warmup = 200;  // cadence units before the first rank check (authors: 200 forward calls)
    std::int64_t gap = 25;      // cadence units between rank checks (authors: 25 forward calls)
    InRankCadence cadence = InRankCadence::forward_calls;  // the unit of warmup and gap
    std::int64_t forward_calls_per_step = 1;  // F: forward calls per optimizer step (the micro-batches
                                              // of gradient accumulation); the authors' GPT-2 runs: 8
    Index capacity = 0;         // R, columns allocated per layer; 0: floor(d / 2) (the authors' choice)
    bool keep_base = false;     // true: W = W0 + U V^T with W0 the model's weight, frozen, and U = 0;
                                // false: the efficient form W = U V^T (the authors' released code)
    InRankInit init = InRankInit::factors;  // how U and V start in the efficient form
    double init_scale = 1.0;    // multiplies the random factors (init = factors, or V with a base)
    bool grow = true;           // false: the fixed-rank control, initial_rank columns trained from the
                                // start, no buffer, no rank check, no cut (the authors' fixed-rank runs)
    bool two_stage = true;      // the efficient recipe: truncate at the end of stage 1, then fixed
                                // rank; false: one stage, the ranks grow throughout
    std::int64_t stage1_steps = 0;   // stage-1 length in optimizer steps; 0: use stage1_epochs
    std::int64_t stage1_epochs = 1;  // stage-1 length in epochs, used when stage1_steps is 0
    bool zero_bias = false;  // true: the converted layer's bias starts at 0, as the authors' layer's does;
                             // false: it keeps the model's bias
    // The layers to convert (GPT-2: the two MLP projections).
    LayerSelector select{.pattern = ".*", .roles = {"hidden"}};
    std::uint64_t seed = 0;  // the policy's RNG (the random factors)
};

/// InRank's explained ratio of keeping the first k of the singular values s:
/// 1 - Var(s with its first k entries zeroed) / Var(s), with Var the mean-subtracted
/// variance over the whole vector. s holds every singular value of the layer, zero padded
/// to d = min(out, in): the zeros are part of the statistic. A spectrum with zero variance
/// has nothing left to explain: the ratio is 1.
inline double inrank_explained_ratio(const Eigen::Ref<const Eigen::VectorXd>& s, Index k) {
    check(s.size() > 0, "inrank_explained_ratio", "expected a non-empty spectrum, got length 0");
    check(k >= 0 && k <= s.size(), "inrank_explained_ratio", "expected k in [0, ", s.size(), "], got ", k);
    check(s.allFinite() && (s.array() >= 0.0).all(), "inrank_explained_ratio",
          "expected finite, non-negative singular values");
    const auto n = static_cast<double>(s.size());
    const double total = (s.array() - s.mean()).square().sum() / n;
    if (total == 0.0) return 1.0;
    Eigen::VectorXd tail = s;
    tail.head(k).setZero();
    const double rest = (tail.array() - tail.mean()).square().sum() / n;
    return 1.0 - rest / total;
}

/// The outcome of one InRank rank check.
struct InRankDecision {
    Index rank = 0;                // the new rank r'
    double explained_ratio = 0.0;  // ratio(r') (the one that passed, or the last one scanned)
};

/// InRank's rank decision: the first k' in [rank, min(rank + buffer - 1, capacity - buffer - 1)]
/// with inrank_explained_ratio(s, k') > threshold, or the end of that range when none is.
/// A rank already at the cap stays. s as for inrank_explained_ratio (length d, zero padded).
inline InRankDecision inrank_next_rank(const Eigen::Ref<const Eigen::VectorXd>& s, Index rank, Index buffer,
                                       Index capacity, double threshold) {
    constexpr std::string_view what = "inrank_next_rank";
    check(rank >= 1, what, "expected rank >= 1, got ", rank);
    check(buffer >= 1, what, "expected buffer >= 1, got ", buffer);
    check(threshold > 0.0 && threshold < 1.0, what, "expected threshold in (0, 1), got ", threshold);
    check(capacity <= s.size(), what, "expected capacity <= the spectrum's length ", s.size(), ", got ",
          capacity);
    const Index limit = std::min(rank + buffer - 1, capacity - buffer - 1);
    if (limit <= rank) return {rank, inrank_explained_ratio(s, rank)};
    double ratio = 0.0;
    for (Index k = rank; k <= limit; ++k) {
        ratio = inrank_explained_ratio(s, k);
        if (ratio > threshold) return {k, ratio};
    }
    return {limit, ratio};
}

/// True if the rank check runs after the optimizer step that brought the count to `step`:
/// every `gap` steps once `warmup` steps are done (step > warmup, (step - warmup) % gap == 0).
inline bool inrank_is_check_step(std::int64_t step, std::int64_t warmup, std::int64_t gap) {
    check(gap >= 1, "inrank_is_check_step", "expected gap >= 1, got ", gap);
    return step > warmup && (step - warmup) % gap == 0;
}

/// How many rank checks the authors' layer runs during the forward calls of the optimizer
/// step that follows `step` (calls step * F + 1 .. (step + 1) * F, F = calls_per_step): the
/// calls c with c > warmup and c % gap == 0. Usually 0 or 1; more when gap < F.
inline std::int64_t inrank_checks_in_step(std::int64_t step, std::int64_t warmup, std::int64_t gap,
                                          std::int64_t calls_per_step) {
    constexpr std::string_view what = "inrank_checks_in_step";
    check(gap >= 1, what, "expected gap >= 1, got ", gap);
    check(calls_per_step >= 1, what, "expected calls_per_step >= 1, got ", calls_per_step);
    check(step >= 0 && warmup >= 0, what, "expected step >= 0 and warmup >= 0, got ", step, " and ", warmup);
    const std::int64_t first = std::max(step * calls_per_step + 1, warmup + 1);
    const std::int64_t last = (step + 1) * calls_per_step;
    if (first > last) return 0;
    return last / gap - (first - 1) / gap;
}

/// The fewest optimizer steps a run (or a stage 1) needs for its k-th rank check (k >= 1)
/// to happen under `o`'s cadence: with forward calls, floor((c_k - 1) / F) + 1 for the
/// k-th call c_k past warmup that is a multiple of gap; with optimizer steps, warmup + k gap.
inline std::int64_t inrank_steps_for_checks(const InRankOptions& o, std::int64_t k) {
    constexpr std::string_view what = "inrank_steps_for_checks";
    check(k >= 1, what, "expected k >= 1, got ", k);
    check(o.gap >= 1 && o.warmup >= 0 && o.forward_calls_per_step >= 1, what,
          "expected gap >= 1, warmup >= 0 and forward_calls_per_step >= 1, got ", o.gap, ", ", o.warmup,
          " and ", o.forward_calls_per_step);
    if (o.cadence == InRankCadence::optimizer_steps) return o.warmup + k * o.gap;
    const std::int64_t call = (o.warmup / o.gap + k) * o.gap;
    return (call - 1) / o.forward_calls_per_step + 1;
}

/// What the policy holds for one converted layer.
struct InRankLayerState {
    std::string name;
    Index rank = 0;                         // r
    Index buffer = 0;                       // b (0 after the truncation: the buffer is freed)
    Index capacity = 0;                     // R (r after the truncation)
    double explained_ratio = std::nan("");  // at the last check (NaN before the first)
};

template <class T>
class InRank : public RankPolicy<T> {
public:
    using Options = InRankOptions;

    explicit InRank(InRankOptions options = {}) : options_(std::move(options)), rng_(options_.seed) {
        constexpr std::string_view what = "InRank";
        const auto& o = options_;
        check(o.initial_rank >= 1, what, "option initial_rank must be >= 1, got ", o.initial_rank);
        check(o.buffer == 0 || o.buffer >= 2, what,
              "option buffer must be >= 2 (the rank grows by at most buffer - 1 per check) or 0 (derived "
              "from the width), got ",
              o.buffer);
        check(o.threshold > 0.0 && o.threshold < 1.0, what, "option threshold must be in (0, 1), got ",
              o.threshold);
        const char* unit = o.cadence == InRankCadence::forward_calls ? "forward calls" : "optimizer steps";
        check(o.warmup >= 0, what, "option warmup must be >= 0 (", unit, "), got ", o.warmup);
        check(o.gap >= 1, what, "option gap must be >= 1 (", unit, "), got ", o.gap);
        check(o.forward_calls_per_step >= 1, what, "option forward_calls_per_step must be >= 1, got ",
              o.forward_calls_per_step);
        check(o.grow || o.buffer == 0, what,
              "option grow = false (the fixed-rank control) trains initial_rank columns and no buffer; "
              "expected buffer 0, got ",
              o.buffer);
        check(o.capacity >= 0, what, "option capacity must be >= 0 (0: floor(min(out, in) / 2)), got ",
              o.capacity);
        check(std::isfinite(o.init_scale) && o.init_scale > 0.0, what, "option init_scale must be > 0, got ",
              o.init_scale);
        check(!(o.keep_base && o.init == InRankInit::dense_svd), what,
              "option init = dense_svd needs keep_base = false (with a base, U V^T is the update and starts "
              "at zero), got keep_base = true");
        check(o.stage1_steps >= 0, what, "option stage1_steps must be >= 0, got ", o.stage1_steps);
        check(o.stage1_epochs >= 0, what, "option stage1_epochs must be >= 0, got ", o.stage1_epochs);
        check(!o.two_stage || o.stage1_steps > 0 || o.stage1_epochs > 0, what,
              "option two_stage needs a stage-1 length: stage1_steps > 0 or stage1_epochs > 0, got "
              "stage1_steps = 0 and stage1_epochs = 0");
    }

    std::string_view name() const override { return "inrank"; }

    /// Checks the schedule against the run (see guard_schedule), converts the selected
    /// layers to IncrementalRankLinear and records an "init" event for each (old rank -> r,
    /// statistic "buffer" = b) and, in the efficient form, a "discard" event (the model's
    /// weight is not kept; statistic "discarded_energy" = its squared Frobenius norm that
    /// the layer no longer holds).
    void on_train_begin(TrainingContext<T>& ctx) override {
        check(slots_.empty(), "InRank", "on_train_begin was already called; use one InRank per training run");
        auto selected = ctx.select(options_.select, name());
        // Validate every layer and the schedule before converting any layer, so a bad option
        // leaves the model as it was.
        std::vector<InRankLayerState> states;
        for (LayerSlot<T>* s : selected) states.push_back(plan(*s->layer));
        const std::int64_t stage1_end = guard_schedule(ctx);
        for (std::size_t i = 0; i < selected.size(); ++i) {
            AnyLinear<T>& slot = *selected[i]->layer;
            const Index old_rank = slot.rank();
            const double weight_energy = options_.keep_base ? 0.0 : slot.dense_weight().squaredNorm();
            ctx.replace_layer(slot, convert(slot, states[i]));
            slots_.push_back(&slot);
            ctx.record(name(), states[i].name, "init", old_rank, states[i].rank, "buffer",
                       static_cast<double>(states[i].buffer));
            if (!options_.keep_base) {
                // factors: nothing of the weight is kept; dense_svd: its leading r + b singular
                // pairs are (the product's energy is theirs).
                double kept = 0.0;
                if (options_.init == InRankInit::dense_svd)
                    kept = slot.template get<IncrementalRankLinear<T>>()
                               .singular_values()
                               .template cast<double>()
                               .squaredNorm();
                ctx.record(name(), states[i].name, "discard", old_rank, states[i].rank, "discarded_energy",
                           std::max(0.0, weight_energy - kept));
            }
        }
        layers_ = std::move(states);
        if (stage1_end > 0 && ctx.total_steps() > 0 && stage1_end > ctx.total_steps())
            ctx.record(name(), "", "schedule", 0, 0, "stage1_end_step", static_cast<double>(stage1_end));
    }

    /// With the forward-call cadence: the rank checks the authors' layer runs during the
    /// forward calls of this step, before its forward pass.
    void before_forward(TrainingContext<T>& ctx) override {
        if (!options_.grow || options_.cadence != InRankCadence::forward_calls || stage_ == 2 ||
            ctx.step() == last_forward_step_)
            return;
        last_forward_step_ = ctx.step();
        const std::int64_t due =
            inrank_checks_in_step(ctx.step(), options_.warmup, options_.gap, options_.forward_calls_per_step);
        for (std::int64_t i = 0; i < due; ++i) check_ranks(ctx);
    }

    /// With the optimizer-step cadence, the rank check (every gap steps after warmup); in
    /// the step-counted two-stage recipe, the truncation at the end of stage 1.
    void after_step(TrainingContext<T>& ctx) override {
        if (stage_ == 2 || ctx.step() == last_step_) return;
        last_step_ = ctx.step();
        if (options_.grow && options_.cadence == InRankCadence::optimizer_steps &&
            inrank_is_check_step(ctx.step(), options_.warmup, options_.gap))
            check_ranks(ctx);
        if (cuts() && options_.stage1_steps > 0 && ctx.step() >= options_.stage1_steps) truncate_all(ctx);
    }

    /// In the epoch-counted two-stage recipe, the truncation at the end of stage 1.
    void on_epoch_end(TrainingContext<T>& ctx) override {
        if (stage_ == 1 && cuts() && options_.stage1_steps == 0 && ctx.epoch() + 1 >= options_.stage1_epochs)
            truncate_all(ctx);
    }

    /// The stage, the checks run, the last step seen, the generator and, per layer, its
    /// rank, buffer, capacity, last explained ratio and structure (active columns or the
    /// truncated shapes).
    nlohmann::json state() const override {
        nlohmann::json out = detail::policy_state_header(name());
        out["stage"] = stage_;
        out["checks"] = checks_;
        out["last_step"] = last_step_;
        out["rng"] = detail::rng_to_policy_state(rng_);
        nlohmann::json layers = nlohmann::json::array();
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            const InRankLayerState& st = layers_[i];
            layers.push_back({{"name", st.name},
                              {"rank", st.rank},
                              {"buffer", st.buffer},
                              {"capacity", st.capacity},
                              {"explained_ratio", detail::optional_number(st.explained_ratio)},
                              {"structure", detail::layer_structure(*slots_[i])}});
        }
        out["layers"] = layers;
        return out;
    }

    /// Stage 1: activates the saved rank + buffer columns of each layer; stage 2: cuts each
    /// layer to its saved rank (the truncation's shapes). Every value is checked first.
    void restore(TrainingContext<T>& ctx, const nlohmann::json& state) override {
        constexpr std::string_view what = "inrank";
        check(!slots_.empty(), what, "restore called before on_train_begin: convert the layers first");
        check(stage_ == 1 && checks_ == 0, what,
              "restore expects the policy as on_train_begin left it, but it has already trained (stage ",
              stage_, ", ", checks_, " checks)");
        const auto r = detail::open_policy_state(name(), state);
        const auto stage = static_cast<int>(r.integer("stage", 1, 2));
        const std::int64_t checks = r.integer("checks", 0, std::numeric_limits<std::int64_t>::max());
        const std::int64_t last_step = r.integer("last_step", -1, std::numeric_limits<std::int64_t>::max());
        const Rng::State rng = r.rng("rng");
        std::vector<std::string> names;
        for (const auto& l : layers_) names.push_back(l.name);
        const auto entries = detail::matched_layers(r, names);
        std::vector<InRankLayerState> saved(layers_.size());
        for (std::size_t i = 0; i < entries.size(); ++i) {
            const auto& e = entries[i];
            const InRankLayerState& now = layers_[i];  // as planned by on_train_begin
            InRankLayerState& s = saved[i];
            s.name = now.name;
            s.rank = e.integer("rank", 1, std::numeric_limits<Index>::max());
            s.buffer = e.integer("buffer", 0, std::numeric_limits<Index>::max());
            s.capacity = e.integer("capacity", 1, std::numeric_limits<Index>::max());
            s.explained_ratio = e.number("explained_ratio");
            if (stage == 1) {
                // The plan depends on the options and the shape only: it must be the saved one.
                if (s.buffer != now.buffer || s.capacity != now.capacity)
                    e.error("expected buffer ", now.buffer, " and capacity ", now.capacity,
                            " (this policy's options on this layer), got buffer ", s.buffer, " and capacity ",
                            s.capacity);
                if (s.rank < options_.initial_rank || s.rank > rank_cap(s))
                    e.error("expected a rank in [initial_rank = ", options_.initial_rank, ", ", rank_cap(s),
                            "], got ", s.rank);
            } else {
                if (s.buffer != 0 || s.capacity != s.rank)
                    e.error("after the truncation expected buffer 0 and capacity = rank, got rank ", s.rank,
                            ", buffer ", s.buffer, ", capacity ", s.capacity);
                if (s.rank > rank_cap(now))
                    e.error("expected a rank in [1, ", rank_cap(now), "], got ", s.rank);
            }
        }
        // Everything read and checked: reshape.
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            IncrementalRankLinear<T>& l = layer_at(i);
            const InRankLayerState& s = saved[i];
            const Index active = stage == 1 ? s.rank + s.buffer : std::max(l.rank(), s.rank);
            if (active > l.rank()) {
                l.grow(active);
                ctx.optimizer().carry_state(l.U, StateCarry::grow());
                ctx.optimizer().carry_state(l.V, StateCarry::grow());
            }
            if (stage == 2) {
                l.truncate(s.rank);
                ctx.optimizer().carry_state(l.U, StateCarry::slice());
                ctx.optimizer().carry_state(l.V, StateCarry::slice());
            }
            layers_[i] = s;
        }
        for (std::size_t i = 0; i < entries.size(); ++i)
            detail::check_layer_structure(entries[i], *slots_[i]);
        stage_ = stage;
        checks_ = checks;
        last_step_ = last_step;
        rng_.set_state(rng);
    }

    const InRankOptions& options() const { return options_; }
    /// Per converted layer, in model order.
    const std::vector<InRankLayerState>& layers() const { return layers_; }
    /// The rank r of each converted layer.
    std::vector<Index> ranks() const {
        std::vector<Index> out;
        for (const auto& l : layers_) out.push_back(l.rank);
        return out;
    }
    /// 1 while the ranks may grow, 2 after the truncation.
    int stage() const { return stage_; }
    /// Rank checks run so far.
    std::int64_t checks() const { return checks_; }

private:
    // Whether stage 1 ends in a cut (the fixed-rank control has nothing to cut).
    bool cuts() const { return options_.two_stage && options_.grow; }

    // The highest rank a layer may reach: R - b - 1 while growing, R for the control.
    Index rank_cap(const InRankLayerState& s) const {
        return options_.grow ? s.capacity - s.buffer - 1 : s.capacity;
    }

    // When the first rank check comes, for messages: "at forward call 225, in optimizer
    // step 225 (warmup = 200, gap = 25 forward calls, forward_calls_per_step = 1)".
    std::string first_check_text() const {
        const auto& o = options_;
        const std::int64_t steps = inrank_steps_for_checks(o, 1);
        if (o.cadence == InRankCadence::optimizer_steps)
            return detail::concat("after optimizer step ", steps, " (warmup = ", o.warmup, ", gap = ", o.gap,
                                  " optimizer steps)");
        return detail::concat("at forward call ", (o.warmup / o.gap + 1) * o.gap, ", in optimizer step ",
                              steps, " (warmup = ", o.warmup, ", gap = ", o.gap,
                              " forward calls, forward_calls_per_step = ", o.forward_calls_per_step, ")");
    }

    // Refuses a schedule that cannot act (an Error naming the options and the numbers):
    // a two-stage stage 1 that ends before its first rank check, a run whose total_steps
    // end before it. Returns stage 1's end in optimizer steps (0: no cut, or not known).
    std::int64_t guard_schedule(const TrainingContext<T>& ctx) const {
        const auto& o = options_;
        if (!o.grow) return 0;
        const std::int64_t needed = inrank_steps_for_checks(o, 1);
        std::int64_t stage1_end = 0;
        std::string stage1_text;
        if (o.two_stage && o.stage1_steps > 0) {
            stage1_end = o.stage1_steps;
            stage1_text = detail::concat("stage1_steps = ", o.stage1_steps);
        } else if (o.two_stage && ctx.steps_per_epoch() > 0) {
            stage1_end = o.stage1_epochs * ctx.steps_per_epoch();
            stage1_text =
                detail::concat("stage1_epochs = ", o.stage1_epochs, " of ", ctx.steps_per_epoch(), " steps");
        }
        if (stage1_end > 0 && stage1_end < needed)
            throw Error(detail::concat(
                "InRank: stage 1 ends after ", stage1_end, " optimizer steps (", stage1_text,
                "), before its first rank check ", first_check_text(),
                ": every layer would be cut to initial_rank = ", o.initial_rank,
                " without a check; lengthen stage 1 (stage1_steps, stage1_epochs) or check earlier (warmup, "
                "gap",
                o.cadence == InRankCadence::forward_calls ? ", forward_calls_per_step" : "", ")"));
        if (ctx.total_steps() > 0 && ctx.total_steps() < needed)
            throw Error(
                detail::concat("InRank: the run ends after ", ctx.total_steps(),
                               " optimizer steps (total_steps), before its first rank check ",
                               first_check_text(), ": no rank would ever grow; check earlier (warmup, gap",
                               o.cadence == InRankCadence::forward_calls ? ", forward_calls_per_step" : "",
                               "), or use grow = false for a fixed-rank run"));
        return stage1_end;
    }

    // The layer's rank, buffer and capacity, checked against its shape.
    InRankLayerState plan(const AnyLinear<T>& slot) const {
        const Index out = slot.out_features(), in = slot.in_features(), d = std::min(out, in);
        InRankLayerState s;
        s.name = slot.name();
        s.rank = options_.initial_rank;
        s.capacity = options_.capacity > 0 ? options_.capacity : d / 2;
        s.buffer = !options_.grow ? 0 : options_.buffer > 0 ? options_.buffer : std::max<Index>(2, d / 8);
        check(s.capacity >= 1 && s.capacity <= d, "InRank", "layer '", s.name, "' ", shape_string(out, in),
              ": capacity must be in [1, min(out, in) = ", d, "], got ", s.capacity);
        if (!options_.grow) {
            check(s.rank <= s.capacity, "InRank", "layer '", s.name, "' ", shape_string(out, in),
                  ": with grow = false expected initial_rank <= capacity, got initial_rank ", s.rank,
                  " > capacity ", s.capacity);
            return s;
        }
        // The rank is capped at R - b - 1, so the initial rank must be below that cap.
        check(s.rank + s.buffer + 1 <= s.capacity, "InRank", "layer '", s.name, "' ", shape_string(out, in),
              ": expected initial_rank + buffer + 1 <= capacity, got initial_rank ", s.rank, " + buffer ",
              s.buffer, " + 1 = ", s.rank + s.buffer + 1, " > capacity ", s.capacity);
        return s;
    }

    IncrementalRankLinear<T> convert(const AnyLinear<T>& slot, const InRankLayerState& s) {
        const Index out = slot.out_features(), in = slot.in_features(), k = s.rank + s.buffer;
        const Matrix<T> w = slot.dense_weight();
        Matrix<T> zeroed;  // the bias with zero_bias: the authors' layer starts it at 0
        const Matrix<T>* bias = slot.bias();
        if (options_.zero_bias && bias != nullptr) {
            zeroed = Matrix<T>::Zero(bias->rows(), bias->cols());
            bias = &zeroed;
        }
        Matrix<T> u(out, s.capacity), v(in, s.capacity);
        if (options_.keep_base) {
            u.setZero();
            init::linear_default<T>(v, rng_, in);
            v *= static_cast<T>(options_.init_scale);
            return IncrementalRankLinear<T>::from_factors(s.name, std::move(u), std::move(v), k, &w, bias);
        }
        if (options_.init == InRankInit::dense_svd) {
            auto f = linalg::truncated_svd<T>(w, s.capacity, s.name);
            return IncrementalRankLinear<T>::from_factors(s.name, std::move(f.U), std::move(f.V), k, nullptr,
                                                          bias);
        }
        // PyTorch's Kaiming-uniform (a = sqrt(5)) of B (out x R) and A (R x in): the bound is
        // 1 / sqrt(fan_in), fan_in = R for U = B and in for V = A^T.
        init::linear_default<T>(u, rng_, s.capacity);
        init::linear_default<T>(v, rng_, in);
        u *= static_cast<T>(options_.init_scale);
        v *= static_cast<T>(options_.init_scale);
        return IncrementalRankLinear<T>::from_factors(s.name, std::move(u), std::move(v), k, nullptr, bias);
    }

    IncrementalRankLinear<T>& layer_at(std::size_t i) {
        return slots_[i]->template get<IncrementalRankLinear<T>>();
    }

    void check_ranks(TrainingContext<T>& ctx) {
        ++checks_;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            InRankLayerState& st = layers_[i];
            IncrementalRankLinear<T>& l = layer_at(i);
            const Index d = std::min(l.out_features(), l.in_features());
            const Vector<T> sv = l.singular_values();
            Eigen::VectorXd s = Eigen::VectorXd::Zero(d);
            const Index n = std::min<Index>(d, sv.size());
            s.head(n) = sv.head(n).template cast<double>();
            const InRankDecision decision =
                inrank_next_rank(s, st.rank, st.buffer, st.capacity, options_.threshold);
            st.explained_ratio = decision.explained_ratio;
            ctx.record(name(), st.name, "check", st.rank, decision.rank, "explained_ratio",
                       decision.explained_ratio);
            if (decision.rank == st.rank) continue;
            l.grow(decision.rank + st.buffer);
            ctx.optimizer().carry_state(l.U, StateCarry::grow());
            ctx.optimizer().carry_state(l.V, StateCarry::grow());
            ctx.record(name(), st.name, "grow", st.rank, decision.rank, "explained_ratio",
                       decision.explained_ratio);
            st.rank = decision.rank;
        }
    }

    void truncate_all(TrainingContext<T>& ctx) {
        // on_train_begin refuses this when it knows stage 1's length; with stage1_epochs and
        // no steps_per_epoch it is known only now.
        check(checks_ > 0, "InRank", "stage 1 ended after optimizer step ", ctx.step(),
              " (stage1_epochs = ", options_.stage1_epochs, "), before its first rank check ",
              first_check_text(), ": every layer would be cut to initial_rank = ", options_.initial_rank,
              "; lengthen stage 1 (stage1_steps, stage1_epochs) or check earlier (warmup, gap",
              options_.cadence == InRankCadence::forward_calls ? ", forward_calls_per_step" : "", ")");
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            InRankLayerState& st = layers_[i];
            IncrementalRankLinear<T>& l = layer_at(i);
            const Index active = l.rank();
            const double tail = l.truncate(st.rank);
            ctx.optimizer().carry_state(l.U, StateCarry::slice());
            ctx.optimizer().carry_state(l.V, StateCarry::slice());
            ctx.record(name(), st.name, "truncate", active, st.rank, "tail_energy", tail);
            st.buffer = 0;
            st.capacity = st.rank;
        }
        stage_ = 2;
    }

    InRankOptions options_;
    Rng rng_;
    std::vector<AnyLinear<T>*> slots_;
    std::vector<InRankLayerState> layers_;
    int stage_ = 1;
    std::int64_t checks_ = 0;
    std::int64_t last_step_ = -1;
    std::int64_t last_forward_step_ = -1;  // the step whose forward calls were checked (not saved:
                                           // a resumed run starts at a step not yet checked)
};

}  // namespace lowrank
