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
