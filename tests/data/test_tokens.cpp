#include <lowrank/data/tokens.hpp>

#include "../test_support.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include <unistd.h>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_tokens {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using lowrank::Index;
using lowrank::TokenWindows;
using Ids = std::vector<std::int32_t>;
using Tokens = std::vector<std::uint16_t>;

namespace {

using lowrank::test::TempDir;

std::vector<unsigned char> read_bytes(const fs::path& path) {
    std::ifstream f(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& path, const std::vector<unsigned char>& bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(f.good());
}

/// A stream whose token at position p is p (mod 65536): a window's tokens name its position.
Tokens positions(std::size_t n) {
    Tokens t(n);
    for (std::size_t p = 0; p < n; ++p) t[p] = static_cast<std::uint16_t>(p);
    return t;
}

}  // namespace

TEST_CASE("write_tokens writes little-endian uint16 that read_tokens reads back", "[data][tokens]") {
    TempDir dir;
    const Ids ids{0, 1, 255, 256, 0x1234, 50256, 65535};
    lowrank::write_tokens(dir / "a.bin", ids);
    CHECK(read_bytes(dir / "a.bin") == std::vector<unsigned char>{0x00, 0x00, 0x01, 0x00, 0xFF, 0x00, 0x00,
                                                                  0x01, 0x34, 0x12, 0x50, 0xC4, 0xFF, 0xFF});
    CHECK(lowrank::read_tokens(dir / "a.bin") == Tokens{0, 1, 255, 256, 0x1234, 50256, 65535});
    // Overwrites, leaving no temporary file behind.
    lowrank::write_tokens(dir / "a.bin", Ids{7});
    CHECK(lowrank::read_tokens(dir / "a.bin") == Tokens{7});
    lowrank::write_tokens(dir / "empty.bin", Ids{});
    CHECK(lowrank::read_tokens(dir / "empty.bin").empty());
    std::set<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir.path()))
        names.insert(entry.path().filename().string());
    CHECK(names == std::set<std::string>{"a.bin", "empty.bin"});
}

TEST_CASE("write_tokens rejects ids that do not fit in uint16 and leaves the old file",
          "[data][tokens][errors]") {
    TempDir dir;
    lowrank::write_tokens(dir / "a.bin", Ids{1, 2});
    CHECK_THROWS_WITH(
        lowrank::write_tokens(dir / "a.bin", Ids{5, 65536}),
        Contains("a.bin") && Contains("id 65536") && Contains("position 1") && Contains("uint16"));
    CHECK_THROWS_WITH(lowrank::write_tokens(dir / "a.bin", Ids{-1}),
                      Contains("id -1") && Contains("position 0"));
    CHECK(lowrank::read_tokens(dir / "a.bin") == Tokens{1, 2});
    CHECK_THROWS_WITH(lowrank::write_tokens(dir / "no-such-dir" / "a.bin", Ids{1}),
                      Contains("no-such-dir") && Contains("cannot create"));
}

TEST_CASE("read_tokens rejects a missing file and an odd number of bytes", "[data][tokens][errors]") {
    TempDir dir;
    CHECK_THROWS_AS(lowrank::read_tokens(dir / "nope.bin"), lowrank::FormatError);
    CHECK_THROWS_WITH(lowrank::read_tokens(dir / "nope.bin"),
                      Contains("nope.bin") && Contains("does not exist"));
    write_bytes(dir / "odd.bin", {1, 0, 2});
    CHECK_THROWS_AS(lowrank::read_tokens(dir / "odd.bin"), lowrank::FormatError);
    CHECK_THROWS_WITH(lowrank::read_tokens(dir / "odd.bin"),
                      Contains("odd.bin") && Contains("even number of bytes") && Contains("got 3"));
    CHECK_THROWS_WITH(lowrank::read_tokens(dir.path()), Contains("not a regular file"));
}

TEST_CASE("read_tokens reads any even-sized file as its little-endian uint16 ids, and an empty one as none",
          "[data][tokens]") {
    TempDir dir;
    std::vector<unsigned char> bytes(2 * 1000);
    for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<unsigned char>(i * 131 + 7);
    write_bytes(dir / "any.bin", bytes);
    const Tokens ids = lowrank::read_tokens(dir / "any.bin");
    REQUIRE(ids.size() == 1000);
    for (std::size_t k = 0; k < ids.size(); ++k) {
        INFO(k);
        CHECK(ids[k] == (bytes[2 * k] | (bytes[2 * k + 1] << 8)));
    }
    write_bytes(dir / "empty.bin", {});
    CHECK(lowrank::read_tokens(dir / "empty.bin").empty());
}

TEST_CASE("TokenWindows::next gives real slices of the stream with targets shifted by one",
          "[data][tokens]") {
    const std::size_t n = 1000;
    TokenWindows windows(positions(n), {.batch = 4, .context = 16, .seed = 7});
    CHECK(windows.size() == 1000);
    Ids x;
    Ids y;
    std::set<std::int32_t> starts;
    for (int step = 0; step < 200; ++step) {
        windows.next(x, y);
        REQUIRE(x.size() == 4 * 16);
        REQUIRE(y.size() == 4 * 16);
        for (std::size_t b = 0; b < 4; ++b) {
            const std::int32_t start = x[b * 16];
            REQUIRE(start >= 0);
            REQUIRE(start + 16 <= static_cast<std::int32_t>(n) - 1);  // the last target exists
            starts.insert(start);
            for (std::size_t t = 0; t < 16; ++t) {
                REQUIRE(x[b * 16 + t] == start + static_cast<std::int32_t>(t));
                REQUIRE(y[b * 16 + t] == start + static_cast<std::int32_t>(t) + 1);
            }
        }
    }
    // 800 draws from 984 positions: the windows are spread over the stream.
    CHECK(starts.size() > 400);
    CHECK(*starts.begin() < 50);
    CHECK(*starts.rbegin() > 930);
}

