#pragma once
// The products of a rank-r factorisation, C = alpha A B (+ C) and C = alpha A^T B (+ C), on
// row-major operands, for shapes where one of the three dimensions is a rank r << d:
// x V (N x d by d x r), (x V) U^T (N x r by r x d), dy^T (x V) (d x N by N x r).
//
// Eigen's general product packs both operands into panels before its 48 x 4 (AVX-512) micro
// kernel runs. With a thin operand that packing is a large share of the work (every entry
// of the N x d activation is copied to be used in only 2r FLOPs), and on this project's
// machine its micro kernel reached 105-125 GFLOP/s on these shapes against 190-210 for the
// kernel below (docs/performance.md, "Thin products"). Here each tile of C is R <= 6 rows by
// up to 4 SIMD packets (64 floats with AVX-512; 2 packets, 16 floats, where the register
// file has 16 SIMD registers, as with AVX2) held in registers; per step of the inner
// dimension it loads that many packets of one row of B and broadcasts one entry of A per
// row, so A is never copied. The inner dimension is walked in blocks and the columns in
// panels (kKBlock, kPanelElements); each such block of B is first copied into a contiguous
// per-thread buffer in the order the tiles read it (pack_panel), so that its rows, 4 KiB
// apart in a 1024-wide matrix, do not all fall into the same few sets of L1. That is done
// where B is the small factor, x V and (x V) U^T; in dy^T (x V) B is dy or x, read in place
// where C has few rows or the register file is wide (and packed otherwise, see tiled_block),
// and the tile's entries of A are copied too.
//
// Any scalar type Eigen vectorises takes this path (float and double alike, so the
// double-precision gradient checks run it); the columns past the last whole packet, and
// scalar types Eigen does not vectorise, go through Eigen's coefficient-wise lazyProduct
// instead (one dot product per entry: slow, so a feature size that is not a multiple of the
// packet width, 16 floats with AVX-512, pays for its last columns). Results do not depend
// on the thread count nor on the tile shape: threads and tiles split the rows or columns of
// C, never a sum over k (each entry's sum runs over k in order), and the left-over columns
// never use Eigen's threaded product.

#include <lowrank/core/error.hpp>
#include <lowrank/core/parallel.hpp>
#include <lowrank/core/types.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <memory>

