// Writes what tests/models/torch/compare_export.py checks against a GPT-2 written in
// PyTorch: a micro GPT-2 whose projections are of every factorised layer type (LoRA with
// alpha / r, LowRankLinear, SST, InRank below capacity, Deep LoRA compressed), exported in
// Hugging Face's and nanoGPT's layouts and as a from_pretrained folder, and its logits for
// a fixed batch.
//
//   lowrank-export-reference DIR   -> DIR/hf.safetensors, DIR/nanogpt.safetensors,
//                                     DIR/hf-model/{model.safetensors,config.json},
//                                     DIR/reference.safetensors (ids, logits)
#include <lowrank/core/init.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/models/gpt2.hpp>
#include <lowrank/models/gpt2_export.hpp>

#include <cstdint>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: lowrank-export-reference DIR\n";
        return 2;
    }
    try {
        using namespace lowrank;
        const std::string dir = argv[1];
        Rng rng(7);
        Gpt2<float> model(gpt2_config("micro"), rng);
        auto slots = model.layer_slots();
        auto s = [&](std::size_t i) -> AnyLinear<float>& { return *slots[i].layer; };
        const auto make = [&](std::size_t i, auto layer) { s(i).replace(std::move(layer)); };
        const auto in = [&](std::size_t i) { return s(i).in_features(); };
        const auto out = [&](std::size_t i) { return s(i).out_features(); };
        make(0, LowRankLinear<float>(s(0).name(), in(0), out(0), rng,
                                     {.rank = 4, .base = true, .scale = 8.0 / 4, .init = LowRankInit::lora}));
        make(1, SpectralLinear<float>(s(1).name(), in(1), out(1), rng, {.rank = 4}));
        make(2, IncrementalRankLinear<float>(s(2).name(), in(2), out(2), rng, {.rank = 3, .capacity = 6}));
        make(3, LowRankLinear<float>(s(3).name(), in(3), out(3), rng, {.rank = 5}));
        DeepLowRankLinear<float> deep(s(6).name(), in(6), out(6), rng, {.depth = 3, .epsilon = 0.5});
        Matrix<float> grad(deep.factors().front().rows(), in(6));
        init::normal<float>(grad, rng, 0.0, 1.0);
        deep.compress(2, grad);
        make(6, std::move(deep));
        make(7, LowRankLinear<float>(s(7).name(), in(7), out(7), rng,
                                     {.rank = 2, .base = true, .scale = 16.0 / 2, .init = LowRankInit::lora}));
        // As trained: no factor left at its zero start, biases and gains away from 0 and 1.
        for (auto* p : model.parameters()) {
            Matrix<float> noise(p->rows(), p->cols());
            init::normal<float>(noise, rng, 0.0, 0.05);
            p->value += noise;
        }

        const Index batch = 2, seq = 8;
        std::vector<std::int32_t> ids(static_cast<std::size_t>(batch * seq));
        for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int32_t>((i * 7919 + 13) % 50257);
        Graph<float> g;
        g.set_grad_enabled(false);
        const Matrix<float> logits = model.forward(g, ids, batch, seq).value();

        save_gpt2_weights(model, dir + "/hf.safetensors", Gpt2ExportLayout::hf);
        save_gpt2_weights(model, dir + "/nanogpt.safetensors", Gpt2ExportLayout::nanogpt);
        save_gpt2_pretrained(model, dir + "/hf-model");
        SafetensorsWriter w;
        Matrix<double> id_matrix(batch, seq);
        for (Index i = 0; i < batch * seq; ++i) id_matrix(i / seq, i % seq) = ids[static_cast<std::size_t>(i)];
        w.add("ids", id_matrix);
        w.add("logits", logits, {batch, seq, logits.cols()});
        w.write(dir + "/reference.safetensors");
        return 0;
    } catch (const std::exception& e) {
        std::cerr << "lowrank-export-reference: " << e.what() << "\n";
        return 1;
    }
}
