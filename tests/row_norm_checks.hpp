// Checks shared by the row norms (LayerNorm, RMSNorm): forward and backward against the
// long double reference, finite differences, scalar twins, threads, layouts, in place.
// Each op's test file instantiates them through an adapter (LN, RMS below).
#pragma once

#include "test_util.hpp"

namespace nt {

// Adapters give both ops one calling convention: backward(dy, x, p, saved, dx, dg, db).
template <class T, class Isa = normkit::detail::simd::Best>
struct LN {
  using type = T;
  normkit::LayerNorm<T, Isa> op;
  ref::RowNorm rop;
  LN(int k, double eps, normkit::AffineMode m)
      : op(k, eps, m),
        rop{true, m == normkit::AffineMode::None ? 0 : 1, m == normkit::AffineMode::ScaleShift,
            false, eps} {}
  template <class... A>
  auto forward(A&&... a) const {
    return op.forward(std::forward<A>(a)...);
  }
  template <class DY, class X, class DX, class DG, class DB, class D = Eigen::DefaultDevice>
  void backward(const DY& dy, const X& x, const normkit::Affine<T>& p,
                const normkit::RowStats<T>& s, DX&& dx, DG&& dg, DB&& db,
                const D& d = D()) const {
    op.backward(dy, x, p, s, std::forward<DX>(dx), std::forward<DG>(dg), std::forward<DB>(db), d);
  }
};

template <class T, class Isa = normkit::detail::simd::Best>
struct RMS {
  using type = T;
  normkit::RMSNorm<T, Isa> op;
  ref::RowNorm rop;
  RMS(int k, double eps, normkit::RmsWeight w,
      normkit::EpsPlacement pl = normkit::EpsPlacement::Inside)
      : op(k, eps, w, pl),
        rop{false, w == normkit::RmsWeight::None ? 0 : (w == normkit::RmsWeight::Scale ? 1 : 2),
            false, pl == normkit::EpsPlacement::Outside, eps} {}
  template <class... A>
  auto forward(A&&... a) const {
    return op.forward(std::forward<A>(a)...);
  }
  template <class DY, class X, class DX, class DG, class DB, class D = Eigen::DefaultDevice>
  void backward(const DY& dy, const X& x, const normkit::Affine<T>& p,
                const normkit::RowStats<T>& s, DX&& dx, DG&& dg, DB&&, const D& d = D()) const {
    if constexpr (std::is_same<std::decay_t<DB>, normkit::Skip>::value)
      op.backward(dy, x, p, s, std::forward<DX>(dx), std::forward<DG>(dg), d);
    else
      FAIL("RMSNorm has no dbeta: a test asked for one");
  }
};

// backward with every gradient the op has: dgamma when it has gamma, dbeta when it has
// beta (normkit::skip otherwise).
template <class Op, class DY, class X, class DX, class DG, class DB, class D = Eigen::DefaultDevice>
void backward_all(const Op& o, const DY& dy, const X& x, const normkit::Affine<typename Op::type>& p,
                  const normkit::RowStats<typename Op::type>& s, DX&& dx, DG&& dg, DB&& db,
                  const D& dev = D()) {
  if (o.rop.scale && o.rop.shift)
    o.backward(dy, x, p, s, dx, dg, db, dev);
  else if (o.rop.scale)
    o.backward(dy, x, p, s, dx, dg, normkit::skip, dev);
  else
    o.backward(dy, x, p, s, dx, normkit::skip, normkit::skip, dev);
}

// One problem: extents in memory order, k normalized dims, data and parameters.
template <class T>
struct Problem {
  std::vector<Index> mem;  // memory order, innermost first
  int k = 1;
  std::size_t shift = 0;   // misalignment in elements
  Index n = 1, rows = 1;
  Buffer<T> x, gamma, beta, dy;

