#pragma once
// Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay,
// with torch.optim.SGD's semantics.

#include <lowrank/optim/optimizer.hpp>

#include <array>
#include <cmath>
#include <span>
#include <string_view>
#include <utility>

namespace lowrank {

struct SgdOptions {
    double lr = 1e-2;
    double momentum = 0.0;
    double dampening = 0.0;
    /// L2 penalty: weight_decay * p is added to the gradient.
    double weight_decay = 0.0;
    bool nesterov = false;
};

/// With d = grad + weight_decay * p, one step is
///   buf = d on the first step, else momentum * buf + (1 - dampening) * d
///   p  -= lr * (nesterov ? d + momentum * buf : buf)       (p -= lr * d without momentum)
/// exactly as torch.optim.SGD.
template <class T>
class Sgd : public Optimizer<T> {
public:
    using typename Optimizer<T>::State;

    explicit Sgd(ParameterList<T> params, SgdOptions options = {})
        : Optimizer<T>(std::move(params), first_group(options)), options_(options) {}

    const SgdOptions& options() const { return options_; }

    std::string_view type_name() const override { return "Sgd"; }

    std::span<const std::string_view> moment_names() const override {
        // Without momentum SGD keeps only the step count, as PyTorch keeps no buffer.
        static constexpr std::array<std::string_view, 1> with_momentum{"momentum"};
        if (options_.momentum == 0.0) return {};
        return with_momentum;
    }

protected:
    void update(Parameter<T>& p, State& s, double lr, double weight_decay) override {
        const T lr_t = static_cast<T>(lr), wd = static_cast<T>(weight_decay);
        const T mom = static_cast<T>(options_.momentum);
        const T damp = static_cast<T>(1.0 - options_.dampening);
        // The branches are hoisted out of the loop so that each loop vectorises.
        const bool first = s.step == 1;
        this->for_each_run(p, [&](T* w, const T* g, Index offset, Index len) {
            if (options_.momentum == 0.0) {
                detail::for_each_block(len, [&](Index begin, Index end) {
                    for (Index i = begin; i < end; ++i) w[i] -= lr_t * (g[i] + wd * w[i]);
                });
                return;
            }
            T* b = s.momentum.data() + offset;
            detail::for_each_block(len, [&](Index begin, Index end) {
                if (first && options_.nesterov)
                    momentum_kernel<true, true>(w, g, b, begin, end, lr_t, wd, mom, damp);
                else if (first)
                    momentum_kernel<true, false>(w, g, b, begin, end, lr_t, wd, mom, damp);
                else if (options_.nesterov)
                    momentum_kernel<false, true>(w, g, b, begin, end, lr_t, wd, mom, damp);
                else
                    momentum_kernel<false, false>(w, g, b, begin, end, lr_t, wd, mom, damp);
            });
        });
    }

private:
    template <bool First, bool Nesterov>
    static void momentum_kernel(T* w, const T* g, T* b, Index begin, Index end, T lr, T wd, T mom,
                                T damp) {
        for (Index i = begin; i < end; ++i) {
            const T d = g[i] + wd * w[i];
            // PyTorch starts the buffer as a copy of d, not as (1 - dampening) * d.
            const T buf = First ? d : mom * b[i] + damp * d;
            b[i] = buf;
            w[i] -= lr * (Nesterov ? d + mom * buf : buf);
        }
    }

    static GroupOptions first_group(const SgdOptions& o) {
        constexpr std::string_view what = "Sgd";
        check(std::isfinite(o.lr) && o.lr >= 0.0, what, "expected lr >= 0, got ", o.lr);
        check(std::isfinite(o.momentum) && o.momentum >= 0.0, what, "expected momentum >= 0, got ",
              o.momentum);
        check(std::isfinite(o.dampening), what, "expected a finite dampening, got ", o.dampening);
        check(std::isfinite(o.weight_decay) && o.weight_decay >= 0.0, what,
              "expected weight_decay >= 0, got ", o.weight_decay);
        check(!o.nesterov || (o.momentum > 0.0 && o.dampening == 0.0), what,
              "nesterov needs momentum > 0 and dampening = 0, got momentum = ", o.momentum,
              ", dampening = ", o.dampening);
        return GroupOptions{.lr = o.lr, .weight_decay = o.weight_decay, .name = {}};
    }

    SgdOptions options_;
};

}  // namespace lowrank
