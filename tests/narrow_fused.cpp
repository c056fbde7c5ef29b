// Narrow storage (Eigen::bfloat16, Eigen::half) for the fused residual of LayerNorm and
// RMSNorm and for AdaptiveLayerNorm (README "Narrow storage"). Residual: s bitwise
// T(alpha x + r) as the backend adds it, y bitwise the narrow op on the stored s (and the
// float op on the widened s, rounded), both against the long double reference; backward
// dx and dr bitwise the float op's rounded, parameter gradients against the float op and
// the reference. Adaptive: y and dx bitwise the float op's rounded, the condition's
// gradients against the float op and the reference. Rows over several staging blocks,
// lengths around the vector widths, both layouts, misaligned, parameters in float and in
// T, in place, 1 and 2 threads bitwise, NaN rows, bad arguments (the float op's messages,
// nothing written).
#include "adaptive_reference.hpp"
#include "narrow_util.hpp"

using namespace nnarrow;

namespace {

using normkit::RowStats;

// Rows enough for two staging blocks and part of a third.
Index multi_block_rows(Index n) { return 2 * normkit::detail::narrow_block_rows(n) + 3; }

template <class T>
Buffer<float> widened(const Buffer<T>& b) {
  Buffer<float> f(b.n, b.shift);
  for (std::size_t i = 0; i < b.n; ++i) f[i] = static_cast<float>(b[i]);
  return f;
}

template <class A, class B>
bool same_bytes(const Buffer<A>& a, const Buffer<B>& b) {
  return a.n == b.n && sizeof(A) == sizeof(B) && std::memcmp(a.data(), b.data(), a.n * sizeof(A)) == 0;
}

bool same_stats(const RowStats<float>& a, const RowStats<float>& b) {
  auto same = [](const Eigen::Tensor<float, 1>& u, const Eigen::Tensor<float, 1>& v) {
    if (u.size() != v.size()) return false;
    for (Index i = 0; i < u.size(); ++i)
      if (!same_float(u(i), v(i))) return false;
    return true;
  };
  return same(a.rstd, b.rstd) && same(a.mean, b.mean) && same(a.mean_lo, b.mean_lo);
}

// The first element where got differs from T(want) (bitwise, NaN as same_narrow says), or
// -1.
template <class T>
long first_unrounded(const T* got, const float* want, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (!same_narrow(got[i], T(want[i]))) return static_cast<long>(i);
  return -1;
}

// The what() of the exception f throws ("" if none).
template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const normkit::invalid_argument& e) {
    return e.what();
  }
  return "";
}

// ---- Fused residual -------------------------------------------------------------------

template <class T, class P, class X, class R, class S, class Y, class D = Eigen::DefaultDevice>
RowStats<float> run_forward_residual(const Case& c, const X& x, const R& r,
                                     const normkit::Affine<P>& p, S&& s, Y&& y, double alpha,
                                     const D& dev = D()) {
  RowStats<float> st;
  if (c.ln)
    c.layer_norm<T>().forward_residual(x, r, p, s, y, st, alpha, dev);
  else
    c.rms_norm<T>().forward_residual(x, r, p, s, y, st, alpha, dev);
  return st;
}

// backward_residual with every parameter gradient the op has (the others skipped).
template <class T, class P, class DS, class DY, class S, class DX, class DR, class DG, class DB,
          class D = Eigen::DefaultDevice>
void run_backward_residual(const Case& c, const DS& ds, const DY& dy, const S& s,
                           const normkit::Affine<P>& p, const RowStats<float>& st, DX&& dx,
                           DR&& dr, DG&& dg, DB&& db, double alpha, const D& dev = D()) {
  if (c.ln) {
    const auto op = c.layer_norm<T>();
    if (c.has_beta())
      op.backward_residual(ds, dy, s, p, st, dx, dr, dg, db, alpha, dev);
    else if (c.has_gamma())
      op.backward_residual(ds, dy, s, p, st, dx, dr, dg, normkit::skip, alpha, dev);
    else
      op.backward_residual(ds, dy, s, p, st, dx, dr, normkit::skip, normkit::skip, alpha, dev);
  } else {
    const auto op = c.rms_norm<T>();
    if (c.has_gamma())
      op.backward_residual(ds, dy, s, p, st, dx, dr, dg, alpha, dev);
    else
      op.backward_residual(ds, dy, s, p, st, dx, dr, normkit::skip, alpha, dev);
  }
}

// One residual problem: x, dy, gamma, beta (d) and r, ds (e.x, e.dy), in T and widened.
template <class T>
struct Res {
  Data<T> d, e;
  Res(Index rows, Index n, std::size_t shift, std::uint64_t seed)
      : d(rows, n, shift, seed), e(rows, n, shift, seed + 50, 0.5, 2.0) {}
};

