#pragma once
// Helpers shared by the optimizer tests: parameters with a deterministic gradient
// sequence, so each test can recompute the expected values in double from the formulas.

#include <lowrank/core/parameter.hpp>
#include <lowrank/core/types.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace lowrank::test {

/// The gradient fed at step t (0-based) for entry (i, j): varied signs and magnitudes, no
/// dependence on the value, so a reference needs nothing but this formula.
inline double grad_at(int t, Index i, Index j) {
    return std::sin(1.0 + static_cast<double>(i) + 2.0 * static_cast<double>(j) + 3.0 * t) *
           (1.0 + 0.5 * static_cast<double>(j));
}

inline double value_at(Index i, Index j) {
    return 0.25 * static_cast<double>(i) - 0.5 * static_cast<double>(j) + 0.1;
}

template <class T>
Parameter<T> make_param(std::string name, Index rows, Index cols) {
    Matrix<T> v(rows, cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) v(i, j) = static_cast<T>(value_at(i, j));
    Parameter<T> p(std::move(name), std::move(v));
    p.zero_grad();
    return p;
}

template <class T>
void set_grad(Parameter<T>& p, int t) {
    p.grad.resize(p.rows(), p.cols());
    for (Index i = 0; i < p.rows(); ++i)
        for (Index j = 0; j < p.cols(); ++j) p.grad(i, j) = static_cast<T>(grad_at(t, i, j));
}

/// Relative tolerance for comparing a T computation with a double reference.
template <class T>
constexpr double tol() {
    return std::is_same_v<T, float> ? 2e-6 : 1e-13;
}

/// |a - b| <= tol * max(1, |b|) for every entry.
template <class T>
bool close(const Matrix<T>& a, const MatrixD& b, double rel) {
    if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
    for (Index i = 0; i < a.rows(); ++i)
        for (Index j = 0; j < a.cols(); ++j)
            if (std::abs(static_cast<double>(a(i, j)) - b(i, j)) > rel * std::max(1.0, std::abs(b(i, j))))
                return false;
    return true;
}

}  // namespace lowrank::test
