#pragma once
// GPT-2's byte-level BPE tokenizer, read from the published encoder.json and vocab.bpe.
//
// Encoding has three stages, each the same as in GPT-2's own encoder:
//   1. pre-tokenization: the text is cut into words by the pattern
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      implemented here as a scanner over UTF-8 code points (std::regex knows no \p{L});
//   2. each word's bytes become one symbol per byte;
//   3. adjacent symbol pairs are merged in the order of vocab.bpe's ranks until no pair of
//      the word has a rank, and the final symbols are looked up in encoder.json.
// The vocabulary files write each byte as a printable code point (GPT-2's byte-to-unicode
// map); this tokenizer converts them back to raw bytes once, at load, and works on bytes
// and ids from then on.
//
// Any byte string encodes and decodes back to itself, including invalid UTF-8: a byte that
// does not start a well-formed UTF-8 sequence is its own code point of class "other".
// See docs/data.md.

#include <lowrank/core/error.hpp>
#include <lowrank/core/json_read.hpp>
#include <lowrank/data/unicode_tables.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <ranges>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lowrank {

namespace detail {

using unicode::CharClass;

/// The class of a code point, by binary search in the generated range table.
inline CharClass code_point_class(std::uint32_t cp) {
    const auto* first = std::begin(unicode::ranges);
    const auto* last = std::end(unicode::ranges);
    const auto* it = std::upper_bound(
        first, last, cp, [](std::uint32_t c, const unicode::CodePointRange& r) { return c < r.first; });
    if (it == first) return CharClass::other;
    --it;
    return cp <= it->last ? it->cls : CharClass::other;
}

/// Classes of U+0000..U+007F, looked up directly: nearly all English text is ASCII.
inline const std::array<CharClass, 128>& ascii_classes() {
    static const std::array<CharClass, 128> table = [] {
        std::array<CharClass, 128> t{};
        for (std::uint32_t c = 0; c < 128; ++c) t[c] = code_point_class(c);
        return t;
    }();
    return table;
}

struct CodePointInfo {
    std::size_t length;  // bytes, 1..4
    CharClass cls;
};

/// The code point that starts at text[i] (i < text.size()). A byte that does not start a
/// well-formed UTF-8 sequence (a stray continuation byte, an overlong form, a surrogate,
/// a value above U+10FFFF, a sequence cut short) is taken alone, as class "other".
inline CodePointInfo code_point_at(std::string_view text, std::size_t i) {
    const auto byte = [&](std::size_t k) { return static_cast<std::uint8_t>(text[k]); };
    const std::uint8_t b0 = byte(i);
    if (b0 < 0x80) return {1, ascii_classes()[b0]};
    const std::size_t left = text.size() - i;
    const auto cont = [&](std::size_t k) { return (byte(i + k) & 0xC0) == 0x80; };
    std::uint32_t cp = 0;
    std::size_t length = 0;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        if (left >= 2 && cont(1)) {
            cp = ((b0 & 0x1Fu) << 6) | (byte(i + 1) & 0x3Fu);
            length = 2;
        }
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        if (left >= 3 && cont(1) && cont(2)) {
            cp = ((b0 & 0x0Fu) << 12) | ((byte(i + 1) & 0x3Fu) << 6) | (byte(i + 2) & 0x3Fu);
            // Reject overlong forms (< U+0800) and UTF-16 surrogates.
            if (cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) length = 3;
        }
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        if (left >= 4 && cont(1) && cont(2) && cont(3)) {
            cp = ((b0 & 0x07u) << 18) | ((byte(i + 1) & 0x3Fu) << 12) | ((byte(i + 2) & 0x3Fu) << 6) |
                 (byte(i + 3) & 0x3Fu);
            if (cp >= 0x10000 && cp <= 0x10FFFF) length = 4;
        }
    }
    if (length == 0) return {1, CharClass::other};
    return {length, code_point_class(cp)};
}

