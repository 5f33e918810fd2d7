#pragma once
// Text from a GPT-2: tokens drawn one at a time with a temperature and top-k, the forward
// pass recomputed over the last block_size tokens for each new one (no key/value cache:
// sampling here is for looking at a trained model, not for serving it).

#include <lowrank/autograd/graph.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/models/gpt2.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace lowrank {

struct SampleOptions {
    /// Logits are divided by this (> 0; small values approach greedy decoding).
    double temperature = 0.8;
    /// Draw among the k most likely tokens (0: among all).
    int top_k = 40;
};

/// `prompt` (token ids, not empty) followed by `n` sampled tokens; returns only the new ones.
template <class T>
std::vector<std::int32_t> gpt2_sample(Gpt2<T>& model, std::vector<std::int32_t> prompt, int n,
                                      const SampleOptions& options, Rng& rng) {
    constexpr std::string_view what = "gpt2_sample";
    check(!prompt.empty(), what, "expected a prompt of at least one token");
    check(n >= 0, what, "expected n >= 0 tokens, got ", n);
    check(options.temperature > 0.0 && std::isfinite(options.temperature), what,
          "expected temperature > 0, got ", options.temperature);
    check(options.top_k >= 0, what, "expected top_k >= 0, got ", options.top_k);
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
        const auto row = logits.value().row(static_cast<Index>(len) - 1);
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
        ids.push_back(top[pick].second);
    }
    return {ids.begin() + static_cast<std::ptrdiff_t>(prompt_len), ids.end()};
}

}  // namespace lowrank
