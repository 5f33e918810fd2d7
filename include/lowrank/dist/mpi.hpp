#pragma once
// The processes of a data-parallel run: MpiEnvironment starts and ends MPI for a program,
// Communicator is what the library asks of it (sums, broadcasts, gathers). See
// docs/distributed.md.
//
// Built with LOWRANK_WITH_MPI (CMake's LOWRANK_WITH_MPI, which the lowrank::lowrank target
// hands on) this talks MPI; without it there is one process and every collective is the
// identity, so a trainer written for many processes runs unchanged as one. A program built
// without MPI but started by mpirun with more than one process is refused: each copy would
// otherwise train the whole model alone and write the same files.
//
// Failure: MPI errors are returned, not fatal, and become an Error naming the call. A
// process that leaves the environment's scope by an exception aborts the whole job
// (MPI_Abort), since its peers would otherwise wait for it in their next collective for
// ever; a process that dies (a signal, exit without finalising) is noticed by mpirun, which
// ends the others.

#include <lowrank/core/error.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#if defined(LOWRANK_WITH_MPI) && LOWRANK_WITH_MPI
#include <mpi.h>
#define LOWRANK_DETAIL_MPI 1
#else
#define LOWRANK_DETAIL_MPI 0
#endif

namespace lowrank {

/// Whether this build talks MPI (LOWRANK_WITH_MPI) or runs as one process.
inline constexpr bool kWithMpi = LOWRANK_DETAIL_MPI != 0;

namespace detail {

/// The number of processes a launcher (mpirun, srun) says it started, read from the
/// variables Open MPI, MPICH and Slurm's PMI set; 1 if none is set.
inline int launcher_world_size() {
    for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"}) {
        if (const char* v = std::getenv(name)) {
            char* end = nullptr;
            const long n = std::strtol(v, &end, 10);
            if (end != v && n >= 1 && n < (1L << 30)) return static_cast<int>(n);
        }
    }
    return 1;
}

#if LOWRANK_DETAIL_MPI
template <class S>
MPI_Datatype mpi_type() {
    if constexpr (std::is_same_v<S, float>)
        return MPI_FLOAT;
    else if constexpr (std::is_same_v<S, double>)
        return MPI_DOUBLE;
    else if constexpr (std::is_same_v<S, std::int64_t>)
        return MPI_INT64_T;
    else if constexpr (std::is_same_v<S, std::uint64_t>)
        return MPI_UINT64_T;
    else if constexpr (std::is_same_v<S, int>)
        return MPI_INT;
    else
        static_assert(sizeof(S) == 0, "lowrank: no MPI datatype for this scalar");
}

inline void mpi_check(int code, std::string_view call) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw Error(concat("MPI: ", call, " failed: ", std::string_view(text, static_cast<std::size_t>(length))));
}

// MPI's counts are int: a larger span goes in pieces.
inline constexpr std::size_t kMpiMaxCount = 1u << 30;
#endif

}  // namespace detail

/// A group of processes (MPI_COMM_WORLD by default). Every collective must be called by
/// every process of the group, in the same order.
class Communicator {
public:
#if LOWRANK_DETAIL_MPI
    explicit Communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
        detail::mpi_check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
        detail::mpi_check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    }
    MPI_Comm native() const { return comm_; }
#else
    Communicator() = default;
