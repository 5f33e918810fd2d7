// Exporting a GPT-2 whose projections are of every layer type: the dense model in Hugging
// Face's and nanoGPT's layouts (read back by load_gpt2_weights, the import path, with equal
// logits) and the low-rank weights-only file (read back by load_gpt2_low_rank).

#include <lowrank/io/safetensors.hpp>
#include <lowrank/models/gpt2.hpp>
#include <lowrank/models/gpt2_export.hpp>
#include <lowrank/models/gpt2_weights.hpp>

#include "gpt2_test_config.hpp"
#include "../test_support.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_gpt2_export {

using namespace lowrank;
using Catch::Contains;
using lowrank::test::gpt2_test_config;
using lowrank::test::TempDir;

const std::vector<std::int32_t> kIds{3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8};  // B = 2, T = 6

MatrixD logits(Gpt2<double>& model) {
    Graph<double> g;
    g.set_grad_enabled(false);
    return model.forward(g, kIds, 2, 6).value();
}

/// A model as the methods leave it: every projection of another layer type, every
/// parameter (frozen bases, LoRA's zero-started U, SST's frozen pairs) random.
struct Trained {
    Rng rng{11};
    Gpt2<double> model{gpt2_test_config(), rng};

    Trained() {
        auto slots = model.layer_slots();
        auto slot = [&](std::size_t i) -> AnyLinear<double>& { return *slots[i].layer; };
        const auto in = [&](std::size_t i) { return slot(i).in_features(); };
        const auto out = [&](std::size_t i) { return slot(i).out_features(); };
        const auto name = [&](std::size_t i) { return slot(i).name(); };
        // block 0: c_attn, attn.c_proj, c_fc, mlp.c_proj
        slot(0).replace(LowRankLinear<double>(name(0), in(0), out(0), rng,
                                              {.rank = 2, .base = true, .scale = 4.0, .init = LowRankInit::lora}));
        slot(1).replace(SpectralLinear<double>(name(1), in(1), out(1), rng, {.rank = 3}));
        slot(2).replace(IncrementalRankLinear<double>(name(2), in(2), out(2), rng, {.rank = 2, .capacity = 4}));
        DeepLowRankLinear<double> deep(name(3), in(3), out(3), rng, {.depth = 3, .epsilon = 0.5});
        deep.compress(1, lowrank::test::gaussian(deep.factors().front().rows(), in(3), 12));
        slot(3).replace(std::move(deep));
        // block 1
        slot(4).replace(LowRankLinear<double>(name(4), in(4), out(4), rng, {.rank = 2}));
        slot(6).replace(DeepLowRankLinear<double>(name(6), in(6), out(6), rng, {.depth = 2, .base = true}));
        slot(7).replace(LowRankLinear<double>(name(7), in(7), out(7), rng,
                                              {.rank = 3, .base = true, .scale = 0.5, .init = LowRankInit::lora}));
        std::uint64_t seed = 200;
        for (auto* p : model.parameters()) p->value = lowrank::test::gaussian(p->rows(), p->cols(), seed++) * 0.3;
    }
};

TEST_CASE("a GPT-2 of every layer type exports as the dense model in Hugging Face's layout", "[models][gpt2][export]") {
    TempDir dir;
    Trained t;
    const MatrixD expected = logits(t.model);
    const std::string path = dir / "hf.safetensors";
    save_gpt2_weights(t.model, path, Gpt2ExportLayout::hf);

    const SafetensorsReader r(path);
    CHECK(r.metadata().at("format") == "pt");
    CHECK_FALSE(r.contains("lm_head.weight"));  // tied: save_pretrained leaves it out too
    CHECK(r.shape("transformer.h.0.attn.c_attn.weight") == std::vector<std::int64_t>{8, 24});  // [C, 3C]
    CHECK(r.shape("transformer.h.1.mlp.c_fc.weight") == std::vector<std::int64_t>{8, 32});
    CHECK(r.shape("transformer.h.1.mlp.c_proj.weight") == std::vector<std::int64_t>{32, 8});
    CHECK(r.shape("transformer.h.0.attn.c_attn.bias") == std::vector<std::int64_t>{24});
    CHECK(r.shape("transformer.ln_f.weight") == std::vector<std::int64_t>{8});
    CHECK(r.names().size() == 2 + 2 * 12 + 2);
    CHECK(r.dtype("transformer.wte.weight") == "F64");
    const auto doc = nlohmann::json::parse(r.metadata().at("lowrank.gpt2"));
    CHECK(doc.at("layout") == "hf");
    CHECK(doc.at("config").at("n_embd") == 8);

    Rng other(3);
    Gpt2<double> dense(gpt2_test_config(), other);
    CHECK(load_gpt2_weights(dense, path) == Gpt2WeightLayout::conv1d);
    const MatrixD got = logits(dense);
    CHECK((got - expected).norm() <= 1e-12 * expected.norm());
    // The merged weight is the slot's dense_weight, transposed.
    CHECK(r.matrix<double>("transformer.h.0.attn.c_attn.weight") ==
          MatrixD(t.model.blocks()[0].c_attn.dense_weight().transpose()));
}

