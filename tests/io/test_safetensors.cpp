#include <lowrank/core/rng.hpp>
#include <lowrank/io/safetensors.hpp>

#include "../test_support.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_safetensors {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using lowrank::Matrix;
using lowrank::SafetensorsReader;
using lowrank::SafetensorsWriter;

/// A fresh directory under the system temp dir, removed with its contents at scope end.
using lowrank::test::TempDir;

using Bytes = std::vector<std::uint8_t>;

void append_le(Bytes& out, std::uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

/// A safetensors file built by hand: 8-byte little-endian length, header text, buffer.
Bytes st_bytes(const std::string& header, const Bytes& buffer = {}) {
    Bytes out;
    append_le(out, header.size(), 8);
    out.insert(out.end(), header.begin(), header.end());
    out.insert(out.end(), buffer.begin(), buffer.end());
    return out;
}

void write_bytes(const std::string& path, const Bytes& bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(f.good());
}

Bytes read_bytes(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return Bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

/// The message of the FormatError that f throws; fails the test otherwise.
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

/// The message of the FormatError that reading `bytes` (written to a file) raises.
std::string read_error(const TempDir& dir, const Bytes& bytes) {
    const std::string path = dir / "bad.safetensors";
    write_bytes(path, bytes);
    const std::string message = format_error([&] { SafetensorsReader r(path); });
    CHECK_THAT(message, Contains(path));
    return message;
}

template <class T>
bool same_bits(const Matrix<T>& a, const Matrix<T>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0);
}

/// Values that a lossy text or conversion path would change: signed zero, subnormals,
/// extremes, infinities, a NaN with a payload, and ordinary numbers with full mantissas.
template <class T>
Matrix<T> awkward_values(lowrank::Index rows, lowrank::Index cols) {
    using Lim = std::numeric_limits<T>;
    using Bits = std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint64_t>;
    const std::vector<T> specials{T(0),          -T(0),          Lim::denorm_min(), -Lim::denorm_min(), Lim::min(),
                                  Lim::max(),     -Lim::max(),    Lim::infinity(),   -Lim::infinity(),   Lim::epsilon(),
                                  T(1) / T(3),   T(-2.5),        std::bit_cast<T>(static_cast<Bits>(std::bit_cast<Bits>(Lim::quiet_NaN()) | 5))};
    Matrix<T> m(rows, cols);
    lowrank::Rng rng(42);
    for (lowrank::Index i = 0; i < m.size(); ++i)
        m.data()[i] = static_cast<std::size_t>(i) < specials.size() ? specials[static_cast<std::size_t>(i)]
                                                                     : static_cast<T>(rng.normal() * 1e3);
    return m;
}

TEMPLATE_TEST_CASE("safetensors round-trips 0-D, 1-D, 2-D and empty tensors bit-exactly", "[io][safetensors]", float,
                   double) {
    using T = TestType;
    TempDir dir;
    const Matrix<T> w = awkward_values<T>(4, 5);
    const Matrix<T> bias = awkward_values<T>(1, 7);
    Matrix<T> scalar(1, 1);
    scalar(0, 0) = T(1) / T(7);
    const Matrix<T> empty_rows(0, 3), empty(0, 0);

    SafetensorsWriter writer;
    writer.add("w", w);
    writer.add("bias", bias, {7});
    writer.add_scalar("scalar", scalar(0, 0));
    writer.add("empty_rows", empty_rows);
    writer.add("empty_1d", empty, {0});
    writer.add("column", bias.transpose(), {7, 1});  // an expression, not a Matrix
    writer.set_metadata("format", "pt");
    writer.set_metadata("note", "ünïcode \"quoted\"");
    const std::string path = dir / "a.safetensors";
    writer.write(path);

    const SafetensorsReader r(path);
    const std::string dtype = std::is_same_v<T, float> ? "F32" : "F64";
    // Offset order; the two empty tensors share an offset, and such ties go by name.
    CHECK(r.names() == std::vector<std::string>{"w", "bias", "scalar", "empty_1d", "empty_rows", "column"});
    CHECK(r.path() == path);
    CHECK(r.contains("w"));
    CHECK_FALSE(r.contains("nope"));
    for (const auto& name : r.names()) CHECK(r.dtype(name) == dtype);
    CHECK(r.shape("w") == std::vector<std::int64_t>{4, 5});
    CHECK(r.shape("bias") == std::vector<std::int64_t>{7});
    CHECK(r.shape("scalar").empty());
    CHECK(r.shape("empty_rows") == std::vector<std::int64_t>{0, 3});
    CHECK(r.shape("empty_1d") == std::vector<std::int64_t>{0});
    CHECK(r.shape("column") == std::vector<std::int64_t>{7, 1});

    CHECK(same_bits(r.matrix<T>("w"), w));
    CHECK(same_bits(r.matrix<T>("bias"), bias));
    CHECK(same_bits(r.matrix<T>("scalar"), scalar));
    CHECK(r.matrix<T>("empty_rows").rows() == 0);
    CHECK(r.matrix<T>("empty_rows").cols() == 3);
    CHECK(r.matrix<T>("empty_1d").rows() == 1);
    CHECK(r.matrix<T>("empty_1d").cols() == 0);
    const Matrix<T> column = bias.transpose();
    CHECK(same_bits(r.matrix<T>("column"), column));
    CHECK(r.metadata().size() == 2);
    CHECK(r.metadata().at("format") == "pt");
    CHECK(r.metadata().at("note") == "ünïcode \"quoted\"");
}

TEST_CASE("safetensors writes the documented layout", "[io][safetensors]") {
    // Parsed here with plain JSON and byte arithmetic, independently of the reader.
    TempDir dir;
    Matrix<float> a(2, 3);
    a << 1, 2, 3, 4, 5, 6;
    Eigen::MatrixXd col_major(2, 2);  // column-major storage must still be written row-major
    col_major << 1.5, -2.0, 0.25, 8.0;
    SafetensorsWriter writer;
    writer.add("a", a);
    writer.add("b", col_major, {4});
    writer.set_metadata("k", "v");
    const std::string path = dir / "layout.safetensors";
    writer.write(path);

    const Bytes bytes = read_bytes(path);
    REQUIRE(bytes.size() >= 8);
    std::uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(bytes[static_cast<std::size_t>(i)]) << (8 * i);
    CHECK(n % 8 == 0);
    REQUIRE(bytes.size() == 8 + n + 6 * 4 + 4 * 8);
    const std::string text(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
    CHECK(text.front() == '{');
    CHECK(text.find_last_not_of(' ') == text.rfind('}'));  // padded with spaces only
    const auto header = nlohmann::json::parse(text);
    CHECK(header["a"]["dtype"] == "F32");
    CHECK(header["a"]["shape"] == nlohmann::json::array({2, 3}));
    CHECK(header["a"]["data_offsets"] == nlohmann::json::array({0, 24}));
    CHECK(header["b"]["dtype"] == "F64");
    CHECK(header["b"]["shape"] == nlohmann::json::array({4}));
    CHECK(header["b"]["data_offsets"] == nlohmann::json::array({24, 56}));
    CHECK(header["__metadata__"] == nlohmann::json{{"format", "pt"}, {"k", "v"}});

    const std::size_t base = 8 + n;
    auto f32_at = [&](std::size_t i) {
        std::uint32_t u = 0;
        for (int k = 0; k < 4; ++k) u |= static_cast<std::uint32_t>(bytes[base + 4 * i + static_cast<std::size_t>(k)]) << (8 * k);
        return std::bit_cast<float>(u);
    };
    auto f64_at = [&](std::size_t i) {
        std::uint64_t u = 0;
        for (int k = 0; k < 8; ++k) u |= static_cast<std::uint64_t>(bytes[base + 24 + 8 * i + static_cast<std::size_t>(k)]) << (8 * k);
        return std::bit_cast<double>(u);
    };
    for (std::size_t i = 0; i < 6; ++i) CHECK(f32_at(i) == static_cast<float>(i + 1));
    CHECK(f64_at(0) == 1.5);
    CHECK(f64_at(1) == -2.0);
    CHECK(f64_at(2) == 0.25);
    CHECK(f64_at(3) == 8.0);
}

TEST_CASE("safetensors decodes F16 and BF16 from hand-built bytes", "[io][safetensors]") {
    TempDir dir;
    // binary16: sign | 5 exponent bits (bias 15) | 10 mantissa bits.
    const std::vector<std::uint16_t> half{0x3C00, 0xC100, 0x7BFF, 0x0001, 0x03FF, 0x0400, 0x7C00, 0xFC00, 0x8000, 0x3555};
    const std::vector<double> half_expected{1.0,
                                            -2.5,
                                            65504.0,
                                            std::ldexp(1.0, -24),  // smallest subnormal
                                            1023.0 * std::ldexp(1.0, -24),
                                            std::ldexp(1.0, -14),  // smallest normal
                                            std::numeric_limits<double>::infinity(),
                                            -std::numeric_limits<double>::infinity(),
                                            -0.0,
                                            (1024.0 + 0x155) / 1024.0 * 0.25};
    // bfloat16: the upper 16 bits of a binary32 (8 exponent bits, bias 127, 7 mantissa bits).
    const std::vector<std::uint16_t> bf16{0x3F80, 0xC020, 0x7F7F, 0x0001, 0x7F80, 0x8000, 0x4049};
    const std::vector<double> bf16_expected{1.0,
                                            -2.5,
                                            (2.0 - std::ldexp(1.0, -7)) * std::ldexp(1.0, 127),
                                            std::ldexp(1.0, -133),  // smallest subnormal
                                            std::numeric_limits<double>::infinity(),
                                            -0.0,
                                            (128.0 + 0x49) / 128.0 * 2.0};
    Bytes buffer;
    for (auto h : half) append_le(buffer, h, 2);
    buffer.push_back(0x00);  // one NaN of each: F16 0x7E00, BF16 0x7FC0
    buffer.push_back(0x7E);
    for (auto b : bf16) append_le(buffer, b, 2);
    buffer.push_back(0xC0);
    buffer.push_back(0x7F);
    const std::size_t h_end = 2 * (half.size() + 1), b_end = h_end + 2 * (bf16.size() + 1);
    const std::string header =
        "{\"h\":{\"dtype\":\"F16\",\"shape\":[" + std::to_string(half.size() + 1) + "],\"data_offsets\":[0," +
        std::to_string(h_end) + "]},\"b\":{\"dtype\":\"BF16\",\"shape\":[1," + std::to_string(bf16.size() + 1) +
        "],\"data_offsets\":[" + std::to_string(h_end) + "," + std::to_string(b_end) + "]}}";
    const std::string path = dir / "half.safetensors";
    write_bytes(path, st_bytes(header, buffer));

    const SafetensorsReader r(path);
    CHECK(r.dtype("h") == "F16");
    CHECK(r.dtype("b") == "BF16");
    const Matrix<double> h = r.matrix<double>("h");
    const Matrix<float> hf = r.matrix<float>("h");
    REQUIRE(h.cols() == static_cast<lowrank::Index>(half.size() + 1));
    for (std::size_t i = 0; i < half.size(); ++i) {
        INFO("F16 0x" << std::hex << half[i]);
        CHECK(h(0, static_cast<lowrank::Index>(i)) == half_expected[i]);
        CHECK(std::signbit(h(0, static_cast<lowrank::Index>(i))) == std::signbit(half_expected[i]));
        CHECK(hf(0, static_cast<lowrank::Index>(i)) == static_cast<float>(half_expected[i]));
    }
    CHECK(std::isnan(h(0, static_cast<lowrank::Index>(half.size()))));
    const Matrix<double> b = r.matrix<double>("b");
    REQUIRE(b.rows() == 1);
    for (std::size_t i = 0; i < bf16.size(); ++i) {
        INFO("BF16 0x" << std::hex << bf16[i]);
        CHECK(b(0, static_cast<lowrank::Index>(i)) == bf16_expected[i]);
        CHECK(std::signbit(b(0, static_cast<lowrank::Index>(i))) == std::signbit(bf16_expected[i]));
    }
    CHECK(std::isnan(b(0, static_cast<lowrank::Index>(bf16.size()))));
}

TEST_CASE("safetensors converts F32 to double and F64 to float on request", "[io][safetensors]") {
    TempDir dir;
    Matrix<float> f(1, 2);
    f << 0.1f, -3.0f;
    Matrix<double> d(1, 2);
    d << 0.1, 1e300;
    SafetensorsWriter writer;
    writer.add("f", f);
    writer.add("d", d);
    writer.write(dir / "c.safetensors");
    const SafetensorsReader r(dir / "c.safetensors");
    CHECK(r.matrix<double>("f")(0, 0) == static_cast<double>(0.1f));
    CHECK(r.matrix<float>("d")(0, 0) == 0.1f);
    CHECK(std::isinf(r.matrix<float>("d")(0, 1)));
}

TEST_CASE("safetensors matrix() refuses integer dtypes, 3-D shapes and unknown names", "[io][safetensors]") {
    TempDir dir;
    Bytes buffer(8 + 8 * 4, 0);
    const std::string header =
        R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
        R"("cube":{"dtype":"F32","shape":[2,2,2],"data_offsets":[8,40]}})";
    const std::string path = dir / "ints.safetensors";
    write_bytes(path, st_bytes(header, buffer));
    const SafetensorsReader r(path);
    CHECK(r.dtype("ids") == "I64");
    CHECK(r.shape("cube") == std::vector<std::int64_t>{2, 2, 2});
    CHECK_THROWS_WITH(r.matrix<float>("ids"), Contains("'ids'") && Contains("expected dtype F32, F64, F16 or BF16, got I64"));
    CHECK_THROWS_WITH(r.matrix<double>("cube"), Contains("'cube'") && Contains("got shape [2, 2, 2]"));
    CHECK_THROWS_WITH(r.matrix<double>("missing"), Contains("no tensor named 'missing'") && Contains(path));
    CHECK_THROWS_WITH(r.shape("missing"), Contains("no tensor named 'missing'"));
}

TEST_CASE("safetensors reader rejects malformed files with a message naming the file and the entry",
          "[io][safetensors]") {
    TempDir dir;
    const Bytes four_floats(16, 0);
    auto one = [](const std::string& entry) { return "{\"t\":" + entry + "}"; };

    SECTION("shorter than 8 bytes") {
        CHECK_THAT(read_error(dir, Bytes{1, 2, 3, 4, 5}),
                   Contains("file too short: expected at least 8 bytes (the header length), got 5"));
        CHECK_THAT(read_error(dir, Bytes{}), Contains("got 0"));
    }
    SECTION("header length beyond the file") {
        Bytes bytes;
        append_le(bytes, 1000, 8);
        bytes.resize(20, ' ');
        CHECK_THAT(read_error(dir, bytes), Contains("header length 1000 is beyond the file: at most 12 bytes"));
        Bytes huge;
        append_le(huge, ~std::uint64_t{0}, 8);
        CHECK_THAT(read_error(dir, huge), Contains("header length 18446744073709551615 is beyond the file"));
    }
    SECTION("bad JSON") {
        CHECK_THAT(read_error(dir, st_bytes("{\"t\": {\"dtype\": \"F32\",")), Contains("not valid JSON") && Contains("byte 22"));
        CHECK_THAT(read_error(dir, st_bytes("[1, 2]")), Contains("expected the header to be a JSON object, got a JSON array"));
        CHECK_THAT(read_error(dir, st_bytes(one("3"))), Contains("tensor 't'") && Contains("got a JSON number"));
    }
    SECTION("duplicate names") {
        CHECK_THAT(read_error(dir, st_bytes(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                                            R"("t":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})")),
                   Contains("key \"t\" a second time") && Contains("top-level object"));
    }
    SECTION("unknown dtype") {
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F128","shape":[4],"data_offsets":[0,16]})"), four_floats)),
                   Contains("tensor 't'") && Contains("unknown dtype 'F128'"));
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":32,"shape":[4],"data_offsets":[0,16]})"), four_floats)),
                   Contains("tensor 't'") && Contains("expected dtype to be a string"));
    }
    SECTION("missing fields") {
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":[4]})"), four_floats)),
                   Contains("tensor 't'") && Contains("missing \"data_offsets\""));
    }
    SECTION("element count times dtype size differs from the byte range") {
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,16]})"), four_floats)),
                   Contains("tensor 't'") &&
                       Contains("shape [2, 3] of F32 needs 24 bytes, but data_offsets [0, 16] hold 16"));
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F64","shape":[4],"data_offsets":[0,16]})"), four_floats)),
                   Contains("shape [4] of F64 needs 32 bytes"));
        // A product that overflows 64 bits must not wrap around to the right size.
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":[4611686018427387904,4611686018427387904,4],"data_offsets":[0,16]})"),
                                            four_floats)),
                   Contains("needs more than 2^64 bytes"));
    }
    SECTION("offsets outside the buffer") {
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":[4],"data_offsets":[8,24]})"), four_floats)),
                   Contains("tensor 't'") && Contains("data_offsets [8, 24] are outside the data buffer of 16 bytes"));
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":[0],"data_offsets":[12,8]})"), four_floats)),
                   Contains("data_offsets [12, 8]: expected begin <= end"));
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":[4],"data_offsets":[-4,12]})"), four_floats)),
                   Contains("expected data_offsets to be [begin, end] with integers >= 0, got [-4,12]"));
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":[4],"data_offsets":[0]})"), four_floats)),
                   Contains("got [0]"));
    }
    SECTION("overlapping offsets") {
        CHECK_THAT(read_error(dir, st_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                                            R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                            four_floats)),
                   Contains("tensor 'b'") && Contains("overlap tensor 'a', which ends at 12"));
    }
    SECTION("holes and trailing bytes") {
        CHECK_THAT(read_error(dir, st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                            R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                            four_floats)),
                   Contains("tensor 'b'") && Contains("expected its data to start at 4") && Contains("got 8"));
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":[3],"data_offsets":[0,12]})"), four_floats)),
                   Contains("the tensors cover 12 bytes of the 16-byte data buffer"));
    }
    SECTION("non-integer shape entries") {
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":[2,2.0],"data_offsets":[0,16]})"), four_floats)),
                   Contains("tensor 't'") && Contains("shape entry 1: expected an integer, got 2.0"));
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":["4"],"data_offsets":[0,16]})"), four_floats)),
                   Contains("shape entry 0: expected an integer, got \"4\""));
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":4,"data_offsets":[0,16]})"), four_floats)),
                   Contains("expected shape to be an array"));
    }
    SECTION("negative dims") {
        CHECK_THAT(read_error(dir, st_bytes(one(R"({"dtype":"F32","shape":[-2,-2],"data_offsets":[0,16]})"), four_floats)),
                   Contains("tensor 't'") && Contains("shape entry 0: expected a dimension >= 0, got a negative dim -2"));
    }
    SECTION("metadata that is not a string map") {
        CHECK_THAT(read_error(dir, st_bytes(R"({"__metadata__":{"k":1}})")),
                   Contains("metadata 'k': expected a string value, got a JSON number"));
        CHECK_THAT(read_error(dir, st_bytes(R"({"__metadata__":[1]})")),
                   Contains("expected \"__metadata__\" to be an object of strings"));
    }
    SECTION("a missing file and a directory") {
        const std::string missing = dir / "missing.safetensors";
        CHECK_THAT(format_error([&] { SafetensorsReader r(missing); }),
                   Contains(missing) && Contains("does not exist"));
        CHECK_THAT(format_error([&] { SafetensorsReader r(dir.path().string()); }), Contains("got a directory"));
    }
}

