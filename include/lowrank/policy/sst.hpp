#pragma once
// Sparse Spectral Training (SST; Zhao, Zhang, Li, Liu, Cannistraci, arXiv 2405.15481).
//
// Each selected layer becomes W = U diag(sigma) V^T (SpectralLinear) from the full SVD of
// its current weight, so the network is unchanged at the switch ("zero distortion"). Every
// step trains all of sigma but only r sampled singular vector pairs, with the enhanced
// gradient (the sigma_i factor dropped from their gradients). Training runs in rounds of
// T2 iterations of T3 steps:
//
//   iteration start (before_forward, step % T3 == 0): choose r distinct positions (drawn
//       with probability p -- sigma, mixed or uniform --, the top r by sigma, or the next r
//       in order), make them the active block, reset the optimizer state of the newly
//       active U/V columns, and re-warm the learning rate (all groups, or only the spectral
//       parameters' own group).
//   every step (after_step): sigma <- max(sigma, 0); active u_i, v_i rescaled to unit length.
//   round end (after_step, after T2 iterations): re-SVD U diag(sigma) V^T (same function,
//       orthonormal factors again, sigma sorted) and reset all U/V/sigma optimizer state.
//
// Where this differs from the authors' code, and why:
// - Default sampling is the mix p_i = (1/d + sigma_i / sum sigma) / 2 of a later version of
//   the paper, not p ∝ sigma of v1: the mix never starves a direction whose sigma is (or was
//   clamped to) zero, so it can grow back. Both are options, with plain uniform.
// - The layer stores the active pairs in their own block (the paper's memory-efficient
//   form), so activating moves sigma entries between positions. Their optimizer state moves
//   with them: a singular value keeps its moments across iterations, as in the authors'
//   code where sigma never moves. Only the newly active U/V columns start from zero.
// - No re-warm at the very first iteration: the schedule's own warm-up covers it, and there
//   is no stale state to protect against yet.
// - T2 = 0 picks ceil(d / r) per layer, so that a round draws at least d vectors in all;
//   layers of different widths may then end their rounds at different steps.
// - If fewer than r positions have positive weight (p ∝ sigma with clamped values), the
//   rest are drawn uniformly from the remaining positions.
// - The re-SVD goes through QR of the thin factors and an SVD of the d x d core (no dense
//   m x n product): the same decomposition at a lower cost.
//
// Beside the method: sigma_only (U, V frozen, sigma alone trained: no sampling, no re-SVD),
// init = random (the initialisation ablation, below) and prune() (sigma_i below a threshold
// set to zero, after training).
//
// init = random, the ablation of the SVD start (the paper's section "Why SVD initialization
// is important"): sigma is still the singular values of the layer's initial weight, so the
// spectrum's scale is the dense layer's, but U and V are i.i.d. Gaussian columns scaled to
// unit length, drawn from the policy's generator. They are deliberately not orthogonalised:
// what the ablation removes is exactly what the SVD gives, orthonormal factors and a layer
// that computes the dense weight's function at the switch (zero distortion). The first
// re-SVD, at the end of the first round, makes U and V orthonormal again; until then they
// are only kept at unit length, as the method does anyway.

#include <lowrank/core/error.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/nn/spectral_linear.hpp>
#include <lowrank/policy/rank_policy.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

/// How SST draws the active singular vectors at an iteration start.
enum class SstSampling {
    sigma,       // p_i ∝ sigma_i (paper v1): exploits the large directions, never draws a zero one
    mixed,       // p_i = (1/d + sigma_i / sum sigma) / 2: half uniform, half ∝ sigma
    uniform,     // p_i = 1/d
    top,         // the r largest sigma_i (deterministic)
    sequential,  // iteration j of a round: pairs j r .. j r + r - 1 (mod d) of the last re-SVD's order
};

inline std::string_view to_string(SstSampling s) {
    switch (s) {
        case SstSampling::sigma: return "sigma";
        case SstSampling::mixed: return "mixed";
        case SstSampling::uniform: return "uniform";
        case SstSampling::top: return "top";
        case SstSampling::sequential: return "sequential";
    }
    return "?";
}

/// How SST initialises U, sigma and V when it converts a layer.
enum class SstInit {
    svd,     // the full SVD of the layer's weight: the same function, orthonormal U and V (the method)
    random,  // sigma from that SVD, U and V i.i.d. Gaussian columns of unit length (the ablation)
};

