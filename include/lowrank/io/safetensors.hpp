#pragma once
// safetensors files: the weight format PyTorch and its ecosystem read and write.
//
// Layout: an 8-byte little-endian header length N, N bytes of a JSON object
//   {"<name>": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"format": "pt", "<key>": "<string value>", ...}}
// (padded with spaces), then the byte buffer. Offsets are relative to the buffer's start;
// elements are little-endian, in row-major (C) order, which is also Matrix<T>'s order.
//
// The reader reads the whole file and validates every header entry before it hands out
// anything, so a malformed file (cut short, lying offsets, a shape that does not match its
// bytes) is a FormatError naming the file and the entry, never a read past the buffer.
// The header is read by parse_json_bounded (core/json_read.hpp): at most 100 MB, 128
// levels deep, each key once per object, no NUL and nothing after the object, as the
// reference library requires.
// The writer replaces its target atomically (temp file, flush, fsync, rename), so a crash
// never leaves a half-written file under the final name.

#include <lowrank/core/atomic_file.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/json_read.hpp>
#include <lowrank/core/types.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>


namespace lowrank {

namespace detail {

/// Bytes per element of every dtype the format defines; 0 for an unknown name.
inline std::size_t safetensors_dtype_size(std::string_view dtype) {
    static const std::map<std::string_view, std::size_t> sizes{
        {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2},
        {"U16", 2},  {"F16", 2}, {"BF16", 2}, {"I32", 4},     {"U32", 4},     {"F32", 4},
        {"I64", 8},  {"U64", 8}, {"F64", 8}};
    const auto it = sizes.find(dtype);
    return it == sizes.end() ? 0 : it->second;
}

/// "[2, 3]"; a shape of more than 8 dimensions (a file can claim thousands) shows its
/// first 8 and its length: "[1, 1, 1, 1, 1, 1, 1, 1, ... (1000 dimensions)]".
inline std::string shape_list_string(const std::vector<std::int64_t>& shape) {
    constexpr std::size_t shown = 8;
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size() && i < shown; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    if (shape.size() > shown) s += concat(", ... (", shape.size(), " dimensions)");
    return s + "]";
}

/// Loads / stores an unsigned integer from / to little-endian bytes, whatever the host's
/// byte order (the compiler turns this into a plain load on a little-endian machine).
template <class U>
U load_le(const std::uint8_t* p) {
    U v = 0;
    for (std::size_t i = 0; i < sizeof(U); ++i) v |= static_cast<U>(static_cast<U>(p[i]) << (8 * i));
    return v;
}

template <class U>
void store_le(std::uint8_t* p, U v) {
    for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

/// IEEE 754 binary16 -> float (exact: every half value is a float).
inline float half_to_float(std::uint16_t h) {
    const bool negative = (h & 0x8000u) != 0;
    const int exponent = (h >> 10) & 0x1f;
    const int mantissa = h & 0x3ff;
    float magnitude;
    if (exponent == 0)
        magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
    else if (exponent == 31)
        magnitude = mantissa == 0 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
    else
        magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
    return negative ? -magnitude : magnitude;
}

/// bfloat16 is the top half of a binary32.
inline float bfloat16_to_float(std::uint16_t b) {
    return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

/// count = n0 * n1 * ...; false if that overflows 64 bits (dimensions are >= 0).
inline bool checked_element_count(const std::vector<std::int64_t>& shape, std::uint64_t& count) {
    count = 0;
    // A zero anywhere makes the product zero, however large the other dimensions are.
    if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return true;
    count = 1;
    for (std::int64_t d : shape) {
        const auto u = static_cast<std::uint64_t>(d);
        if (count > std::numeric_limits<std::uint64_t>::max() / u) return false;
        count *= u;
    }
    return true;
}

/// Reads the whole file, or throws FormatError naming it.
inline std::vector<std::uint8_t> read_file_bytes(const std::string& path, std::string_view what) {
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec || !std::filesystem::exists(status))
        throw FormatError(concat(what, ": '", path, "': expected an existing file, but it does not exist"));
    if (std::filesystem::is_directory(status))
        throw FormatError(concat(what, ": '", path, "': expected a file, got a directory"));
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
    if (!f) throw FormatError(concat(what, ": '", path, "': cannot open it for reading: ", std::strerror(errno)));
    // Grown as read (the size from a stat is only a hint) so a file that changes under us
    // cannot make the buffer and its size disagree; one byte more than the hint sees the
    // end of the file in the first read.
    std::vector<std::uint8_t> bytes;
    const auto size_hint = std::filesystem::file_size(path, ec);
    std::size_t want = ec ? std::size_t{1} << 20 : static_cast<std::size_t>(size_hint) + 1;
    std::size_t have = 0;
    for (;;) {
        bytes.resize(have + want);
        const std::size_t got = std::fread(bytes.data() + have, 1, want, f.get());
        have += got;
        if (got < want) break;
        want = std::size_t{1} << 20;
    }
    bytes.resize(have);
    if (std::ferror(f.get()))
        throw FormatError(concat(what, ": '", path, "': read error: ", std::strerror(errno)));
    return bytes;
}

/// Largest header accepted, as in the reference library (its MAX_HEADER_SIZE).
inline constexpr std::uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

/// Parses the JSON header of a safetensors file given its first bytes (at least 8, all
/// of the file or a prefix that holds the header), with parse_json_bounded: a key given
/// twice (which would make the file mean two things), a NUL, nesting deeper than 128 or
/// bytes after the object are errors. Returns the header and sets `header_end` to where
/// the buffer starts.
inline nlohmann::json parse_safetensors_header(const std::uint8_t* bytes, std::uint64_t file_size,
                                               std::uint64_t available, const std::string& where,
                                               std::uint64_t& header_end) {
    if (file_size < 8)
        throw FormatError(concat(where, ": file too short: expected at least 8 bytes (the header length), got ",
                                 file_size));
    const auto n = load_le<std::uint64_t>(bytes);
    if (n > file_size - 8)
        throw FormatError(concat(where, ": header length ", n, " is beyond the file: at most ", file_size - 8,
                                 " bytes follow the 8-byte length (file size ", file_size, ")"));
    // Before the bytes are looked at: a caller may pass only the length and refuse to read
    // a header this large.
    if (n > kSafetensorsMaxHeaderBytes)
        throw FormatError(concat(where, ": header length ", n, " is too large: expected at most ",
                                 kSafetensorsMaxHeaderBytes, " bytes (the reference library's limit)"));
    if (n + 8 > available)
        throw FormatError(concat(where, ": could read only ", available, " of the ", n + 8, " header bytes"));
    header_end = 8 + n;
    const std::string_view text(reinterpret_cast<const char*>(bytes + 8), static_cast<std::size_t>(n));
    nlohmann::json header = parse_json_bounded(
        text, JsonLimits{.max_bytes = static_cast<std::size_t>(kSafetensorsMaxHeaderBytes)},
        concat(where, ": header (", n, " bytes after the length)"));
    if (!header.is_object())
        throw FormatError(concat(where, ": expected the header to be a JSON object, got a JSON ", header.type_name()));
    return header;
}

/// The "__metadata__" object as a string map; every value must be a string.
inline std::map<std::string, std::string> parse_safetensors_metadata(const nlohmann::json& header,
                                                                     const std::string& where) {
    std::map<std::string, std::string> out;
    const auto it = header.find("__metadata__");
    if (it == header.end() || it->is_null()) return out;
    if (!it->is_object())
        throw FormatError(concat(where, ": expected \"__metadata__\" to be an object of strings, got a JSON ",
                                 it->type_name()));
    for (const auto& [key, value] : it->items()) {
        if (!value.is_string())
            throw FormatError(concat(where, ": metadata '", clip(key), "': expected a string value, got a JSON ",
                                     value.type_name()));
        out.emplace(key, value.get<std::string>());
    }
    return out;
}

}  // namespace detail

/// A whole safetensors file read into memory and validated. Tensor data is converted on
/// request by matrix<T>().
class SafetensorsReader {
public:
    /// Reads and validates the whole file; throws FormatError naming the file and the
    /// offending entry on anything malformed.
    explicit SafetensorsReader(const std::string& path) : path_(path) {
        bytes_ = detail::read_file_bytes(path, "SafetensorsReader");
        const std::string where = detail::concat("SafetensorsReader: '", path, "'");
        std::uint64_t header_end = 0;
        const nlohmann::json header =
            detail::parse_safetensors_header(bytes_.data(), bytes_.size(), bytes_.size(), where, header_end);
        buffer_begin_ = static_cast<std::size_t>(header_end);
        const std::uint64_t buffer_size = bytes_.size() - header_end;
        metadata_ = detail::parse_safetensors_metadata(header, where);

        for (const auto& [name, info] : header.items()) {
            if (name == "__metadata__") continue;
            entries_.emplace(name, parse_entry(name, info, buffer_size, where));
        }

        // Sorted by offsets (then name, for zero-sized tensors that share an offset), the
        // ranges must tile the buffer: an overlap would alias two tensors, and a hole or
        // trailing bytes are unindexed data the format does not allow.
        // Sorted as (entry, name) pointers: looking names up in the comparison would make a
        // header of n entries cost n log^2 n string comparisons.
        std::vector<const std::pair<const std::string, Entry>*> sorted;
        sorted.reserve(entries_.size());
        for (const auto& named : entries_) sorted.push_back(&named);
        std::sort(sorted.begin(), sorted.end(), [](const auto* a, const auto* b) {
            if (a->second.begin != b->second.begin) return a->second.begin < b->second.begin;
            if (a->second.end != b->second.end) return a->second.end < b->second.end;
            return a->first < b->first;
        });
        order_.reserve(sorted.size());
        std::uint64_t expected = 0;
        const std::string* previous = nullptr;
        for (const auto* named : sorted) {
            const std::string& name = named->first;
            const Entry& e = named->second;
            order_.push_back(name);
            if (e.begin < expected)
                throw FormatError(detail::concat(where, ": tensor '", detail::clip(name), "': data_offsets [", e.begin,
                                                 ", ", e.end, "] overlap tensor '", detail::clip(*previous),
                                                 "', which ends at ", expected));
            if (e.begin > expected)
                throw FormatError(detail::concat(where, ": tensor '", detail::clip(name), "': expected its data to start at ",
                                                 expected, " (right after the previous tensor), got ", e.begin,
                                                 " (a hole in the buffer)"));
            expected = e.end;
            previous = &name;
        }
        if (expected != buffer_size)
            throw FormatError(detail::concat(where, ": the tensors cover ", expected, " bytes of the ", buffer_size,
                                             "-byte data buffer; expected them to cover all of it"));
    }

