#pragma once
// --resume DIR|FILE|auto for the trainers. Which checkpoint: a FILE as given; a DIR (a run's
// --out-dir) its newest complete checkpoint; "auto" the newest complete checkpoint of the
// file this command would write (--save, DIR/checkpoint.safetensors with --out-dir DIR, or
// ./checkpoint.safetensors), a new run if there is none. "Newest" is the highest step among
// that file and its --keep-last step files (kept_checkpoints.hpp); a file whose header cannot
// be read is passed over.
//
// The run identity (run_identity.hpp) is taken from the checkpoint: every option in it that
// this command does not give is set to the checkpoint's value, so `--resume auto --out-dir
// run` continues a run with no other flag. An option given again must agree with the
// checkpoint (or be listed in --resume-allow); a disagreement names the option and both
// values on one line. The run's other settings that are not where output goes (how often it
// saves and logs, what it samples: the trainer's "settings" in the checkpoint) are taken from
// it too when not given, and may change freely.

#include "kept_checkpoints.hpp"
#include "run_identity.hpp"

#include <lowrank/core/error.hpp>
#include <lowrank/io/checkpoint.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace lowrank::examples {

/// The file a run writes its newest checkpoint to when --save is not given.
inline constexpr const char* kCheckpointName = "checkpoint.safetensors";

/// The newest complete checkpoint among `latest` and its step files; empty if none. Files
/// whose header does not read are passed over, with a warning on stderr from `program`
/// (when given).
inline std::filesystem::path newest_checkpoint(const std::filesystem::path& latest, const char* program) {
    std::vector<std::filesystem::path> candidates = KeptCheckpoints(latest, 0).existing();
    std::error_code ec;
    if (std::filesystem::is_regular_file(latest, ec)) candidates.push_back(latest);  // wins a tie
    std::filesystem::path best;
    std::int64_t best_step = -1;
    for (const auto& path : candidates) {
        std::int64_t step = -1;
        try {
            const nlohmann::json extra = read_checkpoint_extra(path.string());
            const auto run = extra.find("run");
            if (run != extra.end() && run->is_object()) step = run->value("step", std::int64_t{-1});
        } catch (const std::exception& e) {
            if (program != nullptr)
                std::fprintf(stderr, "%s: warning: --resume passes over '%s': %s\n", program, path.string().c_str(),
                             e.what());
            continue;
        }
        if (step >= best_step) {
            best_step = step;
            best = path;
        }
    }
    return best;
}

/// The checkpoint file --resume `spec` names. `latest`: the file this command would write
/// its newest checkpoint to. An empty result: "auto" found nothing (the run starts afresh).
inline std::string resolve_resume(const std::string& spec, const std::filesystem::path& latest,
                                  const char* program) {
    namespace fs = std::filesystem;
    if (spec == "auto") return newest_checkpoint(latest, program).string();
    std::error_code ec;
    if (fs::is_directory(spec, ec)) {
        const fs::path found = newest_checkpoint(fs::path(spec) / kCheckpointName, program);
        if (found.empty())
            throw Error("--resume '" + spec + "': expected a run's folder with " + kCheckpointName +
                        " (or checkpoint-step<N>.safetensors) in it, as --out-dir writes them, but there is none");
        return found.string();
    }
    return spec;  // a file: read_checkpoint_extra names it if it is missing or not a checkpoint
}

namespace detail {

/// An identity value as the command line gives it: 3 for a number saved as 3.0, the text
/// of a string.
inline std::string identity_arg(const nlohmann::json& v) {
    if (v.is_string()) return v.get<std::string>();
    if (v.is_number_float()) {
        const double d = v.get<double>();
        if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9007199254740992.0)
            return std::to_string(static_cast<long long>(d));
    }
    return v.dump();
}

inline std::string shown(const nlohmann::json& v) {
    if (v.is_null()) return "(nothing)";
    const std::string s = identity_arg(v);
    return s.empty() ? "\"\"" : s;
}

}  // namespace detail