TEST_CASE("safetensors files say \"format\": \"pt\" unless told otherwise", "[io][safetensors]") {
    TempDir dir;
    SafetensorsWriter plain;
    Matrix<float> a(1, 2);
    a << 1, 2;
    plain.add("a", a);
    CHECK(plain.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
    plain.write(dir / "plain.safetensors");
    const Bytes bytes = read_bytes(dir / "plain.safetensors");
    REQUIRE(bytes.size() > 8);
    std::uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(bytes[static_cast<std::size_t>(i)]) << (8 * i);
    const auto header = nlohmann::json::parse(std::string(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n)));
    CHECK(header.at("__metadata__") == nlohmann::json{{"format", "pt"}});

    SafetensorsWriter other;
    other.set_metadata("format", "np");
    other.write(dir / "np.safetensors");
    CHECK(SafetensorsReader(dir / "np.safetensors").metadata().at("format") == "np");
}

TEST_CASE("safetensors reader accepts a header-only file and a file with only metadata", "[io][safetensors]") {
    TempDir dir;
    write_bytes(dir / "empty.safetensors", st_bytes("{}"));
    CHECK(SafetensorsReader(dir / "empty.safetensors").names().empty());
    SafetensorsWriter writer;
    writer.set_metadata("only", "metadata");
    writer.write(dir / "meta.safetensors");
    const SafetensorsReader r(dir / "meta.safetensors");
    CHECK(r.names().empty());
    CHECK(r.metadata().at("only") == "metadata");
}

