// IncrementalRankLinear (InRank) and DeepLowRankLinear (Deep LoRA): gradients, growth,
// truncation, compression.
#include "factored_layer_helpers.hpp"

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_incremental_deep {

using namespace lowrank;
using namespace lowrank::test;

TEST_CASE("IncrementalRankLinear gradients, active columns only", "[nn][inrank][gradcheck]") {
    for (bool base : {false, true})
        for (bool bias : {false, true}) {
            INFO("base " << base << ", bias " << bias);
            Rng rng(30);
            IncrementalRankLinear<double> l("fc", 9, 8, rng, {.rank = 2, .capacity = 4, .bias = bias, .base = base});
            if (base) l.U.value = gaussian(8, 4, 31);  // U starts at 0 with a base: make it generic
            check_gradients(l);
            CHECK(l.U.grad.rightCols(2).isZero());
            CHECK(l.V.grad.rightCols(2).isZero());
            l.grow(4);
            check_gradients(l);
        }
}

TEST_CASE("IncrementalRankLinear gradients with whole SIMD packets of active columns", "[nn][inrank][gradcheck]") {
    // The active columns are a block of wider factors (outer stride = capacity): at k = 10 of
    // capacity 12 the products run on register tiles (8 doubles a packet with AVX-512) and
    // dot products together, on 6 tokens through the whole-matrix backward and on 520
    // (three tiles of at most 256) through the one-pass one.
    Rng rng(33);
    IncrementalRankLinear<double> l("fc", 26, 24, rng, {.rank = 10, .capacity = 12, .bias = true});
    for (Index tokens : {6, 520}) {
        INFO("tokens " << tokens);
        check_gradients(l, tokens);
        CHECK(l.U.grad.rightCols(2).isZero());
        CHECK(l.V.grad.rightCols(2).isZero());
    }
}

TEST_CASE("IncrementalRankLinear grows without reallocating and truncates to the tail energy", "[nn][inrank]") {
    Rng rng(32);
    IncrementalRankLinear<double> l("fc", 12, 10, rng, {.rank = 2});
    CHECK(l.capacity() == 5);  // floor(min(12, 10) / 2)
    CHECK(l.rank() == 2);
    CHECK(l.parameter_count() == 2 * (12 + 10) + 10);
    const double* u_data = l.U.value.data();
    const MatrixD w2 = l.dense_weight();
    l.grow(4);
    CHECK(l.U.value.data() == u_data);  // no reallocation
    CHECK(l.rank() == 4);
    CHECK(l.parameter_count() == 4 * (12 + 10) + 10);
    // The new columns keep their initial values: W grows by exactly their product.
    CHECK((l.dense_weight() - w2 - l.U.value.middleCols(2, 2) * l.V.value.middleCols(2, 2).transpose()).norm() <
          1e-12);
    const MatrixD w4 = l.dense_weight();
    const auto s = linalg::singular_values<double>(w4);
    const auto thin = l.singular_values();
    CHECK((thin - s.head(4)).norm() < 1e-10);
    const double tail = l.truncate(3);
    CHECK(tail == Approx(s(3) * s(3)));
    CHECK((l.dense_weight() - w4).squaredNorm() == Approx(tail));
    CHECK(l.capacity() == 3);  // capacity freed
    CHECK(l.U.cols() == 3);
    CHECK_THROWS_WITH(l.grow(4), Catch::Contains("fc") && Catch::Contains("got 4"));
    CHECK_THROWS_WITH(l.truncate(0), Catch::Contains("[1, 3]"));
}

TEST_CASE("DeepLowRankLinear: epsilon-orthogonal factors, gradients, compression", "[nn][deeplora][gradcheck]") {
    for (bool base : {false, true}) {
        INFO("base " << base);
        Rng rng(40);
        // in <= width <= out, so every factor has orthonormal columns (times eps) and Q does too.
        DeepLowRankLinear<double> l("fc", 8, 10, rng, {.depth = 3, .width = 9, .epsilon = 0.5, .base = base});
        REQUIRE(l.factors().size() == 3);
        const auto& w1 = l.factors()[0].value;  // (9 x 8)
        CHECK((w1.transpose() * w1 - 0.25 * MatrixD::Identity(8, 8)).norm() < 1e-12);
        check_gradients(l);

        Parameter<double> x("x", gaussian(6, 8, 41));
        const MatrixD weights = gaussian(6, 10, 42);
        zero_grad(l.parameters());
        Graph<double> g;
        g.backward(weighted_sum_loss(l, x, weights)(g));
        const MatrixD grad_w1 = l.factors()[0].grad;
        l.compress(2, grad_w1);
        REQUIRE(l.factors().size() == 5);
        CHECK(l.compressed());
        CHECK(l.rank() == 4);
        const MatrixD p = l.factors().front().value.transpose();  // (8 x 4)
        CHECK((p.transpose() * p - MatrixD::Identity(4, 4)).norm() < 1e-12);
        const MatrixD q = l.factors().back().value;  // (10 x 4)
        CHECK((q.transpose() * q - MatrixD::Identity(4, 4)).norm() < 1e-10);
        CHECK(l.outer_parameters().size() == 2);
        check_gradients(l);
        l.set_outer_trainable(false);
        CHECK(l.trainable_count() == 3 * 16 + 10);
        check_gradients(l);
    }
}

TEST_CASE("DeepLowRankLinear compressed product is the wide one restricted to P", "[nn][deeplora]") {
    Rng rng(43);
    DeepLowRankLinear<double> l("fc", 7, 7, rng, {.depth = 3, .epsilon = 0.3, .bias = false});
    const MatrixD wide = l.dense_weight();
    const MatrixD grad = gaussian(7, 7, 44);
    l.compress(2, grad);
    const MatrixD p = l.factors().front().value.transpose();
    CHECK((l.dense_weight() - wide * p * p.transpose()).norm() < 1e-12);
}

}  // namespace test_incremental_deep
