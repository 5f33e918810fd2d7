#pragma once
// A JSON-lines metrics log: one JSON object per line, flushed as each line is written, so
// a crashed or running job leaves a file that every line of can be parsed (pandas
// read_json(lines=True), jq, nlohmann::json::parse per line).
//
//     MetricsLog log("metrics.jsonl");
//     log.write(JsonLine().field("epoch", 3).field("test_loss", 0.41).field("method", "dense"));
//
// Numbers are written in the shortest form that reads back to the same value (so a float
// stays "0.1", not "0.100000001"); NaN and infinities, which JSON cannot hold, become null.
// Strings are escaped per RFC 8259, and bytes that are not valid UTF-8 become U+FFFD, so
// every line is valid JSON whatever the input.

#include <lowrank/core/atomic_file.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/json_read.hpp>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <ranges>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>

namespace lowrank {

namespace detail {

/// Appends s as a JSON string literal (with the quotes).
inline void append_json_string(std::string& out, std::string_view s) {
    static constexpr char hex[] = "0123456789abcdef";
    out += '"';
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const std::size_t n = s.size();
    std::size_t i = 0;
    while (i < n) {
        const unsigned char c = p[i];
        if (c < 0x80) {
            switch (c) {
                case '"': out += "\\\""; break;
                case '\\': out += "\\\\"; break;
                case '\b': out += "\\b"; break;
                case '\f': out += "\\f"; break;
                case '\n': out += "\\n"; break;
                case '\r': out += "\\r"; break;
                case '\t': out += "\\t"; break;
                default:
                    if (c < 0x20) {
                        out += "\\u00";
                        out += hex[c >> 4];
                        out += hex[c & 0xF];
                    } else {
                        out += static_cast<char>(c);
                    }
            }
            ++i;
            continue;
        }
        // A multi-byte UTF-8 sequence: copy it if it is well formed (no overlong forms,
        // no surrogates, at most U+10FFFF), else write U+FFFD for its first byte.
        std::size_t len = 0;
        std::uint32_t cp = 0;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
            cp = c & 0x1Fu;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            cp = c & 0x0Fu;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            cp = c & 0x07u;
        }
        bool ok = len != 0 && i + len <= n;
        for (std::size_t k = 1; ok && k < len; ++k) {
            if ((p[i + k] & 0xC0u) != 0x80u)
                ok = false;
            else
                cp = (cp << 6) | (p[i + k] & 0x3Fu);
        }
        if (ok) {
            ok = (len == 3 && cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) ||
                 (len == 4 && cp >= 0x10000 && cp <= 0x10FFFF) || len == 2;
        }
        if (ok) {
            out.append(s.data() + i, len);
            i += len;
        } else {
            out += "\xEF\xBF\xBD";  // U+FFFD
            ++i;
        }
    }
    out += '"';
}

/// Appends a number in its shortest round-trip form; null if not finite.
template <class V>
void append_json_number(std::string& out, V v) {
    if constexpr (std::is_floating_point_v<V>) {
        if (!std::isfinite(v)) {
            out += "null";
            return;
        }
    }
    char buf[64];
    const auto res = std::to_chars(buf, buf + sizeof buf, v);
    out.append(buf, static_cast<std::size_t>(res.ptr - buf));
}

template <class V>
concept JsonNumber = std::is_arithmetic_v<V> && !std::is_same_v<V, bool> && !std::is_same_v<V, char>;

template <class R>
concept JsonNumberRange = std::ranges::input_range<R> &&
                          JsonNumber<std::remove_cvref_t<std::ranges::range_reference_t<R>>>;

}  // namespace detail

/// One JSON object, built field by field. Field names are not checked for duplicates.
class JsonLine {
public:
    /// A number (integers exactly; floating point in shortest round-trip form, non-finite
    /// values as null).
    template <detail::JsonNumber V>
    JsonLine& field(std::string_view name, V value) {
        key(name);
        detail::append_json_number(text_, value);
        return *this;
    }
    JsonLine& field(std::string_view name, bool value) {
        key(name);
        text_ += value ? "true" : "false";
        return *this;
    }
    JsonLine& field(std::string_view name, std::string_view value) {
        key(name);
        detail::append_json_string(text_, value);
        return *this;
    }
    JsonLine& field(std::string_view name, const char* value) { return field(name, std::string_view(value)); }
    JsonLine& field(std::string_view name, const std::string& value) {
        return field(name, std::string_view(value));
    }
    JsonLine& field(std::string_view name, std::nullptr_t) {
        key(name);
        text_ += "null";
        return *this;
    }
    /// An array of numbers: a std::vector, std::array, std::span, ... of arithmetic values.
    template <detail::JsonNumberRange R>
    JsonLine& field(std::string_view name, const R& values) {
        key(name);
        text_ += '[';
        bool first = true;
        for (const auto& v : values) {
            if (!first) text_ += ',';
            first = false;
            detail::append_json_number(text_, v);
        }
        text_ += ']';
        return *this;
    }