  Problem(std::vector<Index> mem_dims, int k_, std::size_t shift_, std::uint64_t seed,
          double mean = 0.0, double sd = 1.0)
      : mem(std::move(mem_dims)), k(k_), shift(shift_), n(inner(mem, k_)),
        rows(total(mem) / std::max<Index>(inner(mem, k_), 1)),
        x(static_cast<std::size_t>(total(mem)), shift_),
        gamma(static_cast<std::size_t>(n), shift_),
        beta(static_cast<std::size_t>(n), shift_),
        dy(static_cast<std::size_t>(total(mem)), shift_) {
    fill_normal(x.data(), x.n, seed, mean, sd);
    fill_normal(gamma.data(), gamma.n, seed + 1, 1.0, 0.5);
    fill_normal(beta.data(), beta.n, seed + 2, 0.0, 0.5);
    fill_normal(dy.data(), dy.n, seed + 3);
  }
  static Index inner(const std::vector<Index>& m, int k) {
    Index s = 1;
    for (int i = 0; i < k; ++i) s *= m[static_cast<std::size_t>(i)];
    return s;
  }
  static Index total(const std::vector<Index>& m) { return inner(m, static_cast<int>(m.size())); }
};

template <int R>
std::array<Index, R> arr(const std::vector<Index>& v) {
  std::array<Index, R> a{};
  for (int i = 0; i < R; ++i) a[static_cast<std::size_t>(i)] = v[static_cast<std::size_t>(i)];
  return a;
}

// Parameter tensors: rank k with the normalized extents, or flat rank 1.
template <class T, int K, int Layout>
struct Params {
  CMap<T, K, Layout> g, b;
  Params(const Problem<T>& pr)
      : g(cmap<T, K, Layout>(pr.gamma.data(), arr<K>(pr.mem))),
        b(cmap<T, K, Layout>(pr.beta.data(), arr<K>(pr.mem))) {}
};

template <class Op, class T>
normkit::Affine<T> make_affine(const Op& o, const CMap<T, 1, Eigen::ColMajor>& g,
                               const CMap<T, 1, Eigen::ColMajor>& b) {
  if (o.rop.scale == 0) return {};
  if (!o.rop.shift) return normkit::affine(g);
  return normkit::affine(g, b);
}
template <class Op, class G>
auto make_affine_any(const Op& o, const G& g, const G& b) -> normkit::Affine<typename Op::type> {
  if (o.rop.scale == 0) return {};
  if (!o.rop.shift) return normkit::affine(g);
  return normkit::affine(g, b);
}

// ---- Tolerances (see tests/README section in the top-level README) -------------------
//
// Forward, per element of row r: the float path computes its statistics in double from
// exact widened inputs, so its error is a few roundings of T in the element-wise pass:
// (x - mean_hi) - mean_lo (2), * rstd (1, plus rstd's own rounding), * gamma + beta (1):
// |dy| <= 8 eps_T (|xhat| |s|) + 2 eps_T |beta|. Double data accumulates n terms in
// double, adding n eps_d relative to the row's largest |xhat|.
//
// Float rows take their statistics from float trees (kernels::blocked_sums,
// blocked_sum_squares: README "Numerics"): with d = x - x0 (x0 the lower median of the
// row's first 5 elements), d is rounded once in float (u = eps_f / 2), then 4 adds of a
// tree of 16 round each sum term: 5 u. A square carries 2 u from d, its product's
// rounding, the pair's fma and 3 tree adds: 7 u. Over the row, with dm = mean |d| and
// d2 = mean d^2:
//   |error of mean| <= 5 u dm,  |error of var| <= 7 u d2 + 10 u |mean - x0| dm.
// In xhat units (XhatErr): xhat_i is off by xm + |xhat_i| xr more, xm = err(mean) rstd
// and xr = err(rstd) / rstd <= err(var) rstd^2 / 2, which is also rstd's relative error.
// Rows whose fast sums are not trusted take exact double sums: smaller errors, the same
// bounds hold. Double rows: zero.
struct XhatErr {
  double xm = 0, xr = 0;
  double at(double xhat) const { return xm + std::fabs(xhat) * xr; }
};

template <class T>
XhatErr float_stats_err(const ref::RowNorm& op, const T* x, std::size_t n) {
  XhatErr e;
  if (!std::is_same<T, float>::value || n == 0) return e;
  const auto st = ref::stats(op, x, n);
  const double u = eps_of<T>() / 2, rstd = static_cast<double>(st.rstd);
  if (!op.center) {
    // RMSNorm: squares of exact x, 5 roundings each (product, fma, 3 adds): 5 u of the
    // mean square, so at most 2.5 u of rstd (either eps placement).
    e.xr = 2.5 * u;
    return e;
  }
  std::vector<double> first;
  for (std::size_t i = 0; i < n && i < 5; ++i) first.push_back(static_cast<double>(x[i]));
  std::sort(first.begin(), first.end());
  const double x0 = first[(first.size() - 1) / 2], mean = static_cast<double>(st.mean);
  double dm = 0, d2 = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - x0;
    dm += std::fabs(d);
    d2 += d * d;
  }
  dm /= static_cast<double>(n);
  d2 /= static_cast<double>(n);
  e.xm = 5 * u * dm * rstd;
  e.xr = 0.5 * (7 * u * d2 + 10 * u * std::fabs(mean - x0) * dm) * rstd * rstd;
  return e;
}

template <class T>
double fwd_tol(double xhat, double xhat_max, double s, double beta, Index n, XhatErr xe = {}) {
  return (8 * eps_of<T>() * std::fabs(xhat) + 4 * static_cast<double>(n) * DBL_EPSILON * xhat_max +
          xe.at(xhat)) *
             std::fabs(s) +
         2 * eps_of<T>() * std::fabs(beta);
}

