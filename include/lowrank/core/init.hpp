#pragma once
// Initialisers: normal, uniform, Kaiming (PyTorch's conventions) and orthogonal.

#include <lowrank/core/error.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/core/types.hpp>

#include <Eigen/QR>

#include <algorithm>
#include <cmath>

namespace lowrank::init {

template <class T>
void normal(MatrixRef<T> m, Rng& rng, double mean = 0.0, double stddev = 1.0) {
    for (Index i = 0; i < m.rows(); ++i)
        for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<T>(rng.normal(mean, stddev));
}

template <class T>
void uniform(MatrixRef<T> m, Rng& rng, double lo, double hi) {
    check(lo <= hi, "init::uniform", "expected lo <= hi, got lo = ", lo, ", hi = ", hi);
    for (Index i = 0; i < m.rows(); ++i)
        for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<T>(rng.uniform(lo, hi));
}

/// Kaiming-uniform for a weight (out x in) feeding a ReLU: U(-b, b), b = sqrt(6 / fan_in).
template <class T>
void kaiming_uniform(MatrixRef<T> w, Rng& rng) {
    check(w.cols() > 0, "init::kaiming_uniform", "expected fan_in > 0, got ", w.cols());
    const double bound = std::sqrt(6.0 / static_cast<double>(w.cols()));
    uniform<T>(w, rng, -bound, bound);
}

/// Kaiming-normal for a weight (out x in) feeding a ReLU: N(0, 2 / fan_in).
template <class T>
void kaiming_normal(MatrixRef<T> w, Rng& rng) {
    check(w.cols() > 0, "init::kaiming_normal", "expected fan_in > 0, got ", w.cols());
    normal<T>(w, rng, 0.0, std::sqrt(2.0 / static_cast<double>(w.cols())));
}

/// PyTorch's default for nn.Linear: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
template <class T>
void linear_default(MatrixRef<T> m, Rng& rng, Index fan_in) {
    check(fan_in > 0, "init::linear_default", "expected fan_in > 0, got ", fan_in);
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    uniform<T>(m, rng, -bound, bound);
}

/// A random matrix with orthonormal rows or columns (whichever is fewer), times `scale`:
/// QR of a Gaussian matrix with the signs fixed by R's diagonal, so the result is
/// uniformly (Haar) distributed.
template <class T>
void orthogonal(MatrixRef<T> m, Rng& rng, double scale = 1.0) {
    const Index rows = m.rows(), cols = m.cols();
    if (rows == 0 || cols == 0) return;
    const bool tall = rows >= cols;
    const Index big = tall ? rows : cols, small = tall ? cols : rows;
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic> g(big, small);
    for (Index i = 0; i < big; ++i)
        for (Index j = 0; j < small; ++j) g(i, j) = rng.normal();
    Eigen::HouseholderQR<decltype(g)> qr(g);
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic> q =
        qr.householderQ() * Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>::Identity(big, small);
    const auto& r = qr.matrixQR();
    for (Index j = 0; j < small; ++j)
        if (r(j, j) < 0) q.col(j) = -q.col(j);
    if (tall)
        m = (q * scale).template cast<T>();
    else
        m = (q.transpose() * scale).template cast<T>();
}

}  // namespace lowrank::init
