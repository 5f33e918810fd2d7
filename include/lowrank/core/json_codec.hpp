#pragma once
// Exact JSON for the values a saved state must give back bit for bit: a 64-bit word and a
// generator's whole state (docs/checkpoints.md). A checkpoint's RNGs and the policies'
// saved states (policy/policy_state.hpp) both go through these, so they share one layout
// and one set of error messages.
//
// A word is written as "0x" and 16 hex digits: many JSON readers hold every number as a
// double, which keeps 53 bits. Reading also takes "0x" and 1 to 16 hex digits (either
// case) or an unsigned JSON integer, as files written by earlier versions may hold.
//
// Every JSON line the library writes (a metrics log's, a rank log's) is dumped by
// to_json_line, so they agree on the details: one line, bytes that are not valid UTF-8 as
// U+FFFD, NaN and infinities as null.
//
// Errors are FormatErrors "<context>: key '<key>': expected <what>, got <excerpt>" or
// "<context>: missing key '<key>' (expected <what>)", where <key> is the path of the value
// inside the document ("rng.s[2]") and <excerpt> the value found, shortened
// (json_value_excerpt: safe on a value of any size or depth).

#include <lowrank/core/error.hpp>
#include <lowrank/core/json_read.hpp>
#include <lowrank/core/rng.hpp>

#include <nlohmann/json.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace lowrank {

namespace detail {

/// j as one line of JSON text, without the newline: compact, keys in j's order (sorted for
/// nlohmann::json, as inserted for ordered_json), bytes that are not valid UTF-8 replaced
/// by U+FFFD (so the line parses whatever a name held), non-finite numbers as null.
template <class BasicJson>
std::string to_json_line(const BasicJson& j) {
    return j.dump(-1, ' ', false, BasicJson::error_handler_t::replace);
}

/// `key` inside `path` ("rng" + "s[2]" -> "rng.s[2]"); an index ("[2]") attaches directly.
inline std::string json_key_path(std::string_view path, std::string_view key) {
    if (path.empty()) return std::string(key);
    if (key.empty()) return std::string(path);
    return concat(path, key.front() == '[' ? "" : ".", key);
}

/// Throws the FormatError "<context>: key '<key>': expected <expected>, got <excerpt>".
[[noreturn]] inline void json_type_error(std::string_view context, std::string_view key,
                                         std::string_view expected, const nlohmann::json& got) {
    if (key.empty())
        throw FormatError(concat(context, ": expected ", expected, ", got ", json_value_excerpt(got)));
    throw FormatError(
        concat(context, ": key '", key, "': expected ", expected, ", got ", json_value_excerpt(got)));
}

/// object[key], or the FormatError "<context>: missing key '<path.key>' (expected ...)".
inline const nlohmann::json& json_member(std::string_view context, const nlohmann::json& object,
                                         std::string_view path, const std::string& key,
                                         std::string_view expected) {
    const auto it = object.find(key);
    if (it == object.end())
        throw FormatError(
            concat(context, ": missing key '", json_key_path(path, key), "' (expected ", expected, ")"));
    return *it;
}

/// "0x" and 1 to 16 hex digits (either case), or nothing.
inline std::optional<std::uint64_t> parse_hex_word(std::string_view s) {
    if (s.size() <= 2 || s.size() > 18 || s[0] != '0' || (s[1] != 'x' && s[1] != 'X')) return std::nullopt;
    std::uint64_t v = 0;
    for (const char c : s.substr(2)) {
        int d = -1;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        if (d < 0) return std::nullopt;
        v = (v << 4) | static_cast<std::uint64_t>(d);
    }
    return v;
}

inline constexpr std::string_view kJsonWordExpected =
    "a 64-bit word (\"0x\" and 1 to 16 hex digits, or an unsigned integer)";

}  // namespace detail

/// "0x" and 16 lower-case hex digits.
inline std::string word_to_hex(std::uint64_t v) {
    static constexpr char digits[] = "0123456789abcdef";
    std::string s = "0x";
    for (int shift = 60; shift >= 0; shift -= 4) s += digits[(v >> shift) & 0xf];
    return s;
}

/// A word as word_to_hex writes it, or as an unsigned JSON integer. `context` and `key`
/// name it in the error (see the top of this file).
inline std::uint64_t word_from_json(const nlohmann::json& j, std::string_view context, std::string_view key) {
    if (j.is_number_unsigned()) return j.get<std::uint64_t>();
    if (j.is_string())
        if (const auto v = detail::parse_hex_word(j.get_ref<const std::string&>())) return *v;
    detail::json_type_error(context, key, detail::kJsonWordExpected, j);
}

/// A generator's whole state: {"s": [four words], "has_spare": bool, "spare": the cached
/// normal deviate's bit pattern as a word}, words as word_to_hex writes them.
inline nlohmann::json rng_state_to_json(const Rng::State& state) {
    nlohmann::json words = nlohmann::json::array();
    for (const std::uint64_t w : state.s) words.push_back(word_to_hex(w));
    return {{"s", words},
            {"has_spare", state.has_spare},
            {"spare", word_to_hex(std::bit_cast<std::uint64_t>(state.spare))}};
}

/// Reads what rng_state_to_json writes (words also as unsigned integers). `path` is where
/// the state sits in a larger document ("layers[0].rng"), for the messages.
inline Rng::State rng_state_from_json(const nlohmann::json& j, std::string_view context,
                                      std::string_view path = {}) {
    if (!j.is_object()) detail::json_type_error(context, path, "an object with s, has_spare and spare", j);
    const nlohmann::json& words = detail::json_member(context, j, path, "s", "an array of 4 words");
    if (!words.is_array() || words.size() != 4)
        detail::json_type_error(context, detail::json_key_path(path, "s"), "an array of 4 words", words);
    const nlohmann::json& has_spare = detail::json_member(context, j, path, "has_spare", "true or false");
    if (!has_spare.is_boolean())
        detail::json_type_error(context, detail::json_key_path(path, "has_spare"), "true or false",
                                has_spare);
    const nlohmann::json& spare = detail::json_member(context, j, path, "spare", detail::kJsonWordExpected);

    Rng::State state;
    for (std::size_t i = 0; i < 4; ++i)
        state.s[i] =
            word_from_json(words[i], context, detail::json_key_path(path, detail::concat("s[", i, "]")));
    state.has_spare = has_spare.get<bool>();
    state.spare = std::bit_cast<double>(word_from_json(spare, context, detail::json_key_path(path, "spare")));
    return state;
}

/// rng_state_from_json with the context "rng_state_from_json".
inline Rng::State rng_state_from_json(const nlohmann::json& j) {
    return rng_state_from_json(j, "rng_state_from_json");
}

}  // namespace lowrank
