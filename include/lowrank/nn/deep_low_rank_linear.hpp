#pragma once
// Deep LoRA's layer: W = (W0) + W_L ... W_1, a deep overparameterised factorisation with
// epsilon-scaled orthogonal init, and its compressed form Q W~_L ... W~_1 P^T whose inner
// factors are 2r x 2r. Every factor is stored in weight layout (out x in), so the forward
// pass is a chain of `linear` nodes x -> x F_1^T -> ... in the cheap order (the widest
// intermediate is tokens x width); their backward passes are in docs/derivations/linear.md.

#include <lowrank/autograd/ops_basic.hpp>
#include <lowrank/autograd/ops_linear.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/linalg/svd.hpp>

#include <algorithm>
#include <cmath>
#include <deque>
#include <string>

namespace lowrank {

struct DeepLowRankOptions {
    Index depth = 3;         // L >= 2 factors
    Index width = 0;         // w; 0 means min(out, in)
    double epsilon = 1e-3;   // scale of the orthogonal init
    bool bias = true;
    bool base = false;       // frozen W0 (fine-tuning); without it W = W_L ... W_1
};

/// What DeepLowRankLinear::compress did.
struct DeepCompressionInfo {
    Index width = 0;           // 2r, the new inner width
    bool output_side = false;  // the basis was built from dL/dW_L (out > in), not dL/dW_1
    double captured = 0.0;     // share of the gradient's ||G||_F^2 in its top-r singular values
};

template <class T>
class DeepLowRankLinear {
public:
    DeepLowRankLinear(const std::string& name, Index in, Index out, Rng& rng, DeepLowRankOptions options = {})
        : name_(name), options_(options) {
        check(in > 0 && out > 0, name, "expected positive in and out features, got in = ", in, ", out = ", out);
        check(options.depth >= 2, name, "depth must be at least 2, got ", options.depth);
        check(options.width >= 0, name, "width must be non-negative (0 = min(out, in)), got ", options.width);
        check(options.epsilon > 0 && std::isfinite(options.epsilon), name, "epsilon must be positive, got ",
              options.epsilon);
        const Index w = options.width > 0 ? options.width : std::min(in, out);
        for (Index l = 0; l < options.depth; ++l) {
            const Index rows = l + 1 == options.depth ? out : w;
            const Index cols = l == 0 ? in : w;
            auto& p = factors_.emplace_back(name + ".W" + std::to_string(l + 1), Matrix<T>(rows, cols));
            init::orthogonal<T>(p.value, rng, options.epsilon);
        }
        if (options.base) {
            Matrix<T> dense(out, in);
            init::linear_default<T>(dense, rng, in);
            base = Parameter<T>(name + ".base", std::move(dense), /*trainable=*/false);
        }
        if (options.bias) {
            bias = Parameter<T>(name + ".bias", Matrix<T>(1, out));
            init::linear_default<T>(bias.value, rng, in);
        }
    }

    Var<T> forward(Graph<T>& g, const Var<T>& x) {
        check(x.cols() == in_features(), name_, "expected input with ", in_features(), " features, got ",
              shape_string(x.value()));
        Var<T> h = x;
        for (std::size_t l = 0; l < factors_.size(); ++l) {
            const bool last = l + 1 == factors_.size();
            h = linear(g, h, g.param(factors_[l]), last && has_bias() && !has_base() ? g.param(bias) : Var<T>{});
        }
        if (has_base()) h = add(g, h, linear(g, x, g.param(base), has_bias() ? g.param(bias) : Var<T>{}));
        return h;
    }

