#pragma once
// Rank policies: strategy objects that the training loop calls at fixed points of a step
// and that change the rank, the type or the basis of the model's linear layers (DESIGN.md
// section 5).
//
//     on_train_begin   once, after the model and the optimizer exist (convert layers)
//     before_forward   every step, before the forward pass        (SST: sample columns)
//     after_backward   every step, gradients are complete          (Frobenius decay, ...)
//     after_step       every step, after optimizer.step()          (InRank, ReLoRA, SST)
//     on_epoch_end     after each epoch                            (Cuttlefish)
//
// A policy sees the model through a TrainingContext: the model's linear slots (AnyLinear)
// with their roles, the optimizer, the LR schedule, the step counters and the rank log.
// When it swaps a layer or changes a parameter's shape it goes through the context, which
// keeps the optimizer's groups and state consistent.
//
// The loop, with `policies` a PolicyList and `ctx` its context:
//
//     policies.on_train_begin(ctx);
//     for each epoch: for each batch:
//         policies.before_forward(ctx);
//         forward; optimizer.zero_grad(); backward;
//         policies.after_backward(ctx);
//         schedule.apply(optimizer, ctx.step); optimizer.step();
//         ++ctx.step; policies.after_step(ctx);
//       policies.on_epoch_end(ctx); ++ctx.epoch;
//
// Resuming (docs/methods/README.md, "Saving and resuming"): a checkpoint stores
// `policies.state()`, a JSON document with each policy's counters, generators, histories
// and the structure of every layer it manages. To resume, rebuild the model and the
// optimizer as at step 0, call `policies.on_train_begin(ctx)`, then
// `policies.restore(ctx, saved)`: the policies take back their state and reshape their
// layers (ranks, active columns, switched or compressed layers, optimizer groups) to the
// saved structure. Only then load the parameter values and the optimizer state by name.

#include <lowrank/core/error.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/nn/any_linear.hpp>
#include <lowrank/optim/optimizer.hpp>
#include <lowrank/optim/schedule.hpp>
#include <lowrank/policy/rank_log.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowrank {

/// Names the layers a policy acts on: a regular expression that must match the whole
/// layer name (ECMAScript syntax) and, if `roles` is not empty, one of the roles.
struct LayerSelector {
    std::string pattern = ".*";
    std::vector<std::string> roles{};

    bool matches(const std::string& name, const std::string& role) const {
        if (!roles.empty() && std::find(roles.begin(), roles.end(), role) == roles.end()) return false;
        try {
            return std::regex_match(name, std::regex(pattern));
        } catch (const std::regex_error& e) {
            throw Error(detail::concat("LayerSelector: invalid pattern '", pattern, "': ", e.what()));
        }
    }
};

template <class T>
class TrainingContext {
public:
    TrainingContext(std::vector<LayerSlot<T>> layers, Optimizer<T>& optimizer, LrSchedule& schedule,
                    RankLog& log)
        : layers_(std::move(layers)), optimizer_(&optimizer), schedule_(&schedule), log_(&log) {
        for (std::size_t i = 0; i < layers_.size(); ++i)
            check(layers_[i].layer != nullptr, "TrainingContext", "layer slot ", i, " is null");
    }

    std::int64_t step = 0;             // optimizer steps taken so far
    std::int64_t epoch = 0;            // current epoch, 0-based
    std::int64_t steps_per_epoch = 0;  // 0 if unknown
    std::int64_t total_steps = 0;      // 0 if unknown

    std::vector<LayerSlot<T>>& layers() { return layers_; }
    Optimizer<T>& optimizer() { return *optimizer_; }
    LrSchedule& schedule() { return *schedule_; }
    RankLog& log() { return *log_; }

