// The row kernels of the compiled backend against their scalar twins, on raw pointers,
// on lengths around the vector width {1, 3, 7, 15, 16, 17, N-1, N, N+1, 3N, 8N+2} and on
// pointers misaligned by one element. Streaming stores must give the same bits as
// ordinary stores.
#include <cstdlib>
#include <string>

#include "test_util.hpp"

namespace k = normkit::detail::kernels;
using Scalar = normkit::detail::simd::scalar::Isa;
using normkit::detail::ScaleKind;
using nt::Buffer;
using nt::Index;

namespace {

// The test cases run the backend the ops run (simd::visit: with runtime dispatch the one
// active in this process, chosen by NORMKIT_ISA; a wider one may not run on this CPU),
// passing it to the cases below as Best.
template <class Best, class T>
std::vector<Index> lengths() {
  const auto N = static_cast<Index>(Best::template Pack<T>::W);
  std::vector<Index> v{1, 3, 7, 15, 16, 17, N - 1, N, N + 1, 3 * N, 8 * N + 2, 1000};
  v.erase(std::remove(v.begin(), v.end(), Index{0}), v.end());
  return v;
}

// Two double sums of the same n terms in different orders differ by at most
// 2 n eps_d sum|terms|.
double sum_tol(Index n, double sum_abs) {
  return 2 * static_cast<double>(n) * DBL_EPSILON * sum_abs;
}

}  // namespace

TEMPLATE_TEST_CASE("simd: reductions match the scalar twin", "[simd]", float, double) {
  using T = TestType;
  normkit::detail::simd::visit<normkit::detail::simd::Best>([](auto isa) {
    using Best = decltype(isa);
    INFO("backend " << Best::name << ", " << Best::template Pack<T>::W << " lanes");
    for (Index n : lengths<Best, T>())
      for (std::size_t shift : {0, 1}) {
        INFO("n = " << n << ", shift = " << shift);
        Buffer<T> x(static_cast<std::size_t>(n), shift);
        nt::fill_normal(x.data(), x.n, static_cast<std::uint64_t>(n), 3.0, 2.0);
        double sa = 0, sa2 = 0;
        const double shift_v = 2.75;
        for (std::size_t i = 0; i < x.n; ++i) {
          sa += std::fabs(static_cast<double>(x[i]));
          sa2 += (static_cast<double>(x[i]) - shift_v) * (static_cast<double>(x[i]) - shift_v);
        }
        for (double scale : {1.0, 0x1p-70}) {
          double a = 0;
          Best::run([&] { a = k::sum<Best>(x.data(), n, scale, shift_v * scale); });
          const double b = k::sum<Scalar>(x.data(), n, scale, shift_v * scale);
          CHECK(std::fabs(a - b) <= sum_tol(n, (sa + shift_v * static_cast<double>(n)) * scale));
          double q1 = 0;
          Best::run([&] { q1 = k::sum_squares<Best>(x.data(), n, scale); });
          const double q2 = k::sum_squares<Scalar>(x.data(), n, scale);
          CHECK(std::fabs(q1 - q2) <= sum_tol(n, q2));
          double s1, s2, t1, t2;
          Best::run([&] { k::shifted_sums<Best>(x.data(), n, scale, shift_v * scale, s1, s2); });
          k::shifted_sums<Scalar>(x.data(), n, scale, shift_v * scale, t1, t2);
          CHECK(std::fabs(s1 - t1) <= sum_tol(n, (sa + shift_v * static_cast<double>(n)) * scale));
          CHECK(std::fabs(s2 - t2) <= sum_tol(n, sa2 * scale * scale));
        }
      }
  });
}

