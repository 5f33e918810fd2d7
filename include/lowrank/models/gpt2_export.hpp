#pragma once
// A trained GPT-2 as weights-only files that others read (docs/checkpoints.md, "Exporting
// a trained model"), in three layouts:
//
//   hf        Hugging Face's GPT2LMHeadModel state_dict: transformer.h.{i}.attn.c_attn.weight
//             stored (C x 3C), Conv1D's (in x out), for the four projections of each block;
//             no lm_head.weight (tied to transformer.wte.weight, which save_pretrained does
//             not write either and from_pretrained ties again)
//   nanogpt   nanoGPT's state_dict: the same names with nn.Linear's (out x in), and
//             lm_head.weight, the tied copy that its load_state_dict requires
//   lowrank   the model's own parameters with every slot in its inference form
//             (compact_linear: factors U, V where they are cheaper than the dense weight),
//             loadable back by load_gpt2_low_rank
//
// In hf and nanogpt every factorised layer is merged into its dense weight
// (merged_linear, nn/merge.hpp): the file is the dense model, as PEFT's merge_and_unload
// followed by save_pretrained gives it. load_gpt2_weights (models/gpt2_weights.hpp) reads
// both back into a dense Gpt2. Every file carries the metadata entry "lowrank.gpt2" (the
// config and the layout; for lowrank also each factored slot's rank and scale), and, as
// every safetensors file the library writes, "format": "pt". The scalar of the model is
// the file's dtype (float: F32, double: F64). save_gpt2_pretrained writes an hf file with
// the config.json beside it that transformers' from_pretrained needs.

#include <lowrank/core/atomic_file.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/json_read.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/io/checkpoint.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/models/gpt2.hpp>
#include <lowrank/nn/merge.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>