// skip: 0 every output, 1 dx skipped, 2 dr skipped, 3 ds not given. in_place: s over r
// forward, dr over ds backward.
template <class T, class P, int Layout>
void residual_case(const Case& c, Index rows, Index n, std::size_t shift, std::uint64_t seed,
                   double alpha, bool in_place, int skip) {
  INFO(c.str() << ", rows " << rows << ", n " << n << ", shift " << shift << ", params "
               << (std::is_same<P, float>::value ? "float" : "T") << ", layout " << Layout
               << ", alpha " << alpha << ", in place " << in_place << ", skip " << skip);
  Res<T> pr(rows, n, shift, seed);
  const Data<T>& d = pr.d;
  const auto p = d.template params<P>(c);
  Buffer<T> rb = pr.e.x, sb(d.x.n, shift), y(d.x.n, shift);
  T* sp = in_place ? rb.data() : sb.data();
  const RowStats<float> st = run_forward_residual<T>(
      c, xmap<T, Layout>(d.x.data(), rows, n), xmap<T, Layout>(rb.data(), rows, n), p,
      ymap<T, Layout>(sp, rows, n), ymap<T, Layout>(y.data(), rows, n), alpha);
  const Buffer<T> s = [&] {
    Buffer<T> b(d.x.n, shift);
    std::copy(sp, sp + d.x.n, b.data());
    return b;
  }();

  // s: the backend's float add on the widened x and r, rounded once to T.
  const bool fused = nt::best_fuses();
  std::size_t bad = 0;
  nt::Mismatch ms;
  const double e = eps_t<T>() / 2, u = 0x1p-24;
  for (std::size_t i = 0; i < s.n; ++i) {
    const float xf = d.xf[i], rf = pr.e.xf[i];
    const T want = T(nt::residual_sum(static_cast<float>(alpha), xf, rf, fused));
    if (!same_narrow(s[i], want) && bad++ == 0)
      FAIL_CHECK("s[" << i << "] = " << static_cast<float>(s[i]) << ", want " << static_cast<float>(want));
    const double exact = alpha * static_cast<double>(xf) + static_cast<double>(rf);
    ms.check(static_cast<double>(static_cast<float>(s[i])), exact,
             2 * u * (std::fabs(alpha * xf) + std::fabs(rf)) + e * std::fabs(exact) * (1 + 4 * u) +
                 half_tiny<T>(),
             i, "s vs exact");
  }
  CHECK(bad == 0);
  INFO(ms.first);
  CHECK(ms.count == 0);

  // y: the narrow op on the stored s, bit for bit; and the float op on the widened s.
  {
    Buffer<T> y2(d.x.n, shift);
    const auto st2 = run_forward<T>(c, xmap<T, Layout>(s.data(), rows, n), p,
                                    ymap<T, Layout>(y2.data(), rows, n));
    CHECK(same_bytes(y, y2));
    CHECK(same_stats(st, st2));
  }
  const Buffer<float> sw = widened(s);
  const Case cf = float_twin(c);
  const auto pcf = affine_of<float>(cf, d.gf.data(), d.bf.data(), n);
  Buffer<float> yf(d.x.n, shift);
  const auto sf = run_forward<float>(cf, xmap<float, Layout>(sw.data(), rows, n), pcf,
                                     ymap<float, Layout>(yf.data(), rows, n));
  for (std::size_t i = 0; i < y.n; ++i) {
    const T want = float_op_rounded<T>(c, yf[i], d.gf.data(), i % static_cast<std::size_t>(n));
    if (!same_narrow(y[i], want) && bad++ == 0)
      FAIL_CHECK("y[" << i << "] = " << static_cast<float>(y[i]) << ", float op rounded "
                      << static_cast<float>(want));
  }
  CHECK(bad == 0);
  if (cf.weight == c.weight) CHECK(same_stats(st, sf));
  check_y_reference(c, sw.data(), d.gf.data(), d.bf.data(), y.data(), rows, n);

  // Backward from the stored s and forward's statistics.
  Buffer<T> dsb = pr.e.dy, dx(d.x.n, shift), drb(d.x.n, shift);
  T* drp = in_place ? dsb.data() : drb.data();
  Buffer<P> dg(d.g.n, shift), db(d.g.n, shift);
  const auto sm = xmap<T, Layout>(s.data(), rows, n);
  const auto dym = xmap<T, Layout>(d.dy.data(), rows, n);
  const auto dsm = xmap<T, Layout>(dsb.data(), rows, n);
  auto dxm = ymap<T, Layout>(dx.data(), rows, n);
  auto drm = ymap<T, Layout>(drp, rows, n);
  auto dgm = nt::map<P, 1, Eigen::ColMajor>(dg.data(), {n});
  auto dbm = nt::map<P, 1, Eigen::ColMajor>(db.data(), {n});
  if (skip == 1)
    run_backward_residual<T>(c, dsm, dym, sm, p, st, normkit::skip, drm, dgm, dbm, alpha);
  else if (skip == 2)
    run_backward_residual<T>(c, dsm, dym, sm, p, st, dxm, normkit::skip, dgm, dbm, alpha);
  else if (skip == 3)
    run_backward_residual<T>(c, normkit::skip, dym, sm, p, st, dxm, drm, dgm, dbm, alpha);
  else
    run_backward_residual<T>(c, dsm, dym, sm, p, st, dxm, drm, dgm, dbm, alpha);

  // The float op on the widened ds, dy, s, with the float forward's statistics.
  const auto pf = affine_of<float>(c, d.gf.data(), d.bf.data(), n);
  const auto sff = run_forward<float>(c, xmap<float, Layout>(sw.data(), rows, n), pf,
                                      ymap<float, Layout>(yf.data(), rows, n));
  Buffer<float> dxf(d.x.n, shift), drf(d.x.n, shift), dgf(d.g.n, shift), dbf(d.g.n, shift);
  const bool with_ds = skip != 3;
  const auto dsf = xmap<float, Layout>(pr.e.dyf.data(), rows, n);
  const auto dyf = xmap<float, Layout>(d.dyf.data(), rows, n);
  const auto swm = xmap<float, Layout>(sw.data(), rows, n);
  auto dxfm = ymap<float, Layout>(dxf.data(), rows, n);
  auto drfm = ymap<float, Layout>(drf.data(), rows, n);
  auto dgfm = nt::map<float, 1, Eigen::ColMajor>(dgf.data(), {n});
  auto dbfm = nt::map<float, 1, Eigen::ColMajor>(dbf.data(), {n});
  if (with_ds)
    run_backward_residual<float>(c, dsf, dyf, swm, pf, sff, dxfm, drfm, dgfm, dbfm, alpha);
  else
    run_backward_residual<float>(c, normkit::skip, dyf, swm, pf, sff, dxfm, drfm, dgfm, dbfm, alpha);
  if (skip != 1) CHECK(first_unrounded(dx.data(), dxf.data(), dx.n) == -1);
  if (skip != 2) CHECK(first_unrounded(drp, drf.data(), dx.n) == -1);

  // Against the reference (ds, dy, s as the op saw them).
  const ref::RowNorm rop = c.rop();
  const auto nn = static_cast<std::size_t>(n), nr = static_cast<std::size_t>(rows);
  std::vector<nt::LD> g, dxr, drr, dgr, dbr;
  adref::residual_backward(rop, with_ds ? pr.e.dyf.data() : static_cast<const float*>(nullptr),
                           d.dyf.data(), sw.data(), nr, nn, d.gf.data(), alpha, g, dxr, drr, dgr,
                           dbr);
  // The reference has no value where it divides 0 by 0 (RMSNorm, eps outside, n = 1 and
  // s = 0: 1 - eps rstd = 0): those elements are compared with the float op only.
  nt::Mismatch mx, mr, mg, mb;
  for (std::size_t i = 0; i < dx.n; ++i) {
    if (!std::isfinite(static_cast<double>(dxr[i])) || !std::isfinite(static_cast<double>(drr[i])))
      continue;
    if (skip != 1) {
      const double want = static_cast<double>(dxr[i]), f = static_cast<double>(dxf[i]);
      mx.check(static_cast<double>(static_cast<float>(dx[i])), want,
               std::fabs(f - want) + e * std::fabs(f) + half_tiny<T>(), i, "dx vs reference");
    }
    if (skip != 2) {
      const double want = static_cast<double>(drr[i]), f = static_cast<double>(drf[i]);
      mr.check(static_cast<double>(static_cast<float>(drp[i])), want,
               std::fabs(f - want) + e * std::fabs(f) + half_tiny<T>(), i, "dr vs reference");
    }
  }
  std::vector<double> sgx(nn, 0.0), sdy(nn, 0.0);
  for (std::size_t r = 0; r < nr; ++r) {
    const auto rs = ref::stats(rop, sw.data() + r * nn, nn);
    for (std::size_t i = 0; i < nn; ++i) {
      const double xh = static_cast<double>((static_cast<nt::LD>(sw[r * nn + i]) - rs.mean) * rs.rstd);
      sgx[i] += std::fabs(static_cast<double>(d.dyf[r * nn + i]) * xh);
      sdy[i] += std::fabs(static_cast<double>(d.dyf[r * nn + i]));
    }
  }
  // Parameter gradients: against the float op within param_grad_tol, and against the
  // reference within the float op's own distance from it plus that bound.
  for (std::size_t i = 0; i < nn; ++i) {
    if (c.has_gamma()) {
      const double f = static_cast<double>(dgf[i]), got = static_cast<double>(static_cast<float>(dg[i]));
      const double tol = param_grad_tol<T, P>(rows, sgx[i], f);
      mg.check(got, f, tol, i, "dgamma vs float op");
      mg.check(got, static_cast<double>(dgr[i]), std::fabs(f - static_cast<double>(dgr[i])) + tol, i,
               "dgamma vs reference");
    }
    if (c.has_beta()) {
      const double f = static_cast<double>(dbf[i]), got = static_cast<double>(static_cast<float>(db[i]));
      const double tol = param_grad_tol<T, P>(rows, sdy[i], f);
      mb.check(got, f, tol, i, "dbeta vs float op");
      mb.check(got, static_cast<double>(dbr[i]), std::fabs(f - static_cast<double>(dbr[i])) + tol, i,
               "dbeta vs reference");
    }
  }
  INFO(mx.first << " " << mr.first << " " << mg.first << " " << mb.first);
  CHECK(mx.count == 0);
  CHECK(mr.count == 0);
  CHECK(mg.count == 0);
  CHECK(mb.count == 0);
}


