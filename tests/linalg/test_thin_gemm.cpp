// The thin-product kernels (linalg/thin_gemm.hpp) against Eigen's product and a naive one,
// over shapes that reach every tail: rows past the last 6-row tile, columns past the last whole packet and
// past a 256-column panel, inner dimensions past a 256-step block, and empty ones.
#include <catch2/catch.hpp>

#include "../test_support.hpp"

#include <lowrank/core/threads.hpp>
#include <lowrank/linalg/thin_gemm.hpp>

#include <string>
#include <tuple>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_thin_gemm {

using namespace lowrank;
using lowrank::test::gaussian;

struct Shape {
    Index m, k, n;
};

const std::vector<Shape>& shapes() {
    // Every row-tile height (1-6 rows left over after whole tiles), every dot-tile width
    // (1-8 columns), several packets of columns with and without a remainder, inner
    // dimensions across a 256-step block, and empty operands.
    static const std::vector<Shape> all = {
        {1, 1, 1},    {2, 9, 66},   {3, 17, 64},  {4, 5, 70},   {5, 7, 3},    {6, 16, 16},
        {7, 9, 17},   {8, 12, 2},   {9, 40, 5},   {10, 3, 7},   {11, 20, 68}, {13, 33, 8},
        {12, 300, 40}, {19, 5, 300}, {4, 0, 9},   {0, 5, 9},    {25, 260, 70},
    };
    return all;
}

template <class T>
Matrix<T> cast(const MatrixD& m) {
    return m.cast<T>();
}

/// max |got - want| / max(1, max |want|).
template <class T>
double rel_err(const Matrix<T>& got, const Matrix<T>& want) {
    if (want.size() == 0) return 0.0;
    const double scale = std::max(1.0, static_cast<double>(want.cwiseAbs().maxCoeff()));
    return static_cast<double>((got - want).cwiseAbs().maxCoeff()) / scale;
}

template <class T>
void check_all_products(double tol) {
    std::uint64_t seed = 10;
    for (const auto& [m, k, n] : shapes()) {
        for (bool accumulate : {false, true}) {
            for (T alpha : {T(1), T(-0.5)}) {
                INFO("m " << m << ", k " << k << ", n " << n << ", accumulate " << accumulate << ", alpha "
                          << alpha);
                const Matrix<T> a = cast<T>(gaussian(m, k, ++seed));    // m x k
                const Matrix<T> at = cast<T>(gaussian(k, m, ++seed));   // k x m (A^T B)
                const Matrix<T> b = cast<T>(gaussian(k, n, ++seed));    // k x n
                const Matrix<T> bt = b.transpose();                     // n x k
                const Matrix<T> c0 = cast<T>(gaussian(m, n, ++seed));   // what accumulate adds to
                const Matrix<T> base = accumulate ? c0 : Matrix<T>::Zero(m, n);

                Matrix<T> c = c0;
                linalg::gemm_nn<T>(c, a, b, alpha, accumulate);
                CHECK(rel_err<T>(c, base + alpha * a * b) <= tol);

                c = c0;
                linalg::gemm_nt<T>(c, a, bt, alpha, accumulate);
                CHECK(rel_err<T>(c, base + alpha * a * b) <= tol);

                c = c0;
                linalg::gemm_narrow<T>(c, a, b, bt, alpha, accumulate);
                CHECK(rel_err<T>(c, base + alpha * a * b) <= tol);

                c = c0;
                linalg::gemm_tn<T>(c, at, b, alpha, accumulate);
                CHECK(rel_err<T>(c, base + alpha * at.transpose() * b) <= tol);
            }
        }
    }
}

TEST_CASE("thin products equal Eigen's product in double", "[linalg]") { check_all_products<double>(1e-13); }

TEST_CASE("thin products equal Eigen's product in float", "[linalg]") { check_all_products<float>(2e-5); }

