// InRank: the explained ratio and the rank decision on hand-computed spectra, and the policy
// on a small MLP: conversion, growth (bounded, capped, monotone), optimizer state of new
// columns, the check schedule in both units (the authors' forward-call cadence), the
// check telemetry, the two-stage truncation, the fixed-rank control, the guards against a
// schedule that cannot act, the "discard" record and bad options.
#include <catch2/catch.hpp>

#include "../test_support.hpp"

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/policy/inrank.hpp>
#include <lowrank/train/run.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_inrank {

using namespace lowrank;
using lowrank::test::gaussian;
using Access = lowrank::detail::TrainingContextAccess;

namespace {

Eigen::VectorXd spectrum(std::initializer_list<double> head, Index d) {
    Eigen::VectorXd s = Eigen::VectorXd::Zero(d);
    Index i = 0;
    for (double x : head) s(i++) = x;
    return s;
}

// A model, an AdamW with a no-decay group for the biases, and a TrainingRun over them
// (constant schedule, no clipping), whose context the tests of one decision hand to a
// policy directly.
struct Fixture {
    Rng rng{11};
    Mlp<double> model;
    std::unique_ptr<AdamW<double>> opt;
    std::unique_ptr<TrainingRun<double>> run;

    explicit Fixture(std::vector<Index> sizes) : model(MlpOptions{.sizes = std::move(sizes)}, rng) {
        ParameterList<double> weights, biases;
        for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
        opt = std::make_unique<AdamW<double>>(weights, AdamOptions{.lr = 1e-2, .weight_decay = 0.1});
        opt->add_group(biases, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
        run = std::make_unique<TrainingRun<double>>(model, *opt);
    }
    TrainingContext<double>& ctx() { return run->context(); }
    const RankLog& log() const { return run->rank_log(); }
    IncrementalRankLinear<double>& layer(std::size_t i) {
        return model.layers()[i].get<IncrementalRankLinear<double>>();
    }
    // Gradients on every parameter and one optimizer step, so that every one has state.
    void step_with_random_grads(std::uint64_t seed) {
        for (auto* p : model.parameters())
            if (p->trainable) p->grad = gaussian(p->rows(), p->cols(), seed++);
        opt->step();
    }
    std::vector<RankEvent> events(const std::string& kind) const { return log().of_event(kind); }
};

// Orthonormal capacity columns: every active prefix of U V^T has all its singular values 1.
void make_flat(IncrementalRankLinear<double>& l) {
    l.U.value = linalg::orthonormalize_columns<double>(gaussian(l.U.rows(), l.U.cols(), 3));
    l.V.value = linalg::orthonormalize_columns<double>(gaussian(l.V.rows(), l.V.cols(), 4));
}

// The layer's singular values as the policy sees them: zero padded to min(out, in).
Eigen::VectorXd padded_spectrum(const IncrementalRankLinear<double>& l) {
    const Index d = std::min(l.out_features(), l.in_features());
    Eigen::VectorXd s = Eigen::VectorXd::Zero(d);
    const auto sv = l.singular_values();
    s.head(sv.size()) = sv;
    return s;
}

}  // namespace

TEST_CASE("InRank explained ratio matches hand-computed spectra", "[policy][inrank]") {
    // s = (3, 1, 0, 0): mean 1, Var = (4 + 0 + 1 + 1) / 4 = 1.5.
    // k = 1 leaves (0, 1, 0, 0): mean 1/4, Var = (3 * 1/16 + 9/16) / 4 = 3/16, ratio 1 - (3/16) / 1.5 = 7/8.
    const auto a = spectrum({3, 1}, 4);
    CHECK(inrank_explained_ratio(a, 0) == Approx(0.0).margin(1e-15));
    CHECK(inrank_explained_ratio(a, 1) == Approx(0.875));
    CHECK(inrank_explained_ratio(a, 2) == Approx(1.0));
    CHECK(inrank_explained_ratio(a, 4) == Approx(1.0));
    // The zero padding is part of the statistic: without it, (3, 1) has Var 1, (0, 1) has
    // Var 1/4 and the ratio is 3/4, not 7/8.
    CHECK(inrank_explained_ratio(spectrum({3, 1}, 2), 1) == Approx(0.75));

    // s = (4, 2, 2, 0): mean 2, Var = 8 / 4 = 2.
    // k = 1: (0, 2, 2, 0), Var 1, ratio 1/2; k = 2: (0, 0, 2, 0), Var 3/4, ratio 1 - 3/8 = 5/8.
    const auto b = spectrum({4, 2, 2}, 4);
    CHECK(inrank_explained_ratio(b, 1) == Approx(0.5));
    CHECK(inrank_explained_ratio(b, 2) == Approx(0.625));
    CHECK(inrank_explained_ratio(b, 3) == Approx(1.0));

    // Nothing to explain: an all-zero or constant spectrum has ratio 1.
    CHECK(inrank_explained_ratio(Eigen::VectorXd::Zero(5), 0) == 1.0);
    CHECK(inrank_explained_ratio(Eigen::VectorXd::Constant(5, 2.0), 1) == 1.0);

    CHECK_THROWS_WITH(inrank_explained_ratio(a, 5), Catch::Contains("k in [0, 4], got 5"));
    CHECK_THROWS_WITH(inrank_explained_ratio(spectrum({1, -1}, 3), 1), Catch::Contains("non-negative"));
}

TEST_CASE("InRank rank decision takes the first rank above the threshold within the buffer and cap",
          "[policy][inrank]") {
    // Five unit singular values in d = 24: a 0/1 vector with m ones has Var = m (24 - m) / 24^2,
    // so ratio(k) = 1 - (5 - k)(19 + k) / (5 * 19): 32/95, 51/95, 72/95, 1 for k = 2, 3, 4, 5.
    const auto flat = spectrum({1, 1, 1, 1, 1}, 24);
    CHECK(inrank_explained_ratio(flat, 2) == Approx(32.0 / 95.0));
    CHECK(inrank_explained_ratio(flat, 3) == Approx(51.0 / 95.0));
    CHECK(inrank_explained_ratio(flat, 4) == Approx(72.0 / 95.0));

    // r = 2, b = 3, R = 12: scan k = 2..4 (r + b - 1), none passes 0.9: grow by b - 1 = 2.
    auto d = inrank_next_rank(flat, 2, 3, 12, 0.9);
    CHECK(d.rank == 4);
    CHECK(d.explained_ratio == Approx(72.0 / 95.0));
    // The first k above the threshold wins.
    d = inrank_next_rank(flat, 2, 3, 12, 0.5);
    CHECK(d.rank == 3);
    CHECK(d.explained_ratio == Approx(51.0 / 95.0));
    // A larger buffer reaches k = 5, where everything is explained, and stops there.
    d = inrank_next_rank(flat, 2, 10, 24, 0.9);
    CHECK(d.rank == 5);
    CHECK(d.explained_ratio == Approx(1.0));
    // The cap R - b - 1: R = 7 allows 3, R = 6 allows 2 (no growth).
    CHECK(inrank_next_rank(flat, 2, 3, 7, 0.9).rank == 3);
    CHECK(inrank_next_rank(flat, 2, 3, 6, 0.9).rank == 2);
    // Never shrinks: one dominant direction explains everything, yet rank 4 stays 4.
    CHECK(inrank_next_rank(spectrum({10, 0.01}, 24), 4, 3, 12, 0.9).rank == 4);

    // On random spectra: r' in [r, min(r + b - 1, R - b - 1)], every rank scanned before r'
    // fails the threshold, and r' passes it unless it is the end of the range.
    Rng rng(7);
    for (int trial = 0; trial < 200; ++trial) {
        const Index dim = 8 + static_cast<Index>(rng.below(40));
        const Index capacity = 4 + static_cast<Index>(rng.below(static_cast<std::uint64_t>(dim - 3)));
        const Index buffer = 1 + static_cast<Index>(rng.below(static_cast<std::uint64_t>(capacity / 2)));
        const Index cap = capacity - buffer - 1;
        if (cap < 1) continue;
        const Index rank = 1 + static_cast<Index>(rng.below(static_cast<std::uint64_t>(cap)));
        Eigen::VectorXd s = Eigen::VectorXd::Zero(dim);
        const Index nonzero = 1 + static_cast<Index>(rng.below(static_cast<std::uint64_t>(dim)));
        for (Index i = 0; i < nonzero; ++i) s(i) = std::exp(rng.normal(0.0, 2.0));
        std::sort(s.data(), s.data() + dim, std::greater<>());
        const double alpha = rng.uniform(0.05, 0.99);
        const auto dec = inrank_next_rank(s, rank, buffer, capacity, alpha);
        const Index limit = std::min(rank + buffer - 1, cap);
        INFO("trial " << trial << ": d " << dim << ", R " << capacity << ", b " << buffer << ", r " << rank);
        CHECK(dec.rank >= rank);
        CHECK(dec.rank <= std::max(rank, limit));
        CHECK(dec.rank - rank <= buffer - 1);
        CHECK(dec.rank <= cap);
        for (Index k = rank; k < dec.rank; ++k) CHECK(inrank_explained_ratio(s, k) <= alpha);
        if (dec.rank < limit) CHECK(dec.explained_ratio > alpha);
        CHECK(dec.explained_ratio == inrank_explained_ratio(s, dec.rank));
    }

    CHECK_THROWS_WITH(inrank_next_rank(flat, 0, 3, 12, 0.9), Catch::Contains("rank >= 1, got 0"));
    CHECK_THROWS_WITH(inrank_next_rank(flat, 2, 3, 12, 1.0), Catch::Contains("threshold in (0, 1), got 1"));
    CHECK_THROWS_WITH(inrank_next_rank(flat, 2, 3, 30, 0.9),
                      Catch::Contains("capacity <= the spectrum's length 24"));
}

TEST_CASE("InRank checks run every gap optimizer steps after the warm-up (cadence optimizer_steps)",
          "[policy][inrank]") {
    CHECK_FALSE(inrank_is_check_step(200, 200, 25));
    CHECK(inrank_is_check_step(225, 200, 25));
    CHECK_FALSE(inrank_is_check_step(226, 200, 25));
    CHECK(inrank_is_check_step(250, 200, 25));
    // Counted from the end of the warm-up, not from step 0.
    CHECK(inrank_is_check_step(14, 10, 4));
    CHECK_FALSE(inrank_is_check_step(12, 10, 4));
}

TEST_CASE("InRank with zero_bias starts the converted layers' biases at 0, as the authors' layer",
          "[policy][inrank]") {
    for (const bool keep_base : {false, true}) {
        INFO("keep_base " << keep_base);
        Fixture f({16, 16, 4});
        const MatrixD bias = *f.ctx().layers()[0].layer->bias();
        REQUIRE(bias.cwiseAbs().maxCoeff() > 0.0);  // the model's bias is not zero
        InRank<double> policy(InRankOptions{.keep_base = keep_base, .zero_bias = true});
        policy.on_train_begin(f.ctx());
        auto& l = f.layer(0);
        REQUIRE(l.has_bias());
        CHECK(l.bias.value == MatrixD::Zero(1, 16));
        CHECK(l.bias.trainable);
        CHECK(f.opt->group_of(l.bias) == 1);  // the no-decay group, as a kept bias
        // The output layer is not selected: its bias stays.
        CHECK(f.model.layers()[1].get<Linear<double>>().bias.value.cwiseAbs().maxCoeff() > 0.0);
    }
}

TEST_CASE("InRank converts the selected layers, keeps their bias and logs an init event each",
          "[policy][inrank]") {
    SECTION("efficient form, random factors, buffer derived from the width") {
        Fixture f({256, 256, 10});
        auto& ctx = f.ctx();
        const MatrixD bias = *ctx.layers()[0].layer->bias();
        InRank<double> policy;
        policy.on_train_begin(ctx);
        CHECK(std::string(f.model.layers()[0].kind()) == "incremental");
        CHECK(std::string(f.model.layers()[1].kind()) == "dense");  // the output layer is not selected
        auto& l = f.layer(0);
        REQUIRE(policy.layers().size() == 1);
        CHECK(policy.layers()[0].buffer == 32);     // 256 / 8
        CHECK(policy.layers()[0].capacity == 128);  // 256 / 2
        CHECK(policy.ranks() == std::vector<Index>{2});
        CHECK(l.capacity() == 128);
        CHECK(l.rank() == 34);  // r + b active columns
        CHECK_FALSE(l.has_base());
        CHECK(l.bias.value == bias);
        CHECK(f.opt->group_of(l.bias) == 1);  // still in the no-decay group
        CHECK(f.opt->group_of(l.U) == 0);
        // Kaiming-uniform bounds: 1/sqrt(R) for U, 1/sqrt(in) for V.
        CHECK(l.U.value.cwiseAbs().maxCoeff() <= 1.0 / std::sqrt(128.0));
        CHECK(l.V.value.cwiseAbs().maxCoeff() <= 1.0 / 16.0);
        CHECK(l.U.value.cwiseAbs().maxCoeff() > 0.9 / std::sqrt(128.0));
        REQUIRE(f.log().size() == 2);  // init, then discard (the efficient form drops the weight)
        const auto& e = f.log().events()[0];
        CHECK(e.event == "init");
        CHECK(e.policy == "inrank");
        CHECK(e.layer == "layers.0");
        CHECK(e.old_rank == 256);
        CHECK(e.new_rank == 2);
        CHECK(e.statistic == "buffer");
        CHECK(e.value == 32.0);
        // A second policy seeded alike draws the same factors.
        Fixture g({256, 256, 10});
        auto& ctx2 = g.ctx();
        InRank<double>().on_train_begin(ctx2);
        CHECK(g.layer(0).U.value == l.U.value);
    }
    SECTION("with a base: W starts exactly at the dense weight") {
        Fixture f({20, 32, 32, 4});
        auto& ctx = f.ctx();
        const MatrixD w0 = ctx.layers()[1].layer->dense_weight();
        InRank<double> policy({.buffer = 3, .keep_base = true});
        policy.on_train_begin(ctx);
        CHECK(f.log().size() == 2);
        auto& l = f.layer(1);
        CHECK(l.has_base());
        CHECK(l.capacity() == 16);
        CHECK(l.rank() == 5);
        CHECK(l.dense_weight() == w0);
        CHECK_FALSE(l.base.trainable);
    }
    SECTION("dense SVD init: the active product is the best rank-k approximation") {
        Fixture f({20, 32, 32, 4});
        auto& ctx = f.ctx();
        const MatrixD w = ctx.layers()[1].layer->dense_weight();
        InRank<double> policy({.buffer = 3, .init = InRankInit::dense_svd});
        policy.on_train_begin(ctx);
        const auto s = linalg::singular_values<double>(w);
        CHECK((w - f.layer(1).dense_weight()).squaredNorm() == Approx(s.tail(32 - 5).squaredNorm()));
    }
}

TEST_CASE("InRank rank is monotone, grows at most buffer - 1 per check and stops at capacity - buffer - 1",
          "[policy][inrank]") {
    Fixture f({24, 24, 3});
    auto& ctx = f.ctx();
    InRank<double> policy(
        {.buffer = 3, .warmup = 0, .gap = 1, .cadence = InRankCadence::optimizer_steps, .two_stage = false});
    policy.on_train_begin(ctx);
    auto& l = f.layer(0);
    REQUIRE(l.capacity() == 12);
    make_flat(l);  // a flat spectrum never reaches the threshold within the buffer
    std::vector<Index> ranks;
    for (std::int64_t step = 1; step <= 5; ++step) {
        Access::set_counters(ctx, step, 0);
        policy.after_step(ctx);
        ranks.push_back(policy.ranks()[0]);
        CHECK(l.rank() == policy.ranks()[0] + 3);
    }
    // 2 -> 4 -> 6 -> 8 = R - b - 1, then no further.
    CHECK(ranks == std::vector<Index>{4, 6, 8, 8, 8});
    const auto grows = f.events("grow");
    REQUIRE(grows.size() == 3);
    for (const auto& e : grows) {
        CHECK(e.new_rank > e.old_rank);
        CHECK(e.new_rank - e.old_rank <= 2);
        CHECK(e.statistic == "explained_ratio");
    }
    CHECK(grows[0].step == 1);
    CHECK(grows[0].value == Approx(72.0 / 95.0));  // five unit values in d = 24 (see above)
    CHECK(policy.layers()[0].explained_ratio == Approx(inrank_explained_ratio(padded_spectrum(l), 8)));

    // A spectrum that is already explained at the current rank does not grow it.
    Fixture g({24, 24, 3});
    auto& ctx2 = g.ctx();
    InRank<double> still(
        {.buffer = 3, .warmup = 0, .gap = 1, .cadence = InRankCadence::optimizer_steps, .two_stage = false});
    still.on_train_begin(ctx2);
    auto& m = g.layer(0);
    m.U.value.setZero();
    m.U.value.col(0) = gaussian(24, 1, 9);  // rank one
    Access::set_counters(ctx2, 1, 0);
    still.after_step(ctx2);
    CHECK(still.ranks()[0] == 2);
    CHECK(g.events("grow").empty());
    CHECK(still.checks() == 1);
}

TEST_CASE("InRank new columns keep their values and get zero optimizer state, old columns keep theirs",
          "[policy][inrank]") {
    Fixture f({24, 24, 3});
    auto& ctx = f.ctx();
    InRank<double> policy(
        {.buffer = 3, .warmup = 0, .gap = 1, .cadence = InRankCadence::optimizer_steps, .two_stage = false});
    policy.on_train_begin(ctx);
    auto& l = f.layer(0);
    make_flat(l);
    f.step_with_random_grads(20);
    const MatrixD u_before = l.U.value, v_before = l.V.value;
    const auto old_u = *f.opt->state_of(l.U);
    const auto old_v = *f.opt->state_of(l.V);
    REQUIRE(old_u.exp_avg.cols() == 5);
    REQUIRE(old_u.exp_avg.norm() > 0.0);

    Access::set_counters(ctx, 1, 0);
    policy.after_step(ctx);
    REQUIRE(l.rank() == 7);
    CHECK(l.U.value == u_before);  // nothing moved: the new columns keep their initial values
    CHECK(l.V.value == v_before);
    for (const auto& [param, old] : {std::pair{&l.U, old_u}, std::pair{&l.V, old_v}}) {
        const auto* st = f.opt->state_of(*param);
        REQUIRE(st != nullptr);
        CHECK(st->exp_avg.cols() == 7);
        CHECK(st->exp_avg_sq.cols() == 7);
        CHECK(st->exp_avg.leftCols(5) == old.exp_avg);
        CHECK(st->exp_avg_sq.leftCols(5) == old.exp_avg_sq);
        CHECK(st->exp_avg.rightCols(2).isZero(0.0));
        CHECK(st->exp_avg_sq.rightCols(2).isZero(0.0));
        CHECK(st->step == old.step);
    }
    // The optimizer accepts the new layout and trains the new columns.
    f.step_with_random_grads(40);
    CHECK((l.U.value.middleCols(5, 2) - u_before.middleCols(5, 2)).norm() > 0.0);
    CHECK(l.U.value.rightCols(5) == u_before.rightCols(5));  // inactive capacity untouched
}

TEST_CASE("InRank check counts optimizer steps, not forward passes or repeated hooks", "[policy][inrank]") {
    // In forward calls (F = 1) the checks before calls 4, 6 and 8 see the weights after
    // steps 3, 5 and 7; in optimizer steps they come after steps 5, 7 and 9.
    const auto cadence = GENERATE(InRankCadence::forward_calls, InRankCadence::optimizer_steps);
    const bool calls = cadence == InRankCadence::forward_calls;
    INFO((calls ? "forward_calls" : "optimizer_steps"));
    Fixture f({24, 24, 3});
    auto& ctx = f.ctx();
    auto& policy = f.run->add<InRank<double>>(
        {.buffer = 3, .warmup = 3, .gap = 2, .cadence = cadence, .two_stage = false});
    f.run->begin();
    make_flat(f.layer(0));
    // lr 0: the run's steps count, and leave the flat spectrum (which grows at every check) as it is.
    f.opt->set_group_lr(0, 0.0);
    f.opt->set_group_lr(1, 0.0);
    const MatrixD x = gaussian(8, 24, 70);
    const std::vector<std::int32_t> y{0, 1, 2, 0, 1, 2, 0, 1};
    for (std::int64_t step = 1; step <= 9; ++step) {
        for (int stray = 0; stray < 3; ++stray) {  // hooks without an optimizer step never count
            policy.before_forward(ctx);
            policy.after_backward(ctx);
        }
        f.run->step([&](Graph<double>& g) { return cross_entropy(g, f.model.forward(g, g.input(x)), y); });
        REQUIRE(ctx.step() == step);
        policy.after_step(ctx);  // a second call for the same step is not a second check
    }
    CHECK(policy.checks() == 3);
    const auto grows = f.events("grow");
    REQUIRE(grows.size() == 3);
    CHECK(grows[0].step == (calls ? 3 : 5));
    CHECK(grows[1].step == (calls ? 5 : 7));
    CHECK(grows[2].step == (calls ? 7 : 9));
    CHECK(policy.ranks()[0] == 8);
}

TEST_CASE(
    "InRank two-stage: truncation error equals the tail energy, moments are sliced, rank is fixed after",
    "[policy][inrank]") {
    for (bool base : {false, true}) {
        INFO("keep_base " << base);
        Fixture f({24, 24, 3});
        auto& ctx = f.ctx();
        // Threshold 0.01: every check passes at the current rank, so r stays 2 (stage 1 needs a
        // check before its cut, see the guard tests).
        InRank<double> policy({.buffer = 3,
                               .threshold = 0.01,
                               .warmup = 0,
                               .gap = 1,
                               .cadence = InRankCadence::optimizer_steps,
                               .keep_base = base,
                               .stage1_steps = 2});
        policy.on_train_begin(ctx);
        auto& l = f.layer(0);
        l.U.value = gaussian(24, 12, 50);  // a generic spectrum (U starts at 0 with a base)
        f.step_with_random_grads(60);
        const auto old_u = *f.opt->state_of(l.U);
        Access::set_counters(ctx, 1, 0);
        policy.after_step(ctx);
        CHECK(policy.stage() == 1);

        const MatrixD w = l.dense_weight();
        const auto s = l.singular_values();  // the 5 active singular values
        const double tail = s.tail(3).squaredNorm();
        Access::set_counters(ctx, 2, 0);
        policy.after_step(ctx);
        CHECK(policy.stage() == 2);
        CHECK(l.capacity() == 2);
        CHECK(l.rank() == 2);
        CHECK(l.U.cols() == 2);
        CHECK(l.has_base() == base);
        CHECK((w - l.dense_weight()).squaredNorm() == Approx(tail));
        const auto truncs = f.events("truncate");
        REQUIRE(truncs.size() == 1);
        CHECK(truncs[0].old_rank == 5);
        CHECK(truncs[0].new_rank == 2);
        CHECK(truncs[0].statistic == "tail_energy");
        CHECK(truncs[0].value == Approx(tail));
        CHECK(truncs[0].step == 2);
        CHECK(policy.layers()[0].buffer == 0);

        const auto* st = f.opt->state_of(l.U);
        REQUIRE(st != nullptr);
        CHECK(st->exp_avg.cols() == 2);
        CHECK(st->exp_avg == old_u.exp_avg.leftCols(2));
        CHECK(st->exp_avg_sq == old_u.exp_avg_sq.leftCols(2));

        // Stage 2: the optimizer accepts the shapes, the checks stop, the rank stays.
        f.step_with_random_grads(80);
        make_flat(l);
        for (std::int64_t step = 3; step < 120; ++step) {
            Access::set_counters(ctx, step, 0);
            policy.after_step(ctx);
        }
        CHECK(l.rank() == 2);
        CHECK(policy.checks() == 2);  // the checks of steps 1 and 2, none after the cut
        CHECK(f.events("grow").empty());
        CHECK(f.events("truncate").size() == 1);
    }
}

TEST_CASE("InRank stage 1 counted in epochs ends at the end of that epoch", "[policy][inrank]") {
    Fixture f({24, 24, 3});
    auto& ctx = f.ctx();
    InRank<double> policy({.buffer = 3,
                           .threshold = 0.01,  // the checks keep r = 2
                           .warmup = 5,
                           .gap = 5,
                           .cadence = InRankCadence::optimizer_steps,
                           .stage1_epochs = 2});
    policy.on_train_begin(ctx);
    Access::set_counters(ctx, 10, 0);
    policy.after_step(ctx);  // a check
    policy.on_epoch_end(ctx);
    CHECK(policy.stage() == 1);
    Access::set_counters(ctx, 20, 1);
    policy.after_step(ctx);
    CHECK(policy.stage() == 1);  // steps do not end an epoch-counted stage 1
    policy.on_epoch_end(ctx);
    CHECK(policy.stage() == 2);
    const auto truncs = f.events("truncate");
    REQUIRE(truncs.size() == 1);
    CHECK(truncs[0].epoch == 1);
    CHECK(f.layer(0).rank() == 2);
}

TEST_CASE("InRank in a training loop: loss falls, ranks grow then are fixed", "[policy][inrank]") {
    Fixture f({16, 32, 4});
    auto& policy = f.run->add<InRank<double>>(
        {.buffer = 3, .threshold = 0.95, .warmup = 5, .gap = 5, .stage1_steps = 30});
    const MatrixD x = gaussian(32, 16, 90);
    std::vector<std::int32_t> y;
    for (Index i = 0; i < 32; ++i) y.push_back(static_cast<std::int32_t>(i % 4));
    double first = 0.0, last = 0.0;
    for (std::int64_t step = 0; step < 40; ++step) {
        const StepResult r = f.run->step(
            [&](Graph<double>& g) { return cross_entropy(g, f.model.forward(g, g.input(x)), y); });
        (step == 0 ? first : last) = r.loss;
    }
    CHECK(last < first);
    CHECK(policy.stage() == 2);
    Index previous = 0;
    for (const auto& e : f.log().events()) {
        if (e.event == "grow") {
            CHECK(e.new_rank > e.old_rank);
            CHECK(e.new_rank - e.old_rank <= 2);
            CHECK(e.new_rank <= 16 / 2 - 3 - 1);
            CHECK(e.new_rank >= previous);
            previous = e.new_rank;
        }
    }
    CHECK(f.layer(0).rank() == policy.ranks()[0]);
}

TEST_CASE("InRank rejects bad options with messages naming the option", "[policy][inrank][errors]") {
    using Catch::Contains;
    CHECK_THROWS_WITH(InRank<double>({.initial_rank = 0}),
                      Contains("InRank") && Contains("initial_rank must be >= 1, got 0"));
    CHECK_THROWS_WITH(InRank<double>({.buffer = 1}), Contains("buffer must be >= 2") && Contains("got 1"));
    CHECK_THROWS_WITH(InRank<double>({.buffer = -4}), Contains("got -4"));
    CHECK_THROWS_WITH(InRank<double>({.threshold = 1.0}), Contains("threshold must be in (0, 1), got 1"));
    CHECK_THROWS_WITH(InRank<double>({.threshold = 0.0}), Contains("threshold must be in (0, 1), got 0"));
    CHECK_THROWS_WITH(InRank<double>({.warmup = -1}), Contains("warmup must be >= 0"));
    CHECK_THROWS_WITH(InRank<double>({.gap = 0}), Contains("gap must be >= 1 (forward calls), got 0"));
    CHECK_THROWS_WITH(InRank<double>({.gap = 0, .cadence = InRankCadence::optimizer_steps}),
                      Contains("gap must be >= 1 (optimizer steps), got 0"));
    CHECK_THROWS_WITH(InRank<double>({.forward_calls_per_step = 0}),
                      Contains("forward_calls_per_step must be >= 1, got 0"));
    CHECK_THROWS_WITH(InRank<double>({.buffer = 4, .grow = false}),
                      Contains("grow = false") && Contains("expected buffer 0, got 4"));
    CHECK_THROWS_WITH(InRank<double>({.capacity = -2}), Contains("capacity must be >= 0"));
    CHECK_THROWS_WITH(InRank<double>({.init_scale = 0.0}), Contains("init_scale must be > 0, got 0"));
    CHECK_THROWS_WITH(InRank<double>({.keep_base = true, .init = InRankInit::dense_svd}),
                      Contains("init = dense_svd needs keep_base = false"));
    CHECK_THROWS_WITH(InRank<double>({.stage1_steps = -3}), Contains("stage1_steps must be >= 0, got -3"));
    CHECK_THROWS_WITH(InRank<double>({.stage1_epochs = 0}), Contains("two_stage needs a stage-1 length"));
    CHECK_NOTHROW(InRank<double>({.two_stage = false, .stage1_epochs = 0}));

    // Per layer: an 8-wide layer has capacity 4, too small for rank 2 + buffer 2 + 1.
    Fixture f({8, 8, 3});
    auto& ctx = f.ctx();
    InRank<double> policy;
    CHECK_THROWS_WITH(policy.on_train_begin(ctx),
                      Contains("InRank") && Contains("layer 'layers.0'") &&
                          Contains("initial_rank 2 + buffer 2 + 1 = 5 > capacity 4"));
    CHECK(std::string(f.model.layers()[0].kind()) == "dense");  // nothing converted
    CHECK(f.log().empty());
    InRank<double> too_big({.capacity = 9});
    CHECK_THROWS_WITH(too_big.on_train_begin(ctx),
                      Contains("capacity must be in [1, min(out, in) = 8], got 9"));
    InRank<double> nothing({.select = {.pattern = "encoder.*"}});
    CHECK_THROWS_WITH(nothing.on_train_begin(ctx), Contains("inrank") && Contains("matches no layer"));
}

TEST_CASE("InRank's forward-call cadence reproduces the authors' check steps", "[policy][inrank]") {
    // The authors' layer: its counter grows on every forward call, and the check runs in
    // the call when counter > warmup and counter % gap == 0. With F micro-batches per
    // optimizer step, call c belongs to step ceil(c / F) and sees the weights after
    // floor((c - 1) / F) optimizer steps. Their GPT-2 stage 1: F = 8, 130 steps, 200 / 25.
    const auto authors = [](std::int64_t calls_per_step, std::int64_t steps, std::int64_t warmup,
                            std::int64_t gap) {
        std::vector<std::int64_t> seen;  // optimizer steps taken when each check runs
        for (std::int64_t iter = 1; iter <= steps * calls_per_step; ++iter)
            if (iter > warmup && iter % gap == 0) seen.push_back((iter - 1) / calls_per_step);
        return seen;
    };
    const auto ours = [](std::int64_t calls_per_step, std::int64_t steps, std::int64_t warmup,
                         std::int64_t gap) {
        std::vector<std::int64_t> seen;
        for (std::int64_t step = 0; step < steps; ++step)
            for (std::int64_t k = inrank_checks_in_step(step, warmup, gap, calls_per_step); k > 0; --k)
                seen.push_back(step);
        return seen;
    };
    const auto gpt2 = authors(8, 130, 200, 25);
    REQUIRE(gpt2.size() == 33);  // calls 225, 250, ..., 1025
    CHECK(gpt2.front() == 28);
    CHECK(gpt2[1] == 31);
    CHECK(gpt2.back() == 128);
    CHECK(ours(8, 130, 200, 25) == gpt2);
    // Without accumulation a forward call is a step: the first check sees 224 steps.
    CHECK(ours(1, 500, 200, 25) == authors(1, 500, 200, 25));
    CHECK(ours(1, 500, 200, 25).front() == 224);
    // gap < F: several checks in one step; warmup not a multiple of gap.
    CHECK(ours(8, 40, 13, 3) == authors(8, 40, 13, 3));
    CHECK(ours(3, 40, 0, 1) == authors(3, 40, 0, 1));

    // The steps a stage 1 needs for its k-th check.
    InRankOptions o{.forward_calls_per_step = 8};
    CHECK(inrank_steps_for_checks(o, 1) == 29);
    CHECK(inrank_steps_for_checks(o, 33) == 129);
    CHECK(inrank_steps_for_checks(o, 34) == 132);  // call 1050: past the authors' 130 steps
    CHECK(inrank_steps_for_checks(InRankOptions{}, 1) == 225);
    CHECK(inrank_steps_for_checks(InRankOptions{.cadence = InRankCadence::optimizer_steps}, 4) == 300);

    // Through a training run: the "check" events come at the authors' steps.
    Fixture f({16, 24, 3});
    auto& policy =
        f.run->add<InRank<double>>({.buffer = 3, .forward_calls_per_step = 8, .stage1_steps = 130});
    const MatrixD x = gaussian(8, 16, 71);
    const std::vector<std::int32_t> y{0, 1, 2, 0, 1, 2, 0, 1};
    for (int step = 0; step < 131; ++step)
        f.run->step([&](Graph<double>& g) { return cross_entropy(g, f.model.forward(g, g.input(x)), y); });
    std::vector<std::int64_t> steps;
    for (const auto& e : f.events("check")) steps.push_back(e.step);
    CHECK(steps == gpt2);
    CHECK(policy.checks() == 33);
    CHECK(policy.stage() == 2);
}

TEST_CASE("InRank records every check with its explained ratio, grown or not", "[policy][inrank]") {
    Fixture f({24, 24, 24, 3});
    auto& policy = f.run->add<InRank<double>>(
        {.buffer = 3, .threshold = 0.95, .warmup = 2, .gap = 3, .two_stage = false});
    const MatrixD x = gaussian(8, 24, 72);
    const std::vector<std::int32_t> y{0, 1, 2, 0, 1, 2, 0, 1};
    for (int step = 0; step < 30; ++step)
        f.run->step([&](Graph<double>& g) { return cross_entropy(g, f.model.forward(g, g.input(x)), y); });
    REQUIRE(policy.checks() == 10);  // calls 3, 6, ..., 30
    const auto checks = f.events("check");
    REQUIRE(checks.size() == 2 * 10);  // one per layer per check
    std::size_t unchanged = 0;
    for (std::size_t i = 0; i < checks.size(); ++i) {
        const auto& e = checks[i];
        CHECK(e.layer == (i % 2 == 0 ? "layers.0" : "layers.1"));
        CHECK(e.step == static_cast<std::int64_t>(3 * (i / 2) + 2));
        CHECK(e.statistic == "explained_ratio");
        CHECK(std::isfinite(e.value));
        CHECK(e.new_rank >= e.old_rank);
        unchanged += e.new_rank == e.old_rank;
    }
    // A grow event accompanies exactly the checks that raised the rank.
    CHECK(f.events("grow").size() == checks.size() - unchanged);
    CHECK(unchanged > 0);
    // The last check's ratio is the one the policy holds.
    CHECK(checks[18].value == policy.layers()[0].explained_ratio);
    CHECK(checks[19].value == policy.layers()[1].explained_ratio);
}

TEST_CASE("InRank with grow = false is the fixed-rank control: no buffer, no check, no growth",
          "[policy][inrank]") {
    Fixture f({24, 24, 3});
    auto& policy = f.run->add<InRank<double>>({.initial_rank = 5, .warmup = 0, .gap = 1, .grow = false});
    f.run->begin();
    auto& l = f.layer(0);
    CHECK(l.capacity() == 12);  // the growing run's factors, drawn alike
    CHECK(l.rank() == 5);       // initial_rank active columns, no buffer
    CHECK(policy.layers()[0].buffer == 0);
    make_flat(l);  // a spectrum that would grow at every check
    const MatrixD x = gaussian(8, 24, 73);
    const std::vector<std::int32_t> y{0, 1, 2, 0, 1, 2, 0, 1};
    for (int step = 0; step < 20; ++step)
        f.run->step([&](Graph<double>& g) { return cross_entropy(g, f.model.forward(g, g.input(x)), y); });
    CHECK(policy.checks() == 0);
    CHECK(policy.ranks() == std::vector<Index>{5});
    CHECK(l.rank() == 5);
    CHECK(policy.stage() == 1);  // nothing to cut
    CHECK(f.events("check").empty());
    CHECK(f.events("grow").empty());
    CHECK(f.events("truncate").empty());
    // The same factors as a growing run with the same seed: only the growth differs.
    Fixture g({24, 24, 3});
    InRank<double> growing({.initial_rank = 5, .buffer = 3});
    growing.on_train_begin(g.ctx());
    Fixture h({24, 24, 3});
    InRank<double> control({.initial_rank = 5, .grow = false});
    control.on_train_begin(h.ctx());
    CHECK(g.layer(0).U.value == h.layer(0).U.value);
    CHECK(g.layer(0).V.value == h.layer(0).V.value);
    // The initial rank may use the whole capacity.
    Fixture k({24, 24, 3});
    CHECK_NOTHROW(InRank<double>({.initial_rank = 12, .grow = false}).on_train_begin(k.ctx()));
    Fixture m({24, 24, 3});
    CHECK_THROWS_WITH(InRank<double>({.initial_rank = 13, .grow = false}).on_train_begin(m.ctx()),
                      Catch::Contains("grow = false") && Catch::Contains("initial_rank 13 > capacity 12"));
}

TEST_CASE("InRank refuses a stage 1 that ends before its first rank check", "[policy][inrank][errors]") {
    using Catch::Contains;
    const auto run_with = [](std::int64_t steps_per_epoch, InRankOptions o) {
        auto f = std::make_unique<Fixture>(std::vector<Index>{24, 24, 3});
        f->run = std::make_unique<TrainingRun<double>>(f->model, *f->opt,
                                                       RunOptions{.steps_per_epoch = steps_per_epoch});
        f->run->add<InRank<double>>(std::move(o));
        return f;
    };
    SECTION("lowrank-mlp --method inrank --batch 512: 118 steps an epoch, first check in step 225") {
        auto f = run_with(118, {.buffer = 3});
        CHECK_THROWS_WITH(f->run->begin(), Contains("InRank: stage 1 ends after 118 optimizer steps") &&
                                               Contains("stage1_epochs = 1 of 118 steps") &&
                                               Contains("at forward call 225, in optimizer step 225") &&
                                               Contains("warmup = 200, gap = 25 forward calls") &&
                                               Contains("forward_calls_per_step = 1") &&
                                               Contains("cut to initial_rank = 2"));
        CHECK(std::string(f->model.layers()[0].kind()) == "dense");  // nothing converted
        // Two epochs hold the first check.
        CHECK_NOTHROW(run_with(118, {.buffer = 3, .stage1_epochs = 2})->run->begin());
        // So does the authors' cadence of 8 micro-batches per step.
        CHECK_NOTHROW(run_with(118, {.buffer = 3, .forward_calls_per_step = 8})->run->begin());
    }
    SECTION("in optimizer steps, and with stage1_steps") {
        auto f = run_with(0, {.buffer = 3, .cadence = InRankCadence::optimizer_steps, .stage1_steps = 224});
        CHECK_THROWS_WITH(f->run->begin(),
                          Contains("stage 1 ends after 224 optimizer steps (stage1_steps = 224)") &&
                              Contains("after optimizer step 225"));
        CHECK_NOTHROW(
            run_with(0, {.buffer = 3, .cadence = InRankCadence::optimizer_steps, .stage1_steps = 225})
                ->run->begin());
        // In forward calls the check before call 225 is in step 225: stage 1 needs all 225.
        CHECK_THROWS(run_with(0, {.buffer = 3, .stage1_steps = 224})->run->begin());
        CHECK_NOTHROW(run_with(0, {.buffer = 3, .stage1_steps = 225})->run->begin());
    }
    SECTION("stage1_epochs without steps_per_epoch: refused at the cut") {
        Fixture f({24, 24, 3});
        InRank<double> policy({.buffer = 3});
        policy.on_train_begin(f.ctx());
        Access::set_counters(f.ctx(), 100, 0);
        CHECK_THROWS_WITH(policy.on_epoch_end(f.ctx()), Contains("stage 1 ended after optimizer step 100") &&
                                                            Contains("stage1_epochs = 1") &&
                                                            Contains("before its first rank check"));
        CHECK(policy.stage() == 1);
    }
    SECTION("the fixed-rank control has no stage 1 to check") {
        CHECK_NOTHROW(run_with(118, {.grow = false})->run->begin());
    }
}

TEST_CASE("InRank says at on_train_begin when its schedule cannot act within the run",
          "[policy][inrank][errors]") {
    using Catch::Contains;
    const auto run_with = [](std::int64_t total_steps, InRankOptions o) {
        auto f = std::make_unique<Fixture>(std::vector<Index>{24, 24, 3});
        f->run =
            std::make_unique<TrainingRun<double>>(f->model, *f->opt, RunOptions{.total_steps = total_steps});
        f->run->add<InRank<double>>(std::move(o));
        return f;
    };
    // No check at all: refused.
    auto f = run_with(100, {.buffer = 3, .two_stage = false});
    CHECK_THROWS_WITH(f->run->begin(),
                      Contains("InRank: the run ends after 100 optimizer steps (total_steps)") &&
                          Contains("at forward call 225") && Contains("no rank would ever grow"));
    CHECK_NOTHROW(run_with(225, {.buffer = 3, .two_stage = false})->run->begin());
    CHECK_NOTHROW(run_with(100, {.grow = false})->run->begin());
    // Checks, but a cut after the run's end: a "schedule" event (the run ends in stage 1).
    auto g = run_with(300, {.buffer = 3, .stage1_steps = 400});
    g->run->begin();
    const auto events = g->events("schedule");
    REQUIRE(events.size() == 1);
    CHECK(events[0].policy == "inrank");
    CHECK(events[0].layer.empty());
    CHECK(events[0].statistic == "stage1_end_step");
    CHECK(events[0].value == 400.0);
    auto h = run_with(400, {.buffer = 3, .stage1_steps = 400});
    h->run->begin();
    CHECK(h->events("schedule").empty());
}

TEST_CASE("InRank's efficient form records that it discards the layer's weight", "[policy][inrank]") {
    SECTION("random factors: the whole weight") {
        Fixture f({20, 32, 32, 4});
        const MatrixD w = f.ctx().layers()[1].layer->dense_weight();
        InRank<double>({.buffer = 3}).on_train_begin(f.ctx());
        const auto discards = f.events("discard");
        REQUIRE(discards.size() == 2);
        CHECK(discards[1].layer == "layers.1");
        CHECK(discards[1].policy == "inrank");
        CHECK(discards[1].statistic == "discarded_energy");
        CHECK(discards[1].value == Approx(w.squaredNorm()));
    }
    SECTION("dense SVD: what the rank-k start does not hold") {
        Fixture f({20, 32, 32, 4});
        const MatrixD w = f.ctx().layers()[1].layer->dense_weight();
        InRank<double>({.buffer = 3, .init = InRankInit::dense_svd}).on_train_begin(f.ctx());
        const auto s = linalg::singular_values<double>(w);
        CHECK(f.events("discard")[1].value == Approx(s.tail(32 - 5).squaredNorm()));
    }
    SECTION("with a base nothing is discarded") {
        Fixture f({20, 32, 32, 4});
        InRank<double>({.buffer = 3, .keep_base = true}).on_train_begin(f.ctx());
        CHECK(f.events("discard").empty());
    }
}

}  // namespace test_inrank
