#pragma once
// A slot that holds any linear layer type and can be swapped in place by a rank policy
// (Cuttlefish turns a dense layer into a low-rank one mid-training). The slot keeps the
// layer's name and shape; after a swap, re-read the model's parameter list (the old
// parameters are gone) and tell the optimizer to drop their state.

#include <lowrank/nn/deep_low_rank_linear.hpp>
#include <lowrank/nn/incremental_rank_linear.hpp>
#include <lowrank/nn/linear.hpp>
#include <lowrank/nn/low_rank_linear.hpp>
#include <lowrank/nn/spectral_linear.hpp>

#include <string>
#include <utility>
#include <variant>

namespace lowrank {

template <class T>
class AnyLinear {
public:
    using Variant = std::variant<Linear<T>, LowRankLinear<T>, SpectralLinear<T>, IncrementalRankLinear<T>,
                                 DeepLowRankLinear<T>>;

    template <class Layer>
    explicit AnyLinear(Layer layer) : layer_(std::move(layer)) {}

    Var<T> forward(Graph<T>& g, const Var<T>& x) {
        return std::visit([&](auto& l) { return l.forward(g, x); }, layer_);
    }

    /// Puts a new layer in the slot. It must have the slot's name and shape, so the model's
    /// parameter names and the shapes flowing through it stay consistent.
    template <class Layer>
    void replace(Layer layer) {
        check(layer.name() == name(), name(), "replacement layer must keep the name '", name(), "', got '",
              layer.name(), "'");
        check(layer.in_features() == in_features() && layer.out_features() == out_features(), name(),
              "replacement layer must be ", shape_string(out_features(), in_features()), " (out x in), got ",
              shape_string(layer.out_features(), layer.in_features()));
        layer_ = std::move(layer);
    }

    template <class Layer>
    bool holds() const { return std::holds_alternative<Layer>(layer_); }
    template <class Layer>
    Layer* get_if() { return std::get_if<Layer>(&layer_); }
    template <class Layer>
    const Layer* get_if() const { return std::get_if<Layer>(&layer_); }
    template <class Layer>
    Layer& get() {
        auto* l = get_if<Layer>();
        check(l != nullptr, name(), "the slot holds a ", kind(), " layer, not the one requested");
        return *l;
    }

    /// "dense", "low_rank", "spectral", "incremental" or "deep".
    const char* kind() const {
        static constexpr const char* kinds[] = {"dense", "low_rank", "spectral", "incremental", "deep"};
        return kinds[layer_.index()];
    }

    ParameterList<T> parameters() {
        return std::visit([](auto& l) { return l.parameters(); }, layer_);
    }
    const std::string& name() const {
        return std::visit([](const auto& l) -> const std::string& { return l.name(); }, layer_);
    }
    Index in_features() const { return visit([](const auto& l) { return l.in_features(); }); }
    Index out_features() const { return visit([](const auto& l) { return l.out_features(); }); }
    Index rank() const { return visit([](const auto& l) { return l.rank(); }); }
    Index parameter_count() const { return visit([](const auto& l) { return l.parameter_count(); }); }
    Index trainable_count() const { return visit([](const auto& l) { return l.trainable_count(); }); }
    double flops_per_token() const { return visit([](const auto& l) { return l.flops_per_token(); }); }
    Matrix<T> dense_weight() const {
        return std::visit([](const auto& l) { return Matrix<T>(l.dense_weight()); }, layer_);
    }
    /// The bias row (1 x out), or nullptr for a layer without one.
    const Matrix<T>* bias() const {
        return std::visit([](const auto& l) -> const Matrix<T>* { return l.has_bias() ? &l.bias.value : nullptr; },
                          layer_);
    }

    Variant& variant() { return layer_; }
    const Variant& variant() const { return layer_; }

private:
    template <class F>
    auto visit(F&& f) const {
        return std::visit(std::forward<F>(f), layer_);
    }
    Variant layer_;
};

/// A model's linear layer as a rank policy sees it: the slot and the role the model gives
/// it ("hidden", "output" in an Mlp; "attn_qkv", "attn_proj", "mlp_fc", "mlp_proj" in Gpt2).
template <class T>
struct LayerSlot {
    AnyLinear<T>* layer = nullptr;
    std::string role;
};

}  // namespace lowrank
