#pragma once
// GPT-2: token + learned position embeddings, pre-LayerNorm transformer blocks with fused
// causal self-attention and a GELU MLP, a final LayerNorm and an LM head tied to the token
// embedding. Shapes and parameter names are those of a PyTorch GPT-2 written with
// nn.Linear (nanoGPT's state_dict), so published weights map one to one. The four
// projections of each block sit in AnyLinear slots with roles, so that a rank policy can
// make any of them low-rank. Guide: docs/models/gpt2.md.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_activation.hpp>
#include <lowrank/autograd/ops_attention.hpp>
#include <lowrank/autograd/ops_basic.hpp>
#include <lowrank/autograd/ops_linear.hpp>
#include <lowrank/autograd/ops_linear_cross_entropy.hpp>
#include <lowrank/autograd/ops_loss.hpp>
#include <lowrank/autograd/ops_norm.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/nn/any_linear.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

/// The roles of a block's four projections, as layer_slots() reports them.
inline constexpr std::array<std::string_view, 4> kGpt2Roles{"attn_qkv", "attn_proj", "mlp_fc", "mlp_proj"};

/// The names gpt2_config() knows.
inline constexpr std::array<std::string_view, 7> kGpt2ConfigNames{"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
                                                                  "tiny", "mini",        "micro"};

struct Gpt2Config {
    std::string name = "gpt2";
    Index n_layer = 12;
    Index n_head = 12;
    Index n_embd = 768;
    Index block_size = 1024;  // longest context: rows of the position embedding
    Index vocab_size = 50257;
    bool bias = true;      // biases in the projections and the LayerNorms
    double dropout = 0.0;  // after the embedding sum and after each residual projection
    /// The projection roles (kGpt2Roles) a low-rank method applies to by default.
    std::vector<std::string> low_rank_roles = {"mlp_fc", "mlp_proj"};

    /// Throws unless every size is positive, n_embd is divisible by n_head, dropout is in
    /// [0, 1) and every low-rank role is one of kGpt2Roles.
    void validate() const {
        const std::string what = "Gpt2Config '" + name + "'";
        check(n_layer > 0, what, "expected n_layer > 0, got ", n_layer);
        check(n_head > 0, what, "expected n_head > 0, got ", n_head);
        check(n_embd > 0, what, "expected n_embd > 0, got ", n_embd);
        check(n_embd % n_head == 0, what, "expected n_embd divisible by n_head, got n_embd = ", n_embd,
              ", n_head = ", n_head);
        check(block_size > 0, what, "expected block_size > 0, got ", block_size);
        check(vocab_size > 0 && vocab_size <= std::numeric_limits<std::int32_t>::max(), what,
              "expected vocab_size in [1, ", std::numeric_limits<std::int32_t>::max(),
              "] (ids are int32), got ", vocab_size);
        check(dropout >= 0.0 && dropout < 1.0, what, "expected dropout in [0, 1), got ", dropout);
        for (const auto& role : low_rank_roles) {
            bool known = false;
            for (const auto r : kGpt2Roles) known = known || r == role;
            check(known, what, "low_rank_roles: expected one of attn_qkv, attn_proj, mlp_fc, mlp_proj, got '",
                  role, "'");
        }
    }
};

/// The published GPT-2 sizes ("gpt2" 124M, "gpt2-medium" 350M, "gpt2-large" 774M, "gpt2-xl"
/// 1.5B), all with context 1024 and vocabulary 50257, and small ones for CPU runs: "tiny"
/// (4 layers, 4 heads, 256 wide, context 128), "mini" (2, 2, 128, context 64) and "micro"
/// (2, 2, 16, context 32), for tests of whole runs where every step is costly (under
/// sanitizers). All keep GPT-2's vocabulary, so they train on the same token files.
inline Gpt2Config gpt2_config(std::string_view name) {
    auto make = [&](Index layers, Index heads, Index embd, Index block) {
        Gpt2Config c;
        c.name = std::string(name);
        c.n_layer = layers;
        c.n_head = heads;
        c.n_embd = embd;
        c.block_size = block;
        return c;
    };
    if (name == "gpt2") return make(12, 12, 768, 1024);
    if (name == "gpt2-medium") return make(24, 16, 1024, 1024);
    if (name == "gpt2-large") return make(36, 20, 1280, 1024);
    if (name == "gpt2-xl") return make(48, 25, 1600, 1024);
    if (name == "tiny") return make(4, 4, 256, 128);
    if (name == "mini") return make(2, 2, 128, 64);
    if (name == "micro") return make(2, 2, 16, 32);
    std::string known;
    for (const auto n : kGpt2ConfigNames) known += (known.empty() ? "" : ", ") + std::string(n);
    throw Error(detail::concat("gpt2_config: unknown configuration '", name, "'; known: ", known));
}

