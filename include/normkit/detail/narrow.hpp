// normkit: narrow storage (Eigen::bfloat16, Eigen::half) for the row norms, staged
// through the float engine (row_norm.hpp), so that every op reuses its float kernels.
//
// A call is cut into blocks of rows whose size depends on the row length only (never on
// the thread count). Each block's rows are widened (exactly) into a float scratch that
// stays in cache, the float passes run on it with a serial device, and the float results
// are rounded to the storage type, to nearest even. So a forward y is, bit for bit, the
// float op on the widened inputs, rounded once; its statistics are saved in float, and
// backward is as accurate as float's. x^2 is never formed in the narrow type: half's max
// is 65504, and 300^2 already overflows it.
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

namespace kernels {

// dst[i] = float(src[i]) (exact).
template <class Isa, class T>
inline void widen_row(const T* src, float* dst, Index n) {
  Index i = 0;
  if constexpr (has_narrow_packets<Isa>::value) {
    using N = typename Isa::Narrow;
    using P = typename Isa::template Pack<float>;
    constexpr Index W = static_cast<Index>(N::W);
    const auto* s = reinterpret_cast<const std::uint16_t*>(src);
    for (; i + W <= n; i += W) {
      if constexpr (std::is_same<T, Eigen::bfloat16>::value)
        P::store(dst + i, N::widen_bf16(s + i));
      else
        P::store(dst + i, N::widen_half(s + i));
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dst[i] = T(src[i]), rounded to nearest even (Eigen's conversion, bit for bit).
template <class Isa, class T>
inline void narrow_row(const float* src, T* dst, Index n) {
  Index i = 0;
  if constexpr (has_narrow_packets<Isa>::value) {
    using N = typename Isa::Narrow;
    using P = typename Isa::template Pack<float>;
    constexpr Index W = static_cast<Index>(N::W);
    auto* d = reinterpret_cast<std::uint16_t*>(dst);
    for (; i + W <= n; i += W) {
      if constexpr (std::is_same<T, Eigen::bfloat16>::value)
        N::narrow_bf16(d + i, P::load(src + i));
      else
        N::narrow_half(d + i, P::load(src + i));
    }
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
    using N = typename Isa::Narrow;
    using P = typename Isa::template Pack<float>;
    constexpr Index W = static_cast<Index>(N::W);
    auto* d = reinterpret_cast<std::uint16_t*>(dst);
    for (; i + W <= n; i += W) {
      // The inner rounding goes through dst itself: narrow, widen back, multiply.
      if constexpr (std::is_same<T, Eigen::bfloat16>::value) {
        N::narrow_bf16(d + i, P::load(xhat + i));
        N::narrow_bf16(d + i, P::mul(N::widen_bf16(d + i), P::load(w + i)));
      } else {
        N::narrow_half(d + i, P::load(xhat + i));
        N::narrow_half(d + i, P::mul(N::widen_half(d + i), P::load(w + i)));
      }
    }
  }
  for (; i < n; ++i) dst[i] = T(static_cast<float>(T(xhat[i])) * w[i]);
}

}  // namespace kernels

// Rows per block: about 32 KB of float scratch per array (L1), at least one row. From n
// only, so that backward's per-block parameter sums, added in block order, do not depend
// on the thread count.
constexpr Index kNarrowBlockElems = 8192;
inline Index narrow_block_rows(Index n) { return std::max<Index>(1, kNarrowBlockElems / std::max<Index>(n, 1)); }

// Parameters as float: the caller's float arrays, or T's widened into owned copies.
struct WideParams {
  std::vector<float> own_g, own_b;
  const float* gamma = nullptr;
  const float* beta = nullptr;
};

template <class P>
WideParams widen_params(const Affine<P>& p, Index n) {
  WideParams w;
  if constexpr (std::is_same<P, float>::value) {
    w.gamma = p.gamma.present ? p.gamma.data : nullptr;
    w.beta = p.beta.present ? p.beta.data : nullptr;
  } else {
    auto widen = [n](const View<const P>& v, std::vector<float>& out) -> const float* {
      if (!v.present) return nullptr;
      out.resize(static_cast<std::size_t>(n));
      for (Index i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = static_cast<float>(v.data[i]);
      return out.data();
    };
    w.gamma = widen(p.gamma, w.own_g);
    w.beta = widen(p.beta, w.own_b);
  }
  return w;
}

// The rows of a checked forward call, parameters as float: independent of the
// parameters' type (one instantiation for both).
template <class Isa, class T, bool Center>
void forward_narrow_rows(const RowNormSpec& spec, bool cast_then_weight, const View<const T>& x,
                         const View<T>& y, const WideParams& wp, RowStats<float>& saved,
                         const Exec& device) {
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  // LLaMA order: the float engine computes x * rstd alone; the weight comes after the
  // rounding (as a float (1 + w) for Gemma's zero-centred weight).
  RowNormSpec fspec = spec;
  std::vector<float> weight;
  if (cast_then_weight) {
    fspec.scale = ScaleKind::None;
    if (spec.scale != ScaleKind::None) {
      weight.assign(wp.gamma, wp.gamma + n);
      if (spec.scale == ScaleKind::OnePlusGamma)
        for (float& w : weight) w = 1.0f + w;
    }
  }
  const float* w = weight.empty() ? nullptr : weight.data();
  float* mean_hi = Center ? saved.mean.data() : nullptr;
  float* mean_lo = Center ? saved.mean_lo.data() : nullptr;
  float* rstd = saved.rstd.data();

  const Index block = narrow_block_rows(n);
  const Index blocks = (rows + block - 1) / block;
  const double bytes = static_cast<double>(block * n * static_cast<Index>(sizeof(T)));
  const Eigen::TensorOpCost cost(bytes, bytes, 6.0 * static_cast<double>(block * n));
  const Exec serial;
  parallel_for<Isa>(device, blocks, cost, [&](Index b0, Index b1) {
    std::vector<float> buf(static_cast<std::size_t>(block * n));
    for (Index b = b0; b < b1; ++b) {
      const Index r0 = b * block, nr = std::min(block, rows - r0);
      kernels::widen_row<Isa>(x.data + r0 * n, buf.data(), nr * n);
      // Normalized in place in the scratch (no streaming: it stays in cache).
      const RowPass<float> q{buf.data(), buf.data(), n,       nr,           wp.gamma,
                             wp.beta,    0,          Center ? mean_hi + r0 : nullptr,
                             Center ? mean_lo + r0 : nullptr, rstd + r0,    false};
      forward_rows<Isa, float, Center>(fspec, q, serial);
      for (Index r = 0; r < nr; ++r)
        kernels::narrow_row_weighted<Isa>(buf.data() + r * n, w, y.data + (r0 + r) * n, n);
    }
  });
}

// Forward for narrow T with parameters in P (float or T). cast_then_weight: RMSNorm's
// LLaMA order, y = T(w * T(x * rstd)); otherwise y = T(the float op's y).
template <class Isa, class T, class P, bool Center>
void forward_narrow(const RowNormSpec& spec, bool cast_then_weight, const View<const T>& x,
                    const Affine<P>& p, const View<T>& y, RowStats<float>& saved,
                    const Exec& device) {
  static_assert(is_narrow<T>::value, "forward_narrow: bfloat16 or half storage");
  const std::string where = std::string(spec.op) + "::forward";
  check_forward(spec, where, x, p, y);

  const Index n = x.inner(spec.k);
  const Index rows = x.outer(spec.k);
  if (Center) {
    if (saved.mean.size() != rows) saved.mean.resize(rows);
    if (saved.mean_lo.size() != rows) saved.mean_lo.resize(rows);
  } else {
    saved.mean.resize(0);
    saved.mean_lo.resize(0);
  }
  if (saved.rstd.size() != rows) saved.rstd.resize(rows);
  if (n == 0) {
    for (Index r = 0; r < rows; ++r) {
      saved.rstd(r) = static_cast<float>(kNaN);
      if (Center) saved.mean(r) = saved.mean_lo(r) = static_cast<float>(kNaN);
    }
    return;
  }
  if (rows == 0) return;

  forward_narrow_rows<Isa, T, Center>(spec, cast_then_weight, x, y, widen_params(p, n), saved,
                                      device);
}

// The rows of a checked backward call, parameters as float. want_param: sums receives
// the parameter gradients in double (n of dy xhat, then for LayerNorm n of dy).
template <class Isa, class T, bool Center>
void backward_narrow_rows(const RowNormSpec& spec, const View<const T>& dy, const View<const T>& x,
                          const WideParams& wp, const RowStats<float>& saved, const View<T>& dx,
                          bool want_param, std::vector<double>& sums, const Exec& device) {
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  const bool want_dx = dx.present;
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
      const Index r0 = b * block, nr = std::min(block, rows - r0);
      kernels::widen_row<Isa>(dy.data + r0 * n, bdy, nr * n);
      kernels::widen_row<Isa>(x.data + r0 * n, bx, nr * n);
      const RowGradPass<float> q{bdy,
                                 bx,
                                 want_dx ? bdy : nullptr,
                                 n,
                                 nr,
                                 wp.gamma,
                                 Center ? saved.mean.data() + r0 : nullptr,
                                 Center ? saved.mean_lo.data() + r0 : nullptr,
                                 saved.rstd.data() + r0,
                                 want_param ? pg.data() : nullptr,
                                 sum_b ? pg.data() + n : nullptr,
                                 nr * n};
      backward_pass<Isa, float, Center>(spec, q, serial);
      if (want_dx)
        for (Index r = 0; r < nr; ++r)
          kernels::narrow_row<Isa>(bdy + r * n, dx.data + (r0 + r) * n, n);
      if (dg_acc)
        for (Index j = 0; j < n; ++j) dg_acc[j] += static_cast<double>(pg[static_cast<std::size_t>(j)]);
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

// Backward for narrow T: dx = T(the float op's dx on the widened dy and x); dgamma and
// dbeta (in P) from per-block float sums added in double in block order, then rounded
// once to P.
template <class Isa, class T, class P, bool Center>
void backward_narrow(const RowNormSpec& spec, const View<const T>& dy, const View<const T>& x,
                     const Affine<P>& p, const RowStats<float>& saved, const View<T>& dx,
                     const View<P>& dgamma, const View<P>& dbeta, const Exec& device) {
  static_assert(is_narrow<T>::value, "backward_narrow: bfloat16 or half storage");
  const std::string where = std::string(spec.op) + "::backward";
  check_backward<Center>(spec, where, dy, x, p, saved, dx, dgamma, dbeta);
  const Index n = x.inner(spec.k);
  const Index rows = x.outer(spec.k);
  const bool want_dx = dx.present, want_dg = dgamma.present, want_db = dbeta.present;
  const bool want_param = want_dg || want_db;
  if (rows == 0 || n == 0 || (!want_dx && !want_param)) {
    if (want_dg) std::fill(dgamma.data, dgamma.data + n, P(0.0f));
    if (want_db) std::fill(dbeta.data, dbeta.data + n, P(0.0f));
    return;
  }

  std::vector<double> sums;  // n sums of dy xhat, then (LayerNorm) n of dy
  const Index arrays = spec.shift ? 2 : 1;
  backward_narrow_rows<Isa, T, Center>(spec, dy, x, widen_params(p, n), saved, dx, want_param,
                                       sums, device);
  if (!want_param) return;
  for (Index j = 0; j < n; ++j) {
    if (want_dg) dgamma.data[j] = P(static_cast<float>(sums[static_cast<std::size_t>(j)]));
    if (want_db && arrays > 1)
      dbeta.data[j] = P(static_cast<float>(sums[static_cast<std::size_t>(n + j)]));
  }
}

}  // namespace detail
}  // namespace normkit