template <class Op, class T>
void compare_forward(const Op& o, const Problem<T>& pr, const T* x, const T* y,
                     const normkit::RowStats<T>& st, const char* what, bool trees = true) {
  std::vector<LD> yref;
  const auto n = static_cast<std::size_t>(pr.n), rows = static_cast<std::size_t>(pr.rows);
  auto rs = ref::forward(o.rop, x, rows, n, pr.gamma.data(), pr.beta.data(), yref);
  Mismatch mm, ms;
  for (std::size_t r = 0; r < rows; ++r) {
    const XhatErr xe = trees ? float_stats_err(o.rop, x + r * n, n) : XhatErr{};
    double xmax = 0;
    std::vector<double> xh(n);
    for (std::size_t i = 0; i < n; ++i) {
      xh[i] = static_cast<double>((static_cast<LD>(x[r * n + i]) - rs[r].mean) * rs[r].rstd);
      xmax = std::max(xmax, std::fabs(xh[i]));
    }
    for (std::size_t i = 0; i < n; ++i) {
      const double s = static_cast<double>(ref::scale_of(o.rop, pr.gamma.data(), i));
      const double b = o.rop.shift ? static_cast<double>(pr.beta[i]) : 0.0;
      mm.check(static_cast<double>(y[r * n + i]), static_cast<double>(yref[r * n + i]),
               fwd_tol<T>(xh[i], xmax, s, b, pr.n, xe), r * n + i, what);
    }
    // rstd rounds once to T after a double computation; mean_hi + mean_lo holds the mean
    // to about eps_T^2, plus n eps_d of the spread from the accumulation.
    const double rstd_ref = static_cast<double>(rs[r].rstd);
    ms.check(static_cast<double>(st.rstd(static_cast<Index>(r))), rstd_ref,
             (eps_of<T>() + 4 * static_cast<double>(n) * DBL_EPSILON + xe.xr) * rstd_ref, r, "rstd");
    if (o.rop.center) {
      const double m = static_cast<double>(st.mean(static_cast<Index>(r))) +
                       static_cast<double>(st.mean_lo(static_cast<Index>(r)));
      const double mref = static_cast<double>(rs[r].mean);
      const double spread = rstd_ref > 0 ? xmax / rstd_ref : 0.0;
      ms.check(m, mref,
               (2 * eps_of<T>() * eps_of<T>() + 4 * static_cast<double>(n) * DBL_EPSILON) *
                       (std::fabs(mref) + spread) +
                   (rstd_ref > 0 ? xe.xm / rstd_ref : 0.0),
               r, "mean");
    }
  }
  INFO(what << ": " << mm.first << " " << ms.first);
  CHECK(mm.count == 0);
  CHECK(ms.count == 0);
}

// Backward, per row: dx = rstd (g - mean(g) - xhat mean(g xhat)); each term carries a few
// roundings of T, and the statistics n eps_d of the row's spread (as in forward):
// |d dx_i| <= rstd (8 eps_T (|g_i| + mean|g| + (|xhat_i| + 1) mean|g xhat|)
//                   + 4 n eps_d (|g_i| + mean|g| + (|xhat_i| + max|xhat|) mean|g xhat|)).
// dgamma_j = sum_r dy xhat: each term is off by |dy| times xhat's error (8 eps_T |xhat| +
// 4 n eps_d max|xhat|, as in forward), and the double sum over rows adds 4 rows eps_d.
// dbeta_j = sum_r dy: one rounding of T plus the double sum.
// Float statistics (XhatErr): the saved rstd is off by xr relative, on every term of dx,
// and xhat by xm + |xhat| xr, in the xhat mean(g xhat) term and inside mean(g xhat)
// (<= xm mean|g| + xr mean|g xhat|); each dgamma term by |dy| (xm + |xhat| xr).
template <class Op, class T>
void compare_backward(const Op& o, const Problem<T>& pr, const std::common_type_t<T>* dx,
                      const std::common_type_t<T>* dg, const std::common_type_t<T>* db,
                      const char* what) {
  const auto n = static_cast<std::size_t>(pr.n), rows = static_cast<std::size_t>(pr.rows);
  std::vector<LD> dxr, dgr, dbr;
  ref::backward(o.rop, pr.dy.data(), pr.x.data(), rows, n, pr.gamma.data(), dxr, dgr, dbr);
  const double e = 8 * eps_of<T>(), en = 4 * static_cast<double>(n) * DBL_EPSILON;
  Mismatch mx, mg, mb;
  std::vector<double> tol_g(n, 0.0), sdy(n, 0.0), sgx(n, 0.0);
  for (std::size_t r = 0; r < rows; ++r) {
    const auto st = ref::stats(o.rop, pr.x.data() + r * n, n);
    const XhatErr xe = float_stats_err(o.rop, pr.x.data() + r * n, n);
    const double rstd = static_cast<double>(st.rstd);
    std::vector<double> g(n), xh(n);
    double mg_abs = 0, mgx_abs = 0, xmax = 0;
    for (std::size_t i = 0; i < n; ++i) {
      xh[i] = static_cast<double>((static_cast<LD>(pr.x[r * n + i]) - st.mean) * st.rstd);
      g[i] = static_cast<double>(pr.dy[r * n + i]) *
             static_cast<double>(ref::scale_of(o.rop, pr.gamma.data(), i));
      mg_abs += std::fabs(g[i]) / static_cast<double>(n);
      mgx_abs += std::fabs(g[i] * xh[i]) / static_cast<double>(n);
      xmax = std::max(xmax, std::fabs(xh[i]));
    }
    for (std::size_t i = 0; i < n; ++i) {
      const double ady = std::fabs(static_cast<double>(pr.dy[r * n + i]));
      tol_g[i] += ady * (e * std::fabs(xh[i]) + en * xmax + xe.at(xh[i]));
      sgx[i] += ady * std::fabs(xh[i]);
      sdy[i] += ady;
    }
    const double k = o.rop.eps_outside ? 1 / (1 - o.rop.eps * rstd) : 1.0;
    if (dx)
      for (std::size_t i = 0; i < n; ++i)
        mx.check(static_cast<double>(dx[r * n + i]), static_cast<double>(dxr[r * n + i]),
                 rstd * (e * (std::fabs(g[i]) + mg_abs + k * (std::fabs(xh[i]) + 1) * mgx_abs) +
                         en * (std::fabs(g[i]) + mg_abs + k * (std::fabs(xh[i]) + xmax) * mgx_abs) +
                         xe.xr * (std::fabs(g[i]) + mg_abs + k * std::fabs(xh[i]) * mgx_abs) +
                         k * (xe.at(xh[i]) * mgx_abs +
                              std::fabs(xh[i]) * (xe.xm * mg_abs + xe.xr * mgx_abs))),
                 r * n + i, "dx");
  }
  const double er = 4 * static_cast<double>(rows) * DBL_EPSILON;
  for (std::size_t i = 0; i < n; ++i) {
    const double dgr_i = static_cast<double>(dgr[i]), dbr_i = static_cast<double>(dbr[i]);
    if (dg) mg.check(static_cast<double>(dg[i]), dgr_i, tol_g[i] * (1 + er) + er * sgx[i], i, "dgamma");
    if (db) mb.check(static_cast<double>(db[i]), dbr_i, (2 * eps_of<T>() + er) * sdy[i], i, "dbeta");
  }
  INFO(what << ": " << mx.first << " " << mg.first << " " << mb.first);
  CHECK(mx.count == 0);
  CHECK(mg.count == 0);
  CHECK(mb.count == 0);
}