/// One transformer block: x += attn(ln_1(x)); x += mlp(ln_2(x)).
template <class T>
struct Gpt2Block {
    Parameter<T> ln_1_weight, ln_1_bias;  // (1 x C); the bias is empty without config.bias
    AnyLinear<T> c_attn;                  // attn.c_attn (3C x C), role attn_qkv
    AnyLinear<T> attn_c_proj;             // attn.c_proj (C x C), role attn_proj
    Parameter<T> ln_2_weight, ln_2_bias;
    AnyLinear<T> c_fc;        // mlp.c_fc (4C x C), role mlp_fc
    AnyLinear<T> mlp_c_proj;  // mlp.c_proj (C x 4C), role mlp_proj
};

template <class T>
class Gpt2 {
public:
    /// The LayerNorms' epsilon (PyTorch's default, as GPT-2's).
    static constexpr double kLayerNormEps = 1e-5;

    /// Builds the model with GPT-2's initialisation, drawing from `rng` in this order: wte,
    /// wpe, then per block the weights of c_attn, attn.c_proj, c_fc, mlp.c_proj. Weights
    /// and embeddings are N(0, 0.02), the two residual projections N(0, 0.02 / sqrt(2 L));
    /// biases 0, LayerNorm gains 1.
    Gpt2(Gpt2Config config, Rng& rng) : config_(std::move(config)), w_(std::make_unique<Weights>()) {
        config_.validate();
        const Index c = config_.n_embd;
        const double std_base = 0.02;
        const double std_residual = 0.02 / std::sqrt(2.0 * static_cast<double>(config_.n_layer));
        w_->wte = Parameter<T>("transformer.wte.weight", Matrix<T>(config_.vocab_size, c));
        init::normal<T>(w_->wte.value, rng, 0.0, std_base);
        w_->wpe = Parameter<T>("transformer.wpe.weight", Matrix<T>(config_.block_size, c));
        init::normal<T>(w_->wpe.value, rng, 0.0, std_base);
        w_->blocks.reserve(static_cast<std::size_t>(config_.n_layer));  // slots are referenced by address
        for (Index i = 0; i < config_.n_layer; ++i) {
            const std::string prefix = "transformer.h." + std::to_string(i) + ".";
            auto c_attn = make_linear(prefix + "attn.c_attn", c, 3 * c, rng, std_base);
            auto attn_c_proj = make_linear(prefix + "attn.c_proj", c, c, rng, std_residual);
            auto c_fc = make_linear(prefix + "mlp.c_fc", c, 4 * c, rng, std_base);
            auto mlp_c_proj = make_linear(prefix + "mlp.c_proj", 4 * c, c, rng, std_residual);
            w_->blocks.push_back(Gpt2Block<T>{
                .ln_1_weight = Parameter<T>(prefix + "ln_1.weight", Matrix<T>::Ones(1, c)),
                .ln_1_bias = norm_bias(prefix + "ln_1.bias"),
                .c_attn = AnyLinear<T>(std::move(c_attn)),
                .attn_c_proj = AnyLinear<T>(std::move(attn_c_proj)),
                .ln_2_weight = Parameter<T>(prefix + "ln_2.weight", Matrix<T>::Ones(1, c)),
                .ln_2_bias = norm_bias(prefix + "ln_2.bias"),
                .c_fc = AnyLinear<T>(std::move(c_fc)),
                .mlp_c_proj = AnyLinear<T>(std::move(mlp_c_proj)),
            });
        }
        w_->ln_f_weight = Parameter<T>("transformer.ln_f.weight", Matrix<T>::Ones(1, c));
        w_->ln_f_bias = norm_bias("transformer.ln_f.bias");
    }
    Gpt2(const Gpt2&) = delete;
    Gpt2& operator=(const Gpt2&) = delete;
    // Parameters live on the heap: a moved model keeps their addresses and ids.
    Gpt2(Gpt2&&) noexcept = default;
    Gpt2& operator=(Gpt2&&) noexcept = default;
    ~Gpt2() = default;

