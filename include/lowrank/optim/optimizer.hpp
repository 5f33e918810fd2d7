#pragma once
// The optimizer base: parameter groups, per-parameter state keyed by Parameter::id(), the
// one explicit call (carry_state) through which a rank policy says how that state survives
// a change of a parameter's shape or basis, and gradient projection (GaLore): a parameter
// whose gradient the optimizer steps in a rank-r subspace, with moments of that size.

#include <lowrank/core/error.hpp>
#include <lowrank/core/parallel.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/types.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace lowrank {

/// Options of one parameter group, as in PyTorch's `param_groups`. The optimizer's own
/// options struct holds everything else (momentum, betas, eps), shared by all groups.
struct GroupOptions {
    /// Marks "use the optimizer's base lr" (the lr of its options), as a PyTorch group
    /// without an "lr" key does. Stored groups always hold the resolved number.
    static constexpr double inherit_lr = std::numeric_limits<double>::quiet_NaN();

    double lr = inherit_lr;
    /// Zero by default (not inherited), because the usual reason for a second group is
    /// "no decay on biases and norms".
    double weight_decay = 0.0;
    std::string name = {};
};

template <class T>
struct ParamGroup {
    ParameterList<T> params;
    GroupOptions options;
};

/// The state one parameter carries between steps. Every optimizer uses the same struct;
/// each fills only the moments it names in `Optimizer::moment_names()` (the others stay
/// 0 x 0), so a checkpoint writer and carry_state handle all optimizers alike.
template <class T>
struct OptimizerState {
    /// Steps taken with this state (PyTorch's per-parameter `step`; Adam's bias
    /// correction uses it, SGD uses it to know the first step).
    std::int64_t step = 0;
    Matrix<T> momentum;    // SGD's momentum buffer
    Matrix<T> exp_avg;     // Adam's first moment m
    Matrix<T> exp_avg_sq;  // Adam's second moment v
    /// A projected parameter's basis P (GradientProjection): the rank-r singular vectors of
    /// its gradient at the last refresh, (rows x r) or (cols x r) by side; 0 x 0 for every
    /// other parameter, and before the projected parameter's first step.
    Matrix<T> projector;
    /// The parameter's layout version and shape this state was made or last carried for.
    std::uint64_t layout_version = 0;
    Index rows = 0;
    Index cols = 0;

    /// The moment called `name`: "momentum", "exp_avg" or "exp_avg_sq".
    Matrix<T>& moment(std::string_view name) {
        return const_cast<Matrix<T>&>(std::as_const(*this).moment(name));
    }
    const Matrix<T>& moment(std::string_view name) const {
        if (name == "momentum") return momentum;
        if (name == "exp_avg") return exp_avg;
        if (name == "exp_avg_sq") return exp_avg_sq;
        throw Error(detail::concat("OptimizerState::moment: expected \"momentum\", \"exp_avg\" or "
                                   "\"exp_avg_sq\", got \"",
                                   name, "\""));
    }
};

/// Which side of an (m x n) gradient G a projection acts on: `left` projects R = Pᵀ·G with P
/// (m x r), for m < n; `right` projects R = G·P with P (n x r), for m >= n. Either way the
/// moments are r x max(m, n): the shorter side is the one cut to r.
enum class ProjectionSide { left, right };

/// The side GaLore picks for an (m x n) weight: the shorter one, right for a square weight
/// (as the authors' GaLoreProjector, proj_type "std").
inline ProjectionSide projection_side_for(Index rows, Index cols) {
    return rows < cols ? ProjectionSide::left : ProjectionSide::right;
}

/// Gradient low-rank projection (GaLore, Zhao et al. 2024, arXiv 2403.03507) of one
/// parameter: every `gap` of its steps (its steps 1, gap + 1, 2·gap + 1, ...) P becomes the
/// top-`rank` singular vectors of its gradient on `side`; every step the optimizer runs on
/// R = Pᵀ·G (or G·P), with moments of R's shape, and the weight moves by `scale` times the
/// direction projected back (P·N or N·Pᵀ). Weight decay acts on the full weight.
struct GradientProjection {
    Index rank = 128;
    std::int64_t gap = 200;
    double scale = 0.25;
    ProjectionSide side = ProjectionSide::left;
    /// Zero the moments (and restart their bias correction) at each refresh of P; the paper
    /// keeps them (false).
    bool reset_moments = false;
};

