// normkit: the channel-norm engine shared by BatchNorm, GroupNorm and InstanceNorm.
// Checks arguments, computes the statistics of each group of elements, and runs the
// element-wise kernels of channel_kernels.hpp on a device. Knows no ISA.
//
// The data is (N, C, M) by memory order, M the product of the spatial extents: channels
// first ((n * C + c) * M + m) or channels last ((n * M + m) * C + c). A statistic is taken
//   - BatchNorm: per channel c over all (n, m): C statistics;
//   - GroupNorm: per (n, group g) over the group's C / G channels and all m: N * G;
//   - InstanceNorm: GroupNorm with G = C: N * C statistics.
//
// Statistics (both formats, the same algorithm): sums shifted by a member of the group
// near its centre (group_shift: the median of its first 5 elements, the same elements
// in both formats). Float data in one pass: d = x - shift and d^2 summed in short float
// trees, then in double (kernels::blocked_sums), var = s2/n - (s/n)^2; groups where that
// cannot be trusted (overflow, underflow, or a shift more than 2 standard deviations
// from the mean) are summed again exactly in double. Double data in two passes (a
// shifted mean, then the same sums about it), with a power-of-two rescale when double
// data's squares leave double's range. Channels first sums contiguous
// segments; channels last sums down columns; only the order of the double additions
// differs between the two.
//
// Threads: each statistic is reduced by one thread in a fixed order, except BatchNorm
// channels last, whose column sums are taken over a fixed number of row chunks (a
// function of the row count only) and combined in chunk order. Results are bitwise
// identical for any number of threads.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../common.hpp"
#include "channel_kernels.hpp"
#include "config.hpp"
#include "plan.hpp"
#include "row_norm.hpp"
#include "tensor_view.hpp"

namespace normkit {
namespace detail {
namespace channel {

enum class Kind { Batch, Group, Instance };

struct Spec {
  const char* op;  // "BatchNorm", "GroupNorm", "InstanceNorm": for messages
  Kind kind;
  ChannelFormat format;
  int groups;  // GroupNorm only
  double eps;
  std::optional<double> momentum;  // nullopt: cumulative average
  AffineMode affine;
};

inline Spec make_spec(const char* op, Kind kind, ChannelFormat format, int groups, double eps,
                      std::optional<double> momentum, AffineMode affine) {
  const std::string where = std::string(op) + "::" + op;
  if (kind == Kind::Group && groups < 1)
    fail(where, "groups", "a value >= 1", std::to_string(groups));
  if (!(eps >= 0.0) || std::isinf(eps)) fail(where, "eps", "a finite value >= 0", std::to_string(eps));
  if (momentum && !(*momentum >= 0.0 && *momentum <= 1.0))
    fail(where, "momentum", "a value in [0, 1] or std::nullopt (cumulative average)",
         std::to_string(*momentum));
  return {op, kind, format, groups, eps, momentum, affine};
}

struct GlobalGrad {
  const ChannelGradSums* sums;
  double count;
};

// ---------------------------------------------------------------------------------
// Geometry.

struct Geo {
  Index N = 0, C = 0, M = 0;
  Index G = 1, Cg = 1;  // groups and channels per group (per-sample statistics)
  bool last = false;
  bool batch = false;   // statistics per channel across samples (BatchNorm, and eval)

