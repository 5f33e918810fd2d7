#pragma once
// DeepLora: Deep LoRA (Yaras, Wang, Balzano, Qu, "Compressible dynamics in deep
// overparameterized low-rank learning & adaptation", arXiv 2406.04112; page:
// docs/methods/deep_lora.md).
//
// At on_train_begin every selected layer becomes a DeepLowRankLinear: W = W0 + W_L ... W_1
// with W0 the layer's current weight, frozen (keep_base), or W = W_L ... W_1 alone; each
// factor is a random orthogonal matrix times epsilon, of width w (init = orthogonal), or,
// for the authors' depth-2 LoRA baseline (init = lora), the output-side factor N(0, 1) and
// the input-side factor 0. The factors train in a group of their own when lr_scale or
// weight_decay differ from the layer weight's group. The claim of the paper is that such a
// factorisation moves only inside 2r-dimensional subspaces, so (compress) at the first step
// the policy swaps it for the compressed form Q W~_L ... W~_1 P^T with 2r x 2r inner
// factors W~_l = eps * I, built from that step's gradient (DeepLowRankLinear::compress).
// The inner factors stay in the factor group (lr); P^T and Q go to a group that the policy
// creates with lr gamma * lr (gamma = 0 freezes them).
//
// The defaults are the authors' released configuration (deep-lora-transformers,
// dlt/configs.py): depth 3, epsilon 1e-3, width max(out, in), no compression, gamma 0,
// no weight decay on the factors. Their one compressed run (scripts/stsb_narrow.py) uses
// a compressed width 8 (rank 4 here), lr 1e-2 and gamma 1e-2 (docs/methods/deep_lora.md).
//
// The first step is spent measuring the gradient: in after_backward of the first step the
// wide factors are replaced by new parameters that have no gradient yet, so the optimizer
// step that follows leaves them alone (a bias, whose gradient is valid either way, is
// stepped). The compressed run therefore lags the wide one by exactly one step.
//
// Where this differs from the authors' code and why:
//  - The authors compute the gradient with a separate pass over one batch before training;
//    here it is the gradient of the first training step, which the trainer already computes.
//  - The basis is built from the gradient of the factor on the layer's larger side (dL/dW_1
//    when in >= out, dL/dW_L when out > in, see DeepLowRankLinear::compress), the factor
//    that is square at the authors' width max(out, in), as in their code; here the rule
//    holds at any width.
//  - A layer without a base (keep_base = false) discards the model's weight; the policy
//    records that as a "discard" event in the rank log.

#include <lowrank/core/error.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/nn/deep_low_rank_linear.hpp>
#include <lowrank/policy/rank_policy.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

/// How the factors of the deep factorisation start.
enum class DeepLoraInit {
    /// Every factor a random orthogonal matrix times epsilon (the authors' for depth >= 3).
    orthogonal,
    /// Depth 2 only, the authors' LoRA baseline: the output-side factor W_2 (out x w) N(0, 1),
    /// the input-side factor W_1 (w x in) zero, no alpha / r scale; epsilon is not used.
    lora,
};

/// Options of DeepLora; each default is the authors' (deep-lora-transformers, dlt/configs.py)
/// unless its comment says otherwise.
struct DeepLoraOptions {
    LayerSelector select{.pattern = ".*", .roles = {"hidden"}};
    Index depth = 3;        // L >= 2 factors (authors: lora_depth 3)
    Index width = 0;        // w of the wide factorisation; 0 = the layer's max(out, in) (authors:
                            // lora_rank None); their few-shot runs: w = lora_rank = 8, uncompressed
    double epsilon = 1e-3;  // scale of the orthogonal init of every factor (authors: lora_init_scale)
    Index rank = 4;         // r: the compressed inner factors are 2r x 2r (2r <= min(out, in, w));
                            // the authors' compressed run: lora_rank 8 = 2r
    double gamma = 0.0;     // lr of the outer bases P, Q = gamma * lr of the factor group; 0 freezes
                            // them (authors: lora_gamma 0; their compressed run: 1e-2)
    bool keep_base = true;  // W = W0 + W_L...W_1 with W0 = the layer's weight, frozen; false: W = W_L...W_1
    bool compress = false;  // compress to width 2r at the first step (authors: lora_compress False)
    DeepLoraInit init = DeepLoraInit::orthogonal;  // lora: the authors' depth-2 baseline
    double lr_scale = 1.0;  // the factors' lr = lr_scale * the lr of their group (> 0); the outer
                            // bases then train at gamma * that
    std::optional<double> weight_decay = 0.0;                // the factors' weight decay (authors: 0); unset:
                                                             // the factor group's
    std::optional<std::size_t> factor_group = std::nullopt;  // optimizer group of the factors;
                                                             // default: the layer weight's group
    std::uint64_t seed = 0;                                  // seeds the factors' orthogonal init
};