/// How a parameter's optimizer state carries over when a rank policy changes the
/// parameter's shape or basis. Built with the factory functions; see carry_state.
class StateCarry {
public:
    enum class Kind { grow, slice, reset_columns, reset_rows, reset_all, drop };

    /// Resize every moment to the parameter's new (larger or equal) shape, keeping the
    /// old top-left block; new entries are zero. For added columns (InRank) or rows.
    static StateCarry grow() { return StateCarry(Kind::grow, {}); }
    /// Resize every moment to the parameter's new (smaller or equal) shape, keeping the
    /// leading rows and columns. For a rank cut (InRank's stage 2).
    static StateCarry slice() { return StateCarry(Kind::slice, {}); }
    /// Zero the given columns of every moment; the shape must be unchanged. For freshly
    /// sampled singular directions stored as columns (SST).
    static StateCarry reset_columns(std::vector<Index> cols) {
        return StateCarry(Kind::reset_columns, std::move(cols));
    }
    /// Zero the given rows of every moment; the shape must be unchanged. The same as
    /// reset_columns for factors stored (r x in), where a direction is a row.
    static StateCarry reset_rows(std::vector<Index> rows) {
        return StateCarry(Kind::reset_rows, std::move(rows));
    }
    /// Zero every moment (resized to the parameter's shape) and the step count, so bias
    /// correction restarts (ReLoRA restarts, SST re-SVD, Cuttlefish's switch).
    static StateCarry reset_all() { return StateCarry(Kind::reset_all, {}); }
    /// Forget the state; the parameter's next step starts fresh, as if never seen.
    static StateCarry drop() { return StateCarry(Kind::drop, {}); }

    Kind kind() const { return kind_; }
    /// The columns (reset_columns) or rows (reset_rows) to zero; empty otherwise.
    const std::vector<Index>& indices() const { return indices_; }

    std::string_view kind_name() const {
        switch (kind_) {
            case Kind::grow: return "grow";
            case Kind::slice: return "slice";
            case Kind::reset_columns: return "reset_columns";
            case Kind::reset_rows: return "reset_rows";
            case Kind::reset_all: return "reset_all";
            case Kind::drop: return "drop";
        }
        return "?";
    }

private:
    StateCarry(Kind kind, std::vector<Index> indices) : kind_(kind), indices_(std::move(indices)) {}
    Kind kind_;
    std::vector<Index> indices_;
};

/// Base of SGD, Adam and AdamW. A step visits the groups in order and, in each, the
/// trainable parameters that have a gradient, with lr = group lr * lr_scale().
///
/// State is allocated the first time a parameter is stepped; after that a step allocates
/// nothing. If a parameter's layout version has changed since its state was made and
/// nobody called carry_state, step() throws before touching any parameter.
template <class T>
class Optimizer {
    static_assert(std::is_floating_point_v<T>, "Optimizer<T> needs a floating-point scalar");

public:
    using Scalar = T;
    using State = OptimizerState<T>;

    Optimizer(ParameterList<T> params, GroupOptions first) {
        check(std::isfinite(first.lr) && first.lr >= 0.0, "Optimizer", "expected base lr >= 0, got ",
              first.lr);
        base_lr_ = first.lr;
        add_group(std::move(params), std::move(first));
    }

    virtual ~Optimizer() = default;
    // Copying would duplicate state bound to parameters the copy does not own.
    Optimizer(const Optimizer&) = delete;
    Optimizer& operator=(const Optimizer&) = delete;
    Optimizer(Optimizer&&) noexcept = default;
    Optimizer& operator=(Optimizer&&) noexcept = default;

    /// "Sgd", "Adam", "AdamW": used in messages, and by checkpoints to check the type.
    virtual std::string_view type_name() const = 0;

