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
#define NORMKIT_AVX2_FN __attribute__((target("avx2,fma,f16c"))) inline
#define NORMKIT_AVX512_FN __attribute__((target("avx512f,avx2,fma,f16c"))) inline
#if defined(NORMKIT_DISPATCH)
#define NORMKIT_RUN_AVX2 __attribute__((target("avx2,fma,f16c"), flatten))
#define NORMKIT_RUN_AVX512 __attribute__((target("avx512f,avx2,fma,f16c"), flatten))
#else
#define NORMKIT_RUN_AVX2 inline
#define NORMKIT_RUN_AVX512 inline
#endif
#else
#define NORMKIT_AVX2_FN inline
#define NORMKIT_AVX512_FN inline
#define NORMKIT_RUN_AVX2 inline
#define NORMKIT_RUN_AVX512 inline
#endif
