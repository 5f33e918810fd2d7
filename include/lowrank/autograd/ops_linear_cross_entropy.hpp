#pragma once
// The LM head and its loss in one node: cross_entropy(linear(x, W, b), targets) computed a
// chunk of tokens at a time, so that the (N x V) logits, their probabilities and their
// gradient never exist whole; only a (chunk x V) block does. Derivation:
// docs/derivations/fused_linear_cross_entropy.md.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_loss.hpp>
#include <lowrank/core/parallel.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace lowrank {

struct LinearCrossEntropyOptions {
    /// Targets equal to this are skipped and not counted in the mean, as in cross_entropy.
    std::int32_t ignore_index = kIgnoreIndex;
    /// Tokens per chunk: the node holds one (chunk_rows x V) block of logits. Each chunk's
    /// three products pass over all of W (two packings) and dW (a read and a write), so
    /// small chunks are slower; 128 rows of GPT-2's vocabulary in float (25.7 MB) still fit
    /// a 32 MB L3 (docs/performance.md, "Fused LM head").
    Index chunk_rows = 128;
};

namespace detail {

// The gradient does not wait for backward: the loss is linear in its output adjoint, so
// forward computes the gradients for an adjoint of 1 while a chunk's probabilities are at
// hand, and backward scales them. Recomputing the logits in backward instead would cost a
// fourth (N x C)(C x V) GEMM, a third more head work.
template <class T>
struct LinearCrossEntropyNode final : Node<T> {
    Node<T>* x = nullptr;  // (N x C)
    Node<T>* w = nullptr;  // (V x C)
    Node<T>* b = nullptr;  // (1 x V) or null
    bool grad_x = false, grad_w = false, grad_b = false;
    Matrix<T> dx_unit;  // dL/dx for dL = 1 (N x C)
    Matrix<T> dw_unit;  // dL/dW for dL = 1 (V x C)
    Matrix<T> db_unit;  // dL/db for dL = 1 (1 x V)
    Matrix<T> block;    // one chunk's logits, then their softmax, then its gradient
    std::vector<std::int32_t> targets;  // -1 for ignored rows
    std::vector<double> row_loss;       // lse - z_t per row, summed in row order
    Index counted = 0;
    void backward() override {
        if (counted == 0) return;
        const T s = this->dout(0, 0);
        if (grad_x) x->grad->noalias() += s * dx_unit;
        if (grad_w) w->grad->noalias() += s * dw_unit;
        if (grad_b) b->grad->noalias() += s * db_unit;
    }
};

}  // namespace detail

