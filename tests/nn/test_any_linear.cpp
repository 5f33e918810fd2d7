// AnyLinear slots, and the errors every factored layer gives for bad input.
#include "factored_layer_helpers.hpp"

#include <limits>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_any_linear {

using namespace lowrank;
using namespace lowrank::test;

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

}  // namespace test_any_linear