    /// The slots a selector names, in model order. An empty result is an error: a policy
    /// that silently acts on nothing is a configuration mistake.
    std::vector<LayerSlot<T>*> select(const LayerSelector& selector, std::string_view policy) {
        std::vector<LayerSlot<T>*> out;
        for (auto& s : layers_)
            if (selector.matches(s.layer->name(), s.role)) out.push_back(&s);
        if (out.empty()) {
            std::string names;
            for (const auto& s : layers_) names += (names.empty() ? "" : ", ") + s.layer->name() + " (" + s.role + ")";
            throw Error(detail::concat(policy, ": the selector (pattern '", selector.pattern,
                                       "') matches no layer; the model has: ", names));
        }
        return out;
    }

    /// Puts `layer` in the slot and updates the optimizer: the old layer's parameters leave
    /// their groups with their state; each new parameter joins the group of the old
    /// parameter with the same name (a bias keeps its no-decay group), the others join the
    /// group of the old layer's first parameter, or `group` when given.
    template <class Layer>
    void replace_layer(AnyLinear<T>& slot, Layer layer, std::optional<std::size_t> group = std::nullopt) {
        const ParameterList<T> old_params = slot.parameters();
        std::vector<std::string> old_names;
        for (const auto* p : old_params) old_names.push_back(p->name());
        const std::vector<std::size_t> old_groups = optimizer_->remove_parameters(old_params);
        slot.replace(std::move(layer));
        const std::size_t fallback = group ? *group : (old_groups.empty() ? 0 : old_groups.front());
        for (Parameter<T>* p : slot.parameters()) {
            std::size_t g = fallback;
            for (std::size_t i = 0; i < old_names.size(); ++i)
                if (old_names[i] == p->name()) g = old_groups[i];
            optimizer_->add_to_group(g, {p});
        }
    }

    /// Records a decision in the rank log, stamped with the current step and epoch.
    void record(std::string_view policy, const std::string& layer, std::string_view event, Index old_rank,
                Index new_rank, std::string_view statistic = {}, double value = std::nan("")) {
        log_->add(RankEvent{step, epoch, std::string(policy), layer, std::string(event), old_rank, new_rank,
                            std::string(statistic), value});
    }

    /// Restarts the LR warm-up at the next step for `length` steps (0: nothing).
    void rewarm(std::int64_t length) {
        if (length > 0) schedule_->rewarm(step, length);
    }

private:
    std::vector<LayerSlot<T>> layers_;
    Optimizer<T>* optimizer_;
    LrSchedule* schedule_;
    RankLog* log_;
};

namespace detail {

/// A 64-bit word as "0x" and 16 hex digits: exact for every JSON reader (many hold numbers
/// as doubles, which keep 53 bits).
inline std::string policy_state_hex(std::uint64_t v) {
    static constexpr char digits[] = "0123456789abcdef";
    std::string s = "0x";
    for (int shift = 60; shift >= 0; shift -= 4) s += digits[(v >> shift) & 0xf];
    return s;
}

/// A generator's whole state: the four words and the cached normal deviate's bit pattern as
/// hex strings, has_spare as a bool (the layout the checkpoint module uses for its RNGs).
inline nlohmann::json rng_to_policy_state(const Rng& rng) {
    const Rng::State& st = rng.state();
    nlohmann::json words = nlohmann::json::array();
    for (const std::uint64_t w : st.s) words.push_back(policy_state_hex(w));
    return {{"s", words},
            {"has_spare", st.has_spare},
            {"spare", policy_state_hex(std::bit_cast<std::uint64_t>(st.spare))}};
}

/// A double that may be NaN (a statistic not computed yet): JSON has no NaN, so it is null.
inline nlohmann::json optional_number(double v) {
    return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
}

/// Reads a saved policy state. Every error is an Error naming the policy, the key (a path
/// such as "layers[1].rank"), what was expected and what was found.
class PolicyStateReader {
public:
    PolicyStateReader(std::string_view policy, const nlohmann::json& json, std::string path = {})
        : policy_(policy), json_(&json), path_(std::move(path)) {
        if (!json.is_object())
            throw Error(concat(policy_, ": restore: expected ",
                               path_.empty() ? "the state" : "'" + path_ + "'", " to be a JSON object, got ",
                               excerpt(json)));
    }