TEST_CASE("a GPT-2 of every layer type exports as the dense model in nanoGPT's layout", "[models][gpt2][export]") {
    TempDir dir;
    Trained t;
    const MatrixD expected = logits(t.model);
    const std::string path = dir / "nanogpt.safetensors";
    save_gpt2_weights(t.model, path, Gpt2ExportLayout::nanogpt);

    const SafetensorsReader r(path);
    CHECK(r.shape("transformer.h.0.attn.c_attn.weight") == std::vector<std::int64_t>{24, 8});  // [3C, C]
    CHECK(r.matrix<double>("lm_head.weight") == r.matrix<double>("transformer.wte.weight"));
    CHECK(r.names().size() == 2 + 2 * 12 + 2 + 1);
    Rng other(4);
    Gpt2<double> dense(gpt2_test_config(), other);
    CHECK(load_gpt2_weights(dense, path) == Gpt2WeightLayout::linear);
    CHECK((logits(dense) - expected).norm() <= 1e-12 * expected.norm());
}

TEST_CASE("save_gpt2_pretrained writes the folder from_pretrained reads: the hf file and GPT2Config's config.json",
          "[models][gpt2][export]") {
    TempDir dir;
    Trained t;
    const MatrixD expected = logits(t.model);
    const auto folder = dir / "hf-model";  // created
    save_gpt2_pretrained(t.model, folder);

    std::ifstream in(folder / "config.json");
    const auto config = nlohmann::json::parse(in);
    CHECK(config.at("architectures") == nlohmann::json::array({"GPT2LMHeadModel"}));
    CHECK(config.at("model_type") == "gpt2");
    CHECK(config.at("vocab_size") == 11);
    CHECK(config.at("n_positions") == 6);
    CHECK(config.at("n_embd") == 8);
    CHECK(config.at("n_layer") == 2);
    CHECK(config.at("n_head") == 2);
    CHECK(config.at("n_inner").is_null());  // 4 * n_embd
    CHECK(config.at("activation_function") == "gelu_new");
    CHECK(config.at("layer_norm_epsilon") == 1e-5);
    CHECK(config.at("attn_pdrop") == 0.0);
    CHECK(config.at("tie_word_embeddings") == true);
    CHECK(config.at("torch_dtype") == "float64");
    CHECK(config.at("bos_token_id").is_null());  // not GPT-2's vocabulary: no <|endoftext|>

    Rng other(6);
    Gpt2<double> dense(gpt2_test_config(), other);
    CHECK(load_gpt2_weights(dense, (folder / "model.safetensors").string()) == Gpt2WeightLayout::conv1d);
    CHECK((logits(dense) - expected).norm() <= 1e-12 * expected.norm());

    // GPT-2's own vocabulary has <|endoftext|>; a float model is float32.
    const auto tiny = gpt2_hf_config_json<float>(gpt2_config("tiny"));
    CHECK(tiny.at("bos_token_id") == 50256);
    CHECK(tiny.at("eos_token_id") == 50256);
    CHECK(tiny.at("torch_dtype") == "float32");
    CHECK(tiny.at("n_positions") == gpt2_config("tiny").block_size);

    Gpt2Config no_bias = gpt2_test_config();
    no_bias.bias = false;
    CHECK_THROWS_WITH(save_gpt2_hf_config<double>(no_bias, (dir / "c.json").string()),
                      Contains("save_gpt2_hf_config") && Contains("got bias = false"));
}

