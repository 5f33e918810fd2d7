#pragma once
// Weights and whole training states in one safetensors file (docs/checkpoints.md).
//
// A checkpoint holds the parameters under their own names (so PyTorch can take the
// weights), the optimizer's moments under "optimizer.<moment>.<parameter name>" (and a
// projected gradient's basis under "optimizer.projector.<parameter name>"), and one
// metadata entry "lowrank": a JSON document with the format version, the step, the
// optimizer's type, groups and per-parameter step counts, every parameter's active
// columns, and the caller's `extra` object (RNG states, schedule, data loader, ...).
// Generator states go into `extra` through rng_state_to_json (core/json_codec.hpp).
// Being one file, it is replaced by one rename: a crash leaves the old checkpoint or the
// new one, never a mixture.
//
// Loading checks everything (names, shapes, dtypes, optimizer type, groups, state shapes)
// before it changes anything, so an error leaves the model and the optimizer as they were.

#include <lowrank/core/error.hpp>
#include <lowrank/core/json_codec.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/core/types.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/optim/optimizer.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

namespace lowrank {

/// Where optimizer moments live in a checkpoint: "optimizer.<moment>.<parameter name>".
inline constexpr std::string_view kOptimizerPrefix = "optimizer.";
/// A projected parameter's basis (GaLore) sits beside its moments:
/// "optimizer.projector.<parameter name>".
inline constexpr std::string_view kProjectorName = "projector";

/// Metadata key of the checkpoint document, and of the active columns that add_parameters
/// records for parameters trained only in their leading columns.
inline constexpr std::string_view kCheckpointMetadataKey = "lowrank";
inline constexpr std::string_view kActiveColsMetadataKey = "lowrank.active_cols";

/// Version of the "lowrank" document; a reader refuses newer documents.
inline constexpr int kCheckpointVersion = 1;

namespace detail {
// A function rather than a braced list in the member initializer: GCC 12 crashes (an
// internal compiler error) on `LoadOptions{.strict = false}` inside a template when the
// default of a vector<string> member is an initializer list of strings.
inline std::vector<std::string> default_ignore_prefixes() { return {std::string(kOptimizerPrefix)}; }
}  // namespace detail

struct LoadOptions {
    /// Throw (changing nothing) on any missing, unexpected, mis-shaped or non-float tensor;
    /// otherwise load what matches and return the report.
    bool strict = true;
    /// Tensor names in the file are mapped to parameter names by removing this prefix
    /// (when present) and then prepending add_prefix: a file saved without the model's
    /// "transformer." prefix loads with add_prefix = "transformer.".
    std::string strip_prefix = {};
    std::string add_prefix = {};
    /// Tensors whose file name starts with one of these are skipped, not "unexpected".
    std::vector<std::string> ignore_prefixes = detail::default_ignore_prefixes();
    /// Set each loaded parameter's active columns from the file's "lowrank.active_cols"
    /// metadata when the file has that entry (parameters it does not list become fully
    /// active). Without the entry, active columns are left alone.
    bool restore_active_cols = true;
};

/// A tensor whose shape does not fit its parameter.
struct ShapeMismatch {
    std::string parameter;
    std::string tensor;
    std::vector<std::int64_t> expected;
    std::vector<std::int64_t> actual;
};

/// A tensor whose dtype cannot become a floating-point matrix (I64, U8, ...).
struct DtypeMismatch {
    std::string parameter;
    std::string tensor;
    std::string dtype;
};

struct LoadReport {
    std::string path;
    std::vector<std::string> loaded;      // parameter names, in parameter order
    std::vector<std::string> missing;     // parameters without a tensor
    std::vector<std::string> unexpected;  // tensors (file names) without a parameter
    std::vector<ShapeMismatch> mismatched;
    std::vector<DtypeMismatch> wrong_dtype;
    /// Expected shape of each missing parameter, as a tensor of the file would have it.
    std::map<std::string, std::vector<std::int64_t>> missing_shapes;
    /// Shape of each unexpected tensor.
    std::map<std::string, std::vector<std::int64_t>> unexpected_shapes;

    std::size_t problem_count() const {
        return missing.size() + unexpected.size() + mismatched.size() + wrong_dtype.size();
    }
    bool ok() const { return problem_count() == 0; }

