#pragma once
// Fused causal multi-head self-attention, GPT-2's form. Derivation and costs:
// docs/derivations/attention.md.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/core/parallel.hpp>

#include <Eigen/Core>

#include <cmath>

namespace lowrank {

namespace detail {

/// One head's (T x hd) block inside a wider row-major matrix: rows of `stride` scalars.
template <class T>
using HeadMap = Eigen::Map<Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using ConstHeadMap = Eigen::Map<const Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// A contiguous (T x T) row-major view of scratch memory.
template <class T>
using SquareMap = Eigen::Map<Matrix<T>>;

/// The calling thread's scratch: two (T x T) buffers, shared by every attention node of
/// every graph (the contents never outlive one (b, h) pair: backward recomputes them), so
/// attention needs O(T^2) per thread however many layers a model has. Grow-only: after the
/// longest sequence has been seen, nothing is allocated again.
template <class T>
struct AttentionScratch {
    Vector<T> p, d;
    SquareMap<T> probs(Index n) { return view(p, n); }
    SquareMap<T> grads(Index n) { return view(d, n); }

private:
    static SquareMap<T> view(Vector<T>& buffer, Index n) {
        if (buffer.size() < n * n) buffer.resize(n * n);
        return SquareMap<T>(buffer.data(), n, n);
    }
};

template <class T>
AttentionScratch<T>& attention_scratch() {
    thread_local AttentionScratch<T> scratch;
    return scratch;
}

template <class T>
struct CausalSelfAttentionNode final : Node<T> {
    Node<T>* qkv = nullptr;  // (B*T x 3C): [q | k | v]
    Index batch = 0, seq_len = 0, n_head = 0, head_dim = 0;
    T scale = T(1);  // 1 / sqrt(head_dim)
    // Log-sum-exp of each scaled, masked score row: B * n_head * T numbers, the only
    // per-row state kept for backward. P is recomputed from it, one (b, h) at a time.
    Vector<T> lse;

    Index channels() const { return n_head * head_dim; }

    ConstHeadMap<T> head(const Matrix<T>& m, Index b, Index part, Index h) const {
        const Index c = channels();
        return ConstHeadMap<T>(m.data() + b * seq_len * m.cols() + part * c + h * head_dim, seq_len, head_dim,
                               Eigen::OuterStride<>(m.cols()));
    }
    HeadMap<T> head(Matrix<T>& m, Index b, Index part, Index h) const {
        const Index c = channels();
        return HeadMap<T>(m.data() + b * seq_len * m.cols() + part * c + h * head_dim, seq_len, head_dim,
                          Eigen::OuterStride<>(m.cols()));
    }

    /// Writes the causal probabilities of pair (b, h) into the lower triangle of `p`
    /// (the upper triangle is left as it is: every consumer reads the lower one only).
    /// With `store_lse` the row statistics are saved, otherwise they are read back, so
    /// backward reproduces forward's P bit for bit.
    void probabilities(SquareMap<T>& p, Index b, Index h, bool store_lse) {
        const auto q = head(*qkv->value, b, 0, h);
        const auto k = head(*qkv->value, b, 1, h);
        // Only the lower triangle (t' <= t) is computed: the masked half of the GEMM is skipped.
        p.template triangularView<Eigen::Lower>() = (scale * q) * k.transpose();
        T* stats = lse.data() + (b * n_head + h) * seq_len;
        for (Index t = 0; t < seq_len; ++t) {
            auto row = p.row(t).head(t + 1).array();
            if (store_lse) {
                const T m = row.maxCoeff();
                stats[t] = m + std::log((row - m).exp().sum());
            }
            row = (row - stats[t]).exp();
        }
    }

