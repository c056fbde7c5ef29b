// Narrow storage (Eigen::bfloat16, Eigen::half) for LayerNorm and RMSNorm: the packet
// conversions of every compiled backend against Eigen's scalar ones, bit for bit; forward
// bitwise equal to the float op on the widened inputs, rounded to nearest even (both
// parameter types, both layouts, misaligned, both RMSNorm cast orders), and against the
// long double reference; backward against the float op and the reference; threads
// bitwise; NaN rows; |x| near half's max; bad arguments.
#include <functional>
#include <limits>
#include <utility>

#include "narrow_util.hpp"

using namespace nnarrow;
namespace k = normkit::detail::kernels;

namespace {

// Floats whose rounding to T is hard: zeros, denormals (of float, and of half), the
// smallest normals, ties (the dropped bits exactly half an ulp, the kept lsb odd and
// even) and their neighbours, T's max and what rounds past it, Inf, quiet and signaling
// NaNs of both signs, then random bit patterns.
template <class T>
std::vector<float> hard_floats(std::uint64_t seed) {
  const int drop = std::is_same<T, BF>::value ? 16 : 13;  // mantissa bits dropped
  const std::uint32_t half_ulp = 1u << (drop - 1);
  std::vector<float> v{0.0f, -0.0f, 1.0f, -1.0f, FLT_MIN, -FLT_MIN, FLT_MAX, -FLT_MAX,
                       from_fbits(1), from_fbits(0x80000001u), from_fbits(0x007fffffu),
                       from_fbits(0x807fffffu), from_fbits(0x00400000u), from_fbits(0x00008000u),
                       from_fbits(0x00018000u), from_fbits(0x00007fffu),
                       std::numeric_limits<float>::infinity(),
                       -std::numeric_limits<float>::infinity(),
                       std::numeric_limits<float>::quiet_NaN(),
                       -std::numeric_limits<float>::quiet_NaN(),
                       std::numeric_limits<float>::signaling_NaN(), from_fbits(0x7f800001u),
                       from_fbits(0xff800001u), from_fbits(0x7fffffffu), from_fbits(0x7fc00001u),
                       from_fbits(0x7f7f8000u), from_fbits(0x7f7f7fffu), from_fbits(0x7f7fffffu)};
  // half: max 65504, 65519 (rounds to max), 65520 (the tie, to Inf), its smallest normal
  // 2^-14 and denormals 2^-24 (the smallest), 2^-25 (a tie to 0), 3 2^-25 (a tie to
  // 2^-23), 2^-26.
  for (float f : {65504.0f, 65519.0f, 65520.0f, 65536.0f, 0x1p-14f, 0x1p-24f, 0x1p-25f,
                  3 * 0x1p-25f, 0x1p-26f, 0x1.ffcp-15f, 1e-7f, 300.0f, 1e4f})
    for (float s : {1.0f, -1.0f}) v.push_back(s * f);
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<std::uint32_t> any;
  for (int i = 0; i < 64; ++i) {
    // A normal float in [2^-20, 2^20] with the dropped bits at, below and above the tie.
    const std::uint32_t e = 107u + any(g) % 40u, m = any(g) & 0x7fffffu, s = any(g) & 1u;
    const std::uint32_t kept = (m >> drop) << drop;
    for (std::uint32_t low : {half_ulp, half_ulp - 1, half_ulp + 1})
      v.push_back(from_fbits((s << 31) | (e << 23) | kept | low));
  }
  for (int i = 0; i < 200; ++i) v.push_back(from_fbits(any(g)));
  return v;
}

// Backends compiled here that this CPU runs, as Isa types.
template <class F>
void each_backend(F&& f) {
  f(simd::scalar::Isa{});
#if defined(NORMKIT_ARCH_X86) && NORMKIT_COMPILED_ISA >= NORMKIT_ISA_AVX2
  if (simd::cpu_level() >= NORMKIT_ISA_AVX2) f(simd::avx2::Isa{});
#endif
#if defined(NORMKIT_ARCH_X86) && NORMKIT_COMPILED_ISA >= NORMKIT_ISA_AVX512
  if (simd::cpu_level() >= NORMKIT_ISA_AVX512) f(simd::avx512::Isa{});
#endif
#if defined(NORMKIT_DISPATCH) && NORMKIT_COMPILED_ISA >= NORMKIT_ISA_AVX512
  if (simd::cpu_level() >= NORMKIT_ISA_AVX512BF16) f(simd::avx512bf16::Isa{});
#endif
#if defined(NORMKIT_ARCH_ARM64) && NORMKIT_ISA >= NORMKIT_ISA_NEON
  f(simd::neon::Isa{});
#endif
}

template <class T>
void check_conversions() {
  const std::vector<float> vals = hard_floats<T>(7);
  each_backend([&](auto isa) {
    using Isa = decltype(isa);
    INFO("backend " << Isa::name);
    // Narrowing: lengths around the packet width, misaligned source and destination.
    const std::vector<Index> lens{0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 48, 130,
                                  static_cast<Index>(vals.size())};
    std::size_t bad = 0;
    for (Index len : lens)
      for (std::size_t shift : {0u, 1u, 3u})
        for (std::size_t start : {std::size_t{0}, std::size_t{5}, std::size_t{17}}) {
          const auto n = static_cast<std::size_t>(len);
          Buffer<float> src(n, shift), w(n, shift);
          Buffer<T> dst(n, (shift * 5) % 8), dw(n, (shift * 5) % 8);
          for (std::size_t i = 0; i < n; ++i) {
            src[i] = vals[(start + i) % vals.size()];
            w[i] = vals[(start + 3 * i + 1) % vals.size()];
          }
          Isa::run([&] {
            k::narrow_row<Isa>(src.data(), dst.data(), len);
            k::narrow_row_weighted<Isa>(src.data(), w.data(), dw.data(), len);
          });
          for (std::size_t i = 0; i < n; ++i) {
            if (!same_narrow(dst[i], T(src[i])) && bad++ == 0)
              FAIL_CHECK("narrow " << std::hexfloat << src[i] << ": got 0x" << std::hex
                                   << bits(dst[i]) << ", Eigen 0x" << bits(T(src[i])));
            const float a = static_cast<float>(T(src[i]));
            const T want = T(a * w[i]);
            // NaN * NaN: which operand's NaN (and sign) the product carries depends on the
            // order the compiler puts them in (x86 returns the first): NaN-ness only.
            const bool both_nan = std::isnan(a) && std::isnan(w[i]);
            const bool ok_w = both_nan ? std::isnan(static_cast<float>(dw[i])) : same_narrow(dw[i], want);
            if (!ok_w && bad++ == 0)
              FAIL_CHECK("narrow weighted " << std::hexfloat << src[i] << " * " << w[i]);
          }
        }
    // Widening: every 16-bit pattern, misaligned.
    for (std::size_t shift : {0u, 1u}) {
      Buffer<T> src(65536 + 5, shift);
      Buffer<float> dst(src.n, (shift + 3) % 8);
      for (std::size_t i = 0; i < src.n; ++i) src[i] = from_bits<T>(static_cast<std::uint16_t>(i));
      Isa::run([&] { k::widen_row<Isa>(src.data(), dst.data(), static_cast<Index>(src.n)); });
      for (std::size_t i = 0; i < src.n; ++i) {
        const float want = static_cast<float>(src[i]);
        const bool ok = std::is_same<T, BF>::value ? fbits(dst[i]) == fbits(want)
                                                   : same_float(dst[i], want);
        if (!ok && bad++ == 0) FAIL_CHECK("widen 0x" << std::hex << i);
      }
    }
    CHECK(bad == 0);
  });
}

// Forward: bitwise the float op on the widened data, rounded (for CastThenWeight, the
// float op without weight, rounded, times the float weight, rounded); saved statistics
// bitwise the float op's; and y against the long double reference within the float
// forward's bound (nt::fwd_tol with the float-tree error) plus the final rounding: half
// an ulp of T (eps_T / 2 relative, half T's smallest step absolute), and for
// CastThenWeight also the inner one, eps_T / 2 |xhat w|.
// edit: changes the float parameters (then rounded to T, for both parameter types); an
// edited case skips the reference comparison (its y may overflow or be NaN).
// edit_x: changes x (before it is rounded to T); it too skips the reference comparison.
using EditParams = std::function<void(Buffer<float>& gamma, Buffer<float>& beta)>;
using EditX = std::function<void(Buffer<float>& x)>;
template <class T, class P, int Layout>
void forward_case(const Case& c, Index rows, Index n, std::size_t shift, std::uint64_t seed,
                  double mean = 0.0, double sd = 1.0, const EditParams& edit = {},
                  const EditX& edit_x = {}) {
  INFO(c.str() << ", rows " << rows << ", n " << n << ", shift " << shift << ", params "
               << (std::is_same<P, float>::value ? "float" : "T") << ", layout " << Layout);
  Data<T> d(rows, n, shift, seed, mean, sd);
  if (edit_x) {
    edit_x(d.xf);
    d.sync();
  }
  if (edit) {
    edit(d.gf, d.bf);
    d.sync();
    // Float parameters keep the edited values as they are (a NaN its payload).
    if (std::is_same<P, float>::value) edit(d.gf, d.bf);
  }
  Buffer<T> y(d.x.n, shift);
  Buffer<float> yf(d.x.n, shift);
  const auto st = run_forward<T>(c, xmap<T, Layout>(d.x.data(), rows, n), d.template params<P>(c),
                                 ymap<T, Layout>(y.data(), rows, n));
  const Case cf = float_twin(c);
  normkit::RowStats<float> sf;
  {
    const auto pf = affine_of<float>(cf, d.gf.data(), d.bf.data(), n);
    const auto xm = xmap<float, Layout>(d.xf.data(), rows, n);
    auto ym = ymap<float, Layout>(yf.data(), rows, n);
    if (cf.ln)
      cf.layer_norm<float>().forward(xm, pf, ym, sf);
    else
      cf.rms_norm<float>().forward(xm, pf, ym, sf);
  }
  std::size_t bad = 0;
  for (std::size_t i = 0; i < y.n; ++i) {
    const T want = float_op_rounded<T>(c, yf[i], d.gf.data(), i % static_cast<std::size_t>(n));
    if (!same_narrow(y[i], want) && bad++ == 0)
      FAIL_CHECK("y[" << i << "] = " << static_cast<float>(y[i]) << ", float op rounded "
                      << static_cast<float>(want));
  }
  CHECK(bad == 0);
  auto same_stats = [](const Eigen::Tensor<float, 1>& a, const Eigen::Tensor<float, 1>& b) {
    if (a.size() != b.size()) return false;
    for (Index i = 0; i < a.size(); ++i)
      if (!same_float(a(i), b(i))) return false;
    return true;
  };
  CHECK(same_stats(st.rstd, sf.rstd));
  CHECK(same_stats(st.mean, sf.mean));
  CHECK(same_stats(st.mean_lo, sf.mean_lo));

  if (!edit && !edit_x) check_y_reference(c, d.xf.data(), d.gf.data(), d.bf.data(), y.data(), rows, n);
}

// Backward: dx bitwise the float op's dx on the widened data, rounded; dx against the
// reference no further from it than the float op's dx plus half an ulp of T. dgamma and
// dbeta against the float op's: the narrow op rounds each block's sums to float before
// adding them in double (u = 2^-24 of each block's sum of |terms|, at most u sum_r |term|
// in all), then the total to float and to P (u + eps_P / 2 of |total|); the float op
// rounds once (u |total|) and both add in double in different orders
// (4 rows DBL_EPSILON sum_r |term|). The terms: dy xhat (dgamma), dy (dbeta).
template <class T, class P, int Layout>
void backward_case(const Case& c, Index rows, Index n, std::size_t shift, std::uint64_t seed,
                   double mean = 0.0, double sd = 1.0) {
  INFO(c.str() << ", rows " << rows << ", n " << n << ", shift " << shift << ", params "
               << (std::is_same<P, float>::value ? "float" : "T"));
  Data<T> d(rows, n, shift, seed, mean, sd);
  Buffer<T> y(d.x.n, shift), dx(d.x.n, shift);
  Buffer<P> dg(d.g.n, shift), db(d.g.n, shift);
  Buffer<float> yf(d.x.n, shift), dxf(d.x.n, shift), dgf(d.g.n, shift), dbf(d.g.n, shift);
  const auto p = d.template params<P>(c);
  const auto st = run_forward<T>(c, xmap<T, Layout>(d.x.data(), rows, n), p,
                                 ymap<T, Layout>(y.data(), rows, n));
  run_backward<T>(c, xmap<T, Layout>(d.dy.data(), rows, n), xmap<T, Layout>(d.x.data(), rows, n),
                  p, st, ymap<T, Layout>(dx.data(), rows, n),
                  nt::map<P, 1, Eigen::ColMajor>(dg.data(), {n}),
                  nt::map<P, 1, Eigen::ColMajor>(db.data(), {n}));
  const auto pf = affine_of<float>(c, d.gf.data(), d.bf.data(), n);
  const auto sf = run_forward<float>(c, xmap<float, Layout>(d.xf.data(), rows, n), pf,
                                     ymap<float, Layout>(yf.data(), rows, n));
  run_backward<float>(c, xmap<float, Layout>(d.dyf.data(), rows, n),
                      xmap<float, Layout>(d.xf.data(), rows, n), pf, sf,
                      ymap<float, Layout>(dxf.data(), rows, n),
                      nt::map<float, 1, Eigen::ColMajor>(dgf.data(), {n}),
                      nt::map<float, 1, Eigen::ColMajor>(dbf.data(), {n}));
  const ref::RowNorm rop = c.rop();
  std::vector<nt::LD> dxr, dgr, dbr;
  const auto nn = static_cast<std::size_t>(n), nr = static_cast<std::size_t>(rows);
  ref::backward(rop, d.dyf.data(), d.xf.data(), nr, nn, d.gf.data(), dxr, dgr, dbr);
  const double e = eps_t<T>() / 2;
  std::size_t bad = 0;
  nt::Mismatch mx, mg, mb;
  for (std::size_t i = 0; i < dx.n; ++i) {
    if (!same_narrow(dx[i], T(dxf[i])) && bad++ == 0)
      FAIL_CHECK("dx[" << i << "] = " << static_cast<float>(dx[i]) << ", float op rounded "
                       << static_cast<float>(T(dxf[i])));
    const double want = static_cast<double>(dxr[i]), f = static_cast<double>(dxf[i]);
    mx.check(static_cast<double>(static_cast<float>(dx[i])), want,
             std::fabs(f - want) + e * std::fabs(f) + half_tiny<T>(), i, "dx vs reference");
  }
  CHECK(bad == 0);
  // Sums of |terms| per column, from the reference statistics.
  std::vector<double> sgx(nn, 0.0), sdy(nn, 0.0);
  for (std::size_t r = 0; r < nr; ++r) {
    const auto s = ref::stats(rop, d.xf.data() + r * nn, nn);
    for (std::size_t i = 0; i < nn; ++i) {
      const double xh =
          static_cast<double>((static_cast<nt::LD>(d.xf[r * nn + i]) - s.mean) * s.rstd);
      sgx[i] += std::fabs(static_cast<double>(d.dyf[r * nn + i]) * xh);
      sdy[i] += std::fabs(static_cast<double>(d.dyf[r * nn + i]));
    }
  }
  // P = T: half an ulp of T, relative, and near zero absolute (half's subnormals).
  for (std::size_t i = 0; i < nn; ++i) {
    if (c.has_gamma()) {
      const double f = static_cast<double>(dgf[i]);
      mg.check(static_cast<double>(static_cast<float>(dg[i])), f,
               param_grad_tol<T, P>(rows, sgx[i], f), i, "dgamma vs float op");
      (void)dgr;
    }
    if (c.has_beta()) {
      const double f = static_cast<double>(dbf[i]);
      mb.check(static_cast<double>(static_cast<float>(db[i])), f,
               param_grad_tol<T, P>(rows, sdy[i], f), i, "dbeta vs float op");
    }
  }
  INFO(mx.first << " " << mg.first << " " << mb.first);
  CHECK(mx.count == 0);
  CHECK(mg.count == 0);
  CHECK(mb.count == 0);
}

}  // namespace

