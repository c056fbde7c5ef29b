// normkit: compile-time configuration and ISA selection.
#pragma once

#include <cstddef>

// ISA levels, ordered: each wider ISA may assume the narrower ones.
#define NORMKIT_ISA_SCALAR 0
#define NORMKIT_ISA_AVX2 1    // AVX2 + FMA
#define NORMKIT_ISA_AVX512 2  // AVX-512F

// NORMKIT_FORCE_SCALAR caps the ISA at scalar; NORMKIT_MAX_ISA caps it at any level.
// Both exist so that tests can run every backend on one machine.
#if defined(NORMKIT_FORCE_SCALAR)
#undef NORMKIT_MAX_ISA
#define NORMKIT_MAX_ISA NORMKIT_ISA_SCALAR
#endif
#ifndef NORMKIT_MAX_ISA
#define NORMKIT_MAX_ISA NORMKIT_ISA_AVX512
#endif

#if defined(__AVX512F__) && NORMKIT_MAX_ISA >= NORMKIT_ISA_AVX512
#define NORMKIT_ISA NORMKIT_ISA_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && NORMKIT_MAX_ISA >= NORMKIT_ISA_AVX2
#define NORMKIT_ISA NORMKIT_ISA_AVX2
#else
#define NORMKIT_ISA NORMKIT_ISA_SCALAR
#endif

// Outputs larger than this many bytes are written with non-temporal (streaming) stores:
// they cannot stay in cache for the next op anyway, and streaming saves the read-for-
// ownership of every destination line (a third of the traffic of a forward pass).
// Smaller outputs use ordinary stores so that the next op reads them from cache.
#ifndef NORMKIT_STREAM_MIN_BYTES
#define NORMKIT_STREAM_MIN_BYTES (std::size_t{8} << 20)
#endif
