#pragma once
// The training method of an example program (--method and each method's options), shared
// by lowrank-mlp and lowrank-gpt2: the command line binds straight to the policies' option
// structs, so a flag's default is the policy's own (docs/methods/), and make_policies
// turns the choice into the rank policies that act on the selected layers.

#include <lowrank/policy/policies.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdint>
#include <string>

namespace lowrank::examples {

inline const std::vector<std::string>& method_names() {
    static const std::vector<std::string> names{"dense", "lora", "relora", "inrank", "cuttlefish", "sst", "deeplora"};
    return names;
}

struct MethodConfig {
    std::string method = "dense";
    Index rank = 0;  // 0: the program's default (a quarter of the width)
    LoraOptions lora{};
    ReLoraOptions relora{};
    InRankOptions inrank{};
    CuttlefishOptions cuttlefish{};
    SstOptions sst{};
    std::string sst_sampling = "mixed";
    DeepLoraOptions deeplora{};
};

/// Adds --method, --rank and every method's options to `app`, bound to `m`.
inline void add_method_options(CLI::App& app, MethodConfig& m, const std::string& rank_default_help) {
    app.add_option("--method", m.method, "How the selected layers are trained (docs/methods/)")
        ->check(CLI::IsMember(method_names()))
        ->capture_default_str();
    app.add_option("--rank", m.rank,
                   "Rank of the low-rank methods (lora, relora, sst, deeplora); 0: " + rank_default_help)
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--lora-alpha", m.lora.alpha,
                   "lora, relora: alpha, the factors' scale is alpha / rank (default: rank)");
    app.add_option("--relora-period", m.relora.period, "relora: optimizer steps between merges")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--relora-rewarm", m.relora.rewarm_steps, "relora: LR re-warm-up steps after a merge")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--inrank-threshold", m.inrank.threshold, "inrank: explained ratio alpha to reach")
        ->check(CLI::Range(0.0, 1.0))
        ->capture_default_str();
    app.add_option("--inrank-buffer", m.inrank.buffer, "inrank: buffer columns b (0: max(2, d / 8))")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--inrank-warmup", m.inrank.warmup, "inrank: optimizer steps before the first rank check")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--inrank-gap", m.inrank.gap, "inrank: optimizer steps between rank checks")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--inrank-stage1-steps", m.inrank.stage1_steps,
                   "inrank: optimizer steps of rank growth before the cut to fixed rank (0: count "
                   "--inrank-stage1-epochs instead)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--inrank-stage1-epochs", m.inrank.stage1_epochs,
                   "inrank: epochs of rank growth before the cut to fixed rank (0: grow throughout)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--cuttlefish-window", m.cuttlefish.window, "cuttlefish: EMA span w and fewest history entries")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--cuttlefish-tail", m.cuttlefish.tail, "cuttlefish: derivatives averaged, L <= w")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--cuttlefish-threshold", m.cuttlefish.threshold, "cuttlefish: tau, ranks per tracking point")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--cuttlefish-track-steps", m.cuttlefish.track_every_steps,
                   "cuttlefish: track stable ranks every N steps (0: every epoch)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--cuttlefish-frobenius", m.cuttlefish.frobenius_decay,
                   "cuttlefish: Frobenius decay lambda on the factors after the switch (0: off)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--cuttlefish-min-speedup", m.cuttlefish.min_speedup,
                   "cuttlefish: factorize a layer only if dense / low-rank FLOPs reach this")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--sst-sampling", m.sst_sampling, "sst: how the active singular vectors are drawn")
        ->check(CLI::IsMember({"sigma", "mixed", "uniform"}))
        ->capture_default_str();
    app.add_option("--sst-iteration-steps", m.sst.iteration_steps, "sst: T3, optimizer steps per iteration")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--sst-round-iterations", m.sst.round_iterations,
                   "sst: T2, iterations per round before a re-SVD (0: ceil(d / rank))")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--sst-rewarm", m.sst.rewarm_steps, "sst: LR re-warm-up steps at each iteration start")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--deeplora-depth", m.deeplora.depth, "deeplora: factors L of the deep factorization")
        ->check(CLI::Range(Index{2}, Index{16}))
        ->capture_default_str();
    app.add_option("--deeplora-epsilon", m.deeplora.epsilon, "deeplora: scale of the orthogonal init")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--deeplora-gamma", m.deeplora.gamma,
                   "deeplora: lr multiplier of the outer bases after compression (0: frozen)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
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
        o.select = select;
        o.seed = seed;
        list.template add<ReLora<T>>(o);
    } else if (m.method == "inrank") {
        auto o = m.inrank;  // InRank chooses its own ranks: --rank does not apply
        o.two_stage = o.stage1_steps > 0 || o.stage1_epochs > 0;
        o.select = select;
        o.seed = seed;
        list.template add<InRank<T>>(o);
    } else if (m.method == "cuttlefish") {
        auto o = m.cuttlefish;  // its ranks come from the stable ranks
        o.select = select;
        list.template add<Cuttlefish<T>>(o);
    } else if (m.method == "sst") {
        auto o = m.sst;
        o.rank = rank;
        o.sampling = m.sst_sampling == "sigma"     ? SstSampling::sigma
                     : m.sst_sampling == "uniform" ? SstSampling::uniform
                                                   : SstSampling::mixed;
        o.rewarm_steps = std::min(o.rewarm_steps, o.iteration_steps);  // a longer one never ends
        o.select = select;
        o.seed = seed;
        list.template add<Sst<T>>(o);
    } else if (m.method == "deeplora") {
        auto o = m.deeplora;
        o.rank = std::max<Index>(1, rank / 2);  // 2r wide: the update's rank stays <= rank
        o.select = select;
        o.seed = seed;
        list.template add<DeepLora<T>>(o);
    } else if (m.method != "dense") {
        throw Error("unknown method '" + m.method + "'");
    }
    return list;
}

}  // namespace lowrank::examples
