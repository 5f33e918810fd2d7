// UpdateRankTracker and inrank_alpha_ranks: the alpha-rank of constructed spectra (flat,
// zero, flat full rank, where InRank's variance-based ratio gives less than the exact rank)
// against the closed form of the ratio; a layer whose W(t) - W(0) is made to have rank k is
// reported at rank k, at every alpha; W(0) taken at begin (or at attach after begin); the
// log's "update_rank" lines; real training moves the ranks off 0; bad options and a
// selector that matches nothing are refused, naming them.
#include <catch2/catch.hpp>

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/core/json_read.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/optim/sgd.hpp>
#include <lowrank/train/metrics_log.hpp>
#include <lowrank/train/run.hpp>
#include <lowrank/train/update_rank.hpp>

#include "../test_support.hpp"

#include <Eigen/QR>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace test_update_rank {

using namespace lowrank;
using Catch::Matchers::Contains;

namespace {

// A spectrum of length d with k ones and d - k zeros.
Eigen::VectorXd flat(Index d, Index k) {
    Eigen::VectorXd s = Eigen::VectorXd::Zero(d);
    s.head(k).setOnes();
    return s;
}

// InRank's ratio of a flat rank-k spectrum with its first j values zeroed, worked out by
// hand: a vector with p ones among d entries has variance p (d - p) / d^2, so
// ratio(j) = 1 - (k - j)(d - k + j) / (k (d - k)).
double flat_ratio(Index d, Index k, Index j) {
    return 1.0 - static_cast<double>((k - j) * (d - k + j)) / static_cast<double>(k * (d - k));
}

// The first j with flat_ratio(d, k, j) > alpha.
Index flat_alpha_rank(Index d, Index k, double alpha) {
    for (Index j = 0; j <= k; ++j)
        if (flat_ratio(d, k, j) > alpha) return j;
    return k;
}

// An (m x n) matrix of rank k with every non-zero singular value equal to `sigma`.
MatrixD rank_k(Index m, Index n, Index k, double sigma, std::uint64_t seed) {
    const MatrixD qu = Eigen::HouseholderQR<MatrixD>(test::gaussian(m, k, seed)).householderQ() *
                       MatrixD::Identity(m, k);
    const MatrixD qv = Eigen::HouseholderQR<MatrixD>(test::gaussian(n, k, seed + 1)).householderQ() *
                       MatrixD::Identity(n, k);
    return sigma * qu * qv.transpose();
}

struct Batch {
    MatrixD x;
    std::vector<std::int32_t> y;
};

struct Net {
    Rng rng{3};
    Mlp<double> model{MlpOptions{.sizes = {20, 16, 12, 3}}, rng};
};

}  // namespace

TEST_CASE("inrank_alpha_ranks of a flat rank-k spectrum follows the closed form of InRank's ratio") {
    for (const Index d : {Index{16}, Index{64}}) {
        for (const Index k : {Index{1}, Index{2}, Index{3}, Index{5}, d / 2, d - 3}) {
            const auto ranks = inrank_alpha_ranks(flat(d, k), {0.5, 0.9, 0.99});
            CHECK(ranks[0] == flat_alpha_rank(d, k, 0.5));
            CHECK(ranks[1] == flat_alpha_rank(d, k, 0.9));
            CHECK(ranks[2] == flat_alpha_rank(d, k, 0.99));
            for (const Index r : ranks) CHECK(r <= k);
        }
    }
    // Small k: the alpha-rank is the exact rank. Large k: InRank's variance counts the zero
    // padding, and fewer than k values pass alpha (d 64, k 40: ratio(39) = 0.934 > 0.9).
    CHECK(inrank_alpha_ranks(flat(64, 3), {0.9}) == std::vector<Index>{3});
    CHECK(flat_ratio(64, 40, 39) == Approx(1.0 - 63.0 / 960.0));
    CHECK(inrank_alpha_ranks(flat(64, 40), {0.9}) == std::vector<Index>{39});
    CHECK(inrank_explained_ratio(flat(64, 40), 38) == Approx(flat_ratio(64, 40, 38)));
}