    /// The object as one line of text, without the newline.
    std::string str() const { return text_.empty() ? std::string("{}") : text_ + "}"; }
    bool empty() const { return text_.empty(); }
    void clear() { text_.clear(); }

private:
    void key(std::string_view name) {
        text_ += text_.empty() ? '{' : ',';
        detail::append_json_string(text_, name);
        text_ += ':';
    }

    std::string text_;  // "{...", without the closing brace
};

/// Appends JsonLines to a file, one per line, flushing after each.
class MetricsLog {
public:
    enum class Mode { truncate, append };

    explicit MetricsLog(const std::filesystem::path& path, Mode mode = Mode::truncate) : path_(path.string()) {
        file_ = std::fopen(path_.c_str(), mode == Mode::append ? "ab" : "wb");
        if (file_ == nullptr)
            throw Error(detail::concat("MetricsLog: cannot open '", path_, "' for writing: ", std::strerror(errno)));
    }
    MetricsLog(const MetricsLog&) = delete;
    MetricsLog& operator=(const MetricsLog&) = delete;
    MetricsLog(MetricsLog&& other) noexcept : path_(std::move(other.path_)), file_(other.file_) {
        other.file_ = nullptr;
    }
    MetricsLog& operator=(MetricsLog&& other) noexcept {
        if (this != &other) {
            close();
            path_ = std::move(other.path_);
            file_ = other.file_;
            other.file_ = nullptr;
        }
        return *this;
    }
    ~MetricsLog() { close(); }

    /// Writes the object and a newline, then flushes. Throws Error if the write fails
    /// (a full disk), naming the file.
    void write(const JsonLine& line) {
        check(file_ != nullptr, "MetricsLog::write", "the log '", path_, "' is closed");
        std::string text = line.str();
        text += '\n';
        if (std::fwrite(text.data(), 1, text.size(), file_) != text.size() || std::fflush(file_) != 0)
            throw Error(detail::concat("MetricsLog: cannot write to '", path_, "': ", std::strerror(errno)));
    }

    const std::string& path() const { return path_; }

    /// Rewrites the log at `path` (atomically) with only its lines whose "step" is at most
    /// `step`, dropping a torn last line: what a resumed run does before it appends, so
    /// every step's line appears once however often the run was killed and resumed. A
    /// missing file stays missing; a line that is not a JSON object is an error naming it.
    static void truncate_after_step(const std::filesystem::path& path, std::int64_t step) {
        std::error_code ec;
        if (!std::filesystem::exists(path, ec)) return;
        const std::string where = detail::concat("MetricsLog::truncate_after_step: '", path.string(), "'");
        std::string text;
        {
            std::FILE* f = std::fopen(path.c_str(), "rb");
            if (f == nullptr) throw Error(detail::concat(where, ": cannot open it: ", std::strerror(errno)));
            char buf[1 << 14];
            for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) text.append(buf, n);
            const bool failed = std::ferror(f) != 0;
            std::fclose(f);
            if (failed) throw Error(detail::concat(where, ": cannot read it"));
        }
        std::string kept;
        std::size_t line_no = 0;
        for (std::size_t start = 0, end; (end = text.find('\n', start)) != std::string::npos; start = end + 1) {
            ++line_no;
            const std::string_view line(text.data() + start, end - start);
            const nlohmann::json j = detail::parse_json_bounded(
                line, {.max_bytes = 1 << 20, .max_depth = 16}, detail::concat(where, ": line ", line_no));
            if (!j.is_object()) throw FormatError(detail::concat(where, ": line ", line_no, ": expected a JSON object"));
            const auto it = j.find("step");
            if (it != j.end() && it->is_number_integer() && it->get<std::int64_t>() > step) continue;
            kept.append(line);
            kept += '\n';
        }
        write_file_atomically(path, "MetricsLog::truncate_after_step",
                              [&](const auto& put) { put(kept.data(), kept.size()); });
    }

    void close() {
        if (file_ != nullptr) {
            std::fclose(file_);
            file_ = nullptr;
        }
    }

private:
    std::string path_;
    std::FILE* file_ = nullptr;
};

}  // namespace lowrank