  Index stats() const { return batch ? C : N * G; }
  Index count() const { return batch ? N * M : Cg * M; }
  Index stat_of(Index n, Index c) const { return batch ? c : n * G + c / Cg; }
  Index at(Index n, Index c, Index m) const {
    return last ? (n * M + m) * C + c : (n * C + c) * M + m;
  }
  // The samples [n0, n1) and channels [c0, c1) of statistic s.
  struct Range {
    Index n0, n1, c0, c1;
  };
  Range range(Index s) const {
    if (batch) return {0, N, s, s + 1};
    return {s / G, s / G + 1, (s % G) * Cg, (s % G) * Cg + Cg};
  }
};

template <class T>
Geo geometry(const Spec& spec, const View<const T>& x, bool batch_stats) {
  Geo g;
  const int r = x.rank;
  g.N = x.dims[static_cast<std::size_t>(r - 1)];
  g.last = spec.format == ChannelFormat::Last;
  g.C = g.last ? x.dims[0] : x.dims[static_cast<std::size_t>(r - 2)];
  g.M = 1;
  for (int i = g.last ? 1 : 0; i < (g.last ? r - 1 : r - 2); ++i)
    g.M *= x.dims[static_cast<std::size_t>(i)];
  g.batch = batch_stats;
  if (spec.kind == Kind::Group) g.G = spec.groups;
  if (spec.kind == Kind::Instance) g.G = g.C;
  g.Cg = g.G > 0 && g.C % g.G == 0 && g.C > 0 ? g.C / g.G : 1;
  if (batch_stats) g.G = 1, g.Cg = 1;
  return g;
}

inline std::string format_str(const Spec& spec) {
  return spec.format == ChannelFormat::First ? "channels first (N, C, spatial...)"
                                             : "channels last (N, spatial..., C)";
}

// ---------------------------------------------------------------------------------
// Argument checks. All run before any output is touched.

template <class T>
Geo check_x(const Spec& spec, const std::string& where, const char* name, const View<const T>& x,
            bool batch_stats) {
  if (x.rank < 2)
    fail(where, name, "rank >= 2 (N, C, spatial...) in memory order, " + format_str(spec),
         "rank " + std::to_string(x.rank));
  require_data(where, name, x);
  Geo g = geometry(spec, x, batch_stats);
  if (spec.kind == Kind::Group && g.C % spec.groups != 0)
    fail(where, name,
         "a channel count divisible by groups = " + std::to_string(spec.groups),
         std::to_string(g.C) + " channels (dims " + x.str() + ", " + format_str(spec) + ")");
  return g;
}

template <class A>
void check_channels(const std::string& where, const char* name, const View<A>& v, Index C) {
  if (v.present && (v.rank != 1 || v.dims[0] != C))
    fail(where, name, "dims [" + std::to_string(C) + "] (one per channel)", v.str());
  require_data(where, name, v);
}

template <class T>
void check_params(const Spec& spec, const std::string& where, const Affine<T>& p, Index C) {
  const bool want_g = spec.affine != AffineMode::None;
  const bool want_b = spec.affine == AffineMode::ScaleShift;
  const auto what = [](bool g, bool b) {
    return std::string(g ? (b ? "gamma and beta" : "gamma only") : (b ? "beta only" : "none"));
  };
  if (want_g != p.gamma.present || want_b != p.beta.present)
    fail(where, "params", what(want_g, want_b) + " (as the functor's affine mode says)",
         what(p.gamma.present, p.beta.present));
  check_channels(where, "gamma", p.gamma, C);
  check_channels(where, "beta", p.beta, C);
}

template <class T>
void check_running(const Spec& spec, const std::string& where, const Running<T>& run, Index C,
                   bool required, bool updates) {
  if (!run.present()) {
    if (required)
      fail(where, "running", "running mean and var of " + std::to_string(C) + " channels",
           "none");
    return;
  }
  if (!run.mean.present || !run.var.present)
    fail(where, "running", "both mean and var", run.mean.present ? "mean only" : "var only");
  check_channels(where, "running.mean", run.mean, C);
  check_channels(where, "running.var", run.var, C);
  if (any_overlap(run.mean, run.var))
    fail(where, "running.var", "memory disjoint from running.mean", "an overlap");
  if (updates && !spec.momentum && run.num_batches_tracked == nullptr)
    fail(where, "running.num_batches_tracked",
         "a counter (momentum is the cumulative average, which needs it)", "nullptr");
}

template <class T>
void check_saved(const std::string& where, const RowStats<T>& s, Index stats,
                 const std::string& what) {
  auto check = [&](const char* name, const Eigen::Tensor<T, 1>& t) {
    if (t.size() != stats)
      fail(where, name, std::to_string(stats) + " elements (" + what + ", from forward)",
           std::to_string(t.size()));
  };
  check("saved.mean", s.mean);
  check("saved.mean_lo", s.mean_lo);
  check("saved.rstd", s.rstd);
}

inline std::string stats_what(const Spec& spec) {
  switch (spec.kind) {
    case Kind::Batch: return "one per channel";
    case Kind::Group: return "one per (sample, group)";
    default: return "one per (sample, channel)";
  }
}

// ---------------------------------------------------------------------------------
// Statistics.

// Moments of one statistic group in scaled form: the data were multiplied by scale (a
// power of two, 1 unless double data's squares left double's range).
// m2_s = sum (x scale - mean_s)^2: the form data-parallel BatchNorm exchanges, so that a
// batch in one shard and the same batch through partial_stats and forward_global give
// bitwise the same numbers.
struct Mom {
  double count = 0.0;
  double mean_s = 0.0;
  double m2_s = 0.0;
  double scale = 1.0;
};

inline Mom finish(double count, double center, double s, double s2, double scale = 1.0) {
  const double md = s / count;
  return {count, center + md, std::max(s2 - s * md, 0.0), scale};
}

inline bool squares_in_range(double s2) { return s2 == 0.0 || (s2 < kSumSqHuge && s2 > kSumSqTiny); }

// Calls f(value) for each element of statistic s, in (n, c, m) order.
template <class T, class F>
void for_each_in_stat(const Geo& g, const T* x, Index s, F&& f) {
  const Geo::Range q = g.range(s);
  for (Index n = q.n0; n < q.n1; ++n)
    for (Index c = q.c0; c < q.c1; ++c)
      for (Index m = 0; m < g.M; ++m) f(x[g.at(n, c, m)]);
}

// Double data whose sum of squares left (2^-900, 2^900): redo the group rescaled by a
// power of two, element by element in (n, c, m) order (both formats alike).
template <class T>
Mom rescaled_moments(const Geo& g, const T* x, Index s) {
  const double count = static_cast<double>(g.count());
  double mx = 0.0;
  bool bad = false;
  for_each_in_stat(g, x, s, [&](T v) {
    const double a = std::fabs(static_cast<double>(v));
    if (!(a <= DBL_MAX)) bad = true;
    else mx = std::max(mx, a);
  });
  if (bad) return {count, kNaN, kNaN, 1.0};
  if (mx == 0.0) return {count, 0.0, 0.0, 1.0};
  const double scale = rescale_for(mx);
  double first = 0.0;
  bool have = false;
  double s1 = 0.0;
  for_each_in_stat(g, x, s, [&](T v) {
    const double d = static_cast<double>(v) * scale;
    if (!have) first = d, have = true;
    s1 += d - first;
  });
  const double m1 = first + s1 / count;
  double a = 0.0, b = 0.0;
  for_each_in_stat(g, x, s, [&](T v) {
    const double d = static_cast<double>(v) * scale - m1;
    a += d;
    b += d * d;
  });
  return finish(count, m1, a, b, scale);
}

// The shift of statistic s's sums: the lower median of its first (up to) 5 elements in
// (n, c, m) order, the same elements in both formats. A member of the group, near its
// centre unless 3 of those 5 are outliers: the float-blocked sums lose accuracy as
// (mean - shift)^2 / var grows (kernels::blocked_sums_trusted sends a group to the exact
// kernels past 4), and one outlier first element no longer decides the shift. For
// normal data the median of 5 lies beyond 2 standard deviations with probability 2.4e-4.
constexpr int kShiftSample = 5;

// The first element of statistic s (whose line group_shift reads first).
template <class T>
const T* stat_begin(const Geo& g, const T* x, Index s) {
  const Geo::Range q = g.range(s);
  return x + g.at(q.n0, q.c0, 0);
}

// Prefetches the line group_shift(s) will read: its loads would otherwise stall on
// memory's latency before the sums of the group can start (a whole pass of short
// InstanceNorm groups lost a third of its speed to it).
template <class T>
void prefetch_stat(const Geo& g, const T* x, Index s) {
  if (s < g.stats() && g.count() > 0) __builtin_prefetch(stat_begin(g, x, s), 0, 3);
}

template <class T>
T group_shift(const Geo& g, const T* x, Index s) {
  T v[kShiftSample];
  int k = 0;
  const Geo::Range q = g.range(s);
  for (Index n = q.n0; n < q.n1 && k < kShiftSample; ++n)
    for (Index c = q.c0; c < q.c1 && k < kShiftSample; ++c)
      for (Index m = 0; m < g.M && k < kShiftSample; ++m) v[k++] = x[g.at(n, c, m)];
  return kernels::median_of_5(v, k);
}

// Moments of statistic s, channels first: its elements are segments of M contiguous
// values (BatchNorm: one per sample; per-sample statistics: one contiguous run).
template <class Isa, class T>
Mom moments_first(const Geo& g, const T* x, Index s) {
  const double count = static_cast<double>(g.count());
  if (g.count() == 0) return {0.0, kNaN, kNaN, 1.0};
  // The segments of statistic s: (pointer, length) pairs.
  const Index segs = g.batch ? g.N : 1;
  const Index len = g.batch ? g.M : g.Cg * g.M;
  const Geo::Range q = g.range(s);
  auto seg = [&](Index i) { return x + g.at(q.n0 + i, q.c0, 0); };
  const T fshift = group_shift(g, x, s);
  const double shift = static_cast<double>(fshift);
  double a = 0.0, b = 0.0;
  // While one segment is summed, the next is prefetched (see kernels::Prefetch).
  auto next = [&](Index i) {
    return i + 1 < segs ? kernels::Prefetch(seg(i + 1), len) : kernels::Prefetch();
  };
  if constexpr (sizeof(T) <= sizeof(float)) {
    // The fast blocked sums, or the exact double ones when they cannot be trusted.
    for (Index i = 0; i < segs; ++i) {
      double sa, sb;
      kernels::blocked_sums<Isa>(seg(i), len, fshift, sa, sb, next(i));
      a += sa;
      b += sb;
    }
    if (kernels::blocked_sums_trusted<T>(a, b, count)) return finish(count, shift, a, b);
    a = b = 0.0;
    for (Index i = 0; i < segs; ++i) {
      double sa, sb;
      kernels::shifted_sums<Isa>(seg(i), len, 1.0, shift, sa, sb, next(i));
      a += sa;
      b += sb;
    }
    return finish(count, shift, a, b);
  } else {
    for (Index i = 0; i < segs; ++i) a += kernels::sum<Isa>(seg(i), len, 1.0, shift, next(i));
    const double m1 = shift + a / count;
    a = 0.0;
    for (Index i = 0; i < segs; ++i) {
      double sa, sb;
      kernels::shifted_sums<Isa>(seg(i), len, 1.0, m1, sa, sb);
      a += sa;
      b += sb;
    }
    if (!squares_in_range(b) && !std::isnan(b)) return rescaled_moments(g, x, s);
    return finish(count, m1, a, b);
  }
}

// Per-sample statistics (GroupNorm, InstanceNorm), channels last, of groups [g0, g1) of
// sample n: column sums down its M rows, then sums over each group's columns. out
// receives the moments of those groups (out[grp]). scratch: 3 * C doubles; fshift: C
// values of T (both indexed by channel).
template <class Isa, class T>
void moments_last_sample(const Geo& g, const T* x, Index n, Index g0, Index g1, double* scratch,
                         T* fshift, Mom* out) {
  const Index C = g.C;
  const T* xs = x + g.at(n, 0, 0);
  double* shift = scratch;
  double* s = scratch + C;
  double* s2 = scratch + 2 * C;
  const double count = static_cast<double>(g.count());
  if (g.count() == 0) {
    std::fill(out + g0, out + g1, Mom{0.0, kNaN, kNaN, 1.0});
    return;
  }
  const Index c0 = g0 * g.Cg, c1 = g1 * g.Cg;
  auto group_sums = [&](Index grp, double& a, double& b) {
    a = b = 0.0;
    for (Index c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
      a += s[c];
      b += s2[c];
    }
  };
  // Exact double column sums of one group's columns.
  auto exact_group = [&](Index grp) {
    const Index cg = grp * g.Cg;
    std::fill(s + cg, s + cg + g.Cg, 0.0);
    std::fill(s2 + cg, s2 + cg + g.Cg, 0.0);
    kernels::column_shifted_sums<Isa>(xs + cg, g.M, C, g.Cg, shift + cg, s + cg, s2 + cg);
  };
  for (Index grp = g0; grp < g1; ++grp) {
    const T v = group_shift(g, x, n * g.G + grp);
    for (Index c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
      fshift[c] = v;
      shift[c] = static_cast<double>(v);
    }
  }
  if constexpr (sizeof(T) <= sizeof(float)) {
    std::fill(s + c0, s + c1, 0.0);
    std::fill(s2 + c0, s2 + c1, 0.0);
    kernels::column_blocked_sums<Isa>(xs + c0, g.M, C, c1 - c0, fshift + c0, s + c0, s2 + c0);
    for (Index grp = g0; grp < g1; ++grp) {
      double a, b;
      group_sums(grp, a, b);
      if (!kernels::blocked_sums_trusted<T>(a, b, count)) {
        exact_group(grp);
        group_sums(grp, a, b);
      }
      out[grp] = finish(count, shift[grp * g.Cg], a, b);
    }
  } else {
    for (Index grp = g0; grp < g1; ++grp) exact_group(grp);
    for (Index grp = g0; grp < g1; ++grp) {
      double a, b;
      group_sums(grp, a, b);
      const double m1 = shift[grp * g.Cg] + a / count;
      for (Index c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) shift[c] = m1;
    }
    for (Index grp = g0; grp < g1; ++grp) exact_group(grp);
    for (Index grp = g0; grp < g1; ++grp) {
      double a, b;
      group_sums(grp, a, b);
      out[grp] = squares_in_range(b) || std::isnan(b) ? finish(count, shift[grp * g.Cg], a, b)
                                                      : rescaled_moments(g, x, n * g.G + grp);
    }
  }
}

// Channels last, per-sample statistics: a sample is M rows of C channels, and its
// statistics pass and element-wise pass both read it. Taken in blocks of whole groups of
// about kColumnBlockBytes (M rows x the block's channels), each block is read from memory
// once and again from L2, instead of the whole sample (2 MB at [8, 512, 32, 32]) twice.
constexpr Index kColumnBlockBytes = Index{512} << 10;

// Groups per block: about kColumnBlockBytes, and a whole number of cache lines of
// channels per row where the group size allows (a block edge inside a line would read
// that line twice).
inline Index groups_per_block(const Geo& g, std::size_t elem_bytes) {
  const Index per_group = std::max<Index>(1, g.M * g.Cg * static_cast<Index>(elem_bytes));
  const Index line = std::max<Index>(1, 64 / static_cast<Index>(elem_bytes));
  Index a = g.Cg, b = line;  // q = line / gcd(Cg, line) groups fill whole lines
  while (b != 0) {
    const Index t = a % b;
    a = b;
    b = t;
  }
  const Index q = line / a;
  const Index gpb = std::max<Index>(1, kColumnBlockBytes / per_group) / q * q;
  return std::max<Index>(1, std::min<Index>(g.G, std::max(gpb, q)));
}

// Column sums over all N * M rows in a fixed number of row chunks (a function of the
// row count only), each reduced by one thread, combined in chunk order: deterministic.
// f(r0, r1, a, b) adds rows [r0, r1) into the chunk's arrays a, b (C doubles each).
template <class Isa, class F>
void chunked_columns(const Exec& device, Index rows, Index C, double bytes_per_row, F&& f,
                     double* a, double* b) {
  const Index chunks = reduce_chunks(rows);
  std::vector<double> acc(static_cast<std::size_t>(chunks * 2 * C), 0.0);
  const Index per = std::max<Index>(1, rows / chunks);
  const Eigen::TensorOpCost cost(bytes_per_row * static_cast<double>(per), 0.0,
                                 static_cast<double>(per * C) * 4.0);
  parallel_for<Isa>(device, chunks, cost, [&](Index k0, Index k1) {
    for (Index k = k0; k < k1; ++k) {
      double* base = acc.data() + k * 2 * C;
      f(chunk_begin(k, rows, chunks), chunk_begin(k + 1, rows, chunks), base, base + C);
    }
  });
  std::fill(a, a + C, 0.0);
  std::fill(b, b + C, 0.0);
  for (Index k = 0; k < chunks; ++k) {
    const double* base = acc.data() + k * 2 * C;
    for (Index c = 0; c < C; ++c) {
      a[c] += base[c];
      b[c] += base[C + c];
    }
  }
}

// BatchNorm statistics, channels last.
template <class Isa, class T>
std::vector<Mom> moments_last_batch(const Geo& g, const T* x, const Exec& device) {
  const Index C = g.C, rows = g.N * g.M;
  const double count = static_cast<double>(g.count());
  if (rows == 0 || C == 0) return std::vector<Mom>(static_cast<std::size_t>(C), Mom{0.0, kNaN, kNaN, 1.0});
  std::vector<double> shift(static_cast<std::size_t>(C)), s(static_cast<std::size_t>(C)),
      s2(static_cast<std::size_t>(C));
  std::vector<T> fshift(static_cast<std::size_t>(C));
  for (Index c = 0; c < C; ++c) {
    fshift[static_cast<std::size_t>(c)] = group_shift(g, x, c);
    shift[static_cast<std::size_t>(c)] = static_cast<double>(fshift[static_cast<std::size_t>(c)]);
  }
  const double row_bytes = static_cast<double>(C * static_cast<Index>(sizeof(T)));
  auto exact_pass = [&]() {
    chunked_columns<Isa>(
        device, rows, C, row_bytes,
        [&](Index r0, Index r1, double* a, double* b) {
          kernels::column_shifted_sums<Isa>(x + r0 * C, r1 - r0, C, C, shift.data(), a, b);
        },
        s.data(), s2.data());
  };
  std::vector<Mom> out(static_cast<std::size_t>(C));
  if constexpr (sizeof(T) <= sizeof(float)) {
    chunked_columns<Isa>(
        device, rows, C, row_bytes,
        [&](Index r0, Index r1, double* a, double* b) {
          kernels::column_blocked_sums<Isa>(x + r0 * C, r1 - r0, C, C, fshift.data(), a, b);
        },
        s.data(), s2.data());
    for (Index c = 0; c < C; ++c) {
      const auto k = static_cast<std::size_t>(c);
      if (!kernels::blocked_sums_trusted<T>(s[k], s2[k], count)) {
        // The exact double sums of this column alone (strided; rare: extreme data).
        s[k] = s2[k] = 0.0;
        Isa::run([&] { kernels::column_shifted_sums<Isa>(x + c, rows, C, 1, &shift[k], &s[k], &s2[k]); });
      }
      out[k] = finish(count, shift[k], s[k], s2[k]);
    }
  } else {
    exact_pass();
    for (Index c = 0; c < C; ++c) {
      const auto k = static_cast<std::size_t>(c);
      shift[k] += s[k] / count;
    }
    exact_pass();
    for (Index c = 0; c < C; ++c) {
      const auto k = static_cast<std::size_t>(c);
      out[k] = squares_in_range(s2[k]) || std::isnan(s2[k]) ? finish(count, shift[k], s[k], s2[k])
                                                            : rescaled_moments(g, x, c);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------
// Element-wise coefficients.

// Per-channel coefficient arrays of the channels-last passes (one sample's, or the
// batch's), and whether any needs the prescaled kernel.
template <class T>
struct Arrays {
  std::vector<T> buf;
  Index C = 0;
  explicit Arrays(Index c, int k) : buf(static_cast<std::size_t>(c * k)), C(c) {}
  T* operator[](int k) { return buf.data() + k * C; }
};

// Forward: y = fma((x - hi) * pre, a, b) with b = beta - lo * rstd * gamma.
template <class T>
struct FwdCoef {
  T hi, pre, a, b;
  bool wide;  // pre != 1
};

// A power of two by which xc is multiplied when rstd * gamma overflows T: xc is then
// below T's normal range, so the product is exact.
template <class T>
constexpr int kPrescaleExp = sizeof(T) <= sizeof(float) ? 100 : 600;

template <class T>
FwdCoef<T> forward_coef(const RowStat& st, double gamma, double beta) {
  FwdCoef<T> k{};
  const double mean = st.mean();
  k.hi = static_cast<T>(mean);
  const double lo = static_cast<double>(static_cast<T>(mean - static_cast<double>(k.hi)));
  k.pre = T(1);
  k.b = static_cast<T>(beta);
  k.wide = false;
  if (st.denom_s == 0.0) {  // var + eps == 0: a constant group, x == hi, y = beta
    k.a = T(0);
    return k;
  }
  // lo * rstd * gamma, in an order that cannot overflow where the result does not.
  k.b = static_cast<T>(beta - lo * st.scale / st.denom_s * gamma);
  const double a = st.rstd * gamma;
  if (!std::isinf(static_cast<T>(a)) || std::isnan(a) || std::isinf(gamma)) {
    k.a = static_cast<T>(a);
    return k;
  }
  const double pre = std::ldexp(1.0, kPrescaleExp<T>);
  k.pre = static_cast<T>(pre);
  k.a = static_cast<T>(st.scale / pre / st.denom_s * gamma);
  k.wide = true;
  return k;
}

inline RowStat to_stat(const Mom& m, double eps) {
  if (m.count == 0.0) return row_stat(kNaN, kNaN, 1.0, eps, false);
  return row_stat(m.mean_s, m.m2_s / m.count, m.scale, eps, false);
}

template <class T>
void save_stat(RowStats<T>& saved, Index s, const RowStat& st) {
  const double mean = st.mean();
  const T hi = static_cast<T>(mean);
  saved.mean(s) = hi;
  saved.mean_lo(s) = static_cast<T>(mean - static_cast<double>(hi));
  saved.rstd(s) = static_cast<T>(st.rstd);
}

// Backward: dx = fma(dy, a, fma(xc, cx, d)) per (sample, channel), from the group's
// rstd, gamma_c and the group means mg = mean(g), mgx = mean(g xhat) with g = dy gamma:
//   dx = rstd (g - mg - xhat mgx) = dy (rstd gamma) + xc (-rstd^2 mgx) + (-rstd mg).
template <class T>
struct BwdCoef {
  T a, cx, d;
  T pre = T(1);       // dx = dy a + ((x - hi) pre) cx + d
  bool wide = false;  // pre != 1
};

// With xc = x - hi instead of (x - hi) - lo, d becomes d - lo * cx. cx ~ rstd^2 leaves T's
// range long before rstd does (|x| ~ 1e-25 with eps = 0: rstd ~ 1e25, rstd^2 ~ 1e50; |x| ~
// 1e20: rstd^2 ~ 1e-40, subnormal in float): then xc is first multiplied by pre, the
// power of two nearest below rstd (exact), and cx divided by it.
template <class T>
BwdCoef<T> backward_coef(double rstd, double gamma, double mg, double mgx, T lo) {
  constexpr double kLim = sizeof(T) <= sizeof(float) ? 0x1p32 : 0x1p200;
  BwdCoef<T> k;
  double pre = 1.0;
  if ((rstd > kLim || rstd < 1.0 / kLim) && rstd > 0.0 && std::isfinite(rstd)) {
    pre = std::ldexp(1.0, std::ilogb(rstd));
    k.wide = true;
  }
  const double cx = -(rstd / pre) * rstd * mgx;  // (-rstd^2 mgx) / pre
  k.a = static_cast<T>(rstd * gamma);
  k.cx = static_cast<T>(cx);
  k.d = static_cast<T>(-rstd * mg - static_cast<double>(lo) * pre * cx);
  k.pre = static_cast<T>(pre);
  return k;
}

// The dx pass over one segment (channels first), or over rows [r0, r1) of channels
// [c0, c1) with per-channel arrays a[0..4] = hi, pre, A, Cx, D (channels last).
template <class Isa, class T, bool Stream, bool UseX>
void dx_segment(const T* dy, const T* x, T* dx, Index n, const T& hi, const BwdCoef<T>& k,
                const kernels::Prefetch& pf = {}, const kernels::Prefetch& pf2 = {}) {
  if (UseX && k.wide)
    kernels::dx_map<Isa, T, false, Stream, true, true>(dy, x, dx, n, &hi, &k.pre, &k.a, &k.cx,
                                                        &k.d, pf, pf2);
  else
    kernels::dx_map<Isa, T, false, Stream, UseX, false>(dy, x, dx, n, &hi, &k.pre, &k.a, &k.cx,
                                                         &k.d, pf, pf2);
}

template <class T>
bool fill_backward(Arrays<T>& a, Index c, const BwdCoef<T>& k) {
  a[1][c] = k.pre;
  a[2][c] = k.a;
  a[3][c] = k.cx;
  a[4][c] = k.d;
  return k.wide;
}

template <class Isa, class T, bool Stream, bool UseX>
void dx_rows(const T* dy, const T* x, T* dx, Index r0, Index r1, Index ld, Index c0, Index c1,
             Arrays<T>& a, bool wide, bool block4) {
  const Index o = r0 * ld + c0;
  if (UseX && wide)
    kernels::dx_rows_kernel<Isa, T, Stream, true, true>(dy + o, x + o, dx + o, r1 - r0, ld,
                                                         c1 - c0, a[0] + c0, a[1] + c0,
                                                         a[2] + c0, a[3] + c0, a[4] + c0, block4);
  else
    kernels::dx_rows_kernel<Isa, T, Stream, UseX, false>(dy + o, x + o, dx + o, r1 - r0, ld,
                                                          c1 - c0, a[0] + c0, a[1] + c0,
                                                          a[2] + c0, a[3] + c0, a[4] + c0, block4);
}

// ---------------------------------------------------------------------------------
// Forward (training: batch or instance statistics; or BatchNorm with given global
// moments).

template <class T>
std::vector<Mom> moments_from(const ChannelMoments& gm) {
  std::vector<Mom> out(static_cast<std::size_t>(gm.mean.size()));
  for (Index c = 0; c < gm.mean.size(); ++c)
    out[static_cast<std::size_t>(c)] = {gm.count, gm.mean(c), gm.m2(c), 1.0};
  return out;
}

// running = (1 - m) running + m value, value = the batch mean and the unbiased variance
// (InstanceNorm: their averages over the samples). Moments in double throughout.
template <class T>
void update_running(const Spec& spec, const Running<T>& run, const Geo& g,
                    const std::vector<Mom>& mom) {
  if (!run.present()) return;
  if (run.num_batches_tracked) ++*run.num_batches_tracked;
  const double m = spec.momentum ? *spec.momentum
                                 : 1.0 / static_cast<double>(*run.num_batches_tracked);
  const Index per = g.batch ? 1 : g.N;  // statistics averaged into each channel
  for (Index c = 0; c < g.C; ++c) {
    double mean = 0.0, var = 0.0;
    for (Index i = 0; i < per; ++i) {
      const Mom& q = mom[static_cast<std::size_t>(g.batch ? c : i * g.G + c / g.Cg)];
      mean += q.mean_s / q.scale;
      var += q.m2_s / (q.scale * q.scale) / (q.count - 1.0);
    }
    mean /= static_cast<double>(per);
    var /= static_cast<double>(per);
    run.mean.data[c] = static_cast<T>((1.0 - m) * static_cast<double>(run.mean.data[c]) + m * mean);
    run.var.data[c] = static_cast<T>((1.0 - m) * static_cast<double>(run.var.data[c]) + m * var);
  }
}

// ---------------------------------------------------------------------------------
// Element-wise passes.


template <class Isa, class T, bool Stream>
void normalize_segment(const T* x, T* y, Index n, const FwdCoef<T>& k,
                       const kernels::Prefetch& pf = {}) {
  if (k.wide)
    kernels::affine_map<Isa, T, false, Stream, true>(x, y, n, &k.hi, &k.pre, &k.a, &k.b, pf);
  else
    kernels::affine_map<Isa, T, false, Stream, false>(x, y, n, &k.hi, &k.pre, &k.a, &k.b, pf);
}

// Rows [r0, r1) of channels [c0, c1), rows ld apart. Arrays a[0..3]: hi, pre, A, B per
// channel.
template <class Isa, class T, bool Stream>
void normalize_rows(const T* x, T* y, Index r0, Index r1, Index ld, Index c0, Index c1,
                    Arrays<T>& a, bool wide, bool block4) {
  const Index o = r0 * ld + c0;
  if (wide)
    kernels::affine_rows<Isa, T, Stream, true>(x + o, y + o, r1 - r0, ld, c1 - c0, a[0] + c0,
                                                a[1] + c0, a[2] + c0, a[3] + c0, block4);
  else
    kernels::affine_rows<Isa, T, Stream, false>(x + o, y + o, r1 - r0, ld, c1 - c0, a[0] + c0,
                                                 a[1] + c0, a[2] + c0, a[3] + c0, block4);
}

template <class T>
bool fill_forward(Arrays<T>& a, Index c, const FwdCoef<T>& k) {
  a[0][c] = k.hi;
  a[1][c] = k.pre;
  a[2][c] = k.a;
  a[3][c] = k.b;
  return k.wide;
}

template <class T>
double bytes_of(Index n) {
  return static_cast<double>(n) * static_cast<double>(sizeof(T));
}

// ---------------------------------------------------------------------------------
// Forward with batch/instance statistics (training), or BatchNorm with given global
// moments (forward_global).

// (The checks take the parameters' type P and the running statistics' type R apart from
// the data's T: narrow storage checks its views with the same code, narrow_channel.hpp.)
template <class T, class P, class R>
void check_forward_out(const std::string& where, const View<const T>& x, const Affine<P>& p,
                       const View<T>& y, const Running<R>& run) {
  if (!same_dims(x, y)) fail(where, "y", "dims " + x.str() + " (those of x)", y.str());
  require_data(where, "y", y);
  if (partial_overlap(y, x)) fail(where, "y", "x itself or memory disjoint from x", "a partial overlap");
  if (any_overlap(y, p.gamma) || any_overlap(y, p.beta) || any_overlap(y, run.mean) ||
      any_overlap(y, run.var))
    fail(where, "y", "memory disjoint from gamma, beta and the running statistics", "an overlap");
  if (any_overlap(run.mean, x) || any_overlap(run.var, x) || any_overlap(run.mean, p.gamma) ||
      any_overlap(run.mean, p.beta) || any_overlap(run.var, p.gamma) || any_overlap(run.var, p.beta))
    fail(where, "running", "memory disjoint from x, gamma and beta", "an overlap");
}

inline std::string forward_where(const Spec& spec, const ChannelMoments* global) {
  return std::string(spec.op) + (global ? "::forward_global" : "::forward");
}

// Every check of a training forward (or forward_global); returns x's geometry.
template <class T, class P, class R>
Geo check_forward_train(const Spec& spec, const std::string& where, const View<const T>& x,
                        const Affine<P>& p, const View<T>& y, const Running<R>& run,
                        const ChannelMoments* global) {
  const bool batch = spec.kind == Kind::Batch;
  const Geo g = check_x(spec, where, "x", x, batch);
  check_params(spec, where, p, g.C);
  check_running(spec, where, run, g.C, false, true);
  check_forward_out(where, x, p, y, run);
  const std::string dims = " (dims " + x.str() + ", " + format_str(spec) + ")";
  if (global) {
    if (global->mean.size() != g.C || global->m2.size() != g.C)
      fail(where, "global", "moments of " + std::to_string(g.C) + " channels",
           std::to_string(global->mean.size()) + " means and " + std::to_string(global->m2.size()) +
               " m2");
    if (!(global->count > 1.0))
      fail(where, "global.count", "more than 1 value per channel over the whole batch",
           std::to_string(global->count));
  } else if (batch && g.count() <= 1) {
    fail(where, "x", "more than 1 value per channel when training (N * spatial > 1)",
         std::to_string(g.count()) + dims);
  } else if (spec.kind == Kind::Instance && g.M <= 1) {
    fail(where, "x", "more than 1 spatial element per channel when training",
         std::to_string(g.M) + dims);
  }
  return g;
}

// A checked training forward (check_forward_train): throws nothing.
template <class Isa, class T>
void forward_train_run(const Spec& spec, const Geo& g, const View<const T>& x, const Affine<T>& p,
                       const View<T>& y, RowStats<T>& saved, const Running<T>& run,
                       const ChannelMoments* global, const Exec& device) {
  const Index S = g.stats();
  if (saved.mean.size() != S) saved.mean.resize(S);
  if (saved.mean_lo.size() != S) saved.mean_lo.resize(S);
  if (saved.rstd.size() != S) saved.rstd.resize(S);
  std::vector<Mom> mom = global ? moments_from<T>(*global)
                                : std::vector<Mom>(static_cast<std::size_t>(S));
  const double eps = spec.eps;
  const bool stream = stream_output<T>(x.size());
  const T* gamma = p.gamma.data;
  const T* beta = p.beta.data;
  auto coef = [&](const RowStat& st, Index c) {
    return forward_coef<T>(st, gamma ? static_cast<double>(gamma[c]) : 1.0,
                           beta ? static_cast<double>(beta[c]) : 0.0);
  };

  with_bool(stream, [&](auto St) {
    constexpr bool kSt = decltype(St)::value;
    if (!g.last) {
      // Channels first, per statistic: its segments from memory (moments), then again
      // from cache (normalize). A BatchNorm channel of [32, 64, 56, 56] is 400 KB: L2.
      const Eigen::TensorOpCost cost(2.0 * bytes_of<T>(g.count()), bytes_of<T>(g.count()),
                                     6.0 * static_cast<double>(g.count()));
      parallel_for<Isa>(device, S, cost, [&](Index s0, Index s1) {
        for (Index s = s0; s < s1; ++s) {
          const auto k = static_cast<std::size_t>(s);
          if (!global) {
            if (s + 1 < s1) prefetch_stat(g, x.data, s + 1);
            mom[k] = moments_first<Isa>(g, x.data, s);
          }
          const RowStat st = to_stat(mom[k], eps);
          save_stat(saved, s, st);
          const Geo::Range q = g.range(s);
          // BatchNorm: while channel c is normalized from cache, channel c + 1 (this
          // thread's next) is prefetched, segment by segment.
          const bool pf = g.batch && s + 1 < s1;
          for (Index c = q.c0; c < q.c1; ++c) {
            const FwdCoef<T> kc = coef(st, c);
            for (Index n = q.n0; n < q.n1; ++n)
              normalize_segment<Isa, T, kSt>(
                  x.data + g.at(n, c, 0), y.data + g.at(n, c, 0), g.M, kc,
                  pf ? kernels::Prefetch(x.data + g.at(n, c + 1, 0), g.M) : kernels::Prefetch());
          }
        }
        if (kSt) Isa::fence();
      });
    } else if (g.batch) {
      // Channels last, BatchNorm: column sums over all rows, then every row normalized
      // with the per-channel arrays.
      if (!global) mom = moments_last_batch<Isa>(g, x.data, device);
      Arrays<T> a(g.C, 4);
      bool wide = false;
      for (Index c = 0; c < g.C; ++c) {
        const RowStat st = to_stat(mom[static_cast<std::size_t>(c)], eps);
        save_stat(saved, c, st);
        wide |= fill_forward(a, c, coef(st, c));
      }
      const Eigen::TensorOpCost cost(bytes_of<T>(g.C), bytes_of<T>(g.C), 4.0 * static_cast<double>(g.C));
      parallel_for<Isa>(device, g.N * g.M, cost, [&](Index r0, Index r1) {
        normalize_rows<Isa, T, kSt>(x.data, y.data, r0, r1, g.C, 0, g.C, a, wide, false);
        if (kSt) Isa::fence();
      });
    } else {
      // Channels last, per-sample statistics: per sample, column sums down its rows, then
      // its rows normalized (a sample of [8, 512, 32, 32] is 2 MB: L2/L3).
      const Eigen::TensorOpCost cost(2.0 * bytes_of<T>(g.M * g.C), bytes_of<T>(g.M * g.C),
                                     6.0 * static_cast<double>(g.M * g.C));
      parallel_for<Isa>(device, g.N, cost, [&](Index n0, Index n1) {
        std::vector<double> scratch(static_cast<std::size_t>(3 * g.C));
        Arrays<T> a(g.C, 5);  // hi, pre, A, B; and the shifts of the statistics
        const Index gpb = groups_per_block(g, sizeof(T));
        for (Index n = n0; n < n1; ++n) {
          const Index base = g.at(n, 0, 0);
          for (Index g0 = 0; g0 < g.G; g0 += gpb) {
            const Index g1 = std::min(g.G, g0 + gpb);
            moments_last_sample<Isa>(g, x.data, n, g0, g1, scratch.data(), a[4], mom.data() + n * g.G);
            bool wide = false;
            for (Index grp = g0; grp < g1; ++grp) {
              const RowStat st = to_stat(mom[static_cast<std::size_t>(n * g.G + grp)], eps);
              save_stat(saved, n * g.G + grp, st);
              for (Index c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) wide |= fill_forward(a, c, coef(st, c));
            }
            normalize_rows<Isa, T, kSt>(x.data + base, y.data + base, 0, g.M, g.C, g0 * g.Cg,
                                        g1 * g.Cg, a, wide, true);
          }
        }
        if (kSt) Isa::fence();
      });
    }
  });
  update_running(spec, run, g, mom);
}

template <class Isa, class T>
void forward_train(const Spec& spec, const View<const T>& x, const Affine<T>& p, const View<T>& y,
                   RowStats<T>& saved, const Running<T>& run, const ChannelMoments* global,
                   const Exec& device) {
  const Geo g = check_forward_train(spec, forward_where(spec, global), x, p, y, run, global);
  forward_train_run<Isa, T>(spec, g, x, p, y, saved, run, global, device);
}

// Statistics of the evaluation passes: per channel, from the running statistics.
template <class T>
RowStat running_stat(const Running<T>& run, Index c, double eps) {
  return row_stat(static_cast<double>(run.mean.data[c]), static_cast<double>(run.var.data[c]),
                  1.0, eps, false);
}

template <class T, class P, class R>
Geo check_forward_eval(const Spec& spec, const std::string& where, const View<const T>& x,
                       const Affine<P>& p, const Running<R>& run, const View<T>& y) {
  const Geo g = check_x(spec, where, "x", x, true);
  check_params(spec, where, p, g.C);
  check_running(spec, where, run, g.C, true, false);
  check_forward_out(where, x, p, y, run);
  return g;
}

// A checked evaluation forward: throws nothing.
template <class Isa, class T>
void forward_eval_run(const Spec& spec, const Geo& g, const View<const T>& x, const Affine<T>& p,
                      const Running<T>& run, const View<T>& y, const Exec& device) {
  const T* gamma = p.gamma.data;
  const T* beta = p.beta.data;
  Arrays<T> a(g.C, 4);
  std::vector<FwdCoef<T>> k(static_cast<std::size_t>(g.C));
  bool wide = false;
  for (Index c = 0; c < g.C; ++c) {
    k[static_cast<std::size_t>(c)] =
        forward_coef<T>(running_stat(run, c, spec.eps), gamma ? static_cast<double>(gamma[c]) : 1.0,
                        beta ? static_cast<double>(beta[c]) : 0.0);
    wide |= fill_forward(a, c, k[static_cast<std::size_t>(c)]);
  }
  with_bool(stream_output<T>(x.size()), [&](auto St) {
    constexpr bool kSt = decltype(St)::value;
    if (!g.last) {
      const Eigen::TensorOpCost cost(bytes_of<T>(g.M), bytes_of<T>(g.M), 3.0 * static_cast<double>(g.M));
      parallel_for<Isa>(device, g.N * g.C, cost, [&](Index s0, Index s1) {
        for (Index s = s0; s < s1; ++s)
          normalize_segment<Isa, T, kSt>(x.data + s * g.M, y.data + s * g.M, g.M,
                                         k[static_cast<std::size_t>(s % g.C)]);
        if (kSt) Isa::fence();
      });
    } else {
      const Eigen::TensorOpCost cost(bytes_of<T>(g.C), bytes_of<T>(g.C), 3.0 * static_cast<double>(g.C));
      parallel_for<Isa>(device, g.N * g.M, cost, [&](Index r0, Index r1) {
        normalize_rows<Isa, T, kSt>(x.data, y.data, r0, r1, g.C, 0, g.C, a, wide, false);
        if (kSt) Isa::fence();
      });
    }
  });
}

template <class Isa, class T>
void forward_eval(const Spec& spec, const View<const T>& x, const Affine<T>& p,
                  const Running<T>& run, const View<T>& y, const Exec& device) {
  const Geo g = check_forward_eval(spec, std::string(spec.op) + "::forward_eval", x, p, run, y);
  forward_eval_run<Isa, T>(spec, g, x, p, run, y, device);
}

// ---------------------------------------------------------------------------------
// Backward.
//
// With xhat = (x - mean) rstd over a group of n elements and y = xhat gamma_c + beta_c,
// let g = dy gamma_c. Then, as for LayerNorm over the group,
//   dx = rstd (g - mean(g) - xhat mean(g xhat)),
// dgamma_c = sum over the channel's elements of dy xhat, dbeta_c = sum of dy.
// BatchNorm: a group is a channel, gamma is constant over it.
// Evaluation: the statistics are constants, dx = dy gamma rstd.
// Per (sample, channel) the passes take sdy = sum dy and sdyx = sum dy xc with
// xc = (x - mean_hi) - mean_lo, so sum dy xhat = rstd sdyx.

template <class T, class P>
void check_backward(const Spec& spec, const std::string& where, const Geo& g,
                    const View<const T>& dy, const View<const T>& x, const Affine<P>& p,
                    const View<T>& dx, const View<P>& dgamma, const View<P>& dbeta) {
  if (!same_dims(dy, x)) fail(where, "dy", "dims " + x.str() + " (those of x)", dy.str());
  require_data(where, "dy", dy);
  check_params(spec, where, p, g.C);
  if (dx.present && !same_dims(dx, x)) fail(where, "dx", "dims " + x.str() + " (those of x)", dx.str());
  require_data(where, "dx", dx);
  if (dgamma.present && spec.affine == AffineMode::None)
    fail(where, "dgamma", "normkit::skip (the functor has no gamma)", dgamma.str());
  if (dbeta.present && spec.affine != AffineMode::ScaleShift)
    fail(where, "dbeta", "normkit::skip (the functor has no beta)", dbeta.str());
  check_channels(where, "dgamma", dgamma, g.C);
  check_channels(where, "dbeta", dbeta, g.C);
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

enum class Mode { Train, Global, Eval };

// The parameter gradients of the backward passes, in double before their one rounding
// (to T by the callers here, to the parameters' type by narrow_channel.hpp): C values
// each, or nullptr for one not wanted.
struct ParamGrads {
  double* dgamma = nullptr;
  double* dbeta = nullptr;
  bool any() const { return dgamma || dbeta; }
};

// dgamma, dbeta (each optional, each with its own sums: dg is empty when dgamma is not
// wanted, db when dbeta is not) = T(the double sums).
template <class T>
void write_param_grads(const View<T>& dgamma, const View<T>& dbeta, const std::vector<double>& dg,
                       const std::vector<double>& db) {
  if (dgamma.present)
    for (std::size_t c = 0; c < dg.size(); ++c) dgamma.data[c] = static_cast<T>(dg[c]);
  if (dbeta.present)
    for (std::size_t c = 0; c < db.size(); ++c) dbeta.data[c] = static_cast<T>(db[c]);
}

// Per-channel statistics (BatchNorm; evaluation of BatchNorm and InstanceNorm).
// hi, lo, rstd per channel. sums_out (partial_grad_sums) receives the sums and nothing
// else is written.
template <class Isa, class T>
void backward_per_channel(const Geo& g, Mode mode, const View<const T>& dy, const View<const T>& x,
                          const std::vector<T>& hi, const std::vector<T>& lo,
                          const std::vector<double>& rstd, const T* gamma, const GlobalGrad* gg,
                          const View<T>& dx, const ParamGrads& pg, ChannelGradSums* sums_out,
                          const Exec& device) {
  const Index C = g.C;
  const bool want_dx = dx.present && !sums_out;
  const bool need_sums = sums_out || (mode == Mode::Train && want_dx) ||
                         (mode != Mode::Global && pg.any());
  const double count = mode == Mode::Global ? gg->count : static_cast<double>(g.count());
  // Per channel: sum dy and sum dy xhat, then the dx coefficients.
  std::vector<double> sdy(static_cast<std::size_t>(C), 0.0), sdyxh(static_cast<std::size_t>(C), 0.0);
  // a = sum dy, b = sum dy (x - hi) from the passes: sum dy xhat = rstd (b - lo a).
  auto finish_channel = [&](Index c, double a, double b, BwdCoef<T>& k) {
    const auto i = static_cast<std::size_t>(c);
    if (mode == Mode::Global) {
      a = gg->sums->sum_dy(c);
      b = gg->sums->sum_dy_xhat(c);
    } else {
      b = rstd[i] * (b - static_cast<double>(lo[i]) * a);
    }
    sdy[i] = a;
    sdyxh[i] = b;
    const double gm = gamma ? static_cast<double>(gamma[c]) : 1.0;
    k = mode == Mode::Eval ? BwdCoef<T>{static_cast<T>(rstd[i] * gm), T(0), T(0)}
                           : backward_coef<T>(rstd[i], gm, gm * a / count, gm * b / count, lo[i]);
  };
  with_bool(want_dx && stream_output<T>(x.size()), [&](auto St) {
    with_bool(mode != Mode::Eval, [&](auto UX) {
      constexpr bool kSt = decltype(St)::value, kUX = decltype(UX)::value;
      if (!g.last) {
        const Eigen::TensorOpCost cost(3.0 * bytes_of<T>(g.count()), bytes_of<T>(g.count()),
                                       8.0 * static_cast<double>(g.count()));
        parallel_for<Isa>(device, C, cost, [&](Index c0, Index c1) {
          for (Index c = c0; c < c1; ++c) {
            const auto i = static_cast<std::size_t>(c);
            double a = 0.0, b = 0.0;
            // Prefetch as in forward: the next segment while one is summed, and the next
            // channel while one is written.
            auto pf = [&](const T* base, Index n, Index cc, bool ok) {
              return ok ? kernels::Prefetch(base + g.at(n, cc, 0), g.M) : kernels::Prefetch();
            };
            if (need_sums)
              for (Index n = 0; n < g.N; ++n) {
                double sa, sb;
                const bool more = n + 1 < g.N;
                kernels::segment_grad_sums<Isa>(dy.data + g.at(n, c, 0), x.data + g.at(n, c, 0),
                                                g.M, hi[i], sa, sb, pf(x.data, n + 1, c, more),
                                                pf(dy.data, n + 1, c, more));
                a += sa;
                b += sb;
              }
            BwdCoef<T> k;
            finish_channel(c, a, b, k);
            if (!want_dx) continue;
            const bool next = c + 1 < c1;
            for (Index n = 0; n < g.N; ++n)
              dx_segment<Isa, T, kSt, kUX>(dy.data + g.at(n, c, 0), x.data + g.at(n, c, 0),
                                           dx.data + g.at(n, c, 0), g.M, hi[i], k,
                                           pf(x.data, n, c + 1, next), pf(dy.data, n, c + 1, next));
          }
          if (kSt) Isa::fence();
        });
      } else {
        if (need_sums) {
          std::vector<double> a(static_cast<std::size_t>(C)), b(static_cast<std::size_t>(C));
          chunked_columns<Isa>(
              device, g.N * g.M, C, 2.0 * bytes_of<T>(C),
              [&](Index r0, Index r1, double* sa, double* sb) {
                kernels::column_grad_sums<Isa>(dy.data + r0 * C, x.data + r0 * C, r1 - r0, C, C,
                                               hi.data(), sa, sb);
              },
              a.data(), b.data());
          sdy.swap(a);
          sdyxh.swap(b);
        }
        Arrays<T> k(C, 5);
        bool wide = false;
        for (Index c = 0; c < C; ++c) {
          const auto i = static_cast<std::size_t>(c);
          BwdCoef<T> kc;
          finish_channel(c, sdy[i], sdyxh[i], kc);
          k[0][c] = hi[i];
          wide |= fill_backward(k, c, kc);
        }
        if (want_dx) {
          const Eigen::TensorOpCost cost(2.0 * bytes_of<T>(C), bytes_of<T>(C), 4.0 * static_cast<double>(C));
          parallel_for<Isa>(device, g.N * g.M, cost, [&](Index r0, Index r1) {
            dx_rows<Isa, T, kSt, kUX>(dy.data, x.data, dx.data, r0, r1, C, 0, C, k, wide, false);
            if (kSt) Isa::fence();
          });
        }
      }
    });
  });
  if (sums_out) {
    sums_out->sum_dy.resize(C);
    sums_out->sum_dy_xhat.resize(C);
    for (Index c = 0; c < C; ++c) {
      sums_out->sum_dy(c) = sdy[static_cast<std::size_t>(c)];
      sums_out->sum_dy_xhat(c) = sdyxh[static_cast<std::size_t>(c)];
    }
    return;
  }
  for (Index c = 0; c < C; ++c) {
    if (pg.dgamma) pg.dgamma[c] = sdyxh[static_cast<std::size_t>(c)];
    if (pg.dbeta) pg.dbeta[c] = sdy[static_cast<std::size_t>(c)];
  }
}

// Per-sample statistics (GroupNorm, InstanceNorm), training.
template <class Isa, class T>
void backward_per_sample(const Geo& g, const View<const T>& dy, const View<const T>& x,
                         const RowStats<T>& saved, const T* gamma, const View<T>& dx,
                         const ParamGrads& pg, const Exec& device) {
  const Index C = g.C;
  const bool want_dx = dx.present;
  const double count = static_cast<double>(g.count());
  // sums per (sample, channel), kept for dgamma and dbeta
  std::vector<double> sdy(static_cast<std::size_t>(g.N * C), 0.0), sdyx(sdy.size(), 0.0);
  auto group_coefs = [&](Index n, Index grp, auto&& put) {
    const Index s = n * g.G + grp;
    const double rstd = static_cast<double>(saved.rstd(s));
    double sg = 0.0, sgx = 0.0;
    for (Index c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
      const double gm = gamma ? static_cast<double>(gamma[c]) : 1.0;
      sg += gm * sdy[static_cast<std::size_t>(n * C + c)];
      sgx += gm * sdyx[static_cast<std::size_t>(n * C + c)];
    }
    sgx *= rstd;
    const T lo = saved.mean_lo(s);
    for (Index c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c)
      put(c, backward_coef<T>(rstd, gamma ? static_cast<double>(gamma[c]) : 1.0, sg / count,
                              sgx / count, lo));
  };
  with_bool(want_dx && stream_output<T>(x.size()), [&](auto St) {
    constexpr bool kSt = decltype(St)::value;
    if (!g.last) {
      const Eigen::TensorOpCost cost(3.0 * bytes_of<T>(g.count()), bytes_of<T>(g.count()),
                                     8.0 * static_cast<double>(g.count()));
      parallel_for<Isa>(device, g.N * g.G, cost, [&](Index s0, Index s1) {
        for (Index s = s0; s < s1; ++s) {
          const Index n = s / g.G, grp = s % g.G;
          const T hi = saved.mean(s), lo = saved.mean_lo(s);
          for (Index c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
            const auto i = static_cast<std::size_t>(n * C + c);
            kernels::segment_grad_sums<Isa>(dy.data + g.at(n, c, 0), x.data + g.at(n, c, 0), g.M,
                                            hi, sdy[i], sdyx[i]);
            sdyx[i] -= static_cast<double>(lo) * sdy[i];  // sum dy ((x - hi) - lo)
          }
          if (!want_dx) continue;
          group_coefs(n, grp, [&](Index c, const BwdCoef<T>& k) {
            dx_segment<Isa, T, kSt, true>(dy.data + g.at(n, c, 0), x.data + g.at(n, c, 0),
                                          dx.data + g.at(n, c, 0), g.M, hi, k);
          });
        }
        if (kSt) Isa::fence();
      });
    } else {
      const Eigen::TensorOpCost cost(3.0 * bytes_of<T>(g.M * C), bytes_of<T>(g.M * C),
                                     8.0 * static_cast<double>(g.M * C));
      parallel_for<Isa>(device, g.N, cost, [&](Index n0, Index n1) {
        Arrays<T> a(C, 5);  // hi, pre, A, Cx, D
        // Whole samples (dy and x: two arrays): blocks of columns as in forward were
        // slower here (the strided reads of two arrays defeat the prefetchers), so the
        // second pass reads the sample from L3.
        const Index gpb = g.G;
        for (Index n = n0; n < n1; ++n) {
          const Index base = g.at(n, 0, 0);
          double* sa = sdy.data() + n * C;
          double* sb = sdyx.data() + n * C;
          for (Index g0 = 0; g0 < g.G; g0 += gpb) {
            const Index g1 = std::min(g.G, g0 + gpb);
            const Index c0 = g0 * g.Cg, c1 = g1 * g.Cg;
            for (Index c = c0; c < c1; ++c) a[0][c] = saved.mean(n * g.G + c / g.Cg);
            kernels::column_grad_sums<Isa>(dy.data + base + c0, x.data + base + c0, g.M, C,
                                           c1 - c0, a[0] + c0, sa + c0, sb + c0);
            for (Index c = c0; c < c1; ++c)  // sum dy ((x - hi) - lo)
              sb[c] -= static_cast<double>(saved.mean_lo(n * g.G + c / g.Cg)) * sa[c];
            if (!want_dx) continue;
            bool wide = false;
            for (Index grp = g0; grp < g1; ++grp)
              group_coefs(n, grp, [&](Index c, const BwdCoef<T>& k) { wide |= fill_backward(a, c, k); });
            dx_rows<Isa, T, kSt, true>(dy.data + base, x.data + base, dx.data + base, 0, g.M, C, c0,
                                       c1, a, wide, true);
          }
        }
        if (kSt) Isa::fence();
      });
    }
  });
  // dgamma_c = sum_n rstd(n, group(c)) sdyx(n, c), dbeta_c = sum_n sdy(n, c), n in order.
  for (Index c = 0; c < C; ++c) {
    double a = 0.0, b = 0.0;
    for (Index n = 0; n < g.N; ++n) {
      const auto i = static_cast<std::size_t>(n * C + c);
      a += static_cast<double>(saved.rstd(n * g.G + c / g.Cg)) * sdyx[i];
      b += sdy[i];
    }
    if (pg.dgamma) pg.dgamma[c] = a;
    if (pg.dbeta) pg.dbeta[c] = b;
  }
}

template <class T>
void saved_per_channel(const RowStats<T>& saved, Index C, std::vector<T>& hi, std::vector<T>& lo,
                       std::vector<double>& rstd) {
  hi.resize(static_cast<std::size_t>(C));
  lo.resize(hi.size());
  rstd.resize(hi.size());
  for (Index c = 0; c < C; ++c) {
    const auto i = static_cast<std::size_t>(c);
    hi[i] = saved.mean(c);
    lo[i] = saved.mean_lo(c);
    rstd[i] = static_cast<double>(saved.rstd(c));
  }
}

inline std::string backward_where(const Spec& spec, const GlobalGrad* gg) {
  return std::string(spec.op) + (gg ? "::backward_global" : "::backward");
}

// Every check of a training backward (or backward_global); returns x's geometry.
template <class T, class P, class S>
Geo check_backward_train(const Spec& spec, const std::string& where, const View<const T>& dy,
                         const View<const T>& x, const Affine<P>& p, const RowStats<S>& saved,
                         const GlobalGrad* gg, const View<T>& dx, const View<P>& dgamma,
                         const View<P>& dbeta) {
  const bool batch = spec.kind == Kind::Batch;
  const Geo g = check_x(spec, where, "x", x, batch);
  check_backward(spec, where, g, dy, x, p, dx, dgamma, dbeta);
  check_saved(where, saved, g.stats(), stats_what(spec));
  if (gg) {
    if (gg->sums->sum_dy.size() != g.C || gg->sums->sum_dy_xhat.size() != g.C)
      fail(where, "global_sums", "sums of " + std::to_string(g.C) + " channels",
           std::to_string(gg->sums->sum_dy.size()) + " and " +
               std::to_string(gg->sums->sum_dy_xhat.size()));
    if (!(gg->count > 0.0))
      fail(where, "global_count", "the number of values per channel in the whole batch (> 0)",
           std::to_string(gg->count));
  }
  return g;
}

// A checked training backward: dx (if present) and the double parameter sums pg.
template <class Isa, class T>
void backward_train_run(const Spec& spec, const Geo& g, const View<const T>& dy,
                        const View<const T>& x, const T* gamma, const RowStats<T>& saved,
                        const GlobalGrad* gg, const View<T>& dx, const ParamGrads& pg,
                        const Exec& device) {
  if (spec.kind == Kind::Batch) {
    std::vector<T> hi, lo;
    std::vector<double> rstd;
    saved_per_channel(saved, g.C, hi, lo, rstd);
    backward_per_channel<Isa, T>(g, gg ? Mode::Global : Mode::Train, dy, x, hi, lo, rstd, gamma,
                                 gg, dx, pg, nullptr, device);
  } else {
    backward_per_sample<Isa, T>(g, dy, x, saved, gamma, dx, pg, device);
  }
}

// Double sums for the wanted parameter gradients.
struct GradSums {
  std::vector<double> dg, db;
  template <class P>
  GradSums(Index C, const View<P>& dgamma, const View<P>& dbeta)
      : dg(static_cast<std::size_t>(dgamma.present ? C : 0)),
        db(static_cast<std::size_t>(dbeta.present ? C : 0)) {}
  ParamGrads ptrs() {
    return {dg.empty() ? nullptr : dg.data(), db.empty() ? nullptr : db.data()};
  }
};

template <class Isa, class T>
void backward_train(const Spec& spec, const View<const T>& dy, const View<const T>& x,
                    const Affine<T>& p, const RowStats<T>& saved, const GlobalGrad* gg,
                    const View<T>& dx, const View<T>& dgamma, const View<T>& dbeta,
                    const Exec& device) {
  const Geo g = check_backward_train(spec, backward_where(spec, gg), dy, x, p, saved, gg, dx,
                                     dgamma, dbeta);
  GradSums sums(g.C, dgamma, dbeta);
  backward_train_run<Isa, T>(spec, g, dy, x, p.gamma.data, saved, gg, dx, sums.ptrs(), device);
  write_param_grads(dgamma, dbeta, sums.dg, sums.db);
}

template <class T, class P, class R>
Geo check_backward_eval(const Spec& spec, const std::string& where, const View<const T>& dy,
                        const View<const T>& x, const Affine<P>& p, const Running<R>& run,
                        const View<T>& dx, const View<P>& dgamma, const View<P>& dbeta) {
  const Geo g = check_x(spec, where, "x", x, true);
  check_backward(spec, where, g, dy, x, p, dx, dgamma, dbeta);
  check_running(spec, where, run, g.C, true, false);
  if (any_overlap(dx, run.mean) || any_overlap(dx, run.var) || any_overlap(dgamma, run.mean) ||
      any_overlap(dgamma, run.var) || any_overlap(dbeta, run.mean) || any_overlap(dbeta, run.var))
    fail(where, "running", "memory disjoint from dx, dgamma and dbeta", "an overlap");
  return g;
}

// A checked evaluation backward: dx (if present) and the double parameter sums pg.
template <class Isa, class T>
void backward_eval_run(const Spec& spec, const Geo& g, const View<const T>& dy,
                       const View<const T>& x, const T* gamma, const Running<T>& run,
                       const View<T>& dx, const ParamGrads& pg, const Exec& device) {
  std::vector<T> hi(static_cast<std::size_t>(g.C)), lo(hi.size(), T(0));
  std::vector<double> rstd(hi.size());
  for (Index c = 0; c < g.C; ++c) {
    hi[static_cast<std::size_t>(c)] = run.mean.data[c];
    rstd[static_cast<std::size_t>(c)] = running_stat(run, c, spec.eps).rstd;
  }
  backward_per_channel<Isa, T>(g, Mode::Eval, dy, x, hi, lo, rstd, gamma, nullptr, dx, pg,
                               nullptr, device);
}

template <class Isa, class T>
void backward_eval(const Spec& spec, const View<const T>& dy, const View<const T>& x,
                   const Affine<T>& p, const Running<T>& run, const View<T>& dx,
                   const View<T>& dgamma, const View<T>& dbeta, const Exec& device) {
  const Geo g = check_backward_eval(spec, std::string(spec.op) + "::backward_eval", dy, x, p, run,
                                    dx, dgamma, dbeta);
  GradSums sums(g.C, dgamma, dbeta);
  backward_eval_run<Isa, T>(spec, g, dy, x, p.gamma.data, run, dx, sums.ptrs(), device);
  write_param_grads(dgamma, dbeta, sums.dg, sums.db);
}

// ---------------------------------------------------------------------------------
// Data-parallel BatchNorm: the per-shard reductions.

// partial_stats checks x alone (check_x with batch statistics); then this, which throws
// nothing.
template <class Isa, class T>
ChannelMoments partial_stats_run(const Geo& g, const View<const T>& x, const Exec& device) {
  ChannelMoments out;
  out.count = static_cast<double>(g.count());
  out.mean.resize(g.C);
  out.m2.resize(g.C);
  out.mean.setZero();
  out.m2.setZero();
  if (g.count() == 0) return out;
  std::vector<Mom> mom(static_cast<std::size_t>(g.C));
  if (!g.last) {
    const Eigen::TensorOpCost cost(bytes_of<T>(g.count()), 0.0, 3.0 * static_cast<double>(g.count()));
    parallel_for<Isa>(device, g.C, cost, [&](Index c0, Index c1) {
      for (Index c = c0; c < c1; ++c) {
        if (c + 1 < c1) prefetch_stat(g, x.data, c + 1);
        mom[static_cast<std::size_t>(c)] = moments_first<Isa>(g, x.data, c);
      }
    });
  } else {
    mom = moments_last_batch<Isa>(g, x.data, device);
  }
  for (Index c = 0; c < g.C; ++c) {
    const Mom& q = mom[static_cast<std::size_t>(c)];
    out.mean(c) = q.mean_s / q.scale;
    out.m2(c) = q.m2_s / (q.scale * q.scale);
  }
  return out;
}

template <class Isa, class T>
ChannelMoments partial_stats(const Spec& spec, const View<const T>& x, const Exec& device) {
  const Geo g = check_x(spec, std::string(spec.op) + "::partial_stats", "x", x, true);
  return partial_stats_run<Isa, T>(g, x, device);
}

template <class T, class S>
Geo check_partial_grad_sums(const Spec& spec, const std::string& where, const View<const T>& dy,
                            const View<const T>& x, const RowStats<S>& saved) {
  const Geo g = check_x(spec, where, "x", x, true);
  if (!same_dims(dy, x)) fail(where, "dy", "dims " + x.str() + " (those of x)", dy.str());
  require_data(where, "dy", dy);
  check_saved(where, saved, g.C, "one per channel");
  return g;
}

// A checked partial_grad_sums: throws nothing.
template <class Isa, class T>
ChannelGradSums partial_grad_sums_run(const Geo& g, const View<const T>& dy,
                                      const View<const T>& x, const RowStats<T>& saved,
                                      const Exec& device) {
  std::vector<T> hi, lo;
  std::vector<double> rstd;
  saved_per_channel(saved, g.C, hi, lo, rstd);
  ChannelGradSums out;
  backward_per_channel<Isa, T>(g, Mode::Train, dy, x, hi, lo, rstd, nullptr, nullptr, View<T>{},
                               ParamGrads{}, &out, device);
  return out;
}

template <class Isa, class T>
ChannelGradSums partial_grad_sums(const Spec& spec, const View<const T>& dy, const View<const T>& x,
                                  const RowStats<T>& saved, const Exec& device) {
  const Geo g = check_partial_grad_sums(spec, std::string(spec.op) + "::partial_grad_sums", dy, x,
                                        saved);
  return partial_grad_sums_run<Isa, T>(g, dy, x, saved, device);
}

}  // namespace channel
}  // namespace detail
}  // namespace normkit
