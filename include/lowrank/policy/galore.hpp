#pragma once
// GaLore: gradient low-rank projection (Zhao, Zhang, Chen, Wang, Anandkumar, Tian, "GaLore:
// Memory-Efficient LLM Training by Gradient Low-Rank Projection", arXiv 2403.03507).
//
// The weight stays dense and full-rank; its gradient is stepped in a rank-r subspace. For a
// selected (m x n) weight with gradient G, every T of its steps P becomes the top-r
// singular vectors of G on the shorter side (left, m x r, when m < n; right, n x r,
// otherwise); every step Adam runs on R = Pᵀ·G (or G·P), whose moments are r x max(m, n)
// instead of m x n, and the weight moves by α·lr times the Adam direction projected back
// (P·N or N·Pᵀ). What it saves is optimizer memory: 2·r·max(m, n) + r·min(m, n) numbers of
// state per weight instead of 2·m·n.
//
// The work is split between a policy and the optimizer: this policy chooses the layers and
// the subspace (it takes the SVD of the gradient after backward, when a refresh is due, and
// hands the basis over with Optimizer::set_projector); Adam and AdamW step any parameter in
// a given subspace (GradientProjection in optimizer.hpp). So the decision sits where every
// other rank decision of the library sits, a checkpoint stores the basis beside the moments,
// and two policies can never manage one layer (a layer GaLore projects cannot be factorised
// by another policy, and the reverse).
//
// Where this differs from the authors' code (galore_torch/adamw.py, galore_projector.py),
// and why (docs/methods/galore.md):
//  - Adam's step is PyTorch's (torch.optim.AdamW: ε added to the bias-corrected √v̂, the
//    weight decayed before the update), the formula of this library's full-rank AdamW, so
//    that GaLore and the dense baseline differ only by the projection. Their AdamW adds ε
//    to √v before the bias correction and decays the weight after the update.
//  - The basis is refreshed at a parameter's steps 1, T + 1, 2T + 1, ... as theirs (their
//    `iter % update_proj_gap == 0` on the step count before the update); the SVD runs in
//    double (the library's linalg) whatever the training scalar, theirs in float.
//  - Selection is by layer (LayerSelector over the model's linear slots), which leaves
//    biases, norms and embeddings to plain Adam as the paper does; only the weight of a
//    dense Linear is projected.
//
// Page: docs/methods/galore.md.

#include <lowrank/core/error.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/nn/linear.hpp>
#include <lowrank/optim/optimizer.hpp>
#include <lowrank/policy/rank_policy.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace lowrank {

struct GaLoreOptions {
    Index rank = 128;         // r, in [1, min(m, n)] of every selected layer (authors: 128-512)
    std::int64_t gap = 200;   // T: steps between refreshes of the basis (authors: 200)
    double scale = 0.25;      // α: the projected-back update's scale (authors: 0.25)
    bool reset_moments = false;  // zero Adam's moments at each refresh (the paper keeps them)
    LayerSelector select{.pattern = ".*", .roles = {"hidden"}};  // the layers whose weight is projected
};

/// GaLore: the weights of the selected dense layers are trained by Adam/AdamW in a rank-r
/// subspace of their gradient, refreshed every `gap` steps.
template <class T>
class GaLore : public RankPolicy<T> {
public:
    using Options = GaLoreOptions;

    explicit GaLore(GaLoreOptions options = {}) : options_(std::move(options)) {
        check(options_.rank >= 1, "galore", "option rank: expected >= 1, got ", options_.rank);
        check(options_.gap >= 1, "galore", "option gap: expected >= 1, got ", options_.gap);
        check(std::isfinite(options_.scale) && options_.scale > 0.0, "galore",
              "option scale: expected a finite value > 0, got ", options_.scale);
    }

    std::string_view name() const override { return "galore"; }

    /// Selects the layers and sets each weight's projection in the optimizer. Checks every
    /// layer before changing any.
    void on_train_begin(TrainingContext<T>& ctx) override {
        check(layers_.empty(), "galore", "on_train_begin called twice: the projections are already set");
        Optimizer<T>& opt = ctx.optimizer();
        check(opt.supports_projection(), "galore", "the optimizer is ", opt.type_name(),
              ", which cannot step a projected gradient; use Adam or AdamW");
        const auto slots = ctx.select(options_.select, name());
        for (const LayerSlot<T>* s : slots) {
            const AnyLinear<T>& l = *s->layer;
            check(l.template holds<Linear<T>>(), "galore", "layer '", l.name(), "' holds a ", l.kind(),
                  " layer; GaLore projects the gradient of a dense Linear weight (narrow the selector)");
            const Index d = std::min(l.in_features(), l.out_features());
            check(options_.rank <= d, "galore", "option rank: expected <= min(out, in) = ", d, " of layer '",
                  l.name(), "' ", shape_string(l.out_features(), l.in_features()), ", got ", options_.rank);
        }
        for (LayerSlot<T>* s : slots) {
            AnyLinear<T>& slot = *s->layer;
            Parameter<T>& w = slot.template get<Linear<T>>().weight;
            opt.set_projection(w, GradientProjection{.rank = options_.rank,
                                                     .gap = options_.gap,
                                                     .scale = options_.scale,
                                                     .side = projection_side_for(w.rows(), w.cols()),
                                                     .reset_moments = options_.reset_moments});
            layers_.push_back(&slot);
            weights_.push_back(&w);
            ctx.record(name(), slot.name(), "project", slot.rank(), options_.rank, "gap",
                       static_cast<double>(options_.gap));
        }
    }

