#pragma once
// y = x * (W0 + s * U * V^T)^T + b: a rank-r linear layer with an optional frozen base
// W0 (LoRA, ReLoRA) and scale s (LoRA's alpha / r). Derivation:
// docs/derivations/low_rank_linear.md.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/parallel.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/linalg/thin_gemm.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lowrank {

/// How the factors start.
enum class LowRankInit {
    spectral,  // truncated SVD (balanced split) of a PyTorch-default dense init: U V^T is
               // the best rank-r approximation of a dense layer's starting weight
    lora,      // U = 0, V uniform +-1/sqrt(in) (LoRA / PEFT): the product starts at zero
};

struct LowRankOptions {
    Index rank = 8;
    bool bias = true;
    bool base = false;    // hold a frozen dense W0 (initialised like a dense layer)
    double scale = 1.0;   // s in W0 + s U V^T; LoRA uses alpha / r
    LowRankInit init = LowRankInit::spectral;
};

namespace detail {

/// Ranks up to this use the one-pass (token-tiled) backward; see LowRankLinearNode.
/// 0 disables it (benchmarks compare both paths). Not thread-safe to change mid-step.
inline Index& low_rank_one_pass_max_rank() {
    static Index limit = 32;
    return limit;
}

/// The fused node. Forward keeps xv = x V (N x r) for backward so that every product
/// costs O(N r (m + n)); the dense m x n weight is never formed. Every product with a
/// factor goes through the kernels of linalg/thin_gemm.hpp (gemm_narrow for the N x r
/// results, gemm_nn for the N x m and N x n ones, gemm_tn for dU and dV), which read the
/// activations in place instead of packing them; the factors are transposed once per step,
/// in forward, into ut, vt (r x m, r x n) so that each product reads rows.
///
/// Backward has two paths with the same arithmetic. At larger r it is four whole-matrix
/// products. At small r those are bound by memory traffic (each streams an N x m or N x n
/// matrix for only 2r FLOPs per element) and the plain composition reads dy twice and x
/// once more; the one-pass path walks the tokens in tiles that stay in cache and does all
/// four products and the bias gradient per tile, so dy and x are read once. Tiles are split
/// statically over threads and the per-thread dU, dV, db partial sums are added in thread
/// order: results are reproducible for a given thread count.
template <class T>
struct LowRankLinearNode final : Node<T> {
    Node<T>* x = nullptr;   // (N x n)
    Node<T>* u = nullptr;   // (m x r)
    Node<T>* v = nullptr;   // (n x r)
    Node<T>* w0 = nullptr;  // (m x n) or null
    Node<T>* b = nullptr;   // (1 x m) or null
    T scale = T(1);
    Index k = 0;    // active columns of U and V (all of them unless the layer has capacity)
    Matrix<T> xv;   // x V
    Matrix<T> dxv;  // s dy U, the gradient reaching x V
    Matrix<T> ut, vt;  // the active U^T (r x m) and V^T (r x n), transposed in forward
    Matrix<T> dut, dvt;  // dU^T, dV^T before they are added to the gradients (whole-matrix path,
                         // r not a whole number of packets)
    std::vector<Matrix<T>> du_part, dv_part, db_part;  // per-thread partial sums (one-pass path),
                                                       // dU^T and dV^T

    static constexpr Index kTile = 256;  // tokens per tile (docs/performance.md, "Thin products")

    void backward() override {
        // One pass needs at least two tiles, and a tile per thread: the products inside a
        // tile do not fork again.
        const Index tiles = (this->dout.rows() + kTile - 1) / kTile;
        const bool one_pass =
            k <= low_rank_one_pass_max_rank() && this->dout.rows() >= 2 * kTile && tiles >= available_threads();
        if (one_pass) {
            backward_one_pass();  // includes the bias gradient, tile by tile
        } else {
            backward_gemm();
            if (b && b->requires_grad) add_column_sums(*b->grad, this->dout);
        }
        if (w0 && w0->requires_grad) w0->grad->noalias() += this->dout.transpose() * *x->value;
    }