template <class T>
void check_views(double tol) {
    // Views with an outer stride larger than their width, as the layers pass them (the
    // active columns of a factor with capacity, a tile of tokens); the entries around the
    // written block must stay untouched.
    using M = Matrix<T>;
    const M big_a = gaussian(40, 30, 1).cast<T>(), big_b = gaussian(30, 50, 2).cast<T>();
    const M big_c = gaussian(45, 60, 3).cast<T>();
    const auto a = big_a.block(3, 2, 20, 17);
    const auto b = big_b.block(1, 4, 17, 21);
    const M bt = b.transpose();
    for (int which = 0; which < 3; ++which) {
        INFO("product " << which);
        M c = big_c;
        auto view = c.block(5, 7, 20, 21);
        if (which == 0) linalg::gemm_nn<T>(view, a, b, T(2), true);
        if (which == 1) linalg::gemm_nt<T>(view, a, bt, T(2), true);
        if (which == 2) linalg::gemm_narrow<T>(view, a, b, bt, T(2), true);
        M want = big_c;
        want.block(5, 7, 20, 21) += T(2) * a * b;
        CHECK(rel_err<T>(c, want) <= tol);
    }
    M c = big_c;
    auto view = c.block(2, 3, 17, 21);
    linalg::gemm_tn<T>(view, big_a.block(0, 0, 40, 17), big_c.block(0, 0, 40, 21), T(1), true);
    M want = big_c;
    want.block(2, 3, 17, 21) += big_a.block(0, 0, 40, 17).transpose() * big_c.block(0, 0, 40, 21);
    CHECK(rel_err<T>(c, want) <= tol);
}

template <class T>
Matrix<T> naive_product(const Matrix<T>& a, const Matrix<T>& b) {
    Matrix<T> c = Matrix<T>::Zero(a.rows(), b.cols());
    for (Index i = 0; i < a.rows(); ++i)
        for (Index j = 0; j < b.cols(); ++j)
            for (Index k = 0; k < a.cols(); ++k) c(i, j) += a(i, k) * b(k, j);
    return c;
}

TEST_CASE("every register tile and packed panel shape equals a naive product in double", "[linalg]") {
    // Rows 1-13 (every tile height the balanced split makes, one tile or two), two from
    // kPackTransposedRows on and one past a group of gathered tiles, columns over every count
    // of whole packets in a panel group and the packets left after it, up to past the widest
    // panel, and depths across a k-block (and, for narrow C, across A B's longest one):
    // against a triple loop, not Eigen, so that an error shared with Eigen's product cannot hide.
    using T = double;
    constexpr Index w = linalg::detail::kPacket<T>, group = linalg::detail::kTilePackets * w;
    std::vector<Index> cols;
    for (Index p = 1; p <= 2 * linalg::detail::kTilePackets + 1; ++p) cols.push_back(p * w);
    cols.push_back(group + w + 1);  // and a column past the last whole packet
    // Past the widest panel of a pass of 64 steps, so that such a pass takes two panels.
    const Index widest = linalg::detail::kPanelElements / 64;
    cols.push_back(widest + group + w);
    // And heights from which A^T B packs its B too (with 16 registers; read in place otherwise).
    std::vector<Index> heights;
    for (Index m = 1; m <= 13; ++m) heights.push_back(m);
    heights.push_back(linalg::detail::kPackTransposedRows);
    heights.push_back(linalg::detail::kPackTransposedRows + 7);
    heights.push_back(linalg::detail::kGatherTiles * linalg::detail::kTileRows + 7);
    std::uint64_t seed = 500;
    for (const Index m : heights)
        for (const Index n : cols)
            for (const Index k : {Index(1), Index(7), Index(64), linalg::detail::kKBlock + 3,
                                  linalg::detail::kLongKBlock + 3}) {
                if (n > widest && m > 3) continue;  // the widest panels once per small height
                if (k > linalg::detail::kKBlock + 3 && (n > group + w || m > 13)) continue;  // long passes: narrow C
                INFO("m " << m << ", k " << k << ", n " << n);
                const Matrix<T> a = gaussian(m, k, ++seed), at = a.transpose(), b = gaussian(k, n, ++seed);
                const Matrix<T> c0 = gaussian(m, n, ++seed), want = naive_product<T>(a, b);
                Matrix<T> c = c0;
                linalg::gemm_nn<T>(c, a, b, T(1), false);
                CHECK(rel_err<T>(c, want) <= 1e-13);
                c = c0;
                linalg::gemm_tn<T>(c, at, b, T(-0.5), true);
                CHECK(rel_err<T>(c, Matrix<T>(c0 - 0.5 * want)) <= 1e-13);
            }
}

