#pragma once
// A seeded, portable random number generator (xoshiro256**). The same seed gives the
// same numbers on every platform and standard library, and the whole state can be
// saved in a checkpoint.

#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>

namespace lowrank {

class Rng {
public:
    /// The whole state: four words plus a cached second normal deviate.
    struct State {
        std::array<std::uint64_t, 4> s{};
        bool has_spare = false;
        double spare = 0.0;
        bool operator==(const State&) const = default;
    };

    explicit Rng(std::uint64_t seed = 0) { reseed(seed); }

    void reseed(std::uint64_t seed) {
        // splitmix64 expands one word into a well-mixed state.
        std::uint64_t z = seed;
        for (auto& word : state_.s) {
            z += 0x9e3779b97f4a7c15ULL;
            std::uint64_t x = z;
            x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
            x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
            word = x ^ (x >> 31);
        }
        state_.has_spare = false;
        state_.spare = 0.0;
    }

    std::uint64_t next_u64() {
        auto& s = state_.s;
        const std::uint64_t result = rotl(s[1] * 5, 7) * 9;
        const std::uint64_t t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = rotl(s[3], 45);
        return result;
    }

    /// Uniform in [0, 1) with 53 random bits.
    double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

    /// Uniform in [lo, hi).
    double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

    /// Uniform integer in [0, n), without modulo bias (rejects the top partial block).
    std::uint64_t below(std::uint64_t n) {
        if (n == 0) return 0;
        const std::uint64_t limit = UINT64_MAX - UINT64_MAX % n;
        std::uint64_t x = next_u64();
        while (x >= limit) x = next_u64();
        return x % n;
    }

    /// Standard normal deviate (Box-Muller; the second deviate is cached).
    double normal() {
        if (state_.has_spare) {
            state_.has_spare = false;
            return state_.spare;
        }
        double u1 = uniform();
        while (u1 <= 0.0) u1 = uniform();
        const double u2 = uniform();
        const double radius = std::sqrt(-2.0 * std::log(u1));
        const double angle = 2.0 * std::numbers::pi * u2;
        state_.spare = radius * std::sin(angle);
        state_.has_spare = true;
        return radius * std::cos(angle);
    }

    double normal(double mean, double stddev) { return mean + stddev * normal(); }

    /// A generator for a sub-task (a data loader, dropout) that does not disturb this one's
    /// sequence more than one draw.
    Rng split() { return Rng(next_u64()); }

    const State& state() const { return state_; }
    void set_state(const State& s) { state_ = s; }

private:
    static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    State state_;
};

}  // namespace lowrank