namespace {

template <class Best, class T, bool C, ScaleKind S, bool B>
void normalize_case(Index n, std::size_t shift) {
  Buffer<T> x(static_cast<std::size_t>(n), shift), g(x.n, shift), b(x.n, shift), y1(x.n, shift),
      y2(x.n, 0), y3(x.n, shift + 1);
  nt::fill_normal(x.data(), x.n, 1, 1.0, 2.0);
  nt::fill_normal(g.data(), g.n, 2, 1.0, 0.5);
  nt::fill_normal(b.data(), b.n, 3);
  const k::RowAffine<T> r{T(0.75), T(1e-3), T(0.625)};
  Best::run([&] {
    k::normalize<Best, T, C, S, B, false>(x.data(), y1.data(), n, r, g.data(), b.data());
  });
  k::normalize<Scalar, T, C, S, B, false>(x.data(), y2.data(), n, r, g.data(), b.data());
  Best::run(
      [&] { k::normalize<Best, T, C, S, B, true>(x.data(), y3.data(), n, r, g.data(), b.data()); });
  nt::Mismatch m, ms;
  for (std::size_t i = 0; i < x.n; ++i) {
    // Best and the twin may differ by the compiler's contraction of xhat * gamma + beta
    // (one rounding of the product, eps_T |xhat * gamma|, plus one of the sum) and of the
    // centring (eps_T |x - mean| rstd each).
    const double xh = std::fabs((static_cast<double>(x[i]) - (C ? 0.751 : 0.0)) * 0.625);
    const double sc = S == ScaleKind::None ? 1.0 : std::fabs(static_cast<double>(g[i])) + 1.0;
    m.check(static_cast<double>(y1[i]), static_cast<double>(y2[i]),
            4 * nt::eps_of<T>() * (xh * sc + std::fabs(static_cast<double>(b[i]))), i, "y");
    // A misaligned row peels a scalar head before its streamed body: same tolerance.
    ms.check(static_cast<double>(y3[i]), static_cast<double>(y2[i]),
             4 * nt::eps_of<T>() * (xh * sc + std::fabs(static_cast<double>(b[i]))), i,
             "streamed y");
  }
  INFO(m.first << ms.first);
  CHECK(m.count == 0);
  CHECK(ms.count == 0);
}

template <class Best, class T, bool C, ScaleKind S, bool Dx, bool Dg, bool Db, int R>
void backward_rows_case(Index n, std::size_t shift) {
  // R rows in one buffer, row stride n (as the op lays them out), misaligned by shift.
  const auto N = static_cast<std::size_t>(n) * R;
  Buffer<T> x(N, shift), g(static_cast<std::size_t>(n), shift), dy(N, 0), dx1(N, shift),
      dx2(N, shift), dx3(N, shift);
  nt::fill_normal(x.data(), x.n, 14, 1.0, 2.0);
  nt::fill_normal(g.data(), g.n, 15, 1.0, 0.5);
  nt::fill_normal(dy.data(), dy.n, 16);
  auto args = [&](T* dx) {
    k::RowsArgs<T, R> q;
    for (int r = 0; r < R; ++r) {
      q.dy[r] = dy.data() + r * n;
      q.x[r] = x.data() + r * n;
      q.dx[r] = dx + r * n;
      q.ra[r] = {T(0.75), T(1e-3), T(0.625 + 0.125 * r)};
      q.a[r] = T(0.125 * (r + 1));
      q.b[r] = T(-0.375 + 0.25 * r);
    }
    return q;
  };
  std::vector<double> acc1(2 * g.n, 0.5), acc2(2 * g.n, 0.5), acc3(2 * g.n, 0.5);
  Best::run([&] {
    k::backward_rows<Best, T, R, C, S, Dx, Dg, Db, false>(args(dx1.data()), g.data(), n,
                                                          acc1.data(), acc1.data() + g.n);
  });
  k::backward_rows<Scalar, T, R, C, S, Dx, Dg, Db, false>(args(dx2.data()), g.data(), n,
                                                          acc2.data(), acc2.data() + g.n);
  // Streaming four rows in step needs a shared alignment: only when rows are whole
  // vectors long (the op falls back to ordinary stores otherwise).
  const bool can_stream = R == 1 || (n * static_cast<Index>(sizeof(T))) % 64 == 0;
  if (can_stream)
    Best::run([&] {
      k::backward_rows<Best, T, R, C, S, Dx, Dg, Db, true>(args(dx3.data()), g.data(), n,
                                                           acc3.data(), acc3.data() + g.n);
    });
  nt::Mismatch m;
  for (std::size_t j = 0; j < N && Dx; ++j) {
    const std::size_t i = j % g.n, r = j / g.n;
    const double gi =
        std::fabs(static_cast<double>(dy[j])) * (std::fabs(static_cast<double>(g[i])) + 1);
    const double rstd = 0.625 + 0.125 * static_cast<double>(r);
    const double xh = (std::fabs(static_cast<double>(x[j])) + 1) * rstd;
    // Best fuses (g - a) - xhat b into one fma and may fuse the centring: a few
    // roundings of T of each term.
    m.check(static_cast<double>(dx1[j]), static_cast<double>(dx2[j]),
            rstd * 6 * nt::eps_of<T>() * (gi + 0.5 + xh * 0.5), j, "dx");
    // A misaligned row peels a scalar head before its streamed body: same tolerance.
    if (can_stream)
      m.check(static_cast<double>(dx3[j]), static_cast<double>(dx2[j]),
              rstd * 6 * nt::eps_of<T>() * (gi + 0.5 + xh * 0.5), j, "streamed dx");
  }
  for (std::size_t j = 0; j < 2 * g.n; ++j) {
    // Per element: R products dy xhat (xhat differs by the centring fma: 2 eps_T) summed
    // pairwise in T in the same order by both: 4 eps_T of sum_r |dy| (|x| + 1) rstd.
    double bound = 0;
    for (int r = 0; r < R; ++r) {
      const std::size_t e = static_cast<std::size_t>(r) * g.n + j % g.n;
      bound += std::fabs(static_cast<double>(dy[e])) * (std::fabs(static_cast<double>(x[e])) + 1);
    }
    m.check(acc1[j], acc2[j], 4 * nt::eps_of<T>() * bound + 4 * DBL_EPSILON, j, "param acc");
    if (can_stream)
      m.check(acc3[j], acc2[j], 4 * nt::eps_of<T>() * bound + 4 * DBL_EPSILON, j,
              "param acc (streamed dx)");
  }
  INFO("R = " << R << ": " << m.first);
  CHECK(m.count == 0);
}

template <class Best, class T, bool C, ScaleKind S, bool Dx, bool Dg, bool Db>
void backward_case(Index n, std::size_t shift) {
  Buffer<T> x(static_cast<std::size_t>(n), shift), g(x.n, shift), dy(x.n, 0), dx1(x.n, shift),
      dx2(x.n, 0);
  nt::fill_normal(x.data(), x.n, 4, 1.0, 2.0);
  nt::fill_normal(g.data(), g.n, 5, 1.0, 0.5);
  nt::fill_normal(dy.data(), dy.n, 6);
  const k::RowAffine<T> r{T(0.75), T(1e-3), T(0.625)};
  double sg1, sgx1, sg2, sgx2;
  Best::run(
      [&] { k::backward_sums<Best, T, C, S>(dy.data(), x.data(), g.data(), n, r, sg1, sgx1); });
  k::backward_sums<Scalar, T, C, S>(dy.data(), x.data(), g.data(), n, r, sg2, sgx2);
  double ag = 0, agx = 0;
  for (std::size_t i = 0; i < x.n; ++i) {
    const double gi =
        std::fabs(static_cast<double>(dy[i])) * (std::fabs(static_cast<double>(g[i])) + 1);
    ag += gi;
    agx += gi * std::fabs(static_cast<double>(x[i]) + 1) * 0.625;
  }
  // Each term is one or two roundings of T (fma or not), then n double additions.
  CHECK(std::fabs(sg1 - sg2) <= (2 * nt::eps_of<T>() + sum_tol(n, 1.0)) * ag);
  CHECK(std::fabs(sgx1 - sgx2) <= (4 * nt::eps_of<T>() + sum_tol(n, 1.0)) * agx);

  backward_rows_case<Best, T, C, S, Dx, Dg, Db, 1>(n, shift);
  backward_rows_case<Best, T, C, S, Dx, Dg, Db, 4>(n, shift);
}

}  // namespace

