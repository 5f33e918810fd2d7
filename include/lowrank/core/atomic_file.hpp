#pragma once
// Replacing a file atomically: everything lowrank writes to disk (checkpoints, safetensors,
// token streams, rank logs) goes through write_file_atomically, so that a crash or a full
// disk leaves the old file or the new one, never half of one.

#include <lowrank/core/error.hpp>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>

#include <fcntl.h>
#include <unistd.h>

namespace lowrank {

/// Writes `path` atomically. `body(put)` produces the contents by calling
/// `put(const void* data, std::size_t size)` any number of times; the bytes go to a new
/// temporary file beside `path` (created exclusively, named `<path>.tmp-<pid>-<n>`), which
/// is flushed, synced and then renamed over `path`, and the directory is synced so that the
/// rename itself survives a crash.
///
/// On any failure — the temporary file cannot be created, a write, flush, sync or close
/// fails, the rename fails, or `body` throws — the temporary file is removed, `path` is
/// left as it was, and the exception propagates. Errors of our own are `Error`s reading
/// "<who>: '<path>': <what failed> '<temp>' failed: <reason>".
template <class Body>
void write_file_atomically(const std::filesystem::path& path, std::string_view who, Body&& body) {
    static std::atomic<std::uint64_t> counter{0};
    const std::string target = path.string();
    const std::string temp = detail::concat(target, ".tmp-", ::getpid(), "-", counter++);
    std::FILE* f = std::fopen(temp.c_str(), "wbx");  // x: never clobber someone else's file
    if (f == nullptr)
        throw Error(detail::concat(who, ": '", target, "': cannot create the temporary file '", temp,
                                   "': ", std::strerror(errno)));
    const auto fail = [&](const char* doing) {
        const int err = errno;
        if (f != nullptr) std::fclose(f);
        f = nullptr;
        std::remove(temp.c_str());
        throw Error(detail::concat(who, ": '", target, "': ", doing, " '", temp, "' failed: ", std::strerror(err)));
    };
    const auto put = [&](const void* data, std::size_t size) {
        if (size != 0 && std::fwrite(data, 1, size, f) != size) fail("writing");
    };
    try {
        body(put);
    } catch (...) {  // from put (temp already removed) or from body itself
        if (f != nullptr) {
            std::fclose(f);
            std::remove(temp.c_str());
        }
        throw;
    }
    if (std::fflush(f) != 0) fail("flushing");
    if (::fsync(::fileno(f)) != 0) fail("syncing");
    const int closed = std::fclose(f);
    f = nullptr;
    if (closed != 0) fail("closing");
    if (std::rename(temp.c_str(), target.c_str()) != 0) fail("renaming to the target");
    const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {  // make the rename durable; failing here loses nothing written
        ::fsync(dfd);
        ::close(dfd);
    }
}

}  // namespace lowrank
