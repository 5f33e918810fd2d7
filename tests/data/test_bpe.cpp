#include <lowrank/data/bpe.hpp>

#include <lowrank/core/rng.hpp>

#include "../test_support.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <unistd.h>

#ifndef LOWRANK_DATA_DIR
#error \
    "define LOWRANK_DATA_DIR as the repository's data/ folder, e.g. -DLOWRANK_DATA_DIR='\"/path/to/lowrank/data\"'"
#endif

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_bpe {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using lowrank::Gpt2Tokenizer;
using Ids = std::vector<std::int32_t>;

namespace {

/// GPT-2's real vocabulary, which scripts/setup.sh fetches into data/gpt2 (also with
/// --no-data). Missing files fail the test: skipping would hide an unchecked tokenizer.
const Gpt2Tokenizer& gpt2() {
    static const Gpt2Tokenizer tokenizer = [] {
        const fs::path dir = fs::path(LOWRANK_DATA_DIR) / "gpt2";
        for (const char* name : {"encoder.json", "vocab.bpe"})
            if (!fs::exists(dir / name))
                FAIL("GPT-2's vocabulary is missing: " << (dir / name).string()
                                                       << " does not exist; run scripts/setup.sh (or "
                                                          "scripts/setup.sh --no-data) to fetch it");
        return Gpt2Tokenizer::from_dir(dir);
    }();
    return tokenizer;
}

using lowrank::test::TempDir;

void write_file(const fs::path& path, std::string_view text) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(text.data(), static_cast<std::streamsize>(text.size()));
    REQUIRE(f.good());
}

/// GPT-2's printable stand-in for byte b, UTF-8 encoded (as in encoder.json and vocab.bpe).
std::string stand_in(unsigned char b) {
    const std::uint32_t cp = lowrank::detail::byte_to_code_point()[b];
    std::string s;
    if (cp < 0x80) {
        s.push_back(static_cast<char>(cp));
    } else {
        s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    return s;
}

std::string stand_ins(std::string_view bytes) {
    std::string s;
    for (char c : bytes) s += stand_in(static_cast<unsigned char>(c));
    return s;
}

/// A small vocabulary in GPT-2's file formats: ids 0..255 are the bytes, then `extra`
/// tokens (raw bytes), then "<|endoftext|>"; `merges` are "A B" lines of raw bytes.
struct TinyVocab {
    std::string encoder_json;
    std::string vocab_bpe;
};

TinyVocab tiny_vocab(const std::vector<std::string>& extra,
                     const std::vector<std::pair<std::string, std::string>>& merges) {
    TinyVocab v;
    nlohmann::ordered_json enc = nlohmann::ordered_json::object();
    int id = 0;
    for (int b = 0; b < 256; ++b) enc[stand_in(static_cast<unsigned char>(b))] = id++;
    for (const auto& t : extra) enc[stand_ins(t)] = id++;
    enc["<|endoftext|>"] = id++;
    v.encoder_json = enc.dump();
    v.vocab_bpe = "#version: 0.2\n";
    for (const auto& [a, b] : merges) v.vocab_bpe += stand_ins(a) + " " + stand_ins(b) + "\n";
    return v;
}

Gpt2Tokenizer load(const TempDir& dir, const TinyVocab& v) {
    write_file(dir / "encoder.json", v.encoder_json);
    write_file(dir / "vocab.bpe", v.vocab_bpe);
    return Gpt2Tokenizer::from_dir(dir.path());
}

/// The tokens of `ids` as strings (raw bytes), for readable comparisons.
std::vector<std::string> pieces(const Gpt2Tokenizer& tok, const Ids& ids) {
    std::vector<std::string> out;
    for (std::int32_t id : ids) out.emplace_back(tok.token_bytes(id));
    return out;
}

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

std::string random_bytes(lowrank::Rng& rng, std::size_t n) {
    // A mix that reaches every branch of the scanner: arbitrary bytes, ASCII text and
    // whitespace, apostrophes, and pieces of valid multi-byte UTF-8.
    static const std::vector<std::string> pieces{"a",
                                                 "Z",
                                                 "7",
                                                 " ",
                                                 "  ",
                                                 "\n",
                                                 "\t",
                                                 "'",
                                                 "'s",
                                                 "'ll",
                                                 ",",
                                                 "!",
                                                 "\xc3\xa9",
                                                 "\xe2\x80\x94",
                                                 "\xf0\x9f\x98\x80",
                                                 "\xc2\xa0",
                                                 "\xe3\x80\x80",
                                                 "\xe4\xb8\xad",
                                                 "\xd9\xa1",
                                                 "\xc2\x85"};
    std::string s;
    while (s.size() < n) {
        if (rng.below(3) == 0)
            s.push_back(static_cast<char>(rng.below(256)));
        else
            s += pieces[rng.below(pieces.size())];
    }
    return s;
}

}  // namespace

// Reference ids from the JavaScript implementation of GPT-2's encoder that the npm
// package gpt-3-encoder ships (its encode(), run under node on each string). None of these
// strings contains U+0085 or U+FEFF, where that implementation's "\s" differs from GPT-2's
// (see the pre-tokenization test below).
TEST_CASE("Gpt2Tokenizer::encode matches GPT-2's reference encoder", "[data][bpe]") {
    const Gpt2Tokenizer& tok = gpt2();
    const std::vector<std::pair<std::string, Ids>> cases{
        {"Hello world", {15496, 995}},
        {"I'm", {40, 1101}},
        {"they'll", {9930, 1183}},
        {"don't", {9099, 470}},
        {"we've", {732, 1053}},
        {"you're", {5832, 821}},
        {"I'd", {40, 1549}},
        {"'S", {6, 50}},
        {"'s", {338}},
        {"He'S here", {1544, 6, 50, 994}},
        {"'ll", {1183}},
        {"12345", {10163, 2231}},
        {" 3.14", {513, 13, 1415}},
        {"3.14159265358979", {18, 13, 1415, 19707, 22980, 2327, 4531, 3720}},
        {"1,000,000", {16, 11, 830, 11, 830}},
        {"$100.00!", {3, 3064, 13, 405, 0}},
        {"  leading", {220, 3756}},
        {"multiple   spaces", {48101, 220, 220, 9029}},
        {"tab\there", {8658, 197, 1456}},
        {"\ttab", {197, 8658}},
        {"a\n\nb", {64, 198, 198, 65}},
        {"\n\n", {628}},
        {"end   ", {437, 220, 220, 220}},
        {"trailing \n", {9535, 4386, 220, 198}},
        {"x  \n  y", {87, 220, 220, 198, 220, 331}},
        {"\r\n", {201, 198}},
        {"  \t  x", {220, 220, 197, 220, 2124}},
        {" ", {220}},
        {"", {}},
        {"café", {66, 1878, 2634}},
        {"naïve", {2616, 38776}},
        {"Ünïcödé", {127, 250, 77, 26884, 66, 9101, 67, 2634}},
        {"日本語のテキスト", {33768, 98, 17312, 105, 45739, 252, 5641, 24336, 25084, 43302}},
        {"中文", {40792, 23877, 229}},
        {"مرحبا بالعالم", {25405, 26897, 148, 255, 39848, 12919, 17550, 101, 23525, 44690, 23525, 25405}},
        {"αβγ ΑΒΓ", {17394, 26638, 42063, 7377, 239, 138, 240, 138, 241}},
        {"½ ² ³ Ⅻ", {23141, 1587, 110, 1587, 111, 2343, 227, 104}},
        {"١٢٣ 123", {149, 94, 149, 95, 149, 96, 17031}},
        {"𝐀𝐁𝐂", {47728, 238, 222, 47728, 238, 223, 47728, 238, 224}},
        {"e\u0301", {68, 136, 223}},
        {"don’t", {9099, 447, 247, 83}},
        {"‘quoted’", {447, 246, 421, 5191, 447, 247}},
        {"a\u00a0b", {64, 1849, 65}},
        {"a\u3000b", {64, 5099, 222, 65}},
        {"emoji 😀", {368, 31370, 30325, 222}},
        {"family 👨\u200d👩\u200d👧\u200d👦",
         {17989, 50169, 101, 447, 235, 41840, 102, 447, 235, 41840, 100, 447, 235, 41840, 99}},
        {"flag 🇺🇸", {32109, 12520, 229, 118, 8582, 229, 116}},
        {"<|endoftext|>", {27, 91, 437, 1659, 5239, 91, 29}},
        {"a<|endoftext|>b", {64, 27, 91, 437, 1659, 5239, 91, 29, 65}},
        {"Hello, world! How's it going?", {15496, 11, 995, 0, 1374, 338, 340, 1016, 30}},
        {"\"\",\"\"", {1, 2430, 1}},
        {"],[", {38430}},
        {"...", {986}},
        {"—", {960}},
        {"Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my "
         "purse, and "
         "nothing particular to interest me on shore, I thought I would sail about a little and see the "
         "watery part "
         "of the world.",
         {14134, 502,   1148, 21720, 417,  13,  2773,  812,  2084, 960,  12081, 2000, 703,
          890,   10582, 960,  40965, 1310, 393, 645,   1637, 287,  616,  27517, 11,   290,
          2147,  1948,  284,  1393,  502,  319, 15191, 11,   314,  1807, 314,   561,  14936,
          546,   257,   1310, 290,   766,  262, 1660,  88,   636,  286,  262,   995,  13}},
        // Long words, where many pairs of one rank merge left to right.
        {std::string(100, '='), {23926, 10052, 1421}},
        {std::string(100, 'a'), Ids(25, 24794)},
        {std::string(37, '\n'),
         [] {
             Ids ids(18, 628);
             ids.push_back(198);
             return ids;
         }()},
        {std::string(80, '-') + "\n", {10097, 1783, 198}},
        {[] {
             std::string s;
             for (int i = 0; i < 50; ++i) s += "ab";
             return s;
         }(),
         Ids(50, 397)},
        {"x" + std::string(100, ' ') + "y",
         [] {  // the last space goes with "y"
             Ids ids{87};
             ids.insert(ids.end(), 99, 220);
             ids.push_back(331);
             return ids;
         }()},
    };
    for (const auto& [text, expected] : cases) {
        INFO("text: " << lowrank::detail::quoted(text));
        CHECK(tok.encode(text) == expected);
        CHECK(tok.decode(expected) == text);
    }
    // Again from the cache, which must give the same ids.
    REQUIRE(tok.cache_size() > 0);
    for (const auto& [text, expected] : cases) CHECK(tok.encode(text) == expected);
}

TEST_CASE("Gpt2Tokenizer reads GPT-2's vocabulary: 50257 tokens, 50000 merges, eot 50256", "[data][bpe]") {
    const Gpt2Tokenizer& tok = gpt2();
    CHECK(tok.vocab_size() == 50257);
    CHECK(tok.merge_count() == 50000);
    CHECK(tok.eot() == 50256);
    CHECK(tok.token_bytes(tok.eot()) == "<|endoftext|>");
    CHECK(tok.token_bytes(220) == " ");
    CHECK(tok.token_bytes(198) == "\n");
    CHECK(tok.token_bytes(15496) == "Hello");
    CHECK(tok.token_bytes(995) == " world");
    // Byte 0xFF's token: its stand-in is U+00FF, the first 188 byte ids follow the stand-ins' order.
    CHECK(tok.token_bytes(187) == "\xff");
    CHECK(tok.token_bytes(188) == std::string(1, '\0'));
    CHECK(tok.decode(Ids{tok.eot()}) == "<|endoftext|>");
}

TEST_CASE("Gpt2Tokenizer::encode_documents separates documents with eot, which plain encode never emits",
          "[data][bpe]") {
    const Gpt2Tokenizer& tok = gpt2();
    const std::vector<std::string> docs{"Hello world", "", "I'm"};
    const Ids ids = tok.encode_documents(docs);
    CHECK(ids == Ids{15496, 995, 50256, 50256, 40, 1101});
    const std::vector<std::string_view> views{"a", "b"};
    CHECK(tok.encode_documents(views) == Ids{64, 50256, 65});
    CHECK(tok.decode(ids) == "Hello world<|endoftext|><|endoftext|>I'm");
    const Ids plain = tok.encode("Hello world<|endoftext|>I'm");
    CHECK(std::find(plain.begin(), plain.end(), 50256) == plain.end());
    Ids appended{1, 2};
    tok.encode_append("'s", appended);
    CHECK(appended == Ids{1, 2, 338});
}

// Reference words from Python's `regex` module (the engine GPT-2's encoder uses) with
// GPT-2's pattern; invalid UTF-8 was decoded with Python's "surrogateescape", which makes
// each such byte a lone surrogate, a code point of class "other", as this tokenizer does.
// U+0085 is whitespace and U+FEFF is not (Unicode's White_Space); U+001C is not whitespace.
TEST_CASE("gpt2_words cuts text as GPT-2's pattern does, also around odd whitespace and invalid UTF-8",
          "[data][bpe]") {
    using Words = std::vector<std::string>;
    const std::vector<std::pair<std::string, Words>> cases{
        {"a \u0085b", {"a", " ", "\u0085", "b"}},
        {"x \ufeffy", {"x", " \ufeff", "y"}},
        {"  \u00a0x", {"  ", "\u00a0", "x"}},
        {"it's  'twas — O'Neill's 'RE",
         {"it", "'s", " ", " '", "twas", " —", " O", "'", "Neill", "'s", " '", "RE"}},
        {"3rd 10km ½Ⅰ", {"3", "rd", " 10", "km", " ½Ⅰ"}},
        {"a\xff"
         "b",
         {"a", "\xff", "b"}},
        {" \xff\xfe!x", {" \xff\xfe!", "x"}},
        {"\xe2\x82 x", {"\xe2\x82", " x"}},
        {"caf\xc3", {"caf", "\xc3"}},
        {"\xc0\x80"
         "ab",
         {"\xc0\x80", "ab"}},
        {"  \xed\xa0\x80", {" ", " \xed\xa0\x80"}},
        {"x\xf4\x90\x80\x80y", {"x", "\xf4\x90\x80\x80", "y"}},
        {"\xf0\x9f\x98", {"\xf0\x9f\x98"}},
        {"  \n\t x  ", {"  \n\t", " x", "  "}},
        {"a \x1c b", {"a", " \x1c", " b"}},
    };
    for (const auto& [text, expected] : cases) {
        INFO("text: " << lowrank::detail::quoted(text));
        const auto views = lowrank::gpt2_words(text);
        CHECK(Words(views.begin(), views.end()) == expected);
    }
    CHECK(lowrank::gpt2_words("").empty());
}

TEST_CASE("decode(encode(s)) == s for random byte strings, valid UTF-8 or not", "[data][bpe]") {
    const Gpt2Tokenizer& tok = gpt2();
    lowrank::Rng rng(20240601);
    for (int trial = 0; trial < 300; ++trial) {
        const std::string s = random_bytes(rng, rng.below(200));
        INFO("text: " << lowrank::detail::quoted(s));
        const Ids ids = tok.encode(s);
        for (std::int32_t id : ids) REQUIRE((id >= 0 && id < tok.eot()));
        CHECK(tok.decode(ids) == s);
        // The words tile the text, none empty.
        std::string joined;
        for (std::string_view w : lowrank::gpt2_words(s)) {
            CHECK(!w.empty());
            joined += w;
        }
        CHECK(joined == s);
    }
    // Every single byte, and all 256 bytes in one string.
    std::string all;
    for (int b = 0; b < 256; ++b) {
        const std::string one(1, static_cast<char>(b));
        CHECK(tok.decode(tok.encode(one)) == one);
        all += one;
    }
    CHECK(tok.decode(tok.encode(all)) == all);
}

TEST_CASE("Gpt2Tokenizer encodes a long run of one symbol class in near-linear time", "[data][bpe]") {
    const Gpt2Tokenizer& tok = gpt2();
    // One word each, 200k bytes: the textbook quadratic BPE loop would take minutes here.
    for (const std::string& s :
         {std::string(200000, ' ') + "x", std::string(200000, '='), std::string(200000, '7')}) {
        const auto start = std::chrono::steady_clock::now();
        const Ids ids = tok.encode(s);
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        CHECK(tok.decode(ids) == s);
        CHECK(seconds < 5.0);
    }
    // 64 '=' is one token (GPT-2 id 23926): 200000 = 3125 * 64.
    CHECK(tok.encode(std::string(200000, '=')) == Ids(3125, 23926));
}

TEST_CASE("Gpt2Tokenizer::decode rejects ids outside the vocabulary, naming id and position",
          "[data][bpe][errors]") {
    const Gpt2Tokenizer& tok = gpt2();
    try {
        (void)tok.decode(Ids{15496, 50257});
        FAIL("expected lowrank::Error");
    } catch (const lowrank::Error& e) {
        CHECK_THAT(e.what(), Contains("id 50257") && Contains("position 1") && Contains("[0, 50257)"));
    }
    CHECK_THROWS_WITH(tok.decode(Ids{-1}), Contains("id -1") && Contains("position 0"));
    CHECK_THROWS_WITH(tok.token_bytes(60000), Contains("id 60000"));
}

TEST_CASE("BPE applies merges by rank, every occurrence left to right, on a hand-made vocabulary",
          "[data][bpe]") {
    TempDir dir;
    SECTION("the best-ranked pair goes first, whatever its position") {
        // "b c" (rank 0) beats "a b" (rank 1): "abc" -> a|bc; without "b c", a|b merge.
        const auto tok = load(dir, tiny_vocab({"ab", "bc", "abc"}, {{"b", "c"}, {"a", "b"}, {"ab", "c"}}));
        CHECK(pieces(tok, tok.encode("abc")) == std::vector<std::string>{"a", "bc"});
        CHECK(pieces(tok, tok.encode("abd")) == std::vector<std::string>{"ab", "d"});
        CHECK(tok.vocab_size() == 256 + 3 + 1);
        CHECK(tok.eot() == 259);
        CHECK(tok.merge_count() == 3);
    }
    SECTION("a merged pair can merge again") {
        const auto tok = load(dir, tiny_vocab({"ab", "abc"}, {{"a", "b"}, {"ab", "c"}}));
        CHECK(pieces(tok, tok.encode("abc")) == std::vector<std::string>{"abc"});
        CHECK(pieces(tok, tok.encode("xabcab")) == std::vector<std::string>{"x", "abc", "ab"});
    }
    SECTION("overlapping occurrences merge from the left") {
        const auto tok = load(dir, tiny_vocab({"aa", "aaaa"}, {{"a", "a"}, {"aa", "aa"}}));
        CHECK(pieces(tok, tok.encode("aaa")) == std::vector<std::string>{"aa", "a"});
        CHECK(pieces(tok, tok.encode("aaaa")) == std::vector<std::string>{"aaaa"});
        CHECK(pieces(tok, tok.encode("aaaaa")) == std::vector<std::string>{"aaaa", "a"});
    }
    SECTION("all occurrences of a rank merge before a better pair that they create") {
        // "ab a" has the better rank but does not exist until "a b" merges. GPT-2's loop
        // merges every "a b" first: abab -> ab|ab (no "ab ab" merge), not aba|b.
        const auto tok = load(dir, tiny_vocab({"ab", "aba"}, {{"ab", "a"}, {"a", "b"}}));
        CHECK(pieces(tok, tok.encode("abab")) == std::vector<std::string>{"ab", "ab"});
        CHECK(pieces(tok, tok.encode("aba")) == std::vector<std::string>{"aba"});
    }
    SECTION("merges stay inside a pre-tokenized word") {
        const auto tok = load(dir, tiny_vocab({" a", "a "}, {{"a", " "}, {" ", "a"}}));
        CHECK(pieces(tok, tok.encode("a a")) == std::vector<std::string>{"a", " a"});
    }
}

TEST_CASE("Gpt2Tokenizer rejects malformed vocabulary files, naming the file and the entry or line",
          "[data][bpe][errors]") {
    TempDir dir;
    const TinyVocab good = tiny_vocab({"ab", "abc"}, {{"a", "b"}, {"ab", "c"}});
    const auto try_load = [&](const std::string& encoder_json, const std::string& vocab_bpe) {
        write_file(dir / "encoder.json", encoder_json);
        write_file(dir / "vocab.bpe", vocab_bpe);
        return format_error([&] { (void)Gpt2Tokenizer::from_dir(dir.path()); });
    };
    const auto with_entry = [&](const std::string& key, const nlohmann::ordered_json& value) {
        auto enc = nlohmann::ordered_json::parse(good.encoder_json);
        enc[key] = value;
        return enc.dump();
    };

    SECTION("the good files load") {
        write_file(dir / "encoder.json", good.encoder_json);
        write_file(dir / "vocab.bpe", good.vocab_bpe);
        CHECK(Gpt2Tokenizer::from_dir(dir.path()).vocab_size() == 259);
    }
    SECTION("missing files") {
        std::string msg = format_error([&] { (void)Gpt2Tokenizer::from_dir(dir / "nowhere"); });
        CHECK_THAT(msg, Contains("nowhere") && Contains("encoder.json") && Contains("does not exist") &&
                            Contains("scripts/setup.sh"));
        write_file(dir / "encoder.json", good.encoder_json);
        msg = format_error([&] { (void)Gpt2Tokenizer::from_dir(dir.path()); });
        CHECK_THAT(msg, Contains("vocab.bpe") && Contains("does not exist"));
    }
    SECTION("encoder.json is not JSON") {
        const auto msg = try_load("{\"a\": 1,", good.vocab_bpe);
        CHECK_THAT(msg, Contains("encoder.json") && Contains("not valid JSON"));
    }
    SECTION("encoder.json is not an object") {
        CHECK_THAT(try_load("[1, 2]", good.vocab_bpe),
                   Contains("encoder.json") && Contains("expected a JSON object"));
    }
    SECTION("an id that is not an integer") {
        const auto msg = try_load(with_entry("xyz", "7"), good.vocab_bpe);
        CHECK_THAT(msg,
                   Contains("encoder.json") && Contains("\"xyz\"") && Contains("expected an integer id"));
    }
    SECTION("an id out of range") {
        const auto msg = try_load(with_entry("xyz", 5000), good.vocab_bpe);
        CHECK_THAT(msg, Contains("\"xyz\"") && Contains("id 5000") && Contains("out of range [0, 260)"));
        CHECK_THAT(try_load(with_entry("xyz", -3), good.vocab_bpe),
                   Contains("id -3") && Contains("out of range"));
    }
    SECTION("two entries with one id") {
        const auto msg = try_load(with_entry("xyz", 3), good.vocab_bpe);
        CHECK_THAT(msg, Contains("\"xyz\"") && Contains("both have id 3"));
    }
    SECTION("a key written twice") {
        std::string text = good.encoder_json;
        text.insert(text.size() - 1, ",\"ab\":7");
        CHECK_THAT(try_load(text, good.vocab_bpe), Contains("\"ab\"") && Contains("a second time"));
    }
    SECTION("a key that is not in GPT-2's byte encoding") {
        // A raw space: GPT-2 writes byte 0x20 as U+0120; U+20AC stands for no byte.
        CHECK_THAT(try_load(with_entry("a b", 259), good.vocab_bpe),
                   Contains("\"a b\"") && Contains("id 259") && Contains("byte encoding"));
        CHECK_THAT(try_load(with_entry("\u20ac", 259), good.vocab_bpe), Contains("byte encoding"));
    }
    SECTION("a byte without a token") {
        auto enc = nlohmann::ordered_json::parse(good.encoder_json);
        enc.erase(stand_in('q'));
        enc[stand_ins("qq")] = 113;  // 'q''s id: keep the ids 0..n-1 complete
        const auto msg = try_load(enc.dump(), good.vocab_bpe);
        CHECK_THAT(msg, Contains("no entry for byte 113") && Contains("all 256"));
    }
    SECTION("no <|endoftext|>") {
        auto enc = nlohmann::ordered_json::parse(good.encoder_json);
        enc.erase("<|endoftext|>");
        CHECK_THAT(try_load(enc.dump(), good.vocab_bpe), Contains("no entry for \"<|endoftext|>\""));
    }
    SECTION("a merge line that is not two symbols") {
        CHECK_THAT(
            try_load(good.encoder_json, "#version: 0.2\na b\nab\n"),
            Contains("vocab.bpe") && Contains("line 3") && Contains("two symbols") && Contains("got 1"));
        CHECK_THAT(try_load(good.encoder_json, "#version: 0.2\na b c\n"),
                   Contains("line 2") && Contains("got 3"));
        CHECK_THAT(try_load(good.encoder_json, "#version: 0.2\n\na b\n"),
                   Contains("line 2") && Contains("got 0"));
    }
    SECTION("a merge of a symbol that is not in the vocabulary") {
        CHECK_THAT(try_load(good.encoder_json, "#version: 0.2\na b\nabx c\n"),
                   Contains("line 3") && Contains("\"abx\"") && Contains("not in the vocabulary"));
    }
    SECTION("a merge whose result is not in the vocabulary") {
        CHECK_THAT(try_load(good.encoder_json, "#version: 0.2\na b\nb c\n"),
                   Contains("vocab.bpe") && Contains("line 3") && Contains("\"bc\"") &&
                       Contains("not in the vocabulary"));
    }
    SECTION("a merge given twice") {
        CHECK_THAT(try_load(good.encoder_json, "#version: 0.2\na b\nab c\na b\n"),
                   Contains("line 4") && Contains("repeats line 2"));
    }
    SECTION("a symbol outside GPT-2's byte encoding") {
        CHECK_THAT(try_load(good.encoder_json, "#version: 0.2\na \u20ac\n"),
                   Contains("line 2") && Contains("byte encoding"));
    }
    SECTION("CRLF line ends and a missing final newline are accepted") {
        write_file(dir / "encoder.json", good.encoder_json);
        write_file(dir / "vocab.bpe", "#version: 0.2\r\na b\r\nab c");
        const auto tok = Gpt2Tokenizer::from_dir(dir.path());
        CHECK(tok.merge_count() == 2);
        CHECK(pieces(tok, tok.encode("abc")) == std::vector<std::string>{"abc"});
    }
}

TEST_CASE("Gpt2Tokenizer refuses a hostile encoder.json: deep nesting, NUL, trailing bytes, huge tokens",
          "[data][bpe][errors][hostile]") {
    TempDir dir;
    const TinyVocab good = tiny_vocab({"ab", "abc"}, {{"a", "b"}, {"ab", "c"}});
    const auto try_encoder = [&](const std::string& encoder_json) {
        write_file(dir / "encoder.json", encoder_json);
        write_file(dir / "vocab.bpe", good.vocab_bpe);
        return format_error([&] { (void)Gpt2Tokenizer::from_dir(dir.path()); });
    };
    const std::string entries = good.encoder_json.substr(1, good.encoder_json.size() - 2);  // without { }

    // 200 KB nested 100,000 deep, as the value of one entry (nlohmann's dump() of it, once
    // in the message, overflowed the stack).
    const std::string deep = "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "," + entries + "}";
    REQUIRE(deep.size() > 200000);
    std::string msg = try_encoder(deep);
    CHECK_THAT(msg, Contains("encoder.json") && Contains("at most 128 nested") && Contains("/a/0/0"));
    CHECK(msg.size() < 600);

    msg = try_encoder(std::string("{\0", 2) + entries + "}");
    CHECK_THAT(msg, Contains("encoder.json") && Contains("byte 1") && Contains("NUL"));
    CHECK_THAT(try_encoder(good.encoder_json + "{}"), Contains("encoder.json") && Contains("expected end of input"));

    // Messages quote at most a short excerpt of a long key or value.
    const std::string long_key(100000, 'a');
    msg = try_encoder("{\"" + long_key + "\":\"x\"," + entries + "}");
    CHECK_THAT(msg, Contains("expected an integer id"));
    CHECK(msg.size() < 400);
    std::string ones = "1";
    for (int i = 0; i < 50000; ++i) ones += ",1";
    msg = try_encoder("{\"zz\":[" + ones + "]," + entries + "}");
    CHECK_THAT(msg, Contains("expected an integer id"));
    CHECK(msg.size() < 400);
}