    /// The moments this optimizer keeps per parameter, by name (see OptimizerState).
    virtual std::span<const std::string_view> moment_names() const = 0;

    /// Adds a group. A parameter may belong to one group only (as in PyTorch).
    void add_group(ParameterList<T> params, GroupOptions options) {
        // Plain "Optimizer": type_name() is pure virtual while the base constructor runs.
        constexpr std::string_view what = "Optimizer::add_group";
        if (std::isnan(options.lr)) options.lr = base_lr_;
        check(std::isfinite(options.lr) && options.lr >= 0.0, what, "group '", options.name,
              "': expected lr >= 0, got ", options.lr);
        check(std::isfinite(options.weight_decay) && options.weight_decay >= 0.0, what, "group '",
              options.name, "': expected weight_decay >= 0, got ", options.weight_decay);
        std::unordered_set<const Parameter<T>*> seen;
        for (const auto& g : groups_) seen.insert(g.params.begin(), g.params.end());
        for (std::size_t i = 0; i < params.size(); ++i) {
            const Parameter<T>* p = params[i];
            check(p != nullptr, what, "group '", options.name, "': parameter ", i, " is null");
            check(seen.insert(p).second, what, "group '", options.name, "': parameter '", p->name(),
                  "' appears in more than one group (or twice in this one)");
        }
        groups_.push_back(ParamGroup<T>{std::move(params), std::move(options)});
        ++membership_version_;
    }

    /// Takes parameters out of their groups and drops their state: a layer being swapped
    /// out (call it before the layer is destroyed). Returns, for each parameter, the index
    /// of the group it was in. Every parameter must belong to a group.
    std::vector<std::size_t> remove_parameters(const ParameterList<T>& params) {
        std::vector<std::size_t> where(params.size());
        for (std::size_t i = 0; i < params.size(); ++i) where[i] = group_index_of(params[i], "remove_parameters");
        for (std::size_t i = 0; i < params.size(); ++i) {
            auto& list = groups_[where[i]].params;
            list.erase(std::find(list.begin(), list.end(), params[i]));
            states_.erase(params[i]->id());
            projections_.erase(params[i]->id());
        }
        ++membership_version_;
        return where;
    }

    /// Appends parameters to group i: a layer swapped in. Their state starts fresh.
    void add_to_group(std::size_t i, const ParameterList<T>& params) {
        const std::string what = detail::concat(type_name(), "::add_to_group");
        check(i < groups_.size(), what, "expected group < ", groups_.size(), ", got ", i);
        std::unordered_set<const Parameter<T>*> seen;
        for (const auto& g : groups_) seen.insert(g.params.begin(), g.params.end());
        for (const Parameter<T>* p : params) {
            check(p != nullptr, what, "group '", groups_[i].options.name, "': a parameter is null");
            check(seen.insert(p).second, what, "parameter '", p->name(), "' is already in a group");
        }
        for (Parameter<T>* p : params) {
            states_.erase(p->id());
            projections_.erase(p->id());
            groups_[i].params.push_back(p);
        }
        ++membership_version_;
    }

    /// Changes whenever a parameter joins or leaves a group (add_group, add_to_group,
    /// remove_parameters): how a training run learns, without re-reading the model at
    /// every step, that a policy swapped a layer.
    std::uint64_t membership_version() const { return membership_version_; }

    /// Whether this optimizer can step a parameter in a projected subspace (Adam and
    /// AdamW can; SGD cannot).
    virtual bool supports_projection() const { return false; }

