// lowrank-mlp: trains a ReLU MLP (784-H-...-H-10) on Fashion-MNIST (or any MNIST-like IDX
// data set) with AdamW and a warm-up + cosine learning-rate schedule.
//
// Progress and per-epoch summaries go to stderr; stdout holds exactly one line, a JSON
// object with the result, so scripts can run `lowrank-mlp ... | tail -n1 | jq`.
// The same seed and thread count give a bit-identical line except for its timing fields
// (train_seconds, eval_seconds, wall_seconds, samples_per_second).
//
// Exit codes: 0 success, 1 runtime error (missing or malformed data, non-finite loss),
// 2 bad command line.
//
// Under `mpirun -np P` (a build with LOWRANK_WITH_MPI) P processes train one model on the
// same global batches of --batch samples, each its shard (docs/distributed.md); process 0
// alone prints, logs and writes the rank log and checkpoints, and the result reports the
// bytes each step all-reduced. A checkpoint (--save, --out-dir) holds the whole run: --resume
// continues it bit for bit, mid-epoch too, on any number of processes.

#include <lowrank/lowrank.hpp>
#include <lowrank/data/batching.hpp>
#include <lowrank/data/idx.hpp>
#include <lowrank/dist/data_parallel.hpp>
#include <lowrank/dist/mpi.hpp>
#include <lowrank/optim/optim.hpp>
#include <lowrank/policy/policies.hpp>
#include <lowrank/train/evaluate.hpp>
#include <lowrank/train/metrics_log.hpp>
#include <lowrank/train/progress.hpp>
#include <lowrank/train/callbacks.hpp>
#include <lowrank/train/run.hpp>

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
#include <memory>
#include <new>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

