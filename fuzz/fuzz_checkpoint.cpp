// Fuzz target "checkpoint": read_checkpoint_extra, then load_checkpoint into a small model
// (fc.weight 2 x 3, fc.bias 1 x 2) and an AdamW, then one optimizer step when it loads. The
// seeds are checkpoints of that model (fuzz/make_seeds.cpp).
#include "fuzz_support.hpp"

#include <lowrank/io/checkpoint.hpp>
#include <lowrank/optim/adam.hpp>

namespace {

struct SmallModel {
    lowrank::Parameter<double> weight{"fc.weight", lowrank::Matrix<double>::Constant(2, 3, 0.5)};
    lowrank::Parameter<double> bias{"fc.bias", lowrank::Matrix<double>::Zero(1, 2)};
    lowrank::AdamW<double> opt{{&weight, &bias}, lowrank::AdamOptions{.lr = 0.01, .weight_decay = 0.1}};
    lowrank::ParameterList<double> params() { return {&weight, &bias}; }
};

}  // namespace

int lowrank_fuzz_checkpoint(const std::uint8_t* data, std::size_t size) {
    using namespace lowrank;
    const std::string path = lowrank_fuzz::write_input("input.ckpt.safetensors", data, size);
    try {
        const nlohmann::json extra = read_checkpoint_extra(path);
        (void)extra.dump();  // safe: the parser bounds the depth
    } catch (const FormatError&) {
    }
    {
        // Weights only (a checkpoint saved without an optimizer loads only this way).
        SmallModel m;
        try {
            (void)load_checkpoint<double>(path, m.params(), nullptr);
        } catch (const Error&) {
        }
    }
    SmallModel m;
    const Matrix<double> before = m.weight.value;
    try {
        const CheckpointInfo info = load_checkpoint<double>(path, m.params(), &m.opt);
        (void)info.extra.dump();
    } catch (const Error&) {
        // Refused: nothing may have changed.
        if (m.weight.value != before || m.opt.num_states() != 0) lowrank_fuzz::broken("a refused load changed the model");
        return 0;
    }
    // Loaded: the restored state must be usable.
    for (Parameter<double>* p : m.params()) p->grad = Matrix<double>::Constant(p->rows(), p->cols(), 0.25);
    try {
        m.opt.step();
    } catch (const Error&) {
        // e.g. a saved step count the optimizer refuses
    }
    return 0;
}