namespace lowrank::linalg {

/// A row-major view with unit inner stride: a Matrix<T> or a block of rows or columns of one.
template <class T>
using RowMajorView = Eigen::Ref<Matrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using ConstRowMajorView = Eigen::Ref<const Matrix<T>, 0, Eigen::OuterStride<>>;

namespace detail {

// The inner dimension goes in blocks of kKBlock steps and the columns in panels such that one
// packed block of B holds at most kPanelElements (256 KiB of floats: in L2): a short inner
// dimension (r in (x V) U^T) gets panels as wide as C, so that each pass over C, and the
// copy of B, runs along whole rows (contiguous; 256-column pieces of 1024-wide rows, 4 KiB
// apart, defeat the hardware prefetcher). A B with a narrow C (x V) takes longer blocks, up
// to kLongKBlock steps, as many as a block of B of all of C's columns holds: each row of A
// (x, read from memory) is then one stream of up to 4 KiB instead of four of 1 KiB, and C
// is read back fewer times (x V at r 64: 1.17x the speed of 256-step blocks on an AVX-512
// Xeon, docs/performance.md, "Thin products"). The k-block decides how each sum is split, so
// it depends on nothing but the shapes of the operands (never on the thread count).
inline constexpr Index kKBlock = 256;            // steps of the inner dimension per pass
inline constexpr Index kLongKBlock = 1024;       // the longest pass of A B
inline constexpr Index kPanelElements = 65536;   // entries of one packed block of B

// Tile sizes that keep the accumulators, the packets of one row of B and a broadcast in the
// SIMD register file: 6 rows by 4 packets (24 accumulators + 4 + 1 of AVX-512's 32
// registers), or 6 rows by 2 packets where there are 16 (AVX2, SSE: 12 + 2 + 1). Six rows
// keep the broadcasts (one load each) at half the FMAs, and 12 accumulators or more hide
// the FMA latency (4 cycles, 2 units: 8 in flight at least).
inline constexpr bool kWideRegisterFile = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32;
inline constexpr int kTileRows = 6;                          // rows of C per register tile
inline constexpr int kTilePackets = kWideRegisterFile ? 4 : 2;  // SIMD packets of C per tile row
inline constexpr int kDotRows = kWideRegisterFile ? 3 : 2;   // rows of C per dot-product tile
inline constexpr int kDotCols = kWideRegisterFile ? 8 : 4;   // columns per dot-product tile
                                                             // (dot_row covers the last 1-7)

// Rows of C from which A^T B packs its B where the register file has 16 registers (see
// tiled_block): 4 row tiles, r >= 24.
inline constexpr Index kPackTransposedRows = 4 * kTileRows;

// Row tiles of A^T B whose entries of A are gathered together, one k-block at a time (see
// tiled_block): 96 columns of A, 384 bytes of each of its rows.
inline constexpr Index kGatherTiles = 16;

/// Throws the error of a product whose operand shapes do not chain; formatted only then,
/// so that a product that is called per tile of tokens builds no strings.
[[noreturn]] inline void throw_shapes(const char* op, const char* form, Index cr, Index cc, Index ar, Index ac,
                                      Index br, Index bc) {
    throw Error(lowrank::detail::concat(op, ": C ", shape_string(cr, cc), " = ", form, " with A ",
                                        shape_string(ar, ac), ", B ", shape_string(br, bc),
                                        ": shapes do not chain"));
}

template <class T>
inline constexpr bool kVectorised = Eigen::internal::packet_traits<T>::Vectorizable;

template <class T>
inline constexpr int kPacket = Eigen::internal::packet_traits<T>::size;

/// c[i][j..] = alpha * sum_k a(i, k) b(k, j..) (+ c), for i < R and NP packets of columns;
/// a(i, k) = a[i * a_row + k * a_k], b and c row-major with leading dimensions ldb, ldc.
template <class T, int R, int NP>
void tile(const T* a, Index a_row, Index a_k, const T* b, Index ldb, T* c, Index ldc, Index depth, T alpha,
          bool add) {
    using Packet = typename Eigen::internal::packet_traits<T>::type;
    using namespace Eigen::internal;
    constexpr int W = kPacket<T>;
    Packet acc[R][NP];
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < NP; ++j) acc[i][j] = pset1<Packet>(T(0));
    // Four steps of k per iteration (the compiler unrolls): with one, the loop's own
    // instructions held the 6 x 4 tile at 82% of the FMA peak on an AVX-512 Xeon with A and
    // B in L1, and in the products four steps ran up to 1.15x as fast as two with AVX-512
    // and with AVX2 (docs/performance.md, "Thin products"). The sums run over k in order
    // either way. Two loops, A B (a_k = 1) and A^T B: as one loop the compiler made a slower
    // A^T B of it with AVX2; and no lambda per step, which a large translation unit left
    // out of line with its accumulators in memory.
    if (a_k == 1) {
#if defined(__clang__)
#pragma unroll 4
#elif defined(__GNUC__)
#pragma GCC unroll 4
#endif
        for (Index k = 0; k < depth; ++k) {
            Packet row[NP];
            for (int j = 0; j < NP; ++j) row[j] = ploadu<Packet>(b + k * ldb + j * W);
            for (int i = 0; i < R; ++i) {
                const Packet ai = pset1<Packet>(a[i * a_row + k]);
                for (int j = 0; j < NP; ++j) acc[i][j] = pmadd(ai, row[j], acc[i][j]);
            }
        }
    } else {
#if defined(__clang__)
#pragma unroll 4
#elif defined(__GNUC__)
#pragma GCC unroll 4
#endif
        for (Index k = 0; k < depth; ++k) {
            Packet row[NP];
            for (int j = 0; j < NP; ++j) row[j] = ploadu<Packet>(b + k * ldb + j * W);
            for (int i = 0; i < R; ++i) {
                const Packet ai = pset1<Packet>(a[i * a_row + k * a_k]);
                for (int j = 0; j < NP; ++j) acc[i][j] = pmadd(ai, row[j], acc[i][j]);
            }
        }
    }
    const Packet scale = pset1<Packet>(alpha);
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < NP; ++j) {
            T* out = c + i * ldc + j * W;
            const Packet v = pmul(scale, acc[i][j]);
            pstoreu(out, add ? padd(v, ploadu<Packet>(out)) : v);
        }
}

