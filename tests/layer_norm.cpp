// LayerNorm: forward and backward against the long double reference, finite
// differences, every layout, rank and alignment, the scalar twin, threads, the hard
// numerics of SPEC.md, and every error case.
#include "row_norm_checks.hpp"

using normkit::AffineMode;
using nt::Buffer;
using nt::CMap;
using nt::Index;
using nt::LN;
using Scalar = normkit::detail::simd::scalar::Isa;

TEMPLATE_TEST_CASE("LayerNorm: sizes around every vector width, both layouts, misaligned",
                   "[layer_norm]", float, double) {
  for (auto m : {AffineMode::ScaleShift, AffineMode::Scale, AffineMode::None}) {
    INFO("affine mode " << static_cast<int>(m));
    nt::sweep(LN<TestType>(1, 1e-5, m), 100);
  }
}

TEMPLATE_TEST_CASE("LayerNorm: ranks 1 to 4, one and two normalized dims, in place",
                   "[layer_norm]", float, double) {
  nt::shapes(LN<TestType>(1, 1e-5, AffineMode::ScaleShift),
             LN<TestType>(2, 1e-5, AffineMode::ScaleShift), 200);
  nt::shapes(LN<TestType>(1, 0.0, AffineMode::Scale), LN<TestType>(2, 0.0, AffineMode::None), 300);
  nt::layouts_agree(LN<TestType>(1, 1e-5, AffineMode::ScaleShift), 400);
}

TEMPLATE_TEST_CASE("LayerNorm: the compiled backend matches its scalar twin", "[layer_norm][simd]",
                   float, double) {
  INFO("backend " << normkit::active_isa());
  for (auto m : {AffineMode::ScaleShift, AffineMode::Scale, AffineMode::None})
    nt::twin(LN<TestType>(1, 1e-5, m), LN<TestType, Scalar>(1, 1e-5, m), 500);
}

TEMPLATE_TEST_CASE("LayerNorm: bitwise identical for any number of threads", "[layer_norm][threads]",
                   float, double) {
  nt::threads_bitwise(LN<TestType>(1, 1e-5, AffineMode::ScaleShift), 37, 129, 600);
  nt::threads_bitwise(LN<TestType>(1, 1e-5, AffineMode::Scale), 300, 768, 601);
  // Streamed: backward's rows one at a time (row_norm.hpp backward_lone_rows).
  nt::threads_bitwise(LN<TestType>(1, 1e-5, AffineMode::ScaleShift),
                      nt::streamed_rows<TestType>(768), 768, 602);
}

TEMPLATE_TEST_CASE("LayerNorm: many rows give the bits of each row alone, special rows too",
                   "[layer_norm][pairs]", float, double) {
  std::uint64_t seed = 700;
  for (Index n : {1, 16, 33, 512, 768, 1536, 2048, 4097})
    for (auto mode : {AffineMode::ScaleShift, AffineMode::Scale, AffineMode::None})
      nt::rows_alone_agree(LN<TestType>(1, 0.0, mode), n, ++seed);
}

// Streamed float rows that start on packet boundaries take the skewed order (row_norm.hpp
// skew_rows, where two rows and the parameters fit in L1): the bits of each row alone.
TEST_CASE("LayerNorm: streamed rows in the skewed order give the bits of each row alone",
          "[layer_norm][stream]") {
  std::uint64_t seed = 740;
  for (Index n : {64, 768, 1024, 2048})
    for (auto mode : {AffineMode::ScaleShift, AffineMode::Scale, AffineMode::None})
      nt::rows_alone_agree(LN<float>(1, 0.0, mode), n, ++seed, nt::streamed_rows<float>(n));
}

TEMPLATE_TEST_CASE("LayerNorm: backward's bits do not depend on dx's alignment",
                   "[layer_norm][stream]", float, double) {
  nt::dx_alignment_bitwise(LN<TestType>(1, 1e-5, AffineMode::ScaleShift), 715);
  nt::dx_alignment_bitwise(LN<TestType>(1, 1e-5, AffineMode::Scale), 718);
}

TEMPLATE_TEST_CASE("LayerNorm: outputs of 8 MiB and more are streamed, rows of any length",
                   "[layer_norm][stream]", float, double) {
  nt::streamed(LN<TestType>(1, 1e-5, AffineMode::ScaleShift), 1001, 0, 710);
  nt::streamed(LN<TestType>(1, 1e-5, AffineMode::Scale), 1000, 1, 711);
  nt::streamed(LN<TestType>(1, 1e-5, AffineMode::ScaleShift), 1024, 0, 712);
}

