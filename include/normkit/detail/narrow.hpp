// normkit: narrow storage (Eigen::bfloat16, Eigen::half) for the row norms (LayerNorm,
// RMSNorm, their fused residual, and through adaptive_norm.hpp the adaptive forms), staged
// through the float engine (row_norm.hpp), so that every op reuses its float kernels.
//
// A call is cut into blocks of rows whose size depends on the row length only (never on
// the thread count). Each block's rows are widened (exactly) into a float scratch that
// stays in cache, the float passes run on it with a serial device, and the float results
// are rounded to the storage type, to nearest even. So a forward y is, bit for bit, the
// float op on the widened inputs, rounded once; its statistics are saved in float, and
// backward is as accurate as float's. The fused residual rounds s = alpha x + r to T,
// stores it, and normalizes the stored s (so y equals add-then-norm in T, and backward,
// which sees only the stored s, matches forward). x^2 is never formed in the narrow type: half's
// max is 65504, and 300^2 already overflows it.
//
// The conversions: kernels::widen_row / narrow_row, a packet at a time through the
// backend's Narrow (avx2.hpp, avx512.hpp) where it has one, Eigen's scalar conversions
// otherwise (the scalar and NEON backends, and every tail): the same bits either way.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "row_norm.hpp"

namespace normkit {
namespace detail {

template <class T>
struct is_narrow : std::false_type {};
template <>
struct is_narrow<Eigen::bfloat16> : std::true_type {};
template <>
struct is_narrow<Eigen::half> : std::true_type {};

// The type statistics are saved in: float for narrow storage, T itself otherwise.
template <class T>
using stat_t = std::conditional_t<is_narrow<T>::value, float, T>;

// Whether a backend converts packets itself (Isa::Narrow).
template <class Isa, class = void>
struct has_narrow_packets : std::false_type {};
template <class Isa>
struct has_narrow_packets<Isa, std::void_t<typename Isa::Narrow>> : std::true_type {};

// Whether a backend's Narrow rounds bfloat16 packets known to hold no NaN more cheaply
// (narrow2_bf16_no_nan, round_bf16_no_nan: avx2.hpp).
template <class N, class = void>
struct has_bf16_no_nan : std::false_type {};
template <class N>
struct has_bf16_no_nan<N, std::void_t<decltype(&N::round_bf16_no_nan)>> : std::true_type {};

namespace kernels {

// Packets of narrow storage through Isa::Narrow, by T.
template <class Isa, class T>
struct NarrowIo {
  using N = typename Isa::Narrow;
  using V = typename Isa::template Pack<float>::V;
  static NORMKIT_INLINE V load(const T* p) {
    const auto* q = reinterpret_cast<const std::uint16_t*>(p);
    if constexpr (std::is_same<T, Eigen::bfloat16>::value)
      return N::widen_bf16(q);
    else
      return N::widen_half(q);
  }
  // Stream: a non-temporal store (p aligned to the packet's W elements of T).
  template <bool Stream = false>
  static NORMKIT_INLINE void store(T* p, const V& v) {
    auto* q = reinterpret_cast<std::uint16_t*>(p);
    if constexpr (std::is_same<T, Eigen::bfloat16>::value)
      N::template narrow_bf16<Stream>(q, v);
    else
      N::template narrow_half<Stream>(q, v);
  }
  // For values that are not NaN (the fused forward: finite rows and parameters), the same
  // bits as store. store2: two packets, v0 at p and v1 at p + W (Stream: p aligned to 2W
  // elements of T).
  static constexpr bool kNoNan =
      std::is_same<T, Eigen::bfloat16>::value && has_bf16_no_nan<N>::value;
  template <bool Stream = false>
  static NORMKIT_INLINE void store2_no_nan(T* p, const V& v0, const V& v1) {
    if constexpr (kNoNan) {
      N::template narrow2_bf16_no_nan<Stream>(reinterpret_cast<std::uint16_t*>(p), v0, v1);
    } else {
      store<Stream>(p, v0);
      store<Stream>(p + N::W, v1);
    }
  }
  // float(T(v)) for values that are not NaN.
  static NORMKIT_INLINE V round_no_nan(const V& v) {
    if constexpr (kNoNan) {
      return N::round_bf16_no_nan(v);
    } else {
      T t[N::W];
      store(t, v);
      return load(t);
    }
  }
};

// dst[i] = float(src[i]) (exact).
template <class Isa, class T>
inline void widen_row(const T* src, float* dst, Index n) {
  Index i = 0;
  if constexpr (has_narrow_packets<Isa>::value) {
    using P = typename Isa::template Pack<float>;
    constexpr Index W = static_cast<Index>(P::W);
    for (; i + W <= n; i += W) P::store(dst + i, NarrowIo<Isa, T>::load(src + i));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dst[i] = T(src[i]), rounded to nearest even (Eigen's conversion, bit for bit).
template <class Isa, class T>
inline void narrow_row(const float* src, T* dst, Index n) {
  Index i = 0;
  if constexpr (has_narrow_packets<Isa>::value) {
    using P = typename Isa::template Pack<float>;
    constexpr Index W = static_cast<Index>(P::W);
    for (; i + W <= n; i += W) NarrowIo<Isa, T>::store(dst + i, P::load(src + i));
  }
  for (; i < n; ++i) dst[i] = T(src[i]);
}

// RMSNorm's LLaMA order: dst[i] = T(float(T(xhat[i])) * w[i]), the normalized value
// rounded to T before the (float) weight multiplies it, then rounded again. w: nullptr
// for none (then just narrow_row).
template <class Isa, class T>
inline void narrow_row_weighted(const float* xhat, const float* w, T* dst, Index n) {
  if (!w) {
    narrow_row<Isa>(xhat, dst, n);
    return;
  }
  Index i = 0;
  if constexpr (has_narrow_packets<Isa>::value) {
    using IO = NarrowIo<Isa, T>;
    using P = typename Isa::template Pack<float>;
    constexpr Index W = static_cast<Index>(P::W);
    for (; i + W <= n; i += W) {
      // The inner rounding goes through dst itself: narrow, widen back, multiply.
      IO::store(dst + i, P::load(xhat + i));
      IO::store(dst + i, P::mul(IO::load(dst + i), P::load(w + i)));
    }
  }
  for (; i < n; ++i) dst[i] = T(static_cast<float>(T(xhat[i])) * w[i]);
}

// The float-tree sums of a narrow row (kernels::tree_sums on its widened elements): the
// same bits as blocked_sums / blocked_sum_squares over the row widened into floats.
template <class Isa, class T, bool Center>
inline void narrow_tree_sums(const T* x, Index n, float shift, double& s, double& s2,
                             const Prefetch& pf) {
  tree_sums<Isa, float, Center>(
      n, shift, [x](Index i) { return NarrowIo<Isa, T>::load(x + i); },
      [x](Index i) { return static_cast<float>(x[i]); }, s, s2, pf);
}

// y = T(normalize's float y) for a narrow row, x widened and y rounded a packet at a time:
// the same bits as normalize over the widened row, then narrow_row. w (RMSNorm's LLaMA
// order, the op without scale): y = T(float(T(xhat)) * w) as narrow_row_weighted.
// Stream: non-temporal stores, after a scalar head that aligns y. pf: a later row,
// fetched into L2 as normalize does.
template <class Isa, class T, bool Center, ScaleKind S, bool Shift, bool Stream>
inline void normalize_narrow(const T* x, T* y, Index n, const RowAffine<float>& r,
                             const float* gamma, const float* beta, const float* w,
                             const Prefetch& pf) {
  using P = typename Isa::template Pack<float>;
  using IO = NarrowIo<Isa, T>;
  constexpr Index W = static_cast<Index>(P::W);
  const NormAffine<Isa, float, Center, S, Shift> op(r, gamma, beta);
  auto scalar_at = [&](Index i) {
    const float v = op.scalar(static_cast<float>(x[i]), i);
    y[i] = w ? T(static_cast<float>(T(v)) * w[i]) : T(v);
  };
  // The values here are not NaN (finite rows, finite parameters: forward_narrow_fused), so
  // they round without the NaN lanes' fix, two packets per store where the backend has it
  // (AVX2 bf16: 24 -> 14 instructions per packet of LayerNorm).
  auto value = [&](Index j) {
    const typename P::V v = op(IO::load(x + j), j);
    return w ? P::mul(IO::round_no_nan(v), P::load(w + j)) : v;
  };
  Index i = 0;
  if (Stream) {
    constexpr std::uintptr_t align = 2 * W * sizeof(T);
    for (; i < n && reinterpret_cast<std::uintptr_t>(y + i) % align != 0; ++i) scalar_at(i);
  }
  for (; i + 2 * W <= n; i += 2 * W) {
    pf.at<2 * W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    const typename P::V v0 = value(i), v1 = value(i + W);
    IO::template store2_no_nan<Stream>(y + i, v0, v1);
  }
  if (i + W <= n) {
    IO::template store<Stream>(y + i, value(i));
    i += W;
  }
  for (; i < n; ++i) scalar_at(i);
}

}  // namespace kernels

// Rows per block: about 32 KB of float scratch per array (L1), at least one row. From n
// only, so that backward's per-block parameter sums, added in block order, do not depend
// on the thread count. NORMKIT_NARROW_BLOCK_ELEMS overrides the size (the aarch64 test
// suite makes it smaller, so that its multi-block tests need less data under qemu).
#ifndef NORMKIT_NARROW_BLOCK_ELEMS
#define NORMKIT_NARROW_BLOCK_ELEMS 8192
#endif
constexpr Index kNarrowBlockElems = NORMKIT_NARROW_BLOCK_ELEMS;
inline Index narrow_block_rows(Index n) {
  return std::max<Index>(1, kNarrowBlockElems / std::max<Index>(n, 1));
}

// Parameters as float: the caller's float arrays, or T's widened into owned copies.
struct WideParams {
  std::vector<float> own_g, own_b;
  const float* gamma = nullptr;
  const float* beta = nullptr;
};

// count: the elements of each parameter (n, or n per sample for the modulated form).
template <class P>
WideParams widen_params(const Affine<P>& p, Index count) {
  WideParams w;
  if constexpr (std::is_same<P, float>::value) {
    w.gamma = p.gamma.present ? p.gamma.data : nullptr;
    w.beta = p.beta.present ? p.beta.data : nullptr;
  } else {
    auto widen = [count](const View<const P>& v, std::vector<float>& out) -> const float* {
      if (!v.present) return nullptr;
      out.resize(static_cast<std::size_t>(count));
      for (Index i = 0; i < count; ++i)
        out[static_cast<std::size_t>(i)] = static_cast<float>(v.data[i]);
      return out.data();
    };
    w.gamma = widen(p.gamma, w.own_g);
    w.beta = widen(p.beta, w.own_b);
  }
  return w;
}

// The rows of one checked narrow forward call on raw pointers. Parameters: float arrays
// (gamma, beta; shared by all rows, or with param_stride n one row of them per row of
// x), or per-row arrays in T (gamma_t, beta_t: the element-wise condition in T, widened
// a block at a time). Fused residual (r non-null): the row is s = T(alpha x + r) (the
// float add, rounded), written to s, and normalized as stored.
template <class T>
struct NarrowPass {
  const T* x;
  T* y;
  Index n, rows;
  const float* gamma = nullptr;
  const float* beta = nullptr;
  const T* gamma_t = nullptr;
  const T* beta_t = nullptr;
  Index param_stride = 0;
  float* mean_hi = nullptr;
  float* mean_lo = nullptr;
  float* rstd = nullptr;
  const T* r = nullptr;
  T* s = nullptr;
  float alpha = 1.0f;
};

// What a narrow forward call stages through the float engine (forward_narrow_rows).
template <class T>
struct NarrowStaging {
  const NarrowPass<T>& q;
  RowNormSpec fspec;  // the float engine's spec (without scale in the LLaMA order)
  bool cast_then_weight;
  const float* w;  // the LLaMA order's weight (float, 1 + w for Gemma's), or nullptr
  Index block;     // rows per block (narrow_block_rows)
  Index arrays;    // scratch arrays per block: x (then s), r, gamma and beta rows in T
};

// The staged path: rows [r0, r0 + nr) (nr <= block) widened into the scratch buf,
// normalized there by the float engine (serially), rounded into y.
template <class Isa, class T, bool Center>
void forward_narrow_staged(const NarrowStaging<T>& g, Index r0, Index nr, std::vector<float>& buf) {
  const NarrowPass<T>& q = g.q;
  const Index n = q.n, block = g.block;
  const bool residual = q.r != nullptr;
  const bool wide_g = q.gamma_t != nullptr, wide_b = q.beta_t != nullptr;
  if (buf.empty()) buf.resize(static_cast<std::size_t>(g.arrays * block * n));
  float* bx = buf.data();
  float* next = bx + block * n;
  float* br = residual ? std::exchange(next, next + block * n) : nullptr;
  float* bg = wide_g ? std::exchange(next, next + block * n) : nullptr;
  float* bb = wide_b ? next : nullptr;
  const Index o = r0 * n;
  kernels::widen_row<Isa>(q.x + o, bx, nr * n);
  if (residual) {
    // s = alpha x + r as the float op adds it, rounded to T and stored; then widened
    // back, so that the statistics and y are those of the stored s.
    kernels::widen_row<Isa>(q.r + o, br, nr * n);
    kernels::residual_add<Isa>(bx, br, bx, nr * n, q.alpha);
    kernels::narrow_row<Isa>(bx, q.s + o, nr * n);
    kernels::widen_row<Isa>(q.s + o, bx, nr * n);
  }
  const float* gm = q.gamma ? q.gamma + r0 * q.param_stride : nullptr;
  const float* be = q.beta ? q.beta + r0 * q.param_stride : nullptr;
  if (wide_g) {
    kernels::widen_row<Isa>(q.gamma_t + o, bg, nr * n);
    gm = bg;
  }
  if (wide_b) {
    kernels::widen_row<Isa>(q.beta_t + o, bb, nr * n);
    be = bb;
  }
  // Normalized in place in the scratch (no streaming: it stays in cache).
  const RowPass<float> fq{bx,
                          bx,
                          n,
                          nr,
                          g.cast_then_weight ? nullptr : gm,
                          be,
                          wide_g || wide_b ? n : q.param_stride,
                          Center ? q.mean_hi + r0 : nullptr,
                          Center ? q.mean_lo + r0 : nullptr,
                          q.rstd + r0,
                          false};
  forward_rows<Isa, float, Center>(g.fspec, fq, Exec());
  for (Index r = 0; r < nr; ++r) kernels::narrow_row_weighted<Isa>(bx + r * n, g.w, q.y + o + r * n, n);
}

// The staged path of a row the fused path cannot take, out of line: under runtime
// dispatch a hot region is flattened (simd/target.hpp), and the staged path with the
// float engine inlined into each of the fused path's variants made one translation unit
// take over 20 minutes to compile. It enters its own hot region (Isa::run).
template <class Isa, class T, bool Center>
NORMKIT_NOINLINE void forward_narrow_staged_row(const NarrowStaging<T>& g, Index r,
                                                std::vector<float>& buf) {
  Isa::run([&] { forward_narrow_staged<Isa, T, Center>(g, r, 1, buf); });
}

// Fused rows (plain LayerNorm and RMSNorm with float parameters, on a backend with
// narrow packets): x widened into the statistics' trees and into the normalize pass, y
// rounded as it is stored, no scratch: the same bits as the staged path, which still
// takes the rows whose statistics the trees cannot give (kernels::blocked_sums_trusted)
// and the special ones (var + eps == 0, an infinite rstd). Rows [r0, r1).
template <class Isa, class T, bool Center, ScaleKind S, bool Shift, bool Stream>
void forward_narrow_fused(const NarrowStaging<T>& g, Index r0, Index r1, std::vector<float>& buf) {
  const NarrowPass<T>& q = g.q;
  const Index n = q.n;
  const double dn = static_cast<double>(n);
  const Index ahead = prefetch_ahead_rows(n * static_cast<Index>(sizeof(T)));
  for (Index r = r0; r < r1; ++r) {
    const T* xr = q.x + r * n;
    double s = 0.0, s2 = 0.0;
    float shift = 0.0f;
    if (Center) {
      float head[5];
      const Index k = std::min<Index>(n, 5);
      for (Index i = 0; i < k; ++i) head[i] = static_cast<float>(xr[i]);
      shift = tree_shift(head, k);
    }
    kernels::narrow_tree_sums<Isa, T, Center>(xr, n, shift, s, s2, ahead_in_row(xr, n));
    bool fused = kernels::blocked_sums_trusted<float>(Center ? s : 0.0, s2, dn);
    RowStat st;
    if (fused)
      st = Center ? moments_of_trees(dn, g.fspec.eps, static_cast<double>(shift), s, s2)
                  : rms_of_trees(dn, g.fspec.eps, g.fspec.eps_outside, s2);
    const kernels::RowAffine<float> ra = row_affine<float>(st);
    fused = fused && st.denom_s != 0.0 && !std::isinf(ra.rstd);
    if (!fused) {
      forward_narrow_staged_row<Isa, T, Center>(g, r, buf);
      continue;
    }
    if (Center) {
      q.mean_hi[r] = ra.mean_hi;
      q.mean_lo[r] = ra.mean_lo;
    }
    q.rstd[r] = ra.rstd;
    const Index nx = r + 1 + ahead;
    const float* gm = q.gamma && !g.cast_then_weight ? q.gamma + r * q.param_stride : nullptr;
    const float* be = q.beta ? q.beta + r * q.param_stride : nullptr;
    kernels::normalize_narrow<Isa, T, Center, S, Shift, Stream>(
        xr, q.y + r * n, n, ra, gm, be, g.w,
        nx < r1 ? kernels::Prefetch(q.x + nx * n, n, true) : kernels::Prefetch());
  }
  if (Stream) Isa::fence();
}

// Whether the fused rows' parameters are finite (gamma, 1 + gamma for the zero-centred
// weight, beta, the LLaMA order's weight): then a fused row, whose statistics are finite,
// has no NaN in its y (an overflow gives Inf, never Inf - Inf), and normalize_narrow
// rounds without the NaN lanes' fix. Otherwise every row takes the staged path.
template <class T>
bool fused_params_finite(const NarrowStaging<T>& g) {
  const NarrowPass<T>& q = g.q;
  auto finite = [&](const float* a, bool one_plus) {
    if (!a) return true;
    bool ok = true;
    for (Index i = 0; i < q.n; ++i) ok &= std::isfinite(one_plus ? 1.0f + a[i] : a[i]);
    return ok;
  };
  const bool one_plus = g.fspec.scale == ScaleKind::OnePlusGamma;
  return finite(g.cast_then_weight ? nullptr : q.gamma, one_plus) && finite(q.beta, false) &&
         finite(g.w, false);
}

// Forward over the rows of q in blocks (independent of the parameters' type: one
// instantiation for both). cast_then_weight: RMSNorm's LLaMA order (shared float gamma
// only).
template <class Isa, class T, bool Center>
void forward_narrow_rows(const RowNormSpec& spec, bool cast_then_weight, const NarrowPass<T>& q,
                         const Exec& device) {
  const Index n = q.n, rows = q.rows;
  if (n == 0 || rows == 0) return;
  // LLaMA order: the float engine computes x * rstd alone; the weight comes after the
  // rounding (as a float (1 + w) for Gemma's zero-centred weight).
  RowNormSpec fspec = spec;
  std::vector<float> weight;
  if (cast_then_weight) {
    fspec.scale = ScaleKind::None;
    if (spec.scale != ScaleKind::None) {
      weight.assign(q.gamma, q.gamma + n);
      if (spec.scale == ScaleKind::OnePlusGamma)
        for (float& w : weight) w = 1.0f + w;
    }
  }
  const bool residual = q.r != nullptr;
  const bool wide_g = q.gamma_t != nullptr, wide_b = q.beta_t != nullptr;
  const Index arrays = 1 + (residual ? 1 : 0) + (wide_g ? 1 : 0) + (wide_b ? 1 : 0);
  const NarrowStaging<T> g{q, fspec, cast_then_weight, weight.empty() ? nullptr : weight.data(),
                           narrow_block_rows(n), arrays};

  const Index block = g.block;
  const Index blocks = (rows + block - 1) / block;
  const double bytes = static_cast<double>(block * n * arrays * static_cast<Index>(sizeof(T)));
  const Eigen::TensorOpCost cost(bytes, bytes, 6.0 * static_cast<double>(block * n * arrays));
  if constexpr (has_narrow_packets<Isa>::value) {
    if (!residual && !wide_g && !wide_b && !spec.ada && fused_params_finite(g)) {
      // Fused rows stream y when the whole output is larger than the caches (as the
      // float engine's y; the staged path writes y from L1 with ordinary stores).
      const bool stream = stream_output<T>(rows * n);
      with_scale(fspec.scale, [&](auto S) {
        with_bool(fspec.shift, [&](auto B) {
          with_bool(stream, [&](auto St) {
            constexpr ScaleKind kS = decltype(S)::value;
            constexpr bool kB = decltype(B)::value, kSt = decltype(St)::value;
            if constexpr (Center || !kB) {  // RMSNorm never shifts
              parallel_for<Isa>(device, blocks, cost, [&](Index b0, Index b1) {
                std::vector<float> buf;
                forward_narrow_fused<Isa, T, Center, kS, kB, kSt>(g, b0 * block,
                                                                  std::min(rows, b1 * block), buf);
              });
            }
          });
        });
      });
      return;
    }
  }
  parallel_for<Isa>(device, blocks, cost, [&](Index b0, Index b1) {
    std::vector<float> buf;
    for (Index b = b0; b < b1; ++b)
      forward_narrow_staged<Isa, T, Center>(g, b * block, std::min(block, rows - b * block), buf);
  });
}

// The pass of a whole-tensor forward (LayerNorm, RMSNorm, AdaNorm, the fused residual):
// shared float parameters, saved statistics sized by prepare_saved.
template <class T>
NarrowPass<T> narrow_pass(const View<const T>& x, const View<T>& y, Index n, Index rows,
                          const WideParams& wp, RowStats<float>& saved, bool center) {
  NarrowPass<T> q{x.data, y.data, n, rows};
  q.gamma = wp.gamma;
  q.beta = wp.beta;
  q.mean_hi = center ? saved.mean.data() : nullptr;
  q.mean_lo = center ? saved.mean_lo.data() : nullptr;
  q.rstd = saved.rstd.data();
  return q;
}

// Forward for narrow T with parameters in P (float or T). cast_then_weight: RMSNorm's
// LLaMA order, y = T(w * T(x * rstd)); otherwise y = T(the float op's y). res: the fused
// residual (s = T(alpha x + r), then y from the stored s).
template <class Isa, class T, class P, bool Center>
void forward_narrow(const RowNormSpec& spec, bool cast_then_weight, const View<const T>& x,
                    const Affine<P>& p, const View<T>& y, RowStats<float>& saved,
                    const Exec& device, const Residual<T>* res = nullptr) {
  static_assert(is_narrow<T>::value, "forward_narrow: bfloat16 or half storage");
  const std::string where = std::string(spec.op) + (res ? "::forward_residual" : "::forward");
  check_forward(spec, where, x, p, y);
  if (res) check_residual(where, x, y, p, *res);

  const Index n = x.inner(spec.k);
  const Index rows = x.outer(spec.k);
  if (!prepare_saved<Center>(saved, rows, n)) return;
  const WideParams wp = widen_params(p, n);
  NarrowPass<T> q = narrow_pass(x, y, n, rows, wp, saved, Center);
  if (res) {
    q.r = res->r.data;
    q.s = res->s.data;
    q.alpha = static_cast<float>(res->alpha);
  }
  forward_narrow_rows<Isa, T, Center>(spec, cast_then_weight, q, device);
}

// The rows of one checked narrow backward call on raw pointers, parameters as float
// (gamma: shared, n of them). dx: nullptr when skipped. Fused residual (residual true):
// the norm's dL/ds (g) is combined with ds (nullptr: 0) as the float engine does,
// t = g + ds, and dx = T(alpha t) (dx: nullptr when skipped), dr = T(t) (likewise).
template <class T>
struct NarrowGradPass {
  const T* dy;
  const T* x;
  T* dx;
  Index n, rows;
  const float* gamma;
  const float* mean;
  const float* mean_lo;
  const float* rstd;
  bool residual = false;
  const T* ds = nullptr;
  T* dr = nullptr;
  float alpha = 1.0f;
};

// Backward over the rows of q in blocks. want_param: sums receives the parameter
// gradients in double (n of dy xhat, then for a shifting spec n of dy): each block's float
// sums, added in double in block order.
template <class Isa, class T, bool Center>
void backward_narrow_rows(const RowNormSpec& spec, const NarrowGradPass<T>& q, bool want_param,
                          std::vector<double>& sums, const Exec& device) {
  const Index n = q.n, rows = q.rows;
  // Whether the norm's float pass computes its dx (g, for the residual).
  const bool want_g = q.residual ? (q.dx || q.dr) : q.dx != nullptr;
  const Index block = narrow_block_rows(n);
  const Index blocks = (rows + block - 1) / block;
  // Parameter sums: chunks of consecutive blocks (a count from the block count only),
  // each summed by one thread in block order, then the chunks in chunk order.
  const Index chunks = want_param ? std::min(blocks, kReduceChunks) : 0;
  // Both sums when either is asked for (the float pass computes them together).
  const bool sum_b = want_param && spec.shift;
  const Index arrays = sum_b ? 2 : 1;
  std::vector<double> acc(static_cast<std::size_t>(chunks * arrays * n), 0.0);

  const double bytes = static_cast<double>(block * n * static_cast<Index>(sizeof(T)));
  const Exec serial;
  auto do_blocks = [&](Index first, Index last, double* dg_acc, double* db_acc) {
    std::vector<float> buf(static_cast<std::size_t>(2 * block * n));
    std::vector<float> pg(want_param ? static_cast<std::size_t>(n * arrays) : 0);
    float* bdy = buf.data();
    float* bx = buf.data() + block * n;
    for (Index b = first; b < last; ++b) {
      const Index r0 = b * block, nr = std::min(block, rows - r0), o = r0 * n;
      kernels::widen_row<Isa>(q.dy + o, bdy, nr * n);
      kernels::widen_row<Isa>(q.x + o, bx, nr * n);
      const RowGradPass<float> fq{bdy,
                                  bx,
                                  want_g ? bdy : nullptr,
                                  n,
                                  nr,
                                  q.gamma,
                                  Center ? q.mean + r0 : nullptr,
                                  Center ? q.mean_lo + r0 : nullptr,
                                  q.rstd + r0,
                                  want_param ? pg.data() : nullptr,
                                  sum_b ? pg.data() + n : nullptr,
                                  nr * n};
      backward_pass<Isa, float, Center>(spec, fq, serial);
      if (q.residual && want_g) {
        // t = g + ds (ds widened into x's scratch, free now), dr = t there, dx = alpha t
        // over g: the float engine's residual_grad, on the same float values.
        if (q.ds) kernels::widen_row<Isa>(q.ds + o, bx, nr * n);
        with_bool(q.ds != nullptr, [&](auto Ds) {
          with_bool(q.dx != nullptr, [&](auto Dx) {
            with_bool(q.dr != nullptr, [&](auto Dr) {
              constexpr bool kDs = decltype(Ds)::value, kDx = decltype(Dx)::value,
                             kDr = decltype(Dr)::value;
              kernels::residual_grad<Isa, float, kDs, kDx, kDr>(
                  bdy, kDs ? bx : nullptr, kDx ? bdy : nullptr, kDr ? bx : nullptr, nr * n,
                  q.alpha);
            });
          });
        });
        if (q.dr) kernels::narrow_row<Isa>(bx, q.dr + o, nr * n);
      }
      if (q.dx) kernels::narrow_row<Isa>(bdy, q.dx + o, nr * n);
      if (dg_acc)
        for (Index j = 0; j < n; ++j)
          dg_acc[j] += static_cast<double>(pg[static_cast<std::size_t>(j)]);
      if (db_acc)
        for (Index j = 0; j < n; ++j)
          db_acc[j] += static_cast<double>(pg[static_cast<std::size_t>(n + j)]);
    }
  };
  if (want_param) {
    const Eigen::TensorOpCost cost(2.0 * bytes * static_cast<double>(blocks / chunks),
                                   bytes * static_cast<double>(blocks / chunks),
                                   8.0 * static_cast<double>(block * n * (blocks / chunks)));
    parallel_for<Isa>(device, chunks, cost, [&](Index c0, Index c1) {
      for (Index c = c0; c < c1; ++c) {
        double* base = acc.data() + c * arrays * n;
        do_blocks(chunk_begin(c, blocks, chunks), chunk_begin(c + 1, blocks, chunks), base,
                  sum_b ? base + n : nullptr);
      }
    });
  } else {
    const Eigen::TensorOpCost cost(2.0 * bytes, bytes, 8.0 * static_cast<double>(block * n));
    parallel_for<Isa>(device, blocks, cost,
                      [&](Index b0, Index b1) { do_blocks(b0, b1, nullptr, nullptr); });
  }
  if (!want_param) return;
  sums.assign(static_cast<std::size_t>(arrays * n), 0.0);
  for (Index c = 0; c < chunks; ++c) {
    const double* base = acc.data() + c * arrays * n;
    for (Index j = 0; j < arrays * n; ++j) sums[static_cast<std::size_t>(j)] += base[j];
  }
}

// The parameter gradients of a narrow backward (n of them, in P) from q's rows: the
// double sums rounded to float, then to P; zeros when there are no rows. dgamma, dbeta:
// nullptr when skipped. Also writes q's dx (and the residual's dx and dr).
template <class Isa, class T, class P, bool Center>
void backward_narrow_grads(const RowNormSpec& spec, const NarrowGradPass<T>& q, P* dgamma, P* dbeta,
                           const Exec& device) {
  const Index n = q.n;
  const bool want_param = dgamma || dbeta;
  const bool want_out = q.dx || (q.residual && q.dr);
  if (q.rows == 0 || n == 0 || (!want_out && !want_param)) {
    if (dgamma) std::fill(dgamma, dgamma + n, P(0.0f));
    if (dbeta) std::fill(dbeta, dbeta + n, P(0.0f));
    return;
  }
  std::vector<double> sums;  // n sums of dy xhat, then (shifting specs) n of dy
  backward_narrow_rows<Isa, T, Center>(spec, q, want_param, sums, device);
  if (!want_param) return;
  for (Index j = 0; j < n; ++j) {
    if (dgamma) dgamma[j] = P(static_cast<float>(sums[static_cast<std::size_t>(j)]));
    if (dbeta && spec.shift)
      dbeta[j] = P(static_cast<float>(sums[static_cast<std::size_t>(n + j)]));
  }
}

template <class T, bool Center>
NarrowGradPass<T> narrow_grad_pass(const View<const T>& dy, const View<const T>& x,
                                   const View<T>& dx, Index n, Index rows, const WideParams& wp,
                                   const RowStats<float>& saved) {
  return {dy.data,
          x.data,
          dx.present ? dx.data : nullptr,
          n,
          rows,
          wp.gamma,
          Center ? saved.mean.data() : nullptr,
          Center ? saved.mean_lo.data() : nullptr,
          saved.rstd.data()};
}

template <class P>
P* data_or_null(const View<P>& v) {
  return v.present ? v.data : nullptr;
}

// Backward for narrow T: dx = T(the float op's dx on the widened dy and x); dgamma and
// dbeta (in P) from per-block float sums added in double in block order, then rounded
// once to float and to P.
template <class Isa, class T, class P, bool Center>
void backward_narrow(const RowNormSpec& spec, const View<const T>& dy, const View<const T>& x,
                     const Affine<P>& p, const RowStats<float>& saved, const View<T>& dx,
                     const View<P>& dgamma, const View<P>& dbeta, const Exec& device) {
  static_assert(is_narrow<T>::value, "backward_narrow: bfloat16 or half storage");
  const std::string where = std::string(spec.op) + "::backward";
  check_backward<Center>(spec, where, dy, x, p, saved, dx, dgamma, dbeta);
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  const WideParams wp = widen_params(p, n);
  backward_narrow_grads<Isa, T, P, Center>(
      spec, narrow_grad_pass<T, Center>(dy, x, dx, n, rows, wp, saved), data_or_null(dgamma),
      data_or_null(dbeta), device);
}

// The fused residual's backward for narrow T: t = ds + g computed in float by the float
// engine on the widened ds, dy and s (g: the norm's dL/ds), dx = T(alpha t), dr = T(t),
// bitwise the float op's rounded; dgamma and dbeta as backward_narrow. The checks and
// their messages are the float op's: the residual's, then the norm's backward's with
// dL/ds going to dx (or dr when dx is skipped).
template <class Isa, class T, class P, bool Center>
void backward_residual_narrow(const RowNormSpec& spec, const View<const T>& ds,
                              const View<const T>& dy, const View<const T>& s, const Affine<P>& p,
                              const RowStats<float>& saved, double alpha, const View<T>& dx,
                              const View<T>& dr, const View<P>& dgamma, const View<P>& dbeta,
                              const Exec& device) {
  static_assert(is_narrow<T>::value, "backward_residual_narrow: bfloat16 or half storage");
  check_residual_backward(spec, std::string(spec.op) + "::backward_residual", ds, dy, s, p, alpha,
                          dx, dr, dgamma, dbeta);
  check_backward<Center>(spec, std::string(spec.op) + "::backward", dy, s, p, saved,
                         dx.present ? dx : dr, dgamma, dbeta);
  const Index n = s.inner(spec.k), rows = s.outer(spec.k);
  const WideParams wp = widen_params(p, n);
  NarrowGradPass<T> q = narrow_grad_pass<T, Center>(dy, s, dx, n, rows, wp, saved);
  q.residual = true;
  q.ds = ds.present ? ds.data : nullptr;
  q.dr = data_or_null(dr);
  q.alpha = static_cast<float>(alpha);
  backward_narrow_grads<Isa, T, P, Center>(spec, q, data_or_null(dgamma), data_or_null(dbeta),
                                           device);
}

}  // namespace detail
}  // namespace normkit