/// One block of R rows of C over the columns [0, cols) that fill whole packets, B packed
/// by pack_panel: the group of columns at j, w wide, is depth x w contiguous at bp + depth * j.
/// With ldb > 0, B is read in place instead (row-major, leading dimension ldb). Groups of
/// kTilePackets packets, then the packets left in one tile (r 32 with AVX-512: 12
/// accumulators, not two tiles of 6, too few to hide the FMA latency).
template <class T, int R>
void tile_row(const T* a, Index a_row, Index a_k, const T* bp, Index ldb, T* c, Index ldc, Index depth,
              Index cols, T alpha, bool add) {
    constexpr int W = kPacket<T>;
    auto at = [&](Index j) { return ldb > 0 ? bp + j : bp + depth * j; };
    Index j = 0;
    for (; j + kTilePackets * W <= cols; j += kTilePackets * W)
        tile<T, R, kTilePackets>(a, a_row, a_k, at(j), ldb > 0 ? ldb : kTilePackets * W, c + j, ldc, depth, alpha,
                                 add);
    const Index rest = (cols - j) / W;  // fewer than kTilePackets
    if constexpr (kTilePackets > 3)
        if (rest == 3) return tile<T, R, 3>(a, a_row, a_k, at(j), ldb > 0 ? ldb : 3 * W, c + j, ldc, depth, alpha, add);
    if constexpr (kTilePackets > 2)
        if (rest == 2) return tile<T, R, 2>(a, a_row, a_k, at(j), ldb > 0 ? ldb : 2 * W, c + j, ldc, depth, alpha, add);
    if (rest == 1) tile<T, R, 1>(a, a_row, a_k, at(j), ldb > 0 ? ldb : W, c + j, ldc, depth, alpha, add);
}

/// Copies the depth x cols block of B (row-major, leading dimension ldb; cols whole packets)
/// into bp in tile_row's order: each tile's rows of B become one contiguous stream. Read
/// in place, the rows of B are ldb apart (4 KiB for 1024 floats), so all of a tile's rows
/// fall into the same few sets of L1 and are fetched from L2 at every tile; packed, they
/// stay in L1 and the hardware prefetcher sees one stream. Costs one copy of the block per
/// pass, against the row tiles' 2 * rows FLOPs per entry.
/// B is read row by row (cols contiguous entries each), so that a B read from memory, 4 KiB
/// a row apart, streams through the hardware prefetcher instead of one line per row.
template <class T>
void pack_panel(const T* b, Index ldb, Index depth, Index cols, T* bp) {
    constexpr Index wide = kTilePackets * kPacket<T>;
    const Index wide_cols = cols / wide * wide;  // then one group of the packets left, as tile_row
    const Index rest = cols - wide_cols;
    for (Index k = 0; k < depth; ++k) {
        const T* row = b + k * ldb;
        for (Index j = 0; j < wide_cols; j += wide) std::copy(row + j, row + j + wide, bp + depth * j + k * wide);
        if (rest > 0) std::copy(row + wide_cols, row + cols, bp + depth * wide_cols + k * rest);
    }
}

template <class T>
void tile_rows(Index rows, const T* a, Index a_row, Index a_k, const T* bp, Index ldb, T* c, Index ldc,
               Index depth, Index cols, T alpha, bool add) {
    switch (rows) {
        case 6: tile_row<T, 6>(a, a_row, a_k, bp, ldb, c, ldc, depth, cols, alpha, add); break;
        case 5: tile_row<T, 5>(a, a_row, a_k, bp, ldb, c, ldc, depth, cols, alpha, add); break;
        case 4: tile_row<T, 4>(a, a_row, a_k, bp, ldb, c, ldc, depth, cols, alpha, add); break;
        case 3: tile_row<T, 3>(a, a_row, a_k, bp, ldb, c, ldc, depth, cols, alpha, add); break;
        case 2: tile_row<T, 2>(a, a_row, a_k, bp, ldb, c, ldc, depth, cols, alpha, add); break;
        default: tile_row<T, 1>(a, a_row, a_k, bp, ldb, c, ldc, depth, cols, alpha, add); break;
    }
}

