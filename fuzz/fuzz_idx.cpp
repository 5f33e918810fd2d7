// Fuzz target "idx": read_idx, load_idx_images and load_idx_labels on arbitrary bytes, which
// the reader takes as gzip when they start with 1f 8b (the seeds hold both kinds).
#include "fuzz_support.hpp"

#include <lowrank/data/idx.hpp>

int lowrank_fuzz_idx(const std::uint8_t* data, std::size_t size) {
    using namespace lowrank;
    const std::string path = lowrank_fuzz::write_input("input.idx", data, size);
    // A small cap: a few MB of gzip may legitimately expand to a GiB, which would only be slow.
    const IdxReadOptions options{.max_bytes = std::uint64_t{1} << 26};
    try {
        const IdxArray a = read_idx(path, options);
        if (a.data.size() != a.element_count()) lowrank_fuzz::broken("read_idx: data and dims disagree");
        if (read_idx_dims(path, options) != a.dims) lowrank_fuzz::broken("read_idx_dims disagrees with read_idx");
    } catch (const FormatError&) {
        return 0;
    }
    try {
        (void)load_idx_images<float>(path, options);
    } catch (const FormatError&) {
    }
    try {
        (void)load_idx_labels(path, options);
    } catch (const FormatError&) {
    }
    return 0;
}
