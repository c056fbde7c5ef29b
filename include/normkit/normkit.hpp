// normkit: normalization kernels over Eigen tensors. The umbrella header.
#pragma once

#define NORMKIT_VERSION_MAJOR 0
#define NORMKIT_VERSION_MINOR 1
#define NORMKIT_VERSION_PATCH 0

#include "layer_norm.hpp"
#include "rms_norm.hpp"
#include "batch_norm.hpp"
#include "group_norm.hpp"
#include "instance_norm.hpp"
#include "adaptive_layer_norm.hpp"
