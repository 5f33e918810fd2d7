#pragma once
// InRank's layer: W = (W0) + U[:, :k] V[:, :k]^T with capacity R columns allocated up
// front and k active. grow() activates more columns in place; truncate() cuts the layer to
// rank r by truncated SVD of the active product and frees the capacity (the two-stage
// recipe's model-size saving). The forward pass is LowRankLinear's fused node restricted to
// the active columns (docs/derivations/low_rank_linear.md).

#include <lowrank/nn/low_rank_linear.hpp>

#include <algorithm>
#include <string>

namespace lowrank {

struct IncrementalRankOptions {
    Index rank = 2;        // initial active columns k (InRank's r + b is set by the policy)
    Index capacity = 0;    // R; 0 means floor(min(out, in) / 2), the authors' choice
    bool bias = true;
    bool base = false;     // frozen W0 (the general form); without it W = U V^T from scratch
};

template <class T>
class IncrementalRankLinear {
public:
    /// Without a base: U V^T starts as the best rank-k approximation of a PyTorch-default
    /// dense init, and the capacity columns beyond k hold that init's next singular pairs
    /// (they "keep their initial values" until activated). With a base: W0 is the dense
    /// init, U = 0 and V uniform, so W starts exactly at W0.
    IncrementalRankLinear(const std::string& name, Index in, Index out, Rng& rng,
                          IncrementalRankOptions options = {})
        : name_(name), options_(options) {
        check(in > 0 && out > 0, name, "expected positive in and out features, got in = ", in, ", out = ", out);
        const Index d = std::min(in, out);
        const Index capacity = options.capacity > 0 ? options.capacity : std::max<Index>(1, d / 2);
        check(capacity <= d, name, "capacity must be in [1, min(out, in) = ", d, "], got ", capacity);
        check(options.rank >= 1 && options.rank <= capacity, name, "rank must be in [1, capacity = ", capacity,
              "], got ", options.rank);
        Matrix<T> dense(out, in);
        init::linear_default<T>(dense, rng, in);
        if (options.base) {
            base = Parameter<T>(name + ".base", dense, /*trainable=*/false);
            U = Parameter<T>(name + ".U", Matrix<T>::Zero(out, capacity));
            V = Parameter<T>(name + ".V", Matrix<T>(in, capacity));
            init::linear_default<T>(V.value, rng, in);
        } else {
            auto f = linalg::truncated_svd<T>(dense, capacity, name);
            U = Parameter<T>(name + ".U", std::move(f.U));
            V = Parameter<T>(name + ".V", std::move(f.V));
        }
        if (options.bias) {
            bias = Parameter<T>(name + ".bias", Matrix<T>(1, out));
            init::linear_default<T>(bias.value, rng, in);
        }
        U.set_active_cols(options.rank);
        V.set_active_cols(options.rank);
    }

    /// Builds the layer from given factors: U (out x R) and V (in x R) hold the whole
    /// capacity R, of which the leading `active` columns are trained. `base` (out x in),
    /// when given, becomes the frozen W0; `bias` (1 x out) the bias. A rank policy uses this
    /// to convert a model's dense layer with the initialisation it chooses.
    static IncrementalRankLinear from_factors(const std::string& name, Matrix<T> u, Matrix<T> v, Index active,
                                              const Matrix<T>* base = nullptr, const Matrix<T>* bias = nullptr) {
        check(u.rows() > 0 && v.rows() > 0, name, "from_factors expects non-empty factors, got U ",
              shape_string(u), " and V ", shape_string(v));
        check(u.cols() == v.cols(), name, "from_factors expects U and V with the same capacity (columns), got U ",
              shape_string(u), " and V ", shape_string(v));
        const Index out = u.rows(), in = v.rows(), capacity = u.cols(), d = std::min(in, out);
        check(capacity >= 1 && capacity <= d, name, "capacity must be in [1, min(out, in) = ", d, "], got ",
              capacity);
        check(active >= 1 && active <= capacity, name, "active columns must be in [1, capacity = ", capacity,
              "], got ", active);
        if (base) check_shape(*base, out, in, name + ": from_factors base");
        if (bias) check_shape(*bias, 1, out, name + ": from_factors bias");
        IncrementalRankLinear l(name);
        l.options_ = IncrementalRankOptions{
            .rank = active, .capacity = capacity, .bias = bias != nullptr, .base = base != nullptr};
        l.U = Parameter<T>(name + ".U", std::move(u));
        l.V = Parameter<T>(name + ".V", std::move(v));
        if (base) l.base = Parameter<T>(name + ".base", *base, /*trainable=*/false);
        if (bias) l.bias = Parameter<T>(name + ".bias", *bias);
        l.U.set_active_cols(active);
        l.V.set_active_cols(active);
        return l;
    }