TEMPLATE_TEST_CASE("Narrow storage: packet conversions equal Eigen's scalar ones bit for bit",
                   "[narrow][simd]", BF, HF) {
  check_conversions<TestType>();
}

TEMPLATE_TEST_CASE("Narrow storage: forward is the float op on widened data, rounded",
                   "[narrow]", BF, HF) {
  std::uint64_t seed = 9000;
  for (const Case& c : all_cases())
    for (Index n : nt::sweep_sizes())
      for (std::size_t shift : {0u, 1u}) {
        const Index rows = n > 1000 ? 2 : 5;
        forward_case<TestType, float, Eigen::RowMajor>(c, rows, n, shift, ++seed);
        forward_case<TestType, TestType, Eigen::ColMajor>(c, rows, n, shift, ++seed);
      }
}

// A y of NORMKIT_STREAM_MIN_BYTES or more: the fused rows (narrow.hpp) stream it, after a
// scalar head that aligns each row (1023 features, x and y misaligned by one element:
// every row starts at another offset). LayerNorm with gamma and beta, RMSNorm with its
// weight in both orders (the LLaMA order rounds twice before the streamed store).
TEMPLATE_TEST_CASE("Narrow storage: forward with streamed output is the float op, rounded",
                   "[narrow]", BF, HF) {
  constexpr Index n = 1023;
  constexpr Index rows = static_cast<Index>(NORMKIT_STREAM_MIN_BYTES / (n * sizeof(TestType))) + 3;
  static_assert(std::size_t{rows} * n * sizeof(TestType) > NORMKIT_STREAM_MIN_BYTES, "streamed");
  std::uint64_t seed = 9500;
  for (const Case& c : all_cases()) {
    const bool rms_weight = !c.ln && c.weight == RmsWeight::Scale && c.placement != EpsPlacement::Outside;
    if ((c.ln && c.mode == AffineMode::ScaleShift) || rms_weight)
      forward_case<TestType, float, Eigen::RowMajor>(c, rows, n, 1, ++seed);
  }
}