// Forward and backward of one problem, as a rank-R tensor in the given layout, with
// rank-k parameters (or flat ones), optionally in place.
template <int R, int Layout, class Op>
void run_case(const Op& o, Problem<typename Op::type>& pr, bool in_place, bool flat_params) {
  using T = typename Op::type;
  const auto dims = arr<R>(pr.mem);
  Buffer<T> y(pr.x.n, pr.shift), dx(pr.x.n, pr.shift), dg(pr.gamma.n, pr.shift),
      db(pr.gamma.n, pr.shift);
  std::vector<T> x0(pr.x.data(), pr.x.data() + pr.x.n);
  if (in_place) std::copy(x0.begin(), x0.end(), y.data());
  const CMap<T, 1, Eigen::ColMajor> gf(pr.gamma.data(), pr.n), bf(pr.beta.data(), pr.n);
  normkit::Affine<T> p;
  if (flat_params || pr.k > 2 || pr.k == 1) {
    p = make_affine(o, gf, bf);
  } else {
    const Params<T, 2, Layout> pk(pr);
    p = make_affine_any(o, pk.g, pk.b);
  }
  auto ym = map<T, R, Layout>(y.data(), dims);
  normkit::RowStats<T> st;
  if (in_place)
    st = o.forward(ym, p, ym);
  else
    st = o.forward(cmap<T, R, Layout>(pr.x.data(), dims), p, ym);
  compare_forward(o, pr, x0.data(), y.data(), st, in_place ? "forward in place" : "forward");

  const bool has_g = o.rop.scale != 0, has_b = o.rop.shift;
  auto xm = cmap<T, R, Layout>(pr.x.data(), dims);
  auto dym = cmap<T, R, Layout>(pr.dy.data(), dims);
  auto dxm = map<T, R, Layout>(dx.data(), dims);
  auto dgm = map<T, 1, Eigen::ColMajor>(dg.data(), {pr.n});
  auto dbm = map<T, 1, Eigen::ColMajor>(db.data(), {pr.n});
  backward_all(o, dym, xm, p, st, dxm, dgm, dbm);
  compare_backward(o, pr, dx.data(), has_g ? dg.data() : nullptr, has_b ? db.data() : nullptr,
                   "backward");

  // Output mask: each gradient alone, against the reference. (Not bitwise against the
  // full call: each mask is its own kernel instantiation, and the compiler may contract
  // a multiply and an add differently in each.)
  if (has_g) {
    Buffer<T> dx2(pr.x.n, pr.shift), dg2(pr.gamma.n, pr.shift);
    auto dx2m = map<T, R, Layout>(dx2.data(), dims);
    o.backward(dym, xm, p, st, dx2m, normkit::skip, normkit::skip);
    compare_backward(o, pr, dx2.data(), nullptr, nullptr, "backward, dx only");
    o.backward(dym, xm, p, st, normkit::skip, map<T, 1, Eigen::ColMajor>(dg2.data(), {pr.n}),
               normkit::skip);
    compare_backward(o, pr, nullptr, dg2.data(), nullptr, "backward, dgamma only");
  }
  // In-place backward: dx written over dy.
  if (in_place) {
    Buffer<T> d(pr.x.n, pr.shift);
    std::copy(pr.dy.data(), pr.dy.data() + pr.dy.n, d.data());
    auto dm = map<T, R, Layout>(d.data(), dims);
    o.backward(dm, xm, p, st, dm, normkit::skip, normkit::skip);
    CHECK(std::memcmp(d.data(), dx.data(), dx.n * sizeof(T)) == 0);
  }
}

// Sweep of row lengths around every vector width, rank 2 (3 rows), both layouts,
// aligned and misaligned.
template <class Op>
void sweep(const Op& o, std::uint64_t seed) {
  for (Index n : sweep_sizes())
    for (std::size_t shift : {0, 1}) {
      INFO("n = " << n << ", shift = " << shift);
      Problem<typename Op::type> pr({n, 3}, 1, shift, seed + static_cast<std::uint64_t>(n));
      run_case<2, Eigen::RowMajor>(o, pr, false, false);
      run_case<2, Eigen::ColMajor>(o, pr, shift == 1, false);
    }
}