    /// Tensor names in file (offset) order.
    std::vector<std::string> names() const { return order_; }

    bool contains(const std::string& name) const { return entries_.count(name) != 0; }

    std::vector<std::int64_t> shape(const std::string& name) const { return entry(name, "shape").shape; }

    /// "F32", "F64", "F16", "BF16", "I32", "I64", "U16", ...
    std::string dtype(const std::string& name) const { return entry(name, "dtype").dtype; }

    /// The tensor as a row-major matrix: 2-D -> (rows x cols), 1-D {n} -> (1 x n),
    /// 0-D -> (1 x 1). F32, F64, F16 and BF16 convert to T; other dtypes and more than
    /// two dimensions throw.
    template <class T>
    Matrix<T> matrix(const std::string& name) const {
        static_assert(std::is_floating_point_v<T>, "SafetensorsReader::matrix<T> needs a floating-point T");
        const Entry& e = entry(name, "matrix");
        Index rows = 1, cols = 1;
        if (e.shape.size() == 2) {
            rows = static_cast<Index>(e.shape[0]);
            cols = static_cast<Index>(e.shape[1]);
        } else if (e.shape.size() == 1) {
            cols = static_cast<Index>(e.shape[0]);
        } else if (!e.shape.empty()) {
            throw Error(detail::concat("SafetensorsReader::matrix: '", path_, "': tensor '", detail::clip(name),
                                       "': expected 0, 1 or 2 dimensions, got shape ",
                                       detail::shape_list_string(e.shape)));
        }
        Matrix<T> m(rows, cols);
        const std::uint8_t* src = bytes_.data() + buffer_begin_ + e.begin;
        T* dst = m.data();
        const Index n = m.size();
        if (e.dtype == "F32") {
            for (Index i = 0; i < n; ++i)
                dst[i] = static_cast<T>(std::bit_cast<float>(detail::load_le<std::uint32_t>(src + 4 * i)));
        } else if (e.dtype == "F64") {
            for (Index i = 0; i < n; ++i)
                dst[i] = static_cast<T>(std::bit_cast<double>(detail::load_le<std::uint64_t>(src + 8 * i)));
        } else if (e.dtype == "F16") {
            for (Index i = 0; i < n; ++i)
                dst[i] = static_cast<T>(detail::half_to_float(detail::load_le<std::uint16_t>(src + 2 * i)));
        } else if (e.dtype == "BF16") {
            for (Index i = 0; i < n; ++i)
                dst[i] = static_cast<T>(detail::bfloat16_to_float(detail::load_le<std::uint16_t>(src + 2 * i)));
        } else {
            throw Error(detail::concat("SafetensorsReader::matrix: '", path_, "': tensor '", detail::clip(name),
                                       "': expected dtype F32, F64, F16 or BF16, got ", e.dtype));
        }
        return m;
    }

