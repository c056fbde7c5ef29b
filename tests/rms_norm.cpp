// RMSNorm: forward and backward against the long double reference, finite differences,
// every layout, rank and alignment, the scalar twin, threads, eps placement, Gemma's
// (1 + w) weight, the hard numerics of SPEC.md, and every error case.
#include "row_norm_checks.hpp"

using normkit::EpsPlacement;
using normkit::RmsWeight;
using nt::Buffer;
using nt::CMap;
using nt::Index;
using nt::RMS;
using Scalar = normkit::detail::simd::scalar::Isa;

namespace {
const RmsWeight kWeights[] = {RmsWeight::Scale, RmsWeight::OnePlusScale, RmsWeight::None};
const EpsPlacement kPlacements[] = {EpsPlacement::Inside, EpsPlacement::Outside};
}  // namespace

TEMPLATE_TEST_CASE("RMSNorm: sizes around every vector width, both layouts, misaligned",
                   "[rms_norm]", float, double) {
  for (auto w : kWeights)
    for (auto pl : kPlacements) {
      INFO("weight " << static_cast<int>(w) << ", eps placement " << static_cast<int>(pl));
      nt::sweep(RMS<TestType>(1, 1e-6, w, pl), 1000);
    }
}

TEMPLATE_TEST_CASE("RMSNorm: ranks 1 to 4, one and two normalized dims, in place", "[rms_norm]",
                   float, double) {
  nt::shapes(RMS<TestType>(1, 1e-6, RmsWeight::Scale), RMS<TestType>(2, 1e-6, RmsWeight::Scale),
             1100);
  nt::shapes(RMS<TestType>(1, 0.0, RmsWeight::OnePlusScale),
             RMS<TestType>(2, 1e-3, RmsWeight::None, EpsPlacement::Outside), 1200);
  nt::layouts_agree(RMS<TestType>(1, 1e-6, RmsWeight::Scale), 1300);
}

TEMPLATE_TEST_CASE("RMSNorm: the compiled backend matches its scalar twin", "[rms_norm][simd]",
                   float, double) {
  INFO("backend " << normkit::active_isa());
  for (auto w : kWeights)
    for (auto pl : kPlacements)
      nt::twin(RMS<TestType>(1, 1e-6, w, pl), RMS<TestType, Scalar>(1, 1e-6, w, pl), 1400);
}

TEMPLATE_TEST_CASE("RMSNorm: bitwise identical for any number of threads", "[rms_norm][threads]",
                   float, double) {
  nt::threads_bitwise(RMS<TestType>(1, 1e-6, RmsWeight::Scale), 37, 129, 1500);
  nt::threads_bitwise(RMS<TestType>(1, 1e-6, RmsWeight::OnePlusScale), 300, 768, 1501);
  // Streamed: backward's rows one at a time (row_norm.hpp backward_lone_rows).
  nt::threads_bitwise(RMS<TestType>(1, 1e-6, RmsWeight::Scale), nt::streamed_rows<TestType>(768),
                      768, 1502);
}

TEMPLATE_TEST_CASE("RMSNorm: many rows give the bits of each row alone, special rows too",
                   "[rms_norm][pairs]", float, double) {
  std::uint64_t seed = 720;
  for (Index n : {1, 16, 33, 512, 768, 1536, 2048, 4097})
    for (auto w : {RmsWeight::Scale, RmsWeight::None})
      nt::rows_alone_agree(RMS<TestType>(1, 0.0, w, EpsPlacement::Inside), n, ++seed);
}

// As LayerNorm's: streamed float rows in the skewed order (row_norm.hpp skew_rows).
TEST_CASE("RMSNorm: streamed rows in the skewed order give the bits of each row alone",
          "[rms_norm][stream]") {
  std::uint64_t seed = 760;
  for (Index n : {64, 768, 1024, 2048})
    for (auto w : {RmsWeight::Scale, RmsWeight::None})
      nt::rows_alone_agree(RMS<float>(1, 0.0, w, EpsPlacement::Inside), n, ++seed,
                           nt::streamed_rows<float>(n));
}

TEMPLATE_TEST_CASE("RMSNorm: backward's bits do not depend on dx's alignment",
                   "[rms_norm][stream]", float, double) {
  nt::dx_alignment_bitwise(RMS<TestType>(1, 1e-6, RmsWeight::Scale), 1515);
  nt::dx_alignment_bitwise(RMS<TestType>(1, 1e-6, RmsWeight::OnePlusScale), 1518);
}

TEMPLATE_TEST_CASE("RMSNorm: outputs of 8 MiB and more are streamed, rows of any length",
                   "[rms_norm][stream]", float, double) {
  nt::streamed(RMS<TestType>(1, 1e-6, RmsWeight::Scale), 1001, 1, 1510);
  nt::streamed(RMS<TestType>(1, 1e-6, RmsWeight::OnePlusScale, EpsPlacement::Outside), 1000, 0, 1511);
  nt::streamed(RMS<TestType>(1, 1e-6, RmsWeight::Scale), 1024, 0, 1512);
}