    const nlohmann::json& json() const { return *json_; }
    const std::string& policy() const { return policy_; }
    bool has(const std::string& key) const { return json_->contains(key); }

    /// Throws unless the state's "policy" is `name`: a state saved by another policy.
    void expect_policy(std::string_view name) const {
        const std::string saved = string("policy");
        if (saved != name)
            throw Error(concat(policy_, ": restore: the state was saved by policy '", saved, "', expected '",
                               name,
                               "' (are the policies added in the saved order, with the saved methods?)"));
    }

    const nlohmann::json& at(const std::string& key, std::string_view expected) const {
        const auto it = json_->find(key);
        if (it == json_->end())
            throw Error(
                concat(policy_, ": restore: missing key '", where(key), "' (expected ", expected, ")"));
        return *it;
    }

    std::int64_t integer(const std::string& key) const {
        const nlohmann::json& v = at(key, "an integer");
        if (!is_int64(v)) fail(key, "an integer", v);
        return v.get<std::int64_t>();
    }

    /// An integer in [lo, hi] (hi = the int64 maximum: no upper bound).
    std::int64_t integer(const std::string& key, std::int64_t lo, std::int64_t hi) const {
        const std::int64_t v = integer(key);
        if (v < lo || v > hi) {
            if (hi == std::numeric_limits<std::int64_t>::max())
                throw Error(concat(policy_, ": restore: key '", where(key), "': expected an integer >= ", lo,
                                   ", got ", v));
            throw Error(concat(policy_, ": restore: key '", where(key), "': expected an integer in [", lo,
                               ", ", hi, "], got ", v));
        }
        return v;
    }

    bool boolean(const std::string& key) const {
        const nlohmann::json& v = at(key, "true or false");
        if (!v.is_boolean()) fail(key, "true or false", v);
        return v.get<bool>();
    }

    /// A number, or null for NaN (see optional_number).
    double number(const std::string& key) const {
        const nlohmann::json& v = at(key, "a number or null");
        if (v.is_null()) return std::nan("");
        if (!v.is_number()) fail(key, "a number or null", v);
        return v.get<double>();
    }

    std::string string(const std::string& key) const {
        const nlohmann::json& v = at(key, "a string");
        if (!v.is_string()) fail(key, "a string", v);
        return v.get<std::string>();
    }

    PolicyStateReader object(const std::string& key) const {
        return PolicyStateReader(policy_, at(key, "an object"), where(key));
    }

    /// An array of objects, each as a reader whose path names its index.
    std::vector<PolicyStateReader> objects(const std::string& key) const {
        const nlohmann::json& v = array(key);
        std::vector<PolicyStateReader> out;
        for (std::size_t i = 0; i < v.size(); ++i)
            out.emplace_back(policy_, v[i], concat(where(key), "[", i, "]"));
        return out;
    }

    /// An array of integers.
    std::vector<std::int64_t> integers(const std::string& key) const {
        const nlohmann::json& v = array(key);
        std::vector<std::int64_t> out;
        for (std::size_t i = 0; i < v.size(); ++i) {
            if (!is_int64(v[i]))
                throw Error(concat(policy_, ": restore: key '", where(key), "[", i,
                                   "]': expected an integer, got ", excerpt(v[i])));
            out.push_back(v[i].get<std::int64_t>());
        }
        return out;
    }

    const nlohmann::json& array(const std::string& key) const {
        const nlohmann::json& v = at(key, "an array");
        if (!v.is_array()) fail(key, "an array", v);
        return v;
    }

    /// A generator's state as rng_to_policy_state writes it (hex strings or unsigned integers).
    Rng::State rng(const std::string& key) const {
        const PolicyStateReader r = object(key);
        const nlohmann::json& words = r.array("s");
        if (words.size() != 4)
            throw Error(
                concat(policy_, ": restore: key '", r.where("s"), "': expected 4 words, got ", words.size()));
        Rng::State st;
        for (std::size_t i = 0; i < 4; ++i) st.s[i] = r.word(words[i], concat("s[", i, "]"));
        st.has_spare = r.boolean("has_spare");
        st.spare = std::bit_cast<double>(r.word(r.at("spare", "a 64-bit word"), "spare"));
        return st;
    }