inline std::string_view to_string(SstInit i) {
    switch (i) {
        case SstInit::svd: return "svd";
        case SstInit::random: return "random";
    }
    return "?";
}

/// Which learning rates the re-warm-up at an iteration start ramps.
enum class SstRewarmScope {
    all,       // the schedule's: every group (the paper's text: the learning rate re-warms)
    spectral,  // only U, V and sigma, which the policy then puts in a group of its own
};

inline std::string_view to_string(SstRewarmScope s) {
    switch (s) {
        case SstRewarmScope::all: return "all";
        case SstRewarmScope::spectral: return "spectral";
    }
    return "?";
}

struct SstOptions {
    Index rank = 8;                               // r: active singular vector pairs per layer, in [1, d]
    SstSampling sampling = SstSampling::mixed;    // how the r pairs are drawn
    std::int64_t iteration_steps = 200;           // T3: optimizer steps per iteration (>= 1)
    std::int64_t round_iterations = 0;            // T2: iterations per round, then re-SVD; 0: ceil(d / r)
    bool enhanced_gradient = true;                // drop sigma_i from the U/V gradients
    std::int64_t rewarm_steps = 20;               // LR re-warm-up at each iteration start; 0: none
    LayerSelector select{.pattern = ".*", .roles = {"hidden"}};  // the layers to train spectrally
    std::optional<std::size_t> group{};           // optimizer group of U, V, sigma; unset: the dense weight's
    std::uint64_t seed = 0;                       // the sampler's generator
    bool sigma_only = false;                      // train sigma alone: U, V frozen, no sampling, no re-SVD
    SstRewarmScope rewarm_scope = SstRewarmScope::all;  // what the re-warm-up ramps
    SstInit init = SstInit::svd;                  // the factors at the switch: the weight's SVD, or random bases
};

/// The probability of each of the d positions of `sigma` (a 1 x d row) under a scheme;
/// they sum to 1. Negative entries count as zero; an all-zero sigma gives uniform p.
template <class T>
std::vector<double> sst_probabilities(const ConstMatrixRef<T>& sigma, SstSampling scheme) {
    check(sigma.rows() == 1 && sigma.cols() > 0, "sst_probabilities", "expected a non-empty (1 x d) row, got ",
          shape_string(sigma));
    const auto d = static_cast<std::size_t>(sigma.cols());
    std::vector<double> w(d);
    double total = 0.0;
    for (std::size_t i = 0; i < d; ++i) {
        const double s = static_cast<double>(sigma(0, static_cast<Index>(i)));
        check(std::isfinite(s), "sst_probabilities", "sigma must be finite, got ", s, " at position ", i);
        w[i] = std::max(s, 0.0);
        total += w[i];
    }
    const double uniform = 1.0 / static_cast<double>(d);
    for (std::size_t i = 0; i < d; ++i) {
        const double by_sigma = total > 0.0 ? w[i] / total : uniform;
        switch (scheme) {
            case SstSampling::sigma: w[i] = by_sigma; break;
            case SstSampling::mixed: w[i] = 0.5 * (uniform + by_sigma); break;
            case SstSampling::uniform: w[i] = uniform; break;
            // Not drawn at random: top and sequential choose by rank; p ∝ sigma for reference.
            case SstSampling::top:
            case SstSampling::sequential: w[i] = by_sigma; break;
        }
    }
    return w;
}

