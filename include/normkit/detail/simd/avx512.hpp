// normkit: the AVX-512F backend (16 floats or 8 doubles per register). Built on the
// AVX2 backend's conventions; only AVX-512F instructions are used, so any AVX-512 CPU
// (Skylake-SP on) runs it.
//
// Every function carries the backend's target (NORMKIT_AVX512_FN, target.hpp), so that
// it compiles without -mavx512f for runtime dispatch; registers travel wrapped in a
// struct (V), which clang accepts across functions compiled without AVX-512 where a bare
// __m512 would change the calling convention.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "target.hpp"

namespace normkit {
namespace detail {
namespace simd {
namespace avx512 {

// Halves of a 512-bit register. g++ 12 implements _mm512_castps512_ps256,
// _mm512_extractf64x4_pd and _mm512_reduce_add_pd with _mm256_undefined_pd(), which its
// own -Wuninitialized flags; the maskz forms with a full mask compile to the same
// instructions without it.
NORMKIT_AVX512_FN __m256d lo256(__m512d v) { return _mm512_maskz_extractf64x4_pd(0xFF, v, 0); }
NORMKIT_AVX512_FN __m256d hi256(__m512d v) { return _mm512_maskz_extractf64x4_pd(0xFF, v, 1); }

template <class T>
struct Pack;

template <>
struct Pack<double> {
  struct V {
    __m512d v;
  };
  static constexpr std::size_t W = 8;
  static NORMKIT_AVX512_FN V load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static NORMKIT_AVX512_FN void store(double* p, const V& a) { _mm512_storeu_pd(p, a.v); }
  static NORMKIT_AVX512_FN void stream(double* p, const V& a) { _mm512_stream_pd(p, a.v); }
  static NORMKIT_AVX512_FN V set1(double a) { return {_mm512_set1_pd(a)}; }
  static NORMKIT_AVX512_FN V add(const V& a, const V& b) { return {_mm512_add_pd(a.v, b.v)}; }
  static NORMKIT_AVX512_FN V sub(const V& a, const V& b) { return {_mm512_sub_pd(a.v, b.v)}; }
  static NORMKIT_AVX512_FN V mul(const V& a, const V& b) { return {_mm512_mul_pd(a.v, b.v)}; }
  static NORMKIT_AVX512_FN V fmadd(const V& a, const V& b, const V& c) {
    return {_mm512_fmadd_pd(a.v, b.v, c.v)};
  }
  template <class F>
  static NORMKIT_AVX512_FN void widen(const V& a, F&& f) {
    f(a);
  }
};

template <>
struct Pack<float> {
  struct V {
    __m512 v;
  };
  static constexpr std::size_t W = 16;
  static NORMKIT_AVX512_FN V load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static NORMKIT_AVX512_FN void store(float* p, const V& a) { _mm512_storeu_ps(p, a.v); }
  // p 64-byte aligned
  static NORMKIT_AVX512_FN void stream(float* p, const V& a) { _mm512_stream_ps(p, a.v); }
  static NORMKIT_AVX512_FN V set1(float a) { return {_mm512_set1_ps(a)}; }
  static NORMKIT_AVX512_FN V add(const V& a, const V& b) { return {_mm512_add_ps(a.v, b.v)}; }
  static NORMKIT_AVX512_FN V sub(const V& a, const V& b) { return {_mm512_sub_ps(a.v, b.v)}; }
  static NORMKIT_AVX512_FN V mul(const V& a, const V& b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static NORMKIT_AVX512_FN V fmadd(const V& a, const V& b, const V& c) {
    return {_mm512_fmadd_ps(a.v, b.v, c.v)};
  }
  // Calls f with the low, then the high 8 lanes, each widened exactly to double.
  template <class F>
  static NORMKIT_AVX512_FN void widen(const V& a, F&& f) {
    const __m512d d = _mm512_castps_pd(a.v);
    f(Pack<double>::V{_mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(lo256(d)))});
    f(Pack<double>::V{_mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(hi256(d)))});
  }
};

struct Acc : Pack<double> {
  static NORMKIT_AVX512_FN V zero() { return {_mm512_setzero_pd()}; }
  static NORMKIT_AVX512_FN double reduce(const V& a) {
    const __m256d s4 = _mm256_add_pd(lo256(a.v), hi256(a.v));
    const __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
  }
};

// Narrow storage (detail/narrow.hpp): 16 bfloat16 or half values to or from one float
// packet, as avx2::Narrow (the same integer rounding for bf16, bit for bit Eigen's).
// Where the build targets AVX-512 BF16 (-mavx512bf16, -march=native on Zen 4 on),
// vcvtneps2bf16 rounds instead: also to nearest even, but it treats denormal inputs as
// zero and gives NaN with the input's payload; those lanes (|x| < 2^-126, x != 0, and
// NaN) are taken from the integer path, so both give the same bits.
// (Full-mask maskz forms throughout, as lo256 above: g++ 12's unmasked shifts and
// conversions start from an undefined register that -Wmaybe-uninitialized flags.)
struct Narrow {
  static constexpr std::size_t W = 16;
  using F = Pack<float>::V;
  static NORMKIT_AVX512_NARROW_FN __m256i load16(const std::uint16_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  // Stream: a non-temporal store (p 32-byte aligned).
  template <bool Stream = false>
  static NORMKIT_AVX512_NARROW_FN void store16(std::uint16_t* p, __m256i v) {
    if (Stream)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
  static NORMKIT_AVX512_NARROW_FN F widen_bf16(const std::uint16_t* p) {
    const __m512i w = _mm512_maskz_cvtepu16_epi32(0xFFFF, load16(p));
    return {_mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, w, 16))};
  }
  // The rounded patterns in the low 16 bits of each 32-bit lane.
  static NORMKIT_AVX512_NARROW_FN __m512i bf16_integer(const F& a) {
    const __m512i b = _mm512_castps_si512(a.v);
    const __m512i hi = _mm512_maskz_srli_epi32(0xFFFF, b, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
    const __m512i r = _mm512_maskz_srli_epi32(0xFFFF, sum, 16);
    const __m512i qnan = _mm512_or_si512(_mm512_and_si512(hi, _mm512_set1_epi32(0x8000)),
                                         _mm512_set1_epi32(0x7fc0));
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), qnan);
  }
  // vcvtneps2bf16, its lanes that need the integer path (QNaN 0x01, SNaN 0x80, denormal
  // 0x20) picked by one vfpclassps (AVX-512 DQ): for builds whose flags enable both, and
  // for the runtime-dispatch level NORMKIT_ISA_AVX512BF16 (avx512bf16::Narrow below).
  static NORMKIT_AVX512BF16_NARROW_FN __m256i bf16_bits_vcvt(const F& a) {
    const __m256i fast = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(a.v));
    return bf16_fixed(a, fast, _mm512_fpclass_ps_mask(a.v, 0x01 | 0x80 | 0x20));
  }
  // fast (vcvtneps2bf16's patterns for a) with the lanes of fix taken from the integer
  // path. Rare (denormals, NaN): blended in 32-bit lanes (a masked move of 16-bit lanes
  // would need AVX-512BW).
  static NORMKIT_AVX512_NARROW_FN __m256i bf16_fixed(const F& a, __m256i fast, __mmask16 fix) {
    if (fix == 0) return fast;
    const __m512i wide = _mm512_maskz_cvtepu16_epi32(0xFFFF, fast);
    return _mm512_maskz_cvtepi32_epi16(0xFFFF, _mm512_mask_mov_epi32(wide, fix, bf16_integer(a)));
  }
  static NORMKIT_AVX512_NARROW_FN __m256i bf16_bits(const F& a) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    return bf16_bits_vcvt(a);
#elif defined(__AVX512BF16__)
    // Without DQ: |x| bits - 1 < 0x7fffff is a nonzero denormal; |x| bits > 0x7f800000 NaN.
    const __m256i fast = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(a.v));
    const __m512i mag = _mm512_and_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(0x7fffffff));
    const __mmask16 den = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(mag, _mm512_set1_epi32(1)),
                                                  _mm512_set1_epi32(0x7fffff));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(mag, _mm512_set1_epi32(0x7f800000));
    return bf16_fixed(a, fast, static_cast<__mmask16>(den | nan));
