#pragma once
// A JSON-lines metrics log: one JSON object per line, flushed as each line is written, so
// a crashed or running job leaves a file that every line of can be parsed (pandas
// read_json(lines=True), jq, nlohmann::json::parse per line).
//
//     MetricsLog log("metrics.jsonl");
//     log.write(JsonLine().field("epoch", 3).field("test_loss", 0.41).field("method", "dense"));
//
// nlohmann::json writes the lines (detail::to_json_line, as for the rank log). Numbers are
// written in the shortest form that reads back to the same value (so a float stays "0.1",
// not "0.10000000149011612"; a whole double keeps its ".0"); NaN and infinities, which JSON
// cannot hold, become null. Strings are escaped per RFC 8259, and bytes that are not valid
// UTF-8 become U+FFFD, so every line is valid JSON whatever the input.

#include <lowrank/core/atomic_file.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/json_codec.hpp>
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

template <class V>
concept JsonNumber = std::is_arithmetic_v<V> && !std::is_same_v<V, bool> && !std::is_same_v<V, char>;

template <class R>
concept JsonNumberRange = std::ranges::input_range<R> &&
                          JsonNumber<std::remove_cvref_t<std::ranges::range_reference_t<R>>>;

/// v as the number JSON holds. nlohmann::json keeps every floating-point value as a double,
/// and 0.1f widened is 0.10000000149011612: a float goes through its own shortest
/// round-trip text instead, so it is written as "0.1" and still reads back as 0.1f.
template <JsonNumber V>
auto json_number(V v) {
    if constexpr (std::is_same_v<V, float>) {
        if (!std::isfinite(v)) return static_cast<double>(v);  // written as null
        char buf[32];
        const auto end = std::to_chars(buf, buf + sizeof buf, v).ptr;
        double d = 0.0;
        std::from_chars(buf, end, d);
        return d;
    } else if constexpr (std::is_floating_point_v<V>) {
        return static_cast<double>(v);
    } else if constexpr (std::is_signed_v<V>) {
        return static_cast<std::int64_t>(v);
    } else {
        return static_cast<std::uint64_t>(v);
    }
}

}  // namespace detail

/// One JSON object, built field by field, in the order the fields are given. A name given
/// again replaces the earlier value (in its place), so a line never holds a key twice.
/// Written by nlohmann::json (detail::to_json_line).
class JsonLine {
public:
    /// A number (integers exactly; floating point in shortest round-trip form, non-finite
    /// values as null).
    template <detail::JsonNumber V>
    JsonLine& field(std::string_view name, V value) {
        return set(name, detail::json_number(value));
    }
    JsonLine& field(std::string_view name, bool value) { return set(name, value); }
    JsonLine& field(std::string_view name, std::string_view value) { return set(name, std::string(value)); }
    JsonLine& field(std::string_view name, const char* value) { return field(name, std::string_view(value)); }
    JsonLine& field(std::string_view name, const std::string& value) { return set(name, value); }
    JsonLine& field(std::string_view name, std::nullptr_t) { return set(name, nullptr); }
    /// An array of numbers: a std::vector, std::array, std::span, ... of arithmetic values.
    template <detail::JsonNumberRange R>
    JsonLine& field(std::string_view name, const R& values) {
        nlohmann::ordered_json array = nlohmann::ordered_json::array();
        for (const auto& v : values) array.push_back(detail::json_number(v));
        return set(name, std::move(array));
    }
    /// Any other JSON value: an object, an array of strings, ...
    JsonLine& field(std::string_view name, nlohmann::ordered_json value) {
        return set(name, std::move(value));
    }

    /// The object as one line of text, without the newline.
    std::string str() const { return detail::to_json_line(object_); }
    /// The object itself.
    const nlohmann::ordered_json& json() const { return object_; }
    bool empty() const { return object_.empty(); }
    void clear() { object_ = nlohmann::ordered_json::object(); }

private:
    JsonLine& set(std::string_view name, nlohmann::ordered_json value) {
        object_[std::string(name)] = std::move(value);
        return *this;
    }

    nlohmann::ordered_json object_ = nlohmann::ordered_json::object();
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
