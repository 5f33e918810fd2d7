#pragma once
// The fused dense layer y = x * W^T + b. Derivation: docs/derivations/linear.md.

#include <lowrank/autograd/graph.hpp>

namespace lowrank {

namespace detail {

template <class T>
struct LinearNode final : Node<T> {
    Node<T>* x = nullptr;  // (N x in)
    Node<T>* w = nullptr;  // (out x in)
    Node<T>* b = nullptr;  // (1 x out) or null
    ColMatrix<T> dw_scratch;  // dW of a tall, thin weight before it is added (add_product)
    void backward() override {
        const auto& dy = this->dout;
        if (x->requires_grad) x->grad->noalias() += dy * *w->value;
        if (w->requires_grad) add_product(*w->grad, dy.transpose() * *x->value, dw_scratch);
        if (b && b->requires_grad) add_column_sums(*b->grad, dy);
    }
};

}  // namespace detail

/// y = x * W^T + b with x (N x in), W (out x in), b (1 x out); pass an invalid Var (`{}`)
/// for no bias.
template <class T>
Var<T> linear(Graph<T>& g, const Var<T>& x, const Var<T>& w, const Var<T>& b = {}) {
    g.check_owned(x, "linear");
    g.check_owned(w, "linear");
    check(x.cols() == w.cols(), "linear", "input has ", x.cols(), " features but the weight ",
          shape_string(w.value()), " expects ", w.cols());
    auto& n = g.template record<detail::LinearNode<T>>();
    n.x = x.node();
    n.w = w.node();
    n.b = nullptr;
    bool needs_grad = g.any_requires_grad(x, w);
    if (b.valid()) {
        g.check_owned(b, "linear");
        check_shape(b.value(), 1, w.rows(), "linear: bias");
        n.b = b.node();
        needs_grad = needs_grad || g.any_requires_grad(b);
    }
    // Starting from the bias and accumulating the product saves a pass over the output.
    detail::ensure_shape(n.out, x.rows(), w.rows());
    if (n.b) {
        n.out.rowwise() = b.value().row(0);
        n.out.noalias() += x.value() * w.value().transpose();
    } else {
        n.out.noalias() = x.value() * w.value().transpose();
    }
    n.requires_grad = needs_grad;
    return Var<T>(&n);
}

}  // namespace lowrank