/// r distinct positions of [0, weights.size()), drawn one at a time with probability
/// proportional to `weights` renormalised over the positions not drawn yet (multinomial
/// sampling without replacement). Once every remaining weight is zero, the rest are drawn
/// uniformly from the remaining positions. The result is in draw order.
inline std::vector<Index> sst_sample(std::span<const double> weights, Index r, Rng& rng) {
    const auto d = static_cast<Index>(weights.size());
    check(r >= 0 && r <= d, "sst_sample", "expected 0 <= r <= ", d, " (the number of weights), got r = ", r);
    for (std::size_t i = 0; i < weights.size(); ++i)
        check(std::isfinite(weights[i]) && weights[i] >= 0.0, "sst_sample",
              "weights must be finite and >= 0, got ", weights[i], " at position ", i);
    std::vector<double> w(weights.begin(), weights.end());
    std::vector<char> taken(weights.size(), 0);
    std::vector<Index> out;
    out.reserve(static_cast<std::size_t>(r));
    for (Index k = 0; k < r; ++k) {
        double total = 0.0;
        for (const double x : w) total += x;
        Index pick = -1;
        if (total > 0.0) {
            double u = rng.uniform() * total;
            for (Index i = 0; i < d; ++i) {
                const double wi = w[static_cast<std::size_t>(i)];
                if (wi <= 0.0) continue;
                pick = i;  // the last positive weight absorbs round-off at the top end
                if (u < wi) break;
                u -= wi;
            }
        } else {
            auto skip = static_cast<Index>(rng.below(static_cast<std::uint64_t>(d - k)));
            for (Index i = 0; i < d; ++i) {
                if (taken[static_cast<std::size_t>(i)]) continue;
                if (skip-- == 0) {
                    pick = i;
                    break;
                }
            }
        }
        taken[static_cast<std::size_t>(pick)] = 1;
        w[static_cast<std::size_t>(pick)] = 0.0;
        out.push_back(pick);
    }
    return out;
}

/// The r positions of `sigma` (a 1 x d row) with the largest values, largest first (ties:
/// the lower position first).
template <class T>
std::vector<Index> sst_top(const ConstMatrixRef<T>& sigma, Index r) {
    const Index d = sigma.cols();
    check(sigma.rows() == 1 && r >= 0 && r <= d, "sst_top", "expected a (1 x d) row and 0 <= r <= d, got ",
          shape_string(sigma), " and r = ", r);
    std::vector<Index> order(static_cast<std::size_t>(d));
    for (Index i = 0; i < d; ++i) order[static_cast<std::size_t>(i)] = i;
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return sigma(0, a) > sigma(0, b); });
    order.resize(static_cast<std::size_t>(r));
    return order;
}

/// The pairs of iteration j of a round under sequential sampling: j r, ..., j r + r - 1,
/// modulo d, numbered in the order of the last re-SVD (descending sigma then).
inline std::vector<Index> sst_sequential(std::int64_t j, Index r, Index d) {
    check(j >= 0 && r >= 1 && r <= d, "sst_sequential", "expected j >= 0 and 1 <= r <= d, got j = ", j,
          ", r = ", r, ", d = ", d);
    std::vector<Index> out;
    for (Index t = 0; t < r; ++t) out.push_back(static_cast<Index>((j * r + t) % d));
    return out;
}

/// Sets every sigma_i < threshold to zero (the pair then contributes nothing: the layer's
/// rank drops by one); returns how many were pruned. threshold is absolute, >= 0.
template <class T>
Index sst_prune_sigma(SpectralLinear<T>& layer, double threshold) {
    check(std::isfinite(threshold) && threshold >= 0.0, "sst_prune_sigma",
          "expected a finite threshold >= 0, got ", threshold);
    Index pruned = 0;
    for (Index i = 0; i < layer.full_rank(); ++i) {
        T& s = layer.sigma.value(0, i);
        if (s != T(0) && static_cast<double>(s) < threshold) {
            s = T(0);
            ++pruned;
        }
    }
    return pruned;
}

/// Sparse Spectral Training as a rank policy; see the top of this header.
template <class T>
class Sst : public RankPolicy<T> {
public:
    using Options = SstOptions;

    explicit Sst(SstOptions options = {}) : options_(std::move(options)), rng_(options_.seed) {
        constexpr std::string_view what = "Sst";
        check(options_.rank >= 1, what, "option rank (r) must be >= 1, got ", options_.rank);
        check(options_.iteration_steps >= 1, what, "option iteration_steps (T3) must be >= 1, got ",
              options_.iteration_steps);
        check(options_.round_iterations >= 0, what,
              "option round_iterations (T2) must be >= 0 (0: ceil(d / r)), got ", options_.round_iterations);
        check(options_.rewarm_steps >= 0 && options_.rewarm_steps <= options_.iteration_steps, what,
              "option rewarm_steps must be in [0, iteration_steps = ", options_.iteration_steps, "], got ",
              options_.rewarm_steps);
        check(options_.sampling == SstSampling::sigma || options_.sampling == SstSampling::mixed ||
                  options_.sampling == SstSampling::uniform || options_.sampling == SstSampling::top ||
                  options_.sampling == SstSampling::sequential,
              what, "option sampling must be sigma, mixed, uniform, top or sequential, got the value ",
              static_cast<int>(options_.sampling));
        check(options_.rewarm_scope == SstRewarmScope::all || options_.rewarm_scope == SstRewarmScope::spectral,
              what, "option rewarm_scope must be all or spectral, got the value ",
              static_cast<int>(options_.rewarm_scope));
        check(options_.init == SstInit::svd || options_.init == SstInit::random, what,
              "option init must be svd or random, got the value ", static_cast<int>(options_.init));
    }

