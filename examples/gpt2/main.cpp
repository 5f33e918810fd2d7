// lowrank-gpt2: trains GPT-2 (a named config, dense or with a low-rank method on the
// projections the config selects) on a token stream made by lowrank-tokenize, with AdamW,
// a warm-up + cosine schedule and gradient clipping; evaluates validation loss, saves and
// resumes checkpoints, and samples text. The training run (TrainingRun) owns the step.
//
// Progress and evaluations go to stderr; stdout ends with one line, a JSON object with the
// result (text samples, when asked for, come before it). The same seed and thread count
// give the same losses bit for bit, also across a --save / --resume split.
//
// Exit codes: 0 success, 1 runtime error (missing or malformed data, non-finite loss),
// 2 bad command line.
//
// Under `mpirun -np P` (a build with LOWRANK_WITH_MPI) P processes train one model on the
// same global batches of --batch windows, each its shard, and evaluate a shard of the
// validation windows each (docs/distributed.md); process 0 alone prints, logs and writes
// checkpoints, and a checkpoint resumes on any number of processes.

#include <lowrank/dist/data_parallel.hpp>
#include <lowrank/dist/mpi.hpp>
#include <lowrank/lowrank.hpp>
#include <lowrank/train/update_rank.hpp>

#include "common/checkpoint_cli.hpp"
#include "common/cli_checks.hpp"
#include "common/kept_checkpoints.hpp"
#include "common/method_cli.hpp"
#include "common/resume_cli.hpp"
#include "common/run_identity.hpp"
#include "common/start_mpi.hpp"
#include "common/step_lines.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iostream>
#include <limits>
#include <new>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#ifdef LOWRANK_EXAMPLE_OPENBLAS
// lowrank-gpt2-openblas: Eigen's products go to OpenBLAS, whose threads are its own.
extern "C" void openblas_set_num_threads(int num_threads);
constexpr const char* kGemm = "openblas";
#else
constexpr const char* kGemm = "eigen";
#endif

// The settings --resume-allow may change, and those that are not the run's identity (where
// output goes, what is printed): the rest must match on --resume.
const std::vector<std::string> kResumeAllowable{"--steps",     "--warmup-steps", "--min-lr-ratio",
                                                "--grad-clip", "--threads",      "--data"};
const std::set<std::string> kNotIdentity{
    "--vocab",       "--save",      "--save-every",  "--resume",    "--resume-allow", "--stop-at", "--sample",
    "--prompt",      "--temperature", "--top-k",     "--log",       "--rank-log",     "--quiet",   "--eval-windows",
    "--log-every",   "--peak-gflops", "--out-dir",   "--keep-last", "--keep-best", "--track-update-rank",
    "--sst-prune"};
// Settings a checkpoint keeps beside the identity, taken from it on --resume when not given
// and free to change: how often the run saves and logs, what it samples.
const std::set<std::string> kCarried{"--vocab",       "--save-every", "--sample",    "--prompt",
                                     "--temperature", "--top-k",      "--eval-windows", "--log-every",
                                     "--peak-gflops", "--keep-last",  "--keep-best"};

