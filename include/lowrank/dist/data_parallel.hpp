#pragma once
// Data-parallel training (docs/distributed.md): every process holds a replica of the model,
// takes its shard of every global batch, and after backward the trainable gradients are
// averaged over the processes, so every replica takes the same step as one process on the
// whole batch would.
//
//     lowrank::MpiEnvironment mpi(&argc, &argv);
//     lowrank::TrainingRun<float> run(model, opt, {...});
//     lowrank::DataParallel<float> dp(run, mpi.world());
//     dp.broadcast_parameters();               // replicas start from rank 0's weights
//     for (...) {
//         const auto batch = sampler.next();   // the same global batch on every process
//         const lowrank::Shard s = dp.shard(batch.size());
//         run.step([&](lowrank::Graph<float>& g) { return loss(g, batch.subspan(s.begin, s.count)); });
//     }
//
// What travels: the gradients of the trainable parameters only (a frozen base never does;
// an InRank layer sends its active columns), copied into one preallocated flat buffer and
// summed in buckets of `bucket_bytes`, one MPI_Allreduce each, with the step's loss in the
// same buffer. Each process weighs its gradient by its share of the batch, so uneven
// shards average correctly. A steady step allocates nothing here; the buffer is rebuilt
// only when a policy changes the trainable parameters.
//
// Replicas stay identical because every process applies the same update to the same
// weights, and every rank decision is a function of the weights, the reduced gradients and
// the policies' own generators (seeded alike): check_replicas() compares a checksum of every
// parameter and of the rank log across processes and throws naming the first difference.

#include <lowrank/core/error.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/types.hpp>
#include <lowrank/dist/mpi.hpp>
#include <lowrank/optim/clip.hpp>
#include <lowrank/train/evaluate.hpp>
#include <lowrank/train/gradient_reducer.hpp>
#include <lowrank/train/run.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace lowrank {

/// The rows [begin, begin + count) of a global batch that one process takes.
struct Shard {
    Index begin = 0;
    Index count = 0;
};

/// Process `rank` of `size` takes a contiguous block of the `global` rows; the first
/// global % size processes take one row more. The blocks cover the rows in order, once.
inline Shard shard_of(Index global, int rank, int size) {
    check(size >= 1 && rank >= 0 && rank < size, "shard_of", "expected 0 <= rank < size, got rank ", rank,
          " of ", size);
    check(global >= 0, "shard_of", "expected a batch of >= 0 rows, got ", global);
    const Index base = global / size, extra = global % size;
    const Index r = rank;
    return {r * base + std::min(r, extra), base + (r < extra ? 1 : 0)};
}

struct DataParallelOptions {
    /// Bytes of one all-reduce (the last bucket of a step may be smaller). Large buckets
    /// amortise the latency of a call; 32 MiB is in the range PyTorch DDP uses (25 MB).
    std::size_t bucket_bytes = std::size_t{32} << 20;
};

/// What the reductions sent, for the bytes-per-step report (docs/distributed.md).
struct CommunicationStats {
    std::int64_t steps = 0;      // steps reduced
    std::int64_t calls = 0;      // MPI_Allreduce calls, all steps (none with one process)
    std::uint64_t bytes = 0;     // payload summed (scalars x sizeof), all steps
    Index scalars_per_step = 0;  // gradients (+ the loss) in the last step's buffer
    std::int64_t buckets_per_step = 0;
    std::int64_t layouts = 0;  // times the buffer was laid out (initially, then on rank changes)
    double seconds = 0.0;      // wall time in the reductions, all steps
};

namespace detail {

/// A 64-bit hash of bytes, 8 at a time (xor-multiply, then a final mix): a checksum for
/// comparing replicas, not a cryptographic one.
inline std::uint64_t hash_bytes(const void* data, std::size_t n, std::uint64_t h = 0x9e3779b97f4a7c15ull) {
    const auto* p = static_cast<const unsigned char*>(data);
    const auto mix = [](std::uint64_t x) {
        x ^= x >> 33;
        x *= 0xff51afd7ed558ccdull;
        x ^= x >> 33;
        x *= 0xc4ceb9fe1a85ec53ull;
        return x ^ (x >> 33);
    };
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        std::uint64_t w;
        std::memcpy(&w, p + i, 8);
        h = (h ^ mix(w)) * 0x100000001b3ull;
    }
    std::uint64_t tail = 0;
    std::memcpy(&tail, p + i, n - i);
    h = (h ^ mix(tail ^ (static_cast<std::uint64_t>(n) << 56))) * 0x100000001b3ull;
    return mix(h);
}

}  // namespace detail

