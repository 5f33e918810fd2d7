#pragma once
// The dense layer: y = x * W^T + b, W (out x in). The baseline every low-rank layer is
// measured against.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_linear.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/parameter.hpp>

#include <algorithm>
#include <string>

namespace lowrank {

struct LinearOptions {
    bool bias = true;
};

template <class T>
class Linear {
public:
    /// PyTorch's initialisation: W and b uniform in +-1/sqrt(in).
    Linear(const std::string& name, Index in, Index out, Rng& rng, LinearOptions options = {})
        : name_(name), has_bias_(options.bias) {
        check(in > 0 && out > 0, name, "expected positive in and out features, got in = ", in,
              ", out = ", out);
        weight = Parameter<T>(name + ".weight", Matrix<T>(out, in));
        init::linear_default<T>(weight.value, rng, in);
        if (has_bias_) {
            bias = Parameter<T>(name + ".bias", Matrix<T>(1, out));
            init::linear_default<T>(bias.value, rng, in);
        }
    }

    /// A layer holding the given weight (out x in) and, if given, bias (1 x out): a merged
    /// factorised layer (nn/merge.hpp) or weights read from a file.
    static Linear from_weight(const std::string& name, const ConstMatrixRef<T>& w, const Matrix<T>* b = nullptr) {
        check(w.rows() > 0 && w.cols() > 0, name, "from_weight expects a non-empty weight, got ",
              shape_string(w.rows(), w.cols()));
        if (b) check_shape(*b, 1, w.rows(), name + ": from_weight bias");
        Linear l(name, b != nullptr);
        l.weight = Parameter<T>(name + ".weight", Matrix<T>(w));
        if (b) l.bias = Parameter<T>(name + ".bias", *b);
        return l;
    }

    /// x (N x in) -> (N x out).
    Var<T> forward(Graph<T>& g, const Var<T>& x) {
        check(x.cols() == in_features(), name_, "expected input with ", in_features(), " features, got ",
              shape_string(x.value()));
        return linear(g, x, g.param(weight), has_bias_ ? g.param(bias) : Var<T>{});
    }

    ParameterList<T> parameters() {
        ParameterList<T> out{&weight};
        if (has_bias_) out.push_back(&bias);
        return out;
    }

    const std::string& name() const { return name_; }
    Index in_features() const { return weight.cols(); }
    Index out_features() const { return weight.rows(); }
    bool has_bias() const { return has_bias_; }
    Index rank() const { return std::min(in_features(), out_features()); }
    Index parameter_count() const { return weight.size() + (has_bias_ ? bias.size() : 0); }
    Index trainable_count() const {
        return (weight.trainable ? weight.size() : 0) + (has_bias_ && bias.trainable ? bias.size() : 0);
    }
    /// Multiply-adds count as two FLOPs; the bias adds one per output.
    double flops_per_token() const {
        return 2.0 * static_cast<double>(in_features()) * static_cast<double>(out_features()) +
               (has_bias_ ? static_cast<double>(out_features()) : 0.0);
    }
    const Matrix<T>& dense_weight() const { return weight.value; }

    Parameter<T> weight;
    Parameter<T> bias;  // (1 x out); empty without bias

private:
    Linear(const std::string& name, bool has_bias) : name_(name), has_bias_(has_bias) {}

    std::string name_;
    bool has_bias_ = true;
};

}  // namespace lowrank