namespace {

struct Config {
    std::string model = "tiny";
    std::string tokenizer = "gpt2";  // or "bytes": a 256-symbol vocabulary, one token per byte
    std::int64_t steps = 300, warmup_steps = 30, eval_every = 100, save_every = 0, stop_at = 0;
    lowrank::Index batch = 8, context = 0, eval_windows = 64;  // context 0: the config's block size
    lowrank::Index train_tokens = 0;  // only the first N tokens of the training stream (0: all of it)
    double lr = 1e-3, min_lr_ratio = 0.1, weight_decay = 0.1, grad_clip = 1.0;
    int threads = 1, sample = 0, top_k = 40;
    double temperature = 0.8;
    std::uint64_t seed = 0;
    std::string data, vocab = "data/gpt2", save, resume, init_from, prompt = "\n", log,
                rank_log;
    std::string out_dir;  // every output's default folder
    int keep_last = 0;
    bool keep_best = false;
    std::string export_path, export_layout = "hf";  // --export, --export-layout
    std::vector<std::string> roles;         // empty: the config's low_rank_roles
    std::vector<std::string> resume_allow;  // settings a --resume may change on purpose
    bool quiet = false;
    std::vector<double> track_update_rank;  // the alphas of --track-update-rank (empty: off)
    lowrank::examples::MethodConfig method{};
    lowrank::examples::StepLineConfig step_lines{.every = 10};
    nlohmann::json settings;  // kCarried's values, kept in each checkpoint
    nlohmann::json identity;  // the command line's settings that a resume must keep
};

using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

int train(Config cfg, const lowrank::Communicator& world) {
    const auto wall_start = Clock::now();
    const bool root = world.is_root();
    lowrank::tune_allocator();
    lowrank::set_num_threads(cfg.threads);
#ifdef LOWRANK_EXAMPLE_OPENBLAS
    openblas_set_num_threads(cfg.threads);
#endif
    // --tokenizer bytes: the config's architecture over 256 symbols, so that the head is a
    // rounding error and the projections, all four of a block's, carry the step.
    const bool bytes = cfg.tokenizer == "bytes";
    lowrank::Gpt2Config mc = lowrank::gpt2_config(cfg.model);
    if (bytes) {
        mc.vocab_size = 256;
        mc.low_rank_roles.assign(lowrank::kGpt2Roles.begin(), lowrank::kGpt2Roles.end());
    }
    if (cfg.data.empty()) cfg.data = bytes ? "data/text/corpus-bytes" : "data/text/corpus";
    if (cfg.context == 0) cfg.context = mc.block_size;
    lowrank::check(cfg.context <= mc.block_size, "--context", cfg.context, " exceeds the block size ",
                   mc.block_size, " of config '", mc.name, "'");
    const std::vector<std::string> roles = cfg.roles.empty() ? mc.low_rank_roles : cfg.roles;

    // Everything the run will read or write is checked before anything is trained. With
    // --out-dir every output not given its own path goes into that folder, and nothing
    // outside it: DIR/metrics.jsonl, DIR/ranks.jsonl, DIR/checkpoint.safetensors, ...
    const auto in_out_dir = [&](const char* name) { return (std::filesystem::path(cfg.out_dir) / name).string(); };
    if (!cfg.out_dir.empty()) {
        if (root) lowrank::make_writable_dir(cfg.out_dir, "--out-dir");
        if (cfg.log.empty()) cfg.log = in_out_dir("metrics.jsonl");
        if (cfg.save.empty()) cfg.save = in_out_dir("checkpoint.safetensors");
        if (cfg.rank_log.empty() && cfg.method.method != "dense") cfg.rank_log = in_out_dir("ranks.jsonl");
    }
    const std::string rank_log = cfg.rank_log.empty() && cfg.method.method != "dense"
                                     ? "lowrank-gpt2-" + cfg.method.method + ".ranks.jsonl"
                                     : cfg.rank_log;
    lowrank::examples::check_method_options(cfg.method);
    if (!cfg.save.empty() && root) lowrank::check_writable(cfg.save, "--save");
    if (!rank_log.empty() && root) lowrank::check_writable(rank_log, "--rank-log");
    if (!cfg.export_path.empty() && root) lowrank::check_writable(cfg.export_path, "--export");
    lowrank::check(!cfg.save.empty() || (cfg.save_every == 0 && cfg.stop_at == 0 && cfg.keep_last == 0 && !cfg.keep_best),
                   "--save-every / --stop-at / --keep-last / --keep-best",
                   "they need --save or --out-dir (where the checkpoints go)");
    lowrank::examples::KeptCheckpoints kept(cfg.save, cfg.keep_last);
    if (!cfg.log.empty() && root) lowrank::check_writable(cfg.log, "--log");
    // W(0) is the weights at the run's start, which a resumed process does not hold.
    lowrank::check(cfg.track_update_rank.empty() || (!cfg.log.empty() && cfg.resume.empty()),
                   "--track-update-rank", "expected --log (where its records go) and no --resume, got --log '",
                   cfg.log, "' and --resume '", cfg.resume, "'");
    // --sample's vocabulary is read now, not after the run it would come at the end of.
    std::optional<lowrank::Gpt2Tokenizer> tok;
    if (cfg.sample > 0 && root && !bytes) tok.emplace(lowrank::Gpt2Tokenizer::from_dir(cfg.vocab));
    lowrank::Rng rng(cfg.seed);
    std::vector<std::uint16_t> train_stream = lowrank::read_tokens(cfg.data + ".train.bin");
    if (cfg.train_tokens > 0) {  // a small training set on purpose (few-shot adaptation)
        lowrank::check(cfg.train_tokens > cfg.context && static_cast<std::size_t>(cfg.train_tokens) <= train_stream.size(),
                       "--train-tokens", "expected more than --context ", cfg.context, " and at most the ",
                       train_stream.size(), " tokens of '", cfg.data, ".train.bin', got ", cfg.train_tokens);
        train_stream.resize(static_cast<std::size_t>(cfg.train_tokens));
    }
    lowrank::TokenWindows train(std::move(train_stream),
                                {.batch = cfg.batch, .context = cfg.context, .seed = rng.next_u64()});
    lowrank::TokenWindows val(lowrank::read_tokens(cfg.data + ".val.bin"),
                              {.batch = cfg.batch, .context = cfg.context});
    lowrank::check_token_ids(train.tokens(), mc.vocab_size, cfg.data + ".train.bin");
    lowrank::check_token_ids(val.tokens(), mc.vocab_size, cfg.data + ".val.bin");

    // The model (optionally from pretrained weights); AdamW with weight decay on matrices,
    // not on biases and LayerNorm gains (rows == 1).
    lowrank::Gpt2<float> model(mc, rng);
    if (!cfg.init_from.empty()) lowrank::load_gpt2_weights(model, cfg.init_from);
    lowrank::ParameterList<float> decay, no_decay;
    for (auto* p : model.parameters()) (p->rows() == 1 ? no_decay : decay).push_back(p);
    lowrank::AdamW<float> opt(decay, {.lr = cfg.lr, .beta2 = 0.95, .weight_decay = cfg.weight_decay});
    opt.add_group(no_decay, {.weight_decay = 0.0, .name = "no_decay"});

    // The run, and the method's policies on the selected projections. An "epoch" of the
    // policies (Cuttlefish's tracking, InRank's stage 1) is one evaluation interval.
    const std::uint64_t policy_seed = rng.next_u64(), graph_seed = rng.next_u64();
    cfg.identity["train_tokens"] = train.size();
    lowrank::TrainingRun<float> run(
        model, opt,
        {.schedule =
             lowrank::LrSchedule({.kind = lowrank::ScheduleKind::warmup_cosine,
                                  .warmup_steps = std::min<std::int64_t>(cfg.warmup_steps, cfg.steps - 1),
                                  .total_steps = cfg.steps,
                                  .min_factor = cfg.min_lr_ratio}),
         .clip_grad_norm = cfg.grad_clip,
         .steps_per_epoch = cfg.eval_every,
         .total_steps = cfg.steps,
         .seed = graph_seed,
         .identity = cfg.identity});
    run.add(
        lowrank::examples::make_policies<float>(cfg.method, mc.n_embd / 4, {.roles = roles}, policy_seed));
    run.track_rng("train", train.rng());
    // Data-parallel over the job's processes (one without MPI): the same global batch on
    // every process, each step's gradients averaged over the shards.
    lowrank::DataParallel<float> dp(run, world);
    // The training loss since the last evaluation is saved too: a resumed run reports the
    // same numbers as an uninterrupted one.
    double interval_loss = 0.0;
    std::int64_t interval_steps = 0;
    Json saved_step_lines;  // the step lines' interval, from the checkpoint
    double best_val_loss = std::numeric_limits<double>::infinity();  // --keep-best's so far
    Json params_at_start;  // the run's size before its first step, from the checkpoint
    if (!cfg.resume.empty()) {
        // A setting allowed to change also allows what the run derives from it.
        std::vector<std::string> allow = cfg.resume_allow;
        for (const auto& o : cfg.resume_allow) {
            if (o == "--steps") allow.insert(allow.end(), {"total_steps", "schedule"});
            if (o == "--warmup-steps" || o == "--min-lr-ratio") allow.push_back("schedule");
            if (o == "--grad-clip") allow.push_back("clip_grad_norm");
            if (o == "--data") allow.push_back("train_tokens");
        }
        const Json mine = run.resume(cfg.resume, {.allow_changed = allow});
        const auto number = [&](const char* key) {
            const auto it = mine.find(key);
            lowrank::check(it != mine.end() && it->is_number(), "--resume '" + cfg.resume + "'", "key 'user.",
                           key, "': expected a number (the trainer's interval statistics)");
            return it->get<double>();
        };
        interval_loss = number("interval_loss");
        interval_steps = static_cast<std::int64_t>(number("interval_steps"));
        if (const auto it = mine.find("step_lines"); it != mine.end()) saved_step_lines = *it;
        if (const auto it = mine.find("best_val_loss"); it != mine.end() && it->is_number())
            best_val_loss = it->get<double>();
        if (const auto it = mine.find("params_at_start"); it != mine.end() && it->is_number_integer())
            params_at_start = *it;
    }
    // The metrics log: on a resume, its lines past the checkpoint's step (written before a
    // crash) go, so each evaluation appears once.
    std::optional<lowrank::MetricsLog> log;
    if (!cfg.log.empty() && root) {
        if (!cfg.resume.empty()) lowrank::MetricsLog::truncate_after_step(cfg.log, run.global_step());
        log.emplace(cfg.log, cfg.resume.empty() ? lowrank::MetricsLog::Mode::truncate
                                                : lowrank::MetricsLog::Mode::append);
    }
    // --track-update-rank: the alpha-ranks of W(t) - W(0) of the method's projections at every
    // evaluation (the run's epochs), as "update_rank" lines of --log.
    const lowrank::UpdateRankTracker<float>* update_ranks = nullptr;
    if (!cfg.track_update_rank.empty() && log)
        update_ranks = &run.attach<lowrank::UpdateRankTracker<float>>(lowrank::UpdateRankTracker<float>::Options{
            .select = {.roles = roles}, .alphas = cfg.track_update_rank, .log = &*log});
    dp.broadcast_parameters();  // runs begin(); the replicas start from process 0's weights
    const std::int64_t rss_before_steps = lowrank::current_rss_bytes();  // data, model, policies set up
    const lowrank::PeakRss peak;  // peak_rss_steps_bytes counts from here
    cfg.quiet = cfg.quiet || !root;
    // A method that discards the layers' weights (InRank's efficient form, Deep LoRA without
    // a base) says so in the rank log; loaded weights would otherwise be lost without a word.
    if (!cfg.init_from.empty()) {
        std::string discarded;
        for (const auto& e : run.rank_log().events())
            if (e.event == "discard") discarded += (discarded.empty() ? "" : ", ") + e.layer;
        if (!discarded.empty() && root)
            std::fprintf(
                stderr,
                "lowrank-gpt2: warning: --method %s discards the --init-from weights of %s and trains "
                "them from scratch (docs/methods/)\n",
                cfg.method.method.c_str(), discarded.c_str());
    }
    const lowrank::Index params = run.parameter_count(), trainable = run.parameter_count(true);
    if (params_at_start.is_null()) params_at_start = params;
    if (!cfg.quiet)
        std::fprintf(
            stderr,
            "lowrank-gpt2: config %s (%lld layers, %lld heads, width %lld, context %lld), method %s, %lld "
            "parameters (%lld trainable); %lld train / %lld val tokens; batch %lld; %d process(es) x %d "
            "thread(s)%s\n",
            mc.name.c_str(), static_cast<long long>(mc.n_layer), static_cast<long long>(mc.n_head),
            static_cast<long long>(mc.n_embd), static_cast<long long>(cfg.context), cfg.method.method.c_str(),
            static_cast<long long>(params), static_cast<long long>(trainable),
            static_cast<long long>(train.size()), static_cast<long long>(val.size()),
            static_cast<long long>(cfg.batch), world.size(), cfg.threads,
            run.global_step() > 0 ? (", resuming at step " + std::to_string(run.global_step())).c_str() : "");

    // Mean loss over --eval-windows windows spread over the whole validation stream; each
    // process takes its shard of every batch of windows, and the sums are combined. The
    // replicas are compared at every evaluation (a difference throws, naming it).
    const auto evaluate = [&] {
        double sum = run.evaluate([&](lowrank::Graph<float>& g) {
            double part = 0.0;
            val.for_each_spread_batch(cfg.eval_windows, [&](auto x, auto y, lowrank::Index rows) {
                const lowrank::Shard s = lowrank::shard_of(rows, world.rank(), world.size());
                if (s.count == 0) return;
                const auto T = static_cast<std::size_t>(cfg.context);
                const auto at = static_cast<std::size_t>(s.begin) * T, n = static_cast<std::size_t>(s.count) * T;
                g.clear();
                part += static_cast<double>(model.loss(g, x.subspan(at, n), y.subspan(at, n), s.count, cfg.context)
                                                .item()) *
                        static_cast<double>(s.count);
            });
            return part;
        });
        dp.sum(std::span<double>(&sum, 1));
        dp.check_replicas();
        return sum / static_cast<double>(cfg.eval_windows);
    };
    const lowrank::Index tokens_per_step = cfg.batch * cfg.context;
    auto& progress = run.attach<lowrank::ProgressCallback<float>>(lowrank::ProgressCallback<float>::Options{
        .bar = {.enabled = !cfg.quiet, .unit = "tokens"}, .samples_per_step = tokens_per_step});
    // A line every --log-every steps. Training FLOPs per token: three times the forward's
    // (backward costs two forwards): every projection's flops_per_token(), the tied LM head
    // (2 C V) and attention's two products over the context (4 T C a layer); docs/training.md.
    const auto flops_per_token = [&] {
        double forward = 2.0 * static_cast<double>(mc.n_embd) * static_cast<double>(mc.vocab_size) +
                         4.0 * static_cast<double>(cfg.context) * static_cast<double>(mc.n_embd) *
                             static_cast<double>(mc.n_layer);
        for (const auto& s : model.layer_slots()) forward += s.layer->flops_per_token();
        return 3.0 * forward;
    };
    const bool step_lines_on = cfg.step_lines.every > 0 && root && (log || !cfg.quiet);
    lowrank::MetricsEvery<float>* step_lines = lowrank::examples::attach_step_lines(
        run, cfg.step_lines, log ? &*log : nullptr, cfg.quiet || !root, progress.bar(), "tokens",
        [&] { return static_cast<double>(tokens_per_step); }, flops_per_token,
        step_lines_on ? lowrank::examples::peak_flops(cfg.step_lines, cfg.threads, world.size()) : 0.0);
    if (step_lines != nullptr && !saved_step_lines.is_null()) step_lines->restore(saved_step_lines);
    double train_seconds = 0.0, eval_seconds = 0.0, val_loss = std::nan(""), train_loss = std::nan("");
    const std::int64_t first_step = run.global_step();
    std::int64_t interval_first = first_step;  // for tokens/s: the steps timed in this process
    auto interval_start = Clock::now();
    // A checkpoint of the run as it is after the step just taken: --save's file, or with
    // --keep-last a step file that --save's file then becomes.
    const auto save = [&](const std::string& path) {
        run.save(path, Json{{"interval_loss", interval_loss},
                            {"interval_steps", interval_steps},
                            {"step_lines", step_lines ? step_lines->state() : Json(nullptr)},
                            {"best_val_loss", std::isfinite(best_val_loss) ? Json(best_val_loss) : Json(nullptr)},
                            {"settings", cfg.settings},
                            {"params_at_start", params_at_start}});
    };
    std::vector<std::int32_t> x, y;
    const std::int64_t last_step = cfg.stop_at > 0 ? std::min(cfg.stop_at, cfg.steps) : cfg.steps;
    while (run.global_step() < last_step) {
        train.next(x, y);  // the global batch, the same on every process: this one reads its shard
        const lowrank::Shard s = dp.shard(cfg.batch);
        const auto at = static_cast<std::size_t>(s.begin * cfg.context),
                   n = static_cast<std::size_t>(s.count * cfg.context);
        const auto r = run.step([&](lowrank::Graph<float>& g) {
            return model.loss(g, std::span<const std::int32_t>(x).subspan(at, n),
                              std::span<const std::int32_t>(y).subspan(at, n), s.count, cfg.context);
        });
        interval_loss += r.loss;
        ++interval_steps;
        if (r.step % cfg.eval_every == 0 ||
            r.step == cfg.steps) {  // the run has just ended the policies' epoch
            const double seconds = seconds_since(interval_start);
            train_seconds += seconds;
            train_loss = interval_loss / static_cast<double>(interval_steps);
            const auto eval_start = Clock::now();
            val_loss = evaluate();
            eval_seconds += seconds_since(eval_start);
            const double tps = static_cast<double>((r.step - interval_first) * tokens_per_step) / seconds;
            progress.bar().clear();
            if (!cfg.quiet && bytes)
                std::fprintf(
                    stderr,
                    "step %6lld/%lld  train_loss %.4f  val_loss %.4f  val_bpb %.4f  lr %.2e  %.0f tokens/s\n",
                    static_cast<long long>(r.step), static_cast<long long>(cfg.steps), train_loss, val_loss,
                    val_loss / std::log(2.0), r.lr, tps);
            else if (!cfg.quiet)
                std::fprintf(
                    stderr,
                    "step %6lld/%lld  train_loss %.4f  val_loss %.4f  val_ppl %.1f  lr %.2e  %.0f tokens/s\n",
                    static_cast<long long>(r.step), static_cast<long long>(cfg.steps), train_loss, val_loss,
                    std::exp(val_loss), r.lr, tps);
            std::vector<lowrank::Index> ranks;
            for (const auto& s : model.layer_slots()) ranks.push_back(s.layer->rank());
            if (log)
                log->write(lowrank::JsonLine()
                               .field("kind", "eval")
                               .field("step", r.step)
                               .field("train_loss", train_loss)
                               .field("val_loss", val_loss)
                               .field("val_ppl", std::exp(val_loss))
                               .field("val_bpb", bytes ? val_loss / std::log(2.0) : std::nan(""))
                               .field("lr", r.lr)
                               .field("tokens_per_second", tps)
                               .field("ranks", ranks)
                               .field("trainable_params", run.parameter_count(true)));
            if (!rank_log.empty() && root) run.rank_log().write_jsonl(rank_log);
            interval_loss = 0.0;
            interval_steps = 0;
            // --keep-best: a copy of the run at its best validation loss so far.
            if (cfg.keep_best && root && val_loss < best_val_loss) {
                best_val_loss = val_loss;
                save(kept.best_path().string());
            }
            interval_start = Clock::now();
            interval_first = r.step;
        }
        if (!cfg.save.empty() && root &&
            ((cfg.save_every > 0 && r.step % cfg.save_every == 0) || r.step == last_step)) {
            if (kept.keep_last() == 0) {
                save(cfg.save);
            } else {
                save(kept.step_path(r.step).string());
                kept.saved(r.step);
            }
        }
    }
    run.finish();
    if (run.global_step() == first_step) val_loss = evaluate();  // nothing left to train

    // --sst-prune T: SST's singular values below T set to zero after training, a "prune" event
    // per layer, and the pruned model evaluated again (val_loss is then the pruned model's).
    nlohmann::ordered_json pruned = nullptr;
    if (cfg.method.sst_prune > 0.0) {
        const double before = val_loss;
        const lowrank::Index count =
            lowrank::examples::prune_sst(run.policies(), run.context(), cfg.method.sst_prune);
        val_loss = evaluate();
        pruned = {{"threshold", cfg.method.sst_prune}, {"singular_values", count}, {"val_loss_before", before}};
        if (!rank_log.empty() && root) run.rank_log().write_jsonl(rank_log);
    }

    // --export: the model as it ends, weights only (models/gpt2_export.hpp). A --resume of a
    // finished run trains nothing, so this also exports a checkpoint.
    // hf: config.json beside it, which GPT2LMHeadModel.from_pretrained(folder) reads.
    if (!cfg.export_path.empty() && root) {
        const lowrank::Gpt2ExportLayout layout = lowrank::parse_gpt2_export_layout(cfg.export_layout);
        lowrank::save_gpt2_weights(model, cfg.export_path, layout);
        const std::string hf_config =
            (std::filesystem::path(cfg.export_path).parent_path() / "config.json").string();
        const bool hf = layout == lowrank::Gpt2ExportLayout::hf;
        if (hf) lowrank::save_gpt2_hf_config<float>(model.config(), hf_config);
        if (!cfg.quiet)
            std::cerr << "lowrank-gpt2: exported the model (" << cfg.export_layout << " layout, "
                      << std::filesystem::file_size(cfg.export_path) << " bytes) to " << cfg.export_path
                      << (hf ? ", its config to " + hf_config : "") << "\n";
    }

    if (cfg.sample > 0 && root) {
        // A byte model's tokens are the text's bytes; GPT-2's go through its BPE.
        std::vector<std::int32_t> prompt;
        if (tok) {
            prompt = tok->encode(cfg.prompt);
            if (prompt.empty()) prompt.push_back(tok->eot());
        } else {
            for (const char c : cfg.prompt) prompt.push_back(static_cast<unsigned char>(c));
            if (prompt.empty()) prompt.push_back('\n');
        }
        lowrank::Rng sample_rng(cfg.seed + 1);
        const std::vector<std::int32_t> ids = lowrank::gpt2_sample(
            model, std::move(prompt), cfg.sample, {.temperature = cfg.temperature, .top_k = cfg.top_k}, sample_rng);
        std::string text;
        if (tok)
            text = tok->decode(ids);
        else
            for (const std::int32_t id : ids) text.push_back(static_cast<char>(static_cast<unsigned char>(id)));
        std::cout << text << "\n";
        if (!cfg.out_dir.empty())
            lowrank::write_file_atomically(in_out_dir("sample.txt"), "--out-dir",
                                           [&](const auto& put) { put(text.data(), text.size()); });
    }

    nlohmann::ordered_json final_ranks = nlohmann::ordered_json::object();
    for (const auto& s : model.layer_slots())
        if (std::find(roles.begin(), roles.end(), s.role) != roles.end())
            final_ranks[s.layer->name()] = s.layer->rank();
    const double steps_here = static_cast<double>(run.global_step() - first_step);
    const nlohmann::ordered_json result{
        {"method", cfg.method.method},
        {"config", mc.name},
        {"tokenizer", cfg.tokenizer},
        {"val_loss", val_loss},
        {"val_ppl", std::exp(val_loss)},
        // Bits per byte, for a byte model (whose tokens are bytes): the loss in base 2.
        {"val_bpb", bytes ? nlohmann::ordered_json(val_loss / std::log(2.0)) : nlohmann::ordered_json(nullptr)},
        {"train_loss", train_loss},
        {"tokens_per_second",
         train_seconds > 0 ? steps_here * static_cast<double>(tokens_per_step) / train_seconds : 0.0},
        {"params", run.parameter_count()},
        {"params_at_start", params_at_start.get<lowrank::Index>()},
        {"trainable_params", run.parameter_count(true)},
        {"final_ranks", final_ranks},
        {"sst_prune", pruned},
        {"out_dir", cfg.out_dir.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(cfg.out_dir)},
        {"rank_log", rank_log.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(rank_log)},
        {"rank_events", run.rank_log().size()},
        {"steps", run.global_step()},
        {"batch", cfg.batch},
        {"context", cfg.context},
        {"tokens", static_cast<double>(run.global_step() * tokens_per_step)},
        {"lr", cfg.lr},
        {"seed", cfg.seed},
        {"threads", cfg.threads},
        {"processes", world.size()},
        // What one step all-reduced at the end (the trainable gradients in use, and the loss).
        {"allreduce_bytes_per_step", dp.bytes_per_step()},
        {"allreduce_seconds", dp.stats().seconds},
        // The optimizer state held at the end (GaLore: r x max(m, n) moments and a basis for
        // each projected weight) beside AdamW's two moments of every trainable parameter,
        // and the process's peak resident memory beside what it held before the first step.
        {"optimizer_state_bytes", opt.state_bytes()},
        {"adamw_state_bytes", 2 * run.parameter_count(true) * static_cast<lowrank::Index>(sizeof(float))},
        {"peak_rss_bytes", peak.process()},
        {"rss_before_steps_bytes", rss_before_steps},
        // The peak since the first step (0 where the kernel mark could not be reset).
        {"peak_rss_steps_bytes", peak.steps()},
        {"tape_bytes", run.peak_tape_bytes()},
        {"gemm", kGemm},
        {"train_seconds", train_seconds},
        {"eval_seconds", eval_seconds},
        // Inside train_seconds: the SVDs of --track-update-rank.
        {"update_rank_seconds", update_ranks != nullptr ? update_ranks->seconds() : 0.0},
        {"wall_seconds", seconds_since(wall_start)}};
    if (root) std::cout << result.dump() << std::endl;
    if (root && !cfg.out_dir.empty()) {
        const std::string text = result.dump() + "\n";
        lowrank::write_file_atomically(in_out_dir("result.json"), "--out-dir",
                                       [&](const auto& put) { put(text.data(), text.size()); });
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    // Before the command line: MPI may take its own arguments out of argv.
    std::optional<lowrank::MpiEnvironment> mpi;
    if (!lowrank::examples::start_mpi(mpi, &argc, &argv, "lowrank-gpt2")) return 1;
    Config cfg;
    CLI::App app{
        "Train GPT-2 (dense or low-rank) on a token stream with AdamW, warm-up + cosine decay and\n"
        "gradient clipping. Progress goes to stderr; the last line of stdout is a JSON object.",
        "lowrank-gpt2"};
    app.set_version_flag("--version", std::string("lowrank ") + lowrank::version_string());
    using lowrank::Index;
    const auto nonneg = lowrank::examples::non_negative;
    std::vector<std::string> configs(lowrank::kGpt2ConfigNames.begin(), lowrank::kGpt2ConfigNames.end());
    app.add_option("--config", cfg.model, "Model config (docs/models/gpt2.md)")
        ->check(CLI::IsMember(configs))
        ->capture_default_str();
    app.add_option("--tokenizer", cfg.tokenizer,
                   "gpt2: GPT-2's BPE (50257 tokens); bytes: one token per byte (256), the low-rank "
                   "methods on all four projections of a block by default, quality in bits per byte")
        ->check(CLI::IsMember({"gpt2", "bytes"}))
        ->capture_default_str();
    app.add_option("--steps", cfg.steps, "Optimizer steps in total")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--batch", cfg.batch, "Sequences per step (B)")
        ->check(CLI::Range(Index{1}, Index{1} << 16))
        ->capture_default_str();
    app.add_option("--context", cfg.context, "Tokens per sequence (T); 0: the config's block size")
        ->check(nonneg)
        ->capture_default_str();
    app.add_option("--lr", cfg.lr, "Peak learning rate (AdamW, betas 0.9 / 0.95)")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--min-lr-ratio", cfg.min_lr_ratio, "Final lr of the cosine decay, as a fraction of --lr")
        ->check(CLI::Range(0.0, 1.0))
        ->capture_default_str();
    app.add_option("--warmup-steps", cfg.warmup_steps, "Steps of linear warm-up")
        ->check(nonneg)
        ->capture_default_str();
    app.add_option("--weight-decay", cfg.weight_decay, "AdamW decoupled weight decay (matrices only)")
        ->check(nonneg)
        ->capture_default_str();
    app.add_option("--grad-clip", cfg.grad_clip, "Clip the global gradient norm to this (0: off)")
        ->check(nonneg)
        ->capture_default_str();
    app.add_option("--eval-every", cfg.eval_every, "Steps between validation evaluations")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--eval-windows", cfg.eval_windows,
                   "Validation windows of T tokens per evaluation, spread evenly over the validation stream")
        ->check(CLI::Range(Index{1}, Index{1} << 20))
        ->capture_default_str();
    app.add_option("--threads", cfg.threads, "Threads for GEMM and kernels")
        ->check(CLI::Range(1, 1024))
        ->capture_default_str();
    app.add_option("--seed", cfg.seed, "Seed of the initialisation, the batches and dropout")
        ->capture_default_str();
    app.add_option("--data", cfg.data,
                   "Token streams PREFIX.train.bin and PREFIX.val.bin (lowrank-tokenize; default "
                   "data/text/corpus, or data/text/corpus-bytes with --tokenizer bytes)");
    app.add_option("--train-tokens", cfg.train_tokens,
                   "Train on the first N tokens of the training stream only (0: all of it), e.g. to adapt a "
                   "--init-from model on few examples")
        ->check(CLI::Range(lowrank::Index{0}, lowrank::Index{1} << 40))
        ->capture_default_str();
    app.add_option("--vocab", cfg.vocab, "Directory with encoder.json and vocab.bpe (for --sample)")
        ->capture_default_str();
    app.add_option("--out-dir", cfg.out_dir,
                   "Write everything the run writes into this folder (created if missing): metrics.jsonl, "
                   "ranks.jsonl, checkpoint.safetensors (always at the end), sample.txt, result.json; an "
                   "explicit --log, --rank-log or --save is used as given");
    lowrank::examples::add_checkpoint_options(app, cfg, kResumeAllowable, {.extends = "--steps"});
    app.add_option(
        "--init-from", cfg.init_from,
        "Start from these weights (safetensors; ours, or GPT-2's published names and Conv1D layout)");
    app.add_option("--sample", cfg.sample, "Generate this many tokens after training")
        ->check(nonneg)
        ->capture_default_str();
    app.add_option("--prompt", cfg.prompt, "Text the sample continues");
    app.add_option("--temperature", cfg.temperature, "Sampling temperature")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--top-k", cfg.top_k, "Sample among the k most likely tokens (0: all)")
        ->check(nonneg)
        ->capture_default_str();
    app.add_option("--roles", cfg.roles,
                   "Projections the method applies to, comma-separated from attn_qkv, attn_proj, mlp_fc, "
                   "mlp_proj (default: the config's, mlp_fc,mlp_proj; all four with --tokenizer bytes)")
        ->delimiter(',');
    app.add_option("--log", cfg.log,
                   "Write one JSON line per evaluation (\"kind\": \"eval\") and per --log-every steps "
                   "(\"kind\": \"step\") to this file");
    app.add_option("--track-update-rank", cfg.track_update_rank,
                   "At the start and every evaluation, log (\"kind\": \"update_rank\", into --log) the rank "
                   "of each projection's cumulative update W(t) - W(0) at each of these explained ratios "
                   "(InRank's alpha-rank, docs/methods/inrank.md), e.g. 0.9,0.95,0.99")
        ->delimiter(',')
        ->check(CLI::Range(0.0, 1.0).description("each in (0, 1)"))
        ->type_name("ALPHA[,ALPHA]");
    app.add_option("--export", cfg.export_path,
                   "At the end, write the model's weights alone to this safetensors file (--export-layout); "
                   "hf also writes config.json beside it, so that a folder holding it as model.safetensors "
                   "loads with transformers' GPT2LMHeadModel.from_pretrained")
        ->type_name("PATH");
    app.add_option("--export-layout", cfg.export_layout,
                   "hf: Hugging Face's GPT2LMHeadModel (Conv1D), nanogpt: nn.Linear, both with every "
                   "low-rank layer merged into its dense weight; lowrank: the factors kept "
                   "(load_gpt2_low_rank)")
        ->check(CLI::IsMember({"hf", "nanogpt", "lowrank"}))
        ->capture_default_str();
    app.add_option("--rank-log", cfg.rank_log,
                   "Write the rank policy's decisions here (default lowrank-gpt2-<method>.ranks.jsonl)");
    app.add_flag("--quiet,-q", cfg.quiet, "No progress bar or evaluation lines on stderr");
    lowrank::examples::add_step_line_options(app, cfg.step_lines, "tokens/s");
    lowrank::examples::add_method_options(app, cfg.method, "n_embd / 4");
    app.get_option("--inrank-stage1-steps")
        ->description(
            "inrank: optimizer steps of rank growth before the cut to fixed rank (default: through the "
            "fourth rank check, unless --inrank-stage1-epochs is given)")
        ->default_str("");
    // With several processes an error ends the job (the others would wait for this one).
    const auto fail = [&](const std::string& message) {
        if (mpi->world().size() > 1) mpi->fail("lowrank-gpt2: " + message);
        std::cerr << "lowrank-gpt2: error: " << message << "\n";
    };
    try {
        app.parse(argc, argv);
        // --resume: the checkpoint it names, and every setting not given taken from it.
        lowrank::examples::apply_resume(app, std::vector<std::string>(argv + 1, argv + argc), cfg.resume,
                                        cfg.out_dir, cfg.save, cfg.resume_allow, kResumeAllowable,
                                        "lowrank-gpt2", mpi->world().is_root());
    } catch (const CLI::ParseError& e) {
        const int code = app.exit(e);  // prints help to stdout, or the error to stderr
        return code == 0 ? 0 : 2;
    } catch (const lowrank::FormatError& e) {  // a checkpoint that cannot be read
        fail(e.what());
        return 1;
    } catch (const std::exception& e) {  // a setting that disagrees with the checkpoint
        fail(e.what());
        return 2;
    }
    // A language model has no epochs: unless told otherwise, InRank's stage 1 (rank growth)
    // lasts through its warm-up and four rank checks, then the cut to fixed rank follows.
    // (One "epoch" here is one evaluation interval, which can end before the first check.)
    if (app.count("--inrank-stage1-steps") == 0 && app.count("--inrank-stage1-epochs") == 0)
        cfg.method.inrank.stage1_steps =
            lowrank::inrank_steps_for_checks(lowrank::examples::inrank_options(cfg.method), 4);
    // Every setting but where output goes and what is printed must match on --resume.
    cfg.identity = lowrank::examples::options_identity(app, kNotIdentity);
    cfg.settings = lowrank::examples::carried_settings(app, kCarried);
    cfg.identity["gemm"] = kGemm;
    // What the run exports is not what it trains.
    cfg.identity.erase("--export");
    cfg.identity.erase("--export-layout");
    try {
        return train(cfg, mpi->world());
    } catch (const std::bad_alloc&) {
        fail("out of memory (try a smaller --batch or --config)");
    } catch (const std::exception& e) {
        fail(e.what());
    }
    return 1;
}
