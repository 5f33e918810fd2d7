// lowrank-alloc-probe: checks the claim "a steady-state training step allocates nothing"
// by counting every heap allocation the process makes during each step.
//
//   lowrank-alloc-probe            allocator tuned (lowrank::tune_allocator), 1 thread
//   lowrank-alloc-probe --no-tune  glibc's defaults, to see what the tuning changes
//
// malloc, calloc, realloc, posix_memalign, aligned_alloc and memalign are defined here and
// forward to glibc's __libc_* entry points; a definition in the executable interposes the
// C library's for every shared object too (libstdc++'s operator new, libgomp), so nothing
// is missed. Minor page faults (getrusage) show what the allocations cost: a fault is a
// fresh page being touched for the first time (about 11 us each on the measured machine).
//
// Each allocation is attributed to the shared object whose code called the allocator
// (dladdr on the return address): the probe itself, where Eigen and lowrank are inlined,
// or libgomp, libstdc++, OpenBLAS. For every GEMM of the step the probe also prints the
// packing buffers Eigen's blocking asks for (the same gemm_blocking_space the product
// uses: Eigen 3.4's internal API), so each remaining allocation can be matched by size:
// above EIGEN_STACK_ALLOCATION_LIMIT (128 KiB) they come from the heap, once per product.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_activation.hpp>
#include <lowrank/autograd/ops_basic.hpp>
#include <lowrank/autograd/ops_loss.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/memory.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/core/threads.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/nn/linear.hpp>
#if __has_include(<lowrank/optim/adam.hpp>)
#include <lowrank/optim/adam.hpp>
#define LOWRANK_PROBE_HAVE_ADAMW 1
#endif

#include <Eigen/Core>

#include <dlfcn.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

// --- the interposer ----------------------------------------------------------------------

extern "C" {
void* __libc_malloc(std::size_t);
void __libc_free(void*);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}

namespace {

struct Counters {
    std::atomic<bool> on{false};
    std::atomic<long> allocs{0};
    std::atomic<long> frees{0};
    std::atomic<long> bytes{0};
    static constexpr int kMaxSizes = 4096;
    std::atomic<int> n_sizes{0};
    std::size_t sizes[kMaxSizes] = {};
    void* callers[kMaxSizes] = {};
};
Counters g_count;

// Always inlined into the interposed functions, so that __builtin_return_address(0) is the
// code that called malloc & co.
[[gnu::always_inline]] inline void note_alloc(std::size_t n, void* caller) {
    if (!g_count.on.load(std::memory_order_relaxed)) return;
    g_count.allocs.fetch_add(1, std::memory_order_relaxed);
    g_count.bytes.fetch_add(static_cast<long>(n), std::memory_order_relaxed);
    const int i = g_count.n_sizes.fetch_add(1, std::memory_order_relaxed);
    if (i < Counters::kMaxSizes) {
        g_count.sizes[i] = n;
        g_count.callers[i] = caller;
    }
}

}  // namespace

extern "C" {
void* malloc(std::size_t n) noexcept {
    note_alloc(n, __builtin_return_address(0));
    return __libc_malloc(n);
}
void free(void* p) noexcept {
    if (p != nullptr && g_count.on.load(std::memory_order_relaxed))
        g_count.frees.fetch_add(1, std::memory_order_relaxed);
    __libc_free(p);
}
void* calloc(std::size_t count, std::size_t size) noexcept {
    note_alloc(count * size, __builtin_return_address(0));
    return __libc_calloc(count, size);
}
void* realloc(void* p, std::size_t n) noexcept {
    note_alloc(n, __builtin_return_address(0));
    return __libc_realloc(p, n);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t n) noexcept {
    note_alloc(n, __builtin_return_address(0));
    void* p = __libc_memalign(alignment, n);
    if (p == nullptr) return ENOMEM;
    *out = p;
    return 0;
}
void* aligned_alloc(std::size_t alignment, std::size_t n) noexcept {
    note_alloc(n, __builtin_return_address(0));
    return __libc_memalign(alignment, n);
}
void* memalign(std::size_t alignment, std::size_t n) noexcept {
    note_alloc(n, __builtin_return_address(0));
    return __libc_memalign(alignment, n);
}
}

// --- measurement -------------------------------------------------------------------------

namespace {

using lowrank::Index;

long minor_faults() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return u.ru_minflt;
}

struct Sample {
    long allocs = 0, frees = 0, bytes = 0, faults = 0;
    std::vector<std::size_t> sizes;
    std::vector<void*> callers;
};

Sample measure(const std::function<void()>& f) {
    g_count.allocs = 0;
    g_count.frees = 0;
    g_count.bytes = 0;
    g_count.n_sizes = 0;
    const long f0 = minor_faults();
    g_count.on = true;
    f();
    g_count.on = false;
    Sample s;
    s.faults = minor_faults() - f0;
    s.allocs = g_count.allocs;
    s.frees = g_count.frees;
    s.bytes = g_count.bytes;
    const int n = std::min<int>(g_count.n_sizes, Counters::kMaxSizes);
    s.sizes.assign(g_count.sizes, g_count.sizes + n);
    s.callers.assign(g_count.callers, g_count.callers + n);
    return s;
}

