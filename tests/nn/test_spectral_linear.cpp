// SpectralLinear (Sparse Spectral Training): init, gradients, active set, re-SVD.
#include "factored_layer_helpers.hpp"

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_spectral_linear {

using namespace lowrank;
using namespace lowrank::test;

TEST_CASE("SpectralLinear equals the dense layer at init (zero distortion)", "[nn][sst]") {
    Rng a(11), b(11);
    Linear<double> dense("fc", 9, 6, a);
    SpectralLinear<double> spectral("fc", 9, 6, b, {.rank = 2});
    CHECK((dense.weight.value - spectral.dense_weight()).norm() < 1e-12);
    CHECK((dense.bias.value - spectral.bias.value).norm() == 0.0);
    const MatrixD x = gaussian(5, 9, 12);
    CHECK((forward_value(dense, x) - forward_value(spectral, x)).norm() < 1e-12);
    const MatrixD u = spectral.full_u(), v = spectral.full_v();
    CHECK((u.transpose() * u - MatrixD::Identity(6, 6)).norm() < 1e-12);
    CHECK((v.transpose() * v - MatrixD::Identity(6, 6)).norm() < 1e-12);
}

TEST_CASE("SpectralLinear: exact gradients without enhancement and enhanced ones drop sigma_i", "[nn][sst][gradcheck]") {
    for (bool bias : {false, true}) {
        INFO("bias " << bias);
        Rng rng(13);
        SpectralLinear<double> l("fc", 7, 5, rng, {.rank = 2, .bias = bias, .enhanced_gradient = false});
        check_gradients(l);

        // Same layer, enhanced: sigma and bias gradients unchanged, U/V ones divided by sigma_i.
        Parameter<double> x("x", gaussian(4, 7, 14));
        const MatrixD weights = gaussian(4, 5, 15);
        auto grads = [&](bool enhanced) {
            l.set_enhanced_gradient(enhanced);
            zero_grad(l.parameters());
            Graph<double> g;
            g.backward(weighted_sum_loss(l, x, weights)(g));
            return std::tuple{l.U_active.grad, l.V_active.grad, l.sigma.grad};
        };
        const auto [u0, v0, s0] = grads(false);
        const auto [u1, v1, s1] = grads(true);
        CHECK((s0 - s1).norm() == 0.0);
        for (Index j = 0; j < 2; ++j) {
            const double sj = l.sigma.value(0, j);
            CHECK((u1.col(j) * sj - u0.col(j)).norm() < 1e-12);
            CHECK((v1.col(j) * sj - v0.col(j)).norm() < 1e-12);
        }
    }
}

TEST_CASE("SpectralLinear: only the active block holds gradients", "[nn][sst]") {
    Rng rng(16);
    SpectralLinear<double> l("fc", 8, 8, rng, {.rank = 3});
    CHECK(!l.U_frozen.trainable);
    CHECK(!l.V_frozen.trainable);
    Parameter<double> x("x", gaussian(4, 8, 17));
    const MatrixD weights = gaussian(4, 8, 18);
    zero_grad(ParameterList<double>{&l.U_active, &l.V_active, &l.sigma, &l.bias});
    Graph<double> g;
    g.backward(weighted_sum_loss(l, x, weights)(g));
    CHECK(l.U_active.grad.cols() == 3);
    CHECK(l.U_frozen.grad.size() == 0);  // never allocated
    CHECK(l.V_frozen.grad.size() == 0);
    CHECK(l.trainable_count() == 3 * (8 + 8) + 8 + 8);
}

TEST_CASE("SpectralLinear: activate swaps columns without changing the function", "[nn][sst]") {
    Rng rng(19);
    SpectralLinear<double> l("fc", 10, 7, rng, {.rank = 3});
    const MatrixD w = l.dense_weight();
    const MatrixD s_before = l.sigma.value;
    const auto changed = l.activate({6, 1, 4});
    CHECK((l.dense_weight() - w).norm() < 1e-12);
    // Positions 4 and 6 came in; active slots 0 and 2 (not wanted) went out.
    CHECK(changed == std::vector<Index>{0, 2, 4, 6});
    CHECK(l.sigma.value(0, 1) == s_before(0, 1));
    CHECK(l.sigma.value(0, 0) == s_before(0, 4));
    CHECK(l.sigma.value(0, 2) == s_before(0, 6));
    CHECK(l.activate({0, 1, 2}).empty());
    CHECK_THROWS_WITH(l.activate({0, 1}), Catch::Contains("fc") && Catch::Contains("3 positions, got 2"));
    CHECK_THROWS_WITH(l.activate({0, 1, 7}), Catch::Contains("[0, 7)") && Catch::Contains("got 7"));
    CHECK_THROWS_WITH(l.activate({0, 1, 1}), Catch::Contains("given twice"));
}

TEST_CASE("SpectralLinear: resvd keeps the function and restores orthonormality", "[nn][sst]") {
    Rng rng(20);
    SpectralLinear<double> l("fc", 9, 6, rng, {.rank = 2});
    l.U_active.value += 0.1 * gaussian(6, 2, 21);
    l.V_active.value += 0.1 * gaussian(9, 2, 22);
    l.sigma.value(0, 4) = 3.0;  // out of order on purpose
    const MatrixD w = l.dense_weight();
    const auto version = l.U_active.layout_version();
    l.resvd();
    CHECK((l.dense_weight() - w).norm() < 1e-10);
    const MatrixD u = l.full_u(), v = l.full_v();
    CHECK((u.transpose() * u - MatrixD::Identity(6, 6)).norm() < 1e-10);
    CHECK((v.transpose() * v - MatrixD::Identity(6, 6)).norm() < 1e-10);
    for (Index i = 1; i < 6; ++i) CHECK(l.sigma.value(0, i - 1) >= l.sigma.value(0, i));
    CHECK(l.U_active.layout_version() != version);
}

TEST_CASE("SpectralLinear: renormalisation and clamping", "[nn][sst]") {
    Rng rng(23);
    SpectralLinear<double> l("fc", 5, 5, rng, {.rank = 2});
    l.U_active.value *= 3.0;
    l.sigma.value(0, 3) = -0.5;
    l.renormalize_active();
    l.clamp_sigma();
    for (Index j = 0; j < 2; ++j) CHECK(l.U_active.value.col(j).norm() == Approx(1.0));
    CHECK(l.sigma.value(0, 3) == 0.0);
    CHECK(l.rank() == 4);
}

}  // namespace test_spectral_linear