    /// The "__metadata__" string map (empty if the file has none).
    const std::map<std::string, std::string>& metadata() const { return metadata_; }

    const std::string& path() const { return path_; }

private:
    struct Entry {
        std::string dtype;
        std::vector<std::int64_t> shape;
        std::uint64_t begin = 0;
        std::uint64_t end = 0;
    };

    static Entry parse_entry(const std::string& name, const nlohmann::json& info, std::uint64_t buffer_size,
                             const std::string& where) {
        const std::string what = detail::concat(where, ": tensor '", detail::clip(name), "'");
        if (!info.is_object())
            throw FormatError(detail::concat(what, ": expected an object with dtype, shape and data_offsets, got a JSON ",
                                             info.type_name()));
        for (const char* key : {"dtype", "shape", "data_offsets"})
            if (!info.contains(key)) throw FormatError(detail::concat(what, ": missing \"", key, "\""));
        Entry e;

        const auto& dtype = info.at("dtype");
        if (!dtype.is_string())
            throw FormatError(detail::concat(what, ": expected dtype to be a string, got a JSON ", dtype.type_name()));
        e.dtype = dtype.get<std::string>();
        const std::size_t element_size = detail::safetensors_dtype_size(e.dtype);
        if (element_size == 0)
            throw FormatError(detail::concat(what, ": unknown dtype '", detail::clip(e.dtype),
                                             "' (expected one of BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, "
                                             "I32, U32, F32, I64, U64, F64)"));

        const auto& shape = info.at("shape");
        if (!shape.is_array())
            throw FormatError(detail::concat(what, ": expected shape to be an array, got a JSON ", shape.type_name()));
        for (std::size_t i = 0; i < shape.size(); ++i) {
            const auto& d = shape[i];
            if (!d.is_number_integer())
                throw FormatError(detail::concat(what, ": shape entry ", i, ": expected an integer, got ",
                                                 detail::json_value_excerpt(d)));
            if (d.is_number_unsigned()) {
                const auto u = d.get<std::uint64_t>();
                if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
                    throw FormatError(detail::concat(what, ": shape entry ", i, ": dimension ", u, " is too large"));
                e.shape.push_back(static_cast<std::int64_t>(u));
            } else {
                const auto v = d.get<std::int64_t>();
                if (v < 0)
                    throw FormatError(detail::concat(what, ": shape entry ", i,
                                                     ": expected a dimension >= 0, got a negative dim ", v));
                e.shape.push_back(v);
            }
        }

        const auto& offsets = info.at("data_offsets");
        if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
            !offsets[1].is_number_unsigned())
            throw FormatError(detail::concat(what, ": expected data_offsets to be [begin, end] with integers >= 0, got ",
                                             detail::json_value_excerpt(offsets)));
        e.begin = offsets[0].get<std::uint64_t>();
        e.end = offsets[1].get<std::uint64_t>();
        if (e.begin > e.end)
            throw FormatError(detail::concat(what, ": data_offsets [", e.begin, ", ", e.end,
                                             "]: expected begin <= end"));
        if (e.end > buffer_size)
            throw FormatError(detail::concat(what, ": data_offsets [", e.begin, ", ", e.end,
                                             "] are outside the data buffer of ", buffer_size, " bytes"));

