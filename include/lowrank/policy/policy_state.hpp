#pragma once
// Reading and writing a rank policy's saved state (RankPolicy::state() and restore(),
// docs/methods/README.md, "Saving and resuming"): the header every state starts with, a
// reader whose errors name the policy, the key, the expected and the actual value, and
// the saved structure of the layers a policy manages. Generators and 64-bit words use the
// checkpoint's codec (core/json_codec.hpp), so a policy's RNG and a checkpoint's look alike.

#include <lowrank/core/error.hpp>
#include <lowrank/core/json_codec.hpp>
#include <lowrank/core/json_read.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/nn/any_linear.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

namespace detail {

/// A generator's whole state, as rng_state_to_json writes it.
inline nlohmann::json rng_to_policy_state(const Rng& rng) { return rng_state_to_json(rng.state()); }

/// A double that may be NaN (a statistic not computed yet): JSON has no NaN, so it is null.
inline nlohmann::json optional_number(double v) {
    return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
}

/// Reads a saved policy state. Every error is an Error naming the policy, the key (a path
/// such as "layers[1].rank"), what was expected and what was found.
class PolicyStateReader {
public:
    PolicyStateReader(std::string_view policy, const nlohmann::json& json, std::string path = {})
        : policy_(policy), json_(&json), path_(std::move(path)) {
        if (!json.is_object())
            throw Error(concat(policy_, ": restore: expected ",
                               path_.empty() ? "the state" : "'" + path_ + "'", " to be a JSON object, got ",
                               excerpt(json)));
    }

    const nlohmann::json& json() const { return *json_; }
    const std::string& policy() const { return policy_; }
    bool has(const std::string& key) const { return json_->contains(key); }

    /// Throws unless the state's "policy" is `name`: a state saved by another policy.
    void expect_policy(std::string_view name) const {
        const std::string saved = string("policy");
        if (saved != name)
            throw Error(concat(policy_, ": restore: the state was saved by policy '", clip(saved), "', expected '",
                               name,
                               "' (are the policies added in the saved order, with the saved methods?)"));
    }

    const nlohmann::json& at(const std::string& key, std::string_view expected) const {
        const auto it = json_->find(key);
        if (it == json_->end())
            throw Error(
                concat(policy_, ": restore: missing key '", where(key), "' (expected ", expected, ")"));
        return *it;
    }

    std::int64_t integer(const std::string& key) const {
        const nlohmann::json& v = at(key, "an integer");
        if (!is_int64(v)) fail(key, "an integer", v);
        return v.get<std::int64_t>();
    }

    /// An integer in [lo, hi] (hi = the int64 maximum: no upper bound).
    std::int64_t integer(const std::string& key, std::int64_t lo, std::int64_t hi) const {
        const std::int64_t v = integer(key);
        if (v < lo || v > hi) {
            if (hi == std::numeric_limits<std::int64_t>::max())
                throw Error(concat(policy_, ": restore: key '", where(key), "': expected an integer >= ", lo,
                                   ", got ", v));
            throw Error(concat(policy_, ": restore: key '", where(key), "': expected an integer in [", lo,
                               ", ", hi, "], got ", v));
        }
        return v;
    }

    bool boolean(const std::string& key) const {
        const nlohmann::json& v = at(key, "true or false");
        if (!v.is_boolean()) fail(key, "true or false", v);
        return v.get<bool>();
    }

    /// A number, or null for NaN (see optional_number).
    double number(const std::string& key) const {
        const nlohmann::json& v = at(key, "a number or null");
        if (v.is_null()) return std::nan("");
        if (!v.is_number()) fail(key, "a number or null", v);
        return v.get<double>();
    }

    std::string string(const std::string& key) const {
        const nlohmann::json& v = at(key, "a string");
        if (!v.is_string()) fail(key, "a string", v);
        return v.get<std::string>();
    }

    PolicyStateReader object(const std::string& key) const {
        return PolicyStateReader(policy_, at(key, "an object"), where(key));
    }

    /// An array of objects, each as a reader whose path names its index.
    std::vector<PolicyStateReader> objects(const std::string& key) const {
        const nlohmann::json& v = array(key);
        std::vector<PolicyStateReader> out;
        for (std::size_t i = 0; i < v.size(); ++i)
            out.emplace_back(policy_, v[i], concat(where(key), "[", i, "]"));
        return out;
    }

    /// An array of integers.
    std::vector<std::int64_t> integers(const std::string& key) const {
        const nlohmann::json& v = array(key);
        std::vector<std::int64_t> out;
        for (std::size_t i = 0; i < v.size(); ++i) {
            if (!is_int64(v[i]))
                throw Error(concat(policy_, ": restore: key '", where(key), "[", i,
                                   "]': expected an integer, got ", excerpt(v[i])));
            out.push_back(v[i].get<std::int64_t>());
        }
        return out;
    }

    const nlohmann::json& array(const std::string& key) const {
        const nlohmann::json& v = at(key, "an array");
        if (!v.is_array()) fail(key, "an array", v);
        return v;
    }

    /// A generator's state as rng_to_policy_state writes it (rng_state_from_json: the words
    /// as hex strings or unsigned integers).
    Rng::State rng(const std::string& key) const {
        return rng_state_from_json(at(key, "an object"), concat(policy_, ": restore"), where(key));
    }

