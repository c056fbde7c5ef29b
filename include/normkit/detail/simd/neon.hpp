// normkit: the AArch64 Advanced SIMD (NEON) backend (4 floats or 2 doubles per
// register). Every AArch64 CPU has it, double-precision lanes and fused multiply-add
// included, so it needs no compiler flag.
#pragma once

#include <arm_neon.h>

#include <cstddef>

namespace normkit {
namespace detail {
namespace simd {
namespace neon {

template <class T>
struct Pack;

template <>
struct Pack<float> {
  using V = float32x4_t;
  static constexpr std::size_t W = 4;
  static V load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, V v) { vst1q_f32(p, v); }
  // AArch64 has no non-temporal store of one register (STNP stores pairs, and only as a
  // hint): an ordinary store. Isa::fence() orders nothing then, as scalar's.
  static void stream(float* p, V v) { vst1q_f32(p, v); }
  static V set1(float a) { return vdupq_n_f32(a); }
  static V add(V a, V b) { return vaddq_f32(a, b); }
  static V sub(V a, V b) { return vsubq_f32(a, b); }
  static V mul(V a, V b) { return vmulq_f32(a, b); }
  // a * b + c, one rounding (FMLA); vfmaq_f32 takes the addend first.
  static V fmadd(V a, V b, V c) { return vfmaq_f32(c, a, b); }
  // Lanes 0-1, then lanes 2-3, each converted to double exactly.
  template <class F>
  static void widen(V v, F&& f) {
    f(vcvt_f64_f32(vget_low_f32(v)));
    f(vcvt_high_f64_f32(v));
  }
};

template <>
struct Pack<double> {
  using V = float64x2_t;
  static constexpr std::size_t W = 2;
  static V load(const double* p) { return vld1q_f64(p); }
  static void store(double* p, V v) { vst1q_f64(p, v); }
  static void stream(double* p, V v) { vst1q_f64(p, v); }
  static V set1(double a) { return vdupq_n_f64(a); }
  static V add(V a, V b) { return vaddq_f64(a, b); }
  static V sub(V a, V b) { return vsubq_f64(a, b); }
  static V mul(V a, V b) { return vmulq_f64(a, b); }
  static V fmadd(V a, V b, V c) { return vfmaq_f64(c, a, b); }
  template <class F>
  static void widen(V v, F&& f) { f(v); }
};

struct Acc : Pack<double> {
  static V zero() { return vdupq_n_f64(0.0); }
  static double reduce(V a) { return vaddvq_f64(a); }
};

struct Isa {
  static constexpr int level = 1;
  static constexpr const char* name = "neon";
  static constexpr bool has_fma = true;  // fmadd and the kernels' scalar paths fused
  template <class T>
  using Pack = neon::Pack<T>;
  using Acc = neon::Acc;
  // Streaming stores are ordinary stores here: nothing to order.
  static void fence() {}
  template <class F>
  static void run(F&& f) { f(); }
};

}  // namespace neon
}  // namespace simd
}  // namespace detail
}  // namespace normkit