TEST_CASE("inrank_alpha_ranks: a zero or flat full-rank spectrum has rank 0, and a full rank d always passes") {
    // Zero variance: InRank's ratio is 1 for every k, so k = 0 already passes.
    CHECK(inrank_alpha_ranks(Eigen::VectorXd::Zero(8), {0.9, 0.99}) == std::vector<Index>{0, 0});
    CHECK(inrank_alpha_ranks(Eigen::VectorXd::Constant(8, 2.5), {0.9}) == std::vector<Index>{0});
    // One value: ratio(0) = 0, ratio(1) = 1.
    CHECK(inrank_alpha_ranks(flat(8, 1), {0.9, 0.999}) == std::vector<Index>{1, 1});
    // A spread spectrum: ranks grow with alpha and end at most at d.
    Eigen::VectorXd s(6);
    s << 10, 5, 2, 1, 0.5, 0.25;
    const auto ranks = inrank_alpha_ranks(s, {0.5, 0.9, 0.999});
    CHECK(ranks[0] <= ranks[1]);
    CHECK(ranks[1] <= ranks[2]);
    CHECK(ranks[2] <= 6);
    CHECK(inrank_explained_ratio(s, ranks[1]) > 0.9);
    CHECK(inrank_explained_ratio(s, ranks[1] - 1) <= 0.9);
    CHECK_THROWS_WITH(inrank_alpha_ranks(s, {1.0}), Contains("inrank_alpha_ranks") && Contains("got 1"));
}

TEST_CASE("UpdateRankTracker reports the rank k of an update made to have rank k") {
    Net net;
    Sgd<double> opt(net.model.parameters(), {.lr = 0.0});  // the steps leave the weights alone
    TrainingRun<double> run(net.model, opt);
    auto& tracker = run.attach<UpdateRankTracker<double>>(UpdateRankTracker<double>::Options{
        .select = {.roles = {"hidden"}}, .alphas = {0.9, 0.99}, .every = 1});
    run.begin();
    // Step 0: W(t) = W(0), an all-zero update, for both hidden layers (not the output).
    REQUIRE(tracker.records().size() == 2);
    for (const auto& r : tracker.records()) {
        CHECK(r.step == 0);
        CHECK(r.ranks == std::vector<Index>{0, 0});
        CHECK(r.update_norm == 0.0);
        CHECK(r.initial_norm > 0.0);
    }
    CHECK(tracker.records()[0].layer == net.model.layers()[0].name());
    CHECK(tracker.records()[0].d == 16);  // 16 x 20
    CHECK(tracker.records()[1].d == 12);  // 12 x 16

    // W(t) = W(0) + a rank-3 (first layer) and a rank-2 (second layer) product.
    const MatrixD w0a = net.model.layers()[0].dense_weight(), w0b = net.model.layers()[1].dense_weight();
    net.model.layers()[0].get<Linear<double>>().weight.value += rank_k(16, 20, 3, 0.7, 11);
    net.model.layers()[1].get<Linear<double>>().weight.value += rank_k(12, 16, 2, 1.3, 21);
    const Batch b{test::gaussian(5, 20, 1), {0, 1, 2, 0, 1}};
    run.step([&](Graph<double>& g) { return cross_entropy(g, net.model.forward(g, g.input(b.x)), b.y); });
    REQUIRE(tracker.records().size() == 4);
    CHECK(tracker.records()[2].step == 1);
    CHECK(tracker.records()[2].ranks == std::vector<Index>{3, 3});
    CHECK(tracker.records()[2].update_norm == Approx(0.7 * std::sqrt(3.0)));
    CHECK(tracker.records()[3].ranks == std::vector<Index>{2, 2});
    CHECK(tracker.records()[3].update_norm == Approx(1.3 * std::sqrt(2.0)));

    // Another update: the first layer's now has rank 7 (flat, d = 16: the closed form gives
    // ratio(6) = 1 - 15 / 63 < 0.9, so 7 at both alphas); the second layer's is undone.
    net.model.layers()[0].get<Linear<double>>().weight.value =
        w0a + rank_k(16, 20, 7, 0.7, 31);
    net.model.layers()[1].get<Linear<double>>().weight.value = w0b;
    run.step([&](Graph<double>& g) { return cross_entropy(g, net.model.forward(g, g.input(b.x)), b.y); });
    REQUIRE(tracker.records().size() == 6);
    CHECK(tracker.records()[4].ranks == std::vector<Index>{flat_alpha_rank(16, 7, 0.9), 7});
    CHECK(tracker.records()[4].ranks[0] == 7);
    CHECK(tracker.records()[5].ranks == std::vector<Index>{0, 0});
    CHECK(tracker.records()[5].update_norm == 0.0);
}

