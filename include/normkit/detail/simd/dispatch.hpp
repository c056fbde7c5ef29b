// normkit: the runtime choice of backend (simd::Dynamic) and the visit that routes an op
// to a backend's code.
//
// The level is chosen once per process, on first use: the widest backend that is
// compiled in, that the CPU runs (cpuid, through the compiler's __builtin_cpu_supports)
// and that the environment variable NORMKIT_ISA allows ("scalar", "avx2", "avx512" or
// "avx512bf16"; a level the CPU lacks falls back to the widest it has). NORMKIT_MAX_ISA
// caps it at compile time. avx512bf16 (AVX-512 with BF16 and DQ) differs from avx512 in
// bfloat16 storage alone, which it narrows with vcvtneps2bf16 (as a build for such a CPU
// does, the same bits); NORMKIT_MAX_ISA >= NORMKIT_ISA_AVX512 admits it.
#pragma once

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <Eigen/Core>

#include "select.hpp"

namespace normkit {
namespace detail {
namespace simd {

// The widest compiled backend the CPU runs (x86 with dispatch; otherwise Best's).
inline int cpu_level() {
#if defined(NORMKIT_DISPATCH)
  __builtin_cpu_init();
  int level = NORMKIT_ISA_SCALAR;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    level = NORMKIT_ISA_AVX2;
  if (level == NORMKIT_ISA_AVX2 && __builtin_cpu_supports("avx512f")) level = NORMKIT_ISA_AVX512;
  if (level == NORMKIT_ISA_AVX512 && __builtin_cpu_supports("avx512bf16") &&
      __builtin_cpu_supports("avx512dq"))
    level = NORMKIT_ISA_AVX512BF16;
  constexpr int cap = NORMKIT_MAX_ISA >= NORMKIT_ISA_AVX512 ? NORMKIT_ISA_AVX512BF16 : NORMKIT_MAX_ISA;
  return level < cap ? level : cap;
#else
  return NORMKIT_ISA;
#endif
}

// NORMKIT_ISA from the environment: the level it names, or -1 if unset or unknown.
inline int env_level() {
  const char* e = std::getenv("NORMKIT_ISA");
  if (e == nullptr) return -1;
  if (std::strcmp(e, "scalar") == 0) return NORMKIT_ISA_SCALAR;
  if (std::strcmp(e, "avx2") == 0) return NORMKIT_ISA_AVX2;
  if (std::strcmp(e, "avx512") == 0) return NORMKIT_ISA_AVX512;
  if (std::strcmp(e, "avx512bf16") == 0) return NORMKIT_ISA_AVX512BF16;
  return -1;
}

// The level simd::Dynamic runs, fixed at the first call.
inline int active_level() {
  static const int level = [] {
    const int cpu = cpu_level(), env = env_level();
    return env >= 0 && env < cpu ? env : cpu;
  }();
  return level;
}

inline const char* level_name(int level) {
#if defined(NORMKIT_ARCH_ARM64)
  return level >= NORMKIT_ISA_NEON ? "neon" : "scalar";
#else
  return level >= NORMKIT_ISA_AVX512BF16 ? "avx512bf16"
         : level >= NORMKIT_ISA_AVX512  ? "avx512"
         : level >= NORMKIT_ISA_AVX2    ? "avx2"
                                        : "scalar";
#endif
}

// Calls f(I{}) with the backend Isa stands for: Isa itself, or for Dynamic the one
// active_level() names. T: the op's data type (the avx512bf16 level is a backend of its
// own for bfloat16 alone; void: not bfloat16).
template <class Isa, class T = void, class F>
decltype(auto) visit(F&& f) {
  if constexpr (std::is_same<Isa, Dynamic>::value) {
#if defined(NORMKIT_DISPATCH)
#if NORMKIT_COMPILED_ISA >= NORMKIT_ISA_AVX512
    if constexpr (std::is_same<T, Eigen::bfloat16>::value)
      if (active_level() >= NORMKIT_ISA_AVX512BF16) return f(avx512bf16::Isa{});
    if (active_level() >= NORMKIT_ISA_AVX512) return f(avx512::Isa{});
#endif
#if NORMKIT_COMPILED_ISA >= NORMKIT_ISA_AVX2
    if (active_level() >= NORMKIT_ISA_AVX2) return f(avx2::Isa{});
#endif
    return f(scalar::Isa{});
#else
    return f(Best{});
#endif
  } else {
    return f(Isa{});
  }
}

}  // namespace simd
}  // namespace detail

// The backend the ops run with their default Isa: "avx512bf16" (runtime dispatch: AVX-512
// with bfloat16 narrowed by its BF16 instruction), "avx512", "avx2", "neon" or "scalar".
inline const char* active_isa() {
  using Best = detail::simd::Best;
  if constexpr (std::is_same<Best, detail::simd::Dynamic>::value)
    return detail::simd::level_name(detail::simd::active_level());
  else
    return Best::name;
}

}  // namespace normkit
