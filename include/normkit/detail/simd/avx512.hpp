// normkit: the AVX-512F backend (16 floats or 8 doubles per register). Built on the
// AVX2 backend's conventions; only AVX-512F instructions are used, so any AVX-512 CPU
// (Skylake-SP on) runs it.
#pragma once

#include <immintrin.h>

#include <cstddef>

namespace normkit {
namespace detail {
namespace simd {
namespace avx512 {

// Halves of a 512-bit register. g++ 12 implements _mm512_castps512_ps256,
// _mm512_extractf64x4_pd and _mm512_reduce_add_pd with _mm256_undefined_pd(), which its
// own -Wuninitialized flags; the maskz forms with a full mask compile to the same
// instructions without it.
inline __m256d lo256(__m512d v) { return _mm512_maskz_extractf64x4_pd(0xFF, v, 0); }
inline __m256d hi256(__m512d v) { return _mm512_maskz_extractf64x4_pd(0xFF, v, 1); }

template <class T>
struct Pack;

template <>
struct Pack<float> {
  using V = __m512;
  static constexpr std::size_t W = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  template <class F>
  static void widen(V v, F&& f) {
    f(_mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(lo256(_mm512_castps_pd(v)))));
    f(_mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(hi256(_mm512_castps_pd(v)))));
  }
};

template <>
struct Pack<double> {
  using V = __m512d;
  static constexpr std::size_t W = 8;
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static void stream(double* p, V v) { _mm512_stream_pd(p, v); }
  static V set1(double a) { return _mm512_set1_pd(a); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  template <class F>
  static void widen(V v, F&& f) { f(v); }
};

struct Acc : Pack<double> {
  static V zero() { return _mm512_setzero_pd(); }
  static double reduce(V a) {
    const __m256d s4 = _mm256_add_pd(lo256(a), hi256(a));
    const __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
  }
};

struct Isa {
  static constexpr int level = 2;
  static constexpr const char* name = "avx512";
  template <class T>
  using Pack = avx512::Pack<T>;
  using Acc = avx512::Acc;
  static void fence() { _mm_sfence(); }
};

}  // namespace avx512
}  // namespace simd
}  // namespace detail
}  // namespace normkit
