// Sampling with the key/value cache (Gpt2KvCache, gpt2_sample): the cached logits equal
// Gpt2::forward's at every position, for a prefill of every length followed by one token at
// a time, for the dense model, LoRA (LowRankLinear on a frozen base), SST (SpectralLinear),
// a model of every layer type and one without biases; gpt2_sample draws the same tokens as
// the uncached reference for the same seed, also past block_size (where the cached path
// prefills the window again); a full cache, a bad id and an empty prompt are refused.

#include <lowrank/models/gpt2.hpp>
#include <lowrank/models/gpt2_kv_cache.hpp>
#include <lowrank/models/gpt2_sample.hpp>

#include "../test_support.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_gpt2_sample {

using namespace lowrank;
using Catch::Contains;

/// 2 layers, 3 heads, C = 12, context 8, vocabulary 17.
Gpt2Config small_config(bool bias = true) {
    Gpt2Config c;
    c.name = "small";
    c.n_layer = 2;
    c.n_head = 3;
    c.n_embd = 12;
    c.block_size = 8;
    c.vocab_size = 17;
    c.bias = bias;
    return c;
}

const std::vector<std::int32_t> kIds{3, 1, 4, 1, 5, 9, 2, 6};  // T = block_size

enum class Variant { dense, lora, sst, every_type };

/// A model whose projections are all of one kind (or, every_type, one of each kind), with
/// every parameter random: LoRA's zero-started U and SST's frozen pairs matter too.
struct Model {
    Rng rng{5};
    Gpt2<double> model;

    explicit Model(Variant variant, bool bias = true) : model(small_config(bias), rng) {
        auto slots = model.layer_slots();
        for (std::size_t i = 0; i < slots.size(); ++i) {
            AnyLinear<double>& s = *slots[i].layer;
            const Index in = s.in_features(), out = s.out_features();
            const std::string name = s.name();
            const auto lora = [&] {
                s.replace(LowRankLinear<double>(
                    name, in, out, rng,
                    {.rank = 3, .bias = bias, .base = true, .scale = 2.0, .init = LowRankInit::lora}));
            };
            const auto sst = [&] { s.replace(SpectralLinear<double>(name, in, out, rng, {.rank = 4, .bias = bias})); };
            if (variant == Variant::lora) lora();
            if (variant == Variant::sst) sst();
            if (variant == Variant::every_type) {
                switch (i % 5) {
                    case 0: lora(); break;
                    case 1: sst(); break;
                    case 2:
                        s.replace(IncrementalRankLinear<double>(name, in, out, rng,
                                                                {.rank = 2, .capacity = 4, .bias = bias}));
                        break;
                    case 3:
                        s.replace(DeepLowRankLinear<double>(name, in, out, rng,
                                                            {.depth = 3, .bias = bias, .base = true}));
                        break;
                    default: break;  // dense
                }
            }
        }
        std::uint64_t seed = 100;
        for (auto* p : model.parameters()) p->value = test::gaussian(p->rows(), p->cols(), seed++) * 0.3;
    }
};

MatrixD full_forward(Gpt2<double>& model, const std::vector<std::int32_t>& ids) {
    Graph<double> g;
    g.set_grad_enabled(false);
    g.set_training(false);
    return model.forward(g, ids, 1, static_cast<Index>(ids.size())).value();
}

double max_abs_diff(const MatrixD& a, const MatrixD& b) {
    REQUIRE(a.rows() == b.rows());
    REQUIRE(a.cols() == b.cols());
    return (a - b).cwiseAbs().maxCoeff();
}

/// For every prefill length k: prefill kIds[0, k), then append the rest one at a time; each
/// position's logits against the full forward's row.
void check_cached_logits(Gpt2<double>& model) {
    const MatrixD reference = full_forward(model, kIds);
    const Index T = reference.rows();
    REQUIRE(reference.cwiseAbs().maxCoeff() > 1e-3);  // logits that are not all zero
    Gpt2KvCache<double> cache(model);
    CHECK(max_abs_diff(cache.prefill(kIds, true), reference) < 1e-12);
    CHECK(cache.full());
    for (Index k = 1; k <= T; ++k) {
        const std::vector<std::int32_t> head(kIds.begin(), kIds.begin() + k);
        INFO("prefill of " << k << " tokens");
        CHECK(max_abs_diff(cache.prefill(head), reference.middleRows(k - 1, 1)) < 1e-12);
        CHECK(cache.length() == k);
        for (Index t = k; t < T; ++t) {
            INFO("token at position " << t);
            CHECK(max_abs_diff(cache.append(kIds[static_cast<std::size_t>(t)]), reference.middleRows(t, 1)) <
                  1e-12);
        }
        CHECK(cache.length() == T);
    }
}

