#pragma once
// Callbacks a TrainingRun calls (run.attach<...>(...)): a progress bar, a metrics line
// every N steps, checkpoints every N steps keeping the last K, early stopping. A lambda
// attaches with run.every(n, f). Every target a callback writes is checked when it is
// built, before the first step.

#include <lowrank/core/error.hpp>
#include <lowrank/train/metrics_log.hpp>
#include <lowrank/train/progress.hpp>
#include <lowrank/train/run.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <unistd.h>

namespace lowrank {

/// Throws unless a file can be written at `path`: its folder exists and takes a new file,
/// and the path itself is not a folder. `what` names the option in the message.
inline void check_writable(const std::filesystem::path& path, std::string_view what) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const std::string where = detail::concat(what, ": '", path.string(), "'");
    check(!path.empty(), what, "expected a file path, got an empty one");
    if (fs::is_directory(path, ec)) throw Error(detail::concat(where, ": expected a file, got a directory"));
    const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
    if (!fs::is_directory(dir, ec))
        throw Error(detail::concat(where, ": the folder '", dir.string(), "' does not exist"));
    if (::access(dir.c_str(), W_OK) != 0)
        throw Error(detail::concat(where, ": the folder '", dir.string(), "' is not writable"));
}

/// Creates the folder `dir` (and its parents) unless it exists, and throws unless it is a
/// folder that takes new files. `what` names the option in the message.
inline void make_writable_dir(const std::filesystem::path& dir, std::string_view what) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const std::string where = detail::concat(what, ": '", dir.string(), "'");
    check(!dir.empty(), what, "expected a folder, got an empty path");
    fs::create_directories(dir, ec);
    if (ec) throw Error(detail::concat(where, ": cannot create the folder: ", ec.message()));
    if (!fs::is_directory(dir, ec)) throw Error(detail::concat(where, ": expected a folder, got a file"));
    if (::access(dir.c_str(), W_OK) != 0) throw Error(detail::concat(where, ": the folder is not writable"));
}

/// The progress bar (train/progress.hpp) driven by the run: one bar an epoch when the run
/// knows its epochs, one bar of steps for the whole run otherwise ("step [...] 150/1000").
template <class T>
class ProgressCallback : public RunCallback<T> {
public:
    struct Options {
        ProgressOptions bar{};
        /// Samples (or tokens: set bar.unit) a step consumes, for the rate.
        std::int64_t samples_per_step = 1;
        /// Epochs the loop will run (for "epoch 3/10"); 0: one bar for the whole run.
        std::int64_t epochs = 0;
    };

    explicit ProgressCallback(Options options) : options_(options), bar_(options.bar) {}

    void on_step_end(TrainingRun<T>& run, const StepResult& r) override {
        if (!started_) start(run);
        ++done_;
        bar_.update(done_, r.loss, options_.samples_per_step);
    }
    void on_epoch_end(TrainingRun<T>&) override {
        if (options_.epochs <= 0) return;
        bar_.finish();
        started_ = false;
    }
    void on_train_end(TrainingRun<T>&) override { bar_.finish(); }

    ProgressBar& bar() { return bar_; }

private:
    void start(TrainingRun<T>& run) {
        started_ = true;
        done_ = 0;
        const std::int64_t per_epoch = run.context().steps_per_epoch();
        if (options_.epochs > 0 && per_epoch > 0)
            bar_.begin_epoch(run.epoch() + 1, options_.epochs, per_epoch - run.steps_in_epoch());
        else
            bar_.begin(std::max<std::int64_t>(0, run.total_steps() - run.global_step()));
    }

    Options options_;
    ProgressBar bar_;
    bool started_ = false;
    std::int64_t done_ = 0;
};