// Ranks 1 to 4, normalizing 1 and 2 innermost dims, both layouts, flat and shaped
// parameters, in place.
template <class Op>
void shapes(const Op& o1, const Op& o2, std::uint64_t seed) {
  const std::vector<Index> m4{5, 3, 4, 2};
  for (std::size_t shift : {0, 1}) {
    INFO("shift = " << shift);
    {
      Problem<typename Op::type> pr({37}, 1, shift, seed);
      run_case<1, Eigen::RowMajor>(o1, pr, false, false);
      run_case<1, Eigen::ColMajor>(o1, pr, true, false);
    }
    Problem<typename Op::type> p2({m4[0], m4[1]}, 1, shift, seed + 1);
    run_case<2, Eigen::RowMajor>(o1, p2, true, false);
    Problem<typename Op::type> p2k({m4[0], m4[1]}, 2, shift, seed + 2);
    run_case<2, Eigen::RowMajor>(o2, p2k, false, false);
    run_case<2, Eigen::ColMajor>(o2, p2k, true, true);
    Problem<typename Op::type> p3({m4[0], m4[1], m4[2]}, 1, shift, seed + 3);
    run_case<3, Eigen::ColMajor>(o1, p3, false, false);
    Problem<typename Op::type> p3k({m4[0], m4[1], m4[2]}, 2, shift, seed + 4);
    run_case<3, Eigen::RowMajor>(o2, p3k, true, false);
    run_case<3, Eigen::ColMajor>(o2, p3k, false, false);
    Problem<typename Op::type> p4({m4[0], m4[1], m4[2], m4[3]}, 1, shift, seed + 5);
    run_case<4, Eigen::RowMajor>(o1, p4, false, false);
    run_case<4, Eigen::ColMajor>(o1, p4, true, true);
    Problem<typename Op::type> p4k({m4[0], m4[1], m4[2], m4[3]}, 2, shift, seed + 6);
    run_case<4, Eigen::RowMajor>(o2, p4k, false, false);
    run_case<4, Eigen::ColMajor>(o2, p4k, false, true);
  }
}

// Forward over many rows (which may take them two at a time: row_norm.hpp pair_rows; or,
// streamed, a row's statistics in step with the previous row's normalize pass:
// skew_rows) gives the bits of forward over each row alone, y and the saved statistics,
// also where a row takes its special case: row 2 constant (eps = 0: var + eps = 0), row 4
// with a NaN, row 5 scaled to subnormals (with eps = 0, rstd beyond T's range); with more
// than 10 rows also the third and second last (constant, NaN), and the fourth last
// scaled by 2^70 (its squares overflow float: statistics in double). Also in place and on
// two threads.
template <class Op>
void rows_alone_agree(const Op& o, Index n, std::uint64_t seed, Index rows = 7) {
  using T = typename Op::type;
  Problem<T> pr({n, rows}, 1, 0, seed);
  auto at = [&](Index r, Index i) -> T& { return pr.x[static_cast<std::size_t>(r * n + i)]; };
  for (Index i = 0; i < n; ++i) {
    at(2, i) = T(0.75);
    at(5, i) *= std::numeric_limits<T>::min() / T(64);
    if (rows > 10) {
      at(rows - 3, i) = T(-2.5);
      at(rows - 4, i) *= T(0x1p70);
    }
  }
  at(4, n / 2) = std::numeric_limits<T>::quiet_NaN();
  if (rows > 10) at(rows - 2, 0) = std::numeric_limits<T>::quiet_NaN();
  const CMap<T, 1, Eigen::ColMajor> g(pr.gamma.data(), n), b(pr.beta.data(), n);
  const auto p = make_affine(o, g, b);
  Buffer<T> y_all(pr.x.n, 0), y_one(pr.x.n, 0);
  normkit::RowStats<T> s_all, s_one;
  o.forward(CMap<T, 2, Eigen::RowMajor>(pr.x.data(), rows, n), p,
            Map<T, 2, Eigen::RowMajor>(y_all.data(), rows, n), s_all);
  auto same = [](const T* u, const T* v, Index count) {
    return std::memcmp(u, v, static_cast<std::size_t>(count) * sizeof(T)) == 0;
  };
  for (Index r = 0; r < rows; ++r) {
    INFO("n = " << n << ", row " << r);
    o.forward(CMap<T, 2, Eigen::RowMajor>(pr.x.data() + r * n, 1, n), p,
              Map<T, 2, Eigen::RowMajor>(y_one.data() + r * n, 1, n), s_one);
    CHECK(same(y_all.data() + r * n, y_one.data() + r * n, n));
    CHECK(same(s_all.rstd.data() + r, s_one.rstd.data(), 1));
    if (s_all.mean.size() > 0) {
      CHECK(same(s_all.mean.data() + r, s_one.mean.data(), 1));
      CHECK(same(s_all.mean_lo.data() + r, s_one.mean_lo.data(), 1));
    }
  }
  // In place (y over x), and on two threads (each range of rows starts alone): the same.
  Buffer<T> z(pr.x);
  o.forward(CMap<T, 2, Eigen::RowMajor>(z.data(), rows, n), p,
            Map<T, 2, Eigen::RowMajor>(z.data(), rows, n), s_one);
  INFO("n = " << n);
  CHECK(same(z.data(), y_all.data(), rows * n));
  Eigen::ThreadPool pool(2);
  o.forward(CMap<T, 2, Eigen::RowMajor>(pr.x.data(), rows, n), p,
            Map<T, 2, Eigen::RowMajor>(y_one.data(), rows, n), s_one,
            Eigen::ThreadPoolDevice(&pool, 2));
  CHECK(same(y_one.data(), y_all.data(), rows * n));
  CHECK(same(s_one.rstd.data(), s_all.rstd.data(), rows));
}