/// The calling thread's buffer of `size` entries, one per use (`Use`), allocated at its
/// first product and kept: a training step allocates nothing here.
template <class T, int Use, Index Size>
T* thread_buffer() {
    thread_local std::unique_ptr<T[]> buffer;
    if (!buffer) buffer = std::make_unique<T[]>(static_cast<std::size_t>(Size));
    return buffer.get();
}

/// One packed block of B (kPanelElements).
template <class T>
T* panel_buffer() {
    return thread_buffer<T, 0, kPanelElements>();
}

/// The gathered entries of A for kGatherTiles row tiles of A^T B over one k-block.
template <class T>
T* gather_buffer() {
    return thread_buffer<T, 1, kKBlock * kGatherTiles * kTileRows>();
}

/// The steps of the inner dimension per pass of tiled_block, from the product's shape alone
/// (not a thread's slab of it): kKBlock, or for A B as many more, up to kLongKBlock, as a
/// block of B of all vec_cols columns holds in kPanelElements.
template <class T>
Index k_block(bool transposed, Index vec_cols) {
    if (transposed) return kKBlock;
    constexpr Index group = kTilePackets * kPacket<T>;
    const Index width = (vec_cols + group - 1) / group * group;
    return std::clamp<Index>(kPanelElements / std::max<Index>(width, 1) / kKBlock * kKBlock, kKBlock, kLongKBlock);
}

/// C[:, :vec_cols] (+)= alpha * op(A) B where op(A)(i, k) = a[i * a_row + k * a_k], on one
/// thread: the register-tiled part of both products. The inner dimension goes in blocks of
/// kb steps (k_block) and the columns in panels of at most kPanelElements / kb-or-fewer
/// steps (whole tile groups), so that the packed block of B stays in L2 while every row
/// block of C passes over it.
template <class T>
void tiled_block(T* c, Index ldc, Index rows, Index vec_cols, const T* a, Index a_row, Index a_k, const T* b,
                 Index ldb, Index depth, Index kb, T alpha, bool accumulate) {
    if (depth == 0) {
        if (!accumulate)
            for (Index i = 0; i < rows; ++i) std::fill(c + i * ldc, c + i * ldc + vec_cols, T(0));
        return;
    }
    constexpr Index group = kTilePackets * kPacket<T>;
    for (Index k0 = 0; k0 < depth; k0 += kb) {
        const Index kd = std::min(kb, depth - k0);
        const bool add = accumulate || k0 > 0;
        const Index panel = std::max<Index>(group, kPanelElements / kd / group * group);
        for (Index j0 = 0; j0 < vec_cols; j0 += panel) {
            const Index nd = std::min(panel, vec_cols - j0);
            // A B packs its B (a factor, small, read by every row tile). A^T B's B is dy or
            // x, large, read by only ceil(r / 6) row tiles: its copy cost more than it saved
            // at r = 8 (half the speed), so it is read in place there; with 16 registers
            // (AVX2: 16-column tiles, one 64-byte line of each row of B per step of k, rows
            // 4 KiB apart, past the prefetcher and into one set of L1) and at least
            // kPackTransposedRows rows of C, it is packed too (docs/performance.md, "Thin
            // products"). The copy changes no sum.
            const bool packed = a_k == 1 || (!kWideRegisterFile && rows >= kPackTransposedRows);
            const T* bp = b + k0 * ldb + j0;
            if (packed) {
                T* buffer = panel_buffer<T>();
                pack_panel<T>(b + k0 * ldb + j0, ldb, kd, nd, buffer);
                bp = buffer;
            }
            const Index bld = packed ? 0 : ldb;
            // Rows in tiles of equal height (6 and 5, say, not 6 and 1): a tile of one or two
            // rows has too few accumulators to keep the FMA units busy.
            const Index tiles = (rows + kTileRows - 1) / kTileRows;
            if (a_k == 1) {  // A B: the tile's rows of A are contiguous already
                for (Index t = 0; t < tiles; ++t) {
                    const Index i = rows * t / tiles, h = rows * (t + 1) / tiles - i;
                    tile_rows<T>(h, a + i * a_row + k0, a_row, 1, bp, bld, c + i * ldc + j0, ldc, kd, nd, alpha,
                                 add);
                }
                continue;
            }
            // A^T B: a tile's entries of op(A) are a few of each row of A (dy or x), rows
            // 4 KiB apart, all in one set of L1 and fetched again from L2 at every step.
            // Those of kGatherTiles tiles are copied together, kd rows of w entries
            // (ga[k * w + i]), each row of A read once and in one piece; the tiles then read
            // a stream of rows w apart (A^T B at r 64: 1.25x the speed of copying one
            // tile's entries at a time on an AVX-512 Xeon, 1.2x with AVX2 there when C has
            // d rows; 0.9x with AVX2 when it has r rows and d columns, docs/performance.md,
            // "Thin products"). An odd number of cache lines between the rows, to spread
            // them over more sets of L1, was slower (0.7x with AVX2).
            T* ga = gather_buffer<T>();
            for (Index t0 = 0; t0 < tiles; t0 += kGatherTiles) {
                const Index t1 = std::min(tiles, t0 + kGatherTiles);
                const Index i0 = rows * t0 / tiles, w = rows * t1 / tiles - i0;
                for (Index k = 0; k < kd; ++k) {
                    const T* src = a + i0 * a_row + (k0 + k) * a_k;
                    T* dst = ga + k * w;
                    if (a_row == 1)
                        std::copy(src, src + w, dst);
                    else
                        for (Index i = 0; i < w; ++i) dst[i] = src[i * a_row];
                }
                for (Index t = t0; t < t1; ++t) {
                    const Index i = rows * t / tiles, h = rows * (t + 1) / tiles - i;
                    tile_rows<T>(h, ga + (i - i0), 1, w, bp, bld, c + i * ldc + j0, ldc, kd, nd, alpha, add);
                }
            }
        }
    }
}