    /// One line per problem, each naming the parameter or tensor and the shapes; of each
    /// kind the first detail::kListedProblems, then a count (a hostile file can hold any
    /// number of unexpected tensors, with names of any length).
    std::string describe() const {
        using detail::clip;
        using detail::shape_list_string;
        detail::ProblemList missing_list("\n  ", " missing parameter(s)");
        for (const auto& name : missing)
            missing_list.add("missing: parameter '", clip(name), "' (expected shape ",
                             shape_list_string(missing_shapes.at(name)), ") has no tensor in the file");
        detail::ProblemList unexpected_list("\n  ", " unexpected tensor(s)");
        for (const auto& name : unexpected)
            unexpected_list.add("unexpected: tensor '", clip(name), "' (shape ",
                                shape_list_string(unexpected_shapes.at(name)), ") matches no parameter");
        detail::ProblemList mismatched_list("\n  ", " mis-shaped parameter(s)");
        for (const auto& m : mismatched)
            mismatched_list.add("mis-shaped: parameter '", clip(m.parameter), "': expected shape ",
                                shape_list_string(m.expected), ", got ", shape_list_string(m.actual),
                                m.tensor == m.parameter ? std::string() : " (tensor '" + clip(m.tensor) + "')");
        detail::ProblemList dtype_list("\n  ", " parameter(s) of a wrong dtype");
        for (const auto& d : wrong_dtype)
            dtype_list.add("wrong dtype: parameter '", clip(d.parameter), "': expected F32, F64, F16 or BF16, got ",
                           clip(d.dtype),
                           d.tensor == d.parameter ? std::string() : " (tensor '" + clip(d.tensor) + "')");
        std::string out;
        for (const auto* list : {&missing_list, &unexpected_list, &mismatched_list, &dtype_list})
            if (!list->empty()) out += "\n  " + list->str();
        return out;
    }
};

/// What load_checkpoint hands back to the trainer.
struct CheckpointInfo {
    std::int64_t step = 0;
    nlohmann::json extra;
};

struct CheckpointLoadOptions {
    /// Require the optimizer's groups (their parameters, lr and weight decay) to be those
    /// of the saved run. Turn off to resume deliberately with other hyperparameters.
    bool check_groups = true;
};

namespace detail {

/// The shape a parameter is stored with: one row -> 1-D {n}, as PyTorch stores a bias.
template <class T>
std::vector<std::int64_t> stored_shape(const Parameter<T>& p) {
    if (p.rows() == 1) return {static_cast<std::int64_t>(p.cols())};
    return {static_cast<std::int64_t>(p.rows()), static_cast<std::int64_t>(p.cols())};
}

inline std::vector<std::int64_t> stored_shape(Index rows, Index cols) {
    if (rows == 1) return {static_cast<std::int64_t>(cols)};
    return {static_cast<std::int64_t>(rows), static_cast<std::int64_t>(cols)};
}

/// Whether a tensor of this shape fills a (rows x cols) matrix: 2-D equal, or 1-D {cols}
/// for one row, or 0-D for (1 x 1).
inline bool shape_fits(const std::vector<std::int64_t>& shape, Index rows, Index cols) {
    if (shape.size() == 2) return shape[0] == rows && shape[1] == cols;
    if (shape.size() == 1) return rows == 1 && shape[0] == cols;
    if (shape.empty()) return rows == 1 && cols == 1;
    return false;
}

inline bool is_float_dtype(const std::string& dtype) {
    return dtype == "F32" || dtype == "F64" || dtype == "F16" || dtype == "BF16";
}

inline bool starts_with_any(const std::string& name, const std::vector<std::string>& prefixes) {
    for (const auto& prefix : prefixes)
        if (!prefix.empty() && name.starts_with(prefix)) return true;
    return false;
}

/// Parameters by name; null parameters and duplicate names are errors (a name is how a
/// tensor finds its parameter).
template <class T>
std::map<std::string, Parameter<T>*> parameters_by_name(const ParameterList<T>& params, std::string_view what) {
    std::map<std::string, Parameter<T>*> out;
    for (std::size_t i = 0; i < params.size(); ++i) {
        Parameter<T>* p = params[i];
        check(p != nullptr, what, "parameter ", i, " is null");
        check(!p->name().empty(), what, "parameter ", i, " ", shape_string(p->value), " has no name");
        check(out.emplace(p->name(), p).second, what, "two parameters are named '", p->name(), "'");
    }
    return out;
}

inline std::string scalar_dtype_name(bool is_float) { return is_float ? "F32" : "F64"; }

/// The active-columns map a file records, keyed by tensor name in the file; empty if the
/// file records none.
inline std::map<std::string, Index> read_active_cols_metadata(const SafetensorsReader& r, bool& present) {
    std::map<std::string, Index> out;
    const auto it = r.metadata().find(std::string(kActiveColsMetadataKey));
    present = it != r.metadata().end();
    if (!present) return out;
    const std::string where = concat("load_parameters: '", r.path(), "': metadata '", kActiveColsMetadataKey, "'");
    const nlohmann::json doc = parse_json_bounded(it->second, JsonLimits{}, where);
    if (!doc.is_object()) throw FormatError(concat(where, ": expected a JSON object, got a JSON ", doc.type_name()));
    for (const auto& [name, k] : doc.items()) {
        if (!k.is_number_unsigned())
            throw FormatError(concat(where, ": tensor '", clip(name), "': expected an integer >= 0, got ",
                                     json_value_excerpt(k)));
        out.emplace(name, static_cast<Index>(k.get<std::uint64_t>()));
    }
    return out;
}

/// Which tensor goes into which parameter, and what is wrong; nothing is modified.
template <class T>
struct LoadPlan {
    LoadReport report;
    std::vector<std::pair<Parameter<T>*, std::string>> matches;  // parameter, tensor name
    std::map<Parameter<T>*, Index> active_cols;                  // only with restore_active_cols
};

template <class T>
LoadPlan<T> plan_load(const SafetensorsReader& r, const ParameterList<T>& params, const LoadOptions& options,
                      std::string_view caller) {
    const std::string what = concat(caller, ": '", r.path(), "'");
    const auto by_name = parameters_by_name(params, what);
    LoadPlan<T> plan;
    plan.report.path = r.path();
    std::map<std::string, std::string> tensor_of;  // parameter name -> tensor name
    std::set<std::string> seen;                     // parameters with a tensor (any outcome)
    for (const std::string& tensor : r.names()) {
        if (starts_with_any(tensor, options.ignore_prefixes)) continue;
        std::string name = tensor;
        if (!options.strip_prefix.empty() && name.starts_with(options.strip_prefix))
            name.erase(0, options.strip_prefix.size());
        name = options.add_prefix + name;
        const auto it = by_name.find(name);
        if (it == by_name.end()) {
            plan.report.unexpected.push_back(tensor);
            plan.report.unexpected_shapes[tensor] = r.shape(tensor);
            continue;
        }
        if (!seen.insert(name).second)
            throw FormatError(concat(what, ": tensors '", clip(tensor_of.at(name)), "' and '", clip(tensor),
                                     "' both map to parameter '", clip(name), "'"));
        tensor_of[name] = tensor;
        const Parameter<T>& p = *it->second;
        if (!shape_fits(r.shape(tensor), p.rows(), p.cols()))
            plan.report.mismatched.push_back({name, tensor, stored_shape(p), r.shape(tensor)});
        else if (!is_float_dtype(r.dtype(tensor)))
            plan.report.wrong_dtype.push_back({name, tensor, r.dtype(tensor)});
        else
            plan.matches.emplace_back(it->second, tensor);
    }
    for (Parameter<T>* p : params) {
        if (!seen.count(p->name())) {
            plan.report.missing.push_back(p->name());
            plan.report.missing_shapes[p->name()] = stored_shape(*p);
        }
    }
    // In parameter order, so that "loaded" reads like the model.
    std::map<const Parameter<T>*, std::size_t> position;
    for (std::size_t i = 0; i < params.size(); ++i) position[params[i]] = i;
    std::sort(plan.matches.begin(), plan.matches.end(),
              [&](const auto& a, const auto& b) { return position.at(a.first) < position.at(b.first); });
    for (const auto& [p, tensor] : plan.matches) plan.report.loaded.push_back(p->name());

    if (options.restore_active_cols) {
        bool present = false;
        const auto recorded = read_active_cols_metadata(r, present);
        if (present) {
            for (const auto& [p, tensor] : plan.matches) {
                const auto it = recorded.find(tensor);
                const Index k = it == recorded.end() ? p->cols() : it->second;
                if (k > p->cols())
                    throw FormatError(concat(what, ": metadata '", kActiveColsMetadataKey, "': tensor '", clip(tensor),
                                             "': expected active columns in [0, ", p->cols(), "], got ", k));
                plan.active_cols[p] = k;
            }
        }
    }
    return plan;
}

template <class T>
void apply_load(const SafetensorsReader& r, const LoadPlan<T>& plan) {
    for (const auto& [p, tensor] : plan.matches) {
        // Assigned in place: the parameter keeps its buffer, id and layout version.
        p->value = r.matrix<T>(tensor);
        const auto it = plan.active_cols.find(p);
        // set_active_cols bumps the layout version, so only a real change calls it.
        if (it != plan.active_cols.end() && it->second != p->active_cols()) p->set_active_cols(it->second);
    }
}

/// The metadata of a safetensors file, reading only its header (a checkpoint's tensors
/// can be large; its extra is needed before the model that holds them exists).
inline std::map<std::string, std::string> read_safetensors_metadata_only(const std::string& path,
                                                                         std::string_view what) {
    const std::string where = concat(what, ": '", path, "'");
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec || !std::filesystem::exists(status))
        throw FormatError(concat(where, ": expected an existing file, but it does not exist"));
    if (std::filesystem::is_directory(status)) throw FormatError(concat(where, ": expected a file, got a directory"));
    const std::uint64_t size = std::filesystem::file_size(path, ec);
    if (ec) throw FormatError(concat(where, ": cannot get its size: ", ec.message()));
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
    if (!f) throw FormatError(concat(where, ": cannot open it for reading: ", std::strerror(errno)));
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(std::min<std::uint64_t>(size, 8)));
    std::size_t got = std::fread(bytes.data(), 1, bytes.size(), f.get());
    if (size >= 8 && got == 8) {
        const std::uint64_t n = load_le<std::uint64_t>(bytes.data());
        // A header over the cap is refused by parse_safetensors_header from its length alone:
        // its bytes are not read.
        if (n <= size - 8 && n <= kSafetensorsMaxHeaderBytes) {
            bytes.resize(static_cast<std::size_t>(8 + n));
            got += std::fread(bytes.data() + 8, 1, static_cast<std::size_t>(n), f.get());
        }
    }
    std::uint64_t header_end = 0;
    const nlohmann::json header = parse_safetensors_header(bytes.data(), size, got, where, header_end);
    return parse_safetensors_metadata(header, where);
}

