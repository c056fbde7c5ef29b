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

// NORMKIT_EXTERN_TEMPLATES (defined for the whole program, e.g. with CMake's
// target_compile_definitions): this header declares the engines extern as
// <normkit/extern_templates.hpp> does, without changing the program's includes. One
// translation unit must then compile them (NORMKIT_INSTANTIATE, or each group once).
#if defined(NORMKIT_EXTERN_TEMPLATES)
#include "extern_templates.hpp"
#endif