TEST_CASE("LayerNorm: backward against central finite differences in double", "[layer_norm][fd]") {
  for (Index n : {1, 2, 7, 16, 33})
    for (auto m : {AffineMode::ScaleShift, AffineMode::Scale, AffineMode::None}) {
      INFO("n = " << n << ", mode " << static_cast<int>(m));
      nt::finite_differences(LN<double>(1, 1e-5, m), 3, n, 700 + static_cast<std::uint64_t>(n));
    }
}

TEMPLATE_TEST_CASE("LayerNorm: rows have mean 0 and variance 1 when gamma = 1, beta = 0",
                   "[layer_norm][invariant]", float, double) {
  // With eps = 0: mean(y) = 0 and var(y) = 1 up to the forward rounding, 8 eps_T |xhat|
  // per element, so n * 8 eps_T * max|xhat| on the sums.
  const Index n = 768, rows = 4;
  Buffer<TestType> x(static_cast<std::size_t>(n * rows), 0), y(x.n, 0);
  nt::fill_normal(x.data(), x.n, 7, 3.0, 2.0);
  normkit::LayerNorm<TestType> ln(1, 0.0, AffineMode::None);
  ln.forward(CMap<TestType, 2, Eigen::RowMajor>(x.data(), rows, n), {},
             nt::Map<TestType, 2, Eigen::RowMajor>(y.data(), rows, n));
  for (Index r = 0; r < rows; ++r) {
    long double s = 0, s2 = 0, mx = 0;
    for (Index i = 0; i < n; ++i) {
      const long double v = y[static_cast<std::size_t>(r * n + i)];
      s += v;
      s2 += v * v;
      mx = std::max(mx, std::fabs(v));
    }
    const double tol = 8 * nt::eps_of<TestType>() * static_cast<double>(mx);
    CHECK(std::fabs(static_cast<double>(s / n)) <= tol);
    CHECK(std::fabs(static_cast<double>(s2 / n) - 1.0) <= 2 * tol * static_cast<double>(mx));
  }
}

// ---- Hard numerics (SPEC.md "Numerics") --------------------------------------------

TEMPLATE_TEST_CASE("LayerNorm: a constant row gives exactly beta", "[layer_norm][numerics]", float,
                   double) {
  for (double eps : {1e-5, 0.0})
    for (Index n : {1, 17, 768}) {
      INFO("eps = " << eps << ", n = " << n);
      Buffer<TestType> x(static_cast<std::size_t>(n), 1), y(x.n, 0), g(x.n, 0), b(x.n, 0);
      x.fill(static_cast<TestType>(1234.5678));
      nt::fill_normal(g.data(), g.n, 1);
      nt::fill_normal(b.data(), b.n, 2);
      normkit::LayerNorm<TestType> ln(1, eps);
      const CMap<TestType, 1, Eigen::ColMajor> gm(g.data(), n), bm(b.data(), n);
      ln.forward(CMap<TestType, 1, Eigen::ColMajor>(x.data(), n), normkit::affine(gm, bm),
                 nt::Map<TestType, 1, Eigen::ColMajor>(y.data(), n));
      CHECK(std::memcmp(y.data(), b.data(), y.n * sizeof(TestType)) == 0);
    }
}