    void backward_gemm() {
        const auto& dy = this->dout;
        const bool need_dxv = x->requires_grad || v->requires_grad;
        if (need_dxv) {
            ensure_shape(dxv, dy.rows(), k);
            linalg::gemm_narrow<T>(dxv, dy, u->value->leftCols(k), ut, scale, false);
        }
        // dU = s dy^T (x V) and dV = x^T dxv go straight into the gradients (m x r, n x r)
        // where r fills whole SIMD packets: with m or n rows of C and the activation as A,
        // the kernel gathers the activation's rows once per 16 row tiles. With r x m rows of
        // C (dU^T) it reads dy in place, rows 4 KiB apart, and ran 0.95 / 0.87 / 0.85x as
        // fast at r 64 / 128 / 256 on an AVX-512 Xeon (docs/performance.md, "Thin
        // products"). Any other r takes dU^T and dV^T, whose columns (m, n) fill packets.
        const bool direct = k % linalg::detail::kPacket<T> == 0;
        if (u->requires_grad) {
            if (direct) {
                linalg::gemm_tn<T>(u->grad->leftCols(k), dy, xv, scale, true);
            } else {
                ensure_shape(dut, k, dy.cols());
                linalg::gemm_tn<T>(dut, xv, dy, scale, false);
                u->grad->leftCols(k) += dut.transpose();
            }
        }
        if (v->requires_grad) {
            if (direct) {
                linalg::gemm_tn<T>(v->grad->leftCols(k), *x->value, dxv, T(1), true);
            } else {
                ensure_shape(dvt, k, x->value->cols());
                linalg::gemm_tn<T>(dvt, dxv, *x->value, T(1), false);
                v->grad->leftCols(k) += dvt.transpose();
            }
        }
        if (x->requires_grad) {
            linalg::gemm_nn<T>(*x->grad, dxv, vt, T(1), true);
            if (w0) x->grad->noalias() += dy * *w0->value;
        }
    }

    void backward_one_pass() {
        const auto& dy = this->dout;
        const auto& xval = *x->value;
        const Index n_tok = dy.rows(), tiles = (n_tok + kTile - 1) / kTile;
        const auto uk = u->value->leftCols(k);
        const bool need_u = u->requires_grad, need_v = v->requires_grad, need_x = x->requires_grad;
        const bool need_b = b != nullptr && b->requires_grad;
        ensure_shape(dxv, n_tok, k);
        const int threads = static_cast<int>(std::min<Index>(available_threads(), tiles));
        if (static_cast<int>(du_part.size()) < threads) {
            du_part.resize(static_cast<std::size_t>(threads));
            dv_part.resize(static_cast<std::size_t>(threads));
            db_part.resize(static_cast<std::size_t>(threads));
        }
        auto work = [&](int t) {
            auto& du = du_part[static_cast<std::size_t>(t)];
            auto& dv = dv_part[static_cast<std::size_t>(t)];
            auto& db = db_part[static_cast<std::size_t>(t)];
            if (need_u) du.setZero(k, uk.rows());
            if (need_v) dv.setZero(k, xval.cols());
            if (need_b) db.setZero(1, dy.cols());
            const Index first = tiles * t / threads, last = tiles * (t + 1) / threads;
            for (Index tile = first; tile < last; ++tile) {
                const Index row = tile * kTile, len = std::min(kTile, n_tok - row);
                const auto dy_t = dy.middleRows(row, len);
                auto dxv_t = dxv.middleRows(row, len);
                if (need_b) add_column_sums(db, dy_t);  // while the tile of dy is in cache
                linalg::gemm_narrow<T>(dxv_t, dy_t, uk, ut, scale, false);
                if (need_u) linalg::gemm_tn<T>(du, xv.middleRows(row, len), dy_t, scale, true);
                if (need_v) linalg::gemm_tn<T>(dv, dxv_t, xval.middleRows(row, len), T(1), true);
                if (need_x) {
                    auto dx_t = x->grad->middleRows(row, len);
                    linalg::gemm_nn<T>(dx_t, dxv_t, vt, T(1), true);
                    if (w0) dx_t.noalias() += dy_t * *w0->value;
                }
            }
        };
#ifdef _OPENMP
        if (threads > 1) {
            // The team may be smaller than asked (OMP_DYNAMIC, a thread limit): its threads
            // then share the parts, each part still done whole by one thread.
#pragma omp parallel num_threads(threads)
            for (int t = omp_get_thread_num(); t < threads; t += omp_get_num_threads()) work(t);
        } else {
            work(0);
        }
#else
        work(0);
#endif
        for (int t = 0; t < threads; ++t) {
            if (need_u) u->grad->leftCols(k) += du_part[static_cast<std::size_t>(t)].transpose();
            if (need_v) v->grad->leftCols(k) += dv_part[static_cast<std::size_t>(t)].transpose();
            if (need_b) *b->grad += db_part[static_cast<std::size_t>(t)];
        }
    }
};

}  // namespace detail

