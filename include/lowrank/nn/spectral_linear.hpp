#pragma once
// Sparse Spectral Training's layer: W = U diag(sigma) V^T over the full spectrum, of which
// only r "active" singular vector pairs receive gradients at a time. Derivation:
// docs/derivations/spectral_linear.md.
//
// Storage keeps the active pairs in their own block, so that only they carry gradients and
// optimizer state: U = [U_active | U_frozen], V likewise, sigma = [sigma_active |
// sigma_frozen] in one (1 x d) row (every singular value trains every step). Positions
// 0..r-1 are the active block, r..d-1 the frozen one; activate() swaps columns between them.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/linalg/svd.hpp>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>

namespace lowrank {

struct SpectralOptions {
    Index rank = 8;                // active singular vector pairs (r)
    bool bias = true;
    bool enhanced_gradient = true;  // drop the sigma_i factor from the U/V gradients (SST)
};

namespace detail {

template <class T>
struct SpectralLinearNode final : Node<T> {
    Node<T>* x = nullptr;
    Node<T>* ua = nullptr;  // (m x r)
    Node<T>* va = nullptr;  // (n x r)
    Node<T>* uf = nullptr;  // (m x (d - r)), frozen
    Node<T>* vf = nullptr;  // (n x (d - r)), frozen
    Node<T>* sigma = nullptr;  // (1 x d)
    Node<T>* b = nullptr;
    bool enhanced = true;
    Matrix<T> xv;   // x [V_a | V_f]               (N x d)
    Matrix<T> xvs;  // xv scaled by sigma per column (N x d)
    Matrix<T> dyu;  // dy [U_a | U_f]              (N x d)
    ColMatrix<T> du_scratch, dv_scratch;  // dU_a, dV_a before they are added (add_product)
    void backward() override {
        const auto& dy = this->dout;
        const Index r = ua->value->cols(), f = uf->value->cols(), d = r + f;
        const auto& s = *sigma->value;
        ensure_shape(dyu, dy.rows(), d);
        dyu.leftCols(r).noalias() = dy * *ua->value;
        if (f > 0) dyu.rightCols(f).noalias() = dy * *uf->value;
        // dL/dsigma_i = u_i^T G v_i with G = dy^T x, i.e. the column sums of dyu .* xv.
        if (sigma->requires_grad) add_column_sums(*sigma->grad, dyu.cwiseProduct(xv));
        // Autograd would give sigma_i G v_i for u_i; the enhanced gradient drops sigma_i.
        if (ua->requires_grad) {
            if (enhanced)
                add_product(*ua->grad, dy.transpose() * xv.leftCols(r), du_scratch);
            else
                add_product(*ua->grad, dy.transpose() * xvs.leftCols(r), du_scratch);
        }
        // dyu becomes dyu * diag(sigma): what x V receives.
        if (va->requires_grad && enhanced)
            add_product(*va->grad, x->value->transpose() * dyu.leftCols(r), dv_scratch);
        dyu.array().rowwise() *= s.row(0).array();
        if (va->requires_grad && !enhanced)
            add_product(*va->grad, x->value->transpose() * dyu.leftCols(r), dv_scratch);
        if (x->requires_grad) {
            x->grad->noalias() += dyu.leftCols(r) * va->value->transpose();
            if (f > 0) x->grad->noalias() += dyu.rightCols(f) * vf->value->transpose();
        }
        if (b && b->requires_grad) add_column_sums(*b->grad, dy);
    }
};

}  // namespace detail

/// A full-spectrum layer W = U diag(sigma) V^T (W is out x in, d = min(out, in)) that
/// trains sigma and r active singular vector pairs.
template <class T>
class SpectralLinear {
public:
    /// Draws a dense weight exactly as Linear does and starts from its full SVD, so that
    /// with the same generator the layer computes the same function as the dense layer.
    SpectralLinear(const std::string& name, Index in, Index out, Rng& rng, SpectralOptions options = {})
        : name_(name), options_(options) {
        check(in > 0 && out > 0, name, "expected positive in and out features, got in = ", in, ", out = ", out);
        Matrix<T> w(out, in);
        init::linear_default<T>(w, rng, in);
        Matrix<T> b;
        if (options.bias) {
            b.resize(1, out);
            init::linear_default<T>(b, rng, in);
        }
        assign_from_dense(w, options.bias ? &b : nullptr);
    }

    /// Exactly W (all d singular triplets), with the bias if given.
    static SpectralLinear from_dense(const std::string& name, const ConstMatrixRef<T>& w,
                                     SpectralOptions options, const Matrix<T>* b = nullptr) {
        SpectralLinear l(name, options);
        check(w.rows() > 0 && w.cols() > 0, name, "from_dense expects a non-empty weight, got ",
              shape_string(w.rows(), w.cols()));
        if (b) check_shape(*b, 1, w.rows(), name + ": from_dense bias");
        l.options_.bias = b != nullptr;
        l.assign_from_dense(w, b);
        return l;
    }