// ---- AdaptiveLayerNorm --------------------------------------------------------------

using Form = normkit::AdaptiveForm;

// The narrow op and its float twin, with the oracle's description.
template <class T>
normkit::AdaptiveLayerNorm<T> ada_op(Form f, bool full) {
  switch (f) {
    case Form::AdaNorm: return normkit::AdaptiveLayerNorm<T>::ada_norm(2.0, 0.25, full);
    case Form::Modulated: return normkit::AdaptiveLayerNorm<T>::modulated();
    default: return normkit::AdaptiveLayerNorm<T>::elementwise();
  }
}
inline adref::Op ada_ref(Form f, bool full) {
  if (f == Form::AdaNorm) return {adref::Form::AdaNorm, 1e-5, 2.0, 0.25, full};
  if (f == Form::Modulated) return {adref::Form::Modulated, 1e-6, 1.0, 0.1, false};
  return {adref::Form::Elementwise, 1e-5, 1.0, 0.1, false};
}
inline const char* form_name(Form f) {
  return f == Form::AdaNorm ? "AdaNorm" : f == Form::Modulated ? "modulated" : "element-wise";
}

// x [n, per, B] in memory order, dy, and the condition (modulated [n, B], element-wise x's
// extents) in T and the same values in float.
template <class T>
struct AdaData {
  Form form;
  Index n, per, B, rows;
  Buffer<T> x, dy, c1, c2;
  Buffer<float> xf, dyf, c1f, c2f;
  AdaData(Form f, Index n_, Index per_, Index B_, std::size_t shift, std::uint64_t seed)
      : form(f), n(n_), per(per_), B(B_), rows(per_ * B_),
        x(static_cast<std::size_t>(n_ * rows), shift), dy(x.n, shift),
        c1(f == Form::AdaNorm ? 0 : static_cast<std::size_t>(f == Form::Modulated ? n_ * B_ : n_ * rows), shift),
        c2(c1.n, shift), xf(x.n, shift), dyf(x.n, shift), c1f(c1.n, shift), c2f(c1.n, shift) {
    nt::fill_normal(xf.data(), xf.n, seed, 0.5, 2.0);
    nt::fill_normal(dyf.data(), dyf.n, seed + 1);
    nt::fill_normal(c1f.data(), c1f.n, seed + 2, f == Form::Elementwise ? 1.0 : 0.0, 0.5);
    nt::fill_normal(c2f.data(), c2f.n, seed + 3, 0.0, 0.5);
    auto round = [](Buffer<float>& fb, Buffer<T>& tb) {
      for (std::size_t i = 0; i < fb.n; ++i) {
        tb[i] = T(fb[i]);
        fb[i] = static_cast<float>(tb[i]);
      }
    };
    round(xf, x);
    round(dyf, dy);
    round(c1f, c1);
    round(c2f, c2);
  }
  template <class P, int Layout>
  normkit::Affine<P> cond(const P* a, const P* b) const {
    if (form == Form::AdaNorm) return {};
    if (form == Form::Modulated)
      return normkit::affine(nt::cmap<P, 2, Layout>(a, {n, B}), nt::cmap<P, 2, Layout>(b, {n, B}));
    return normkit::affine(nt::cmap<P, 3, Layout>(a, {n, per, B}),
                           nt::cmap<P, 3, Layout>(b, {n, per, B}));
  }
  // The condition in P: T's own, or the float copies of the same values.
  template <class P, int Layout>
  normkit::Affine<P> cond_in() const {
    if constexpr (std::is_same<P, float>::value)
      return cond<float, Layout>(c1f.data(), c2f.data());
    else
      return cond<T, Layout>(c1.data(), c2.data());
  }
};

// backward with the condition's gradients the form has (d1, d2: nullptr to skip).
template <class T, class P, class DY, class X, class DX>
void ada_backward(const normkit::AdaptiveLayerNorm<T>& op, Form f, const DY& dy, const X& x,
                  const normkit::Affine<P>& c, const RowStats<normkit::detail::stat_t<T>>& st,
                  DX&& dx, P* d1, P* d2, Index n, Index per, Index B) {
  if (f == Form::AdaNorm) {
    op.backward(dy, x, c, st, dx, normkit::skip, normkit::skip);
  } else if (f == Form::Modulated) {
    auto m1 = nt::map<P, 2, Eigen::ColMajor>(d1, {n, B});
    auto m2 = nt::map<P, 2, Eigen::ColMajor>(d2 ? d2 : d1, {n, B});
    if (d2)
      op.backward(dy, x, c, st, dx, m1, m2);
    else
      op.backward(dy, x, c, st, dx, m1, normkit::skip);
  } else {
    auto m1 = nt::map<P, 3, Eigen::ColMajor>(d1, {n, per, B});
    auto m2 = nt::map<P, 3, Eigen::ColMajor>(d2 ? d2 : d1, {n, per, B});
    if (d2)
      op.backward(dy, x, c, st, dx, m1, m2);
    else
      op.backward(dy, x, c, st, dx, m1, normkit::skip);
  }
}

