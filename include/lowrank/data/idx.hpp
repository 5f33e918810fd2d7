#pragma once
// IDX files (the format of MNIST and Fashion-MNIST), plain or gzip'd.
//
// An IDX file is a 4-byte magic number (0x00 0x00 <type> <ndim>), ndim big-endian uint32
// dimensions, then the elements in row-major order. Only unsigned bytes (type 0x08) are
// read; that is what every image and label file of the MNIST family holds.
//
// The reader is strict: a missing file, a bad magic number, an unsupported type, absurd
// dimensions, fewer data bytes than the dimensions say, and bytes after the data (which
// means the dimensions do not describe the file) all raise FormatError naming the file,
// the expected and the actual value. It reads the header first and the data in bounded
// chunks, so a malformed file can neither make it read past a buffer nor allocate much
// more memory than the file actually holds. Before any data is read, the dimensions are
// checked against what the file can hold: a plain file's size, or the uncompressed size
// that a gzip file records in its last four bytes (so a small gzip claiming gigabytes is
// refused without decompressing it); load_mnist_like also checks that the label count
// matches the image count before it reads either's data.

#include <lowrank/core/error.hpp>
#include <lowrank/core/types.hpp>

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace lowrank {

/// The contents of an unsigned-byte IDX file: its dimensions and its elements in
/// row-major order (data.size() is the product of dims).
struct IdxArray {
    std::vector<int> dims;
    std::vector<std::uint8_t> data;

    /// The product of the dimensions (the number of elements).
    std::size_t element_count() const {
        std::size_t n = 1;
        for (int d : dims) n *= static_cast<std::size_t>(d);
        return n;
    }
};

struct IdxReadOptions {
    /// Files whose dimensions promise more data bytes than this are rejected as absurd
    /// before anything is allocated: 1 GiB, twice the largest file of the MNIST family
    /// (EMNIST ByClass, 547 MB; MNIST's own largest holds 47 MB).
    std::uint64_t max_bytes = std::uint64_t{1} << 30;
};

namespace detail {

/// Names of the IDX element types, for messages.
inline std::string idx_type_name(std::uint8_t type) {
    switch (type) {
        case 0x08: return "0x08 (unsigned byte)";
        case 0x09: return "0x09 (signed byte)";
        case 0x0B: return "0x0B (short)";
        case 0x0C: return "0x0C (int)";
        case 0x0D: return "0x0D (float)";
        case 0x0E: return "0x0E (double)";
        default: break;
    }
    static constexpr char hex[] = "0123456789ABCDEF";
    std::string s = "0x";
    s += hex[type >> 4];
    s += hex[type & 0xF];
    return s + " (not an IDX type)";
}

inline std::string hex_byte(std::uint8_t b) {
    static constexpr char hex[] = "0123456789ABCDEF";
    return std::string("0x") + hex[b >> 4] + hex[b & 0xF];
}

/// dst[i] = bytes[i] / 255. Division (not multiplication by 1/255) rounds exactly as
/// torchvision's ToTensor does.
template <class T>
void bytes_to_unit(const std::vector<std::uint8_t>& bytes, T* dst) {
    std::array<T, 256> table{};
    for (int v = 0; v < 256; ++v) table[static_cast<std::size_t>(v)] = static_cast<T>(v) / static_cast<T>(255);
    for (std::size_t i = 0; i < bytes.size(); ++i) dst[i] = table[bytes[i]];
}

/// Reads a file that may be gzip'd (detected by its magic 1f 8b), in chunks.
class ByteSource {
public:
    ByteSource(const std::filesystem::path& path, std::string_view what) : what_(what), path_(path.string()) {
        std::error_code ec;
        const auto status = std::filesystem::status(path, ec);
        if (ec || !std::filesystem::exists(status))
            fail("expected an existing file, but it does not exist");
        if (std::filesystem::is_directory(status)) fail("expected a file, got a directory");

        std::FILE* f = std::fopen(path_.c_str(), "rb");
        if (f == nullptr) fail("cannot open it for reading: ", std::strerror(errno));
        file_.reset(f);
        std::array<unsigned char, 2> magic{};
        const std::size_t got = std::fread(magic.data(), 1, magic.size(), file_.get());
        if (got == 2 && magic[0] == 0x1f && magic[1] == 0x8b) {
            // ISIZE, the member's uncompressed size modulo 2^32 (RFC 1952), ends the file.
            std::array<unsigned char, 4> isize{};
            if (std::fseek(file_.get(), -4, SEEK_END) == 0 &&
                std::fread(isize.data(), 1, isize.size(), file_.get()) == isize.size())
                gzip_size_ = std::uint32_t{isize[0]} | (std::uint32_t{isize[1]} << 8) |
                             (std::uint32_t{isize[2]} << 16) | (std::uint32_t{isize[3]} << 24);
            file_.reset();
            gz_ = gzopen(path_.c_str(), "rb");
            if (gz_ == nullptr) fail("cannot open it as gzip: ", std::strerror(errno));
            gzbuffer(gz_, 1 << 17);
        } else {
            if (std::fseek(file_.get(), 0, SEEK_SET) != 0) fail("cannot seek: ", std::strerror(errno));
            const auto size = std::filesystem::file_size(path, ec);
            if (!ec) plain_size_ = static_cast<std::uint64_t>(size);
        }
    }
    ByteSource(const ByteSource&) = delete;
    ByteSource& operator=(const ByteSource&) = delete;
    ~ByteSource() {
        if (gz_ != nullptr) gzclose(gz_);
    }

    bool gzipped() const { return gz_ != nullptr; }
    /// The size of a plain file in bytes; unknown (nullopt) for gzip.
    std::optional<std::uint64_t> plain_size() const { return plain_size_; }
    /// For gzip, the uncompressed size modulo 2^32 that the file's trailer records.
    std::optional<std::uint32_t> gzip_size() const { return gzip_size_; }

    /// Reads up to n bytes into dst; returns fewer only at the end of the data. A corrupt
    /// or truncated gzip stream is an error, not an end.
    std::size_t read(std::uint8_t* dst, std::size_t n) {
        std::size_t total = 0;
        if (gz_ == nullptr) {
            total = std::fread(dst, 1, n, file_.get());
            if (total < n && std::ferror(file_.get())) fail("read error: ", std::strerror(errno));
            return total;
        }
        while (total < n) {
            const auto chunk = static_cast<unsigned>(std::min<std::size_t>(n - total, 1u << 30));
            const int got = gzread(gz_, dst + total, chunk);
            if (got < 0) fail("corrupt gzip data: ", gz_message());
            total += static_cast<std::size_t>(got);
            if (static_cast<unsigned>(got) < chunk) {
                int err = Z_OK;
                gzerror(gz_, &err);
                if (err == Z_BUF_ERROR)
                    fail("truncated gzip stream: the compressed data ends in the middle of a gzip member");
                if (err != Z_OK && err != Z_STREAM_END) fail("corrupt gzip data: ", gz_message());
                break;
            }
        }
        return total;
    }

    template <class... Args>
    [[noreturn]] void fail(const Args&... message) const {
        throw FormatError(concat(what_, ": '", path_, "': ", message...));
    }

private:
    std::string gz_message() const {
        int err = Z_OK;
        const char* msg = gzerror(gz_, &err);
        return msg != nullptr && *msg != '\0' ? std::string(msg) : std::string("zlib error ") + std::to_string(err);
    }

    struct FileCloser {
        void operator()(std::FILE* f) const { std::fclose(f); }
    };

    std::string what_;
    std::string path_;
    std::unique_ptr<std::FILE, FileCloser> file_;
    gzFile gz_ = nullptr;
    std::optional<std::uint64_t> plain_size_;
    std::optional<std::uint32_t> gzip_size_;
};

/// An IDX file whose header has been read and checked against the file (see the top of
/// this file); read_data() then reads the elements.
class IdxFile {
public:
    IdxFile(const std::filesystem::path& path, const IdxReadOptions& options, std::string_view what)
        : src_(path, what) {
        std::array<std::uint8_t, 4> magic{};
        const std::size_t got_magic = src_.read(magic.data(), magic.size());
        if (got_magic < magic.size())
            src_.fail("truncated header: expected a 4-byte magic number, got ", got_magic, " byte(s)");
        if (magic[0] != 0 || magic[1] != 0)
            src_.fail("bad magic number: expected the first two bytes to be 0x00 0x00, got ", hex_byte(magic[0]), " ",
                      hex_byte(magic[1]), " (not an IDX file)");
        if (magic[2] != 0x08)
            src_.fail("unsupported element type: expected 0x08 (unsigned byte), got ", idx_type_name(magic[2]));
        const int ndim = magic[3];
        if (ndim == 0) src_.fail("bad magic number: expected at least 1 dimension, got 0");

        std::array<std::uint8_t, 4 * 255> header{};
        const auto header_bytes = static_cast<std::size_t>(4 * ndim);
        const std::size_t got_header = src_.read(header.data(), header_bytes);
        if (got_header < header_bytes)
            src_.fail("truncated header: expected ", ndim, " dimensions (", header_bytes, " bytes), got ", got_header,
                      " byte(s)");

        dims_.resize(static_cast<std::size_t>(ndim));
        for (int k = 0; k < ndim; ++k) {
            const std::uint8_t* b = header.data() + 4 * k;
            const std::uint64_t d = (std::uint64_t{b[0]} << 24) | (std::uint64_t{b[1]} << 16) |
                                    (std::uint64_t{b[2]} << 8) | std::uint64_t{b[3]};
            if (d > static_cast<std::uint64_t>(INT_MAX))
                src_.fail("dimension ", k, " is absurd: expected at most ", INT_MAX, ", got ", d);
            dims_[static_cast<std::size_t>(k)] = static_cast<int>(d);
            // d < 2^31, so the product stays exact until it passes max_bytes (< 2^64 / 2^31).
            if (count_ != 0 && d != 0 && count_ > options.max_bytes / d)
                src_.fail("dimensions are absurd: expected at most ", options.max_bytes,
                          " elements in all, the dimensions multiply to more (dimension ", k, " = ", d, ")");
            count_ *= d;
        }

        const std::uint64_t header_size = 4 + header_bytes;
        const std::uint64_t expected = header_size + count_;
        if (auto size = src_.plain_size()) {
            // A plain file's size tells truncation before anything is allocated.
            if (*size < expected)
                src_.fail("truncated data: the dimensions need ", count_, " data bytes (file size ", expected,
                          "), got ", *size > header_size ? *size - header_size : 0, " (file size ", *size, ")");
            if (*size > expected)
                src_.fail("trailing data: expected the file to end after ", count_, " data bytes (file size ",
                          expected, "), got ", *size - expected, " more byte(s) (file size ", *size, ")");
        } else if (auto recorded = src_.gzip_size(); recorded && *recorded != static_cast<std::uint32_t>(expected)) {
            // So does a gzip file's trailer. It is exact below 4 GiB (every MNIST-family
            // file); a file of several gzip members records only its last member's size, so
            // such a file is refused too (gunzip it, or gzip it again as one member).
            const std::string note = concat("(the gzip trailer records ", *recorded,
                                            " uncompressed bytes; the data was not decompressed)");
            if (expected > 0xFFFFFFFFu)
                src_.fail("the dimensions need ", count_, " data bytes (", expected, " in all, ",
                          static_cast<std::uint32_t>(expected), " modulo 2^32), but the gzip trailer records ",
                          *recorded, " uncompressed bytes modulo 2^32; the data was not decompressed");
            if (*recorded < expected)
                src_.fail("truncated data: the dimensions need ", count_, " data bytes, got ",
                          *recorded > header_size ? *recorded - header_size : 0, " ", note);
            src_.fail("trailing data: expected the data to end after ", count_, " bytes, got ", *recorded - expected,
                      " more byte(s) ", note);
        }
    }

    const std::vector<int>& dims() const { return dims_; }
    /// The number of elements (the product of dims()).
    std::uint64_t count() const { return count_; }
    ByteSource& source() { return src_; }

    /// Reads the elements (once), and checks that nothing follows them.
    std::vector<std::uint8_t> read_data() {
        // Fill the buffer as the data arrives. A plain file's size is already checked; for
        // gzip only the first 256 MiB are reserved up front (reserving is cheap: untouched
        // pages cost nothing), so a small file claiming huge dimensions cannot make the
        // reader allocate much more than it holds.
        const auto total = static_cast<std::size_t>(count_);
        constexpr std::size_t chunk = std::size_t{1} << 22;
        std::vector<std::uint8_t> data;
        std::size_t have = 0;
        data.reserve(src_.plain_size() ? total : std::min(total, std::size_t{1} << 28));
        while (have < total) {
            const std::size_t want = std::min(chunk, total - have);
            data.resize(have + want);
            const std::size_t got = src_.read(data.data() + have, want);
            have += got;
            if (got < want) src_.fail("truncated data: the dimensions need ", count_, " data bytes, got ", have);
        }
        std::uint8_t extra[256];
        const std::size_t trailing = src_.read(extra, sizeof extra);
        if (trailing > 0)
            src_.fail("trailing data: expected the data to end after ", count_, " bytes, got ",
                      trailing == sizeof extra ? "at least " : "", trailing, " more byte(s)");
        return data;
    }

private:
    ByteSource src_;
    std::vector<int> dims_;
    std::uint64_t count_ = 1;
};

}  // namespace detail

/// Reads an unsigned-byte IDX file, plain or gzip'd. Throws FormatError (naming the file,
/// the expected and the actual value) for a missing file, a bad magic number, an element
/// type other than 0x08, zero dimensions, dimensions larger than options.max_bytes, fewer
/// data bytes than the dimensions say, and any byte after the data.
inline IdxArray read_idx(const std::filesystem::path& path, const IdxReadOptions& options = {}) {
    detail::IdxFile file(path, options, "read_idx");
    IdxArray out;
    out.dims = file.dims();
    out.data = file.read_data();
    return out;
}

/// The dimensions of an IDX file, checked as read_idx checks them, without reading its
/// data (a gzip'd file is not decompressed beyond its header).
inline std::vector<int> read_idx_dims(const std::filesystem::path& path, const IdxReadOptions& options = {}) {
    return detail::IdxFile(path, options, "read_idx").dims();
}

/// Reads an IDX file of images (N x rows x cols, unsigned bytes) into an (N x rows*cols)
/// matrix, one flattened image per row, scaled from 0..255 to [0, 1] (byte / 255).
template <class T>
Matrix<T> load_idx_images(const std::filesystem::path& path, const IdxReadOptions& options = {}) {
    detail::IdxFile file(path, options, "read_idx");
    const auto& dims = file.dims();
    if (dims.size() != 3)
        throw FormatError(detail::concat("load_idx_images: '", path.string(),
                                         "': expected 3 dimensions (images x rows x cols), got ", dims.size()));
    Matrix<T> out(Index{dims[0]}, Index{dims[1]} * Index{dims[2]});
    detail::bytes_to_unit<T>(file.read_data(), out.data());
    return out;
}

/// Reads an IDX file of labels (N, unsigned bytes).
inline std::vector<std::int32_t> load_idx_labels(const std::filesystem::path& path,
                                                 const IdxReadOptions& options = {}) {
    detail::IdxFile file(path, options, "read_idx");
    if (file.dims().size() != 1)
        throw FormatError(detail::concat("load_idx_labels: '", path.string(),
                                         "': expected 1 dimension (labels), got ", file.dims().size()));
    const std::vector<std::uint8_t> data = file.read_data();
    return std::vector<std::int32_t>(data.begin(), data.end());
}

/// Images (one flattened image per row, in [0, 1]) and their class labels.
template <class T>
struct LabeledImages {
    Matrix<T> images;
    std::vector<std::int32_t> labels;
    Index size() const { return images.rows(); }
};

/// The train and test splits of an MNIST-like data set (MNIST, Fashion-MNIST, KMNIST).
template <class T>
struct MnistLike {
    LabeledImages<T> train;
    LabeledImages<T> test;
    Index image_rows = 0;
    Index image_cols = 0;
    int num_classes = 10;
};

namespace detail {

/// dir/name if it exists, else dir/name.gz if that exists; otherwise FormatError naming both.
inline std::filesystem::path find_plain_or_gz(const std::filesystem::path& dir, const std::string& name) {
    std::error_code ec;
    const auto plain = dir / name;
    if (std::filesystem::exists(plain, ec)) return plain;
    const auto gz = dir / (name + ".gz");
    if (std::filesystem::exists(gz, ec)) return gz;
    throw FormatError(concat("load_mnist_like: expected '", plain.string(), "' or '", gz.string(),
                             "', found neither"));
}

template <class T>
LabeledImages<T> load_mnist_split(const std::filesystem::path& dir, const std::string& prefix, int num_classes,
                                  Index& rows, Index& cols) {
    const auto images_path = find_plain_or_gz(dir, prefix + "-images-idx3-ubyte");
    const auto labels_path = find_plain_or_gz(dir, prefix + "-labels-idx1-ubyte");
    // Both headers first: a label file that does not match the images is refused before
    // either's data is read (decoding a large gzip only to fail on a count wastes memory
    // and time).
    IdxFile images(images_path, {}, "read_idx");
    const auto& dims = images.dims();
    if (dims.size() != 3)
        throw FormatError(concat("load_mnist_like: '", images_path.string(),
                                 "': expected 3 dimensions (images x rows x cols), got ", dims.size()));
    if (dims[1] == 0 || dims[2] == 0)
        throw FormatError(concat("load_mnist_like: '", images_path.string(),
                                 "': expected images of at least 1 x 1 pixels, got ", dims[1], " x ", dims[2]));
    if (rows == 0) {
        rows = dims[1];
        cols = dims[2];
    } else if (dims[1] != rows || dims[2] != cols) {
        throw FormatError(concat("load_mnist_like: '", images_path.string(), "': expected ", rows, " x ", cols,
                                 " images (as in the train split), got ", dims[1], " x ", dims[2]));
    }
    IdxFile labels(labels_path, {}, "read_idx");
    if (labels.dims().size() != 1)
        throw FormatError(concat("load_idx_labels: '", labels_path.string(), "': expected 1 dimension (labels), got ",
                                 labels.dims().size()));
    if (labels.dims()[0] != dims[0])
        throw FormatError(concat("load_mnist_like: '", labels_path.string(), "': expected ", dims[0],
                                 " labels (one per image in '", images_path.string(), "'), got ", labels.dims()[0]));

    LabeledImages<T> out;
    out.images.resize(dims[0], rows * cols);
    bytes_to_unit<T>(images.read_data(), out.images.data());
    const std::vector<std::uint8_t> label_bytes = labels.read_data();
    out.labels.assign(label_bytes.begin(), label_bytes.end());
    for (std::size_t i = 0; i < out.labels.size(); ++i)
        if (out.labels[i] < 0 || out.labels[i] >= num_classes)
            throw FormatError(concat("load_mnist_like: '", labels_path.string(), "': label ", i,
                                     " must be in [0, ", num_classes, "), got ", out.labels[i]));
    return out;
}

}  // namespace detail

/// Loads {train,t10k}-{images-idx3,labels-idx1}-ubyte from `dir`, each plain or with a
/// .gz suffix (the plain file wins if both exist). Checks that each split has as many
/// labels as images, that both splits have images of the same size, and that every label
/// is in [0, num_classes).
template <class T>
MnistLike<T> load_mnist_like(const std::filesystem::path& dir, int num_classes = 10) {
    check(num_classes >= 1 && num_classes <= 256, "load_mnist_like", "expected num_classes in [1, 256], got ",
          num_classes);
    std::error_code ec;
    if (!std::filesystem::is_directory(dir, ec))
        throw FormatError(detail::concat("load_mnist_like: expected '", dir.string(), "' to be a directory, ",
                                         std::filesystem::exists(dir, ec) ? "but it is not one"
                                                                          : "but it does not exist"));
    MnistLike<T> out;
    out.num_classes = num_classes;
    out.train = detail::load_mnist_split<T>(dir, "train", num_classes, out.image_rows, out.image_cols);
    out.test = detail::load_mnist_split<T>(dir, "t10k", num_classes, out.image_rows, out.image_cols);
    return out;
}

}  // namespace lowrank
