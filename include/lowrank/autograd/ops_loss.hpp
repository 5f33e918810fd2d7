#pragma once
// Losses: fused softmax-cross-entropy (mean over rows, optional ignore index) and mean
// squared error. Derivations: docs/derivations/losses.md.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_activation.hpp>
#include <lowrank/core/parallel.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

namespace lowrank {

/// Targets equal to this are skipped by cross_entropy (PyTorch's default).
inline constexpr std::int32_t kIgnoreIndex = -100;

namespace detail {

/// Copies the targets of a cross-entropy over `classes` classes into `out`, ignored ones
/// (equal to `ignore_index`) as -1, and returns how many are counted; a target outside
/// [0, classes) that is not the ignore index is an error naming `op`, the row and the value.
inline Index copy_targets(std::span<const std::int32_t> targets, Index classes, std::int32_t ignore_index,
                          std::vector<std::int32_t>& out, const char* op) {
    out.resize(targets.size());
    Index counted = 0;
    for (std::size_t i = 0; i < targets.size(); ++i) {
        const std::int32_t t = targets[i];
        if (t == ignore_index) {
            out[i] = -1;
            continue;
        }
        check(t >= 0 && t < classes, op, "target at row ", i, " must be in [0, ", classes, ") or the ignore index ",
              ignore_index, ", got ", t);
        out[i] = t;
        ++counted;
    }
    return counted;
}

template <class T>
struct CrossEntropyNode final : Node<T> {
    Node<T>* logits = nullptr;
    Matrix<T> probs;  // softmax of the logits, kept for backward
    std::vector<std::int32_t> targets;
    Index counted = 0;
    void backward() override {
        if (counted == 0) return;
        const T s = this->dout(0, 0) / static_cast<T>(counted);
        auto& dx = *logits->grad;
        parallel_for(probs.rows(), probs.cols(), [&](Index i) {
            const std::int32_t t = targets[static_cast<std::size_t>(i)];
            if (t < 0) return;  // ignored row
            dx.row(i) += s * probs.row(i);
            dx(i, t) -= s;
        });
    }
};

template <class T>
struct MseNode final : Node<T> {
    Node<T>* pred = nullptr;
    Matrix<T> diff;  // pred - target
    void backward() override {
        const T s = this->dout(0, 0) * T(2) / static_cast<T>(diff.size());
        *pred->grad += s * diff;
    }
};

}  // namespace detail

/// Mean over rows of -log softmax(logits)[row, target[row]]; rows whose target equals
/// `ignore_index` are skipped (and not counted in the mean). If every row is ignored the
/// loss is 0 with zero gradient.
template <class T>
Var<T> cross_entropy(Graph<T>& g, const Var<T>& logits, std::span<const std::int32_t> targets,
                     std::int32_t ignore_index = kIgnoreIndex) {
    g.check_owned(logits, "cross_entropy");
    const Index rows = logits.rows(), classes = logits.cols();
    check(static_cast<Index>(targets.size()) == rows, "cross_entropy", "expected ", rows,
          " targets (one per row of the logits), got ", targets.size());
    auto& n = g.template record<detail::CrossEntropyNode<T>>();
    n.logits = logits.node();
    n.counted = detail::copy_targets(targets, classes, ignore_index, n.targets, "cross_entropy");
    detail::ensure_shape(n.probs, rows, classes);
    detail::softmax_rows<T>(logits.value(), n.probs);
    // The loss from the log-sum-exp, not from log(probs): exact even when a probability
    // underflows. Summed serially in double so the result does not depend on threads.
    double total = 0.0;
    const auto& z = logits.value();
    for (Index i = 0; i < rows; ++i) {
        const std::int32_t t = n.targets[static_cast<std::size_t>(i)];
        if (t < 0) continue;
        const T m = z.row(i).maxCoeff();
        const T lse = m + std::log((z.row(i).array() - m).exp().sum());
        total += static_cast<double>(lse - z(i, t));
    }
    detail::ensure_shape(n.out, 1, 1);
    n.out(0, 0) = n.counted > 0 ? static_cast<T>(total / static_cast<double>(n.counted)) : T(0);
    n.requires_grad = g.any_requires_grad(logits);
    return Var<T>(&n);
}

template <class T>
Var<T> cross_entropy(Graph<T>& g, const Var<T>& logits, const std::vector<std::int32_t>& targets,
                     std::int32_t ignore_index = kIgnoreIndex) {
    return cross_entropy(g, logits, std::span<const std::int32_t>(targets), ignore_index);
}

/// Mean over all entries of (pred - target)^2. The target is not deduced (type_identity), so
/// any Eigen matrix converts to the Ref and T comes from the graph.
template <class T>
Var<T> mse(Graph<T>& g, const Var<T>& pred, const std::type_identity_t<ConstMatrixRef<T>>& target) {
    g.check_owned(pred, "mse");
    check_shape(target, pred.rows(), pred.cols(), "mse: target");
    check(pred.value().size() > 0, "mse", "expected a non-empty prediction, got ", shape_string(pred.value()));
    auto& n = g.template record<detail::MseNode<T>>();
    n.pred = pred.node();
    detail::ensure_shape(n.diff, pred.rows(), pred.cols());
    n.diff = pred.value() - target;
    detail::ensure_shape(n.out, 1, 1);
    n.out(0, 0) = n.diff.squaredNorm() / static_cast<T>(n.diff.size());
    n.requires_grad = g.any_requires_grad(pred);
    return Var<T>(&n);
}

/// Index of the largest entry of each row (predicted classes).
template <class T>
std::vector<std::int32_t> argmax_rows(const Matrix<T>& m) {
    std::vector<std::int32_t> out(static_cast<std::size_t>(m.rows()));
    for (Index i = 0; i < m.rows(); ++i) {
        Index j = 0;
        m.row(i).maxCoeff(&j);
        out[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(j);
    }
    return out;
}

}  // namespace lowrank
