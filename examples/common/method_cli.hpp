#pragma once
// The training method of an example program (--method and each method's options), shared
// by lowrank-mlp and lowrank-gpt2: the command line binds straight to the policies' option
// structs, so a flag's default is the policy's own (docs/methods/), and make_policies
// turns the choice into the rank policies that act on the selected layers.

#include <lowrank/policy/policies.hpp>

#include <CLI/CLI.hpp>

#include "cli_checks.hpp"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace lowrank::examples {

inline const std::vector<std::string>& method_names() {
    static const std::vector<std::string> names{"dense",      "lora", "relora",   "inrank",
                                                "cuttlefish", "sst",  "deeplora", "galore"};
    return names;
}

struct MethodConfig {
    std::string method = "dense";
    Index rank = 0;  // 0: the program's default (a quarter of the width)
    LoraOptions lora{};
    ReLoraOptions relora{};
    InRankOptions inrank{};
    std::string inrank_cadence = "forward_calls";
    CuttlefishOptions cuttlefish{};
    std::string cuttlefish_preset = "none";
    std::string cuttlefish_rank_rule = "scaled";
    std::string cuttlefish_track_pattern;  // empty: track the factorizable layers
    SstOptions sst{};
    std::string sst_sampling = "mixed";
    std::string sst_rewarm_scope = "all";
    std::string sst_init = "svd";
    double sst_prune = 0.0;  // after training, sigma_i below this set to zero (0: no pruning)
    DeepLoraOptions deeplora{};
    std::string deeplora_init = "orthogonal";
    double deeplora_weight_decay = 0.0;  // DeepLoraOptions::weight_decay (the authors': 0)
    GaLoreOptions galore{};
};