// A tensor of NORMKIT_STREAM_MIN_BYTES and more (3 rows over), [rows, n] RowMajor:
// forward and backward stream their outputs (y, dx). Where n * sizeof(T) is not a
// multiple of 64, each row's streamed body starts at its own column (after the scalar
// head that aligns it), and the rows are walked one at a time; their dgamma / dbeta
// terms must still add up per column (once, a stage of such rows in float lost some
// columns and read stale ones: dgamma off by 23 at [600, 4097]).
template <class Op>
void streamed(const Op& o, Index n, std::size_t shift, std::uint64_t seed) {
  using T = typename Op::type;
  const Index rows = streamed_rows<T>(n);
  INFO("[" << rows << ", " << n << "], misaligned by " << shift);
  Problem<T> pr({n, rows}, 1, shift, seed);
  run_case<2, Eigen::RowMajor>(o, pr, false, true);
}

// The same memory through RowMajor (rows, n) and ColMajor (n, rows) gives the same bits.
template <class Op>
void layouts_agree(const Op& o, std::uint64_t seed) {
  using T = typename Op::type;
  Problem<T> pr({129, 5}, 1, 0, seed);
  Buffer<T> y1(pr.x.n, 0), y2(pr.x.n, 0);
  const CMap<T, 1, Eigen::ColMajor> g(pr.gamma.data(), pr.n), b(pr.beta.data(), pr.n);
  const auto p = make_affine(o, g, b);
  Eigen::TensorMap<Eigen::Tensor<const T, 2, Eigen::RowMajor>> xr(pr.x.data(), 5, 129);
  Eigen::TensorMap<Eigen::Tensor<const T, 2, Eigen::ColMajor>> xc(pr.x.data(), 129, 5);
  Eigen::TensorMap<Eigen::Tensor<T, 2, Eigen::RowMajor>> yr(y1.data(), 5, 129);
  Eigen::TensorMap<Eigen::Tensor<T, 2, Eigen::ColMajor>> yc(y2.data(), 129, 5);
  o.forward(xr, p, yr);
  o.forward(xc, p, yc);
  CHECK(std::memcmp(y1.data(), y2.data(), y1.n * sizeof(T)) == 0);
  // Owning Eigen::Tensor arguments work too.
  Eigen::Tensor<T, 2, Eigen::RowMajor> xt = xr, yt(5, 129);
  o.forward(xt, p, yt);
  CHECK(std::memcmp(yt.data(), y1.data(), y1.n * sizeof(T)) == 0);
}

// Every backend against the scalar twin: the whole op, on lengths around the vector
// width, misaligned. The two differ only in summation order and FMA contraction, so
// each is held to the reference tolerance against the other (twice the one-sided bound).
template <class OpBest, class OpScalar>
void twin(const OpBest& best, const OpScalar& scal, std::uint64_t seed) {
  using T = typename OpBest::type;
  for (Index n : sweep_sizes())
    for (std::size_t shift : {0, 1}) {
      INFO("n = " << n << ", shift = " << shift);
      Problem<T> pr({n, 2}, 1, shift, seed + static_cast<std::uint64_t>(n), 0.5, 2.0);
      Buffer<T> y1(pr.x.n, shift), y2(pr.x.n, shift + 1), dx1(pr.x.n, shift), dx2(pr.x.n, 0),
          dg1(pr.gamma.n, 0), dg2(pr.gamma.n, 1), db1(pr.gamma.n, 0), db2(pr.gamma.n, 1);
      const CMap<T, 1, Eigen::ColMajor> g(pr.gamma.data(), pr.n), b(pr.beta.data(), pr.n);
      const auto p = make_affine(best, g, b);
      const std::array<Index, 2> d{pr.n, 2};
      auto x = cmap<T, 2, Eigen::RowMajor>(pr.x.data(), d);
      auto dy = cmap<T, 2, Eigen::RowMajor>(pr.dy.data(), d);
      auto s1 = best.forward(x, p, map<T, 2, Eigen::RowMajor>(y1.data(), d));
      auto s2 = scal.forward(x, p, map<T, 2, Eigen::RowMajor>(y2.data(), d));
      std::vector<LD> yref;
      auto rs = ref::forward(best.rop, pr.x.data(), 2, static_cast<std::size_t>(n),
                             pr.gamma.data(), pr.beta.data(), yref);
      Mismatch m;
      for (std::size_t r = 0; r < 2; ++r) {
        const XhatErr xe = float_stats_err(best.rop, pr.x.data() + r * static_cast<std::size_t>(n),
                                           static_cast<std::size_t>(n));
        double xmax = 0;
        for (Index i = 0; i < n; ++i)
          xmax = std::max(xmax, std::fabs(static_cast<double>(
                                    (static_cast<LD>(pr.x[r * static_cast<std::size_t>(n) + static_cast<std::size_t>(i)]) - rs[r].mean) * rs[r].rstd)));
        for (std::size_t i = 0; i < static_cast<std::size_t>(n); ++i) {
          const std::size_t j = r * static_cast<std::size_t>(n) + i;
          const double xh = static_cast<double>((static_cast<LD>(pr.x[j]) - rs[r].mean) * rs[r].rstd);
          const double s = static_cast<double>(ref::scale_of(best.rop, pr.gamma.data(), i));
          m.check(static_cast<double>(y1[j]), static_cast<double>(y2[j]),
                  2 * fwd_tol<T>(xh, xmax, s, best.rop.shift ? static_cast<double>(pr.beta[i]) : 0.0, n, xe),
                  j, "y twin");
        }
      }
      INFO(m.first);
      CHECK(m.count == 0);
      const bool has_g = best.rop.scale != 0, has_b = best.rop.shift;
      auto run_bwd = [&](const auto& o, const normkit::RowStats<T>& s, T* dxp, T* dgp, T* dbp) {
        auto dxm = map<T, 2, Eigen::RowMajor>(dxp, d);
        auto dgm = map<T, 1, Eigen::ColMajor>(dgp, {n});
        auto dbm = map<T, 1, Eigen::ColMajor>(dbp, {n});
        backward_all(o, dy, x, p, s, dxm, dgm, dbm);
      };
      run_bwd(best, s1, dx1.data(), dg1.data(), db1.data());
      run_bwd(scal, s2, dx2.data(), dg2.data(), db2.data());
      // Both against the reference: twice the one-sided bound apart at most.
      compare_backward(best, pr, dx1.data(), has_g ? dg1.data() : nullptr,
                       has_b ? db1.data() : nullptr, "backward best");
      compare_backward(scal, pr, dx2.data(), has_g ? dg2.data() : nullptr,
                       has_b ? db2.data() : nullptr, "backward scalar twin");
    }
}

