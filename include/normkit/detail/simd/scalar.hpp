// normkit: the scalar backend. Always present: it is the fallback on every target and
// the twin that every wider backend is tested against.
#pragma once

#include <cmath>
#include <cstddef>

#include "../config.hpp"

namespace normkit {
namespace detail {
namespace simd {
namespace scalar {

// One lane of T; accumulation in double (Acc::V).
template <class T>
struct Pack {
  using V = T;
  static constexpr std::size_t W = 1;
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static void stream(T* p, V v) { *p = v; }
  static V set1(T a) { return a; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  // Fused where the target has FMA, as the vector backends' fmadd, whatever the
  // optimization level: g++ contracts a * b + c into an fma at -O2 but not at -O1, so an
  // unfused expression would round differently in Release and sanitizer builds.
  static V fmadd(V a, V b, V c) {
#if defined(NORMKIT_HAS_FMA)
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
  }
  // Calls f once per double-width part of v (for float: one part).
  template <class F>
  static void widen(V v, F&& f) { f(static_cast<double>(v)); }
};

struct Acc {
  using V = double;
  static constexpr std::size_t W = 1;
  static V zero() { return 0.0; }
  static V set1(double a) { return a; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fmadd(V a, V b, V c) {
#if defined(NORMKIT_HAS_FMA)
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
  }
  static double reduce(V a) { return a; }
  static V load(const double* p) { return *p; }
  static void store(double* p, V v) { *p = v; }
};

struct Isa {
  static constexpr int level = 0;
  static constexpr const char* name = "scalar";
#if defined(NORMKIT_HAS_FMA)
  static constexpr bool has_fma = true;  // fmadd and the kernels' scalar paths fused
#else
  static constexpr bool has_fma = false;
#endif
  template <class T>
  using Pack = scalar::Pack<T>;
  using Acc = scalar::Acc;
  static void fence() {}
  // The door into this backend's code: a plain call (the x86 backends compile f for
  // their target there).
  template <class F>
  static void run(F&& f) {
    f();
  }
};

}  // namespace scalar
}  // namespace simd
}  // namespace detail
}  // namespace normkit