/// tiled_block over all threads: C is cut along its longer side into one contiguous slab
/// per thread (whole row tiles, or whole packets of columns), each done by tiled_block. One
/// fork per product, and each thread's sums run in the same order as on one thread.
template <class T>
void tiled_product(T* c, Index ldc, Index rows, Index vec_cols, const T* a, Index a_row, Index a_k,
                   const T* b, Index ldb, Index depth, T alpha, bool accumulate) {
    const Index kb = k_block<T>(a_k != 1, vec_cols);
    const bool by_rows = rows >= vec_cols;
    const Index unit = by_rows ? kTileRows : kPacket<T>;
    const Index units = ((by_rows ? rows : vec_cols) + unit - 1) / unit;
    const Index parts = std::min<Index>(lowrank::detail::available_threads(), units);
    lowrank::detail::parallel_for(parts, rows * vec_cols * std::max<Index>(depth, 1) / std::max<Index>(parts, 1),
                                  [&](Index p) {
        const Index first = units * p / parts * unit, last = units * (p + 1) / parts * unit;
        if (by_rows) {
            const Index r = std::min(last, rows) - first;
            if (r > 0)
                tiled_block<T>(c + first * ldc, ldc, r, vec_cols, a + first * a_row, a_row, a_k, b, ldb, depth, kb,
                               alpha, accumulate);
        } else {
            const Index n = std::min(last, vec_cols) - first;
            if (n > 0)
                tiled_block<T>(c + first, ldc, rows, n, a, a_row, a_k, b + first, ldb, depth, kb, alpha, accumulate);
        }
    });
}

/// C (+)= alpha * op(A) B, the body of gemm_nn and gemm_tn: op(A)(i, k) = a[i * a_row +
/// k * a_k] for the register tiles, and `op_a`, the same operand as an Eigen expression, for
/// the columns past the last whole packet (coefficient-wise lazyProduct: no threads).
template <class T, class OpA>
void strided_product(RowMajorView<T> c, const OpA& op_a, const T* a, Index a_row, Index a_k,
                     const ConstRowMajorView<T>& b, T alpha, bool accumulate) {
    Index vec_cols = 0;
    if constexpr (kVectorised<T>) {
        vec_cols = c.cols() / kPacket<T> * kPacket<T>;
        if (vec_cols > 0 && c.rows() > 0)
            tiled_product<T>(c.data(), c.outerStride(), c.rows(), vec_cols, a, a_row, a_k, b.data(), b.outerStride(),
                             b.rows(), alpha, accumulate);
    }
    if (const Index rest = c.cols() - vec_cols; rest > 0) {
        if (accumulate)
            c.rightCols(rest) += alpha * op_a.lazyProduct(b.rightCols(rest));
        else
            c.rightCols(rest) = alpha * op_a.lazyProduct(b.rightCols(rest));
    }
}