    /// The path of `key` inside the state, for messages.
    std::string where(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
    const std::string& path() const { return path_; }

    /// Throws an Error about this part of the state.
    template <class... Args>
    [[noreturn]] void error(const Args&... message) const {
        throw Error(
            concat(policy_, ": restore: ", path_.empty() ? std::string() : "'" + path_ + "': ", message...));
    }

    [[noreturn]] void fail(const std::string& key, std::string_view expected,
                           const nlohmann::json& got) const {
        throw Error(concat(policy_, ": restore: key '", where(key), "': expected ", expected, ", got ",
                           excerpt(got)));
    }

    /// A JSON value for a message, shortened.
    static std::string excerpt(const nlohmann::json& v) {
        std::string s = v.dump();
        if (s.size() > 120) s = s.substr(0, 117) + "...";
        return s;
    }

private:
    static bool is_int64(const nlohmann::json& v) {
        return v.is_number_integer() &&
               !(v.is_number_unsigned() &&
                 v.get<std::uint64_t>() >
                     static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()));
    }

    std::uint64_t word(const nlohmann::json& v, const std::string& key) const {
        if (v.is_number_unsigned()) return v.get<std::uint64_t>();
        if (v.is_string()) {
            const std::string s = v.get<std::string>();
            if (s.size() > 2 && s.size() <= 18 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
                std::uint64_t x = 0;
                bool ok = true;
                for (std::size_t i = 2; i < s.size() && ok; ++i) {
                    const char c = s[i];
                    int d = -1;
                    if (c >= '0' && c <= '9')
                        d = c - '0';
                    else if (c >= 'a' && c <= 'f')
                        d = c - 'a' + 10;
                    else if (c >= 'A' && c <= 'F')
                        d = c - 'A' + 10;
                    ok = d >= 0;
                    x = (x << 4) | static_cast<std::uint64_t>(d < 0 ? 0 : d);
                }
                if (ok) return x;
            }
        }
        fail(key, "a 64-bit word (\"0x\" and up to 16 hex digits, or an unsigned integer)", v);
    }

