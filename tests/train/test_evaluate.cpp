#include <lowrank/models/mlp.hpp>
#include <lowrank/train/evaluate.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_evaluate {

using lowrank::Index;

TEST_CASE("evaluate_classifier gives the mean cross-entropy and accuracy, whatever the batch size",
          "[train][evaluate]") {
    lowrank::Rng rng(5);
    lowrank::Mlp<double> model(lowrank::MlpOptions{.sizes = {3, 4}}, rng);  // one Linear layer
    lowrank::Matrix<double> x(7, 3);
    for (Index i = 0; i < x.rows(); ++i)
        for (Index j = 0; j < x.cols(); ++j) x(i, j) = rng.normal();
    const std::vector<std::int32_t> y{0, 1, 2, 3, 0, 1, 2};

    // Reference: logits = x W^T + b, row by row.
    const auto& w = model.layers()[0].get<lowrank::Linear<double>>().weight.value;
    const auto& b = model.layers()[0].get<lowrank::Linear<double>>().bias.value;
    double loss = 0.0;
    Index correct = 0;
    for (Index i = 0; i < x.rows(); ++i) {
        const lowrank::RowVector<double> z = x.row(i) * w.transpose() + b;
        const double lse = std::log(z.array().exp().sum());
        loss += lse - z(y[static_cast<std::size_t>(i)]);
        Index best = 0;
        z.maxCoeff(&best);
        correct += best == y[static_cast<std::size_t>(i)];
    }
    loss /= static_cast<double>(x.rows());

    for (Index batch : {1, 3, 7, 1000}) {
        INFO("batch " << batch);
        const lowrank::EvalResult r = lowrank::evaluate_classifier<double>(model, x, y, batch);
        CHECK(r.samples == 7);
        CHECK(r.correct == correct);
        CHECK(r.accuracy == Approx(static_cast<double>(correct) / 7.0));
        CHECK(r.loss == Approx(loss).epsilon(1e-12));
    }
}

TEST_CASE("ClassifierEvaluator leaves parameter gradients alone and checks label counts",
          "[train][evaluate]") {
    lowrank::Rng rng(1);
    lowrank::Mlp<float> model(lowrank::MlpOptions{.sizes = {2, 3, 2}, .dropout = 0.5}, rng);
    for (auto* p : model.parameters()) p->zero_grad();
    lowrank::Matrix<float> x = lowrank::Matrix<float>::Ones(4, 2);
    const std::vector<std::int32_t> y{0, 1, 0, 1};
    lowrank::ClassifierEvaluator<float> eval(3);
    const auto first = eval(model, x, y);
    const auto second = eval(model, x, y);
    CHECK(first.loss == second.loss);  // dropout is off in evaluation
    for (auto* p : model.parameters()) CHECK(p->grad.isZero(0));
    const std::vector<std::int32_t> short_labels{0, 1};
    CHECK_THROWS_WITH(eval(model, x, short_labels),
                      Catch::Matchers::Contains("expected 4 labels") && Catch::Matchers::Contains("got 2"));
}

}  // namespace test_evaluate
