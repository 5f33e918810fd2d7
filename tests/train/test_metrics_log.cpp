#include <lowrank/train/metrics_log.hpp>

#include <catch2/catch.hpp>

#include <array>
#include <atomic>
#include <bit>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <unistd.h>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_metrics_log {

namespace fs = std::filesystem;
using lowrank::JsonLine;

namespace {

fs::path temp_file(const std::string& stem) {
    static std::atomic<int> counter{0};
    return fs::temp_directory_path() /
           ("lowrank-test-" + stem + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + ".jsonl");
}

std::vector<std::string> read_lines(const fs::path& path) {
    std::ifstream f(path);
    std::vector<std::string> lines;
    for (std::string line; std::getline(f, line);) lines.push_back(line);
    return lines;
}

}  // namespace

TEST_CASE("JsonLine writes numbers, booleans, strings, null and arrays", "[train][metrics_log]") {
    const std::vector<double> losses{0.5, 0.25};
    const std::array<int, 3> ranks{8, 16, 32};
    const std::string s = JsonLine()
                              .field("epoch", 3)
                              .field("big", std::numeric_limits<std::int64_t>::max())
                              .field("size", std::size_t{7})
                              .field("lr", 0.001)
                              .field("acc", 0.1f)
                              .field("ok", true)
                              .field("no", false)
                              .field("method", "dense")
                              .field("name", std::string("mlp"))
                              .field("none", nullptr)
                              .field("losses", losses)
                              .field("ranks", ranks)
                              .field("empty", std::vector<float>{})
                              .str();
    CHECK(s ==
          R"({"epoch":3,"big":9223372036854775807,"size":7,"lr":0.001,"acc":0.1,"ok":true,"no":false,)"
          R"("method":"dense","name":"mlp","none":null,"losses":[0.5,0.25],"ranks":[8,16,32],"empty":[]})");
    CHECK(JsonLine().str() == "{}");
}

TEST_CASE("JsonLine writes non-finite numbers as null", "[train][metrics_log]") {
    const double inf = std::numeric_limits<double>::infinity();
    const std::vector<double> mixed{1.0, std::numeric_limits<double>::quiet_NaN(), -inf};
    const std::string s = JsonLine()
                              .field("nan", std::numeric_limits<float>::quiet_NaN())
                              .field("inf", inf)
                              .field("mixed", mixed)
                              .str();
    CHECK(s == R"({"nan":null,"inf":null,"mixed":[1.0,null,null]})");
    // Read back, a non-finite number is null: a reader tells "no value" from a number.
    const auto j = nlohmann::json::parse(s);
    CHECK(j.at("nan").is_null());
    CHECK(j.at("mixed")[0].is_number_float());
    CHECK(j.at("mixed")[2].is_null());
    CHECK(JsonLine().field("v", std::vector<float>{-std::numeric_limits<float>::infinity(), 2.5f}).str() ==
          R"({"v":[null,2.5]})");
}

TEST_CASE("JsonLine numbers read back exactly", "[train][metrics_log]") {
    const double x = 0.1 + 0.2;  // 0.30000000000000004
    const std::string s = JsonLine().field("x", x).field("tiny", 5e-324).field("neg", -1.5e300).str();
    CHECK(s == R"({"x":0.30000000000000004,"tiny":5e-324,"neg":-1.5e+300})");
}

TEST_CASE("JsonLine escapes strings per RFC 8259 and replaces invalid UTF-8", "[train][metrics_log]") {
    const std::string nasty = std::string("a\"b\\c\nd\re\tf\bg\fh") + '\x01' + '\x1f' + "/\x7f";
    CHECK(JsonLine().field("s", nasty).str() == R"({"s":"a\"b\\c\nd\re\tf\bg\fh\u0001\u001f/)"
                                                "\x7f"
                                                R"("})");
    // Field names are escaped too.
    CHECK(JsonLine().field("we\"ird", 1).str() == R"({"we\"ird":1})");
    // Valid multi-byte UTF-8 passes through; broken sequences become U+FFFD.
    CHECK(JsonLine().field("u", "h\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80").str() ==
          "{\"u\":\"h\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80\"}");
    CHECK(JsonLine().field("u", "\xFF").str() == "{\"u\":\"\xEF\xBF\xBD\"}");
    CHECK(JsonLine().field("u", "a\xC3").str() == "{\"u\":\"a\xEF\xBF\xBD\"}");            // cut short
    CHECK(JsonLine().field("u", "\xC0\xAF").str() == "{\"u\":\"\xEF\xBF\xBD\xEF\xBF\xBD\"}");  // overlong
    CHECK(JsonLine().field("u", "\xED\xA0\x80").str() ==                                    // surrogate
          "{\"u\":\"\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\"}");
    std::string with_nul = "x";
    with_nul += '\0';
    with_nul += 'y';
    CHECK(JsonLine().field("z", with_nul).str() == R"({"z":"x\u0000y"})");
}