/// GPT-2's byte-to-unicode map: the printable bytes ('!'..'~', U+00A1..U+00AC,
/// U+00AE..U+00FF) stand for themselves, the other 68 bytes are U+0100, U+0101, ... in
/// byte order. It exists so that vocab files hold no whitespace or control characters.
inline const std::array<std::uint32_t, 256>& byte_to_code_point() {
    static const std::array<std::uint32_t, 256> table = [] {
        std::array<std::uint32_t, 256> t{};
        std::uint32_t next = 256;
        for (std::uint32_t b = 0; b < 256; ++b) {
            const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
            t[b] = printable ? b : next++;
        }
        return t;
    }();
    return table;
}

/// Inverse of byte_to_code_point over U+0000..U+0143 (the largest code point it uses);
/// -1 for code points that stand for no byte.
inline const std::array<std::int16_t, 0x144>& code_point_to_byte() {
    static const std::array<std::int16_t, 0x144> table = [] {
        std::array<std::int16_t, 0x144> t{};
        t.fill(-1);
        const auto& fwd = byte_to_code_point();
        for (std::size_t b = 0; b < 256; ++b) t[fwd[b]] = static_cast<std::int16_t>(b);
        return t;
    }();
    return table;
}

/// A string printed for a message: JSON-quoted, so control characters and invalid UTF-8
/// show as escapes, and cut to kJsonExcerptChars bytes ("..." before the closing quote).
inline std::string quoted(std::string_view s) {
    std::string out = nlohmann::json(std::string(s.substr(0, kJsonExcerptChars)))
                          .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (s.size() > kJsonExcerptChars) out.insert(out.size() - 1, "...");
    return out;
}

/// A code point below U+0800 (every stand-in is) as UTF-8.
inline std::string code_point_to_utf8(std::uint32_t cp) {
    if (cp < 0x80) return std::string(1, static_cast<char>(cp));
    return {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
}

/// Decodes a vocabulary symbol (GPT-2's printable stand-ins for bytes, UTF-8 encoded) to
/// raw bytes. Returns false if it holds a code point that stands for no byte, or is not
/// valid UTF-8.
inline bool symbol_to_bytes(std::string_view symbol, std::string& out) {
    out.clear();
    const auto& inverse = code_point_to_byte();
    std::size_t i = 0;
    while (i < symbol.size()) {
        const auto b0 = static_cast<std::uint8_t>(symbol[i]);
        std::uint32_t cp = 0;
        if (b0 < 0x80) {
            cp = b0;
            i += 1;
        } else if ((b0 & 0xE0) == 0xC0 && i + 1 < symbol.size() &&
                   (static_cast<std::uint8_t>(symbol[i + 1]) & 0xC0) == 0x80) {
            cp = ((b0 & 0x1Fu) << 6) | (static_cast<std::uint8_t>(symbol[i + 1]) & 0x3Fu);
            if (cp < 0x80) return false;  // overlong
            i += 2;
        } else {
            return false;  // every stand-in is below U+0800: one or two UTF-8 bytes
        }
        if (cp >= inverse.size() || inverse[cp] < 0) return false;
        out.push_back(static_cast<char>(inverse[cp]));
    }
    return !out.empty();
}

struct StringHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

}  // namespace detail

