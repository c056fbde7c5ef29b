// normkit: the AVX2 + FMA backend (8 floats or 4 doubles per register).
#pragma once

#include <immintrin.h>

#include <cstddef>

namespace normkit {
namespace detail {
namespace simd {
namespace avx2 {

template <class T>
struct Pack;

template <>
struct Pack<float> {
  using V = __m256;
  static constexpr std::size_t W = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  template <class F>
  static void widen(V v, F&& f) {
    f(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    f(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
};

template <>
struct Pack<double> {
  using V = __m256d;
  static constexpr std::size_t W = 4;
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static void stream(double* p, V v) { _mm256_stream_pd(p, v); }
  static V set1(double a) { return _mm256_set1_pd(a); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  template <class F>
  static void widen(V v, F&& f) { f(v); }
};

struct Acc : Pack<double> {
  static V zero() { return _mm256_setzero_pd(); }
  static double reduce(V a) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};

struct Isa {
  static constexpr int level = 1;
  static constexpr const char* name = "avx2";
  template <class T>
  using Pack = avx2::Pack<T>;
  using Acc = avx2::Acc;
  static void fence() { _mm_sfence(); }
};

}  // namespace avx2
}  // namespace simd
}  // namespace detail
}  // namespace normkit