// Forward and backward of one problem: y and dx bitwise the float op's rounded, the
// statistics bitwise; y, dx and the condition's gradients against the reference.
// in_place: y over x, dx over dy. skip_d2: the second condition gradient skipped.
template <class T, class P, int Layout>
void adaptive_case(Form f, bool full, Index n, Index per, Index B, std::size_t shift,
                   std::uint64_t seed, bool in_place, bool skip_d2) {
  INFO(form_name(f) << (full ? " full" : "") << ", n " << n << ", per " << per << ", B " << B
                    << ", shift " << shift << ", cond " << (std::is_same<P, float>::value ? "float" : "T")
                    << ", layout " << Layout << ", in place " << in_place << ", skip d2 " << skip_d2);
  const AdaData<T> d(f, n, per, B, shift, seed);
  const auto op = ada_op<T>(f, full);
  const auto opf = ada_op<float>(f, full);
  const auto c = d.template cond_in<P, Layout>();
  const auto cf = d.template cond<float, Layout>(d.c1f.data(), d.c2f.data());
  const std::array<Index, 3> dims{n, per, B};
  Buffer<T> xb = d.x, yb(d.x.n, shift);
  T* yp = in_place ? xb.data() : yb.data();
  RowStats<float> st;
  op.forward(nt::cmap<T, 3, Layout>(xb.data(), dims), c, nt::map<T, 3, Layout>(yp, dims), st);
  Buffer<float> yf(d.x.n, shift);
  RowStats<float> stf;
  opf.forward(nt::cmap<float, 3, Layout>(d.xf.data(), dims), cf, nt::map<float, 3, Layout>(yf.data(), dims), stf);
  CHECK(first_unrounded(yp, yf.data(), yf.n) == -1);
  CHECK(same_stats(st, stf));

  const adref::Op rop = ada_ref(f, full);
  const auto nn = static_cast<std::size_t>(n), nr = static_cast<std::size_t>(d.rows),
             np = static_cast<std::size_t>(per);
  std::vector<nt::LD> yr, z;
  const auto rs = adref::forward(rop, d.xf.data(), nr, nn, np, d.c1f.data(), d.c2f.data(), yr, z);
  const double e = eps_t<T>() / 2;
  const ref::RowNorm ln{true, 0, false, false, rop.eps};
  nt::Mismatch my;
  for (std::size_t r = 0; r < nr; ++r) {
    const nt::XhatErr xe = nt::float_stats_err(ln, d.xf.data() + r * nn, nn);
    double zmax = 0;
    for (std::size_t i = 0; i < nn; ++i) zmax = std::max(zmax, std::fabs(static_cast<double>(z[r * nn + i])));
    for (std::size_t i = 0; i < nn; ++i) {
      const std::size_t j = r * nn + i;
      const double zj = static_cast<double>(z[j]);
      // The sensitivity of y to z: the multiplier, or AdaNorm's |C| (1 + 2 |k z|).
      const double m = f == Form::AdaNorm ? std::fabs(rop.C) * (1 + 2 * std::fabs(rop.k * zj))
                                          : static_cast<double>(adref::scale_at(rop, d.c1f.data(), r, i, nn, np));
      const double sh = static_cast<double>(adref::shift_at(rop, d.c2f.data(), r, i, nn, np));
      const double want = static_cast<double>(yr[j]);
      double tol = nt::fwd_tol<float>(zj, zmax, m, sh, n, xe);
      tol += e * (std::fabs(want) + tol) + half_tiny<T>() * (1 + std::fabs(m));
      my.check(static_cast<double>(static_cast<float>(yp[j])), want, tol, j, "y vs reference");
    }
  }
  INFO(my.first);
  CHECK(my.count == 0);

  // Backward from x (intact: in place, x's copy) and forward's statistics.
  Buffer<T> dyb = d.dy, dxb(d.x.n, shift);
  T* dxp = in_place ? dyb.data() : dxb.data();
  const std::size_t ncond = d.c1.n;
  Buffer<P> d1(ncond, shift), d2(ncond, shift);
  Buffer<float> dxf(d.x.n, shift), d1f(ncond, shift), d2f(ncond, shift);
  ada_backward(op, f, nt::cmap<T, 3, Layout>(dyb.data(), dims), nt::cmap<T, 3, Layout>(d.x.data(), dims),
               c, st, nt::map<T, 3, Layout>(dxp, dims), d1.data(), skip_d2 ? nullptr : d2.data(), n,
               per, B);
  ada_backward(opf, f, nt::cmap<float, 3, Layout>(d.dyf.data(), dims),
               nt::cmap<float, 3, Layout>(d.xf.data(), dims), cf, stf,
               nt::map<float, 3, Layout>(dxf.data(), dims), d1f.data(), d2f.data(), n, per, B);
  CHECK(first_unrounded(dxp, dxf.data(), dxf.n) == -1);
  std::vector<nt::LD> dxr, d1r, d2r;
  adref::backward(rop, d.dyf.data(), d.xf.data(), nr, nn, np, d.c1f.data(), dxr, d1r, d2r);
  nt::Mismatch mx, m1, m2;
  for (std::size_t i = 0; i < dxf.n; ++i) {
    const double want = static_cast<double>(dxr[i]), fv = static_cast<double>(dxf[i]);
    mx.check(static_cast<double>(static_cast<float>(dxp[i])), want,
             std::fabs(fv - want) + e * std::fabs(fv) + half_tiny<T>(), i, "dx vs reference");
  }
  if (f == Form::Elementwise) {
    // The float kernel's dy xhat and dy, as float or rounded once to T.
    for (std::size_t i = 0; i < ncond; ++i) {
      if (!same_narrow(P(d1[i]), P(d1f[i])) || (!skip_d2 && !same_narrow(P(d2[i]), P(d2f[i])))) {
        FAIL_CHECK("element-wise condition gradient " << i << " not the float op's rounded");
        break;
      }
    }
  }
  if (f == Form::Modulated) {
    // Sums over each sample's rows: against the float op within param_grad_tol (per rows),
    // and against the reference within the float op's distance from it plus that bound.
    for (std::size_t b = 0; b < static_cast<std::size_t>(B); ++b)
      for (std::size_t i = 0; i < nn; ++i) {
        double sz = 0, sd = 0;
        for (std::size_t r = b * np; r < (b + 1) * np; ++r) {
          sz += std::fabs(static_cast<double>(d.dyf[r * nn + i] * z[r * nn + i]));
          sd += std::fabs(static_cast<double>(d.dyf[r * nn + i]));
        }
        const std::size_t j = b * nn + i;
        const double f1 = static_cast<double>(d1f[j]), f2 = static_cast<double>(d2f[j]);
        const double t1 = param_grad_tol<T, P>(per, sz, f1), t2 = param_grad_tol<T, P>(per, sd, f2);
        const double g1 = static_cast<double>(static_cast<float>(d1[j]));
        m1.check(g1, f1, t1, j, "dscale vs float op");
        m1.check(g1, static_cast<double>(d1r[j]), std::fabs(f1 - static_cast<double>(d1r[j])) + t1, j,
                 "dscale vs reference");
        if (!skip_d2) {
          const double g2 = static_cast<double>(static_cast<float>(d2[j]));
          m2.check(g2, f2, t2, j, "dshift vs float op");
          m2.check(g2, static_cast<double>(d2r[j]), std::fabs(f2 - static_cast<double>(d2r[j])) + t2, j,
                   "dshift vs reference");
        }
      }
  } else if (f == Form::Elementwise) {
    for (std::size_t j = 0; j < ncond; ++j) {
      const double f1 = static_cast<double>(d1f[j]), w1 = static_cast<double>(d1r[j]);
      m1.check(static_cast<double>(static_cast<float>(d1[j])), w1,
               std::fabs(f1 - w1) + e * std::fabs(f1) + half_tiny<T>(), j, "dada_w vs reference");
      if (!skip_d2) {
        const double f2 = static_cast<double>(d2f[j]), w2 = static_cast<double>(d2r[j]);
        m2.check(static_cast<double>(static_cast<float>(d2[j])), w2,
                 std::fabs(f2 - w2) + e * std::fabs(f2) + half_tiny<T>(), j, "dada_b vs reference");
      }
    }
  }
  (void)rs;
  INFO(mx.first << " " << m1.first << " " << m2.first);
  CHECK(mx.count == 0);
  CHECK(m1.count == 0);
  CHECK(m2.count == 0);
}

}  // namespace

