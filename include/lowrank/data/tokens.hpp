#pragma once
// Token streams on disk and as training batches.
//
// A token file is the ids as little-endian uint16, back to back, nothing else (GPT-2's
// 50257 ids fit; the format of nanoGPT's and llm.c's .bin streams without a header).
// TokenWindows turns a stream into batches of B random windows of T+1 tokens (inputs and
// next-token targets) drawn with lowrank::Rng, whose state a checkpoint saves, and into a
// deterministic sequence of non-overlapping windows for evaluation.

#include <lowrank/core/atomic_file.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/core/types.hpp>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>


namespace lowrank {

/// Writes `ids` as little-endian uint16 to `path`, atomically: a temporary file in the
/// same directory, flushed and synced, then renamed over `path` (a crash leaves the old
/// file or the new one, never half of one). Throws Error, before creating anything, if an
/// id is outside [0, 65535], naming it and its position.
inline void write_tokens(const std::filesystem::path& path, std::span<const std::int32_t> ids) {
    const std::string where = detail::concat("write_tokens: '", path.string(), "'");
    std::vector<unsigned char> bytes(ids.size() * 2);
    for (std::size_t k = 0; k < ids.size(); ++k) {
        const std::int32_t id = ids[k];
        if (id < 0 || id > 0xFFFF)
            throw Error(detail::concat(where, ": id ", id, " at position ", k,
                                       " does not fit in uint16 (expected 0 <= id <= 65535)"));
        bytes[2 * k] = static_cast<unsigned char>(id & 0xFF);
        bytes[2 * k + 1] = static_cast<unsigned char>((id >> 8) & 0xFF);
    }
    write_file_atomically(path, "write_tokens", [&](const auto& put) { put(bytes.data(), bytes.size()); });
}

/// Reads a token file written by write_tokens. Throws FormatError for a missing or
/// unreadable file, for an odd number of bytes (not a uint16 stream, or cut short), and for
/// a file whose size changes while it is read. Memory is the file's size, allocated once
/// from the size checked up front (the bytes are read straight into the ids).
inline std::vector<std::uint16_t> read_tokens(const std::filesystem::path& path) {
    const std::string where = detail::concat("read_tokens: '", path.string(), "'");
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (!std::filesystem::exists(status)) {
        if (ec && ec != std::errc::no_such_file_or_directory)
            throw FormatError(detail::concat(where, ": cannot get its status: ", ec.message()));
        throw FormatError(detail::concat(where, ": the file does not exist"));
    }
    if (!std::filesystem::is_regular_file(status))
        throw FormatError(detail::concat(where, ": not a regular file"));
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    if (ec) throw FormatError(detail::concat(where, ": cannot get the file size: ", ec.message()));
    if (size % 2 != 0)
        throw FormatError(detail::concat(where, ": expected an even number of bytes (uint16 tokens), got ",
                                         size, " (a truncated or foreign file)"));
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
    if (!f) throw FormatError(detail::concat(where, ": cannot open: ", std::strerror(errno)));
    std::vector<std::uint16_t> ids(static_cast<std::size_t>(size / 2));
    const std::size_t want = ids.size() * 2;
    const std::size_t got = want == 0 ? 0 : std::fread(ids.data(), 1, want, f.get());
    unsigned char more = 0;
    const bool grew = got == want && std::fread(&more, 1, 1, f.get()) == 1;
    if (std::ferror(f.get()) != 0 || got != want || grew)
        throw FormatError(detail::concat(where, ": expected ", want, " bytes, read ", grew ? "more than " : "",
                                         grew ? want : got,
                                         " (the file changed while reading, or an I/O error)"));
    if constexpr (std::endian::native == std::endian::big)
        for (auto& id : ids) id = static_cast<std::uint16_t>((id >> 8) | (id << 8));
    return ids;
}

/// Throws FormatError unless every id is below vocab_size, naming `file` and the position
/// of the first that is not: checked before training, not at the first batch that holds it.
inline void check_token_ids(std::span<const std::uint16_t> ids, Index vocab_size, std::string_view file) {
    for (std::size_t i = 0; i < ids.size(); ++i)
        if (ids[i] >= vocab_size)
            throw FormatError(detail::concat("'", file, "': token id ", ids[i], " at position ", i,
                                             " is outside the vocabulary of ", vocab_size));
}

struct TokenWindowOptions {
    Index batch = 8;         // B: windows per batch
    Index context = 128;     // T: tokens per window (inputs); each window reads T+1 tokens
    std::uint64_t seed = 0;  // seed of the window positions
};

/// Batches of windows over a token stream, for next-token prediction.
///
///   TokenWindows train(read_tokens("data/text/corpus.train.bin"), {.batch = 8, .context = 128, .seed = 1});
///   std::vector<std::int32_t> x, y;
///   train.next(x, y);  // x, y: B*T ids, row-major (b*T + t); y[b*T + t] follows x[b*T + t]
class TokenWindows {
public:
    explicit TokenWindows(std::vector<std::uint16_t> tokens, TokenWindowOptions options = {})
        : tokens_(std::move(tokens)), options_(options), rng_(options.seed) {
        check(options_.batch >= 1, "TokenWindows", "expected batch >= 1, got ", options_.batch);
        check(options_.context >= 1, "TokenWindows", "expected context >= 1, got ", options_.context);
        check(static_cast<std::uint64_t>(tokens_.size()) >= static_cast<std::uint64_t>(options_.context) + 1,
              "TokenWindows", "a window of context ", options_.context, " needs ", options_.context + 1,
              " tokens, but the stream holds ", tokens_.size());
    }