// Streamed rows where the rows the trees cannot give go through the staged path between
// fused ones (narrow.hpp forward_narrow_fused): a constant row (its squares sum to 0), a
// NaN, and for bf16 a row scaled by 1e20 (its squares overflow float); rows on packet
// boundaries (64 and 1024 features, x aligned). Bitwise the float op, rounded.
TEMPLATE_TEST_CASE("Narrow storage: streamed rows with staged rows between them are the float op, rounded",
                   "[narrow][stream]", BF, HF) {
  std::uint64_t seed = 9600;
  for (Index n : {64, 1024}) {
    const Index rows = nt::streamed_rows<TestType>(n);
    const EditX edit_x = [rows, n](Buffer<float>& x) {
      auto at = [&](Index r, Index i) -> float& { return x[static_cast<std::size_t>(r * n + i)]; };
      const bool wide = std::is_same<TestType, BF>::value;
      for (Index i = 0; i < n; ++i) {
        at(1, i) = 0.75f;
        if (wide) at(4, i) *= 1e20f;
        at(rows - 3, i) = -2.5f;
      }
      at(rows - 2, n / 3) = std::numeric_limits<float>::quiet_NaN();
    };
    for (const Case& c : all_cases()) {
      const bool rms_weight = !c.ln && c.weight == RmsWeight::Scale && c.placement != EpsPlacement::Outside;
      if ((c.ln && c.mode == AffineMode::ScaleShift) || rms_weight)
        forward_case<TestType, float, Eigen::RowMajor>(c, rows, n, 0, ++seed, 0.0, 1.0, {}, edit_x);
    }
  }
}

