// lowrank-sample: text from a lowrank-gpt2 checkpoint, without training a step. The model
// is rebuilt as the trainer built it, from the run identity the checkpoint keeps (config,
// tokenizer, method, ranks, roles, seed, schedule): the same TrainingRun with the same
// policies, resumed from the checkpoint, so every layer comes back in its saved form (LoRA's
// factors on their base, SST's spectral layers, InRank's ranks, ...). Any difference between
// this construction and the trainer's is refused by TrainingRun::resume, naming the key.
// Nothing is written; the checkpoint is only read.
//
// Tokens are drawn with gpt2_sample (a key/value cache: O(T) per token), or with --no-cache
// the reference that recomputes the forward over the window for each token. The prompt,
// temperature, top-k, --sample and --vocab default to the run's own (its --sample settings);
// the generator's seed to the run's --seed + 1, so a finished run's sample is the one its
// trainer printed. stdout: the text, then one JSON line (tokens, timings); exit codes as
// lowrank-gpt2's (0 success, 1 runtime error, 2 bad command line).

#include <lowrank/lowrank.hpp>

#include "common/cli_checks.hpp"
#include "common/method_cli.hpp"
#include "common/resume_cli.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iostream>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace {

using Json = nlohmann::json;

struct Options {
    std::string checkpoint, vocab, prompt;
    int sample = -1, top_k = -1, threads = 1;
    double temperature = -1.0;
    std::optional<std::uint64_t> seed;
    bool no_cache = false, quiet = false;
};

/// The trainer's model options (lowrank-gpt2's names), set from the checkpoint's identity.
struct ModelOptions {
    std::string model = "tiny", tokenizer = "gpt2";
    std::vector<std::string> roles;
    lowrank::examples::MethodConfig method{};
};

const Json& member(const Json& j, const char* key, const std::string& where) {
    const auto it = j.find(key);
    lowrank::check(it != j.end(), where, "expected a key '", key, "', found none");
    return *it;
}

