#pragma once
// A one-line progress bar for training loops, on stderr, by epoch or for a whole run of
// steps, its rate in the unit the loop counts (samples, tokens):
//
//     epoch 3/10 [#########.........]  234/469  loss 0.4312  14.2k samples/s  00:05<00:04
//     step [###...............]  150/1000  loss 6.1032  612 tokens/s  04:05<23:10  <status>
//
// (a status the loop sets, such as its last metrics line, follows the bar's own text).
// It draws only when its stream is a terminal (so logs and pipes stay clean), redraws at
// most every min_interval seconds (drawing costs a write system call; a step can take
// less than a millisecond), and erases itself when cleared so that a summary line can take
// its place.

#include <lowrank/core/error.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#if __has_include(<unistd.h>)
#include <unistd.h>
#define LOWRANK_HAS_ISATTY 1
#endif

namespace lowrank {

struct ProgressOptions {
    std::FILE* stream = stderr;
    /// False hides the bar altogether (a --quiet flag).
    bool enabled = true;
    /// Draw even when the stream is not a terminal (tests, or a terminal isatty misses).
    bool force = false;
    /// Seconds between redraws.
    double min_interval = 0.1;
    int bar_width = 20;
    /// What a step's `samples` count, for the rate: "samples", "tokens", ...
    std::string unit = "samples";
};

namespace detail {

/// "mm:ss", or "h:mm:ss" from an hour on.
inline std::string format_duration(double seconds) {
    if (!std::isfinite(seconds) || seconds < 0) return "--:--";
    const auto s = static_cast<long long>(seconds + 0.5);
    char buf[32];
    if (s >= 3600)
        std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", s / 3600, (s / 60) % 60, s % 60);
    else
        std::snprintf(buf, sizeof buf, "%02lld:%02lld", s / 60, s % 60);
    return buf;
}

/// 950, 14.2k, 3.10M: a rate in three significant figures.
inline std::string format_rate(double v) {
    char buf[32];
    if (!std::isfinite(v) || v < 0)
        std::snprintf(buf, sizeof buf, "-");
    else if (v < 1e3)
        std::snprintf(buf, sizeof buf, "%.0f", v);
    else if (v < 1e6)
        std::snprintf(buf, sizeof buf, "%.*fk", v < 1e4 ? 2 : v < 1e5 ? 1 : 0, v / 1e3);
    else
        std::snprintf(buf, sizeof buf, "%.*fM", v < 1e7 ? 2 : v < 1e8 ? 1 : 0, v / 1e6);
    return buf;
}

inline bool is_terminal(std::FILE* stream) {
#ifdef LOWRANK_HAS_ISATTY
    return stream != nullptr && isatty(fileno(stream)) == 1;
#else
    (void)stream;
    return false;
#endif
}

}  // namespace detail

class ProgressBar {
public:
    using Clock = std::chrono::steady_clock;

    explicit ProgressBar(const ProgressOptions& options = {}) : options_(options) {
        check(options.bar_width >= 0, "ProgressBar", "expected bar_width >= 0, got ", options.bar_width);
        visible_ = options.enabled && options.stream != nullptr &&
                   (options.force || detail::is_terminal(options.stream));
    }
    ProgressBar(const ProgressBar&) = delete;
    ProgressBar& operator=(const ProgressBar&) = delete;
    ~ProgressBar() { clear(); }

    /// Starts a bar for a run of `total_steps` steps that has no epochs ("step [...]").
    void begin(std::int64_t total_steps) { begin_epoch(0, 0, total_steps); }

    /// Starts an epoch (1-based `epoch` of `epochs`; epochs 0: a run without epochs, see
    /// begin) of `total_steps` steps; resets the running loss, the sample count and the
    /// clock.
    void begin_epoch(std::int64_t epoch, std::int64_t epochs, std::int64_t total_steps) {
        epoch_ = epoch;
        epochs_ = epochs;
        total_ = total_steps;
        step_ = 0;
        samples_ = 0;
        loss_sum_ = 0.0;
        start_ = Clock::now();
        last_draw_ = start_;
        drawn_once_ = false;
    }

    /// Records that step `step` (1-based) is done, with its mean loss over `samples`
    /// samples, and redraws if min_interval has passed (or this was the last step).
    void update(std::int64_t step, double loss, std::int64_t samples) {
        step_ = step;
        samples_ += samples;
        loss_sum_ += loss * static_cast<double>(samples);
        if (!visible_) return;
        const auto now = Clock::now();
        const double since = std::chrono::duration<double>(now - last_draw_).count();
        if (drawn_once_ && since < options_.min_interval && step_ < total_) return;
        last_draw_ = now;
        draw(now);
    }

    /// Erases the bar (call before printing a line of your own). Idempotent.
    void clear() {
        if (!visible_ || !shown_) return;
        std::fputs("\r\033[K", options_.stream);
        std::fflush(options_.stream);
        shown_ = false;
    }

    /// Ends the epoch's bar: erases it.
    void finish() { clear(); }

    /// Text the bar shows after its own, until replaced ("grad_norm 0.83  12.1 ms/step"):
    /// a trainer's metrics line, on a terminal. Shown from the next redraw.
    void set_status(std::string status) { status_ = std::move(status); }
    const std::string& status() const { return status_; }

    /// Whether the bar draws at all (enabled, and the stream is a terminal or forced).
    bool visible() const { return visible_; }
    /// The sample-weighted mean loss of the epoch so far.
    double running_loss() const { return samples_ > 0 ? loss_sum_ / static_cast<double>(samples_) : 0.0; }
    std::int64_t samples() const { return samples_; }
    double elapsed_seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

private:
    void draw(Clock::time_point now) {
        const double elapsed = std::chrono::duration<double>(now - start_).count();
        const double frac = total_ > 0 ? std::clamp(static_cast<double>(step_) / static_cast<double>(total_), 0.0, 1.0) : 0.0;
        const double rate = elapsed > 0 ? static_cast<double>(samples_) / elapsed : 0.0;
        const double eta = step_ > 0 ? elapsed / static_cast<double>(step_) * static_cast<double>(total_ - step_) : -1.0;

        std::string line = epochs_ > 0 ? "\r\033[Kepoch " + std::to_string(epoch_) + "/" + std::to_string(epochs_) + " ["
                                       : std::string("\r\033[Kstep [");
        const int filled = static_cast<int>(frac * options_.bar_width);
        line.append(static_cast<std::size_t>(filled), '#');
        line.append(static_cast<std::size_t>(options_.bar_width - filled), '.');
        char buf[160];
        std::snprintf(buf, sizeof buf, "] %lld/%lld  loss %.4f  %s %.24s/s  %s<%s",
                      static_cast<long long>(step_), static_cast<long long>(total_), running_loss(),
                      detail::format_rate(rate).c_str(), options_.unit.c_str(),
                      detail::format_duration(elapsed).c_str(), detail::format_duration(eta).c_str());
        line += buf;
        if (!status_.empty()) line += "  " + status_;
        std::fputs(line.c_str(), options_.stream);
        std::fflush(options_.stream);
        shown_ = true;
        drawn_once_ = true;
    }

    ProgressOptions options_;
    std::string status_;
    bool visible_ = false;
    bool shown_ = false;
    bool drawn_once_ = false;
    std::int64_t epoch_ = 0, epochs_ = 0, total_ = 0, step_ = 0, samples_ = 0;
    double loss_sum_ = 0.0;
    Clock::time_point start_ = Clock::now();
    Clock::time_point last_draw_ = start_;
};

}  // namespace lowrank