// Forward rows whose statistics are finite round without the NaN lanes' fix when every
// parameter is finite (narrow.hpp: fused_params_finite); a NaN or infinite parameter
// sends the call through the staged rounding, and a finite gamma large enough to make y
// overflow gives Inf on the fast path. Each is bitwise the float op, rounded. Lengths:
// whole pairs of packets, a packet left over, a scalar tail.
TEMPLATE_TEST_CASE("Narrow storage: non-finite parameters and overflowing outputs",
                   "[narrow][numerics]", BF, HF) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // NaNs whose payload fills the low bits: rounded without the NaN lanes' fix they would
  // carry into Inf or -0 (float parameters keep them; T's rounding makes them T's NaN).
  const float nan_payload = from_fbits(0x7fffffffu), neg_nan_payload = from_fbits(0xffffffffu);
  const std::pair<const char*, EditParams> edits[] = {
      {"gamma NaN", [&](Buffer<float>& g, Buffer<float>&) { g[g.n / 2] = nan; }},
      {"gamma NaN with payload",
       [&](Buffer<float>& g, Buffer<float>&) { g[g.n - 1] = nan_payload; }},
      {"beta -NaN with payload", [&](Buffer<float>&, Buffer<float>& b) { b[3] = neg_nan_payload; }},
      {"gamma -Inf", [&](Buffer<float>& g, Buffer<float>&) { g[1] = -inf; }},
      {"beta +Inf", [&](Buffer<float>& g, Buffer<float>& b) { b[g.n - 1] = inf; }},
      {"beta NaN", [&](Buffer<float>&, Buffer<float>& b) { b[0] = nan; }},
      // |xhat| above 1.14 somewhere in 5 rows: y overflows float (and T) to +-Inf there.
      {"gamma 3e38", [&](Buffer<float>& g, Buffer<float>&) {
         for (std::size_t i = 0; i < g.n; i += 2) g[i] = 3e38f;
       }},
  };
  std::uint64_t seed = 9700;
  for (const auto& e : edits)
    for (const Case& c : all_cases())
      for (Index n : {32, 40, 45, 768}) {
        INFO(e.first);
        forward_case<TestType, float, Eigen::RowMajor>(c, 5, n, 1, ++seed, 0.0, 1.0, e.second);
        forward_case<TestType, TestType, Eigen::RowMajor>(c, 5, n, 0, ++seed, 0.0, 1.0, e.second);
      }
}

