// The one libFuzzer binary of lowrank's fuzz targets (docs/reliability.md). The target is
// the name the binary is called by: scripts/fuzz.sh links build/fuzz/<target> to it, so
//   build/fuzz/safetensors fuzz/corpus/safetensors   fuzzes the safetensors reader, and
//   build/fuzz/safetensors crash-1234                 replays one input.
// One binary compiles the headers once for all targets.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>

int lowrank_fuzz_safetensors(const std::uint8_t*, std::size_t);
int lowrank_fuzz_checkpoint(const std::uint8_t*, std::size_t);
int lowrank_fuzz_idx(const std::uint8_t*, std::size_t);
int lowrank_fuzz_bpe_vocab(const std::uint8_t*, std::size_t);
int lowrank_fuzz_tokens(const std::uint8_t*, std::size_t);
int lowrank_fuzz_tokenizer(const std::uint8_t*, std::size_t);
void lowrank_fuzz_tokenizer_init();

namespace {

struct Target {
    std::string_view name;
    int (*run)(const std::uint8_t*, std::size_t);
    void (*init)();
};

constexpr Target targets[] = {
    {"safetensors", lowrank_fuzz_safetensors, nullptr},
    {"checkpoint", lowrank_fuzz_checkpoint, nullptr},
    {"idx", lowrank_fuzz_idx, nullptr},
    {"bpe_vocab", lowrank_fuzz_bpe_vocab, nullptr},
    {"tokens", lowrank_fuzz_tokens, nullptr},
    {"tokenizer", lowrank_fuzz_tokenizer, lowrank_fuzz_tokenizer_init},
};

const Target* chosen = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
    std::string_view self = (*argc > 0) ? (*argv)[0] : "";
    if (const auto slash = self.rfind('/'); slash != std::string_view::npos) self.remove_prefix(slash + 1);
    for (const Target& t : targets)
        if (t.name == self) chosen = &t;
    if (chosen == nullptr) {
        std::fprintf(stderr, "lowrank fuzz: call this binary by a target's name (a link to it): ");
        for (const Target& t : targets) std::fprintf(stderr, "%.*s ", static_cast<int>(t.name.size()), t.name.data());
        std::fprintf(stderr, "\n");
        std::exit(2);
    }
    if (chosen->init != nullptr) chosen->init();
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) { return chosen->run(data, size); }