template <class T>
class DataParallel final : public GradientReducer<T> {
public:
    /// Becomes `run`'s gradient reducer. `comm` and the run must outlive it.
    DataParallel(TrainingRun<T>& run, const Communicator& comm, DataParallelOptions options = {})
        : run_(run), comm_(comm), options_(options), weight_(1.0 / static_cast<double>(comm.size())) {
        check(options_.bucket_bytes >= sizeof(T), "DataParallel", "expected bucket_bytes >= ", sizeof(T),
              ", got ", options_.bucket_bytes);
        run_.set_gradient_reducer(*this);
    }
    DataParallel(const DataParallel&) = delete;
    DataParallel& operator=(const DataParallel&) = delete;

    const Communicator& communicator() const { return comm_; }
    int rank() const { return comm_.rank(); }
    int size() const { return comm_.size(); }
    bool is_root() const { return comm_.is_root(); }

    /// This process's rows of a global batch of `global_rows`; the next reduction weighs
    /// its gradient and loss by count / global_rows (a loss that is a mean over its rows
    /// then averages to the global batch's mean). Every process needs at least one row.
    Shard shard(Index global_rows) {
        check(global_rows >= comm_.size(), "DataParallel::shard", "expected a global batch of at least ",
              comm_.size(), " rows (one a process), got ", global_rows);
        const Shard s = shard_of(global_rows, comm_.rank(), comm_.size());
        weight_ = static_cast<double>(s.count) / static_cast<double>(global_rows);
        return s;
    }

    /// GradientReducer: the weighted sum over the processes of every trainable gradient
    /// and of the loss, in buckets of options().bucket_bytes.
    double reduce(const ParameterList<T>& params, double local_loss) override {
        const auto start = std::chrono::steady_clock::now();
        if (!layout_matches(params)) lay_out(params);
        if (comm_.size() == 1) {  // the whole batch is here: nothing to add, nothing to copy
            count_step(0, start);
            return local_loss;
        }
        const T w = static_cast<T>(weight_);
        for (const Entry& e : entries_) {
            T* dst = flat_.data() + e.offset;
            if (e.active == e.cols) {
                Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>(dst, e.rows * e.cols) =
                    Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(e.p->grad.data(), e.rows * e.cols) *
                    w;
            } else {
                Eigen::Map<Matrix<T>>(dst, e.rows, e.active) = e.p->grad.leftCols(e.active) * w;
            }
        }
        flat_.back() = static_cast<T>(local_loss * weight_);
        const std::size_t per_call = std::max<std::size_t>(1, options_.bucket_bytes / sizeof(T));
        std::int64_t calls = 0;
        for (std::size_t at = 0; at < flat_.size(); at += per_call, ++calls)
            comm_.all_reduce_sum(std::span<T>(flat_.data() + at, std::min(per_call, flat_.size() - at)));
        for (const Entry& e : entries_) {
            const T* src = flat_.data() + e.offset;
            if (e.active == e.cols)
                Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>(e.p->grad.data(), e.rows * e.cols) =
                    Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(src, e.rows * e.cols);
            else
                e.p->grad.leftCols(e.active) = Eigen::Map<const Matrix<T>>(src, e.rows, e.active);
        }
        count_step(calls, start);
        return static_cast<double>(flat_.back());
    }

    /// What the reductions sent so far.
    const CommunicationStats& stats() const { return stats_; }
    /// Payload of one step's reduction: the trainable gradients in use, and the loss.
    std::uint64_t bytes_per_step() const {
        return static_cast<std::uint64_t>(stats_.scalars_per_step) * sizeof(T);
    }
    /// What one process sends (and receives) on the wire for a payload of `bytes` with a
    /// ring all-reduce over `processes`: 2 (p - 1) / p of it.
    static double ring_bytes_per_process(double bytes, int processes) {
        return processes <= 1 ? 0.0 : 2.0 * (processes - 1) / processes * bytes;
    }