TEST_CASE("JsonLine escapes each control character, the quote and the backslash, and nothing else",
          "[train][metrics_log]") {
    static constexpr char hex[] = "0123456789abcdef";
    for (int c = 0; c < 0x80; ++c) {
        const std::string in(1, static_cast<char>(c));
        std::string expected;
        switch (c) {
            case '"': expected = "\\\""; break;
            case '\\': expected = "\\\\"; break;
            case '\b': expected = "\\b"; break;
            case '\f': expected = "\\f"; break;
            case '\n': expected = "\\n"; break;
            case '\r': expected = "\\r"; break;
            case '\t': expected = "\\t"; break;
            default:
                expected = c < 0x20 ? std::string("\\u00") + hex[c >> 4] + hex[c & 0xF] : in;
        }
        INFO("byte " << c);
        CHECK(JsonLine().field("s", in).str() == "{\"s\":\"" + expected + "\"}");
        CHECK(nlohmann::json::parse(JsonLine().field("s", in).str()).at("s") == in);
    }
}

TEST_CASE("JsonLine writes Unicode as UTF-8, unescaped, and it reads back the same", "[train][metrics_log]") {
    // U+00E9, U+20AC, U+FFFF (the last BMP code point), U+1F600, U+10FFFF (the last one).
    const std::string text = "\xC3\xA9\xE2\x82\xAC\xEF\xBF\xBF\xF0\x9F\x98\x80\xF4\x8F\xBF\xBF";
    const std::string line = JsonLine().field(text, text).str();
    CHECK(line == "{\"" + text + "\":\"" + text + "\"}");
    const auto j = nlohmann::json::parse(line);
    CHECK(j.at(text) == text);
    // Just past U+10FFFF is not UTF-8: replaced.
    CHECK(JsonLine().field("u", "\xF4\x90\x80\x80").str().find("\xEF\xBF\xBD") != std::string::npos);
}

TEST_CASE("JsonLine round-trips random strings and numbers exactly through a JSON parser",
          "[train][metrics_log]") {
    std::mt19937_64 gen(18);
    std::uniform_int_distribution<int> byte(0, 0x7F), length(0, 40);
    std::uniform_int_distribution<std::uint64_t> word;
    for (int trial = 0; trial < 200; ++trial) {
        std::string s;
        for (int i = length(gen); i > 0; --i) s += static_cast<char>(byte(gen));
        s += "\xC3\xA9";  // and one multi-byte character
        double d;
        do d = std::bit_cast<double>(word(gen));
        while (!std::isfinite(d));
        float f;
        do f = std::bit_cast<float>(static_cast<std::uint32_t>(word(gen)));
        while (!std::isfinite(f));
        const auto i = static_cast<std::int64_t>(word(gen));
        const std::uint64_t u = word(gen);
        const std::string line =
            JsonLine().field("s", s).field("d", d).field("f", f).field("i", i).field("u", u).str();
        INFO(line);
        const auto j = nlohmann::json::parse(line);
        CHECK(j.at("s").get<std::string>() == s);
        CHECK(std::bit_cast<std::uint64_t>(j.at("d").get<double>()) == std::bit_cast<std::uint64_t>(d));
        CHECK(std::bit_cast<std::uint32_t>(static_cast<float>(j.at("f").get<double>())) ==
              std::bit_cast<std::uint32_t>(f));
        CHECK(j.at("i").get<std::int64_t>() == i);
        CHECK(j.at("u").get<std::uint64_t>() == u);
    }
}

TEST_CASE("JsonLine keeps the fields' order, and a name given again replaces its value in place",
          "[train][metrics_log]") {
    JsonLine line;
    line.field("z", 1).field("a", 2).field("m", 3).field("a", "again");
    CHECK(line.str() == R"({"z":1,"a":"again","m":3})");
    CHECK(line.json().size() == 3);
    CHECK_FALSE(line.empty());
    line.clear();
    CHECK(line.empty());
    CHECK(line.str() == "{}");
}

TEST_CASE("JsonLine takes any JSON value: an array of strings, an object", "[train][metrics_log]") {
    const std::vector<std::string> names{"fc1", "we\"ird"};
    const double inf = std::numeric_limits<double>::infinity();
    const std::string s = JsonLine()
                              .field("names", names)
                              .field("shape", nlohmann::ordered_json{{"rows", 4}, {"cols", 2}})
                              .field("inf", nlohmann::ordered_json::array({inf}))
                              .str();
    CHECK(s == R"({"names":["fc1","we\"ird"],"shape":{"rows":4,"cols":2},"inf":[null]})");
}