#else
    return _mm512_maskz_cvtepi32_epi16(0xFFFF, bf16_integer(a));
#endif
  }
  template <bool Stream = false>
  static NORMKIT_AVX512_NARROW_FN void narrow_bf16(std::uint16_t* p, const F& a) {
    store16<Stream>(p, bf16_bits(a));
  }
  static NORMKIT_AVX512_NARROW_FN F widen_half(const std::uint16_t* p) {
    return {_mm512_maskz_cvtph_ps(0xFFFF, load16(p))};
  }
  template <bool Stream = false>
  static NORMKIT_AVX512_NARROW_FN void narrow_half(std::uint16_t* p, const F& a) {
    store16<Stream>(p, _mm512_maskz_cvtps_ph(0xFFFF, a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct Isa {
  static constexpr int level = 2;
  static constexpr const char* name = "avx512";
  static constexpr bool has_fma = true;  // fmadd and the scalar paths are fused
  template <class T>
  using Pack = avx512::Pack<T>;
  using Acc = avx512::Acc;
  using Narrow = avx512::Narrow;
  static void fence() { _mm_sfence(); }
  // The door into this backend's code (target.hpp): f and everything it calls, compiled
  // for AVX-512.
  template <class F>
  static NORMKIT_RUN_AVX512 void run(F&& f) {
    f();
  }
};

}  // namespace avx512

#if defined(NORMKIT_DISPATCH)
// The runtime-dispatch level NORMKIT_ISA_AVX512BF16 (simd/dispatch.hpp): the AVX-512F
// backend, with bf16 narrowed by vcvtneps2bf16 as builds for such a CPU do (the same
// bits as the integer rounding, see avx512::Narrow). simd::visit picks it for bfloat16
// storage alone: the code of every other type would be the AVX-512F level's.
namespace avx512bf16 {

struct Narrow : avx512::Narrow {
  static NORMKIT_AVX512BF16_NARROW_FN __m256i bf16_bits(const F& a) { return bf16_bits_vcvt(a); }
  template <bool Stream = false>
  static NORMKIT_AVX512BF16_NARROW_FN void narrow_bf16(std::uint16_t* p, const F& a) {
    store16<Stream>(p, bf16_bits(a));
  }
};

struct Isa : avx512::Isa {
  static constexpr int level = NORMKIT_ISA_AVX512BF16;
  static constexpr const char* name = "avx512bf16";
  using Narrow = avx512bf16::Narrow;
  template <class F>
  static NORMKIT_RUN_AVX512BF16 void run(F&& f) {
    f();
  }
};

}  // namespace avx512bf16
#endif
}  // namespace simd
}  // namespace detail
}  // namespace normkit
