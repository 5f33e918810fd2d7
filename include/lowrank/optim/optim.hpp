#pragma once
// Optimizers, learning-rate schedules and gradient clipping: the one include for training.

#include <lowrank/optim/adam.hpp>
#include <lowrank/optim/clip.hpp>
#include <lowrank/optim/optimizer.hpp>
#include <lowrank/optim/schedule.hpp>
#include <lowrank/optim/sgd.hpp>