TEMPLATE_TEST_CASE("Narrow fused residual: s rounded once, y the narrow op on the stored s",
                   "[narrow][residual]", BF, HF) {
  std::uint64_t seed = 20000;
  int variant = 0;
  for (const Case& c : all_cases())
    for (Index n : {1, 7, 8, 9, 16, 17, 33, 768, 4097}) {
      const Index rows = multi_block_rows(n);
      REQUIRE(rows > normkit::detail::narrow_block_rows(n));  // several staging blocks
      const std::size_t shift = static_cast<std::size_t>(variant % 3);
      const double alpha = variant % 2 ? 2.5 : 1.0;
      const bool in_place = variant % 4 == 1;
      const int skip = variant % 4;
      ++variant;
      residual_case<TestType, float, Eigen::RowMajor>(c, rows, n, shift, ++seed, alpha, in_place, skip);
      residual_case<TestType, TestType, Eigen::ColMajor>(c, rows, n, shift, ++seed, alpha, !in_place,
                                                         (skip + 2) % 4);
    }
}

TEMPLATE_TEST_CASE("Narrow fused residual: bitwise identical for any number of threads",
                   "[narrow][residual][threads]", BF, HF) {
  Eigen::ThreadPool p1(1), p2(2);
  const Eigen::ThreadPoolDevice d1(&p1, 1), d2(&p2, 2);
  for (const Case& c : all_cases()) {
    const Index rows = 300, n = 129;
    INFO(c.str());
    Res<TestType> pr(rows, n, 1, 20500);
    const auto p = pr.d.template params<float>(c);
    std::vector<Buffer<TestType>> s, y, dx, dr;
    std::vector<Buffer<float>> dg, db;
    auto go = [&](const auto& dev) {
      for (auto* v : {&s, &y, &dx, &dr}) v->emplace_back(pr.d.x.n, 1);
      dg.emplace_back(pr.d.g.n, 1);
      db.emplace_back(pr.d.g.n, 1);
      const auto st = run_forward_residual<TestType>(
          c, xmap<TestType, Eigen::RowMajor>(pr.d.x.data(), rows, n),
          xmap<TestType, Eigen::RowMajor>(pr.e.x.data(), rows, n), p,
          ymap<TestType, Eigen::RowMajor>(s.back().data(), rows, n),
          ymap<TestType, Eigen::RowMajor>(y.back().data(), rows, n), 1.5, dev);
      run_backward_residual<TestType>(
          c, xmap<TestType, Eigen::RowMajor>(pr.e.dy.data(), rows, n),
          xmap<TestType, Eigen::RowMajor>(pr.d.dy.data(), rows, n),
          xmap<TestType, Eigen::RowMajor>(s.back().data(), rows, n), p, st,
          ymap<TestType, Eigen::RowMajor>(dx.back().data(), rows, n),
          ymap<TestType, Eigen::RowMajor>(dr.back().data(), rows, n),
          nt::map<float, 1, Eigen::ColMajor>(dg.back().data(), {n}),
          nt::map<float, 1, Eigen::ColMajor>(db.back().data(), {n}), 1.5, dev);
    };
    go(Eigen::DefaultDevice());
    go(d1);
    go(d2);
    for (std::size_t t = 1; t < 3; ++t) {
      CHECK(same_bytes(s[0], s[t]));
      CHECK(same_bytes(y[0], y[t]));
      CHECK(same_bytes(dx[0], dx[t]));
      CHECK(same_bytes(dr[0], dr[t]));
      CHECK(same_bytes(dg[0], dg[t]));
      CHECK(same_bytes(db[0], db[t]));
    }
  }
}

TEMPLATE_TEST_CASE("Narrow fused residual: NaN or Inf poisons only its own row",
                   "[narrow][residual][numerics]", BF, HF) {
  for (const Case& c : all_cases())
    for (float badv : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      INFO(c.str() << ", " << badv);
      const Index rows = 4, n = 100;
      Res<TestType> pr(rows, n, 1, 20700);
      const auto p = pr.d.template params<TestType>(c);
      Buffer<TestType> s0(pr.d.x.n, 1), y0(pr.d.x.n, 1), s1(pr.d.x.n, 1), y1(pr.d.x.n, 1);
      auto fwd = [&](Buffer<TestType>& s, Buffer<TestType>& y) {
        run_forward_residual<TestType>(c, xmap<TestType, Eigen::RowMajor>(pr.d.x.data(), rows, n),
                                       xmap<TestType, Eigen::RowMajor>(pr.e.x.data(), rows, n), p,
                                       ymap<TestType, Eigen::RowMajor>(s.data(), rows, n),
                                       ymap<TestType, Eigen::RowMajor>(y.data(), rows, n), 1.0);
      };
      fwd(s0, y0);
      pr.e.x[static_cast<std::size_t>(n + 17)] = TestType(badv);
      fwd(s1, y1);
      for (std::size_t i = 0; i < y0.n; ++i) {
        if (i / static_cast<std::size_t>(n) == 1) {
          CHECK(std::isnan(static_cast<float>(y1[i])));
        } else {
          CHECK(bits(y1[i]) == bits(y0[i]));
          CHECK(bits(s1[i]) == bits(s0[i]));
        }
      }
    }
}