    /// Replaces the wide factors by Deep LoRA's compressed form (docs/layers/
    /// deep_low_rank_linear.md) built on the input side: from G = dL/dW_1 at initialisation
    /// (width x in), P (in x 2r) orthonormalises the top-r right singular vectors of G and of
    /// G^T W_1; Q = (W_L ... W_1) P / eps^L (out x 2r); the inner factors are eps * I
    /// (2r x 2r). The chain becomes P^T, W~_1..W~_L, Q, with P^T and Q the outer bases
    /// (`outer_parameters()`), to be trained at gamma * lr or frozen. Faithful when out <= in;
    /// prefer the two-gradient overload, which picks the side.
    DeepCompressionInfo compress(Index r, const ConstMatrixRef<T>& grad_w1) {
        check_compressible(r);
        const auto& w1 = factors_.front().value;
        check_shape(grad_w1, w1.rows(), w1.cols(), name_ + ": compress gradient of W1");
        auto [p, captured] = leading_basis(r, grad_w1, w1.transpose());
        // (W_L ... W_1) P / eps^L applied factor by factor: never forms the product, and
        // dividing by eps at each factor keeps every intermediate O(1) (eps^L may underflow).
        Matrix<T> q = p;
        for (const auto& f : factors_) q = (f.value * q) / eps();
        rebuild(std::move(p), std::move(q));
        return {2 * r, false, captured};
    }

    /// The same compression, built on the larger side of the layer. Q (out x 2r) must span
    /// the target's column space and P (in x 2r) its row space; only the side whose basis is
    /// chosen freely from the gradient can reach any direction, the other one lies in the
    /// range of the initial product (dimension min(out, in)). So for out > in the basis is
    /// built on the output side, from G_L = dL/dW_L (out x width): Q orthonormalises the
    /// top-r left singular vectors of G_L and the top-r right singular vectors of G_L W_L^T,
    /// and P = (W_L ... W_1)^T Q / eps^L; for out <= in it is the input-side construction
    /// above. For a square layer both agree with the paper and both bases are orthonormal;
    /// for a rectangular one the basis on the larger side is.
    DeepCompressionInfo compress(Index r, const ConstMatrixRef<T>& grad_w1,
                                 const ConstMatrixRef<T>& grad_wl) {
        if (out_features() <= in_features()) return compress(r, grad_w1);
        check_compressible(r);
        const auto& wl = factors_.back().value;
        check_shape(grad_wl, wl.rows(), wl.cols(),
                    name_ + ": compress gradient of W" + std::to_string(depth()));
        // The input-side construction applied to the transposed chain W_1^T ... W_L^T.
        auto [q, captured] = leading_basis(r, grad_wl.transpose(), wl);
        Matrix<T> p = q;
        for (auto it = factors_.rbegin(); it != factors_.rend(); ++it)
            p = (it->value.transpose() * p) / eps();
        rebuild(std::move(p), std::move(q));
        return {2 * r, true, captured};
    }

    ParameterList<T> parameters() {
        ParameterList<T> out;
        for (auto& f : factors_) out.push_back(&f);
        if (has_base()) out.push_back(&base);
        if (has_bias()) out.push_back(&bias);
        return out;
    }
    /// The inner factors (and the bias): trained at the base learning rate.
    ParameterList<T> inner_parameters() {
        ParameterList<T> out;
        for (std::size_t l = 0; l < factors_.size(); ++l)
            if (!compressed_ || (l > 0 && l + 1 < factors_.size())) out.push_back(&factors_[l]);
        if (has_bias()) out.push_back(&bias);
        return out;
    }
    /// P^T and Q after compression (empty before): their own parameter group (gamma * lr).
    ParameterList<T> outer_parameters() {
        if (!compressed_) return {};
        return {&factors_.front(), &factors_.back()};
    }
    /// Freezes (or unfreezes) the outer bases: gamma = 0.
    void set_outer_trainable(bool on) {
        for (auto* p : outer_parameters()) p->trainable = on;
    }