/// The "lowrank" document of a checkpoint, checked for its format and version.
inline nlohmann::json checkpoint_document(const std::map<std::string, std::string>& metadata,
                                          const std::string& where) {
    const auto it = metadata.find(std::string(kCheckpointMetadataKey));
    if (it == metadata.end())
        throw FormatError(concat(where, ": not a lowrank checkpoint: expected metadata '", kCheckpointMetadataKey,
                                 "', found none (a weights-only file loads with load_parameters)"));
    const std::string prefix = concat(where, ": metadata '", kCheckpointMetadataKey, "'");
    nlohmann::json doc = parse_json_bounded(it->second, JsonLimits{}, prefix);
    if (!doc.is_object()) throw FormatError(concat(prefix, ": expected a JSON object, got a JSON ", doc.type_name()));
    // Each key must be there and pass its test; the message shows what was found.
    auto need = [&](const char* key, bool (*ok)(const nlohmann::json&), const char* expected) {
        if (!doc.contains(key))
            throw FormatError(concat(prefix, ": expected \"", key, "\" (", expected, "), found none"));
        if (!ok(doc.at(key)))
            throw FormatError(concat(prefix, ": expected \"", key, "\" to be ", expected, ", got ",
                                     json_value_excerpt(doc.at(key))));
    };
    need("version", [](const nlohmann::json& j) { return j.is_number_unsigned(); }, "an integer >= 1");
    const auto version = doc.at("version").get<std::uint64_t>();
    if (version < 1 || version > static_cast<std::uint64_t>(kCheckpointVersion))
        throw FormatError(concat(prefix, ": format version ", version, " is not supported: expected 1 to ",
                                 kCheckpointVersion, " (was it written by a newer lowrank?)"));
    need("step", [](const nlohmann::json& j) { return j.is_number_integer(); }, "an integer");
    need("parameters", [](const nlohmann::json& j) { return j.is_array(); }, "an array");
    need("optimizer", [](const nlohmann::json& j) { return j.is_null() || j.is_object(); }, "an object or null");
    need("extra", [](const nlohmann::json& j) { return j.is_object(); }, "an object");
    return doc;
}

