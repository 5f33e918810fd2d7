#pragma once
// Sparse Spectral Training (SST; Zhao, Zhang, Li, Liu, Cannistraci, arXiv 2405.15481).
//
// Each selected layer becomes W = U diag(sigma) V^T (SpectralLinear) from the full SVD of
// its current weight, so the network is unchanged at the switch ("zero distortion"). Every
// step trains all of sigma but only r sampled singular vector pairs, with the enhanced
// gradient (the sigma_i factor dropped from their gradients). Training runs in rounds of
// T2 iterations of T3 steps:
//
//   iteration start (before_forward, step % T3 == 0): draw r distinct positions with
//       probability p (sigma, mixed or uniform), make them the active block, reset the
//       optimizer state of the newly active U/V columns, and re-warm the learning rate.
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
    sigma,    // p_i ∝ sigma_i (paper v1): exploits the large directions, never draws a zero one
    mixed,    // p_i = (1/d + sigma_i / sum sigma) / 2: half uniform, half ∝ sigma
    uniform,  // p_i = 1/d
};

inline std::string_view to_string(SstSampling s) {
    switch (s) {
        case SstSampling::sigma: return "sigma";
        case SstSampling::mixed: return "mixed";
        case SstSampling::uniform: return "uniform";
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
                  options_.sampling == SstSampling::uniform,
              what, "option sampling must be sigma, mixed or uniform, got the value ",
              static_cast<int>(options_.sampling));
    }

    std::string_view name() const override { return "sst"; }

    /// Turns every selected layer into a SpectralLinear from the SVD of its weight (the
    /// network is unchanged). A layer that already is one with active rank r is kept.
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
        for (LayerSlot<T>* s : slots) {
            AnyLinear<T>& slot = *s->layer;
            const Index old_rank = slot.rank();
            const double old_count = static_cast<double>(slot.parameter_count());
            auto* existing = slot.template get_if<SpectralLinear<T>>();
            if (existing && existing->active_rank() == options_.rank) {
                existing->set_enhanced_gradient(options_.enhanced_gradient);
            } else {
                const Matrix<T> w = slot.dense_weight();
                const Matrix<T>* b = slot.bias();
                const Matrix<T> bias = b ? *b : Matrix<T>();
                ctx.replace_layer(slot, SpectralLinear<T>::from_dense(
                                            slot.name(), w,
                                            SpectralOptions{.rank = options_.rank,
                                                            .bias = b != nullptr,
                                                            .enhanced_gradient = options_.enhanced_gradient},
                                            b ? &bias : nullptr),
                                  options_.group);
            }
            auto& l = slot.template get<SpectralLinear<T>>();
            const Index d = l.full_rank();
            const Index t2 = options_.round_iterations > 0 ? options_.round_iterations
                                                           : (d + options_.rank - 1) / options_.rank;
            layers_.push_back(Entry{&slot, t2, {}});
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
        if (ctx.step() % options_.iteration_steps != 0 || ctx.step() == last_sample_step_) return;
        last_sample_step_ = ctx.step();
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            auto& l = layer(i);
            const auto p = sst_probabilities<T>(l.sigma.value, options_.sampling);
            layers_[i].sampled = sst_sample(p, l.active_rank(), rng_);
            const auto changed = l.activate(layers_[i].sampled);
            carry_activation(ctx.optimizer(), l, changed);
            ctx.record(name(), l.name(), "sample", l.rank(), l.rank(), "sigma_mass_active", sigma_mass_active(l));
        }
        if (ctx.step() > 0) ctx.rewarm(options_.rewarm_steps);
    }

    /// After each step: sigma >= 0 and unit-length active vectors; at a round end, re-SVD.
    void after_step(TrainingContext<T>& ctx) override {
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            auto& l = layer(i);
            l.clamp_sigma();
            l.renormalize_active();
        }
        if (ctx.step() <= 0 || ctx.step() % options_.iteration_steps != 0 || ctx.step() == last_round_step_) return;
        last_round_step_ = ctx.step();
        const std::int64_t iterations_done = ctx.step() / options_.iteration_steps;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            if (iterations_done % layers_[i].round_iterations != 0) continue;
            auto& l = layer(i);
            const double drift = orthogonality_error(l);
            l.resvd();
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
        nlohmann::json layers = nlohmann::json::array();
        for (const Entry& e : layers_) {
            const auto& l = e.slot->template get<SpectralLinear<T>>();
            layers.push_back({{"name", l.name()},
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
    void restore(TrainingContext<T>&, const nlohmann::json& state) override {
        check(!layers_.empty(), "sst", "restore called before on_train_begin: convert the layers first");
        const auto r = detail::open_policy_state(name(), state);
        const Rng::State rng = r.rng("rng");
        const std::int64_t max = std::numeric_limits<std::int64_t>::max();
        const std::int64_t sample_step = r.integer("last_sample_step", -1, max);
        const std::int64_t round_step = r.integer("last_round_step", -1, max);
        std::vector<std::string> names;
        for (const Entry& e : layers_) names.push_back(e.slot->name());
        const auto entries = detail::matched_layers(r, names);
        std::vector<std::vector<Index>> sampled(layers_.size());
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
            detail::check_layer_structure(e, *layers_[i].slot);
        }
        for (std::size_t i = 0; i < layers_.size(); ++i) layers_[i].sampled = std::move(sampled[i]);
        last_sample_step_ = sample_step;
        last_round_step_ = round_step;
        rng_.set_state(rng);
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
    };

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
};

}  // namespace lowrank