namespace lowrank {

enum class Gpt2ExportLayout { hf, nanogpt, lowrank };

inline constexpr std::array<std::string_view, 3> kGpt2ExportLayoutNames{"hf", "nanogpt", "lowrank"};

/// Metadata key of the export's description (config, layout, factored slots).
inline constexpr std::string_view kGpt2ExportMetadataKey = "lowrank.gpt2";

inline std::string_view to_string(Gpt2ExportLayout layout) {
    return kGpt2ExportLayoutNames[static_cast<std::size_t>(layout)];
}

/// "hf", "nanogpt" or "lowrank"; anything else is an error naming it and the three.
inline Gpt2ExportLayout parse_gpt2_export_layout(std::string_view name) {
    for (std::size_t i = 0; i < kGpt2ExportLayoutNames.size(); ++i)
        if (kGpt2ExportLayoutNames[i] == name) return static_cast<Gpt2ExportLayout>(i);
    throw Error(detail::concat("GPT-2 export layout: expected one of hf, nanogpt, lowrank, got '", detail::clip(name),
                               "'"));
}

namespace detail {

inline nlohmann::json gpt2_config_json(const Gpt2Config& c) {
    return {{"name", c.name},           {"n_layer", c.n_layer},         {"n_head", c.n_head},
            {"n_embd", c.n_embd},       {"block_size", c.block_size},   {"vocab_size", c.vocab_size},
            {"bias", c.bias}};
}

/// The config an export records, checked as a hostile file's would be.
inline Gpt2Config gpt2_config_from_json(const nlohmann::json& j, const std::string& where) {
    if (!j.is_object()) throw FormatError(concat(where, ": expected \"config\" to be an object, got ", json_value_excerpt(j)));
    Gpt2Config c;
    auto size = [&](const char* key, Index& out) {
        if (!j.contains(key) || !j.at(key).is_number_unsigned())
            throw FormatError(concat(where, ": config \"", key, "\": expected an integer >= 0, got ",
                                     j.contains(key) ? json_value_excerpt(j.at(key)) : std::string("none")));
        out = static_cast<Index>(j.at(key).get<std::uint64_t>());
    };
    size("n_layer", c.n_layer);
    size("n_head", c.n_head);
    size("n_embd", c.n_embd);
    size("block_size", c.block_size);
    size("vocab_size", c.vocab_size);
    if (!j.contains("bias") || !j.at("bias").is_boolean())
        throw FormatError(concat(where, ": config \"bias\": expected true or false, got ",
                                 j.contains("bias") ? json_value_excerpt(j.at("bias")) : std::string("none")));
    c.bias = j.at("bias").get<bool>();
    if (j.contains("name") && j.at("name").is_string()) c.name = j.at("name").get<std::string>();
    c.dropout = 0.0;
    c.validate();
    return c;
}

/// A (1 x n) row as PyTorch stores it, 1-D [n]; a matrix as [rows, cols].
template <class T>
void add_tensor(SafetensorsWriter& w, const std::string& name, const Matrix<T>& m) {
    w.add(name, m, stored_shape(m.rows(), m.cols()));
}

}  // namespace detail

/// Writes `model` as a weights-only file at `path` (atomically) in `layout` (see the top of
/// this file). The model is not changed. hf needs a model with biases (Hugging Face's
/// GPT-2 always has them).
template <class T>
void save_gpt2_weights(Gpt2<T>& model, const std::string& path, Gpt2ExportLayout layout) {
    const Gpt2Config& config = model.config();
    const std::string what = detail::concat("save_gpt2_weights: '", path, "' (layout ", to_string(layout), ")");
    check(layout != Gpt2ExportLayout::hf || config.bias, what,
          "expected a config with biases (Hugging Face's GPT-2 always has them), got bias = false");
    nlohmann::json doc{{"config", detail::gpt2_config_json(config)}, {"layout", std::string(to_string(layout))}};
    SafetensorsWriter w;

    if (layout == Gpt2ExportLayout::lowrank) {
        // The model's own parameter order, every slot in its inference form.
        nlohmann::json layers = nlohmann::json::object();
        detail::add_tensor(w, model.wte().name(), model.wte().value);
        detail::add_tensor(w, model.wpe().name(), model.wpe().value);
        auto add_param = [&](const Parameter<T>& p) {
            if (p.size() > 0) detail::add_tensor(w, p.name(), p.value);
        };
        auto add_slot = [&](const AnyLinear<T>& slot) {
            AnyLinear<T> compact = compact_linear(slot);
            if (const auto* l = compact.template get_if<LowRankLinear<T>>())
                layers[slot.name()] = {{"kind", "low_rank"}, {"rank", l->rank()}, {"scale", l->scale()}};
            for (const Parameter<T>* p : compact.parameters()) add_param(*p);
        };
        for (const auto& b : model.blocks()) {
            add_param(b.ln_1_weight);
            add_param(b.ln_1_bias);
            add_slot(b.c_attn);
            add_slot(b.attn_c_proj);
            add_param(b.ln_2_weight);
            add_param(b.ln_2_bias);
            add_slot(b.c_fc);
            add_slot(b.mlp_c_proj);
        }
        add_param(model.ln_f_weight());
        add_param(model.ln_f_bias());
        doc["layers"] = layers;
    } else {
        const bool conv1d = layout == Gpt2ExportLayout::hf;
        detail::add_tensor(w, "transformer.wte.weight", model.wte().value);
        detail::add_tensor(w, "transformer.wpe.weight", model.wpe().value);
        auto add_norm = [&](const std::string& name, const Parameter<T>& weight, const Parameter<T>& bias) {
            detail::add_tensor(w, name + ".weight", weight.value);
            if (config.bias) detail::add_tensor(w, name + ".bias", bias.value);
        };
        auto add_slot = [&](const std::string& name, const AnyLinear<T>& slot) {
            const Matrix<T> weight = slot.dense_weight();
            if (conv1d)
                w.add(name + ".weight", weight.transpose());
            else
                w.add(name + ".weight", weight);
            if (slot.bias()) detail::add_tensor(w, name + ".bias", *slot.bias());
        };
        const auto& blocks = model.blocks();
        for (std::size_t i = 0; i < blocks.size(); ++i) {
            const auto& b = blocks[i];
            const std::string prefix = "transformer.h." + std::to_string(i) + ".";
            add_norm(prefix + "ln_1", b.ln_1_weight, b.ln_1_bias);
            add_slot(prefix + "attn.c_attn", b.c_attn);
            add_slot(prefix + "attn.c_proj", b.attn_c_proj);
            add_norm(prefix + "ln_2", b.ln_2_weight, b.ln_2_bias);
            add_slot(prefix + "mlp.c_fc", b.c_fc);
            add_slot(prefix + "mlp.c_proj", b.mlp_c_proj);
        }
        add_norm("transformer.ln_f", model.ln_f_weight(), model.ln_f_bias());
        if (!conv1d) detail::add_tensor(w, "lm_head.weight", model.wte().value);
    }
    w.set_metadata(std::string(kGpt2ExportMetadataKey), doc.dump());
    w.write(path);
}

/// The config.json that transformers' GPT2LMHeadModel.from_pretrained reads beside an hf
/// export (GPT2Config's keys): the sizes, GPT-2's fixed choices (tanh GELU "gelu_new",
/// LayerNorm epsilon 1e-5, tied head), the dropout where lowrank applies it (after the
/// embeddings and each residual projection; none on the attention weights), the dtype of a
/// model of scalar T, and <|endoftext|> (50256) as the first and last token for GPT-2's
/// vocabulary (null for another: a byte vocabulary has no such token).
template <class T>
nlohmann::ordered_json gpt2_hf_config_json(const Gpt2Config& c) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "a float or double model");
    const nlohmann::ordered_json endoftext =
        c.vocab_size == 50257 ? nlohmann::ordered_json(50256) : nlohmann::ordered_json(nullptr);
    return {{"architectures", nlohmann::ordered_json::array({"GPT2LMHeadModel"})},
            {"model_type", "gpt2"},
            {"vocab_size", c.vocab_size},
            {"n_positions", c.block_size},
            {"n_ctx", c.block_size},
            {"n_embd", c.n_embd},
            {"n_layer", c.n_layer},
            {"n_head", c.n_head},
            {"n_inner", nullptr},
            {"activation_function", "gelu_new"},
            {"resid_pdrop", c.dropout},
            {"embd_pdrop", c.dropout},
            {"attn_pdrop", 0.0},
            {"layer_norm_epsilon", Gpt2<T>::kLayerNormEps},
            {"initializer_range", 0.02},
            {"scale_attn_weights", true},
            {"tie_word_embeddings", true},
            {"bos_token_id", endoftext},
            {"eos_token_id", endoftext},
            {"torch_dtype", std::is_same_v<T, float> ? "float32" : "float64"}};
}