TEST_CASE("LayerNorm: x = 1e4 + 1e-2 randn(768) in float is within 1e-4 of double",
          "[layer_norm][numerics]") {
  // SPEC.md: within 1e-4 of a double reference from the same float inputs; a float
  // mean alone is off by about 0.1-0.3 here.
  const Index n = 768, rows = 8;
  nt::Problem<float> pr({n, rows}, 1, 1, 42, 1e4, 1e-2);
  Buffer<float> y(pr.x.n, 1), dx(pr.x.n, 1);
  const CMap<float, 1, Eigen::ColMajor> g(pr.gamma.data(), n), b(pr.beta.data(), n);
  normkit::LayerNorm<float> ln;
  auto x = CMap<float, 2, Eigen::RowMajor>(pr.x.data(), rows, n);
  auto s = ln.forward(x, normkit::affine(g, b), nt::Map<float, 2, Eigen::RowMajor>(y.data(), rows, n));
  std::vector<long double> yref;
  const LN<float> o(1, 1e-5, AffineMode::ScaleShift);
  ref::forward(o.rop, pr.x.data(), static_cast<std::size_t>(rows), static_cast<std::size_t>(n),
               pr.gamma.data(), pr.beta.data(), yref);
  double worst = 0;
  for (std::size_t i = 0; i < y.n; ++i)
    worst = std::max(worst, std::fabs(static_cast<double>(y[i]) - static_cast<double>(yref[i])));
  INFO("max |y - y_ref| = " << worst);
  CHECK(worst <= 1e-4);
  nt::compare_forward(o, pr, pr.x.data(), y.data(), s, "large mean");
  // Backward must be as accurate: it rebuilds xhat from mean + mean_lo.
  Buffer<float> dg(static_cast<std::size_t>(n), 0), db(static_cast<std::size_t>(n), 0);
  ln.backward(CMap<float, 2, Eigen::RowMajor>(pr.dy.data(), rows, n), x, normkit::affine(g, b), s,
              nt::Map<float, 2, Eigen::RowMajor>(dx.data(), rows, n),
              nt::Map<float, 1, Eigen::ColMajor>(dg.data(), n),
              nt::Map<float, 1, Eigen::ColMajor>(db.data(), n));
  nt::compare_backward(o, pr, dx.data(), dg.data(), db.data(), "large mean backward");
}

TEST_CASE("LayerNorm: a row whose first elements are outliers takes the exact sums",
          "[layer_norm][numerics]") {
  // The float trees shift by the median of the first 5 elements; with 3 of them at 1e3
  // and the rest N(0, 1), the shift is 16 standard deviations from the mean, where the
  // trees' bound allows var an error of 1e-4 relative. The guard (more than 2 sigma off:
  // untrusted) sends the row to exact double sums: held to the exact bound (no tree
  // term), which the trees would miss a hundredfold.
  const Index n = 768, rows = 3;
  nt::Problem<float> pr({n, rows}, 1, 0, 5, 0.0, 1.0);
  for (Index r = 0; r < rows; ++r)
    for (Index i : {0, 2, 3}) pr.x[static_cast<std::size_t>(r * n + i)] = 1e3f * static_cast<float>(r + 1);
  Buffer<float> y(pr.x.n, 0);
  const CMap<float, 1, Eigen::ColMajor> g(pr.gamma.data(), n), b(pr.beta.data(), n);
  const LN<float> o(1, 1e-5, AffineMode::ScaleShift);
  auto s = o.forward(CMap<float, 2, Eigen::RowMajor>(pr.x.data(), rows, n), normkit::affine(g, b),
                     nt::Map<float, 2, Eigen::RowMajor>(y.data(), rows, n));
  nt::compare_forward(o, pr, pr.x.data(), y.data(), s, "outlier shift sample", false);
}

TEMPLATE_TEST_CASE("LayerNorm: |x| ~ 1e20 and ~ 1e-25 give finite, correct results",
                   "[layer_norm][numerics]", float, double) {
  // float: x^2 overflows (1e40 > 3.4e38) or underflows (1e-50 < 1.4e-45). Double data is
  // pushed to its own limits the same way.
  std::vector<double> scales{1e20, 1e-25};
  if (std::is_same<TestType, double>::value) scales = {1e20, 1e-25, 1e200, 1e-200, 1e-310};
  for (double sc : scales)
    for (double eps : {1e-5, 0.0}) {
      if (sc < 1e-3 && eps > 0) continue;  // eps would swamp the variance: nothing to test
      INFO("scale " << sc << ", eps " << eps);
      const Index n = 100;
      nt::Problem<TestType> pr({n, 3}, 1, 0, 11, 0.5 * sc, sc);
      Buffer<TestType> y(pr.x.n, 0), dx(pr.x.n, 0), dg(pr.gamma.n, 0), db(pr.gamma.n, 0);
      const CMap<TestType, 1, Eigen::ColMajor> g(pr.gamma.data(), n), b(pr.beta.data(), n);
      const LN<TestType> o(1, eps, AffineMode::ScaleShift);
      auto x = CMap<TestType, 2, Eigen::RowMajor>(pr.x.data(), 3, n);
      auto s = o.forward(x, normkit::affine(g, b), nt::Map<TestType, 2, Eigen::RowMajor>(y.data(), 3, n));
      CHECK(std::all_of(y.data(), y.data() + y.n, [](TestType v) { return std::isfinite(v); }));
      nt::compare_forward(o, pr, pr.x.data(), y.data(), s, "extreme magnitude");
      // Past 1/DBL_MAX with eps = 0, rstd itself is not representable: forward is right
      // (from the scaled statistics) but the saved rstd is +inf and backward is
      // documented to give NaN for such rows.
      if (!std::isfinite(s.rstd(0))) {
        CHECK(std::isinf(s.rstd(0)));
        continue;
      }
      o.backward(CMap<TestType, 2, Eigen::RowMajor>(pr.dy.data(), 3, n), x, normkit::affine(g, b), s,
                 nt::Map<TestType, 2, Eigen::RowMajor>(dx.data(), 3, n),
                 nt::Map<TestType, 1, Eigen::ColMajor>(dg.data(), n),
                 nt::Map<TestType, 1, Eigen::ColMajor>(db.data(), n));
      nt::compare_backward(o, pr, dx.data(), dg.data(), db.data(), "extreme magnitude backward");
    }
}

