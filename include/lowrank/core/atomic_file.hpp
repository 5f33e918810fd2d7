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
#include <system_error>

#include <fcntl.h>
#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

namespace lowrank {

namespace detail {

/// Removes the temporary files "<path>.tmp-<pid>-<n>" that a writer of `path` left when it
/// was killed: those whose process no longer exists (a live writer's file is left alone).
/// Best effort: a file that cannot be listed or removed stays.
inline void remove_stale_temporaries(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
    const std::string head = path.filename().string() + ".tmp-";
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
        const std::string name = it->path().filename().string();
        if (!name.starts_with(head)) continue;
        const std::string rest = name.substr(head.size());  // "<pid>-<n>"
        const std::size_t dash = rest.find('-');
        if (dash == 0 || dash == std::string::npos || dash > 9) continue;
        long pid = 0;
        bool digits = true;
        for (std::size_t i = 0; i < dash; ++i) {
            digits = digits && rest[i] >= '0' && rest[i] <= '9';
            pid = pid * 10 + (rest[i] - '0');
        }
        if (!digits || pid <= 0 || pid == static_cast<long>(::getpid())) continue;
        if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive, or not ours to judge
        std::error_code rm;
        fs::remove(it->path(), rm);
    }
}

}  // namespace detail

/// Writes `path` atomically. `body(put)` produces the contents by calling
/// `put(const void* data, std::size_t size)` any number of times; the bytes go to a new
/// temporary file beside `path` (created exclusively, named `<path>.tmp-<pid>-<n>`), which
/// is flushed, synced and then renamed over `path`, and the directory is synced so that the
/// rename itself survives a crash.
///
/// Temporary files of the same target left by a writer that was killed (its process is
/// gone) are removed first, so a crash loop does not fill the disk.
///
/// On any failure — the temporary file cannot be created, a write, flush, sync or close
/// fails, the rename fails, or `body` throws — the temporary file is removed, `path` is
/// left as it was, and the exception propagates. Errors of our own are `Error`s reading
/// "<who>: '<path>': <what failed> '<temp>' failed: <reason>".
template <class Body>
void write_file_atomically(const std::filesystem::path& path, std::string_view who, Body&& body) {
    static std::atomic<std::uint64_t> counter{0};
    detail::remove_stale_temporaries(path);
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