    Var<T> forward(Graph<T>& g, const Var<T>& x) {
        check(x.cols() == in_features(), name_, "expected input with ", in_features(), " features, got ",
              shape_string(x.value()));
        g.check_owned(x, "SpectralLinear");
        // Leaves first: the reverse walk must reach the node before the leaves it feeds.
        Node<T>* ua = g.param(U_active).node();
        Node<T>* va = g.param(V_active).node();
        Node<T>* uf = g.param(U_frozen).node();
        Node<T>* vf = g.param(V_frozen).node();
        Node<T>* sg = g.param(sigma).node();
        Node<T>* b = has_bias() ? g.param(bias).node() : nullptr;
        auto& n = g.template record<detail::SpectralLinearNode<T>>();
        n.x = x.node();
        n.ua = ua;
        n.va = va;
        n.uf = uf;
        n.vf = vf;
        n.sigma = sg;
        n.b = b;
        n.enhanced = options_.enhanced_gradient;
        return compute(g, n);
    }

    ParameterList<T> parameters() {
        ParameterList<T> out{&U_active, &V_active, &sigma, &U_frozen, &V_frozen};
        if (has_bias()) out.push_back(&bias);
        return out;
    }

    /// Makes the given positions (r distinct entries of [0, d)) the active block, moving as
    /// few columns as possible. Returns the positions whose contents changed, sorted: the
    /// first half are active slots q_1 < q_2 < ..., the second half the frozen positions
    /// p_1 < p_2 < ... they were swapped with (q_k <-> p_k). The optimizer state of those
    /// U_active/V_active columns (the q_k) and sigma entries (q_k and p_k) is stale.
    ///
    /// A swap is a change of basis made in place: when anything moved, the layout version
    /// of U, V and sigma changes, so the optimizer refuses to step until it has been told
    /// how the state follows (carry_state; the SST policy does this).
    std::vector<Index> activate(const std::vector<Index>& chosen) {
        const Index r = active_rank(), d = full_rank();
        check(static_cast<Index>(chosen.size()) == r, name_, "activate expects ", r, " positions, got ",
              chosen.size());
        std::vector<char> wanted(static_cast<std::size_t>(d), 0);
        for (const Index p : chosen) {
            check(p >= 0 && p < d, name_, "activate: position must be in [0, ", d, "), got ", p);
            check(!wanted[static_cast<std::size_t>(p)], name_, "activate: position ", p, " given twice");
            wanted[static_cast<std::size_t>(p)] = 1;
        }
        std::vector<Index> changed;
        Index free_slot = 0;  // next active position that is not wanted
        for (Index p = r; p < d; ++p) {
            if (!wanted[static_cast<std::size_t>(p)]) continue;
            while (wanted[static_cast<std::size_t>(free_slot)]) ++free_slot;
            const Index q = free_slot++;
            U_active.value.col(q).swap(U_frozen.value.col(p - r));
            V_active.value.col(q).swap(V_frozen.value.col(p - r));
            std::swap(sigma.value(0, q), sigma.value(0, p));
            changed.push_back(q);
            changed.push_back(p);
        }
        // Every q is below r and every p at least r, and both were visited in increasing
        // order: sorting puts the q's first, each at the index of its partner p minus half.
        std::sort(changed.begin(), changed.end());
        if (!changed.empty())
            for (Parameter<T>* p : {&U_active, &V_active, &sigma, &U_frozen, &V_frozen}) p->bump_layout();
        return changed;
    }

    /// Rescales every active u_i and v_i to unit length (SST, after each step).
    void renormalize_active() {
        for (Index j = 0; j < active_rank(); ++j) {
            const T nu = U_active.value.col(j).norm(), nv = V_active.value.col(j).norm();
            if (nu > T(0)) U_active.value.col(j) /= nu;
            if (nv > T(0)) V_active.value.col(j) /= nv;
        }
    }

    /// sigma <- max(sigma, 0).
    void clamp_sigma() { sigma.value = sigma.value.cwiseMax(T(0)); }

    /// Decomposes U diag(sigma) V^T again: the function is unchanged (up to round-off),
    /// U and V are orthonormal again, sigma is sorted descending and the active block is
    /// the top r. Every parameter's layout changes: reset optimizer state.
    void resvd() {
        const Matrix<T> us = full_u() * sigma.value.row(0).asDiagonal();
        auto svd = linalg::product_svd<T>(us, full_v(), name_);
        set_spectrum(svd.U, svd.s, svd.V);
    }