/// Sets every option of `app` that the checkpoint's identity `saved` (or its `settings`)
/// holds and this command has otherwise, if the command line does not give it; refuses an
/// identity option given with another value unless `allow` lists it. `args`: the command line
/// without the program name. `allowable`: the options --resume-allow accepts. Re-parses `app`
/// if anything was taken from the checkpoint.
inline void take_identity_from_checkpoint(CLI::App& app, const std::vector<std::string>& args,
                                          const nlohmann::json& saved, const nlohmann::json& settings,
                                          const std::vector<std::string>& allow,
                                          const std::set<std::string>& allowable) {
    std::vector<const CLI::Option*> options;
    detail::all_options(app, options);
    const nlohmann::json now = options_identity(app, {});
    std::vector<std::string> more;
    for (const CLI::Option* o : options) {
        const std::string name = o->get_name();
        const bool identity = saved.contains(name);
        const nlohmann::json& source = identity ? saved : settings;
        const auto s = source.find(name);
        const auto n = now.find(name);
        if (s == source.end() || n == now.end() || *s == *n) continue;
        if (o->count() == 0) {
            more.push_back(name + "=" + detail::identity_arg(*s));
            continue;
        }
        if (!identity) continue;  // a setting given anew
        if (std::find(allow.begin(), allow.end(), name) != allow.end()) continue;
        const std::string advice = allowable.count(name)
                                       ? "; use --resume-allow=" + name + " to change it"
                                       : "; it cannot change within a run (start a new one without --resume)";
        throw Error("--resume: the checkpoint was trained with " + name + " " + detail::shown(*s) +
                    ", this command gives " + name + " " + detail::shown(*n) + advice);
    }
    if (more.empty()) return;
    std::vector<std::string> reversed(args);
    reversed.insert(reversed.end(), more.begin(), more.end());
    std::reverse(reversed.begin(), reversed.end());  // CLI::App::parse takes them last first
    app.clear();
    app.parse(reversed);
}

/// {"--option": value} of `app`'s options named in `names`: the settings a checkpoint keeps
/// beside the identity.
inline nlohmann::json carried_settings(const CLI::App& app, const std::set<std::string>& names) {
    nlohmann::json out = nlohmann::json::object();
    const nlohmann::json all = options_identity(app, {});
    for (const auto& [k, v] : all.items())
        if (names.count(k)) out[k] = v;
    return out;
}

/// The trainers' --resume, right after `app` parsed the command line `args` (without the
/// program name): `resume` becomes the checkpoint file ("" if "auto" found none: a new run),
/// and every identity option not given is taken from it (take_identity_from_checkpoint).
/// Without --out-dir or --save, "--resume DIR" sets `out_dir` to DIR and "--resume auto" to
/// ".": the run goes on writing where it wrote. `save`: --save's value.
inline void apply_resume(CLI::App& app, const std::vector<std::string>& args, std::string& resume,
                         std::string& out_dir, const std::string& save, const std::vector<std::string>& allow,
                         const std::vector<std::string>& allowable,
                         const char* program, bool root) {
    if (resume.empty()) return;
    std::error_code ec;
    if (out_dir.empty() && save.empty()) {
        if (resume == "auto") out_dir = ".";
        else if (std::filesystem::is_directory(resume, ec)) out_dir = resume;
    }
    const std::string spec = resume, dir = out_dir;
    const std::string latest = !save.empty() ? save : (std::filesystem::path(out_dir) / kCheckpointName).string();
    const std::string file = resolve_resume(spec, latest, root ? program : nullptr);
    if (file.empty()) {
        if (root)
            std::fprintf(stderr, "%s: --resume %s: no checkpoint at '%s' yet, starting a new run\n", program,
                         spec.c_str(), latest.c_str());
    } else {
        const nlohmann::json extra = read_checkpoint_extra(file);
        const auto run = extra.find("run");
        const auto user = extra.find("user");
        nlohmann::json saved = nlohmann::json::object(), settings = nlohmann::json::object();
        if (run != extra.end() && run->is_object() && run->contains("identity")) saved = run->at("identity");
        if (user != extra.end() && user->is_object() && user->contains("settings")) settings = user->at("settings");
        check(saved.is_object() && settings.is_object(), "--resume '" + file + "'",
              "expected the run's identity and settings to be JSON objects");
        take_identity_from_checkpoint(app, args, saved, settings, allow, {allowable.begin(), allowable.end()});
    }
    resume = file;  // a re-parse gave back the command line's values
    out_dir = dir;
}

}  // namespace lowrank::examples