TEST_CASE("LayerNorm: backward sums whose float trees overflow take the exact sums",
          "[layer_norm][numerics]") {
  // Backward's first pass sums g = dy gamma and g xhat in float trees of 16 packets
  // (kernels::backward_sums), each lane of a tree adding 16 terms. With dy ~ 3e37 (1 +
  // 0.1 randn) and gamma ~ N(1, 0.5), 16 terms of mostly one sign exceed FLT_MAX (3.4e38)
  // while every term, the sums in double and the gradients are finite: the row must be
  // summed again exactly, not poisoned (without that, every dx here was NaN or Inf on
  // AVX2 and AVX-512). Rows of 512: vector backends build full trees.
  const Index n = 512, rows = 3;
  nt::Problem<float> pr({n, rows}, 1, 0, 17);
  nt::fill_normal(pr.dy.data(), pr.dy.n, 18, 1.0, 0.1);
  for (std::size_t i = 0; i < pr.dy.n; ++i) pr.dy[i] *= 3e37f;
  Buffer<float> y(pr.x.n, 0), dx(pr.x.n, 0), dg(pr.gamma.n, 0), db(pr.gamma.n, 0);
  const CMap<float, 1, Eigen::ColMajor> g(pr.gamma.data(), n), b(pr.beta.data(), n);
  const LN<float> o(1, 1e-5, AffineMode::ScaleShift);
  auto x = CMap<float, 2, Eigen::RowMajor>(pr.x.data(), rows, n);
  auto s = o.forward(x, normkit::affine(g, b), nt::Map<float, 2, Eigen::RowMajor>(y.data(), rows, n));
  o.backward(CMap<float, 2, Eigen::RowMajor>(pr.dy.data(), rows, n), x, normkit::affine(g, b), s,
             nt::Map<float, 2, Eigen::RowMajor>(dx.data(), rows, n),
             nt::Map<float, 1, Eigen::ColMajor>(dg.data(), n), nt::Map<float, 1, Eigen::ColMajor>(db.data(), n));
  CHECK(std::all_of(dx.data(), dx.data() + dx.n, [](float v) { return std::isfinite(v); }));
  nt::compare_backward(o, pr, dx.data(), dg.data(), db.data(), "overflowing trees backward");
}

TEMPLATE_TEST_CASE("LayerNorm: NaN or Inf poisons only its own row", "[layer_norm][numerics]",
                   float, double) {
  const Index n = 67, rows = 5;
  for (TestType bad : {std::numeric_limits<TestType>::quiet_NaN(),
                       std::numeric_limits<TestType>::infinity(),
                       -std::numeric_limits<TestType>::infinity()})
    for (Index pos : {0, 33, 66}) {
      INFO("bad " << bad << " at " << pos);
      nt::Problem<TestType> pr({n, rows}, 1, 0, 5);
      Buffer<TestType> y0(pr.x.n, 0), y1(pr.x.n, 0);
      const CMap<TestType, 1, Eigen::ColMajor> g(pr.gamma.data(), n), b(pr.beta.data(), n);
      normkit::LayerNorm<TestType> ln;
      ln.forward(CMap<TestType, 2, Eigen::RowMajor>(pr.x.data(), rows, n), normkit::affine(g, b),
                 nt::Map<TestType, 2, Eigen::RowMajor>(y0.data(), rows, n));
      pr.x[static_cast<std::size_t>(2 * n + pos)] = bad;
      ln.forward(CMap<TestType, 2, Eigen::RowMajor>(pr.x.data(), rows, n), normkit::affine(g, b),
                 nt::Map<TestType, 2, Eigen::RowMajor>(y1.data(), rows, n));
      for (Index r = 0; r < rows; ++r)
        for (Index i = 0; i < n; ++i) {
          const auto j = static_cast<std::size_t>(r * n + i);
          if (r == 2)
            CHECK(std::isnan(y1[j]));
          else
            CHECK(std::memcmp(&y0[j], &y1[j], sizeof(TestType)) == 0);
        }
    }
}

