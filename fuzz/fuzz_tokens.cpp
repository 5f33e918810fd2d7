// Fuzz target "tokens": read_tokens on arbitrary bytes, then TokenWindows over what it reads.
#include "fuzz_support.hpp"

#include <lowrank/data/tokens.hpp>

int lowrank_fuzz_tokens(const std::uint8_t* data, std::size_t size) {
    using namespace lowrank;
    const std::string path = lowrank_fuzz::write_input("input.bin", data, size);
    std::vector<std::uint16_t> ids;
    try {
        ids = read_tokens(path);
    } catch (const FormatError&) {
        if (size % 2 == 0) lowrank_fuzz::broken("read_tokens refused an even-sized file");
        return 0;
    }
    if (ids.size() * 2 != size) lowrank_fuzz::broken("read_tokens: wrong number of ids");
    for (std::size_t k = 0; k < ids.size(); ++k)
        if (ids[k] != (data[2 * k] | (data[2 * k + 1] << 8))) lowrank_fuzz::broken("read_tokens: wrong id");
    if (ids.size() < 2) return 0;
    const Index context = 1 + static_cast<Index>(data[0] % std::min<std::size_t>(ids.size() - 1, 64));
    TokenWindows windows(std::move(ids), {.batch = 3, .context = context, .seed = data[1]});
    std::vector<std::int32_t> x, y;
    windows.next(x, y);
    windows.for_each_sequential_batch(4, [](auto, auto, Index) {});
    return 0;
}