/// The fused op: x (N x n), U (m x r), V (n x r), optional W0 (m x n) and b (1 x m). With
/// `active` >= 0 only the leading `active` columns of U and V take part (and get gradients).
template <class T>
Var<T> low_rank_linear(Graph<T>& g, const Var<T>& x, const Var<T>& u, const Var<T>& v, T scale,
                       const Var<T>& w0 = {}, const Var<T>& b = {}, Index active = -1) {
    g.check_owned(x, "low_rank_linear");
    g.check_owned(u, "low_rank_linear");
    g.check_owned(v, "low_rank_linear");
    check(u.cols() == v.cols(), "low_rank_linear", "U ", shape_string(u.value()), " and V ",
          shape_string(v.value()), " must have the same rank (columns)");
    check(x.cols() == v.rows(), "low_rank_linear", "input has ", x.cols(), " features but V ",
          shape_string(v.value()), " expects ", v.rows());
    auto& n = g.template record<detail::LowRankLinearNode<T>>();
    n.x = x.node();
    n.u = u.node();
    n.v = v.node();
    n.w0 = nullptr;
    n.b = nullptr;
    n.scale = scale;
    check(active <= u.cols(), "low_rank_linear", "active columns ", active, " exceed the factors' ", u.cols());
    n.k = active < 0 ? u.cols() : active;
    bool needs_grad = g.any_requires_grad(x, u, v);
    detail::ensure_shape(n.ut, n.k, u.rows());
    n.ut = u.value().leftCols(n.k).transpose();
    detail::ensure_shape(n.vt, n.k, v.rows());
    n.vt = v.value().leftCols(n.k).transpose();
    detail::ensure_shape(n.xv, x.rows(), n.k);
    linalg::gemm_narrow<T>(n.xv, x.value(), v.value().leftCols(n.k), n.vt, T(1), false);
    if (w0.valid()) {
        g.check_owned(w0, "low_rank_linear");
        check_shape(w0.value(), u.rows(), v.rows(), "low_rank_linear: base W0");
        n.w0 = w0.node();
        needs_grad = needs_grad || g.any_requires_grad(w0);
    }
    if (b.valid()) {
        g.check_owned(b, "low_rank_linear");
        check_shape(b.value(), 1, u.rows(), "low_rank_linear: bias");
        n.b = b.node();
        needs_grad = needs_grad || g.any_requires_grad(b);
    }
    // The output starts as the bias (or zero) and the products accumulate into it: one
    // pass over the N x m output fewer than assigning the product and adding b after.
    detail::ensure_shape(n.out, x.rows(), u.rows());
    if (n.b)
        n.out.rowwise() = b.value().row(0);
    else
        n.out.setZero();
    linalg::gemm_nn<T>(n.out, n.xv, n.ut, scale, true);
    if (n.w0) n.out.noalias() += x.value() * w0.value().transpose();
    n.requires_grad = needs_grad;
    return Var<T>(&n);
}

/// A rank-r linear layer, W = (W0) + s U V^T, U (out x r), V (in x r).
template <class T>
class LowRankLinear {
public:
    LowRankLinear(const std::string& name, Index in, Index out, Rng& rng, LowRankOptions options = {})
        : name_(name), options_(options) {
        check(in > 0 && out > 0, name, "expected positive in and out features, got in = ", in,
              ", out = ", out);
        check_rank(options.rank, in, out);
        check(std::isfinite(options.scale), name, "scale must be finite, got ", options.scale);
        Matrix<T> dense(out, in);
        init::linear_default<T>(dense, rng, in);
        if (options.base) base = Parameter<T>(name + ".base", dense, /*trainable=*/false);
        if (options.init == LowRankInit::lora) {
            U = Parameter<T>(name + ".U", Matrix<T>::Zero(out, options.rank));
            V = Parameter<T>(name + ".V", Matrix<T>(in, options.rank));
            init::linear_default<T>(V.value, rng, in);
        } else {
            auto f = linalg::truncated_svd<T>(dense, options.rank, name);
            U = Parameter<T>(name + ".U", std::move(f.U));
            V = Parameter<T>(name + ".V", std::move(f.V));
        }
        if (options.bias) {
            bias = Parameter<T>(name + ".bias", Matrix<T>(1, out));
            init::linear_default<T>(bias.value, rng, in);
        }
    }