TEMPLATE_TEST_CASE("LayerNorm: zero rows and empty rows", "[layer_norm][edge]", float, double) {
  Buffer<TestType> g(5, 0), b(5, 0), dg(5, 0), db(5, 0);
  g.fill(1);
  b.fill(0);
  dg.fill(9);
  db.fill(9);
  normkit::LayerNorm<TestType> ln;
  Eigen::Tensor<TestType, 2, Eigen::RowMajor> x(0, 5), y(0, 5), dy(0, 5), dx(0, 5);
  const CMap<TestType, 1, Eigen::ColMajor> gm(g.data(), 5), bm(b.data(), 5);
  auto s = ln.forward(x, normkit::affine(gm, bm), y);
  CHECK(s.rstd.size() == 0);
  ln.backward(dy, x, normkit::affine(gm, bm), s, dx, nt::Map<TestType, 1, Eigen::ColMajor>(dg.data(), 5),
              nt::Map<TestType, 1, Eigen::ColMajor>(db.data(), 5));
  CHECK(dg.all_equal(0));
  CHECK(db.all_equal(0));
  // Rows of length 0: nothing to write, statistics undefined (NaN).
  Eigen::Tensor<TestType, 2, Eigen::RowMajor> xe(3, 0), ye(3, 0);
  auto se = normkit::LayerNorm<TestType>(1, 1e-5, AffineMode::None).forward(xe, {}, ye);
  REQUIRE(se.rstd.size() == 3);
  CHECK(std::isnan(se.rstd(0)));
}

// ---- Errors: thrown before any output is written ------------------------------------

namespace {
template <class F>
void expect_error(F&& f, const std::vector<std::string>& words, const Buffer<float>& y,
                  float sentinel) {
  try {
    f();
    FAIL("no exception");
  } catch (const normkit::invalid_argument& e) {
    const std::string w = e.what();
    INFO(w);
    for (const auto& word : words) CHECK(w.find(word) != std::string::npos);
    const std::invalid_argument& base = e;  // derived from std::invalid_argument
    CHECK(std::string(base.what()) == w);
  }
  CHECK(y.all_equal(sentinel));
}
}  // namespace

