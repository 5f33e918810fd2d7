// A user's own model trained with two rank policies on different layers, through the
// installed lowrank package (docs/own_model.md walks through this file).
//
// The data: 64-dimensional inputs whose classes a rank-4 teacher decides, so the first
// layer has a low-rank job to learn. InRank grows the first layer's rank from 2 while
// training; Cuttlefish trains the second layer dense, tracks its stable rank each epoch
// and switches it to low-rank factors once that settles. The program exits 0 only if
// training worked (the loss fell by half) and both policies acted (InRank grew a rank,
// Cuttlefish switched its layer): the install is checked end to end, policies included.

#include <lowrank/lowrank.hpp>

#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr lowrank::Index kFeatures = 64;
constexpr lowrank::Index kClasses = 8;
constexpr lowrank::Index kBatch = 64;
constexpr int kEpochs = 6;
constexpr int kStepsPerEpoch = 25;

// The model: three linear slots, registered by name. A policy selects them by name or
// role; the references stay valid when a policy swaps the layer inside its slot.
struct Net : lowrank::Module<float> {
    lowrank::AnyLinear<float>& encoder;
    lowrank::AnyLinear<float>& mixer;
    lowrank::AnyLinear<float>& head;

    explicit Net(lowrank::Rng& rng)
        : encoder(linear("encoder", kFeatures, 128, rng)),
          mixer(linear("mixer", 128, 128, rng)),
          head(linear("head", 128, kClasses, rng, {.role = "output"})) {}

    lowrank::Var<float> forward(lowrank::Graph<float>& g, const lowrank::Var<float>& x) {
        auto h = lowrank::relu(g, encoder.forward(g, x));
        h = lowrank::relu(g, mixer.forward(g, h));
        return head.forward(g, h);
    }
};

// Inputs x ~ N(0, I); the label is the argmax of a fixed rank-4 map of x.
struct Data {
    lowrank::Matrix<float> x;
    std::vector<std::int32_t> y;
};

Data make_data(lowrank::Index n, lowrank::Rng& rng, const lowrank::Matrix<float>& teacher) {
    Data d{lowrank::Matrix<float>(n, kFeatures), std::vector<std::int32_t>(static_cast<std::size_t>(n))};
    for (lowrank::Index i = 0; i < n; ++i)
        for (lowrank::Index j = 0; j < kFeatures; ++j) d.x(i, j) = static_cast<float>(rng.normal());
    const lowrank::Matrix<float> scores = d.x * teacher.transpose();
    for (lowrank::Index i = 0; i < n; ++i) {
        lowrank::Index best = 0;
        scores.row(i).maxCoeff(&best);
        d.y[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(best);
    }
    return d;
}

}  // namespace

int main() {
    lowrank::Rng rng(2026);
    lowrank::Matrix<float> a(kClasses, 4), b(4, kFeatures);
    for (lowrank::Index i = 0; i < a.size(); ++i) a.data()[i] = static_cast<float>(rng.normal());
    for (lowrank::Index i = 0; i < b.size(); ++i) b.data()[i] = static_cast<float>(rng.normal());
    const lowrank::Matrix<float> teacher = a * b;
    const Data data = make_data(kBatch * kStepsPerEpoch, rng, teacher);

    Net net(rng);
    lowrank::AdamW<float> opt(net.parameters(), {.lr = 3e-3, .weight_decay = 0.0});
    lowrank::TrainingRun<float> run(
        net, opt,
        {.schedule = lowrank::LrSchedule({.kind = lowrank::ScheduleKind::warmup_cosine,
                                          .warmup_steps = 10,
                                          .total_steps = kEpochs * kStepsPerEpoch}),
         .clip_grad_norm = 1.0,
         .steps_per_epoch = kStepsPerEpoch});
    run.add<lowrank::InRank<float>>(
        {.warmup = 10, .gap = 10, .two_stage = false, .select = {.pattern = "encoder"}});
    run.add<lowrank::Cuttlefish<float>>(
        {.select = {.pattern = "mixer"}, .window = 2, .tail = 1, .threshold = 1.0});

    lowrank::Matrix<float> xb(kBatch, kFeatures);
    std::vector<std::int32_t> yb(static_cast<std::size_t>(kBatch));
    double first_loss = 0.0, epoch_loss = 0.0;
    for (int epoch = 0; epoch < kEpochs; ++epoch) {
        epoch_loss = 0.0;
        for (int s = 0; s < kStepsPerEpoch; ++s) {
            xb = data.x.middleRows(s * kBatch, kBatch);
            std::copy_n(data.y.begin() + s * kBatch, kBatch, yb.begin());
            const auto r = run.step([&](lowrank::Graph<float>& g) {
                return lowrank::cross_entropy(g, net.forward(g, g.input(xb)), yb);
            });
            epoch_loss += r.loss / kStepsPerEpoch;
            if (r.step == 1) first_loss = r.loss;
        }
        std::printf("epoch %d  loss %.4f  encoder rank %lld (%s)  mixer rank %lld (%s)\n", epoch + 1,
                    epoch_loss, static_cast<long long>(net.encoder.rank()), net.encoder.kind(),
                    static_cast<long long>(net.mixer.rank()), net.mixer.kind());
    }

    // Only InRank grows and only Cuttlefish switches.
    const auto grown = static_cast<int>(run.rank_log().of_event("grow").size());
    const auto switched = static_cast<int>(run.rank_log().of_event("switch").size());
    std::printf(
        "lowrank consumer: loss %.4f -> %.4f; %zu rank events (InRank grew %d time(s), Cuttlefish "
        "switched %d layer(s)); %lld of %lld parameters trainable\n",
        first_loss, epoch_loss, run.rank_log().size(), grown, switched,
        static_cast<long long>(run.parameter_count(true)), static_cast<long long>(run.parameter_count()));
    bool ok = true;
    if (!(epoch_loss < 0.5 * first_loss)) {
        std::fprintf(stderr, "lowrank consumer: FAILED, the loss did not halve\n");
        ok = false;
    }
    if (grown == 0 || switched != 1 || !net.mixer.holds<lowrank::LowRankLinear<float>>()) {
        std::fprintf(stderr,
                     "lowrank consumer: FAILED, the policies did not act (InRank grew %d, Cuttlefish "
                     "switched %d)\n",
                     grown, switched);
        ok = false;
    }
    return ok ? 0 : 1;
}