    /// Steps p's gradient in a rank-r subspace from now on (see GradientProjection). p must
    /// be in a group, trainable, a plain 2-D weight (all columns active) with no state yet
    /// (a fresh run; a checkpoint restores the state after), and rank in [1, min(m, n)].
    void set_projection(const Parameter<T>& p, const GradientProjection& proj) {
        const std::string what = detail::concat(type_name(), "::set_projection: parameter '", p.name(), "'");
        check(supports_projection(), what, type_name(),
              " cannot step a projected gradient (use Adam or AdamW for GaLore)");
        (void)group_index_of(&p, "set_projection");
        check(p.trainable, what, "is frozen: only a trained weight has a gradient to project");
        check(p.active_cols() == p.cols(), what, "has ", p.active_cols(), " of ", p.cols(),
              " columns active; a projected weight must have all of them active");
        const Index d = std::min(p.rows(), p.cols());
        check(proj.rank >= 1 && proj.rank <= d, what, "expected rank in [1, min(m, n)] = [1, ", d, "] for ",
              shape_string(p.rows(), p.cols()), ", got ", proj.rank);
        check(proj.gap >= 1, what, "expected gap >= 1, got ", proj.gap);
        check(std::isfinite(proj.scale) && proj.scale > 0.0, what, "expected a finite scale > 0, got ",
              proj.scale);
        check(!has_state(p.id()), what, "already has optimizer state; set the projection before its first step");
        projections_.insert_or_assign(p.id(), Projected{proj, p.layout_version(), {}});
    }

    /// Whether p's next step refreshes its basis (its steps 1, gap + 1, 2·gap + 1, ...):
    /// the step that needs a basis from set_projector first. False if p is not projected.
    bool projection_refresh_due(const Parameter<T>& p) const {
        const GradientProjection* g = projection_of(p);
        if (g == nullptr) return false;
        const State* s = state_of(p);
        return (s == nullptr ? 0 : s->step) % g->gap == 0;
    }

    /// Gives p the basis its next step starts from (projection_refresh_due must be true):
    /// projector_shape(p), finite, orthonormal columns (the caller's SVD; not re-checked).
    /// The GaLore policy calls this after backward with the top singular vectors of the
    /// gradient, so that the decision of the subspace stays a policy's, and the optimizer
    /// needs no SVD.
    void set_projector(const Parameter<T>& p, Matrix<T> basis) {
        const std::string what = detail::concat(type_name(), "::set_projector: parameter '", p.name(), "'");
        auto it = projections_.find(p.id());
        check(it != projections_.end(), what, "has no projected gradient (call set_projection first)");
        check(projection_refresh_due(p), what, "its next step is not a refresh of the basis (every ",
              it->second.projection.gap, " steps)");
        const auto [pr, pc] = projector_shape(p);
        check_shape(basis, pr, pc, what);
        check(basis.allFinite(), what, "expected a finite basis");
        it->second.pending = std::move(basis);
    }

    /// p's projection, or null if its gradient is stepped in full.
    const GradientProjection* projection_of(const Parameter<T>& p) const {
        auto it = projections_.find(p.id());
        return it == projections_.end() ? nullptr : &it->second.projection;
    }

    /// The shape of p's moments: (rows x active_cols), or R's shape for a projected p.
    std::pair<Index, Index> moment_shape(const Parameter<T>& p) const {
        if (const GradientProjection* g = projection_of(p))
            return g->side == ProjectionSide::left ? std::pair{g->rank, p.cols()} : std::pair{p.rows(), g->rank};
        return {p.rows(), p.active_cols()};
    }

    /// The shape of p's projector P: (rows x r) or (cols x r); 0 x 0 if not projected.
    std::pair<Index, Index> projector_shape(const Parameter<T>& p) const {
        if (const GradientProjection* g = projection_of(p))
            return {g->side == ProjectionSide::left ? p.rows() : p.cols(), g->rank};
        return {0, 0};
    }

    /// Bytes of optimizer state held now: every moment and projector of every parameter
    /// with state (what GaLore saves against AdamW).
    std::size_t state_bytes() const {
        std::size_t n = 0;
        for (const auto& [id, s] : states_) {
            for (auto name : moment_names()) n += static_cast<std::size_t>(s.moment(name).size());
            n += static_cast<std::size_t>(s.projector.size());
        }
        return n * sizeof(T);
    }

    /// The index of the group that holds p.
    std::size_t group_of(const Parameter<T>& p) const { return group_index_of(&p, "group_of"); }

    const std::vector<ParamGroup<T>>& groups() const { return groups_; }
    const ParamGroup<T>& group(std::size_t i) const { return groups_.at(i); }

