#pragma once
// SVD-based tools shared by the low-rank layers and the rank policies: thin and truncated
// SVD (balanced sqrt(sigma) split), singular values of a thin product without forming it,
// stable rank, spectral norm, orthonormalisation.

#include <lowrank/core/error.hpp>
#include <lowrank/core/types.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <string_view>

namespace lowrank::linalg {

/// W = U * diag(s) * V^T with U (m x k), s (k), V (n x k), k = min(m, n); s descending.
template <class T>
struct Svd {
    Matrix<T> U;
    Vector<T> s;
    Matrix<T> V;
};

/// W ~= U * V^T with U (m x r), V (n x r): the best rank-r approximation, split evenly
/// (U = U_r diag(sqrt s_r), V = V_r diag(sqrt s_r)).
template <class T>
struct Factors {
    Matrix<T> U;
    Matrix<T> V;
    Vector<T> s;        // every singular value of the input, descending
    double tail_energy;  // sum of s_i^2 for i > r: exactly ||W - U V^T||_F^2
};

namespace detail {

template <class Derived>
void check_finite(const Eigen::MatrixBase<Derived>& m, std::string_view what) {
    if (!m.allFinite())
        throw Error(lowrank::detail::concat(what, ": expected finite entries, got a non-finite value in a ",
                                            shape_string(m.rows(), m.cols()), " matrix"));
}

// Double-precision column-major work matrices: the decompositions run in double whatever
// the training scalar, so a float model's rank decisions are not at the mercy of float
// round-off in the SVD.
using Work = Eigen::MatrixXd;

// The decompositions themselves. Eigen's SVDs take about 35 s of -O3 compile time in
// every translation unit that instantiates them, so they sit behind four non-template
// functions. By default these are inline, as everything in a header-only library. A
// program with many translation units may define LOWRANK_SEPARATE_LINALG everywhere:
// they are then only declared here, and exactly one translation unit that also defines
// LOWRANK_LINALG_IMPLEMENTATION before including this header compiles them, once
// (lowrank's own tests, examples and benchmarks build this way: cmake/lowrank_linalg.cpp).
struct WorkSvd {
    Work U;
    Eigen::VectorXd s;
    Work V;
};

#if defined(LOWRANK_SEPARATE_LINALG) || defined(LOWRANK_LINALG_IMPLEMENTATION)
#define LOWRANK_LINALG_FUNCTION
#else
#define LOWRANK_LINALG_FUNCTION inline
#endif

LOWRANK_LINALG_FUNCTION WorkSvd svd_thin(const Work& a);              // BDCSVD, thin U and V
LOWRANK_LINALG_FUNCTION Eigen::VectorXd svd_values(const Work& a);    // BDCSVD, values only
LOWRANK_LINALG_FUNCTION WorkSvd svd_small_full(const Work& a);        // JacobiSVD, full U and V
LOWRANK_LINALG_FUNCTION Eigen::VectorXd svd_small_values(const Work& a);  // JacobiSVD, values

#if !defined(LOWRANK_SEPARATE_LINALG) || defined(LOWRANK_LINALG_IMPLEMENTATION)
LOWRANK_LINALG_FUNCTION WorkSvd svd_thin(const Work& a) {
    Eigen::BDCSVD<Work> svd(a, Eigen::ComputeThinU | Eigen::ComputeThinV);
    return {svd.matrixU(), svd.singularValues(), svd.matrixV()};
}
LOWRANK_LINALG_FUNCTION Eigen::VectorXd svd_values(const Work& a) {
    return Eigen::BDCSVD<Work>(a).singularValues();
}
LOWRANK_LINALG_FUNCTION WorkSvd svd_small_full(const Work& a) {
    Eigen::JacobiSVD<Work> svd(a, Eigen::ComputeFullU | Eigen::ComputeFullV);
    return {svd.matrixU(), svd.singularValues(), svd.matrixV()};
}
LOWRANK_LINALG_FUNCTION Eigen::VectorXd svd_small_values(const Work& a) {
    return Eigen::JacobiSVD<Work>(a).singularValues();
}
#endif
#undef LOWRANK_LINALG_FUNCTION

}  // namespace detail

/// Thin SVD (Eigen's divide-and-conquer BDCSVD), computed in double.
template <class T>
Svd<T> thin_svd(const ConstMatrixRef<T>& w, std::string_view what = "thin_svd") {
    detail::check_finite(w, what);
    const detail::WorkSvd svd = detail::svd_thin(w.template cast<double>());
    return {svd.U.template cast<T>(), svd.s.template cast<T>(), svd.V.template cast<T>()};
}

/// Singular values only, descending.
template <class T>
Vector<T> singular_values(const ConstMatrixRef<T>& w, std::string_view what = "singular_values") {
    detail::check_finite(w, what);
    return detail::svd_values(w.template cast<double>()).template cast<T>();
}

/// Best rank-r approximation of w as a balanced pair of factors.
template <class T>
Factors<T> truncated_svd(const ConstMatrixRef<T>& w, Index r, std::string_view what = "truncated_svd") {
    const Index d = std::min(w.rows(), w.cols());
    check(r >= 1 && r <= d, what, "rank must be in [1, ", d, "] for a ", shape_string(w.rows(), w.cols()),
          " matrix, got ", r);
    auto svd = thin_svd<T>(w, what);
    Factors<T> f;
    const auto root = svd.s.head(r).array().sqrt().matrix().asDiagonal();
    f.U = svd.U.leftCols(r) * root;
    f.V = svd.V.leftCols(r) * root;
    f.s = svd.s;
    f.tail_energy = svd.s.tail(d - r).template cast<double>().squaredNorm();
    return f;
}

/// Q with orthonormal columns spanning the columns of a (m x k, k <= m), signs fixed so
/// that R's diagonal is non-negative (so the result is unique for full-rank input).
template <class T>
Matrix<T> orthonormalize_columns(const ConstMatrixRef<T>& a, std::string_view what = "orthonormalize_columns") {
    check(a.cols() <= a.rows(), what, "expected at most as many columns as rows, got ",
          shape_string(a.rows(), a.cols()));
    detail::check_finite(a, what);
    const detail::Work m = a.template cast<double>();
    Eigen::HouseholderQR<detail::Work> qr(m);
    detail::Work q = qr.householderQ() * detail::Work::Identity(a.rows(), a.cols());
    for (Index j = 0; j < a.cols(); ++j)
        if (qr.matrixQR()(j, j) < 0) q.col(j) = -q.col(j);
    return q.template cast<T>();
}

namespace detail {

/// U = Qu Ru and V = Qv Rv, so U V^T = Qu (Ru Rv^T) Qv^T: the r x r core carries every
/// singular value of the product.
struct ThinProduct {
    Eigen::HouseholderQR<Work> qu, qv;
    Work core;
};

template <class T>
ThinProduct thin_product(const ConstMatrixRef<T>& u, const ConstMatrixRef<T>& v) {
    const Index r = u.cols();
    ThinProduct p{Eigen::HouseholderQR<Work>(u.template cast<double>()),
                  Eigen::HouseholderQR<Work>(v.template cast<double>()), Work()};
    const Work ru = p.qu.matrixQR().topRows(r).template triangularView<Eigen::Upper>();
    const Work rv = p.qv.matrixQR().topRows(r).template triangularView<Eigen::Upper>();
    p.core = ru * rv.transpose();
    return p;
}

template <class T>
void check_factors(const ConstMatrixRef<T>& u, const ConstMatrixRef<T>& v, std::string_view what) {
    check(u.cols() == v.cols(), what, "factors must have the same number of columns, got U ",
          shape_string(u.rows(), u.cols()), " and V ", shape_string(v.rows(), v.cols()));
    check_finite(u, what);
    check_finite(v, what);
}

}  // namespace detail

/// Thin SVD of the product U * V^T (U m x r, V n x r) without forming the m x n matrix:
/// only the r x r core of detail::thin_product is decomposed. Cost O((m + n) r^2 + r^3)
/// instead of O(m n min(m, n)).
template <class T>
Svd<T> product_svd(const ConstMatrixRef<T>& u, const ConstMatrixRef<T>& v, std::string_view what = "product_svd") {
    detail::check_factors<T>(u, v, what);
    const Index r = u.cols();
    if (r > u.rows() || r > v.rows()) {
        // More columns than rows: the QR route gains nothing; decompose the product.
        const Matrix<T> w = u * v.transpose();
        return thin_svd<T>(w, what);
    }
    const auto p = detail::thin_product<T>(u, v);
    const detail::WorkSvd svd = detail::svd_small_full(p.core);
    const detail::Work qu_thin = p.qu.householderQ() * detail::Work::Identity(u.rows(), r);
    const detail::Work qv_thin = p.qv.householderQ() * detail::Work::Identity(v.rows(), r);
    return {(qu_thin * svd.U).template cast<T>(), svd.s.template cast<T>(), (qv_thin * svd.V).template cast<T>()};
}

/// Singular values of U * V^T (length r, descending), through the r x r core.
template <class T>
Vector<T> product_singular_values(const ConstMatrixRef<T>& u, const ConstMatrixRef<T>& v,
                                  std::string_view what = "product_singular_values") {
    detail::check_factors<T>(u, v, what);
    if (u.cols() > u.rows() || u.cols() > v.rows()) {
        const Matrix<T> w = u * v.transpose();
        return singular_values<T>(w, what);
    }
    return detail::svd_small_values(detail::thin_product<T>(u, v).core).template cast<T>();
}

/// Stable rank from singular values: sum s_i^2 / s_1^2 (0 for a zero matrix).
template <class T>
double stable_rank_of(const Vector<T>& s) {
    if (s.size() == 0 || s(0) == T(0)) return 0.0;
    const double top = static_cast<double>(s(0));
    return s.template cast<double>().squaredNorm() / (top * top);
}

/// Stable rank ||W||_F^2 / ||W||_2^2 of a dense matrix.
template <class T>
double stable_rank(const ConstMatrixRef<T>& w) {
    return stable_rank_of<T>(singular_values<T>(w, "stable_rank"));
}

/// Largest singular value.
template <class T>
double spectral_norm(const ConstMatrixRef<T>& w) {
    const auto s = singular_values<T>(w, "spectral_norm");
    return s.size() ? static_cast<double>(s(0)) : 0.0;
}

}  // namespace lowrank::linalg