/// c[i * ldc + j] = alpha * <a row i, bt row j> (+ c), for i < R, j < NC: dot products
/// along the inner dimension, vectorised along it, reduced at the end.
template <class T, int R, int NC>
void dot_tile(const T* a, Index lda, const T* bt, Index ldb, T* c, Index ldc, Index depth, T alpha,
              bool add) {
    using Packet = typename Eigen::internal::packet_traits<T>::type;
    using namespace Eigen::internal;
    constexpr int W = kPacket<T>;
    Packet acc[R][NC];
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < NC; ++j) acc[i][j] = pset1<Packet>(T(0));
    Index k = 0;
    for (; k + W <= depth; k += W) {
        Packet ai[R];
        for (int i = 0; i < R; ++i) ai[i] = ploadu<Packet>(a + i * lda + k);
        for (int j = 0; j < NC; ++j) {
            const Packet bj = ploadu<Packet>(bt + j * ldb + k);
            for (int i = 0; i < R; ++i) acc[i][j] = pmadd(ai[i], bj, acc[i][j]);
        }
    }
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < NC; ++j) {
            T sum = predux(acc[i][j]);
            for (Index kk = k; kk < depth; ++kk) sum += a[i * lda + kk] * bt[j * ldb + kk];
            T& out = c[i * ldc + j];
            out = add ? out + alpha * sum : alpha * sum;
        }
}

template <class T, int R>
void dot_row(const T* a, Index lda, const T* bt, Index ldb, T* c, Index ldc, Index depth, Index cols,
             T alpha, bool add) {
    constexpr int NC = kDotCols;
    Index j = 0;
    for (; j + NC <= cols; j += NC) dot_tile<T, R, NC>(a, lda, bt + j * ldb, ldb, c + j, ldc, depth, alpha, add);
    const T* b = bt + j * ldb;
    switch (cols - j) {  // the last columns in one tile, so that A's rows are read once more at most
        case 0: break;
        case 1: dot_tile<T, R, 1>(a, lda, b, ldb, c + j, ldc, depth, alpha, add); break;
        case 2: dot_tile<T, R, 2>(a, lda, b, ldb, c + j, ldc, depth, alpha, add); break;
        case 3: dot_tile<T, R, 3>(a, lda, b, ldb, c + j, ldc, depth, alpha, add); break;
        case 4: dot_tile<T, R, 4>(a, lda, b, ldb, c + j, ldc, depth, alpha, add); break;
        case 5: dot_tile<T, R, 5>(a, lda, b, ldb, c + j, ldc, depth, alpha, add); break;
        case 6: dot_tile<T, R, 6>(a, lda, b, ldb, c + j, ldc, depth, alpha, add); break;
        default: dot_tile<T, R, 7>(a, lda, b, ldb, c + j, ldc, depth, alpha, add); break;
    }
}

}  // namespace detail

/// C = alpha * A * B, or C += alpha * A * B with `accumulate`: A (m x k), B (k x n), C (m x n),
/// all row-major. C must not overlap A or B.
template <class T>
void gemm_nn(RowMajorView<T> c, const ConstRowMajorView<T>& a, const ConstRowMajorView<T>& b, T alpha,
             bool accumulate) {
    if (a.cols() != b.rows() || c.rows() != a.rows() || c.cols() != b.cols())
        detail::throw_shapes("gemm_nn", "A B", c.rows(), c.cols(), a.rows(), a.cols(), b.rows(), b.cols());
    detail::strided_product<T>(c, a, a.data(), a.outerStride(), 1, b, alpha, accumulate);
}