/// j[key] if j is an object that has it, else null (for comparisons and messages).
inline nlohmann::json member(const nlohmann::json& j, const char* key) {
    return j.is_object() && j.contains(key) ? j.at(key) : nlohmann::json();
}

}  // namespace detail

/// Writes every parameter under its own name. A one-row parameter (bias, LayerNorm gain)
/// is stored 1-D {n}, as PyTorch stores it. The full value is stored even when only the
/// leading columns are active; the active column counts of such parameters are recorded
/// in the metadata entry "lowrank.active_cols" ({"name": k}).
template <class T>
void add_parameters(SafetensorsWriter& writer, const ParameterList<T>& params) {
    detail::parameters_by_name(params, "add_parameters");  // no nulls, unique names
    nlohmann::json active = nlohmann::json::object();
    const auto& existing = writer.metadata();
    if (const auto it = existing.find(std::string(kActiveColsMetadataKey)); it != existing.end()) {
        try {
            active = nlohmann::json::parse(it->second);
        } catch (const nlohmann::json::exception&) {
            active = nullptr;
        }
        check(active.is_object(), "add_parameters", "metadata '", kActiveColsMetadataKey,
              "' is already set and is not a JSON object");
    }
    for (const Parameter<T>* p : params) {
        writer.add(p->name(), p->value, detail::stored_shape(*p));
        if (p->active_cols() < p->cols()) active[p->name()] = p->active_cols();
    }
    if (!active.empty()) writer.set_metadata(std::string(kActiveColsMetadataKey), active.dump());
}