TEST_CASE("every truncation of a valid safetensors file throws FormatError", "[io][safetensors]") {
    TempDir dir;
    Matrix<float> a(2, 3);
    a << 1, 2, 3, 4, 5, 6;
    Matrix<double> b(1, 2);
    b << -1, 0.5;
    SafetensorsWriter writer;
    writer.add("a", a);
    writer.add("b", b, {2});
    writer.add_scalar("c", 3.0f);
    writer.set_metadata("k", "v");
    const std::string full_path = dir / "full.safetensors";
    writer.write(full_path);
    const Bytes full = read_bytes(full_path);
    REQUIRE(SafetensorsReader(full_path).names().size() == 3);

    const std::string cut_path = dir / "cut.safetensors";
    int thrown = 0;
    for (std::size_t len = 0; len < full.size(); ++len) {
        write_bytes(cut_path, Bytes(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(len)));
        try {
            SafetensorsReader r(cut_path);
            FAIL("a prefix of " << len << " of " << full.size() << " bytes was accepted");
        } catch (const lowrank::FormatError& e) {
            ++thrown;
            if (len == full.size() - 1) CHECK_THAT(std::string(e.what()), Contains(cut_path));
        }
    }
    CHECK(thrown == static_cast<int>(full.size()));
    // Bytes appended after the buffer are as wrong as missing ones.
    Bytes longer = full;
    longer.push_back(0);
    write_bytes(cut_path, longer);
    CHECK_THROWS_AS(SafetensorsReader(cut_path), lowrank::FormatError);
}

