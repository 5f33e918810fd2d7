// LowRankLinear: gradients in double, the identities of docs/derivations/low_rank_linear.md,
// the one-pass kernel.
#include "factored_layer_helpers.hpp"

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_low_rank_linear {

using namespace lowrank;
using namespace lowrank::test;

TEST_CASE("LowRankLinear gradients with and without bias and base", "[nn][gradcheck]") {
    Rng rng(1);
    for (bool bias : {false, true})
        for (bool base : {false, true}) {
            INFO("bias " << bias << ", base " << base);
            LowRankLinear<double> l("fc", 7, 5, rng, {.rank = 3, .bias = bias, .base = base, .scale = 0.7});
            check_gradients(l);
            // The frozen base trains too when asked to (ReLoRA merges into it): check it.
            if (base) {
                l.base.trainable = true;
                check_gradients(l);
            }
        }
}

TEST_CASE("LowRankLinear computes x (W0 + s U V^T)^T + b and reports its costs", "[nn]") {
    Rng rng(2);
    LowRankLinear<double> l("fc", 6, 4, rng, {.rank = 2, .bias = true, .base = true, .scale = 0.5});
    const MatrixD x = gaussian(3, 6, 3);
    const MatrixD expected = (x * (l.base.value + 0.5 * l.U.value * l.V.value.transpose()).transpose()).rowwise() +
                             l.bias.value.row(0);
    CHECK((forward_value(l, x) - expected).norm() < 1e-12);
    CHECK((l.dense_weight() - (l.base.value + 0.5 * l.U.value * l.V.value.transpose())).norm() < 1e-12);
    CHECK(l.rank() == 2);
    CHECK(l.parameter_count() == 4 * 2 + 6 * 2 + 4 * 6 + 4);
    CHECK(l.trainable_count() == 4 * 2 + 6 * 2 + 4);
    CHECK(l.flops_per_token() == 2.0 * 2 * (4 + 6) + 2.0 * 4 * 6 + 4);
}

TEST_CASE("LowRankLinear LoRA init starts at the base", "[nn]") {
    Rng rng(4);
    LowRankLinear<double> l("fc", 6, 4, rng, {.rank = 2, .base = true, .init = LowRankInit::lora});
    CHECK(l.U.value.isZero());
    CHECK(l.V.value.norm() > 0);
    CHECK((l.dense_weight() - l.base.value).norm() == 0.0);
}

TEST_CASE("LowRankLinear::from_dense is exact when r >= rank(W), optimal otherwise", "[nn]") {
    const MatrixD low = gaussian(8, 3, 5) * gaussian(3, 6, 6);  // rank 3
    const MatrixD b = gaussian(1, 8, 7);
    auto exact = LowRankLinear<double>::from_dense("fc", low, 3, &b);
    CHECK((exact.dense_weight() - low).norm() < 1e-10);
    CHECK(exact.bias.value == b);
    const MatrixD w = gaussian(8, 6, 8);
    const auto s = linalg::singular_values<double>(w);
    auto cut = LowRankLinear<double>::from_dense("fc", w, 2);
    CHECK((cut.dense_weight() - w).squaredNorm() == Approx(s.tail(4).squaredNorm()));
    CHECK(!cut.has_bias());
}

TEST_CASE("LowRankLinear gradients at widths that fill SIMD packets", "[nn][gradcheck]") {
    // The products run on register tiles of whole SIMD packets (8 doubles with AVX-512) and
    // on dot products for the columns left over (linalg/thin_gemm.hpp). The small layers
    // above have fewer columns than a packet; these have whole packets and a remainder.
    Rng rng(60);
    for (Index rank : {8, 11}) {
        INFO("rank " << rank);
        LowRankLinear<double> l("fc", 19, 18, rng, {.rank = rank, .bias = true, .scale = 0.8});
        check_gradients(l, 13);
    }
}

TEST_CASE("LowRankLinear one-pass backward equals the GEMM composition", "[nn][gradcheck]") {
    // 600 tokens: two 256-token tiles and a partial one.
    // Rank 4 is below one SIMD packet (dot products only); rank 12 fills one packet of 8
    // doubles (AVX-512) and leaves 4 columns.
    Rng rng(70);
    for (auto [base, rank] : {std::pair{false, Index{4}}, {true, Index{4}}, {false, Index{12}}}) {
        INFO("base " << base << ", rank " << rank);
        LowRankLinear<double> l("fc", 20, 16, rng, {.rank = rank, .bias = true, .base = base, .scale = 0.5});
        Parameter<double> x("x", gaussian(600, 20, 71));
        const MatrixD weights = gaussian(600, 16, 72);
        auto grads = [&](Index one_pass_max_rank) {
            const Index saved = detail::low_rank_one_pass_max_rank();
            detail::low_rank_one_pass_max_rank() = one_pass_max_rank;
            zero_grad(ParameterList<double>{&l.U, &l.V, &l.bias, &x});
            Graph<double> g;
            g.backward(weighted_sum_loss(l, x, weights)(g));
            detail::low_rank_one_pass_max_rank() = saved;
            return std::tuple{l.U.grad, l.V.grad, l.bias.grad, x.grad};
        };
        const auto [u0, v0, b0, x0] = grads(0);
        const auto [u1, v1, b1, x1] = grads(64);
        CHECK((u0 - u1).norm() <= 1e-12 * u0.norm());
        CHECK((v0 - v1).norm() <= 1e-12 * v0.norm());
        CHECK((b0 - b1).norm() <= 1e-12 * b0.norm());  // the one-pass path sums db tile by tile
        CHECK((x0 - x1).norm() <= 1e-12 * x0.norm());
        check_gradients(l, 600);
    }
}

}  // namespace test_low_rank_linear
