// Every layer type's dense_weight() is what its forward computes, and merged_linear /
// compact_linear (nn/merge.hpp) compute the same function as the layer they replace.
#include "factored_layer_helpers.hpp"

#include <lowrank/nn/merge.hpp>

#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_merge {

using namespace lowrank;
using namespace lowrank::test;

/// Sets every parameter of the layer to a random value, so that no factor is zero (LoRA's
/// U starts at zero) and the frozen parts count too.
void randomise(AnyLinear<double>& slot, std::uint64_t seed) {
    for (auto* p : slot.parameters()) p->value = gaussian(p->rows(), p->cols(), seed++);
}

/// Each layer type in the forms the methods leave it in: with and without base and bias,
/// with active columns below capacity, compressed.
std::vector<AnyLinear<double>> every_layer_kind() {
    Rng rng(90);
    const Index in = 12, out = 9;
    std::vector<AnyLinear<double>> out_layers;
    out_layers.emplace_back(Linear<double>("dense", in, out, rng));
    out_layers.emplace_back(Linear<double>("dense_nobias", in, out, rng, {.bias = false}));
    out_layers.emplace_back(LowRankLinear<double>("low_rank", in, out, rng, {.rank = 3}));
    // LoRA / ReLoRA: W0 + (alpha / r) U V^T
    out_layers.emplace_back(LowRankLinear<double>(
        "lora", in, out, rng, {.rank = 2, .base = true, .scale = 16.0 / 2, .init = LowRankInit::lora}));
    out_layers.emplace_back(LowRankLinear<double>("lora_nobias", in, out, rng,
                                                  {.rank = 4, .bias = false, .base = true, .scale = 0.5}));
    out_layers.emplace_back(SpectralLinear<double>("sst", in, out, rng, {.rank = 3}));
    out_layers.emplace_back(IncrementalRankLinear<double>("inrank", in, out, rng, {.rank = 2, .capacity = 4}));
    out_layers.emplace_back(
        IncrementalRankLinear<double>("inrank_base", in, out, rng, {.rank = 3, .capacity = 4, .base = true}));
    out_layers.emplace_back(DeepLowRankLinear<double>("deep", in, out, rng, {.depth = 3, .width = 5}));
    out_layers.emplace_back(
        DeepLowRankLinear<double>("deep_base", in, out, rng, {.depth = 3, .epsilon = 0.5, .base = true}));
    DeepLowRankLinear<double> compressed("deep_compressed", in, out, rng, {.depth = 3, .epsilon = 0.5});
    compressed.compress(2, gaussian(compressed.factors().front().rows(), in, 91));
    out_layers.emplace_back(std::move(compressed));
    std::uint64_t seed = 100;
    for (auto& l : out_layers) {
        randomise(l, seed);
        seed += 10;
    }
    // SST's active block after a swap, and a zero singular value (which adds nothing).
    auto& sst = out_layers[5].get<SpectralLinear<double>>();
    sst.activate({0, 4, 7});
    sst.sigma.value(0, 8) = 0.0;
    return out_layers;
}

MatrixD through(AnyLinear<double>& slot, const MatrixD& x) {
    Graph<double> g;
    return slot.forward(g, g.input(x)).value();
}

MatrixD dense_formula(const AnyLinear<double>& slot, const MatrixD& x) {
    MatrixD y = x * slot.dense_weight().transpose();
    if (slot.bias()) y.rowwise() += slot.bias()->row(0);
    return y;
}

TEST_CASE("every layer type's dense_weight is what its forward computes: x W^T + b", "[nn][merge]") {
    const MatrixD x = gaussian(7, 12, 5);
    for (auto& slot : every_layer_kind()) {
        INFO(slot.name() << " (" << slot.kind() << ")");
        const MatrixD y = through(slot, x);
        CHECK((y - dense_formula(slot, x)).norm() <= 1e-12 * (1.0 + y.norm()));
    }
}