TEST_CASE("safetensors writer refuses duplicate names, wrong shapes and the reserved name", "[io][safetensors]") {
    Matrix<float> m(2, 3);
    m.setOnes();
    SafetensorsWriter writer;
    writer.add("m", m);
    CHECK_THROWS_WITH(writer.add("m", m), Contains("tensor 'm'") && Contains("already added"));
    CHECK_THROWS_WITH(writer.add("n", m, {4, 2}),
                      Contains("tensor 'n'") && Contains("shape [4, 2] holds 8 elements, but the matrix (2 x 3) has 6"));
    CHECK_THROWS_WITH(writer.add("n", m, {-2, -3}), Contains("expected dimensions >= 0"));
    CHECK_THROWS_WITH(writer.add("__metadata__", m), Contains("reserved"));
    CHECK_THROWS_WITH(writer.add("", m), Contains("non-empty"));
    writer.add("n", m, {6});
    CHECK(writer.names() == std::vector<std::string>{"m", "n"});
}

TEST_CASE("safetensors write is atomic: a failed write leaves no file, a good one replaces the old whole",
          "[io][safetensors]") {
    TempDir dir;
    Matrix<double> big(100, 100);
    big.setConstant(3.0);
    Matrix<double> small(1, 2);
    small << 7, 8;

    SECTION("a missing directory throws and leaves no temp file") {
        SafetensorsWriter writer;
        writer.add("small", small);
        const std::string target = dir / "no-such-dir/x.safetensors";
        CHECK_THROWS_WITH(writer.write(target), Contains(target) && Contains("cannot create the temporary file"));
        CHECK(dir.entries().empty());
    }
    SECTION("a rename that fails removes the temp file and keeps the target") {
        fs::create_directories(dir.path() / "occupied");  // a directory cannot be replaced by a file
        fs::create_directories(dir.path() / "occupied" / "keep");
        SafetensorsWriter writer;
        writer.add("small", small);
        CHECK_THROWS_WITH(writer.write(dir / "occupied"), Contains("renaming"));
        CHECK(dir.entries() == std::vector<std::string>{"occupied"});
        CHECK(fs::is_directory(dir.path() / "occupied" / "keep"));
    }
    SECTION("an existing file is replaced whole") {
        const std::string path = dir / "x.safetensors";
        SafetensorsWriter first;
        first.add("big", big);
        first.set_metadata("which", "first");
        first.write(path);
        const auto big_size = fs::file_size(path);

        SafetensorsWriter second;
        second.add("small", small);
        second.set_metadata("which", "second");
        second.write(path);
        const SafetensorsReader r(path);
        CHECK(r.names() == std::vector<std::string>{"small"});
        CHECK(r.metadata().at("which") == "second");
        CHECK(r.matrix<double>("small") == small);
        CHECK(fs::file_size(path) < big_size);
        CHECK(dir.entries() == std::vector<std::string>{"x.safetensors"});  // no temp file left
    }
}

}  // namespace test_safetensors