    /// Fills `inputs` and `targets` (resized to B*T) from B windows at positions drawn
    /// uniformly from [0, size() - T - 1]: inputs[b*T + t] = tokens[p_b + t],
    /// targets[b*T + t] = tokens[p_b + t + 1]. Uses B draws of rng().
    void next(std::vector<std::int32_t>& inputs, std::vector<std::int32_t>& targets) {
        const auto B = static_cast<std::size_t>(options_.batch);
        const auto T = static_cast<std::size_t>(options_.context);
        inputs.resize(B * T);
        targets.resize(B * T);
        const std::uint64_t starts = tokens_.size() - T;  // >= 1 by the constructor's check
        for (std::size_t b = 0; b < B; ++b) {
            const auto start = static_cast<std::size_t>(rng_.below(starts));
            copy_window(start, inputs.data() + b * T, targets.data() + b * T);
        }
    }

    /// The generator of window positions. A checkpoint saves rng().state(); restoring it
    /// with rng().set_state(...) makes next() continue with exactly the same batches.
    Rng& rng() { return rng_; }
    const Rng& rng() const { return rng_; }

    /// Number of non-overlapping windows: window w has inputs tokens[w*T, w*T + T) and
    /// targets one further; every token but the last is an input at most once.
    Index window_count() const {
        return static_cast<Index>((tokens_.size() - 1) / static_cast<std::size_t>(options_.context));
    }

    /// Number of sequential batches covering the first `max_windows` windows (all of
    /// them if max_windows < 0); the last batch may have fewer than B rows.
    Index sequential_batch_count(Index max_windows = -1) const {
        const Index w = windows_limit(max_windows);
        return (w + options_.batch - 1) / options_.batch;
    }

