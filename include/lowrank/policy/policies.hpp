#pragma once
// Every rank policy: the interface and the methods (docs/methods/).

#include <lowrank/policy/cuttlefish.hpp>
#include <lowrank/policy/deep_lora.hpp>
#include <lowrank/policy/galore.hpp>
#include <lowrank/policy/inrank.hpp>
#include <lowrank/policy/lora.hpp>
#include <lowrank/policy/policy_state.hpp>
#include <lowrank/policy/rank_log.hpp>
#include <lowrank/policy/rank_policy.hpp>
#include <lowrank/policy/relora.hpp>
#include <lowrank/policy/sst.hpp>
