// DeepLora: the compressed factorisation follows the wide one (fully observed target,
// frozen outer bases), compression keeps the function, the outer bases are orthonormal,
// the optimizer groups (inner at lr, outer at gamma * lr, the factors' own lr scale and
// weight decay), the authors' defaults, their depth-2 LoRA init, the narrow random
// ablation, the "discard" record without a base, and option errors.
#include <catch2/catch.hpp>

#include <lowrank/autograd/ops_loss.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/nn/module.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/optim/sgd.hpp>
#include <lowrank/policy/deep_lora.hpp>
#include <lowrank/train/run.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_deep_lora {

using namespace lowrank;

namespace {

MatrixD orthonormal(Index rows, Index cols, std::uint64_t seed) {
    Rng rng(seed);
    MatrixD m(rows, cols);
    init::orthogonal<double>(m, rng);
    return m;
}

// A rank-2 target U diag(3, 2) V^T.
MatrixD rank_two_target(Index out, Index in, std::uint64_t seed) {
    const MatrixD u = orthonormal(out, 2, seed), v = orthonormal(in, 2, seed + 1);
    return u * Eigen::Vector2d(3.0, 2.0).asDiagonal() * v.transpose();
}

// The fully observed deep factorisation: one layer W (out x in) in a Module, trained by
// gradient descent on 1/2 ||W - Phi||_F^2 (the layer applied to the identity gives W^T),
// through a TrainingRun (constant schedule, no clipping).
struct Factorization {
    Rng rng{3};
    Module<double> model;
    AnyLinear<double>& slot;
    MatrixD eye, target_t;
    Sgd<double> opt;
    TrainingRun<double> run;
    DeepLora<double>& policy;

    Factorization(const MatrixD& phi, DeepLoraOptions options, double lr)
        : slot(model.register_linear(
              Linear<double>("W", phi.cols(), phi.rows(), rng, LinearOptions{.bias = false}), "hidden")),
          eye(MatrixD::Identity(phi.cols(), phi.cols())),
          target_t(phi.transpose()),
          opt(model.parameters(), SgdOptions{.lr = lr}),
          run(model, opt),
          policy(run.add<DeepLora<double>>(std::move(options))) {
        run.begin();
    }

    void step() {
        run.step([&](Graph<double>& g) {
            const auto y = slot.forward(g, g.input(eye));
            return scale(g, mse(g, y, target_t), 0.5 * static_cast<double>(target_t.size()));
        });
    }

    MatrixD weight() const { return slot.dense_weight(); }
    DeepLowRankLinear<double>& layer() { return slot.get<DeepLowRankLinear<double>>(); }
};

// W_L ... W_1 (or Q W~_L ... W~_1 P^T) without the base.
MatrixD chain(const DeepLowRankLinear<double>& l) {
    MatrixD w = l.factors().front().value;
    for (std::size_t k = 1; k < l.factors().size(); ++k) w = l.factors()[k].value * w;
    return w;
}

double orthonormality_error(const MatrixD& a) {
    return (a.transpose() * a - MatrixD::Identity(a.cols(), a.cols())).norm();
}

// An MLP 6-8-8-3 with AdamW: weights at lr in group 0, biases in "no_decay" (group 1), and
// the TrainingRun that steps it (constant schedule, no clipping).
struct MlpFixture {
    Rng rng{5};
    Mlp<double> model{MlpOptions{.sizes = {6, 8, 8, 3}}, rng};
    std::unique_ptr<AdamW<double>> opt;
    std::unique_ptr<TrainingRun<double>> run;
    MatrixD x;
    std::vector<std::int32_t> y{0, 1, 2, 0, 1};

    static constexpr double lr = 1e-2;