/// Calls fn(std::string_view word) for each word of GPT-2's pre-tokenization of `text`,
/// in order; the words concatenate to `text`. Whitespace is Unicode's White_Space, letters
/// and numbers the general categories L and N (include/lowrank/data/unicode_tables.hpp).
template <class F>
void for_each_gpt2_word(std::string_view text, F&& fn) {
    using detail::CharClass;
    const std::size_t n = text.size();
    std::size_t i = 0;
    while (i < n) {
        const std::size_t start = i;
        const char c = text[i];
        // 's 't 're 've 'm 'll 'd: ASCII apostrophe, lower case only, as in GPT-2.
        if (c == '\'' && i + 1 < n) {
            const char d = text[i + 1];
            std::size_t length = 0;
            if (d == 's' || d == 't' || d == 'm' || d == 'd') {
                length = 2;
            } else if (i + 2 < n) {
                const char e = text[i + 2];
                if ((d == 'r' && e == 'e') || (d == 'v' && e == 'e') || (d == 'l' && e == 'l')) length = 3;
            }
            if (length != 0) {
                fn(text.substr(i, length));
                i += length;
                continue;
            }
        }
        // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": one optional leading space (U+0020
        // only), then a run of one class. A space followed by whitespace (or by nothing)
        // is left to the whitespace rules.
        CharClass cls = detail::code_point_at(text, i).cls;
        std::size_t run = i;
        if (c == ' ' && i + 1 < n) {
            const CharClass after = detail::code_point_at(text, i + 1).cls;
            if (after != CharClass::space) {
                cls = after;
                run = i + 1;
            }
        }
        if (cls != CharClass::space) {
            while (run < n) {
                const auto cp = detail::code_point_at(text, run);
                if (cp.cls != cls) break;
                run += cp.length;
            }
            fn(text.substr(start, run - start));
            i = run;
            continue;
        }
        // "\s+(?!\S)|\s+": a whitespace run that reaches the end of the text is one word;
        // one followed by something else gives up its last code point (which then
        // prefixes the next word, or stands alone if it is not a space) unless the run is
        // that one code point.
        std::size_t end = i;
        std::size_t last = i;
        std::size_t count = 0;
        while (end < n) {
            const auto cp = detail::code_point_at(text, end);
            if (cp.cls != CharClass::space) break;
            last = end;
            end += cp.length;
            ++count;
        }
        if (end < n && count > 1) end = last;
        fn(text.substr(start, end - start));
        i = end;
    }
}

/// The words of GPT-2's pre-tokenization of `text` (views into it).
inline std::vector<std::string_view> gpt2_words(std::string_view text) {
    std::vector<std::string_view> words;
    for_each_gpt2_word(text, [&](std::string_view w) { words.push_back(w); });
    return words;
}

struct Gpt2TokenizerOptions {
    /// Words remembered with their ids; the cache is emptied when it holds this many.
    /// Natural text repeats its words, so the cache does most of the work: Moby Dick is
    /// 276,826 words of which 23,347 distinct, the whole text corpus 2.28 M and 45,034.
    std::size_t cache_words = std::size_t{1} << 18;
    /// Longer words are not cached (a long run of symbols is rarely seen twice).
    std::size_t cache_max_word_bytes = 64;
    /// Refuse a vocabulary in which a token of more than one byte (other than
    /// "<|endoftext|>") is the result of no merge: encode() could never produce it, and in
    /// GPT-2's files every such token is made by exactly one merge, so a token left over
    /// means a vocab.bpe cut short (at a line end, where nothing else shows it) or files of
    /// two vocabularies. Turn off for a vocabulary with special tokens of its own.
    bool require_complete_merges = true;
};

/// GPT-2's byte-level BPE tokenizer. encode() keeps a cache of word -> ids, so one
/// tokenizer must not encode on two threads at once (copy it per thread).
class Gpt2Tokenizer {
public:
    /// The text "<|endoftext|>": GPT-2's document separator, id 50256 in its vocabulary.
    static constexpr std::string_view eot_text = "<|endoftext|>";

    /// Reads `encoder_json` (an object: token -> id, ids 0..N-1) and `vocab_bpe` (a
    /// "#version" line, then one merge "A B" per line, best first). Throws FormatError
    /// naming the file and the entry or line for a missing or malformed file.
    Gpt2Tokenizer(const std::filesystem::path& encoder_json, const std::filesystem::path& vocab_bpe,
                  Gpt2TokenizerOptions options = {})
        : options_(options) {
        load_encoder(encoder_json);
        load_merges(vocab_bpe);
        if (options_.require_complete_merges) check_merges_complete(encoder_json, vocab_bpe);
    }

