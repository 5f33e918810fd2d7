// Helpers every test module may use.
#pragma once

#include <lowrank/core/init.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/core/types.hpp>

#include <cstdint>

namespace lowrank::test {

/// A rows x cols matrix of standard normal entries, drawn from its own seed.
inline MatrixD gaussian(Index rows, Index cols, std::uint64_t seed) {
    Rng rng(seed);
    MatrixD m(rows, cols);
    init::normal<double>(m, rng);
    return m;
}

}  // namespace lowrank::test
