#include <lowrank/core/atomic_file.hpp>

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_atomic_file {

namespace fs = std::filesystem;
using Catch::Contains;

namespace {

std::string read_all(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<std::string> entries(const fs::path& dir) {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
    return out;
}

/// A fresh, empty directory for one test case.
fs::path fresh_dir(const std::string& name) {
    const fs::path dir = fs::temp_directory_path() / ("lowrank_atomic_file_" + name);
    fs::remove_all(dir);
    fs::create_directories(dir);
    return dir;
}

}  // namespace

TEST_CASE("write_file_atomically writes every piece in order and leaves only the target", "[core][io]") {
    const fs::path dir = fresh_dir("write");
    const fs::path path = dir / "out.bin";
    lowrank::write_file_atomically(path, "test", [](const auto& put) {
        put("abc", 3);
        put("", 0);
        put("defg", 4);
    });
    CHECK(read_all(path) == "abcdefg");
    CHECK(entries(dir) == std::vector<std::string>{"out.bin"});

    // Replaces an existing file whole.
    lowrank::write_file_atomically(path, "test", [](const auto& put) { put("xy", 2); });
    CHECK(read_all(path) == "xy");
    CHECK(entries(dir) == std::vector<std::string>{"out.bin"});
    fs::remove_all(dir);
}

TEST_CASE("write_file_atomically leaves the old file untouched when the body throws", "[core][io]") {
    const fs::path dir = fresh_dir("throw");
    const fs::path path = dir / "out.bin";
    lowrank::write_file_atomically(path, "test", [](const auto& put) { put("old", 3); });
    CHECK_THROWS_WITH(lowrank::write_file_atomically(path, "test",
                                                     [](const auto& put) {
                                                         put("new, half", 9);
                                                         throw std::runtime_error("body failed");
                                                     }),
                      "body failed");
    CHECK(read_all(path) == "old");
    CHECK(entries(dir) == std::vector<std::string>{"out.bin"});  // no temporary file left behind
    fs::remove_all(dir);
}

TEST_CASE("write_file_atomically names the writer and the path when it cannot write", "[core][io]") {
    const fs::path dir = fresh_dir("missing");
    const fs::path path = dir / "no-such-folder" / "out.bin";
    CHECK_THROWS_AS(lowrank::write_file_atomically(path, "Writer::save", [](const auto& put) { put("x", 1); }),
                    lowrank::Error);
    CHECK_THROWS_WITH(lowrank::write_file_atomically(path, "Writer::save", [](const auto& put) { put("x", 1); }),
                      Contains("Writer::save") && Contains(path.string()) &&
                          Contains("cannot create the temporary file"));
    CHECK_FALSE(fs::exists(path));
    fs::remove_all(dir);
}

TEST_CASE("write_file_atomically removes the temporary files of a killed writer, not a live one's",
          "[core][io]") {
    const fs::path dir = fresh_dir("stale");
    const fs::path path = dir / "ckpt.safetensors";
    // A process that has exited: its pid is free (until the system reuses it).
    const pid_t child = ::fork();
    if (child == 0) ::_exit(0);
    REQUIRE(child > 0);
    int status = 0;
    ::waitpid(child, &status, 0);
    const auto touch = [](const fs::path& p) { std::ofstream(p) << "partial"; };
    const std::string dead = "ckpt.safetensors.tmp-" + std::to_string(child) + "-3";
    const std::string alive = "ckpt.safetensors.tmp-" + std::to_string(::getppid()) + "-0";
    const std::string other = "other.bin.tmp-" + std::to_string(child) + "-0";
    touch(dir / dead);
    touch(dir / alive);
    touch(dir / other);
    lowrank::write_file_atomically(path, "test", [](const auto& put) { put("ok", 2); });
    CHECK_FALSE(fs::exists(dir / dead));
    CHECK(fs::exists(dir / alive));  // its writer may still be writing
    CHECK(fs::exists(dir / other));  // another target's
    CHECK(read_all(path) == "ok");
    fs::remove_all(dir);
}

}  // namespace test_atomic_file
