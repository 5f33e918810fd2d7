// lowrank-tokenize: encodes text files with GPT-2's BPE (or as bytes) and writes
// train/validation token files (flat little-endian uint16, see <lowrank/data/tokens.hpp>).
//
//   lowrank-tokenize --vocab data/gpt2 --out data/text/corpus [--val-fraction 0.1] FILE...
//   lowrank-tokenize --bytes --out data/text/corpus-bytes FILE...
//
// Each FILE is one document. The last val-fraction of every document's tokens goes to
// validation and the rest to training, so both splits see every document; within a
// split the documents' parts are joined by <|endoftext|>. Writes PREFIX.train.bin and
// PREFIX.val.bin, and prints one JSON line: files, bytes, train_tokens, val_tokens,
// seconds (encoding only), tokens_per_second, and the perplexity of the validation tokens
// under the training tokens' unigram distribution with add-one smoothing: the score of a
// model that knows only token frequencies, which a language model has to beat.
//
// With --bytes every byte of a file is its own token (ids 0-255, the vocabulary of
// `lowrank-gpt2 --tokenizer bytes`), no vocabulary is read, and the documents' parts are
// joined as they are (each file ends with its own newline); the JSON line then also gives
// the unigram baseline in bits per byte.
//
//   lowrank-tokenize --vocab data/gpt2 --print-ids FILE...
//
// prints each file's ids (no <|endoftext|>) as one line of decimal numbers instead, for
// comparison with another implementation (scripts/check_tokenizer.sh); the JSON line then
// goes to stderr.
//
// Exit codes: 0 success, 1 runtime error (missing or malformed vocabulary or input),
// 2 bad command line.

#include <lowrank/data/bpe.hpp>
#include <lowrank/data/tokens.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Config {
    std::string vocab = "data/gpt2";
    std::string out;
    double val_fraction = 0.1;
    bool print_ids = false;
    bool bytes = false;  // one token per byte instead of GPT-2's BPE
    std::vector<std::string> files;
};

std::string read_text(const std::string& path) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec))
        throw lowrank::FormatError("input '" + path + "' does not exist or is not a regular file");
    std::ifstream in(path, std::ios::binary);
    std::ostringstream buffer;
    buffer << in.rdbuf();
    if (!in || in.bad()) throw lowrank::FormatError("cannot read input '" + path + "'");
    return std::move(buffer).str();
}

/// Appends `part` to `stream`, after an <|endoftext|> if the stream is not empty (and
/// `eot` is one: byte streams have none).
void join(std::vector<std::int32_t>& stream, const std::int32_t* first, const std::int32_t* last,
          std::int32_t eot) {
    if (first == last) return;
    if (!stream.empty() && eot >= 0) stream.push_back(eot);
    stream.insert(stream.end(), first, last);
}

/// exp(cross-entropy of `val` under train's add-one-smoothed unigram distribution).
double unigram_perplexity(const std::vector<std::int32_t>& train, const std::vector<std::int32_t>& val,
                          std::int32_t vocab_size) {
    std::vector<double> counts(static_cast<std::size_t>(vocab_size), 1.0);  // add-one
    for (std::int32_t id : train) counts[static_cast<std::size_t>(id)] += 1.0;
    const double total = static_cast<double>(train.size()) + static_cast<double>(vocab_size);
    double nll = 0.0;
    for (std::int32_t id : val) nll -= std::log(counts[static_cast<std::size_t>(id)] / total);
    return std::exp(nll / static_cast<double>(val.size()));
}

void print_ids(const std::vector<std::int32_t>& ids) {
    std::string line;
    line.reserve(ids.size() * 6 + 1);
    char buffer[16];
    for (std::size_t k = 0; k < ids.size(); ++k) {
        if (k != 0) line.push_back(' ');
        const int n = std::snprintf(buffer, sizeof buffer, "%d", static_cast<int>(ids[k]));
        line.append(buffer, static_cast<std::size_t>(n));
    }
    line.push_back('\n');
    std::fwrite(line.data(), 1, line.size(), stdout);
}

