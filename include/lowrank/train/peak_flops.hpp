#pragma once
// The peak a model FLOPs utilisation (MFU) is measured against: how many single-precision
// floating-point operations one thread of this machine does per second in a loop of fused
// multiply-adds on Eigen's widest packet with no memory traffic, compiled for the
// instruction set this program was (with -march=native: the widest vector FMA the CPU has). A GEMM reaches a fraction of it;
// MFU = achieved FLOP/s / (peak per thread x threads x processes) says how large.
//
//     const double peak = lowrank::measure_peak_flops();  // FLOP/s of one thread, ~20 ms
//
// docs/training.md states the FLOP counts the trainers divide by it.

#include <lowrank/core/error.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>

namespace lowrank {

namespace detail {

/// `rounds` rounds of kChains independent FMAs on Eigen's widest float packet (2 FLOPs a
/// lane each), in registers: enough independent chains to hide the FMA latency on two FMA
/// ports. Returns a value the caller keeps, so that the loop is not optimised away.
inline constexpr int kFmaChains = 12;

inline float fma_rounds(std::int64_t rounds, float a, float b) {
    using Packet = Eigen::internal::packet_traits<float>::type;
    const Packet pa = Eigen::internal::pset1<Packet>(a), pb = Eigen::internal::pset1<Packet>(b);
    Packet acc[kFmaChains];
    for (int c = 0; c < kFmaChains; ++c) acc[c] = Eigen::internal::pset1<Packet>(static_cast<float>(c) * 1e-3f);
    for (std::int64_t i = 0; i < rounds; ++i)
        for (int c = 0; c < kFmaChains; ++c) acc[c] = Eigen::internal::pmadd(acc[c], pa, pb);
    float sum = 0.0f;
    for (int c = 0; c < kFmaChains; ++c) sum += Eigen::internal::predux(acc[c]);
    return sum;
}

/// FLOPs of one round: a multiply and an add in every lane of every chain.
inline constexpr double kFmaFlopsPerRound =
    2.0 * kFmaChains * static_cast<int>(Eigen::internal::packet_traits<float>::size);

}  // namespace detail

/// Single-precision FLOP/s of one thread in a register-only FMA loop, the best of a few
/// timings over about `seconds` in all (a shared machine's other work lowers the slower ones).
inline double measure_peak_flops(double seconds = 0.02) {
    check(std::isfinite(seconds) && seconds > 0.0 && seconds <= 10.0, "measure_peak_flops",
          "expected seconds in (0, 10], got ", seconds);
    using Clock = std::chrono::steady_clock;
    const auto elapsed = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
    // a and b keep every accumulator bounded (x -> 0.5 x + 0.25 converges to 0.5), and
    // volatile keeps the compiler from folding the loop.
    volatile float a = 0.5f, b = 0.25f, sink = 0.0f;
    std::int64_t rounds = 1 << 10;
    double best = 0.0;
    const auto start = Clock::now();
    while (elapsed(start) < seconds) {
        const auto t0 = Clock::now();
        sink = sink + detail::fma_rounds(rounds, a, b);
        const double t = elapsed(t0);
        if (t > 0.0) best = std::max(best, detail::kFmaFlopsPerRound * static_cast<double>(rounds) / t);
        if (t < seconds / 8) rounds *= 2;  // timings long enough to trust the clock
    }
    (void)sink;
    return best;
}

}  // namespace lowrank