    /// Copies every parameter's value from process 0 to the others (after the policies'
    /// on_train_begin, which it runs), so replicas start identical however each process
    /// initialised its model. Collective; the shapes must agree (checked).
    void broadcast_parameters() {
        run_.begin();
        const ParameterList<T>& params = run_.parameters();
        std::vector<std::uint64_t> shape;
        for (const Parameter<T>* p : params) shape.push_back(layout_hash(*p));
        compare("the parameters' names and shapes", shape, [&](std::size_t i) { return params[i]->name(); });
        for (Parameter<T>* p : params)
            comm_.broadcast(std::span<T>(p->value.data(), static_cast<std::size_t>(p->value.size())));
    }

    /// Compares, across the processes, a checksum of every parameter (name, shape, values),
    /// of the rank log and of the counters, and throws on every process naming the first
    /// that differs and the processes that differ, if any does. Collective: call it at
    /// every evaluation.
    void check_replicas() {
        const ParameterList<T>& params = run_.parameters();
        std::vector<std::uint64_t> sums;
        sums.reserve(params.size() + 2);
        for (const Parameter<T>* p : params)
            sums.push_back(detail::hash_bytes(
                p->value.data(), static_cast<std::size_t>(p->value.size()) * sizeof(T), layout_hash(*p)));
        // A layer name need not be UTF-8 (a user's model names its own layers): replace
        // such bytes rather than throw, alike on every process.
        const std::string log =
            run_.rank_log().to_json().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        sums.push_back(detail::hash_bytes(log.data(), log.size()));
        const std::int64_t counters[3] = {run_.global_step(), run_.epoch(), run_.steps_in_epoch()};
        sums.push_back(detail::hash_bytes(counters, sizeof(counters)));
        compare("the replicas", sums, [&](std::size_t i) -> std::string {
            if (i < params.size()) return detail::concat("parameter '", params[i]->name(), "'");
            if (i == params.size()) return "the rank log";
            return "the counters (step, epoch, steps into the epoch)";
        });
    }

    /// Sums `values` over the processes (e.g. a sharded evaluation's sums and counts).
    void sum(std::span<double> values) const { comm_.all_reduce_sum(values); }

    /// An evaluation of each process's shard of a data set combined into the whole set's.
    EvalResult combine(const EvalResult& local) const {
        double v[3] = {local.loss * static_cast<double>(local.samples), static_cast<double>(local.correct),
                       static_cast<double>(local.samples)};
        comm_.all_reduce_sum(std::span<double>(v));
        EvalResult r;
        r.correct = static_cast<Index>(v[1]);
        r.samples = static_cast<Index>(v[2]);
        if (r.samples > 0) {
            r.loss = v[0] / v[2];
            r.accuracy = v[1] / v[2];
        }
        return r;
    }

private:
    struct Entry {
        Parameter<T>* p;
        std::string name;
        Index rows, cols, active;
        std::size_t offset;
    };

    void count_step(std::int64_t calls, std::chrono::steady_clock::time_point start) {
        stats_.steps += 1;
        stats_.calls += calls;
        stats_.bytes += calls > 0 ? scalars_ * sizeof(T) : 0;
        stats_.scalars_per_step = static_cast<Index>(scalars_);
        stats_.buckets_per_step = calls;
        stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }

    static std::uint64_t layout_hash(const Parameter<T>& p) {
        const std::int64_t dims[2] = {p.rows(), p.cols()};
        return detail::hash_bytes(dims, sizeof(dims), detail::hash_bytes(p.name().data(), p.name().size()));
    }

    // The gradients in the buffer: those the optimizer updates, in parameter order (the
    // same on every process), an InRank layer's active columns only. Whether the buffer
    // still fits is decided by names, shapes and active columns, which every process has
    // alike, never by addresses: laying out again compares the layouts across processes (a
    // collective), and a layer rebuilt by a policy may sit at other addresses on one
    // process than on another. Moved parameters are only re-pointed, here, locally.
    bool layout_matches(const ParameterList<T>& params) {
        if (!laid_out_) return false;
        std::size_t i = 0;
        for (Parameter<T>* p : params) {
            if (!detail::has_gradient(*p)) continue;
            if (i == entries_.size()) return false;
            Entry& e = entries_[i++];
            if (e.rows != p->rows() || e.cols != p->cols() || e.active != p->active_cols() || e.name != p->name())
                return false;
            // The copies read and write grad as rows x cols: a gradient of another shape (a
            // trainable parameter outside the optimizer, never zeroed to the value's shape)
            // would be read past its end.
            check_grad_shape(*p);
            e.p = p;
        }
        return i == entries_.size();
    }

