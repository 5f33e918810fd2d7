#pragma once
// A trained factorised layer as the layer others use, in one of two forms:
//
//   merged_linear    the dense layer it computes, W = dense_weight() (LoRA/ReLoRA:
//                    W0 + (alpha / r) U V^T; LowRankLinear U V^T; SpectralLinear
//                    U diag(sigma) V^T; InRank the active columns; Deep LoRA the product),
//                    with its bias: what PEFT's merge_and_unload gives
//   compact_linear   the cheaper of that dense layer and a rank-k LowRankLinear without a
//                    base that computes the same function: for inference at low cost
//
// Both keep the slot's name, so a model whose slots are replaced keeps its parameter names
// (".weight" / ".bias" for a dense layer, ".U" / ".V" / ".bias" for a low-rank one).
// Guide: docs/checkpoints.md ("Exporting a trained model").

#include <lowrank/nn/any_linear.hpp>

#include <algorithm>
#include <cstddef>
#include <string>
#include <type_traits>
#include <variant>

namespace lowrank {

/// The dense layer that computes what `slot` computes: forward(x) = x W^T + b with
/// W = slot.dense_weight() (equal up to rounding: the products are summed in another
/// order).
template <class T>
Linear<T> merged_linear(const AnyLinear<T>& slot) {
    const Matrix<T> w = slot.dense_weight();
    return Linear<T>::from_weight(slot.name(), w, slot.bias());
}

namespace detail {

/// A rank-k factorisation U V^T (U out x k, V in x k) of a layer's weight without its
/// base, or none (k = 0) when the layer has a base or is not factorised.
template <class T>
struct Factors {
    Matrix<T> u, v;
    double scale = 1.0;
    Index rank() const { return u.cols(); }
};

template <class T>
Factors<T> factors_of(const Linear<T>&) {
    return {};
}

template <class T>
Factors<T> factors_of(const LowRankLinear<T>& l) {
    if (l.has_base()) return {};
    return {l.U.value, l.V.value, l.scale()};
}

template <class T>
Factors<T> factors_of(const IncrementalRankLinear<T>& l) {
    if (l.has_base()) return {};
    return {l.U.value.leftCols(l.rank()), l.V.value.leftCols(l.rank()), 1.0};
}

/// U diag(sigma) V^T over the pairs whose sigma is not zero (a zero pair adds nothing).
template <class T>
Factors<T> factors_of(const SpectralLinear<T>& l) {
    const Matrix<T> u = l.full_u(), v = l.full_v();
    const auto& s = l.sigma.value;
    const Index k = (s.array() != T(0)).count();
    if (k == 0) return {};
    Factors<T> f{Matrix<T>(u.rows(), k), Matrix<T>(v.rows(), k), 1.0};
    for (Index j = 0, c = 0; j < s.cols(); ++j) {
        if (s(0, j) == T(0)) continue;
        f.u.col(c) = u.col(j) * s(0, j);
        f.v.col(c++) = v.col(j);
    }
    return f;
}

/// The chain F_L ... F_1 split at its narrowest inner dimension w_j:
/// U = F_L ... F_{j+1} (out x w_j), V^T = F_j ... F_1 (w_j x in).
template <class T>
Factors<T> factors_of(const DeepLowRankLinear<T>& l) {
    if (l.has_base()) return {};
    const auto& fs = l.factors();
    std::size_t cut = 0;  // split after factor `cut` (0-based): its rows are the inner width
    for (std::size_t j = 1; j + 1 < fs.size(); ++j)
        if (fs[j].rows() < fs[cut].rows()) cut = j;
    Matrix<T> vt = fs[0].value;
    for (std::size_t j = 1; j <= cut; ++j) vt = fs[j].value * vt;
    Matrix<T> u = fs.back().value;
    for (std::size_t j = fs.size() - 1; j-- > cut + 1;) u = u * fs[j].value;
    return {std::move(u), vt.transpose(), 1.0};
}

}  // namespace detail

/// The layer `slot` becomes for inference: a LowRankLinear (U, V, scale and bias, no base)
/// when the slot's weight has a rank-k factorisation without a base and k (out + in) <
/// out * in multiply-adds are fewer than the dense layer's, else merged_linear(slot). A
/// LowRankLinear without a base is kept as it is; a layer with a frozen base (LoRA,
/// ReLoRA, InRank or Deep LoRA with a base) is dense.
template <class T>
AnyLinear<T> compact_linear(const AnyLinear<T>& slot) {
    detail::Factors<T> f = std::visit([](const auto& l) { return detail::factors_of(l); }, slot.variant());
    const double m = static_cast<double>(slot.out_features()), n = static_cast<double>(slot.in_features());
    if (f.rank() == 0 || static_cast<double>(f.rank()) * (m + n) >= m * n) return AnyLinear<T>(merged_linear(slot));
    return AnyLinear<T>(LowRankLinear<T>::from_factors(slot.name(), std::move(f.u), std::move(f.v), f.scale,
                                                       slot.bias()));
}

/// Replaces the layer in `slot` by `layer` (an AnyLinear of any kind).
template <class T>
void replace_layer(AnyLinear<T>& slot, AnyLinear<T> layer) {
    std::visit([&](auto& l) { slot.replace(std::move(l)); }, layer.variant());
}

}  // namespace lowrank
