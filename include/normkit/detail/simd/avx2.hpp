// normkit: the AVX2 + FMA backend (8 floats or 4 doubles per register).
//
// Every function carries the backend's target (NORMKIT_AVX2_FN, target.hpp), so that it
// compiles without -mavx2 for runtime dispatch; registers travel wrapped in a struct (V),
// which clang accepts across functions compiled without AVX where a bare __m256 would
// change the calling convention.
#pragma once

#include <immintrin.h>

#include <cstddef>

#include "target.hpp"

namespace normkit {
namespace detail {
namespace simd {
namespace avx2 {

template <class T>
struct Pack;

template <>
struct Pack<double> {
  struct V {
    __m256d v;
  };
  static constexpr std::size_t W = 4;
  static NORMKIT_AVX2_FN V load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static NORMKIT_AVX2_FN void store(double* p, const V& a) { _mm256_storeu_pd(p, a.v); }
  static NORMKIT_AVX2_FN void stream(double* p, const V& a) { _mm256_stream_pd(p, a.v); }
  static NORMKIT_AVX2_FN V set1(double a) { return {_mm256_set1_pd(a)}; }
  static NORMKIT_AVX2_FN V add(const V& a, const V& b) { return {_mm256_add_pd(a.v, b.v)}; }
  static NORMKIT_AVX2_FN V sub(const V& a, const V& b) { return {_mm256_sub_pd(a.v, b.v)}; }
  static NORMKIT_AVX2_FN V mul(const V& a, const V& b) { return {_mm256_mul_pd(a.v, b.v)}; }
  static NORMKIT_AVX2_FN V fmadd(const V& a, const V& b, const V& c) {
    return {_mm256_fmadd_pd(a.v, b.v, c.v)};
  }
  template <class F>
  static NORMKIT_AVX2_FN void widen(const V& a, F&& f) {
    f(a);
  }
};

template <>
struct Pack<float> {
  struct V {
    __m256 v;
  };
  static constexpr std::size_t W = 8;
  static NORMKIT_AVX2_FN V load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static NORMKIT_AVX2_FN void store(float* p, const V& a) { _mm256_storeu_ps(p, a.v); }
  // p 32-byte aligned
  static NORMKIT_AVX2_FN void stream(float* p, const V& a) { _mm256_stream_ps(p, a.v); }
  static NORMKIT_AVX2_FN V set1(float a) { return {_mm256_set1_ps(a)}; }
  static NORMKIT_AVX2_FN V add(const V& a, const V& b) { return {_mm256_add_ps(a.v, b.v)}; }
  static NORMKIT_AVX2_FN V sub(const V& a, const V& b) { return {_mm256_sub_ps(a.v, b.v)}; }
  static NORMKIT_AVX2_FN V mul(const V& a, const V& b) { return {_mm256_mul_ps(a.v, b.v)}; }
  static NORMKIT_AVX2_FN V fmadd(const V& a, const V& b, const V& c) {
    return {_mm256_fmadd_ps(a.v, b.v, c.v)};
  }
  // Calls f with the low, then the high 4 lanes, each widened exactly to double.
  template <class F>
  static NORMKIT_AVX2_FN void widen(const V& a, F&& f) {
    f(Pack<double>::V{_mm256_cvtps_pd(_mm256_castps256_ps128(a.v))});
    f(Pack<double>::V{_mm256_cvtps_pd(_mm256_extractf128_ps(a.v, 1))});
  }
};

struct Acc : Pack<double> {
  static NORMKIT_AVX2_FN V zero() { return {_mm256_setzero_pd()}; }
  static NORMKIT_AVX2_FN double reduce(const V& a) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a.v), _mm256_extractf128_pd(a.v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};

struct Isa {
  static constexpr int level = 1;
  static constexpr const char* name = "avx2";
  static constexpr bool has_fma = true;  // fmadd and the scalar paths are fused
  template <class T>
  using Pack = avx2::Pack<T>;
  using Acc = avx2::Acc;
  static void fence() { _mm_sfence(); }
  // The door into this backend's code (target.hpp): f and everything it calls, compiled
  // for AVX2 + FMA.
  template <class F>
  static NORMKIT_RUN_AVX2 void run(F&& f) {
    f();
  }
};

}  // namespace avx2
}  // namespace simd
}  // namespace detail
}  // namespace normkit
