// Fuzz target "tokenizer": GPT-2's tokenizer (data/gpt2, which scripts/setup.sh fetches) on
// arbitrary bytes: every id in range, and decode(encode(bytes)) == bytes.
#include "fuzz_support.hpp"

#include <lowrank/data/bpe.hpp>

#include <memory>
#include <string_view>

#ifndef LOWRANK_DATA_DIR
#error "define LOWRANK_DATA_DIR as the repository's data/ folder"
#endif

namespace {
std::unique_ptr<lowrank::Gpt2Tokenizer> tokenizer;
}

void lowrank_fuzz_tokenizer_init() {
    tokenizer = std::make_unique<lowrank::Gpt2Tokenizer>(lowrank::Gpt2Tokenizer::from_dir(LOWRANK_DATA_DIR "/gpt2"));
}

int lowrank_fuzz_tokenizer(const std::uint8_t* data, std::size_t size) {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    const auto ids = tokenizer->encode(text);
    for (const std::int32_t id : ids)
        if (id < 0 || id >= tokenizer->vocab_size()) lowrank_fuzz::broken("encode gave an id outside the vocabulary");
    if (tokenizer->decode(ids) != text) lowrank_fuzz::broken("decode(encode(bytes)) != bytes");
    // The pre-tokenization alone: its words concatenate to the text.
    std::size_t covered = 0;
    lowrank::for_each_gpt2_word(text, [&](std::string_view w) {
        if (w.empty() || w.data() != text.data() + covered) lowrank_fuzz::broken("words do not tile the text");
        covered += w.size();
    });
    if (covered != text.size()) lowrank_fuzz::broken("words do not cover the text");
    return 0;
}