/// Fills each parameter's value from the tensor of the same name (after the prefix
/// mapping of `options`); a 1-D {n} tensor fills a (1 x n) parameter, and F32, F64, F16
/// and BF16 convert to T. With options.strict (the default), any missing, unexpected,
/// mis-shaped or non-float tensor throws one Error listing all of them, before any
/// parameter is modified; otherwise what matches is loaded and the report tells the rest.
template <class T>
LoadReport load_parameters(const SafetensorsReader& reader, const ParameterList<T>& params, LoadOptions options = {}) {
    auto plan = detail::plan_load(reader, params, options, "load_parameters");
    if (options.strict && !plan.report.ok())
        throw Error(detail::concat("load_parameters: '", reader.path(), "': ", plan.report.problem_count(),
                                   " problem(s), nothing was loaded:", plan.report.describe()));
    detail::apply_load(reader, plan);
    return plan.report;
}

namespace detail {

/// The "lowrank" document of a checkpoint, without its "optimizer" entry: the format, the
/// step, the scalar type, every parameter's shape, active columns and trainable flag, and
/// the caller's extra.
template <class T>
nlohmann::json checkpoint_document_of(const ParameterList<T>& params, std::int64_t step,
                                      const nlohmann::json& extra) {
    nlohmann::json doc;
    doc["format"] = "lowrank checkpoint";
    doc["version"] = kCheckpointVersion;
    doc["step"] = step;
    doc["dtype"] = scalar_dtype_name(std::is_same_v<T, float>);
    nlohmann::json plist = nlohmann::json::array();
    for (const Parameter<T>* p : params)
        plist.push_back({{"name", p->name()},
                         {"shape", {p->rows(), p->cols()}},
                         {"active_cols", p->active_cols()},
                         {"trainable", p->trainable}});
    doc["parameters"] = plist;
    doc["extra"] = extra.is_null() ? nlohmann::json::object() : extra;
    return doc;
}

/// The optimizer's moment names as the document lists them.
template <class T>
nlohmann::json moment_names_json(const Optimizer<T>& opt) {
    nlohmann::json moments = nlohmann::json::array();
    for (auto m : opt.moment_names()) moments.push_back(std::string(m));
    return moments;
}

/// Adds the optimizer's moments to `writer` ("optimizer.<moment>.<parameter name>", each
/// of shape rows x active_cols) and returns the document's "optimizer" entry: type,
/// moments, learning rates, groups and per-parameter step counts. Every parameter the
/// optimizer holds must be in `params`, and its state made for the parameter's layout.
template <class T>
nlohmann::json write_optimizer_state(SafetensorsWriter& writer, const ParameterList<T>& params,
                                     const Optimizer<T>& opt, const std::string& what) {
    const std::unordered_set<const Parameter<T>*> listed(params.begin(), params.end());
    nlohmann::json o;
    o["type"] = std::string(opt.type_name());
    o["moments"] = moment_names_json(opt);
    o["base_lr"] = opt.base_lr();
    o["lr_scale"] = opt.lr_scale();
    nlohmann::json groups = nlohmann::json::array();
    nlohmann::json steps = nlohmann::json::object();
    for (const auto& g : opt.groups()) {
        nlohmann::json names = nlohmann::json::array();
        for (const Parameter<T>* p : g.params) {
            check(listed.count(p) != 0, what, "the optimizer holds parameter '", p->name(),
                  "', which is not in the parameter list: its state would be lost");
            names.push_back(p->name());
            const OptimizerState<T>* s = opt.state_of(*p);
            if (s == nullptr) continue;
            check(s->layout_version == p->layout_version() && s->rows == p->rows() &&
                      s->cols == p->active_cols(),
                  what, "parameter '", p->name(), "': its optimizer state ", shape_string(s->rows, s->cols),
                  " was made for an older layout of the parameter ",
                  shape_string(p->rows(), p->active_cols()), " (call carry_state before saving)");
            steps[p->name()] = s->step;
            const auto [mr, mc] = opt.moment_shape(*p);
            for (auto m : opt.moment_names())
                writer.add(concat(kOptimizerPrefix, m, ".", p->name()), s->moment(m), stored_shape(mr, mc));
            if (s->projector.size() != 0)
                writer.add(concat(kOptimizerPrefix, kProjectorName, ".", p->name()), s->projector,
                           stored_shape(s->projector.rows(), s->projector.cols()));
        }
        groups.push_back({{"name", g.options.name},
                          {"lr", g.options.lr},
                          {"weight_decay", g.options.weight_decay},
                          {"params", names}});
    }
    o["groups"] = groups;
    o["steps"] = steps;
    return o;
}

/// Each parameter's saved active columns, from the document's "parameters" entries: every
/// parameter of `params` must have one, within its columns.
template <class T>
std::map<std::string, Index> read_parameter_entries(const nlohmann::json& doc, const ParameterList<T>& params,
                                                    const std::string& what) {
    std::map<std::string, Index> active;
    for (const auto& entry : doc.at("parameters")) {
        if (!entry.is_object() || !entry.contains("name") || !entry.at("name").is_string() ||
            !entry.contains("active_cols") || !entry.at("active_cols").is_number_unsigned())
            throw FormatError(
                concat(what, ": expected each \"parameters\" entry to have a name and active_cols >= 0, got ",
                       json_value_excerpt(entry)));
        active[entry.at("name").get<std::string>()] =
            static_cast<Index>(entry.at("active_cols").get<std::uint64_t>());
    }
    for (const Parameter<T>* p : params) {
        const auto it = active.find(p->name());
        if (it == active.end())
            throw FormatError(concat(what, ": parameter '", p->name(),
                                     "' has a tensor but no entry in the checkpoint's parameter list"));
        if (it->second > p->cols())
            throw FormatError(concat(what, ": parameter '", p->name(), "': expected active columns in [0, ",
                                     p->cols(), "], got ", it->second));
    }
    return active;
}

/// The saved optimizer state of one parameter, ready to install (has_state false: the
/// checkpoint has none for it, and the parameter's current state is dropped).
template <class T>
struct StateRestore {
    Parameter<T>* param;
    bool has_state;
    OptimizerState<T> state;
};

/// What load_checkpoint installs in the optimizer, checked in full.
template <class T>
struct OptimizerRestore {
    std::vector<StateRestore<T>> states;
    double lr_scale = 1.0;
};

/// o[key], or a FormatError naming the missing key.
inline const nlohmann::json& optimizer_field(const nlohmann::json& o, const char* key,
                                             const std::string& what) {
    if (!o.contains(key)) throw FormatError(concat(what, ": optimizer entry has no \"", key, "\""));
    return o.at(key);
}

/// The saved optimizer's type and moments must be the given optimizer's; returns the saved
/// lr_scale.
template <class T>
double check_optimizer_kind(const nlohmann::json& o, const Optimizer<T>& opt, const std::string& what) {
    const nlohmann::json& type = optimizer_field(o, "type", what);
    if (!type.is_string() || type.get<std::string>() != opt.type_name())
        throw Error(concat(what, ": optimizer type mismatch: the checkpoint was saved with ",
                           json_value_excerpt(type), ", the given optimizer is \"", opt.type_name(), "\""));
    const nlohmann::json moments = moment_names_json(opt);
    if (optimizer_field(o, "moments", what) != moments)
        throw FormatError(concat(what, ": expected optimizer moments ", moments.dump(), ", got ",
                                 json_value_excerpt(optimizer_field(o, "moments", what))));
    const nlohmann::json& scale = optimizer_field(o, "lr_scale", what);
    if (!scale.is_number() || !(scale.get<double>() >= 0.0))
        throw FormatError(concat(what, ": expected lr_scale >= 0, got ", json_value_excerpt(scale)));
    return scale.get<double>();
}

/// The optimizer's groups must be the saved ones: the same count, and each group's
/// parameters (in order), lr and weight decay.
template <class T>
void check_optimizer_groups(const nlohmann::json& groups, const Optimizer<T>& opt, const std::string& what) {
    if (groups.size() != opt.groups().size())
        throw Error(concat(what, ": expected the optimizer to have the saved ", groups.size(),
                           " parameter group(s), got ", opt.groups().size()));
    for (std::size_t i = 0; i < groups.size(); ++i) {
        const auto& saved = groups[i];
        const auto& g = opt.groups()[i];
        nlohmann::json names = nlohmann::json::array();
        for (const Parameter<T>* p : g.params) names.push_back(p->name());
        if (member(saved, "params") != names)
            throw Error(concat(what, ": optimizer group ", i, ": expected the saved parameters ",
                               json_value_excerpt(member(saved, "params"), 3 * kJsonExcerptChars), ", got ",
                               json_value_excerpt(names, 3 * kJsonExcerptChars)));
        const nlohmann::json lr = g.options.lr, wd = g.options.weight_decay;
        const nlohmann::json saved_lr = member(saved, "lr"), saved_wd = member(saved, "weight_decay");
        if (saved_lr != lr || saved_wd != wd)
            throw Error(concat(what, ": optimizer group ", i, " ('", g.options.name,
                               "'): expected the saved lr ", json_value_excerpt(saved_lr), " and weight_decay ",
                               json_value_excerpt(saved_wd), ", got lr ", lr.dump(), " and weight_decay ", wd.dump(),
                               " (CheckpointLoadOptions::check_groups = false resumes with new ones)"));
    }
}

/// The state to install for each parameter the optimizer holds, from the saved step
/// counts and moment tensors (each of the parameter's rows x saved active columns). Every
/// saved step count and every optimizer tensor must belong to one of them.
template <class T>
std::vector<StateRestore<T>> plan_optimizer_states(const SafetensorsReader& reader,
                                                   const nlohmann::json& steps,
                                                   const ParameterList<T>& params, const Optimizer<T>& opt,
                                                   const std::map<std::string, Index>& active,
                                                   const std::string& what) {
    if (!steps.is_object())
        throw FormatError(
            concat(what, ": expected optimizer steps to be an object, got ", json_value_excerpt(steps)));
    const std::unordered_set<const Parameter<T>*> listed(params.begin(), params.end());
    std::vector<StateRestore<T>> restores;
    std::set<std::string> optimizer_names;
    std::set<std::string> consumed;
    for (Parameter<T>* p : opt.parameters()) {
        check(listed.count(p) != 0, what, "the optimizer holds parameter '", p->name(),
              "', which is not in the parameter list");
        optimizer_names.insert(p->name());
        StateRestore<T> restore{p, false, {}};
        if (const nlohmann::json::const_iterator it = steps.find(p->name()); it != steps.end()) {
            if (!it->is_number_integer() || it->get<std::int64_t>() < 0)
                throw FormatError(concat(what, ": parameter '", p->name(),
                                         "': expected an optimizer step >= 0, got ",
                                         json_value_excerpt(*it)));
            restore.has_state = true;
            restore.state.step = it->get<std::int64_t>();
            const bool projected = opt.projection_of(*p) != nullptr;
            const auto [mr, mc] = projected ? opt.moment_shape(*p) : std::pair{p->rows(), active.at(p->name())};
            const auto check_tensor = [&](std::string_view m, Index rows, Index cols, std::string_view shape_name) {
                const std::string tensor = concat(kOptimizerPrefix, m, ".", p->name());
                if (!reader.contains(tensor))
                    throw FormatError(concat(what, ": parameter '", p->name(), "': optimizer state ", m,
                                             " is missing (expected tensor '", tensor, "')"));
                if (!shape_fits(reader.shape(tensor), rows, cols))
                    throw Error(concat(what, ": parameter '", p->name(), "': optimizer state ", m,
                                       " has shape ", shape_list_string(reader.shape(tensor)), ", expected ",
                                       shape_list_string(stored_shape(rows, cols)), " (", shape_name, ")"));
                if (!is_float_dtype(reader.dtype(tensor)))
                    throw FormatError(concat(what, ": parameter '", p->name(), "': optimizer state ", m,
                                             ": expected dtype F32, F64, F16 or BF16, got ",
                                             reader.dtype(tensor)));
                consumed.insert(tensor);
            };
            for (auto m : opt.moment_names())
                check_tensor(m, mr, mc, projected ? "the projected gradient's shape" : "rows x active_cols");
            if (projected) {
                const auto [pr, pc] = opt.projector_shape(*p);
                check_tensor(kProjectorName, pr, pc, "the projection basis");
            }
        }
        restores.push_back(std::move(restore));
    }
    for (const auto& [name, s] : steps.items())
        if (!optimizer_names.count(name))
            throw Error(concat(what, ": the checkpoint has optimizer state for '", clip(name),
                               "', which the given optimizer does not hold"));
    for (const std::string& tensor : reader.names())
        if (tensor.starts_with(kOptimizerPrefix) && !consumed.count(tensor))
            throw FormatError(concat(what, ": unexpected optimizer tensor '", clip(tensor),
                                     "' (no parameter of the optimizer has state under that name)"));
    return restores;
}

/// Everything the optimizer takes from the document's "optimizer" entry, checked: the
/// type and moments, the groups (with options.check_groups), each parameter's state.
template <class T>
OptimizerRestore<T> plan_optimizer_restore(const SafetensorsReader& reader, const nlohmann::json& doc,
                                           const ParameterList<T>& params, const Optimizer<T>& opt,
                                           const std::map<std::string, Index>& active,
                                           const CheckpointLoadOptions& options, const std::string& what) {
    const nlohmann::json& o = doc.at("optimizer");
    if (o.is_null())
        throw Error(concat(what, ": the checkpoint holds no optimizer state, but an optimizer (",
                           opt.type_name(), ") was given; pass a null optimizer to load only the weights"));
    OptimizerRestore<T> out;
    out.lr_scale = check_optimizer_kind(o, opt, what);
    const nlohmann::json& groups = optimizer_field(o, "groups", what);
    if (!groups.is_array())
        throw FormatError(
            concat(what, ": expected optimizer groups to be an array, got ", json_value_excerpt(groups)));
    if (options.check_groups) check_optimizer_groups(groups, opt, what);
    out.states = plan_optimizer_states(reader, optimizer_field(o, "steps", what), params, opt, active, what);
    return out;
}

/// The last step of load_checkpoint, once everything is checked: parameter values, then
/// active columns, then the optimizer's state (moments read as rows x active columns) and
/// lr scale.
template <class T>
void apply_checkpoint(const SafetensorsReader& reader, const LoadPlan<T>& plan,
                      const ParameterList<T>& params, const std::map<std::string, Index>& active,
                      Optimizer<T>* opt, OptimizerRestore<T>& restore) {
    apply_load(reader, plan);
    for (Parameter<T>* p : params)
        if (const Index k = active.at(p->name()); k != p->active_cols()) p->set_active_cols(k);
    if (opt == nullptr) return;
    for (auto& s : restore.states) {
        Parameter<T>& p = *s.param;
        opt->drop_state(p.id());
        if (!s.has_state) continue;
        // matrix<T> reads a 1-D {n} as (1 x n): every stored shape comes back as (rows x k).
        for (auto m : opt->moment_names())
            s.state.moment(m) = reader.matrix<T>(concat(kOptimizerPrefix, m, ".", p.name()));
        if (opt->projection_of(p) != nullptr)
            s.state.projector = reader.matrix<T>(concat(kOptimizerPrefix, kProjectorName, ".", p.name()));
        opt->set_state(p, std::move(s.state));
    }
    opt->set_lr_scale(restore.lr_scale);
}

}  // namespace detail

