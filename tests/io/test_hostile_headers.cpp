// Regression tests for hostile safetensors headers and checkpoint documents: deep nesting,
// huge headers, duplicate keys, NUL bytes, trailing bytes, and messages that would quote
// megabytes (docs/reliability.md).

#include <lowrank/core/rng.hpp>
#include <lowrank/io/checkpoint.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/nn/linear.hpp>
#include <lowrank/optim/adam.hpp>

#include "../test_support.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <unistd.h>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_hostile_headers {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using namespace lowrank;

using lowrank::test::TempDir;

/// Writes a safetensors file by hand: the 8-byte length, `header` as given, `buffer`.
void write_safetensors(const std::string& path, const std::string& header, const std::string& buffer = "") {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    const std::uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) f.put(static_cast<char>(n >> (8 * i)));
    f << header << buffer;
    REQUIRE(f.good());
}

/// The message of the FormatError that f throws; fails if it throws nothing or another type.
std::string format_error(const std::function<void()>& f) {
    try {
        f();
    } catch (const FormatError& e) {
        return e.what();
    } catch (const std::exception& e) {
        FAIL("expected lowrank::FormatError, got another exception: " << e.what());
    }
    FAIL("expected lowrank::FormatError, nothing was thrown");
    return {};
}

std::string nested(std::size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

/// A one-layer model and its optimizer, saved once as a checkpoint.
struct SavedCheckpoint {
    explicit SavedCheckpoint(const std::string& path)
        : rng(1), fc("fc", 3, 2, rng), opt({&fc.weight, &fc.bias}, AdamOptions{.lr = 0.01}) {
        save_checkpoint<double>(path, params(), &opt, 4, {{"run", "x"}});
    }
    ParameterList<double> params() { return {&fc.weight, &fc.bias}; }

    Rng rng;
    Linear<double> fc;
    AdamW<double> opt;
};

/// The checkpoint at `from` written to `to` with its "lowrank" document replaced by
/// edit(document text).
void rewrite_document(const std::string& from, const std::string& to,
                      const std::function<std::string(std::string)>& edit) {
    const SafetensorsReader r(from);
    SafetensorsWriter w;
    for (const auto& name : r.names()) {
        const auto shape = r.shape(name);
        w.add(name, r.matrix<double>(name), shape);
    }
    for (const auto& [key, value] : r.metadata()) w.set_metadata(key, key == "lowrank" ? edit(value) : value);
    w.write(to);
}

/// `text` with the first occurrence of `from` replaced by `to` (which must be there).
std::string replaced(std::string text, const std::string& from, const std::string& to) {
    const auto at = text.find(from);
    REQUIRE(at != std::string::npos);
    return text.replace(at, from.size(), to);
}

TEST_CASE("a 200 KB safetensors file nested 100,000 deep is refused with a short, clear message",
          "[io][safetensors][hostile]") {
    TempDir dir;
    const std::string path = dir / "deep.safetensors";
    write_safetensors(path, R"({"t":{"dtype":"F32","shape":)" + nested(100000) + R"(,"data_offsets":[0,0]}})");
    REQUIRE(fs::file_size(path) > 200000);
    const std::string msg = format_error([&] { SafetensorsReader r(path); });
    CHECK_THAT(msg, Contains(path) && Contains("at most 128 nested arrays and objects") && Contains("/t/shape/0"));
    CHECK(msg.size() < 600);
    // read_checkpoint_extra reads only the header, through the same parser.
    CHECK_THAT(format_error([&] { (void)read_checkpoint_extra(path); }),
               Contains(path) && Contains("at most 128 nested"));
}

TEST_CASE("a checkpoint whose extra is nested 100,000 deep is refused by read_checkpoint_extra and load_checkpoint",
          "[io][checkpoint][hostile]") {
    TempDir dir;
    const std::string good = dir / "good.safetensors";
    SavedCheckpoint saved(good);
    const std::string deep = dir / "deep.safetensors";
    rewrite_document(good, deep, [](std::string doc) {
        return replaced(std::move(doc), R"("extra":{)", R"("extra":{"x":)" + nested(100000) + ",");
    });
    REQUIRE(fs::file_size(deep) > 200000);
    const std::string msg = format_error([&] { (void)read_checkpoint_extra(deep); });
    CHECK_THAT(msg, Contains(deep) && Contains("metadata 'lowrank'") && Contains("at most 128 nested") &&
                        Contains("/extra/x/0"));
    CHECK(msg.size() < 600);
    SavedCheckpoint other(dir / "other.safetensors");
    const auto before = other.fc.weight.value;
    CHECK_THAT(format_error([&] { (void)load_checkpoint<double>(deep, other.params(), &other.opt); }),
               Contains("at most 128 nested"));
    CHECK(other.fc.weight.value == before);
}

TEST_CASE("a header longer than 100 MB is refused by its length, as the reference library does",
          "[io][safetensors][hostile]") {
    TempDir dir;
    const std::string path = dir / "huge.safetensors";
    constexpr std::uint64_t n = 100'000'001;
    {
        std::ofstream f(path, std::ios::binary | std::ios::trunc);
        for (int i = 0; i < 8; ++i) f.put(static_cast<char>(n >> (8 * i)));
    }
    fs::resize_file(path, 8 + n);  // sparse: the length is honest about the file's size
    CHECK_THAT(format_error([&] { SafetensorsReader r(path); }),
               Contains(path) && Contains("header length 100000001 is too large") && Contains("at most 100000000"));
}

TEST_CASE("a safetensors header of 80,000 entries is read correctly", "[io][safetensors][hostile]") {
    TempDir dir;
    const std::string path = dir / "many.safetensors";
    constexpr int n = 80000;
    std::string header = "{";
    for (int i = 0; i < n; ++i)
        header += (i ? "," : "") + std::string("\"t") + std::to_string(i) + R"(":{"dtype":"F32","shape":[1],"data_offsets":[)" +
                  std::to_string(4 * i) + "," + std::to_string(4 * i + 4) + "]}";
    header += "}";
    std::string buffer(4 * n, '\0');
    for (int i = 0; i < n; ++i) {
        const float v = static_cast<float>(i);
        std::memcpy(buffer.data() + 4 * i, &v, 4);  // little-endian hosts only, as the reader's own tests
    }
    write_safetensors(path, header, buffer);
    const SafetensorsReader r(path);
    const auto names = r.names();
    REQUIRE(names.size() == static_cast<std::size_t>(n));
    CHECK(names.front() == "t0");
    CHECK(names[12345] == "t12345");  // file (offset) order
    CHECK(r.shape("t79999") == std::vector<std::int64_t>{1});
    CHECK(r.matrix<float>("t79999")(0, 0) == 79999.0f);
}

TEST_CASE("a key given twice is refused anywhere in a safetensors header", "[io][safetensors][hostile]") {
    TempDir dir;
    const std::string path = dir / "dup.safetensors";
    const std::string t = R"("t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
    const auto refused = [&](const std::string& header) {
        write_safetensors(path, header, std::string(4, '\0'));
        return format_error([&] { SafetensorsReader r(path); });
    };
    CHECK_THAT(refused("{" + t + "," + t + "}"), Contains(path) && Contains("key \"t\" a second time"));
    CHECK_THAT(refused(R"({"t":{"dtype":"F32","shape":[1],"dtype":"F16","data_offsets":[0,4]}})"),
               Contains("key \"dtype\" a second time") && Contains("\"/t\""));
    CHECK_THAT(refused(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"data_offsets":[0,2]}})"),
               Contains("key \"data_offsets\" a second time"));
    CHECK_THAT(refused("{" + t + R"(,"__metadata__":{"k":"a","k":"b"}})"),
               Contains("key \"k\" a second time") && Contains("\"/__metadata__\""));
}