// Results do not depend on the number of threads: DefaultDevice, a pool of 1 and a
// pool of 2 give the same bits for y, statistics, dx, dgamma and dbeta.
template <class Op>
void threads_bitwise(const Op& o, Index rows, Index n, std::uint64_t seed) {
  using T = typename Op::type;
  Problem<T> pr({n, rows}, 1, 0, seed);
  const CMap<T, 1, Eigen::ColMajor> g(pr.gamma.data(), pr.n), b(pr.beta.data(), pr.n);
  const auto p = make_affine(o, g, b);
  const std::array<Index, 2> d{n, rows};
  auto x = cmap<T, 2, Eigen::RowMajor>(pr.x.data(), d);
  auto dy = cmap<T, 2, Eigen::RowMajor>(pr.dy.data(), d);
  struct Out {
    std::vector<T> y, dx, dg, db, rstd, mean;
  };
  auto run = [&](const auto& dev) {
    Out r;
    r.y.resize(pr.x.n);
    r.dx.resize(pr.x.n);
    r.dg.resize(pr.gamma.n);
    r.db.resize(pr.gamma.n);
    auto s = o.forward(x, p, map<T, 2, Eigen::RowMajor>(r.y.data(), d), dev);
    auto dxm = map<T, 2, Eigen::RowMajor>(r.dx.data(), d);
    auto dgm = map<T, 1, Eigen::ColMajor>(r.dg.data(), {n});
    auto dbm = map<T, 1, Eigen::ColMajor>(r.db.data(), {n});
    backward_all(o, dy, x, p, s, dxm, dgm, dbm, dev);
    r.rstd.assign(s.rstd.data(), s.rstd.data() + s.rstd.size());
    r.mean.assign(s.mean.data(), s.mean.data() + s.mean.size());
    return r;
  };
  const Out a = run(Eigen::DefaultDevice());
  Eigen::ThreadPool pool1(1), pool2(2);
  const Out b1 = run(Eigen::ThreadPoolDevice(&pool1, 1));
  const Out b2 = run(Eigen::ThreadPoolDevice(&pool2, 2));
  // Bitwise (memcmp would be handed a null pointer for an empty vector: UB).
  auto same = [](const std::vector<T>& u, const std::vector<T>& v) {
    return u.size() == v.size() &&
           (u.empty() || std::memcmp(u.data(), v.data(), u.size() * sizeof(T)) == 0);
  };
  for (const Out* o2 : {&b1, &b2}) {
    CHECK(same(a.y, o2->y));
    CHECK(same(a.dx, o2->dx));
    CHECK(same(a.dg, o2->dg));
    CHECK(same(a.db, o2->db));
    CHECK(same(a.rstd, o2->rstd));
    CHECK(same(a.mean, o2->mean));
  }
}

// Backward's bits do not depend on where dx lies: streamed rows peel a scalar head up to
// dx's next packet boundary, so dx at another alignment moves columns between the scalar
// head and the vector body, which must compute each column alike (dx, and the dgamma /
// dbeta terms: once, double rows alone added dy * xhat as a product and an add that g++
// fused in one path and not the other, and dgamma changed in the last bit with the heap).
// dx at 64-byte alignment and 1, 2, 3 elements past it, against the first; on streamed
// rows one at a time (768 features: row_norm.hpp backward_lone_rows), in groups of four
// with two or three staged rows left in some chunk (4096 features, 15 rows over the
// streamed count), and 9 rows in cache.
template <class Op>
void dx_alignment_bitwise(const Op& o, Index rows, Index n, std::uint64_t seed) {
  using T = typename Op::type;
  INFO("[" << rows << ", " << n << "]");
  Problem<T> pr({n, rows}, 1, 0, seed);
  const CMap<T, 1, Eigen::ColMajor> g(pr.gamma.data(), pr.n), b(pr.beta.data(), pr.n);
  const auto p = make_affine(o, g, b);
  const std::array<Index, 2> d{n, rows};
  auto x = cmap<T, 2, Eigen::RowMajor>(pr.x.data(), d);
  auto dy = cmap<T, 2, Eigen::RowMajor>(pr.dy.data(), d);
  Buffer<T> y(pr.x.n, 0);
  const auto s = o.forward(x, p, map<T, 2, Eigen::RowMajor>(y.data(), d));
  std::vector<Buffer<T>> dx, dg, db;
  for (std::size_t shift = 0; shift < 4; ++shift) {
    dx.emplace_back(pr.x.n, shift);
    dg.emplace_back(pr.gamma.n, 0);
    db.emplace_back(pr.gamma.n, 0);
    backward_all(o, dy, x, p, s, map<T, 2, Eigen::RowMajor>(dx.back().data(), d),
                 map<T, 1, Eigen::ColMajor>(dg.back().data(), {n}),
                 map<T, 1, Eigen::ColMajor>(db.back().data(), {n}));
  }
  auto same = [](const Buffer<T>& u, const Buffer<T>& v) {
    return std::memcmp(u.data(), v.data(), u.n * sizeof(T)) == 0;
  };
  for (std::size_t shift = 1; shift < 4; ++shift) {
    INFO("dx " << shift << " elements past a 64-byte boundary");
    CHECK(same(dx[0], dx[shift]));
    CHECK(same(dg[0], dg[shift]));
    CHECK(same(db[0], db[shift]));
  }
}