    /// Changes a group's lr or weight decay (PyTorch's `param_groups[i]["lr"] = ...`).
    void set_group_lr(std::size_t i, double lr) {
        check(i < groups_.size(), "Optimizer::set_group_lr", "expected group < ", groups_.size(),
              ", got ", i);
        check(std::isfinite(lr) && lr >= 0.0, "Optimizer::set_group_lr", "expected lr >= 0, got ", lr);
        groups_[i].options.lr = lr;
    }
    void set_group_weight_decay(std::size_t i, double weight_decay) {
        check(i < groups_.size(), "Optimizer::set_group_weight_decay", "expected group < ",
              groups_.size(), ", got ", i);
        check(std::isfinite(weight_decay) && weight_decay >= 0.0, "Optimizer::set_group_weight_decay",
              "expected weight_decay >= 0, got ", weight_decay);
        groups_[i].options.weight_decay = weight_decay;
    }

    /// The lr of the optimizer's options: what a group with inherit_lr gets.
    double base_lr() const { return base_lr_; }

    /// Every parameter of every group, in group order.
    ParameterList<T> parameters() const {
        ParameterList<T> out;
        for (const auto& g : groups_) out.insert(out.end(), g.params.begin(), g.params.end());
        return out;
    }

    /// A multiplier of every group's lr, set by the schedule each step:
    /// `opt.set_lr_scale(schedule.factor(step))`.
    void set_lr_scale(double scale) {
        check(std::isfinite(scale) && scale >= 0.0, "Optimizer::set_lr_scale",
              "expected a finite scale >= 0, got ", scale);
        lr_scale_ = scale;
    }
    double lr_scale() const { return lr_scale_; }

    /// One update of every trainable parameter that has a gradient. A parameter whose
    /// gradient is empty (0 x 0, never written) is skipped, as PyTorch skips grad=None.
    void step() {
        // Check everything first, so that an error leaves every parameter untouched.
        for (const auto& g : groups_)
            for (const Parameter<T>* p : g.params)
                if (steppable(*p)) check_layout(*p);
        for (const auto& g : groups_) {
            const double lr = g.options.lr * lr_scale_;
            for (Parameter<T>* p : g.params) {
                if (!steppable(*p)) continue;
                State& s = state_for_step(*p);
                ++s.step;
                update(*p, s, lr, g.options.weight_decay);
            }
        }
    }

    /// Zeroes the gradient of every parameter in every group (trainable or not).
    void zero_grad() {
        for (const auto& g : groups_)
            for (Parameter<T>* p : g.params) p->zero_grad();
    }

    /// Carries p's state over a change of its shape or basis (see StateCarry), and records
    /// p's current layout version and shape so the next step accepts it. A no-op for a
    /// parameter without state (never stepped, or dropped).
    void carry_state(const Parameter<T>& p, const StateCarry& how) {
        const std::string what =
            detail::concat(type_name(), "::carry_state(", how.kind_name(), "): parameter '", p.name(), "'");
        const bool by_rows = how.kind() == StateCarry::Kind::reset_rows;
        for (Index k : how.indices()) {
            const Index limit = by_rows ? p.rows() : p.active_cols();
            check(k >= 0 && k < limit, what, "expected ", by_rows ? "row" : "column", " indices in [0, ",
                  limit, "), got ", k);
        }
        check(projection_of(p) == nullptr, what,
              "has a projected gradient (GaLore), whose state cannot follow a change of the weight's "
              "shape or basis; a projected layer must not be managed by a rank policy");
        auto it = states_.find(p.id());
        if (it == states_.end()) return;
        State& s = it->second;
        const Index r = p.rows(), c = p.active_cols();
        const auto names = moment_names();
        switch (how.kind()) {
            case StateCarry::Kind::grow:
            case StateCarry::Kind::slice: {
                const bool grow = how.kind() == StateCarry::Kind::grow;
                const bool ok = grow ? (r >= s.rows && c >= s.cols) : (r <= s.rows && c <= s.cols);
                check(ok, what, grow ? "grow cannot shrink" : "slice cannot enlarge", " the state from ",
                      shape_string(s.rows, s.cols), " to ", shape_string(r, c), "; use StateCarry::",
                      grow ? "slice()" : "grow()");
                for (auto name : names) {
                    Matrix<T>& m = s.moment(name);
                    // Keeps the overlapping top-left block and zero-fills the rest.
                    m.conservativeResizeLike(Matrix<T>::Zero(r, c));
                }
                break;
            }
            case StateCarry::Kind::reset_columns:
            case StateCarry::Kind::reset_rows:
                check(r == s.rows && c == s.cols, what, "needs an unchanged shape, but the state is ",
                      shape_string(s.rows, s.cols), " and the parameter ", shape_string(r, c),
                      "; use StateCarry::grow() or slice() for a change of shape");
                for (auto name : names) {
                    Matrix<T>& m = s.moment(name);
                    for (Index k : how.indices()) {
                        if (by_rows)
                            m.row(k).setZero();
                        else
                            m.col(k).setZero();
                    }
                }
                break;
            case StateCarry::Kind::reset_all:
                for (auto name : names) s.moment(name).setZero(r, c);
                s.step = 0;
                break;
            case StateCarry::Kind::drop:
                states_.erase(it);
                return;
        }
        s.layout_version = p.layout_version();
        s.rows = r;
        s.cols = c;
    }