#endif

    int rank() const { return rank_; }
    int size() const { return size_; }
    /// Rank 0: the one process that prints, logs and writes checkpoints.
    bool is_root() const { return rank_ == 0; }

    /// Replaces `data` on every process by its element-wise sum over the processes.
    template <class S>
    void all_reduce_sum(std::span<S> data) const {
#if LOWRANK_DETAIL_MPI
        for (std::size_t at = 0; at < data.size(); at += detail::kMpiMaxCount) {
            const std::size_t n = std::min(detail::kMpiMaxCount, data.size() - at);
            detail::mpi_check(MPI_Allreduce(MPI_IN_PLACE, data.data() + at, static_cast<int>(n),
                                            detail::mpi_type<std::remove_const_t<S>>(), MPI_SUM, comm_),
                              "MPI_Allreduce");
        }
#else
        (void)data;
#endif
    }

    /// Copies `data` of process `root` to every process.
    template <class S>
    void broadcast(std::span<S> data, int root = 0) const {
        check(root >= 0 && root < size_, "Communicator::broadcast", "expected a root in [0, ", size_,
              "), got ", root);
#if LOWRANK_DETAIL_MPI
        for (std::size_t at = 0; at < data.size(); at += detail::kMpiMaxCount) {
            const std::size_t n = std::min(detail::kMpiMaxCount, data.size() - at);
            detail::mpi_check(
                MPI_Bcast(data.data() + at, static_cast<int>(n), detail::mpi_type<S>(), root, comm_),
                "MPI_Bcast");
        }
#else
        (void)data;
#endif
    }

    /// Every process's `mine` (the same length on all), concatenated in rank order into
    /// `all` (size() * mine.size()).
    template <class S>
    void all_gather(std::span<const S> mine, std::span<S> all) const {
        check(all.size() == mine.size() * static_cast<std::size_t>(size_), "Communicator::all_gather",
              "expected room for ", mine.size() * static_cast<std::size_t>(size_), " values, got ",
              all.size());
#if LOWRANK_DETAIL_MPI
        check(mine.size() <= detail::kMpiMaxCount, "Communicator::all_gather", "expected at most ",
              detail::kMpiMaxCount, " values a process, got ", mine.size());
        detail::mpi_check(
            MPI_Allgather(mine.data(), static_cast<int>(mine.size()), detail::mpi_type<S>(), all.data(),
                          static_cast<int>(mine.size()), detail::mpi_type<S>(), comm_),
            "MPI_Allgather");
#else
        std::copy(mine.begin(), mine.end(), all.begin());
#endif
    }

    /// Waits until every process has called it.
    void barrier() const {
#if LOWRANK_DETAIL_MPI
        detail::mpi_check(MPI_Barrier(comm_), "MPI_Barrier");
#endif
    }

    /// Ends every process of the job with `code` (a one-process build: this one).
    [[noreturn]] void abort(int code) const {
#if LOWRANK_DETAIL_MPI
        MPI_Abort(comm_, code);
#endif
        std::_Exit(code);
    }

private:
#if LOWRANK_DETAIL_MPI
    MPI_Comm comm_ = MPI_COMM_WORLD;
#endif
    int rank_ = 0;
    int size_ = 1;
};

/// Starts MPI for the program's lifetime (one per program, before any Communicator) and
/// ends it when it goes out of scope: MPI_Finalize after a normal exit, MPI_Abort(1) when
/// an exception is leaving the scope (the peers would wait for this process for ever).
class MpiEnvironment {
public:
    MpiEnvironment() : MpiEnvironment(nullptr, nullptr) {}
    MpiEnvironment(int* argc, char*** argv) : exceptions_(std::uncaught_exceptions()) {
#if LOWRANK_DETAIL_MPI
        int initialized = 0;
        MPI_Initialized(&initialized);
        check(!initialized, "MpiEnvironment", "MPI is initialised already (one environment a program)");
        // OpenMP threads compute, only the main thread calls MPI.
        int provided = 0;
        detail::mpi_check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
        // Errors come back as codes, which mpi_check turns into an Error naming the call.
        MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
        world_.emplace(MPI_COMM_WORLD);
#else
        (void)argc;
        (void)argv;
        const int launched = detail::launcher_world_size();
        check(launched == 1, "MpiEnvironment",
              "this program was built without MPI (LOWRANK_WITH_MPI), but "
              "the launcher started ",
              launched,
              " processes of it, each of which would train alone; "
              "rebuild with MPI (docs/distributed.md) or run one process");
        world_.emplace();
#endif
    }
    ~MpiEnvironment() {
#if LOWRANK_DETAIL_MPI
        if (std::uncaught_exceptions() > exceptions_) {
            std::fprintf(stderr, "lowrank: process %d of %d is leaving on an exception; aborting the job\n",
                         world_->rank(), world_->size());
            std::fflush(stderr);
            MPI_Abort(MPI_COMM_WORLD, 1);
            return;
        }
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (!finalized) MPI_Finalize();
#endif
    }
    MpiEnvironment(const MpiEnvironment&) = delete;
    MpiEnvironment& operator=(const MpiEnvironment&) = delete;

    /// All the processes of the job.
    const Communicator& world() const { return *world_; }

    /// Prints `message` to stderr with this process's rank and ends the whole job with
    /// exit code `code`: what a program's catch block calls, so that the message is seen
    /// and the peers do not wait for this process in their next collective.
    [[noreturn]] void fail(std::string_view message, int code = 1) const {
        if (world_->size() > 1)
            std::fprintf(stderr, "error (process %d of %d): %.*s\n", world_->rank(), world_->size(),
                         static_cast<int>(message.size()), message.data());
        else
            std::fprintf(stderr, "error: %.*s\n", static_cast<int>(message.size()), message.data());
        std::fflush(stderr);
        world_->abort(code);
    }

private:
    int exceptions_;
    std::optional<Communicator> world_;  // after MPI_Init
};

}  // namespace lowrank
