// normkit/extern_templates.hpp: compile normkit's engines once per program instead of
// once per translation unit (optional; the library stays header-only without it).
//
// Every op call compiles, for each backend simd::visit can choose (with runtime
// dispatch: scalar, AVX2 and AVX-512, and for bfloat16 storage AVX-512 BF16 as well),
// its engine: argument checks, statistics, and the hot regions flattened for their target. A program with many translation units that use
// normkit compiles these again in each. To compile them once:
//   - include <normkit/extern_templates.hpp> instead of <normkit/normkit.hpp> in every
//     translation unit that uses normkit: it declares the engines `extern template`, for
//     float, double, bfloat16 and half;
//   - in exactly one translation unit, define NORMKIT_INSTANTIATE before including it:
//     that one compiles them all. To spread the work over several translation units,
//     define instead, each in one translation unit, NORMKIT_INSTANTIATE_ROW (LayerNorm,
//     RMSNorm, their fused residual, AdaNorm), NORMKIT_INSTANTIATE_ADAPTIVE (the
//     modulated and element-wise AdaptiveLayerNorm), NORMKIT_INSTANTIATE_NARROW (the
//     bfloat16 and half storage of all of these; or, in two translation units,
//     NORMKIT_INSTANTIATE_NARROW_BF16 and NORMKIT_INSTANTIATE_NARROW_HALF), NORMKIT_INSTANTIATE_CHANNEL
//     (BatchNorm, GroupNorm, InstanceNorm) and NORMKIT_INSTANTIATE_NARROW_CHANNEL (their
//     bfloat16 and half storage).
// All translation units must see the same configuration macros (NORMKIT_MAX_ISA,
// NORMKIT_NO_DISPATCH, ...) and target flags, as for any header-only library. Ops with
// an explicit non-default Isa argument are compiled where used, as usual.
#pragma once

#include "detail/engines.hpp"

#if defined(NORMKIT_INSTANTIATE)
#define NORMKIT_INSTANTIATE_ROW
#define NORMKIT_INSTANTIATE_ADAPTIVE
#define NORMKIT_INSTANTIATE_NARROW
#define NORMKIT_INSTANTIATE_CHANNEL
#define NORMKIT_INSTANTIATE_NARROW_CHANNEL
#endif
#if defined(NORMKIT_INSTANTIATE_NARROW)
#define NORMKIT_INSTANTIATE_NARROW_BF16
#define NORMKIT_INSTANTIATE_NARROW_HALF
#endif

#define NORMKIT_EXTERN_ROW_(I, unused) NORMKIT_ROW_GROUP_(I, extern)
#define NORMKIT_DEFINE_ROW_(I, unused) NORMKIT_ROW_GROUP_(I, )
#define NORMKIT_EXTERN_ADAPTIVE_(I, unused) NORMKIT_ADAPTIVE_GROUP_(I, extern)
#define NORMKIT_DEFINE_ADAPTIVE_(I, unused) NORMKIT_ADAPTIVE_GROUP_(I, )
#define NORMKIT_EXTERN_NARROW_HALF_(I, unused) NORMKIT_NARROW_HALF_GROUP_(I, extern)
#define NORMKIT_DEFINE_NARROW_HALF_(I, unused) NORMKIT_NARROW_HALF_GROUP_(I, )
#define NORMKIT_EXTERN_CHANNEL_(I, unused) NORMKIT_CHANNEL_GROUP_(I, extern)
#define NORMKIT_DEFINE_CHANNEL_(I, unused) NORMKIT_CHANNEL_GROUP_(I, )
#define NORMKIT_EXTERN_NARROW_CHANNEL_(I, unused) NORMKIT_NARROW_CHANNEL_GROUP_(I, extern)
#define NORMKIT_DEFINE_NARROW_CHANNEL_(I, unused) NORMKIT_NARROW_CHANNEL_GROUP_(I, )
#define NORMKIT_EXTERN_NARROW_BF16_(I, unused) NORMKIT_NARROW_BF16_GROUP_(I, extern)
#define NORMKIT_DEFINE_NARROW_BF16_(I, unused) NORMKIT_NARROW_BF16_GROUP_(I, )
#define NORMKIT_EXTERN_NARROW_CHANNEL_BF16_(I, unused) NORMKIT_NARROW_CHANNEL_BF16_GROUP_(I, extern)
#define NORMKIT_DEFINE_NARROW_CHANNEL_BF16_(I, unused) NORMKIT_NARROW_CHANNEL_BF16_GROUP_(I, )

#if defined(NORMKIT_INSTANTIATE_ROW)
NORMKIT_EACH_ISA(NORMKIT_DEFINE_ROW_, 0)
#else
NORMKIT_EACH_ISA(NORMKIT_EXTERN_ROW_, 0)
#endif
#if defined(NORMKIT_INSTANTIATE_ADAPTIVE)
NORMKIT_EACH_ISA(NORMKIT_DEFINE_ADAPTIVE_, 0)
#else
NORMKIT_EACH_ISA(NORMKIT_EXTERN_ADAPTIVE_, 0)
#endif
#if defined(NORMKIT_INSTANTIATE_NARROW_BF16)
NORMKIT_EACH_ISA(NORMKIT_DEFINE_NARROW_BF16_, 0)
NORMKIT_BF16_ISA(NORMKIT_DEFINE_NARROW_BF16_, 0)
#else
NORMKIT_EACH_ISA(NORMKIT_EXTERN_NARROW_BF16_, 0)
NORMKIT_BF16_ISA(NORMKIT_EXTERN_NARROW_BF16_, 0)
#endif
#if defined(NORMKIT_INSTANTIATE_NARROW_HALF)
NORMKIT_EACH_ISA(NORMKIT_DEFINE_NARROW_HALF_, 0)
#else
NORMKIT_EACH_ISA(NORMKIT_EXTERN_NARROW_HALF_, 0)
#endif
#if defined(NORMKIT_INSTANTIATE_CHANNEL)
NORMKIT_EACH_ISA(NORMKIT_DEFINE_CHANNEL_, 0)
#else
NORMKIT_EACH_ISA(NORMKIT_EXTERN_CHANNEL_, 0)
#endif
#if defined(NORMKIT_INSTANTIATE_NARROW_CHANNEL)
NORMKIT_EACH_ISA(NORMKIT_DEFINE_NARROW_CHANNEL_, 0)
NORMKIT_BF16_ISA(NORMKIT_DEFINE_NARROW_CHANNEL_BF16_, 0)
#else
NORMKIT_EACH_ISA(NORMKIT_EXTERN_NARROW_CHANNEL_, 0)
NORMKIT_BF16_ISA(NORMKIT_EXTERN_NARROW_CHANNEL_BF16_, 0)
#endif