    void drop_state(std::uint64_t id) { states_.erase(id); }
    bool has_state(std::uint64_t id) const { return states_.count(id) != 0; }

    /// p's state, or null if it has none. Valid until the state is dropped.
    const State* state_of(const Parameter<T>& p) const {
        auto it = states_.find(p.id());
        return it == states_.end() ? nullptr : &it->second;
    }

    /// Installs a state for p (a checkpoint being restored). Each of moment_names() must
    /// have p's shape; the state is stamped with p's current layout version.
    void set_state(const Parameter<T>& p, State s) {
        const std::string what = detail::concat(type_name(), "::set_state: parameter '", p.name(), "'");
        check(s.step >= 0, what, "expected step >= 0, got ", s.step);
        const auto [mr, mc] = moment_shape(p);
        for (auto name : moment_names()) check_shape(s.moment(name), mr, mc, detail::concat(what, ", moment ", name));
        const auto [pr, pc] = projector_shape(p);
        // A projected parameter's state always has its basis: the first step makes both.
        check_shape(s.projector, pr, pc, detail::concat(what, ", projector"));
        s.layout_version = p.layout_version();
        s.rows = p.rows();
        s.cols = p.active_cols();
        states_.insert_or_assign(p.id(), std::move(s));
    }

    /// Number of parameters with state.
    std::size_t num_states() const { return states_.size(); }

protected:
    /// Calls f(w, g, offset, len) for each contiguous run of p's trained entries: w and g
    /// point into p.value and p.grad, `offset` is where the run starts in the (rows x
    /// active_cols) state moments. One run for an ordinary parameter; one per row when only
    /// the leading columns are active (IncrementalRankLinear's capacity).
    template <class F>
    static void for_each_run(Parameter<T>& p, F&& f) {
        const Index k = p.active_cols(), cols = p.value.cols();
        if (k == cols) {
            f(p.value.data(), static_cast<const T*>(p.grad.data()), Index{0}, p.value.size());
            return;
        }
        for (Index i = 0; i < p.rows(); ++i)
            f(p.value.data() + i * cols, static_cast<const T*>(p.grad.data() + i * cols), i * k, k);
    }

    /// At a refresh step of a projected p (s.step already incremented): moves the basis
    /// set_projector gave into s.projector, and zeroes the moments if the projection resets
    /// them.
    void take_projector(const Parameter<T>& p, State& s) {
        Projected& pr = projections_.at(p.id());  // step() checked that a basis was given
        s.projector.swap(pr.pending);
        pr.pending.resize(0, 0);
        if (pr.projection.reset_moments)
            for (auto name : moment_names()) s.moment(name).setZero();
    }