std::string human(double bytes) {
    char buf[32];
    if (bytes >= 1024.0 * 1024.0)
        std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / (1024.0 * 1024.0));
    else if (bytes >= 1024.0)
        std::snprintf(buf, sizeof buf, "%.1f KiB", bytes / 1024.0);
    else
        std::snprintf(buf, sizeof buf, "%.0f B", bytes);
    return buf;
}

/// One GEMM of the step: dst (rows x cols) op= lhs * rhs with inner dimension depth.
struct Gemm {
    std::string what;
    Index rows, cols, depth;
};

/// The packing buffers (bytes) Eigen's sequential GEMM declares for a row-major product.
std::pair<std::size_t, std::size_t> packing_bytes(const Gemm& p) {
    Eigen::internal::gemm_blocking_space<Eigen::RowMajor, float, float, Eigen::Dynamic, Eigen::Dynamic,
                                         Eigen::Dynamic, 1, false>
        blocking(p.rows, p.cols, p.depth, 1, true);
    // Row-major: Eigen computes dst^T = rhs^T * lhs^T, so its "rows" are our cols.
    const Index m = std::min<Index>(p.cols, blocking.mc());
    const Index n = std::min<Index>(p.rows, blocking.nc());
    return {static_cast<std::size_t>(blocking.kc() * m) * sizeof(float),
            static_cast<std::size_t>(blocking.kc() * n) * sizeof(float)};
}

/// Prints the packing buffers of every product and returns the sizes of those that go to
/// the heap.
std::vector<std::size_t> print_gemms(const std::vector<Gemm>& gemms) {
    const std::size_t limit = EIGEN_STACK_ALLOCATION_LIMIT;
    std::printf("  Eigen packing buffers per product (heap if > %s, else stack):\n", human(limit).c_str());
    std::vector<std::size_t> heap;
    for (const auto& p : gemms) {
        const auto [a, b] = packing_bytes(p);
        for (const auto bytes : {a, b})
            if (bytes > limit) heap.push_back(bytes);
        std::printf("    %-34s (%5ld x %5ld, k = %5ld): blockA %9s %-5s blockB %9s %s\n", p.what.c_str(),
                    static_cast<long>(p.rows), static_cast<long>(p.cols), static_cast<long>(p.depth),
                    human(static_cast<double>(a)).c_str(), a > limit ? "heap" : "stack",
                    human(static_cast<double>(b)).c_str(), b > limit ? "heap" : "stack");
    }
    std::printf("  => expected heap allocations per step from GEMM packing: %zu\n", heap.size());
    return heap;
}

/// How many of `sizes` are one of the predicted packing buffers, each used once: the same
/// size, or that plus the header Eigen's handmade_aligned_malloc adds when malloc's own
/// alignment (16 bytes) is below EIGEN_DEFAULT_ALIGN_BYTES (64 with AVX-512).
std::size_t count_packing(std::vector<std::size_t> predicted, const std::vector<std::size_t>& sizes) {
    std::size_t matched = 0;
    for (const auto n : sizes) {
        for (auto it = predicted.begin(); it != predicted.end(); ++it) {
            if (n == *it || n == *it + EIGEN_DEFAULT_ALIGN_BYTES) {
                predicted.erase(it);
                ++matched;
                break;
            }
        }
    }
    return matched;
}

/// The shared object (or executable) that contains `address`, by file name.
std::string object_of(void* address) {
    Dl_info info{};
    if (address == nullptr || dladdr(address, &info) == 0 || info.dli_fname == nullptr) return "?";
    const char* slash = std::strrchr(info.dli_fname, '/');
    return slash != nullptr ? slash + 1 : info.dli_fname;
}

/// Sizes (bytes) of the allocations, grouped by the object whose code called the allocator:
/// the probe itself (Eigen and lowrank are inlined into it), libgomp, libstdc++, ...
void print_sizes(const std::vector<std::size_t>& sizes, const std::vector<void*>& callers) {
    std::map<std::string, std::map<std::size_t, int>> by_caller;
    for (std::size_t i = 0; i < sizes.size(); ++i) ++by_caller[object_of(callers[i])][sizes[i]];
    for (const auto& [object, hist] : by_caller) {
        std::printf("      called from %s, sizes in bytes:", object.c_str());
        for (const auto& [s, n] : hist) std::printf(" %dx%zu", n, s);
        std::printf("\n");
    }
}

/// Runs `steps` steps, measuring each, and prints steps 1, 2, 3 and the last.
void probe(const char* title, const std::vector<Gemm>& gemms, const std::function<void()>& step,
           int steps = 10) {
    std::printf("\n%s\n", title);
    const auto predicted = print_gemms(gemms);
    std::printf("  %-6s %8s %8s %12s %13s\n", "step", "allocs", "frees", "bytes", "minor faults");
    Sample last;
    for (int i = 1; i <= steps; ++i) {
        last = measure(step);
        if (i <= 3 || i == steps) {
            std::printf("  %-6d %8ld %8ld %12s %13ld\n", i, last.allocs, last.frees,
                        human(static_cast<double>(last.bytes)).c_str(), last.faults);
            if (i > 1 && last.allocs > 0) print_sizes(last.sizes, last.callers);
        }
    }
    std::printf("  => step %d: %zu of its %ld allocations are the predicted Eigen packing buffers\n", steps,
                count_packing(predicted, last.sizes), last.allocs);
}

