// The three products of a rank-r layer, one at a time, by Eigen's general product and by
// the kernels of linalg/thin_gemm.hpp that LowRankLinear uses (docs/performance.md, "Thin
// products"). d = m = n, N tokens, r the rank, all float and row-major as in the layer:
//
//   BM_ThinProduct_xV_<eigen|kernel>/d:1024/N:4096/r:64      x V        (N x d)(d x r)
//                                                            (gemm_narrow)
//   BM_ThinProduct_xVUt_<eigen|kernel>/...                   (x V) U^T  (N x r)(r x d), added
//                                                            to the output (gemm_nn)
//   BM_ThinProduct_dyTxV_<eigen|kernel>/...                  dy^T (x V) (d x N)(N x r): dU
//                                                            (gemm_tn; as dU^T where r is
//                                                            not whole SIMD packets, as the
//                                                            layer does)
//
// The kernel side gets U^T, V^T already transposed (the layer transposes them once per
// step); the Eigen side takes the row-major factors as they are, with its best layout for
// dU (a column-major destination: see detail::add_product). Counter GFLOPs = 2 N d r per
// iteration over wall-clock time.

#include "bench_common.hpp"

#include <lowrank/core/init.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/linalg/thin_gemm.hpp>

#include <benchmark/benchmark.h>

namespace {

using lowrank::Index;
using Mat = lowrank::Matrix<float>;
using ColMat = lowrank::ColMatrix<float>;

Mat gaussian(Index rows, Index cols, std::uint64_t seed) {
    lowrank::Rng rng(seed);
    Mat m(rows, cols);
    lowrank::init::normal<float>(m, rng);
    return m;
}

enum class Product { xv, xv_ut, dy_t_xv };

template <Product P, bool Kernel>
void thin_product(benchmark::State& state) {
    const Index d = state.range(0), n = state.range(1), r = state.range(2);
    const Mat x = gaussian(n, d, 1), v = gaussian(d, r, 2), u = gaussian(d, r, 3), xv = gaussian(n, r, 4);
    const Mat vt = v.transpose(), ut = u.transpose();
    Mat out_nr(n, r), out_nd = Mat::Zero(n, d), dut(r, d), du_rows(d, r);
    const bool direct = r % lowrank::linalg::detail::kPacket<float> == 0;
    ColMat du(d, r);
    auto once = [&] {
        if constexpr (P == Product::xv) {
            if constexpr (Kernel)
                lowrank::linalg::gemm_narrow<float>(out_nr, x, v, vt, 1.0f, false);
            else
                out_nr.noalias() = x * v;
            benchmark::DoNotOptimize(out_nr.data());
        } else if constexpr (P == Product::xv_ut) {
            if constexpr (Kernel)
                lowrank::linalg::gemm_nn<float>(out_nd, xv, ut, 1.0f, true);
            else
                out_nd.noalias() += xv * u.transpose();
            benchmark::DoNotOptimize(out_nd.data());
        } else {
            if constexpr (Kernel) {
                if (direct)
                    lowrank::linalg::gemm_tn<float>(du_rows, x, xv, 1.0f, false);
                else
                    lowrank::linalg::gemm_tn<float>(dut, xv, x, 1.0f, false);
                benchmark::DoNotOptimize(dut.data());
                benchmark::DoNotOptimize(du_rows.data());
            } else {
                du.noalias() = x.transpose() * xv;
                benchmark::DoNotOptimize(du.data());
            }
        }
        benchmark::ClobberMemory();
    };
    once();  // warm-up
    for (auto _ : state) once();
    lowrank::bench::set_rate_counters(state, 2.0 * static_cast<double>(n) * static_cast<double>(d) *
                                                 static_cast<double>(r),
                                      static_cast<double>(n), "tokens_per_second");
}

void add(const char* name, void (*fn)(benchmark::State&)) {
    for (const int d : {768, 1024})
        for (const int n : {512, 4096})
            for (const int r : {8, 64}) lowrank::bench::add_shape(name, fn, d, n, r);
}

bool register_all() {
    add("BM_ThinProduct_xV_eigen", thin_product<Product::xv, false>);
    add("BM_ThinProduct_xV_kernel", thin_product<Product::xv, true>);
    add("BM_ThinProduct_xVUt_eigen", thin_product<Product::xv_ut, false>);
    add("BM_ThinProduct_xVUt_kernel", thin_product<Product::xv_ut, true>);
    add("BM_ThinProduct_dyTxV_eigen", thin_product<Product::dy_t_xv, false>);
    add("BM_ThinProduct_dyTxV_kernel", thin_product<Product::dy_t_xv, true>);
    return true;
}

const bool kRegistered = register_all();

}  // namespace