    /// W = U diag(sigma) V^T as a dense (out x in) matrix (inspection and conversion only).
    Matrix<T> dense_weight() const { return full_u() * sigma.value.row(0).asDiagonal() * full_v().transpose(); }
    Matrix<T> full_u() const {
        Matrix<T> u(out_features(), full_rank());
        u << U_active.value, U_frozen.value;
        return u;
    }
    Matrix<T> full_v() const {
        Matrix<T> v(in_features(), full_rank());
        v << V_active.value, V_frozen.value;
        return v;
    }

    const std::string& name() const { return name_; }
    const SpectralOptions& options() const { return options_; }
    void set_enhanced_gradient(bool on) { options_.enhanced_gradient = on; }
    Index in_features() const { return V_active.rows(); }
    Index out_features() const { return U_active.rows(); }
    Index active_rank() const { return U_active.cols(); }
    Index full_rank() const { return sigma.cols(); }
    /// The rank of W: the number of positive singular values.
    Index rank() const { return (sigma.value.array() > T(0)).count(); }
    bool has_bias() const { return bias.size() > 0; }
    Index parameter_count() const {
        return U_active.size() + U_frozen.size() + V_active.size() + V_frozen.size() + sigma.size() + bias.size();
    }
    /// Scalars that receive gradients (and optimizer state): r (m + n) + d (+ m).
    Index trainable_count() const { return U_active.size() + V_active.size() + sigma.size() + bias.size(); }
    double flops_per_token() const {
        return 2.0 * static_cast<double>(full_rank()) * static_cast<double>(in_features() + out_features()) +
               static_cast<double>(full_rank()) + (has_bias() ? static_cast<double>(out_features()) : 0.0);
    }

    Parameter<T> U_active;  // (out x r)
    Parameter<T> V_active;  // (in x r)
    Parameter<T> sigma;     // (1 x d): active block first
    Parameter<T> U_frozen;  // (out x (d - r)), not trainable
    Parameter<T> V_frozen;  // (in x (d - r)), not trainable
    Parameter<T> bias;      // (1 x out); empty without bias

private:
    SpectralLinear(const std::string& name, SpectralOptions options) : name_(name), options_(options) {}

    void assign_from_dense(const ConstMatrixRef<T>& w, const Matrix<T>* b) {
        const Index d = std::min(w.rows(), w.cols());
        check(options_.rank >= 1 && options_.rank <= d, name_, "rank must be in [1, min(out, in) = ", d,
              "], got ", options_.rank);
        auto svd = linalg::thin_svd<T>(w, name_);
        set_spectrum(svd.U, svd.s, svd.V);
        if (b) bias = Parameter<T>(name_ + ".bias", *b);
    }

    void set_spectrum(const Matrix<T>& u, const Vector<T>& s, const Matrix<T>& v) {
        const Index r = options_.rank, d = s.size();
        set(U_active, ".U_active", u.leftCols(r), true);
        set(V_active, ".V_active", v.leftCols(r), true);
        set(U_frozen, ".U_frozen", u.rightCols(d - r), false);
        set(V_frozen, ".V_frozen", v.rightCols(d - r), false);
        set(sigma, ".sigma", s.transpose(), true);
    }

    void set(Parameter<T>& p, const char* suffix, const Matrix<T>& value, bool trainable) {
        if (p.name().empty()) p.set_name(name_ + suffix);
        p.trainable = trainable;
        p.set_value(value);
    }

    Var<T> compute(Graph<T>& g, detail::SpectralLinearNode<T>& n) {
        const auto& x = *n.x->value;
        const Index r = active_rank(), f = U_frozen.cols(), d = r + f;
        detail::ensure_shape(n.xv, x.rows(), d);
        n.xv.leftCols(r).noalias() = x * V_active.value;
        if (f > 0) n.xv.rightCols(f).noalias() = x * V_frozen.value;
        detail::ensure_shape(n.xvs, x.rows(), d);
        n.xvs = n.xv.array().rowwise() * sigma.value.row(0).array();
        detail::ensure_shape(n.out, x.rows(), out_features());
        if (n.b)
            n.out.rowwise() = bias.value.row(0);  // the products accumulate onto the bias
        else
            n.out.setZero();
        n.out.noalias() += n.xvs.leftCols(r) * U_active.value.transpose();
        if (f > 0) n.out.noalias() += n.xvs.rightCols(f) * U_frozen.value.transpose();
        n.requires_grad = g.grad_enabled() && (n.x->requires_grad || n.ua->requires_grad ||
                                               n.va->requires_grad || n.sigma->requires_grad ||
                                               (n.b && n.b->requires_grad));
        return Var<T>(&n);
    }

    std::string name_;
    SpectralOptions options_;
};

}  // namespace lowrank