/// C = alpha * A^T * B, or C += alpha * A^T * B with `accumulate`: A (k x m), B (k x n),
/// C (m x n), all row-major; k is the long dimension (tokens). C must not overlap A or B.
template <class T>
void gemm_tn(RowMajorView<T> c, const ConstRowMajorView<T>& a, const ConstRowMajorView<T>& b, T alpha,
             bool accumulate) {
    if (a.rows() != b.rows() || c.rows() != a.cols() || c.cols() != b.cols())
        detail::throw_shapes("gemm_tn", "A^T B", c.rows(), c.cols(), a.rows(), a.cols(), b.rows(), b.cols());
    detail::strided_product<T>(c, a.transpose(), a.data(), 1, a.outerStride(), b, alpha, accumulate);
}

/// C = alpha * A * Bt^T, or C += alpha * A * Bt^T with `accumulate`: A (m x k), Bt (n x k),
/// C (m x n), all row-major; for a narrow C (n = r) and a long inner dimension k, such as
/// x V with V^T at hand. Each entry is a dot product of two contiguous rows, vectorised
/// along k, so any n is served. C must not overlap A or Bt.
template <class T>
void gemm_nt(RowMajorView<T> c, const ConstRowMajorView<T>& a, const ConstRowMajorView<T>& bt, T alpha,
             bool accumulate) {
    if (a.cols() != bt.cols() || c.rows() != a.rows() || c.cols() != bt.rows())
        detail::throw_shapes("gemm_nt", "A B^T", c.rows(), c.cols(), a.rows(), a.cols(), bt.rows(), bt.cols());
    if constexpr (detail::kVectorised<T>) {
        const Index rows = c.rows(), blocks = (rows + detail::kDotRows - 1) / detail::kDotRows;
        const Index lda = a.outerStride(), ldb = bt.outerStride(), ldc = c.outerStride(), depth = a.cols();
        lowrank::detail::parallel_for(blocks, detail::kDotRows * depth * c.cols(), [&](Index blk) {
            const Index i = blk * detail::kDotRows, r = std::min<Index>(detail::kDotRows, rows - i);
            const T* ai = a.data() + i * lda;
            T* ci = c.data() + i * ldc;
            if (r == 3)
                detail::dot_row<T, 3>(ai, lda, bt.data(), ldb, ci, ldc, depth, c.cols(), alpha, accumulate);
            else if (r == 2)
                detail::dot_row<T, 2>(ai, lda, bt.data(), ldb, ci, ldc, depth, c.cols(), alpha, accumulate);
            else
                detail::dot_row<T, 1>(ai, lda, bt.data(), ldb, ci, ldc, depth, c.cols(), alpha, accumulate);
        });
    } else if (accumulate) {
        c += alpha * a.lazyProduct(bt.transpose());
    } else {
        c = alpha * a.lazyProduct(bt.transpose());
    }
}

/// C = alpha * A * B (+ C) for a narrow C (n = r columns), with both B (k x n) and B^T
/// (n x k) at hand: the columns that fill whole SIMD packets go through gemm_nn's register
/// tiles, the rest (all of C when n is below one packet, e.g. r = 8 floats with AVX-512)
/// through gemm_nt's dot products, which ran about twice as fast as either tiled product
/// there.
template <class T>
void gemm_narrow(RowMajorView<T> c, const ConstRowMajorView<T>& a, const ConstRowMajorView<T>& b,
                 const ConstRowMajorView<T>& bt, T alpha, bool accumulate) {
    if (a.cols() != b.rows() || c.rows() != a.rows() || c.cols() != b.cols())
        detail::throw_shapes("gemm_narrow", "A B", c.rows(), c.cols(), a.rows(), a.cols(), b.rows(), b.cols());
    if (bt.rows() != b.cols() || bt.cols() != b.rows())
        throw Error(lowrank::detail::concat("gemm_narrow: B^T ", shape_string(bt.rows(), bt.cols()),
                                            " is not the transpose of B ", shape_string(b.rows(), b.cols())));
    Index vec = 0;
    if constexpr (detail::kVectorised<T>) vec = c.cols() / detail::kPacket<T> * detail::kPacket<T>;
    if (vec > 0) gemm_nn<T>(c.leftCols(vec), a, b.leftCols(vec), alpha, accumulate);
    if (const Index rest = c.cols() - vec; rest > 0)
        gemm_nt<T>(c.rightCols(rest), a, bt.bottomRows(rest), alpha, accumulate);
}

}  // namespace lowrank::linalg