    /// At a refresh step: P = the top-r singular vectors of each weight's gradient on its
    /// side, handed to the optimizer, and a "refresh" event with the share of the
    /// gradient's energy (squared Frobenius norm) the subspace holds. A non-finite gradient
    /// is left to the training run (it stops or skips the step; a skipped step's refresh
    /// comes again at the next one).
    void after_backward(TrainingContext<T>& ctx) override {
        Optimizer<T>& opt = ctx.optimizer();
        for (std::size_t i = 0; i < weights_.size(); ++i) {
            const Parameter<T>& w = *weights_[i];
            if (!opt.projection_refresh_due(w) || w.grad.size() == 0 || !w.grad.allFinite()) continue;
            const GradientProjection& g = *opt.projection_of(w);
            const linalg::Svd<T> svd = linalg::thin_svd<T>(w.grad, "galore");
            const Matrix<T>& side = g.side == ProjectionSide::left ? svd.U : svd.V;
            opt.set_projector(w, side.leftCols(g.rank));
            const double total = svd.s.template cast<double>().squaredNorm();
            const double kept = svd.s.head(g.rank).template cast<double>().squaredNorm();
            ctx.record(name(), layers_[i]->name(), "refresh", g.rank, g.rank, "captured_energy",
                       total > 0.0 ? kept / total : std::nan(""));
        }
    }

    /// The options and the projected layers: a resume with other options is refused (the
    /// subspace and the moments' shapes depend on them). The bases themselves are optimizer
    /// state, in the checkpoint beside the moments.
    nlohmann::json state() const override {
        nlohmann::json out = detail::policy_state_header(name());
        out["rank"] = options_.rank;
        out["gap"] = options_.gap;
        out["scale"] = options_.scale;
        out["reset_moments"] = options_.reset_moments;
        nlohmann::json layers = nlohmann::json::array();
        for (AnyLinear<T>* slot : layers_)
            layers.push_back({{"name", slot->name()}, {"structure", detail::layer_structure(*slot)}});
        out["layers"] = layers;
        return out;
    }

    void restore(TrainingContext<T>&, const nlohmann::json& state) override {
        check(!layers_.empty(), "galore", "restore called before on_train_begin: select the layers first");
        const auto r = detail::open_policy_state(name(), state);
        const auto same = [&](const std::string& key, const auto& saved, const auto& now) {
            if (saved != now)
                throw Error(detail::concat("galore: restore: key '", key, "': the run was saved with ", saved,
                                           ", this run has ", now,
                                           " (the projection's shape and moments depend on it)"));
        };
        same("rank", r.integer("rank"), static_cast<std::int64_t>(options_.rank));
        same("gap", r.integer("gap"), options_.gap);
        same("scale", r.number("scale"), options_.scale);
        same("reset_moments", r.boolean("reset_moments"), options_.reset_moments);
        std::vector<std::string> names;
        for (const AnyLinear<T>* slot : layers_) names.push_back(slot->name());
        const auto entries = detail::matched_layers(r, names);
        for (std::size_t i = 0; i < entries.size(); ++i) detail::check_layer_structure(entries[i], *layers_[i]);
    }

    const GaLoreOptions& options() const { return options_; }
    /// The projected layers, in model order (empty before on_train_begin).
    const std::vector<AnyLinear<T>*>& layers() const { return layers_; }
    /// Their weights, in the same order.
    const std::vector<Parameter<T>*>& weights() const { return weights_; }

private:
    GaLoreOptions options_;
    std::vector<AnyLinear<T>*> layers_;
    std::vector<Parameter<T>*> weights_;
};

/// The optimizer state, in numbers, Adam keeps for an (m x n) weight under GaLore at rank r:
/// two moments of r x max(m, n) and the basis, min(m, n) x r. (Dense Adam: 2·m·n.)
inline std::int64_t galore_state_count(Index m, Index n, Index r) {
    const std::int64_t lo = std::min(m, n), hi = std::max(m, n);
    return 2 * r * hi + lo * r;
}

}  // namespace lowrank
