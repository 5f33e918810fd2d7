// Identities of the SVD tools of linalg/svd.hpp (their users: docs/layers/, docs/methods/).
#include <catch2/catch.hpp>

#include "../test_support.hpp"

#include <lowrank/core/init.hpp>
#include <lowrank/linalg/svd.hpp>

#include <limits>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_svd {

using namespace lowrank;
using lowrank::test::gaussian;

TEST_CASE("thin SVD reconstructs the matrix with orthonormal factors", "[linalg]") {
    for (auto [m, n] : {std::pair<Index, Index>{9, 5}, {5, 9}, {6, 6}}) {
        const MatrixD w = gaussian(m, n, 1);
        const auto svd = linalg::thin_svd<double>(w);
        const Index d = std::min(m, n);
        REQUIRE(svd.s.size() == d);
        CHECK((svd.U * svd.s.asDiagonal() * svd.V.transpose() - w).norm() < 1e-12);
        CHECK((svd.U.transpose() * svd.U - MatrixD::Identity(d, d)).norm() < 1e-12);
        CHECK((svd.V.transpose() * svd.V - MatrixD::Identity(d, d)).norm() < 1e-12);
        for (Index i = 1; i < d; ++i) CHECK(svd.s(i - 1) >= svd.s(i));
    }
}

TEST_CASE("truncated SVD error equals the discarded tail energy, split evenly", "[linalg]") {
    const MatrixD w = gaussian(12, 8, 2);
    const auto s = linalg::singular_values<double>(w);
    for (Index r = 1; r <= 8; ++r) {
        const auto f = linalg::truncated_svd<double>(w, r);
        REQUIRE(f.U.cols() == r);
        REQUIRE(f.V.cols() == r);
        const double err = (w - f.U * f.V.transpose()).squaredNorm();
        const double tail = s.tail(8 - r).squaredNorm();
        CHECK(err == Approx(tail).margin(1e-10));
        CHECK(f.tail_energy == Approx(tail).margin(1e-10));
        // Balanced: both factors carry sqrt(sigma), so their column norms agree.
        for (Index j = 0; j < r; ++j) CHECK(f.U.col(j).norm() == Approx(std::sqrt(s(j))));
        for (Index j = 0; j < r; ++j) CHECK(f.V.col(j).norm() == Approx(std::sqrt(s(j))));
    }
}

TEST_CASE("truncated SVD is exact when the rank allows", "[linalg]") {
    const MatrixD w = gaussian(10, 3, 3) * gaussian(3, 7, 4);  // rank 3
    const auto f = linalg::truncated_svd<double>(w, 3);
    CHECK((w - f.U * f.V.transpose()).norm() < 1e-10);
}

TEST_CASE("singular values of a thin product match the dense ones", "[linalg]") {
    const MatrixD u = gaussian(40, 4, 5), v = gaussian(30, 4, 6);
    const MatrixD w = u * v.transpose();
    const auto dense = linalg::singular_values<double>(w);
    const auto thin = linalg::product_singular_values<double>(u, v);
    REQUIRE(thin.size() == 4);
    CHECK((thin - dense.head(4)).norm() < 1e-10);
    const auto svd = linalg::product_svd<double>(u, v);
    CHECK((svd.U * svd.s.asDiagonal() * svd.V.transpose() - w).norm() < 1e-10);
    CHECK((svd.U.transpose() * svd.U - MatrixD::Identity(4, 4)).norm() < 1e-10);
    CHECK((svd.V.transpose() * svd.V - MatrixD::Identity(4, 4)).norm() < 1e-10);
}

TEST_CASE("stable rank and spectral norm", "[linalg]") {
    MatrixD d = MatrixD::Zero(4, 4);
    d.diagonal() << 2, 1, 1, 0;
    CHECK(linalg::spectral_norm<double>(d) == Approx(2.0));
    CHECK(linalg::stable_rank<double>(d) == Approx(6.0 / 4.0));
    const MatrixD w = gaussian(200, 200, 7);
    const double sr = linalg::stable_rank<double>(w);
    // A square Gaussian matrix has stable rank about d / 4.
    CHECK(sr > 200 / 4.0 * 0.8);
    CHECK(sr < 200 / 4.0 * 1.2);
    CHECK(sr <= 200.0);
    CHECK(linalg::stable_rank<double>(MatrixD::Zero(3, 3)) == 0.0);
}

TEST_CASE("orthonormalisation and epsilon-scaled orthogonal init", "[linalg]") {
    const MatrixD a = gaussian(10, 4, 8);
    const MatrixD q = linalg::orthonormalize_columns<double>(a);
    CHECK((q.transpose() * q - MatrixD::Identity(4, 4)).norm() < 1e-12);
    // Same span: projecting a onto q loses nothing.
    CHECK((q * (q.transpose() * a) - a).norm() < 1e-10);
    Rng rng(9);
    MatrixD w(6, 9);
    init::orthogonal<double>(w, rng, 1e-3);
    CHECK((w * w.transpose() - 1e-6 * MatrixD::Identity(6, 6)).norm() < 1e-15);
}

TEST_CASE("SVD tools reject bad input with the thing named", "[linalg][errors]") {
    MatrixD w = gaussian(4, 3, 10);
    CHECK_THROWS_WITH(linalg::truncated_svd<double>(w, 0, "h.0.fc"),
                      Catch::Contains("h.0.fc") && Catch::Contains("[1, 3]") && Catch::Contains("got 0"));
    CHECK_THROWS_WITH(linalg::truncated_svd<double>(w, 4), Catch::Contains("got 4"));
    w(1, 2) = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_WITH(linalg::thin_svd<double>(w, "h.1.proj"),
                      Catch::Contains("h.1.proj") && Catch::Contains("non-finite"));
    CHECK_THROWS_WITH(linalg::product_singular_values<double>(gaussian(5, 2, 1), gaussian(5, 3, 2)),
                      Catch::Contains("same number of columns"));
    CHECK_THROWS_AS(linalg::orthonormalize_columns<double>(gaussian(2, 3, 1)), Error);
}

}  // namespace test_svd
