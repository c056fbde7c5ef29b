// normkit: the kernels of the channel norms (BatchNorm, GroupNorm, InstanceNorm), on raw
// pointers, written once over a backend's packet interface like row_kernels.hpp.
//
// A channel norm visits its data in one of two shapes:
//   - channels first: per (sample, channel) a contiguous segment of the spatial
//     positions, whose parameters (mean, scale, shift) are one scalar each;
//   - channels last: rows of C contiguous channels, whose parameters are arrays
//     indexed by the channel, and whose statistics are sums down the columns.
// The element-wise kernels take their parameters through Param<Vec>: a broadcast scalar
// (Vec = false) or an array indexed like the data (Vec = true). Both shapes evaluate the
// same formula per element with the same parameter values, so both formats give the
// same numbers.
//
// Forward, per element: y = (x - mean_hi) * A + B, with A = rstd * gamma and
// B = beta - mean_lo * A computed in double and rounded once to T. (x - mean_hi) is exact
// for x near the mean, so the large-mean case keeps its precision; mean_lo, the rest of
// the double mean, enters through B. Backward: dx = dy * A + ((x - mean_hi) * Cx + D),
// with the per-group coefficients of the closed form (channel_norm.hpp) rounded once to
// T. Three parameters per element (four in backward) keep the channels-last passes,
// which load them per column, within the load ports.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "row_kernels.hpp"

