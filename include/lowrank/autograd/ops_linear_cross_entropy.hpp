#pragma once
// The LM head and its loss in one node: cross_entropy(linear(x, W, b), targets) computed a
// chunk of tokens at a time, so that the (N x V) logits, their probabilities and their
// gradient never exist whole; only a (chunk x V) block does. Derivation:
// docs/derivations/fused_linear_cross_entropy.md.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_loss.hpp>
#include <lowrank/core/parallel.hpp>
#include <lowrank/linalg/thin_gemm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

/// Rows of the transposed logits per block of the softmax statistics.
inline constexpr Index kLogitBlockRows = 1024;

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
    Matrix<T> block;  // one chunk's logits, transposed (V x chunk), then their softmax, then its gradient
    Matrix<T> xt;     // the chunk's input, transposed (C x chunk)
    Matrix<T> part_max, part_sum;  // per block of the vocabulary and token: the logits' maximum, sum of e
    Matrix<T> stats;  // per token of the chunk: maximum, sum of e, scale of the gradient
    std::vector<std::int32_t> targets;  // -1 for ignored rows
    std::vector<double> row_loss;       // lse - z_t per row, summed in row order
    Index counted = 0;
    void backward() override {
        if (counted == 0) return;
        const T s = this->dout(0, 0);
        // dW is the size of the vocabulary's embedding: split over threads.
        const auto add = [s](Matrix<T>& to, const Matrix<T>& unit) {
            T* out = to.data();
            const T* in = unit.data();
            for_each_block(unit.size(), [&](Index b, Index e) {
                for (Index i = b; i < e; ++i) out[i] += s * in[i];
            });
        };
        if (grad_x) add(*x->grad, dx_unit);
        if (grad_w) add(*w->grad, dw_unit);
        if (grad_b) add(*b->grad, db_unit);
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
    // The chunk's logits are held transposed, (V x chunk): column i is token r0 + i. Then
    // all three products are the shapes of linalg/thin_gemm.hpp, whose kernels broadcast W
    // or read it in place instead of packing all of it per chunk as a general GEMM does:
    // Z^T = W X^T (X^T, C x chunk, is the small packed operand), dX = (dZ^T)^T W and
    // dW += dZ^T X. X^T's columns are padded with zeros to whole SIMD packets, so that Z^T
    // has no column left to the kernels' slow path; the padding is never read back.
    const Index packet = linalg::detail::kPacket<T>;
    const Index padded = (chunk + packet - 1) / packet * packet;
    const Index features = xv.cols();
    detail::ensure_shape(node.block, vocab, padded);
    detail::ensure_shape(node.xt, features, padded);
    // The softmax statistics run over fixed blocks of the vocabulary (partial maxima and
    // sums combined in block order), so that they do not depend on the thread count.
    const Index vblocks = (vocab + detail::kLogitBlockRows - 1) / detail::kLogitBlockRows;
    detail::ensure_shape(node.part_max, vblocks, padded);
    detail::ensure_shape(node.part_sum, vblocks, padded);
    detail::ensure_shape(node.stats, 3, padded);  // max, sum, then the scale of each column
    node.row_loss.assign(static_cast<std::size_t>(n), 0.0);
    if (any_grad && node.grad_x) detail::ensure_shape(node.dx_unit, n, features);
    // The first chunk writes dW's and db's unit gradients, the others add to them.
    if (any_grad && node.grad_w) detail::ensure_shape(node.dw_unit, vocab, features);
    if (any_grad && node.grad_b) detail::ensure_shape(node.db_unit, 1, vocab);
    // The arithmetic of cross_entropy, token by token: s = 1 / M, P = e / sum(e) with
    // e = exp(z - max z), dZ = s P - s at the target.
    const T s = node.counted > 0 ? T(1) / static_cast<T>(node.counted) : T(0);
    const T* bias = node.b ? node.b->value->data() : nullptr;
    for (Index r0 = 0; r0 < n; r0 += chunk) {
        const Index rows = std::min(chunk, n - r0);
        const Index cols = (rows + packet - 1) / packet * packet;
        const auto xc = xv.middleRows(r0, rows);
        node.xt.leftCols(rows) = xc.transpose();
        if (cols > rows) node.xt.middleCols(rows, cols - rows).setZero();
        auto zt = node.block.leftCols(cols);
        linalg::gemm_nn<T>(zt, wv, node.xt.leftCols(cols), T(1), false);
        auto mx = node.stats.row(0).head(rows);
        auto sum = node.stats.row(1).head(rows);
        auto scale = node.stats.row(2).head(rows);
        // Pass 1: the bias, and each block's maximum of every column.
        detail::parallel_for(vblocks, detail::kLogitBlockRows * rows, [&](Index blk) {
            const Index v0 = blk * detail::kLogitBlockRows, v1 = std::min(vocab, v0 + detail::kLogitBlockRows);
            auto m = node.part_max.row(blk).head(rows);
            m.setConstant(-std::numeric_limits<T>::infinity());
            for (Index v = v0; v < v1; ++v) {
                auto zv = zt.row(v).head(rows);
                if (bias) zv.array() += bias[v];
                m = m.cwiseMax(zv);
            }
        });
        mx = node.part_max.row(0).head(rows);
        for (Index blk = 1; blk < vblocks; ++blk) mx = mx.cwiseMax(node.part_max.row(blk).head(rows));
        // The targets' logits, before pass 2 overwrites them.
        for (Index i = 0; i < rows; ++i) {
            const std::int32_t t = node.targets[static_cast<std::size_t>(r0 + i)];
            if (t >= 0) node.row_loss[static_cast<std::size_t>(r0 + i)] = -static_cast<double>(zt(t, i));
        }
        // Pass 2: e = exp(z - max) in place, and each block's sum of every column.
        detail::parallel_for(vblocks, detail::kLogitBlockRows * rows, [&](Index blk) {
            const Index v0 = blk * detail::kLogitBlockRows, v1 = std::min(vocab, v0 + detail::kLogitBlockRows);
            auto part = node.part_sum.row(blk).head(rows);
            part.setZero();
            for (Index v = v0; v < v1; ++v) {
                auto zv = zt.row(v).head(rows);
                zv.array() = (zv.array() - mx.array()).exp();
                part += zv;
            }
        });
        sum = node.part_sum.row(0).head(rows);
        for (Index blk = 1; blk < vblocks; ++blk) sum += node.part_sum.row(blk).head(rows);
        for (Index i = 0; i < rows; ++i) {
            const auto row = static_cast<std::size_t>(r0 + i);
            if (node.targets[row] < 0) {
                scale(i) = T(0);
                continue;
            }
            // From the log-sum-exp, not log(P): exact when the target's probability underflows.
            node.row_loss[row] += static_cast<double>(mx(i) + std::log(sum(i)));
            scale(i) = s / sum(i);
        }
        if (!any_grad) continue;
        // Pass 3: dZ = s P, minus s at each target. An ignored token's column is set to zero
        // outright: its scale of 0 would leave a NaN of overflowed logits in place.
        detail::parallel_for(vblocks, detail::kLogitBlockRows * rows, [&](Index blk) {
            const Index v0 = blk * detail::kLogitBlockRows, v1 = std::min(vocab, v0 + detail::kLogitBlockRows);
            for (Index v = v0; v < v1; ++v) zt.row(v).head(rows).array() *= scale.array();
        });
        for (Index i = 0; i < rows; ++i) {
            const std::int32_t t = node.targets[static_cast<std::size_t>(r0 + i)];
            if (t >= 0)
                zt(t, i) -= s;
            else
                zt.col(i).setZero();
        }
        const auto dz = node.block.leftCols(rows);
        if (node.grad_x) linalg::gemm_tn<T>(node.dx_unit.middleRows(r0, rows), dz, wv, T(1), false);
        if (node.grad_w) linalg::gemm_nn<T>(node.dw_unit, dz, xc, T(1), r0 > 0);
        if (node.grad_b) {
            if (r0 > 0)
                node.db_unit.row(0).transpose() += dz.rowwise().sum();
            else
                node.db_unit.row(0).transpose() = dz.rowwise().sum();
        }
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
