// normkit: the AVX2 + FMA backend (8 floats or 4 doubles per register).
//
// Every function carries the backend's target (NORMKIT_AVX2_FN, target.hpp), so that it
// compiles without -mavx2 for runtime dispatch; registers travel wrapped in a struct (V),
// which clang accepts across functions compiled without AVX where a bare __m256 would
// change the calling convention.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>

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

// Narrow storage (detail/narrow.hpp): 8 bfloat16 or half values, as raw 16-bit
// patterns, to or from one float packet. Widening bf16 is exact (a 16-bit shift); its
// narrowing rounds to nearest even with integer arithmetic, as Eigen's scalar
// conversion does (bits + 0x7fff + lsb, then the top 16 bits; NaN -> sign | 0x7fc0),
// bit for bit. Half goes through F16C, which rounds to nearest even as well.
struct Narrow {
  static constexpr std::size_t W = 8;
  using F = Pack<float>::V;
  static NORMKIT_AVX2_NARROW_FN __m128i load8(const std::uint16_t* p) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  }
  // Stream: a non-temporal store (p 16-byte aligned).
  template <bool Stream = false>
  static NORMKIT_AVX2_NARROW_FN void store8(std::uint16_t* p, __m128i v) {
    if (Stream)
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), v);
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v);
  }
  static NORMKIT_AVX2_NARROW_FN F widen_bf16(const std::uint16_t* p) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load8(p)), 16))};
  }
  // Round to nearest even for lanes known not to be NaN (finite or infinite): the
  // rounded pattern in the high 16 bits of each 32-bit lane. (x + 0x7fff + lsb) rounds
  // the largest finite values up to Inf, as it should.
  static NORMKIT_AVX2_NARROW_FN __m256i bf16_sum_no_nan(const F& a) {
    const __m256i b = _mm256_castps_si256(a.v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb);
  }
  // The rounded patterns in the low 16 bits of each 32-bit lane; NaN lanes become quiet
  // NaNs of the same sign (the sum above could carry a NaN's payload into Inf or 0).
  static NORMKIT_AVX2_NARROW_FN __m256i bf16_bits(const F& a) {
    const __m256i r = _mm256_srli_epi32(bf16_sum_no_nan(a), 16);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(a.v), 16),
                                          _mm256_set1_epi32(0x8000));
    const __m256i qnan = _mm256_or_si256(sign, _mm256_set1_epi32(0x7fc0));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, qnan, nan);
  }
  // Two packets of non-NaN values, 16 patterns at p (Stream: p 32-byte aligned): one pack
  // and one permute for both.
  template <bool Stream = false>
  static NORMKIT_AVX2_NARROW_FN void narrow2_bf16_no_nan(std::uint16_t* p, const F& a, const F& b) {
    const __m256i ra = _mm256_srli_epi32(bf16_sum_no_nan(a), 16);
    const __m256i rb = _mm256_srli_epi32(bf16_sum_no_nan(b), 16);
    // packus: a0-3 b0-3 | a4-7 b4-7; the permute puts the quadwords in order 0, 2, 1, 3.
    const __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(ra, rb), 0xD8);
    if (Stream)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), pk);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pk);
  }
  // float(bf16(a)) for non-NaN lanes, in registers: the rounded pattern's high half.
  static NORMKIT_AVX2_NARROW_FN F round_bf16_no_nan(const F& a) {
    return {_mm256_castsi256_ps(
        _mm256_and_si256(bf16_sum_no_nan(a), _mm256_set1_epi32(static_cast<int>(0xffff0000u))))};
  }
  template <bool Stream = false>
  static NORMKIT_AVX2_NARROW_FN void narrow_bf16(std::uint16_t* p, const F& a) {
    const __m256i r = bf16_bits(a);
    // packus works within 128-bit halves: lanes 0-3 land in quadword 0, 4-7 in 2.
    const __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    store8<Stream>(p, _mm256_castsi256_si128(pk));
  }
  static NORMKIT_AVX2_NARROW_FN F widen_half(const std::uint16_t* p) { return {_mm256_cvtph_ps(load8(p))}; }
  template <bool Stream = false>
  static NORMKIT_AVX2_NARROW_FN void narrow_half(std::uint16_t* p, const F& a) {
    store8<Stream>(p, _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct Isa {
  static constexpr int level = 1;
  static constexpr const char* name = "avx2";
  static constexpr bool has_fma = true;  // fmadd and the scalar paths are fused
  template <class T>
  using Pack = avx2::Pack<T>;
  using Acc = avx2::Acc;
  using Narrow = avx2::Narrow;
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
