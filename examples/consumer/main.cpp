// The smallest real use of an installed lowrank: a 4-16-3 MLP learns three Gaussian
// blobs. Exits 0 only if training halved the loss, so the install is checked end to end
// (headers found, Eigen/zlib/OpenMP handed on by lowrankConfig.cmake, code links and runs).

#include <lowrank/lowrank.hpp>

#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
    constexpr int kClasses = 3;
    constexpr int kFeatures = 4;
    constexpr int kSamples = 96;
    constexpr int kSteps = 200;

    lowrank::Rng rng(2026);

    // Three well-separated centres; each sample is its centre plus N(0, 0.5^2) noise.
    lowrank::Matrix<float> centres(kClasses, kFeatures);
    for (int c = 0; c < kClasses; ++c)
        for (int j = 0; j < kFeatures; ++j) centres(c, j) = static_cast<float>(rng.normal(0.0, 2.0));

    lowrank::Matrix<float> X(kSamples, kFeatures);
    std::vector<std::int32_t> labels(kSamples);
    for (int i = 0; i < kSamples; ++i) {
        const auto c = static_cast<int>(rng.below(kClasses));
        labels[i] = c;
        for (int j = 0; j < kFeatures; ++j)
            X(i, j) = centres(c, j) + static_cast<float>(rng.normal(0.0, 0.5));
    }

    lowrank::Mlp<float> model(lowrank::MlpOptions{.sizes = {kFeatures, 16, kClasses}}, rng);
    lowrank::AdamW<float> opt(model.parameters(), lowrank::AdamOptions{.lr = 1e-2});
    lowrank::Graph<float> g;

    float initial = 0.0f;
    float final_loss = 0.0f;
    for (int step = 0; step < kSteps; ++step) {
        g.clear();
        auto x = g.input(X);
        auto logits = model.forward(g, x);
        auto loss = lowrank::cross_entropy(g, logits, labels);
        opt.zero_grad();
        g.backward(loss);
        opt.step();
        const float value = loss.value()(0, 0);
        if (step == 0) initial = value;
        final_loss = value;
    }

    std::printf("lowrank consumer: loss %.4f -> %.4f after %d steps\n", initial, final_loss, kSteps);
    if (!(final_loss < 0.5f * initial)) {
        std::fprintf(stderr, "lowrank consumer: FAILED, the loss did not halve\n");
        return 1;
    }
    return 0;
}
