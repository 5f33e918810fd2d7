#pragma once
// The one header users include: the whole public API. (data/unicode_tables.hpp, the BPE
// tokenizer's generated tables, comes with data/bpe.hpp.)

#include <lowrank/autograd/autograd.hpp>
#include <lowrank/core/atomic_file.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/init.hpp>
#include <lowrank/core/json_codec.hpp>
#include <lowrank/core/memory.hpp>
#include <lowrank/core/parallel.hpp>
#include <lowrank/core/parameter.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/core/threads.hpp>
#include <lowrank/core/types.hpp>
#include <lowrank/data/batching.hpp>
#include <lowrank/data/bpe.hpp>
#include <lowrank/data/idx.hpp>
#include <lowrank/data/tokens.hpp>
#include <lowrank/io/checkpoint.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/linalg/svd.hpp>
#include <lowrank/linalg/thin_gemm.hpp>
#include <lowrank/models/gpt2.hpp>
#include <lowrank/models/gpt2_weights.hpp>
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
