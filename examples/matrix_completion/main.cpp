// lowrank-matrix-completion: the deep matrix completion test bed of Deep LoRA (arXiv
// 2406.04112, docs/examples/matrix_completion.md, docs/methods/deep_lora.md) at CPU scale.
//
// Target: Phi = the best rank-r approximation of a d x d Gaussian matrix with entries
// N(0, 1), as in the paper (its top singular values are close to 2 sqrt(d): the scale sets
// how fast the factors escape their eps-small init and how fast the bases rotate). A random
// fraction of the entries is observed. Each run fits W = W_L ... W_1 by full-batch gradient descent on
//     1/2 * mean over all d^2 entries of (mask .* (W - Phi))^2
// (the layer applied to the identity gives W^T, so the loss is one autograd graph), with the
// DeepLora policy doing the initialisation and the compression:
//   wide         width d, eps-orthogonal init, no compression
//   compressed   the same wide init, compressed to width 2r at the first step; outer bases
//                at gamma * lr (it runs one extra step: its first one measures the gradient)
//   narrow       width 2r, eps-orthogonal random init, no compression
// each at its own step size, and reports the recovery error ||W - Phi||_F / ||Phi||_F on all
// entries and on the unobserved ones, the first step at which the error on the unobserved
// entries is <= --tolerance (null if never) and the wall time of each run. For the wide run
// it also counts, per factor, the singular values still within --invariant-tol of eps: with
// every entry observed, d - 2r of them (docs/examples/matrix_completion.md, The invariant
// subspace); --expect-invariant makes a different count an error (exit 3).
//
// Progress goes to stderr; stdout holds one line, a JSON object with the results.
// Exit codes: 0 success, 1 runtime error, 2 bad command line.

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/core/memory.hpp>
#include <lowrank/core/threads.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/nn/any_linear.hpp>
#include <lowrank/nn/module.hpp>
#include <lowrank/optim/sgd.hpp>
#include <lowrank/policy/deep_lora.hpp>
#include <lowrank/train/run.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/cli_checks.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <iostream>
#include <new>
#include <numeric>
#include <string>
#include <vector>

