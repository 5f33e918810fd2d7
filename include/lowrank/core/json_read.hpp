#pragma once
// The one way lowrank reads JSON from a file: safetensors headers, checkpoint documents,
// GPT-2's encoder.json (docs/reliability.md).
//
// nlohmann::json parses any depth without recursing, but copying, comparing and dump()ing
// the result recurse, so a file of 100,000 nested brackets crashes whoever touches it
// next; nlohmann also keeps the last of two equal keys silently, and stops at a NUL byte
// as if the text ended there ("{}\0{...}" reads as {}). parse_json_bounded refuses all of
// these before a value exists: one SAX pass builds the value and checks the limits as it
// goes, in time linear in the text (a parser_callback_t would do the same checks, but
// with one nlohmann 3.11 rescans the enclosing object whenever an inner one ends, which
// makes a header of n entries O(n^2)).
//
// Messages name the reader and the file (`what`), the byte offset and line/column, what
// was expected and what was found, and quote at most kJsonExcerptChars characters of the
// text: a hostile file cannot make an error message large.

#include <lowrank/core/error.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank::detail {

struct JsonLimits {
    /// Longest text accepted, in bytes; the reference safetensors library refuses headers
    /// over 100 MB.
    std::size_t max_bytes = 100'000'000;
    /// Deepest nesting of arrays and objects accepted (the outermost one is depth 1). The
    /// reference safetensors library allows 128, as serde_json does.
    std::size_t max_depth = 128;
};

/// Longest excerpt of a file's text (or of a value) that a message quotes.
inline constexpr std::size_t kJsonExcerptChars = 80;

/// `s` cut to at most `max_chars` characters (an ellipsis "..." marks the cut), with
/// control characters, quotes, backslashes and non-ASCII bytes escaped (\n, \", \\,
/// \xNN), between double quotes. Escaping every byte >= 0x80 keeps the result valid UTF-8
/// whatever the input, and lets a message show exactly which bytes are there.
inline std::string quote_excerpt(std::string_view s, std::size_t max_chars = kJsonExcerptChars) {
    static constexpr char hex[] = "0123456789abcdef";
    std::string out = "\"";
    std::size_t shown = 0;
    std::size_t i = 0;
    for (; i < s.size() && shown < max_chars; ++i, ++shown) {
        const auto c = static_cast<unsigned char>(s[i]);
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20 || c >= 0x7f) {
                    out += "\\x";
                    out += hex[c >> 4];
                    out += hex[c & 0xf];
                } else {
                    out += static_cast<char>(c);
                }
        }
    }
    if (i < s.size()) out += "...";
    return out + "\"";
}

/// The text around byte `pos`: up to 50 bytes before it and 30 from it, quoted as
/// quote_excerpt does, with "..." where the text goes on.
inline std::string text_excerpt(std::string_view text, std::size_t pos) {
    pos = std::min(pos, text.size());
    const std::size_t begin = pos > 50 ? pos - 50 : 0;
    const std::size_t end = std::min(text.size(), pos + 30);
    std::string body = quote_excerpt(text.substr(begin, end - begin), end - begin);
    if (begin > 0) body.insert(1, "...");
    if (end < text.size()) body.insert(body.size() - 1, "...");
    return body;
}

/// "byte 1234 (line 1, column 1235)": where `pos` is in `text`; line and column from 1.
inline std::string text_position(std::string_view text, std::size_t pos) {
    pos = std::min(pos, text.size());
    const auto head = text.substr(0, pos);
    const auto line = 1 + static_cast<std::size_t>(std::count(head.begin(), head.end(), '\n'));
    const std::size_t last_newline = head.rfind('\n');
    const std::size_t column = last_newline == std::string_view::npos ? pos + 1 : pos - last_newline;
    return concat("byte ", pos, " (line ", line, ", column ", column, ")");
}

