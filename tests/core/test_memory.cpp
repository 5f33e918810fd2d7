// The process's resident-memory readings (core/memory.hpp): the peak mark the trainers reset
// before their first step, so that peak_rss_steps_bytes is the steps' own.
#include <catch2/catch.hpp>

#include <lowrank/core/memory.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_memory {

#if defined(__linux__)
TEST_CASE("reset_peak_rss moves the peak mark down to the memory held now", "[core][memory]") {
    constexpr std::int64_t size = 64 << 20;
    REQUIRE(lowrank::reset_peak_rss());
    const std::int64_t low = lowrank::peak_rss_since_reset_bytes();
    REQUIRE(low > 0);
    CHECK(low >= lowrank::current_rss_bytes() - (1 << 20));

    // 64 MiB touched and handed back to the kernel: the mark keeps it, the RSS does not.
    void* block = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(block != MAP_FAILED);
    std::memset(block, 1, static_cast<std::size_t>(size));
    REQUIRE(munmap(block, size) == 0);
    const std::int64_t high = lowrank::peak_rss_since_reset_bytes();
    CHECK(high >= low + size - (4 << 20));
    CHECK(lowrank::peak_rss_bytes() >= high);  // getrusage's mark holds it too

    REQUIRE(lowrank::reset_peak_rss());
    CHECK(lowrank::peak_rss_since_reset_bytes() < high - size / 2);
}

TEST_CASE("PeakRss: steps() from its construction, process() never below it nor the earlier peak",
          "[core][memory]") {
    constexpr std::int64_t size = 64 << 20;
    // An earlier peak (the "data loading"), handed back before the run starts.
    void* early = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(early != MAP_FAILED);
    std::memset(early, 1, static_cast<std::size_t>(size));
    REQUIRE(munmap(early, size) == 0);
    const std::int64_t early_peak = lowrank::peak_rss_since_reset_bytes();

    const lowrank::PeakRss peak;
    const std::int64_t start = peak.steps();
    REQUIRE(start > 0);
    CHECK(start < early_peak - size / 2);  // the steps' peak does not hold the loading's
    void* block = mmap(nullptr, size / 2, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(block != MAP_FAILED);
    std::memset(block, 1, static_cast<std::size_t>(size / 2));
    REQUIRE(munmap(block, size / 2) == 0);
    CHECK(peak.steps() >= start + size / 2 - (4 << 20));
    CHECK(peak.process() >= early_peak);
    CHECK(peak.process() >= peak.steps());
}
#endif

}  // namespace test_memory