/// What MetricsEvery measured over its last interval of steps. Rates are NaN where the
/// options gave nothing to compute them from.
struct IntervalMetrics {
    std::int64_t step = 0;   // the run's step count after the interval's last step
    std::int64_t epoch = 0;  // the epoch that step ran in, 0-based
    std::int64_t steps = 0;  // steps timed in the interval (in this process; a resume restarts it)
    std::int64_t skipped_steps = 0;
    double train_loss = std::numeric_limits<double>::quiet_NaN();  // mean over the interval's steps
    double grad_norm = std::numeric_limits<double>::quiet_NaN();   // the last step's, before clipping
    double lr = 0.0;
    double ms_per_step = 0.0;  // mean wall time of a step (forward, backward, update)
    double samples_per_second = std::numeric_limits<double>::quiet_NaN();
    double flops_per_second = std::numeric_limits<double>::quiet_NaN();
    double mfu = std::numeric_limits<double>::quiet_NaN();  // flops_per_second / peak_flops
};

/// One line every `every` steps: the step, the epoch, the mean loss and the mean step time
/// over the interval, the last gradient norm and lr, the skipped steps, the rate, FLOP/s
/// and MFU when the options say how to count them, and whatever `fields(run, line)` adds;
/// to a MetricsLog and/or to `on_line` (a human-readable line, a progress bar's status).
template <class T>
class MetricsEvery : public RunCallback<T> {
public:
    using Fields = std::function<void(TrainingRun<T>&, JsonLine&)>;

    struct Options {
        std::int64_t every = 1;
        /// Where the lines go (null: only to on_line).
        MetricsLog* log = nullptr;
        /// Samples (or tokens) the step that just ended consumed (empty: no rate).
        std::function<double()> samples = {};
        /// The rate's key in the line: "samples_per_second", "tokens_per_second", ...
        std::string rate_key = "samples_per_second";
        /// Training FLOPs per sample (forward and backward) as the model is now (empty: no
        /// FLOP/s, no MFU).
        std::function<double()> flops_per_sample = {};
        /// The FLOP/s MFU divides by (0: no MFU).
        double peak_flops = 0.0;
        /// Written first as "kind" when not empty, to tell these lines from others in a log.
        std::string kind = {};
        Fields fields = {};
        std::function<void(TrainingRun<T>&, const IntervalMetrics&)> on_line = {};
    };

    MetricsEvery(MetricsLog& log, std::int64_t every, Fields fields = {})
        : MetricsEvery(Options{.every = every, .log = &log, .fields = std::move(fields)}) {}

    explicit MetricsEvery(Options options) : options_(std::move(options)) {
        constexpr std::string_view what = "MetricsEvery";
        check(options_.every >= 1, what, "expected every >= 1, got ", options_.every);
        check(std::isfinite(options_.peak_flops) && options_.peak_flops >= 0.0, what,
              "expected peak_flops >= 0 (0: no MFU), got ", options_.peak_flops);
    }

    void on_step_end(TrainingRun<T>& run, const StepResult& r) override {
        if (!r.skipped) {
            loss_sum_ += r.loss;
            ++counted_;
        }
        seconds_ += r.seconds;
        if (options_.samples) samples_ += options_.samples();
        ++steps_;
        if (r.step % options_.every != 0 || r.skipped) return;
        IntervalMetrics& m = last_;
        m.step = r.step;
        m.epoch = r.epoch;
        m.steps = steps_;
        m.skipped_steps = run.skipped_steps();
        m.train_loss = loss_sum_ / static_cast<double>(std::max<std::int64_t>(1, counted_));
        m.grad_norm = r.grad_norm;
        m.lr = r.lr;
        m.ms_per_step = 1e3 * seconds_ / static_cast<double>(steps_);
        constexpr double nan = std::numeric_limits<double>::quiet_NaN();
        m.samples_per_second = options_.samples && seconds_ > 0.0 ? samples_ / seconds_ : nan;
        m.flops_per_second = options_.flops_per_sample ? m.samples_per_second * options_.flops_per_sample() : nan;
        m.mfu = options_.peak_flops > 0.0 ? m.flops_per_second / options_.peak_flops : nan;
        if (options_.log != nullptr) {
            JsonLine line;
            if (!options_.kind.empty()) line.field("kind", options_.kind);
            line.field("step", m.step)
                .field("epoch", m.epoch)
                .field("train_loss", m.train_loss)
                .field("grad_norm", m.grad_norm)
                .field("lr", m.lr)
                .field("ms_per_step", m.ms_per_step)
                .field("skipped_steps", m.skipped_steps);
            if (options_.samples) line.field(options_.rate_key, m.samples_per_second);
            if (options_.flops_per_sample) line.field("flops_per_second", m.flops_per_second);
            if (options_.peak_flops > 0.0) line.field("mfu", m.mfu);
            if (options_.fields) options_.fields(run, line);
            options_.log->write(line);
        }
        if (options_.on_line) options_.on_line(run, m);
        loss_sum_ = 0.0;
        seconds_ = 0.0;
        samples_ = 0.0;
        counted_ = 0;
        steps_ = 0;
    }