/// cross_entropy(g, linear(g, x, w, b), targets, options.ignore_index) without its (N x V)
/// logits: x (N x C), W (V x C), b (1 x V) or an invalid Var (`{}`) for no bias, targets N
/// ids in [0, V) or the ignore index. The mean over the counted rows, 0 with zero gradient
/// if every row is ignored. Equal to the composition within rounding (the head GEMM is
/// blocked differently); for logits themselves (sampling, evaluation) use linear.
template <class T>
Var<T> linear_cross_entropy(Graph<T>& g, const Var<T>& x, const Var<T>& w, const Var<T>& b,
                            std::span<const std::int32_t> targets, const LinearCrossEntropyOptions& options = {}) {
    const char* op = "linear_cross_entropy";
    g.check_owned(x, op);
    g.check_owned(w, op);
    check(x.cols() == w.cols(), op, "input has ", x.cols(), " features but the weight ", shape_string(w.value()),
          " expects ", w.cols());
    check(options.chunk_rows > 0, op, "expected chunk_rows > 0, got ", options.chunk_rows);
    const Index n = x.rows(), vocab = w.rows();
    check(static_cast<Index>(targets.size()) == n, op, "expected ", n, " targets (one per row of the input), got ",
          targets.size());
    auto& node = g.template record<detail::LinearCrossEntropyNode<T>>();
    node.x = x.node();
    node.w = w.node();
    node.b = nullptr;
    if (b.valid()) {
        g.check_owned(b, op);
        check_shape(b.value(), 1, vocab, "linear_cross_entropy: bias");
        node.b = b.node();
    }
    node.counted = detail::copy_targets(targets, vocab, options.ignore_index, node.targets, op);
    node.grad_x = g.any_requires_grad(x);
    node.grad_w = g.any_requires_grad(w);
    node.grad_b = node.b != nullptr && g.any_requires_grad(b);
    const bool any_grad = node.counted > 0 && (node.grad_x || node.grad_w || node.grad_b);

    const auto& xv = x.value();
    const auto& wv = w.value();
    const Index chunk = std::max<Index>(1, std::min(options.chunk_rows, n));
    detail::ensure_shape(node.block, chunk, vocab);
    node.row_loss.assign(static_cast<std::size_t>(n), 0.0);
    if (any_grad && node.grad_x) detail::ensure_shape(node.dx_unit, n, xv.cols());
    if (any_grad && node.grad_w) {
        detail::ensure_shape(node.dw_unit, vocab, xv.cols());
        node.dw_unit.setZero();
    }
    if (any_grad && node.grad_b) {
        detail::ensure_shape(node.db_unit, 1, vocab);
        node.db_unit.setZero();
    }
    // The same arithmetic as cross_entropy's, row by row: s = 1 / M, P = e / sum(e) with
    // e = exp(z - max z), dZ = s P - s at the target.
    const T s = node.counted > 0 ? T(1) / static_cast<T>(node.counted) : T(0);
    for (Index r0 = 0; r0 < n; r0 += chunk) {
        const Index rows = std::min(chunk, n - r0);
        auto z = node.block.topRows(rows);
        const auto xc = xv.middleRows(r0, rows);
        if (node.b) {
            z.rowwise() = node.b->value->row(0);
            z.noalias() += xc * wv.transpose();
        } else {
            z.noalias() = xc * wv.transpose();
        }
        // Rows are independent: splitting them over threads changes no sum.
        detail::parallel_for(rows, vocab, [&](Index i) {
            const auto row = static_cast<std::size_t>(r0 + i);
            const std::int32_t t = node.targets[row];
            auto zi = z.row(i);
            if (t < 0) {
                if (any_grad) zi.setZero();
                return;
            }
            const T m = zi.maxCoeff();
            const T zt = zi(t);
            zi.array() = (zi.array() - m).exp();
            const T sum = zi.sum();
            // From the log-sum-exp, not log(P): exact when the target's probability underflows.
            node.row_loss[row] = static_cast<double>(m + std::log(sum) - zt);
            if (!any_grad) return;
            zi /= sum;
            zi *= s;
            zi(t) -= s;
        });
        if (!any_grad) continue;
        if (node.grad_x) node.dx_unit.middleRows(r0, rows).noalias() = z * wv;
        if (node.grad_w) node.dw_unit.noalias() += z.transpose() * xc;
        if (node.grad_b) detail::add_column_sums(node.db_unit, z);
    }
    // Summed serially in double, as cross_entropy: the loss does not depend on threads.
    double total = 0.0;
    for (const double l : node.row_loss) total += l;
    detail::ensure_shape(node.out, 1, 1);
    node.out(0, 0) = node.counted > 0 ? static_cast<T>(total / static_cast<double>(node.counted)) : T(0);
    node.requires_grad = node.grad_x || node.grad_w || node.grad_b;
    return Var<T>(&node);
}

/// linear_cross_entropy without a bias.
template <class T>
Var<T> linear_cross_entropy(Graph<T>& g, const Var<T>& x, const Var<T>& w, std::span<const std::int32_t> targets,
                            const LinearCrossEntropyOptions& options = {}) {
    return linear_cross_entropy(g, x, w, Var<T>{}, targets, options);
}

}  // namespace lowrank
