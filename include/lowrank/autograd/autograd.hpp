#pragma once
// The autograd module: the tape and every op.

#include <lowrank/autograd/gradcheck.hpp>
#include <lowrank/autograd/graph.hpp>
#include <lowrank/autograd/ops_activation.hpp>
#include <lowrank/autograd/ops_attention.hpp>
#include <lowrank/autograd/ops_basic.hpp>
#include <lowrank/autograd/ops_linear.hpp>
#include <lowrank/autograd/ops_linear_cross_entropy.hpp>
#include <lowrank/autograd/ops_loss.hpp>
#include <lowrank/autograd/ops_norm.hpp>
