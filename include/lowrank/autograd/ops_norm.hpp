#pragma once
// LayerNorm over the last dimension and embedding lookup. Derivations:
// docs/derivations/layer_norm.md and docs/derivations/embedding.md.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/core/parallel.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace lowrank {

namespace detail {

template <class T>
struct LayerNormNode final : Node<T> {
    Node<T>* x = nullptr;
    Node<T>* gamma = nullptr;  // (1 x C)
    Node<T>* beta = nullptr;   // (1 x C) or null
    Matrix<T> xhat;            // normalised input, kept for backward
    Vector<T> rstd;            // 1 / sqrt(var + eps) per row
    void backward() override {
        const auto& dy = this->dout;
        const Index rows = xhat.rows(), cols = xhat.cols();
        const auto& gv = *gamma->value;
        if (x->requires_grad) {
            auto& dx = *x->grad;
            parallel_for(rows, cols, [&](Index i) {
                // dxhat = dy * gamma; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
                T mean_d = 0, mean_dx = 0;
                for (Index j = 0; j < cols; ++j) {
                    const T d = dy(i, j) * gv(0, j);
                    mean_d += d;
                    mean_dx += d * xhat(i, j);
                }
                mean_d /= static_cast<T>(cols);
                mean_dx /= static_cast<T>(cols);
                for (Index j = 0; j < cols; ++j)
                    dx(i, j) += rstd(i) * (dy(i, j) * gv(0, j) - mean_d - xhat(i, j) * mean_dx);
            });
        }
        if (gamma->requires_grad) add_column_sums(*gamma->grad, dy.cwiseProduct(xhat));
        if (beta && beta->requires_grad) add_column_sums(*beta->grad, dy);
    }
};

template <class T>
struct EmbeddingNode final : Node<T> {
    Node<T>* table = nullptr;  // (V x C)
    std::vector<std::int32_t> ids;
    void backward() override {
        // Serial over rows: two rows with the same id write the same gradient row, and a
        // fixed order keeps the sum bit-for-bit reproducible.
        auto& dw = *table->grad;
        for (std::size_t i = 0; i < ids.size(); ++i) dw.row(ids[i]) += this->dout.row(static_cast<Index>(i));
    }
};

}  // namespace detail

/// LayerNorm over each row: (x - mean) / sqrt(var + eps) * gamma + beta, with the biased
/// variance (as PyTorch). gamma and beta are (1 x C); pass `{}` for no beta.
template <class T>
Var<T> layer_norm(Graph<T>& g, const Var<T>& x, const Var<T>& gamma, const Var<T>& beta = {},
                  double eps = 1e-5) {
    g.check_owned(x, "layer_norm");
    g.check_owned(gamma, "layer_norm");
    check(eps > 0, "layer_norm", "expected eps > 0, got ", eps);
    const Index rows = x.rows(), cols = x.cols();
    check_shape(gamma.value(), 1, cols, "layer_norm: gamma");
    auto& n = g.template record<detail::LayerNormNode<T>>();
    n.x = x.node();
    n.gamma = gamma.node();
    n.beta = nullptr;
    bool needs_grad = g.any_requires_grad(x, gamma);
    if (beta.valid()) {
        g.check_owned(beta, "layer_norm");
        check_shape(beta.value(), 1, cols, "layer_norm: beta");
        n.beta = beta.node();
        needs_grad = needs_grad || g.any_requires_grad(beta);
    }
    detail::ensure_shape(n.out, rows, cols);
    detail::ensure_shape(n.xhat, rows, cols);
    if (n.rstd.size() != rows) n.rstd.resize(rows);
    const auto& xv = x.value();
    const auto& gv = gamma.value();
    const T teps = static_cast<T>(eps);
    detail::parallel_for(rows, cols, [&](Index i) {
        const T mu = xv.row(i).mean();
        const T var = (xv.row(i).array() - mu).square().mean();
        const T rs = T(1) / std::sqrt(var + teps);
        n.rstd(i) = rs;
        n.xhat.row(i).array() = (xv.row(i).array() - mu) * rs;
        n.out.row(i).array() = n.xhat.row(i).array() * gv.row(0).array();
        if (n.beta) n.out.row(i) += n.beta->value->row(0);
    });
    n.requires_grad = needs_grad;
    return Var<T>(&n);
}

/// Rows `ids` of the table (V x C): an (ids.size() x C) matrix.
template <class T>
Var<T> embedding(Graph<T>& g, const Var<T>& table, std::span<const std::int32_t> ids) {
    g.check_owned(table, "embedding");
    const Index vocab = table.rows(), cols = table.cols();
    auto& n = g.template record<detail::EmbeddingNode<T>>();
    n.table = table.node();
    n.ids.resize(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
        check(ids[i] >= 0 && ids[i] < vocab, "embedding", "id at position ", i, " must be in [0, ", vocab,
              "), got ", ids[i]);
        n.ids[i] = ids[i];
    }
    detail::ensure_shape(n.out, static_cast<Index>(ids.size()), cols);
    const auto& tv = table.value();
    detail::parallel_for(static_cast<Index>(ids.size()), cols,
                         [&](Index i) { n.out.row(i) = tv.row(n.ids[static_cast<std::size_t>(i)]); });
    n.requires_grad = g.any_requires_grad(table);
    return Var<T>(&n);
}

template <class T>
Var<T> embedding(Graph<T>& g, const Var<T>& table, const std::vector<std::int32_t>& ids) {
    return embedding(g, table, std::span<const std::int32_t>(ids));
}

}  // namespace lowrank