TEST_CASE("Gpt2Tokenizer refuses a vocab.bpe cut at a line end: tokens that no merge makes",
          "[data][bpe][errors][hostile]") {
    TempDir dir;
    SECTION("a hand-made vocabulary without its last merge") {
        const TinyVocab full = tiny_vocab({"ab", "abc"}, {{"a", "b"}, {"ab", "c"}});
        write_file(dir / "encoder.json", full.encoder_json);
        write_file(dir / "vocab.bpe", full.vocab_bpe.substr(0, full.vocab_bpe.rfind('\n', full.vocab_bpe.size() - 2) + 1));
        const std::string msg = format_error([&] { (void)Gpt2Tokenizer::from_dir(dir.path()); });
        CHECK_THAT(msg, Contains("vocab.bpe") && Contains("encoder.json") && Contains("its 1 merges make none of 1") &&
                            Contains("\"abc\", id 257") && Contains("cut short"));
        // A vocabulary with special tokens of its own can opt out.
        const Gpt2Tokenizer tok(dir / "encoder.json", dir / "vocab.bpe", {.require_complete_merges = false});
        CHECK(tok.merge_count() == 1);
    }
    SECTION("GPT-2's vocab.bpe without its last 1000 merges") {
        const fs::path real = fs::path(LOWRANK_DATA_DIR) / "gpt2";
        std::ifstream in(real / "vocab.bpe", std::ios::binary);
        std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        REQUIRE(text.size() > 1000);
        std::size_t cut = text.size() - 1;  // the final newline
        for (int k = 0; k < 1000; ++k) cut = text.rfind('\n', cut - 1);
        fs::copy_file(real / "encoder.json", dir / "encoder.json");
        write_file(dir / "vocab.bpe", text.substr(0, cut + 1));
        const std::string msg = format_error([&] { (void)Gpt2Tokenizer::from_dir(dir.path()); });
        CHECK_THAT(msg, Contains("its 49000 merges make none of 1000 token(s)") && Contains("id 49256"));
    }
}

}  // namespace test_bpe

