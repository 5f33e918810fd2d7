#pragma once
// InRank: incremental low-rank learning (Zhao et al., "InRank: Incremental Low-Rank
// Learning", arXiv 2306.11250). The cumulative weight update of a layer grows in rank
// gradually during training, so the policy holds each selected layer as a low-rank product
// and raises its rank only when the spectrum of the product asks for it.
//
// Each selected layer becomes an IncrementalRankLinear with capacity R columns allocated,
// k = r + b of them trained (r the rank, b a buffer of extra columns that are always
// trained, so that new directions can appear in them). Every `gap` optimizer steps after
// `warmup` steps the policy takes the singular values s of the active product, zero padded
// to length d = min(out, in), and scans k' = r, r + 1, ... for the first explained ratio
//
//     ratio(k') = 1 - Var(s with its first k' entries zeroed) / Var(s)
//
// above the threshold, scanning at most up to r + b - 1 and the cap R - b - 1; then
// r <- k'. The rank never shrinks, grows by at most b - 1 per check and never exceeds
// R - b - 1. Newly activated columns keep their initial values; their optimizer state
// starts at zero.
//
// The efficient two-stage recipe (the default): stage 1 grows the ranks for a short early
// phase (`stage1_steps` optimizer steps, or else `stage1_epochs` epochs). At its end each
// layer is cut to rank r by truncated SVD of its active product (balanced split), the
// capacity and the buffer are freed, the optimizer moments are sliced to the new shapes,
// and stage 2 trains at fixed rank r.
//
// Where this differs from the authors' released code (see docs/methods/inrank.md):
// - Checks count optimizer steps (ctx.step()), not forward calls, so evaluation passes and
//   gradient-accumulation micro-batches do not move the schedule. A check runs when
//   step > warmup and (step - warmup) is a multiple of gap (the same steps as the authors'
//   "step % gap == 0" whenever gap divides warmup, as with 200 and 25).
// - The singular values come from the thin factors (QR of each, SVD of the k x k core),
//   never from the dense product; they are the same numbers.
// - A spectrum with zero variance (an all-zero update, possible with a base at the start)
//   explains everything: ratio 1, no growth. The authors' division gives NaN there, which
//   fails every comparison and grows the rank to the limit.
// - The buffer defaults to max(2, d / 8) per layer instead of a fixed 100: d / 8 is 96 at
//   GPT-2 small's d = 768, while 100 would take most of a small layer's capacity.
// - Both stages run in one training run with the optimizer moments sliced at the switch;
//   the authors run stage 2 as a separate job from a pruned checkpoint.
// - The converted layer keeps the model's bias (the authors' layer starts it at zero).

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

/// Options of InRank; every field has the default shown. d = min(out, in) of each layer.
struct InRankOptions {
    Index initial_rank = 2;     // r at the start (authors: 2)
    Index buffer = 0;           // b, extra trained columns; 0: max(2, d / 8) per layer
    double threshold = 0.9;     // alpha, the explained ratio to exceed, in (0, 1)
    std::int64_t warmup = 200;  // optimizer steps before the first rank check
    std::int64_t gap = 25;      // optimizer steps between rank checks
    Index capacity = 0;         // R, columns allocated per layer; 0: floor(d / 2) (the authors' choice)
    bool keep_base = false;     // true: W = W0 + U V^T with W0 the model's weight, frozen, and U = 0;
                                // false: the efficient form W = U V^T (the authors' released code)
    InRankInit init = InRankInit::factors;  // how U and V start in the efficient form
    double init_scale = 1.0;    // multiplies the random factors (init = factors, or V with a base)
    bool two_stage = true;      // the efficient recipe: truncate at the end of stage 1, then fixed
                                // rank; false: one stage, the ranks grow throughout
    std::int64_t stage1_steps = 0;   // stage-1 length in optimizer steps; 0: use stage1_epochs
    std::int64_t stage1_epochs = 1;  // stage-1 length in epochs, used when stage1_steps is 0
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
        check(o.warmup >= 0, what, "option warmup must be >= 0 optimizer steps, got ", o.warmup);
        check(o.gap >= 1, what, "option gap must be >= 1 optimizer step, got ", o.gap);
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

