#pragma once
// Text from a GPT-2: tokens drawn one at a time with a temperature and top-k. gpt2_sample
// runs the prompt once and then each new token through a key/value cache (Gpt2KvCache), at
// O(T) per token; gpt2_sample_uncached recomputes the forward pass over the whole window
// for each token (O(T^2)), the reference the cached path is tested against. Both see the
// same window, the last block_size tokens, so with the same generator they draw the same
// tokens: past block_size the cached path prefills the last block_size tokens again for
// each token (learned positions do not slide), which costs what the uncached path costs.
// Timings: docs/training.md, "Sampling".

#include <lowrank/autograd/graph.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/models/gpt2.hpp>
#include <lowrank/models/gpt2_kv_cache.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

struct SampleOptions {
    /// Logits are divided by this (> 0; small values approach greedy decoding).
    double temperature = 0.8;
    /// Draw among the k most likely tokens (0: among all).
    int top_k = 40;
};

namespace detail {

inline void check_sample_arguments(std::string_view what, std::size_t prompt_size, int n,
                                   const SampleOptions& options) {
    check(prompt_size > 0, what, "expected a prompt of at least one token");
    check(n >= 0, what, "expected n >= 0 tokens, got ", n);
    check(options.temperature > 0.0 && std::isfinite(options.temperature), what,
          "expected temperature > 0, got ", options.temperature);
    check(options.top_k >= 0, what, "expected top_k >= 0, got ", options.top_k);
}

/// Draws a token from one row of logits: softmax(logits / temperature) over the top_k
/// largest. `top` and `p` are scratch, kept by the caller so that a token allocates nothing.
template <class T, class Row>
std::int32_t draw_token(const Row& row, const SampleOptions& options, Rng& rng,
                        std::vector<std::pair<T, std::int32_t>>& top, std::vector<double>& p) {
    top.clear();
    for (Index v = 0; v < row.size(); ++v) top.emplace_back(row(v), static_cast<std::int32_t>(v));
    const std::size_t k = options.top_k > 0
                              ? std::min<std::size_t>(static_cast<std::size_t>(options.top_k), top.size())
                              : top.size();
    std::partial_sort(top.begin(), top.begin() + static_cast<std::ptrdiff_t>(k), top.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first; });
    double total = 0.0;
    p.assign(k, 0.0);
    for (std::size_t j = 0; j < k; ++j) {
        p[j] = std::exp((static_cast<double>(top[j].first) - static_cast<double>(top[0].first)) /
                        std::max(options.temperature, 1e-6));
        total += p[j];
    }
    double u = rng.uniform() * total;
    std::size_t pick = k - 1;
    for (std::size_t j = 0; j < k; ++j) {
        if (u < p[j]) {
            pick = j;
            break;
        }
        u -= p[j];
    }
    return top[pick].second;
}

}  // namespace detail

/// `prompt` (token ids, not empty) followed by `n` sampled tokens; returns only the new
/// ones. A prompt longer than block_size is cut to its last block_size tokens.
template <class T>
std::vector<std::int32_t> gpt2_sample(Gpt2<T>& model, std::vector<std::int32_t> prompt, int n,
                                      const SampleOptions& options, Rng& rng) {
    detail::check_sample_arguments("gpt2_sample", prompt.size(), n, options);
    std::vector<std::int32_t> ids = std::move(prompt);
    const std::size_t prompt_len = ids.size();
    if (n == 0) return {};
    ids.reserve(prompt_len + static_cast<std::size_t>(n));
    const auto block = static_cast<std::size_t>(model.config().block_size);
    const auto window = [&] {
        const std::size_t len = std::min(ids.size(), block);
        return std::span<const std::int32_t>(ids.data() + ids.size() - len, len);
    };
    Gpt2KvCache<T> cache(model);
    std::vector<std::pair<T, std::int32_t>> top;
    std::vector<double> p;
    const Matrix<T>* logits = &cache.prefill(window());
    for (int i = 0;; ++i) {
        ids.push_back(detail::draw_token<T>(logits->row(0), options, rng, top, p));
        if (i + 1 == n) break;
        logits = cache.full() ? &cache.prefill(window()) : &cache.append(ids.back());
    }
    return {ids.begin() + static_cast<std::ptrdiff_t>(prompt_len), ids.end()};
}

/// gpt2_sample without the cache: a forward over the last block_size tokens for each new
/// token. The same tokens as gpt2_sample for the same generator (up to ties in rounding).
template <class T>
std::vector<std::int32_t> gpt2_sample_uncached(Gpt2<T>& model, std::vector<std::int32_t> prompt, int n,
                                               const SampleOptions& options, Rng& rng) {
    detail::check_sample_arguments("gpt2_sample_uncached", prompt.size(), n, options);
    std::vector<std::int32_t> ids = std::move(prompt);
    const std::size_t prompt_len = ids.size();
    Graph<T> g;
    g.set_grad_enabled(false);
    g.set_training(false);
    const auto block = static_cast<std::size_t>(model.config().block_size);
    std::vector<std::pair<T, std::int32_t>> top;
    std::vector<double> p;
    for (int i = 0; i < n; ++i) {
        const std::size_t len = std::min(ids.size(), block);
        const std::span<const std::int32_t> window(ids.data() + ids.size() - len, len);
        g.clear();
        const auto logits = model.forward(g, window, 1, static_cast<Index>(len));
        ids.push_back(
            detail::draw_token<T>(logits.value().row(static_cast<Index>(len) - 1), options, rng, top, p));
    }
    return {ids.begin() + static_cast<std::ptrdiff_t>(prompt_len), ids.end()};
}

}  // namespace lowrank