TEST_CASE("a key given twice in a checkpoint document is refused", "[io][checkpoint][hostile]") {
    TempDir dir;
    const std::string good = dir / "good.safetensors";
    SavedCheckpoint saved(good);
    const std::string bad = dir / "bad.safetensors";
    rewrite_document(good, bad, [](std::string doc) { return replaced(std::move(doc), R"("step":4)", R"("step":4,"step":9)"); });
    CHECK_THAT(format_error([&] { (void)read_checkpoint_extra(bad); }),
               Contains(bad) && Contains("metadata 'lowrank'") && Contains("key \"step\" a second time"));
    rewrite_document(good, bad, [](std::string doc) { return replaced(std::move(doc), R"("run":"x")", R"("run":"x","run":"y")"); });
    CHECK_THAT(format_error([&] { (void)read_checkpoint_extra(bad); }),
               Contains("key \"run\" a second time") && Contains("\"/extra\""));
}

TEST_CASE("a NUL byte in a safetensors header or a checkpoint document is refused, not the end of it",
          "[io][safetensors][checkpoint][hostile]") {
    TempDir dir;
    const std::string path = dir / "nul.safetensors";
    // nlohmann stops at the NUL and would read {}: the tensor after it would be hidden, and
    // its bytes would then be "trailing data".
    const std::string hidden = R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
    write_safetensors(path, std::string("{}\0", 3) + hidden, std::string(4, '\0'));
    CHECK_THAT(format_error([&] { SafetensorsReader r(path); }), Contains(path) && Contains("byte 2") && Contains("NUL"));
    CHECK_THAT(format_error([&] { (void)read_checkpoint_extra(path); }), Contains("NUL"));

    // The document is a JSON string inside the header, where a NUL is "\u0000".
    const std::string good = dir / "good.safetensors";
    SavedCheckpoint saved(good);
    const std::string bad = dir / "bad.safetensors";
    rewrite_document(good, bad, [](std::string doc) { return doc + std::string("\0{}", 3); });
    CHECK_THAT(format_error([&] { (void)read_checkpoint_extra(bad); }), Contains("metadata 'lowrank'") && Contains("NUL"));
}

