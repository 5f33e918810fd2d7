// Fuzz target "bpe_vocab": the GPT-2 vocabulary loader. An input is encoder.json, a line
// "=====", then vocab.bpe (without the line, all of it is encoder.json and vocab.bpe is
// empty). A vocabulary that loads must round-trip text through encode and decode.
#include "fuzz_support.hpp"

#include <lowrank/data/bpe.hpp>

#include <string_view>

int lowrank_fuzz_bpe_vocab(const std::uint8_t* data, std::size_t size) {
    using namespace lowrank;
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    constexpr std::string_view separator = "\n=====\n";
    const auto at = input.find(separator);
    const std::string_view encoder = input.substr(0, at);
    const std::string_view merges = at == std::string_view::npos ? std::string_view() : input.substr(at + separator.size());
    const std::string encoder_path = lowrank_fuzz::write_input(
        "encoder.json", reinterpret_cast<const std::uint8_t*>(encoder.data()), encoder.size());
    const std::string merges_path =
        lowrank_fuzz::write_input("vocab.bpe", reinterpret_cast<const std::uint8_t*>(merges.data()), merges.size());
    for (bool complete : {true, false}) {
        try {
            const Gpt2Tokenizer tok(encoder_path, merges_path, {.require_complete_merges = complete});
            for (const std::string_view text : {std::string_view("hello world, it's 2024!\n\n  x"), encoder.substr(0, 200)}) {
                const auto ids = tok.encode(text);
                if (tok.decode(ids) != text) lowrank_fuzz::broken("decode(encode(text)) != text");
            }
        } catch (const FormatError&) {
        }
    }
    return 0;
}