TEST_CASE("UpdateRankTracker: W(0) at attach after begin, epoch ends, the run's end, and its log lines") {
    Net net;
    test::TempDir dir;
    const auto path = dir.path() / "metrics.jsonl";
    ParameterList<double> params = net.model.parameters();
    AdamW<double> opt(params, AdamOptions{.lr = 1e-2});
    TrainingRun<double> run(net.model, opt, {.steps_per_epoch = 4});
    run.begin();
    {
        MetricsLog log(path);
        auto& tracker = run.attach<UpdateRankTracker<double>>(
            UpdateRankTracker<double>::Options{.alphas = {0.9}, .log = &log});
        REQUIRE(tracker.records().size() == 3);  // at attach: every linear layer, step 0
        const Batch b{test::gaussian(8, 20, 2), {0, 1, 2, 0, 1, 2, 0, 1}};
        for (int s = 0; s < 6; ++s)
            run.step([&](Graph<double>& g) { return cross_entropy(g, net.model.forward(g, g.input(b.x)), b.y); });
        run.finish();
        // Step 0, the epoch end at step 4, the run's end at step 6.
        REQUIRE(tracker.records().size() == 9);
        CHECK(tracker.records()[3].step == 4);
        CHECK(tracker.records()[8].step == 6);
        for (std::size_t i = 3; i < 9; ++i) {
            CHECK(tracker.records()[i].ranks[0] >= 1);  // Adam moved every layer
            CHECK(tracker.records()[i].update_norm > 0.0);
        }
        CHECK(tracker.seconds() >= 0.0);
    }
    std::ifstream in(path);
    std::string line;
    int lines = 0;
    while (std::getline(in, line)) {
        const auto j = nlohmann::json::parse(line);
        CHECK(j.at("kind") == "update_rank");
        CHECK(j.at("alphas").size() == 1);
        CHECK(j.at("ranks").size() == 1);
        CHECK(j.contains("layer"));
        CHECK(j.contains("update_norm"));
        ++lines;
    }
    CHECK(lines == 9);
}

TEST_CASE("UpdateRankTracker refuses bad options and a selector that matches no layer, naming them") {
    using Opt = UpdateRankTracker<double>::Options;
    CHECK_THROWS_WITH(UpdateRankTracker<double>(Opt{.alphas = {}}), Contains("at least one alpha"));
    CHECK_THROWS_WITH(UpdateRankTracker<double>(Opt{.alphas = {0.9, 0.0}}),
                      Contains("alpha in (0, 1)") && Contains("got 0"));
    CHECK_THROWS_WITH(UpdateRankTracker<double>(Opt{.every = -1}), Contains("every >= 0"));
    Net net;
    Sgd<double> opt(net.model.parameters(), {.lr = 0.0});
    TrainingRun<double> run(net.model, opt);
    run.attach<UpdateRankTracker<double>>(Opt{.select = {.pattern = "nothing.*"}});
    CHECK_THROWS_WITH(run.begin(), Contains("UpdateRankTracker") && Contains("nothing.*") &&
                                       Contains(net.model.layers()[0].name()));
}

}  // namespace test_update_rank