namespace {

struct Config {
    int epochs = 10;
    lowrank::Index hidden = 256;
    int layers = 2;
    lowrank::Index batch = 128;
    double lr = 1e-3;
    double weight_decay = 0.01;
    double adam_eps = 1e-8;  // the library's Adam default (PyTorch's too; GaLore's AdamW: 1e-6)
    std::int64_t warmup_steps = 200;
    std::string schedule = "cosine";
    std::uint64_t seed = 0;
    int threads = 1;
    std::string data = "data/fashion-mnist";
    std::string log;
    bool quiet = false;
    std::string rank_log;
    std::string out_dir;  // every output's default folder
    std::string save, resume;
    std::int64_t save_every = 0, stop_at = 0;
    int keep_last = 0;
    std::vector<std::string> resume_allow;  // settings a --resume may change on purpose
    // The method and its options. The defaults are the policies' own (docs/methods/) except
    // InRank's threshold: 0.97, not the authors' 0.9, which on this MLP stops the ranks at 4
    // and 22 and loses 5.8 points of test accuracy (docs/results.md gives the command).
    lowrank::examples::MethodConfig method = [] {
        lowrank::examples::MethodConfig m;
        m.inrank.threshold = 0.97;
        return m;
    }();
    lowrank::examples::StepLineConfig step_lines{};
    nlohmann::json settings;  // kCarried's values, kept in each checkpoint
    nlohmann::json identity;  // the command line's settings that a checkpoint must keep
};

using Clock = std::chrono::steady_clock;
using Model = lowrank::Mlp<float>;
using Json = nlohmann::json;

// The settings --resume-allow may change, and those that are not the run's identity (where
// output goes, what is printed): the rest must match on --resume.
const std::vector<std::string> kResumeAllowable{"--epochs", "--warmup-steps", "--schedule", "--threads"};
const std::set<std::string> kNotIdentity{"--log",     "--quiet",       "--rank-log", "--log-every",
                                         "--peak-gflops", "--out-dir", "--save",     "--save-every",
                                         "--stop-at", "--resume",      "--resume-allow", "--keep-last", "--sst-prune"};
// Settings a checkpoint keeps beside the identity, taken from it on --resume when not given
// and free to change: how often the run saves and logs, what it samples.
const std::set<std::string> kCarried{"--save-every", "--keep-last", "--log-every", "--peak-gflops"};

// Sizes as the layers report them (an InRank layer counts its active columns only).
lowrank::Index parameter_count(const Model& model) {
    lowrank::Index n = 0;
    for (const auto& layer : model.layers()) n += layer.parameter_count();
    return n;
}
lowrank::Index trainable_count(const Model& model) {
    lowrank::Index n = 0;
    for (const auto& layer : model.layers()) n += layer.trainable_count();
    return n;
}
std::vector<lowrank::Index> layer_ranks(const Model& model) {
    std::vector<lowrank::Index> out;
    for (const auto& layer : model.layers()) out.push_back(layer.rank());
    return out;
}
std::vector<std::string> layer_kinds(const Model& model) {
    std::vector<std::string> out;
    for (const auto& layer : model.layers()) out.emplace_back(layer.kind());
    return out;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

int train(Config cfg, const lowrank::Communicator& world) {
    const auto wall_start = Clock::now();
    const bool root = world.is_root();
    lowrank::tune_allocator();
    lowrank::set_num_threads(cfg.threads);

    // With --out-dir every output not given its own path goes into that folder, and nothing
    // outside it: DIR/metrics.jsonl, DIR/ranks.jsonl, DIR/checkpoint.safetensors, DIR/result.json.
    const auto in_out_dir = [&](const char* name) { return (std::filesystem::path(cfg.out_dir) / name).string(); };
    if (!cfg.out_dir.empty()) {
        if (root) lowrank::make_writable_dir(cfg.out_dir, "--out-dir");
        if (cfg.log.empty()) cfg.log = in_out_dir("metrics.jsonl");
        if (cfg.save.empty()) cfg.save = in_out_dir(lowrank::examples::kCheckpointName);
        if (cfg.rank_log.empty() && cfg.method.method != "dense") cfg.rank_log = in_out_dir("ranks.jsonl");
    }
    // Every path is checked first, so that a bad one fails before seconds of loading.
    if (!cfg.log.empty() && root) lowrank::check_writable(cfg.log, "--log");
    lowrank::examples::check_method_options(cfg.method);
    if (!cfg.save.empty() && root) lowrank::check_writable(cfg.save, "--save");
    lowrank::check(!cfg.save.empty() || (cfg.save_every == 0 && cfg.stop_at == 0 && cfg.keep_last == 0),
                   "--save-every / --stop-at / --keep-last", "they need --save or --out-dir (where the checkpoints go)");
    lowrank::examples::KeptCheckpoints kept(cfg.save, cfg.keep_last);

    const auto data = lowrank::load_mnist_like<float>(cfg.data);
    const lowrank::Index features = data.train.images.cols();
    const lowrank::Index train_n = data.train.size();
    if (train_n == 0) throw lowrank::FormatError("the train split of '" + cfg.data + "' is empty");
    if (data.test.size() == 0)
        throw lowrank::FormatError("the test split of '" + cfg.data + "' is empty: there is nothing to report accuracy on");

    // The model. Everything random derives from the one seed, in a fixed order.
    lowrank::Rng rng(cfg.seed);
    lowrank::MlpOptions mlp_options;
    mlp_options.sizes.push_back(features);
    for (int i = 0; i < cfg.layers; ++i) mlp_options.sizes.push_back(cfg.hidden);
    mlp_options.sizes.push_back(data.num_classes);
    lowrank::Mlp<float> model(mlp_options, rng);

    // AdamW; weight decay on the weights only, not on the biases.
    lowrank::ParameterList<float> weights, biases;
    for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
    lowrank::AdamW<float> opt(
        weights, lowrank::AdamOptions{.lr = cfg.lr, .eps = cfg.adam_eps, .weight_decay = cfg.weight_decay});
    if (!biases.empty()) opt.add_group(biases, lowrank::GroupOptions{.weight_decay = 0.0, .name = "no_decay"});

    lowrank::Batcher batcher(train_n, lowrank::BatcherOptions{.batch_size = cfg.batch, .seed = rng.next_u64()});
    const std::int64_t steps_per_epoch = batcher.batches_per_epoch();
    // Every process steps on its share of every global batch, the epoch's last and partial
    // one too: each needs at least one row of it.
    const lowrank::Index last_batch = train_n % cfg.batch == 0 ? cfg.batch : train_n % cfg.batch;
    lowrank::check(std::min(cfg.batch, last_batch) >= world.size(), "--batch",
                   "every batch needs a sample per process (", world.size(), "), but --batch ", cfg.batch,
                   " over ", train_n, " training samples leaves ", last_batch,
                   " in the last batch of an epoch; choose a --batch that leaves 0 or >= ", world.size());
    const std::int64_t total_steps = steps_per_epoch * cfg.epochs;
    // A warm-up as long as the run (or longer) would leave no room to decay: shorten it.
    const std::int64_t warmup = std::min<std::int64_t>(cfg.warmup_steps, total_steps - 1);
    lowrank::ScheduleKind kind = lowrank::ScheduleKind::warmup_cosine;
    if (cfg.schedule == "linear") kind = lowrank::ScheduleKind::warmup_linear;
    if (cfg.schedule == "constant") kind = lowrank::ScheduleKind::constant;
    lowrank::LrSchedule schedule(
        lowrank::ScheduleOptions{.kind = kind, .warmup_steps = warmup, .total_steps = total_steps});

    // The run: it owns the step (the policies' hooks, the schedule, the counters) and ends
    // each epoch itself after steps_per_epoch steps. The method's policies convert the
    // hidden layers at begin().
    cfg.identity["train_samples"] = train_n;
    lowrank::TrainingRun<float> run(model, opt,
                                    {.schedule = schedule,
                                     .steps_per_epoch = steps_per_epoch,
                                     .total_steps = total_steps,
                                     .seed = cfg.seed,
                                     .identity = cfg.identity});
    run.add(lowrank::examples::make_policies<float>(cfg.method, cfg.hidden / 4,
                                                     lowrank::LayerSelector{.roles = {"hidden"}}, rng.next_u64()));
    // Data-parallel over the job's processes (one without MPI): each step's gradients are
    // averaged over the shards of the global batch; the replicas start from process 0's.
    lowrank::DataParallel<float> dp(run, world);
    // A resume restores the run (weights, optimizer, policies, counters) and the epoch in
    // progress: its loss so far and the step lines' interval.
    Json saved;  // the trainer's part of the checkpoint
    if (!cfg.resume.empty()) {
        // A setting allowed to change also allows what the run derives from it.
        std::vector<std::string> allow = cfg.resume_allow;
        for (const auto& o : cfg.resume_allow) {
            if (o == "--epochs") allow.insert(allow.end(), {"total_steps", "schedule"});
            if (o == "--warmup-steps" || o == "--schedule") allow.push_back("schedule");
        }
        saved = run.resume(cfg.resume, {.allow_changed = allow});
    }
    const auto saved_number = [&](const char* key) {
        const auto it = saved.find(key);
        lowrank::check(it != saved.end() && it->is_number(), "--resume '" + cfg.resume + "'", "key 'user.", key,
                       "': expected a number (the trainer's epoch statistics)");
        return it->get<double>();
    };
    // The batcher's place: epoch and batch within it, from the run's step counter (the order
    // of an epoch's batches is a function of the seed and the epoch).
    const std::int64_t first_step = run.global_step();
    const std::int64_t first_epoch = first_step / steps_per_epoch, first_batch = first_step % steps_per_epoch;
    if (!cfg.resume.empty()) {
        lowrank::check(saved_number("epoch") == static_cast<double>(first_epoch) &&
                           saved_number("batch") == static_cast<double>(first_batch),
                       "--resume '" + cfg.resume + "'", "the batcher's place (epoch ", saved_number("epoch"),
                       ", batch ", saved_number("batch"), ") does not match the run's step ", first_step, " at ",
                       steps_per_epoch, " steps an epoch");
    }
    // The metrics log: on a resume, its lines past the checkpoint's step (written before a
    // crash) go, so each line appears once.
    std::optional<lowrank::MetricsLog> log;
    if (!cfg.log.empty() && root) {
        if (!cfg.resume.empty()) lowrank::MetricsLog::truncate_after_step(cfg.log, first_step);
        log.emplace(cfg.log, cfg.resume.empty() ? lowrank::MetricsLog::Mode::truncate
                                                : lowrank::MetricsLog::Mode::append);
    }
    dp.broadcast_parameters();  // runs begin()
    const std::int64_t rss_before_steps = lowrank::current_rss_bytes();  // data, model, policies set up
    const lowrank::PeakRss peak;  // peak_rss_steps_bytes counts from here
    // A resumed run reports the sizes the run started with, as the uninterrupted run does.
    const lowrank::Index params = cfg.resume.empty() ? parameter_count(model)
                                                     : static_cast<lowrank::Index>(saved_number("params_at_start"));
    const lowrank::Index trainable =
        cfg.resume.empty() ? trainable_count(model)
                           : static_cast<lowrank::Index>(saved_number("trainable_params_at_start"));
    const std::string rank_log_path =
        cfg.rank_log.empty() && cfg.method.method != "dense" ? "lowrank-mlp-" + cfg.method.method + ".ranks.jsonl" : cfg.rank_log;
    if (!rank_log_path.empty() && root) lowrank::check_writable(rank_log_path, "--rank-log");
    const bool quiet = cfg.quiet || !root;

    if (!quiet) {
        std::string arch;
        for (std::size_t i = 0; i < mlp_options.sizes.size(); ++i)
            arch += (i ? "-" : "") + std::to_string(mlp_options.sizes[i]);
        std::fprintf(stderr,
                     "lowrank-mlp: %lld train / %lld test samples, model %s, method %s, %lld parameters "
                     "(%lld trainable), %lld steps/epoch, %d process(es) x %d thread(s)%s\n",
                     static_cast<long long>(train_n), static_cast<long long>(data.test.size()), arch.c_str(),
                     cfg.method.method.c_str(), static_cast<long long>(params), static_cast<long long>(trainable),
                     static_cast<long long>(steps_per_epoch), world.size(), cfg.threads,
                     first_step > 0 ? (", resuming at step " + std::to_string(first_step)).c_str() : "");
    }
    auto& progress = run.attach<lowrank::ProgressCallback<float>>(lowrank::ProgressCallback<float>::Options{
        .bar = {.enabled = !quiet}, .samples_per_step = cfg.batch, .epochs = cfg.epochs});
    // A line every --log-every steps. Training FLOPs per sample: three times the forward's
    // (backward costs two forwards), the layers' flops_per_token() as they are now: 6 m n
    // (+ 3 m for a bias) for a dense m x n layer; docs/training.md.
    double step_samples = 0.0;  // the global batch of the step under way (an epoch's last is smaller)
    const auto flops_per_sample = [&] {
        double forward = 0.0;
        for (const auto& layer : model.layers()) forward += layer.flops_per_token();
        return 3.0 * forward;
    };
    lowrank::MetricsEvery<float>* step_lines = lowrank::examples::attach_step_lines(
        run, cfg.step_lines, log ? &*log : nullptr, quiet, progress.bar(), "samples", [&] { return step_samples; },
        flops_per_sample,
        cfg.step_lines.every > 0 && root && (log || !quiet)
            ? lowrank::examples::peak_flops(cfg.step_lines, cfg.threads, world.size())
            : 0.0);
    if (step_lines != nullptr && saved.contains("step_lines") && !saved["step_lines"].is_null())
        step_lines->restore(saved["step_lines"]);

    lowrank::ClassifierEvaluator<float> evaluator(1000);
    // Each process evaluates its shard of the test set; the sums are combined.
    const auto evaluate_test = [&] {
        const lowrank::Shard part = lowrank::shard_of(data.test.size(), world.rank(), world.size());
        return dp.combine(evaluator(
            model, data.test.images.middleRows(part.begin, part.count),
            std::span<const std::int32_t>(data.test.labels).subspan(static_cast<std::size_t>(part.begin),
                                                                    static_cast<std::size_t>(part.count))));
    };
    lowrank::Matrix<float> xb;
    std::vector<std::int32_t> yb;

    double train_seconds = 0.0, eval_seconds = 0.0, train_loss = 0.0, lr_now = 0.0;
    lowrank::EvalResult test;
    bool evaluated = false;
    // The epoch in progress: its loss so far, over `seen` samples (a checkpoint keeps them, so
    // a run resumed mid-epoch reports the epoch's loss as an uninterrupted one does).
    double loss_sum = 0.0;
    std::int64_t seen = 0;
    if (!cfg.resume.empty()) {
        loss_sum = saved_number("epoch_loss_sum");
        seen = static_cast<std::int64_t>(saved_number("epoch_samples"));
        train_loss = saved_number("train_loss");
    }
    // A checkpoint of the run as it is after the step just taken: --save's file, or with
    // --keep-last a step file that --save's file then becomes. Only process 0 writes.
    const auto save = [&] {
        if (!root) return;
        const Json mine{{"epoch", run.global_step() / steps_per_epoch},
                        {"batch", run.global_step() % steps_per_epoch},
                        {"epoch_loss_sum", loss_sum},
                        {"epoch_samples", seen},
                        {"train_loss", train_loss},
                        {"params_at_start", params},
                        {"trainable_params_at_start", trainable},
                        {"step_lines", step_lines ? step_lines->state() : Json(nullptr)},
                        {"settings", cfg.settings}};
        if (kept.keep_last() == 0) {
            run.save(cfg.save, mine);
        } else {
            run.save(kept.step_path(run.global_step()), mine);
            kept.saved(run.global_step());
        }
    };
    const std::int64_t last_step = cfg.stop_at > 0 ? std::min(cfg.stop_at, total_steps) : total_steps;
    const auto save_due = [&] {
        return !cfg.save.empty() &&
               ((cfg.save_every > 0 && run.global_step() % cfg.save_every == 0) || run.global_step() == last_step);
    };
    for (std::int64_t epoch = first_epoch; epoch < cfg.epochs && run.global_step() < last_step; ++epoch) {
        const auto epoch_start = Clock::now();
        batcher.set_epoch(epoch);
        for (std::int64_t b = epoch == first_epoch ? first_batch : 0; b < steps_per_epoch && run.global_step() < last_step;
             ++b) {
            const std::span<const lowrank::Index> idx = batcher.batch(b);
            // Every process draws the same global batch and reads its own rows of it.
            const lowrank::Shard shard = dp.shard(static_cast<lowrank::Index>(idx.size()));
            const auto mine = idx.subspan(static_cast<std::size_t>(shard.begin), static_cast<std::size_t>(shard.count));
            lowrank::gather_rows(data.train.images, mine, xb);
            lowrank::gather_rows(data.train.labels, mine, yb);
            step_samples = static_cast<double>(idx.size());
            const lowrank::StepResult r = run.step(
                [&](lowrank::Graph<float>& g) { return lowrank::cross_entropy(g, model.forward(g, g.input(xb)), yb); });
            lr_now = r.lr;
            const auto k = static_cast<std::int64_t>(idx.size());
            loss_sum += r.loss * static_cast<double>(k);
            seen += k;
            if (b + 1 < steps_per_epoch && save_due()) save();  // an epoch's last step saves after its evaluation
        }
        if (run.global_step() % steps_per_epoch != 0) {  // --stop-at within the epoch
            train_seconds += seconds_since(epoch_start);
            break;
        }
        // The epoch's last step ended it: the policies' on_epoch_end has run.
        const double epoch_seconds = seconds_since(epoch_start);
        train_seconds += epoch_seconds;
        train_loss = loss_sum / static_cast<double>(seen);
        if (!rank_log_path.empty() && root) run.rank_log().write_jsonl(rank_log_path);

        // The replicas are compared at every evaluation (a difference throws, naming it).
        const auto eval_start = Clock::now();
        test = evaluate_test();
        evaluated = true;
        dp.check_replicas();
        eval_seconds += seconds_since(eval_start);

        if (!quiet)
            std::fprintf(stderr,
                         "epoch %2lld/%d  train_loss %.4f  test_loss %.4f  test_acc %.2f%%  lr %.2e  %.2f s  "
                         "%.0f samples/s\n",
                         static_cast<long long>(epoch + 1), cfg.epochs, train_loss, test.loss, 100.0 * test.accuracy, lr_now,
                         epoch_seconds, static_cast<double>(seen) / epoch_seconds);
        if (log)
            log->write(lowrank::JsonLine()
                           .field("kind", "eval")
                           .field("epoch", epoch + 1)
                           .field("step", run.global_step())
                           .field("train_loss", train_loss)
                           .field("test_loss", test.loss)
                           .field("test_accuracy", test.accuracy)
                           .field("seconds", epoch_seconds)
                           .field("samples_per_second", static_cast<double>(seen) / epoch_seconds)
                           .field("lr", lr_now)
                           .field("ranks", layer_ranks(model))
                           .field("trainable_params", trainable_count(model)));
        loss_sum = 0.0;
        seen = 0;
        if (save_due()) save();
    }
    run.finish();
    if (!evaluated) test = evaluate_test();  // stopped within its first epoch here, or nothing left

    // --sst-prune T: SST's singular values below T set to zero after training, a "prune" event
    // per layer, and the pruned model evaluated again (test_* are then the pruned model's).
    nlohmann::ordered_json pruned = nullptr;
    if (cfg.method.sst_prune > 0.0) {
        const double before = test.accuracy;
        const lowrank::Index count =
            lowrank::examples::prune_sst(run.policies(), run.context(), cfg.method.sst_prune);
        test = evaluate_test();
        pruned = {{"threshold", cfg.method.sst_prune}, {"singular_values", count}, {"test_accuracy_before", before}};
        if (!rank_log_path.empty() && root) run.rank_log().write_jsonl(rank_log_path);
    }

    const double samples = static_cast<double>(batcher.samples_per_epoch()) * cfg.epochs;
    nlohmann::ordered_json result;
    result["method"] = cfg.method.method;
    result["test_accuracy"] = test.accuracy;
    result["test_loss"] = test.loss;
    result["train_loss"] = train_loss;
    result["params"] = parameter_count(model);
    result["params_at_start"] = params;
    result["trainable_params"] = trainable_count(model);
    result["trainable_params_at_start"] = trainable;
    nlohmann::ordered_json ranks = nlohmann::ordered_json::object();
    for (const auto& layer : model.layers()) ranks[layer.name()] = layer.rank();
    result["final_ranks"] = ranks;
    result["sst_prune"] = pruned;
    result["layer_kinds"] = layer_kinds(model);
    if (rank_log_path.empty())
        result["rank_log"] = nullptr;
    else
        result["rank_log"] = rank_log_path;
    result["rank_events"] = run.rank_log().size();
    result["epochs"] = cfg.epochs;
    result["steps"] = run.global_step();
    result["hidden"] = cfg.hidden;
    result["layers"] = cfg.layers;
    result["batch"] = cfg.batch;
    result["lr"] = cfg.lr;
    result["weight_decay"] = cfg.weight_decay;
    result["adam_eps"] = cfg.adam_eps;
    result["warmup_steps"] = warmup;
    result["schedule"] = cfg.schedule;
    result["seed"] = cfg.seed;
    result["threads"] = cfg.threads;
    result["processes"] = world.size();
    // What one step all-reduces (the trainable gradients in use at the end, and the loss),
    // whatever the number of processes; 0 calls with one process in a build without MPI.
    result["allreduce_bytes_per_step"] = dp.bytes_per_step();
    result["allreduce_seconds"] = dp.stats().seconds;
    // The optimizer state held at the end (GaLore keeps r x max(m, n) moments and a basis
    // for each projected weight) beside AdamW's two moments of every trainable parameter,
    // and the process's peak resident memory beside what it held before the first step.
    result["optimizer_state_bytes"] = opt.state_bytes();
    result["adamw_state_bytes"] = 2 * trainable_count(model) * static_cast<lowrank::Index>(sizeof(float));
    result["peak_rss_bytes"] = peak.process();
    result["rss_before_steps_bytes"] = rss_before_steps;
    // The peak since the first step (0 where the kernel mark could not be reset).
    result["peak_rss_steps_bytes"] = peak.steps();
    result["tape_bytes"] = run.peak_tape_bytes();
    result["train_seconds"] = train_seconds;
    result["eval_seconds"] = eval_seconds;
    result["wall_seconds"] = seconds_since(wall_start);
    result["samples_per_second"] = train_seconds > 0 ? samples / train_seconds : 0.0;
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
    if (!lowrank::examples::start_mpi(mpi, &argc, &argv, "lowrank-mlp")) return 1;
    Config cfg;
    CLI::App app{"Train a ReLU MLP on Fashion-MNIST (IDX files) with AdamW and a warm-up + cosine schedule.\n"
                 "Progress goes to stderr; the last line of stdout is a JSON object with the result.",
                 "lowrank-mlp"};
    app.set_version_flag("--version", std::string("lowrank ") + lowrank::version_string());
    app.add_option("--epochs", cfg.epochs, "Passes over the training set")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--hidden", cfg.hidden, "Width of each hidden layer")
        ->check(CLI::Range(lowrank::Index{1}, lowrank::Index{1} << 16))
        ->capture_default_str();
    app.add_option("--layers", cfg.layers, "Number of hidden layers (0: a linear classifier)")
        ->check(CLI::Range(0, 64))
        ->capture_default_str();
    app.add_option("--batch", cfg.batch, "Mini-batch size")
        ->check(CLI::Range(lowrank::Index{1}, lowrank::Index{1} << 20))
        ->capture_default_str();
    app.add_option("--lr", cfg.lr, "Peak learning rate (AdamW)")->check(lowrank::examples::positive)->capture_default_str();
    app.add_option("--weight-decay", cfg.weight_decay, "AdamW decoupled weight decay (weights only, not biases)")
        ->check(lowrank::examples::non_negative)
        ->capture_default_str();
    app.add_option("--adam-eps", cfg.adam_eps, "AdamW's epsilon, added to the root of the second moment")
        ->check(lowrank::examples::positive)
        ->capture_default_str();
    app.add_option("--warmup-steps", cfg.warmup_steps, "Steps of linear warm-up (capped at total steps - 1)")
        ->check(lowrank::examples::non_negative)
        ->capture_default_str();
    app.add_option("--schedule", cfg.schedule, "LR decay after the warm-up")
        ->check(CLI::IsMember({"cosine", "linear", "constant"}))
        ->capture_default_str();
    app.add_option("--seed", cfg.seed, "Seed of the initialisation and of the batch order")->capture_default_str();
    app.add_option("--threads", cfg.threads, "Threads for GEMM and kernels (1: reproducible timings)")
        ->check(CLI::Range(1, 1024))
        ->capture_default_str();
    app.add_option("--data", cfg.data, "Directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")
        ->capture_default_str();
    app.add_option("--log", cfg.log,
                   "Write one JSON line per epoch (\"kind\": \"eval\") and per --log-every steps "
                   "(\"kind\": \"step\") to this file");
    app.add_flag("--quiet,-q", cfg.quiet, "No progress bar or per-epoch summaries on stderr");
    app.add_option("--out-dir", cfg.out_dir,
                   "Write everything the run writes into this folder (created if missing): metrics.jsonl, "
                   "ranks.jsonl, checkpoint.safetensors (always at the end), result.json; an explicit --log, "
                   "--rank-log or --save is used as given");
    lowrank::examples::add_checkpoint_options(app, cfg, kResumeAllowable,
                                              {.extends = "--epochs", .mid_epoch = true});
    lowrank::examples::add_step_line_options(app, cfg.step_lines, "samples/s");
    lowrank::examples::add_method_options(app, cfg.method, "hidden / 4");
    app.add_option("--rank-log", cfg.rank_log,
                   "Write the rank policy's decisions here, one JSON line each (default "
                   "lowrank-mlp-<method>.ranks.jsonl for a low-rank method)");

    // With several processes an error ends the job (the others would wait for this one).
    const auto fail = [&](const std::string& message) {
        if (mpi->world().size() > 1) mpi->fail("lowrank-mlp: " + message);
        std::cerr << "lowrank-mlp: error: " << message << "\n";
    };
    try {
        app.parse(argc, argv);
        // --resume: the checkpoint it names, and every setting not given taken from it.
        lowrank::examples::apply_resume(app, std::vector<std::string>(argv + 1, argv + argc), cfg.resume,
                                        cfg.out_dir, cfg.save, cfg.resume_allow, kResumeAllowable,
                                        "lowrank-mlp", mpi->world().is_root());
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

    cfg.identity = lowrank::examples::options_identity(app, kNotIdentity);
    cfg.settings = lowrank::examples::carried_settings(app, kCarried);
    try {
        return train(cfg, mpi->world());
    } catch (const std::bad_alloc&) {
        fail("out of memory (try a smaller --hidden or --batch)");
    } catch (const std::exception& e) {
        fail(e.what());
    }
    return 1;
}
