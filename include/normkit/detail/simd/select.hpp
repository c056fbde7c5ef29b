// normkit: includes the backends this build compiles and names the one the ops use by
// default as simd::Best. The scalar backend is always included (it is the fallback and
// the test twin).
//
// Compile-time selection (the target flags enable the widest allowed backend, as with
// -march=native): Best is that backend. Runtime dispatch (NORMKIT_DISPATCH, config.hpp:
// x86-64 built without the flags of a backend NORMKIT_MAX_ISA allows): every backend up
// to NORMKIT_MAX_ISA is compiled with target attributes, and Best is simd::Dynamic,
// which dispatch.hpp resolves once per process to the widest one the CPU runs.
#pragma once

#include "../config.hpp"
#include "scalar.hpp"

#if defined(NORMKIT_ARCH_X86) && NORMKIT_COMPILED_ISA >= NORMKIT_ISA_AVX2
#include "avx2.hpp"
#endif
#if defined(NORMKIT_ARCH_X86) && NORMKIT_COMPILED_ISA >= NORMKIT_ISA_AVX512
#include "avx512.hpp"
#endif
#if defined(NORMKIT_ARCH_ARM64) && NORMKIT_ISA >= NORMKIT_ISA_NEON
#include "neon.hpp"
#endif

namespace normkit {
namespace detail {
namespace simd {

// The runtime choice among the compiled backends (dispatch.hpp).
struct Dynamic {
  static constexpr int level = -1;
  static constexpr const char* name = "dynamic";
};

#if defined(NORMKIT_DISPATCH)
using Best = Dynamic;
#elif defined(NORMKIT_ARCH_ARM64) && NORMKIT_ISA == NORMKIT_ISA_NEON
using Best = neon::Isa;
#elif defined(NORMKIT_ARCH_X86) && NORMKIT_ISA == NORMKIT_ISA_AVX512
using Best = avx512::Isa;
#elif defined(NORMKIT_ARCH_X86) && NORMKIT_ISA == NORMKIT_ISA_AVX2
using Best = avx2::Isa;
#else
using Best = scalar::Isa;
#endif

}  // namespace simd
}  // namespace detail
}  // namespace normkit