    /// Reads dir/encoder.json and dir/vocab.bpe.
    static Gpt2Tokenizer from_dir(const std::filesystem::path& dir, Gpt2TokenizerOptions options = {}) {
        return Gpt2Tokenizer(dir / "encoder.json", dir / "vocab.bpe", options);
    }

    /// The ids of `text`. "<|endoftext|>" in the text is ordinary text here (as in
    /// GPT-2's encoder); use encode_documents() or append eot() to separate documents.
    std::vector<std::int32_t> encode(std::string_view text) const {
        std::vector<std::int32_t> ids;
        ids.reserve(text.size() / 3 + 1);
        encode_append(text, ids);
        return ids;
    }

    /// Appends the ids of `text` to `ids`.
    void encode_append(std::string_view text, std::vector<std::int32_t>& ids) const {
        for_each_gpt2_word(text, [&](std::string_view word) { encode_word(word, ids); });
    }

    /// The documents' ids joined by eot(): doc0 eot doc1 eot ... doc(n-1).
    template <std::ranges::input_range R>
    requires std::convertible_to<std::ranges::range_reference_t<R>, std::string_view>
        std::vector<std::int32_t> encode_documents(const R& documents)
    const {
        std::vector<std::int32_t> ids;
        bool first = true;
        for (const auto& doc : documents) {
            if (!first) ids.push_back(eot_);
            first = false;
            encode_append(std::string_view(doc), ids);
        }
        return ids;
    }

    /// The bytes of the ids' tokens, concatenated. Throws Error for an id outside
    /// [0, vocab_size()), naming it and its position.
    std::string decode(std::span<const std::int32_t> ids) const {
        std::string text;
        text.reserve(ids.size() * 4);
        for (std::size_t k = 0; k < ids.size(); ++k) {
            const std::int32_t id = ids[k];
            if (id < 0 || id >= vocab_size())
                throw Error(detail::concat("Gpt2Tokenizer::decode: id ", id, " at position ", k,
                                           " is outside the vocabulary [0, ", vocab_size(), ")"));
            text.append(token_view(tokens_[static_cast<std::size_t>(id)]));
        }
        return text;
    }

    /// The raw bytes of one token. Throws Error for an id outside [0, vocab_size()).
    std::string_view token_bytes(std::int32_t id) const {
        if (id < 0 || id >= vocab_size())
            throw Error(detail::concat("Gpt2Tokenizer::token_bytes: id ", id,
                                       " is outside the vocabulary [0, ", vocab_size(), ")"));
        return token_view(tokens_[static_cast<std::size_t>(id)]);
    }

    /// Number of tokens (50257 for GPT-2).
    std::int32_t vocab_size() const { return static_cast<std::int32_t>(tokens_.size()); }
    /// The id of "<|endoftext|>" (50256 for GPT-2).
    std::int32_t eot() const { return eot_; }
    /// Number of merges read from vocab.bpe (50000 for GPT-2).
    std::size_t merge_count() const { return merges_.size(); }

    /// Words currently cached; clear_cache() forgets them (results do not change).
    std::size_t cache_size() const { return cache_.size(); }
    void clear_cache() const {
        cache_.clear();
        cache_ids_.clear();
    }

private:
    struct TokenRef {
        std::uint32_t offset = 0;  // into bytes_
        std::uint32_t length = 0;
    };
    struct Merge {
        std::int32_t rank;
        std::int32_t result;
    };
    struct CacheEntry {
        std::uint32_t offset;  // into cache_ids_
        std::uint32_t length;
    };
    struct Candidate {
        std::int32_t rank;
        std::int32_t pos;  // index of the pair's left symbol
        std::int32_t left;
        std::int32_t right;
        // std::push_heap keeps the largest on top: "larger" is the worse (later) pair.
        bool operator<(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };

    static std::uint64_t pair_key(std::int32_t left, std::int32_t right) {
        return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(left)) << 32) |
               static_cast<std::uint32_t>(right);
    }

    std::string_view token_view(const TokenRef& t) const {
        return std::string_view(bytes_).substr(t.offset, t.length);
    }

    /// Largest vocabulary file read (GPT-2's encoder.json is 1 MB, its vocab.bpe 0.5 MB).
    static constexpr std::uintmax_t max_file_bytes = 100'000'000;

    static std::string read_file(const std::filesystem::path& path, std::string_view what) {
        std::error_code ec;
        if (!std::filesystem::exists(path, ec))
            throw FormatError(
                detail::concat("Gpt2Tokenizer: ", what, " '", path.string(),
                               "' does not exist (scripts/setup.sh fetches GPT-2's vocabulary into "
                               "data/gpt2/)"));
        if (std::filesystem::is_directory(path, ec))
            throw FormatError(
                detail::concat("Gpt2Tokenizer: ", what, " '", path.string(), "' is a directory"));
        if (const auto size = std::filesystem::file_size(path, ec); !ec && size > max_file_bytes)
            throw FormatError(detail::concat("Gpt2Tokenizer: ", what, " '", path.string(), "' is ", size,
                                             " bytes: expected at most ", max_file_bytes));
        std::ifstream in(path, std::ios::binary);
        if (!in)
            throw FormatError(detail::concat("Gpt2Tokenizer: cannot open ", what, " '", path.string(), "'"));
        std::ostringstream buffer;
        buffer << in.rdbuf();
        if (in.bad())
            throw FormatError(detail::concat("Gpt2Tokenizer: cannot read ", what, " '", path.string(), "'"));
        return std::move(buffer).str();
    }

    void load_encoder(const std::filesystem::path& path) {
        const std::string where = detail::concat("Gpt2Tokenizer: '", path.string(), "'");
        const std::string text = read_file(path, "encoder.json");
        // A key given twice (which nlohmann would resolve silently) means a damaged file.
        const nlohmann::json json =
            detail::parse_json_bounded(text, detail::JsonLimits{.max_bytes = max_file_bytes}, where);
        if (!json.is_object())
            throw FormatError(
                detail::concat(where, ": expected a JSON object (token -> id), got a ", json.type_name()));
        const std::size_t n = json.size();
        if (n < 256)
            throw FormatError(
                detail::concat(where, ": expected at least 256 entries (one per byte), got ", n));
        if (n > static_cast<std::size_t>(INT32_MAX))
            throw FormatError(detail::concat(where, ": absurd number of entries: ", n));

        tokens_.assign(n, TokenRef{});
        std::vector<bool> seen(n, false);
        std::vector<std::string> key_of_id(n);
        bytes_.clear();
        token_ids_.clear();
        token_ids_.reserve(n);
        std::string raw;
        for (const auto& [key, value] : json.items()) {
            if (!value.is_number_integer())
                throw FormatError(detail::concat(where, ": entry ", detail::quoted(key),
                                                 ": expected an integer id, got ",
                                                 detail::json_value_excerpt(value)));
            const auto id = value.get<std::int64_t>();
            if (id < 0 || id >= static_cast<std::int64_t>(n))
                throw FormatError(detail::concat(where, ": entry ", detail::quoted(key), ": id ", id,
                                                 " is out of range [0, ", n, ") (the ids of ", n,
                                                 " entries must be 0..", n - 1, ")"));
            const auto uid = static_cast<std::size_t>(id);
            if (seen[uid])
                throw FormatError(detail::concat(where, ": entries ", detail::quoted(key_of_id[uid]), " and ",
                                                 detail::quoted(key), " both have id ", id));
            if (!detail::symbol_to_bytes(key, raw))
                throw FormatError(
                    detail::concat(where, ": entry ", detail::quoted(key), " (id ", id,
                                   ") is not a token in GPT-2's byte encoding (each character must "
                                   "stand for one byte)"));
            seen[uid] = true;
            key_of_id[uid] = key;
            tokens_[uid] =
                TokenRef{static_cast<std::uint32_t>(bytes_.size()), static_cast<std::uint32_t>(raw.size())};
            bytes_ += raw;
            token_ids_.emplace(raw, static_cast<std::int32_t>(id));
        }
        // n distinct ids in [0, n): every id is taken.

        for (std::size_t b = 0; b < 256; ++b) {
            const char byte = static_cast<char>(b);
            const auto it = token_ids_.find(std::string_view(&byte, 1));
            if (it == token_ids_.end())
                throw FormatError(detail::concat(where, ": no entry for byte ", b, " (",
                                                 detail::quoted(std::string(1, byte)),
                                                 "); a byte-level vocabulary needs all 256"));
            byte_ids_[b] = it->second;
        }
        const auto eot_it = token_ids_.find(eot_text);
        if (eot_it == token_ids_.end())
            throw FormatError(detail::concat(where, ": no entry for \"", eot_text, "\""));
        eot_ = eot_it->second;
    }

    void load_merges(const std::filesystem::path& path) {
        const std::string where = detail::concat("Gpt2Tokenizer: '", path.string(), "'");
        const std::string text = read_file(path, "vocab.bpe");
        merges_.clear();
        merges_.reserve(65536);
        std::unordered_map<std::uint64_t, std::size_t> line_of;
        std::string left_bytes;
        std::string right_bytes;
        std::size_t pos = 0;
        std::size_t line_no = 0;
        std::int32_t rank = 0;
        while (pos < text.size()) {
            std::size_t eol = text.find('\n', pos);
            if (eol == std::string::npos) eol = text.size();
            std::string_view line(text.data() + pos, eol - pos);
            pos = eol + 1;
            ++line_no;
            if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
            if (line_no == 1 && line.starts_with("#")) continue;  // "#version: 0.2"
            // Split on spaces and tabs: none of GPT-2's byte stand-ins is whitespace.
            std::vector<std::string_view> fields;
            std::size_t k = 0;
            while (k < line.size()) {
                while (k < line.size() && (line[k] == ' ' || line[k] == '\t')) ++k;
                const std::size_t begin = k;
                while (k < line.size() && line[k] != ' ' && line[k] != '\t') ++k;
                if (k > begin) fields.push_back(line.substr(begin, k - begin));
            }
            if (fields.size() != 2)
                throw FormatError(detail::concat(
                    where, " line ", line_no, ": expected a merge of two symbols separated by a space, got ",
                    fields.size(), " field(s): ", detail::quoted(line)));
            const auto symbol_id = [&](std::string_view symbol, std::string& bytes) {
                if (!detail::symbol_to_bytes(symbol, bytes))
                    throw FormatError(detail::concat(where, " line ", line_no, ": symbol ",
                                                     detail::quoted(symbol),
                                                     " is not in GPT-2's byte encoding"));
                const auto it = token_ids_.find(std::string_view(bytes));
                if (it == token_ids_.end())
                    throw FormatError(detail::concat(where, " line ", line_no, ": symbol ",
                                                     detail::quoted(symbol),
                                                     " is not in the vocabulary (encoder.json)"));
                return it->second;
            };
            const std::int32_t left = symbol_id(fields[0], left_bytes);
            const std::int32_t right = symbol_id(fields[1], right_bytes);
            const auto result = token_ids_.find(std::string_view(left_bytes + right_bytes));
            if (result == token_ids_.end())
                throw FormatError(
                    detail::concat(where, " line ", line_no, ": the merge of ", detail::quoted(fields[0]),
                                   " and ", detail::quoted(fields[1]), " gives ",
                                   detail::quoted(std::string(fields[0]) + std::string(fields[1])),
                                   ", which is not in the vocabulary (encoder.json)"));
            const std::uint64_t key = pair_key(left, right);
            const auto [it, inserted] = line_of.emplace(key, line_no);
            if (!inserted)
                throw FormatError(detail::concat(where, " line ", line_no, ": the merge ",
                                                 detail::quoted(line), " repeats line ", it->second));
            merges_.emplace(key, Merge{rank, result->second});
            ++rank;
        }
        if (merges_.empty()) throw FormatError(detail::concat(where, ": holds no merges"));
    }

    /// See Gpt2TokenizerOptions::require_complete_merges.
    void check_merges_complete(const std::filesystem::path& encoder_json, const std::filesystem::path& vocab_bpe) const {
        std::vector<bool> made(tokens_.size(), false);
        for (const auto& [pair, merge] : merges_) made[static_cast<std::size_t>(merge.result)] = true;
        std::size_t unmade = 0;
        std::int32_t first = -1;
        for (std::size_t id = 0; id < tokens_.size(); ++id) {
            if (made[id] || tokens_[id].length <= 1 || static_cast<std::int32_t>(id) == eot_) continue;
            if (unmade++ == 0) first = static_cast<std::int32_t>(id);
        }
        if (unmade == 0) return;
        std::string symbol;
        for (char c : token_view(tokens_[static_cast<std::size_t>(first)]))
            symbol += detail::code_point_to_utf8(detail::byte_to_code_point()[static_cast<std::uint8_t>(c)]);
        throw FormatError(detail::concat(
            "Gpt2Tokenizer: '", vocab_bpe.string(), "': its ", merges_.size(), " merges make none of ", unmade,
            " token(s) of '", encoder_json.string(), "' (the first is ", detail::quoted(symbol), ", id ", first,
            "): a vocab.bpe cut short, or files of two different vocabularies (GPT-2's 50000 merges make every "
            "token but the 256 bytes and \"<|endoftext|>\"; Gpt2TokenizerOptions::require_complete_merges = "
            "false accepts special tokens of another vocabulary)"));
    }

    /// Appends the ids of one pre-tokenized word.
    void encode_word(std::string_view word, std::vector<std::int32_t>& out) const {
        if (word.size() == 1) {
            out.push_back(byte_ids_[static_cast<std::uint8_t>(word[0])]);
            return;
        }
        const bool cacheable = word.size() <= options_.cache_max_word_bytes;
        if (cacheable) {
            const auto it = cache_.find(word);
            if (it != cache_.end()) {
                const auto first = cache_ids_.begin() + it->second.offset;
                out.insert(out.end(), first, first + it->second.length);
                return;
            }
        }
        // Symbol positions are int32 (half the memory of size_t in the hot loop).
        if (word.size() > static_cast<std::size_t>(INT32_MAX))
            throw Error(detail::concat(
                "Gpt2Tokenizer::encode: a word of ", word.size(),
                " bytes (one run of letters, digits, punctuation or whitespace) exceeds the limit of ",
                INT32_MAX, " bytes"));
        const std::size_t before = out.size();
        merge_word(word, out);
        if (cacheable) {
            if (cache_.size() >= options_.cache_words) clear_cache();
            cache_.emplace(std::string(word), CacheEntry{static_cast<std::uint32_t>(cache_ids_.size()),
                                                         static_cast<std::uint32_t>(out.size() - before)});
            cache_ids_.insert(cache_ids_.end(), out.begin() + static_cast<std::ptrdiff_t>(before), out.end());
        }
    }

    /// BPE on one word: repeatedly merge every occurrence (left to right, without overlap)
    /// of the adjacent pair with the best rank, as GPT-2's encoder does. A heap of
    /// candidate pairs over a linked list of symbols makes this O(n log n) instead of
    /// O(n^2): a long run of whitespace or punctuation is one word. Pairs created while
    /// merging rank r wait until every pair of rank r is done, so that the order of merges
    /// is exactly the reference's.
    void merge_word(std::string_view word, std::vector<std::int32_t>& out) const {
        const auto n = static_cast<std::int32_t>(word.size());
        auto& sym = scratch_symbols_;
        auto& next = scratch_next_;
        auto& prev = scratch_prev_;
        auto& heap = scratch_heap_;
        auto& pending = scratch_pending_;
        sym.resize(static_cast<std::size_t>(n));
        next.resize(static_cast<std::size_t>(n));
        prev.resize(static_cast<std::size_t>(n));
        heap.clear();
        pending.clear();
        for (std::int32_t k = 0; k < n; ++k) {
            sym[static_cast<std::size_t>(k)] =
                byte_ids_[static_cast<std::uint8_t>(word[static_cast<std::size_t>(k)])];
            next[static_cast<std::size_t>(k)] = k + 1 < n ? k + 1 : -1;
            prev[static_cast<std::size_t>(k)] = k - 1;
        }
        const auto candidate = [&](std::int32_t pos, std::vector<Candidate>& into) {
            const std::int32_t right_pos = next[static_cast<std::size_t>(pos)];
            if (right_pos < 0) return;
            const std::int32_t left = sym[static_cast<std::size_t>(pos)];
            const std::int32_t right = sym[static_cast<std::size_t>(right_pos)];
            const auto it = merges_.find(pair_key(left, right));
            if (it != merges_.end()) into.push_back(Candidate{it->second.rank, pos, left, right});
        };
        for (std::int32_t k = 0; k + 1 < n; ++k) candidate(k, heap);
        std::make_heap(heap.begin(), heap.end());
        while (!heap.empty()) {
            const std::int32_t rank = heap.front().rank;
            while (!heap.empty() && heap.front().rank == rank) {
                std::pop_heap(heap.begin(), heap.end());
                const Candidate c = heap.back();
                heap.pop_back();
                // Stale if either symbol has been merged since (a merged symbol is longer,
                // so it never equals the recorded one again).
                const auto p = static_cast<std::size_t>(c.pos);
                if (sym[p] != c.left) continue;
                const std::int32_t q = next[p];
                if (q < 0 || sym[static_cast<std::size_t>(q)] != c.right) continue;
                const auto uq = static_cast<std::size_t>(q);
                sym[p] = merges_.find(pair_key(c.left, c.right))->second.result;
                sym[uq] = -1;
                next[p] = next[uq];
                if (next[uq] >= 0) prev[static_cast<std::size_t>(next[uq])] = c.pos;
                if (prev[p] >= 0) candidate(prev[p], pending);
                candidate(c.pos, pending);
            }
            for (const Candidate& c : pending) {
                heap.push_back(c);
                std::push_heap(heap.begin(), heap.end());
            }
            pending.clear();
        }
        for (std::int32_t k = 0; k >= 0; k = next[static_cast<std::size_t>(k)])
            out.push_back(sym[static_cast<std::size_t>(k)]);
    }

    Gpt2TokenizerOptions options_;
    std::string bytes_;             // every token's bytes, back to back
    std::vector<TokenRef> tokens_;  // id -> its bytes
    std::unordered_map<std::string, std::int32_t, detail::StringHash, std::equal_to<>> token_ids_;
    std::array<std::int32_t, 256> byte_ids_{};
    std::unordered_map<std::uint64_t, Merge> merges_;  // (left id, right id) -> rank, result
    std::int32_t eot_ = -1;

    // Encoding state: a cache of word -> ids and reused buffers.
    mutable std::unordered_map<std::string, CacheEntry, detail::StringHash, std::equal_to<>> cache_;
    mutable std::vector<std::int32_t> cache_ids_;
    mutable std::vector<std::int32_t> scratch_symbols_;
    mutable std::vector<std::int32_t> scratch_next_;
    mutable std::vector<std::int32_t> scratch_prev_;
    mutable std::vector<Candidate> scratch_heap_;
    mutable std::vector<Candidate> scratch_pending_;
};

}  // namespace lowrank