    /// The best rank-r approximation of a dense weight (exact when r >= rank(W)), by
    /// truncated SVD with the balanced split; the bias, if given, is kept.
    static LowRankLinear from_dense(const std::string& name, const ConstMatrixRef<T>& w, Index r,
                                    const Matrix<T>* b = nullptr) {
        check(w.rows() > 0 && w.cols() > 0, name, "from_dense expects a non-empty weight, got ",
              shape_string(w.rows(), w.cols()));
        check_rank_named(name, r, w.cols(), w.rows());
        if (b) check_shape(*b, 1, w.rows(), name + ": from_dense bias");
        LowRankLinear l(name);
        auto f = linalg::truncated_svd<T>(w, r, name);
        l.options_ = LowRankOptions{.rank = r, .bias = b != nullptr};
        l.U = Parameter<T>(name + ".U", std::move(f.U));
        l.V = Parameter<T>(name + ".V", std::move(f.V));
        if (b) l.bias = Parameter<T>(name + ".bias", *b);
        return l;
    }

    /// The layer s U V^T (+ b) with the given factors U (out x r), V (in x r), no base: a
    /// factorised layer in its inference form (nn/merge.hpp) or factors read from a file.
    static LowRankLinear from_factors(const std::string& name, Matrix<T> u, Matrix<T> v, double scale = 1.0,
                                      const Matrix<T>* b = nullptr) {
        check(u.rows() > 0 && v.rows() > 0, name, "from_factors expects non-empty factors, got U ", shape_string(u),
              " and V ", shape_string(v));
        check(u.cols() == v.cols(), name, "from_factors expects U and V of the same rank (columns), got U ",
              shape_string(u), " and V ", shape_string(v));
        check_rank_named(name, u.cols(), v.rows(), u.rows());
        check(std::isfinite(scale), name, "scale must be finite, got ", scale);
        if (b) check_shape(*b, 1, u.rows(), name + ": from_factors bias");
        LowRankLinear l(name);
        l.options_ = LowRankOptions{.rank = u.cols(), .bias = b != nullptr, .scale = scale};
        l.U = Parameter<T>(name + ".U", std::move(u));
        l.V = Parameter<T>(name + ".V", std::move(v));
        if (b) l.bias = Parameter<T>(name + ".bias", *b);
        return l;
    }

    /// x (N x in) -> (N x out).
    Var<T> forward(Graph<T>& g, const Var<T>& x) {
        check(x.cols() == in_features(), name_, "expected input with ", in_features(), " features, got ",
              shape_string(x.value()));
        return low_rank_linear(g, x, g.param(U), g.param(V), static_cast<T>(options_.scale),
                               has_base() ? g.param(base) : Var<T>{}, has_bias() ? g.param(bias) : Var<T>{});
    }

    ParameterList<T> parameters() {
        ParameterList<T> out{&U, &V};
        if (has_base()) out.push_back(&base);
        if (has_bias()) out.push_back(&bias);
        return out;
    }

    const std::string& name() const { return name_; }
    const LowRankOptions& options() const { return options_; }
    Index in_features() const { return V.rows(); }
    Index out_features() const { return U.rows(); }
    Index rank() const { return U.cols(); }
    double scale() const { return options_.scale; }
    bool has_base() const { return base.size() > 0; }
    bool has_bias() const { return bias.size() > 0; }
    Index parameter_count() const { return U.size() + V.size() + base.size() + bias.size(); }
    Index trainable_count() const {
        Index n = 0;
        for (const auto* p : {&U, &V, &base, &bias})
            if (p->trainable) n += p->size();
        return n;
    }
    /// Forward FLOPs per token: x V, then (x V) U^T, plus the base product and the bias.
    double flops_per_token() const {
        const double m = static_cast<double>(out_features()), n = static_cast<double>(in_features()),
                     r = static_cast<double>(rank());
        return 2.0 * r * (m + n) + (has_base() ? 2.0 * m * n : 0.0) + (has_bias() ? m : 0.0);
    }
    /// W0 + s U V^T as a dense (out x in) matrix (for inspection and conversion only).
    Matrix<T> dense_weight() const {
        Matrix<T> w = static_cast<T>(options_.scale) * U.value * V.value.transpose();
        if (has_base()) w += base.value;
        return w;
    }

    Parameter<T> U;     // (out x r)
    Parameter<T> V;     // (in x r)
    Parameter<T> base;  // (out x in), frozen; empty without a base
    Parameter<T> bias;  // (1 x out); empty without bias

private:
    explicit LowRankLinear(const std::string& name) : name_(name) {}

    void check_rank(Index r, Index in, Index out) const { check_rank_named(name_, r, in, out); }
    static void check_rank_named(const std::string& name, Index r, Index in, Index out) {
        const Index d = std::min(in, out);
        check(r >= 1 && r <= d, name, "rank must be in [1, min(out, in) = ", d, "], got ", r);
    }

    std::string name_;
    LowRankOptions options_;
};

}  // namespace lowrank
