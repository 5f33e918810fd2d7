#pragma once
// Evaluating a classifier (mean cross-entropy and accuracy) over a data set in batches,
// on a graph of its own with gradients and dropout off, so evaluation never disturbs the
// training graph's buffers and records nothing for backward.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_activation.hpp>  // ops_loss.hpp uses its softmax_rows
#include <lowrank/autograd/ops_loss.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/types.hpp>

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>
#include <vector>

namespace lowrank {

struct EvalResult {
    double loss = 0.0;      // mean cross-entropy over the samples
    double accuracy = 0.0;  // fraction of samples whose largest logit is the label
    Index correct = 0;
    Index samples = 0;
};

/// Anything with `Var<T> forward(Graph<T>&, const Var<T>&)` returning logits.
template <class M, class T>
concept Classifier = requires(M& m, Graph<T>& g, const Var<T>& x) {
    { m.forward(g, x) } -> std::convertible_to<Var<T>>;
};

/// Keeps its graph between calls, so evaluating every epoch reuses the same buffers.
template <class T>
class ClassifierEvaluator {
public:
    explicit ClassifierEvaluator(Index batch_size = 1000) : batch_size_(batch_size) {
        check(batch_size >= 1, "ClassifierEvaluator", "expected batch_size >= 1, got ", batch_size);
        graph_.set_grad_enabled(false);
        graph_.set_training(false);
    }

    /// Loss and accuracy of `model` on rows of x (N x features) with labels y (N).
    template <class M>
        requires Classifier<M, T>
    EvalResult operator()(M& model, const ConstMatrixRef<T>& x, std::span<const std::int32_t> y) {
        check(static_cast<Index>(y.size()) == x.rows(), "evaluate", "expected ", x.rows(),
              " labels (one per row of the inputs), got ", y.size());
        EvalResult r;
        double loss_sum = 0.0;
        for (Index begin = 0; begin < x.rows(); begin += batch_size_) {
            const Index k = std::min(batch_size_, x.rows() - begin);
            const auto labels = y.subspan(static_cast<std::size_t>(begin), static_cast<std::size_t>(k));
            graph_.clear();
            const Var<T> logits = model.forward(graph_, graph_.input(x.middleRows(begin, k)));
            check(logits.rows() == k, "evaluate", "expected the model to return ", k, " rows of logits, got ",
                  shape_string(logits.value()));
            const Var<T> loss = cross_entropy(graph_, logits, labels);
            loss_sum += static_cast<double>(loss.item()) * static_cast<double>(k);
            const Matrix<T>& z = logits.value();
            for (Index i = 0; i < k; ++i) {
                Index best = 0;
                z.row(i).maxCoeff(&best);
                if (best == labels[static_cast<std::size_t>(i)]) ++r.correct;
            }
        }
        r.samples = x.rows();
        if (r.samples > 0) {
            r.loss = loss_sum / static_cast<double>(r.samples);
            r.accuracy = static_cast<double>(r.correct) / static_cast<double>(r.samples);
        }
        return r;
    }

    Index batch_size() const { return batch_size_; }

private:
    Index batch_size_;
    Graph<T> graph_;
};

/// One-off evaluation; keep a ClassifierEvaluator to reuse its buffers across calls.
template <class T, class M>
    requires Classifier<M, T>
EvalResult evaluate_classifier(M& model, const ConstMatrixRef<T>& x, std::span<const std::int32_t> y,
                               Index batch_size = 1000) {
    ClassifierEvaluator<T> eval(batch_size);
    return eval(model, x, y);
}

}  // namespace lowrank