TEST_CASE("TokenWindows reaches both ends of a stream just long enough for one window", "[data][tokens]") {
    TokenWindows windows(Tokens{10, 11, 12, 13}, {.batch = 2, .context = 3, .seed = 1});
    Ids x;
    Ids y;
    windows.next(x, y);
    CHECK(x == Ids{10, 11, 12, 10, 11, 12});
    CHECK(y == Ids{11, 12, 13, 11, 12, 13});
    TokenWindows two(Tokens{10, 11, 12, 13, 14}, {.batch = 1, .context = 3, .seed = 1});
    std::set<std::int32_t> firsts;
    for (int i = 0; i < 100; ++i) {
        two.next(x, y);
        firsts.insert(x[0]);
    }
    CHECK(firsts == std::set<std::int32_t>{10, 11});
}

TEST_CASE("TokenWindows: the same seed gives the same batches, another seed others", "[data][tokens]") {
    const Tokens tokens = positions(5000);
    TokenWindows a(tokens, {.batch = 3, .context = 8, .seed = 42});
    TokenWindows b(tokens, {.batch = 3, .context = 8, .seed = 42});
    TokenWindows c(tokens, {.batch = 3, .context = 8, .seed = 43});
    Ids xa, ya, xb, yb, xc, yc;
    int differ = 0;
    for (int step = 0; step < 20; ++step) {
        a.next(xa, ya);
        b.next(xb, yb);
        c.next(xc, yc);
        CHECK(xa == xb);
        CHECK(ya == yb);
        differ += xa != xc ? 1 : 0;
    }
    CHECK(differ == 20);
}

TEST_CASE("TokenWindows: restoring the Rng state resumes the exact sequence of batches", "[data][tokens]") {
    const Tokens tokens = positions(3000);
    TokenWindows run(tokens, {.batch = 4, .context = 10, .seed = 5});
    Ids x, y;
    for (int step = 0; step < 7; ++step) run.next(x, y);
    const lowrank::Rng::State saved = run.rng().state();  // what a checkpoint stores
    std::vector<Ids> expected;
    for (int step = 0; step < 5; ++step) {
        run.next(x, y);
        expected.push_back(x);
    }
    // A fresh loader (another seed even) continues identically once the state is restored.
    TokenWindows resumed(tokens, {.batch = 4, .context = 10, .seed = 999});
    resumed.rng().set_state(saved);
    for (int step = 0; step < 5; ++step) {
        resumed.next(x, y);
        CHECK(x == expected[static_cast<std::size_t>(step)]);
    }
    CHECK(resumed.rng().state() == run.rng().state());
}

TEST_CASE("TokenWindows' sequential pass covers non-overlapping windows in order", "[data][tokens]") {
    // 23 tokens, T = 5: windows start at 0, 5, 10, 15 (the 4th reads up to token 20); B = 3.
    TokenWindows windows(positions(23), {.batch = 3, .context = 5, .seed = 0});
    CHECK(windows.window_count() == 4);
    CHECK(windows.sequential_batch_count() == 2);
    CHECK(windows.sequential_batch_count(3) == 1);
    CHECK(windows.sequential_batch_count(100) == 2);
    const lowrank::Rng::State before = windows.rng().state();

    std::vector<Ids> inputs;
    std::vector<Ids> targets;
    std::vector<Index> rows;
    windows.for_each_sequential_batch(
        -1, [&](std::span<const std::int32_t> x, std::span<const std::int32_t> y, Index r) {
            inputs.emplace_back(x.begin(), x.end());
            targets.emplace_back(y.begin(), y.end());
            rows.push_back(r);
        });
    REQUIRE(rows == std::vector<Index>{3, 1});
    CHECK(inputs[0] == Ids{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14});
    CHECK(targets[0] == Ids{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15});
    CHECK(inputs[1] == Ids{15, 16, 17, 18, 19});
    CHECK(targets[1] == Ids{16, 17, 18, 19, 20});
    CHECK(windows.rng().state() == before);  // evaluation does not disturb training's draws

    // The first K windows only; a second pass gives the same batches.
    Ids x, y;
    CHECK(windows.sequential_batch(0, x, y, 2) == 2);
    CHECK(x == Ids{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
    CHECK(y == Ids{1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
    CHECK_THROWS_WITH(windows.sequential_batch(1, x, y, 2), Contains("batch index 1") && Contains("[0, 1)"));
    CHECK_THROWS_WITH(windows.sequential_batch(-1, x, y), Contains("batch index -1"));
}

TEST_CASE("TokenWindows rejects a stream shorter than T+1 and bad options", "[data][tokens][errors]") {
    CHECK_THROWS_WITH(TokenWindows(Tokens(8), {.batch = 1, .context = 8}),
                      Contains("context 8") && Contains("needs 9 tokens") && Contains("holds 8"));
    CHECK_THROWS_WITH(TokenWindows(Tokens{}, {.batch = 1, .context = 1}),
                      Contains("needs 2") && Contains("holds 0"));
    CHECK_THROWS_WITH(TokenWindows(Tokens(100), {.batch = 0, .context = 8}),
                      Contains("batch >= 1") && Contains("got 0"));
    CHECK_THROWS_WITH(TokenWindows(Tokens(100), {.batch = 2, .context = -3}),
                      Contains("context >= 1") && Contains("got -3"));
    CHECK_NOTHROW(TokenWindows(Tokens(9), {.batch = 1, .context = 8}));
}

}  // namespace test_tokens