    void backward() override {
        if (!qkv->requires_grad) return;
        auto& dqkv = *qkv->grad;
        parallel_for(batch * n_head, 2 * seq_len * seq_len * head_dim, [&](Index pair) {
            const Index b = pair / n_head, h = pair % n_head;
            auto& scratch = attention_scratch<T>();
            SquareMap<T> p = scratch.probs(seq_len);
            SquareMap<T> d = scratch.grads(seq_len);
            probabilities(p, b, h, false);
            const auto q = head(*qkv->value, b, 0, h);
            const auto k = head(*qkv->value, b, 1, h);
            const auto v = head(*qkv->value, b, 2, h);
            const auto dy = head(static_cast<const Matrix<T>&>(this->dout), b, 0, h);
            // dP = dY V^T, lower triangle only (P is zero above the diagonal).
            d.template triangularView<Eigen::Lower>() = dy * v.transpose();
            // dS = P o (dP - rowsum(dP o P)), with the 1/sqrt(hd) of S = q k^T / sqrt(hd)
            // folded in, so the two GEMMs below need no extra scaling.
            for (Index t = 0; t < seq_len; ++t) {
                auto pr = p.row(t).head(t + 1).array();
                auto dr = d.row(t).head(t + 1).array();
                const T dot = (pr * dr).sum();
                dr = scale * pr * (dr - dot);
            }
            auto dq = head(dqkv, b, 0, h);
            auto dk = head(dqkv, b, 1, h);
            auto dv = head(dqkv, b, 2, h);
            dq.noalias() += d.template triangularView<Eigen::Lower>() * k;
            dk.noalias() += d.template triangularView<Eigen::Lower>().transpose() * q;
            dv.noalias() += p.template triangularView<Eigen::Lower>().transpose() * dy;
        });
    }
};

}  // namespace detail

/// Causal multi-head self-attention on GPT-2's fused projection: `qkv` is (B*T x 3C), row
/// b*T + t, columns [q | k | v], head h in columns [h*hd, (h+1)*hd) of each part
/// (hd = C / n_head). Per sequence b and head h: S = q k^T / sqrt(hd), entries t' > t
/// masked, P = softmax of each row, y = P v. Returns (B*T x C), head h in columns
/// [h*hd, (h+1)*hd). The node keeps B*n_head*T row statistics; the (T x T) probabilities
/// live in O(T^2) per-thread scratch and backward recomputes them.
template <class T>
Var<T> causal_self_attention(Graph<T>& g, const Var<T>& qkv, Index batch, Index seq_len, Index n_head) {
    g.check_owned(qkv, "causal_self_attention");
    check(batch > 0, "causal_self_attention", "expected a positive batch size B, got ", batch);
    check(seq_len > 0, "causal_self_attention", "expected a positive sequence length T, got ", seq_len);
    check(n_head > 0, "causal_self_attention", "expected a positive number of heads, got ", n_head);
    check(qkv.cols() % 3 == 0, "causal_self_attention", "expected qkv to have 3C columns ([q | k | v]), got ",
          qkv.cols(), " columns, not divisible by 3");
    const Index channels = qkv.cols() / 3;
    check(channels > 0, "causal_self_attention", "expected qkv to have 3C > 0 columns, got 0");
    check(channels % n_head == 0, "causal_self_attention", "expected C = ", channels,
          " to be divisible by n_head = ", n_head, ", remainder ", channels % n_head);
    check(qkv.rows() == batch * seq_len, "causal_self_attention", "expected qkv to have B*T = ", batch, "*",
          seq_len, " = ", batch * seq_len, " rows, got ", qkv.rows());

    auto& n = g.template record<detail::CausalSelfAttentionNode<T>>();
    n.qkv = qkv.node();
    n.batch = batch;
    n.seq_len = seq_len;
    n.n_head = n_head;
    n.head_dim = channels / n_head;
    n.scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(n.head_dim)));
    detail::ensure_shape(n.out, batch * seq_len, channels);
    if (n.lse.size() != batch * n_head * seq_len) n.lse.resize(batch * n_head * seq_len);
    detail::parallel_for(batch * n_head, 2 * seq_len * seq_len * n.head_dim, [&](Index pair) {
        const Index b = pair / n_head, h = pair % n_head;
        detail::SquareMap<T> p = detail::attention_scratch<T>().probs(seq_len);
        n.probabilities(p, b, h, true);
        auto y = n.head(n.out, b, 0, h);
        y.noalias() = p.template triangularView<Eigen::Lower>() * n.head(*n.qkv->value, b, 2, h);
    });
    n.requires_grad = g.any_requires_grad(qkv);
    return Var<T>(&n);
}

}  // namespace lowrank
