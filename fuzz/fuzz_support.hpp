// Shared by the fuzz targets (docs/reliability.md): the readers take paths, so each input is
// written to a file of its own first.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <unistd.h>

namespace lowrank_fuzz {

/// Where this process writes its inputs: in memory (/dev/shm) where there is one. Rewriting
/// a file on ext4 costs milliseconds (a truncated file is flushed before it is rewritten),
/// which would make file I/O almost all of a run.
inline const std::filesystem::path& input_dir() {
    static const std::filesystem::path dir = [] {
        std::error_code ec;
        const std::filesystem::path base =
            std::filesystem::is_directory("/dev/shm", ec) && ::access("/dev/shm", W_OK) == 0
                ? std::filesystem::path("/dev/shm")
                : std::filesystem::temp_directory_path();
        std::filesystem::path d = base / ("lowrank-fuzz-" + std::to_string(::getpid()));
        std::filesystem::create_directories(d);
        std::atexit([] {
            std::error_code ignored;
            std::filesystem::remove_all(input_dir(), ignored);
        });
        return d;
    }();
    return dir;
}

/// A file of this process named `name`, rewritten with every input.
inline std::string input_path(const std::string& name) { return (input_dir() / name).string(); }

/// Writes data[0, size) to input_path(name) and returns the path.
inline std::string write_input(const std::string& name, const std::uint8_t* data, std::size_t size) {
    const std::string path = input_path(name);
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr) std::abort();
    if (size != 0 && std::fwrite(data, 1, size, f) != size) std::abort();
    if (std::fclose(f) != 0) std::abort();
    return path;
}

/// A property the library promises was broken: report it as a crash.
[[noreturn]] inline void broken(const char* what) {
    std::fprintf(stderr, "lowrank fuzz: broken promise: %s\n", what);
    std::abort();
}

}  // namespace lowrank_fuzz