    /// Converts the selected layers to IncrementalRankLinear and records an "init" event
    /// for each (old rank -> r, statistic "buffer" = b).
    void on_train_begin(TrainingContext<T>& ctx) override {
        check(slots_.empty(), "InRank", "on_train_begin was already called; use one InRank per training run");
        auto selected = ctx.select(options_.select, name());
        // Validate every layer before converting any, so a bad option leaves the model as it was.
        std::vector<InRankLayerState> states;
        for (LayerSlot<T>* s : selected) states.push_back(plan(*s->layer));
        for (std::size_t i = 0; i < selected.size(); ++i) {
            AnyLinear<T>& slot = *selected[i]->layer;
            const Index old_rank = slot.rank();
            ctx.replace_layer(slot, convert(slot, states[i]));
            slots_.push_back(&slot);
            ctx.record(name(), states[i].name, "init", old_rank, states[i].rank, "buffer",
                       static_cast<double>(states[i].buffer));
        }
        layers_ = std::move(states);
    }

    /// The rank check (every gap optimizer steps after warmup) and, in the step-counted
    /// two-stage recipe, the truncation at the end of stage 1.
    void after_step(TrainingContext<T>& ctx) override {
        if (stage_ == 2 || ctx.step() == last_step_) return;
        last_step_ = ctx.step();
        if (inrank_is_check_step(ctx.step(), options_.warmup, options_.gap)) check_ranks(ctx);
        if (options_.two_stage && options_.stage1_steps > 0 && ctx.step() >= options_.stage1_steps)
            truncate_all(ctx);
    }

    /// In the epoch-counted two-stage recipe, the truncation at the end of stage 1.
    void on_epoch_end(TrainingContext<T>& ctx) override {
        if (stage_ == 1 && options_.two_stage && options_.stage1_steps == 0 &&
            ctx.epoch() + 1 >= options_.stage1_epochs)
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
                if (s.rank < options_.initial_rank || s.rank > s.capacity - s.buffer - 1)
                    e.error("expected a rank in [initial_rank = ", options_.initial_rank,
                            ", capacity - buffer - 1 = ", s.capacity - s.buffer - 1, "], got ", s.rank);
            } else {
                if (s.buffer != 0 || s.capacity != s.rank)
                    e.error("after the truncation expected buffer 0 and capacity = rank, got rank ", s.rank,
                            ", buffer ", s.buffer, ", capacity ", s.capacity);
                if (s.rank > now.capacity - now.buffer - 1)
                    e.error("expected a rank in [1, capacity - buffer - 1 = ", now.capacity - now.buffer - 1,
                            "], got ", s.rank);
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
    // The layer's rank, buffer and capacity, checked against its shape.
    InRankLayerState plan(const AnyLinear<T>& slot) const {
        const Index out = slot.out_features(), in = slot.in_features(), d = std::min(out, in);
        InRankLayerState s;
        s.name = slot.name();
        s.rank = options_.initial_rank;
        s.capacity = options_.capacity > 0 ? options_.capacity : d / 2;
        s.buffer = options_.buffer > 0 ? options_.buffer : std::max<Index>(2, d / 8);
        check(s.capacity >= 1 && s.capacity <= d, "InRank", "layer '", s.name, "' ", shape_string(out, in),
              ": capacity must be in [1, min(out, in) = ", d, "], got ", s.capacity);
        // The rank is capped at R - b - 1, so the initial rank must be below that cap.
        check(s.rank + s.buffer + 1 <= s.capacity, "InRank", "layer '", s.name, "' ", shape_string(out, in),
              ": expected initial_rank + buffer + 1 <= capacity, got initial_rank ", s.rank, " + buffer ",
              s.buffer, " + 1 = ", s.rank + s.buffer + 1, " > capacity ", s.capacity);
        return s;
    }

    IncrementalRankLinear<T> convert(const AnyLinear<T>& slot, const InRankLayerState& s) {
        const Index out = slot.out_features(), in = slot.in_features(), k = s.rank + s.buffer;
        const Matrix<T> w = slot.dense_weight();
        const Matrix<T>* bias = slot.bias();
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
};

}  // namespace lowrank
