#pragma once
// Loading GPT-2 weights from safetensors, in either of the two layouts a PyTorch user has:
//
//   ours / nanoGPT's   transformer.h.0.attn.c_attn.weight (3C x C), nn.Linear's (out x in)
//   Hugging Face's     h.0.attn.c_attn.weight or transformer.h.0.attn.c_attn.weight,
//                      (C x 3C): its Conv1D stores the four projections as (in x out)
//
// The layout is recognised from the shape of the first block's c_attn weight (a square
// model never has 3C == C). Hugging Face's files also hold the causal-mask buffers
// (attn.bias, attn.masked_bias) and may hold lm_head.weight, the tied copy of wte: those
// are not weights of ours and are skipped. Load before a rank policy converts the
// projections: the slots must still hold dense Linear layers whose names are the file's.

#include <lowrank/core/error.hpp>
#include <lowrank/core/json_read.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/models/gpt2.hpp>

#include <cstddef>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

enum class Gpt2WeightLayout { linear, conv1d };

namespace detail {

inline bool ends_with_any(const std::string& s, std::initializer_list<std::string_view> suffixes) {
    for (auto suffix : suffixes)
        if (s.ends_with(suffix)) return true;
    return false;
}

// A projection weight that Hugging Face's Conv1D stores transposed.
inline bool is_conv1d_weight(const std::string& name) {
    return ends_with_any(name, {".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"});
}

// Hugging Face's non-parameter tensors, and the tied head.
inline bool is_ignorable_gpt2_tensor(const std::string& name) {
    return name == "lm_head.weight" || ends_with_any(name, {".attn.bias", ".attn.masked_bias"});
}

}  // namespace detail

/// Fills every parameter of `model` from the safetensors file at `path` (either layout, see
/// the top of this file). Every problem is reported at once, by tensor name — parameters the
/// file lacks, tensors of the wrong shape (expected and actual), tensors the model has no
/// parameter for — and then nothing is modified. Returns the layout found.
template <class T>
Gpt2WeightLayout load_gpt2_weights(Gpt2<T>& model, const std::string& path) {
    const SafetensorsReader file(path);
    const std::string what = "load_gpt2_weights: '" + path + "'";
    const auto names = file.names();
    const std::set<std::string> in_file(names.begin(), names.end());

    // Hugging Face's GPT2Model has no prefix, GPT2LMHeadModel "transformer."; ours has it.
    const auto file_name = [&](const std::string& ours) -> std::string {
        if (in_file.count(ours)) return ours;
        const std::string bare = ours.substr(std::string_view("transformer.").size());
        return in_file.count(bare) ? bare : std::string();
    };

    const ParameterList<T> params = model.parameters();
    Gpt2WeightLayout layout = Gpt2WeightLayout::linear;
    for (const Parameter<T>* p : params) {
        if (!p->name().ends_with(".attn.c_attn.weight")) continue;
        const std::string n = file_name(p->name());
        if (n.empty()) break;
        const auto shape = file.shape(n);
        if (shape.size() == 2 && shape[0] == p->cols() && shape[1] == p->rows()) layout = Gpt2WeightLayout::conv1d;
        break;
    }

    // Of each kind of problem the first few in full, then a count: a file can hold any
    // number of tensors, with names of any length.
    std::vector<std::pair<Parameter<T>*, Matrix<T>>> values;
    detail::ProblemList missing, misshaped, unexpected;
    std::set<std::string> used;
    for (Parameter<T>* p : params) {
        check(p->name().starts_with("transformer."), what, "parameter '", p->name(),
              "' is not a dense GPT-2 weight (load before a rank policy converts the layers)");
        const std::string n = file_name(p->name());
        if (n.empty()) {
            missing.add(p->name());
            continue;
        }
        used.insert(n);
        Matrix<T> m = file.template matrix<T>(n);
        if (layout == Gpt2WeightLayout::conv1d && detail::is_conv1d_weight(p->name())) m.transposeInPlace();
        if (m.rows() != p->rows() || m.cols() != p->cols()) {
            misshaped.add(n, " expected ", shape_string(p->rows(), p->cols()), " got ", shape_string(m.rows(), m.cols()));
            continue;
        }
        values.emplace_back(p, std::move(m));
    }
    for (const auto& n : names)
        if (!used.count(n) && !detail::is_ignorable_gpt2_tensor(n)) unexpected.add(detail::clip(n));

    if (!missing.empty() || !misshaped.empty() || !unexpected.empty()) {
        std::string msg = what + ": the file does not match the model";
        if (!missing.empty()) msg += "; missing: " + missing.str();
        if (!misshaped.empty()) msg += "; wrong shape: " + misshaped.str();
        if (!unexpected.empty()) msg += "; unexpected: " + unexpected.str();
        throw Error(msg);
    }
    for (auto& [p, m] : values) p->value = std::move(m);
    return layout;
}

}  // namespace lowrank