    /// The path of `key` inside the state, for messages.
    std::string where(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
    const std::string& path() const { return path_; }

    /// Throws an Error about this part of the state.
    template <class... Args>
    [[noreturn]] void error(const Args&... message) const {
        throw Error(
            concat(policy_, ": restore: ", path_.empty() ? std::string() : "'" + path_ + "': ", message...));
    }

    [[noreturn]] void fail(const std::string& key, std::string_view expected,
                           const nlohmann::json& got) const {
        throw Error(concat(policy_, ": restore: key '", where(key), "': expected ", expected, ", got ",
                           excerpt(got)));
    }

    /// A JSON value for a message, shortened (json_value_excerpt).
    static std::string excerpt(const nlohmann::json& v) { return json_value_excerpt(v); }

private:
    static bool is_int64(const nlohmann::json& v) {
        return v.is_number_integer() &&
               !(v.is_number_unsigned() &&
                 v.get<std::uint64_t>() >
                     static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()));
    }

    std::string policy_;
    const nlohmann::json* json_;
    std::string path_;
};

/// How a policy's state describes a layer it manages: its kind and each parameter's name,
/// shape, active columns and trainable flag, in the layer's order. (Not the rank: a
/// SpectralLinear's counts its positive singular values, a property of the values.)
template <class T>
nlohmann::json layer_structure(AnyLinear<T>& slot) {
    nlohmann::json params = nlohmann::json::array();
    for (const Parameter<T>* p : slot.parameters())
        params.push_back({{"name", p->name()},
                          {"rows", p->rows()},
                          {"cols", p->cols()},
                          {"active_cols", p->active_cols()},
                          {"trainable", p->trainable}});
    return {{"kind", slot.kind()}, {"parameters", params}};
}

/// Throws unless the slot now has the structure saved under `entry`'s "structure" key:
/// the last check of a restore, naming the first difference.
template <class T>
void check_layer_structure(const PolicyStateReader& entry, AnyLinear<T>& slot) {
    const nlohmann::json& saved = entry.at("structure", "an object (the layer's saved structure)");
    const nlohmann::json actual = layer_structure(slot);
    if (saved == actual) return;
    const std::string head = concat(entry.policy(), ": restore: layer '", slot.name(), "': ");
    if (!saved.is_object() || !saved.contains("kind") || !saved.contains("parameters") ||
        !saved.at("parameters").is_array())
        throw Error(concat(head, "'", entry.where("structure"),
                           "': expected an object with kind and parameters, got ",
                           PolicyStateReader::excerpt(saved)));
    if (saved.at("kind") != actual.at("kind"))
        throw Error(concat(head, "expected a ", json_value_excerpt(saved.at("kind")), " layer (saved), got a ",
                           actual.at("kind").dump(), " layer after restoring"));
    const nlohmann::json& sp = saved.at("parameters");
    const nlohmann::json& ap = actual.at("parameters");
    for (std::size_t i = 0; i < std::max(sp.size(), ap.size()); ++i) {
        const nlohmann::json s = i < sp.size() ? sp[i] : nlohmann::json("(none)");
        const nlohmann::json a = i < ap.size() ? ap[i] : nlohmann::json("(none)");
        if (s != a)
            throw Error(concat(head, "parameter ", i, ": expected ", json_value_excerpt(s, 3 * kJsonExcerptChars),
                               " (saved), got ", json_value_excerpt(a, 3 * kJsonExcerptChars), " after restoring"));
    }
    throw Error(concat(head, "expected the structure ", json_value_excerpt(saved, 3 * kJsonExcerptChars),
                       " (saved), got ", json_value_excerpt(actual, 3 * kJsonExcerptChars)));
}

/// Version of the policies' state documents; restore refuses any other.
inline constexpr int kPolicyStateVersion = 1;

/// The start of every policy's state: {"policy": name, "version": kPolicyStateVersion}.
inline nlohmann::json policy_state_header(std::string_view policy) {
    return {{"policy", std::string(policy)}, {"version", kPolicyStateVersion}};
}

/// A reader of `state` after checking that it is an object saved by `policy` in this version.
inline PolicyStateReader open_policy_state(std::string_view policy, const nlohmann::json& state) {
    PolicyStateReader r(policy, state);
    r.expect_policy(policy);
    const std::int64_t version = r.integer("version");
    if (version != kPolicyStateVersion)
        throw Error(concat(policy, ": restore: key 'version': expected ", kPolicyStateVersion,
                           " (the version this library reads), got ", version));
    return r;
}

/// The slots a policy manages, checked against the "layers" entries of its saved state:
/// the same number, and each entry's "name" the slot's name, in order.
inline std::vector<PolicyStateReader> matched_layers(const PolicyStateReader& state,
                                                     const std::vector<std::string>& names) {
    std::vector<PolicyStateReader> entries = state.objects("layers");
    if (entries.size() != names.size()) {
        ProblemList saved, now;  // a state can list any number of layers
        for (const auto& e : entries) saved.add(clip(e.string("name")));
        for (const auto& n : names) now.add(n);
        throw Error(concat(state.policy(), ": restore: the state has ", entries.size(), " layer(s) (",
                           saved.str(), "), but the policy manages ", names.size(), " (", now.str(), ")"));
    }
    for (std::size_t i = 0; i < entries.size(); ++i) {
        const std::string saved = entries[i].string("name");
        if (saved != names[i])
            throw Error(concat(state.policy(), ": restore: key '", entries[i].where("name"),
                               "': expected layer '", names[i], "' (the policy's layer ", i,
                               " in this model), got '", clip(saved), "'"));
    }
    return entries;
}

}  // namespace detail

}  // namespace lowrank
