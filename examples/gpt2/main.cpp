// lowrank-gpt2: trains GPT-2 (a named config, dense or with a low-rank method on the
// projections the config selects) on a token stream made by lowrank-tokenize, with AdamW,
// a warm-up + cosine schedule and gradient clipping; evaluates validation loss, saves and
// resumes checkpoints, and samples text.
//
// Progress and evaluations go to stderr; stdout ends with one line, a JSON object with the
// result (text samples, when asked for, come before it). The same seed and thread count
// give the same losses bit for bit, also across a --save / --resume split.
//
// Exit codes: 0 success, 1 runtime error (missing or malformed data, non-finite loss),
// 2 bad command line.

#include <lowrank/lowrank.hpp>
#include <lowrank/data/bpe.hpp>
#include <lowrank/data/tokens.hpp>
#include <lowrank/io/checkpoint.hpp>
#include <lowrank/models/gpt2.hpp>
#include <lowrank/models/gpt2_weights.hpp>
#include <lowrank/optim/optim.hpp>
#include <lowrank/policy/policies.hpp>
#include <lowrank/train/metrics_log.hpp>
#include <lowrank/train/progress.hpp>

#include "common/method_cli.hpp"

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
#include <new>
#include <optional>
#include <string>
#include <vector>

#ifdef LOWRANK_EXAMPLE_OPENBLAS
// lowrank-gpt2-openblas: Eigen's products go to OpenBLAS, whose threads are its own.
extern "C" void openblas_set_num_threads(int num_threads);
#endif