        std::uint64_t count = 0;
        const bool fits = detail::checked_element_count(e.shape, count) &&
                          count <= std::numeric_limits<std::uint64_t>::max() / element_size;
        if (!fits || count * element_size != e.end - e.begin)
            throw FormatError(detail::concat(what, ": shape ", detail::shape_list_string(e.shape), " of ", e.dtype,
                                             " needs ", fits ? std::to_string(count * element_size) : "more than 2^64",
                                             " bytes, but data_offsets [", e.begin, ", ", e.end, "] hold ",
                                             e.end - e.begin));
        return e;
    }

    const Entry& entry(const std::string& name, std::string_view caller) const {
        const auto it = entries_.find(name);
        if (it == entries_.end())
            throw Error(detail::concat("SafetensorsReader::", caller, ": '", path_, "': no tensor named '", detail::clip(name),
                                       "' (the file has ", entries_.size(), " tensors)"));
        return it->second;
    }

    std::string path_;
    std::vector<std::uint8_t> bytes_;
    std::size_t buffer_begin_ = 0;
    std::map<std::string, Entry> entries_;
    std::vector<std::string> order_;
    std::map<std::string, std::string> metadata_;
};

/// Collects tensors and metadata, then writes them as one safetensors file. The metadata
/// starts as {"format": "pt"}: transformers' from_pretrained refuses a file whose metadata
/// "format" is not one of its frameworks ("pt", "tf", "flax", ...), and ours are laid out
/// as PyTorch's tensors are. Readers, ours included, do not require it: files written
/// before it was added still load.
class SafetensorsWriter {
public:
    /// Copies the data now, in row-major order. The dtype follows the scalar (float -> F32,
    /// double -> F64). `shape` defaults to {rows, cols}; a given shape must hold the same
    /// number of elements ({n} for a bias row). Duplicate names throw.
    template <class Derived>
    void add(const std::string& name, const Eigen::MatrixBase<Derived>& m, std::vector<std::int64_t> shape = {}) {
        if (shape.empty()) shape = {static_cast<std::int64_t>(m.rows()), static_cast<std::int64_t>(m.cols())};
        add_with_shape(name, m, std::move(shape));
    }

