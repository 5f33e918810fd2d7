#pragma once
// DeepLora: Deep LoRA (Yaras, Wang, Balzano, Qu, "Compressible dynamics in deep
// overparameterized low-rank learning & adaptation", arXiv 2406.04112; METHODS.md "Deep
// LoRA").
//
// At on_train_begin every selected layer becomes a DeepLowRankLinear: W = W0 + W_L ... W_1
// with W0 the layer's current weight, frozen (keep_base), or W = W_L ... W_1 alone; each
// factor is a random orthogonal matrix times epsilon, of width w. The claim of the paper is
// that such a factorisation moves only inside 2r-dimensional subspaces, so (compress) at the
// first step the policy swaps it for the compressed form Q W~_L ... W~_1 P^T with 2r x 2r
// inner factors W~_l = eps * I, built from that step's gradient (DeepLowRankLinear::compress).
// The inner factors stay in the factor group (lr); P^T and Q go to a group that the policy
// creates with lr gamma * lr (gamma = 0 freezes them).
//
// The first step is spent measuring the gradient: in after_backward of the first step the
// wide factors are replaced by new parameters that have no gradient yet, so the optimizer
// step that follows leaves them alone (a bias, whose gradient is valid either way, is
// stepped). The compressed run therefore lags the wide one by exactly one step.
//
// Where this differs from the authors' code and why:
//  - The authors compute the gradient with a separate pass over one batch before training;
//    here it is the gradient of the first training step, which the trainer already computes.
//  - They always build the basis from dL/dW_1. For a layer with out > in the basis is built
//    from dL/dW_L instead (see DeepLowRankLinear::compress): the basis taken from the product
//    is confined to its initial range, which on the smaller side is everything but on the
//    larger side is not, and with frozen bases a tall layer could then never fit its target.
//  - Default width: the layer's min(out, in) (the authors: max(out, in) for adapters, the
//    matrix size for completion). With min the end-to-end product at init has full rank
//    min(out, in) either way, and the wide factors cost less.
//  - gamma defaults to 0.01 (the authors' adapter default is 0): METHODS.md notes that frozen
//    bases are exact only for fully observed targets, and a mini-batch gradient is noisy.

#include <lowrank/core/error.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/nn/deep_low_rank_linear.hpp>
#include <lowrank/policy/rank_policy.hpp>

#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

struct DeepLoraOptions {
    LayerSelector select{.pattern = ".*", .roles = {"hidden"}};
    Index depth = 3;        // L >= 2 factors
    Index width = 0;        // w of the wide factorisation; 0 = the layer's min(out, in)
    double epsilon = 1e-3;  // scale of the orthogonal init of every factor
    Index rank = 8;         // r: the compressed inner factors are 2r x 2r (2r <= min(out, in, w))
    double gamma = 0.01;    // lr of the outer bases P, Q = gamma * lr of the factor group; 0 freezes them
    bool keep_base = true;  // W = W0 + W_L...W_1 with W0 = the layer's weight, frozen; false: W = W_L...W_1
    bool compress = true;   // compress to width 2r at the first step (false: train the wide factors)
    std::optional<std::size_t> factor_group = std::nullopt;  // optimizer group of the factors;
                                                             // default: the layer weight's group
    std::uint64_t seed = 0;                                  // seeds the factors' orthogonal init
};

template <class T>
class DeepLora : public RankPolicy<T> {
public:
    /// One converted layer.
    struct LayerState {
        std::string name;
        AnyLinear<T>* slot = nullptr;
        Index width = 0;  // w of the wide factorisation
        bool compressed = false;
        bool output_side = false;        // the basis came from dL/dW_L (out > in)
        double captured = std::nan("");  // share of ||G||_F^2 in the top-r directions
    };

    explicit DeepLora(DeepLoraOptions options = {}) : options_(std::move(options)), rng_(options_.seed) {
        const auto& o = options_;
        check(o.depth >= 2, "DeepLora", "option depth: expected >= 2, got ", o.depth);
        check(o.width >= 0, "DeepLora", "option width: expected >= 0 (0 = min(out, in)), got ", o.width);
        check(std::isfinite(o.epsilon) && o.epsilon > 0.0, "DeepLora", "option epsilon: expected > 0, got ",
              o.epsilon);
        check(o.rank >= 1, "DeepLora", "option rank: expected >= 1, got ", o.rank);
        check(std::isfinite(o.gamma) && o.gamma >= 0.0, "DeepLora",
              "option gamma: expected a finite value >= 0 (0 freezes P and Q), got ", o.gamma);
    }

    std::string_view name() const override { return "deeplora"; }

