#pragma once
// The tape. A Graph records whole-matrix operations in execution order; each node
// computes its output eagerly and knows how to push its output gradient back to its
// inputs. backward() walks the tape once, in reverse: no recursion, no per-scalar nodes.
//
// Buffers are reused across steps: clear() rewinds the tape without freeing it, and an op
// recorded at the same position with the same type reuses the node (and its matrices).
// A training step with the same shapes as the previous one therefore allocates nothing.

#include <lowrank/core/error.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/core/types.hpp>

#include <cstddef>
#include <memory>
#include <typeinfo>
#include <vector>

namespace lowrank {

template <class T>
class Graph;

/// One recorded operation (or leaf). `value`/`grad` point at the output and its gradient:
/// for op nodes these are the node's own buffers, for a parameter leaf they are the
/// parameter's value and grad, so gradients accumulate straight into the parameter.
template <class T>
struct Node {
    Node() = default;
    Node(const Node&) = delete;
    Node& operator=(const Node&) = delete;
    virtual ~Node() = default;

    /// Accumulates (+=) this node's output gradient into its inputs' gradients.
    virtual void backward() {}

    Matrix<T> out;
    Matrix<T> dout;
    const Matrix<T>* value = &out;
    Matrix<T>* grad = &dout;
    bool requires_grad = false;
    bool owns_grad = true;  // false for parameter leaves: their grad belongs to the Parameter
    std::size_t index = 0;
    const Graph<T>* graph = nullptr;
};

/// A handle to a recorded value. Valid until the graph is cleared.
template <class T>
class Var {
public:
    Var() = default;
    explicit Var(Node<T>* node) : node_(node) {}

    const Matrix<T>& value() const { return *node_->value; }
    Matrix<T>& grad() const { return *node_->grad; }
    Index rows() const { return node_->value->rows(); }
    Index cols() const { return node_->value->cols(); }
    bool requires_grad() const { return node_->requires_grad; }
    bool valid() const { return node_ != nullptr; }
    Node<T>* node() const { return node_; }

    /// The scalar value of a (1 x 1) result such as a loss.
    T item() const {
        check_shape(value(), 1, 1, "Var::item");
        return value()(0, 0);
    }

private:
    Node<T>* node_ = nullptr;
};

namespace detail {

template <class T>
struct InputNode final : Node<T> {};

template <class T>
struct ParameterNode final : Node<T> {
    ParameterNode() { this->owns_grad = false; }
};

/// Sizes `m` to (rows x cols); Eigen keeps the buffer when the size is unchanged.
template <class M>
void ensure_shape(Eigen::PlainObjectBase<M>& m, Index rows, Index cols) {
    if (m.rows() != rows || m.cols() != cols) m.resize(rows, cols);
}

/// out.row(0) += the column sums of `m` (any row-major matrix expression, e.g. dy or
/// dy.cwiseProduct(xhat)): one pass over m, a row at a time. Every bias gradient goes
/// through here. Eigen 3.4's `m.colwise().sum()` of a row-major matrix reduces one strided
/// column at a time and ran at a seventh of memory speed (1.8-2.6 ms against 0.26 ms for
/// this loop on a 4096 x 1024 dy); adding whole rows is contiguous and vectorised.
template <class Out, class Expr>
void add_column_sums(Out& out, const Eigen::MatrixBase<Expr>& m) {
    auto acc = out.row(0);
    for (Index i = 0; i < m.rows(); ++i) acc += m.row(i);
}

/// dst += product, for a weight gradient such as dU += dy^T (x V). When dst is tall and
/// thin (rows >= 4 cols, cols <= 256: the m x r gradient of a factor) the product goes into
/// a column-major scratch first and is then added: Eigen then packs the long side (dy^T or
/// x^T, contiguous in a row-major activation) as its left operand, which ran 13-35% faster
/// at m = 768-1024, r = 64, N = 4096 (docs/performance.md, "Thin products"); the add back
/// touches only m x r entries. Any other shape (a square or wide
/// dense gradient, where the transposing add would cost more than it saves) goes straight
/// into dst. `scratch` is owned by the node, so steady-state steps allocate nothing.
template <class Dst, class Product, class Scalar>
void add_product(Dst&& dst, const Product& product, ColMatrix<Scalar>& scratch) {
    if (dst.rows() >= 4 * dst.cols() && dst.cols() <= 256) {
        ensure_shape(scratch, dst.rows(), dst.cols());
        scratch.noalias() = product;
        dst += scratch;
    } else {
        dst.noalias() += product;
    }
}

}  // namespace detail

template <class T>
class Graph {
public:
    Graph() = default;
    explicit Graph(std::uint64_t seed) : rng_(seed) {}
    Graph(const Graph&) = delete;
    Graph& operator=(const Graph&) = delete;