/// `s` as it is if it has at most `max_chars` bytes, else its first `max_chars` bytes and
/// "...": for names a file supplies (tensor names, keys) that a message repeats.
inline std::string clip(std::string_view s, std::size_t max_chars = kJsonExcerptChars) {
    if (s.size() <= max_chars) return std::string(s);
    return concat(s.substr(0, max_chars), "... (", s.size(), " bytes)");
}

/// How many problems of one kind a message lists in full before it only counts the rest.
inline constexpr std::size_t kListedProblems = 10;

/// A message's list of problems that stays short whatever their number (a file can hold
/// 10,000 unexpected tensors): the first `shown` items joined by `separator`, then
/// "... and N more<suffix>". An item's parts are joined only if it is shown; names the
/// file supplies should go in through clip().
class ProblemList {
public:
    explicit ProblemList(std::string separator = ", ", std::string suffix = {},
                         std::size_t shown = kListedProblems)
        : separator_(std::move(separator)), suffix_(std::move(suffix)), shown_(shown) {}

    template <class... Args>
    void add(const Args&... parts) {
        if (count_++ >= shown_) return;
        if (count_ > 1) text_ += separator_;
        text_ += concat(parts...);
    }

    std::size_t size() const { return count_; }
    bool empty() const { return count_ == 0; }

    std::string str() const {
        if (count_ <= shown_) return text_;
        return concat(text_, text_.empty() ? "" : separator_, "... and ", count_ - shown_, " more", suffix_);
    }

private:
    std::string separator_;
    std::string suffix_;
    std::size_t shown_;
    std::size_t count_ = 0;
    std::string text_;
};

namespace json_read {

/// Appends at most `budget` characters of j's compact JSON to `out`. Every nesting level
/// writes a bracket, so the recursion stops after at most `budget` levels whatever the
/// depth of j.
inline void put_excerpt(const nlohmann::json& j, std::string& out, std::size_t budget) {
    if (out.size() >= budget) return;
    if (j.is_array() || j.is_object()) {
        const bool object = j.is_object();
        out += object ? '{' : '[';
        bool first = true;
        for (auto it = j.begin(); it != j.end() && out.size() < budget; ++it) {
            if (!first) out += ',';
            first = false;
            if (object) {
                put_excerpt(nlohmann::json(it.key().substr(0, budget)), out, budget);
                if (out.size() < budget) out += ':';
            }
            put_excerpt(*it, out, budget);
        }
        if (out.size() < budget) out += object ? '}' : ']';
        return;
    }
    if (j.is_string()) {
        const auto& s = j.get_ref<const std::string&>();
        out += nlohmann::json(s.substr(0, budget)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        return;
    }
    out += j.dump();
}

}  // namespace json_read

/// j as compact JSON for a message: at most `max_chars` characters, "..." marking a cut.
/// Safe on values of any size and depth (dump() is neither).
inline std::string json_value_excerpt(const nlohmann::json& j, std::size_t max_chars = kJsonExcerptChars) {
    std::string out;
    json_read::put_excerpt(j, out, max_chars + 1);
    if (out.size() > max_chars) {
        out.resize(max_chars);
        out += "...";
    }
    return out;
}

namespace json_read {

/// A pointer into the text that reports, through `probe`, how far the parser has read:
/// nlohmann's SAX interface tells a handler what it found but not where.
class ProbedIterator {
public:
    using iterator_category = std::forward_iterator_tag;
    using value_type = char;
    using difference_type = std::ptrdiff_t;
    using pointer = const char*;
    using reference = const char&;

    ProbedIterator() = default;
    ProbedIterator(const char* p, const char** probe) : p_(p), probe_(probe) {}
    reference operator*() const { return *p_; }
    ProbedIterator& operator++() {
        *probe_ = ++p_;
        return *this;
    }
    ProbedIterator operator++(int) {
        ProbedIterator old = *this;
        ++*this;
        return old;
    }
    bool operator==(const ProbedIterator& o) const { return p_ == o.p_; }
    bool operator!=(const ProbedIterator& o) const { return p_ != o.p_; }

private:
    const char* p_ = nullptr;
    const char** probe_ = nullptr;
};

/// Builds the value as nlohmann's own DOM parser does, refusing nesting beyond the limit
/// and a key its object already holds (each open object is its own set of keys).
class BoundedBuilder {
public:
    using json = nlohmann::json;