/// Writes gpt2_hf_config_json<T>(config) to `path` (atomically), indented as
/// save_pretrained writes it. A model without biases is refused, as by the hf export.
template <class T>
void save_gpt2_hf_config(const Gpt2Config& config, const std::string& path) {
    check(config.bias, detail::concat("save_gpt2_hf_config: '", path, "'"),
          "expected a config with biases (Hugging Face's GPT-2 always has them), got bias = false");
    const std::string text = gpt2_hf_config_json<T>(config).dump(2) + "\n";
    write_file_atomically(path, "save_gpt2_hf_config",
                          [&](const auto& put) { put(text.data(), text.size()); });
}

/// A folder that GPT2LMHeadModel.from_pretrained(dir) loads: dir/model.safetensors (the hf
/// layout, every factorised layer merged) and dir/config.json. The folder is created if
/// missing.
template <class T>
void save_gpt2_pretrained(Gpt2<T>& model, const std::filesystem::path& dir) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec)
        throw Error(detail::concat("save_gpt2_pretrained: cannot create the folder '", dir.string(), "': ",
                                   ec.message()));
    save_gpt2_weights(model, (dir / "model.safetensors").string(), Gpt2ExportLayout::hf);
    save_gpt2_hf_config<T>(model.config(), (dir / "config.json").string());
}

