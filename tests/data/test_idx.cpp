#include <lowrank/data/idx.hpp>

#include "../test_support.hpp"

#include <catch2/catch.hpp>
#include <zlib.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_idx {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

/// A fresh directory under the system temp dir, removed with its contents at scope end.
using lowrank::test::TempDir;

using Bytes = std::vector<std::uint8_t>;

/// The bytes of an IDX file: magic 00 00 type ndim, big-endian dims, then data.
Bytes idx_bytes(const std::vector<std::uint32_t>& dims, const Bytes& data, std::uint8_t type = 0x08) {
    Bytes out{0, 0, type, static_cast<std::uint8_t>(dims.size())};
    for (std::uint32_t d : dims) {
        out.push_back(static_cast<std::uint8_t>(d >> 24));
        out.push_back(static_cast<std::uint8_t>(d >> 16));
        out.push_back(static_cast<std::uint8_t>(d >> 8));
        out.push_back(static_cast<std::uint8_t>(d));
    }
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

Bytes iota_bytes(std::size_t n, std::uint8_t start = 0) {
    Bytes b(n);
    for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<std::uint8_t>(start + i);
    return b;
}

void write_plain(const fs::path& path, const Bytes& bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(f.good());
}

void write_gz(const fs::path& path, const Bytes& bytes) {
    gzFile gz = gzopen(path.string().c_str(), "wb");
    REQUIRE(gz != nullptr);
    if (!bytes.empty())
        REQUIRE(gzwrite(gz, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
    REQUIRE(gzclose(gz) == Z_OK);
}

Bytes read_all(const fs::path& path) {
    std::ifstream f(path, std::ios::binary);
    return Bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

/// The message of the FormatError that f throws; fails the test if it throws nothing or
/// something else.
std::string format_error(const std::function<void()>& f) {
    try {
        f();
    } catch (const lowrank::FormatError& e) {
        return e.what();
    } catch (const std::exception& e) {
        FAIL("expected lowrank::FormatError, got another exception: " << e.what());
    }
    FAIL("expected lowrank::FormatError, nothing was thrown");
    return {};
}

}  // namespace

TEST_CASE("read_idx round-trips dims and bytes of a plain and a gzip'd file", "[data][idx]") {
    TempDir dir;
    const Bytes data = iota_bytes(3 * 2 * 4, 7);
    const Bytes file = idx_bytes({3, 2, 4}, data);
    write_plain(dir / "a.idx", file);
    write_gz(dir / "a.idx.gz", file);
    for (const char* name : {"a.idx", "a.idx.gz"}) {
        INFO(name);
        const lowrank::IdxArray a = lowrank::read_idx(dir / name);
        CHECK(a.dims == std::vector<int>{3, 2, 4});
        CHECK(a.data == data);
        CHECK(a.element_count() == data.size());
    }
}

TEST_CASE("read_idx detects gzip by its magic, not by the file name", "[data][idx]") {
    TempDir dir;
    const Bytes data = iota_bytes(10);
    write_gz(dir / "no-suffix", idx_bytes({10}, data));
    write_plain(dir / "plain.gz", idx_bytes({10}, data));
    CHECK(lowrank::read_idx(dir / "no-suffix").data == data);
    CHECK(lowrank::read_idx(dir / "plain.gz").data == data);
}

TEST_CASE("read_idx reads a file larger than its internal chunk", "[data][idx]") {
    TempDir dir;
    const std::size_t n = (std::size_t{1} << 22) + 12345;  // more than one 4 MiB chunk
    Bytes data(n);
    for (std::size_t i = 0; i < n; ++i) data[i] = static_cast<std::uint8_t>((i * 2654435761u) >> 13);
    write_gz(dir / "big.gz", idx_bytes({static_cast<std::uint32_t>(n)}, data));
    CHECK(lowrank::read_idx(dir / "big.gz").data == data);
}

TEST_CASE("load_idx_images gives one flattened image per row, scaled to [0, 1]", "[data][idx]") {
    TempDir dir;
    // Two 2x3 images.
    const Bytes data{0, 255, 51, 1, 2, 3, 10, 20, 30, 40, 50, 60};
    write_gz(dir / "img.gz", idx_bytes({2, 2, 3}, data));
    const lowrank::Matrix<float> m = lowrank::load_idx_images<float>(dir / "img.gz");
    REQUIRE(m.rows() == 2);
    REQUIRE(m.cols() == 6);
    CHECK(m(0, 0) == 0.0f);
    CHECK(m(0, 1) == 1.0f);
    CHECK(m(0, 2) == 51.0f / 255.0f);
    CHECK(m(1, 5) == 60.0f / 255.0f);
    const lowrank::Matrix<double> d = lowrank::load_idx_images<double>(dir / "img.gz");
    CHECK(d(1, 0) == 10.0 / 255.0);
}

TEST_CASE("load_idx_labels reads a 1-d file into int32", "[data][idx]") {
    TempDir dir;
    write_plain(dir / "lab", idx_bytes({5}, Bytes{9, 0, 3, 255, 1}));
    CHECK(lowrank::load_idx_labels(dir / "lab") == std::vector<std::int32_t>{9, 0, 3, 255, 1});
}

TEST_CASE("read_idx rejects malformed files with the file, the expected and the actual value",
          "[data][idx][errors]") {
    TempDir dir;
    const Bytes good = idx_bytes({2, 3}, iota_bytes(6));

    SECTION("missing file") {
        const auto msg = format_error([&] { lowrank::read_idx(dir / "nope.idx"); });
        CHECK_THAT(msg, Contains("nope.idx") && Contains("does not exist"));
    }
    SECTION("a directory") {
        const auto msg = format_error([&] { lowrank::read_idx(dir.path()); });
        CHECK_THAT(msg, Contains(dir.path().string()) && Contains("directory"));
    }
    SECTION("empty file") {
        write_plain(dir / "empty.idx", {});
        const auto msg = format_error([&] { lowrank::read_idx(dir / "empty.idx"); });
        CHECK_THAT(msg, Contains("empty.idx") && Contains("4-byte magic") && Contains("got 0"));
    }
    SECTION("bad magic number") {
        Bytes bad = good;
        bad[0] = 0x12;
        bad[1] = 0x34;
        for (bool gz : {false, true}) {
            const auto path = dir / (gz ? "magic.idx.gz" : "magic.idx");
            gz ? write_gz(path, bad) : write_plain(path, bad);
            const auto msg = format_error([&] { lowrank::read_idx(path); });
            CHECK_THAT(msg, Contains(path.filename().string()) && Contains("magic") && Contains("0x00 0x00") &&
                                Contains("0x12 0x34"));
        }
    }
    SECTION("unsupported element type") {
        write_plain(dir / "float.idx", idx_bytes({2}, Bytes(8), 0x0D));
        const auto msg = format_error([&] { lowrank::read_idx(dir / "float.idx"); });
        CHECK_THAT(msg, Contains("float.idx") && Contains("0x08 (unsigned byte)") && Contains("0x0D (float)"));
        write_plain(dir / "junk.idx", idx_bytes({2}, Bytes(2), 0x42));
        CHECK_THAT(format_error([&] { lowrank::read_idx(dir / "junk.idx"); }),
                   Contains("junk.idx") && Contains("0x42 (not an IDX type)"));
    }
    SECTION("zero dimensions") {
        write_plain(dir / "ndim0.idx", Bytes{0, 0, 8, 0});
        const auto msg = format_error([&] { lowrank::read_idx(dir / "ndim0.idx"); });
        CHECK_THAT(msg, Contains("ndim0.idx") && Contains("at least 1 dimension") && Contains("got 0"));
    }
    SECTION("truncated header") {
        Bytes cut(good.begin(), good.begin() + 6);  // magic + half of the first dimension
        write_plain(dir / "hdr.idx", cut);
        const auto msg = format_error([&] { lowrank::read_idx(dir / "hdr.idx"); });
        CHECK_THAT(msg, Contains("hdr.idx") && Contains("2 dimensions (8 bytes)") && Contains("got 2"));
    }
    SECTION("truncated data, plain and gzip'd") {
        const Bytes cut(good.begin(), good.end() - 2);
        write_plain(dir / "short.idx", cut);
        write_gz(dir / "short.idx.gz", cut);
        for (const char* name : {"short.idx", "short.idx.gz"}) {
            const auto msg = format_error([&] { lowrank::read_idx(dir / name); });
            CHECK_THAT(msg, Contains(name) && Contains("truncated data") && Contains("need 6") && Contains("got 4"));
        }
    }
    SECTION("trailing data, plain and gzip'd") {
        Bytes longer = good;
        longer.push_back(99);
        write_plain(dir / "long.idx", longer);
        write_gz(dir / "long.idx.gz", longer);
        for (const char* name : {"long.idx", "long.idx.gz"}) {
            const auto msg = format_error([&] { lowrank::read_idx(dir / name); });
            CHECK_THAT(msg, Contains(name) && Contains("trailing data") && Contains("after 6") && Contains("1 more"));
        }
    }
    SECTION("a dimension above INT_MAX") {
        write_plain(dir / "huge.idx", idx_bytes({0xFFFFFFFFu}, {}));
        const auto msg = format_error([&] { lowrank::read_idx(dir / "huge.idx"); });
        CHECK_THAT(msg, Contains("huge.idx") && Contains("absurd") && Contains("4294967295"));
    }
    SECTION("dimensions whose product overflows or is absurd") {
        write_plain(dir / "product.idx", idx_bytes({0x7FFFFFFFu, 0x7FFFFFFFu, 0x7FFFFFFFu}, {}));
        const auto msg = format_error([&] { lowrank::read_idx(dir / "product.idx"); });
        CHECK_THAT(msg, Contains("product.idx") && Contains("absurd") && Contains("at most 1073741824"));
        write_plain(dir / "cap.idx", idx_bytes({100}, iota_bytes(100)));
        CHECK_THAT(format_error([&] { lowrank::read_idx(dir / "cap.idx", {.max_bytes = 99}); }),
                   Contains("cap.idx") && Contains("at most 99"));
        CHECK(lowrank::read_idx(dir / "cap.idx", {.max_bytes = 100}).data.size() == 100);
    }
    SECTION("a small gzip file that claims 1 GB fails as truncated, from its trailer, without decompressing") {
        write_gz(dir / "liar.gz", idx_bytes({1000000000u}, iota_bytes(10)));
        const auto msg = format_error([&] { lowrank::read_idx(dir / "liar.gz"); });
        CHECK_THAT(msg, Contains("liar.gz") && Contains("need 1000000000") && Contains("got 10") &&
                            Contains("gzip trailer records 18"));
        // 65536 x 64 x 64 pixels (268 MB) claimed by 10 bytes of images: refused as fast.
        write_gz(dir / "pixels.gz", idx_bytes({65536, 64, 64}, iota_bytes(10)));
        CHECK_THAT(format_error([&] { lowrank::read_idx_dims(dir / "pixels.gz"); }),
                   Contains("need 268435456") && Contains("got 10"));
    }
    SECTION("a gzip trailer that does not match its stream is refused as well") {
        // Large enough that reading the header does not decompress it all (zlib would then
        // find the mismatch itself).
        write_gz(dir / "full.gz", idx_bytes({1000000}, iota_bytes(1000000)));
        Bytes z = read_all(dir / "full.gz");
        z.back() ^= 0x01;  // ISIZE's top byte: now 2^24 + 1000008
        write_plain(dir / "isize.gz", z);
        CHECK_THAT(format_error([&] { lowrank::read_idx(dir / "isize.gz"); }),
                   Contains("isize.gz") && Contains("trailing data") && Contains("gzip trailer records 17777224"));
    }
    SECTION("a cut gzip stream") {
        write_gz(dir / "full.gz", idx_bytes({1000}, iota_bytes(1000)));
        Bytes z = read_all(dir / "full.gz");
        z.resize(z.size() - 12);  // drop the CRC/size trailer and some data
        write_plain(dir / "cut.gz", z);
        const auto msg = format_error([&] { lowrank::read_idx(dir / "cut.gz"); });
        CHECK_THAT(msg, Contains("cut.gz"));
    }
    SECTION("a corrupt gzip stream") {
        write_gz(dir / "full.gz", idx_bytes({1000}, iota_bytes(1000)));
        Bytes z = read_all(dir / "full.gz");
        for (std::size_t i = 12; i + 8 < z.size(); i += 3) z[i] ^= 0x5A;
        write_plain(dir / "corrupt.gz", z);
        const auto msg = format_error([&] { lowrank::read_idx(dir / "corrupt.gz"); });
        CHECK_THAT(msg, Contains("corrupt.gz"));
    }
}

TEST_CASE("read_idx on randomly damaged files either succeeds or throws FormatError", "[data][idx][errors]") {
    // A small deterministic fuzz: flip, cut and extend a valid file (plain and gzip'd) and
    // require a clean outcome every time. Under AddressSanitizer this also checks that no
    // malformed header makes the reader touch memory it should not.
    TempDir dir;
    const Bytes good = idx_bytes({3, 4, 5}, iota_bytes(60));
    write_gz(dir / "good.gz", good);
    const Bytes good_gz = read_all(dir / "good.gz");
    std::uint64_t state = 12345;
    auto next = [&] {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        return static_cast<std::size_t>(state >> 33);
    };
    for (int trial = 0; trial < 400; ++trial) {
        Bytes b = trial % 2 == 0 ? good : good_gz;
        switch (next() % 3) {
            case 0:
                for (std::size_t k = next() % 4 + 1; k > 0; --k) b[next() % b.size()] = static_cast<std::uint8_t>(next());
                break;
            case 1: b.resize(next() % b.size()); break;
            default:
                for (std::size_t k = next() % 8 + 1; k > 0; --k) b.push_back(static_cast<std::uint8_t>(next()));
        }
        write_plain(dir / "fuzz", b);
        try {
            const auto a = lowrank::read_idx(dir / "fuzz");
            CHECK(a.data.size() == a.element_count());
        } catch (const lowrank::FormatError& e) {
            CHECK_THAT(std::string(e.what()), Contains("fuzz"));
        }
    }
}

TEST_CASE("load_idx_images and load_idx_labels check the number of dimensions", "[data][idx][errors]") {
    TempDir dir;
    write_plain(dir / "flat", idx_bytes({6}, iota_bytes(6)));
    write_plain(dir / "cube", idx_bytes({1, 2, 3}, iota_bytes(6)));
    CHECK_THAT(format_error([&] { lowrank::load_idx_images<float>(dir / "flat"); }),
               Contains("flat") && Contains("expected 3 dimensions") && Contains("got 1"));
    CHECK_THAT(format_error([&] { lowrank::load_idx_labels(dir / "cube"); }),
               Contains("cube") && Contains("expected 1 dimension") && Contains("got 3"));
}

namespace {

/// Writes an MNIST-like set: n_train / n_test images of 2x2 pixels, labels i % 10.
void write_mnist_like(const TempDir& dir, std::uint32_t n_train, std::uint32_t n_test, bool gz) {
    using Split = std::pair<const char*, std::uint32_t>;
    for (auto [prefix, n] : {Split{"train", n_train}, Split{"t10k", n_test}}) {
        Bytes labels(n);
        for (std::uint32_t i = 0; i < n; ++i) labels[i] = static_cast<std::uint8_t>(i % 10);
        const std::string suffix = gz ? ".gz" : "";
        auto write = gz ? write_gz : write_plain;
        write(dir / (std::string(prefix) + "-images-idx3-ubyte" + suffix), idx_bytes({n, 2, 2}, iota_bytes(4 * n)));
        write(dir / (std::string(prefix) + "-labels-idx1-ubyte" + suffix), idx_bytes({n}, labels));
    }
}

}  // namespace

TEST_CASE("load_mnist_like loads both splits, plain or gzip'd", "[data][idx]") {
    TempDir dir;
    const bool gz = GENERATE(false, true);
    write_mnist_like(dir, 12, 5, gz);
    const auto d = lowrank::load_mnist_like<float>(dir.path());
    CHECK(d.image_rows == 2);
    CHECK(d.image_cols == 2);
    CHECK(d.num_classes == 10);
    REQUIRE(d.train.size() == 12);
    REQUIRE(d.test.size() == 5);
    CHECK(d.train.images.cols() == 4);
    CHECK(d.train.images(1, 0) == 4.0f / 255.0f);
    CHECK(d.train.labels[11] == 1);
    CHECK(d.test.labels == std::vector<std::int32_t>{0, 1, 2, 3, 4});
}

TEST_CASE("load_mnist_like prefers the plain file when both exist", "[data][idx]") {
    TempDir dir;
    write_mnist_like(dir, 3, 2, true);
    write_plain(dir / "t10k-labels-idx1-ubyte", idx_bytes({2}, Bytes{7, 8}));
    CHECK(lowrank::load_mnist_like<float>(dir.path()).test.labels == std::vector<std::int32_t>{7, 8});
}

TEST_CASE("load_mnist_like reports missing files, count mismatches and bad labels", "[data][idx][errors]") {
    TempDir dir;
    SECTION("not a directory") {
        CHECK_THAT(format_error([&] { lowrank::load_mnist_like<float>(dir / "absent"); }),
                   Contains("absent") && Contains("directory") && Contains("does not exist"));
    }
    SECTION("a missing file names both candidates") {
        write_mnist_like(dir, 4, 4, false);
        fs::remove(dir / "t10k-images-idx3-ubyte");
        CHECK_THAT(format_error([&] { lowrank::load_mnist_like<float>(dir.path()); }),
                   Contains("t10k-images-idx3-ubyte'") && Contains("t10k-images-idx3-ubyte.gz'"));
    }
    SECTION("labels and images disagree in number") {
        write_mnist_like(dir, 4, 4, false);
        write_plain(dir / "train-labels-idx1-ubyte", idx_bytes({3}, Bytes{1, 2, 3}));
        CHECK_THAT(format_error([&] { lowrank::load_mnist_like<float>(dir.path()); }),
                   Contains("train-labels-idx1-ubyte") && Contains("expected 4 labels") && Contains("got 3"));
    }
    SECTION("a label outside 0-9") {
        write_mnist_like(dir, 4, 4, false);
        write_plain(dir / "t10k-labels-idx1-ubyte", idx_bytes({4}, Bytes{1, 2, 10, 3}));
        CHECK_THAT(format_error([&] { lowrank::load_mnist_like<float>(dir.path()); }),
                   Contains("t10k-labels-idx1-ubyte") && Contains("label 2") && Contains("[0, 10)") &&
                       Contains("got 10"));
    }
    SECTION("test images of another size than the train images") {
        write_mnist_like(dir, 4, 4, false);
        write_plain(dir / "t10k-images-idx3-ubyte", idx_bytes({4, 3, 2}, iota_bytes(24)));
        CHECK_THAT(format_error([&] { lowrank::load_mnist_like<float>(dir.path()); }),
                   Contains("t10k-images-idx3-ubyte") && Contains("2 x 2") && Contains("got 3 x 2"));
    }
    SECTION("images with the wrong number of dimensions") {
        write_mnist_like(dir, 4, 4, false);
        write_plain(dir / "train-images-idx3-ubyte", idx_bytes({4, 4}, iota_bytes(16)));
        CHECK_THAT(format_error([&] { lowrank::load_mnist_like<float>(dir.path()); }),
                   Contains("train-images-idx3-ubyte") && Contains("expected 3 dimensions") && Contains("got 2"));
    }
}

TEST_CASE("load_mnist_like compares the label count with the image count before decoding either",
          "[data][idx][errors]") {
    TempDir dir;
    write_mnist_like(dir, 4, 4, false);
    // 4096 images of 64 x 64 zeros (16 MB) with 10 labels. The middle of the compressed
    // stream is damaged, far past what reading the header decompresses: a reader that
    // decoded the images first would fail on the damage (or spend the memory), not on the
    // counts.
    write_gz(dir / "train-images-idx3-ubyte.gz", idx_bytes({4096, 64, 64}, Bytes(4096 * 64 * 64, 0)));
    Bytes z = read_all(dir / "train-images-idx3-ubyte.gz");
    REQUIRE(z.size() > 4000);
    for (std::size_t i = z.size() / 2; i < z.size() / 2 + 64; ++i) z[i] ^= 0xA5;
    write_plain(dir / "train-images-idx3-ubyte.gz", z);
    fs::remove(dir / "train-images-idx3-ubyte");
    write_plain(dir / "train-labels-idx1-ubyte", idx_bytes({10}, iota_bytes(10)));
    CHECK_THAT(format_error([&] { lowrank::load_mnist_like<float>(dir.path()); }),
               Contains("train-labels-idx1-ubyte") && Contains("expected 4096 labels") && Contains("got 10"));
    // The damage is real: reading the images themselves fails on it.
    CHECK_THROWS_AS(lowrank::read_idx(dir / "train-images-idx3-ubyte.gz"), lowrank::FormatError);
}

TEST_CASE("read_idx_dims gives the dimensions without reading the data", "[data][idx]") {
    TempDir dir;
    write_gz(dir / "a.gz", idx_bytes({3, 2, 5}, iota_bytes(30)));
    CHECK(lowrank::read_idx_dims(dir / "a.gz") == std::vector<int>{3, 2, 5});
    write_plain(dir / "b", idx_bytes({7}, iota_bytes(7)));
    CHECK(lowrank::read_idx_dims(dir / "b") == std::vector<int>{7});
}

}  // namespace test_idx