int run(const Config& cfg) {
    using clock = std::chrono::steady_clock;
    const auto wall_start = clock::now();
    std::optional<lowrank::Gpt2Tokenizer> tokenizer;
    if (!cfg.bytes) tokenizer.emplace(lowrank::Gpt2Tokenizer::from_dir(cfg.vocab));
    const std::int32_t eot = tokenizer ? tokenizer->eot() : -1;
    const std::int32_t vocab_size = tokenizer ? tokenizer->vocab_size() : 256;

    std::vector<std::int32_t> train;
    std::vector<std::int32_t> val;
    std::vector<std::int32_t> ids;
    std::uint64_t bytes = 0;
    std::uint64_t document_tokens = 0;
    double encode_seconds = 0.0;
    for (const std::string& path : cfg.files) {
        const std::string text = read_text(path);
        bytes += text.size();
        ids.clear();
        const auto start = clock::now();
        if (tokenizer)
            tokenizer->encode_append(text, ids);
        else
            for (const char c : text) ids.push_back(static_cast<std::int32_t>(static_cast<unsigned char>(c)));
        encode_seconds += std::chrono::duration<double>(clock::now() - start).count();
        document_tokens += ids.size();
        if (cfg.print_ids) {
            print_ids(ids);
            continue;
        }
        const auto n_val =
            static_cast<std::size_t>(std::llround(static_cast<double>(ids.size()) * cfg.val_fraction));
        const std::int32_t* split = ids.data() + (ids.size() - n_val);
        join(train, ids.data(), split, eot);
        join(val, split, ids.data() + ids.size(), eot);
    }

    nlohmann::ordered_json result;
    result["files"] = cfg.files.size();
    result["bytes"] = bytes;
    result["tokens"] = document_tokens;
    if (!cfg.print_ids) {
        const std::string train_path = cfg.out + ".train.bin";
        const std::string val_path = cfg.out + ".val.bin";
        lowrank::write_tokens(train_path, train);
        lowrank::write_tokens(val_path, val);
        result["train"] = train_path;
        result["val"] = val_path;
        result["train_tokens"] = train.size();
        result["val_tokens"] = val.size();
    }
    result["seconds"] = encode_seconds;
    result["tokens_per_second"] =
        encode_seconds > 0 ? static_cast<double>(document_tokens) / encode_seconds : 0.0;
    if (!cfg.print_ids) {
        if (val.empty() || train.empty())
            result["unigram_val_perplexity"] = nullptr;
        else
            result["unigram_val_perplexity"] = unigram_perplexity(train, val, vocab_size);
        if (cfg.bytes)  // a token is a byte: log2 of the perplexity is the bits per byte
            result["unigram_val_bits_per_byte"] =
                result["unigram_val_perplexity"].is_null()
                    ? nlohmann::ordered_json(nullptr)
                    : nlohmann::ordered_json(std::log2(result["unigram_val_perplexity"].get<double>()));
    }
    result["tokenizer"] = cfg.bytes ? "bytes" : "gpt2";
    result["vocab_size"] = vocab_size;
    result["wall_seconds"] = std::chrono::duration<double>(clock::now() - wall_start).count();
    const std::string line = result.dump() + "\n";
    std::fflush(stdout);
    std::fputs(line.c_str(), cfg.print_ids ? stderr : stdout);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Config cfg;
    CLI::App app{
        "Encode text files with GPT-2's BPE (or --bytes: a token per byte) into PREFIX.train.bin /\n"
        "PREFIX.val.bin (little-endian uint16).\n"
        "Each file is a document; the last --val-fraction of each document's tokens is validation data.\n"
        "Prints one JSON line with the counts, the speed and the unigram-baseline perplexity.",
        "lowrank-tokenize"};
    app.add_option("--vocab", cfg.vocab, "Directory with GPT-2's encoder.json and vocab.bpe")
        ->capture_default_str();
    auto* out = app.add_option("--out", cfg.out, "Output prefix: writes PREFIX.train.bin and PREFIX.val.bin");
    app.add_option("--val-fraction", cfg.val_fraction,
                   "Fraction of each document's tokens (its end) for validation")
        ->check(CLI::Range(0.0, 0.999999))
        ->capture_default_str();
    app.add_flag("--bytes", cfg.bytes,
                 "One token per byte (ids 0-255, for lowrank-gpt2 --tokenizer bytes); --vocab is not read");
    auto* ids = app.add_flag("--print-ids", cfg.print_ids,
                             "Print each file's ids as one line instead of writing token files");
    app.add_option("files", cfg.files, "Text files, one document each")->required()->check(CLI::ExistingFile);
    out->excludes(ids);

    try {
        app.parse(argc, argv);
        if (!cfg.print_ids && cfg.out.empty()) throw CLI::RequiredError("--out");
    } catch (const CLI::ParseError& e) {
        const int code = app.exit(e);  // prints help to stdout, or the error to stderr
        return code == 0 ? 0 : 2;
    }

    try {
        return run(cfg);
    } catch (const std::bad_alloc&) {
        std::cerr << "lowrank-tokenize: error: out of memory\n";
    } catch (const std::exception& e) {
        std::cerr << "lowrank-tokenize: error: " << e.what() << "\n";
    }
    return 1;
}
