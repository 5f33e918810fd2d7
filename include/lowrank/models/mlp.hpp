#pragma once
// A multilayer perceptron: Linear -> activation (-> dropout) -> ... -> Linear. Each layer
// sits in an AnyLinear slot, so a rank policy can make it low-rank; layer_slots() gives
// the policies every layer with its role ("hidden" for all but the last, "output").

#include <lowrank/autograd/ops_activation.hpp>
#include <lowrank/nn/any_linear.hpp>

#include <string>
#include <vector>

namespace lowrank {

enum class Activation { relu, gelu, tanh };

struct MlpOptions {
    std::vector<Index> sizes;  // input, hidden..., output; at least two entries
    Activation activation = Activation::relu;
    double dropout = 0.0;  // after each hidden activation, in training mode
    bool bias = true;
    std::string name = "layers";  // parameters are named "<name>.<i>.weight" / ".bias"
};

template <class T>
class Mlp {
public:
    Mlp(MlpOptions options, Rng& rng) : options_(std::move(options)) {
        const auto& s = options_.sizes;
        check(s.size() >= 2, "Mlp", "expected at least two sizes (input and output), got ", s.size());
        for (std::size_t i = 0; i < s.size(); ++i)
            check(s[i] > 0, "Mlp", "size ", i, " must be positive, got ", s[i]);
        check(options_.dropout >= 0.0 && options_.dropout < 1.0, "Mlp", "dropout must be in [0, 1), got ",
              options_.dropout);
        layers_.reserve(s.size() - 1);  // parameters are referenced by address: never reallocate
        for (std::size_t i = 0; i + 1 < s.size(); ++i)
            layers_.emplace_back(Linear<T>(options_.name + "." + std::to_string(i), s[i], s[i + 1], rng,
                                           LinearOptions{.bias = options_.bias}));
    }
    Mlp(const Mlp&) = delete;
    Mlp& operator=(const Mlp&) = delete;
    Mlp(Mlp&&) = default;
    Mlp& operator=(Mlp&&) = default;

    /// x (N x sizes.front()) -> logits (N x sizes.back()).
    Var<T> forward(Graph<T>& g, const Var<T>& x) {
        Var<T> h = x;
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            h = layers_[i].forward(g, h);
            if (i + 1 == layers_.size()) break;
            switch (options_.activation) {
                case Activation::relu: h = relu(g, h); break;
                case Activation::gelu: h = gelu(g, h); break;
                case Activation::tanh: h = lowrank::tanh(g, h); break;
            }
            h = dropout(g, h, options_.dropout);
        }
        return h;
    }

    ParameterList<T> parameters() {
        ParameterList<T> out;
        for (auto& l : layers_)
            for (auto* p : l.parameters()) out.push_back(p);
        return out;
    }

    /// The layers in order. A slot may be swapped (AnyLinear::replace), never added or removed.
    std::vector<AnyLinear<T>>& layers() { return layers_; }
    const std::vector<AnyLinear<T>>& layers() const { return layers_; }

    /// Every layer with its role: "hidden" for all but the last, "output" for the last.
    std::vector<LayerSlot<T>> layer_slots() {
        std::vector<LayerSlot<T>> out;
        for (std::size_t i = 0; i < layers_.size(); ++i)
            out.push_back({&layers_[i], i + 1 == layers_.size() ? "output" : "hidden"});
        return out;
    }
    const MlpOptions& options() const { return options_; }

private:
    MlpOptions options_;
    std::vector<AnyLinear<T>> layers_;
};

}  // namespace lowrank