TEST_CASE("Gpt2KvCache logits equal the full forward's at every position: dense", "[models][gpt2][sample]") {
    Model m(Variant::dense);
    check_cached_logits(m.model);
}

TEST_CASE("Gpt2KvCache logits equal the full forward's at every position: LoRA", "[models][gpt2][sample]") {
    Model m(Variant::lora);
    REQUIRE(std::string(m.model.blocks()[0].c_fc.kind()) == "low_rank");
    check_cached_logits(m.model);
}

TEST_CASE("Gpt2KvCache logits equal the full forward's at every position: SST", "[models][gpt2][sample]") {
    Model m(Variant::sst);
    REQUIRE(std::string(m.model.blocks()[0].c_fc.kind()) == "spectral");
    check_cached_logits(m.model);
}

TEST_CASE("Gpt2KvCache logits equal the full forward's at every position: every layer type, no biases",
          "[models][gpt2][sample]") {
    Model m(Variant::every_type);
    check_cached_logits(m.model);
    Model no_bias(Variant::every_type, false);
    check_cached_logits(no_bias.model);
}

TEST_CASE("gpt2_sample draws the tokens of the uncached reference for a fixed seed, past block_size too",
          "[models][gpt2][sample]") {
    for (const Variant v : {Variant::dense, Variant::lora, Variant::sst}) {
        Model m(v);
        for (const SampleOptions options : {SampleOptions{.temperature = 1.0, .top_k = 0},
                                            SampleOptions{.temperature = 0.7, .top_k = 5}}) {
            // A prompt of 3 tokens and 20 new ones: the window fills at 8 and then slides.
            const std::vector<std::int32_t> prompt{2, 7, 1};
            Rng a(42), b(42);
            const auto cached = gpt2_sample(m.model, prompt, 20, options, a);
            const auto uncached = gpt2_sample_uncached(m.model, prompt, 20, options, b);
            INFO("variant " << static_cast<int>(v) << ", top_k " << options.top_k);
            REQUIRE(cached.size() == 20);
            CHECK(cached == uncached);
            CHECK(a.next_u64() == b.next_u64());  // both drew one number per token
            // A prompt longer than block_size is cut to its last block_size tokens.
            const std::vector<std::int32_t> long_prompt{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
            Rng c(3), d(3);
            CHECK(gpt2_sample(m.model, long_prompt, 4, options, c) ==
                  gpt2_sample_uncached(m.model, long_prompt, 4, options, d));
        }
        // Another seed draws other tokens (the comparison above can tell them apart).
        Rng a(42), b(43);
        CHECK(gpt2_sample(m.model, {2, 7, 1}, 20, {.temperature = 1.0, .top_k = 0}, a) !=
              gpt2_sample(m.model, {2, 7, 1}, 20, {.temperature = 1.0, .top_k = 0}, b));
    }
}

TEST_CASE("Gpt2KvCache refuses a full cache, a bad id and an empty prompt, naming what it expected",
          "[models][gpt2][sample]") {
    Model m(Variant::dense);
    Gpt2KvCache<double> cache(m.model);
    CHECK(cache.capacity() == 8);
    cache.prefill(kIds);
    CHECK_THROWS_WITH(cache.append(1), Contains("expected at most block_size = 8 positions, got 8 cached + 1 new"));
    cache.prefill(std::vector<std::int32_t>{3, 1});
    CHECK_THROWS_WITH(cache.append(17), Contains("token id at position 0 must be in [0, 17) (vocab_size), got 17"));
    CHECK_THROWS_WITH(cache.prefill(std::vector<std::int32_t>{}), Contains("expected at least one token"));
    const std::vector<std::int32_t> too_long(9, 1);
    CHECK_THROWS_WITH(cache.prefill(too_long), Contains("got 0 cached + 9 new"));
    Rng rng(1);
    CHECK_THROWS_WITH(gpt2_sample(m.model, {}, 3, {}, rng), Contains("expected a prompt of at least one token"));
    CHECK(gpt2_sample(m.model, {1}, 0, {}, rng).empty());
}

}  // namespace test_gpt2_sample