    /// Updates p in place from p.grad with the given effective lr and weight decay.
    /// `s.step` has already been incremented (it is 1 on the first step).
    virtual void update(Parameter<T>& p, State& s, double lr, double weight_decay) = 0;

private:
    static bool steppable(const Parameter<T>& p) {
        return p.trainable && !(p.grad.size() == 0 && p.value.size() != 0);
    }

    void check_layout(const Parameter<T>& p) const {
        if (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols())
            throw Error(detail::concat(type_name(), "::step: parameter '", p.name(), "': gradient shape ",
                                       shape_string(p.grad), " does not match value shape ",
                                       shape_string(p.value)));
        if (auto pr = projections_.find(p.id()); pr != projections_.end()) {
            check(pr->second.layout_version == p.layout_version(), detail::concat(type_name(), "::step"),
                  "parameter '", p.name(), "' has a projected gradient (GaLore) but its shape or basis changed to ",
                  shape_string(p.rows(), p.active_cols()),
                  " since the projection was set; a projected layer must not be managed by a rank policy");
            check(!projection_refresh_due(p) || pr->second.pending.size() != 0,
                  detail::concat(type_name(), "::step"), "parameter '", p.name(),
                  "': this step refreshes its projected gradient's basis, but no basis was given "
                  "(set_projector after backward; the GaLore policy does this)");
        }
        auto it = states_.find(p.id());
        if (it == states_.end()) return;
        const State& s = it->second;
        if (s.layout_version != p.layout_version()) {
            if (s.rows != p.rows() || s.cols != p.active_cols())
                throw Error(detail::concat(
                    type_name(), "::step: parameter '", p.name(), "': layout changed from ",
                    shape_string(s.rows, s.cols), " to ", shape_string(p.rows(), p.active_cols()),
                    " without carry_state; call carry_state(param, StateCarry::grow() / slice() / "
                    "reset_all() / drop()) after changing a parameter's shape"));
            throw Error(detail::concat(
                type_name(), "::step: parameter '", p.name(), "': layout changed (a change of basis, shape ",
                shape_string(p.rows(), p.active_cols()), " unchanged; version ", s.layout_version, " -> ",
                p.layout_version(),
                ") without carry_state; call carry_state(param, StateCarry::reset_columns(...) / "
                "reset_all() / drop()) after changing a parameter's basis"));
        }
        if (s.rows != p.rows() || s.cols != p.active_cols())
            throw Error(detail::concat(type_name(), "::step: parameter '", p.name(), "': shape changed from ",
                                       shape_string(s.rows, s.cols), " to ", shape_string(p.rows(), p.active_cols()),
                                       " but its layout version did not; change shapes with "
                                       "Parameter::set_value (or call bump_layout), then carry_state"));
    }

    std::size_t group_index_of(const Parameter<T>* p, std::string_view caller) const {
        for (std::size_t g = 0; g < groups_.size(); ++g)
            if (std::find(groups_[g].params.begin(), groups_[g].params.end(), p) != groups_[g].params.end())
                return g;
        throw Error(detail::concat(type_name(), "::", caller, ": parameter '", p ? p->name() : std::string("(null)"),
                                   "' is in no group of this optimizer"));
    }

    State& state_for_step(const Parameter<T>& p) {
        auto it = states_.find(p.id());
        if (it != states_.end()) return it->second;
        State s;
        const auto [mr, mc] = moment_shape(p);
        for (auto name : moment_names()) s.moment(name).setZero(mr, mc);
        // A projected parameter's first step is a refresh: take_projector gives it its basis.
        s.layout_version = p.layout_version();
        s.rows = p.rows();
        s.cols = p.active_cols();
        return states_.emplace(p.id(), std::move(s)).first->second;
    }

    struct Projected {
        GradientProjection projection;
        std::uint64_t layout_version = 0;
        Matrix<T> pending;  // the basis of the next refresh (set_projector), until it is taken
    };

    std::vector<ParamGroup<T>> groups_;
    std::unordered_map<std::uint64_t, State> states_;
    std::unordered_map<std::uint64_t, Projected> projections_;
    double base_lr_ = 0.0;
    double lr_scale_ = 1.0;
    std::uint64_t membership_version_ = 0;
};

}  // namespace lowrank
