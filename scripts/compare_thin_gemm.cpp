// The thin-product kernels of a base revision against the work tree's, in one process:
// each product is timed with the two alternating, 15 times, so that a drift of the
// machine's speed (a shared VM's neighbours) moves both alike. Built and run by
// scripts/compare_thin_gemm.sh, which puts the base revision's linalg/thin_gemm.hpp into
// namespace lowrank::linalg_base and names it in LOWRANK_BASE_HEADER.
//
// Prints, per product and rank, the best and the median GFLOP/s (2 N d r over the time)
// of each, and new / base of the medians. float, d 1024, N 4096.

#include <lowrank/linalg/thin_gemm.hpp>
#include LOWRANK_BASE_HEADER

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

namespace {

using lowrank::Index;
using MatrixF = lowrank::Matrix<float>;

template <class F>
double seconds(F&& f) {
    const auto start = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct Operands {
    MatrixF x, v, xv, ut, y, du, dut, c;
};

// The layer's products: x V and (x V) U^T (A B), dU = dy^T (x V) with d rows and dU^T =
// (x V)^T dy with r rows (A^T B); x stands in for dy.
enum class Product { xv, xv_ut, dy_t_xv, xv_t_dy };
constexpr const char* kNames[] = {"x V", "(x V) U^T", "dy^T (x V)", "(x V)^T dy"};

template <bool Base>
void run(Product p, Operands& o) {
    namespace base = lowrank::linalg_base;
    namespace work = lowrank::linalg;
    auto nn = [](auto& c, const auto& a, const auto& b) {
        if constexpr (Base) base::gemm_nn<float>(c, a, b, 1.0f, false);
        else work::gemm_nn<float>(c, a, b, 1.0f, false);
    };
    auto tn = [](auto& c, const auto& a, const auto& b) {
        if constexpr (Base) base::gemm_tn<float>(c, a, b, 1.0f, false);
        else work::gemm_tn<float>(c, a, b, 1.0f, false);
    };
    switch (p) {
        case Product::xv: nn(o.c, o.x, o.v); break;
        case Product::xv_ut: nn(o.y, o.xv, o.ut); break;
        case Product::dy_t_xv: tn(o.du, o.x, o.xv); break;
        case Product::xv_t_dy: tn(o.dut, o.xv, o.x); break;
    }
}

}  // namespace

int main() {
    constexpr Index d = 1024, n = 4096;
    constexpr int repeats = 15;
    std::printf("%-12s %4s %22s %22s %9s\n", "product", "r", "base GFLOP/s best/med", "new GFLOP/s best/med",
                "new/base");
    for (const Index r : {32, 64, 128, 256}) {
        Operands o{MatrixF::Random(n, d), MatrixF::Random(d, r), MatrixF::Random(n, r), MatrixF::Random(r, d),
                   MatrixF(n, d),         MatrixF(d, r),         MatrixF(r, d),         MatrixF(n, r)};
        for (int k = 0; k < 4; ++k) {
            const auto p = static_cast<Product>(k);
            std::vector<double> base, work;
            run<true>(p, o);  // warm: buffers, pages
            run<false>(p, o);
            for (int i = 0; i < repeats; ++i) {
                base.push_back(seconds([&] { run<true>(p, o); }));
                work.push_back(seconds([&] { run<false>(p, o); }));
            }
            std::sort(base.begin(), base.end());
            std::sort(work.begin(), work.end());
            const double gflop = 2.0 * n * d * r * 1e-9;
            const double mb = base[repeats / 2], mw = work[repeats / 2];
            std::printf("%-12s %4ld %10.1f / %9.1f %10.1f / %9.1f %8.2fx\n", kNames[k], static_cast<long>(r),
                        gflop / base[0], gflop / mb, gflop / work[0], gflop / mw, mb / mw);
        }
    }
}