TEST_CASE("thin products read and write blocks of larger matrices in place", "[linalg]") {
    check_views<double>(1e-13);
    check_views<float>(2e-5);
}

TEST_CASE("thin products give the same bits on one thread and on two", "[linalg]") {
    // Threads split the rows (or columns) of C, never a sum: the results must not depend on
    // the thread count. Large enough that the work is split.
    const MatrixF x = gaussian(600, 300, 4).cast<float>(), v = gaussian(300, 40, 5).cast<float>();
    const MatrixF vt = v.transpose(), xv_t = gaussian(600, 40, 6).cast<float>();
    const int saved = num_threads();
    auto run = [&](int threads) {
        set_num_threads(threads);
        MatrixF nn(600, 40), narrow(600, 40), tn(40, 300), y(600, 300);
        linalg::gemm_nn<float>(nn, x, v, 1.0f, false);
        linalg::gemm_narrow<float>(narrow, x, v, vt, 1.0f, false);
        linalg::gemm_tn<float>(tn, xv_t, x, 0.5f, false);
        linalg::gemm_nn<float>(y, xv_t, vt, 1.0f, false);
        return std::tuple{nn, narrow, tn, y};
    };
    const auto one = run(1);
    const auto two = run(2);
    set_num_threads(saved);
    CHECK(std::get<0>(one) == std::get<0>(two));
    CHECK(std::get<1>(one) == std::get<1>(two));
    CHECK(std::get<2>(one) == std::get<2>(two));
    CHECK(std::get<3>(one) == std::get<3>(two));
}

TEST_CASE("thin products reject shapes that do not chain", "[linalg]") {
    MatrixD c(4, 5);
    const MatrixD a = gaussian(4, 3, 1), b = gaussian(2, 5, 2);
    CHECK_THROWS_WITH(linalg::gemm_nn<double>(c, a, b, 1.0, false),
                      Catch::Contains("gemm_nn") && Catch::Contains("(4 x 3)") && Catch::Contains("(2 x 5)"));
    CHECK_THROWS_WITH(linalg::gemm_tn<double>(c, a, b, 1.0, false),
                      Catch::Contains("gemm_tn") && Catch::Contains("do not chain"));
    CHECK_THROWS_WITH(linalg::gemm_nt<double>(c, a, b, 1.0, false), Catch::Contains("gemm_nt"));
    const MatrixD b_ok = gaussian(3, 5, 3);
    CHECK_THROWS_WITH(linalg::gemm_narrow<double>(c, a, b_ok, b_ok, 1.0, false),
                      Catch::Contains("gemm_narrow") && Catch::Contains("not the transpose"));
    // A C wider than B must not reach the kernels (they would read past B's columns).
    MatrixD wide(4, 40);
    const MatrixD b_t = b_ok.transpose();
    CHECK_THROWS_WITH(linalg::gemm_narrow<double>(wide, a, b_ok, b_t, 1.0, false),
                      Catch::Contains("gemm_narrow") && Catch::Contains("(4 x 40)") && Catch::Contains("(3 x 5)"));
}

}  // namespace test_thin_gemm