    const std::string& name() const { return name_; }
    const DeepLowRankOptions& options() const { return options_; }
    bool compressed() const { return compressed_; }
    Index depth() const { return options_.depth; }
    Index in_features() const { return factors_.front().cols(); }
    Index out_features() const { return factors_.back().rows(); }
    /// The narrowest inner dimension of the chain: an upper bound on rank(W - W0).
    Index rank() const {
        Index r = std::min(in_features(), out_features());
        for (const auto& f : factors_) r = std::min(r, f.rows());
        return r;
    }
    const std::deque<Parameter<T>>& factors() const { return factors_; }
    std::deque<Parameter<T>>& factors() { return factors_; }
    bool has_base() const { return base.size() > 0; }
    bool has_bias() const { return bias.size() > 0; }
    Index parameter_count() const {
        Index n = base.size() + bias.size();
        for (const auto& f : factors_) n += f.size();
        return n;
    }
    Index trainable_count() const {
        Index n = bias.trainable ? bias.size() : 0;
        for (const auto& f : factors_)
            if (f.trainable) n += f.size();
        return n;
    }
    double flops_per_token() const {
        double flops = 0;
        for (const auto& f : factors_) flops += 2.0 * static_cast<double>(f.rows()) * static_cast<double>(f.cols());
        if (has_base()) flops += 2.0 * static_cast<double>(out_features()) * static_cast<double>(in_features());
        return flops + (has_bias() ? static_cast<double>(out_features()) : 0.0);
    }
    /// (W0) + F_last ... F_1 as a dense (out x in) matrix.
    Matrix<T> dense_weight() const {
        Matrix<T> w = factors_.front().value;
        for (std::size_t l = 1; l < factors_.size(); ++l) w = factors_[l].value * w;
        if (has_base()) w += base.value;
        return w;
    }

    Parameter<T> base;  // (out x in), frozen; empty without a base
    Parameter<T> bias;  // (1 x out); empty without bias

private:
    void check_compressible(Index r) const {
        check(!compressed_, name_, "compress: the layer is already compressed");
        const Index limit = std::min({in_features(), out_features(), factors_.front().rows()});
        check(r >= 1 && 2 * r <= limit, name_, "compress: 2r must be in [2, min(out, in, width) = ", limit,
              "], got r = ", r);
    }

    struct Basis {
        Matrix<T> columns;  // (n x 2r), orthonormal
        double captured;    // share of ||G||_F^2 in G's top-r singular values (1 for G = 0)
    };

    /// For the first factor F (width x n) of a chain and its gradient G (width x n): the
    /// orthonormalised top-r right singular vectors of G and of G^T F. `f_t` is F^T.
    static Basis leading_basis(Index r, const ConstMatrixRef<T>& g, const ConstMatrixRef<T>& f_t) {
        const auto svd_g = linalg::thin_svd<T>(g, "DeepLowRankLinear::compress");
        const Matrix<T> gtf = g.transpose() * f_t.transpose();  // (n x n)
        const auto svd_gf = linalg::thin_svd<T>(gtf, "DeepLowRankLinear::compress");
        Matrix<T> basis(g.cols(), 2 * r);
        basis << svd_g.V.leftCols(r), svd_gf.V.leftCols(r);
        const double total = svd_g.s.template cast<double>().squaredNorm();
        const double top = svd_g.s.head(r).template cast<double>().squaredNorm();
        return {linalg::orthonormalize_columns<T>(basis, "DeepLowRankLinear::compress"),
                total > 0 ? top / total : 1.0};
    }

    T eps() const { return static_cast<T>(options_.epsilon); }

    /// The chain P^T, eps * I (depth times), Q.
    void rebuild(Matrix<T> p, Matrix<T> q) {
        const Index depth = static_cast<Index>(factors_.size());
        const Index two_r = p.cols();
        factors_.clear();
        factors_.emplace_back(name_ + ".P", Matrix<T>(p.transpose()));
        for (Index l = 0; l < depth; ++l)
            factors_.emplace_back(name_ + ".W" + std::to_string(l + 1),
                                  Matrix<T>(eps() * Matrix<T>::Identity(two_r, two_r)));
        factors_.emplace_back(name_ + ".Q", std::move(q));
        compressed_ = true;
    }

    std::string name_;
    DeepLowRankOptions options_;
    std::deque<Parameter<T>> factors_;  // applied first to last; a deque keeps addresses stable
    bool compressed_ = false;
};

}  // namespace lowrank