TEST_CASE("bytes after the JSON object are refused, the spaces that pad a header are not",
          "[io][safetensors][checkpoint][hostile]") {
    TempDir dir;
    const std::string path = dir / "trail.safetensors";
    const std::string t = R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
    write_safetensors(path, t + R"( {"u":1})", std::string(4, '\0'));
    CHECK_THAT(format_error([&] { SafetensorsReader r(path); }),
               Contains(path) && Contains("not valid JSON") && Contains("expected end of input"));
    write_safetensors(path, t + "x", std::string(4, '\0'));
    CHECK_THAT(format_error([&] { SafetensorsReader r(path); }), Contains("not valid JSON"));
    write_safetensors(path, t + "       ", std::string(4, '\0'));
    CHECK(SafetensorsReader(path).names() == std::vector<std::string>{"t"});

    const std::string good = dir / "good.safetensors";
    SavedCheckpoint saved(good);
    const std::string bad = dir / "bad.safetensors";
    rewrite_document(good, bad, [](std::string doc) { return doc + "{}"; });
    CHECK_THAT(format_error([&] { (void)read_checkpoint_extra(bad); }),
               Contains("metadata 'lowrank'") && Contains("expected end of input"));
}

TEST_CASE("safetensors messages quote a short excerpt of whatever the file holds", "[io][safetensors][hostile]") {
    TempDir dir;
    const std::string path = dir / "long.safetensors";
    const std::string big(100000, 'q');
    const auto message = [&](const std::string& header) {
        write_safetensors(path, header);
        return format_error([&] { SafetensorsReader r(path); });
    };
    const std::vector<std::string> headers = {
        // a name of 100 KB, with an unknown dtype
        "{\"" + big + R"(":{"dtype":"X","shape":[0],"data_offsets":[0,0]}})",
        // a dtype of 100 KB
        R"({"t":{"dtype":")" + big + R"(","shape":[0],"data_offsets":[0,0]}})",
        // a shape entry that is a 100 KB string, and one that is a 100 KB array
        R"({"t":{"dtype":"F32","shape":[")" + big + R"("],"data_offsets":[0,0]}})",
        [] {
            std::string h = R"({"t":{"dtype":"F32","shape":[[1)";
            for (int i = 0; i < 50000; ++i) h += ",1";
            return h + R"(]],"data_offsets":[0,0]}})";
        }(),
        // data_offsets of 100,000 numbers
        [] {
            std::string h = R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[0)";
            for (int i = 0; i < 50000; ++i) h += ",0";
            return h + "]}}";
        }(),
        // a shape of 50,000 dimensions that does not fit its bytes
        [] {
            std::string h = R"({"t":{"dtype":"F32","shape":[1)";
            for (int i = 0; i < 50000; ++i) h += ",1";
            return h + R"(],"data_offsets":[0,0]}})";
        }(),
        // an unterminated string of 100 KB
        R"({"t":")" + big,
    };
    for (const auto& header : headers) {
        const std::string msg = message(header);
        INFO(msg.substr(0, 300));
        CHECK_THAT(msg, Contains(path));
        CHECK(msg.size() < 600);
    }
}

/// `count` tensors of shape [1] named "junk.<10000 + i>.jjj...", which no parameter has:
/// the first name 100 KB long, the others 200 bytes.
void add_junk(SafetensorsWriter& w, int count) {
    const MatrixD zero = MatrixD::Zero(1, 1);
    for (int i = 0; i < count; ++i)
        w.add("junk." + std::to_string(10000 + i) + "." + std::string(i == 0 ? 100000 : 200, 'j'), zero, {1});
}