std::vector<Gemm> mlp_gemms(const std::vector<Index>& sizes, Index batch) {
    std::vector<Gemm> out;
    for (std::size_t i = 0; i + 1 < sizes.size(); ++i)
        out.push_back({"fwd  y" + std::to_string(i) + " = x W^T", batch, sizes[i + 1], sizes[i]});
    for (std::size_t i = sizes.size() - 1; i-- > 0;) {
        if (i > 0) out.push_back({"bwd dx" + std::to_string(i) + " += dy W", batch, sizes[i], sizes[i + 1]});
        out.push_back({"bwd dW" + std::to_string(i) + " += dy^T x", sizes[i + 1], sizes[i], batch});
    }
    return out;
}

void probe_mlp(const std::vector<Index>& sizes, Index batch) {
    lowrank::Rng rng(7);
    lowrank::Mlp<float> mlp(lowrank::MlpOptions{.sizes = sizes}, rng);
    lowrank::Matrix<float> x(batch, sizes.front());
    lowrank::init::uniform<float>(x, rng, 0.0, 1.0);
    std::vector<std::int32_t> targets(static_cast<std::size_t>(batch));
    for (auto& t : targets)
        t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(sizes.back())));
    lowrank::Graph<float> g;
#ifdef LOWRANK_PROBE_HAVE_ADAMW
    lowrank::AdamW<float> opt(mlp.parameters(), lowrank::AdamOptions{.lr = 1e-3, .weight_decay = 0.01});
    const char* optimizer = "AdamW";
#else
    const auto params = mlp.parameters();
    const char* optimizer = "SGD stand-in";
#endif
    auto step = [&] {
        g.clear();
        const auto logits = mlp.forward(g, g.input(x));
        const auto loss = lowrank::cross_entropy(g, logits, targets);
#ifdef LOWRANK_PROBE_HAVE_ADAMW
        opt.zero_grad();
        g.backward(loss);
        opt.step();
#else
        lowrank::zero_grad(params);
        g.backward(loss);
        for (auto* p : params) p->value -= 1e-3f * p->grad;
#endif
    };
    std::string title = "MLP train step (";
    for (std::size_t i = 0; i < sizes.size(); ++i) {
        if (i > 0) title += '-';
        title += std::to_string(sizes[i]);
    }
    title += ", batch " + std::to_string(batch) + ", cross_entropy, backward, " + optimizer + ")";
    probe(title.c_str(), mlp_gemms(sizes, batch), step);
}

void probe_linear(Index d, Index n) {
    lowrank::Rng rng(42);
    lowrank::Linear<float> layer("fc", d, d, rng);
    lowrank::Matrix<float> x(n, d);
    lowrank::init::normal<float>(x, rng);
    lowrank::Graph<float> g;
    auto step = [&] {
        g.clear();
        const auto y = layer.forward(g, g.input(x, true));
        layer.weight.zero_grad();
        layer.bias.zero_grad();
        g.backward(lowrank::sum(g, y));
    };
    const std::string title =
        "Linear fwd+bwd (d = " + std::to_string(d) + ", N = " + std::to_string(n) + ", as BM_Linear_fwdbwd)";
    probe(title.c_str(),
          {{"fwd  y = x W^T", n, d, d}, {"bwd dx += dy W", n, d, d}, {"bwd dW += dy^T x", d, d, n}}, step);
}

}  // namespace

int main(int argc, char** argv) {
    bool tune = true;
    for (int i = 1; i < argc; ++i) {
        if (std::strcmp(argv[i], "--no-tune") == 0) {
            tune = false;
        } else {
            std::fprintf(stderr, "usage: %s [--no-tune]\n", argv[0]);
            return 2;
        }
    }
    const bool tuned = tune && lowrank::tune_allocator();
    lowrank::set_num_threads(1);
    std::printf("lowrank-alloc-probe: allocations, bytes and minor page faults per step, 1 thread\n");
#ifdef EIGEN_USE_BLAS
    const char* gemm = "BLAS (EIGEN_USE_BLAS)";
#else
    const char* gemm = "Eigen";
#endif
    std::printf("allocator: %s; GEMM: %s; Eigen %d.%d.%d, %s\n",
                tuned ? "tuned (tune_allocator: mmap threshold 32 MiB, no trim)" : "glibc defaults", gemm,
                EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION,
                Eigen::SimdInstructionSetsInUse());

    probe_mlp({64, 64, 10}, 32);
    probe_mlp({784, 1024, 1024, 10}, 128);
    probe_linear(1024, 4096);
    return 0;
}
