#include <lowrank/core/json_read.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstddef>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_json_read {

using Catch::Matchers::Contains;
using lowrank::FormatError;
using lowrank::detail::JsonLimits;
using lowrank::detail::parse_json_bounded;

/// The message of the FormatError that parsing `text` throws; fails if it throws nothing.
std::string parse_error(const std::string& text, const JsonLimits& limits = {}) {
    try {
        (void)parse_json_bounded(text, limits, "test: 'x.json'");
    } catch (const FormatError& e) {
        return e.what();
    }
    FAIL("expected a FormatError for " << text.substr(0, 100));
    return {};
}

std::string nested(std::size_t depth, const std::string& inner = "") {
    return std::string(depth, '[') + inner + std::string(depth, ']');
}

TEST_CASE("parse_json_bounded reads what nlohmann reads, as the same value", "[core][json]") {
    for (const std::string text :
         {R"({"a": 1, "b": [true, false, null], "c": {"d": -2.5e3, "e": "x\u00e9\n"}})", "[]", "{}", "  7  ",
          R"("just a string")", "[1, [2, [3, [4]]], {\"k\": [{}]}]", "18446744073709551615", "-9223372036854775808",
          "{\"\": 0}"}) {
        INFO(text);
        CHECK(parse_json_bounded(text, {}, "test") == nlohmann::json::parse(text));
    }
}

TEST_CASE("parse_json_bounded accepts nesting up to max_depth and refuses one level more", "[core][json]") {
    CHECK(parse_json_bounded(nested(128), {}, "test").is_array());
    const std::string msg = parse_error(nested(129));
    CHECK_THAT(msg, Contains("test: 'x.json'") && Contains("byte 128") && Contains("at most 128 nested"));
    CHECK_THAT(parse_error(nested(3), {.max_depth = 2}), Contains("at most 2 nested") && Contains("byte 2"));
    // Objects count as levels too, and the path says where the parser was.
    CHECK_THAT(parse_error(R"({"a": {"b": [{"c": 1}]}})", {.max_depth = 3}), Contains("\"/a/b/0\""));
}

TEST_CASE("parse_json_bounded refuses 100,000 nested brackets quickly, with a short message", "[core][json]") {
    const std::string msg = parse_error("{\"t\": " + nested(100000) + "}");
    CHECK_THAT(msg, Contains("at most 128 nested"));
    CHECK(msg.size() < 500);
}

TEST_CASE("parse_json_bounded refuses a key given twice in one object, at any level", "[core][json]") {
    CHECK_THAT(parse_error(R"({"a": 1, "a": 2})"),
               Contains("byte 11") && Contains("key \"a\" a second time") && Contains("top-level object"));
    CHECK_THAT(parse_error(R"({"t": {"dtype": "F32", "shape": [], "dtype": "F16"}})"),
               Contains("key \"dtype\" a second time") && Contains("\"/t\""));
    CHECK_THAT(parse_error(R"([{"x": 1}, {"y": 1, "y": 1}])"), Contains("key \"y\"") && Contains("\"/1\""));
    // Equal after unescaping is equal.
    CHECK_THAT(parse_error(R"({"a": 1, "\u0061": 2})"), Contains("key \"a\" a second time"));
    // The same key in two objects, or in an object and its parent, is fine.
    CHECK(parse_json_bounded(R"({"a": {"a": 1}, "b": {"a": 2}})", {}, "test").at("b").at("a") == 2);
}

TEST_CASE("parse_json_bounded refuses a NUL byte wherever it is", "[core][json]") {
    const std::string hides = std::string("{}\0{\"t\": 1}", 11);  // nlohmann would read {}
    CHECK_THAT(parse_error(hides), Contains("byte 2") && Contains("NUL") && Contains("\\x00"));
    CHECK_THAT(parse_error(std::string("{\"a\": \"x\0y\"}", 12)), Contains("byte 8") && Contains("NUL"));
    CHECK_THAT(parse_error(std::string("[1]\0", 4)), Contains("NUL"));
    // An escaped NUL is an ordinary character of a string.
    CHECK(parse_json_bounded(R"(["a\u0000b"])", {}, "test")[0].get<std::string>() == std::string("a\0b", 3));
}