// The shapes above, each with its own seed.
template <class Op>
void dx_alignment_bitwise(const Op& o, std::uint64_t seed) {
  using T = typename Op::type;
  dx_alignment_bitwise(o, streamed_rows<T>(768), 768, seed);
  dx_alignment_bitwise(o, streamed_rows<T>(4096) + 15, 4096, seed + 1);
  dx_alignment_bitwise(o, 9, 768, seed + 2);
}

// Central finite differences in double of L = sum dy * y through the op's own forward,
// against its backward. h = 1e-4 / rstd moves xhat by 1e-4. The error of the difference
// quotient: truncation h^2/6 |L'''| <= 5 h^2 rstd^3 sum|g| (each third derivative of xhat
// is a few rstd^3 terms), and rounding sum|dy| |dy_i|/h with the forward's tolerance.
// L is linear in gamma and beta, so for those only rounding remains.
template <class Op>
void finite_differences(const Op& o, Index rows, Index n, std::uint64_t seed) {
  static_assert(std::is_same<typename Op::type, double>::value, "finite differences in double");
  Problem<double> pr({n, rows}, 1, 0, seed);
  const std::array<Index, 2> d{n, rows};
  const auto N = static_cast<std::size_t>(n * rows);
  std::vector<double> xv(pr.x.data(), pr.x.data() + N), gv(pr.gamma.data(), pr.gamma.data() + n),
      bv(pr.beta.data(), pr.beta.data() + n), y(N);
  auto loss = [&]() {
    const CMap<double, 1, Eigen::ColMajor> g(gv.data(), n), b(bv.data(), n);
    o.forward(cmap<double, 2, Eigen::RowMajor>(xv.data(), d), make_affine(o, g, b),
              map<double, 2, Eigen::RowMajor>(y.data(), d));
    return nt::weighted_sum(pr.dy.data(), y.data(), N);
  };
  const CMap<double, 1, Eigen::ColMajor> g(pr.gamma.data(), n), b(pr.beta.data(), n);
  const auto p = make_affine(o, g, b);
  std::vector<double> dx(N), dg(static_cast<std::size_t>(n)), db(static_cast<std::size_t>(n));
  auto x = cmap<double, 2, Eigen::RowMajor>(pr.x.data(), d);
  auto dy = cmap<double, 2, Eigen::RowMajor>(pr.dy.data(), d);
  auto s = o.forward(x, p, map<double, 2, Eigen::RowMajor>(y.data(), d));
  auto dxm = map<double, 2, Eigen::RowMajor>(dx.data(), d);
  auto dgm = map<double, 1, Eigen::ColMajor>(dg.data(), {n});
  auto dbm = map<double, 1, Eigen::ColMajor>(db.data(), {n});
  backward_all(o, dy, x, p, s, dxm, dgm, dbm);

  double sum_dy_y = 0;
  for (std::size_t i = 0; i < N; ++i) sum_dy_y += std::fabs(pr.dy[i] * y[i]) + std::fabs(pr.dy[i]);
  const double round = 16 * DBL_EPSILON * sum_dy_y;  // |L| rounding, both evaluations
  Mismatch m;
  for (Index r = 0; r < rows; ++r) {
    const double rstd = static_cast<double>(s.rstd(r));
    const double h = 1e-4 / rstd;
    double sum_g = 0;
    for (Index i = 0; i < n; ++i)
      sum_g += std::fabs(pr.dy[static_cast<std::size_t>(r * n + i)]) *
               (o.rop.scale ? std::fabs(static_cast<double>(
                                  ref::scale_of(o.rop, pr.gamma.data(), static_cast<std::size_t>(i))))
                            : 1.0);
    const double tol = 5 * h * h * rstd * rstd * rstd * sum_g + round / h;
    for (Index i = 0; i < n; ++i) {
      const auto j = static_cast<std::size_t>(r * n + i);
      m.check(dx[j], central(loss, xv[j], h), tol, j, "dx vs finite difference");
    }
  }
  const double hg = 1e-3;
  for (Index i = 0; i < n && o.rop.scale; ++i) {
    const auto j = static_cast<std::size_t>(i);
    m.check(dg[j], central(loss, gv[j], hg), round / hg, j, "dgamma vs finite difference");
    if (o.rop.shift)
      m.check(db[j], central(loss, bv[j], hg), round / hg, j, "dbeta vs finite difference");
  }
  INFO(m.first);
  CHECK(m.count == 0);
}

}  // namespace nt
