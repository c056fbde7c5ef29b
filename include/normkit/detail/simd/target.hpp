// normkit: function attributes of the x86 backends.
//
// NORMKIT_AVX2_FN / NORMKIT_AVX512_FN mark every function of a backend (inline, with the
// backend's target), so that its intrinsics compile whatever the build's -m flags.
// NORMKIT_RUN_AVX2 / NORMKIT_RUN_AVX512 mark Isa::run, the door into a backend's code:
// with runtime dispatch it also flattens, i.e. inlines the whole call tree of the hot
// region (the generic kernels and the backend's functions) into one function compiled
// for the target. Without dispatch the build's flags already enable the backend, and
// run is a plain call.
#pragma once

#include "../config.hpp"

#if defined(__GNUC__) || defined(__clang__)
// f16c: the half <-> float conversions of narrow storage (detail/narrow.hpp); every CPU
// with AVX2 has it (dispatch.hpp checks it beside avx2 and fma).
// NORMKIT_AVX2_NARROW_FN / NORMKIT_AVX512_NARROW_FN: the narrow-storage conversions
// (Narrow), called once per packet. Where the build's flags enable the backend (no
// dispatch) they are always inlined: left to the inliner in a large translation unit
// (the benchmarks, -march=native), g++ 12 kept the AVX-512 bf16 narrowing a call in one
// RMSNorm variant, 35% of its time (bf16 forward at 0.37 ns per element, 0.20-0.26
// inlined, Zen 4). Forcing every backend function inline instead moved what g++ inlined
// elsewhere and slowed the float forward in cache (RMSNorm 0.14 -> 0.22 ns per element).
// Elsewhere (flags without the backend, no dispatch) they are not called and stay plain
// inline functions; with dispatch, flatten inlines them.
#if !defined(NORMKIT_DISPATCH) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define NORMKIT_AVX2_NARROW_FN __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#else
#define NORMKIT_AVX2_NARROW_FN __attribute__((target("avx2,fma,f16c"))) inline
#endif
#define NORMKIT_AVX2_FN __attribute__((target("avx2,fma,f16c"))) inline
#if !defined(NORMKIT_DISPATCH) && defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && \
    defined(__F16C__)
#define NORMKIT_AVX512_NARROW_FN __attribute__((target("avx512f,avx2,fma,f16c"), always_inline)) inline
#else
#define NORMKIT_AVX512_NARROW_FN __attribute__((target("avx512f,avx2,fma,f16c"))) inline
#endif
#define NORMKIT_AVX512_FN __attribute__((target("avx512f,avx2,fma,f16c"))) inline
// The bf16 conversion of the runtime-dispatch level NORMKIT_ISA_AVX512BF16
// (vcvtneps2bf16, vfpclassps) and, without dispatch, of builds whose flags enable
// AVX-512 BF16 and DQ (always inlined there, as the other narrow conversions).
#define NORMKIT_AVX512BF16_TARGET "avx512f,avx512dq,avx512bf16,avx2,fma,f16c"
#if !defined(NORMKIT_DISPATCH) && defined(__AVX512BF16__) && defined(__AVX512DQ__) && \
    defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define NORMKIT_AVX512BF16_NARROW_FN \
  __attribute__((target(NORMKIT_AVX512BF16_TARGET), always_inline)) inline
#else
#define NORMKIT_AVX512BF16_NARROW_FN __attribute__((target(NORMKIT_AVX512BF16_TARGET))) inline
#endif
#if defined(NORMKIT_DISPATCH)
#define NORMKIT_RUN_AVX512BF16 __attribute__((target(NORMKIT_AVX512BF16_TARGET), flatten))
#define NORMKIT_RUN_AVX2 __attribute__((target("avx2,fma,f16c"), flatten))
#define NORMKIT_RUN_AVX512 __attribute__((target("avx512f,avx2,fma,f16c"), flatten))
#else
#define NORMKIT_RUN_AVX2 inline
#define NORMKIT_RUN_AVX512 inline
#endif
#else
#define NORMKIT_AVX512BF16_NARROW_FN inline
#define NORMKIT_AVX2_FN inline
#define NORMKIT_AVX512_FN inline
#define NORMKIT_AVX2_NARROW_FN inline
#define NORMKIT_AVX512_NARROW_FN inline
#define NORMKIT_RUN_AVX2 inline
#define NORMKIT_RUN_AVX512 inline
#endif
