// normkit: compile-time configuration and ISA selection.
#pragma once

#include <cstddef>

// ISA levels, ordered: each wider ISA may assume the narrower ones. On aarch64, NEON is
// the level-1 backend (and the widest).
#define NORMKIT_ISA_SCALAR 0
#define NORMKIT_ISA_AVX2 1    // AVX2 + FMA
#define NORMKIT_ISA_AVX512 2  // AVX-512F
// AVX-512F with BF16 and DQ: a runtime-dispatch level of bfloat16 storage alone (its
// conversions; every other op runs the AVX-512F code there). Not a compile-time level:
// NORMKIT_MAX_ISA >= NORMKIT_ISA_AVX512 admits it (simd/dispatch.hpp).
#define NORMKIT_ISA_AVX512BF16 3
#define NORMKIT_ISA_NEON 1    // aarch64 Advanced SIMD

// NORMKIT_FORCE_SCALAR caps the ISA at scalar; NORMKIT_MAX_ISA caps it at any level.
// Both exist so that tests can run every backend on one machine.
#if defined(NORMKIT_FORCE_SCALAR)
#undef NORMKIT_MAX_ISA
#define NORMKIT_MAX_ISA NORMKIT_ISA_SCALAR
#endif
#ifndef NORMKIT_MAX_ISA
#define NORMKIT_MAX_ISA NORMKIT_ISA_AVX512
#endif

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#define NORMKIT_ARCH_X86 1
#elif defined(__aarch64__)
#define NORMKIT_ARCH_ARM64 1
#endif

// Whether the build's flags give a fused multiply-add (x86 -mfma; aarch64 always): the
// scalar backend fuses a * b + c then, as the vector backends always do.
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define NORMKIT_HAS_FMA 1
#endif

// A function kept out of line (out of the flattened hot regions, simd/target.hpp).
// NORMKIT_INLINE: a per-packet helper always inlined (narrow storage's loads and stores,
// detail/narrow.hpp NarrowIo): in a large translation unit g++ stops inlining plain
// `inline` functions once the unit has grown past its limits, and which calls stay calls
// then differs between instantiations (see simd/target.hpp); with dispatch, flatten
// inlines them anyway.
#if defined(__GNUC__) || defined(__clang__)
#define NORMKIT_NOINLINE __attribute__((noinline))
#define NORMKIT_INLINE __attribute__((always_inline)) inline
#else
#define NORMKIT_NOINLINE
#define NORMKIT_INLINE inline
#endif

// NORMKIT_ISA: the widest backend the compiler's target flags allow (compile-time
// selection, as with -march=native).
#if defined(NORMKIT_ARCH_ARM64) && NORMKIT_MAX_ISA >= NORMKIT_ISA_NEON
#define NORMKIT_ISA NORMKIT_ISA_NEON
#elif defined(NORMKIT_ARCH_X86) && defined(__AVX512F__) && NORMKIT_MAX_ISA >= NORMKIT_ISA_AVX512
#define NORMKIT_ISA NORMKIT_ISA_AVX512
#elif defined(NORMKIT_ARCH_X86) && defined(__AVX2__) && defined(__FMA__) && \
    NORMKIT_MAX_ISA >= NORMKIT_ISA_AVX2
#define NORMKIT_ISA NORMKIT_ISA_AVX2
#else
#define NORMKIT_ISA NORMKIT_ISA_SCALAR
#endif

// Runtime dispatch (x86-64 with g++): when the target flags leave out a backend that
// NORMKIT_MAX_ISA allows (a build without -march, say), the wider backends are compiled
// anyway, with function target attributes, and the widest the CPU runs is chosen once
// per process (simd::Dynamic, dispatch.hpp). NORMKIT_NO_DISPATCH turns it off: the
// compile-time selection alone. Not with clang: its flatten attribute (clang 14) inlines
// one level of calls only, so the kernels' own calls to a backend's functions would stay
// calls; clang builds select at compile time. Nor in unoptimized builds (-O0: no
// __OPTIMIZE__, as CMake's Debug): g++ inlines nothing there, flatten included, so the
// generic kernels, compiled for the build's target, would call the backends' functions
// across the target boundary, passing vectors in an ABI the callee does not use (a
// crash, found by the package test's -O0 build); they select at compile time.
#if defined(NORMKIT_ARCH_X86) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__OPTIMIZE__) && !defined(NORMKIT_NO_DISPATCH) && NORMKIT_ISA < NORMKIT_MAX_ISA
#define NORMKIT_DISPATCH 1
#endif

// The widest backend compiled in: NORMKIT_MAX_ISA with dispatch, NORMKIT_ISA without.
#if defined(NORMKIT_DISPATCH)
#define NORMKIT_COMPILED_ISA NORMKIT_MAX_ISA
#else
#define NORMKIT_COMPILED_ISA NORMKIT_ISA
#endif

// Outputs larger than this many bytes are written with non-temporal (streaming) stores:
// they cannot stay in cache for the next op anyway, and streaming saves the read-for-
// ownership of every destination line (a third of the traffic of a forward pass).
// Smaller outputs use ordinary stores so that the next op reads them from cache.
#ifndef NORMKIT_STREAM_MIN_BYTES
#define NORMKIT_STREAM_MIN_BYTES (std::size_t{8} << 20)
#endif