TEST_CASE("merged_linear and compact_linear compute the layer's function under its name", "[nn][merge]") {
    const MatrixD x = gaussian(7, 12, 6);
    // What compact_linear makes of each (in every_layer_kind's order): the factored form
    // where k (m + n) < m n (k = 3: 63 < 108), dense where the layer has a base or its
    // rank is too high (SpectralLinear's 8 non-zero pairs: 168 >= 108).
    const std::vector<std::string> compact_kinds = {"dense", "dense",    "low_rank", "dense", "dense",   "dense",
                                                    "low_rank", "dense", "low_rank", "dense", "low_rank"};
    auto layers = every_layer_kind();
    REQUIRE(layers.size() == compact_kinds.size());
    for (std::size_t i = 0; i < layers.size(); ++i) {
        auto& slot = layers[i];
        INFO(slot.name() << " (" << slot.kind() << ")");
        const MatrixD y = through(slot, x);
        AnyLinear<double> merged(merged_linear(slot));
        CHECK(merged.name() == slot.name());
        CHECK((merged.bias() != nullptr) == (slot.bias() != nullptr));
        CHECK((through(merged, x) - y).norm() <= 1e-12 * (1.0 + y.norm()));
        AnyLinear<double> compact = compact_linear(slot);
        CHECK(std::string(compact.kind()) == compact_kinds[i]);
        CHECK(compact.name() == slot.name());
        CHECK(compact.flops_per_token() <= merged.flops_per_token());
        CHECK((through(compact, x) - y).norm() <= 1e-12 * (1.0 + y.norm()));
        if (slot.holds<LowRankLinear<double>>() && compact.holds<LowRankLinear<double>>()) {
            // Kept as it is, scale included: the same bits.
            const auto& a = slot.get<LowRankLinear<double>>();
            const auto& b = compact.get<LowRankLinear<double>>();
            CHECK(a.U.value == b.U.value);
            CHECK(a.V.value == b.V.value);
            CHECK(a.scale() == b.scale());
        }
        std::vector<std::string> names;
        for (auto* p : compact.parameters()) names.push_back(p->name());
        if (compact.holds<Linear<double>>())
            CHECK(names.front() == slot.name() + ".weight");
        else
            CHECK(names.front() == slot.name() + ".U");
    }
}

TEST_CASE("replace_layer puts a compact layer into the slot it came from", "[nn][merge]") {
    auto layers = every_layer_kind();
    auto& slot = layers[3];  // LoRA
    const MatrixD x = gaussian(3, 12, 7);
    const MatrixD y = through(slot, x);
    replace_layer(slot, compact_linear(slot));
    CHECK(std::string(slot.kind()) == "dense");
    CHECK(slot.parameters().size() == 2);
    CHECK((through(slot, x) - y).norm() <= 1e-12 * (1.0 + y.norm()));
}

TEST_CASE("from_weight and from_factors name the layer and both shapes on bad input", "[nn][merge][errors]") {
    const MatrixD w = gaussian(3, 4, 1), b = gaussian(1, 2, 2);
    CHECK_THROWS_WITH(Linear<double>::from_weight("fc", w, &b),
                      Catch::Contains("fc") && Catch::Contains("(1 x 3)") && Catch::Contains("(1 x 2)"));
    CHECK_THROWS_WITH(Linear<double>::from_weight("fc", MatrixD(0, 4)), Catch::Contains("non-empty"));
    CHECK_THROWS_WITH(LowRankLinear<double>::from_factors("lr", gaussian(3, 2, 3), gaussian(4, 1, 4)),
                      Catch::Contains("lr") && Catch::Contains("(3 x 2)") && Catch::Contains("(4 x 1)"));
    CHECK_THROWS_WITH(LowRankLinear<double>::from_factors("lr", gaussian(3, 4, 3), gaussian(4, 4, 4)),
                      Catch::Contains("[1, min(out, in) = 3]") && Catch::Contains("got 4"));
}

}  // namespace test_merge
