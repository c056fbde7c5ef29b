// Helpers shared by the narrow-storage tests (narrow_norm.cpp, narrow_fused.cpp): bit
// comparisons of narrow and float values, T's rounding step, one op described at run
// time (LayerNorm or RMSNorm in every mode) with its narrow and float runs, and problem
// data held in T and widened to float.
#pragma once

#include "row_norm_checks.hpp"

namespace nnarrow {

using normkit::AffineMode;
using normkit::CastOrder;
using normkit::EpsPlacement;
using normkit::RmsWeight;
using nt::Buffer;
using nt::CMap;
using nt::Index;
using nt::Map;
using BF = Eigen::bfloat16;
using HF = Eigen::half;
namespace simd = normkit::detail::simd;

template <class T>
std::uint16_t bits(T v) {
  std::uint16_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}
template <class T>
T from_bits(std::uint16_t b) {
  T v;
  std::memcpy(static_cast<void*>(&v), &b, sizeof v);
  return v;
}
inline std::uint32_t fbits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
inline float from_fbits(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
inline bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || fbits(a) == fbits(b);
}
// bf16: the same bits as Eigen's conversion, NaN included (its integer rounding is
// reproduced exactly). half: the same bits, NaN as NaN (F16C keeps the payload).
template <class T>
bool same_narrow(T got, T want) {
  if (std::is_same<T, HF>::value && std::isnan(static_cast<float>(want)))
    return std::isnan(static_cast<float>(got));
  return bits(got) == bits(want);
}

// The gap between 1 and the next value of T: bf16 2^-7, half 2^-10. (Not
// std::numeric_limits<Eigen::half>::epsilon(): Eigen 3.4's is 0x0800, i.e. 2^-13.)
template <class T>
double eps_t() {
  return std::is_same<T, BF>::value ? 0x1p-7 : 0x1p-10;
}
// Half the smallest positive value of T (the absolute rounding error near zero).
template <class T>
double half_tiny() {
  return std::is_same<T, HF>::value ? 0x1p-25 : 0x1p-150;
}

// ---- Ops ------------------------------------------------------------------------------

// One op, described at run time: LayerNorm (affine mode) or RMSNorm (weight, placement,
// cast order). Runs the narrow op and its float twin.
struct Case {
  bool ln = true;
  AffineMode mode = AffineMode::ScaleShift;
  RmsWeight weight = RmsWeight::Scale;
  EpsPlacement placement = EpsPlacement::Inside;
  CastOrder cast = CastOrder::WeightThenCast;
  double eps = 1e-5;
  bool has_gamma() const { return ln ? mode != AffineMode::None : weight != RmsWeight::None; }
  bool has_beta() const { return ln && mode == AffineMode::ScaleShift; }
  ref::RowNorm rop() const {
    return {ln, has_gamma() ? (ln || weight == RmsWeight::Scale ? 1 : 2) : 0, has_beta(),
            !ln && placement == EpsPlacement::Outside, eps};
  }
  std::string str() const {
    return ln ? "LayerNorm mode " + std::to_string(static_cast<int>(mode))
              : "RMSNorm weight " + std::to_string(static_cast<int>(weight)) + " placement " +
                    std::to_string(static_cast<int>(placement)) + " cast " +
                    std::to_string(static_cast<int>(cast));
  }
  template <class T, class Isa = simd::Best>
  normkit::LayerNorm<T, Isa> layer_norm() const {
    return normkit::LayerNorm<T, Isa>(1, eps, mode);
  }
  template <class T, class Isa = simd::Best>
  normkit::RMSNorm<T, Isa> rms_norm() const {
    return normkit::RMSNorm<T, Isa>(1, eps, weight, placement, cast);
  }
};

template <class P>
normkit::Affine<P> affine_of(const Case& c, const P* g, const P* b, Index n) {
  const CMap<P, 1, Eigen::ColMajor> gm(g, n), bm(b, n);
  if (!c.has_gamma()) return {};
  if (!c.has_beta()) return normkit::affine(gm);
  return normkit::affine(gm, bm);
}

template <class T, class P, class X, class Y, class D = Eigen::DefaultDevice>
normkit::RowStats<float> run_forward(const Case& c, const X& x, const normkit::Affine<P>& p, Y&& y,
                                     const D& dev = D()) {
  normkit::RowStats<float> st;
  if (c.ln)
    c.layer_norm<T>().forward(x, p, y, st, dev);
  else
    c.rms_norm<T>().forward(x, p, y, st, dev);
  return st;
}

template <class T, class P, class DY, class X, class DX, class DG, class DB,
          class D = Eigen::DefaultDevice>
void run_backward(const Case& c, const DY& dy, const X& x, const normkit::Affine<P>& p,
                  const normkit::RowStats<float>& st, DX&& dx, DG&& dg, DB&& db,
                  const D& dev = D()) {
  if (c.ln) {
    const auto op = c.layer_norm<T>();
    if (c.has_beta())
      op.backward(dy, x, p, st, dx, dg, db, dev);
    else if (c.has_gamma())
      op.backward(dy, x, p, st, dx, dg, normkit::skip, dev);
    else
      op.backward(dy, x, p, st, dx, normkit::skip, normkit::skip, dev);
  } else {
    const auto op = c.rms_norm<T>();
    if (c.has_gamma())
      op.backward(dy, x, p, st, dx, dg, dev);
    else
      op.backward(dy, x, p, st, dx, normkit::skip, dev);
  }
}

// Data of one problem in T, and the same values widened to float.
template <class T>
struct Data {
  Index rows, n;
  std::size_t shift;
  Buffer<T> x, dy, g, b;
  Buffer<float> xf, dyf, gf, bf;
  Data(Index rows_, Index n_, std::size_t shift_, std::uint64_t seed, double mean = 0.0,
       double sd = 1.0)
      : rows(rows_), n(n_), shift(shift_),
        x(static_cast<std::size_t>(rows * n), shift), dy(x.n, shift),
        g(static_cast<std::size_t>(n), shift), b(g.n, shift), xf(x.n, shift), dyf(x.n, shift),
        gf(g.n, shift), bf(g.n, shift) {
    nt::fill_normal(xf.data(), xf.n, seed, mean, sd);
    nt::fill_normal(dyf.data(), dyf.n, seed + 1);
    nt::fill_normal(gf.data(), gf.n, seed + 2, 1.0, 0.5);
    nt::fill_normal(bf.data(), bf.n, seed + 3, 0.0, 0.5);
    sync();
  }
  // Round the float values to T, and widen back (so both hold the same numbers).
  void sync() {
    auto round = [](Buffer<float>& f, Buffer<T>& t) {
      for (std::size_t i = 0; i < f.n; ++i) {
        t[i] = T(f[i]);
        f[i] = static_cast<float>(t[i]);
      }
    };
    round(xf, x);
    round(dyf, dy);
    round(gf, g);
    round(bf, b);
  }
  // Parameters in P: T's own, or the float copies of the same values.
  template <class P>
  normkit::Affine<P> params(const Case& c) const {
    if constexpr (std::is_same<P, float>::value)
      return affine_of<float>(c, gf.data(), bf.data(), n);
    else
      return affine_of<T>(c, g.data(), b.data(), n);
  }
};

template <class T, int Layout>
auto xmap(const T* p, Index rows, Index n) {
  return nt::cmap<T, 2, Layout>(p, {n, rows});
}
template <class T, int Layout>
auto ymap(T* p, Index rows, Index n) {
  return nt::map<T, 2, Layout>(p, {n, rows});
}

// The float op whose rounded y the narrow op c returns: c itself, or for CastThenWeight
// the op without weight (the weight comes after the rounding).
inline Case float_twin(const Case& c) {
  Case cf = c;
  if (!c.ln && c.cast == CastOrder::CastThenWeight) cf.weight = RmsWeight::None;
  return cf;
}
// The narrow op's y from its float twin's yf (element i of a row, gf the float gamma):
// T(yf), or for CastThenWeight T(float(T(yf)) * w), w = gamma or 1 + gamma.
template <class T>
T float_op_rounded(const Case& c, float yf, const float* gf, std::size_t i) {
  if (c.ln || c.cast != CastOrder::CastThenWeight || c.weight == RmsWeight::None) return T(yf);
  const float w = c.weight == RmsWeight::OnePlusScale ? 1.0f + gf[i] : gf[i];
  return T(static_cast<float>(T(yf)) * w);
}

// y (narrow, rows x n) against the long double reference of c on the widened input xf,
// within the float forward's bound (nt::fwd_tol with the float-tree error) plus the final
// rounding: half an ulp of T (eps_T / 2 relative, half T's smallest step absolute), and
// for CastThenWeight also the inner one, eps_T / 2 |xhat w|.
template <class T>
void check_y_reference(const Case& c, const float* xf, const float* gf, const float* bf,
                       const T* y, Index rows, Index n) {
  const bool ctw = !c.ln && c.cast == CastOrder::CastThenWeight;
  const ref::RowNorm rop = c.rop();
  std::vector<nt::LD> yref;
  const auto nn = static_cast<std::size_t>(n);
  const auto rs = ref::forward(rop, xf, static_cast<std::size_t>(rows), nn, gf,
                               bf, yref);
  nt::Mismatch mm;
  const double e = eps_t<T>() / 2;
  for (std::size_t r = 0; r < static_cast<std::size_t>(rows); ++r) {
    const nt::XhatErr xe = nt::float_stats_err(rop, xf + r * nn, nn);
    double xmax = 0;
    std::vector<double> xh(nn);
    for (std::size_t i = 0; i < nn; ++i) {
      xh[i] = static_cast<double>((static_cast<nt::LD>(xf[r * nn + i]) - rs[r].mean) * rs[r].rstd);
      xmax = std::max(xmax, std::fabs(xh[i]));
    }
    for (std::size_t i = 0; i < nn; ++i) {
      const double s = static_cast<double>(ref::scale_of(rop, gf, i));
      const double bb = rop.shift ? static_cast<double>(bf[i]) : 0.0;
      const double want = static_cast<double>(yref[r * nn + i]);
      double tol = nt::fwd_tol<float>(xh[i], xmax, s, bb, n, xe);
      if (ctw) tol += e * std::fabs(xh[i] * s) * (1 + e);
      tol += e * (std::fabs(want) + tol) + half_tiny<T>() * (1 + std::fabs(s));
      mm.check(static_cast<double>(static_cast<float>(y[r * nn + i])), want, tol, r * nn + i, "y");
    }
  }
  INFO(mm.first);
  CHECK(mm.count == 0);
}

// The bound of a narrow op's parameter gradient (in P) against the float op's, for one
// column whose terms have absolute sum sum_abs and whose float op's value is f: the narrow
// op rounds each block's sums to float before adding them in double (u = 2^-24 of each
// block's sum of |terms|, at most u sum_abs in all), then the total to float and to P
// (u + eps_P / 2 of |total|); the float op rounds once (u |total|) and both add in double
// in different orders (4 rows DBL_EPSILON sum_abs). Before the double, the float engine
// sums up to four rows' terms in float (four rows in step pairwise, 2 roundings; single
// rows staged, kernels::StagedAcc, 3), grouped by the rows of its call: a narrow block's
// rows and the float op's chunk group differently, so each side carries up to 3 u of
// sum_abs of its own. P = T: also half T's smallest step.
template <class T, class P>
double param_grad_tol(Index rows, double sum_abs, double f) {
  const bool narrow_p = !std::is_same<P, float>::value;
  const double u = 0x1p-24, ep = narrow_p ? eps_t<T>() / 2 : u;
  const double er = 4 * static_cast<double>(rows) * DBL_EPSILON;
  return (7 * u + er) * sum_abs + (2 * u + ep) * std::fabs(f) + (narrow_p ? half_tiny<T>() : 0.0);
}

// Every LayerNorm affine mode, every RMSNorm weight with both cast orders, and eps
// outside the sqrt.
inline std::vector<Case> all_cases() {
  std::vector<Case> cs;
  for (auto m : {AffineMode::ScaleShift, AffineMode::Scale, AffineMode::None}) {
    Case c;
    c.mode = m;
    cs.push_back(c);
  }
  for (auto w : {RmsWeight::Scale, RmsWeight::OnePlusScale, RmsWeight::None})
    for (auto cast : {CastOrder::WeightThenCast, CastOrder::CastThenWeight}) {
      Case c;
      c.ln = false;
      c.weight = w;
      c.cast = cast;
      c.eps = 1e-6;
      cs.push_back(c);
    }
  Case out;
  out.ln = false;
  out.placement = EpsPlacement::Outside;
  out.eps = 1e-3;
  cs.push_back(out);
  return cs;
}

}  // namespace nnarrow
