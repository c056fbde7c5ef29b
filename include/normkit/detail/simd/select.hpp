// normkit: includes the backends the compiler's target allows and names the widest
// one as simd::Best. The scalar backend is always included (it is the fallback and the
// test twin).
#pragma once

#include "../config.hpp"
#include "scalar.hpp"

#if NORMKIT_ISA >= NORMKIT_ISA_AVX2
#include "avx2.hpp"
#endif
#if NORMKIT_ISA >= NORMKIT_ISA_AVX512
#include "avx512.hpp"
#endif

namespace normkit {
namespace detail {
namespace simd {

#if NORMKIT_ISA == NORMKIT_ISA_AVX512
using Best = avx512::Isa;
#elif NORMKIT_ISA == NORMKIT_ISA_AVX2
using Best = avx2::Isa;
#else
using Best = scalar::Isa;
#endif

}  // namespace simd
}  // namespace detail
}  // namespace normkit