TEST_CASE("RMSNorm: backward against central finite differences in double", "[rms_norm][fd]") {
  for (Index n : {1, 2, 7, 16, 33})
    for (auto w : kWeights)
      for (auto pl : kPlacements) {
        INFO("n = " << n << ", weight " << static_cast<int>(w) << ", placement "
                    << static_cast<int>(pl));
        // eps = 0.1 makes the placement matter at unit scale.
        nt::finite_differences(RMS<double>(1, 0.1, w, pl), 3, n, 1600 + static_cast<std::uint64_t>(n));
      }
}

TEMPLATE_TEST_CASE("RMSNorm: RMSNorm(a x) = RMSNorm(x) with eps = 0", "[rms_norm][invariant]", float,
                   double) {
  // Scaling by a power of two is exact, so the outputs must be bitwise equal; scaling by
  // 3 rounds x once (eps_T/2 relative), which moves y by at most that plus the forward
  // rounding: 8 eps_T |y|.
  const Index n = 300;
  Buffer<TestType> x(static_cast<std::size_t>(n), 0), x2(x.n, 0), x3(x.n, 0), y(x.n, 0),
      y2(x.n, 0), y3(x.n, 0);
  nt::fill_normal(x.data(), x.n, 3);
  for (std::size_t i = 0; i < x.n; ++i) {
    x2[i] = x[i] * TestType(1024);
    x3[i] = x[i] * TestType(3);
  }
  normkit::RMSNorm<TestType> rms(1, 0.0, RmsWeight::None);
  auto run = [&](Buffer<TestType>& in, Buffer<TestType>& out) {
    rms.forward(CMap<TestType, 1, Eigen::ColMajor>(in.data(), n), {},
                nt::Map<TestType, 1, Eigen::ColMajor>(out.data(), n));
  };
  run(x, y);
  run(x2, y2);
  run(x3, y3);
  CHECK(std::memcmp(y.data(), y2.data(), y.n * sizeof(TestType)) == 0);
  for (std::size_t i = 0; i < y.n; ++i)
    CHECK(std::fabs(y3[i] - y[i]) <= 8 * nt::eps_of<TestType>() * std::fabs(y[i]));
}

TEMPLATE_TEST_CASE("RMSNorm: |x| ~ 1e20 and ~ 1e-25 give finite, correct results",
                   "[rms_norm][numerics]", float, double) {
  std::vector<double> scales{1e20, 1e-25, 3e37};
  if (std::is_same<TestType, double>::value) scales = {1e20, 1e-25, 1e200, 1e-200, 1e300, 1e-310};
  for (double sc : scales)
    for (double eps : {1e-6, 0.0})
      for (auto pl : kPlacements) {
        if (sc < 1e-3 && eps > 0) continue;  // eps would swamp mean(x^2)
        INFO("scale " << sc << ", eps " << eps << ", placement " << static_cast<int>(pl));
        const Index n = 100;
        nt::Problem<TestType> pr({n, 3}, 1, 0, 13, 0.0, sc);
        Buffer<TestType> y(pr.x.n, 0), dx(pr.x.n, 0), dg(pr.gamma.n, 0);
        const CMap<TestType, 1, Eigen::ColMajor> g(pr.gamma.data(), n);
        const RMS<TestType> o(1, eps, RmsWeight::Scale, pl);
        auto x = CMap<TestType, 2, Eigen::RowMajor>(pr.x.data(), 3, n);
        auto s = o.forward(x, normkit::affine(g), nt::Map<TestType, 2, Eigen::RowMajor>(y.data(), 3, n));
        CHECK(std::all_of(y.data(), y.data() + y.n, [](TestType v) { return std::isfinite(v); }));
        nt::compare_forward(o, pr, pr.x.data(), y.data(), s, "extreme magnitude");
        // Past 1/DBL_MAX with eps = 0, rstd itself is not representable: forward is
        // right (from the scaled statistics) but the saved rstd is +inf and backward is
        // documented to give NaN for such rows.
        if (!std::isfinite(s.rstd(0))) {
          CHECK(std::isinf(s.rstd(0)));
          continue;
        }
        o.backward(CMap<TestType, 2, Eigen::RowMajor>(pr.dy.data(), 3, n), x, normkit::affine(g), s,
                   nt::Map<TestType, 2, Eigen::RowMajor>(dx.data(), 3, n),
                   nt::Map<TestType, 1, Eigen::ColMajor>(dg.data(), n), normkit::skip);
        nt::compare_backward(o, pr, dx.data(), dg.data(), nullptr, "extreme magnitude backward");
      }
}