    std::string_view name() const override { return "sst"; }

    /// Turns every selected layer into a SpectralLinear from the SVD of its weight (the
    /// network is unchanged; with init = random only sigma comes from it, U and V are drawn).
    /// A layer that already is one with active rank r is kept as it is, whatever init.
    void on_train_begin(TrainingContext<T>& ctx) override {
        const auto slots = ctx.select(options_.select, name());
        // Check everything before converting anything, so a bad option leaves the model untouched.
        if (options_.group)
            check(*options_.group < ctx.optimizer().groups().size(), "Sst", "option group must be < ",
                  ctx.optimizer().groups().size(), " (the optimizer's groups), got ", *options_.group);
        for (const LayerSlot<T>* s : slots) {
            const AnyLinear<T>& l = *s->layer;
            const Index d = std::min(l.in_features(), l.out_features());
            check(options_.rank <= d, "Sst", "option rank (r) must be <= min(out, in) = ", d, " for layer '",
                  l.name(), "' ", shape_string(l.out_features(), l.in_features()), ", got ", options_.rank);
        }
        layers_.clear();
        spectral_group_.reset();
        std::optional<std::size_t> group = options_.group;
        if (options_.rewarm_scope == SstRewarmScope::spectral) {
            // A group of its own, as the one the spectral parameters would join: the option's,
            // or the first selected layer's weight's.
            Optimizer<T>& opt = ctx.optimizer();
            std::size_t from = 0;
            if (options_.group) {
                from = *options_.group;
            } else {
                for (const Parameter<T>* p : slots.front()->layer->parameters())
                    if (!p->name().ends_with(".bias")) {
                        from = opt.group_of(*p);
                        break;
                    }
            }
            const GroupOptions source = opt.group(from).options;
            opt.add_group({}, GroupOptions{.lr = source.lr,
                                           .weight_decay = source.weight_decay,
                                           .name = "sst.spectral"});
            spectral_group_ = opt.groups().size() - 1;
            spectral_lr_ = spectral_lr_now_ = source.lr;
            group = spectral_group_;
        }
        for (LayerSlot<T>* s : slots) {
            AnyLinear<T>& slot = *s->layer;
            const Index old_rank = slot.rank();
            const double old_count = static_cast<double>(slot.parameter_count());
            auto* existing = slot.template get_if<SpectralLinear<T>>();
            if (existing && existing->active_rank() == options_.rank) {
                existing->set_enhanced_gradient(options_.enhanced_gradient);
                if (spectral_group_) {
                    ParameterList<T> moved;
                    for (Parameter<T>* p : slot.parameters())
                        if (!p->name().ends_with(".bias")) moved.push_back(p);
                    ctx.optimizer().remove_parameters(moved);
                    ctx.optimizer().add_to_group(*spectral_group_, moved);
                }
            } else {
                const Matrix<T> w = slot.dense_weight();
                const Matrix<T>* b = slot.bias();
                const Matrix<T> bias = b ? *b : Matrix<T>();
                auto converted = SpectralLinear<T>::from_dense(
                    slot.name(), w,
                    SpectralOptions{.rank = options_.rank,
                                    .bias = b != nullptr,
                                    .enhanced_gradient = options_.enhanced_gradient},
                    b ? &bias : nullptr);
                if (options_.init == SstInit::random) draw_random_bases(converted);
                ctx.replace_layer(slot, std::move(converted), group);
            }
            auto& l = slot.template get<SpectralLinear<T>>();
            if (options_.sigma_only) l.U_active.trainable = l.V_active.trainable = false;
            const Index d = l.full_rank();
            const Index t2 = options_.round_iterations > 0 ? options_.round_iterations
                                                           : (d + options_.rank - 1) / options_.rank;
            std::vector<Index> order(static_cast<std::size_t>(d));
            for (Index k = 0; k < d; ++k) order[static_cast<std::size_t>(k)] = k;
            layers_.push_back(Entry{&slot, t2, {}, std::move(order)});
            ctx.record(name(), l.name(), "init", old_rank, l.rank(), "trainable_share",
                       static_cast<double>(l.trainable_count()) / old_count);
        }
        last_sample_step_ = -1;
        last_round_step_ = -1;
        // A run no longer than one iteration trains the first sample's pairs only: legitimate
        // for a short run, so it is recorded rather than refused (docs/methods/README.md).
        if (ctx.total_steps() > 0 && ctx.total_steps() <= options_.iteration_steps)
            ctx.record(name(), "", "schedule", 0, 0, "iteration_steps",
                       static_cast<double>(options_.iteration_steps));
    }

