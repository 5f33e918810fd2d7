#pragma once
// Gradient checking by central differences, in double.

#include <lowrank/autograd/graph.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/rng.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace lowrank {

struct GradcheckOptions {
    double eps = 1e-6;             // finite-difference step
    double tolerance = 1e-5;       // largest accepted error
    double scale_floor = 1e-3;     // error = |a - n| / max(|a|, |n|, scale_floor)
    Index samples_per_tensor = 24; // random coordinates checked per tensor; 0 = all
    std::uint64_t seed = 1;        // which coordinates are sampled
};

struct GradcheckResult {
    bool passed = true;
    double max_error = 0.0;
    Index checked = 0;
    std::string worst;   // the coordinate with the largest error, "name[i, j]: analytic a, numeric n"
    std::string report;  // one line per failing coordinate
};

/// Compares the gradient that `loss_fn` back-propagates into each parameter in `wrt`
/// against central differences of the loss. `loss_fn(Graph<double>&)` records a
/// computation and returns its (1 x 1) loss; it is called once for the analytic gradient
/// and twice per sampled coordinate. The graph's generator is restored before every call,
/// so dropout draws the same mask each time. Inputs are checked by wrapping them in a
/// Parameter.
template <class Fn>
GradcheckResult gradcheck(Fn&& loss_fn, const ParameterList<double>& wrt, const GradcheckOptions& opt = {}) {
    check(opt.eps > 0, "gradcheck", "expected eps > 0, got ", opt.eps);
    check(!wrt.empty(), "gradcheck", "expected at least one parameter to check, got none");
    // A frozen parameter keeps no gradient buffer: there would be no analytic gradient to read.
    for (const auto* p : wrt)
        check(p->trainable, "gradcheck", "parameter ", p->name(), " is not trainable, so it has no gradient");
    Graph<double> g;
    const Rng::State rng_state = g.rng().state();

    for (auto* p : wrt) p->zero_grad();
    g.clear();
    g.rng().set_state(rng_state);
    Var<double> loss = loss_fn(g);
    g.backward(loss);
    std::vector<Matrix<double>> analytic;
    analytic.reserve(wrt.size());
    for (auto* p : wrt) analytic.push_back(p->grad);

    auto eval = [&]() {
        g.clear();
        g.rng().set_state(rng_state);
        g.set_grad_enabled(false);
        const double v = loss_fn(g).item();
        g.set_grad_enabled(true);
        return v;
    };

    GradcheckResult result;
    Rng pick(opt.seed);
    std::ostringstream report;
    for (std::size_t k = 0; k < wrt.size(); ++k) {
        auto& p = *wrt[k];
        const Index size = p.value.size();
        std::vector<Index> coords(static_cast<std::size_t>(size));
        std::iota(coords.begin(), coords.end(), Index{0});
        if (opt.samples_per_tensor > 0 && size > opt.samples_per_tensor) {
            // Partial Fisher-Yates: the first samples_per_tensor entries are a random subset.
            for (Index i = 0; i < opt.samples_per_tensor; ++i) {
                const auto j = i + static_cast<Index>(pick.below(static_cast<std::uint64_t>(size - i)));
                std::swap(coords[static_cast<std::size_t>(i)], coords[static_cast<std::size_t>(j)]);
            }
            coords.resize(static_cast<std::size_t>(opt.samples_per_tensor));
        }
        for (const Index c : coords) {
            double& x = p.value.data()[c];
            const double saved = x;
            x = saved + opt.eps;
            const double plus = eval();
            x = saved - opt.eps;
            const double minus = eval();
            x = saved;
            const double numeric = (plus - minus) / (2.0 * opt.eps);
            const double a = analytic[k].data()[c];
            const double err =
                std::abs(a - numeric) / std::max({std::abs(a), std::abs(numeric), opt.scale_floor});
            ++result.checked;
            const Index row = c / p.value.cols(), col = c % p.value.cols();
            std::ostringstream where;
            where << p.name() << "[" << row << ", " << col << "]: analytic " << a << ", numeric " << numeric;
            if (!(err <= opt.tolerance)) {
                result.passed = false;
                report << where.str() << ", error " << err << "\n";
            }
            if (!(err <= result.max_error)) {
                result.max_error = err;
                result.worst = where.str();
            }
        }
    }
    result.report = report.str();
    return result;
}

}  // namespace lowrank