TEST_CASE("Narrow fused residual: bad arguments throw the float op's message before writing",
          "[narrow][residual][errors]") {
  const Index rows = 4, n = 16;
  Res<BF> pb(rows, n, 0, 20900);
  Res<float> pf(rows, n, 0, 20900);
  const BF S(7.25f);
  Buffer<BF> s(64, 0), y(80, 0), dx(64, 0), dr(64, 0);
  Buffer<float> dg(16, 0), db(16, 0);
  Buffer<float> fs(64, 0), fy(80, 0), fdx(64, 0), fdr(64, 0), fdg(16, 0), fdb(16, 0);
  using M2 = Map<BF, 2, Eigen::RowMajor>;
  using C2 = CMap<BF, 2, Eigen::RowMajor>;
  using F2 = CMap<float, 2, Eigen::RowMajor>;
  using MF2 = Map<float, 2, Eigen::RowMajor>;
  using MF1 = Map<float, 1, Eigen::ColMajor>;
  Case c;
  const auto p = pb.d.template params<float>(c);
  const auto pff = pf.d.template params<float>(c);
  const auto ln = c.layer_norm<BF>();
  const auto lnf = c.layer_norm<float>();
  const C2 x(pb.d.x.data(), rows, n), r(pb.e.x.data(), rows, n), dy(pb.d.dy.data(), rows, n),
      ds(pb.e.dy.data(), rows, n);
  const F2 xf(pf.d.x.data(), rows, n), rf(pf.e.x.data(), rows, n), dyf(pf.d.dy.data(), rows, n),
      dsf(pf.e.dy.data(), rows, n);
  RowStats<float> st, stf;
  ln.forward_residual(x, r, p, M2(s.data(), rows, n), M2(y.data(), rows, n), st);
  lnf.forward_residual(xf, rf, pff, MF2(fs.data(), rows, n), MF2(fy.data(), rows, n), stf);
  const F2 smf(fs.data(), rows, n);
  // f: the narrow call, g: the float call with the same bad argument.
  auto same_error = [&](auto&& f, auto&& g, const char* word) {
    s.fill(S);
    y.fill(S);
    dx.fill(S);
    dr.fill(S);
    dg.fill(7.25f);
    db.fill(7.25f);
    const std::string got = message_of(f), want = message_of(g);
    INFO(got << " | " << want);
    CHECK(!got.empty());
    CHECK(got == want);
    CHECK(got.find(word) != std::string::npos);
    CHECK(s.all_equal(S));
    CHECK(y.all_equal(S));
    CHECK(dx.all_equal(S));
    CHECK(dr.all_equal(S));
    CHECK(dg.all_equal(7.25f));
    CHECK(db.all_equal(7.25f));
  };
  same_error([&] { RowStats<float> t; ln.forward_residual(x, C2(pb.e.x.data(), rows, 8), p, M2(s.data(), rows, n), M2(y.data(), rows, n), t); },
             [&] { RowStats<float> t; lnf.forward_residual(xf, F2(pf.e.x.data(), rows, 8), pff, MF2(fs.data(), rows, n), MF2(fy.data(), rows, n), t); },
             "'r'");
  same_error([&] { RowStats<float> t; ln.forward_residual(x, r, p, M2(s.data(), rows, n), M2(y.data(), rows, 8), t); },
             [&] { RowStats<float> t; lnf.forward_residual(xf, rf, pff, MF2(fs.data(), rows, n), MF2(fy.data(), rows, 8), t); },
             "'y'");
  same_error([&] { RowStats<float> t; ln.forward_residual(x, r, p, M2(y.data() + 8, rows, n), M2(y.data(), rows, n), t); },
             [&] { RowStats<float> t; lnf.forward_residual(xf, rf, pff, MF2(fy.data() + 8, rows, n), MF2(fy.data(), rows, n), t); },
             "overlap");
  same_error([&] { RowStats<float> t; ln.forward_residual(x, r, p, M2(s.data(), rows, n), M2(y.data(), rows, n), t, std::nan("")); },
             [&] { RowStats<float> t; lnf.forward_residual(xf, rf, pff, MF2(fs.data(), rows, n), MF2(fy.data(), rows, n), t, std::nan("")); },
             "'alpha'");
  // Backward: s (from forward) is kept apart from the outputs the lambdas fill.
  Buffer<BF> s_keep(64, 0);
  std::copy(s.data(), s.data() + 64, s_keep.data());
  const C2 sk(s_keep.data(), rows, n);
  RowStats<float> short_st = st, short_stf = stf;
  short_st.rstd = Eigen::Tensor<float, 1>(3);
  short_stf.rstd = Eigen::Tensor<float, 1>(3);
  same_error([&] { ln.backward_residual(C2(pb.e.dy.data(), rows, 8), dy, sk, p, st, M2(dx.data(), rows, n), M2(dr.data(), rows, n), MF1(dg.data(), n), MF1(db.data(), n)); },
             [&] { lnf.backward_residual(F2(pf.e.dy.data(), rows, 8), dyf, smf, pff, stf, MF2(fdx.data(), rows, n), MF2(fdr.data(), rows, n), MF1(fdg.data(), n), MF1(fdb.data(), n)); },
             "'ds'");
  same_error([&] { ln.backward_residual(ds, dy, sk, p, short_st, M2(dx.data(), rows, n), M2(dr.data(), rows, n), MF1(dg.data(), n), MF1(db.data(), n)); },
             [&] { lnf.backward_residual(dsf, dyf, smf, pff, short_stf, MF2(fdx.data(), rows, n), MF2(fdr.data(), rows, n), MF1(fdg.data(), n), MF1(fdb.data(), n)); },
             "'saved.rstd'");
  same_error([&] { ln.backward_residual(ds, C2(pb.d.dy.data(), rows, 8), sk, p, st, M2(dx.data(), rows, n), M2(dr.data(), rows, n), MF1(dg.data(), n), MF1(db.data(), n)); },
             [&] { lnf.backward_residual(dsf, F2(pf.d.dy.data(), rows, 8), smf, pff, stf, MF2(fdx.data(), rows, n), MF2(fdr.data(), rows, n), MF1(fdg.data(), n), MF1(fdb.data(), n)); },
             "'dy'");
  same_error([&] { ln.backward_residual(ds, dy, sk, p, st, normkit::skip, M2(dr.data(), rows, n), MF1(dg.data(), 15), MF1(db.data(), n)); },
             [&] { lnf.backward_residual(dsf, dyf, smf, pff, stf, normkit::skip, MF2(fdr.data(), rows, n), MF1(fdg.data(), 15), MF1(fdb.data(), n)); },
             "'dgamma'");
  same_error([&] { ln.backward_residual(ds, dy, sk, p, st, M2(dx.data(), rows, n), M2(dx.data(), rows, n), MF1(dg.data(), n), MF1(db.data(), n)); },
             [&] { lnf.backward_residual(dsf, dyf, smf, pff, stf, MF2(fdx.data(), rows, n), MF2(fdx.data(), rows, n), MF1(fdg.data(), n), MF1(fdb.data(), n)); },
             "'dr'");
}

