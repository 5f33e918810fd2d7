#pragma once
// The one header users include.

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/memory.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/core/threads.hpp>
#include <lowrank/core/types.hpp>
#include <lowrank/data/batching.hpp>
#include <lowrank/data/idx.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/models/mlp.hpp>
#include <lowrank/nn/any_linear.hpp>
#include <lowrank/nn/deep_low_rank_linear.hpp>
#include <lowrank/nn/incremental_rank_linear.hpp>
#include <lowrank/nn/linear.hpp>
#include <lowrank/nn/low_rank_linear.hpp>
#include <lowrank/nn/spectral_linear.hpp>
#include <lowrank/optim/optim.hpp>
#include <lowrank/policy/policies.hpp>
#include <lowrank/train/evaluate.hpp>
#include <lowrank/train/metrics_log.hpp>
#include <lowrank/train/progress.hpp>
