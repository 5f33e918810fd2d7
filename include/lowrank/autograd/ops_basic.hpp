#pragma once
// Whole-matrix arithmetic: matmul, add (with row broadcast), sub, mul, scale, sum, mean,
// and column concat / slice. Derivations: docs/derivations/basic.md.

#include <lowrank/autograd/graph.hpp>

#include <vector>

namespace lowrank {

namespace detail {

template <class T>
struct MatmulNode final : Node<T> {
    Node<T>* a = nullptr;
    Node<T>* b = nullptr;
    void backward() override {
        if (a->requires_grad) a->grad->noalias() += this->dout * b->value->transpose();
        if (b->requires_grad) b->grad->noalias() += a->value->transpose() * this->dout;
    }
};

template <class T>
struct AddNode final : Node<T> {
    Node<T>* a = nullptr;
    Node<T>* b = nullptr;
    T sign_b = T(1);
    bool broadcast_b = false;  // b is (1 x C), added to every row of a
    void backward() override {
        if (a->requires_grad) *a->grad += this->dout;
        if (b->requires_grad) {
            if (broadcast_b)
                add_column_sums(*b->grad, sign_b * this->dout);
            else
                *b->grad += sign_b * this->dout;
        }
    }
};

template <class T>
struct MulNode final : Node<T> {
    Node<T>* a = nullptr;
    Node<T>* b = nullptr;
    void backward() override {
        if (a->requires_grad) a->grad->array() += this->dout.array() * b->value->array();
        if (b->requires_grad) b->grad->array() += this->dout.array() * a->value->array();
    }
};

template <class T>
struct ScaleNode final : Node<T> {
    Node<T>* a = nullptr;
    T s = T(1);
    void backward() override { *a->grad += s * this->dout; }
};

template <class T>
struct SumNode final : Node<T> {
    Node<T>* a = nullptr;
    T s = T(1);  // 1 for sum, 1/size for mean
    void backward() override { a->grad->array() += s * this->dout(0, 0); }
};

template <class T>
struct ConcatColsNode final : Node<T> {
    std::vector<Node<T>*> parts;
    void backward() override {
        Index col = 0;
        for (auto* p : parts) {
            const Index c = p->value->cols();
            if (p->requires_grad) *p->grad += this->dout.middleCols(col, c);
            col += c;
        }
    }
};

template <class T>
struct SliceColsNode final : Node<T> {
    Node<T>* a = nullptr;
    Index start = 0;
    void backward() override { a->grad->middleCols(start, this->out.cols()) += this->dout; }
};

template <class T>
void check_same_shape(const Var<T>& a, const Var<T>& b, const char* op) {
    check(a.rows() == b.rows() && a.cols() == b.cols(), op, "shapes differ: ", shape_string(a.value()),
          " and ", shape_string(b.value()));
}

}  // namespace detail

/// a * b: (N x K) * (K x M) -> (N x M).
template <class T>
Var<T> matmul(Graph<T>& g, const Var<T>& a, const Var<T>& b) {
    g.check_owned(a, "matmul");
    g.check_owned(b, "matmul");
    check(a.cols() == b.rows(), "matmul", "inner dimensions differ: ", shape_string(a.value()), " * ",
          shape_string(b.value()));
    auto& n = g.template record<detail::MatmulNode<T>>();
    n.a = a.node();
    n.b = b.node();
    detail::ensure_shape(n.out, a.rows(), b.cols());
    n.out.noalias() = a.value() * b.value();
    n.requires_grad = g.any_requires_grad(a, b);
    return Var<T>(&n);
}

namespace detail {
template <class T>
Var<T> add_impl(Graph<T>& g, const Var<T>& a, const Var<T>& b, T sign_b, const char* op) {
    g.check_owned(a, op);
    g.check_owned(b, op);
    const bool broadcast = b.rows() == 1 && a.rows() != 1 && b.cols() == a.cols();
    if (!broadcast) check_same_shape(a, b, op);
    auto& n = g.template record<AddNode<T>>();
    n.a = a.node();
    n.b = b.node();
    n.sign_b = sign_b;
    n.broadcast_b = broadcast;
    ensure_shape(n.out, a.rows(), a.cols());
    if (broadcast) {
        n.out = a.value();
        n.out.rowwise() += sign_b * b.value().row(0);
    } else {
        n.out = a.value() + sign_b * b.value();
    }
    n.requires_grad = g.any_requires_grad(a, b);
    return Var<T>(&n);
}
}  // namespace detail

/// a + b, same shapes, or b of shape (1 x C) added to every row of a.
template <class T>
Var<T> add(Graph<T>& g, const Var<T>& a, const Var<T>& b) {
    return detail::add_impl(g, a, b, T(1), "add");
}

/// a - b, same shapes, or b of shape (1 x C) subtracted from every row of a.
template <class T>
Var<T> sub(Graph<T>& g, const Var<T>& a, const Var<T>& b) {
    return detail::add_impl(g, a, b, T(-1), "sub");
}

/// Element-wise product of two matrices of the same shape.
template <class T>
Var<T> mul(Graph<T>& g, const Var<T>& a, const Var<T>& b) {
    g.check_owned(a, "mul");
    g.check_owned(b, "mul");
    detail::check_same_shape(a, b, "mul");
    auto& n = g.template record<detail::MulNode<T>>();
    n.a = a.node();
    n.b = b.node();
    detail::ensure_shape(n.out, a.rows(), a.cols());
    n.out = a.value().cwiseProduct(b.value());
    n.requires_grad = g.any_requires_grad(a, b);
    return Var<T>(&n);
}

/// s * a.
template <class T>
Var<T> scale(Graph<T>& g, const Var<T>& a, T s) {
    g.check_owned(a, "scale");
    auto& n = g.template record<detail::ScaleNode<T>>();
    n.a = a.node();
    n.s = s;
    detail::ensure_shape(n.out, a.rows(), a.cols());
    n.out = s * a.value();
    n.requires_grad = g.any_requires_grad(a);
    return Var<T>(&n);
}

/// Sum of all entries, (1 x 1).
template <class T>
Var<T> sum(Graph<T>& g, const Var<T>& a) {
    g.check_owned(a, "sum");
    auto& n = g.template record<detail::SumNode<T>>();
    n.a = a.node();
    n.s = T(1);
    detail::ensure_shape(n.out, 1, 1);
    n.out(0, 0) = a.value().sum();
    n.requires_grad = g.any_requires_grad(a);
    return Var<T>(&n);
}

/// Mean of all entries, (1 x 1).
template <class T>
Var<T> mean(Graph<T>& g, const Var<T>& a) {
    g.check_owned(a, "mean");
    check(a.value().size() > 0, "mean", "expected a non-empty matrix, got ", shape_string(a.value()));
    auto& n = g.template record<detail::SumNode<T>>();
    n.a = a.node();
    n.s = T(1) / static_cast<T>(a.value().size());
    detail::ensure_shape(n.out, 1, 1);
    n.out(0, 0) = a.value().sum() * n.s;
    n.requires_grad = g.any_requires_grad(a);
    return Var<T>(&n);
}

/// Concatenates matrices with the same number of rows along the columns.
template <class T>
Var<T> concat_cols(Graph<T>& g, const std::vector<Var<T>>& parts) {
    check(!parts.empty(), "concat_cols", "expected at least one input, got 0");
    const Index rows = parts.front().rows();
    Index cols = 0;
    bool needs_grad = false;
    for (const auto& p : parts) {
        g.check_owned(p, "concat_cols");
        check(p.rows() == rows, "concat_cols", "expected every input to have ", rows, " rows, got ",
              shape_string(p.value()));
        cols += p.cols();
        needs_grad = needs_grad || p.requires_grad();
    }
    auto& n = g.template record<detail::ConcatColsNode<T>>();
    n.parts.clear();
    detail::ensure_shape(n.out, rows, cols);
    Index col = 0;
    for (const auto& p : parts) {
        n.parts.push_back(p.node());
        n.out.middleCols(col, p.cols()) = p.value();
        col += p.cols();
    }
    n.requires_grad = needs_grad && g.grad_enabled();
    return Var<T>(&n);
}

/// Columns [start, start + count) of a.
template <class T>
Var<T> slice_cols(Graph<T>& g, const Var<T>& a, Index start, Index count) {
    g.check_owned(a, "slice_cols");
    check(start >= 0 && count >= 0 && start + count <= a.cols(), "slice_cols", "columns [", start, ", ",
          start + count, ") out of range for ", shape_string(a.value()));
    auto& n = g.template record<detail::SliceColsNode<T>>();
    n.a = a.node();
    n.start = start;
    detail::ensure_shape(n.out, a.rows(), count);
    n.out = a.value().middleCols(start, count);
    n.requires_grad = g.any_requires_grad(a);
    return Var<T>(&n);
}

}  // namespace lowrank