template <class T>
class DeepLora : public RankPolicy<T> {
public:
    using Options = DeepLoraOptions;

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
        check(o.width >= 0, "DeepLora", "option width: expected >= 0 (0 = max(out, in)), got ", o.width);
        check(std::isfinite(o.epsilon) && o.epsilon > 0.0, "DeepLora", "option epsilon: expected > 0, got ",
              o.epsilon);
        check(o.rank >= 1, "DeepLora", "option rank: expected >= 1, got ", o.rank);
        check(std::isfinite(o.gamma) && o.gamma >= 0.0, "DeepLora",
              "option gamma: expected a finite value >= 0 (0 freezes P and Q), got ", o.gamma);
        check(std::isfinite(o.lr_scale) && o.lr_scale > 0.0, "DeepLora",
              "option lr_scale: expected a finite value > 0, got ", o.lr_scale);
        check(!o.weight_decay || (std::isfinite(*o.weight_decay) && *o.weight_decay >= 0.0), "DeepLora",
              "option weight_decay: expected a finite value >= 0 (or unset: the group's), got ",
              o.weight_decay.value_or(0.0));
        check(o.init != DeepLoraInit::lora || o.depth == 2, "DeepLora",
              "option init = lora (the authors' depth-2 LoRA baseline) needs depth 2, got depth ", o.depth);
        check(o.init != DeepLoraInit::lora || !o.compress, "DeepLora",
              "option init = lora cannot be compressed (its zero factor gives no basis; the authors compress "
              "depth >= 3 only): set compress = false");
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
            if (options_.init == DeepLoraInit::lora) {
                layer.factors().front().value.setZero();
                init::normal<T>(layer.factors().back().value, rng_);
            }
            const Matrix<T> weight = slot.dense_weight();
            if (options_.keep_base) layer.base.value = weight;
            if (bias) layer.bias.value = *bias;
            const std::size_t group = factor_group_for(ctx, slot);
            ctx.replace_layer(slot, std::move(layer), group);
            states_.push_back(LayerState{.name = slot.name(), .slot = &slot, .width = w});
            ctx.record(name(), slot.name(), "init", old_rank, slot.rank(), "width", static_cast<double>(w));
            if (!options_.keep_base)
                ctx.record(name(), slot.name(), "discard", old_rank, slot.rank(), "discarded_energy",
                           static_cast<double>(weight.squaredNorm()));
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
            const DeepCompressionInfo info = compress_layer(opt, st, grad_first, grad_last);
            ctx.record(name(), st.name, "compress", st.width, info.width, "grad_energy_top_r", info.captured);
        }
        done_ = true;
    }

    /// Whether the layers are compressed, the generator, the outer bases' optimizer groups
    /// and per layer the wide width, compressed, the side the basis came from, the captured
    /// gradient energy and the structure (the wide factors, or P, the 2r x 2r inner factors
    /// and Q).
    nlohmann::json state() const override {
        nlohmann::json out = detail::policy_state_header(name());
        out["compressed"] = done_;
        out["rng"] = detail::rng_to_policy_state(rng_);
        nlohmann::json groups = nlohmann::json::array();
        for (const auto& [inner, outer] : outer_groups_)
            groups.push_back({{"inner", inner}, {"outer", outer}});
        out["outer_groups"] = groups;
        nlohmann::json layers = nlohmann::json::array();
        for (const LayerState& st : states_)
            layers.push_back({{"name", st.name},
                              {"width", st.width},
                              {"compressed", st.compressed},
                              {"output_side", st.output_side},
                              {"captured", detail::optional_number(st.captured)},
                              {"structure", detail::layer_structure(*st.slot)}});
        out["layers"] = layers;
        return out;
    }

    /// After the compression: compresses every layer again, in the same order and through
    /// the same optimizer calls (so the groups and their order are the saved run's), from a
    /// stand-in gradient: the values of P, Q and the inner factors are the checkpoint's to
    /// load. Before it: only the generator and the checks.
    void restore(TrainingContext<T>& ctx, const nlohmann::json& state) override {
        check(!states_.empty(), "deeplora", "restore called before on_train_begin: convert the layers first");
        check(!done_, "deeplora",
              "restore expects the policy as on_train_begin left it, but it has compressed");
        const auto r = detail::open_policy_state(name(), state);
        const bool compressed = r.boolean("compressed");
        const Rng::State rng = r.rng("rng");
        std::map<std::size_t, std::size_t> groups;
        const std::int64_t max = std::numeric_limits<std::int64_t>::max();
        for (const auto& g : r.objects("outer_groups"))
            groups.emplace(static_cast<std::size_t>(g.integer("inner", 0, max)),
                           static_cast<std::size_t>(g.integer("outer", 0, max)));
        std::vector<std::string> names;
        for (const LayerState& st : states_) names.push_back(st.name);
        const auto entries = detail::matched_layers(r, names);
        std::vector<LayerState> saved = states_;
        for (std::size_t i = 0; i < entries.size(); ++i) {
            const auto& e = entries[i];
            LayerState& st = saved[i];
            const std::int64_t width = e.integer("width");
            if (width != st.width)
                e.error("expected width ", st.width, " (this policy's options), got ", width);
            st.compressed = e.boolean("compressed");
            st.output_side = e.boolean("output_side");
            st.captured = e.number("captured");
            if (st.compressed != compressed)
                e.error("compressed is ", st.compressed ? "true" : "false", " but the policy's is ",
                        compressed ? "true" : "false");
            const bool output_side = st.slot->out_features() > st.slot->in_features();
            if (compressed && st.output_side != output_side)
                e.error("expected output_side ", output_side ? "true" : "false", " for a ",
                        shape_string(st.slot->out_features(), st.slot->in_features()), " layer, got ",
                        st.output_side ? "true" : "false");
        }
        if (compressed && !options_.compress)
            r.error("the state is compressed, but this policy's option compress is off");
        if (compressed) {
            Optimizer<T>& opt = ctx.optimizer();
            // A fixed full-rank stand-in for the first step's gradient: any one gives the same
            // shapes, parameters and groups.
            Rng scratch(0x5eed);
            for (LayerState& st : states_) {
                auto& factors = st.slot->template get<DeepLowRankLinear<T>>().factors();
                Matrix<T> g_first(factors.front().rows(), factors.front().cols());
                Matrix<T> g_last(factors.back().rows(), factors.back().cols());
                init::normal<T>(g_first, scratch);
                init::normal<T>(g_last, scratch);
                compress_layer(opt, st, g_first, g_last);
            }
            if (outer_groups_ != groups) {
                const auto show = [](const std::map<std::size_t, std::size_t>& m) {
                    std::string out;
                    for (const auto& [inner, outer] : m)
                        out += (out.empty() ? "" : ", ") + std::to_string(inner) + " -> " +
                               std::to_string(outer);
                    return "{" + out + "}";
                };
                throw Error(detail::concat("deeplora: restore: expected the outer bases' groups ",
                                           show(groups), " (saved, factor group -> outer group), got ",
                                           show(outer_groups_),
                                           ": the optimizer's groups differ from the saved run's"));
            }
        } else if (!groups.empty()) {
            r.error("outer_groups must be empty before the compression, got ", groups.size(), " entries");
        }
        for (std::size_t i = 0; i < entries.size(); ++i) {
            states_[i] = saved[i];
            detail::check_layer_structure(entries[i], *states_[i].slot);
        }
        done_ = compressed;
        rng_.set_state(rng);
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
    /// Swaps st's wide factors for the compressed form built from the two gradients: the
    /// wide factors leave the optimizer (with their state), the inner factors join their
    /// group, P^T and Q the outer group (frozen when gamma = 0).
    DeepCompressionInfo compress_layer(Optimizer<T>& opt, LayerState& st, const Matrix<T>& grad_first,
                                       const Matrix<T>& grad_last) {
        auto& layer = st.slot->template get<DeepLowRankLinear<T>>();
        auto& factors = layer.factors();
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
        return info;
    }

    Index width_for(const AnyLinear<T>& l) const {
        return options_.width > 0 ? options_.width : std::max(l.in_features(), l.out_features());
    }

    /// The group the factors of `slot` join: `factor_group` or the layer weight's, or a
    /// group derived from it ("<name>.deeplora") when lr_scale or weight_decay differ from
    /// it, created on first use (one per source group; on_train_begin creates them in the
    /// same order on a resumed run, before restore).
    std::size_t factor_group_for(TrainingContext<T>& ctx, AnyLinear<T>& slot) {
        Optimizer<T>& opt = ctx.optimizer();
        // As replace_layer: the group of the old layer's first parameter (its weight).
        const ParameterList<T> params = slot.parameters();
        const std::size_t source = options_.factor_group ? *options_.factor_group
                                   : params.empty()      ? 0
                                                         : opt.group_of(*params.front());
        const GroupOptions in = opt.group(source).options;  // a copy: add_group may reallocate
        const double decay = options_.weight_decay.value_or(in.weight_decay);
        if (options_.lr_scale == 1.0 && decay == in.weight_decay) return source;
        if (const auto it = factor_groups_.find(source); it != factor_groups_.end()) return it->second;
        opt.add_group(
            {}, GroupOptions{.lr = options_.lr_scale * in.lr,
                             .weight_decay = decay,
                             .name = in.name.empty() ? std::string("deeplora") : in.name + ".deeplora"});
        const std::size_t g = opt.groups().size() - 1;
        factor_groups_.emplace(source, g);
        return g;
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
    std::map<std::size_t, std::size_t> factor_groups_;  // source group -> the factors' own group
    bool done_ = false;
};

}  // namespace lowrank