    /// Fills batch k of the sequential pass over the first `max_windows` windows (all if
    /// max_windows < 0): windows kB, kB+1, ... Returns its number of rows (B, or fewer for
    /// the last batch); inputs and targets are resized to rows*T. Draws nothing from rng().
    Index sequential_batch(Index k, std::vector<std::int32_t>& inputs, std::vector<std::int32_t>& targets,
                           Index max_windows = -1) const {
        const Index count = sequential_batch_count(max_windows);
        check(k >= 0 && k < count, "TokenWindows::sequential_batch", "batch index ", k, " is outside [0, ",
              count, ")");
        const Index first = k * options_.batch;
        const Index rows = std::min(options_.batch, windows_limit(max_windows) - first);
        const auto T = static_cast<std::size_t>(options_.context);
        inputs.resize(static_cast<std::size_t>(rows) * T);
        targets.resize(static_cast<std::size_t>(rows) * T);
        for (Index r = 0; r < rows; ++r) {
            const auto row = static_cast<std::size_t>(r);
            copy_window(static_cast<std::size_t>(first + r) * T, inputs.data() + row * T,
                        targets.data() + row * T);
        }
        return rows;
    }

    /// Calls fn(std::span<const std::int32_t> inputs, std::span<const std::int32_t> targets,
    /// Index rows) for each sequential batch over the first `max_windows` windows (all if
    /// max_windows < 0), in order, reusing two buffers: the same windows every time.
    template <class F>
    void for_each_sequential_batch(Index max_windows, F&& fn) const {
        std::vector<std::int32_t> inputs;
        std::vector<std::int32_t> targets;
        const Index count = sequential_batch_count(max_windows);
        for (Index k = 0; k < count; ++k) {
            const Index rows = sequential_batch(k, inputs, targets, max_windows);
            fn(std::span<const std::int32_t>(inputs), std::span<const std::int32_t>(targets), rows);
        }
    }

    /// Calls fn(inputs, targets, rows) for batches of B windows (the last may have fewer
    /// rows) over `windows` windows spread evenly over the whole stream: window w starts at
    /// w * (size() - T - 1) / (windows - 1). An evaluation then samples every part of the
    /// text, where the first windows would all come from its first document. The same
    /// windows every time; draws nothing from rng().
    template <class F>
    void for_each_spread_batch(Index windows, F&& fn) const {
        check(windows >= 1, "TokenWindows::for_each_spread_batch", "expected windows >= 1, got ", windows);
        const auto T = static_cast<std::size_t>(options_.context);
        const std::size_t last_start = tokens_.size() - T - 1;  // >= 0: the constructor checked the length
        const auto K = static_cast<std::size_t>(windows);
        std::vector<std::int32_t> inputs;
        std::vector<std::int32_t> targets;
        for (std::size_t first = 0; first < K; first += static_cast<std::size_t>(options_.batch)) {
            const std::size_t rows = std::min(static_cast<std::size_t>(options_.batch), K - first);
            inputs.resize(rows * T);
            targets.resize(rows * T);
            for (std::size_t r = 0; r < rows; ++r) {
                const std::size_t w = first + r;
                copy_window(K > 1 ? w * last_start / (K - 1) : 0, inputs.data() + r * T, targets.data() + r * T);
            }
            fn(std::span<const std::int32_t>(inputs), std::span<const std::int32_t>(targets),
               static_cast<Index>(rows));
        }
    }

    std::span<const std::uint16_t> tokens() const { return tokens_; }
    Index size() const { return static_cast<Index>(tokens_.size()); }
    Index batch() const { return options_.batch; }
    Index context() const { return options_.context; }
    const TokenWindowOptions& options() const { return options_; }

private:
    Index windows_limit(Index max_windows) const {
        const Index all = window_count();
        return max_windows < 0 ? all : std::min(all, max_windows);
    }

    void copy_window(std::size_t start, std::int32_t* inputs, std::int32_t* targets) const {
        const auto T = static_cast<std::size_t>(options_.context);
        const std::uint16_t* src = tokens_.data() + start;
        for (std::size_t t = 0; t < T; ++t) {
            inputs[t] = src[t];
            targets[t] = src[t + 1];
        }
    }

    std::vector<std::uint16_t> tokens_;
    TokenWindowOptions options_;
    Rng rng_;
};

}  // namespace lowrank