    std::string policy_;
    const nlohmann::json* json_;
    std::string path_;
};

/// How a policy's state describes a layer it manages: its kind and each parameter's name,
/// shape, active columns and trainable flag, in the layer's order. (Not the rank: a
/// SpectralLinear's counts its positive singular values, a property of the values.)
template <class T>
nlohmann::json layer_structure(AnyLinear<T>& slot) {
    nlohmann::json params = nlohmann::json::array();
    for (const Parameter<T>* p : slot.parameters())
        params.push_back({{"name", p->name()},
                          {"rows", p->rows()},
                          {"cols", p->cols()},
                          {"active_cols", p->active_cols()},
                          {"trainable", p->trainable}});
    return {{"kind", slot.kind()}, {"parameters", params}};
}

/// Throws unless the slot now has the structure saved under `entry`'s "structure" key:
/// the last check of a restore, naming the first difference.
template <class T>
void check_layer_structure(const PolicyStateReader& entry, AnyLinear<T>& slot) {
    const nlohmann::json& saved = entry.at("structure", "an object (the layer's saved structure)");
    const nlohmann::json actual = layer_structure(slot);
    if (saved == actual) return;
    const std::string head = concat(entry.policy(), ": restore: layer '", slot.name(), "': ");
    if (!saved.is_object() || !saved.contains("kind") || !saved.contains("parameters") ||
        !saved.at("parameters").is_array())
        throw Error(concat(head, "'", entry.where("structure"),
                           "': expected an object with kind and parameters, got ",
                           PolicyStateReader::excerpt(saved)));
    if (saved.at("kind") != actual.at("kind"))
        throw Error(concat(head, "expected a ", saved.at("kind").dump(), " layer (saved), got a ",
                           actual.at("kind").dump(), " layer after restoring"));
    const nlohmann::json& sp = saved.at("parameters");
    const nlohmann::json& ap = actual.at("parameters");
    for (std::size_t i = 0; i < std::max(sp.size(), ap.size()); ++i) {
        const nlohmann::json s = i < sp.size() ? sp[i] : nlohmann::json("(none)");
        const nlohmann::json a = i < ap.size() ? ap[i] : nlohmann::json("(none)");
        if (s != a)
            throw Error(concat(head, "parameter ", i, ": expected ", s.dump(), " (saved), got ", a.dump(),
                               " after restoring"));
    }
    throw Error(concat(head, "expected the structure ", saved.dump(), " (saved), got ", actual.dump()));
}

/// Version of the policies' state documents; restore refuses any other.
inline constexpr int kPolicyStateVersion = 1;

/// The start of every policy's state: {"policy": name, "version": kPolicyStateVersion}.
inline nlohmann::json policy_state_header(std::string_view policy) {
    return {{"policy", std::string(policy)}, {"version", kPolicyStateVersion}};
}

/// A reader of `state` after checking that it is an object saved by `policy` in this version.
inline PolicyStateReader open_policy_state(std::string_view policy, const nlohmann::json& state) {
    PolicyStateReader r(policy, state);
    r.expect_policy(policy);
    const std::int64_t version = r.integer("version");
    if (version != kPolicyStateVersion)
        throw Error(concat(policy, ": restore: key 'version': expected ", kPolicyStateVersion,
                           " (the version this library reads), got ", version));
    return r;
}

/// The slots a policy manages, checked against the "layers" entries of its saved state:
/// the same number, and each entry's "name" the slot's name, in order.
inline std::vector<PolicyStateReader> matched_layers(const PolicyStateReader& state,
                                                     const std::vector<std::string>& names) {
    std::vector<PolicyStateReader> entries = state.objects("layers");
    if (entries.size() != names.size()) {
        std::string saved;
        for (const auto& e : entries) saved += (saved.empty() ? "" : ", ") + e.string("name");
        std::string now;
        for (const auto& n : names) now += (now.empty() ? "" : ", ") + n;
        throw Error(concat(state.policy(), ": restore: the state has ", entries.size(), " layer(s) (", saved,
                           "), but the policy manages ", names.size(), " (", now, ")"));
    }
    for (std::size_t i = 0; i < entries.size(); ++i) {
        const std::string saved = entries[i].string("name");
        if (saved != names[i])
            throw Error(concat(state.policy(), ": restore: key '", entries[i].where("name"),
                               "': expected layer '", names[i], "' (the policy's layer ", i,
                               " in this model), got '", saved, "'"));
    }
    return entries;
}

}  // namespace detail

template <class T>
class RankPolicy {
public:
    virtual ~RankPolicy() = default;
    /// Short lower-case name used in the rank log ("inrank", "cuttlefish", ...).
    virtual std::string_view name() const = 0;

    virtual void on_train_begin(TrainingContext<T>&) {}
    virtual void before_forward(TrainingContext<T>&) {}
    virtual void after_backward(TrainingContext<T>&) {}
    virtual void after_step(TrainingContext<T>&) {}
    virtual void on_epoch_end(TrainingContext<T>&) {}

    /// Everything the policy needs to continue exactly as if never interrupted (counters,
    /// generators, histories, per-layer decisions) and the structure of each layer it
    /// manages, as a JSON object that survives dump() and parse() bit for bit. The default,
    /// for a policy that keeps no state, is an empty object.
    virtual nlohmann::json state() const { return nlohmann::json::object(); }