    void on_train_begin(TrainingContext<T>& ctx) override {
        check(states_.empty(), "DeepLora", "on_train_begin called twice");
        std::vector<LayerSlot<T>*> slots = ctx.select(options_.select, name());
        if (options_.factor_group)
            check(*options_.factor_group < ctx.optimizer().groups().size(), "DeepLora",
                  "option factor_group: expected < ", ctx.optimizer().groups().size(),
                  " (the optimizer's groups), got ", *options_.factor_group);
        // Check every layer before converting any, so a bad option leaves the model untouched.
        for (const LayerSlot<T>* s : slots) {
            const AnyLinear<T>& l = *s->layer;
            const Index w = width_for(l);
            if (options_.compress)
                check(2 * options_.rank <= std::min({l.in_features(), l.out_features(), w}), "DeepLora",
                      "option rank: 2r must be <= min(out, in, width) = ",
                      std::min({l.in_features(), l.out_features(), w}), " for layer '", l.name(), "' (",
                      shape_string(l.out_features(), l.in_features()), ", width ", w,
                      "), got r = ", options_.rank);
        }
        for (LayerSlot<T>* s : slots) {
            AnyLinear<T>& slot = *s->layer;
            const Index old_rank = slot.rank();
            const Index w = width_for(slot);
            const Matrix<T>* bias = slot.bias();
            DeepLowRankLinear<T> layer(slot.name(), slot.in_features(), slot.out_features(), rng_,
                                       DeepLowRankOptions{.depth = options_.depth,
                                                          .width = w,
                                                          .epsilon = options_.epsilon,
                                                          .bias = bias != nullptr,
                                                          .base = options_.keep_base});
            if (options_.keep_base) layer.base.value = slot.dense_weight();
            if (bias) layer.bias.value = *bias;
            ctx.replace_layer(slot, std::move(layer), options_.factor_group);
            states_.push_back(LayerState{.name = slot.name(), .slot = &slot, .width = w});
            ctx.record(name(), slot.name(), "init", old_rank, slot.rank(), "width", static_cast<double>(w));
        }
    }

    /// At the first step: compress every layer from the gradient just computed.
    void after_backward(TrainingContext<T>& ctx) override {
        if (!options_.compress || done_) return;
        check(!states_.empty(), "DeepLora", "after_backward before on_train_begin");
        Optimizer<T>& opt = ctx.optimizer();
        for (LayerState& st : states_) {
            auto& layer = st.slot->template get<DeepLowRankLinear<T>>();
            auto& factors = layer.factors();
            const Parameter<T>& first = factors.front();
            const Parameter<T>& last = factors.back();
            check(first.grad.rows() == first.rows() && first.grad.cols() == first.cols() &&
                      last.grad.rows() == last.rows() && last.grad.cols() == last.cols(),
                  "DeepLora", "layer '", st.name,
                  "' has no gradient at the first step; was it used in the forward pass before backward?");
            // Copies: compress() destroys the parameters that hold these gradients.
            const Matrix<T> grad_first = first.grad;
            const Matrix<T> grad_last = last.grad;
            // Checked here, so that compress() cannot fail once the factors left the optimizer.
            check(grad_first.allFinite() && grad_last.allFinite(), "DeepLora", "layer '", st.name,
                  "' has a non-finite gradient at the first step; cannot compress");
            ParameterList<T> wide;
            for (auto& f : factors) wide.push_back(&f);
            // Out of the optimizer (with their state) before they are destroyed.
            const std::size_t group = opt.remove_parameters(wide).front();
            const DeepCompressionInfo info = layer.compress(options_.rank, grad_first, grad_last);

            ParameterList<T> inner;
            for (std::size_t l = 1; l + 1 < factors.size(); ++l) inner.push_back(&factors[l]);
            opt.add_to_group(group, inner);
            if (options_.gamma == 0.0) layer.set_outer_trainable(false);
            opt.add_to_group(outer_group(opt, group), layer.outer_parameters());

            st.compressed = true;
            st.output_side = info.output_side;
            st.captured = info.captured;
            ctx.record(name(), st.name, "compress", st.width, info.width, "grad_energy_top_r", info.captured);
        }
        done_ = true;
    }

    const DeepLoraOptions& options() const { return options_; }
    const std::vector<LayerState>& layers() const { return states_; }
    /// True once every layer has been compressed.
    bool compressed() const { return done_; }
    /// Current rank bound of each converted layer (w before compression, 2r after).
    std::vector<Index> ranks() const {
        std::vector<Index> out;
        for (const auto& s : states_) out.push_back(s.slot->rank());
        return out;
    }
    /// The optimizer group of the outer bases for each factor group (created at compression).
    const std::map<std::size_t, std::size_t>& outer_groups() const { return outer_groups_; }

private:
    Index width_for(const AnyLinear<T>& l) const {
        return options_.width > 0 ? options_.width : std::min(l.in_features(), l.out_features());
    }

    /// The group of the outer bases that belong with factor group `inner`, created on first use.
    std::size_t outer_group(Optimizer<T>& opt, std::size_t inner) {
        auto it = outer_groups_.find(inner);
        if (it != outer_groups_.end()) return it->second;
        const GroupOptions in = opt.group(inner).options;  // a copy: add_group may reallocate
        opt.add_group({}, GroupOptions{.lr = options_.gamma * in.lr,
                                       .weight_decay = in.weight_decay,
                                       .name = in.name.empty() ? std::string("deeplora_outer")
                                                               : in.name + ".deeplora_outer"});
        const std::size_t g = opt.groups().size() - 1;
        outer_groups_.emplace(inner, g);
        return g;
    }

    DeepLoraOptions options_;
    Rng rng_;
    std::vector<LayerState> states_;
    std::map<std::size_t, std::size_t> outer_groups_;
    bool done_ = false;
};

}  // namespace lowrank