    /// A 0-D tensor (shape []): the one shape add() cannot spell, since its empty shape
    /// means "the matrix's own".
    template <class Scalar>
    void add_scalar(const std::string& name, Scalar value) {
        Matrix<Scalar> m(1, 1);
        m(0, 0) = value;
        add_with_shape(name, m, {});
    }

    /// Sets (or replaces) a "__metadata__" entry ("format" is "pt" unless replaced).
    void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

    const std::map<std::string, std::string>& metadata() const { return metadata_; }

    /// Names added so far, in the order they will be laid out.
    std::vector<std::string> names() const {
        std::vector<std::string> out;
        for (const auto& t : tensors_) out.push_back(t.name);
        return out;
    }

    /// Writes the file atomically: a temp file in the same directory, flushed and synced,
    /// then renamed over `path`. On any failure the temp file is removed and `path` is
    /// untouched.
    void write(const std::string& path) const {
        std::vector<std::uint8_t> head = header_bytes();
        write_file_atomically(path, "SafetensorsWriter::write", [&](const auto& put) {
            put(head.data(), head.size());
            for (const auto& t : tensors_) put(t.bytes.data(), t.bytes.size());
        });
    }

private:
    struct Tensor {
        std::string name;
        std::string dtype;
        std::vector<std::int64_t> shape;
        std::vector<std::uint8_t> bytes;
    };

