#pragma once
// The trainers' checkpoint options, defined once: --save, --save-every, --stop-at,
// --keep-last, --keep-best (for a trainer whose Config has keep_best), --resume and
// --resume-allow, in an option group of their own. What they do is the trainer's
// (resume_cli.hpp reads --resume; kept_checkpoints.hpp keeps the files).

#include "cli_checks.hpp"

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace lowrank::examples {

/// What differs between the trainers' help texts.
struct CheckpointHelp {
    /// The option a --resume-allow example extends a run with ("--steps", "--epochs").
    std::string_view extends;
    /// Whether --resume says "mid-epoch too" (a trainer that counts epochs).
    bool mid_epoch = false;
};

/// Adds the options to `app`, bound to cfg.save (std::string), cfg.save_every and
/// cfg.stop_at (std::int64_t), cfg.keep_last (int), cfg.resume (std::string),
/// cfg.resume_allow (std::vector<std::string>, each one of `resume_allowable`) and, if
/// Config has it, cfg.keep_best (bool).
template <class Config>
void add_checkpoint_options(CLI::App& app, Config& cfg, const std::vector<std::string>& resume_allowable,
                            const CheckpointHelp& help) {
    CLI::Option_group* g = app.add_option_group("Checkpoints");
    g->add_option("--save", cfg.save,
                  "Write a checkpoint (safetensors) here at the end and every --save-every steps");
    g->add_option("--save-every", cfg.save_every, "Steps between checkpoints (0: only at the end)")
        ->check(non_negative)
        ->capture_default_str();
    g->add_option("--stop-at", cfg.stop_at,
                  "Stop (and --save) after this step, as if interrupted; --resume continues the same run")
        ->check(non_negative);
    g->add_option("--keep-last", cfg.keep_last,
                  "Also keep the K newest checkpoints beside --save's file as <stem>-step<N>.safetensors, "
                  "removing older ones once a new one is complete (0: only --save's file, the newest)")
        ->check(CLI::Range(0, 1 << 20))
        ->capture_default_str();
    if constexpr (requires { cfg.keep_best = true; })
        g->add_flag("--keep-best", cfg.keep_best,
                    "Also keep the checkpoint of the best validation loss so far as <stem>-best.safetensors");
    g->add_option(
         "--resume", cfg.resume,
         std::string("Continue a saved run exactly") + (help.mid_epoch ? ", mid-epoch too" : "") +
             ": a checkpoint FILE, a run's folder DIR (its newest checkpoint; the run goes on writing "
             "there unless --out-dir or --save is given), or auto (the newest checkpoint of --out-dir, "
             "--save or ./checkpoint.safetensors; a new run if there is none). The settings come from "
             "the checkpoint; any given again must agree with it")
        ->type_name("FILE|DIR|auto");
    g->add_option("--resume-allow", cfg.resume_allow,
                  "Settings a --resume may change on purpose, comma-separated (--resume-allow=" +
                      std::string(help.extends) +
                      " extends a run); the run then differs from the saved one's, by choice")
        ->delimiter(',')
        ->check(CLI::IsMember(resume_allowable));
}

}  // namespace lowrank::examples
