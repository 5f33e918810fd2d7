// Helpers every test module may use.
#pragma once

#include <lowrank/core/init.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/core/types.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include <unistd.h>

namespace lowrank::test {

/// A rows x cols matrix of standard normal entries, drawn from its own seed.
inline MatrixD gaussian(Index rows, Index cols, std::uint64_t seed) {
    Rng rng(seed);
    MatrixD m(rows, cols);
    init::normal<double>(m, rng);
    return m;
}

/// A fresh, empty folder under the system's temporary folder for one test, removed with
/// everything in it when the object goes. Names carry the process id and a counter, so
/// tests running in parallel never share one.
class TempDir {
public:
    TempDir() {
        static std::atomic<int> counter{0};
        path_ = std::filesystem::temp_directory_path() /
                ("lowrank-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
        std::filesystem::remove_all(path_);
        std::filesystem::create_directories(path_);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    /// A file in the folder (a path converts to std::string where one is expected).
    std::filesystem::path operator/(const std::string& name) const { return path_ / name; }
    const std::filesystem::path& path() const { return path_; }
    /// The names in the folder, sorted.
    std::vector<std::string> entries() const {
        std::vector<std::string> out;
        for (const auto& e : std::filesystem::directory_iterator(path_)) out.push_back(e.path().filename().string());
        std::sort(out.begin(), out.end());
        return out;
    }

private:
    std::filesystem::path path_;
};

}  // namespace lowrank::test
