// normkit: the list of engine entry points, per backend and type, for explicit
// instantiation (normkit/extern_templates.hpp). Each op method is a thin shell that
// checks nothing and calls one of these through simd::visit; the engines hold all the
// code (checks, statistics, the flattened hot regions of every backend). Declared
// `extern template` in every translation unit but one, they are compiled once per
// program instead of once per translation unit that calls them.
//
// A declaration here that no longer matches an engine's signature is a compile error
// in the translation unit that instantiates them; an engine missing from the list is
// merely compiled implicitly where it is used, as without this header.
#pragma once

#include "../normkit.hpp"

// NORMKIT_EACH_ISA(M, args...): M(Isa, args...) for every backend simd::visit can pick.
// NORMKIT_BF16_ISA(M, args...): M(Isa, args...) for the backend of bfloat16 storage
// alone (the dispatch level avx512bf16), or nothing.
#define NORMKIT_ISA_(M, I, ...) M(::normkit::detail::simd::I::Isa, __VA_ARGS__)
#if defined(NORMKIT_DISPATCH)
#if NORMKIT_COMPILED_ISA >= NORMKIT_ISA_AVX512
#define NORMKIT_ISA_AVX512_(M, ...) NORMKIT_ISA_(M, avx512, __VA_ARGS__)
#define NORMKIT_BF16_ISA(M, ...) NORMKIT_ISA_(M, avx512bf16, __VA_ARGS__)
#else
#define NORMKIT_ISA_AVX512_(M, ...)
#define NORMKIT_BF16_ISA(M, ...)
#endif
#define NORMKIT_EACH_ISA(M, ...)           \
  NORMKIT_ISA_(M, scalar, __VA_ARGS__)     \
  NORMKIT_ISA_(M, avx2, __VA_ARGS__)       \
  NORMKIT_ISA_AVX512_(M, __VA_ARGS__)
#else
#define NORMKIT_EACH_ISA(M, ...) M(::normkit::detail::simd::Best, __VA_ARGS__)
#define NORMKIT_BF16_ISA(M, ...)
#endif

// The row norms (LayerNorm: Center true; RMSNorm: false) and their fused residual, and
// the adaptive forms (AdaNorm is LayerNorm's forward), for T = float or double.
#define NORMKIT_ROW_ENGINES_(I, EXT, T, C)                                                     \
  EXT template void ::normkit::detail::forward<I, T, C>(                                       \
      const ::normkit::detail::RowNormSpec&, const ::normkit::detail::View<const T>&,          \
      const ::normkit::Affine<T>&, const ::normkit::detail::View<T>&, ::normkit::RowStats<T>&, \
      const ::normkit::detail::Exec&, const ::normkit::detail::Residual<T>*);                  \
  EXT template void ::normkit::detail::backward<I, T, C>(                                      \
      const ::normkit::detail::RowNormSpec&, const ::normkit::detail::View<const T>&,          \
      const ::normkit::detail::View<const T>&, const ::normkit::Affine<T>&,                    \
      const ::normkit::RowStats<T>&, const ::normkit::detail::View<T>&,                        \
      const ::normkit::detail::View<T>&, const ::normkit::detail::View<T>&,                    \
      const ::normkit::detail::Exec&);                                                         \
  EXT template void ::normkit::detail::backward_residual<I, T, C>(                             \
      const ::normkit::detail::RowNormSpec&, const ::normkit::detail::View<const T>&,          \
      const ::normkit::detail::View<const T>&, const ::normkit::detail::View<const T>&,        \
      const ::normkit::Affine<T>&, const ::normkit::RowStats<T>&, double,                      \
      const ::normkit::detail::View<T>&, const ::normkit::detail::View<T>&,                    \
      const ::normkit::detail::View<T>&, const ::normkit::detail::View<T>&,                    \
      const ::normkit::detail::Exec&);

#define NORMKIT_ADAPTIVE_ENGINES_(I, EXT, T, NAME, GRAD)                                       \
  EXT template void ::normkit::detail::NAME<I, T>(                                             \
      const ::normkit::detail::RowNormSpec&, const ::normkit::detail::View<const T>&,          \
      const ::normkit::Affine<T>&, const ::normkit::detail::View<T>&, ::normkit::RowStats<T>&, \
      const ::normkit::detail::Exec&);                                                         \
  EXT template void ::normkit::detail::GRAD<I, T>(                                             \
      const ::normkit::detail::RowNormSpec&, const ::normkit::detail::View<const T>&,          \
      const ::normkit::detail::View<const T>&, const ::normkit::Affine<T>&,                    \
      const ::normkit::RowStats<T>&, const ::normkit::detail::View<T>&,                        \
      const ::normkit::detail::View<T>&, const ::normkit::detail::View<T>&,                    \
      const ::normkit::detail::Exec&);

#define NORMKIT_ROW_ALL_(I, EXT, T) \
  NORMKIT_ROW_ENGINES_(I, EXT, T, true) NORMKIT_ROW_ENGINES_(I, EXT, T, false)
