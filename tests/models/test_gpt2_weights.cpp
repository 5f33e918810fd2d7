// Loading GPT-2 weights written in Hugging Face's layout (Conv1D projections stored
// in x out, names without or with the "transformer." prefix, mask buffers, a tied head) and
// in ours; every mismatch reported by name.

#include <lowrank/io/safetensors.hpp>
#include <lowrank/models/gpt2.hpp>
#include <lowrank/models/gpt2_weights.hpp>

#include "gpt2_test_config.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_gpt2_weights {

using namespace lowrank;
using Catch::Contains;
using lowrank::test::gpt2_test_config;

namespace {

std::string temp_path(const std::string& name) {
    return (std::filesystem::temp_directory_path() / ("lowrank_test_gpt2_weights_" + name)).string();
}

bool conv1d(const std::string& name) {
    for (const char* s : {".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"})
        if (name.ends_with(s)) return true;
    return false;
}

// Writes `model` as a Hugging Face checkpoint would hold it: projections transposed, biases
// and LayerNorm parameters 1-D, names with `prefix` ("" for GPT2Model, "transformer." for
// GPT2LMHeadModel), plus each block's causal-mask buffer and the tied lm_head copy.
void write_hf(Gpt2<double>& model, const std::string& path, const std::string& prefix,
              const std::string& skip = "", const std::string& extra = "") {
    SafetensorsWriter w;
    const Index T = model.config().block_size;
    for (auto* p : model.parameters()) {
        const std::string name = prefix + p->name().substr(std::string("transformer.").size());
        if (p->name() == skip) continue;
        if (conv1d(p->name()))
            w.add(name, MatrixD(p->value.transpose()));
        else if (p->rows() == 1)
            w.add(name, p->value, {p->cols()});
        else
            w.add(name, p->value);
    }
    for (Index i = 0; i < model.config().n_layer; ++i) {
        MatrixD mask = MatrixD::Zero(T, T);
        for (Index r = 0; r < T; ++r)
            for (Index c = 0; c <= r; ++c) mask(r, c) = 1.0;
        w.add(prefix + "h." + std::to_string(i) + ".attn.bias", mask, {1, 1, T, T});
    }
    for (auto* p : model.parameters())
        if (p->name() == "transformer.wte.weight") w.add("lm_head.weight", p->value);
    if (!extra.empty()) w.add(extra, MatrixD::Ones(2, 2));
    w.write(path);
}

MatrixD logits(Gpt2<double>& model, const std::vector<std::int32_t>& ids) {
    Graph<double> g;
    g.set_grad_enabled(false);
    return model.forward(g, ids, 1, static_cast<Index>(ids.size())).value();
}

void require_same_parameters(Gpt2<double>& a, Gpt2<double>& b) {
    const auto pa = a.parameters(), pb = b.parameters();
    REQUIRE(pa.size() == pb.size());
    for (std::size_t i = 0; i < pa.size(); ++i) {
        INFO(pa[i]->name());
        CHECK(pa[i]->value == pb[i]->value);
    }
}

}  // namespace

TEST_CASE("GPT-2 weights in Hugging Face's Conv1D layout load transposed, with or without the prefix",
          "[models][gpt2][io]") {
    Rng rng_a(1), rng_b(2);
    Gpt2<double> source(gpt2_test_config(), rng_a);
    const std::vector<std::int32_t> ids{3, 1, 4, 1, 5, 9};
    for (const std::string prefix : {"", "transformer."}) {
        INFO("prefix '" << prefix << "'");
        const std::string path = temp_path("hf.safetensors");
        write_hf(source, path, prefix);
        Gpt2<double> target(gpt2_test_config(), rng_b);
        CHECK(logits(target, ids) != logits(source, ids));
        CHECK(load_gpt2_weights(target, path) == Gpt2WeightLayout::conv1d);
        require_same_parameters(source, target);
        CHECK(logits(target, ids) == logits(source, ids));
        std::filesystem::remove(path);
    }
}

TEST_CASE("GPT-2 weights in our own (nn.Linear) layout load as they are", "[models][gpt2][io]") {
    Rng rng_a(3), rng_b(4);
    Gpt2<double> source(gpt2_test_config(), rng_a);
    SafetensorsWriter w;
    for (auto* p : source.parameters()) w.add(p->name(), p->value);
    const std::string path = temp_path("ours.safetensors");
    w.write(path);
    Gpt2<double> target(gpt2_test_config(), rng_b);
    CHECK(load_gpt2_weights(target, path) == Gpt2WeightLayout::linear);
    require_same_parameters(source, target);
    std::filesystem::remove(path);
}

TEST_CASE("Loading GPT-2 weights names every missing, mis-shaped and unexpected tensor and changes nothing",
          "[models][gpt2][io][errors]") {
    Rng rng_a(5), rng_b(6);
    Gpt2<double> source(gpt2_test_config(), rng_a);
    const std::string path = temp_path("bad.safetensors");

    write_hf(source, path, "", "transformer.h.1.mlp.c_fc.bias", "h.0.mlp.extra");
    Gpt2<double> target(gpt2_test_config(), rng_b);
    const MatrixD before = logits(target, {1, 2, 3});
    CHECK_THROWS_WITH(load_gpt2_weights(target, path),
                      Contains("missing: transformer.h.1.mlp.c_fc.bias") && Contains("unexpected: h.0.mlp.extra"));
    CHECK(logits(target, {1, 2, 3}) == before);  // nothing was loaded

    Gpt2Config wider = gpt2_test_config();
    wider.vocab_size = 12;  // wte has one row more than the file's
    write_hf(source, path, "");
    Rng rng_c(7);
    Gpt2<double> other(wider, rng_c);
    CHECK_THROWS_WITH(load_gpt2_weights(other, path), Contains("wrong shape: wte.weight expected (12 x 8) got (11 x 8)"));
    std::filesystem::remove(path);
}

TEST_CASE("A GPT-2 weights file with 10,000 unexpected tensors gives a short message naming the first ones",
          "[models][gpt2][io][errors]") {
    Rng rng_a(5), rng_b(6);
    Gpt2<double> source(gpt2_test_config(), rng_a);
    const std::string path = temp_path("junk.safetensors");
    SafetensorsWriter w;
    for (auto* p : source.parameters()) w.add(p->name(), p->value);
    const MatrixD zero = MatrixD::Zero(1, 1);
    for (int i = 0; i < 10000; ++i)
        w.add("junk." + std::to_string(10000 + i) + "." + std::string(i == 0 ? 100000 : 200, 'j'), zero, {1});
    w.write(path);
    Gpt2<double> target(gpt2_test_config(), rng_b);
    const MatrixD before = logits(target, {1, 2, 3});
    try {
        load_gpt2_weights(target, path);
        FAIL("a file with 10,000 unexpected tensors was loaded");
    } catch (const Error& e) {
        const std::string msg = e.what();
        INFO(msg.substr(0, 3000));
        CHECK_THAT(msg, Contains("unexpected: junk.10000.jjjj") && Contains("(100011 bytes)") &&
                            Contains("junk.10009.jjjj") && Contains("... and 9990 more"));
        CHECK_THAT(msg, !Contains("junk.10010."));
        CHECK(msg.size() < 2000);
    }
    CHECK(logits(target, {1, 2, 3}) == before);
    std::filesystem::remove(path);
}

}  // namespace test_gpt2_weights