TEST_CASE("LayerNorm: bad arguments throw before writing", "[layer_norm][errors]") {
  const float S = 7.25f;
  Buffer<float> x(64, 0), y(64, 0), g(16, 0), b(16, 0), dy(64, 0), dx(64, 0), dg(16, 0), db(16, 0);
  nt::fill_normal(x.data(), x.n, 1);
  nt::fill_normal(dy.data(), dy.n, 2);
  g.fill(1);
  b.fill(0);
  auto reset = [&] {
    for (auto* t : {&y, &dx}) t->fill(S);
    for (auto* t : {&dg, &db}) t->fill(S);
  };
  using M2 = nt::Map<float, 2, Eigen::RowMajor>;
  using C2 = CMap<float, 2, Eigen::RowMajor>;
  using C1 = CMap<float, 1, Eigen::ColMajor>;
  using M1 = nt::Map<float, 1, Eigen::ColMajor>;
  normkit::LayerNorm<float> ln;
  const C2 xm(x.data(), 4, 16);
  const auto p = normkit::affine(C1(g.data(), 16), C1(b.data(), 16));

  CHECK_THROWS_AS(normkit::LayerNorm<float>(1, -1e-5), std::invalid_argument);
  CHECK_THROWS_WITH(normkit::LayerNorm<float>(0), Catch::Contains("normalized_dims"));
  CHECK_THROWS_WITH(normkit::LayerNorm<float>(1, std::nan("")), Catch::Contains("eps"));

  reset();
  expect_error([&] { ln.forward(xm, p, M2(y.data(), 4, 15)); },
               {"LayerNorm::forward", "'y'", "expected", "[15, 4]"}, y, S);
  reset();
  expect_error([&] { ln.forward(xm, normkit::affine(C1(g.data(), 15), C1(b.data(), 15)), M2(y.data(), 4, 16)); },
               {"LayerNorm::forward", "'gamma'", "[16]", "[15]"}, y, S);
  reset();
  expect_error([&] { ln.forward(xm, normkit::affine(C1(g.data(), 16), C1(b.data(), 8)), M2(y.data(), 4, 16)); },
               {"'beta'", "[8]"}, y, S);
  reset();
  expect_error([&] { ln.forward(xm, normkit::affine(C1(g.data(), 16)), M2(y.data(), 4, 16)); },
               {"'params'", "gamma and beta", "gamma only"}, y, S);
  reset();
  expect_error([&] { ln.forward(xm, {}, M2(y.data(), 4, 16)); }, {"'params'", "none"}, y, S);
  reset();
  expect_error([&] { normkit::LayerNorm<float>(3).forward(xm, {}, M2(y.data(), 4, 16)); },
               {"'x'", "rank >= 3", "rank 2"}, y, S);
  reset();
  // Output partly overlapping the input.
  expect_error([&] { ln.forward(C2(y.data(), 2, 16), p, M2(y.data() + 8, 2, 16)); },
               {"'y'", "overlap"}, y, S);
  reset();
  expect_error([&] { ln.forward(xm, p, M2(nullptr, 4, 16)); }, {"'y'", "nullptr"}, y, S);

  // Backward.
  reset();
  auto st = ln.forward(xm, p, M2(y.data(), 4, 16));
  y.fill(S);
  const C2 dym(dy.data(), 4, 16);
  auto bwd_err = [&](auto&& f, std::vector<std::string> words) {
    reset();
    expect_error(f, words, dx, S);
    CHECK(dg.all_equal(S));
    CHECK(db.all_equal(S));
  };
  normkit::RowStats<float> short_mean = st;
  short_mean.mean = Eigen::Tensor<float, 1>(3);
  bwd_err([&] { ln.backward(dym, xm, p, short_mean, M2(dx.data(), 4, 16), M1(dg.data(), 16), M1(db.data(), 16)); },
          {"LayerNorm::backward", "'saved.mean'", "4 elements", "got 3"});
  bwd_err([&] { ln.backward(C2(dy.data(), 4, 8), xm, p, st, M2(dx.data(), 4, 16), M1(dg.data(), 16), M1(db.data(), 16)); },
          {"'dy'", "[16, 4]", "[8, 4]"});
  bwd_err([&] { ln.backward(dym, xm, p, st, M2(dx.data(), 2, 16), M1(dg.data(), 16), M1(db.data(), 16)); },
          {"'dx'", "[16, 2]"});
  bwd_err([&] { ln.backward(dym, xm, p, st, M2(dx.data(), 4, 16), M1(dg.data(), 15), M1(db.data(), 16)); },
          {"'dgamma'", "[15]"});
  bwd_err([&] { ln.backward(dym, xm, p, st, M2(dx.data(), 4, 16), M1(dg.data(), 16), M1(db.data(), 3)); },
          {"'dbeta'", "[3]"});
  bwd_err([&] { ln.backward(dym, xm, p, st, M2(dx.data(), 4, 16), M1(dx.data() + 3, 16), normkit::skip); },
          {"'dgamma'", "overlap"});
  bwd_err([&] { normkit::LayerNorm<float>(1, 1e-5, AffineMode::Scale).backward(dym, xm, normkit::affine(C1(g.data(), 16)), st, M2(dx.data(), 4, 16), M1(dg.data(), 16), M1(db.data(), 16)); },
          {"'dbeta'", "normkit::skip"});
  normkit::RowStats<float> bad = st;
  bad.rstd = Eigen::Tensor<float, 1>(3);
  bwd_err([&] { ln.backward(dym, xm, p, bad, M2(dx.data(), 4, 16), M1(dg.data(), 16), M1(db.data(), 16)); },
          {"'saved.rstd'", "4 elements", "got 3"});
}