TEMPLATE_TEST_CASE("RMSNorm: NaN or Inf poisons only its own row", "[rms_norm][numerics]", float,
                   double) {
  const Index n = 67, rows = 4;
  for (TestType bad : {std::numeric_limits<TestType>::quiet_NaN(),
                       std::numeric_limits<TestType>::infinity()})
    for (Index pos : {0, 40}) {
      nt::Problem<TestType> pr({n, rows}, 1, 0, 9);
      Buffer<TestType> y0(pr.x.n, 0), y1(pr.x.n, 0);
      const CMap<TestType, 1, Eigen::ColMajor> g(pr.gamma.data(), n);
      normkit::RMSNorm<TestType> rms;
      rms.forward(CMap<TestType, 2, Eigen::RowMajor>(pr.x.data(), rows, n), normkit::affine(g),
                  nt::Map<TestType, 2, Eigen::RowMajor>(y0.data(), rows, n));
      pr.x[static_cast<std::size_t>(n + pos)] = bad;
      rms.forward(CMap<TestType, 2, Eigen::RowMajor>(pr.x.data(), rows, n), normkit::affine(g),
                  nt::Map<TestType, 2, Eigen::RowMajor>(y1.data(), rows, n));
      for (Index r = 0; r < rows; ++r)
        for (Index i = 0; i < n; ++i) {
          const auto j = static_cast<std::size_t>(r * n + i);
          if (r == 1)
            CHECK(std::isnan(y1[j]));
          else
            CHECK(std::memcmp(&y0[j], &y1[j], sizeof(TestType)) == 0);
        }
    }
}

TEMPLATE_TEST_CASE("RMSNorm: a zero row gives zeros, not NaN", "[rms_norm][numerics]", float,
                   double) {
  for (double eps : {1e-6, 0.0}) {
    Buffer<TestType> x(33, 1), y(33, 0), g(33, 0);
    x.fill(0);
    g.fill(2);
    normkit::RMSNorm<TestType> rms(1, eps);
    rms.forward(CMap<TestType, 1, Eigen::ColMajor>(x.data(), 33),
                normkit::affine(CMap<TestType, 1, Eigen::ColMajor>(g.data(), 33)),
                nt::Map<TestType, 1, Eigen::ColMajor>(y.data(), 33));
    CHECK(y.all_equal(0));
  }
}

TEST_CASE("RMSNorm: bad arguments throw before writing", "[rms_norm][errors]") {
  const float S = -3.5f;
  Buffer<float> x(64, 0), y(64, 0), g(16, 0), dx(64, 0), dg(16, 0);
  nt::fill_normal(x.data(), x.n, 1);
  g.fill(1);
  y.fill(S);
  using M2 = nt::Map<float, 2, Eigen::RowMajor>;
  using C2 = CMap<float, 2, Eigen::RowMajor>;
  using C1 = CMap<float, 1, Eigen::ColMajor>;
  using M1 = nt::Map<float, 1, Eigen::ColMajor>;
  normkit::RMSNorm<float> rms;
  const C2 xm(x.data(), 4, 16);
  CHECK_THROWS_WITH(normkit::RMSNorm<float>(1, -1.0), Catch::Contains("RMSNorm::RMSNorm") &&
                                                          Catch::Contains("'eps'"));
  CHECK_THROWS_WITH(rms.forward(xm, normkit::affine(C1(g.data(), 16), C1(g.data(), 16)), M2(y.data(), 4, 16)),
                    Catch::Contains("RMSNorm::forward") && Catch::Contains("'params'"));
  CHECK_THROWS_WITH(rms.forward(xm, normkit::affine(C1(g.data(), 8)), M2(y.data(), 4, 16)),
                    Catch::Contains("'gamma'") && Catch::Contains("[8]"));
  CHECK_THROWS_WITH(rms.forward(xm, normkit::affine(C1(g.data(), 16)), M2(y.data(), 16, 4)),
                    Catch::Contains("'y'"));
  CHECK(y.all_equal(S));
  auto st = rms.forward(xm, normkit::affine(C1(g.data(), 16)), M2(y.data(), 4, 16));
  dx.fill(S);
  dg.fill(S);
  CHECK_THROWS_WITH(rms.backward(C2(x.data(), 4, 16), xm, normkit::affine(C1(g.data(), 16)), st,
                                 M2(dx.data(), 4, 16), M1(dg.data(), 4)),
                    Catch::Contains("RMSNorm::backward") && Catch::Contains("'dgamma'"));
  CHECK_THROWS_WITH(normkit::RMSNorm<float>(1, 1e-6, RmsWeight::None)
                        .backward(C2(x.data(), 4, 16), xm, {}, st, M2(dx.data(), 4, 16), M1(dg.data(), 16)),
                    Catch::Contains("'dgamma'") && Catch::Contains("no gamma"));
  CHECK(dx.all_equal(S));
  CHECK(dg.all_equal(S));
}