namespace {

using lowrank::Index;
using Mat = lowrank::MatrixD;

struct Config {
    // The paper: d 1000, r 5, 20% observed, depth 3, eps 1e-3. Here d 100 and 30% observed
    // (a run in seconds; at d 100, 20% leaves about twice the 2dr - r^2 degrees of freedom)
    // and eps 1e-2 (the escape from the init takes about 1/eps steps: at the paper's 1e-3 the
    // same runs need ten times as many): docs/examples/matrix_completion.md.
    Index d = 100;
    Index rank = 5;
    double observed = 0.3;
    Index depth = 3;
    double epsilon = 1e-2;
    double gamma = 0.1;
    int steps = 5000;
    // The largest step of a grid that still reaches the tolerance at the defaults
    // (docs/examples/matrix_completion.md, Step sizes).
    double lr_wide = 300;
    double lr_compressed = 200;
    double lr_narrow = 300;
    double tolerance = 1e-2;
    bool stop_at_tolerance = false;
    double invariant_tol = 1e-3;
    bool expect_invariant = false;
    std::uint64_t seed = 0;
    int threads = 1;
    int report_every = 250;
    std::vector<std::string> runs{"wide", "compressed", "narrow"};
    bool quiet = false;
};

struct Problem {
    Mat phi;       // the target (d x d)
    Mat mask_t;    // 1 on observed entries, transposed (the graph works with W^T)
    Mat target_t;  // (mask .* Phi)^T
};

struct RunResult {
    std::string name;
    Index width = 0;
    Index final_rank = 0;
    Index trainable = 0;
    double lr = 0.0;
    int steps = 0;
    int steps_to_tolerance = -1;     // -1: not reached
    double seconds_to_tolerance = 0.0;
    double loss = 0.0;
    double error_all = 0.0;
    double error_unobserved = 0.0;
    double seconds = 0.0;
    std::vector<double> history;  // error_all every report_every steps, from step 0
    std::vector<Index> invariant;  // per factor: singular values within invariant_tol of eps
    Mat weight;
};

using Clock = std::chrono::steady_clock;

Problem make_problem(const Config& cfg, lowrank::Rng& rng) {
    const Index d = cfg.d;
    Mat g(d, d);
    lowrank::init::normal<double>(g, rng, 0.0, 1.0);
    const auto f = lowrank::linalg::truncated_svd<double>(g, cfg.rank, "target");
    Problem p;
    p.phi = f.U * f.V.transpose();
    // Exactly round(observed * d^2) entries, chosen without replacement.
    const auto n = static_cast<std::size_t>(d * d);
    const auto k = static_cast<std::size_t>(std::llround(cfg.observed * static_cast<double>(n)));
    std::vector<Index> idx(n);
    std::iota(idx.begin(), idx.end(), Index{0});
    for (std::size_t i = 0; i < k; ++i) std::swap(idx[i], idx[i + rng.below(n - i)]);
    Mat mask = Mat::Zero(d, d);
    for (std::size_t i = 0; i < k; ++i) mask(idx[i] / d, idx[i] % d) = 1.0;
    p.mask_t = mask.transpose();
    p.target_t = mask.cwiseProduct(p.phi).transpose();
    return p;
}

double relative_error(const Mat& w, const Problem& p) { return (w - p.phi).norm() / p.phi.norm(); }

double relative_error_unobserved(const Mat& w, const Problem& p) {
    const Mat hidden = Mat::Ones(p.phi.rows(), p.phi.cols()) - p.mask_t.transpose();
    if (hidden.sum() == 0.0) return relative_error(w, p);  // every entry observed
    return hidden.cwiseProduct(w - p.phi).norm() / hidden.cwiseProduct(p.phi).norm();
}

RunResult run(const std::string& name, const Config& cfg, const Problem& problem, Index width,
              bool compress, double lr) {
    // Wall time counts the initialisation, the compression and the steps, not the error
    // evaluated after every step to find the step that reaches the tolerance.
    auto start = Clock::now();
    Clock::duration measuring{};
    const Index d = cfg.d;
    RunResult out;
    out.name = name;
    out.width = width;
    out.lr = lr;
    // The model is one slot, registered in a Module: it starts dense (as a model would
    // build it); the policy discards that weight (keep_base = false) and puts the deep
    // factorisation in its place.
    lowrank::Rng rng(cfg.seed);
    lowrank::Module<double> model;
    lowrank::AnyLinear<double>& slot = model.register_linear(
        lowrank::Linear<double>("W", d, d, rng, lowrank::LinearOptions{.bias = false}), "hidden");
    lowrank::Sgd<double> opt(model.parameters(), lowrank::SgdOptions{.lr = lr});
    lowrank::TrainingRun<double> training(model, opt);
    // The same seed in every run: the wide and compressed runs share their initial factors.
    training.add<lowrank::DeepLora<double>>({.depth = cfg.depth,
                                             .width = width,
                                             .epsilon = cfg.epsilon,
                                             .rank = cfg.rank,
                                             .gamma = cfg.gamma,
                                             .keep_base = false,
                                             .compress = compress,
                                             .seed = cfg.seed + 1});
    training.begin();  // the factorisation in place before the first error is measured

    const Mat eye = Mat::Identity(d, d);
    // The compressed run's first step only measures the gradient: one more step gives it
    // the same number of updates.
    const int steps = cfg.steps + (compress ? 1 : 0);
    const int offset = compress ? 1 : 0;
    int step = 0;
    for (; step < steps; ++step) {
        if (step >= offset) {
            const auto t0 = Clock::now();
            const Mat w = slot.dense_weight();
            if ((step - offset) % cfg.report_every == 0) out.history.push_back(relative_error(w, problem));
            if (out.steps_to_tolerance < 0 && relative_error_unobserved(w, problem) <= cfg.tolerance) {
                out.steps_to_tolerance = step - offset;
                out.seconds_to_tolerance = std::chrono::duration<double>(t0 - start - measuring).count();
            }
            measuring += Clock::now() - t0;
            if (out.steps_to_tolerance >= 0 && cfg.stop_at_tolerance) break;
        }
        out.loss = training.step([&](lowrank::Graph<double>& g) {
            const auto wt = slot.forward(g, g.input(eye));
            const auto observed = lowrank::mul(g, wt, g.input(problem.mask_t));
            return lowrank::scale(g, lowrank::mse(g, observed, problem.target_t), 0.5);
        }).loss;
        lowrank::check(std::isfinite(out.loss), name, "the loss is not finite at step ", step,
                       ": lower --lr-", name, " (", lr, ")");
    }
    const auto t0 = Clock::now();
    out.weight = slot.dense_weight();
    if (step == steps) {
        if ((steps - offset) % cfg.report_every == 0) out.history.push_back(relative_error(out.weight, problem));
        if (out.steps_to_tolerance < 0 && relative_error_unobserved(out.weight, problem) <= cfg.tolerance) {
            out.steps_to_tolerance = steps - offset;
            out.seconds_to_tolerance = std::chrono::duration<double>(t0 - start - measuring).count();
        }
    }
    measuring += Clock::now() - t0;
    out.seconds = std::chrono::duration<double>(Clock::now() - start - measuring).count();
    out.steps = step - offset;
    if (auto* deep = slot.get_if<lowrank::DeepLowRankLinear<double>>(); deep && !compress) {
        for (const auto& f : deep->factors()) {
            const lowrank::Vector<double> s = lowrank::linalg::singular_values<double>(f.value);
            out.invariant.push_back(static_cast<Index>(
                (((s.array() - cfg.epsilon).abs()) <= cfg.invariant_tol * cfg.epsilon).count()));
        }
    }
    out.final_rank = slot.rank();
    out.trainable = slot.trainable_count();
    out.error_all = relative_error(out.weight, problem);
    out.error_unobserved = relative_error_unobserved(out.weight, problem);
    if (!cfg.quiet)
        std::fprintf(stderr,
                     "%-10s width %4lld -> %3lld  %8lld trainable  lr %-8g error %.3e (unobserved %.3e)  "
                     "tolerance at %s  %.2f s\n",
                     name.c_str(), static_cast<long long>(width), static_cast<long long>(out.final_rank),
                     static_cast<long long>(out.trainable), lr, out.error_all, out.error_unobserved,
                     out.steps_to_tolerance < 0 ? "never" : std::to_string(out.steps_to_tolerance).c_str(),
                     out.seconds);
    return out;
}

int run_all(const Config& cfg) {
    lowrank::tune_allocator();
    lowrank::set_num_threads(cfg.threads);
    lowrank::check(2 * cfg.rank <= cfg.d, "--rank", "2r must be <= d = ", cfg.d, ", got r = ", cfg.rank);
    lowrank::Rng rng(cfg.seed);
    const Problem problem = make_problem(cfg, rng);
    if (!cfg.quiet)
        std::fprintf(stderr,
                     "lowrank-matrix-completion: d %lld, rank %lld, %.0f%% observed, depth %lld, eps %.0e, "
                     "%d steps, gamma %g, tolerance %g\n",
                     static_cast<long long>(cfg.d), static_cast<long long>(cfg.rank), 100.0 * cfg.observed,
                     static_cast<long long>(cfg.depth), cfg.epsilon, cfg.steps, cfg.gamma, cfg.tolerance);

    lowrank::check(!cfg.runs.empty(), "--runs", "expected at least one run");
    std::vector<RunResult> runs;
    for (const auto& name : cfg.runs) {
        if (name == "wide") runs.push_back(run(name, cfg, problem, cfg.d, false, cfg.lr_wide));
        if (name == "compressed") runs.push_back(run(name, cfg, problem, cfg.d, true, cfg.lr_compressed));
        if (name == "narrow") runs.push_back(run(name, cfg, problem, 2 * cfg.rank, false, cfg.lr_narrow));
    }

    // The trajectories side by side.
    if (!cfg.quiet) {
        std::fprintf(stderr, "%6s", "step");
        for (const auto& r : runs) std::fprintf(stderr, "  %10s", r.name.c_str());
        std::fprintf(stderr, "\n");
        std::size_t rows = 0;
        for (const auto& r : runs) rows = std::max(rows, r.history.size());
        for (std::size_t i = 0; i < rows; ++i) {
            std::fprintf(stderr, "%6lld", static_cast<long long>(i) * cfg.report_every);
            for (const auto& r : runs) {
                if (i < r.history.size()) std::fprintf(stderr, "  %10.3e", r.history[i]);
                else std::fprintf(stderr, "  %10s", "-");
            }
            std::fprintf(stderr, "\n");
        }
    }
    const RunResult* wide = nullptr;
    const RunResult* compressed = nullptr;
    for (const auto& r : runs) {
        if (r.name == "wide") wide = &r;
        if (r.name == "compressed") compressed = &r;
    }
    nlohmann::ordered_json result;
    result["d"] = cfg.d;
    result["rank"] = cfg.rank;
    result["observed"] = cfg.observed;
    result["depth"] = cfg.depth;
    result["epsilon"] = cfg.epsilon;
    result["gamma"] = cfg.gamma;
    result["steps"] = cfg.steps;
    result["tolerance"] = cfg.tolerance;
    result["stop_at_tolerance"] = cfg.stop_at_tolerance;
    result["seed"] = cfg.seed;
    result["threads"] = cfg.threads;
    for (const auto& r : runs) {
        nlohmann::ordered_json j;
        j["width"] = r.width;
        j["final_rank"] = r.final_rank;
        j["trainable_params"] = r.trainable;
        j["lr"] = r.lr;
        j["steps"] = r.steps;
        // null when the run never reached the tolerance (its final error is beside it)
        j["steps_to_tolerance"] = r.steps_to_tolerance < 0 ? nlohmann::ordered_json() : nlohmann::ordered_json(r.steps_to_tolerance);
        j["seconds_to_tolerance"] = r.steps_to_tolerance < 0 ? nlohmann::ordered_json() : nlohmann::ordered_json(r.seconds_to_tolerance);
        j["loss"] = r.loss;
        j["error"] = r.error_all;
        j["error_unobserved"] = r.error_unobserved;
        j["seconds"] = r.seconds;
        j["error_history"] = r.history;
        if (!r.invariant.empty()) j["invariant_singular_values"] = r.invariant;
        result[r.name] = j;
    }
    result["invariant_expected"] = cfg.d - 2 * cfg.rank;
    if (wide && compressed) {
        const double gap = (wide->weight - compressed->weight).norm() / problem.phi.norm();
        if (!cfg.quiet) std::fprintf(stderr, "||W_wide - W_compressed||_F / ||Phi||_F = %.3e\n", gap);
        result["wide_compressed_gap"] = gap;
    }
    std::cout << result.dump() << std::endl;
    if (cfg.expect_invariant) {
        lowrank::check(wide != nullptr, "--expect-invariant", "needs the wide run in --runs");
        for (std::size_t l = 0; l < wide->invariant.size(); ++l) {
            if (wide->invariant[l] == cfg.d - 2 * cfg.rank) continue;
            std::fprintf(stderr,
                         "lowrank-matrix-completion: factor %zu of the wide run has %lld singular values within "
                         "%g of eps, expected d - 2r = %lld\n",
                         l + 1, static_cast<long long>(wide->invariant[l]), cfg.invariant_tol,
                         static_cast<long long>(cfg.d - 2 * cfg.rank));
            return 3;
        }
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Config cfg;
    CLI::App app{
        "Deep matrix completion: wide, compressed (Deep LoRA) and narrow deep factorisations of a\n"
        "partially observed low-rank matrix. Progress goes to stderr; stdout is one JSON line.",
        "lowrank-matrix-completion"};
    app.add_option("--d", cfg.d, "Size of the d x d target")
        ->check(CLI::Range(Index{2}, Index{1} << 14))
        ->capture_default_str();
    app.add_option("--rank", cfg.rank, "Rank r of the target (compressed width 2r)")
        ->check(CLI::Range(Index{1}, Index{1} << 13))
        ->capture_default_str();
    app.add_option("--observed", cfg.observed, "Fraction of observed entries")
        ->check(CLI::Range(0.001, 1.0))
        ->capture_default_str();
    app.add_option("--depth", cfg.depth, "Number of factors L")
        ->check(CLI::Range(Index{2}, Index{16}))
        ->capture_default_str();
    app.add_option("--epsilon", cfg.epsilon, "Scale of the orthogonal init")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--gamma", cfg.gamma, "lr multiplier of the compressed run's outer bases (0 freezes them)")
        ->check(lowrank::examples::non_negative)
        ->capture_default_str();
    app.add_option("--steps", cfg.steps, "Gradient-descent steps")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--lr-wide", cfg.lr_wide, "Step size of the wide run, on the mean loss (the sum-loss step times d^2)")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--lr-compressed", cfg.lr_compressed, "Step size of the compressed run's inner factors")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--lr-narrow", cfg.lr_narrow, "Step size of the narrow run")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    double lr_all = 0.0;
    app.add_option("--lr", lr_all, "One step size for all three runs (a --lr-<run> given beside it wins)")
        ->check(lowrank::examples::positive);
    app.add_option("--tolerance", cfg.tolerance,
                   "Recovery tolerance: a run reaches it at the first step with relative error <= this on the "
                   "unobserved entries (on all entries when all are observed)")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_flag("--stop-at-tolerance", cfg.stop_at_tolerance, "End each run at the step that reaches the tolerance");
    app.add_option("--invariant-tol", cfg.invariant_tol,
                   "Relative distance from eps within which a factor singular value counts as unmoved")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_flag("--expect-invariant", cfg.expect_invariant,
                 "Exit 3 unless every factor of the wide run has d - 2r unmoved singular values");
    app.add_option("--seed", cfg.seed, "Seed of the target, the mask and the initialisation")
        ->capture_default_str();
    app.add_option("--threads", cfg.threads, "Threads for GEMM")
        ->check(CLI::Range(1, 1024))
        ->capture_default_str();
    app.add_option("--report-every", cfg.report_every,
                   "Steps between the errors printed in the trajectory table")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--runs", cfg.runs, "Which runs, in order")
        ->check(CLI::IsMember({"wide", "compressed", "narrow"}))
        ->delimiter(',')
        ->capture_default_str();
    app.add_flag("--quiet,-q", cfg.quiet, "Nothing on stderr");

    try {
        app.parse(argc, argv);
        if (app.count("--lr") > 0) {
            if (app.count("--lr-wide") == 0) cfg.lr_wide = lr_all;
            if (app.count("--lr-compressed") == 0) cfg.lr_compressed = lr_all;
            if (app.count("--lr-narrow") == 0) cfg.lr_narrow = lr_all;
        }
    } catch (const CLI::ParseError& e) {
        const int code = app.exit(e);
        return code == 0 ? 0 : 2;
    }
    try {
        return run_all(cfg);
    } catch (const std::bad_alloc&) {
        std::cerr << "lowrank-matrix-completion: error: out of memory (try a smaller --d)\n";
    } catch (const std::exception& e) {
        std::cerr << "lowrank-matrix-completion: error: " << e.what() << "\n";
    }
    return 1;
}