/// Builds the model a lowrank-layout export (save_gpt2_weights with
/// Gpt2ExportLayout::lowrank) holds: its config, each factored slot as a LowRankLinear of
/// the recorded rank and scale, every tensor loaded strictly. A file of another layout, a
/// slot the model does not have or a tensor that does not fit is an error naming it.
template <class T>
Gpt2<T> load_gpt2_low_rank(const std::string& path) {
    const std::string what = detail::concat("load_gpt2_low_rank: '", path, "'");
    const SafetensorsReader reader(path);
    const auto it = reader.metadata().find(std::string(kGpt2ExportMetadataKey));
    if (it == reader.metadata().end())
        throw FormatError(detail::concat(what, ": expected metadata '", kGpt2ExportMetadataKey,
                                         "' (a file written by save_gpt2_weights), found none"));
    const std::string where = detail::concat(what, ": metadata '", kGpt2ExportMetadataKey, "'");
    const nlohmann::json doc = detail::parse_json_bounded(it->second, detail::JsonLimits{}, where);
    if (!doc.is_object()) throw FormatError(detail::concat(where, ": expected a JSON object, got a JSON ", doc.type_name()));
    const nlohmann::json layout = detail::member(doc, "layout");
    if (layout != "lowrank")
        throw Error(detail::concat(where, ": expected layout \"lowrank\", got ", detail::json_value_excerpt(layout),
                                   layout.is_string() ? " (load a dense export into a Gpt2 with load_gpt2_weights)" : ""));
    Gpt2Config config = detail::gpt2_config_from_json(detail::member(doc, "config"), where);
    const nlohmann::json layers = detail::member(doc, "layers");
    if (!layers.is_object())
        throw FormatError(detail::concat(where, ": expected \"layers\" to be an object, got ", detail::json_value_excerpt(layers)));

    // Only the shapes matter: every value is loaded from the file.
    Rng rng(0);
    Gpt2<T> model(config, rng);
    std::set<std::string> used;
    for (auto& slot : model.layer_slots()) {
        const auto entry = layers.find(slot.layer->name());
        if (entry == layers.end()) continue;
        used.insert(slot.layer->name());
        const std::string at = detail::concat(where, ": layer '", slot.layer->name(), "'");
        const nlohmann::json kind = detail::member(*entry, "kind"), rank = detail::member(*entry, "rank"),
                             scale = detail::member(*entry, "scale");
        if (kind != "low_rank")
            throw FormatError(detail::concat(at, ": expected kind \"low_rank\", got ", detail::json_value_excerpt(kind)));
        const Index m = slot.layer->out_features(), n = slot.layer->in_features();
        if (!rank.is_number_unsigned() || rank.get<std::uint64_t>() < 1 ||
            rank.get<std::uint64_t>() > static_cast<std::uint64_t>(std::min(m, n)))
            throw FormatError(detail::concat(at, ": expected rank in [1, ", std::min(m, n), "], got ",
                                             detail::json_value_excerpt(rank)));
        if (!scale.is_number() || !std::isfinite(scale.get<double>()))
            throw FormatError(detail::concat(at, ": expected a finite scale, got ", detail::json_value_excerpt(scale)));
        const Index r = static_cast<Index>(rank.get<std::uint64_t>());
        const Matrix<T> bias = Matrix<T>::Zero(1, m);
        slot.layer->replace(LowRankLinear<T>::from_factors(slot.layer->name(), Matrix<T>::Zero(m, r),
                                                           Matrix<T>::Zero(n, r), scale.get<double>(),
                                                           config.bias ? &bias : nullptr));
    }
    for (const auto& [name, entry] : layers.items())
        if (!used.count(name))
            throw FormatError(detail::concat(where, ": layer '", detail::clip(name), "' is not a projection of a ",
                                             config.name, " GPT-2 (transformer.h.<i>.attn.c_attn, ...)"));
    load_parameters(reader, model.parameters());
    return model;
}

}  // namespace lowrank