    void lay_out(const ParameterList<T>& params) {
        entries_.clear();
        std::size_t offset = 0;
        for (Parameter<T>* p : params) {
            if (!detail::has_gradient(*p)) continue;
            check_grad_shape(*p);
            entries_.push_back({p, p->name(), p->rows(), p->cols(), p->active_cols(), offset});
            offset += static_cast<std::size_t>(p->rows() * p->active_cols());
        }
        scalars_ = offset + 1;  // + the loss
        // One process reduces nothing: no buffer (it would be one more gradient's memory).
        if (comm_.size() > 1) flat_.assign(scalars_, T(0));
        laid_out_ = true;
        ++stats_.layouts;
        // Every process must lay out the same buffer, or the sums would mix parameters.
        std::vector<std::uint64_t> layout;
        for (const Entry& e : entries_)
            layout.push_back(layout_hash(*e.p) ^ static_cast<std::uint64_t>(e.active));
        compare("the trainable gradients to reduce", layout,
                [&](std::size_t i) { return detail::concat("parameter '", entries_[i].p->name(), "'"); });
    }

    // The message is built only on failure: this runs for every parameter at every step.
    static void check_grad_shape(const Parameter<T>& p) {
        if (p.grad.rows() != p.rows() || p.grad.cols() != p.cols())
            throw Error(detail::concat("DataParallel: parameter '", p.name(), "' has a gradient of ",
                                       shape_string(p.grad.rows(), p.grad.cols()), " for a value of ",
                                       shape_string(p.rows(), p.cols())));
    }

    // Throws on every process if `mine` is not the same on all of them, naming item
    // `name(i)` of the first difference. The lengths are compared first.
    template <class Name>
    void compare(std::string_view what, const std::vector<std::uint64_t>& mine, Name&& name) const {
        const int n = comm_.size();
        if (n == 1) return;
        const std::uint64_t len = mine.size();
        std::vector<std::uint64_t> lens(static_cast<std::size_t>(n));
        comm_.all_gather(std::span<const std::uint64_t>(&len, 1), std::span<std::uint64_t>(lens));
        for (int r = 1; r < n; ++r)
            if (lens[static_cast<std::size_t>(r)] != lens[0])
                throw Error(detail::concat("DataParallel: ", what, " differ across processes at step ",
                                           run_.global_step(), ": process 0 has ", lens[0],
                                           " entries, process ", r, " has ",
                                           lens[static_cast<std::size_t>(r)]));
        std::vector<std::uint64_t> all(mine.size() * static_cast<std::size_t>(n));
        comm_.all_gather(std::span<const std::uint64_t>(mine), std::span<std::uint64_t>(all));
        for (std::size_t i = 0; i < mine.size(); ++i) {
            std::vector<int> differ;
            for (int r = 1; r < n; ++r)
                if (all[static_cast<std::size_t>(r) * mine.size() + i] != all[i]) differ.push_back(r);
            if (differ.empty()) continue;
            std::string ranks;
            for (int r : differ) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
            throw Error(detail::concat(
                "DataParallel: ", what, " differ across processes at step ", run_.global_step(), ": ",
                name(i), " on process(es) ", ranks, " is not process 0's (",
                "the replicas have diverged; docs/distributed.md says what must agree)"));
        }
    }

    TrainingRun<T>& run_;
    const Communicator& comm_;
    DataParallelOptions options_;
    double weight_;
    std::vector<Entry> entries_;
    std::vector<T> flat_;       // the reduced payload; empty with one process
    std::size_t scalars_ = 0;  // its length: the gradients in use and the loss
    bool laid_out_ = false;
    CommunicationStats stats_;
};

}  // namespace lowrank