TEMPLATE_TEST_CASE("Narrow AdaptiveLayerNorm: y and dx the float op's rounded, per sample",
                   "[narrow][adaptive]", BF, HF) {
  std::uint64_t seed = 30000;
  int variant = 0;
  for (Form f : {Form::AdaNorm, Form::Modulated, Form::Elementwise})
    for (Index n : {1, 7, 8, 9, 16, 17, 33, 768, 4097}) {
      // Each sample's rows span a full staging block and part of another, so that a block
      // of the whole tensor would cross the sample boundary.
      const Index block = normkit::detail::narrow_block_rows(n);
      const Index per = block + 3, B = 2;
      REQUIRE(per > block);
      const std::size_t shift = static_cast<std::size_t>(variant % 3);
      const bool in_place = variant % 2 == 1, full = variant % 4 < 2, skip_d2 = variant % 3 == 2;
      ++variant;
      adaptive_case<TestType, float, Eigen::RowMajor>(f, full, n, per, B, shift, ++seed, in_place, skip_d2);
      adaptive_case<TestType, TestType, Eigen::ColMajor>(f, !full, n, per, B, shift, ++seed, !in_place,
                                                         !skip_d2);
    }
}

TEMPLATE_TEST_CASE("Narrow AdaptiveLayerNorm: bitwise identical for any number of threads",
                   "[narrow][adaptive][threads]", BF, HF) {
  Eigen::ThreadPool p1(1), p2(2);
  const Eigen::ThreadPoolDevice d1(&p1, 1), d2(&p2, 2);
  for (Form f : {Form::AdaNorm, Form::Modulated, Form::Elementwise}) {
    INFO(form_name(f));
    const Index n = 129, per = 70, B = 3;
    const AdaData<TestType> d(f, n, per, B, 1, 30500);
    const auto op = ada_op<TestType>(f, true);
    const auto c = d.template cond_in<float, Eigen::RowMajor>();
    const std::array<Index, 3> dims{n, per, B};
    std::vector<Buffer<TestType>> y, dx;
    std::vector<Buffer<float>> g1, g2;
    auto go = [&](const auto& dev) {
      y.emplace_back(d.x.n, 1);
      dx.emplace_back(d.x.n, 1);
      g1.emplace_back(std::max<std::size_t>(d.c1.n, 1), 1);
      g2.emplace_back(std::max<std::size_t>(d.c1.n, 1), 1);
      RowStats<float> st;
      const auto xm = nt::cmap<TestType, 3, Eigen::RowMajor>(d.x.data(), dims);
      op.forward(xm, c, nt::map<TestType, 3, Eigen::RowMajor>(y.back().data(), dims), st, dev);
      auto dxm = nt::map<TestType, 3, Eigen::RowMajor>(dx.back().data(), dims);
      const auto dym = nt::cmap<TestType, 3, Eigen::RowMajor>(d.dy.data(), dims);
      if (f == Form::AdaNorm)
        op.backward(dym, xm, c, st, dxm, normkit::skip, normkit::skip, dev);
      else if (f == Form::Modulated)
        op.backward(dym, xm, c, st, dxm, nt::map<float, 2, Eigen::RowMajor>(g1.back().data(), {n, B}),
                    nt::map<float, 2, Eigen::RowMajor>(g2.back().data(), {n, B}), dev);
      else
        op.backward(dym, xm, c, st, dxm, nt::map<float, 3, Eigen::RowMajor>(g1.back().data(), dims),
                    nt::map<float, 3, Eigen::RowMajor>(g2.back().data(), dims), dev);
    };
    go(Eigen::DefaultDevice());
    go(d1);
    go(d2);
    for (std::size_t t = 1; t < 3; ++t) {
      CHECK(same_bytes(y[0], y[t]));
      CHECK(same_bytes(dx[0], dx[t]));
      CHECK(same_bytes(g1[0], g1[t]));
      CHECK(same_bytes(g2[0], g2[t]));
    }
  }
}

TEMPLATE_TEST_CASE("Narrow AdaptiveLayerNorm: NaN or Inf poisons only its own row",
                   "[narrow][adaptive][numerics]", BF, HF) {
  for (Form f : {Form::AdaNorm, Form::Modulated, Form::Elementwise})
    for (float badv : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      INFO(form_name(f) << ", " << badv);
      const Index n = 100, per = 2, B = 2;
      AdaData<TestType> d(f, n, per, B, 1, 30700);
      const auto op = ada_op<TestType>(f, false);
      const auto c = d.template cond_in<TestType, Eigen::ColMajor>();
      const std::array<Index, 3> dims{n, per, B};
      Buffer<TestType> y0(d.x.n, 1), y1(d.x.n, 1);
      op.forward(nt::cmap<TestType, 3, Eigen::ColMajor>(d.x.data(), dims), c,
                 nt::map<TestType, 3, Eigen::ColMajor>(y0.data(), dims));
      d.x[static_cast<std::size_t>(n + 17)] = TestType(badv);
      op.forward(nt::cmap<TestType, 3, Eigen::ColMajor>(d.x.data(), dims), c,
                 nt::map<TestType, 3, Eigen::ColMajor>(y1.data(), dims));
      for (std::size_t i = 0; i < y0.n; ++i) {
        if (i / static_cast<std::size_t>(n) == 1)
          CHECK(std::isnan(static_cast<float>(y1[i])));
        else
          CHECK(bits(y1[i]) == bits(y0[i]));
      }
    }
}

