#pragma once
// The trainers' metrics line every --log-every steps (MetricsEvery in train/callbacks.hpp):
// loss, gradient norm, lr, ms/step, the rate and MFU, into the --log file as a "kind":
// "step" record, and for people on stderr: as a line when stderr is not a terminal, as the
// progress bar's status when it is. docs/training.md gives the FLOP counts.

#include <lowrank/train/callbacks.hpp>
#include <lowrank/train/peak_flops.hpp>

#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <utility>

namespace lowrank::examples {

struct StepLineConfig {
    std::int64_t every = 0;    // 0: no step lines
    double peak_gflops = 0.0;  // 0: measured at start (measure_peak_flops)
};

/// --log-every and --peak-gflops, in an option group of their own.
inline void add_step_line_options(CLI::App& app, StepLineConfig& cfg, std::string_view rate) {
    CLI::Option_group* g = app.add_option_group("Metrics lines");
    g->add_option("--log-every", cfg.every,
                  "A line every N optimizer steps: step, mean loss over the N steps, gradient norm (before "
                  "clipping), lr, ms/step, " +
                      std::string(rate) +
                      ", MFU; on stderr (the progress bar's status on a terminal) and as \"kind\": \"step\" "
                      "records in --log (0: none)")
        ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 40))
        ->capture_default_str();
    g->add_option("--peak-gflops", cfg.peak_gflops,
                  "The GFLOP/s that MFU divides by, for all threads and processes together (0: measured "
                  "once at start: a 20 ms loop of fused multiply-adds on one thread, times --threads and "
                  "the processes)")
        ->check(CLI::Range(0.0, 1e12))
        ->capture_default_str();
}

/// The peak FLOP/s of the run: --peak-gflops, or one thread's measured peak times the
/// threads of all processes.
inline double peak_flops(const StepLineConfig& cfg, int threads, int processes) {
    if (cfg.peak_gflops > 0.0) return cfg.peak_gflops * 1e9;
    return measure_peak_flops() * threads * processes;
}

/// "step     20/300  loss 6.1032  grad_norm 0.832  lr 1.00e-03  52.1 ms/step  2.46k tokens/s  MFU 3.1%",
/// without its "step" part when `with_step` is false (the bar shows the step itself).
inline std::string step_line_text(const IntervalMetrics& m, std::int64_t total_steps, std::string_view unit,
                                  bool with_step) {
    char buf[256];
    std::string out;
    if (with_step) {
        std::snprintf(buf, sizeof buf, "step %6lld/%lld  ", static_cast<long long>(m.step),
                      static_cast<long long>(total_steps));
        out += buf;
    }
    std::snprintf(buf, sizeof buf, "loss %.4f  grad_norm %.4f  lr %.2e  %.1f ms/step", m.train_loss, m.grad_norm,
                  m.lr, m.ms_per_step);
    out += buf;
    if (std::isfinite(m.samples_per_second))
        out += "  " + lowrank::detail::format_rate(m.samples_per_second) + " " + std::string(unit) + "/s";
    if (std::isfinite(m.mfu)) {
        std::snprintf(buf, sizeof buf, "  MFU %.1f%%", 100.0 * m.mfu);
        out += buf;
    }
    return out;
}

/// Attaches the step lines to `run` (every cfg.every steps; nothing when it is 0): records
/// in `log` when given, and on stderr unless `quiet`, through `bar` when it is visible.
/// `samples` and `flops_per_sample` as MetricsEvery's options; `unit` names the samples.
template <class T>
MetricsEvery<T>* attach_step_lines(TrainingRun<T>& run, const StepLineConfig& cfg, MetricsLog* log, bool quiet,
                                   ProgressBar& bar, std::string unit, std::function<double()> samples,
                                   std::function<double()> flops_per_sample, double peak) {
    if (cfg.every == 0 || (log == nullptr && quiet)) return nullptr;
    const std::int64_t total = run.total_steps();
    return &run.template attach<MetricsEvery<T>>(typename MetricsEvery<T>::Options{
        .every = cfg.every,
        .log = log,
        .samples = std::move(samples),
        .rate_key = unit + "_per_second",
        .flops_per_sample = std::move(flops_per_sample),
        .peak_flops = peak,
        .kind = "step",
        .on_line = [quiet, total, unit, &bar](TrainingRun<T>&, const IntervalMetrics& m) {
            if (quiet) return;
            if (bar.visible()) {
                bar.set_status("| " + step_line_text(m, total, unit, false));
            } else {
                std::fprintf(stderr, "%s\n", step_line_text(m, total, unit, true).c_str());
            }
        }});
}

}  // namespace lowrank::examples