    /// Logits (B*T x V) for `ids` (B*T tokens, row b*T + t is position t of sequence b).
    Var<T> forward(Graph<T>& g, std::span<const std::int32_t> ids, Index batch, Index seq_len) {
        const Var<T> wte = g.param(w_->wte);
        const Var<T> h = hidden(g, wte, ids, batch, seq_len);
        // The LM head is the token embedding, transposed: logits = h * wte^T.
        return linear(g, h, wte);
    }

    /// Mean cross-entropy of the next-token predictions against `targets` (B*T ids; rows
    /// whose target is kIgnoreIndex are skipped). The head and the loss are one node
    /// (linear_cross_entropy): the (B*T x V) logits are never stored whole, only a chunk of
    /// tokens at a time. Equal to cross_entropy(forward(...)) within rounding.
    Var<T> loss(Graph<T>& g, std::span<const std::int32_t> ids, std::span<const std::int32_t> targets,
                Index batch, Index seq_len) {
        check(static_cast<Index>(targets.size()) == batch * seq_len, "Gpt2::loss", "expected B*T = ", batch,
              "*", seq_len, " = ", batch * seq_len, " targets, got ", targets.size());
        const Var<T> wte = g.param(w_->wte);
        return linear_cross_entropy(g, hidden(g, wte, ids, batch, seq_len), wte, targets);
    }

    /// Every parameter in the order of a PyTorch GPT-2's state_dict (the tied head has no
    /// entry of its own). Re-read it after a policy swaps a slot.
    ParameterList<T> parameters() {
        ParameterList<T> out{&w_->wte, &w_->wpe};
        for (auto& b : w_->blocks) {
            add_norm(out, b.ln_1_weight, b.ln_1_bias);
            for (auto* p : b.c_attn.parameters()) out.push_back(p);
            for (auto* p : b.attn_c_proj.parameters()) out.push_back(p);
            add_norm(out, b.ln_2_weight, b.ln_2_bias);
            for (auto* p : b.c_fc.parameters()) out.push_back(p);
            for (auto* p : b.mlp_c_proj.parameters()) out.push_back(p);
        }
        add_norm(out, w_->ln_f_weight, w_->ln_f_bias);
        return out;
    }

    /// The four projections of every block with their roles (kGpt2Roles), block by block.
    std::vector<LayerSlot<T>> layer_slots() {
        std::vector<LayerSlot<T>> out;
        out.reserve(4 * w_->blocks.size());
        for (auto& b : w_->blocks) {
            out.push_back({&b.c_attn, std::string(kGpt2Roles[0])});
            out.push_back({&b.attn_c_proj, std::string(kGpt2Roles[1])});
            out.push_back({&b.c_fc, std::string(kGpt2Roles[2])});
            out.push_back({&b.mlp_c_proj, std::string(kGpt2Roles[3])});
        }
        return out;
    }

    const Gpt2Config& config() const { return config_; }

    /// Scalars in the parameters as they are now (after a policy's conversions too).
    Index parameter_count() { return count_parameters(parameters()); }

    /// Scalars in the dense model of `config`, without building it; the tied head is
    /// counted once (as part of wte).
    static Index parameter_count(const Gpt2Config& config) {
        config.validate();
        const Index c = config.n_embd;
        const Index b = config.bias ? 1 : 0;
        const Index norm = c + b * c;
        const Index block = 2 * norm + (3 * c * c + b * 3 * c) + (c * c + b * c) + (4 * c * c + b * 4 * c) +
                            (4 * c * c + b * c);
        return config.vocab_size * c + config.block_size * c + config.n_layer * block + norm;
    }