/// Writes a whole training state atomically (see the top of this file). `opt` may be null
/// (weights only). Every parameter the optimizer holds must be in `params`, and its state
/// must be current (no pending carry_state). `extra` must be a JSON object (or null).
template <class T>
void save_checkpoint(const std::string& path, const ParameterList<T>& params, const Optimizer<T>* opt,
                     std::int64_t step, const nlohmann::json& extra) {
    const std::string what = detail::concat("save_checkpoint: '", path, "'");
    check(extra.is_object() || extra.is_null(), what, "expected extra to be a JSON object, got a JSON ",
          extra.type_name());
    detail::parameters_by_name(params, what);  // no nulls, unique names

    SafetensorsWriter writer;
    add_parameters(writer, params);
    nlohmann::json doc = detail::checkpoint_document_of(params, step, extra);
    doc["optimizer"] =
        opt == nullptr ? nlohmann::json(nullptr) : detail::write_optimizer_state(writer, params, *opt, what);
    try {
        writer.set_metadata(std::string(kCheckpointMetadataKey), doc.dump());
    } catch (const nlohmann::json::exception& e) {
        throw Error(
            detail::concat(what, ": extra (or a parameter name) cannot be written as JSON: ", e.what()));
    }
    writer.write(path);
}

/// Restores a state written by save_checkpoint into an already built model and optimizer
/// (build the model from read_checkpoint_extra first if its structure depends on it).
/// Parameters load strictly; the optimizer (if not null) must be of the saved type, with
/// the saved groups (see CheckpointLoadOptions), and every saved state must fit its
/// parameter's (rows x active_cols). Active columns are restored before the optimizer
/// state is installed; parameters without saved state lose any state they had. Nothing
/// is modified if anything is wrong.
template <class T>
CheckpointInfo load_checkpoint(const std::string& path, const ParameterList<T>& params, Optimizer<T>* opt,
                               CheckpointLoadOptions options = {}) {
    const std::string what = detail::concat("load_checkpoint: '", path, "'");
    const SafetensorsReader reader(path);
    const nlohmann::json doc = detail::checkpoint_document(reader.metadata(), what);

    const auto plan = detail::plan_load(
        reader, params,
        LoadOptions{
            .strict = true, .ignore_prefixes = {std::string(kOptimizerPrefix)}, .restore_active_cols = false},
        "load_checkpoint");
    if (!plan.report.ok())
        throw Error(detail::concat(what,
                                   ": the checkpoint does not fit the model: ", plan.report.problem_count(),
                                   " problem(s), nothing was loaded:", plan.report.describe()));
    const std::map<std::string, Index> active = detail::read_parameter_entries(doc, params, what);
    detail::OptimizerRestore<T> restore;
    if (opt != nullptr)
        restore = detail::plan_optimizer_restore(reader, doc, params, *opt, active, options, what);

    // Everything checked: now change things.
    detail::apply_checkpoint(reader, plan, params, active, opt, restore);
    return CheckpointInfo{doc.at("step").get<std::int64_t>(), doc.at("extra")};
}

/// The caller's `extra` object of a checkpoint, reading only the file's header: enough to
/// rebuild the model's structure (layer kinds, ranks) before load_checkpoint.
inline nlohmann::json read_checkpoint_extra(const std::string& path) {
    const std::string what = detail::concat("read_checkpoint_extra: '", path, "'");
    const auto metadata = detail::read_safetensors_metadata_only(path, "read_checkpoint_extra");
    return detail::checkpoint_document(metadata, what).at("extra");
}

}  // namespace lowrank
