// normkit: row kernels on raw pointers, written once over a backend's packet interface
// (simd/<isa>.hpp) and instantiated per backend. The scalar backend's instantiation is
// the "scalar twin" that the tests compare every wider backend with.
//
// Accumulation: every sum is carried in double, whatever T is. A float is widened
// exactly, so a float row's sums are exact to double rounding: that is what makes the
// large-mean case (x = 1e4 + 1e-2 * randn) and the overflow cases (|x| ~ 1e20, x^2 ~ 1e40
// > FLT_MAX = 3.4e38) come out right without a scaling pass. The cost is small: the
// widening is one conversion per 8 floats and the kernels are bound by memory, not FMAs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace normkit {
namespace detail {

using Index = std::ptrdiff_t;

// How a normalized value is scaled: not at all, by gamma, or by (1 + gamma) (Gemma's
// zero-centred weight; the +1 is applied on the fly, never stored).
enum class ScaleKind { None, Gamma, OnePlusGamma };

namespace kernels {

// Number of packets processed per loop trip in reductions. A float packet widens into
// two double packets, so U = 2 keeps 4 independent add chains per sum in flight:
// with 4-cycle FP add latency and 2 add ports, 8 would saturate the core, but the
// loads (one row from DRAM or L2) are the bound, and 4 chains already exceed them.
constexpr int kUnroll = 2;

// Software prefetch of another region while a kernel streams through its own, at the
// same relative offset: when a pass moves from one short segment to the next (a
// BatchNorm channel is N segments spread over memory; a row norm goes from one row's
// statistics to its normalize pass), the hardware prefetcher would restart cold at each
// segment and the loads would wait for memory's latency. Empty (p == nullptr): nothing.
// to_l2: into L2 only (prefetcht1), for data a later pass reads, not the next loads.
// Kernels take it by const reference: by value (24 bytes, passed on the stack) the
// callee's 16-byte copies of the caller's field-by-field stores missed store forwarding
// and waited for the store buffer to drain, streaming stores of the previous row
// included (LayerNorm forward at [16384, 768]: 0.40 -> 0.38-0.39 ns per element).
struct Prefetch {
  const char* p = nullptr;
  std::size_t bytes = 0;
  bool to_l2 = false;
  // The range is walked 2^rate times as fast as the caller's offsets advance.
  int rate = 0;
  Prefetch() = default;
  template <class T>
  Prefetch(const T* q, Index n, bool l2 = false, int log2_rate = 0)
      : p(reinterpret_cast<const char*>(q)),
        bytes(q ? static_cast<std::size_t>(n) * sizeof(T) : 0),
        to_l2(l2),
        rate(log2_rate) {}
  // The lines of [off, off + step) bytes (scaled by 2^rate), each once.
  template <std::size_t Step>
  void at(std::size_t off) const {
    if (!p) return;
    if (rate != 0) {
      const std::size_t lo = rate > 0 ? off << rate : off >> -rate;
      const std::size_t hi = rate > 0 ? (off + Step) << rate : (off + Step) >> -rate;
      for (std::size_t a = (lo + 63) / 64 * 64; a < hi && a < bytes; a += 64) line(a);
    } else if (Step < 64) {
      if (off % 64 < Step && off < bytes) line(off);
    } else {
      for (std::size_t o = 0; o < Step; o += 64)
        if (off + o < bytes) line(off + o);
    }
  }
  void line(std::size_t off) const {
    if (to_l2)
      __builtin_prefetch(p + off, 0, 2);
    else
      __builtin_prefetch(p + off, 0, 3);
  }
};

// x * scale - shift with one rounding: an fmadd, or (Unit: scale == 1) a subtraction,
// which gives the same bits and keeps the FMA ports free for the squares.
template <class A, bool Unit>
struct ShiftScale {
  typename A::V scale, shift, nshift;
  ShiftScale(double sc, double sh) : scale(A::set1(sc)), shift(A::set1(sh)), nshift(A::set1(-sh)) {}
  typename A::V operator()(const typename A::V& v) const {
    return Unit ? A::sub(v, shift) : A::fmadd(v, scale, nshift);
  }
};

// s = sum_i (x_i * scale - shift) and s2 = sum_i (x_i * scale - shift)^2, in double.
// scale is a power of two (exact); shift is subtracted with one rounding.
template <class Isa, class T, bool Unit>
inline void shifted_sums_impl(const T* x, Index n, double scale, double shift, double& s,
                              double& s2, const Prefetch& pf) {
  using P = typename Isa::template Pack<T>;
  using A = typename Isa::Acc;
  constexpr Index W = static_cast<Index>(P::W);
  constexpr int K = kUnroll * static_cast<int>(P::W / A::W);  // double chains
  typename A::V a1[K], a2[K];
  for (int k = 0; k < K; ++k) {
    a1[k] = A::zero();
    a2[k] = A::zero();
  }
  const ShiftScale<A, Unit> shs(scale, shift);
  Index i = 0;
  for (; i + kUnroll * W <= n; i += kUnroll * W) {
    pf.at<kUnroll * W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    int k = 0;
    for (int u = 0; u < kUnroll; ++u) {
      P::widen(P::load(x + i + u * W), [&](const typename A::V& v) {
        typename A::V d = shs(v);
        a1[k] = A::add(a1[k], d);
        a2[k] = A::fmadd(d, d, a2[k]);
        ++k;
      });
    }
  }
  for (; i + W <= n; i += W) {
    int k = 0;
    P::widen(P::load(x + i), [&](const typename A::V& v) {
      typename A::V d = shs(v);
      a1[k] = A::add(a1[k], d);
      a2[k] = A::fmadd(d, d, a2[k]);
      ++k;
    });
  }
  double t1 = 0.0, t2 = 0.0;
  for (; i < n; ++i) {
    double d = static_cast<double>(x[i]) * scale - shift;
    t1 += d;
    t2 += d * d;
  }
  for (int k = 1; k < K; ++k) {
    a1[0] = A::add(a1[0], a1[k]);
    a2[0] = A::add(a2[0], a2[k]);
  }
  s = A::reduce(a1[0]) + t1;
  s2 = A::reduce(a2[0]) + t2;
}

template <class Isa, class T>
inline void shifted_sums(const T* x, Index n, double scale, double shift, double& s,
                         double& s2, const Prefetch& pf = {}) {
  if (scale == 1.0)
    shifted_sums_impl<Isa, T, true>(x, n, scale, shift, s, s2, pf);
  else
    shifted_sums_impl<Isa, T, false>(x, n, scale, shift, s, s2, pf);
}

// sum_i (x_i * scale - shift), in double.
template <class Isa, class T, bool Unit>
inline double sum_impl(const T* x, Index n, double scale, double shift, const Prefetch& pf) {
  using P = typename Isa::template Pack<T>;
  using A = typename Isa::Acc;
  constexpr Index W = static_cast<Index>(P::W);
  constexpr int K = kUnroll * static_cast<int>(P::W / A::W);
  typename A::V a[K];
  for (int k = 0; k < K; ++k) a[k] = A::zero();
  const ShiftScale<A, Unit> shs(scale, shift);
  Index i = 0;
  for (; i + kUnroll * W <= n; i += kUnroll * W) {
    pf.at<kUnroll * W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    int k = 0;
    for (int u = 0; u < kUnroll; ++u) {
      P::widen(P::load(x + i + u * W), [&](const typename A::V& v) {
        a[k] = A::add(a[k], shs(v));
        ++k;
      });
    }
  }
  for (; i + W <= n; i += W) {
    int k = 0;
    P::widen(P::load(x + i), [&](const typename A::V& v) {
      a[k] = A::add(a[k], shs(v));
      ++k;
    });
  }
  double t = 0.0;
  for (; i < n; ++i) t += static_cast<double>(x[i]) * scale - shift;
  for (int k = 1; k < K; ++k) a[0] = A::add(a[0], a[k]);
  return A::reduce(a[0]) + t;
}

template <class Isa, class T>
inline double sum(const T* x, Index n, double scale, double shift, const Prefetch& pf = {}) {
  return scale == 1.0 ? sum_impl<Isa, T, true>(x, n, scale, shift, pf)
                      : sum_impl<Isa, T, false>(x, n, scale, shift, pf);
}

// sum_i (x_i * scale)^2, in double.
template <class Isa, class T>
inline double sum_squares(const T* x, Index n, double scale) {
  using P = typename Isa::template Pack<T>;
  using A = typename Isa::Acc;
  constexpr Index W = static_cast<Index>(P::W);
  constexpr int K = kUnroll * static_cast<int>(P::W / A::W);
  typename A::V a[K];
  for (int k = 0; k < K; ++k) a[k] = A::zero();
  const typename A::V vscale = A::set1(scale);
  Index i = 0;
  for (; i + kUnroll * W <= n; i += kUnroll * W) {
    int k = 0;
    for (int u = 0; u < kUnroll; ++u) {
      P::widen(P::load(x + i + u * W), [&](const typename A::V& v) {
        typename A::V d = A::mul(v, vscale);
        a[k] = A::fmadd(d, d, a[k]);
        ++k;
      });
    }
  }
  for (; i + W <= n; i += W) {
    int k = 0;
    P::widen(P::load(x + i), [&](const typename A::V& v) {
      typename A::V d = A::mul(v, vscale);
      a[k] = A::fmadd(d, d, a[k]);
      ++k;
    });
  }
  double t = 0.0;
  for (; i < n; ++i) {
    double d = static_cast<double>(x[i]) * scale;
    t += d * d;
  }
  for (int k = 1; k < K; ++k) a[0] = A::add(a[0], a[k]);
  return A::reduce(a[0]) + t;
}

// Sums of a and a * b over the whole packets of [0, n) (W values each) in float trees,
// widened once per tree and accumulated in double: term(j, a, b) sets the packets of a
// term a and its weight b at element j (out-parameters: returned as a struct, g++ 12 left
// both on the stack). Blocks of B packets (pairs as a + a' and fmadd(a', b', a * b), then
// log2(B / 2) levels of adds: at most 2 + log2(B / 2) roundings of 2^-24 added to a term),
// then the packets left in trees of B/2, B/4, ..., 1 (widened packet by packet, a
// BatchNorm segment of 196 values, 12 packets and no whole tree of 16, spent most of its
// time in the double additions' dependency chains). WantA = false: sum a is not taken.
// The accumulator walks a row block by block (block(), while blocks remain: more()) and
// then finishes it (rest()), so that another pass can run between its blocks (the skewed
// forward, normalize_with_sums); product_tree_sums below walks a row alone.
template <class Isa, class T, int B, bool WantA>
struct TreeSums {
  using P = typename Isa::template Pack<T>;
  using A = typename Isa::Acc;
  using V = typename P::V;
  static constexpr Index W = static_cast<Index>(P::W);
  static constexpr int K = static_cast<int>(P::W / A::W);
  typename A::V aa[K], ab[K];
  Index n, i = 0;  // the row's length; the first element not yet summed
  explicit TreeSums(Index len) : n(len) {
    for (int k = 0; k < K; ++k) aa[k] = ab[k] = A::zero();
  }
  template <int L, class Term>
  void tree(const Term& term) {
    V t[L], q[L];
    if constexpr (L == 1) {
      V b;
      term(i, t[0], b);
      q[0] = P::mul(t[0], b);
    } else {
      // Unrolled in full, so that t and q live in registers.
#pragma GCC unroll 16
      for (int b = 0; b < L / 2; ++b) {
        V ua, ub, va, vb;
        term(i + 2 * b * W, ua, ub);
        term(i + (2 * b + 1) * W, va, vb);
        if (WantA) t[b] = P::add(ua, va);
        q[b] = P::fmadd(va, vb, P::mul(ua, ub));
      }
#pragma GCC unroll 4
      for (int w = L / 4; w >= 1; w /= 2)
#pragma GCC unroll 16
        for (int b = 0; b < w; ++b) {
          if (WantA) t[b] = P::add(t[b], t[b + w]);
          q[b] = P::add(q[b], q[b + w]);
        }
    }
    int k = 0;
    if (WantA) P::widen(t[0], [&](const typename A::V& v) { aa[k] = A::add(aa[k], v); ++k; });
    k = 0;
    P::widen(q[0], [&](const typename A::V& v) { ab[k] = A::add(ab[k], v); ++k; });
    i += L * W;
  }
  bool more() const { return i + B * W <= n; }
  // One block of B packets (more() must hold); pf, pf2 prefetched at its offsets.
  template <class Term>
  void block(const Term& term, const Prefetch& pf, const Prefetch& pf2) {
    const std::size_t off = static_cast<std::size_t>(i) * sizeof(T);
    pf.at<B * W * sizeof(T)>(off);
    pf2.at<B * W * sizeof(T)>(off);
    tree<B>(term);
  }
  // The packets left (fewer than B) in smaller trees; sa, sab receive the sums. Returns
  // the first element after the last whole packet.
  template <class Term>
  Index rest(const Term& term, double& sa, double& sab) {
    if constexpr (B > 8) if (i + 8 * W <= n) tree<8>(term);
    if constexpr (B > 4) if (i + 4 * W <= n) tree<4>(term);
    if constexpr (B > 2) if (i + 2 * W <= n) tree<2>(term);
    if (i + W <= n) tree<1>(term);
    for (int k = 1; k < K; ++k) {
      aa[0] = A::add(aa[0], aa[k]);
      ab[0] = A::add(ab[0], ab[k]);
    }
    if (WantA) sa = A::reduce(aa[0]);
    sab = A::reduce(ab[0]);
    return i;
  }
};

// TreeSums over a row alone. pf, pf2: prefetched at the terms' offsets, block by block.
template <class Isa, class T, int B, bool WantA, class Term>
inline Index product_tree_sums(Index n, const Term& term, const Prefetch& pf,
                               const Prefetch& pf2, double& sa, double& sab) {
  TreeSums<Isa, T, B, WantA> acc(n);
  while (acc.more()) acc.block(term, pf, pf2);
  return acc.rest(term, sa, sab);
}

// The fast form of the statistics of float data: d = x - shift in float, then trees of
// 16 (segments) or 4 (columns) terms d and d*d summed in float, widened, and accumulated
// in double. Each tree adds at most 4 roundings of 2^-24 to its terms, so the
// relative error of the sums stays near float's rounding of d itself, while the
// double work falls from 4 operations per element to 4 per tree. Valid while no d*d
// overflows or underflows float: the caller checks the result (blocked_sums_trusted) and
// takes the exact double kernels otherwise. Trees of 8 measured 15% slower in L1 (the
// widening and the double adds are a third of the work there), and that showed once
// the row norms overlapped memory with it: 0.75 of the copy roofline against 0.89.
// The trees themselves, over the terms load_v(i) (a packet at element i) and load_s(i)
// (one element, for the tail): Center: d = term - shift, s = sum d, s2 = sum d^2; else
// s2 = sum term^2 only (s untouched). A load may do more than read (the fused residual
// builds s = alpha x + r there). pf, pf2: prefetched at the terms' offsets.
// StatTrees walks a row block by block (as TreeSums); tree_sums, a row alone.
template <class Isa, class T, bool Center, class LoadV>
struct StatTrees {
  using P = typename Isa::template Pack<T>;
  using V = typename P::V;
  static constexpr int B = 16;
  TreeSums<Isa, T, B, Center> acc;
  T shift;
  V vs;
  const LoadV& load_v;
  StatTrees(Index n, T sh, const LoadV& lv) : acc(n), shift(sh), vs(P::set1(sh)), load_v(lv) {}
  void term(Index j, V& a, V& b) const { a = b = Center ? P::sub(load_v(j), vs) : load_v(j); }
  bool more() const { return acc.more(); }
  void block(const Prefetch& pf, const Prefetch& pf2 = {}) {
    acc.block([this](Index j, V& a, V& b) { term(j, a, b); }, pf, pf2);
  }
  template <class LoadS>
  void finish(const LoadS& load_s, double& s, double& s2) {
    double vs1 = 0.0, vs2 = 0.0;
    const Index i0 = acc.rest([this](Index j, V& a, V& b) { term(j, a, b); }, vs1, vs2);
    double ts = 0.0, tq = 0.0;
    for (Index i = i0; i < acc.n; ++i) {
      const T d = Center ? load_s(i) - shift : load_s(i);
      ts += static_cast<double>(d);
      tq += static_cast<double>(d * d);
    }
    if (Center) s = vs1 + ts;
    s2 = vs2 + tq;
  }
};
template <class Isa, class T, bool Center, class LoadV, class LoadS>
inline void tree_sums(Index n, T shift, const LoadV& load_v, const LoadS& load_s, double& s,
                      double& s2, const Prefetch& pf, const Prefetch& pf2 = {}) {
  StatTrees<Isa, T, Center, LoadV> st(n, shift, load_v);
  while (st.more()) st.block(pf, pf2);
  st.finish(load_s, s, s2);
}

template <class Isa, class T>
inline void blocked_sums(const T* x, Index n, T shift, double& s, double& s2,
                         const Prefetch& pf = {}) {
  using P = typename Isa::template Pack<T>;
  tree_sums<Isa, T, true>(
      n, shift, [x](Index i) { return P::load(x + i); }, [x](Index i) { return x[i]; }, s, s2, pf);
}

// Whether blocked sums over `count` elements can be trusted: finite (no square or tree
// overflowed T, no NaN or Inf in the data); a mean square far above T's underflow
// (squares that underflowed then weigh less than 2^-30 of the total); and a shift within
// two standard deviations of the mean, delta^2 <= 4 var with delta = s / count: the
// rounding of each term (5 roundings of T at most) reaches var magnified by
// (var + delta^2) / var, at most 5 here.
template <class T>
inline bool blocked_sums_trusted(double s, double s2, double count) {
  constexpr double kTiny = sizeof(T) <= sizeof(float) ? 0x1p-96 : 0x1p-960;
  if (!(std::isfinite(s) && std::isfinite(s2) && s2 >= kTiny * count)) return false;
  const double delta = s / count;
  return delta * delta <= 4.0 * (s2 / count - delta * delta);
}

// sum_i x_i^2 for float data: squares in float, in trees of 16 packets as blocked_sums,
// widened and accumulated in double. Valid while no square or tree overflows or
// underflows float: the caller checks the result (blocked_sums_trusted with s = 0) and
// takes sum_squares otherwise.
template <class Isa, class T>
inline double blocked_sum_squares(const T* x, Index n, const Prefetch& pf = {}) {
  using P = typename Isa::template Pack<T>;
  double unused = 0.0, s2 = 0.0;
  tree_sums<Isa, T, false>(
      n, T(0), [x](Index i) { return P::load(x + i); }, [x](Index i) { return x[i]; }, unused,
      s2, pf);
  return s2;
}

// The lower median of v[0 .. k), k <= 5, reordering v: the shift of the float-blocked
// sums (a member of the data near its centre unless most of the sample are outliers).
// The median of v[0 .. 5): branch-free (on random data a sort mispredicts half its
// compares): neither the smallest nor the largest of v[0..3] can be the median of 5; the
// median of the three others and v[4] is.
template <class T>
inline T median_of_5(const T* v) {
  const T f = std::max(std::min(v[0], v[1]), std::min(v[2], v[3]));
  const T h = std::min(std::max(v[0], v[1]), std::max(v[2], v[3]));
  return std::max(std::min(f, h), std::min(std::max(f, h), v[4]));
}
template <class T>
inline T median_of_5(T* v, int k) {
  if (k <= 0) return T(0);
  if (k == 5) return median_of_5(static_cast<const T*>(v));
  // Fewer: insertion sort, lower median. NaN compares false: any order is fine then, the
  // sums are NaN anyway.
  for (int i = 1; i < k; ++i)
    for (int j = i; j > 0 && v[j] < v[j - 1]; --j) std::swap(v[j], v[j - 1]);
  return v[(k - 1) / 2];
}

// a * b + c for the scalar paths (heads, tails) of backend Isa: fused where the backend
// has FMA (as its vector paths are: Isa::has_fma), so that no instantiation is left to
// the compiler's contraction choices. With runtime dispatch the AVX2 / AVX-512 code is
// compiled for a target with FMA (Isa::run) even where the build's flags lack it, and
// std::fma is one instruction there.
template <class Isa, class T>
inline T fmadd_s(T a, T b, T c) {
  if constexpr (Isa::has_fma)
    return std::fma(a, b, c);
  else
    return a * b + c;
}

// Parameters of the element-wise passes: xhat = (x - mean_hi) * rstd - mean_lo * rstd when
// centring (the mean split in two T so that x - mean_hi is exact for x near the mean),
// xhat = x * rstd when not.
template <class T>
struct RowAffine {
  T mean_hi, mean_lo, rstd;
};

// Centring, as (x - mean_hi) * rstd - mean_lo * rstd: one subtraction and one fmadd per
// packet (the form ((x - mean_hi) - mean_lo) * rstd took three operations). x - mean_hi
// is exact for x within a factor of 2 of the mean, as before; mean_lo * rstd (rounded
// once in T, below 2^-24 |mean| rstd) only shifts the result, whose one rounding (two
// without FMA) is all that is added to it. A constant row (mean_lo = 0, x = mean_hi)
// still gives exactly 0.
template <class Isa, class T, bool Center>
struct Xhat {
  using P = typename Isa::template Pack<T>;
  typename P::V hi, nlo, rstd;  // nlo = -(mean_lo * rstd)
  Xhat() = default;
  explicit Xhat(const RowAffine<T>& r) : hi(P::set1(r.mean_hi)), nlo(P::set1(neg_lo(r))),
                                         rstd(P::set1(r.rstd)) {}
  static T neg_lo(const RowAffine<T>& r) { return -(r.mean_lo * r.rstd); }
  typename P::V operator()(const typename P::V& x) const {
    if (Center) return P::fmadd(P::sub(x, hi), rstd, nlo);
    return P::mul(x, rstd);
  }
  static T scalar(const RowAffine<T>& r, T x) {
    if (Center) return fmadd_s<Isa>(x - r.mean_hi, r.rstd, neg_lo(r));
    return x * r.rstd;
  }
};

template <class Isa, class T, ScaleKind S>
struct Scale {
  using P = typename Isa::template Pack<T>;
  typename P::V one = P::set1(T(1));
  typename P::V operator()(const T* gamma) const {
    if (S == ScaleKind::OnePlusGamma) return P::add(one, P::load(gamma));
    return P::load(gamma);
  }
  static T scalar(const T* gamma) {
    return S == ScaleKind::OnePlusGamma ? T(1) + *gamma : *gamma;
  }
};

// xhat * scale + beta, a packet or an element at a time (normalize, and narrow storage's
// fused forward, narrow.hpp).
template <class Isa, class T, bool Center, ScaleKind S, bool Shift>
struct NormAffine {
  using P = typename Isa::template Pack<T>;
  using X = Xhat<Isa, T, Center>;
  using G = Scale<Isa, T, S>;
  RowAffine<T> r;
  const T* gamma;
  const T* beta;
  X xhat;
  G scale{};
  NormAffine(const RowAffine<T>& ra, const T* g, const T* b) : r(ra), gamma(g), beta(b), xhat(ra) {}
  // The parameters' packets at element i (scale and beta; those the mode has), which rows
  // in step share (normalize2).
  struct Params {
    typename P::V g{}, b{};
  };
  Params params(Index i) const {
    Params p;
    if (S != ScaleKind::None) p.g = scale(gamma + i);
    if (Shift) p.b = P::load(beta + i);
    return p;
  }
  // The packet whose x is xv, its parameters p.
  typename P::V operator()(const typename P::V& xv, const Params& p) const {
    const typename P::V v = xhat(xv);
    if (S != ScaleKind::None) return Shift ? P::fmadd(v, p.g, p.b) : P::mul(v, p.g);
    return Shift ? P::add(v, p.b) : v;
  }
  // The packet of elements [i, i + W), xv holding their x.
  typename P::V operator()(const typename P::V& xv, Index i) const { return (*this)(xv, params(i)); }
  // Element i, of value x: the same bits as its packet lane.
  T scalar(T x, Index i) const {
    T v = X::scalar(r, x);
    if (S != ScaleKind::None)
      v = Shift ? fmadd_s<Isa>(v, G::scalar(gamma + i), beta[i]) : v * G::scalar(gamma + i);
    else if (Shift)
      v += beta[i];
    return v;
  }
};

// y = xhat * scale + beta. Stream selects non-temporal stores (after a scalar head
// that aligns y to the packet size). y may be x (in place).
// copy (the fused residual's s, built in a scratch row x): also written, x itself, with
// the same kind of stores as y; it must share y's alignment.
// pf, pf2: later rows (the fused residual's x and r), fetched into L2 one line each per
// packet while this row is written (see row_norm.hpp forward_rows).
template <class Isa, class T, bool Center, ScaleKind S, bool Shift, bool Stream>
inline void normalize(const T* x, T* y, Index n, const RowAffine<T>& r, const T* gamma,
                      const T* beta, T* copy = nullptr, const Prefetch& pf = {},
                      const Prefetch& pf2 = {}) {
  using P = typename Isa::template Pack<T>;
  constexpr Index W = static_cast<Index>(P::W);
  const NormAffine<Isa, T, Center, S, Shift> op(r, gamma, beta);
  auto scalar_at = [&](Index i) {
    const T v = op.scalar(x[i], i);
    if (copy) copy[i] = x[i];
    y[i] = v;
  };
  Index i = 0;
  if (Stream) {
    constexpr std::uintptr_t align = sizeof(typename P::V);
    for (; i < n && reinterpret_cast<std::uintptr_t>(y + i) % align != 0; ++i) scalar_at(i);
  }
  for (; i + W <= n; i += W) {
    pf.at<W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    pf2.at<W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    const typename P::V xv = P::load(x + i);
    const typename P::V v = op(xv, i);
    if (Stream) {
      P::stream(y + i, v);
      if (copy) P::stream(copy + i, xv);
    } else {
      P::store(y + i, v);
      if (copy) P::store(copy + i, xv);
    }
  }
  for (; i < n; ++i) scalar_at(i);
}

// The skewed order of a streamed forward: normalize (streaming stores) of row x -> y,
// and between its packets the float-tree statistics of the next row xn (Center: s and s2
// of xn - shift, else s2 of xn, as blocked_sums / blocked_sum_squares take them: the
// same trees in the same order, so the same bits), one tree of 16 packets per 16 packets
// written. A row's statistics pass alone only reads (from L2, where the previous rows'
// pf put it), and memory sat idle through it; in step with the stores it keeps memory
// busy (README "Architecture", the skewed forward order). xn must not overlap y. pf: a
// later row fetched into L2 one line per packet written; pfn: xn's own lines ahead of
// its trees.
template <class Isa, class T, bool Center, ScaleKind S, bool Shift>
inline void normalize_with_sums(const T* x, T* y, Index n, const RowAffine<T>& r,
                                const T* gamma, const T* beta, const T* xn, T shift,
                                double& s, double& s2, const Prefetch& pf, const Prefetch& pfn) {
  using P = typename Isa::template Pack<T>;
  constexpr Index W = static_cast<Index>(P::W);
  const NormAffine<Isa, T, Center, S, Shift> op(r, gamma, beta);
  auto load_n = [xn](Index j) { return P::load(xn + j); };
  StatTrees<Isa, T, Center, decltype(load_n)> st(n, shift, load_n);
  constexpr Index kB = StatTrees<Isa, T, Center, decltype(load_n)>::B;
  Index i = 0;
  constexpr std::uintptr_t align = sizeof(typename P::V);
  for (; i < n && reinterpret_cast<std::uintptr_t>(y + i) % align != 0; ++i) y[i] = op.scalar(x[i], i);
  auto packet = [&](Index j) {
    pf.at<W * sizeof(T)>(static_cast<std::size_t>(j) * sizeof(T));
    P::stream(y + j, op(P::load(x + j), j));
  };
  for (; st.more() && i + kB * W <= n; i += kB * W) {
    st.block(pfn);
#pragma GCC unroll 16
    for (Index u = 0; u < kB; ++u) packet(i + u * W);
  }
  for (; i + W <= n; i += W) packet(i);
  for (; i < n; ++i) y[i] = op.scalar(x[i], i);
  while (st.more()) st.block(pfn);
  st.finish([xn](Index j) { return xn[j]; }, s, s2);
}

// normalize over two rows in step, x0 -> y0 and x1 -> y1 (of n elements each; ordinary
// stores), the parameters' packets loaded once for both (see row_norm.hpp pair_rows).
// The same operations per element as normalize, so the same bits. pf: a later range,
// prefetched two lines per packet (the next two rows, as normalize prefetches one).
template <class Isa, class T, bool Center, ScaleKind S, bool Shift>
inline void normalize2(const T* x0, const T* x1, T* y0, T* y1, Index n, const RowAffine<T>& r0,
                       const RowAffine<T>& r1, const T* gamma, const T* beta,
                       const Prefetch& pf = {}) {
  using P = typename Isa::template Pack<T>;
  using V = typename P::V;
  constexpr Index W = static_cast<Index>(P::W);
  const NormAffine<Isa, T, Center, S, Shift> op0(r0, gamma, beta), op1(r1, gamma, beta);
  Index i = 0;
  for (; i + W <= n; i += W) {
    pf.at<W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    const auto p = op0.params(i);  // gamma and beta are the same for both rows
    const V v0 = op0(P::load(x0 + i), p);
    const V v1 = op1(P::load(x1 + i), p);
    P::store(y0 + i, v0);
    P::store(y1 + i, v1);
  }
  for (; i < n; ++i) {
    y0[i] = op0.scalar(x0[i], i);
    y1[i] = op1.scalar(x1[i], i);
  }
}

// Whether T's packets widen into more than one double packet (float on a vector
// backend): where the backward kernels sum in float before the double (trees, stages).
template <class Isa, class T>
constexpr bool kWidens = Isa::template Pack<T>::W > Isa::Acc::W;

// Backward, first pass over a row: sum_g = sum_i g_i and sum_gx = sum_i g_i * xhat_i,
// with g = dy * scale, in double. pf, pf2: prefetched at dy's and x's offsets.
// Trees (float data on a vector backend, see backward_sums): blocks of 16 packets are
// summed first in float trees (g, and g * xhat: pairs as one fmadd, then 3 levels of
// adds: at most 4 roundings of 2^-24 added to each term, as the forward statistics'
// tree_sums), then widened and added in double. Without, each term (rounded in T) is
// widened and added in double.
template <class Isa, class T, bool Center, ScaleKind S, bool Trees>
inline void backward_sums_impl(const T* dy, const T* x, const T* gamma, Index n,
                               const RowAffine<T>& r, double& sum_g, double& sum_gx,
                               const Prefetch& pf, const Prefetch& pf2) {
  using P = typename Isa::template Pack<T>;
  using A = typename Isa::Acc;
  using V = typename P::V;
  using X = Xhat<Isa, T, Center>;
  using G = Scale<Isa, T, S>;
  constexpr Index W = static_cast<Index>(P::W);
  constexpr int K = static_cast<int>(P::W / A::W);
  const X xhat(r);
  const G scale{};
  auto g_at = [&](Index j) {
    const V d = P::load(dy + j);
    return S != ScaleKind::None ? P::mul(d, scale(gamma + j)) : d;
  };
  Index i = 0;
  double vg = 0.0, vgx = 0.0;
  if constexpr (Trees) {
    i = product_tree_sums<Isa, T, 16, true>(
        n,
        [&](Index j, V& a, V& b) {
          a = g_at(j);
          b = xhat(P::load(x + j));
        },
        pf, pf2, vg, vgx);
  } else {
    typename A::V ag[K], agx[K];
    for (int k = 0; k < K; ++k) ag[k] = agx[k] = A::zero();
    for (; i + W <= n; i += W) {
      pf.template at<W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
      pf2.template at<W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
      const V g = g_at(i);
      const V gx = P::mul(g, xhat(P::load(x + i)));
      int k = 0;
      P::widen(g, [&](const typename A::V& v) { ag[k] = A::add(ag[k], v); ++k; });
      k = 0;
      P::widen(gx, [&](const typename A::V& v) { agx[k] = A::add(agx[k], v); ++k; });
    }
    for (int k = 1; k < K; ++k) {
      ag[0] = A::add(ag[0], ag[k]);
      agx[0] = A::add(agx[0], agx[k]);
    }
    vg = A::reduce(ag[0]);
    vgx = A::reduce(agx[0]);
  }
  double tg = 0.0, tgx = 0.0;
  for (; i < n; ++i) {
    T g = dy[i];
    if (S != ScaleKind::None) g *= G::scalar(gamma + i);
    tg += static_cast<double>(g);
    tgx += static_cast<double>(g * X::scalar(r, x[i]));
  }
  sum_g = vg + tg;
  sum_gx = vgx + tgx;
}

// The first pass, with trees where float packets widen into double ones: the widening
// and the double adds, 10 of 15 vector operations per packet, fall to one per tree. Where
// the data are in cache the pass is bound by that work (Zen 4's AVX-512: LayerNorm
// backward at [64, 4096] 0.20 -> 0.23-0.29 of the roofline with the trees). A tree that
// overflows float leaves an Inf or NaN in a sum; such a row (or one with Inf or NaN in its
// data) is summed again without trees, so that only real non-finite data poison it.
template <class Isa, class T, bool Center, ScaleKind S>
inline void backward_sums(const T* dy, const T* x, const T* gamma, Index n,
                          const RowAffine<T>& r, double& sum_g, double& sum_gx,
                          const Prefetch& pf = {}, const Prefetch& pf2 = {}) {
  if constexpr (kWidens<Isa, T>) {
    backward_sums_impl<Isa, T, Center, S, true>(dy, x, gamma, n, r, sum_g, sum_gx, pf, pf2);
    if (std::isfinite(sum_g) && std::isfinite(sum_gx)) return;
  }
  backward_sums_impl<Isa, T, Center, S, false>(dy, x, gamma, n, r, sum_g, sum_gx, pf, pf2);
}

// Backward, second pass over R rows at once (R = 1, 2 or 4):
//   dx_ri = rstd_r * (g_ri - a_r - xhat_ri * b_r)     (WantDx; a = mean(g), b = mean(g xhat))
//   dgamma_acc_i += sum_r dy_ri * xhat_ri              (WantDg; double accumulators)
//   dbeta_acc_i  += sum_r dy_ri                        (WantDb)
// The R products are summed pairwise in T before one read-modify-write of the double
// accumulators: at 4096 features those are 64 KiB each, beyond L1, and the traffic to
// them was the bound (16 bytes of accumulator per 4-byte element and row). The pairwise
// sum of 4 adds at most 2 roundings of T to each term. dx may be dy or x (in place).
// next_dy, next_x: prefetched as the rows are walked (at their own rate: a share of the
// next rows, whose first pass follows), so that memory stays busy while this runs from cache.
// Stream (non-temporal dx stores) requires every dx row to share its alignment.
template <class T, int R>
struct RowsArgs {
  const T* dy[R];
  const T* x[R];
  T* dx[R];
  RowAffine<T> ra[R];
  T a[R], b[R];
};

// Rows walked one at a time (R = 1) may stage their dgamma/dbeta terms in T for up to
// four rows (StagedAcc: g and b, n elements each) before one widening read-modify-write
// of the double accumulators, as four rows in step sum theirs: Lone goes straight to
// double; First stores its terms; Mid adds its own (one fmadd for dgamma); Last adds its
// own and flushes the stage into double. Four rows so staged add at most 3 roundings of
// T to each term (the pairwise sum of four rows in step, 2).
enum class Stage { Lone, First, Mid, Last };
template <class T>
struct StagedAcc {
  T* g = nullptr;
  T* b = nullptr;
  Stage stage = Stage::Lone;
};

template <int R, class V, class Add>
V pairwise(V* v, Add add) {
  if (R >= 2) v[0] = add(v[0], v[1]);
  if (R >= 4) {
    v[2] = add(v[2], v[3]);
    v[0] = add(v[0], v[2]);
  }
  return v[0];
}

template <class Isa, class T, int R, bool Center, ScaleKind S, bool WantDx, bool WantDg,
          bool WantDb, bool Stream>
inline void backward_rows(const RowsArgs<T, R>& q, const T* gamma, Index n, double* dgamma_acc,
                          double* dbeta_acc, Prefetch next_dy = {}, Prefetch next_x = {},
                          StagedAcc<T> st = {}) {
  static_assert(R == 1 || R == 2 || R == 4, "backward_rows: R must be 1, 2 or 4");
  // One double row alone (unstaged): its dgamma term dy * xhat goes into the double
  // accumulator as one explicit fmadd, in the vector body and in the scalar head and
  // tail alike. As a product then an add, g++'s default -ffp-contract=fast fused the two
  // in one path and not the other; streamed rows peel a scalar head up to dx's next
  // packet boundary, so which columns took which path followed dx's address, and dgamma
  // changed in the last bit with the heap (LayerNorm and RMSNorm double, streamed
  // [1368, 768]). Float terms are widened between the product and the add: no fusing.
  constexpr bool kFusedAcc = R == 1 && std::is_same<T, double>::value;
  using P = typename Isa::template Pack<T>;
  using A = typename Isa::Acc;
  using X = Xhat<Isa, T, Center>;
  using G = Scale<Isa, T, S>;
  using VT = typename P::V;
  constexpr Index W = static_cast<Index>(P::W);
  constexpr Index WA = static_cast<Index>(A::W);
  auto scalar_at = [&](Index i) {
    T xs[R], pb[R];
    for (int r = 0; r < R; ++r) {
      const T d = q.dy[r][i];
      const T xh = X::scalar(q.ra[r], q.x[r][i]);
      xs[r] = xh;
      pb[r] = d;
      if (WantDx) {
        const T gma = S != ScaleKind::None ? fmadd_s<Isa>(d, G::scalar(gamma + i), -q.a[r]) : d - q.a[r];
        q.dx[r][i] = q.ra[r].rstd * fmadd_s<Isa>(xh, -q.b[r], gma);
      }
    }
    if (R == 1 && st.stage != Stage::Lone) {
      // Staged as the vector body stages (StagedAcc), so that a column's bits do not
      // depend on which path took it (the scalar head's length follows dx's address).
      const bool first = st.stage == Stage::First, last = st.stage == Stage::Last;
      if (WantDg) {
        const T g1 = first ? pb[0] * xs[0] : fmadd_s<Isa>(pb[0], xs[0], st.g[i]);
        if (last)
          dgamma_acc[i] += static_cast<double>(g1);
        else
          st.g[i] = g1;
      }
      if (WantDb) {
        const T b1 = first ? pb[0] : st.b[i] + pb[0];
        if (last)
          dbeta_acc[i] += static_cast<double>(b1);
        else
          st.b[i] = b1;
      }
      return;
    }
    if constexpr (kFusedAcc) {
      if (WantDg) dgamma_acc[i] = fmadd_s<Isa>(pb[0], xs[0], dgamma_acc[i]);
    } else if (WantDg) {
      T p = pb[0] * xs[0];
      if (R >= 2) p = fmadd_s<Isa>(pb[1], xs[1], p);
      if (R == 4) p += fmadd_s<Isa>(pb[3], xs[3], pb[2] * xs[2]);
      dgamma_acc[i] += static_cast<double>(p);
    }
    auto add = [](T u, T v) { return u + v; };
    if (WantDb) dbeta_acc[i] += static_cast<double>(pairwise<R>(pb, add));
  };
  Index i = 0;
  if (Stream && WantDx) {
    constexpr std::uintptr_t align = sizeof(VT);
    for (; i < n && reinterpret_cast<std::uintptr_t>(q.dx[0] + i) % align != 0; ++i) scalar_at(i);
  }
  const G scale{};
  typename P::V va[R], vnb[R], vrstd[R];
  X xhat[R];
  for (int r = 0; r < R; ++r) {
    xhat[r] = X(q.ra[r]);
    va[r] = P::set1(q.a[r]);
    vnb[r] = P::set1(-q.b[r]);
    vrstd[r] = P::set1(q.ra[r].rstd);
  }
  auto add = [](const VT& u, const VT& v) { return P::add(u, v); };
  // Products that feed sums are written as explicit fmadds: left as mul then add, g++'s
  // default -ffp-contract=fast (GNU modes) may fuse them in one instantiation and not in
  // another, so that, say, dgamma alone and dgamma with dx would differ in the last bit.
  // Packets [i0, i_end). Where dx stays in cache (not Stream) they go last to first: the
  // first pass has just walked the rows first to last, so their last columns (dy, x and
  // gamma) are the ones still in L1, and those are read first. Every column is computed
  // alone, so the order does not change the bits. LayerNorm backward in cache, ns per
  // element, before / after as two binaries run alternately (Zen 4, 32 KB L1, 2026-12-07,
  // Google Benchmark, min of 7): [64,4096] 0.52-0.55 / 0.44-0.45, [8,8192] 0.77-0.82 /
  // 0.64-0.69; RMSNorm [16,4096] 0.43-0.52 / 0.39-0.40.
  // Streamed rows (from memory) go first to last: reversed, they measured the same or up
  // to 3% slower (standalone, interleaved in one process).
  constexpr bool kReverse = !Stream;
  const Index i0 = i, i_end = i0 + (n - i0) / W * W;
  for (Index k = 0; k < i_end - i0; k += W) {
    i = kReverse ? i_end - W - k : i0 + k;
    next_dy.template at<W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    next_x.template at<W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    VT pg[R], pb[R];
    VT gm{};
    if (WantDx && S != ScaleKind::None) gm = scale(gamma + i);
    for (int r = 0; r < R; ++r) {
      const VT d = P::load(q.dy[r] + i);
      const VT xh = xhat[r](P::load(q.x[r] + i));
      pg[r] = xh;
      pb[r] = d;
      if (WantDx) {
        const VT gma = S != ScaleKind::None ? P::fmadd(d, gm, P::sub(P::set1(T(0)), va[r]))
                                            : P::sub(d, va[r]);
        const VT v = P::mul(vrstd[r], P::fmadd(xh, vnb[r], gma));
        if (Stream)
          P::stream(q.dx[r] + i, v);
        else
          P::store(q.dx[r] + i, v);
      }
    }
    if (R == 1 && st.stage != Stage::Lone) {
      // Staged in T (StagedAcc); only the last row of a stage touches the doubles.
      if (st.stage == Stage::First) {
        if (WantDg) P::store(st.g + i, P::mul(pb[0], pg[0]));
        if (WantDb) P::store(st.b + i, pb[0]);
        continue;
      }
      if (WantDg) pg[0] = P::fmadd(pb[0], pg[0], P::load(st.g + i));
      if (WantDb) pb[0] = P::add(P::load(st.b + i), pb[0]);
      if (st.stage == Stage::Mid) {
        if (WantDg) P::store(st.g + i, pg[0]);
        if (WantDb) P::store(st.b + i, pb[0]);
        continue;
      }
    } else if (WantDg) {
      // sum_r dy_r xhat_r, pairwise: (p0 + p1) + (p2 + p3) with each pair one fmadd.
      if constexpr (kFusedAcc) {
        // T is double: straight into the accumulator (see kFusedAcc).
        P::store(dgamma_acc + i, P::fmadd(pb[0], pg[0], P::load(dgamma_acc + i)));
      } else if (R == 1) {
        pg[0] = P::mul(pb[0], pg[0]);
      } else {
        for (int r = 0; r < R; r += 2) pg[r / 2] = P::fmadd(pb[r + 1], pg[r + 1], P::mul(pb[r], pg[r]));
        if (R == 4) pg[0] = P::add(pg[0], pg[1]);
      }
    }
    if (WantDg && !(kFusedAcc && st.stage == Stage::Lone)) {
      Index off = i;
      P::widen(pg[0], [&](const typename A::V& v) {
        A::store(dgamma_acc + off, A::add(A::load(dgamma_acc + off), v));
        off += WA;
      });
    }
    if (WantDb) {
      Index off = i;
      P::widen(pairwise<R>(pb, add), [&](const typename A::V& v) {
        A::store(dbeta_acc + off, A::add(A::load(dbeta_acc + off), v));
        off += WA;
      });
    }
  }
  for (i = i_end; i < n; ++i) scalar_at(i);
}

// AdaNorm (Xu et al. 2019), forward: z = xhat, y = C (1 - k z) z, as phi(z) * z with
// phi = fma(-C k, z, C) (C k rounded once).
template <class Isa, class T, bool Stream>
inline void adanorm(const T* x, T* y, Index n, const RowAffine<T>& r, T C, T k) {
  using P = typename Isa::template Pack<T>;
  using X = Xhat<Isa, T, true>;
  constexpr Index W = static_cast<Index>(P::W);
  const T ck = C * k;
  auto scalar_at = [&](Index i) {
    const T z = X::scalar(r, x[i]);
    y[i] = fmadd_s<Isa>(-ck, z, C) * z;
  };
  Index i = 0;
  if (Stream) {
    constexpr std::uintptr_t align = sizeof(typename P::V);
    for (; i < n && reinterpret_cast<std::uintptr_t>(y + i) % align != 0; ++i) scalar_at(i);
  }
  const X xhat(r);
  const typename P::V vnck = P::set1(-ck), vc = P::set1(C);
  for (; i + W <= n; i += W) {
    const typename P::V z = xhat(P::load(x + i));
    const typename P::V v = P::mul(P::fmadd(vnck, z, vc), z);
    if (Stream)
      P::stream(y + i, v);
    else
      P::store(y + i, v);
  }
  for (; i < n; ++i) scalar_at(i);
}

// AdaNorm, backward of one row. The gradient of y = phi(z) z reaching z is dy * phi(z)
// with phi = C (1 - k z) treated as a constant (the paper's detached gradient), or
// dy * C (1 - 2 k z) (Full: the exact derivative of C (z - k z^2)). With that g, as for
// LayerNorm without affine: dx = rstd (g - mean(g) - z mean(g z)). Two passes: the sums
// (from memory), then dx (from cache). dx may be dy or x.
template <class Isa, class T, bool Full>
inline void adanorm_backward(const T* dy, const T* x, T* dx, Index n, const RowAffine<T>& r, T C,
                             T k) {
  using P = typename Isa::template Pack<T>;
  using A = typename Isa::Acc;
  using X = Xhat<Isa, T, true>;
  using V = typename P::V;
  constexpr Index W = static_cast<Index>(P::W);
  constexpr int K = static_cast<int>(P::W / A::W);
  const T ck = Full ? T(2) * C * k : C * k;
  const X xhat(r);
  const V vnck = P::set1(-ck), vc = P::set1(C);
  auto g_of = [&](const V& d, const V& z) { return P::mul(d, P::fmadd(vnck, z, vc)); };
  auto g_s = [&](T d, T z) { return d * fmadd_s<Isa>(-ck, z, C); };
  typename A::V a1[K], a2[K];
  for (int q = 0; q < K; ++q) a1[q] = a2[q] = A::zero();
  Index i = 0;
  for (; i + W <= n; i += W) {
    const V z = xhat(P::load(x + i));
    const V g = g_of(P::load(dy + i), z);
    int q = 0;
    P::widen(g, [&](const typename A::V& v) { a1[q] = A::add(a1[q], v); ++q; });
    q = 0;
    P::widen(P::mul(g, z), [&](const typename A::V& v) { a2[q] = A::add(a2[q], v); ++q; });
  }
  double t1 = 0.0, t2 = 0.0;
  for (; i < n; ++i) {
    const T z = X::scalar(r, x[i]);
    const T g = g_s(dy[i], z);
    t1 += static_cast<double>(g);
    t2 += static_cast<double>(g * z);
  }
  for (int q = 1; q < K; ++q) {
    a1[0] = A::add(a1[0], a1[q]);
    a2[0] = A::add(a2[0], a2[q]);
  }
  const double dn = static_cast<double>(n);
  const T mg = static_cast<T>((A::reduce(a1[0]) + t1) / dn);
  const T mgz = static_cast<T>((A::reduce(a2[0]) + t2) / dn);
  // dx = rstd (g - mg - z mgz)
  const V vmg = P::set1(mg), vnmgz = P::set1(-mgz), vr = P::set1(r.rstd);
  for (i = 0; i + W <= n; i += W) {
    const V z = xhat(P::load(x + i));
    const V g = g_of(P::load(dy + i), z);
    P::store(dx + i, P::mul(vr, P::fmadd(z, vnmgz, P::sub(g, vmg))));
  }
  for (; i < n; ++i) {
    const T z = X::scalar(r, x[i]);
    dx[i] = r.rstd * fmadd_s<Isa>(z, -mgz, g_s(dy[i], z) - mg);
  }
}

// Element-wise adaptive LayerNorm, backward of one row: y = xhat * w + b with w, b of
// the row's own (ada_w, ada_b). g = dy * w; with a = mean(g), c = mean(g xhat):
//   dx = rstd (g - a - xhat c),  dw = dy * xhat,  db = dy.
// dx may be dy or x (each element is read before it is written).
template <class Isa, class T, bool WantDx, bool WantDw, bool WantDb>
inline void elementwise_backward(const T* dy, const T* x, const T* w, Index n,
                                 const RowAffine<T>& r, T* dx, T* dw, T* db) {
  using P = typename Isa::template Pack<T>;
  using X = Xhat<Isa, T, true>;
  using V = typename P::V;
  constexpr Index W = static_cast<Index>(P::W);
  T a = T(0), c = T(0);
  if (WantDx) {
    double sum_g = 0.0, sum_gx = 0.0;
    backward_sums<Isa, T, true, ScaleKind::Gamma>(dy, x, w, n, r, sum_g, sum_gx);
    a = static_cast<T>(sum_g / static_cast<double>(n));
    c = static_cast<T>(sum_gx / static_cast<double>(n));
  }
  const X xhat(r);
  const V va = P::set1(a), vnc = P::set1(-c), vr = P::set1(r.rstd);
  Index i = 0;
  for (; i + W <= n; i += W) {
    const V d = P::load(dy + i);
    const V xh = xhat(P::load(x + i));
    if (WantDx) P::store(dx + i, P::mul(vr, P::fmadd(xh, vnc, P::fmadd(d, P::load(w + i), P::sub(P::set1(T(0)), va)))));
    if (WantDw) P::store(dw + i, P::mul(d, xh));
    if (WantDb) P::store(db + i, d);
  }
  for (; i < n; ++i) {
    const T d = dy[i];
    const T xh = X::scalar(r, x[i]);
    if (WantDx) dx[i] = r.rstd * fmadd_s<Isa>(xh, -c, fmadd_s<Isa>(d, w[i], -a));
    if (WantDw) dw[i] = d * xh;
    if (WantDb) db[i] = d;
  }
}

// Fused residual, forward: s = alpha * x + r, one rounding where the target has FMA (the
// backend's fmadd; two without). s may be x or r.
template <class Isa, class T>
inline void residual_add(const T* x, const T* r, T* s, Index n, T alpha) {
  using P = typename Isa::template Pack<T>;
  constexpr Index W = static_cast<Index>(P::W);
  const typename P::V va = P::set1(alpha);
  Index i = 0;
  for (; i + W <= n; i += W) P::store(s + i, P::fmadd(va, P::load(x + i), P::load(r + i)));
  for (; i < n; ++i) s[i] = fmadd_s<Isa>(alpha, x[i], r[i]);
}

// Fused residual, forward, float rows: s = fma(alpha, x, r) written to s, and in the
// same pass the float-tree sums of the row's statistics (tree_sums: Center, d = s - shift;
// else s^2), as blocked_sums / blocked_sum_squares would take them from s: one pass over
// x and r instead of an add pass and a statistics pass. px, pr: prefetched at x's and
// r's offsets.
template <class Isa, class T, bool Center>
inline void residual_blocked_sums(const T* x, const T* r, T* s, Index n, T alpha, T shift,
                                  double& s1, double& s2, const Prefetch& px = {},
                                  const Prefetch& pr = {}) {
  using P = typename Isa::template Pack<T>;
  const typename P::V va = P::set1(alpha);
  tree_sums<Isa, T, Center>(
      n, shift,
      [&](Index i) {
        const typename P::V v = P::fmadd(va, P::load(x + i), P::load(r + i));
        P::store(s + i, v);
        return v;
      },
      [&](Index i) { return s[i] = fmadd_s<Isa>(alpha, x[i], r[i]); }, s1, s2, px, pr);
}

// dst = src, with streaming stores (after a scalar head that aligns dst) when Stream.
template <class Isa, class T, bool Stream>
inline void copy_row(const T* src, T* dst, Index n) {
  using P = typename Isa::template Pack<T>;
  constexpr Index W = static_cast<Index>(P::W);
  Index i = 0;
  if (Stream) {
    constexpr std::uintptr_t align = sizeof(typename P::V);
    for (; i < n && reinterpret_cast<std::uintptr_t>(dst + i) % align != 0; ++i) dst[i] = src[i];
  }
  for (; i + W <= n; i += W) {
    if (Stream)
      P::stream(dst + i, P::load(src + i));
    else
      P::store(dst + i, P::load(src + i));
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// Fused residual, backward: with t = g + ds (the gradient reaching s: through the norm,
// g, and from downstream, ds; HasDs false: ds = 0), dr = t and dx = alpha * t. Per
// element, g and ds are read before dr and dx are written: dr may be ds, dx may be g.
template <class Isa, class T, bool HasDs, bool WantDx, bool WantDr>
inline void residual_grad(const T* g, const T* ds, T* dx, T* dr, Index n, T alpha) {
  using P = typename Isa::template Pack<T>;
  constexpr Index W = static_cast<Index>(P::W);
  const typename P::V va = P::set1(alpha);
  Index i = 0;
  for (; i + W <= n; i += W) {
    typename P::V t = P::load(g + i);
    if (HasDs) t = P::add(t, P::load(ds + i));
    if (WantDr) P::store(dr + i, t);
    if (WantDx) P::store(dx + i, P::mul(va, t));
  }
  for (; i < n; ++i) {
    T t = g[i];
    if (HasDs) t += ds[i];
    if (WantDr) dr[i] = t;
    if (WantDx) dx[i] = alpha * t;
  }
}

}  // namespace kernels
}  // namespace detail
}  // namespace normkit