    /// At an iteration start: draw and activate r pairs per layer, carry the optimizer
    /// state over, re-warm the learning rate. Idempotent within a step.
    void before_forward(TrainingContext<T>& ctx) override {
        if (options_.sigma_only) return;  // U, V frozen: nothing to choose
        if (ctx.step() % options_.iteration_steps == 0 && ctx.step() != last_sample_step_) {
            last_sample_step_ = ctx.step();
            for (std::size_t i = 0; i < layers_.size(); ++i) {
                auto& l = layer(i);
                layers_[i].sampled = choose(i, ctx.step());
                const auto changed = l.activate(layers_[i].sampled);
                follow_swaps(layers_[i].order, changed);
                carry_activation(ctx.optimizer(), l, changed);
                ctx.record(name(), l.name(), "sample", l.rank(), l.rank(), "sigma_mass_active",
                           sigma_mass_active(l));
            }
            if (ctx.step() > 0 && options_.rewarm_scope == SstRewarmScope::all) ctx.rewarm(options_.rewarm_steps);
        }
        if (spectral_group_) {
            spectral_lr_now_ = spectral_lr(ctx.step());
            ctx.optimizer().set_group_lr(*spectral_group_, spectral_lr_now_);
        }
    }

    /// The spectral group's lr at `step` with rewarm_scope = spectral: its base lr, ramped
    /// linearly over rewarm_steps from each iteration start after the first (as the
    /// schedule's re-warm-up: 1 / rewarm_steps at the start).
    double spectral_lr(std::int64_t step) const {
        const std::int64_t at = last_sample_step_, length = options_.rewarm_steps;
        if (at <= 0 || length <= 0 || step < at || step - at >= length) return spectral_lr_;
        return spectral_lr_ * static_cast<double>(step - at + 1) / static_cast<double>(length);
    }
    /// The spectral parameters' own group (rewarm_scope = spectral; unset otherwise).
    std::optional<std::size_t> spectral_group() const { return spectral_group_; }

