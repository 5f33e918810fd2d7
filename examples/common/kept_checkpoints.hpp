#pragma once
// --keep-last K: a run's checkpoint file (--save, or DIR/checkpoint.safetensors) always holds
// the newest checkpoint, and the K newest are also kept beside it as
// "<stem>-step<00000123><ext>". Each save writes its step file atomically (run.save), then
// makes the checkpoint file the same file (a hard link renamed over it, a copy where the
// file system has no links), and only then removes the step files older than the K newest:
// a crash at any point leaves a complete newest checkpoint.

#include <lowrank/core/atomic_file.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/train/callbacks.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include <unistd.h>

namespace lowrank::examples {

class KeptCheckpoints {
public:
    KeptCheckpoints(std::filesystem::path latest, int keep_last)
        : latest_(std::move(latest)), keep_last_(keep_last) {
        check(keep_last >= 0, "--keep-last", "expected a count >= 0, got ", keep_last);
    }

    int keep_last() const { return keep_last_; }

    /// "<stem>-step<00000123><ext>" beside the checkpoint file.
    std::filesystem::path step_path(std::int64_t step) const {
        char buf[32];
        std::snprintf(buf, sizeof buf, "-step%08lld", static_cast<long long>(step));
        return latest_.parent_path() / (latest_.stem().string() + buf + latest_.extension().string());
    }

    /// After step_path(step) is complete: the checkpoint file becomes it, then the step
    /// files older than the newest keep_last go.
    void saved(std::int64_t step) {
        namespace fs = std::filesystem;
        const fs::path src = step_path(step);
        lowrank::detail::remove_stale_temporaries(latest_);
        const std::string temp = latest_.string() + ".tmp-" + std::to_string(::getpid()) + "-link";
        std::error_code ec;
        fs::remove(temp, ec);
        fs::create_hard_link(src, temp, ec);
        if (ec) fs::copy_file(src, temp, fs::copy_options::overwrite_existing, ec);
        if (!ec) fs::rename(temp, latest_, ec);
        if (ec) {
            fs::remove(temp, ec);
            throw Error("--keep-last: cannot make '" + latest_.string() + "' the checkpoint '" + src.string() +
                        "': " + ec.message());
        }
        const auto all = existing();
        for (std::size_t i = 0; i + static_cast<std::size_t>(keep_last_) < all.size(); ++i)
            fs::remove(all[i], ec);  // a step file that cannot be removed stays
    }

    /// The step files beside the checkpoint file, oldest first.
    std::vector<std::filesystem::path> existing() const {
        return step_checkpoint_files(latest_.has_parent_path() ? latest_.parent_path() : ".",
                                     latest_.stem().string(), latest_.extension().string());
    }

    /// "<stem>-best<ext>" beside the checkpoint file (--keep-best).
    std::filesystem::path best_path() const {
        return latest_.parent_path() / (latest_.stem().string() + "-best" + latest_.extension().string());
    }

private:
    std::filesystem::path latest_;
    int keep_last_;
};

}  // namespace lowrank::examples