    /// The last interval's numbers.
    const IntervalMetrics& last() const { return last_; }

    /// The interval's loss so far, for a checkpoint: a run resumed from it reports the same
    /// train_loss as one that was not interrupted (the timings restart).
    nlohmann::json state() const { return {{"loss_sum", loss_sum_}, {"loss_steps", counted_}}; }
    /// Takes back what state() returned (the step count must be the checkpoint's).
    void restore(const nlohmann::json& state) {
        check(state.is_object() && state.contains("loss_sum") && state["loss_sum"].is_number() &&
                  state.contains("loss_steps") && state["loss_steps"].is_number_integer(),
              "MetricsEvery::restore", "expected {\"loss_sum\": number, \"loss_steps\": integer}, got ",
              state.dump());
        loss_sum_ = state["loss_sum"].get<double>();
        counted_ = state["loss_steps"].get<std::int64_t>();
    }

private:
    Options options_;
    IntervalMetrics last_;
    double loss_sum_ = 0.0;
    double seconds_ = 0.0;
    double samples_ = 0.0;
    std::int64_t counted_ = 0;
    std::int64_t steps_ = 0;
};

/// Checkpoints every `every` steps (and at finish()) in a folder, named
/// "<prefix>-step<00000123>.safetensors", keeping the newest `keep_last` (0: all). The
/// folder is created, and checked writable, when the callback is built.
/// The files "<stem>-stepNNNNNNNN<ext>" (eight digits) in `dir`, oldest first: the step
/// checkpoints CheckpointEvery and the trainers' --keep-last write.
inline std::vector<std::filesystem::path> step_checkpoint_files(const std::filesystem::path& dir,
                                                                const std::string& stem, const std::string& ext) {
    std::vector<std::filesystem::path> out;
    std::error_code ec;
    const std::string head = stem + "-step";
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
        const std::string name = e.path().filename().string();
        if (name.size() == head.size() + 8 + ext.size() && name.starts_with(head) && name.ends_with(ext) &&
            std::all_of(name.begin() + static_cast<std::ptrdiff_t>(head.size()),
                        name.begin() + static_cast<std::ptrdiff_t>(head.size() + 8),
                        [](char c) { return c >= '0' && c <= '9'; }))
            out.push_back(e.path());
    }
    std::sort(out.begin(), out.end());
    return out;
}

template <class T>
class CheckpointEvery : public RunCallback<T> {
public:
    struct Options {
        std::filesystem::path dir;
        std::string prefix = "checkpoint";
        std::int64_t every = 0;  // 0: only at finish()
        int keep_last = 0;       // 0: keep every checkpoint
        bool at_end = true;      // also save at finish()
        /// The caller's extra JSON at save time (their loop's own state).
        std::function<nlohmann::json()> extra = {};
    };