    /// After training: every sigma_i below `threshold` (absolute) set to zero in each layer,
    /// a "prune" event per layer (old -> new rank of W). Returns the pruned count over all
    /// layers.
    Index prune(TrainingContext<T>& ctx, double threshold) {
        Index total = 0;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            auto& l = layer(i);
            const Index before = l.rank();
            total += sst_prune_sigma(l, threshold);
            ctx.record(name(), l.name(), "prune", before, l.rank(), "sigma_threshold", threshold);
        }
        return total;
    }

    /// After each step: sigma >= 0 and unit-length active vectors; at a round end, re-SVD.
    void after_step(TrainingContext<T>& ctx) override {
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            auto& l = layer(i);
            l.clamp_sigma();
            if (!options_.sigma_only) l.renormalize_active();
        }
        if (options_.sigma_only) return;  // U, V stay orthonormal: no re-SVD
        if (ctx.step() <= 0 || ctx.step() % options_.iteration_steps != 0 || ctx.step() == last_round_step_) return;
        last_round_step_ = ctx.step();
        const std::int64_t iterations_done = ctx.step() / options_.iteration_steps;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            if (iterations_done % layers_[i].round_iterations != 0) continue;
            auto& l = layer(i);
            const double drift = orthogonality_error(l);
            l.resvd();
            auto& e = layers_[i];
            for (std::size_t k = 0; k < e.order.size(); ++k) e.order[k] = static_cast<Index>(k);
            auto& opt = ctx.optimizer();
            for (Parameter<T>* p : {&l.U_active, &l.V_active, &l.sigma}) opt.carry_state(*p, StateCarry::reset_all());
            for (Parameter<T>* p : {&l.U_frozen, &l.V_frozen}) opt.carry_state(*p, StateCarry::drop());
            ctx.record(name(), l.name(), "resvd", l.rank(), l.rank(), "orthogonality_error", drift);
        }
    }

    /// The sampler's generator, the steps of the last sampling and the last round check,
    /// and per layer d, r, T2, the positions drawn at the last iteration start and the
    /// structure. The active set itself needs no more: the layer keeps the active pairs in
    /// their own block, so it is in the parameter values (U_active, V_active, sigma, ...).
    nlohmann::json state() const override {
        nlohmann::json out = detail::policy_state_header(name());
        out["rng"] = detail::rng_to_policy_state(rng_);
        out["last_sample_step"] = last_sample_step_;
        out["last_round_step"] = last_round_step_;
        out["sampling"] = std::string(to_string(options_.sampling));
        out["sigma_only"] = options_.sigma_only;
        out["rewarm_scope"] = std::string(to_string(options_.rewarm_scope));
        out["init"] = std::string(to_string(options_.init));
        if (spectral_group_) out["spectral_lr"] = spectral_lr_now_;
        nlohmann::json layers = nlohmann::json::array();
        for (const Entry& e : layers_) {
            const auto& l = e.slot->template get<SpectralLinear<T>>();
            layers.push_back({{"name", l.name()},
                              {"order", e.order},
                              {"d", l.full_rank()},
                              {"active_rank", l.active_rank()},
                              {"round_iterations", e.round_iterations},
                              {"sampled", e.sampled},
                              {"structure", detail::layer_structure(*e.slot)}});
        }
        out["layers"] = layers;
        return out;
    }

    /// Nothing to reshape (the active block has r columns throughout): checks the layers,
    /// takes the generator, the step counters and the last draws back.
    void restore(TrainingContext<T>& ctx, const nlohmann::json& state) override {
        check(!layers_.empty(), "sst", "restore called before on_train_begin: convert the layers first");
        const auto r = detail::open_policy_state(name(), state);
        const Rng::State rng = r.rng("rng");
        const std::int64_t max = std::numeric_limits<std::int64_t>::max();
        const std::int64_t sample_step = r.integer("last_sample_step", -1, max);
        const std::int64_t round_step = r.integer("last_round_step", -1, max);
        // Options whose change would make the run another one. A state from before an option
        // existed was saved with its default; sampling was not recorded then.
        const auto refuse = [&](const std::string& key, const std::string& mine, const std::string& saved) {
            if (mine != saved)
                r.error("option ", key, " is ", mine, " here but ", saved,
                        " in the saved run: resume with the saved run's options");
        };
        if (r.has("sampling")) refuse("sampling", std::string(to_string(options_.sampling)), r.string("sampling"));
        refuse("sigma_only", options_.sigma_only ? "true" : "false",
               r.has("sigma_only") ? (r.boolean("sigma_only") ? "true" : "false") : "false");
        refuse("rewarm_scope", std::string(to_string(options_.rewarm_scope)),
               r.has("rewarm_scope") ? r.string("rewarm_scope") : "all");
        refuse("init", std::string(to_string(options_.init)), r.has("init") ? r.string("init") : "svd");
        // The spectral group's lr as the saved run left it (mid-ramp, perhaps): the optimizer's
        // checkpoint holds that value and is checked against the group.
        std::optional<double> spectral_lr_now;
        if (spectral_group_) {
            spectral_lr_now = r.number("spectral_lr");
            if (!std::isfinite(*spectral_lr_now) || *spectral_lr_now < 0.0)
                r.error("expected spectral_lr finite and >= 0, got ", *spectral_lr_now);
        }
        std::vector<std::string> names;
        for (const Entry& e : layers_) names.push_back(e.slot->name());
        const auto entries = detail::matched_layers(r, names);
        std::vector<std::vector<Index>> sampled(layers_.size());
        std::vector<std::vector<Index>> orders(layers_.size());
        for (std::size_t i = 0; i < entries.size(); ++i) {
            const auto& e = entries[i];
            const auto& l = layer(i);
            const Index d = l.full_rank(), rank = l.active_rank();
            const std::int64_t saved_d = e.integer("d"), saved_r = e.integer("active_rank");
            if (saved_d != d || saved_r != rank)
                e.error("expected d = ", d, " and active_rank = ", rank, ", got d = ", saved_d,
                        " and active_rank = ", saved_r);
            const std::int64_t t2 = e.integer("round_iterations");
            if (t2 != layers_[i].round_iterations)
                e.error("expected round_iterations (T2) = ", layers_[i].round_iterations,
                        " (this policy's options on this layer), got ", t2);
            std::vector<char> seen(static_cast<std::size_t>(d), 0);
            for (const std::int64_t p : e.integers("sampled")) {
                if (p < 0 || p >= d || seen[static_cast<std::size_t>(p)])
                    e.error("expected distinct sampled positions in [0, ", d, "), got ", p);
                seen[static_cast<std::size_t>(p)] = 1;
                sampled[i].push_back(p);
            }
            if (!sampled[i].empty() && static_cast<Index>(sampled[i].size()) != rank)
                e.error("expected ", rank, " sampled positions (or none before the first draw), got ",
                        sampled[i].size());
            // The pairs' numbering since the last re-SVD (sequential sampling needs it; older
            // states without it resume with the identity).
            std::vector<char> placed(static_cast<std::size_t>(d), 0);
            if (e.has("order")) {
                for (const std::int64_t k : e.integers("order")) {
                    if (k < 0 || k >= d || placed[static_cast<std::size_t>(k)])
                        e.error("expected order to be a permutation of [0, ", d, "), got ", k);
                    placed[static_cast<std::size_t>(k)] = 1;
                    orders[i].push_back(k);
                }
                if (static_cast<Index>(orders[i].size()) != d)
                    e.error("expected order to have d = ", d, " entries, got ", orders[i].size());
            } else {
                for (Index k = 0; k < d; ++k) orders[i].push_back(k);
            }
            detail::check_layer_structure(e, *layers_[i].slot);
        }
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            layers_[i].sampled = std::move(sampled[i]);
            layers_[i].order = std::move(orders[i]);
        }
        last_sample_step_ = sample_step;
        last_round_step_ = round_step;
        rng_.set_state(rng);
        if (spectral_lr_now) {
            spectral_lr_now_ = *spectral_lr_now;
            ctx.optimizer().set_group_lr(*spectral_group_, spectral_lr_now_);
        }
    }

    const SstOptions& options() const { return options_; }
    /// The positions drawn for layer i at the last iteration start, in draw order and in the
    /// layer's storage order before that activation (empty before the first).
    const std::vector<Index>& sampled(std::size_t i) const { return layers_.at(i).sampled; }
    /// The layers this policy trains, in model order (valid after on_train_begin).
    std::size_t num_layers() const { return layers_.size(); }
    SpectralLinear<T>& layer(std::size_t i) { return layers_.at(i).slot->template get<SpectralLinear<T>>(); }
    /// T2 of layer i: iterations per round (the option, or ceil(d / r) when it is 0).
    std::int64_t round_iterations(std::size_t i) const { return layers_.at(i).round_iterations; }
    /// The sampler's generator (a checkpoint saves its state).
    Rng& rng() { return rng_; }

    /// The share of sum(sigma) held by the active block (0 for an all-zero sigma).
    static double sigma_mass_active(const SpectralLinear<T>& l) {
        const double total = static_cast<double>(l.sigma.value.sum());
        if (!(total > 0.0)) return 0.0;
        return static_cast<double>(l.sigma.value.leftCols(l.active_rank()).sum()) / total;
    }

    /// max(|U^T U - I|_F, |V^T V - I|_F) over the full factors: how far a round has taken
    /// them from orthonormal (the re-SVD brings it back to round-off).
    static double orthogonality_error(const SpectralLinear<T>& l) {
        const Matrix<T> u = l.full_u(), v = l.full_v();
        const Index d = l.full_rank();
        const Matrix<T> id = Matrix<T>::Identity(d, d);
        Matrix<T> g(d, d);
        g.noalias() = u.transpose() * u;
        const double eu = static_cast<double>((g - id).norm());
        g.noalias() = v.transpose() * v;
        return std::max(eu, static_cast<double>((g - id).norm()));
    }