#define NORMKIT_ADAPTIVE_ALL_(I, EXT, T)                                        \
  NORMKIT_ADAPTIVE_ENGINES_(I, EXT, T, modulated_forward, modulated_backward) \
  NORMKIT_ADAPTIVE_ENGINES_(I, EXT, T, elementwise_forward, elementwise_backward)

// Narrow storage of the row norms, their fused residual and the adaptive forms: T =
// bfloat16 or half, parameters (or condition) P = T or float.
#define NORMKIT_NARROW_ENGINES_(I, EXT, T, P, C)                                              \
  EXT template void ::normkit::detail::forward_narrow<I, T, P, C>(                            \
      const ::normkit::detail::RowNormSpec&, bool, const ::normkit::detail::View<const T>&,   \
      const ::normkit::Affine<P>&, const ::normkit::detail::View<T>&,                         \
      ::normkit::RowStats<float>&, const ::normkit::detail::Exec&,                            \
      const ::normkit::detail::Residual<T>*);                                                 \
  EXT template void ::normkit::detail::backward_narrow<I, T, P, C>(                           \
      const ::normkit::detail::RowNormSpec&, const ::normkit::detail::View<const T>&,         \
      const ::normkit::detail::View<const T>&, const ::normkit::Affine<P>&,                   \
      const ::normkit::RowStats<float>&, const ::normkit::detail::View<T>&,                   \
      const ::normkit::detail::View<P>&, const ::normkit::detail::View<P>&,                   \
      const ::normkit::detail::Exec&);                                                        \
  EXT template void ::normkit::detail::backward_residual_narrow<I, T, P, C>(                  \
      const ::normkit::detail::RowNormSpec&, const ::normkit::detail::View<const T>&,         \
      const ::normkit::detail::View<const T>&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::Affine<P>&, const ::normkit::RowStats<float>&, double,                 \
      const ::normkit::detail::View<T>&, const ::normkit::detail::View<T>&,                   \
      const ::normkit::detail::View<P>&, const ::normkit::detail::View<P>&,                   \
      const ::normkit::detail::Exec&);

#define NORMKIT_NARROW_ADAPTIVE_(I, EXT, T, P, NAME, GRAD)                                    \
  EXT template void ::normkit::detail::NAME<I, T, P>(                                         \
      const ::normkit::detail::RowNormSpec&, const ::normkit::detail::View<const T>&,         \
      const ::normkit::Affine<P>&, const ::normkit::detail::View<T>&,                         \
      ::normkit::RowStats<float>&, const ::normkit::detail::Exec&);                           \
  EXT template void ::normkit::detail::GRAD<I, T, P>(                                         \
      const ::normkit::detail::RowNormSpec&, const ::normkit::detail::View<const T>&,         \
      const ::normkit::detail::View<const T>&, const ::normkit::Affine<P>&,                   \
      const ::normkit::RowStats<float>&, const ::normkit::detail::View<T>&,                   \
      const ::normkit::detail::View<P>&, const ::normkit::detail::View<P>&,                   \
      const ::normkit::detail::Exec&);

#define NORMKIT_NARROW_P_(I, EXT, T, P)                                                      \
  NORMKIT_NARROW_ENGINES_(I, EXT, T, P, true)                                                \
  NORMKIT_NARROW_ENGINES_(I, EXT, T, P, false)                                               \
  NORMKIT_NARROW_ADAPTIVE_(I, EXT, T, P, modulated_forward_narrow, modulated_backward_narrow) \
  NORMKIT_NARROW_ADAPTIVE_(I, EXT, T, P, elementwise_forward_narrow, elementwise_backward_narrow)

#define NORMKIT_NARROW_ALL_(I, EXT, T) NORMKIT_NARROW_P_(I, EXT, T, T) NORMKIT_NARROW_P_(I, EXT, T, float)

// The channel norms (BatchNorm, GroupNorm, InstanceNorm), T = float or double.
#define NORMKIT_CHANNEL_ALL_(I, EXT, T)                                                       \
  EXT template void ::normkit::detail::channel::forward_train<I, T>(                          \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::Affine<T>&, const ::normkit::detail::View<T>&, ::normkit::RowStats<T>&, \
      const ::normkit::Running<T>&, const ::normkit::ChannelMoments*,                         \
      const ::normkit::detail::Exec&);                                                        \
  EXT template void ::normkit::detail::channel::forward_eval<I, T>(                           \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::Affine<T>&, const ::normkit::Running<T>&,                              \
      const ::normkit::detail::View<T>&, const ::normkit::detail::Exec&);                     \
  EXT template void ::normkit::detail::channel::backward_train<I, T>(                         \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::detail::View<const T>&, const ::normkit::Affine<T>&,                   \
      const ::normkit::RowStats<T>&, const ::normkit::detail::channel::GlobalGrad*,           \
      const ::normkit::detail::View<T>&, const ::normkit::detail::View<T>&,                   \
      const ::normkit::detail::View<T>&, const ::normkit::detail::Exec&);                     \
  EXT template void ::normkit::detail::channel::backward_eval<I, T>(                          \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::detail::View<const T>&, const ::normkit::Affine<T>&,                   \
      const ::normkit::Running<T>&, const ::normkit::detail::View<T>&,                        \
      const ::normkit::detail::View<T>&, const ::normkit::detail::View<T>&,                   \
      const ::normkit::detail::Exec&);                                                        \
  EXT template normkit::ChannelMoments normkit::detail::channel::partial_stats<I, T>(     \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::detail::Exec&);                                                        \
  EXT template normkit::ChannelGradSums normkit::detail::channel::partial_grad_sums<I, T>( \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::detail::View<const T>&, const ::normkit::RowStats<T>&,                 \
      const ::normkit::detail::Exec&);