/// The message of the Error that f throws; fails if it throws nothing.
std::string error_message(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    FAIL("expected lowrank::Error, nothing was thrown");
    return {};
}

TEST_CASE("a file of 10,000 unexpected tensors gives a short message naming the first ones and the count",
          "[io][checkpoint][hostile]") {
    TempDir dir;
    const std::string good = dir / "good.safetensors";
    SavedCheckpoint saved(good);
    const auto check_message = [](const std::string& msg, const std::string& path) {
        INFO(msg.substr(0, 3000));
        CHECK_THAT(msg, Contains(path) && Contains("10000 problem(s), nothing was loaded"));
        CHECK_THAT(msg, Contains("unexpected: tensor 'junk.10000.jjjj") && Contains("... (100011 bytes)") &&
                            Contains("unexpected: tensor 'junk.10009.jjjj") &&
                            Contains("... and 9990 more unexpected tensor(s)"));
        CHECK_THAT(msg, !Contains("junk.10010."));
        CHECK(msg.size() < 2500);
    };

    SECTION("load_parameters") {
        const std::string path = dir / "weights.safetensors";
        SafetensorsWriter w;
        add_parameters<double>(w, saved.params());
        add_junk(w, 10000);
        w.write(path);
        const SafetensorsReader r(path);
        SavedCheckpoint other(dir / "other.safetensors");
        const auto before = other.fc.weight.value;
        check_message(error_message([&] { (void)load_parameters<double>(r, other.params()); }), path);
        CHECK(other.fc.weight.value == before);
        // Not strict: the report holds every one, and the weights load.
        const LoadReport report = load_parameters<double>(r, other.params(), LoadOptions{.strict = false});
        CHECK(report.unexpected.size() == 10000);
        CHECK(other.fc.weight.value == saved.fc.weight.value);
    }
    SECTION("load_checkpoint") {
        const std::string path = dir / "junk.safetensors";
        {
            const SafetensorsReader r(good);
            SafetensorsWriter w;
            for (const auto& name : r.names()) w.add(name, r.matrix<double>(name), r.shape(name));
            for (const auto& [key, value] : r.metadata()) w.set_metadata(key, value);
            add_junk(w, 10000);
            w.write(path);
        }
        SavedCheckpoint other(dir / "other.safetensors");
        const auto before = other.fc.weight.value;
        check_message(error_message([&] { (void)load_checkpoint<double>(path, other.params(), &other.opt); }),
                      path);
        CHECK(other.fc.weight.value == before);
    }
}

TEST_CASE("checkpoint messages cut an optimizer's names and saved groups to a short excerpt",
          "[io][checkpoint][hostile]") {
    TempDir dir;
    const std::string good = dir / "good.safetensors";
    SavedCheckpoint saved(good);
    const std::string big(100000, 'q');
    const std::string path = dir / "bad.safetensors";
    const auto message = [&](const std::function<std::string(std::string)>& edit) {
        rewrite_document(good, path, edit);
        SavedCheckpoint other(dir / "other.safetensors");
        const auto before = other.fc.weight.value;
        const std::string msg = error_message([&] { (void)load_checkpoint<double>(path, other.params(), &other.opt); });
        CHECK(other.fc.weight.value == before);
        return msg;
    };
    // a step count for a parameter of 100 KB name that the optimizer does not hold
    std::string msg = message([&](std::string doc) {
        const bool empty = doc.find(R"("steps":{})") != std::string::npos;
        return replaced(std::move(doc), R"("steps":{)", "\"steps\":{\"" + big + "\":1" + (empty ? "" : ","));
    });
    CHECK_THAT(msg, Contains("has optimizer state for 'qqqq") && Contains("(100000 bytes)"));
    CHECK(msg.size() < 600);
    // a group whose saved parameter list and lr are 50,000 entries long
    std::string many = "[0";
    for (int i = 0; i < 50000; ++i) many += ",0";
    many += "]";
    msg = message([&](std::string doc) { return replaced(std::move(doc), R"("params":[)", "\"params\":[" + many + ","); });
    CHECK_THAT(msg, Contains("optimizer group 0: expected the saved parameters [[0,0,0"));
    CHECK(msg.size() < 1200);
    msg = message([&](std::string doc) { return replaced(std::move(doc), R"("lr":)", "\"lr\":" + many + ",\"x\":"); });
    CHECK_THAT(msg, Contains("expected the saved lr [0,0,0"));
    CHECK(msg.size() < 600);
}

}  // namespace test_hostile_headers