TEST_CASE("Narrow AdaptiveLayerNorm: bad arguments throw the float op's message before writing",
          "[narrow][adaptive][errors]") {
  const Index n = 16, per = 2, B = 2;
  const AdaData<HF> dm(Form::Modulated, n, per, B, 0, 30900);
  const AdaData<HF> de(Form::Elementwise, n, per, B, 0, 30901);
  const AdaData<float> fm(Form::Modulated, n, per, B, 0, 30900);
  const AdaData<float> fe(Form::Elementwise, n, per, B, 0, 30901);
  const HF S(7.25f);
  Buffer<HF> y(64, 0), dx(64, 0);
  Buffer<float> g1(64, 0), g2(64, 0), fy(64, 0), fdx(64, 0), fg1(64, 0), fg2(64, 0);
  const std::array<Index, 3> dims{n, per, B};
  using H3 = CMap<HF, 3, Eigen::ColMajor>;
  using MH3 = Map<HF, 3, Eigen::ColMajor>;
  using F3 = CMap<float, 3, Eigen::ColMajor>;
  using MF3 = Map<float, 3, Eigen::ColMajor>;
  using F2 = CMap<float, 2, Eigen::ColMajor>;
  using MF2 = Map<float, 2, Eigen::ColMajor>;
  const auto mod = normkit::AdaptiveLayerNorm<HF>::modulated();
  const auto modf = normkit::AdaptiveLayerNorm<float>::modulated();
  const auto ew = normkit::AdaptiveLayerNorm<HF>::elementwise();
  const auto ewf = normkit::AdaptiveLayerNorm<float>::elementwise();
  const auto ada = normkit::AdaptiveLayerNorm<HF>::ada_norm();
  const auto adaf = normkit::AdaptiveLayerNorm<float>::ada_norm();
  const H3 xm(dm.x.data(), n, per, B), dym(dm.dy.data(), n, per, B);
  const F3 xf(fm.x.data(), n, per, B), dyf(fm.dy.data(), n, per, B);
  const auto cm = normkit::affine(F2(dm.c1f.data(), n, B), F2(dm.c2f.data(), n, B));
  const auto cmf = normkit::affine(F2(fm.c1f.data(), n, B), F2(fm.c2f.data(), n, B));
  const auto ce = normkit::affine(F3(de.c1f.data(), dims[0], dims[1], dims[2]), F3(de.c2f.data(), n, per, B));
  const auto cef = normkit::affine(F3(fe.c1f.data(), n, per, B), F3(fe.c2f.data(), n, per, B));
  const RowStats<float> st = mod.forward(xm, cm, MH3(y.data(), n, per, B));
  const RowStats<float> stf = modf.forward(xf, cmf, MF3(fy.data(), n, per, B));
  auto same_error = [&](auto&& f, auto&& g, const char* word) {
    y.fill(S);
    dx.fill(S);
    g1.fill(7.25f);
    g2.fill(7.25f);
    const std::string got = message_of(f), want = message_of(g);
    INFO(got << " | " << want);
    CHECK(!got.empty());
    CHECK(got == want);
    CHECK(got.find(word) != std::string::npos);
    CHECK(y.all_equal(S));
    CHECK(dx.all_equal(S));
    CHECK(g1.all_equal(7.25f));
    CHECK(g2.all_equal(7.25f));
  };
  same_error([&] { mod.forward(xm, normkit::affine(F2(dm.c1f.data(), n, 3), F2(dm.c2f.data(), n, B)), MH3(y.data(), n, per, B)); },
             [&] { modf.forward(xf, normkit::affine(F2(fm.c1f.data(), n, 3), F2(fm.c2f.data(), n, B)), MF3(fy.data(), n, per, B)); },
             "'scale'");
  same_error([&] { mod.forward(xm, cm, MH3(y.data(), n, per, 1)); },
             [&] { modf.forward(xf, cmf, MF3(fy.data(), n, per, 1)); }, "'y'");
  same_error([&] { ew.forward(xm, normkit::affine(F3(de.c1f.data(), n, per, 1), F3(de.c2f.data(), n, per, B)), MH3(y.data(), n, per, B)); },
             [&] { ewf.forward(xf, normkit::affine(F3(fe.c1f.data(), n, per, 1), F3(fe.c2f.data(), n, per, B)), MF3(fy.data(), n, per, B)); },
             "'ada_w'");
  same_error([&] { ada.forward(xm, cm, MH3(y.data(), n, per, B)); },
             [&] { adaf.forward(xf, cmf, MF3(fy.data(), n, per, B)); }, "'cond'");
  same_error([&] { mod.backward(dym, xm, cm, st, MH3(dx.data(), n, per, B), MF2(g1.data(), n, B), MF2(g1.data() + 4, n, B)); },
             [&] { modf.backward(dyf, xf, cmf, stf, MF3(fdx.data(), n, per, B), MF2(fg1.data(), n, B), MF2(fg1.data() + 4, n, B)); },
             "overlap");
  same_error([&] { mod.backward(dym, xm, cm, st, MH3(dx.data(), n, per, B), MF2(g1.data(), n, 3), MF2(g2.data(), n, B)); },
             [&] { modf.backward(dyf, xf, cmf, stf, MF3(fdx.data(), n, per, B), MF2(fg1.data(), n, 3), MF2(fg2.data(), n, B)); },
             "'dscale'");
  RowStats<float> short_st = st, short_stf = stf;
  short_st.mean = Eigen::Tensor<float, 1>(3);
  short_stf.mean = Eigen::Tensor<float, 1>(3);
  same_error([&] { mod.backward(dym, xm, cm, short_st, MH3(dx.data(), n, per, B), MF2(g1.data(), n, B), MF2(g2.data(), n, B)); },
             [&] { modf.backward(dyf, xf, cmf, short_stf, MF3(fdx.data(), n, per, B), MF2(fg1.data(), n, B), MF2(fg2.data(), n, B)); },
             "'saved.mean'");
  same_error([&] { ew.backward(dym, xm, ce, st, MH3(dx.data(), n, per, B), MF3(g1.data(), n, per, 1), normkit::skip); },
             [&] { ewf.backward(dyf, xf, cef, stf, MF3(fdx.data(), n, per, B), MF3(fg1.data(), n, per, 1), normkit::skip); },
             "'dada_w'");
  same_error([&] { ada.backward(dym, xm, {}, st, MH3(dx.data(), n, per, B), MH3(dx.data(), n, per, B), normkit::skip); },
             [&] { adaf.backward(dyf, xf, {}, stf, MF3(fdx.data(), n, per, B), MF3(fdx.data(), n, per, B), normkit::skip); },
             "'dcond1'");
}