TEMPLATE_TEST_CASE("Narrow storage: backward against the float op and the reference",
                   "[narrow]", BF, HF) {
  std::uint64_t seed = 9500;
  for (const Case& c : all_cases())
    for (Index n : {1, 3, 7, 16, 17, 33, 127, 768, 4097})
      for (std::size_t shift : {0u, 1u}) {
        const Index rows = n > 1000 ? 3 : 70;  // several blocks and chunks
        backward_case<TestType, float, Eigen::RowMajor>(c, rows, n, shift, ++seed);
        backward_case<TestType, TestType, Eigen::ColMajor>(c, rows, n, shift, ++seed);
      }
}

TEMPLATE_TEST_CASE("Narrow storage: the large mean, and |x| near half's max", "[narrow][numerics]",
                   BF, HF) {
  // x^2 ~ 4e9 would overflow half (max 65504) if it were squared there.
  const double big = std::is_same<TestType, HF>::value ? 6e4 : 1e30;
  for (const Case& c : all_cases()) {
    forward_case<TestType, float, Eigen::RowMajor>(c, 4, 768, 0, 9900, 100.0, 1.0);
    forward_case<TestType, float, Eigen::RowMajor>(c, 4, 768, 1, 9901, 0.0, big / 4);
    backward_case<TestType, float, Eigen::RowMajor>(c, 4, 256, 0, 9902, 0.0, big / 4);
  }
  // A row at half's max exactly: finite y.
  Buffer<TestType> x(64, 0), y(64, 0);
  for (std::size_t i = 0; i < x.n; ++i)
    x[i] = TestType(static_cast<float>(i % 2 ? 65504.0 : -65504.0));
  normkit::RMSNorm<TestType> rms(1, 1e-6, RmsWeight::None);
  rms.forward(CMap<TestType, 1, Eigen::ColMajor>(x.data(), 64), {},
              Map<TestType, 1, Eigen::ColMajor>(y.data(), 64));
  for (std::size_t i = 0; i < y.n; ++i) CHECK(static_cast<float>(y[i]) == (i % 2 ? 1.0f : -1.0f));
}

