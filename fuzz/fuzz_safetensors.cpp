// Fuzz target "safetensors": SafetensorsReader on arbitrary bytes, then shape(), dtype() and
// matrix<float>/<double>() of every tensor it accepts.
#include "fuzz_support.hpp"

#include <lowrank/io/safetensors.hpp>

int lowrank_fuzz_safetensors(const std::uint8_t* data, std::size_t size) {
    using namespace lowrank;
    const std::string path = lowrank_fuzz::write_input("input.safetensors", data, size);
    std::unique_ptr<SafetensorsReader> reader;
    try {
        reader = std::make_unique<SafetensorsReader>(path);
    } catch (const FormatError&) {
        return 0;  // refused: fine, as long as it is a FormatError
    }
    for (const std::string& name : reader->names()) {
        const auto shape = reader->shape(name);
        (void)reader->dtype(name);
        try {
            const Matrix<float> f = reader->matrix<float>(name);
            const Matrix<double> d = reader->matrix<double>(name);
            std::uint64_t count = 1;
            for (auto dim : shape) count *= static_cast<std::uint64_t>(dim);
            if (static_cast<std::uint64_t>(f.size()) != count || f.size() != d.size())
                lowrank_fuzz::broken("matrix() does not hold the shape's elements");
        } catch (const Error&) {
            // not a float dtype, or more than 2 dimensions
        }
    }
    (void)reader->metadata();
    return 0;
}