TEST_CASE("the low-rank export keeps the factors where they are cheaper and loads back with equal logits",
          "[models][gpt2][export]") {
    TempDir dir;
    Trained t;
    const MatrixD expected = logits(t.model);
    const std::string path = dir / "lowrank.safetensors";
    save_gpt2_weights(t.model, path, Gpt2ExportLayout::lowrank);

    const SafetensorsReader r(path);
    CHECK_FALSE(r.contains("transformer.h.0.attn.c_attn.U"));  // LoRA: its base makes it dense
    CHECK(r.contains("transformer.h.0.attn.c_attn.weight"));
    CHECK(r.shape("transformer.h.0.mlp.c_fc.U") == std::vector<std::int64_t>{32, 2});  // InRank's active columns
    CHECK(r.shape("transformer.h.0.mlp.c_proj.V") == std::vector<std::int64_t>{32, 2});  // compressed Deep LoRA, 2r
    CHECK(r.shape("transformer.h.1.attn.c_attn.U") == std::vector<std::int64_t>{24, 2});
    for (const auto& name : r.names()) CHECK_FALSE(name.starts_with("optimizer."));

    Gpt2<double> loaded = load_gpt2_low_rank<double>(path);
    CHECK(loaded.config().n_layer == 2);
    std::vector<std::string> kinds;
    for (auto& s : loaded.layer_slots()) kinds.push_back(s.layer->kind());
    CHECK(kinds == std::vector<std::string>{"dense", "dense", "low_rank", "low_rank", "low_rank", "dense", "dense",
                                            "dense"});
    CHECK((logits(loaded) - expected).norm() <= 1e-12 * expected.norm());
    // A LowRankLinear without a base is stored as it is: the same function, bit for bit.
    CHECK(loaded.blocks()[1].c_attn.get<LowRankLinear<double>>().U.value ==
          t.model.blocks()[1].c_attn.get<LowRankLinear<double>>().U.value);
    CHECK(loaded.parameter_count() < Gpt2<double>::parameter_count(gpt2_test_config()));
}

TEST_CASE("a float model exports F32", "[models][gpt2][export]") {
    TempDir dir;
    Rng rng(5);
    Gpt2<float> model(gpt2_test_config(), rng);
    save_gpt2_weights(model, dir / "f.safetensors", Gpt2ExportLayout::hf);
    CHECK(SafetensorsReader(dir / "f.safetensors").dtype("transformer.h.0.attn.c_attn.weight") == "F32");
    Gpt2<float> back = [&] {
        save_gpt2_weights(model, dir / "l.safetensors", Gpt2ExportLayout::lowrank);
        return load_gpt2_low_rank<float>(dir / "l.safetensors");
    }();
    CHECK(back.wte().value == model.wte().value);
}

TEST_CASE("exporting and loading name the layout, the config and the layer that do not fit",
          "[models][gpt2][export][errors]") {
    TempDir dir;
    CHECK(parse_gpt2_export_layout("nanogpt") == Gpt2ExportLayout::nanogpt);
    CHECK_THROWS_WITH(parse_gpt2_export_layout("onnx"),
                      Contains("expected one of hf, nanogpt, lowrank") && Contains("got 'onnx'"));

    Gpt2Config no_bias = gpt2_test_config();
    no_bias.bias = false;
    Rng rng(6);
    Gpt2<double> plain(no_bias, rng);
    CHECK_THROWS_WITH(save_gpt2_weights(plain, dir / "x.safetensors", Gpt2ExportLayout::hf),
                      Contains("layout hf") && Contains("got bias = false"));
    // nanoGPT and the low-rank file have bias-free models too.
    save_gpt2_weights(plain, dir / "nb.safetensors", Gpt2ExportLayout::lowrank);
    CHECK(load_gpt2_low_rank<double>(dir / "nb.safetensors").config().bias == false);

    Trained t;
    save_gpt2_weights(t.model, dir / "hf.safetensors", Gpt2ExportLayout::hf);
    CHECK_THROWS_WITH(load_gpt2_low_rank<double>(dir / "hf.safetensors"),
                      Contains("expected layout \"lowrank\", got \"hf\"") && Contains("load_gpt2_weights"));

    // A file whose layers name a slot the model does not have.
    save_gpt2_weights(t.model, dir / "lr.safetensors", Gpt2ExportLayout::lowrank);
    const SafetensorsReader r(dir / "lr.safetensors");
    SafetensorsWriter w;
    for (const auto& name : r.names()) w.add(name, r.matrix<double>(name), r.shape(name));
    auto doc = nlohmann::json::parse(r.metadata().at("lowrank.gpt2"));
    doc["layers"]["transformer.h.7.mlp.c_fc"] = {{"kind", "low_rank"}, {"rank", 2}, {"scale", 1.0}};
    w.set_metadata("lowrank.gpt2", doc.dump());
    w.write(dir / "bad.safetensors");
    CHECK_THROWS_WITH(load_gpt2_low_rank<double>(dir / "bad.safetensors"),
                      Contains("layer 'transformer.h.7.mlp.c_fc' is not a projection"));
    doc["layers"].erase("transformer.h.7.mlp.c_fc");
    doc["config"]["n_embd"] = 7;  // not divisible by n_head
    w.set_metadata("lowrank.gpt2", doc.dump());
    w.write(dir / "bad.safetensors");
    CHECK_THROWS_WITH(load_gpt2_low_rank<double>(dir / "bad.safetensors"), Contains("n_embd divisible by n_head"));
    SafetensorsWriter none;
    none.write(dir / "none.safetensors");
    CHECK_THROWS_WITH(load_gpt2_low_rank<double>(dir / "none.safetensors"), Contains("expected metadata 'lowrank.gpt2'"));
}

}  // namespace test_gpt2_export
