// The low-rank layer types: gradients against finite differences in double, the identities
// each one promises (METHODS.md), the bookkeeping every linear type reports, bad input.
#include <catch2/catch.hpp>

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/nn/any_linear.hpp>

#include <limits>

using namespace lowrank;

namespace {

MatrixD gaussian(Index rows, Index cols, std::uint64_t seed) {
    Rng rng(seed);
    MatrixD m(rows, cols);
    init::normal<double>(m, rng);
    return m;
}

// A loss in which every output entry matters: sum(y .* R) for a fixed random R.
template <class Layer>
auto weighted_sum_loss(Layer& layer, Parameter<double>& x, const MatrixD& weights) {
    return [&layer, &x, &weights](Graph<double>& g) {
        auto y = layer.forward(g, g.param(x));
        return sum(g, mul(g, y, g.input(weights)));
    };
}

// Checks the gradient of every trainable parameter of the layer and of its input.
template <class Layer>
void check_gradients(Layer& layer, Index tokens = 4) {
    Parameter<double> x("x", gaussian(tokens, layer.in_features(), 77));
    const MatrixD weights = gaussian(tokens, layer.out_features(), 78);
    ParameterList<double> wrt{&x};
    for (auto* p : layer.parameters())
        if (p->trainable) wrt.push_back(p);
    const auto result = gradcheck(weighted_sum_loss(layer, x, weights), wrt);
    INFO(result.report);
    CHECK(result.passed);
}

MatrixD forward_value(auto& layer, const MatrixD& x) {
    Graph<double> g;
    return layer.forward(g, g.input(x)).value();
}

}  // namespace

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

TEST_CASE("AnyLinear swaps layer types in place and keeps name and shape", "[nn]") {
    Rng rng(50);
    AnyLinear<double> slot(Linear<double>("h.0", 16, 12, rng));
    CHECK(std::string(slot.kind()) == "dense");
    CHECK(slot.parameter_count() == 16 * 12 + 12);
    const MatrixD w = slot.dense_weight();
    const MatrixD b = *slot.bias();
    slot.replace(LowRankLinear<double>::from_dense("h.0", w, 12, &b));
    CHECK(std::string(slot.kind()) == "low_rank");
    CHECK((slot.dense_weight() - w).norm() < 1e-10);
    CHECK(slot.parameters().size() == 3);
    CHECK(slot.get_if<Linear<double>>() == nullptr);
    CHECK_THROWS_WITH(slot.replace(Linear<double>("h.1", 16, 12, rng)), Catch::Contains("'h.0'") &&
                                                                            Catch::Contains("'h.1'"));
    CHECK_THROWS_WITH(slot.replace(Linear<double>("h.0", 16, 11, rng)),
                      Catch::Contains("(12 x 16)") && Catch::Contains("(11 x 16)"));
    CHECK_THROWS_WITH(slot.get<SpectralLinear<double>>(), Catch::Contains("low_rank"));
}

TEST_CASE("Factored layers reject bad ranks, shapes and non-finite weights", "[nn][errors]") {
    Rng rng(60);
    CHECK_THROWS_WITH(LowRankLinear<double>("h.2.fc", 10, 5, rng, {.rank = 0}),
                      Catch::Contains("h.2.fc") && Catch::Contains("[1, min(out, in) = 5]") && Catch::Contains("got 0"));
    CHECK_THROWS_WITH(LowRankLinear<double>("h.2.fc", 10, 5, rng, {.rank = 6}), Catch::Contains("got 6"));
    CHECK_THROWS_WITH(SpectralLinear<double>("sst", 4, 4, rng, {.rank = 5}), Catch::Contains("sst") &&
                                                                                 Catch::Contains("got 5"));
    CHECK_THROWS_WITH(IncrementalRankLinear<double>("inr", 8, 8, rng, {.rank = 5}),
                      Catch::Contains("capacity = 4") && Catch::Contains("got 5"));
    CHECK_THROWS_WITH(IncrementalRankLinear<double>("inr", 8, 8, rng, {.capacity = 9}), Catch::Contains("got 9"));
    CHECK_THROWS_WITH(DeepLowRankLinear<double>("deep", 8, 8, rng, {.depth = 1}), Catch::Contains("got 1"));

    MatrixD w = gaussian(5, 4, 61);
    const MatrixD wrong_bias = gaussian(1, 4, 62);
    CHECK_THROWS_WITH(LowRankLinear<double>::from_dense("fd", w, 2, &wrong_bias),
                      Catch::Contains("fd") && Catch::Contains("(1 x 5)") && Catch::Contains("(1 x 4)"));
    w(0, 0) = std::numeric_limits<double>::infinity();
    CHECK_THROWS_WITH(LowRankLinear<double>::from_dense("fd", w, 2), Catch::Contains("fd") &&
                                                                        Catch::Contains("non-finite"));

    LowRankLinear<double> l("h.3.proj", 6, 4, rng, {.rank = 2});
    Graph<double> g;
    const MatrixD x = gaussian(3, 5, 63);
    CHECK_THROWS_WITH(l.forward(g, g.input(x)), Catch::Contains("h.3.proj") && Catch::Contains("6 features") &&
                                                    Catch::Contains("(3 x 5)"));
    DeepLowRankLinear<double> d("deep", 6, 6, rng, {.width = 4});
    CHECK_THROWS_WITH(d.compress(3, gaussian(4, 6, 64)), Catch::Contains("got r = 3"));
    CHECK_THROWS_WITH(d.compress(1, gaussian(6, 6, 65)), Catch::Contains("(4 x 6)"));
}

TEST_CASE("LowRankLinear one-pass backward equals the GEMM composition", "[nn][gradcheck]") {
    // 300 tokens: several 64-token tiles and a partial one.
    Rng rng(70);
    for (bool base : {false, true}) {
        INFO("base " << base);
        LowRankLinear<double> l("fc", 20, 16, rng, {.rank = 4, .bias = true, .base = base, .scale = 0.5});
        Parameter<double> x("x", gaussian(300, 20, 71));
        const MatrixD weights = gaussian(300, 16, 72);
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
        CHECK((b0 - b1).norm() == 0.0);
        CHECK((x0 - x1).norm() <= 1e-12 * x0.norm());
        check_gradients(l, 300);
    }
}