int sample(Options opt) {
    namespace fs = std::filesystem;
    lowrank::tune_allocator();
    lowrank::set_num_threads(opt.threads);
    // A run's folder: its newest checkpoint, as --resume DIR takes it.
    std::error_code ec;
    if (fs::is_directory(opt.checkpoint, ec)) {
        const fs::path found =
            lowrank::examples::newest_checkpoint(fs::path(opt.checkpoint) / lowrank::examples::kCheckpointName,
                                                 "lowrank-sample");
        lowrank::check(!found.empty(), "--checkpoint '" + opt.checkpoint + "'", "expected a run's folder with ",
                       lowrank::examples::kCheckpointName, " (or checkpoint-step<N>.safetensors) in it, found none");
        opt.checkpoint = found.string();
    }
    const std::string where = "--checkpoint '" + opt.checkpoint + "'";
    const Json extra = lowrank::read_checkpoint_extra(opt.checkpoint);
    const Json& run_doc = member(extra, "run", where);
    const Json& saved = member(run_doc, "identity", where);
    lowrank::check(saved.is_object() && saved.contains("--config") && saved.contains("--method"), where,
                   "expected a lowrank-gpt2 checkpoint (a run identity with --config and --method)");
    const Json settings = extra.contains("user") ? extra["user"].value("settings", Json::object()) : Json::object();

    // The model options exactly as the trainer parsed them: its own option definitions,
    // every value from the checkpoint.
    ModelOptions m;
    CLI::App model_app{"the checkpoint's model options"};
    model_app.add_option("--config", m.model);
    model_app.add_option("--tokenizer", m.tokenizer);
    model_app.add_option("--roles", m.roles)->delimiter(',');
    lowrank::examples::add_method_options(model_app, m.method, "n_embd / 4");
    model_app.get_option("--inrank-stage1-steps")->default_str("");  // as lowrank-gpt2's
    model_app.allow_extras();
    model_app.parse(std::vector<std::string>{});
    lowrank::examples::take_identity_from_checkpoint(model_app, {}, saved, Json::object(), {}, {});
    if (model_app.count("--inrank-stage1-steps") == 0 && model_app.count("--inrank-stage1-epochs") == 0)
        m.method.inrank.stage1_steps =
            lowrank::inrank_steps_for_checks(lowrank::examples::inrank_options(m.method), 4);
    const bool bytes = m.tokenizer == "bytes";
    lowrank::Gpt2Config mc = lowrank::gpt2_config(m.model);
    if (bytes) {
        mc.vocab_size = 256;
        mc.low_rank_roles.assign(lowrank::kGpt2Roles.begin(), lowrank::kGpt2Roles.end());
    }
    const std::vector<std::string> roles = m.roles.empty() ? mc.low_rank_roles : m.roles;

    // What to sample: the command line, else the run's own settings, else the trainer's defaults.
    // (A setting the run left at its default is saved as the default's text: "" for --prompt.)
    const auto number = [&](const char* key, double fallback) {
        const auto it = settings.find(key);
        return it != settings.end() && it->is_number() ? it->get<double>() : fallback;
    };
    const auto text = [&](const char* key, const std::string& fallback) {
        const auto it = settings.find(key);
        const std::string s = it == settings.end() ? "" : lowrank::examples::detail::identity_arg(*it);
        return s.empty() ? fallback : s;
    };
    if (opt.sample < 0) opt.sample = static_cast<int>(number("--sample", 0));
    lowrank::check(opt.sample > 0, "--sample", "expected a number of tokens > 0, got ", opt.sample,
                   " (the checkpoint's run sampled none: give --sample N)");
    if (opt.top_k < 0) opt.top_k = static_cast<int>(number("--top-k", 40));
    if (opt.temperature <= 0.0) opt.temperature = number("--temperature", 0.8);
    if (opt.prompt.empty()) opt.prompt = text("--prompt", "\n");
    if (opt.vocab.empty()) opt.vocab = text("--vocab", "data/gpt2");
    const std::uint64_t seed = opt.seed ? *opt.seed : member(saved, "--seed", where).get<std::uint64_t>() + 1;
    std::optional<lowrank::Gpt2Tokenizer> tok;
    if (!bytes) tok.emplace(lowrank::Gpt2Tokenizer::from_dir(opt.vocab));

    // The run as lowrank-gpt2 builds it at step 0 (main.cpp, train()): the generator's draws
    // in its order (the batches' seed, the model, the policies', the tape's), AdamW's two
    // groups, the same policies and tracked generator; the schedule and the rest from the
    // identity. Then the resume brings back the layers and weights.
    lowrank::Rng rng(member(saved, "--seed", where).get<std::uint64_t>());
    lowrank::Rng batches(rng.next_u64());
    lowrank::Gpt2<float> model(mc, rng);
    lowrank::ParameterList<float> decay, no_decay;
    for (auto* p : model.parameters()) (p->rows() == 1 ? no_decay : decay).push_back(p);
    lowrank::AdamW<float> adamw(decay, {.lr = member(saved, "--lr", where).get<double>(),
                                        .beta2 = 0.95,
                                        .weight_decay = member(saved, "--weight-decay", where).get<double>()});
    adamw.add_group(no_decay, {.weight_decay = 0.0, .name = "no_decay"});
    const std::uint64_t policy_seed = rng.next_u64(), graph_seed = rng.next_u64();
    const Json& schedule = member(saved, "schedule", where);
    Json identity = saved;
    for (const char* derived : {"optimizer", "policies", "schedule", "clip_grad_norm", "non_finite",
                                "steps_per_epoch", "total_steps", "parameters"})
        identity.erase(derived);
    lowrank::TrainingRun<float> run(
        model, adamw,
        {.schedule = lowrank::LrSchedule({.kind = lowrank::ScheduleKind::warmup_cosine,
                                          .warmup_steps = member(schedule, "warmup_steps", where).get<std::int64_t>(),
                                          .total_steps = member(schedule, "total_steps", where).get<std::int64_t>(),
                                          .min_factor = member(schedule, "min_factor", where).get<double>()}),
         .clip_grad_norm = member(saved, "clip_grad_norm", where).get<double>(),
         .steps_per_epoch = member(saved, "steps_per_epoch", where).get<std::int64_t>(),
         .total_steps = member(saved, "total_steps", where).get<std::int64_t>(),
         .seed = graph_seed,
         .identity = identity});
    run.add(lowrank::examples::make_policies<float>(m.method, mc.n_embd / 4, {.roles = roles}, policy_seed));
    run.track_rng("train", batches);
    run.resume(opt.checkpoint);

    std::vector<std::int32_t> prompt;
    if (tok) {
        prompt = tok->encode(opt.prompt);
        if (prompt.empty()) prompt.push_back(tok->eot());
    } else {
        for (const char c : opt.prompt) prompt.push_back(static_cast<unsigned char>(c));
        if (prompt.empty()) prompt.push_back('\n');
    }
    const std::size_t prompt_tokens = prompt.size();
    lowrank::Rng sample_rng(seed);
    const lowrank::SampleOptions so{.temperature = opt.temperature, .top_k = opt.top_k};
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<std::int32_t> ids =
        opt.no_cache ? lowrank::gpt2_sample_uncached(model, std::move(prompt), opt.sample, so, sample_rng)
                     : lowrank::gpt2_sample(model, std::move(prompt), opt.sample, so, sample_rng);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::string out;
    if (tok)
        out = tok->decode(ids);
    else
        for (const std::int32_t id : ids) out.push_back(static_cast<char>(static_cast<unsigned char>(id)));
    std::cout << out << "\n";
    if (!opt.quiet)
        std::fprintf(stderr, "lowrank-sample: %zu tokens from step %lld of %s (config %s, method %s) in %.3f s, %.2f ms/token%s\n",
                     ids.size(), static_cast<long long>(run.global_step()), opt.checkpoint.c_str(), mc.name.c_str(),
                     m.method.method.c_str(), seconds, 1e3 * seconds / static_cast<double>(ids.size()),
                     opt.no_cache ? " (no cache)" : "");
    const nlohmann::ordered_json result{{"checkpoint", opt.checkpoint},
                                        {"step", run.global_step()},
                                        {"config", mc.name},
                                        {"method", m.method.method},
                                        {"tokenizer", m.tokenizer},
                                        {"prompt_tokens", prompt_tokens},
                                        {"tokens", ids.size()},
                                        {"cache", !opt.no_cache},
                                        {"seed", seed},
                                        {"threads", opt.threads},
                                        {"seconds", seconds},
                                        {"ms_per_token", 1e3 * seconds / static_cast<double>(ids.size())}};
    std::cout << result.dump() << std::endl;
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Options opt;
    CLI::App app{
        "Sample text from a lowrank-gpt2 checkpoint without training: the model, method and ranks\n"
        "come from the checkpoint. stdout: the text, then a JSON line.",
        "lowrank-sample"};
    app.set_version_flag("--version", std::string("lowrank ") + lowrank::version_string());
    app.add_option("checkpoint,--checkpoint", opt.checkpoint,
                   "A lowrank-gpt2 checkpoint FILE, or a run's folder DIR (its newest checkpoint)")
        ->required()
        ->type_name("FILE|DIR");
    app.add_option("--sample", opt.sample, "Tokens to generate (default: the run's --sample)")
        ->check(lowrank::examples::positive);
    app.add_option("--prompt", opt.prompt, "Text the sample continues (default: the run's --prompt, or a newline)");
    app.add_option("--temperature", opt.temperature, "Sampling temperature (default: the run's, or 0.8)")
        ->check(lowrank::examples::positive);
    app.add_option("--top-k", opt.top_k, "Sample among the k most likely tokens, 0: all (default: the run's, or 40)")
        ->check(lowrank::examples::non_negative);
    app.add_option("--seed", opt.seed, "Seed of the sampling generator (default: the run's --seed + 1, as lowrank-gpt2)");
    app.add_option("--vocab", opt.vocab,
                   "Directory with encoder.json and vocab.bpe (default: the run's --vocab, or data/gpt2; "
                   "not read for a --tokenizer bytes model)");
    app.add_option("--threads", opt.threads, "Threads for GEMM and kernels")->check(CLI::Range(1, 1024))->capture_default_str();
    app.add_flag("--no-cache", opt.no_cache,
                 "Recompute the forward over the whole window for each token (the reference, O(T^2) per token)");
    app.add_flag("--quiet,-q", opt.quiet, "No summary line on stderr");
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        const int code = app.exit(e);
        return code == 0 ? 0 : 2;
    }
    try {
        return sample(opt);
    } catch (const std::exception& e) {
        std::cerr << "lowrank-sample: error: " << e.what() << "\n";
    }
    return 1;
}