    template <class Derived>
    void add_with_shape(const std::string& name, const Eigen::MatrixBase<Derived>& m, std::vector<std::int64_t> shape) {
        using Scalar = typename Derived::Scalar;
        static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                      "SafetensorsWriter::add stores float (F32) or double (F64) matrices");
        const std::string what = detail::concat("SafetensorsWriter::add: tensor '", name, "'");
        check(!name.empty(), "SafetensorsWriter::add", "expected a non-empty tensor name");
        check(name != "__metadata__", what, "the name is reserved for the metadata");
        check(names_.count(name) == 0, what, "a tensor of this name was already added");
        for (std::int64_t d : shape)
            check(d >= 0, what, "expected dimensions >= 0, got shape ", detail::shape_list_string(shape));
        std::uint64_t count = 0;
        const bool fits = detail::checked_element_count(shape, count);
        check(fits && count == static_cast<std::uint64_t>(m.size()), what, "shape ", detail::shape_list_string(shape),
              " holds ", fits ? std::to_string(count) : std::string("more than 2^64"), " elements, but the matrix ", shape_string(m.rows(), m.cols()), " has ", m.size());

        const Matrix<Scalar> rows(m);  // row-major, whatever the input's storage order
        Tensor t{name, std::is_same_v<Scalar, float> ? "F32" : "F64", std::move(shape), {}};
        t.bytes.resize(static_cast<std::size_t>(rows.size()) * sizeof(Scalar));
        using Bits = std::conditional_t<std::is_same_v<Scalar, float>, std::uint32_t, std::uint64_t>;
        for (Index i = 0; i < rows.size(); ++i)
            detail::store_le<Bits>(t.bytes.data() + static_cast<std::size_t>(i) * sizeof(Scalar),
                                   std::bit_cast<Bits>(rows.data()[i]));
        tensors_.push_back(std::move(t));
        names_.insert(name);
    }

    std::vector<std::uint8_t> header_bytes() const {
        nlohmann::json header = nlohmann::json::object();
        std::uint64_t offset = 0;
        for (const auto& t : tensors_) {
            header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
            offset += t.bytes.size();
        }
        if (!metadata_.empty()) header["__metadata__"] = metadata_;
        std::string text;
        try {
            text = header.dump();
        } catch (const nlohmann::json::exception& e) {
            // Names and metadata must be valid UTF-8 to be JSON strings.
            throw Error(detail::concat("SafetensorsWriter::write: a tensor name or metadata entry is not valid UTF-8: ",
                                       e.what()));
        }
        // Padding to a multiple of 8 keeps the buffer 8-byte aligned when the file is mapped.
        text.append((8 - text.size() % 8) % 8, ' ');
        std::vector<std::uint8_t> out(8 + text.size());
        detail::store_le<std::uint64_t>(out.data(), text.size());
        std::memcpy(out.data() + 8, text.data(), text.size());
        return out;
    }

    std::vector<Tensor> tensors_;
    std::set<std::string> names_;
    std::map<std::string, std::string> metadata_{{"format", "pt"}};
};

}  // namespace lowrank
