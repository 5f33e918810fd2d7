#pragma once
// UpdateRankTracker: the rank of each selected layer's cumulative update W(t) - W(0) over a
// run, the observation InRank starts from (docs/methods/inrank.md, "The observation").
//
// W(0) is each layer's dense weight when the run begins (after the policies have converted
// their layers). At every epoch end, or every `every` steps, the tracker takes all
// singular values s of W(t) - W(0) (length d = min(out, in)) and, for each alpha, the
// alpha-rank: the smallest k with InRank's explained ratio (inrank_explained_ratio, the
// statistic of InRank's rank check) above alpha. The ratio's variance includes the zero
// singular values, so the alpha-rank of an exactly rank-k update can be below k (a flat
// spectrum of k values explains alpha of the variance with fewer than k of them), and a
// flat full-rank spectrum (zero variance) has alpha-rank 0, as InRank's check treats it.

#include <lowrank/core/error.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/policy/inrank.hpp>
#include <lowrank/policy/rank_policy.hpp>
#include <lowrank/train/metrics_log.hpp>
#include <lowrank/train/run.hpp>

#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lowrank {

/// The smallest k in [0, d] with inrank_explained_ratio(s, k) > alpha, for each alpha (in
/// (0, 1)); s every singular value of a matrix, zero padded to d. k = d always qualifies
/// (its ratio is 1), and a spectrum with zero variance gives 0.
inline std::vector<Index> inrank_alpha_ranks(const Eigen::Ref<const Eigen::VectorXd>& s,
                                             const std::vector<double>& alphas) {
    constexpr std::string_view what = "inrank_alpha_ranks";
    for (const double a : alphas)
        check(std::isfinite(a) && a > 0.0 && a < 1.0, what, "expected every alpha in (0, 1), got ", a);
    std::vector<Index> out(alphas.size(), -1);
    std::size_t left = alphas.size();
    for (Index k = 0; k <= s.size() && left > 0; ++k) {
        const double ratio = inrank_explained_ratio(s, k);
        for (std::size_t i = 0; i < alphas.size(); ++i)
            if (out[i] < 0 && ratio > alphas[i]) {
                out[i] = k;
                --left;
            }
    }
    return out;
}

/// One measurement of one layer.
struct UpdateRankRecord {
    std::int64_t step = 0;
    std::string layer;
    Index d = 0;                // min(out, in): the full rank
    std::vector<Index> ranks;   // the alpha-rank for each of the options' alphas
    double update_norm = 0.0;   // ||W(t) - W(0)||_F
    double initial_norm = 0.0;  // ||W(0)||_F
};

template <class T>
class UpdateRankTracker : public RunCallback<T> {
public:
    struct Options {
        /// The layers to track (all linear slots by default).
        LayerSelector select{};
        /// The explained ratios whose ranks are recorded, each in (0, 1).
        std::vector<double> alphas{0.9};
        /// Measure after every `every` steps; 0: at each epoch end. Either way also at
        /// the start (step 0, an all-zero update) and at the run's end.
        std::int64_t every = 0;
        /// Where the records go, one line per layer and measurement (null: kept only).
        MetricsLog* log = nullptr;
        /// The lines' "kind".
        std::string kind = "update_rank";
    };

    explicit UpdateRankTracker(Options options) : options_(std::move(options)) {
        constexpr std::string_view what = "UpdateRankTracker";
        check(!options_.alphas.empty(), what, "expected at least one alpha, got none");
        for (const double a : options_.alphas)
            check(std::isfinite(a) && a > 0.0 && a < 1.0, what, "expected every alpha in (0, 1), got ", a);
        check(options_.every >= 0, what, "expected every >= 0 (0: at each epoch end), got ", options_.every);
    }

    void on_train_begin(TrainingRun<T>& run) override {
        initial_.clear();
        for (auto& slot : run.context().layers())
            if (options_.select.matches(slot.layer->name(), slot.role))
                initial_.push_back({slot.layer, slot.layer->dense_weight().template cast<double>()});
        if (initial_.empty()) {
            std::string names;
            for (auto& s : run.context().layers())
                names += (names.empty() ? "" : ", ") + s.layer->name() + " (" + s.role + ")";
            throw Error(detail::concat("UpdateRankTracker: the selector (pattern '", options_.select.pattern,
                                       "') matches no layer; the model has: ",
                                       names.empty() ? std::string("no linear slots") : names));
        }
        measure(run.global_step());
    }
    void on_step_end(TrainingRun<T>&, const StepResult& r) override {
        if (options_.every > 0 && !r.skipped && r.step % options_.every == 0) measure(r.step);
    }
    void on_epoch_end(TrainingRun<T>& run) override {
        if (options_.every == 0) measure(run.global_step());
    }
    void on_train_end(TrainingRun<T>& run) override { measure(run.global_step()); }

    /// Every measurement so far, in order (per step, the layers in model order).
    const std::vector<UpdateRankRecord>& records() const { return records_; }
    /// Wall time spent measuring (the SVDs), so that a caller can tell it from training.
    double seconds() const { return seconds_; }
    const Options& options() const { return options_; }

private:
    struct Tracked {
        AnyLinear<T>* layer;
        Eigen::MatrixXd w0;
    };

    void measure(std::int64_t step) {
        check(!initial_.empty(), "UpdateRankTracker", "no W(0): the run has not begun (on_train_begin)");
        if (step == last_step_) return;  // an epoch end and the run's end at the same step
        last_step_ = step;
        const auto start = std::chrono::steady_clock::now();
        for (const Tracked& t : initial_) {
            const Eigen::MatrixXd w = t.layer->dense_weight().template cast<double>();
            check(w.rows() == t.w0.rows() && w.cols() == t.w0.cols(), "UpdateRankTracker",
                  "layer '", t.layer->name(), "' changed shape from ", shape_string(t.w0.rows(), t.w0.cols()),
                  " to ", shape_string(w.rows(), w.cols()));
            const Eigen::MatrixXd delta = w - t.w0;
            UpdateRankRecord rec;
            rec.step = step;
            rec.layer = t.layer->name();
            rec.d = std::min(delta.rows(), delta.cols());
            rec.update_norm = delta.norm();
            rec.initial_norm = t.w0.norm();
            const Eigen::VectorXd s = linalg::singular_values<double>(delta, "UpdateRankTracker");
            rec.ranks = inrank_alpha_ranks(s, options_.alphas);
            if (options_.log != nullptr)
                options_.log->write(JsonLine()
                                        .field("kind", options_.kind)
                                        .field("step", rec.step)
                                        .field("layer", rec.layer)
                                        .field("d", rec.d)
                                        .field("alphas", options_.alphas)
                                        .field("ranks", rec.ranks)
                                        .field("update_norm", rec.update_norm)
                                        .field("initial_norm", rec.initial_norm));
            records_.push_back(std::move(rec));
        }
        seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }

    Options options_;
    std::vector<Tracked> initial_;
    std::vector<UpdateRankRecord> records_;
    std::int64_t last_step_ = -1;
    double seconds_ = 0.0;
};

}  // namespace lowrank