    /// Takes back a state() on a freshly built model and optimizer, after on_train_begin:
    /// reinstates the internal state and reshapes the managed layers to the saved structure
    /// (parameter names, shapes, active columns, trainable flags and optimizer groups as in
    /// the saved run). Parameter values and optimizer state are the caller's to load after.
    /// Throws an Error naming the policy, the key and the expected and actual values on a
    /// state it cannot take. The default accepts only an empty state (null or {}), so a
    /// policy that does not implement this cannot resume wrongly in silence.
    virtual void restore(TrainingContext<T>& ctx, const nlohmann::json& state) {
        (void)ctx;
        if (state.is_null() || (state.is_object() && state.empty())) return;
        throw Error(detail::concat(name(),
                                   ": restore: this policy keeps no resumable state, but the saved state is ",
                                   detail::PolicyStateReader::excerpt(state)));
    }
};

/// Several policies on one model, called in the order they were added.
template <class T>
class PolicyList {
public:
    template <class Policy, class... Args>
    Policy& add(Args&&... args) {
        auto p = std::make_unique<Policy>(std::forward<Args>(args)...);
        Policy& ref = *p;
        policies_.push_back(std::move(p));
        return ref;
    }
    void add(std::unique_ptr<RankPolicy<T>> p) { policies_.push_back(std::move(p)); }

    void on_train_begin(TrainingContext<T>& c) { each([&](auto& p) { p.on_train_begin(c); }); }
    void before_forward(TrainingContext<T>& c) { each([&](auto& p) { p.before_forward(c); }); }
    void after_backward(TrainingContext<T>& c) { each([&](auto& p) { p.after_backward(c); }); }
    void after_step(TrainingContext<T>& c) { each([&](auto& p) { p.after_step(c); }); }
    void on_epoch_end(TrainingContext<T>& c) { each([&](auto& p) { p.on_epoch_end(c); }); }

    /// One entry per policy, in order: {"policy": name(), "state": state()}.
    nlohmann::json state() const {
        nlohmann::json out = nlohmann::json::array();
        for (const auto& p : policies_)
            out.push_back({{"policy", std::string(p->name())}, {"state", p->state()}});
        return out;
    }

    /// Restores each policy from a state() of the same list: the count and the names must
    /// match, in order (checked for all before any policy is touched).
    void restore(TrainingContext<T>& c, const nlohmann::json& saved) {
        constexpr std::string_view what = "PolicyList: restore";
        std::string names;
        for (const auto& p : policies_) names += (names.empty() ? "" : ", ") + std::string(p->name());
        check(saved.is_array(), what, "expected an array of {policy, state} entries, got ",
              detail::PolicyStateReader::excerpt(saved));
        std::string saved_names;
        for (const auto& e : saved)
            saved_names += (saved_names.empty() ? "" : ", ") +
                           (e.is_object() && e.contains("policy") && e.at("policy").is_string()
                                ? e.at("policy").template get<std::string>()
                                : std::string("?"));
        check(saved.size() == policies_.size(), what, "expected ", policies_.size(), " policy state(s) (",
              names, "), got ", saved.size(), " (", saved_names, ")");
        for (std::size_t i = 0; i < saved.size(); ++i) {
            const auto& e = saved[i];
            check(e.is_object() && e.contains("policy") && e.at("policy").is_string() && e.contains("state"),
                  what, "entry ", i, ": expected an object with \"policy\" (a name) and \"state\", got ",
                  detail::PolicyStateReader::excerpt(e));
            const std::string saved_name = e.at("policy").template get<std::string>();
            check(saved_name == policies_[i]->name(), what, "entry ", i, ": expected policy '",
                  policies_[i]->name(), "', got '", saved_name, "' (the saved list: ", saved_names, ")");
        }
        for (std::size_t i = 0; i < saved.size(); ++i) policies_[i]->restore(c, saved[i].at("state"));
    }

    std::size_t size() const { return policies_.size(); }
    bool empty() const { return policies_.empty(); }
    RankPolicy<T>& operator[](std::size_t i) { return *policies_.at(i); }

private:
    template <class F>
    void each(F&& f) {
        for (auto& p : policies_) f(*p);
    }
    std::vector<std::unique_ptr<RankPolicy<T>>> policies_;
};

}  // namespace lowrank