TEMPLATE_TEST_CASE("Narrow storage: bitwise identical for any number of threads",
                   "[narrow][threads]", BF, HF) {
  Eigen::ThreadPool p1(1), p2(2);
  const Eigen::ThreadPoolDevice d1(&p1, 1), d2(&p2, 2);
  for (const Case& c : all_cases())
    for (auto shape : {std::pair<Index, Index>{37, 129}, std::pair<Index, Index>{300, 768}}) {
      const Index rows = shape.first, n = shape.second;
      INFO(c.str() << ", " << rows << " x " << n);
      Data<TestType> d(rows, n, 0, 9950);
      const auto p = d.template params<float>(c);
      std::vector<Buffer<TestType>> y, dx;
      std::vector<Buffer<float>> dg, db;
      std::vector<normkit::RowStats<float>> st;
      auto go = [&](const auto& dev) {
        y.emplace_back(d.x.n, 0);
        dx.emplace_back(d.x.n, 0);
        dg.emplace_back(d.g.n, 0);
        db.emplace_back(d.g.n, 0);
        st.push_back(run_forward<TestType>(c, xmap<TestType, Eigen::RowMajor>(d.x.data(), rows, n),
                                           p, ymap<TestType, Eigen::RowMajor>(y.back().data(), rows, n),
                                           dev));
        run_backward<TestType>(c, xmap<TestType, Eigen::RowMajor>(d.dy.data(), rows, n),
                               xmap<TestType, Eigen::RowMajor>(d.x.data(), rows, n), p, st.back(),
                               ymap<TestType, Eigen::RowMajor>(dx.back().data(), rows, n),
                               nt::map<float, 1, Eigen::ColMajor>(dg.back().data(), {n}),
                               nt::map<float, 1, Eigen::ColMajor>(db.back().data(), {n}), dev);
      };
      go(Eigen::DefaultDevice());
      go(d1);
      go(d2);
      for (std::size_t t = 1; t < 3; ++t) {
        CHECK(std::memcmp(y[0].data(), y[t].data(), y[0].n * sizeof(TestType)) == 0);
        CHECK(std::memcmp(dx[0].data(), dx[t].data(), dx[0].n * sizeof(TestType)) == 0);
        CHECK(std::memcmp(dg[0].data(), dg[t].data(), dg[0].n * sizeof(float)) == 0);
        CHECK(std::memcmp(db[0].data(), db[t].data(), db[0].n * sizeof(float)) == 0);
        CHECK(std::memcmp(st[0].rstd.data(), st[t].rstd.data(),
                          static_cast<std::size_t>(rows) * sizeof(float)) == 0);
      }
    }
}