    Var<T> forward(Graph<T>& g, const Var<T>& x) {
        check(x.cols() == in_features(), name_, "expected input with ", in_features(), " features, got ",
              shape_string(x.value()));
        return low_rank_linear(g, x, g.param(U), g.param(V), T(1), has_base() ? g.param(base) : Var<T>{},
                               has_bias() ? g.param(bias) : Var<T>{}, rank());
    }

    /// Activates columns up to k (k >= rank(), k <= capacity()) without reallocating. The new
    /// columns keep their values; tell the optimizer to grow their state with zeros.
    void grow(Index k) {
        check(k >= rank() && k <= capacity(), name_, "grow expects k in [", rank(), ", ", capacity(), "], got ", k);
        U.set_active_cols(k);
        V.set_active_cols(k);
    }

    /// Cuts the layer to rank r: the active product U_k V_k^T is replaced by its best rank-r
    /// approximation (balanced split, computed from the thin factors) and the capacity is
    /// released, so U is (out x r) afterwards. Returns the squared Frobenius error, which
    /// equals the discarded tail energy of the product. Slice the optimizer state after.
    double truncate(Index r) {
        check(r >= 1 && r <= rank(), name_, "truncate expects r in [1, ", rank(), "], got ", r);
        const Matrix<T> uk = U.value.leftCols(rank()), vk = V.value.leftCols(rank());
        auto svd = linalg::product_svd<T>(uk, vk, name_);
        const auto root = svd.s.head(r).array().sqrt().matrix().asDiagonal();
        double tail = 0.0;
        for (Index i = r; i < svd.s.size(); ++i) tail += static_cast<double>(svd.s(i)) * static_cast<double>(svd.s(i));
        U.set_value(svd.U.leftCols(r) * root);
        V.set_value(svd.V.leftCols(r) * root);
        return tail;
    }

    /// Singular values of the active product (length rank()), from its thin factors.
    Vector<T> singular_values() const {
        const Matrix<T> uk = U.value.leftCols(rank()), vk = V.value.leftCols(rank());
        return linalg::product_singular_values<T>(uk, vk, name_);
    }

    ParameterList<T> parameters() {
        ParameterList<T> out{&U, &V};
        if (has_base()) out.push_back(&base);
        if (has_bias()) out.push_back(&bias);
        return out;
    }

    const std::string& name() const { return name_; }
    Index in_features() const { return V.rows(); }
    Index out_features() const { return U.rows(); }
    /// Active columns k.
    Index rank() const { return U.active_cols(); }
    Index capacity() const { return U.cols(); }
    bool has_base() const { return base.size() > 0; }
    bool has_bias() const { return bias.size() > 0; }
    /// Scalars in use (the active columns, the base and the bias); capacity beyond k is
    /// allocated but not counted.
    Index parameter_count() const { return U.size() + V.size() + base.size() + bias.size(); }
    Index trainable_count() const { return U.size() + V.size() + bias.size(); }
    double flops_per_token() const {
        const double m = static_cast<double>(out_features()), n = static_cast<double>(in_features());
        return 2.0 * static_cast<double>(rank()) * (m + n) + (has_base() ? 2.0 * m * n : 0.0) +
               (has_bias() ? m : 0.0);
    }
    Matrix<T> dense_weight() const {
        Matrix<T> w = U.value.leftCols(rank()) * V.value.leftCols(rank()).transpose();
        if (has_base()) w += base.value;
        return w;
    }

    Parameter<T> U;     // (out x capacity), leading rank() columns active
    Parameter<T> V;     // (in x capacity)
    Parameter<T> base;  // (out x in), frozen; empty without a base
    Parameter<T> bias;

private:
    explicit IncrementalRankLinear(const std::string& name) : name_(name) {}

    std::string name_;
    IncrementalRankOptions options_;
};

}  // namespace lowrank
