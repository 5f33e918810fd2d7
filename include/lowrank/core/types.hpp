#pragma once
// Matrix aliases. Everything is row-major with PyTorch's shapes: activations are
// (tokens x features) and a weight is (out x in), so y = x * W^T + b.

#include <Eigen/Core>

#include <cstdint>

namespace lowrank {

using Index = Eigen::Index;

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A row vector: the shape of a bias, a LayerNorm gain, one row of activations.
template <class T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic, Eigen::RowMajor>;

/// A column vector: singular values, per-row statistics.
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// Column-major scratch, for the few products Eigen runs faster into that layout
/// (detail::add_product).
template <class T>
using ColMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

template <class T>
using MatrixRef = Eigen::Ref<Matrix<T>>;

template <class T>
using ConstMatrixRef = Eigen::Ref<const Matrix<T>>;

using MatrixF = Matrix<float>;
using MatrixD = Matrix<double>;

}  // namespace lowrank
