#pragma once
// Module: what a user's own model derives from (or holds) so that a training run and its
// rank policies can take it without plumbing (docs/own_model.md).
//
// A model that a TrainingRun trains provides two things (the TrainableModel concept):
//
//     ParameterList<T> parameters();          every parameter, in a fixed order
//     std::vector<LayerSlot<T>> layer_slots(); the linear layers a policy may change,
//                                              each an AnyLinear with a name and a role
//
// Mlp and Gpt2 write these by hand. Module writes them from a registry, in the spirit of
// libtorch's register_module: a layer registered by name lives in the module's own stable
// storage (the returned reference stays valid when the module moves, and when a policy
// swaps the layer in its slot), and parameters() is read from the registry, so it follows
// every swap. Registration order is the order of parameters() and of layer_slots().

#include <lowrank/core/error.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/nn/any_linear.hpp>

#include <concepts>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace lowrank {

/// What a TrainingRun needs of a model: its parameters and its linear slots (which may be
/// none). The slots' AnyLinear objects must stay at their addresses for the run's life.
template <class M, class T>
concept TrainableModel = requires(M& m) {
    { m.parameters() } -> std::convertible_to<ParameterList<T>>;
    { m.layer_slots() } -> std::convertible_to<std::vector<LayerSlot<T>>>;
};

/// Options of a linear slot that Module::linear builds.
struct SlotOptions {
    /// What a policy's selector can match besides the name ("hidden", "attn_qkv", ...).
    std::string role = "linear";
    bool bias = true;
};

template <class T>
class Module {
public:
    /// `prefix` goes before every registered name ("encoder." names "encoder.fc1").
    explicit Module(std::string prefix = {}) : prefix_(std::move(prefix)) {}
    Module(const Module&) = delete;
    Module& operator=(const Module&) = delete;
    Module(Module&&) noexcept = default;
    Module& operator=(Module&&) noexcept = default;
    virtual ~Module() = default;

    /// A dense (out x in) linear layer named prefix + name, in a slot a policy may swap.
    AnyLinear<T>& linear(const std::string& name, Index in, Index out, Rng& rng,
                         const SlotOptions& options = {}) {
        return register_linear(Linear<T>(full_name(name), in, out, rng, LinearOptions{.bias = options.bias}),
                               options.role);
    }

    /// Takes a layer of any linear type (its name must be unique in the module).
    template <class Layer>
    AnyLinear<T>& register_linear(Layer layer, std::string role = "linear") {
        check_new_name(layer.name(), "register_linear");
        auto slot = std::make_unique<AnyLinear<T>>(std::move(layer));
        AnyLinear<T>& ref = *slot;
        entries_.push_back(Entry{SlotEntry{std::move(slot), std::move(role)}});
        return ref;
    }

    /// A parameter the module owns, named prefix + name (a LayerNorm gain, an embedding).
    Parameter<T>& parameter(const std::string& name, Matrix<T> value, bool trainable = true) {
        check_new_name(full_name(name), "parameter");
        auto p = std::make_unique<Parameter<T>>(full_name(name), std::move(value), trainable);
        Parameter<T>& ref = *p;
        entries_.push_back(Entry{std::move(p)});
        return ref;
    }

    /// A child module: its parameters and slots follow in registration order. Give the
    /// child a prefix of its own (Module(prefix)) so its names stay unique.
    template <std::derived_from<Module<T>> Child>
    Child& register_module(std::unique_ptr<Child> child) {
        check(child != nullptr, "Module::register_module", "the child module is null");
        Child& ref = *child;
        for (const auto* p : ref.parameters()) check_new_name(p->name(), "register_module");
        entries_.push_back(Entry{std::unique_ptr<Module<T>>(std::move(child))});
        return ref;
    }

    /// Every parameter, registration order; a slot contributes its current layer's.
    ParameterList<T> parameters() {
        ParameterList<T> out;
        for (auto& e : entries_) {
            if (auto* s = std::get_if<SlotEntry>(&e.item))
                for (auto* p : s->layer->parameters()) out.push_back(p);
            else if (auto* p = std::get_if<std::unique_ptr<Parameter<T>>>(&e.item))
                out.push_back(p->get());
            else
                for (auto* q : std::get<std::unique_ptr<Module<T>>>(e.item)->parameters()) out.push_back(q);
        }
        return out;
    }

    /// Every linear slot with its role, registration order (children's included).
    std::vector<LayerSlot<T>> layer_slots() {
        std::vector<LayerSlot<T>> out;
        for (auto& e : entries_) {
            if (auto* s = std::get_if<SlotEntry>(&e.item))
                out.push_back({s->layer.get(), s->role});
            else if (auto* m = std::get_if<std::unique_ptr<Module<T>>>(&e.item))
                for (auto& slot : (*m)->layer_slots()) out.push_back(slot);
        }
        return out;
    }

    const std::string& prefix() const { return prefix_; }

private:
    struct SlotEntry {
        std::unique_ptr<AnyLinear<T>> layer;
        std::string role;
    };
    struct Entry {
        std::variant<SlotEntry, std::unique_ptr<Parameter<T>>, std::unique_ptr<Module<T>>> item;
    };

    std::string full_name(const std::string& name) const { return prefix_ + name; }

    void check_new_name(const std::string& name, std::string_view what) {
        const std::string where = detail::concat("Module::", what);
        check(!name.empty(), where, "expected a name, got an empty one");
        for (auto* p : parameters()) {
            // A layer "fc1" owns "fc1.weight": a name may not be another's prefix either.
            const bool clash = p->name() == name || p->name().starts_with(name + ".");
            check(!clash, where, "the name '", name, "' is taken (by parameter '", p->name(), "')");
        }
        for (auto& s : layer_slots())
            check(s.layer->name() != name, where, "the name '", name, "' is taken (by a linear layer)");
    }

    std::string prefix_;
    std::vector<Entry> entries_;
};

}  // namespace lowrank
