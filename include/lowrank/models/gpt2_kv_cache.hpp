#pragma once
// Inference with a key/value cache for Gpt2: a prompt is run once (prefill), and each new
// token then costs one row through every layer, its attention reading the keys and values
// of the earlier positions from the cache instead of recomputing them: O(T) per token
// against the O(T^2) of a forward over the whole window. Forward only: nothing is recorded
// for a backward pass, dropout is off. The projections go through each slot's own forward
// (dense, LowRankLinear, SpectralLinear, IncrementalRankLinear, DeepLowRankLinear) on the
// new rows, so a cached model computes what Gpt2::forward computes, up to rounding.
//
// The cache holds block_size positions, allocated when it is made; the tape of the
// per-token pass is reused, so after the first token of a given shape nothing is allocated.
// A cache is full at block_size tokens: learned position embeddings have no position past
// it, and the window cannot slide without recomputing every key (each one depends on its
// position), so going on means a new prefill of the last tokens (gpt2_sample does this).

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_activation.hpp>
#include <lowrank/autograd/ops_basic.hpp>
#include <lowrank/autograd/ops_linear.hpp>
#include <lowrank/autograd/ops_norm.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/models/gpt2.hpp>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

namespace lowrank {

template <class T>
class Gpt2KvCache {
public:
    /// A cache of model.config().block_size positions for `model`, which must outlive it
    /// and keep its layers (a policy that swaps a slot invalidates the cache's contents,
    /// not the cache: prefill again).
    explicit Gpt2KvCache(Gpt2<T>& model) : model_(&model) {
        const Gpt2Config& c = model.config();
        keys_.resize(static_cast<std::size_t>(c.n_layer));
        values_.resize(static_cast<std::size_t>(c.n_layer));
        for (std::size_t l = 0; l < keys_.size(); ++l) {
            keys_[l].setZero(c.block_size, c.n_embd);
            values_[l].setZero(c.block_size, c.n_embd);
        }
        positions_.resize(static_cast<std::size_t>(c.block_size));
        std::iota(positions_.begin(), positions_.end(), 0);
        scores_.resize(c.block_size);
        attended_.resize(c.block_size, c.n_embd);
        g_.set_grad_enabled(false);
        g_.set_training(false);
    }
    Gpt2KvCache(const Gpt2KvCache&) = delete;
    Gpt2KvCache& operator=(const Gpt2KvCache&) = delete;
    Gpt2KvCache(Gpt2KvCache&&) = delete;
    Gpt2KvCache& operator=(Gpt2KvCache&&) = delete;
    ~Gpt2KvCache() = default;

    /// Empties the cache and runs `ids` (1 to block_size tokens) at positions 0, 1, ...
    /// Returns the logits of the last position (1 x V), or with `all_positions` of every
    /// one (T x V, row t = Gpt2::forward's row t). The reference is valid until the next
    /// call.
    const Matrix<T>& prefill(std::span<const std::int32_t> ids, bool all_positions = false) {
        check(!ids.empty(), "Gpt2KvCache::prefill", "expected at least one token, got none");
        length_ = 0;
        return advance(ids, all_positions);
    }

    /// Appends token `id` at position length() and returns its logits (1 x V), valid until
    /// the next call. Throws when the cache is full (length() == block_size).
    const Matrix<T>& append(std::int32_t id) { return advance(std::span<const std::int32_t>(&id, 1), false); }

    /// Positions held: the next token goes at this position.
    Index length() const { return length_; }
    /// block_size: the most positions the cache holds.
    Index capacity() const { return model_->config().block_size; }
    bool full() const { return length_ == capacity(); }
    void clear() { length_ = 0; }

private:
    /// Runs `ids` at positions length() ... length() + n - 1 through the model, writing
    /// their keys and values into the cache.
    const Matrix<T>& advance(std::span<const std::int32_t> ids, bool all_positions) {
        const Gpt2Config& c = model_->config();
        const Index n = static_cast<Index>(ids.size());
        const Index at = length_;
        check(at + n <= c.block_size, "Gpt2KvCache", "expected at most block_size = ", c.block_size,
              " positions, got ", at, " cached + ", n, " new (prefill the last tokens again to go on)");
        for (std::size_t i = 0; i < ids.size(); ++i)
            check(ids[i] >= 0 && ids[i] < c.vocab_size, "Gpt2KvCache", "token id at position ", i,
                  " must be in [0, ", c.vocab_size, ") (vocab_size), got ", ids[i]);
        const Index ch = c.n_embd, hd = c.n_embd / c.n_head;
        const T scale = T(1) / std::sqrt(static_cast<T>(hd));

        g_.clear();
        const Var<T> wte = g_.param(model_->wte());
        const std::span<const std::int32_t> positions(positions_.data() + at, static_cast<std::size_t>(n));
        Var<T> x = add(g_, embedding(g_, wte, ids), embedding(g_, g_.param(model_->wpe()), positions));
        std::size_t l = 0;
        for (auto& b : model_->blocks()) {
            const Var<T> qkv = b.c_attn.forward(g_, norm(x, b.ln_1_weight, b.ln_1_bias));
            const Matrix<T>& qkv_v = qkv.value();
            Matrix<T>& keys = keys_[l];
            Matrix<T>& values = values_[l];
            keys.middleRows(at, n) = qkv_v.middleCols(ch, ch);
            values.middleRows(at, n) = qkv_v.middleCols(2 * ch, ch);
            // Row i (position at + i) attends to positions 0 ... at + i, one head at a time:
            // s = K q / sqrt(hd), p = softmax(s), y = V^T p.
            for (Index i = 0; i < n; ++i) {
                const Index len = at + i + 1;
                for (Index h = 0; h < c.n_head; ++h) {
                    auto s = scores_.head(len);
                    s.noalias() = keys.block(0, h * hd, len, hd) * qkv_v.row(i).segment(h * hd, hd).transpose();
                    s *= scale;
                    const T m = s.maxCoeff();
                    s = (s.array() - m).exp();
                    s /= s.sum();
                    attended_.row(i).segment(h * hd, hd).noalias() =
                        s.transpose() * values.block(0, h * hd, len, hd);
                }
            }
            const Var<T> y = g_.input(attended_.topRows(n));
            x = add(g_, x, b.attn_c_proj.forward(g_, y));
            const Var<T> m = gelu(g_, b.c_fc.forward(g_, norm(x, b.ln_2_weight, b.ln_2_bias)));
            x = add(g_, x, b.mlp_c_proj.forward(g_, m));
            ++l;
        }
        length_ = at + n;
        if (!all_positions && n > 1) x = g_.input(x.value().bottomRows(1));
        // The LM head is the token embedding, transposed, as in Gpt2::forward.
        return linear(g_, norm(x, model_->ln_f_weight(), model_->ln_f_bias()), wte).value();
    }

    Var<T> norm(const Var<T>& x, Parameter<T>& weight, Parameter<T>& bias) {
        return layer_norm(g_, x, g_.param(weight), model_->config().bias ? g_.param(bias) : Var<T>{},
                          Gpt2<T>::kLayerNormEps);
    }

    Gpt2<T>* model_;
    std::vector<Matrix<T>> keys_, values_;  // per layer (block_size x C), head h in columns [h*hd, (h+1)*hd)
    std::vector<std::int32_t> positions_;   // 0 ... block_size - 1, for the position embedding
    Vector<T> scores_;                      // one head's scores over the cached positions
    Matrix<T> attended_;                    // the attention output of the new rows (n x C)
    Graph<T> g_;
    Index length_ = 0;
};

}  // namespace lowrank