TEMPLATE_TEST_CASE("Narrow storage: NaN or Inf poisons only its own row", "[narrow][numerics]", BF,
                   HF) {
  for (const Case& c : all_cases())
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      INFO(c.str() << ", " << bad);
      const Index rows = 4, n = 100;
      Data<TestType> d(rows, n, 1, 9980);
      const auto p = d.template params<TestType>(c);
      Buffer<TestType> y0(d.x.n, 1), y1(d.x.n, 1);
      run_forward<TestType>(c, xmap<TestType, Eigen::RowMajor>(d.x.data(), rows, n), p,
                            ymap<TestType, Eigen::RowMajor>(y0.data(), rows, n));
      d.x[static_cast<std::size_t>(n + 17)] = TestType(bad);
      run_forward<TestType>(c, xmap<TestType, Eigen::RowMajor>(d.x.data(), rows, n), p,
                            ymap<TestType, Eigen::RowMajor>(y1.data(), rows, n));
      for (std::size_t i = 0; i < y0.n; ++i) {
        if (i / static_cast<std::size_t>(n) == 1)
          CHECK(std::isnan(static_cast<float>(y1[i])));
        else
          CHECK(bits(y1[i]) == bits(y0[i]));
      }
    }
}

TEST_CASE("Narrow storage: bad arguments throw before writing", "[narrow][errors]") {
  const BF S(7.25f);
  Buffer<BF> x(64, 0), y(64, 0), dy(64, 0), dx(64, 0), g(16, 0), b(16, 0);
  Buffer<float> gf(16, 0), bf(16, 0), dg(16, 0), db(16, 0);
  for (std::size_t i = 0; i < 64; ++i) x[i] = dy[i] = BF(static_cast<float>(i % 7));
  gf.fill(1.0f);
  bf.fill(0.0f);
  g.fill(BF(1.0f));
  b.fill(BF(0.0f));
  using M2 = Map<BF, 2, Eigen::RowMajor>;
  using C2 = CMap<BF, 2, Eigen::RowMajor>;
  using C1 = CMap<BF, 1, Eigen::ColMajor>;
  using F1 = CMap<float, 1, Eigen::ColMajor>;
  using MF1 = Map<float, 1, Eigen::ColMajor>;
  const C2 xm(x.data(), 4, 16);
  const normkit::LayerNorm<BF> ln;
  const normkit::RMSNorm<BF> rms(1, 1e-6, RmsWeight::Scale, EpsPlacement::Inside,
                                 CastOrder::CastThenWeight);
  const auto p = normkit::affine(F1(gf.data(), 16), F1(bf.data(), 16));
  auto untouched = [&](auto&& f, const char* word) {
    y.fill(S);
    dx.fill(S);
    dg.fill(7.25f);
    db.fill(7.25f);
    CHECK_THROWS_AS(f(), normkit::invalid_argument);
    CHECK_THROWS_WITH(f(), Catch::Contains(word));
    CHECK(y.all_equal(S));
    CHECK(dx.all_equal(S));
    CHECK(dg.all_equal(7.25f));
    CHECK(db.all_equal(7.25f));
  };
  untouched([&] { ln.forward(xm, p, M2(y.data(), 4, 15)); }, "'y'");
  untouched([&] { ln.forward(xm, normkit::affine(F1(gf.data(), 15), F1(bf.data(), 15)), M2(y.data(), 4, 16)); },
            "'gamma'");
  untouched([&] { ln.forward(xm, normkit::affine(C1(g.data(), 16), C1(b.data(), 8)), M2(y.data(), 4, 16)); },
            "'beta'");
  untouched([&] { ln.forward(xm, {}, M2(y.data(), 4, 16)); }, "'params'");
  untouched([&] { rms.forward(xm, normkit::affine(C1(g.data(), 16), C1(b.data(), 16)), M2(y.data(), 4, 16)); },
            "'params'");
  untouched([&] { ln.forward(C2(y.data(), 2, 16), p, M2(y.data() + 8, 2, 16)); }, "overlap");
  normkit::RowStats<float> st = ln.forward(xm, p, M2(y.data(), 4, 16));
  const C2 dym(dy.data(), 4, 16);
  normkit::RowStats<float> short_st = st;
  short_st.rstd = Eigen::Tensor<float, 1>(3);
  untouched([&] { ln.backward(dym, xm, p, short_st, M2(dx.data(), 4, 16), MF1(dg.data(), 16), MF1(db.data(), 16)); },
            "'saved.rstd'");
  untouched([&] { ln.backward(C2(dy.data(), 4, 8), xm, p, st, M2(dx.data(), 4, 16), MF1(dg.data(), 16), MF1(db.data(), 16)); },
            "'dy'");
  untouched([&] { ln.backward(dym, xm, p, st, M2(dx.data(), 4, 16), MF1(dg.data(), 15), MF1(db.data(), 16)); },
            "'dgamma'");
  untouched([&] { ln.backward(dym, xm, p, st, M2(dx.data(), 4, 16), MF1(dg.data(), 16), MF1(dg.data() + 4, 16)); },
            "overlap");
  const auto st_rms = rms.forward(xm, normkit::affine(F1(gf.data(), 16)), M2(y.data(), 4, 16));
  untouched([&] { rms.backward(dym, xm, normkit::affine(F1(gf.data(), 16)), st_rms, M2(dx.data(), 4, 8), MF1(dg.data(), 16)); },
            "'dx'");
  // Zero rows: dgamma and dbeta zeroed.
  ln.backward(C2(dy.data(), 0, 16), C2(x.data(), 0, 16), p, ln.forward(C2(x.data(), 0, 16), p, M2(y.data(), 0, 16)),
              M2(dx.data(), 0, 16), MF1(dg.data(), 16), MF1(db.data(), 16));
  CHECK(dg.all_equal(0.0f));
  CHECK(db.all_equal(0.0f));
}