    MlpFixture() : x(5, 6) {
        ParameterList<double> weights, biases;
        for (auto* p : model.parameters()) (p->name().ends_with(".bias") ? biases : weights).push_back(p);
        opt = std::make_unique<AdamW<double>>(weights, AdamOptions{.lr = lr, .weight_decay = 0.1});
        opt->add_group(biases, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
        init::normal<double>(x, rng);
        run = std::make_unique<TrainingRun<double>>(model, *opt);
    }
    TrainingContext<double>& ctx() { return run->context(); }
    const RankLog& log() const { return run->rank_log(); }

    // The policy under test, in the run; its on_train_begin has run.
    DeepLora<double>& start(DeepLoraOptions options) {
        auto& policy = run->add<DeepLora<double>>(std::move(options));
        run->begin();
        return policy;
    }
    void step() {
        run->step([&](Graph<double>& g) { return cross_entropy(g, model.forward(g, g.input(x)), y); });
    }
};

}  // namespace

TEST_CASE("DeepLora compressed trajectory matches the wide one on a fully observed factorization",
          "[policy][deeplora]") {
    const Index d = 8;
    const MatrixD phi = rank_two_target(d, d, 11);
    const double eps = 0.05, lr = 0.05;
    const DeepLoraOptions base{.width = d,
                               .epsilon = eps,
                               .rank = 2,
                               .gamma = 0.0,
                               .keep_base = false,
                               .compress = true,
                               .seed = 7};
    DeepLoraOptions wide_options = base, comp_options = base;
    wide_options.compress = false;
    Factorization wide(phi, wide_options, lr), comp(phi, comp_options, lr);
    REQUIRE((wide.weight() - comp.weight()).norm() == 0.0);  // the same seed: the same wide init

    // The compressed run spends its first step measuring the gradient: its step k + 1 is
    // the wide run's step k. What separates them is the part of the initial product outside
    // span(P), of size eps^L, which neither run ever moves.
    comp.step();
    REQUIRE(comp.policy.compressed());
    CHECK(comp.layer().rank() == 4);
    const MatrixD offset = wide.weight() - comp.weight();
    CHECK(offset.norm() <= std::pow(eps, 3) * std::sqrt(static_cast<double>(d - 4)) * (1 + 1e-9));

    double worst = 0.0, largest_move = 0.0;
    for (int k = 0; k < 400; ++k) {
        const MatrixD before = wide.weight();
        wide.step();
        comp.step();
        largest_move = std::max(largest_move, (wide.weight() - before).norm());
        worst = std::max(worst, (wide.weight() - comp.weight() - offset).norm());
    }
    INFO("largest move of one step " << largest_move << ", worst mismatch " << worst);
    CHECK(worst < 1e-6);         // 9e-8 measured: second order in eps^L
    CHECK(largest_move > 1e-2);  // a one-step lag would show up 1e4 times above the tolerance
    // Both went all the way, down to the floor set by the frozen eps^L part (7e-5 here).
    CHECK((wide.weight() - phi).norm() / phi.norm() < 1e-3);
    CHECK((comp.weight() - phi).norm() / phi.norm() < 1e-3);
    // The narrow chain trained 2r x 2r factors only; the bases never moved.
    CHECK(comp.layer().factors().front().rows() == 4);
    CHECK_FALSE(comp.layer().factors().front().trainable);
}

TEST_CASE("DeepLora builds the basis on the larger side, so a tall layer still fits with frozen bases",
          "[policy][deeplora]") {
    // out > in: the basis comes from dL/dW_L. Built from dL/dW_1 instead, Q would lie in the
    // 6-dimensional range of the initial product and miss the target's column space.
    const MatrixD phi = rank_two_target(10, 6, 21);
    Factorization comp(
        phi, DeepLoraOptions{.epsilon = 0.05, .rank = 2, .gamma = 0.0, .keep_base = false, .compress = true},
        0.05);
    for (int k = 0; k < 300; ++k) comp.step();
    REQUIRE(comp.policy.layers().size() == 1);
    CHECK(comp.policy.layers()[0].output_side);
    CHECK(orthonormality_error(comp.layer().factors().back().value) < 1e-10);  // Q (10 x 4)
    CHECK((comp.weight() - phi).norm() / phi.norm() <
          1e-2);  // 6e-4 measured; from dL/dW_1 such fits stall at 0.3-0.5
}

TEST_CASE("DeepLora compression keeps the function and makes orthonormal outer bases", "[policy][deeplora]") {
    MlpFixture f;
    const MatrixD w0 = f.model.layers()[1].dense_weight();
    auto& policy = f.start({.rank = 2, .compress = true, .seed = 9});
    REQUIRE(policy.layers().size() == 2);  // the hidden layers 6 -> 8 and 8 -> 8
    CHECK(std::string(f.model.layers()[0].kind()) == "deep");
    CHECK(std::string(f.model.layers()[2].kind()) == "dense");  // the output layer is not selected
    CHECK(policy.ranks() == std::vector<Index>{6, 8});
    auto& square = f.model.layers()[1].get<DeepLowRankLinear<double>>();
    REQUIRE(square.has_base());
    CHECK_FALSE(square.base.trainable);
    CHECK((square.base.value - w0).norm() == 0.0);      // W0 is the layer's weight
    CHECK((square.dense_weight() - w0).norm() < 1e-8);  // plus an eps^3-sized product

    // The wide products just before the compression.
    std::vector<MatrixD> wide;
    for (std::size_t i = 0; i < 2; ++i)
        wide.push_back(chain(f.model.layers()[i].get<DeepLowRankLinear<double>>()));

    f.step();
    REQUIRE(policy.compressed());
    CHECK(policy.ranks() == std::vector<Index>{4, 4});
    for (std::size_t i = 0; i < 2; ++i) {
        INFO("layer " << i);
        auto& l = f.model.layers()[i].get<DeepLowRankLinear<double>>();
        REQUIRE(l.factors().size() == 5);
        const MatrixD p = l.factors().front().value.transpose();  // (in x 2r)
        const MatrixD q = l.factors().back().value;               // (out x 2r)
        CHECK(p.rows() == l.in_features());
        CHECK(q.rows() == l.out_features());
        for (std::size_t k = 1; k < 4; ++k)
            CHECK((l.factors()[k].value - 0.001 * MatrixD::Identity(4, 4)).norm() == 0.0);
        // The update is the wide one restricted to the span of the basis built from the
        // gradient: span(P) on the input side, span(Q) on the output side.
        const MatrixD c = chain(l);
        if (policy.layers()[i].output_side) {
            CHECK(orthonormality_error(q) < 1e-10);
            CHECK((c - q * q.transpose() * wide[i]).norm() < 1e-10 * wide[i].norm());
        } else {
            CHECK(orthonormality_error(p) < 1e-10);
            CHECK((c - wide[i] * p * p.transpose()).norm() < 1e-10 * wide[i].norm());
        }
        // Unchanged but for the eps^L-sized part outside that span: eps^3 sqrt(8 - 2r).
        CHECK((c - wide[i]).norm() <= 1e-9 * 2.0 * (1 + 1e-6));
        CHECK((l.dense_weight() - l.base.value - wide[i]).norm() <= 2.1e-9);
    }
    CHECK(policy.layers()[0].output_side);        // 6 -> 8: tall
    CHECK_FALSE(policy.layers()[1].output_side);  // 8 -> 8: square, input side
    // Square: both bases orthonormal.
    auto& sq = f.model.layers()[1].get<DeepLowRankLinear<double>>();
    CHECK(orthonormality_error(sq.factors().front().value.transpose()) < 1e-10);
    CHECK(orthonormality_error(sq.factors().back().value) < 1e-10);

    // The rank log: one init and one compress per layer.
    const auto events = f.log().of_layer("layers.1");
    REQUIRE(events.size() == 2);
    CHECK(events[0].event == "init");
    CHECK(events[0].new_rank == 8);
    CHECK(events[1].event == "compress");
    CHECK(events[1].policy == "deeplora");
    CHECK(events[1].step == 0);
    CHECK(events[1].old_rank == 8);
    CHECK(events[1].new_rank == 4);
    CHECK(events[1].statistic == "grad_energy_top_r");
    CHECK(events[1].value > 0.0);
    CHECK(events[1].value <= 1.0 + 1e-12);
    CHECK(f.log().of_layer("layers.2").empty());
}

TEST_CASE("DeepLora puts inner factors at lr and outer bases at gamma * lr", "[policy][deeplora]") {
    for (double gamma : {0.01, 0.0}) {
        INFO("gamma " << gamma);
        MlpFixture f;
        // eps = 0.1: with the default 1e-3 the factors' gradients (~eps^(L-1)) are near Adam's
        // own eps and its first update is not yet lr-sized.
        auto& policy = f.start({.epsilon = 0.1,
                                .rank = 2,
                                .gamma = gamma,
                                .compress = true,
                                .weight_decay = std::nullopt,  // the factors stay in group 0
                                .seed = 9});
        f.step();  // measures the gradient and compresses

        auto& l = f.model.layers()[1].get<DeepLowRankLinear<double>>();
        auto& opt = *f.opt;
        REQUIRE(opt.groups().size() == 3);
        REQUIRE(policy.outer_groups().size() == 1);
        REQUIRE(policy.outer_groups().at(0) == 2);
        CHECK(opt.group(2).options.lr == Approx(gamma * MlpFixture::lr));
        CHECK(opt.group(2).options.weight_decay == opt.group(0).options.weight_decay);
        for (std::size_t k = 1; k < 4; ++k) CHECK(opt.group_of(l.factors()[k]) == 0);
        CHECK(opt.group_of(l.factors().front()) == 2);
        CHECK(opt.group_of(l.factors().back()) == 2);
        CHECK(opt.group_of(l.bias) == 1);
        CHECK(l.factors().front().trainable == (gamma > 0));
        // Every model parameter is in exactly one group, and nothing else is.
        const auto model_params = f.model.parameters();
        const auto opt_params = opt.parameters();
        CHECK(std::set<Parameter<double>*>(model_params.begin(), model_params.end()) ==
              std::set<Parameter<double>*>(opt_params.begin(), opt_params.end()));
        CHECK(opt_params.size() == model_params.size());

        // The first step did not touch the new factors (they had no gradient).
        const MatrixD inner0 = l.factors()[1].value, p0 = l.factors().front().value;
        CHECK((inner0 - 0.1 * MatrixD::Identity(4, 4)).norm() == 0.0);
        // Adam's first update moves every entry by about its lr (|m / sqrt(v)| = 1).
        f.step();
        const double inner_move = (l.factors()[1].value - inner0).cwiseAbs().maxCoeff();
        const double outer_move = (l.factors().front().value - p0).cwiseAbs().maxCoeff();
        CHECK(inner_move == Approx(MlpFixture::lr).epsilon(0.05));
        if (gamma > 0)  // (decoupled weight decay adds up to lr * 0.1 * |p| <= 10%)
            CHECK(outer_move == Approx(gamma * MlpFixture::lr).epsilon(0.15));
        else
            CHECK(outer_move == 0.0);
    }
}

TEST_CASE("DeepLora without compression keeps training the wide factors", "[policy][deeplora]") {
    MlpFixture f;
    auto& policy = f.start({.width = 5, .compress = false});
    auto& l = f.model.layers()[1].get<DeepLowRankLinear<double>>();
    const MatrixD w1 = l.factors().front().value;
    for (int k = 0; k < 2; ++k) f.step();
    CHECK_FALSE(policy.compressed());
    CHECK(l.factors().size() == 3);
    CHECK(l.factors().front().rows() == 5);
    CHECK((l.factors().front().value - w1).norm() > 0.0);
    CHECK(policy.ranks() == std::vector<Index>{5, 5});
    CHECK(f.log().size() == 2);  // the two init events
}

TEST_CASE("DeepLora without a base starts from the eps-sized product alone and records the discard",
          "[policy][deeplora]") {
    MlpFixture f;
    const MatrixD w = f.model.layers()[1].dense_weight();
    f.start({.rank = 2, .keep_base = false});
    const auto& l = f.model.layers()[1].get<DeepLowRankLinear<double>>();
    CHECK_FALSE(l.has_base());
    CHECK(l.dense_weight().norm() == Approx(1e-9 * std::sqrt(8.0)).epsilon(1e-9));  // eps^3 times orthogonal
    const auto events = f.log().of_layer("layers.1");
    REQUIRE(events.size() == 2);
    CHECK(events[1].event == "discard");
    CHECK(events[1].policy == "deeplora");
    CHECK(events[1].statistic == "discarded_energy");
    CHECK(events[1].value == Approx(w.squaredNorm()));
    // With a base nothing is discarded.
    MlpFixture g;
    g.start({});
    for (const auto& e : g.log().events()) CHECK(e.event != "discard");
}

TEST_CASE("DeepLora's defaults are the authors' released configuration", "[policy][deeplora]") {
    // deep-lora-transformers, dlt/configs.py: lora_depth 3, lora_init_scale 1e-3, lora_rank
    // None (width max(m, n)), lora_compress False, lora_gamma 0, weight_decay 0.0.
    const DeepLoraOptions o;
    CHECK(o.depth == 3);
    CHECK(o.epsilon == 1e-3);
    CHECK(o.width == 0);
    CHECK_FALSE(o.compress);
    CHECK(o.gamma == 0.0);
    CHECK(o.weight_decay == 0.0);
    CHECK(o.lr_scale == 1.0);
    CHECK(o.rank == 4);  // their compressed run (scripts/stsb_narrow.py): lora_rank 8 = 2r
    CHECK(o.init == DeepLoraInit::orthogonal);

    MlpFixture f;
    auto& policy = f.start({});
    REQUIRE(policy.layers().size() == 2);
    CHECK(policy.layers()[0].width == 8);  // 6 -> 8: max(out, in), not min
    CHECK(policy.layers()[1].width == 8);
    // The factors train at lr without weight decay, in a group of their own; the biases keep theirs.
    auto& opt = *f.opt;
    auto& l = f.model.layers()[0].get<DeepLowRankLinear<double>>();
    REQUIRE(opt.groups().size() == 3);
    CHECK(opt.group(2).options.name == "deeplora");
    CHECK(opt.group(2).options.lr == MlpFixture::lr);
    CHECK(opt.group(2).options.weight_decay == 0.0);
    for (const auto& factor : l.factors()) CHECK(opt.group_of(factor) == 2);
    CHECK(opt.group_of(l.bias) == 1);
    // The wide factors train on, uncompressed.
    const MatrixD w1 = l.factors().front().value;
    for (int k = 0; k < 3; ++k) f.step();
    CHECK_FALSE(policy.compressed());
    CHECK(policy.ranks() == std::vector<Index>{6, 8});
    CHECK((l.factors().front().value - w1).norm() > 0.0);
}

TEST_CASE("DeepLora's lr_scale and weight_decay give the factors and the outer bases their lr",
          "[policy][deeplora]") {
    MlpFixture f;
    auto& policy = f.start({.rank = 2, .gamma = 0.5, .compress = true, .lr_scale = 10.0, .weight_decay = 0.02});
    auto& opt = *f.opt;
    REQUIRE(opt.groups().size() == 3);
    CHECK(opt.group(2).options.lr == Approx(10.0 * MlpFixture::lr));
    CHECK(opt.group(2).options.weight_decay == 0.02);
    f.step();  // compresses: the inner factors stay in group 2, P and Q go to group 3
    REQUIRE(policy.outer_groups().size() == 1);
    REQUIRE(policy.outer_groups().at(2) == 3);
    CHECK(opt.group(3).options.lr == Approx(0.5 * 10.0 * MlpFixture::lr));
    CHECK(opt.group(3).options.weight_decay == 0.02);
    auto& l = f.model.layers()[1].get<DeepLowRankLinear<double>>();
    CHECK(opt.group_of(l.factors()[1]) == 2);
    CHECK(opt.group_of(l.factors().front()) == 3);
    // Decay and lr equal to the weight's group's: no group of their own.
    MlpFixture g;
    g.start({.weight_decay = 0.1});
    CHECK(g.opt->groups().size() == 2);
    MlpFixture h;
    h.start({.weight_decay = std::nullopt});
    CHECK(h.opt->groups().size() == 2);
}

TEST_CASE("DeepLora's depth-2 LoRA init: N(0, 1) output-side factor, zero input-side factor",
          "[policy][deeplora]") {
    MlpFixture f;
    const MatrixD w0 = f.model.layers()[1].dense_weight();
    auto& policy = f.start({.depth = 2, .width = 4, .init = DeepLoraInit::lora, .seed = 3});
    auto& l = f.model.layers()[1].get<DeepLowRankLinear<double>>();
    REQUIRE(l.factors().size() == 2);
    const MatrixD a = l.factors().front().value, b = l.factors().back().value;
    CHECK(a.rows() == 4);
    CHECK(a.isZero(0.0));
    CHECK(b.rows() == 8);
    CHECK(b.cols() == 4);
    const double mean = b.mean(), var = (b.array() - mean).square().mean();
    CHECK(std::abs(mean) < 0.5);  // 32 draws of N(0, 1)
    CHECK(var > 0.4);
    CHECK(var < 2.5);
    CHECK(l.dense_weight() == w0);  // the update starts at exactly zero, no alpha / r scale
    // The first step moves the zero factor only: the other one's gradient is zero.
    f.step();
    CHECK_FALSE(l.factors().front().value.isZero(0.0));
    CHECK(l.factors().back().value == b);
    CHECK(policy.ranks() == std::vector<Index>{4, 4});
}

TEST_CASE("DeepLora's narrow random ablation: width 2r, uncompressed, every factor trained",
          "[policy][deeplora]") {
    // The authors' scripts/stsb_narrow.py compares the compressed run with one of width
    // lora_rank = 2r from a random orthogonal init and no compression.
    MlpFixture f;
    auto& policy = f.start({.width = 4, .rank = 2});
    f.step();
    CHECK_FALSE(policy.compressed());
    CHECK(policy.ranks() == std::vector<Index>{4, 4});
    for (const auto& factor : f.model.layers()[1].get<DeepLowRankLinear<double>>().factors()) {
        CHECK(factor.trainable);
        CHECK(factor.rows() <= 8);
    }
}

TEST_CASE("DeepLora rejects bad options", "[policy][deeplora][errors]") {
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.depth = 1}),
                      Catch::Contains("DeepLora") && Catch::Contains("depth") && Catch::Contains("got 1"));
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.width = -1}), Catch::Contains("width"));
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.epsilon = 0.0}), Catch::Contains("epsilon"));
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.epsilon = std::nan("")}), Catch::Contains("epsilon"));
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.rank = 0}), Catch::Contains("rank"));
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.gamma = -0.1}),
                      Catch::Contains("gamma") && Catch::Contains("-0.1"));
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.gamma = std::numeric_limits<double>::infinity()}),
                      Catch::Contains("gamma"));
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.lr_scale = 0.0}),
                      Catch::Contains("lr_scale") && Catch::Contains("got 0"));
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.weight_decay = -1.0}),
                      Catch::Contains("weight_decay") && Catch::Contains("got -1"));
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.init = DeepLoraInit::lora}),
                      Catch::Contains("init = lora") && Catch::Contains("needs depth 2, got depth 3"));
    CHECK_THROWS_WITH(DeepLora<double>(DeepLoraOptions{.depth = 2, .compress = true, .init = DeepLoraInit::lora}),
                      Catch::Contains("init = lora cannot be compressed"));

    MlpFixture f;
    auto& ctx = f.ctx();
    // 2r = 8 > min(out, in) = 6 for layers.0: nothing is converted.
    DeepLora<double> too_wide(DeepLoraOptions{.rank = 4, .compress = true});
    CHECK_THROWS_WITH(too_wide.on_train_begin(ctx),
                      Catch::Contains("rank") && Catch::Contains("layers.0") && Catch::Contains("got r = 4"));
    CHECK(std::string(f.model.layers()[1].kind()) == "dense");
    DeepLora<double> narrow(DeepLoraOptions{.width = 3, .rank = 2, .compress = true});
    CHECK_THROWS_WITH(narrow.on_train_begin(ctx), Catch::Contains("width 3"));
    DeepLora<double> no_group(DeepLoraOptions{.factor_group = 7});
    CHECK_THROWS_WITH(no_group.on_train_begin(ctx),
                      Catch::Contains("factor_group") && Catch::Contains("got 7"));
    DeepLora<double> nothing(DeepLoraOptions{.select = {.pattern = "attn.*"}});
    CHECK_THROWS_WITH(nothing.on_train_begin(ctx),
                      Catch::Contains("deeplora") && Catch::Contains("matches no layer"));
    DeepLora<double> early(DeepLoraOptions{.compress = true});
    CHECK_THROWS_WITH(early.after_backward(ctx), Catch::Contains("before on_train_begin"));
}

}  // namespace test_deep_lora