/// Adds --method, --rank and every method's options to `app`, bound to `m`; each method's
/// options form an option group of their own in --help.
inline void add_method_options(CLI::App& app, MethodConfig& m, const std::string& rank_default_help) {
    app.add_option("--method", m.method, "How the selected layers are trained (docs/methods/)")
        ->check(CLI::IsMember(method_names()))
        ->capture_default_str();
    app.add_option("--rank", m.rank,
                   "Rank of the low-rank methods (lora, relora, sst, galore; deeplora with "
                   "--deeplora-compress: the compressed width 2r); 0: " +
                       rank_default_help)
        ->check(non_negative)
        ->capture_default_str();

    CLI::Option_group* lora = app.add_option_group("lora", "LoRA and ReLoRA (docs/methods/lora.md)");
    lora->add_option("--lora-alpha", m.lora.alpha,
                     "lora, relora: alpha, the factors' scale is alpha / rank (default: rank)");
    lora->add_flag("!--lora-freeze-bias", m.lora.train_bias,
                   "lora, relora: freeze the converted layers' biases (PEFT's bias=\"none\"; default: they "
                   "train)");
    CLI::Option_group* relora = app.add_option_group("relora", "ReLoRA (docs/methods/relora.md)");
    relora->add_option("--relora-period", m.relora.period, "relora: optimizer steps between merges")
        ->check(positive)
        ->capture_default_str();
    relora->add_option("--relora-rewarm", m.relora.rewarm_steps, "relora: LR re-warm-up steps after a merge")
        ->check(non_negative)
        ->capture_default_str();
    relora->add_option("--relora-state-reset", m.relora.state_reset,
                       "relora: share of each factor moment zeroed at a merge, in [0, 1]: 1 a full reset, "
                       "below 1 the smallest entries by magnitude with the step count kept (the authors' "
                       "--optimizer_magnitude_pruning 0.9)")
        ->check(CLI::Range(0.0, 1.0))
        ->capture_default_str();

    CLI::Option_group* inrank = app.add_option_group("inrank", "InRank (docs/methods/inrank.md)");
    inrank->add_option("--inrank-threshold", m.inrank.threshold, "inrank: explained ratio alpha to reach")
        ->check(CLI::Range(0.0, 1.0))
        ->capture_default_str();
    inrank->add_option("--inrank-initial-rank", m.inrank.initial_rank, "inrank: rank r at the start")
        ->check(positive)
        ->capture_default_str();
    inrank->add_option("--inrank-buffer", m.inrank.buffer, "inrank: buffer columns b (0: max(2, d / 8))")
        ->check(non_negative)
        ->capture_default_str();
    inrank->add_option("--inrank-warmup", m.inrank.warmup,
                       "inrank: forward calls (or optimizer steps, see --inrank-cadence) before the first "
                       "rank check")
        ->check(non_negative)
        ->capture_default_str();
    inrank->add_option("--inrank-gap", m.inrank.gap,
                       "inrank: forward calls (or optimizer steps) between rank checks")
        ->check(positive)
        ->capture_default_str();
    inrank->add_option("--inrank-cadence", m.inrank_cadence,
                       "inrank: the unit of --inrank-warmup and --inrank-gap: forward_calls (the "
                       "authors') or optimizer_steps")
        ->check(CLI::IsMember({"forward_calls", "optimizer_steps"}))
        ->capture_default_str();
    inrank->add_option("--inrank-forward-calls-per-step", m.inrank.forward_calls_per_step,
                       "inrank: forward calls per optimizer step the cadence counts (the authors' GPT-2 "
                       "runs: 8 micro-batches)")
        ->check(positive)
        ->capture_default_str();
    inrank->add_option("--inrank-stage1-steps", m.inrank.stage1_steps,
                       "inrank: optimizer steps of rank growth before the cut to fixed rank (0: count "
                       "--inrank-stage1-epochs instead)")
        ->check(non_negative)
        ->capture_default_str();
    inrank->add_option("--inrank-stage1-epochs", m.inrank.stage1_epochs,
                       "inrank: epochs of rank growth before the cut to fixed rank (0: grow throughout)")
        ->check(non_negative)
        ->capture_default_str();
    inrank->add_flag("!--inrank-no-grow", m.inrank.grow,
                     "inrank: the fixed-rank control: --inrank-initial-rank columns, no buffer, no rank "
                     "check");
    inrank->add_flag("--inrank-zero-bias", m.inrank.zero_bias,
                     "inrank: start the converted layers' biases at 0, as the authors' layer (default: keep "
                     "the model's)");
    inrank->add_flag("--inrank-keep-base", m.inrank.keep_base,
                     "inrank: keep the layer's weight as a frozen base W0 + U V^T (default: the efficient "
                     "form U V^T, which discards it)");

    CLI::Option_group* cuttlefish =
        app.add_option_group("cuttlefish", "Cuttlefish (docs/methods/cuttlefish.md)");
    cuttlefish->add_option("--cuttlefish-window", m.cuttlefish.window,
                           "cuttlefish: EMA span w and fewest history entries")
        ->check(positive)
        ->capture_default_str();
    cuttlefish->add_option("--cuttlefish-tail", m.cuttlefish.tail, "cuttlefish: derivatives averaged, L <= w")
        ->check(positive)
        ->capture_default_str();
    cuttlefish->add_option("--cuttlefish-threshold", m.cuttlefish.threshold,
                           "cuttlefish: tau, ranks per tracking point")
        ->check(non_negative)
        ->capture_default_str();
    cuttlefish->add_option("--cuttlefish-track-steps", m.cuttlefish.track_every_steps,
                           "cuttlefish: track stable ranks every N steps (0: every epoch)")
        ->check(non_negative)
        ->capture_default_str();
    cuttlefish->add_option("--cuttlefish-rewarm", m.cuttlefish.rewarm_steps,
                           "cuttlefish: optimizer steps of LR re-warm-up after the switch (0: none)")
        ->check(non_negative)
        ->capture_default_str();
    cuttlefish->add_option("--cuttlefish-rewarm-start", m.cuttlefish.rewarm_start,
                           "cuttlefish: the re-warm-up's first multiple of the lr, in [0, 1) (the authors': "
                           "0.25, from 1 / scale_factor, over 5 epochs)")
        ->check(below_one)
        ->capture_default_str();
    cuttlefish->add_option("--cuttlefish-frobenius", m.cuttlefish.frobenius_decay,
                           "cuttlefish: Frobenius decay lambda on the factors after the switch (0: off)")
        ->check(non_negative)
        ->capture_default_str();
    cuttlefish->add_option("--cuttlefish-min-speedup", m.cuttlefish.min_speedup,
                           "cuttlefish: factorize a layer only if dense / low-rank FLOPs reach this")
        ->check(non_negative)
        ->capture_default_str();
    cuttlefish->add_option("--cuttlefish-preset", m.cuttlefish_preset,
                           "cuttlefish: the authors' detector: cifar (w 15, L 11, tau 0.1) or imagenet (w 5, "
                           "L 5, tau 0.33, rank >= d / 5), both with the initial weight in the history and "
                           "tracking per epoch; none: the options as given")
        ->check(CLI::IsMember({"none", "cifar", "imagenet"}))
        ->capture_default_str();
    cuttlefish->add_flag("--cuttlefish-init-in-history", m.cuttlefish.init_in_history,
                         "cuttlefish: start each stable-rank history with the initial weight (as the authors)");
    cuttlefish->add_option("--cuttlefish-rank-rule", m.cuttlefish_rank_rule,
                           "cuttlefish: scaled (ceil(srank * xi), the paper's) or vanilla (floor(srank))")
        ->check(CLI::IsMember({"scaled", "vanilla"}))
        ->capture_default_str();
    cuttlefish->add_option("--cuttlefish-rank-floor", m.cuttlefish.rank_floor,
                           "cuttlefish: a factorized layer's rank is at least ceil(this * d), 0 <= f <= 1 (0: none; "
                           "the imagenet preset's is 0.2)")
        ->check(non_negative)
        ->capture_default_str();
    cuttlefish->add_option("--cuttlefish-track-pattern", m.cuttlefish_track_pattern,
                           "cuttlefish: regex of the layer names whose stable ranks decide the switch (any "
                           "role); empty: the factorized layers");
    cuttlefish->add_option("--cuttlefish-factor-lr-scale", m.cuttlefish.factor_lr_scale,
                           "cuttlefish: the factors' lr after the switch as a multiple of their dense group's")
        ->check(positive)
        ->capture_default_str();
    cuttlefish->add_flag("--cuttlefish-reset-optimizer", m.cuttlefish.reset_optimizer_at_switch,
                         "cuttlefish: zero every parameter's optimizer state at the switch (the authors build a "
                         "new optimizer)");

    CLI::Option_group* sst = app.add_option_group("sst", "SST (docs/methods/sst.md)");
    sst->add_option("--sst-sampling", m.sst_sampling,
                    "sst: how the active singular vectors are chosen: drawn (sigma, mixed, uniform), the "
                    "top r by sigma (top), or the next r in order (sequential)")
        ->check(CLI::IsMember({"sigma", "mixed", "uniform", "top", "sequential"}))
        ->capture_default_str();
    sst->add_flag("--sst-sigma-only", m.sst.sigma_only,
                  "sst: train the singular values alone (U, V frozen; no sampling, no re-SVD)");
    sst->add_flag("!--sst-plain-gradient", m.sst.enhanced_gradient,
                  "sst: the plain autograd gradient of the active U, V columns (sigma_i G v_i) instead of "
                  "the enhanced one (G v_i), the paper's ablation");
    sst->add_option("--sst-rewarm-scope", m.sst_rewarm_scope,
                    "sst: what the re-warm-up at each iteration start ramps: all (the schedule, every "
                    "group) or spectral (only the SST layers' U, V, sigma, in a group of their own)")
        ->check(CLI::IsMember({"all", "spectral"}))
        ->capture_default_str();
    sst->add_option("--sst-init", m.sst_init,
                    "sst: the factors at the switch: svd (the weight's SVD, the same function) or random "
                    "(sigma from that SVD, U and V random unit-length columns, not orthogonal: the paper's "
                    "ablation)")
        ->check(CLI::IsMember({"svd", "random"}))
        ->capture_default_str();
    sst->add_option("--sst-prune", m.sst_prune,
                    "sst: after training, set every singular value below this (absolute) to zero, log a "
                    "'prune' event per layer and evaluate again (the paper's pruning for a smaller model; "
                    "0: none)")
        ->check(non_negative)
        ->capture_default_str();
    sst->add_option("--sst-iteration-steps", m.sst.iteration_steps, "sst: T3, optimizer steps per iteration")
        ->check(positive)
        ->capture_default_str();
    sst->add_option("--sst-round-iterations", m.sst.round_iterations,
                    "sst: T2, iterations per round before a re-SVD (0: ceil(d / rank))")
        ->check(non_negative)
        ->capture_default_str();
    sst->add_option("--sst-rewarm", m.sst.rewarm_steps, "sst: LR re-warm-up steps at each iteration start")
        ->check(non_negative)
        ->capture_default_str();

    CLI::Option_group* deeplora = app.add_option_group("deeplora", "Deep LoRA (docs/methods/deep_lora.md)");
    deeplora->add_option("--deeplora-depth", m.deeplora.depth, "deeplora: factors L of the factorization")
        ->check(CLI::Range(Index{2}, Index{16}))
        ->capture_default_str();
    deeplora->add_option("--deeplora-width", m.deeplora.width,
                         "deeplora: width w of the factors (0: max(out, in), the authors' default); "
                         "--deeplora-width 2r without --deeplora-compress is the narrow random ablation")
        ->check(non_negative)
        ->capture_default_str();
    deeplora->add_option("--deeplora-epsilon", m.deeplora.epsilon, "deeplora: scale of the orthogonal init")
        ->check(positive)
        ->capture_default_str();
    deeplora->add_option("--deeplora-init", m.deeplora_init,
                         "deeplora: orthogonal (every factor eps-orthogonal) or lora (depth 2: the authors' "
                         "LoRA baseline, N(0, 1) and zero factors)")
        ->check(CLI::IsMember({"orthogonal", "lora"}))
        ->capture_default_str();
    deeplora->add_flag("--deeplora-compress", m.deeplora.compress,
                       "deeplora: compress to width --rank (2r) at the first step; the bases P, Q stay "
                       "frozen unless --deeplora-gamma > 0 (the authors' compressed run: "
                       "--deeplora-lr-scale 100 --deeplora-gamma 0.01, docs/methods/deep_lora.md)");
    deeplora->add_option("--deeplora-gamma", m.deeplora.gamma,
                         "deeplora: lr multiplier of the outer bases after compression (0: frozen)")
        ->check(non_negative)
        ->capture_default_str();
    deeplora->add_option("--deeplora-lr-scale", m.deeplora.lr_scale,
                         "deeplora: the factors' lr as a multiple of --lr")
        ->check(positive)
        ->capture_default_str();
    deeplora->add_option("--deeplora-weight-decay", m.deeplora_weight_decay,
                         "deeplora: weight decay of the factors")
        ->check(non_negative)
        ->capture_default_str();
    deeplora->add_flag("!--deeplora-no-base", m.deeplora.keep_base,
                       "deeplora: W = W_L...W_1 alone, discarding the layer's weight (default: W0 + "
                       "W_L...W_1)");

    CLI::Option_group* galore = app.add_option_group("galore", "GaLore (docs/methods/galore.md)");
    galore->add_option("--galore-gap", m.galore.gap, "galore: optimizer steps between refreshes of the basis")
        ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 40))
        ->capture_default_str();
    galore->add_option("--galore-scale", m.galore.scale, "galore: alpha, the scale of the projected-back update")
        ->check(CLI::Range(1e-12, 1e12))
        ->capture_default_str();
    galore->add_flag("--galore-reset-moments", m.galore.reset_moments,
                     "galore: zero Adam's moments at each refresh of the basis (default: keep them, as the "
                     "paper)");
}

