// normkit: the row-norm engine shared by LayerNorm and RMSNorm (and later the adaptive
// and fused norms). Checks arguments, computes per-row statistics, and runs the
// element-wise kernels over rows on a device. Knows no ISA: it calls row_kernels.hpp.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf (l1d_ways)
#endif

#include "../common.hpp"
#include "config.hpp"
#include "plan.hpp"
#include "row_kernels.hpp"
#include "tensor_view.hpp"

namespace normkit {
namespace detail {

struct RowNormSpec {
  const char* op;     // "LayerNorm", "RMSNorm": for messages
  int k;              // normalized (innermost) dims
  double eps;
  ScaleKind scale;    // how gamma applies
  bool shift;         // beta present
  bool eps_outside;   // RMSNorm's y = x / (sqrt(ms) + eps)
  // AdaNorm (Xu et al. 2019): y = C (1 - k xhat) xhat instead of the affine map.
  bool ada = false;
  double ada_c = 1.0, ada_k = 0.1;
  bool ada_full_grad = false;
};

// ---------------------------------------------------------------------------------
// Per-row statistics.

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// A double sum of squares inside (2^-900, 2^900) lost nothing to overflow or underflow:
// any term that underflowed is below 2^-1022, negligible against the total.
constexpr double kSumSqHuge = 0x1p900;
constexpr double kSumSqTiny = 0x1p-900;

// Statistics of one row, kept in the scaled form they were computed in: the data were
// multiplied by `scale` (a power of two, 1 unless the squares left double's range), so
//   mean = mean_s / scale,  rstd = scale / denom_s,
// with denom_s = sqrt(var_s + eps scale^2) (or sqrt(var_s) + eps scale for eps outside the
// sqrt). rstd itself may not be representable (eps = 0 and a spread below 1/DBL_MAX, or
// below 1/FLT_MAX for float): such rows are normalized from the scaled form instead.
struct RowStat {
  double mean_s = 0.0;
  double scale = 1.0;
  double denom_s = 0.0;  // 0: a constant row with eps = 0 (var + eps == 0)
  double rstd = 0.0;
  double mean() const { return mean_s / scale; }
};

inline RowStat row_stat(double mean_s, double var_s, double scale, double eps, bool eps_outside) {
  RowStat st;
  st.mean_s = mean_s;
  st.scale = scale;
  if (std::isnan(var_s) || std::isnan(mean_s)) {  // a NaN or Inf in the row poisons it
    st.denom_s = st.rstd = kNaN;
    return st;
  }
  st.denom_s = eps_outside ? std::sqrt(var_s) + eps * scale : std::sqrt(var_s + eps * scale * scale);
  if (st.denom_s == 0.0) {
    st.rstd = std::numeric_limits<double>::infinity();
  } else if (std::isinf(st.denom_s)) {
    // eps * scale^k overflowed: scale > 2^500 (tiny data), so var / (eps) < 2^-1000:
    // eps alone decides.
    st.rstd = eps_outside ? 1.0 / eps : 1.0 / std::sqrt(eps);
  } else {
    st.rstd = scale / st.denom_s;
  }
  return st;
}

// max |x_i|, or NaN if the row holds a NaN or an Inf (which poisons the row).
template <class T>
double max_abs_or_nan(const T* x, Index n) {
  double m = 0.0;
  for (Index i = 0; i < n; ++i) {
    const double a = std::fabs(static_cast<double>(x[i]));
    if (!(a <= DBL_MAX)) return kNaN;
    m = std::max(m, a);
  }
  return m;
}

// A power of two that brings max|x| into [1, 2), clamped so that it is representable.
inline double rescale_for(double max_abs) {
  const int e = std::min(std::max(-std::ilogb(max_abs), -1000), 1000);
  return std::ldexp(1.0, e);
}

// Rows past the next one to prefetch during a normalize pass: enough that the prefetched
// row starts kPrefetchAheadBytes past the current row's end (measured at [16384, 768]:
// 3 KB rows gained from 2 rows ahead over the next one; 16 KB rows lost from any more).
constexpr Index kPrefetchAheadBytes = 8192;
inline Index prefetch_ahead_rows(Index row_bytes) {
  if (row_bytes <= 0) return 0;
  return std::max<Index>(0, (kPrefetchAheadBytes + row_bytes - 1) / row_bytes - 1);
}

// How far ahead a pass that streams a row prefetches its own input (ahead_in_row; 4 KB
// measured best among 1, 2, 4 and 8 KB, then for backward's first pass).
constexpr Index kStreamAheadBytes = 4096;

// The CPU's L1 data cache (glibc reads it from CPUID), read once: its associativity
// (ways; 8 where unknown) and its size in bytes (32 KB where unknown).
#if defined(_SC_LEVEL1_DCACHE_ASSOC) && defined(_SC_LEVEL1_DCACHE_SIZE)
inline long l1d_param(int name, long unknown) {
  const long v = sysconf(name);
  return v > 0 ? v : unknown;
}
inline long l1d_ways() {
  static const long ways = l1d_param(_SC_LEVEL1_DCACHE_ASSOC, 8L);
  return ways;
}
inline long l1d_bytes() {
  static const long bytes = l1d_param(_SC_LEVEL1_DCACHE_SIZE, 32768L);
  return bytes;
}
#else
inline long l1d_ways() { return 8L; }
inline long l1d_bytes() { return 32768L; }
#endif

// Whether rows row_bytes apart, walked four in step (backward's second pass), map to
// the same L1 sets: an L1 of 4 KB per way (32 KB 8-way: Zen 3, most Intel cores) sets
// by address bits 6-11, so rows whose distance is within 256 bytes of a multiple of
// 4 KB (hardware prefetch pulls neighbouring lines) collide, and four rows of x and dy,
// with gamma and the dgamma/dbeta accumulators, want more ways than a set has. At 4096
// and 8192 features (16 and 32 KB rows) the four-row pass ran at 0.11-0.15 of the
// roofline on Zen 3, one row at a time at 0.45-0.55 (bench_layer_norm, 2026-12-02).
// Then rows go one at a time: the grouping depends on n only, so results still do not
// depend on the thread count. An L1 of 12 ways or more (48 KB 12-way: Zen 5, Intel since
// Ice Lake) holds them: there four rows in step were faster at 4096 features (LayerNorm
// backward 13.7 against 8-10.5 GB/s at [64, 4096], 9.7 against 8.0-8.5 at [4096, 4096],
// Xeon with AVX-512, 2026-12-02), so the rule applies below 12 ways only.
inline bool rows_alias_in_l1(Index row_bytes) {
  if (l1d_ways() >= 12) return false;
  for (Index d = 1; d < 4; ++d) {
    const Index m = (d * row_bytes) % 4096;  // rows nearer than 4 KB are neighbours, not rivals
    if (d * row_bytes >= 4096 - 256 && std::min(m, 4096 - m) < 256) return true;
  }
  return false;
}

// Whether a streamed backward takes its rows one at a time, each row's dgamma/dbeta
// terms added straight into the double accumulators, with the first pass prefetching
// nothing and the second the whole row prefetch_ahead_rows after the next: where a row
// of x and dy, gamma and the accumulators (acc_bytes) fit in three quarters of L1. There
// a row's second pass hands memory a whole row to fetch while the first pass of the next
// runs from L2. LayerNorm backward with dgamma and dbeta, streamed, ratio to the add
// roofline (standalone, Zen 5 with 48 KB L1, 2026-12-08), groups of four -> one at a
// time: 256 features 0.45 -> 0.57, 1024 0.45 -> 0.69, [16384, 768] 0.42 -> 0.70; without
// the parameter gradients 2048 0.49 -> 0.65, 3072 0.50 -> 0.68. Where it is not taken,
// because it lost: in cache (LayerNorm [512, 768] 0.48 -> 0.40, [64, 768] 0.58 -> 0.36,
// where four rows in step go from L1 last column first), and where the accumulators do
// not fit (2048 features with dgamma/dbeta: no gain; 4096: a loss). Tried and dropped:
// the forward's skewed order here (the next row's first-pass trees between this row's
// second-pass packets: [16384, 768] 0.61 -> 0.51, 1024 features 0.69 -> 0.45; for groups
// of four at 4096 and 8192 features 0.50 -> 0.44 and 0.48 -> 0.38).
inline bool backward_lone_rows(Index row_bytes, Index acc_bytes) {
  return acc_bytes + 3 * row_bytes <= static_cast<Index>(l1d_bytes()) * 3 / 4;
}

// Whether forward takes rows two at a time: statistics of both rows, then one normalize
// pass over both (kernels::normalize2). Where the two rows' x and y with gamma and beta
// (`params` arrays of the row's size) fit in three quarters of L1, the second row's
// statistics overlap the first's latency (the reductions, sqrt and divisions before a row
// can be normalized), and where one row's set alone overflows L1 the parameters are read
// once for two rows; in between, two rows would overflow an L1 that one row fits. Forward
// LayerNorm, standalone test (ns per element, one row / two rows at a time, Xeon with
// 48 KB L1, 2026-12-07): in L2 128x512 0.177 / 0.146, 64x768 0.161 / 0.129, 128x1024
// 0.143 / 0.122, 64x1536 0.126 / 0.117, 16x4096 0.151 / 0.140, 8x8192 0.159 / 0.147;
// 32x2048 0.120 / 0.130 and 48x2560 0.122 / 0.134 (the case excluded). The exclusion
// holds on an L1 of 48 KB or more only: on a 32 KB L1 (Zen 4, 8-way, 2026-12-07, same
// binary, interleaved, one row / two rows) the rows in between ran faster in pairs too,
// LayerNorm 170x1536 0.241 / 0.194, 128x2048 0.238 / 0.197, RMSNorm 102x2560
// 0.171 / 0.153 (and 64x4096 0.239 / 0.207, already in pairs). Results do not depend on
// it (the same operations per element).
inline bool pair_rows(Index row_bytes, int params) {
  const Index l1 = static_cast<Index>(l1d_bytes());
  if (l1 < 48 * 1024) return true;
  return (4 + params) * row_bytes <= l1 * 3 / 4 || (2 + params) * row_bytes > l1;
}

// Whether a streamed forward takes the skewed order (row r + 1's statistics in step with
// row r's normalize pass, kernels::normalize_with_sums): where the two rows with gamma
// and beta (`params` arrays of the row's size) fit in three quarters of L1, so that row
// r + 1, read by its statistics, is still in L1 when it is normalized. LayerNorm forward,
// standalone test (ns per element, row by row / skewed, Zen 5 with 48 KB L1, 64-byte
// aligned, 2026-12-07): 16384x768 0.158-0.160 / 0.122-0.126, 12288x1024 0.159-0.161 /
// 0.124-0.129, 6144x2048 0.184-0.187 / 0.132-0.135; beyond: 4096x3072 0.163-0.169 /
// 0.180, 3072x4096 0.165-0.173 / 0.212-0.217, 4096x4096 0.179-0.181 / 0.224-0.234.
// Rows that do not start on a packet boundary go row by row: their trees' loads split
// cache lines, and skewed they were slower (16384x768 16 bytes off: 0.168-0.175 /
// 0.213-0.224; the same when the skewed loop took those rows one by one, 0.22-0.24).
inline bool skew_rows(Index row_bytes, int params) {
  return (2 + params) * row_bytes <= static_cast<Index>(l1d_bytes()) * 3 / 4;
}

// The statistics pass of a long row prefetches its own row kStreamAheadBytes ahead into
// L1 (the row itself is mostly in L2 already, from the previous row's normalize pass):
// 0.63 -> 0.75 of the roofline at 8192 features, 0.71 -> 0.77 at 4096. Shorter rows: none.
template <class T>
kernels::Prefetch ahead_in_row(const T* x, Index n) {
  const Index d = kStreamAheadBytes / static_cast<Index>(sizeof(T));
  return n > d ? kernels::Prefetch(x + d, n - d) : kernels::Prefetch();
}

// LayerNorm statistics of a float row from its float-tree sums (s, s2 of d = x - shift:
// kernels::blocked_sums, or the fused residual's residual_blocked_sums) when they can be
// trusted; otherwise exactly, in one more pass over x (which is in cache by then).
// The trusted case alone (narrow.hpp's fused forward checks the trust itself).
inline RowStat moments_of_trees(double n, double eps, double shift, double s, double s2) {
  const double md = s / n;
  return row_stat(shift + md, std::max(s2 / n - md * md, 0.0), 1.0, eps, false);
}
template <class Isa, class T>
RowStat moments_from_trees(const T* x, Index n, double eps, T shift, double s, double s2) {
  const double dn = static_cast<double>(n);
  if (kernels::blocked_sums_trusted<T>(s, s2, dn))
    return moments_of_trees(dn, eps, static_cast<double>(shift), s, s2);
  // The exact form: one pass in double, shifted by the row's first element. Float data
  // widened to double never overflows or underflows when squared (FLT_MAX^2 = 1.2e77,
  // min subnormal^2 = 2e-90), and shifting by a member x0 of the row bounds the
  // cancellation in s2/n - (s/n)^2: (x0 - mean)^2 <= n var, so the relative error of
  // var is at most about n * DBL_EPSILON (1e-12 at n = 4096), far below float
  // resolution. A constant row takes it too (s2 = 0): its mean is exactly x0.
  const double x0 = static_cast<double>(x[0]);
  kernels::shifted_sums<Isa>(x, n, 1.0, x0, s, s2);
  const double md = s / dn;
  return row_stat(x0 + md, std::max(s2 / dn - md * md, 0.0), 1.0, eps, false);
}

// The shift of a float row's trees: the lower median of its first 5 elements.
template <class T>
T tree_shift(const T* x, Index n) {
  if (n >= 5) return kernels::median_of_5(x);
  T v[5];
  const int k = static_cast<int>(n);
  for (int i = 0; i < k; ++i) v[i] = x[i];
  return kernels::median_of_5(v, k);
}

// RMSNorm statistics of a float row from its float-tree sum of squares (fs:
// kernels::blocked_sum_squares, or residual_blocked_sums), trusted when no square
// overflowed or underflowed; otherwise exactly in double, where only an Inf or NaN in
// the row makes the sum non-finite: poison the row (x * 0 would leave its finite
// elements at 0).
// The trusted case alone (narrow.hpp's fused forward checks the trust itself).
inline RowStat rms_of_trees(double n, double eps, bool eps_outside, double fs) {
  return row_stat(0.0, fs / n, 1.0, eps, eps_outside);
}
template <class Isa, class T>
RowStat rms_from_trees(const T* x, Index n, double eps, bool eps_outside, double fs) {
  const double dn = static_cast<double>(n);
  if (kernels::blocked_sums_trusted<T>(0.0, fs, dn)) return rms_of_trees(dn, eps, eps_outside, fs);
  const double ss = kernels::sum_squares<Isa>(x, n, 1.0);
  return row_stat(0.0, ss <= DBL_MAX ? ss / dn : kNaN, 1.0, eps, eps_outside);
}

// The statistics as the kernels apply them (and forward saves them): the mean split in a
// hi and lo part of T, rstd rounded to T.
template <class T>
kernels::RowAffine<T> row_affine(const RowStat& st) {
  const double mean = st.mean();
  const T hi = static_cast<T>(mean);
  return {hi, static_cast<T>(mean - static_cast<double>(hi)), static_cast<T>(st.rstd)};
}

// LayerNorm statistics of one row.
template <class Isa, class T>
RowStat row_moments(const T* x, Index n, double eps) {
  if (n == 0) return row_stat(kNaN, kNaN, 1.0, eps, false);
  const double dn = static_cast<double>(n);
  double s = 0.0, s2 = 0.0;
  if constexpr (sizeof(T) <= sizeof(float)) {
    // The fast form (as the channel norms'): d = x - shift and d^2 in float trees of 16
    // packets, then double (kernels::blocked_sums), shifted by the lower median of the
    // first 5 elements. A pass in double costs 4 vector operations per 8 floats; the
    // trees, 3 per 16 floats: with the next row prefetched during the normalize pass,
    // the double form made the statistics pass the bound on long rows (0.6 of the copy
    // roofline at 4096 features, against 0.85-0.9 for the trees). The error is a few
    // roundings of float per term (README "Numerics"); rows where the result cannot be
    // trusted (overflow, underflow, NaN/Inf, shift more than 2 sigma off) go on to
    // the exact form.
    const T shift = tree_shift(x, n);
    kernels::blocked_sums<Isa>(x, n, shift, s, s2, ahead_in_row(x, n));
    return moments_from_trees<Isa>(x, n, eps, shift, s, s2);
  } else {
    // Double data: two passes (a mean shifted by x0, then shifted sums with the
    // correction term of Chan, Golub and LeVeque), rescaled by a power of two when the
    // squares leave double's range (|x| beyond ~1e150 or below ~1e-150). Shifting the
    // first pass by x0 makes a constant row's mean exactly x0.
    const double x0 = static_cast<double>(x[0]);
    const double m1 = x0 + kernels::sum<Isa>(x, n, 1.0, x0) / dn;
    kernels::shifted_sums<Isa>(x, n, 1.0, m1, s, s2);
    if (s2 < kSumSqHuge && s2 > kSumSqTiny) {
      const double md = s / dn;
      return row_stat(m1 + md, std::max(s2 / dn - md * md, 0.0), 1.0, eps, false);
    }
    const double m = max_abs_or_nan(x, n);
    if (std::isnan(m)) return row_stat(kNaN, kNaN, 1.0, eps, false);
    if (m == 0.0) return row_stat(0.0, 0.0, 1.0, eps, false);
    const double scale = rescale_for(m);
    const double x0s = static_cast<double>(x[0]) * scale;
    const double m1s = x0s + kernels::sum<Isa>(x, n, scale, x0s) / dn;
    kernels::shifted_sums<Isa>(x, n, scale, m1s, s, s2);
    const double md = s / dn;
    return row_stat(m1s + md, std::max(s2 / dn - md * md, 0.0), scale, eps, false);
  }
}

// RMSNorm statistics of one row (mean_s = 0).
template <class Isa, class T>
RowStat row_rms(const T* x, Index n, double eps, bool eps_outside) {
  if (n == 0) return row_stat(0.0, kNaN, 1.0, eps, eps_outside);
  const double dn = static_cast<double>(n);
  if constexpr (sizeof(T) <= sizeof(float)) {
    // The fast form: squares in float trees (kernels::blocked_sum_squares).
    return rms_from_trees<Isa>(x, n, eps, eps_outside,
                               kernels::blocked_sum_squares<Isa>(x, n, ahead_in_row(x, n)));
  } else {
    const double ss = kernels::sum_squares<Isa>(x, n, 1.0);
    if (ss < kSumSqHuge && ss > kSumSqTiny) return row_stat(0.0, ss / dn, 1.0, eps, eps_outside);
    const double m = max_abs_or_nan(x, n);
    if (std::isnan(m)) return row_stat(0.0, kNaN, 1.0, eps, eps_outside);
    if (m == 0.0) return row_stat(0.0, 0.0, 1.0, eps, eps_outside);
    const double scale = rescale_for(m);
    return row_stat(0.0, kernels::sum_squares<Isa>(x, n, scale) / dn, scale, eps, eps_outside);
  }
}

// ---------------------------------------------------------------------------------
// Compile-time dispatch of runtime flags.

template <class F>
void with_bool(bool b, F&& f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

template <class F>
void with_scale(ScaleKind s, F&& f) {
  switch (s) {
    case ScaleKind::None: f(std::integral_constant<ScaleKind, ScaleKind::None>{}); break;
    case ScaleKind::Gamma: f(std::integral_constant<ScaleKind, ScaleKind::Gamma>{}); break;
    case ScaleKind::OnePlusGamma:
      f(std::integral_constant<ScaleKind, ScaleKind::OnePlusGamma>{});
      break;
  }
}

template <class F>
void with_param_grads(int k, F&& f) {
  if (k == 0) f(std::integral_constant<int, 0>{});
  if (k == 1) f(std::integral_constant<int, 1>{});
  if (k == 2) f(std::integral_constant<int, 2>{});
}

template <class T>
bool stream_output(Index elements) {
  return static_cast<std::size_t>(elements) * sizeof(T) >= NORMKIT_STREAM_MIN_BYTES;
}

// Rows whose rstd overflows T (eps = 0 and a spread below 1 / T's max): normalize in
// double from the scaled statistics, one element at a time.
template <class T>
void normalize_wide(const RowNormSpec& spec, const T* x, T* y, Index n, const RowStat& st,
                    const T* gamma, const T* beta) {
  for (Index i = 0; i < n; ++i) {
    double v = (static_cast<double>(x[i]) * st.scale - st.mean_s) / st.denom_s;
    if (spec.ada) {
      y[i] = static_cast<T>(spec.ada_c * (1.0 - spec.ada_k * v) * v);
      continue;
    }
    if (spec.scale == ScaleKind::Gamma) v *= static_cast<double>(gamma[i]);
    if (spec.scale == ScaleKind::OnePlusGamma) v *= 1.0 + static_cast<double>(gamma[i]);
    if (spec.shift) v += static_cast<double>(beta[i]);
    y[i] = static_cast<T>(v);
  }
}

// ---------------------------------------------------------------------------------
// Argument checks. All run before any output is touched.

// x: the data (its dims), p: the parameters, of the same type or (narrow storage) float.
template <class T, class P>
void check_params(const RowNormSpec& spec, const std::string& where, const View<const T>& x,
                  const Affine<P>& p) {
  const bool want_g = spec.scale != ScaleKind::None;
  const auto what = [](bool g, bool b) {
    return std::string(g ? (b ? "gamma and beta" : "gamma only") : (b ? "beta only" : "none"));
  };
  if (spec.ada && (p.gamma.present || p.beta.present))
    fail(where, "cond", "{} (AdaNorm has no condition)", what(p.gamma.present, p.beta.present));
  if (want_g != p.gamma.present || spec.shift != p.beta.present)
    fail(where, "params",
         what(want_g, spec.shift) + " (as the functor's affine mode says)",
         what(p.gamma.present, p.beta.present));
  if (p.gamma.present && !matches_inner(p.gamma, x, spec.k))
    fail(where, "gamma", "dims " + inner_str(x, spec.k), p.gamma.str());
  if (p.beta.present && !matches_inner(p.beta, x, spec.k))
    fail(where, "beta", "dims " + inner_str(x, spec.k), p.beta.str());
  require_data(where, "gamma", p.gamma);
  require_data(where, "beta", p.beta);
}

template <class T>
void check_x(const RowNormSpec& spec, const std::string& where, const char* name,
             const View<const T>& x) {
  if (x.rank < spec.k)
    fail(where, name, "rank >= " + std::to_string(spec.k) + " (the normalized dims)",
         "rank " + std::to_string(x.rank));
  require_data(where, name, x);
}

template <bool Center, class T>
void check_saved(const std::string& where, const RowStats<T>& s, Index rows) {
  auto check = [&](const char* name, const Eigen::Tensor<T, 1>& t) {
    if (t.size() != rows)
      fail(where, name, std::to_string(rows) + " elements (one per row, from forward)",
           std::to_string(t.size()));
  };
  if (Center) {
    check("saved.mean", s.mean);
    check("saved.mean_lo", s.mean_lo);
  }
  check("saved.rstd", s.rstd);
}

// ---------------------------------------------------------------------------------
// Forward.

// The fused residual of a pre-norm block (and DeepNorm): the op normalizes
// s = alpha * x + r and also returns s, the new residual stream.
template <class T>
struct Residual {
  View<const T> r;
  View<T> s;
  double alpha = 1.0;
};

// The rows of one forward call on raw pointers, after the checks.
template <class T>
struct RowPass {
  const T* x;
  T* y;
  Index n, rows;
  const T* gamma;
  const T* beta;
  Index param_stride;  // gamma and beta of row r at + r * param_stride (0: shared)
  T* mean_hi;
  T* mean_lo;
  T* rstd;
  bool stream;
};

template <class T>
bool same_alignment(const T* a, const T* b) {
  return (reinterpret_cast<std::uintptr_t>(a) - reinterpret_cast<std::uintptr_t>(b)) % 64 == 0;
}

template <class Isa, class T, bool Center>
void forward_rows(const RowNormSpec& spec, const RowPass<T>& q, const Exec& device,
                  const Residual<T>* res = nullptr) {
  const Index n = q.n, rows = q.rows;
  const T alpha = res ? static_cast<T>(res->alpha) : T(1);
  T* mean_hi = q.mean_hi;
  T* mean_lo = q.mean_lo;
  T* rstd = q.rstd;
  const bool stream = q.stream;
  // While row r is normalized from cache, row r + 1 + ahead is fetched into L2 (one
  // prefetch per packet written), at least kPrefetchAheadBytes past row r's end. The
  // statistics pass of that row then reads from L2, and memory's reads overlap the
  // normalize pass's writes instead of alternating with them. The hardware prefetcher
  // alone runs a few KB ahead: on rows of 16 KB the two passes took turns with memory
  // (0.58 of the copy roofline at [4096, 4096]; with the prefetch and the float-tree
  // statistics, 0.85-0.9 measured in a standalone test).
  const Index ahead = prefetch_ahead_rows(n * static_cast<Index>(sizeof(T)));
  // Rows go two at a time (kernels::normalize2; ahead2: pairs prefetched past the next)
  // where pair_rows says so, and only where the output is not streamed: tensors of
  // NORMKIT_STREAM_MIN_BYTES and more, from memory, ran as fast or slower in pairs
  // (RMSNorm [2048, 8192] 0.38-0.47 -> 0.54-0.56 ns per element, LayerNorm
  // [16384, 768] 0.38-0.41 -> 0.38-0.44).
  const Index row_bytes = n * static_cast<Index>(sizeof(T));
  const int arrays = (q.gamma ? 1 : 0) + (q.beta ? 1 : 0);
  const bool pairs = !res && !q.stream && q.param_stride == 0 && pair_rows(row_bytes, arrays);
  // The skewed order for streamed float rows (see skew_rows) that all start on a packet
  // boundary.
  constexpr Index kVecBytes = static_cast<Index>(sizeof(typename Isa::template Pack<T>::V));
  const bool skew = !res && q.stream && !spec.ada && sizeof(T) <= sizeof(float) &&
                    skew_rows(row_bytes, arrays) && row_bytes % kVecBytes == 0 &&
                    reinterpret_cast<std::uintptr_t>(q.x) % kVecBytes == 0;
  const Index ahead2 = prefetch_ahead_rows(2 * row_bytes);
  // Per row: read x once from memory (statistics), then again from cache (normalize).
  const Eigen::TensorOpCost cost(static_cast<double>(n * static_cast<Index>(sizeof(T))),
                                 static_cast<double>(n * static_cast<Index>(sizeof(T))),
                                 static_cast<double>(n) * 2.0);
  constexpr bool kC = Center;
  with_scale(spec.scale, [&](auto S) {
    with_bool(spec.shift, [&](auto B) {
      with_bool(stream, [&](auto St) {
        constexpr ScaleKind kS = decltype(S)::value;
        constexpr bool kB = decltype(B)::value, kSt = decltype(St)::value;
        // RMSNorm never shifts.
        if constexpr (!kC && kB) {
          return;
        } else {
          parallel_for<Isa>(device, rows, cost, [&](Index r0, Index r1) {
            // Fused residual with streaming outputs: s is built in a row of scratch (L1)
            // and streamed out after y, so that the normalize pass reads it from cache.
            std::vector<T> scratch(res && kSt ? static_cast<std::size_t>(n) : 0);
            // One row: statistics of xr (x, or s), then y. Returns early on special rows.
            // pre: the row's statistics if already taken (the fused residual's float rows);
            // copy: the fused residual's s, written from the scratch row xr beside y.
            // pf: a later row, fetched into L2 while this one is normalized.
            // The statistics of one row, and their record in the saved arrays.
            auto row_stats = [&](const T* xr) {
              return kC ? row_moments<Isa>(xr, n, spec.eps)
                        : row_rms<Isa>(xr, n, spec.eps, spec.eps_outside);
            };
            // The same from a float row's tree sums (s1, s2 of xr - shift; RMSNorm: s2).
            auto tree_stats = [&](const T* xr, T shift, double s1, double s2) {
              return kC ? moments_from_trees<Isa>(xr, n, spec.eps, shift, s1, s2)
                        : rms_from_trees<Isa>(xr, n, spec.eps, spec.eps_outside, s2);
            };
            // Row r's gamma and beta (nullptr where absent).
            auto gamma_of = [&](Index r) {
              return q.gamma ? q.gamma + r * q.param_stride : nullptr;
            };
            auto beta_of = [&](Index r) { return q.beta ? q.beta + r * q.param_stride : nullptr; };
            auto save = [&](Index r, const kernels::RowAffine<T>& ra) {
              if (kC) {
                mean_hi[r] = ra.mean_hi;
                mean_lo[r] = ra.mean_lo;
              }
              rstd[r] = ra.rstd;
            };
            // Whether a row takes one of norm_row's special cases below (var + eps == 0,
            // an infinite rstd, AdaNorm) rather than kernels::normalize.
            auto special = [&](const RowStat& st, const kernels::RowAffine<T>& ra) {
              return st.denom_s == 0.0 || std::isinf(ra.rstd) || spec.ada;
            };
            auto norm_row = [&](Index r, const T* xr, const RowStat* pre = nullptr,
                                T* copy = nullptr, const kernels::Prefetch& pf = {},
                                const kernels::Prefetch& pf2 = {}) {
              T* yr = q.y + r * n;
              const T* gamma = gamma_of(r);
              const T* beta = beta_of(r);
              const RowStat st = pre ? *pre : row_stats(xr);
              const kernels::RowAffine<T> ra = row_affine<T>(st);
              const T hi = ra.mean_hi, lo = ra.mean_lo, rt = ra.rstd;
              save(r, ra);
              if (st.denom_s == 0.0) {
                // var + eps == 0 (a constant row with eps = 0): every x - mean is exactly
                // 0, so xhat = 0 and y = beta, not 0 * inf = NaN.
                kernels::normalize<Isa, T, kC, kS, kB, kSt>(xr, yr, n, {hi, lo, T(0)}, gamma,
                                                            beta, copy);
                return;
              }
              if (std::isinf(rt)) {
                normalize_wide(spec, xr, yr, n, st, gamma, beta);
                if (copy) kernels::copy_row<Isa, T, kSt>(xr, copy, n);
                return;
              }
              if (spec.ada) {
                kernels::adanorm<Isa, T, kSt>(xr, yr, n, ra, static_cast<T>(spec.ada_c),
                                              static_cast<T>(spec.ada_k));
                return;
              }
              kernels::normalize<Isa, T, kC, kS, kB, kSt>(xr, yr, n, ra, gamma, beta, copy, pf,
                                                          pf2);
            };
            if constexpr (kSt && sizeof(T) <= sizeof(float)) {
              if (skew) {
                // The skewed order (kernels::normalize_with_sums): row r + 1's statistics
                // in step with row r's streamed normalize pass; its prefetch then reaches
                // one row further than the row-by-row order's, as row r + 1 is read
                // already. A special row, and the last, go alone.
                RowStat st = row_stats(q.x + r0 * n);
                for (Index r = r0; r < r1; ++r) {
                  const T* xr = q.x + r * n;
                  const T* xn = xr + n;
                  const kernels::RowAffine<T> ra = row_affine<T>(st);
                  const bool step = r + 1 < r1 && !special(st, ra);
                  const Index next = r + (step ? 2 : 1) + ahead;
                  const kernels::Prefetch pf = next < r1 ? kernels::Prefetch(q.x + next * n, n, true)
                                                         : kernels::Prefetch();
                  if (!step) {
                    norm_row(r, xr, &st, nullptr, pf);
                    if (r + 1 < r1) st = row_stats(xn);
                    continue;
                  }
                  save(r, ra);
                  const T shift = kC ? tree_shift(xn, n) : T(0);
                  double s1 = 0.0, s2 = 0.0;
                  kernels::normalize_with_sums<Isa, T, kC, kS, kB>(
                      xr, q.y + r * n, n, ra, gamma_of(r), beta_of(r), xn, shift, s1, s2, pf,
                      ahead_in_row(xn, n));
                  st = tree_stats(xn, shift, s1, s2);
                }
                Isa::fence();
                return;
              }
            }
            for (Index r = r0; r < r1; ++r) {
              if (!kSt && pairs && r + 1 < r1) {
                // Two rows in step (see pairs): statistics of both, then one normalize2
                // pass unless either row needs its special case (norm_row takes it then).
                const T* x0 = q.x + r * n;
                const T* x1 = x0 + n;
                const RowStat st0 = row_stats(x0), st1 = row_stats(x1);
                const kernels::RowAffine<T> ra0 = row_affine<T>(st0), ra1 = row_affine<T>(st1);
                const Index next = r + 2 + 2 * ahead2;
                const kernels::Prefetch pf = next + 1 < r1
                                                 ? kernels::Prefetch(q.x + next * n, 2 * n, true, 1)
                                                 : kernels::Prefetch();
                if (special(st0, ra0) || special(st1, ra1)) {
                  norm_row(r, x0, &st0, nullptr, pf);
                  norm_row(r + 1, x1, &st1);
                } else {
                  save(r, ra0);
                  save(r + 1, ra1);
                  if constexpr (!kSt)
                    kernels::normalize2<Isa, T, kC, kS, kB>(x0, x1, q.y + r * n, q.y + (r + 1) * n,
                                                            n, ra0, ra1, q.gamma, q.beta, pf);
                }
                ++r;
                continue;
              }
              if (!res) {
                const Index next = r + 1 + ahead;
                norm_row(r, q.x + r * n, nullptr, nullptr,
                         next < r1 ? kernels::Prefetch(q.x + next * n, n, true)
                                   : kernels::Prefetch());
                continue;
              }
              T* sr = res->s.data + r * n;
              T* s_at = kSt ? scratch.data() : sr;
              // Streaming: s leaves the scratch row with y's stores when the two rows share
              // their alignment, or in a pass of its own.
              T* copy = kSt && !spec.ada && same_alignment(sr, q.y + r * n) ? sr : nullptr;
              if constexpr (sizeof(T) <= sizeof(float)) {
                // Float rows: the add and the statistics' float trees in one pass
                // (kernels::residual_blocked_sums; the trees and their exact fallback as
                // row_moments / row_rms take them from s), x and r fetched ahead in the
                // row, and the next rows' x and r fetched into L2 while y and s are written,
                // as forward does for x alone. The trees' shift is the lower median of s's
                // first 5 elements, built as the kernel builds them.
                const T* xr = q.x + r * n;
                const T* rr = res->r.data + r * n;
                T head[5];
                const Index k = std::min<Index>(n, 5);
                for (Index i = 0; i < k; ++i) head[i] = kernels::fmadd_s<Isa>(alpha, xr[i], rr[i]);
                const T shift = kC ? tree_shift(head, k) : T(0);
                double s1 = 0.0, s2 = 0.0;
                kernels::residual_blocked_sums<Isa, T, kC>(xr, rr, s_at, n, alpha, shift, s1, s2,
                                                           ahead_in_row(xr, n), ahead_in_row(rr, n));
                const RowStat st = tree_stats(s_at, shift, s1, s2);
                const Index next = r + 1 + ahead;
                const bool pf = next < r1;
                norm_row(r, s_at, &st, copy,
                         pf ? kernels::Prefetch(q.x + next * n, n, true) : kernels::Prefetch(),
                         pf ? kernels::Prefetch(res->r.data + next * n, n, true)
                            : kernels::Prefetch());
              } else {
                kernels::residual_add<Isa>(q.x + r * n, res->r.data + r * n, s_at, n, alpha);
                norm_row(r, s_at, nullptr, copy);
              }
              if (kSt && !copy) kernels::copy_row<Isa, T, true>(s_at, sr, n);
            }
            if (kSt) Isa::fence();
          });
        }
      });
    });
  });
}

// The checks of a forward call (x, the parameters, y), before any write. P: T, or float
// for narrow storage.
template <class T, class P>
void check_forward(const RowNormSpec& spec, const std::string& where, const View<const T>& x,
                   const Affine<P>& p, const View<T>& y) {
  check_x(spec, where, "x", x);
  if (!same_dims(x, y)) fail(where, "y", "dims " + x.str() + " (those of x)", y.str());
  require_data(where, "y", y);
  check_params(spec, where, x, p);
  if (partial_overlap(y, x)) fail(where, "y", "x itself or memory disjoint from x", "a partial overlap");
  if (any_overlap(y, p.gamma) || any_overlap(y, p.beta))
    fail(where, "y", "memory disjoint from gamma and beta", "an overlap");
}

// The checks of a fused residual forward beyond check_forward's (r, s, alpha, and how
// s may alias x, r, y and the parameters), before any write. P: T, or float for narrow
// storage.
template <class T, class P>
void check_residual(const std::string& where, const View<const T>& x, const View<T>& y,
                    const Affine<P>& p, const Residual<T>& res) {
  // s may be x or r itself (in place); y may be x or r, but not s (both are returned).
  if (!same_dims(res.r, x)) fail(where, "r", "dims " + x.str() + " (those of x)", res.r.str());
  require_data(where, "r", res.r);
  if (!same_dims(res.s, x)) fail(where, "s", "dims " + x.str() + " (those of x)", res.s.str());
  require_data(where, "s", res.s);
  if (!std::isfinite(res.alpha)) fail(where, "alpha", "a finite value", std::to_string(res.alpha));
  if (partial_overlap(y, res.r)) fail(where, "y", "r itself or memory disjoint from r", "a partial overlap");
  if (partial_overlap(res.s, x) || partial_overlap(res.s, res.r))
    fail(where, "s", "x itself, r itself, or memory disjoint from both", "a partial overlap");
  if (any_overlap(res.s, y)) fail(where, "s", "memory disjoint from y", "an overlap");
  if (any_overlap(res.s, p.gamma) || any_overlap(res.s, p.beta))
    fail(where, "s", "memory disjoint from gamma and beta", "an overlap");
}

// Sizes forward's saved statistics for `rows` rows (mean and mean_lo empty when not
// centring); rows of no elements get NaN statistics. Returns whether any row has work.
template <bool Center, class S>
bool prepare_saved(RowStats<S>& saved, Index rows, Index n) {
  if (Center) {
    if (saved.mean.size() != rows) saved.mean.resize(rows);
    if (saved.mean_lo.size() != rows) saved.mean_lo.resize(rows);
  } else {
    saved.mean.resize(0);
    saved.mean_lo.resize(0);
  }
  if (saved.rstd.size() != rows) saved.rstd.resize(rows);
  if (n == 0) {  // empty rows: statistics of nothing are undefined
    for (Index r = 0; r < rows; ++r) {
      saved.rstd(r) = static_cast<S>(kNaN);
      if (Center) saved.mean(r) = saved.mean_lo(r) = static_cast<S>(kNaN);
    }
    return false;
  }
  return rows > 0;
}

template <class Isa, class T, bool Center>
void forward(const RowNormSpec& spec, const View<const T>& x, const Affine<T>& p,
             const View<T>& y, RowStats<T>& saved, const Exec& device,
             const Residual<T>* res = nullptr) {
  const std::string where = std::string(spec.op) + (res ? "::forward_residual" : "::forward");
  check_forward(spec, where, x, p, y);
  if (res) check_residual(where, x, y, p, *res);

  const Index n = x.inner(spec.k);
  const Index rows = x.outer(spec.k);
  if (!prepare_saved<Center>(saved, rows, n)) return;

  const RowPass<T> q{x.data, y.data, n, rows, p.gamma.data, p.beta.data, 0,
                     Center ? saved.mean.data() : nullptr, Center ? saved.mean_lo.data() : nullptr,
                     saved.rstd.data(), stream_output<T>(x.size())};
  forward_rows<Isa, T, Center>(spec, q, device, res);
}

// ---------------------------------------------------------------------------------
// Backward.
//
// With xhat = (x - mean) * rstd and y = xhat * gamma + beta, let g = dy * gamma. Then
//   dL/dxhat_i = g_i
//   dxhat_i/dx_j = rstd * (delta_ij - 1/n - xhat_i * xhat_j / n)      (LayerNorm)
// so dx_j = rstd * (g_j - mean(g) - xhat_j * mean(g * xhat)):
//   term 1: g_j            the direct path through x_j
//   term 2: - mean(g)      through the mean
//   term 3: - xhat_j mean(g xhat)   through rstd
// RMSNorm has no mean: term 2 vanishes and dxhat_i/dx_j = rstd (delta_ij - xhat_i xhat_j
// / n). With eps outside the sqrt, y = x / (r + eps), r = sqrt(mean(x^2)), term 3 gains
// the factor (r + eps) / r = 1 / (1 - eps * rstd).
// dgamma = sum over rows of dy * xhat; dbeta = sum over rows of dy.

// The rows of one backward call on raw pointers, after the checks. dx, dgamma, dbeta:
// nullptr when skipped. mean and mean_lo: nullptr for RMSNorm.
template <class T>
struct RowGradPass {
  const T* dy;
  const T* x;
  T* dx;
  Index n, rows;
  const T* gamma;
  const T* mean;
  const T* mean_lo;
  const T* rstd;
  T* dgamma;
  T* dbeta;
  Index total;  // elements of the whole tensor (decides streaming)
};

template <class Isa, class T, bool Center>
void backward_pass(const RowNormSpec& spec, const RowGradPass<T>& q, const Exec& device) {
  const Index n = q.n, rows = q.rows;
  if (spec.ada) {
    // AdaNorm: no parameters; each row on its own.
    if (!q.dx || rows == 0 || n == 0) return;
    const Eigen::TensorOpCost cost(2.0 * static_cast<double>(n) * sizeof(T),
                                   static_cast<double>(n) * sizeof(T), 8.0 * static_cast<double>(n));
    with_bool(spec.ada_full_grad, [&](auto Full) {
      parallel_for<Isa>(device, rows, cost, [&](Index r0, Index r1) {
        for (Index r = r0; r < r1; ++r)
          kernels::adanorm_backward<Isa, T, decltype(Full)::value>(
              q.dy + r * n, q.x + r * n, q.dx + r * n, n, {q.mean[r], q.mean_lo[r], q.rstd[r]},
              static_cast<T>(spec.ada_c), static_cast<T>(spec.ada_k));
      });
    });
    return;
  }
  const bool want_dx = (q.dx != nullptr);
  const bool want_param = (q.dgamma != nullptr) || (q.dbeta != nullptr);
  if (rows == 0 || n == 0 || (!want_dx && !want_param)) {
    if ((q.dgamma != nullptr)) std::fill(q.dgamma, q.dgamma + n, T(0));
    if ((q.dbeta != nullptr)) std::fill(q.dbeta, q.dbeta + n, T(0));
    return;
  }

  const T* gamma = q.gamma;
  const bool stream = want_dx && stream_output<T>(q.total);
  // Whether every row's dx starts its vector body at the same column: streamed rows
  // first peel a scalar head that aligns dx, which differs between rows unless their
  // length is a multiple of 64 bytes. Four rows in step need it (and must not fall in
  // the same L1 sets: rows_alias_in_l1), and so do the float stages below.
  const Index row_bytes = n * static_cast<Index>(sizeof(T));
  const bool same_columns = !stream || row_bytes % 64 == 0;
  const double dn = static_cast<double>(n);
  const Index chunks = want_param ? reduce_chunks(rows) : 0;
  // 0: no parameter gradients; 1: dgamma; 2: dgamma and dbeta (both accumulated when
  // either is asked for: the second costs little once the row is loaded).
  const int param_grads = want_param ? (spec.shift ? 2 : 1) : 0;
  const Index acc_arrays = param_grads;
  // Streamed rows whose x, dy and gamma with the double accumulators fit in 3/4 of L1 go
  // one at a time, each straight into the doubles (no stage), the second pass prefetching
  // the whole of a later row (backward_lone_rows).
  const bool lone_rows = stream && backward_lone_rows(row_bytes, acc_arrays * n * 8);
  const bool group_rows = same_columns && !rows_alias_in_l1(row_bytes) && !lone_rows;
  // Per-chunk double accumulators for dgamma (and dbeta), each array on a line's
  // boundary (line_array): chunk c owns acc[slot(c) + a * na, ... + n).
  const Index na = line_stride(n);
  const auto slot = [&](Index c) { return c * acc_arrays * na; };
  const LineArray<double> acc = line_array<double>(slot(chunks));
  std::fill(acc.get(), acc.get() + slot(chunks), 0.0);
  // Per-chunk stages in T for rows walked one at a time (kernels::StagedAcc), on vector
  // backends for float (where the widening to double is the cost), laid out as acc;
  // allocated only where some chunk has such rows (rows not grouped, or a chunk's row
  // count not a multiple of 4).
  // Not without same_columns: a stage's rows would leave its columns unwritten or read
  // them stale.
  const bool stage = kernels::kWidens<Isa, T> && same_columns && !lone_rows;
  bool single_rows = !group_rows;
  for (Index c = 0; c < chunks && !single_rows; ++c)
    single_rows = (chunk_begin(c + 1, rows, chunks) - chunk_begin(c, rows, chunks)) % 4 != 0;
  // Not zeroed: a stage's first row stores it before any row reads it (Stage::First).
  const LineArray<T> stage_buf = stage && single_rows ? line_array<T>(slot(chunks)) : nullptr;

  constexpr bool kC = Center;
  with_scale(spec.scale, [&](auto S) {
    with_bool(want_dx, [&](auto Dx) {
      with_param_grads(param_grads, [&](auto Pg) {
        with_bool(stream, [&](auto St) {
          constexpr ScaleKind kS = decltype(S)::value;
          constexpr bool kDx = decltype(Dx)::value, kSt = decltype(St)::value;
          constexpr int kPg = decltype(Pg)::value;
          if constexpr ((!kC && kPg == 2) ||
                        (!kDx && kSt) || (kS == ScaleKind::None && kPg > 0)) {
            return;
          } else {
            // Rows go through the second pass four at a time (see backward_rows), the
            // remainder one at a time; the grouping depends on the row range only.
            // Memory. The rows of a group (four rows, or one) are read twice: by the first
            // pass (backward_sums, row by row) and the second (backward_rows, the group in
            // step). Both passes prefetch the next group into L2, half of it each (the first
            // pass at half its own pace, the second at k/2 times its pace), so that memory
            // stays busy throughout while both passes read the current group from cache.
            // Lone rows (backward_lone_rows) instead leave all of it to the second pass.
            auto next_part = [&](const T* base, Index g0, Index k, Index off, Index len, int rate) {
              const Index lo = std::min((g0 + k) * n + off, rows * n);
              const Index hi = std::min(lo + len, rows * n);
              return kernels::Prefetch(base + lo, hi - lo, true, rate);
            };
            auto prepare = [&](auto& args, int j, Index g0, Index k) {
              const Index r = g0 + j;
              const T* dyr = q.dy + r * n;
              const T* xr = q.x + r * n;
              args.dy[j] = dyr;
              args.x[j] = xr;
              args.dx[j] = kDx ? q.dx + r * n : nullptr;
              args.ra[j] = {kC ? q.mean[r] : T(0), kC ? q.mean_lo[r] : T(0), q.rstd[r]};
              args.a[j] = args.b[j] = T(0);
              if (kDx) {
                double sum_g = 0.0, sum_gx = 0.0;
                const Index half = n / 2, off = j * half;
                // Half the next group at half this pass's pace (lone rows: none).
                auto first_part = [&](const T* base) {
                  return lone_rows ? kernels::Prefetch() : next_part(base, g0, k, off, half, -1);
                };
                kernels::backward_sums<Isa, T, kC, kS>(dyr, xr, gamma, n, args.ra[j], sum_g, sum_gx,
                                                       first_part(q.dy), first_part(q.x));
                double mean_gx = sum_gx / dn;
                if (spec.eps_outside) mean_gx /= 1.0 - spec.eps * static_cast<double>(args.ra[j].rstd);
                args.a[j] = kC ? static_cast<T>(sum_g / dn) : T(0);
                args.b[j] = static_cast<T>(mean_gx);
              }
            };
            auto do_rows = [&](Index r0, Index r1, double* dg_acc, double* db_acc, T* stg) {
              Index r = r0;
              // The second pass's share of the next group (of k rows): the part the first
              // pass does not prefetch, all of it without a first pass; lone rows: all of
              // the row `ahead` rows past the next.
              const Index first = kDx && !lone_rows ? n / 2 : 0;
              const Index ahead = lone_rows ? prefetch_ahead_rows(row_bytes) : 0;
              auto second = [&](const T* base, Index g0, Index k) {
                const int rate = (k == 4 ? 2 : 0) - (first ? 1 : 0);  // log2 of k (n - first) / n
                return next_part(base, g0 + ahead, k, k * first, k * (n - first), rate);
              };
              if (group_rows) {
                for (; r + 4 <= r1; r += 4) {
                  kernels::RowsArgs<T, 4> args;
                  for (int j = 0; j < 4; ++j) prepare(args, j, r, 4);
                  kernels::backward_rows<Isa, T, 4, kC, kS, kDx, (kPg > 0), (kPg > 1), kSt>(
                      args, gamma, n, dg_acc, db_acc, second(q.dy, r, 4), second(q.x, r, 4));
                }
              }
              // Single rows stage their parameter terms four rows at a time (the stages
              // depend on the row range only).
              const Index single0 = r;
              for (; r < r1; ++r) {
                kernels::RowsArgs<T, 1> args;
                prepare(args, 0, r, 1);
                kernels::StagedAcc<T> sa;
                if (stage_buf && kPg > 0) {
                  const Index j = (r - single0) % 4, left = r1 - r;
                  using kernels::Stage;
                  sa.g = stg;
                  sa.b = acc_arrays > 1 ? stg + na : nullptr;
                  sa.stage = j == 0 ? (left == 1 ? Stage::Lone : Stage::First)
                                    : (j == 3 || left == 1 ? Stage::Last : Stage::Mid);
                }
                kernels::backward_rows<Isa, T, 1, kC, kS, kDx, (kPg > 0), (kPg > 1), kSt>(
                    args, gamma, n, dg_acc, db_acc, second(q.dy, r, 1), second(q.x, r, 1), sa);
              }
              if (kSt) Isa::fence();
            };
            const double bytes = static_cast<double>(row_bytes);
            if (kPg > 0) {
              const Eigen::TensorOpCost cost(2.0 * bytes * static_cast<double>(rows / chunks),
                                             bytes * static_cast<double>(rows / chunks),
                                             6.0 * static_cast<double>(n * (rows / chunks)));
              parallel_for<Isa>(device, chunks, cost, [&](Index c0, Index c1) {
                for (Index c = c0; c < c1; ++c) {
                  double* base = acc.get() + slot(c);
                  do_rows(chunk_begin(c, rows, chunks), chunk_begin(c + 1, rows, chunks), base,
                          acc_arrays > 1 ? base + na : nullptr,
                          stage_buf ? stage_buf.get() + slot(c) : nullptr);
                }
              });
            } else {
              const Eigen::TensorOpCost cost(2.0 * bytes, bytes, 6.0 * static_cast<double>(n));
              parallel_for<Isa>(device, rows, cost,
                           [&](Index r0, Index r1) { do_rows(r0, r1, nullptr, nullptr, nullptr); });
            }
          }
        });
      });
    });
  });

  if (!want_param) return;
  // Combine the chunks in chunk order, independently per column: deterministic. Columns
  // in blocks, chunks outer within a block, so every pass streams contiguous doubles
  // (chunk arrays lie n * 8 bytes apart: walking down a column would hit one cache set).
  constexpr Index kBlock = 512;
  const Index blocks = (n + kBlock - 1) / kBlock;
  const Eigen::TensorOpCost cost(static_cast<double>(chunks * acc_arrays * kBlock) * 8.0,
                                 static_cast<double>(acc_arrays * kBlock) * sizeof(T),
                                 static_cast<double>(chunks * acc_arrays * kBlock));
  parallel_for<Isa>(device, blocks, cost, [&](Index b0, Index b1) {
    double sg[kBlock], sb[kBlock];
    for (Index blk = b0; blk < b1; ++blk) {
      const Index j0 = blk * kBlock, len = std::min(kBlock, n - j0);
      std::fill(sg, sg + len, 0.0);
      std::fill(sb, sb + len, 0.0);
      for (Index c = 0; c < chunks; ++c) {
        const double* base = acc.get() + slot(c) + j0;
        for (Index j = 0; j < len; ++j) sg[j] += base[j];
        if (acc_arrays > 1)
          for (Index j = 0; j < len; ++j) sb[j] += base[na + j];
      }
      if ((q.dgamma != nullptr))
        for (Index j = 0; j < len; ++j) q.dgamma[j0 + j] = static_cast<T>(sg[j]);
      if ((q.dbeta != nullptr))
        for (Index j = 0; j < len; ++j) q.dbeta[j0 + j] = static_cast<T>(sb[j]);
    }
  });
}

// The checks of a backward call, all before any write. T: the data's type; P: the
// parameters' and their gradients' (T, or float for narrow storage); S: the saved
// statistics' (T, or float for narrow storage).
template <bool Center, class T, class P, class S>
void check_backward(const RowNormSpec& spec, const std::string& where, const View<const T>& dy,
                    const View<const T>& x, const Affine<P>& p, const RowStats<S>& saved,
                    const View<T>& dx, const View<P>& dgamma, const View<P>& dbeta) {
  check_x(spec, where, "x", x);
  if (!same_dims(dy, x)) fail(where, "dy", "dims " + x.str() + " (those of x)", dy.str());
  require_data(where, "dy", dy);
  check_params(spec, where, x, p);
  check_saved<Center>(where, saved, x.outer(spec.k));
  if (dx.present && !same_dims(dx, x)) fail(where, "dx", "dims " + x.str() + " (those of x)", dx.str());
  require_data(where, "dx", dx);
  if (dgamma.present && spec.scale == ScaleKind::None)
    fail(where, "dgamma", "normkit::skip (the functor has no gamma)", dgamma.str());
  if (dbeta.present && !spec.shift)
    fail(where, "dbeta", "normkit::skip (the functor has no beta)", dbeta.str());
  if (dgamma.present && !matches_inner(dgamma, x, spec.k))
    fail(where, "dgamma", "dims " + inner_str(x, spec.k), dgamma.str());
  if (dbeta.present && !matches_inner(dbeta, x, spec.k))
    fail(where, "dbeta", "dims " + inner_str(x, spec.k), dbeta.str());
  require_data(where, "dgamma", dgamma);
  require_data(where, "dbeta", dbeta);
  if (partial_overlap(dx, x) || partial_overlap(dx, dy))
    fail(where, "dx", "dy itself, x itself, or memory disjoint from both", "a partial overlap");
  for (const View<P>* o : {&dgamma, &dbeta}) {
    const char* name = o == &dgamma ? "dgamma" : "dbeta";
    if (any_overlap(*o, x) || any_overlap(*o, dy) || any_overlap(*o, dx) ||
        any_overlap(*o, p.gamma) || any_overlap(*o, p.beta))
      fail(where, name, "memory disjoint from every other argument", "an overlap");
  }
  if (any_overlap(dgamma, dbeta)) fail(where, "dbeta", "memory disjoint from dgamma", "an overlap");
  if (any_overlap(dx, p.gamma) || any_overlap(dx, p.beta))
    fail(where, "dx", "memory disjoint from gamma and beta", "an overlap");
}

template <class Isa, class T, bool Center>
void backward(const RowNormSpec& spec, const View<const T>& dy, const View<const T>& x,
              const Affine<T>& p, const RowStats<T>& saved, const View<T>& dx,
              const View<T>& dgamma, const View<T>& dbeta, const Exec& device) {
  const std::string where = std::string(spec.op) + "::backward";
  check_backward<Center>(spec, where, dy, x, p, saved, dx, dgamma, dbeta);
  const Index n = x.inner(spec.k);
  const Index rows = x.outer(spec.k);
  const RowGradPass<T> q{dy.data, x.data, dx.present ? dx.data : nullptr, n, rows, p.gamma.data,
                         Center ? saved.mean.data() : nullptr,
                         Center ? saved.mean_lo.data() : nullptr, saved.rstd.data(),
                         dgamma.present ? dgamma.data : nullptr,
                         dbeta.present ? dbeta.data : nullptr, x.size()};
  backward_pass<Isa, T, Center>(spec, q, device);
}

// The checks of a fused residual backward beyond the norm's backward's (ds, dr, dx's
// dims, alpha, and the aliasing rules of the three gradients), before any write. P: T, or
// float for narrow storage.
template <class T, class P>
void check_residual_backward(const RowNormSpec& spec, const std::string& where,
                             const View<const T>& ds,
                             const View<const T>& dy, const View<const T>& s, const Affine<P>& p,
                             double alpha, const View<T>& dx, const View<T>& dr,
                             const View<P>& dgamma, const View<P>& dbeta) {
  check_x(spec, where, "s", s);
  if (ds.present && !same_dims(ds, s)) fail(where, "ds", "dims " + s.str() + " (those of s)", ds.str());
  require_data(where, "ds", ds);
  if (dr.present && !same_dims(dr, s)) fail(where, "dr", "dims " + s.str() + " (those of s)", dr.str());
  require_data(where, "dr", dr);
  if (dx.present && !same_dims(dx, s)) fail(where, "dx", "dims " + s.str() + " (those of s)", dx.str());
  if (!std::isfinite(alpha)) fail(where, "alpha", "a finite value", std::to_string(alpha));
  if (any_overlap(dx, ds)) fail(where, "dx", "memory disjoint from ds", "an overlap");
  if (partial_overlap(dr, ds)) fail(where, "dr", "ds itself or memory disjoint from ds", "a partial overlap");
  if (any_overlap(dx, dr)) fail(where, "dr", "memory disjoint from dx", "an overlap");
  if (any_overlap(dr, dy) || any_overlap(dr, s) || any_overlap(dr, p.gamma) ||
      any_overlap(dr, p.beta) || any_overlap(dr, dgamma) || any_overlap(dr, dbeta))
    fail(where, "dr", "memory disjoint from dy, s, the parameters and their gradients", "an overlap");
  if (any_overlap(ds, dgamma) || any_overlap(ds, dbeta))
    fail(where, "ds", "memory disjoint from dgamma and dbeta", "an overlap");
}

// Fused residual, backward: s = alpha x + r fed y = norm(s) and the residual stream, so
// the gradient reaching s is t = g + ds, g = norm's backward at s (dy), ds = dL/ds from
// downstream (normkit::skip: 0, as in a post-norm block where only y is used). Then
// dx = alpha t and dr = t. Two passes: the norm's backward writes g into dx (or dr, or a
// temporary when dr is ds itself and dx is skipped), then residual_grad combines.
template <class Isa, class T, bool Center>
void backward_residual(const RowNormSpec& spec, const View<const T>& ds, const View<const T>& dy,
                       const View<const T>& s, const Affine<T>& p, const RowStats<T>& saved,
                       double alpha, const View<T>& dx, const View<T>& dr, const View<T>& dgamma,
                       const View<T>& dbeta, const Exec& device) {
  const std::string where = std::string(spec.op) + "::backward_residual";
  check_residual_backward(spec, where, ds, dy, s, p, alpha, dx, dr, dgamma, dbeta);
  // The norm's backward checks dy, s, params, saved, dx, dgamma and dbeta (before any
  // write, since the target is dx or dr or a temporary).
  const bool want = dx.present || dr.present;
  std::vector<T> tmp;
  View<T> target = dx.present ? dx : dr;
  if (!dx.present && dr.present && ds.present && any_overlap(dr, ds)) {
    tmp.resize(static_cast<std::size_t>(s.size()));
    target.data = tmp.data();
  }
  backward<Isa, T, Center>(spec, dy, s, p, saved, want ? target : View<T>{}, dgamma, dbeta, device);
  if (!want || s.size() == 0) return;
  const Index n = s.inner(spec.k), rows = s.outer(spec.k);
  const T a = static_cast<T>(alpha);
  const Eigen::TensorOpCost cost(2.0 * static_cast<double>(n) * sizeof(T),
                                 2.0 * static_cast<double>(n) * sizeof(T), 2.0 * static_cast<double>(n));
  with_bool(ds.present, [&](auto Ds) {
    with_bool(dx.present, [&](auto Dx) {
      with_bool(dr.present, [&](auto Dr) {
        constexpr bool kDs = decltype(Ds)::value, kDx = decltype(Dx)::value, kDr = decltype(Dr)::value;
        parallel_for<Isa>(device, rows, cost, [&](Index r0, Index r1) {
          for (Index r = r0; r < r1; ++r)
            kernels::residual_grad<Isa, T, kDs, kDx, kDr>(
                target.data + r * n, kDs ? ds.data + r * n : nullptr,
                kDx ? dx.data + r * n : nullptr, kDr ? dr.data + r * n : nullptr, n, a);
        });
      });
    });
  });
}

}  // namespace detail
}  // namespace normkit