    /// Rewinds the tape for a new step; keeps every buffer for reuse.
    void clear() { cursor_ = 0; }

    /// Bytes of the outputs and output gradients of the nodes recorded since the last
    /// clear(), at their current shapes: after a step's backward, that step's activations
    /// and their gradients. Nodes kept past the cursor for reuse, and buffers an op keeps
    /// beside its output (saved statistics, scratch, a fused node's block), are not counted;
    /// parameter leaves count nothing (their value and grad are the parameter's).
    std::size_t tape_bytes() const {
        std::size_t n = 0;
        for (std::size_t i = 0; i < cursor_; ++i)
            n += static_cast<std::size_t>(tape_[i]->out.size() + tape_[i]->dout.size());
        return n * sizeof(T);
    }

    /// Records a constant input (copied into a reused buffer). With requires_grad its
    /// gradient is computed too (gradient checks with respect to an input use this).
    Var<T> input(const ConstMatrixRef<T>& x, bool requires_grad = false) {
        auto& n = record<detail::InputNode<T>>();
        detail::ensure_shape(n.out, x.rows(), x.cols());
        n.out = x;
        n.requires_grad = requires_grad && grad_enabled_;
        return Var<T>(&n);
    }

    /// Records a parameter leaf: ops read its value in place and accumulate into its grad.
    Var<T> param(Parameter<T>& p) {
        auto& n = record<detail::ParameterNode<T>>();
        n.value = &p.value;
        n.grad = &p.grad;
        n.requires_grad = p.trainable && grad_enabled_;
        if (n.requires_grad && (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols()))
            p.grad.setZero(p.value.rows(), p.value.cols());
        return Var<T>(&n);
    }

    /// Returns the node at the cursor, reusing the previous step's node when the type
    /// matches. Ops call this; users do not need to.
    template <class N>
    N& record() {
        if (cursor_ == tape_.size()) tape_.push_back(nullptr);
        auto& slot = tape_[cursor_];
        if (!slot || typeid(*slot) != typeid(N)) slot = std::make_unique<N>();
        auto& node = static_cast<N&>(*slot);
        // A reused node must not keep last step's flag: an op that throws after record()
        // leaves a half-built node on the tape, and backward() must skip it.
        node.requires_grad = false;
        node.index = cursor_++;
        node.graph = this;
        return node;
    }

    /// True if any of the vars needs a gradient (and gradients are enabled).
    template <class... Vars>
    bool any_requires_grad(const Vars&... vars) const {
        return grad_enabled_ && (vars.requires_grad() || ...);
    }

    /// Checks that a Var was recorded by this graph in the current step.
    void check_owned(const Var<T>& v, const char* op) const {
        check(v.valid() && v.node()->graph == this && v.node()->index < cursor_, op,
              "the input Var does not belong to this graph's current step (was the graph cleared?)");
    }

    /// Back-propagates from a (1 x 1) value. Gradients of parameters are accumulated
    /// (+=) into Parameter::grad: zero them between steps (Optimizer::zero_grad).
    void backward(const Var<T>& loss) {
        check_owned(loss, "Graph::backward");
        check(grad_enabled_, "Graph::backward", "gradients are disabled (set_grad_enabled(false))");
        check_shape(loss.value(), 1, 1, "Graph::backward: loss");
        check(loss.requires_grad(), "Graph::backward",
              "the loss does not depend on any trainable parameter or input that requires grad");
        const std::size_t last = loss.node()->index;
        for (std::size_t i = 0; i <= last; ++i) {
            auto& n = *tape_[i];
            if (n.requires_grad && n.owns_grad) n.dout.setZero(n.out.rows(), n.out.cols());
        }
        loss.grad()(0, 0) = T(1);
        for (std::size_t i = last + 1; i-- > 0;) {
            auto& n = *tape_[i];
            if (n.requires_grad) n.backward();
        }
    }

    /// With gradients disabled (evaluation), ops record no gradient information.
    void set_grad_enabled(bool on) { grad_enabled_ = on; }
    bool grad_enabled() const { return grad_enabled_; }

    /// Training mode switches dropout on.
    void set_training(bool on) { training_ = on; }
    bool training() const { return training_; }

    /// The generator dropout draws from; seed it for reproducible runs.
    Rng& rng() { return rng_; }

    /// Number of nodes recorded in the current step.
    std::size_t size() const { return cursor_; }

private:
    std::vector<std::unique_ptr<Node<T>>> tape_;
    std::size_t cursor_ = 0;
    bool grad_enabled_ = true;
    bool training_ = true;
    Rng rng_{0};
};

}  // namespace lowrank
