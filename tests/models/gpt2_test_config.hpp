// The GPT-2 that the export and weight-loading tests share, so the files one writes are
// the files the other reads.
#pragma once

#include <lowrank/models/gpt2.hpp>

namespace lowrank::test {

/// 2 layers, 2 heads, C = 8, context 6, vocabulary 11: every tensor small enough to
/// compare entry by entry.
inline Gpt2Config gpt2_test_config() {
    Gpt2Config c;
    c.name = "small";
    c.n_layer = 2;
    c.n_head = 2;
    c.n_embd = 8;
    c.block_size = 6;
    c.vocab_size = 11;
    return c;
}

}  // namespace lowrank::test