// Narrow storage of the channel norms: T = bfloat16 or half, parameters P = T or float.
#define NORMKIT_NARROW_CHANNEL_P_(I, EXT, T, P)                                               \
  EXT template void ::normkit::detail::channel::forward_train_narrow<I, T, P>(                \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::Affine<P>&, const ::normkit::detail::View<T>&,                         \
      ::normkit::RowStats<float>&, const ::normkit::Running<float>&,                          \
      const ::normkit::ChannelMoments*, const ::normkit::detail::Exec&);                      \
  EXT template void ::normkit::detail::channel::forward_eval_narrow<I, T, P>(                 \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::Affine<P>&, const ::normkit::Running<float>&,                          \
      const ::normkit::detail::View<T>&, const ::normkit::detail::Exec&);                     \
  EXT template void ::normkit::detail::channel::backward_train_narrow<I, T, P>(               \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::detail::View<const T>&, const ::normkit::Affine<P>&,                   \
      const ::normkit::RowStats<float>&, const ::normkit::detail::channel::GlobalGrad*,       \
      const ::normkit::detail::View<T>&, const ::normkit::detail::View<P>&,                   \
      const ::normkit::detail::View<P>&, const ::normkit::detail::Exec&);                     \
  EXT template void ::normkit::detail::channel::backward_eval_narrow<I, T, P>(                \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,       \
      const ::normkit::detail::View<const T>&, const ::normkit::Affine<P>&,                   \
      const ::normkit::Running<float>&, const ::normkit::detail::View<T>&,                    \
      const ::normkit::detail::View<P>&, const ::normkit::detail::View<P>&,                   \
      const ::normkit::detail::Exec&);

#define NORMKIT_NARROW_CHANNEL_ALL_(I, EXT, T)                                                 \
  NORMKIT_NARROW_CHANNEL_P_(I, EXT, T, T)                                                      \
  NORMKIT_NARROW_CHANNEL_P_(I, EXT, T, float)                                                  \
  EXT template normkit::ChannelMoments normkit::detail::channel::partial_stats_narrow<I, T>(   \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,        \
      const ::normkit::detail::Exec&);                                                         \
  EXT template normkit::ChannelGradSums normkit::detail::channel::partial_grad_sums_narrow<I, T>( \
      const ::normkit::detail::channel::Spec&, const ::normkit::detail::View<const T>&,        \
      const ::normkit::detail::View<const T>&, const ::normkit::RowStats<float>&,              \
      const ::normkit::detail::Exec&);

// Every group for one backend: EXT is `extern` (declarations) or empty (definitions).
#define NORMKIT_ROW_GROUP_(I, EXT) NORMKIT_ROW_ALL_(I, EXT, float) NORMKIT_ROW_ALL_(I, EXT, double)
#define NORMKIT_ADAPTIVE_GROUP_(I, EXT) \
  NORMKIT_ADAPTIVE_ALL_(I, EXT, float) NORMKIT_ADAPTIVE_ALL_(I, EXT, double)
#define NORMKIT_NARROW_BF16_GROUP_(I, EXT) NORMKIT_NARROW_ALL_(I, EXT, ::Eigen::bfloat16)
#define NORMKIT_NARROW_HALF_GROUP_(I, EXT) NORMKIT_NARROW_ALL_(I, EXT, ::Eigen::half)
#define NORMKIT_CHANNEL_GROUP_(I, EXT) \
  NORMKIT_CHANNEL_ALL_(I, EXT, float) NORMKIT_CHANNEL_ALL_(I, EXT, double)
#define NORMKIT_NARROW_CHANNEL_GROUP_(I, EXT) \
  NORMKIT_NARROW_CHANNEL_ALL_(I, EXT, ::Eigen::bfloat16) NORMKIT_NARROW_CHANNEL_ALL_(I, EXT, ::Eigen::half)
#define NORMKIT_NARROW_CHANNEL_BF16_GROUP_(I, EXT) \
  NORMKIT_NARROW_CHANNEL_ALL_(I, EXT, ::Eigen::bfloat16)