private:
    struct Entry {
        AnyLinear<T>* slot;
        std::int64_t round_iterations;
        std::vector<Index> sampled;  // the positions drawn at the last iteration start
        std::vector<Index> order;    // order[p]: the pair at position p, numbered at the last re-SVD
    };

    /// init = random: every column of U and V replaced by i.i.d. N(0, 1) entries scaled to
    /// unit length, U's columns first, then V's, each column top to bottom; sigma (the
    /// weight's singular values) is kept. Not orthogonalised, on purpose (top of this header).
    void draw_random_bases(SpectralLinear<T>& l) {
        for (Parameter<T>* p : {&l.U_active, &l.U_frozen, &l.V_active, &l.V_frozen}) {
            Matrix<T>& m = p->value;
            for (Index j = 0; j < m.cols(); ++j) {
                T norm = T(0);
                while (!(norm > T(0))) {  // an all-zero column has no direction: draw it again
                    for (Index i = 0; i < m.rows(); ++i) m(i, j) = static_cast<T>(rng_.normal());
                    norm = m.col(j).norm();
                }
                m.col(j) /= norm;
            }
        }
    }

    /// The r positions to activate for layer i at iteration start `step`.
    std::vector<Index> choose(std::size_t i, std::int64_t step) {
        auto& l = layer(i);
        const Index r = l.active_rank(), d = l.full_rank();
        switch (options_.sampling) {
            case SstSampling::top: return sst_top<T>(l.sigma.value, r);
            case SstSampling::sequential: {
                const std::int64_t j = (step / options_.iteration_steps) % layers_[i].round_iterations;
                const auto& order = layers_[i].order;
                std::vector<Index> where(static_cast<std::size_t>(d));
                for (Index p = 0; p < d; ++p) where[static_cast<std::size_t>(order[static_cast<std::size_t>(p)])] = p;
                std::vector<Index> out;
                for (const Index k : sst_sequential(j, r, d)) out.push_back(where[static_cast<std::size_t>(k)]);
                return out;
            }
            default: return sst_sample(sst_probabilities<T>(l.sigma.value, options_.sampling), r, rng_);
        }
    }

    /// Keeps the numbering of the pairs through an activation's swaps (q_k <-> p_k).
    static void follow_swaps(std::vector<Index>& order, const std::vector<Index>& changed) {
        const std::size_t half = changed.size() / 2;
        for (std::size_t k = 0; k < half; ++k)
            std::swap(order[static_cast<std::size_t>(changed[k])], order[static_cast<std::size_t>(changed[half + k])]);
    }

    /// The optimizer side of SpectralLinear::activate: newly active U/V columns start from
    /// zero state; each sigma entry's state moves with the singular value it belongs to.
    static void carry_activation(Optimizer<T>& opt, SpectralLinear<T>& l, const std::vector<Index>& changed) {
        if (changed.empty()) return;  // nothing moved, no layout changed
        const std::size_t half = changed.size() / 2;
        const std::vector<Index> slots(changed.begin(), changed.begin() + static_cast<std::ptrdiff_t>(half));
        opt.carry_state(l.U_active, StateCarry::reset_columns(slots));
        opt.carry_state(l.V_active, StateCarry::reset_columns(slots));
        opt.carry_state(l.U_frozen, StateCarry::drop());
        opt.carry_state(l.V_frozen, StateCarry::drop());
        if (const auto* s = opt.state_of(l.sigma)) {
            OptimizerState<T> moved = *s;
            for (const auto moment : opt.moment_names()) {
                Matrix<T>& m = moved.moment(moment);
                for (std::size_t k = 0; k < half; ++k) m.col(changed[k]).swap(m.col(changed[half + k]));
            }
            opt.set_state(l.sigma, std::move(moved));  // stamps sigma's new layout version
        }
    }

    SstOptions options_;
    Rng rng_;
    std::vector<Entry> layers_;
    std::int64_t last_sample_step_ = -1;
    std::int64_t last_round_step_ = -1;
    std::optional<std::size_t> spectral_group_;
    double spectral_lr_ = 0.0;      // the spectral group's lr outside a re-warm-up
    double spectral_lr_now_ = 0.0;  // the lr last set on it (a checkpoint holds it)
};

}  // namespace lowrank