namespace normkit {
namespace detail {
namespace kernels {

template <class Isa, class T, bool Vec>
struct Param;

template <class Isa, class T>
struct Param<Isa, T, false> {
  using P = typename Isa::template Pack<T>;
  T s;
  typename P::V v;
  explicit Param(const T* p) : s(*p), v(P::set1(*p)) {}
  typename P::V at(Index) const { return v; }
  T scalar(Index) const { return s; }
};

template <class Isa, class T>
struct Param<Isa, T, true> {
  using P = typename Isa::template Pack<T>;
  const T* p;
  explicit Param(const T* q) : p(q) {}
  typename P::V at(Index i) const { return P::load(p + i); }
  T scalar(Index i) const { return p[i]; }
};

// Streaming stores start at a packet-aligned destination: the index of the first one.
template <class Isa, class T>
Index stream_head(const T* y, Index n) {
  using P = typename Isa::template Pack<T>;
  constexpr std::uintptr_t align = sizeof(typename P::V);
  Index i = 0;
  while (i < n && reinterpret_cast<std::uintptr_t>(y + i) % align != 0) ++i;
  return i;
}

// y = fma(xc * pre, A, B), xc = x - hi. Prescale multiplies xc by a power of two
// (exact) so that A = rstd * gamma / pre stays finite when rstd alone would overflow T.
// y may be x.
template <class Isa, class T, bool Vec, bool Stream, bool Prescale>
inline void affine_map(const T* x, T* y, Index n, const T* hi, const T* pre, const T* A,
                       const T* B, const Prefetch& pf = {}) {
  using P = typename Isa::template Pack<T>;
  using Q = Param<Isa, T, Vec>;
  constexpr Index W = static_cast<Index>(P::W);
  const Q qh(hi), qa(A), qb(B);
  const Q qp(Prescale ? pre : hi);
  auto scalar_at = [&](Index i) {
    T xc = x[i] - qh.scalar(i);
    if (Prescale) xc *= qp.scalar(i);
    y[i] = fmadd_s<Isa>(xc, qa.scalar(i), qb.scalar(i));
  };
  Index i = 0;
  if (Stream)
    for (const Index h = stream_head<Isa>(y, n); i < h; ++i) scalar_at(i);
  for (; i + W <= n; i += W) {
    pf.at<W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    typename P::V xc = P::sub(P::load(x + i), qh.at(i));
    if (Prescale) xc = P::mul(xc, qp.at(i));
    const typename P::V v = P::fmadd(xc, qa.at(i), qb.at(i));
    if (Stream)
      P::stream(y + i, v);
    else
      P::store(y + i, v);
  }
  for (; i < n; ++i) scalar_at(i);
}

// dx = fma(dy, A, fma(xc * pre, Cx, D)) with xc = x - hi (UseX), or dx = dy * A.
// Prescale: as in affine_map, a power of two that keeps Cx (~ rstd^2) within T's range
// when rstd is far from 1. dx may be dy or x.
template <class Isa, class T, bool Vec, bool Stream, bool UseX, bool Prescale = false>
inline void dx_map(const T* dy, const T* x, T* dx, Index n, const T* hi, const T* pre,
                   const T* A, const T* Cx, const T* D, const Prefetch& pf = {},
                   const Prefetch& pf2 = {}) {
  using P = typename Isa::template Pack<T>;
  using Q = Param<Isa, T, Vec>;
  constexpr Index W = static_cast<Index>(P::W);
  const Q qa(A);
  const Q qh(UseX ? hi : A), qc(UseX ? Cx : A), qd(UseX ? D : A), qp(Prescale ? pre : A);
  auto scalar_at = [&](Index i) {
    if (UseX) {
      T xc = x[i] - qh.scalar(i);
      if (Prescale) xc *= qp.scalar(i);
      dx[i] = fmadd_s<Isa>(dy[i], qa.scalar(i), fmadd_s<Isa>(xc, qc.scalar(i), qd.scalar(i)));
    } else {
      dx[i] = dy[i] * qa.scalar(i);
    }
  };
  Index i = 0;
  if (Stream)
    for (const Index h = stream_head<Isa>(dx, n); i < h; ++i) scalar_at(i);
  for (; i + W <= n; i += W) {
    pf.at<W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    pf2.at<W * sizeof(T)>(static_cast<std::size_t>(i) * sizeof(T));
    typename P::V v;
    if (UseX) {
      typename P::V xc = P::sub(P::load(x + i), qh.at(i));
      if (Prescale) xc = P::mul(xc, qp.at(i));
      v = P::fmadd(P::load(dy + i), qa.at(i), P::fmadd(xc, qc.at(i), qd.at(i)));
    } else {
      v = P::mul(P::load(dy + i), qa.at(i));
    }
    if (Stream)
      P::stream(dx + i, v);
    else
      P::store(dx + i, v);
  }
  for (; i < n; ++i) scalar_at(i);
}

// Channels last: `rows` rows of n elements, ld apart, with per-column parameters, in
// blocks of 4 rows that share each parameter load. One row at a time, the 3 to 5
// parameter arrays took more load slots than the data. Every element gets exactly the
// formula of affine_map / dx_map, so the blocking (and so the thread split) does not
// change a bit. Streaming needs every row to share y's alignment: otherwise row by row.
// block4 = false: row by row anyway. Measured: the blocks pay where the rows are column
// blocks of a wider tensor (GroupNorm / InstanceNorm channels last: 0.55 -> 0.68 of the
// roofline), and cost where they are whole short rows streamed from memory (BatchNorm
// channels last, C = 64: 0.47 -> 0.40).
template <class Isa, class T, bool Stream, bool Prescale>
inline void affine_rows(const T* x, T* y, Index rows, Index ld, Index n, const T* hi,
                        const T* pre, const T* A, const T* B, bool block4 = true) {
  using P = typename Isa::template Pack<T>;
  using V = typename P::V;
  constexpr Index W = static_cast<Index>(P::W);
  Index r = 0;
  if (block4 && (!Stream || (static_cast<std::size_t>(ld) * sizeof(T)) % sizeof(V) == 0)) {
    const Index h = Stream ? stream_head<Isa>(y, n) : 0;
    auto scalar_at = [&](Index row, Index i) {
      T xc = x[row * ld + i] - hi[i];
      if (Prescale) xc *= pre[i];
      y[row * ld + i] = fmadd_s<Isa>(xc, A[i], B[i]);
    };
    for (; r + 4 <= rows; r += 4) {
      for (int j = 0; j < 4; ++j)
        for (Index i = 0; i < h && i < n; ++i) scalar_at(r + j, i);
      Index i = h;
      for (; i + W <= n; i += W) {
        const V vh = P::load(hi + i), va = P::load(A + i), vb = P::load(B + i);
        V vp{};
        if (Prescale) vp = P::load(pre + i);
        for (int j = 0; j < 4; ++j) {
          V xc = P::sub(P::load(x + (r + j) * ld + i), vh);
          if (Prescale) xc = P::mul(xc, vp);
          const V v = P::fmadd(xc, va, vb);
          if (Stream)
            P::stream(y + (r + j) * ld + i, v);
          else
            P::store(y + (r + j) * ld + i, v);
        }
      }
      for (; i < n; ++i)
        for (int j = 0; j < 4; ++j) scalar_at(r + j, i);
    }
  }
  for (; r < rows; ++r)
    affine_map<Isa, T, true, Stream, Prescale>(x + r * ld, y + r * ld, n, hi, pre, A, B);
}

template <class Isa, class T, bool Stream, bool UseX, bool Prescale>
inline void dx_rows_kernel(const T* dy, const T* x, T* dx, Index rows, Index ld, Index n,
                           const T* hi, const T* pre, const T* A, const T* Cx, const T* D,
                           bool block4 = true) {
  using P = typename Isa::template Pack<T>;
  using V = typename P::V;
  constexpr Index W = static_cast<Index>(P::W);
  Index r = 0;
  if (block4 && (!Stream || (static_cast<std::size_t>(ld) * sizeof(T)) % sizeof(V) == 0)) {
    const Index h = Stream ? stream_head<Isa>(dx, n) : 0;
    auto scalar_at = [&](Index row, Index i) {
      const Index o = row * ld + i;
      if (UseX) {
        T xc = x[o] - hi[i];
        if (Prescale) xc *= pre[i];
        dx[o] = fmadd_s<Isa>(dy[o], A[i], fmadd_s<Isa>(xc, Cx[i], D[i]));
      } else {
        dx[o] = dy[o] * A[i];
      }
    };
    for (; r + 4 <= rows; r += 4) {
      for (int j = 0; j < 4; ++j)
        for (Index i = 0; i < h && i < n; ++i) scalar_at(r + j, i);
      Index i = h;
      for (; i + W <= n; i += W) {
        const V va = P::load(A + i);
        V vh{}, vc{}, vd{}, vp{};
        if (UseX) {
          vh = P::load(hi + i);
          vc = P::load(Cx + i);
          vd = P::load(D + i);
          if (Prescale) vp = P::load(pre + i);
        }
        for (int j = 0; j < 4; ++j) {
          const Index o = (r + j) * ld + i;
          V v;
          if (UseX) {
            V xc = P::sub(P::load(x + o), vh);
            if (Prescale) xc = P::mul(xc, vp);
            v = P::fmadd(P::load(dy + o), va, P::fmadd(xc, vc, vd));
          } else {
            v = P::mul(P::load(dy + o), va);
          }
          if (Stream)
            P::stream(dx + o, v);
          else
            P::store(dx + o, v);
        }
      }
      for (; i < n; ++i)
        for (int j = 0; j < 4; ++j) scalar_at(r + j, i);
    }
  }
  for (; r < rows; ++r)
    dx_map<Isa, T, true, Stream, UseX, Prescale>(dy + r * ld, x + r * ld, dx + r * ld, n, hi, pre,
                                                  A, Cx, D);
}

// Over a contiguous segment: sdy = sum dy, sdyx = sum dy * (x - hi) (the caller
// subtracts mean_lo * sdy), in
// double, from trees of 8 packets summed in T (as blocked_sums: a few roundings of T per
// term, against the one of each product dy * xc).
template <class Isa, class T>
inline void segment_grad_sums(const T* dy, const T* x, Index n, T hi, double& sdy,
                              double& sdyx, const Prefetch& pf = {}, const Prefetch& pf2 = {}) {
  using P = typename Isa::template Pack<T>;
  using V = typename P::V;
  constexpr int B = 8;
  const V vh = P::set1(hi);
  double v1 = 0.0, v2 = 0.0;
  const Index i0 = product_tree_sums<Isa, T, B, true>(
      n,
      [&](Index j, V& a, V& b) {
        a = P::load(dy + j);
        b = P::sub(P::load(x + j), vh);
      },
      pf, pf2, v1, v2);
  double t1 = 0.0, t2 = 0.0;
  for (Index i = i0; i < n; ++i) {
    t1 += static_cast<double>(dy[i]);
    t2 += static_cast<double>(dy[i] * (x[i] - hi));
  }
  sdy = v1 + t1;
  sdyx = v2 + t2;
}

// Column form of blocked_sums over `rows` rows of C elements, ld apart, added to s and
// s2: trees of 4 rows per column, accumulated in double registers over tiles of up to
// 16 rows, then one read-modify-write of the accumulators per tile (a chain of those
// through memory every 4 rows was the bound at C = 64).
template <class Isa, class T>
inline void column_blocked_sums(const T* x, Index rows, Index ld, Index C, const T* shift,
                                double* s, double* s2) {
  using P = typename Isa::template Pack<T>;
  using A = typename Isa::Acc;
  using V = typename P::V;
  constexpr Index W = static_cast<Index>(P::W);
  constexpr Index WA = static_cast<Index>(A::W);
  constexpr std::size_t KP = P::W / A::W;
  Index r = 0;
  // Rows [r, r + 4 * G) in G trees of 4 rows (G = 0: one row, no tree).
  auto tile = [&](auto Gc) {
    constexpr int G = decltype(Gc)::value;
    Index c = 0;
    for (; c + W <= C; c += W) {
      typename A::V t1[KP], t2[KP];
      for (std::size_t k = 0; k < KP; ++k) {
        t1[k] = A::load(s + c + static_cast<Index>(k) * WA);
        t2[k] = A::load(s2 + c + static_cast<Index>(k) * WA);
      }
      const V vs = P::load(shift + c);
      auto add = [&](const V& ts, const V& tq) {
        int k = 0;
        P::widen(ts, [&](const typename A::V& w) { t1[k] = A::add(t1[k], w); ++k; });
        k = 0;
        P::widen(tq, [&](const typename A::V& w) { t2[k] = A::add(t2[k], w); ++k; });
      };
      if (G == 0) {
        const V d = P::sub(P::load(x + r * ld + c), vs);
        add(d, P::mul(d, d));
      }
      for (int q = 0; q < G; ++q) {
        const T* x0 = x + (r + 4 * q) * ld + c;
        const V d0 = P::sub(P::load(x0), vs), d1 = P::sub(P::load(x0 + ld), vs);
        const V d2 = P::sub(P::load(x0 + 2 * ld), vs), d3 = P::sub(P::load(x0 + 3 * ld), vs);
        add(P::add(P::add(d0, d1), P::add(d2, d3)),
            P::add(P::fmadd(d1, d1, P::mul(d0, d0)), P::fmadd(d3, d3, P::mul(d2, d2))));
      }
      for (std::size_t k = 0; k < KP; ++k) {
        A::store(s + c + static_cast<Index>(k) * WA, t1[k]);
        A::store(s2 + c + static_cast<Index>(k) * WA, t2[k]);
      }
    }
    for (; c < C; ++c) {
      double a = s[c], b = s2[c];
      if (G == 0) {
        const T d = x[r * ld + c] - shift[c];
        a += static_cast<double>(d);
        b += static_cast<double>(d * d);
      }
      for (int q = 0; q < G; ++q) {
        const T* x0 = x + (r + 4 * q) * ld + c;
        const T d0 = x0[0] - shift[c], d1 = x0[ld] - shift[c];
        const T d2 = x0[2 * ld] - shift[c], d3 = x0[3 * ld] - shift[c];
        a += static_cast<double>((d0 + d1) + (d2 + d3));
        b += static_cast<double>(fmadd_s<Isa>(d1, d1, d0 * d0) + fmadd_s<Isa>(d3, d3, d2 * d2));
      }
      s[c] = a;
      s2[c] = b;
    }
  };
  for (; r + 16 <= rows; r += 16) tile(std::integral_constant<int, 4>{});
  for (; r + 4 <= rows; r += 4) tile(std::integral_constant<int, 1>{});
  for (; r < rows; ++r) tile(std::integral_constant<int, 0>{});
}

// Column sums over `rows` rows of C elements, ld elements apart, added to s and s2:
//   s[c] += sum_r (x[r, c] - shift[c]),  s2[c] += sum_r (x[r, c] - shift[c])^2,
// in double. Rows go four at a time: their terms meet in registers, then one
// read-modify-write of the accumulators (which stay in L1 for any realistic C).
template <class Isa, class T>
inline void column_shifted_sums(const T* x, Index rows, Index ld, Index C, const double* shift,
                                double* s, double* s2) {
  using P = typename Isa::template Pack<T>;
  using A = typename Isa::Acc;
  constexpr Index W = static_cast<Index>(P::W);
  constexpr Index WA = static_cast<Index>(A::W);
  Index r = 0;
  auto block = [&](auto R) {
    constexpr int kR = decltype(R)::value;
    Index c = 0;
    for (; c + W <= C; c += W) {
      Index off = c;
      // The widened parts of a packet, one by one: part k covers columns off..off+WA.
      typename A::V t1[P::W / A::W], t2[P::W / A::W];
      for (std::size_t k = 0; k < P::W / A::W; ++k) {
        t1[k] = A::load(s + c + static_cast<Index>(k) * WA);
        t2[k] = A::load(s2 + c + static_cast<Index>(k) * WA);
      }
      for (int j = 0; j < kR; ++j) {
        int k = 0;
        P::widen(P::load(x + (r + j) * ld + c), [&](const typename A::V& v) {
          const typename A::V d = A::sub(v, A::load(shift + c + k * WA));
          t1[k] = A::add(t1[k], d);
          t2[k] = A::fmadd(d, d, t2[k]);
          ++k;
        });
      }
      for (std::size_t k = 0; k < P::W / A::W; ++k) {
        A::store(s + c + static_cast<Index>(k) * WA, t1[k]);
        A::store(s2 + c + static_cast<Index>(k) * WA, t2[k]);
      }
      (void)off;
    }
    for (; c < C; ++c) {
      double a = s[c], b = s2[c];
      for (int j = 0; j < kR; ++j) {
        const double d = static_cast<double>(x[(r + j) * ld + c]) - shift[c];
        a += d;
        b = fmadd_s<Isa>(d, d, b);
      }
      s[c] = a;
      s2[c] = b;
    }
  };
  for (; r + 4 <= rows; r += 4) block(std::integral_constant<int, 4>{});
  for (; r < rows; ++r) block(std::integral_constant<int, 1>{});
}

// Column sums of the backward pass over `rows` rows of C elements, ld apart, added:
//   sdy[c] += sum_r dy[r, c],  sdyx[c] += sum_r dy[r, c] * xc[r, c],
// xc = x - hi[c] (the caller subtracts mean_lo * sdy); trees of 4 rows in T, tiles of 16 rows in double registers
// (as column_blocked_sums).
template <class Isa, class T>
inline void column_grad_sums(const T* dy, const T* x, Index rows, Index ld, Index C,
                             const T* hi, double* sdy, double* sdyx) {
  using P = typename Isa::template Pack<T>;
  using A = typename Isa::Acc;
  using V = typename P::V;
  constexpr Index W = static_cast<Index>(P::W);
  constexpr Index WA = static_cast<Index>(A::W);
  constexpr std::size_t KP = P::W / A::W;
  Index r = 0;
  auto tile = [&](auto Gc) {
    constexpr int G = decltype(Gc)::value;
    Index c = 0;
    for (; c + W <= C; c += W) {
      typename A::V t1[KP], t2[KP];
      for (std::size_t k = 0; k < KP; ++k) {
        t1[k] = A::load(sdy + c + static_cast<Index>(k) * WA);
        t2[k] = A::load(sdyx + c + static_cast<Index>(k) * WA);
      }
      const V vh = P::load(hi + c);
      auto add = [&](const V& ts, const V& tq) {
        int k = 0;
        P::widen(ts, [&](const typename A::V& w) { t1[k] = A::add(t1[k], w); ++k; });
        k = 0;
        P::widen(tq, [&](const typename A::V& w) { t2[k] = A::add(t2[k], w); ++k; });
      };
      auto xc_at = [&](Index row) { return P::sub(P::load(x + row * ld + c), vh); };
      if (G == 0) {
        const V d = P::load(dy + r * ld + c);
        add(d, P::mul(d, xc_at(r)));
      }
      for (int q = 0; q < G; ++q) {
        const Index r0 = r + 4 * q;
        const V d0 = P::load(dy + r0 * ld + c), d1 = P::load(dy + (r0 + 1) * ld + c);
        const V d2 = P::load(dy + (r0 + 2) * ld + c), d3 = P::load(dy + (r0 + 3) * ld + c);
        add(P::add(P::add(d0, d1), P::add(d2, d3)),
            P::add(P::fmadd(d1, xc_at(r0 + 1), P::mul(d0, xc_at(r0))),
                   P::fmadd(d3, xc_at(r0 + 3), P::mul(d2, xc_at(r0 + 2)))));
      }
      for (std::size_t k = 0; k < KP; ++k) {
        A::store(sdy + c + static_cast<Index>(k) * WA, t1[k]);
        A::store(sdyx + c + static_cast<Index>(k) * WA, t2[k]);
      }
    }
    for (; c < C; ++c) {
      double a = sdy[c], b = sdyx[c];
      auto xc_s = [&](Index row) { return x[row * ld + c] - hi[c]; };
      if (G == 0) {
        a += static_cast<double>(dy[r * ld + c]);
        b += static_cast<double>(dy[r * ld + c] * xc_s(r));
      }
      for (int q = 0; q < G; ++q) {
        const Index r0 = r + 4 * q;
        const T d0 = dy[r0 * ld + c], d1 = dy[(r0 + 1) * ld + c];
        const T d2 = dy[(r0 + 2) * ld + c], d3 = dy[(r0 + 3) * ld + c];
        a += static_cast<double>((d0 + d1) + (d2 + d3));
        b += static_cast<double>(fmadd_s<Isa>(d1, xc_s(r0 + 1), d0 * xc_s(r0)) +
                                 fmadd_s<Isa>(d3, xc_s(r0 + 3), d2 * xc_s(r0 + 2)));
      }
      sdy[c] = a;
      sdyx[c] = b;
    }
  };
  for (; r + 16 <= rows; r += 16) tile(std::integral_constant<int, 4>{});
  for (; r + 4 <= rows; r += 4) tile(std::integral_constant<int, 1>{});
  for (; r < rows; ++r) tile(std::integral_constant<int, 0>{});
}

}  // namespace kernels
}  // namespace detail
}  // namespace normkit