    BoundedBuilder(std::string_view text, const char* const* read_to, const JsonLimits& limits, std::string_view what)
        : text_(text), read_to_(read_to), limits_(limits), what_(what) {}

    bool null() { return put(json(nullptr)); }
    bool boolean(bool v) { return put(json(v)); }
    bool number_integer(json::number_integer_t v) { return put(json(v)); }
    bool number_unsigned(json::number_unsigned_t v) { return put(json(v)); }
    bool number_float(json::number_float_t v, const json::string_t&) { return put(json(v)); }
    bool string(json::string_t& v) { return put(json(std::move(v))); }
    bool binary(json::binary_t& v) { return put(json::binary(std::move(v))); }

    bool start_object(std::size_t) { return open(json::object()); }
    bool start_array(std::size_t) { return open(json::array()); }
    bool end_object() { return close(); }
    bool end_array() { return close(); }

    bool key(json::string_t& k) {
        auto& object = stack_.back().value->get_ref<json::object_t&>();
        const auto [it, inserted] = object.emplace(std::move(k), nullptr);
        if (!inserted) {
            const std::size_t at = consumed() == 0 ? 0 : consumed() - 1;  // the key's closing quote
            throw FormatError(concat(what_, ": ", text_position(text_, at), ": expected each key once per object, ",
                                     "found the key ", quote_excerpt(it->first), " a second time in ", where_now(),
                                     " (which one counts would be up to the reader), near ",
                                     text_excerpt(text_, at + 1)));
        }
        pending_key_ = &it->first;
        slot_ = &it->second;
        return true;
    }

    bool parse_error(std::size_t position, const std::string& last_token, const nlohmann::json::exception& e) {
        // nlohmann's message reads "[json.exception.parse_error.101] parse error at line 1,
        // column 7: syntax error while parsing value - invalid literal; last read: '<the
        // token so far>'; expected ...": keep its description, without the token, which can
        // be as long as the file.
        // Other errors ("[json.exception.out_of_range.406] number overflow parsing '<the
        // number>'") quote the token too; it is cut to an excerpt there.
        std::string description = e.what();
        if (description.starts_with("[json.exception.")) {
            if (const auto k = description.find("] "); k != std::string::npos) description.erase(0, k + 2);
        }
        if (description.starts_with("parse error")) {
            if (const auto colon = description.find(": "); colon != std::string::npos) description.erase(0, colon + 2);
        }
        const std::string last_read = "; last read: '" + last_token + "'";
        if (const auto k = description.find(last_read); k != std::string::npos) description.erase(k, last_read.size());
        if (const auto k = description.find(last_token); !last_token.empty() && k != std::string::npos)
            description.replace(k, last_token.size(), clip(last_token, 40));
        description = clip(description, 3 * kJsonExcerptChars);
        const std::size_t at = position == 0 ? 0 : position - 1;
        throw FormatError(concat(what_, ": ", text_position(text_, at), ": not valid JSON: ", description,
                                 ", near ", text_excerpt(text_, at)));
    }

    json take() { return std::move(root_); }

private:
    struct Level {
        json* value;
        const std::string* key;  // where value sits in its parent object (null in an array)
        std::size_t index;       // where value sits in its parent array
    };

    std::size_t consumed() const { return static_cast<std::size_t>(*read_to_ - text_.data()); }

    /// Stores v where the parser is (the root, the end of the open array, or the value of
    /// the key just read) and returns where it went.
    json* place(json&& v, const std::string*& key, std::size_t& index) {
        key = nullptr;
        index = 0;
        if (stack_.empty()) {
            root_ = std::move(v);
            return &root_;
        }
        json& top = *stack_.back().value;
        if (top.is_array()) {
            auto& array = top.get_ref<json::array_t&>();
            index = array.size();
            array.push_back(std::move(v));
            return &array.back();
        }
        key = pending_key_;
        *slot_ = std::move(v);
        return slot_;
    }