TEST_CASE("JsonLine output parses back with nlohmann::json", "[train][metrics_log]") {
    std::string all_bytes;
    for (int c = 1; c < 256; ++c) all_bytes += static_cast<char>(c);
    const std::vector<float> values{1.5f, -0.0f, 3e-8f};
    const std::string s = JsonLine()
                              .field("all", all_bytes)
                              .field("quote", "say \"hi\"\n")
                              .field("pi", 3.141592653589793)
                              .field("f", 0.1f)
                              .field("values", values)
                              .field("flag", true)
                              .str();
    const auto j = nlohmann::json::parse(s);  // throws if the line is not valid JSON / UTF-8
    CHECK(j.at("quote") == "say \"hi\"\n");
    CHECK(j.at("pi").get<double>() == 3.141592653589793);
    CHECK(static_cast<float>(j.at("f").get<double>()) == 0.1f);
    CHECK(j.at("values").size() == 3);
    CHECK(static_cast<float>(j.at("values")[2].get<double>()) == 3e-8f);
    CHECK(j.at("flag") == true);
    // Every ASCII byte survives; the invalid high bytes became U+FFFD.
    const std::string back = j.at("all").get<std::string>();
    CHECK(back.substr(0, 127) == all_bytes.substr(0, 127));
}

TEST_CASE("MetricsLog writes one flushed JSON object per line", "[train][metrics_log]") {
    const fs::path path = temp_file("metrics");
    {
        lowrank::MetricsLog log(path);
        log.write(JsonLine().field("epoch", 1).field("loss", 0.5));
        // Flushed already: readable while the log is still open.
        CHECK(read_lines(path) == std::vector<std::string>{R"({"epoch":1,"loss":0.5})"});
        log.write(JsonLine().field("epoch", 2).field("note", "line\nbreak"));
    }
    CHECK(read_lines(path) ==
          std::vector<std::string>{R"({"epoch":1,"loss":0.5})", R"({"epoch":2,"note":"line\nbreak"})"});
    {
        lowrank::MetricsLog again(path, lowrank::MetricsLog::Mode::append);
        again.write(JsonLine().field("epoch", 3));
    }
    CHECK(read_lines(path).size() == 3);
    {
        lowrank::MetricsLog fresh(path);  // truncates
        fresh.write(JsonLine());
    }
    CHECK(read_lines(path) == std::vector<std::string>{"{}"});
    fs::remove(path);
}

TEST_CASE("MetricsLog names the file it cannot open", "[train][metrics_log][errors]") {
    const fs::path bad = fs::temp_directory_path() / "lowrank-no-such-dir-xyz" / "m.jsonl";
    CHECK_THROWS_WITH(lowrank::MetricsLog(bad), Catch::Matchers::Contains(bad.string()));
}

TEST_CASE("MetricsLog::truncate_after_step keeps the lines up to a step and drops a torn one",
          "[train][metrics_log]") {
    const fs::path path = temp_file("truncate");
    {
        std::ofstream out(path);
        out << "{\"step\":2,\"loss\":1.5}\n{\"step\":4,\"loss\":1.2}\n{\"note\":\"no step\"}\n"
               "{\"step\":6,\"loss\":1.1}\n{\"step\":8,\"lo";
    }
    lowrank::MetricsLog::truncate_after_step(path, 4);
    std::ifstream in(path);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(text == "{\"step\":2,\"loss\":1.5}\n{\"step\":4,\"loss\":1.2}\n{\"note\":\"no step\"}\n");
    {
        std::ofstream out(path);
        out << "{\"step\":2}\nnot json\n";
    }
    CHECK_THROWS_WITH(lowrank::MetricsLog::truncate_after_step(path, 4),
                      Catch::Matchers::Contains(path.string()) && Catch::Matchers::Contains("line 2"));
    fs::remove(path);
    CHECK_NOTHROW(lowrank::MetricsLog::truncate_after_step(path, 4));  // a missing log stays missing
    CHECK_FALSE(fs::exists(path));
}

TEST_CASE("MetricsLog::truncate_after_step refuses a line nested 100,000 deep or of 2 MB, naming it, and changes nothing",
          "[train][metrics_log][hostile]") {
    const fs::path path = temp_file("hostile");
    const std::string deep = "{\"step\":2,\"x\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
    const std::string big = "{\"step\":2,\"x\":\"" + std::string(2'000'000, 'q') + "\"}";
    for (const std::string& line : {deep, big}) {
        {
            std::ofstream out(path, std::ios::binary);
            out << "{\"step\":1}\n" << line << "\n{\"step\":3}\n";
        }
        const auto before = fs::file_size(path);
        try {
            lowrank::MetricsLog::truncate_after_step(path, 1);
            FAIL("a hostile line was accepted");
        } catch (const lowrank::FormatError& e) {
            const std::string msg = e.what();
            CHECK_THAT(msg, Catch::Matchers::Contains(path.string()) && Catch::Matchers::Contains("line 2"));
            CHECK(msg.size() < 600);
        }
        CHECK(fs::file_size(path) == before);
    }
    fs::remove(path);
}

}  // namespace test_metrics_log
