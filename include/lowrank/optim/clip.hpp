#pragma once
// Gradient clipping by the global L2 norm (torch.nn.utils.clip_grad_norm_).

#include <lowrank/core/error.hpp>
#include <lowrank/core/parallel.hpp>
#include <lowrank/core/parameter.hpp>

#include <algorithm>
#include <array>
#include <cmath>

namespace lowrank {

namespace detail {

/// Sum of squares in double with eight fixed partial sums: the same result on every
/// run, yet not one long dependency chain (which would be ~4x slower).
template <class T>
double sum_of_squares_serial(const T* x, Index n) {
    std::array<double, 8> acc{};
    Index i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) {
            const auto v = static_cast<double>(x[i + k]);
            acc[k] += v * v;
        }
    for (; i < n; ++i) {
        const auto v = static_cast<double>(x[i]);
        acc[0] += v * v;
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/// sum_of_squares_serial over at most 64 blocks of at least 2^16 entries (their size a
/// function of n alone), in parallel, the partial sums added in block order: the same
/// result at every thread count, and for n <= 2^16 the serial sum itself.
template <class T>
double sum_of_squares(const T* x, Index n) {
    constexpr Index kMaxBlocks = 64;
    const Index block = std::max<Index>(Index(1) << 16, (n + kMaxBlocks - 1) / kMaxBlocks);
    std::array<double, kMaxBlocks> part{};
    parallel_blocks(n, block, [&](Index b, Index e) {
        part[static_cast<std::size_t>(b / block)] = sum_of_squares_serial(x + b, e - b);
    });
    double sum = 0.0;
    for (Index k = 0; k * block < n; ++k) sum += part[static_cast<std::size_t>(k)];
    return sum;
}

template <class T>
bool has_gradient(const Parameter<T>& p) {
    return p.trainable && p.grad.size() != 0;
}

/// Scales the gradients by max_norm / (norm + 1e-6) when that is below 1 (PyTorch's rule:
/// the coefficient clamped at 1), given their global norm; returns whether it scaled.
template <class T>
bool scale_grad_to_norm(const ParameterList<T>& params, double norm, double max_norm) {
    const double coef = max_norm / (norm + 1e-6);
    if (!(coef < 1.0)) return false;
    const auto c = static_cast<T>(coef);
    for (Parameter<T>* p : params)
        if (has_gradient(*p)) {
            T* g = p->grad.data();
            for_each_block(p->grad.size(), [&](Index b, Index e) {
                for (Index i = b; i < e; ++i) g[i] *= c;
            });
        }
    return true;
}

}  // namespace detail

/// The L2 norm of all trainable parameters' gradients taken as one vector, accumulated in
/// double in parameter order. Parameters without a gradient (0 x 0) are skipped.
template <class T>
double grad_global_norm(const ParameterList<T>& params) {
    double sum = 0.0;
    for (const Parameter<T>* p : params)
        if (detail::has_gradient(*p)) sum += detail::sum_of_squares(p->grad.data(), p->grad.size());
    return std::sqrt(sum);
}

/// Scales the gradients by max_norm / (norm + 1e-6) when that is below 1 (that is, when
/// the norm exceeds max_norm), and returns the norm before clipping. A non-finite norm
/// throws and leaves the gradients unchanged: scaling by it would turn every gradient
/// into NaN, and the caller should skip the step instead.
template <class T>
double clip_grad_norm(const ParameterList<T>& params, double max_norm) {
    check(std::isfinite(max_norm) && max_norm > 0.0, "clip_grad_norm", "expected max_norm > 0, got ",
          max_norm);
    const double norm = grad_global_norm(params);
    if (!std::isfinite(norm)) {
        for (const Parameter<T>* p : params)
            if (detail::has_gradient(*p) && !p->grad.allFinite())
                throw Error(detail::concat("clip_grad_norm: the gradient norm is not finite (", norm,
                                           "); parameter '", p->name(), "' has a non-finite gradient"));
        throw Error(detail::concat("clip_grad_norm: the gradient norm is not finite (", norm,
                                   "): the sum of squares overflowed"));
    }
    detail::scale_grad_to_norm(params, norm, max_norm);
    return norm;
}

}  // namespace lowrank
