#pragma once
// Allocator tuning, and the process's peak resident memory. Fresh pages are expensive to
// touch on the machines we measured (about 11 us per 4 KiB page), and glibc hands large
// freed blocks straight back to the kernel, so a buffer that is freed and allocated again
// every step (Eigen's GEMM packing buffers are) pays for fresh pages every time. Keeping
// freed memory in the process avoids that.

#include <algorithm>
#include <climits>
#include <cstdint>

#include <cstdio>

#if defined(__linux__)
#include <sys/resource.h>
#include <unistd.h>
#endif

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace lowrank {

/// Tells glibc to serve large blocks from the heap and never to trim it, so memory freed
/// in one training step is reused by the next without new page faults. Call once at
/// start-up; it is a no-op elsewhere. Returns true if the settings were applied.
inline bool tune_allocator() {
#if defined(__GLIBC__)
    // 32 MiB is the largest mmap threshold glibc accepts on 64-bit systems.
    const bool heap = mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1;
    const bool keep = mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1;
    // Blocks above the threshold would still be mmapped, fresh every time: GPT-2's LM head
    // packs all of wte (51 MB for the tiny config) in each step's GEMM, which cost 0.15 to
    // 0.2 s of page faults per step. No mmap at all keeps those blocks in the heap too.
    const bool no_mmap = mallopt(M_MMAP_MAX, 0) == 1;
    return heap && keep && no_mmap;
#else
    return false;
#endif
}

/// The resident memory of the process now, in bytes (/proc/self/statm); 0 where it is
/// not known. With peak_rss_bytes after a run, what the training steps added above the
/// data and the model held before the first one.
inline std::int64_t current_rss_bytes() {
#if defined(__linux__)
    std::FILE* f = std::fopen("/proc/self/statm", "r");
    if (f == nullptr) return 0;
    long long size = 0, resident = 0;
    const int n = std::fscanf(f, "%lld %lld", &size, &resident);
    std::fclose(f);
    return n == 2 ? static_cast<std::int64_t>(resident) * static_cast<std::int64_t>(sysconf(_SC_PAGESIZE)) : 0;
#else
    return 0;
#endif
}

/// The most resident memory the process has held so far, in bytes (getrusage's
/// ru_maxrss, kilobytes on Linux); 0 where it is not known.
inline std::int64_t peak_rss_bytes() {
#if defined(__linux__)
    rusage usage{};
    if (getrusage(RUSAGE_SELF, &usage) != 0) return 0;
    return static_cast<std::int64_t>(usage.ru_maxrss) * 1024;
#else
    return 0;
#endif
}

/// Sets the kernel's peak-RSS mark of this process (VmHWM) back to its resident memory now,
/// so that peak_rss_since_reset_bytes() measures from here: a trainer calls it before its
/// first step, so that the peak is the steps' and not the data loading's. Linux: "5" written
/// to /proc/self/clear_refs. Returns false where that is not possible. getrusage's
/// ru_maxrss (peak_rss_bytes) may drop with it (it also keeps the mark of threads that have
/// exited): PeakRss reads it before the reset to keep the whole process's peak.
inline bool reset_peak_rss() {
#if defined(__linux__)
    std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
    if (f == nullptr) return false;
    const bool written = std::fputs("5", f) >= 0;
    return std::fclose(f) == 0 && written;
#else
    return false;
#endif
}

/// The most resident memory the process has held since the last reset_peak_rss() (or since
/// it started), in bytes: VmHWM of /proc/self/status; 0 where it is not known.
inline std::int64_t peak_rss_since_reset_bytes() {
#if defined(__linux__)
    std::FILE* f = std::fopen("/proc/self/status", "r");
    if (f == nullptr) return 0;
    char line[256];
    long long kb = -1;
    while (kb < 0 && std::fgets(line, sizeof line, f) != nullptr)
        if (std::sscanf(line, "VmHWM: %lld kB", &kb) != 1) kb = -1;
    std::fclose(f);
    return kb < 0 ? 0 : static_cast<std::int64_t>(kb) * 1024;
#else
    return 0;
#endif
}

/// The peak-memory readings of a training run: construct it right before the first step.
/// It keeps the process's peak so far (data loading) and resets the kernel's mark, so that
/// steps() is the peak since then and process() the whole process's, never below steps().
class PeakRss {
public:
    PeakRss() : before_(peak_rss_bytes()), reset_(reset_peak_rss()) {}
    /// The peak since construction; 0 where the kernel's mark could not be reset.
    std::int64_t steps() const { return reset_ ? peak_rss_since_reset_bytes() : 0; }
    /// The peak of the whole process.
    std::int64_t process() const { return std::max({before_, peak_rss_bytes(), steps()}); }

private:
    std::int64_t before_;
    bool reset_;
};

}  // namespace lowrank
