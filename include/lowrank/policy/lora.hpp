#pragma once
// Lora: the LoRA baseline (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
// Models", arXiv 2106.09685) as a rank policy.
//
// At the start of training every selected layer becomes W = W0 + s·B·A with W0 the layer's
// current dense weight, frozen; B (out × r) zero and A (r × n) random, so the network's
// function is unchanged; s = α / r. In LowRankLinear's names B is U and A is Vᵀ (V is
// n × r). The bias is copied and stays trainable, in its own optimizer group. After that
// the policy takes no decision: the rank is fixed. Pre-training from scratch this way can
// only ever learn a rank-r update of the initialisation (docs/methods/lora.md).
//
// Where this differs from the authors' code (loralib, PEFT) and why:
//  - α defaults to r (s = 1 at every rank), so a sweep over r does not also change the
//    step size of the update; set `alpha` for the papers' fixed-α convention (PEFT's
//    defaults r = 8, α = 8 are the same point).
//  - The bias trains (`train_bias`): this library pre-trains from scratch, where the bias
//    is part of the model being learnt. PEFT's default (bias = "none") freezes it, which
//    suits fine-tuning; set `train_bias = false` for that.
//  - No dropout on the adapter's input (loralib's lora_dropout); the MLP and GPT-2 runs
//    here use none.
//  - A is drawn as PyTorch draws it (kaiming_uniform with a = √5, i.e. U(±1/√n)), from the
//    policy's own generator, so a run is reproducible from `seed`.
//
// Page: docs/methods/lora.md. ReLoRA (restarts) is in relora.hpp.

#include <lowrank/core/error.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/nn/low_rank_linear.hpp>
#include <lowrank/policy/rank_policy.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

struct LoraOptions {
    Index rank = 8;                 // r, in [1, min(out, in)] of every selected layer
    std::optional<double> alpha{};  // α, scale s = α / r; unset: α = r (s = 1); must be > 0
    bool freeze_base = true;        // W0 frozen (LoRA); false also trains W0 (dense + low-rank)
    bool train_bias = true;         // the copied bias keeps training (see the header comment)
    LayerSelector select{.pattern = ".*", .roles = {"hidden"}};  // the layers made low-rank
    std::optional<std::size_t> group{};  // optimizer group of U, V (and a trained W0); unset:
                                         // the group of the dense weight they replace
    std::uint64_t seed = 0;              // seeds the draws of A (V)
};

namespace detail {

/// The part LoRA and ReLoRA share: options, the generator, the converted layers.
template <class T>
class LoraAdapters {
public:
    /// `policy` names the owner in messages ("lora", "relora").
    LoraAdapters(const LoraOptions& options, std::string_view policy)
        : options_(options), policy_(policy), rng_(options.seed) {
        check(options.rank >= 1, policy, "option rank: expected >= 1, got ", options.rank);
        if (options.alpha)
            check(std::isfinite(*options.alpha) && *options.alpha > 0.0, policy,
                  "option alpha: expected a finite value > 0 (or unset for alpha = rank), got ",
                  *options.alpha);
    }

    const LoraOptions& options() const { return options_; }
    Index rank() const { return options_.rank; }
    double alpha() const { return options_.alpha ? *options_.alpha : static_cast<double>(options_.rank); }
    double scale() const { return alpha() / static_cast<double>(options_.rank); }
    bool started() const { return started_; }
    const std::vector<AnyLinear<T>*>& layers() const { return layers_; }
    Rng& rng() { return rng_; }

    /// The adapter of converted layer i.
    LowRankLinear<T>& layer(std::size_t i) { return layers_.at(i)->template get<LowRankLinear<T>>(); }