    explicit CheckpointEvery(Options options) : options_(std::move(options)) {
        constexpr std::string_view what = "CheckpointEvery";
        check(options_.every >= 0, what, "expected every >= 0, got ", options_.every);
        check(options_.keep_last >= 0, what, "expected keep_last >= 0, got ", options_.keep_last);
        check(!options_.prefix.empty() && options_.prefix.find('/') == std::string::npos, what,
              "expected a prefix without '/', got '", options_.prefix, "'");
        std::error_code ec;
        std::filesystem::create_directories(options_.dir, ec);
        if (ec)
            throw Error(detail::concat(what, ": cannot create the folder '", options_.dir.string(),
                                       "': ", ec.message()));
        check_writable(path_for(0), what);
    }

    void on_step_end(TrainingRun<T>& run, const StepResult& r) override {
        if (options_.every > 0 && !r.skipped && r.step % options_.every == 0) save(run);
    }
    void on_train_end(TrainingRun<T>& run) override {
        if (options_.at_end && last_saved_step_ != run.global_step()) save(run);
    }

    /// The file of the checkpoint at `step`.
    std::filesystem::path path_for(std::int64_t step) const {
        char buf[32];
        std::snprintf(buf, sizeof buf, "-step%08lld.safetensors", static_cast<long long>(step));
        return options_.dir / (options_.prefix + buf);
    }
    /// The newest checkpoint this callback's folder holds (empty if none).
    std::filesystem::path latest() const {
        const auto all = existing();
        return all.empty() ? std::filesystem::path() : all.back();
    }

private:
    void save(TrainingRun<T>& run) {
        run.save(path_for(run.global_step()).string(),
                 options_.extra ? options_.extra() : nlohmann::json::object());
        last_saved_step_ = run.global_step();
        if (options_.keep_last <= 0) return;
        auto all = existing();
        for (std::size_t i = 0; i + static_cast<std::size_t>(options_.keep_last) < all.size(); ++i) {
            std::error_code ec;
            std::filesystem::remove(all[i], ec);  // a checkpoint that cannot be removed stays
        }
    }

    // Every "<prefix>-stepNNNNNNNN.safetensors" in the folder, oldest first.
    std::vector<std::filesystem::path> existing() const {
        return step_checkpoint_files(options_.dir, options_.prefix, ".safetensors");
    }

    Options options_;
    std::int64_t last_saved_step_ = -1;
};

/// Stops the run when a metric (lower is better) has not improved by more than
/// `min_delta` for `patience` evaluations, evaluated every `every` steps.
template <class T>
class EarlyStopping : public RunCallback<T> {
public:
    using Metric = std::function<double(TrainingRun<T>&)>;

    EarlyStopping(std::int64_t every, Metric metric, int patience, double min_delta = 0.0)
        : every_(every), metric_(std::move(metric)), patience_(patience), min_delta_(min_delta) {
        constexpr std::string_view what = "EarlyStopping";
        check(every >= 1, what, "expected every >= 1, got ", every);
        check(patience >= 1, what, "expected patience >= 1, got ", patience);
        check(std::isfinite(min_delta) && min_delta >= 0.0, what, "expected min_delta >= 0, got ", min_delta);
        check(static_cast<bool>(metric_), what, "the metric function is empty");
    }

    void on_step_end(TrainingRun<T>& run, const StepResult& r) override {
        if (r.skipped || r.step % every_ != 0) return;
        const double v = metric_(run);
        last_ = v;
        if (v < best_ - min_delta_) {
            best_ = v;
            best_step_ = r.step;
            bad_ = 0;
            return;
        }
        if (++bad_ >= patience_)
            run.request_stop(detail::concat("early stopping: no improvement over ", best_, " (step ",
                                            best_step_, ") in ", bad_, " evaluations"));
    }

    double best() const { return best_; }
    std::int64_t best_step() const { return best_step_; }
    double last() const { return last_; }

private:
    std::int64_t every_;
    Metric metric_;
    int patience_;
    double min_delta_;
    double best_ = std::numeric_limits<double>::infinity();
    double last_ = std::numeric_limits<double>::quiet_NaN();
    std::int64_t best_step_ = -1;
    int bad_ = 0;
};

}  // namespace lowrank