    Parameter<T>& wte() { return w_->wte; }
    Parameter<T>& wpe() { return w_->wpe; }
    Parameter<T>& ln_f_weight() { return w_->ln_f_weight; }
    Parameter<T>& ln_f_bias() { return w_->ln_f_bias; }
    std::vector<Gpt2Block<T>>& blocks() { return w_->blocks; }
    const std::vector<Gpt2Block<T>>& blocks() const { return w_->blocks; }

private:
    struct Weights {
        Parameter<T> wte, wpe;
        std::vector<Gpt2Block<T>> blocks;
        Parameter<T> ln_f_weight, ln_f_bias;
    };

    Linear<T> make_linear(const std::string& name, Index in, Index out, Rng& rng, double stddev) const {
        // Linear draws PyTorch's default initialisation; GPT-2's replaces it, so those
        // draws come from a throwaway generator and `rng` sees only GPT-2's.
        Rng discarded(0);
        Linear<T> layer(name, in, out, discarded, LinearOptions{.bias = config_.bias});
        init::normal<T>(layer.weight.value, rng, 0.0, stddev);
        if (config_.bias) layer.bias.value.setZero();
        return layer;
    }

    Parameter<T> norm_bias(const std::string& name) const {
        return config_.bias ? Parameter<T>(name, Matrix<T>::Zero(1, config_.n_embd)) : Parameter<T>();
    }

    void add_norm(ParameterList<T>& out, Parameter<T>& weight, Parameter<T>& bias) const {
        out.push_back(&weight);
        if (config_.bias) out.push_back(&bias);
    }

    Var<T> norm(Graph<T>& g, const Var<T>& x, Parameter<T>& weight, Parameter<T>& bias) const {
        return layer_norm(g, x, g.param(weight), config_.bias ? g.param(bias) : Var<T>{}, kLayerNormEps);
    }

    /// The final hidden state ln_f(x) (B*T x C).
    Var<T> hidden(Graph<T>& g, const Var<T>& wte, std::span<const std::int32_t> ids, Index batch,
                  Index seq_len) {
        check(batch > 0, "Gpt2::forward", "expected a positive batch size B, got ", batch);
        check(seq_len > 0 && seq_len <= config_.block_size, "Gpt2::forward",
              "expected sequence length T in [1, ", config_.block_size, "] (block_size), got ", seq_len);
        check(static_cast<Index>(ids.size()) == batch * seq_len, "Gpt2::forward", "expected B*T = ", batch,
              "*", seq_len, " = ", batch * seq_len, " token ids, got ", ids.size());
        for (std::size_t i = 0; i < ids.size(); ++i)
            check(ids[i] >= 0 && ids[i] < config_.vocab_size, "Gpt2::forward", "token id at position ", i,
                  " must be in [0, ", config_.vocab_size, ") (vocab_size), got ", ids[i]);
        update_positions(batch, seq_len);

        const double p = config_.dropout;
        Var<T> x = add(g, embedding(g, wte, ids), embedding(g, g.param(w_->wpe), positions_));
        x = dropout(g, x, p);
        for (auto& b : w_->blocks) {
            Var<T> a = b.c_attn.forward(g, norm(g, x, b.ln_1_weight, b.ln_1_bias));
            a = causal_self_attention(g, a, batch, seq_len, config_.n_head);
            a = dropout(g, b.attn_c_proj.forward(g, a), p);
            x = add(g, x, a);
            Var<T> m = gelu(g, b.c_fc.forward(g, norm(g, x, b.ln_2_weight, b.ln_2_bias)));
            m = dropout(g, b.mlp_c_proj.forward(g, m), p);
            x = add(g, x, m);
        }
        return norm(g, x, w_->ln_f_weight, w_->ln_f_bias);
    }

    /// Position ids b*T + t -> t, rebuilt only when the batch shape changes.
    void update_positions(Index batch, Index seq_len) {
        if (static_cast<Index>(positions_.size()) == batch * seq_len && positions_seq_len_ == seq_len) return;
        positions_.resize(static_cast<std::size_t>(batch * seq_len));
        for (Index i = 0; i < batch * seq_len; ++i)
            positions_[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i % seq_len);
        positions_seq_len_ = seq_len;
    }

    Gpt2Config config_;
    std::unique_ptr<Weights> w_;
    std::vector<std::int32_t> positions_;
    Index positions_seq_len_ = 0;
};

}  // namespace lowrank