namespace {

struct Config {
    std::string model = "tiny";
    std::int64_t steps = 300;
    lowrank::Index batch = 8;
    lowrank::Index context = 0;  // 0: the config's block size
    double lr = 1e-3;
    double min_lr_ratio = 0.1;
    std::int64_t warmup_steps = 30;
    double weight_decay = 0.1;
    double grad_clip = 1.0;
    std::int64_t eval_every = 100;
    lowrank::Index eval_windows = 64;
    int threads = 1;
    std::uint64_t seed = 0;
    std::string data = "data/text/corpus";
    std::string vocab = "data/gpt2";
    std::string save;
    std::int64_t save_every = 0;
    std::string resume;
    std::int64_t stop_at = 0;  // 0: train to --steps
    std::string init_from;
    int sample = 0;
    std::string prompt = "\n";
    double temperature = 0.8;
    int top_k = 40;
    std::string log;
    std::string rank_log;
    std::string roles;  // empty: the config's low_rank_roles
    bool quiet = false;
    lowrank::examples::MethodConfig method{};
};

using Clock = std::chrono::steady_clock;
using Model = lowrank::Gpt2<float>;
using Json = nlohmann::json;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<std::string> split_commas(const std::string& s) {
    std::vector<std::string> out;
    std::size_t start = 0;
    while (start <= s.size()) {
        const std::size_t end = std::min(s.find(',', start), s.size());
        if (end > start) out.push_back(s.substr(start, end - start));
        start = end + 1;
    }
    return out;
}

// What a checkpoint must agree on for a resume to continue the same run.
Json run_identity(const Config& cfg, const lowrank::Gpt2Config& mc) {
    return Json{{"model", mc.name},       {"n_layer", mc.n_layer}, {"n_head", mc.n_head},
                {"n_embd", mc.n_embd},    {"vocab_size", mc.vocab_size}, {"batch", cfg.batch},
                {"context", cfg.context}, {"method", cfg.method.method}, {"rank", cfg.method.rank},
                {"roles", cfg.roles},     {"seed", cfg.seed}};
}

Json rank_log_to_json(const lowrank::RankLog& log) {
    Json out = Json::array();
    for (const auto& e : log.events())
        out.push_back(Json{{"step", e.step},
                           {"epoch", e.epoch},
                           {"policy", e.policy},
                           {"layer", e.layer},
                           {"event", e.event},
                           {"old_rank", e.old_rank},
                           {"new_rank", e.new_rank},
                           {"statistic", e.statistic},
                           {"value", std::isfinite(e.value) ? Json(e.value) : Json(nullptr)}});
    return out;
}

void rank_log_from_json(const Json& j, lowrank::RankLog& log) {
    log.clear();
    for (const auto& e : j)
        log.add(lowrank::RankEvent{e.at("step").get<std::int64_t>(), e.at("epoch").get<std::int64_t>(),
                                   e.at("policy").get<std::string>(), e.at("layer").get<std::string>(),
                                   e.at("event").get<std::string>(), e.at("old_rank").get<lowrank::Index>(),
                                   e.at("new_rank").get<lowrank::Index>(), e.at("statistic").get<std::string>(),
                                   e.at("value").is_null() ? std::nan("") : e.at("value").get<double>()});
}

// Mean loss over `windows` windows of T + 1 tokens spread evenly over the whole stream
// (the first windows alone would all come from one document), in batches of B.
double evaluate(Model& model, lowrank::Graph<float>& graph, std::span<const std::uint16_t> tokens, lowrank::Index batch,
                lowrank::Index context, lowrank::Index windows, std::vector<std::int32_t>& x, std::vector<std::int32_t>& y) {
    const auto T = static_cast<std::size_t>(context);
    const std::size_t last_start = tokens.size() - T - 1;  // >= 0: TokenWindows checked the length
    const auto K = static_cast<std::size_t>(windows);
    graph.set_grad_enabled(false);
    graph.set_training(false);
    double sum = 0.0;
    for (std::size_t first = 0; first < K; first += static_cast<std::size_t>(batch)) {
        const std::size_t rows = std::min(static_cast<std::size_t>(batch), K - first);
        x.resize(rows * T);
        y.resize(rows * T);
        for (std::size_t r = 0; r < rows; ++r) {
            const std::size_t w = first + r;
            const std::size_t start = K > 1 ? w * last_start / (K - 1) : 0;
            for (std::size_t t = 0; t < T; ++t) {
                x[r * T + t] = tokens[start + t];
                y[r * T + t] = tokens[start + t + 1];
            }
        }
        graph.clear();
        const auto loss = model.loss(graph, x, y, static_cast<lowrank::Index>(rows), context);
        sum += static_cast<double>(loss.item()) * static_cast<double>(rows);
    }
    graph.set_grad_enabled(true);
    graph.set_training(true);
    return sum / static_cast<double>(K);
}

// Samples n tokens after `prompt` with temperature and top-k, recomputing the forward
// pass over the last block_size tokens for each new token.
std::string generate(Model& model, const lowrank::Gpt2Tokenizer& tok, const std::string& prompt, int n,
                     double temperature, int top_k, lowrank::Rng& rng) {
    std::vector<std::int32_t> ids = tok.encode(prompt);
    if (ids.empty()) ids.push_back(tok.eot());
    const std::size_t prompt_len = ids.size();
    lowrank::Graph<float> g;
    g.set_grad_enabled(false);
    g.set_training(false);
    const auto block = static_cast<std::size_t>(model.config().block_size);
    std::vector<std::pair<float, std::int32_t>> top;
    for (int i = 0; i < n; ++i) {
        const std::size_t T = std::min(ids.size(), block);
        std::span<const std::int32_t> window(ids.data() + ids.size() - T, T);
        g.clear();
        const auto logits = model.forward(g, window, 1, static_cast<lowrank::Index>(T));
        const auto row = logits.value().row(static_cast<lowrank::Index>(T) - 1);
        top.clear();
        for (lowrank::Index v = 0; v < row.size(); ++v) top.emplace_back(row(v), static_cast<std::int32_t>(v));
        const std::size_t k = top_k > 0 ? std::min<std::size_t>(static_cast<std::size_t>(top_k), top.size()) : top.size();
        std::partial_sort(top.begin(), top.begin() + static_cast<std::ptrdiff_t>(k), top.end(),
                          [](const auto& a, const auto& b) { return a.first > b.first; });
        double total = 0.0;
        std::vector<double> p(k);
        for (std::size_t j = 0; j < k; ++j) {
            p[j] = std::exp((static_cast<double>(top[j].first) - static_cast<double>(top[0].first)) /
                            std::max(temperature, 1e-6));
            total += p[j];
        }
        double u = rng.uniform() * total;
        std::size_t pick = k - 1;
        for (std::size_t j = 0; j < k; ++j) {
            if (u < p[j]) {
                pick = j;
                break;
            }
            u -= p[j];
        }
        ids.push_back(top[pick].second);
    }
    return tok.decode(std::span<const std::int32_t>(ids.data() + prompt_len, ids.size() - prompt_len));
}

int run(Config cfg) {
    const auto wall_start = Clock::now();
    lowrank::tune_allocator();
    lowrank::set_num_threads(cfg.threads);
#ifdef LOWRANK_EXAMPLE_OPENBLAS
    openblas_set_num_threads(cfg.threads);
#endif

    lowrank::Gpt2Config mc = lowrank::gpt2_config(cfg.model);
    if (cfg.context == 0) cfg.context = mc.block_size;
    if (cfg.context > mc.block_size)
        throw lowrank::Error("--context " + std::to_string(cfg.context) + " exceeds the block size " +
                             std::to_string(mc.block_size) + " of config '" + mc.name + "'");
    const std::vector<std::string> roles = cfg.roles.empty() ? mc.low_rank_roles : split_commas(cfg.roles);

    std::optional<lowrank::MetricsLog> log;
    if (!cfg.log.empty())
        log.emplace(cfg.log, cfg.resume.empty() ? lowrank::MetricsLog::Mode::truncate
                                                : lowrank::MetricsLog::Mode::append);

    // Data: the token streams made by lowrank-tokenize (scripts/prepare_text.sh).
    lowrank::Rng rng(cfg.seed);
    lowrank::TokenWindows train(lowrank::read_tokens(cfg.data + ".train.bin"),
                                {.batch = cfg.batch, .context = cfg.context, .seed = rng.next_u64()});
    lowrank::TokenWindows val(lowrank::read_tokens(cfg.data + ".val.bin"),
                              {.batch = cfg.batch, .context = cfg.context, .seed = 0});
    for (std::uint16_t id : train.tokens())
        if (id >= mc.vocab_size)
            throw lowrank::FormatError("token id " + std::to_string(id) + " in '" + cfg.data +
                                       ".train.bin' is outside the vocabulary of " + std::to_string(mc.vocab_size));

    // The model, optionally from pretrained weights, then the optimizer: AdamW with weight
    // decay on matrices, not on biases and LayerNorm gains (rows == 1).
    Model model(mc, rng);
    if (!cfg.init_from.empty()) lowrank::load_gpt2_weights(model, cfg.init_from);
    lowrank::ParameterList<float> decay, no_decay;
    for (auto* p : model.parameters()) (p->rows() == 1 ? no_decay : decay).push_back(p);
    lowrank::AdamW<float> opt(decay, lowrank::AdamOptions{.lr = cfg.lr, .beta2 = 0.95,
                                                          .weight_decay = cfg.weight_decay});
    opt.add_group(no_decay, lowrank::GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
    const std::int64_t warmup = std::min<std::int64_t>(cfg.warmup_steps, std::max<std::int64_t>(0, cfg.steps - 1));
    lowrank::LrSchedule schedule(lowrank::ScheduleOptions{.kind = lowrank::ScheduleKind::warmup_cosine,
                                                          .warmup_steps = warmup,
                                                          .total_steps = cfg.steps,
                                                          .min_factor = cfg.min_lr_ratio});

    // The method: rank policies on the selected projections. An "epoch" of the policies
    // (Cuttlefish's tracking, InRank's stage 1) is one evaluation interval.
    lowrank::RankLog rank_log;
    lowrank::TrainingContext<float> ctx(model.layer_slots(), opt, schedule, rank_log);
    ctx.steps_per_epoch = cfg.eval_every;
    ctx.total_steps = cfg.steps;
    lowrank::PolicyList<float> policies = lowrank::examples::make_policies<float>(
        cfg.method, mc.n_embd / 4, lowrank::LayerSelector{.roles = roles}, rng.next_u64());
    policies.on_train_begin(ctx);

    lowrank::Graph<float> graph(rng.next_u64());
    std::int64_t step = 0;
    // The running mean of the training loss since the last evaluation: saved too, so that a
    // resumed run reports the same numbers as an uninterrupted one.
    double interval_loss = 0.0;
    std::int64_t interval_steps = 0;
    if (!cfg.resume.empty()) {
        const Json extra = lowrank::read_checkpoint_extra(cfg.resume);
        const Json want = run_identity(cfg, mc);
        if (extra.value("run", Json()) != want)
            throw lowrank::Error("--resume '" + cfg.resume + "': the checkpoint was written by a different run (" +
                                 extra.value("run", Json()).dump() + "), this one is " + want.dump());
        // The policies first: they bring the layers to the saved structure, so that every
        // saved tensor then finds its parameter by name and shape.
        policies.restore(ctx, extra.at("policies"));
        const auto info = lowrank::load_checkpoint(cfg.resume, model.parameters(), &opt);
        step = info.step;
        train.rng().set_state(lowrank::rng_state_from_json(extra.at("train_rng")));
        graph.rng().set_state(lowrank::rng_state_from_json(extra.at("graph_rng")));
        rng.set_state(lowrank::rng_state_from_json(extra.at("rng")));
        schedule.set_rewarm_state({extra.at("rewarm_at").get<std::int64_t>(), extra.at("rewarm_length").get<std::int64_t>()});
        rank_log_from_json(extra.at("rank_log"), rank_log);
        interval_loss = extra.at("interval_loss").get<double>();
        interval_steps = extra.at("interval_steps").get<std::int64_t>();
    }
    const auto save = [&](const std::string& path) {
        Json extra{{"run", run_identity(cfg, mc)},
                   {"train_rng", lowrank::rng_state_to_json(train.rng().state())},
                   {"graph_rng", lowrank::rng_state_to_json(graph.rng().state())},
                   {"rng", lowrank::rng_state_to_json(rng.state())},
                   {"rewarm_at", schedule.rewarm_state().at_step},
                   {"rewarm_length", schedule.rewarm_state().length},
                   {"rank_log", rank_log_to_json(rank_log)},
                   {"policies", policies.state()},
                   {"interval_loss", interval_loss},
                   {"interval_steps", interval_steps}};
        lowrank::save_checkpoint(path, model.parameters(), &opt, step, extra);
    };

    const lowrank::Index params = lowrank::count_parameters(model.parameters());
    const lowrank::Index trainable = lowrank::count_parameters(model.parameters(), true);
    const std::string rank_log_path = cfg.rank_log.empty() && cfg.method.method != "dense"
                                          ? "lowrank-gpt2-" + cfg.method.method + ".ranks.jsonl"
                                          : cfg.rank_log;
    if (!cfg.quiet)
        std::fprintf(stderr,
                     "lowrank-gpt2: config %s (%lld layers, %lld heads, width %lld, context %lld), method %s on "
                     "%s, %lld parameters (%lld trainable); %lld train / %lld val tokens; batch %lld; "
                     "%d thread(s)%s\n",
                     mc.name.c_str(), static_cast<long long>(mc.n_layer), static_cast<long long>(mc.n_head),
                     static_cast<long long>(mc.n_embd), static_cast<long long>(cfg.context),
                     cfg.method.method.c_str(), cfg.roles.empty() ? "the config's roles" : cfg.roles.c_str(),
                     static_cast<long long>(params), static_cast<long long>(trainable),
                     static_cast<long long>(train.size()), static_cast<long long>(val.size()),
                     static_cast<long long>(cfg.batch), cfg.threads,
                     step > 0 ? (", resuming at step " + std::to_string(step)).c_str() : "");

    lowrank::ProgressBar bar(lowrank::ProgressOptions{.enabled = !cfg.quiet});
    std::vector<std::int32_t> x, y, ex, ey;
    const lowrank::Index tokens_per_step = cfg.batch * cfg.context;
    double train_seconds = 0.0, eval_seconds = 0.0, lr_now = 0.0, val_loss = std::nan("");
    double last_train_loss = std::nan("");
    const std::int64_t first_step = step;
    bar.begin_epoch(1, 1, cfg.steps - step);
    auto interval_start = Clock::now();
    std::int64_t interval_first_step = step;  // for tokens/s: steps timed in this process
    const std::int64_t last_step = cfg.stop_at > 0 ? std::min(cfg.stop_at, cfg.steps) : cfg.steps;
    while (step < last_step) {
        train.next(x, y);
        ctx.step = step;
        ctx.epoch = step / cfg.eval_every;
        policies.before_forward(ctx);
        graph.clear();
        const auto loss = model.loss(graph, x, y, cfg.batch, cfg.context);
        const double loss_value = loss.item();
        if (!std::isfinite(loss_value))
            throw lowrank::Error("non-finite loss (" + std::to_string(loss_value) + ") at step " + std::to_string(step) +
                                 "; try a smaller --lr");
        opt.zero_grad();
        graph.backward(loss);
        policies.after_backward(ctx);
        if (cfg.grad_clip > 0) lowrank::clip_grad_norm(model.parameters(), cfg.grad_clip);
        lr_now = cfg.lr * schedule.apply(opt, step);
        opt.step();
        ++step;
        ctx.step = step;
        policies.after_step(ctx);
        interval_loss += loss_value;
        ++interval_steps;
        bar.update(step - first_step, loss_value, tokens_per_step);

        const bool eval_now = step % cfg.eval_every == 0 || step == cfg.steps;
        if (eval_now) {
            const double seconds = seconds_since(interval_start);
            train_seconds += seconds;
            last_train_loss = interval_loss / static_cast<double>(interval_steps);
            if (step % cfg.eval_every == 0) policies.on_epoch_end(ctx);
            const auto eval_start = Clock::now();
            val_loss = evaluate(model, graph, val.tokens(), cfg.batch, cfg.context, cfg.eval_windows, ex, ey);
            eval_seconds += seconds_since(eval_start);
            const double tps = static_cast<double>((step - interval_first_step) * tokens_per_step) / seconds;
            bar.clear();
            if (!cfg.quiet)
                std::fprintf(stderr, "step %6lld/%lld  train_loss %.4f  val_loss %.4f  val_ppl %.1f  lr %.2e  %.0f tokens/s\n",
                             static_cast<long long>(step), static_cast<long long>(cfg.steps), last_train_loss, val_loss,
                             std::exp(val_loss), lr_now, tps);
            if (log) {
                std::vector<lowrank::Index> ranks;
                for (const auto& s : model.layer_slots()) ranks.push_back(s.layer->rank());
                log->write(lowrank::JsonLine()
                               .field("step", step)
                               .field("train_loss", last_train_loss)
                               .field("val_loss", val_loss)
                               .field("val_ppl", std::exp(val_loss))
                               .field("lr", lr_now)
                               .field("tokens_per_second", tps)
                               .field("ranks", ranks)
                               .field("trainable_params", lowrank::count_parameters(model.parameters(), true)));
            }
            if (!rank_log_path.empty()) rank_log.write_jsonl(rank_log_path);
            interval_loss = 0.0;
            interval_steps = 0;
            interval_start = Clock::now();
            interval_first_step = step;
        }
        if (!cfg.save.empty() && ((cfg.save_every > 0 && step % cfg.save_every == 0) || step == last_step))
            save(cfg.save);
    }
    bar.finish();
    if (step == first_step) val_loss = evaluate(model, graph, val.tokens(), cfg.batch, cfg.context, cfg.eval_windows, ex, ey);  // nothing left to train

    if (cfg.sample > 0) {
        const auto tok = lowrank::Gpt2Tokenizer::from_dir(cfg.vocab);
        lowrank::Rng sample_rng(cfg.seed + 1);
        std::cout << generate(model, tok, cfg.prompt, cfg.sample, cfg.temperature, cfg.top_k, sample_rng) << "\n";
    }

    nlohmann::ordered_json result;
    result["method"] = cfg.method.method;
    result["config"] = mc.name;
    result["val_loss"] = val_loss;
    result["val_ppl"] = std::exp(val_loss);
    result["train_loss"] = last_train_loss;
    const double trained_tokens = static_cast<double>((step - first_step) * tokens_per_step);
    result["tokens_per_second"] = train_seconds > 0 ? trained_tokens / train_seconds : 0.0;
    result["params"] = lowrank::count_parameters(model.parameters());
    result["params_at_start"] = params;
    result["trainable_params"] = lowrank::count_parameters(model.parameters(), true);
    nlohmann::ordered_json ranks = nlohmann::ordered_json::object();
    for (const auto& s : model.layer_slots())
        if (std::find(roles.begin(), roles.end(), s.role) != roles.end()) ranks[s.layer->name()] = s.layer->rank();
    result["final_ranks"] = ranks;
    result["rank_log"] = rank_log_path.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(rank_log_path);
    result["rank_events"] = rank_log.size();
    result["steps"] = step;
    result["batch"] = cfg.batch;
    result["context"] = cfg.context;
    result["tokens"] = static_cast<double>(step * tokens_per_step);
    result["lr"] = cfg.lr;
    result["seed"] = cfg.seed;
    result["threads"] = cfg.threads;
#ifdef LOWRANK_EXAMPLE_OPENBLAS
    result["gemm"] = "openblas";
#else
    result["gemm"] = "eigen";
#endif
    result["train_seconds"] = train_seconds;
    result["eval_seconds"] = eval_seconds;
    result["wall_seconds"] = seconds_since(wall_start);
    std::cout << result.dump() << std::endl;
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Config cfg;
    CLI::App app{"Train GPT-2 (dense or low-rank) on a token stream with AdamW, warm-up + cosine decay and\n"
                 "gradient clipping. Progress goes to stderr; the last line of stdout is a JSON object.",
                 "lowrank-gpt2"};
    app.add_option("--config", cfg.model, "Model config: tiny, mini, gpt2, gpt2-medium")->capture_default_str();
    app.add_option("--steps", cfg.steps, "Optimizer steps in total")->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--batch", cfg.batch, "Sequences per step (B)")
        ->check(CLI::Range(lowrank::Index{1}, lowrank::Index{1} << 16))
        ->capture_default_str();
    app.add_option("--context", cfg.context, "Tokens per sequence (T); 0: the config's block size")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--lr", cfg.lr, "Peak learning rate (AdamW, betas 0.9 / 0.95)")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--min-lr-ratio", cfg.min_lr_ratio, "Final lr of the cosine decay, as a fraction of --lr")
        ->check(CLI::Range(0.0, 1.0))
        ->capture_default_str();
    app.add_option("--warmup-steps", cfg.warmup_steps, "Steps of linear warm-up")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--weight-decay", cfg.weight_decay, "AdamW decoupled weight decay (matrices only)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--grad-clip", cfg.grad_clip, "Clip the global gradient norm to this (0: off)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--eval-every", cfg.eval_every, "Steps between validation evaluations")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--eval-windows", cfg.eval_windows, "Validation windows of T tokens per evaluation, spread evenly over the validation stream")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--threads", cfg.threads, "Threads for GEMM and kernels")->check(CLI::Range(1, 1024))->capture_default_str();
    app.add_option("--seed", cfg.seed, "Seed of the initialisation, the batches and dropout")->capture_default_str();
    app.add_option("--data", cfg.data, "Token streams PREFIX.train.bin and PREFIX.val.bin (lowrank-tokenize)")
        ->capture_default_str();
    app.add_option("--vocab", cfg.vocab, "Directory with encoder.json and vocab.bpe (for --sample)")->capture_default_str();
    app.add_option("--save", cfg.save, "Write a checkpoint (safetensors) here at the end and every --save-every steps");
    app.add_option("--save-every", cfg.save_every, "Steps between checkpoints (0: only at the end)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--resume", cfg.resume, "Continue the run saved in this checkpoint, exactly");
    app.add_option("--stop-at", cfg.stop_at,
                   "Stop (and --save) after this step, as if interrupted; --resume continues the same run")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--init-from", cfg.init_from,
                   "Start from these weights (safetensors; ours, or GPT-2's published names and Conv1D layout)");
    app.add_option("--sample", cfg.sample, "Generate this many tokens after training")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--prompt", cfg.prompt, "Text the sample continues");
    app.add_option("--temperature", cfg.temperature, "Sampling temperature")->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--top-k", cfg.top_k, "Sample among the k most likely tokens (0: all)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--roles", cfg.roles,
                   "Projections the method applies to, comma-separated from attn_qkv, attn_proj, mlp_fc, mlp_proj "
                   "(default: the config's, mlp_fc,mlp_proj)");
    app.add_option("--log", cfg.log, "Write one JSON line per evaluation to this file");
    app.add_option("--rank-log", cfg.rank_log,
                   "Write the rank policy's decisions here (default lowrank-gpt2-<method>.ranks.jsonl)");
    app.add_flag("--quiet,-q", cfg.quiet, "No progress bar or evaluation lines on stderr");
    lowrank::examples::add_method_options(app, cfg.method, "n_embd / 4");
    app.get_option("--inrank-stage1-steps")
        ->description("inrank: optimizer steps of rank growth before the cut to fixed rank (default: "
                      "--inrank-warmup + 4 x --inrank-gap, unless --inrank-stage1-epochs is given)")
        ->default_str("");

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        const int code = app.exit(e);
        return code == 0 ? 0 : 2;
    }
    // A language model has no epochs: unless told otherwise, InRank's stage 1 (rank growth)
    // lasts through its warm-up and four rank checks, then the cut to fixed rank follows.
    // (One "epoch" here is one evaluation interval, which can end before the first check.)
    if (app.count("--inrank-stage1-steps") == 0 && app.count("--inrank-stage1-epochs") == 0)
        cfg.method.inrank.stage1_steps = cfg.method.inrank.warmup + 4 * cfg.method.inrank.gap;
    try {
        return run(cfg);
    } catch (const std::bad_alloc&) {
        std::cerr << "lowrank-gpt2: error: out of memory (try a smaller --batch or --config)\n";
    } catch (const std::exception& e) {
        std::cerr << "lowrank-gpt2: error: " << e.what() << "\n";
    }
    return 1;
}