TEST_CASE("parse_json_bounded refuses anything but whitespace after the value", "[core][json]") {
    CHECK_THAT(parse_error("{} {}"), Contains("byte 3") && Contains("expected end of input"));
    CHECK_THAT(parse_error("[1] x"), Contains("not valid JSON"));
    CHECK(parse_json_bounded("{}    \n\t  ", {}, "test").empty());
}

TEST_CASE("parse_json_bounded refuses a text longer than max_bytes before parsing it", "[core][json]") {
    CHECK_THAT(parse_error("[1, 2, 3]", {.max_bytes = 8}), Contains("at most 8 bytes") && Contains("found 9"));
    CHECK(parse_json_bounded("[1, 2, 3]", {.max_bytes = 9}, "test").size() == 3);
}

TEST_CASE("parse_json_bounded's messages give the line and column and quote only an excerpt",
          "[core][json]") {
    CHECK_THAT(parse_error("{\n  \"a\": 1,\n  \"b\": x\n}"), Contains("line 3, column 8"));
    // A token as long as the file (an unterminated string, a long bad literal) is not
    // repeated in the message, as nlohmann's own message would.
    for (const std::string& text : {"{\"a\": \"" + std::string(100000, 'x'), "[" + std::string(100000, 'y') + "]",
                                    "[" + std::string(100000, '9') + "]",  // a number that overflows a double
                                   "{\"" + std::string(100000, 'k') + "\": 1, \"" + std::string(100000, 'k') + "\": 2}"}) {
        const std::string msg = parse_error(text);
        CHECK(msg.size() < 500);
    }
    // Bytes that are not printable ASCII show as escapes.
    CHECK_THAT(parse_error("[\"\xff\"]"), Contains("ill-formed UTF-8") && Contains("\\xff"));
}

TEST_CASE("parse_json_bounded reads a header of 80,000 entries", "[core][json]") {
    std::string text = "{";
    for (int i = 0; i < 80000; ++i)
        text += (i ? "," : "") + std::string("\"t") + std::to_string(i) + "\":{\"dtype\":\"F32\",\"shape\":[" +
                std::to_string(i) + "]}";
    text += "}";
    const nlohmann::json j = parse_json_bounded(text, {}, "test");
    REQUIRE(j.size() == 80000);
    CHECK(j.at("t0").at("shape")[0] == 0);
    CHECK(j.at("t79999").at("shape")[0] == 79999);
    CHECK(j == nlohmann::json::parse(text));
}

TEST_CASE("json_value_excerpt cuts any value to a short text, whatever its size and depth", "[core][json]") {
    using lowrank::detail::json_value_excerpt;
    CHECK(json_value_excerpt(nlohmann::json{{"a", 1}}) == R"({"a":1})");
    CHECK(json_value_excerpt(nlohmann::json("x")) == R"("x")");
    nlohmann::json big = nlohmann::json::array();
    for (int i = 0; i < 100000; ++i) big.push_back(i);
    const std::string cut = json_value_excerpt(big);
    CHECK(cut.size() == lowrank::detail::kJsonExcerptChars + 3);
    CHECK(cut.starts_with("[0,1,2,3,"));
    CHECK(cut.ends_with("..."));
    // Deeper than dump() survives: the excerpt stops recursing once it has its 80 characters.
    nlohmann::json deep = nlohmann::json::array();
    for (int i = 0; i < 100000; ++i) deep = nlohmann::json::array({std::move(deep)});
    CHECK(json_value_excerpt(deep).size() == lowrank::detail::kJsonExcerptChars + 3);
    CHECK(json_value_excerpt(nlohmann::json(std::string(100000, 'z'))).size() < 100);
}

TEST_CASE("quote_excerpt escapes what is not printable ASCII and marks a cut", "[core][json]") {
    using lowrank::detail::quote_excerpt;
    CHECK(quote_excerpt("a\"b\\c\n\x01\xc3\xa9") == R"("a\"b\\c\n\x01\xc3\xa9")");
    CHECK(quote_excerpt(std::string(100, 'a'), 4) == "\"aaaa...\"");
    CHECK(lowrank::detail::clip(std::string(100, 'n'), 3) == "nnn... (100 bytes)");
    CHECK(lowrank::detail::clip("short") == "short");
}

}  // namespace test_json_read
