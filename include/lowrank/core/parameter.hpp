#pragma once
// A trainable tensor: stable id, dotted name, value, gradient.

#include <lowrank/core/error.hpp>
#include <lowrank/core/parallel.hpp>
#include <lowrank/core/types.hpp>

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lowrank {

namespace detail {
inline std::uint64_t next_parameter_id() {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
}
}  // namespace detail

/// A named matrix that the optimizer updates. Every parameter is a matrix; a bias is a
/// (1 x out) row. Optimizer state is keyed by `id()`, which never changes and is never
/// reused, so reallocating `value` (a rank change) cannot confuse it.
///
/// `layout_version()` changes whenever a rank policy changes the shape or the basis of
/// the value (see `set_value`); an optimizer that sees a new version without having been
/// told how to carry its state over refuses to step.
template <class T>
class Parameter {
public:
    Parameter() : id_(detail::next_parameter_id()) {}
    Parameter(std::string name, Matrix<T> value, bool trainable = true)
        : id_(detail::next_parameter_id()),
          name_(std::move(name)),
          value(std::move(value)),
          trainable(trainable) {}

    // A copy is a different parameter: it gets a new id.
    Parameter(const Parameter& other)
        : id_(detail::next_parameter_id()),
          name_(other.name_),
          value(other.value),
          grad(other.grad),
          trainable(other.trainable),
          layout_version_(other.layout_version_),
          active_cols_(other.active_cols_) {}
    Parameter& operator=(const Parameter& other) {
        if (this != &other) {
            name_ = other.name_;
            value = other.value;
            grad = other.grad;
            trainable = other.trainable;
            active_cols_ = other.active_cols_;
            bump_layout();
        }
        return *this;
    }
    Parameter(Parameter&&) noexcept = default;
    Parameter& operator=(Parameter&&) noexcept = default;
    ~Parameter() = default;

    std::uint64_t id() const { return id_; }
    const std::string& name() const { return name_; }
    void set_name(std::string name) { name_ = std::move(name); }

    Index rows() const { return value.rows(); }
    Index cols() const { return value.cols(); }
    /// Scalars in use: rows x active_cols().
    Index size() const { return value.rows() * active_cols(); }

    /// Columns in use. A layer that grows its rank (IncrementalRankLinear) allocates
    /// `cols()` columns up front and marks the leading ones active: only those are trained
    /// (the optimizer updates value.leftCols(active_cols()) and keeps state for them), so a
    /// rank increase needs no reallocation. By default every column is active.
    Index active_cols() const { return active_cols_ < 0 ? value.cols() : active_cols_; }
    void set_active_cols(Index k) {
        check(k >= 0 && k <= value.cols(), name_, "active columns must be in [0, ", value.cols(), "], got ", k);
        active_cols_ = k;
        bump_layout();
    }

    /// Replaces the value with one of a new shape or basis and marks the layout changed.
    /// The gradient is resized to match and zeroed (freed for a frozen parameter).
    void set_value(Matrix<T> v) {
        value = std::move(v);
        active_cols_ = -1;
        if (trainable)
            grad.setZero(value.rows(), value.cols());
        else
            grad = Matrix<T>();
        bump_layout();
    }

    /// Marks a change of basis made in place (same shape, e.g. a re-SVD).
    void bump_layout() { ++layout_version_; }
    std::uint64_t layout_version() const { return layout_version_; }

    /// Sets the gradient to zero, sizing it to the value on first use. A frozen parameter
    /// keeps no gradient buffer: its gradient is released.
    void zero_grad() {
        if (!trainable) {
            if (grad.size() != 0) grad = Matrix<T>();
            return;
        }
        if (grad.rows() != value.rows() || grad.cols() != value.cols())
            grad.setZero(value.rows(), value.cols());
        else
            detail::parallel_fill(grad.data(), grad.size(), T(0));
    }

private:
    std::uint64_t id_;
    std::string name_;

public:
    Matrix<T> value;
    Matrix<T> grad;
    bool trainable = true;

private:
    std::uint64_t layout_version_ = 0;
    Index active_cols_ = -1;  // -1: all columns
};

/// The parameters of a model, in a stable order; non-owning.
template <class T>
using ParameterList = std::vector<Parameter<T>*>;

template <class T>
void zero_grad(const ParameterList<T>& params) {
    for (auto* p : params) p->zero_grad();
}

/// Number of scalars in the parameters (optionally only the trainable ones).
template <class T>
Index count_parameters(const ParameterList<T>& params, bool trainable_only = false) {
    Index n = 0;
    for (const auto* p : params)
        if (!trainable_only || p->trainable) n += p->size();
    return n;
}

}  // namespace lowrank