    bool put(json&& v) {
        const std::string* key = nullptr;
        std::size_t index = 0;
        place(std::move(v), key, index);
        return true;
    }

    bool open(json&& v) {
        if (stack_.size() >= limits_.max_depth) {
            const std::size_t at = consumed() == 0 ? 0 : consumed() - 1;  // the opening bracket
            throw FormatError(concat(what_, ": ", text_position(text_, at), ": expected at most ",
                                     limits_.max_depth, " nested arrays and objects, found deeper nesting at ",
                                     pointer(true), ", near ", text_excerpt(text_, at)));
        }
        Level level{nullptr, nullptr, 0};
        level.value = place(std::move(v), level.key, level.index);
        stack_.push_back(level);
        return true;
    }

    bool close() {
        stack_.pop_back();
        return true;
    }

    /// Where the parser is, as a quoted JSON pointer ("/t/shape/0/0") cut to a short
    /// excerpt: the innermost open array or object, or with `next` the value about to be
    /// stored in it. "" is the top level.
    std::string pointer(bool next = false) const {
        std::string p;
        for (std::size_t i = 1; i < stack_.size() && p.size() <= kJsonExcerptChars; ++i)
            p += "/" + (stack_[i].key != nullptr ? *stack_[i].key : std::to_string(stack_[i].index));
        if (next && !stack_.empty() && p.size() <= kJsonExcerptChars) {
            const json& top = *stack_.back().value;
            p += "/" + (top.is_array() ? std::to_string(top.size()) : *pending_key_);
        }
        return quote_excerpt(p);
    }

    /// "the top-level object" or "the object at "/t"", for a duplicate key.
    std::string where_now() const {
        if (stack_.size() <= 1) return "the top-level object";
        return "the object at " + pointer();
    }

    std::string_view text_;
    const char* const* read_to_;
    JsonLimits limits_;
    std::string_view what_;
    json root_;
    std::vector<Level> stack_;
    const std::string* pending_key_ = nullptr;
    json* slot_ = nullptr;
};

}  // namespace json_read

/// Parses `text` as one JSON value, refusing (FormatError) a text longer than
/// limits.max_bytes, a NUL byte anywhere, nesting deeper than limits.max_depth, a key that
/// appears twice in one object (at any level), anything but whitespace after the value,
/// and invalid JSON or UTF-8. `what` starts every message; name the reader and the file
/// in it ("SafetensorsReader: 'model.safetensors': header"). Linear time; the result is at
/// most max_depth deep, so copying and dump() are safe.
inline nlohmann::json parse_json_bounded(std::string_view text, const JsonLimits& limits, std::string_view what) {
    if (text.size() > limits.max_bytes)
        throw FormatError(concat(what, ": expected at most ", limits.max_bytes, " bytes of JSON, found ", text.size()));
    // nlohmann reads a NUL as the end of the input: whatever follows would be ignored.
    if (const void* nul = std::memchr(text.data(), '\0', text.size()); nul != nullptr) {
        const auto at = static_cast<std::size_t>(static_cast<const char*>(nul) - text.data());
        throw FormatError(concat(what, ": ", text_position(text, at),
                                 ": expected JSON text, found a NUL byte (JSON has no place for one), near ",
                                 text_excerpt(text, at)));
    }
    const char* read_to = text.data();
    json_read::BoundedBuilder builder(text, &read_to, limits, what);
    const json_read::ProbedIterator first(text.data(), &read_to);
    const json_read::ProbedIterator last(text.data() + text.size(), &read_to);
    // strict: only whitespace may follow the value. Errors throw from the builder.
    nlohmann::json::sax_parse(first, last, &builder, nlohmann::json::input_format_t::json, /*strict=*/true);
    return builder.take();
}

}  // namespace lowrank::detail