TEMPLATE_TEST_CASE("simd: element-wise passes match the scalar twin", "[simd]", float, double) {
  using T = TestType;
  normkit::detail::simd::visit<normkit::detail::simd::Best>([](auto isa) {
    using Best = decltype(isa);
    INFO("backend " << Best::name);
    for (Index n : lengths<Best, T>())
      for (std::size_t shift : {0, 1}) {
        INFO("n = " << n << ", shift = " << shift);
        normalize_case<Best, T, true, ScaleKind::Gamma, true>(n, shift);
        normalize_case<Best, T, true, ScaleKind::Gamma, false>(n, shift);
        normalize_case<Best, T, true, ScaleKind::None, true>(n, shift);
        normalize_case<Best, T, true, ScaleKind::None, false>(n, shift);
        normalize_case<Best, T, false, ScaleKind::Gamma, false>(n, shift);
        normalize_case<Best, T, false, ScaleKind::OnePlusGamma, false>(n, shift);
        normalize_case<Best, T, false, ScaleKind::None, false>(n, shift);
        backward_case<Best, T, true, ScaleKind::Gamma, true, true, true>(n, shift);
        backward_case<Best, T, true, ScaleKind::Gamma, true, false, false>(n, shift);
        backward_case<Best, T, true, ScaleKind::Gamma, false, true, true>(n, shift);
        backward_case<Best, T, true, ScaleKind::None, true, false, false>(n, shift);
        backward_case<Best, T, false, ScaleKind::Gamma, true, true, false>(n, shift);
        backward_case<Best, T, false, ScaleKind::OnePlusGamma, true, true, false>(n, shift);
        backward_case<Best, T, false, ScaleKind::None, true, false, false>(n, shift);
      }
  });
}

TEST_CASE("simd: the backend under test is the one this variant was built for", "[simd]") {
  // Guards against a build that silently falls back to scalar: NORMKIT_EXPECT_ISA is set
  // per test variant by tests/CMakeLists.txt.
#if defined(NORMKIT_DISPATCH)
  // Runtime dispatch: ctest runs this variant once per level, naming it in NORMKIT_ISA.
  const char* want = std::getenv("NORMKIT_ISA");
  REQUIRE(want != nullptr);
  CHECK(std::string(normkit::active_isa()) == want);
#elif defined(NORMKIT_EXPECT_ISA)
  CHECK(normkit::detail::simd::Best::level == NORMKIT_EXPECT_ISA);
#endif
  SUCCEED(normkit::active_isa());
}