    /// Replaces every selected layer by W0 + s·U·Vᵀ with W0 its dense weight, U = 0 and V
    /// drawn from the policy's generator. Checks every layer before changing any.
    void convert(TrainingContext<T>& ctx) {
        check(!started_, policy_, "on_train_begin called twice: the layers are already converted");
        const auto slots = ctx.select(options_.select, policy_);
        for (const LayerSlot<T>* s : slots) {
            const AnyLinear<T>& l = *s->layer;
            const Index d = std::min(l.in_features(), l.out_features());
            check(options_.rank <= d, policy_, "option rank: expected <= min(out, in) = ", d, " of layer '",
                  l.name(), "' ", shape_string(l.out_features(), l.in_features()), ", got ", options_.rank);
        }
        for (LayerSlot<T>* s : slots) {
            AnyLinear<T>& slot = *s->layer;
            const Index old_rank = slot.rank(), in = slot.in_features(), out = slot.out_features();
            const Matrix<T>* bias = slot.bias();
            // The layer draws its own base and factors from `scratch`; all of them are
            // overwritten, so only the policy's generator decides the run.
            Rng scratch(0);
            LowRankLinear<T> adapter(slot.name(), in, out, scratch,
                                     LowRankOptions{.rank = options_.rank,
                                                    .bias = bias != nullptr,
                                                    .base = true,
                                                    .scale = scale(),
                                                    .init = LowRankInit::lora});
            adapter.base.value = slot.dense_weight();
            adapter.base.trainable = !options_.freeze_base;
            if (bias) {
                adapter.bias.value = *bias;
                adapter.bias.trainable = options_.train_bias;
            }
            adapter.U.value.setZero();
            draw_v(adapter.V.value);
            ctx.replace_layer(slot, std::move(adapter), options_.group);
            layers_.push_back(&slot);
            ctx.record(policy_, slot.name(), "init", old_rank, options_.rank);
        }
        started_ = true;
    }

    /// A's distribution: PyTorch's nn.Linear default, U(±1/√in), as loralib and PEFT draw it.
    void draw_v(Matrix<T>& v) { init::linear_default<T>(v, rng_, v.rows()); }

    /// The shared part of a policy state: the generator and each converted layer.
    void save(nlohmann::json& out) const {
        out["rng"] = detail::rng_to_policy_state(rng_);
        nlohmann::json layers = nlohmann::json::array();
        for (AnyLinear<T>* slot : layers_)
            layers.push_back(
                {{"name", slot->name()}, {"rank", options_.rank}, {"structure", layer_structure(*slot)}});
        out["layers"] = layers;
    }

    /// Checks the shared part of a saved state against the converted layers (the rank and
    /// scale do not change after the start, so their structure must already match) and
    /// returns the saved generator state. Changes nothing.
    Rng::State check_saved(const PolicyStateReader& state) const {
        check(started_, policy_, "restore called before on_train_begin: convert the layers first");
        std::vector<std::string> names;
        for (const AnyLinear<T>* slot : layers_) names.push_back(slot->name());
        const auto entries = matched_layers(state, names);
        for (std::size_t i = 0; i < entries.size(); ++i) check_layer_structure(entries[i], *layers_[i]);
        return state.rng("rng");
    }

private:
    LoraOptions options_;
    std::string policy_;
    Rng rng_;
    std::vector<AnyLinear<T>*> layers_;
    bool started_ = false;
};

}  // namespace detail

/// LoRA: selected layers become W0 + (α/r)·U·Vᵀ with W0 frozen at their initial weight.
template <class T>
class Lora : public RankPolicy<T> {
public:
    using Options = LoraOptions;

    explicit Lora(LoraOptions options = {}) : adapters_(options, "lora") {}

    std::string_view name() const override { return "lora"; }

    void on_train_begin(TrainingContext<T>& ctx) override { adapters_.convert(ctx); }

    /// The generator of the V draws and each converted layer's structure.
    nlohmann::json state() const override {
        nlohmann::json out = detail::policy_state_header(name());
        adapters_.save(out);
        return out;
    }

    /// Nothing to reshape (the rank is fixed from the start): checks the layers, takes the
    /// generator back.
    void restore(TrainingContext<T>&, const nlohmann::json& state) override {
        const auto r = detail::open_policy_state(name(), state);
        adapters_.rng().set_state(adapters_.check_saved(r));
    }

    const LoraOptions& options() const { return adapters_.options(); }
    Index rank() const { return adapters_.rank(); }
    double alpha() const { return adapters_.alpha(); }
    /// s = α / r.
    double scale() const { return adapters_.scale(); }
    /// The converted slots, in model order (empty before on_train_begin).
    const std::vector<AnyLinear<T>*>& layers() const { return adapters_.layers(); }
    /// The generator of the V draws (a checkpoint saves its state).
    Rng& rng() { return adapters_.rng(); }

private:
    detail::LoraAdapters<T> adapters_;
};

}  // namespace lowrank