/// m.cuttlefish with the options bound as text (preset, rank rule, tracked layers) applied.
inline CuttlefishOptions cuttlefish_options(const MethodConfig& m) {
    CuttlefishOptions o = m.cuttlefish;
    o.preset = m.cuttlefish_preset == "cifar"      ? CuttlefishPreset::cifar
               : m.cuttlefish_preset == "imagenet" ? CuttlefishPreset::imagenet
                                                   : CuttlefishPreset::none;
    o.rank_rule = m.cuttlefish_rank_rule == "vanilla" ? CuttlefishRankRule::vanilla : CuttlefishRankRule::scaled;
    if (!m.cuttlefish_track_pattern.empty()) o.track_select = LayerSelector{.pattern = m.cuttlefish_track_pattern};
    return o;
}

/// m.inrank with the options bound as text (the cadence) applied.
inline InRankOptions inrank_options(const MethodConfig& m) {
    InRankOptions o = m.inrank;
    o.cadence = m.inrank_cadence == "optimizer_steps" ? InRankCadence::optimizer_steps
                                                      : InRankCadence::forward_calls;
    return o;
}

/// Refuses a method option that the chosen method would ignore after training.
inline void check_method_options(const MethodConfig& m) {
    check(m.sst_prune == 0.0 || m.method == "sst", "--sst-prune",
          "prunes SST's singular values: expected --method sst, got --method ", m.method);
}

