#pragma once
// The one place a training run hands its gradients to someone else: a GradientReducer turns
// the gradients (and the loss) of one process's share of a batch into those of the whole
// batch. DataParallel (<lowrank/dist/data_parallel.hpp>) is one, over MPI; the run knows
// nothing else about processes (docs/distributed.md).

#include <lowrank/core/parameter.hpp>

namespace lowrank {

template <class T>
class GradientReducer {
public:
    virtual ~GradientReducer() = default;

    /// Called by TrainingRun::step after backward and before the policies' after_backward,
    /// so that the policies, the gradient norm, clipping and the update all see the whole
    /// batch's gradient. Replaces every trainable gradient of `params` by the whole batch's
    /// and returns the whole batch's loss. `local_loss` may be non-finite (the process then
    /// ran no backward and its gradients are zero): the result must then be non-finite on
    /// every process, so that all of them take the same non-finite path.
    virtual double reduce(const ParameterList<T>& params, double local_loss) = 0;
};

}  // namespace lowrank
