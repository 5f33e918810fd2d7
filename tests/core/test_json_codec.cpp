// The JSON codec of saved states: 64-bit words and generator states read back exactly,
// and a malformed value is refused naming the key, the expected and the actual value.
#include <lowrank/core/json_codec.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <bit>
#include <cstdint>
#include <limits>
#include <string>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_json_codec {

using Catch::Contains;
using lowrank::FormatError;
using lowrank::Rng;
using nlohmann::json;

TEST_CASE("word_to_hex writes 0x and 16 digits, and word_from_json reads every saved form", "[core][json]") {
    for (const std::uint64_t w : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{0x0123456789abcdefULL},
                                  std::numeric_limits<std::uint64_t>::max()}) {
        const std::string hex = lowrank::word_to_hex(w);
        CHECK(hex.size() == 18);
        CHECK(lowrank::word_from_json(json::parse(json(hex).dump()), "test", "w") == w);
        CHECK(lowrank::word_from_json(json(w), "test", "w") == w);  // an unsigned integer
    }
    CHECK(lowrank::word_to_hex(0xabcULL) == "0x0000000000000abc");
    CHECK(lowrank::word_from_json(json("0xABC"), "test", "w") == 0xabcULL);  // short, upper case
    CHECK(lowrank::word_from_json(json("0X1"), "test", "w") == 1);
}

TEST_CASE("word_from_json refuses what is not a word, naming the key and the value", "[core][json]") {
    CHECK_THROWS_AS(lowrank::word_from_json(json(-1), "test", "w"), FormatError);
    CHECK_THROWS_WITH(lowrank::word_from_json(json(-1), "load", "rng.s[2]"),
                      Contains("load: key 'rng.s[2]': expected a 64-bit word") && Contains("got -1"));
    CHECK_THROWS_WITH(lowrank::word_from_json(json("0x"), "t", "w"), Contains("got \"0x\""));
    CHECK_THROWS_WITH(lowrank::word_from_json(json("0x12345678901234567"), "t", "w"), Contains("key 'w'"));
    CHECK_THROWS_WITH(lowrank::word_from_json(json("12"), "t", "w"), Contains("got \"12\""));
    CHECK_THROWS_WITH(lowrank::word_from_json(json(1.5), "t", "w"), Contains("got 1.5"));
    // A long value is quoted as an excerpt, not whole.
    try {
        lowrank::word_from_json(json(std::string(1000, 'x')), "t", "w");
        FAIL("expected a FormatError");
    } catch (const FormatError& e) {
        CHECK(std::string(e.what()).size() < 250);
        CHECK_THAT(e.what(), Contains("..."));
    }
}

TEST_CASE("rng_state_from_json names the path of the state inside its document", "[core][json]") {
    Rng::State s;
    s.s = {1, 2, 3, 4};
    s.has_spare = true;
    s.spare = -0.25;
    const json saved = lowrank::rng_state_to_json(s);
    CHECK(saved.at("s")[3] == "0x0000000000000004");
    CHECK(saved.at("spare") == lowrank::word_to_hex(std::bit_cast<std::uint64_t>(-0.25)));
    CHECK(lowrank::rng_state_from_json(saved, "ctx", "layers[0].rng") == s);

    json bad = saved;
    bad["s"][1] = "0xg";
    CHECK_THROWS_WITH(lowrank::rng_state_from_json(bad, "ctx", "layers[0].rng"),
                      Contains("ctx: key 'layers[0].rng.s[1]'") && Contains("got \"0xg\""));
    bad = saved;
    bad.erase("spare");
    CHECK_THROWS_WITH(lowrank::rng_state_from_json(bad, "ctx", "rng"),
                      Contains("ctx: missing key 'rng.spare'"));
    bad = saved;
    bad["has_spare"] = 1;
    CHECK_THROWS_WITH(lowrank::rng_state_from_json(bad, "ctx", "rng"),
                      Contains("key 'rng.has_spare': expected true or false, got 1"));
    CHECK_THROWS_WITH(lowrank::rng_state_from_json(json::array(), "ctx", "rng"),
                      Contains("key 'rng': expected an object"));
    CHECK_THROWS_WITH(lowrank::rng_state_from_json(json(3)),
                      Contains("rng_state_from_json: expected an object"));
}

}  // namespace test_json_codec