/// --sst-prune: after training, Sst::prune of the run's SST policy (every singular value below
/// `threshold` set to zero, one "prune" event per layer in the run's rank log). Returns how
/// many were pruned in all. check_method_options() allows --sst-prune only with --method sst.
template <class T>
Index prune_sst(PolicyList<T>& policies, TrainingContext<T>& ctx, double threshold) {
    auto* sst = policies.template find<Sst<T>>();
    check(sst != nullptr, "--sst-prune", "expected the run to hold an sst policy, it holds none");
    return sst->prune(ctx, threshold);
}

/// The policies of m.method acting on the layers `select` names (none for dense).
/// `default_rank` is used when m.rank is 0.
template <class T>
PolicyList<T> make_policies(const MethodConfig& m, Index default_rank, const LayerSelector& select,
                            std::uint64_t seed) {
    const Index rank = m.rank > 0 ? m.rank : std::max<Index>(1, default_rank);
    PolicyList<T> list;
    if (m.method == "lora") {
        auto o = m.lora;
        o.rank = rank;
        o.select = select;
        o.seed = seed;
        list.template add<Lora<T>>(o);
    } else if (m.method == "relora") {
        auto o = m.relora;
        o.rank = rank;
        o.alpha = m.lora.alpha;
        o.train_bias = m.lora.train_bias;
        o.select = select;
        o.seed = seed;
        list.template add<ReLora<T>>(o);
    } else if (m.method == "inrank") {
        auto o = inrank_options(m);  // InRank chooses its own ranks: --rank does not apply
        o.two_stage = o.stage1_steps > 0 || o.stage1_epochs > 0;
        o.select = select;
        o.seed = seed;
        list.template add<InRank<T>>(o);
    } else if (m.method == "cuttlefish") {
        auto o = cuttlefish_options(m);  // its ranks come from the stable ranks
        o.select = select;
        list.template add<Cuttlefish<T>>(o);
    } else if (m.method == "sst") {
        auto o = m.sst;
        o.rank = rank;
        o.sampling = m.sst_sampling == "sigma"        ? SstSampling::sigma
                     : m.sst_sampling == "uniform"    ? SstSampling::uniform
                     : m.sst_sampling == "top"        ? SstSampling::top
                     : m.sst_sampling == "sequential" ? SstSampling::sequential
                                                      : SstSampling::mixed;
        o.rewarm_scope = m.sst_rewarm_scope == "spectral" ? SstRewarmScope::spectral : SstRewarmScope::all;
        o.init = m.sst_init == "random" ? SstInit::random : SstInit::svd;
        o.rewarm_steps = std::min(o.rewarm_steps, o.iteration_steps);  // a longer one never ends
        o.select = select;
        o.seed = seed;
        list.template add<Sst<T>>(o);
    } else if (m.method == "deeplora") {
        auto o = m.deeplora;
        o.rank = std::max<Index>(1, rank / 2);  // compressed 2r wide: the update's rank stays <= rank
        o.init = m.deeplora_init == "lora" ? DeepLoraInit::lora : DeepLoraInit::orthogonal;
        o.weight_decay = m.deeplora_weight_decay;
        o.select = select;
        o.seed = seed;
        list.template add<DeepLora<T>>(o);
    } else if (m.method == "galore") {
        auto o = m.galore;
        o.rank = rank;
        o.select = select;
        list.template add<GaLore<T>>(o);
    } else if (m.method != "dense") {
        throw Error("unknown method '" + m.method + "'");
    }
    return list;
}

}  // namespace lowrank::examples
