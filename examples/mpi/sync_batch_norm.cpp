// Data-parallel (Sync) BatchNorm over MPI with normkit.
//
// Every rank holds a shard of one batch, split along N (unevenly, and in some cases with
// an empty shard on the last rank). The shards are normalized with the statistics of
// the whole batch, as PyTorch's SyncBatchNorm does:
//   forward:  moments = bn.partial_stats(shard)                  per rank
//             MPI_Allreduce with a merging MPI_Op (Chan et al.)  (count, mean, M2) per channel
//             bn.forward_global(shard, ..., merged, y, saved, running)
//   backward: sums = bn.partial_grad_sums(dy, shard, saved)      per rank
//             MPI_Allreduce(MPI_SUM) of sum_dy and sum_dy_xhat   2C doubles
//             bn.backward_global(dy, shard, ..., sums, merged.count, dx, dgamma, dbeta)
// Then it checks the result: every rank builds the whole batch from a fixed seed (and
// takes its own slice from it), runs the single-process bn.forward / bn.backward on it,
// and compares; y and dx are gathered on rank 0 with MPI_Gatherv. It prints the shard
// sizes and the largest differences, and exits non-zero (on every rank) if a check fails.
//
//   mpiexec -n 3 ./sync_batch_norm

#include <mpi.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <normkit/batch_norm.hpp>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using Index = Eigen::Index;
using normkit::ChannelFormat;
using normkit::ChannelGradSums;
using normkit::ChannelMoments;

constexpr double kFltEps = std::numeric_limits<float>::epsilon();
constexpr double kDblEps = std::numeric_limits<double>::epsilon();
constexpr double kBnEps = 1e-5;    // BatchNorm's eps (the default)
constexpr double kMomentum = 0.1;  // BatchNorm's momentum (the default)

// ---------------------------------------------------------------------------------------
// The exchange
// ---------------------------------------------------------------------------------------

// Moments travel as one element of a contiguous MPI datatype of 1 + 2C doubles:
// [count, mean[0..C), m2[0..C)]. An empty shard (count 0) sends zeros, whatever tensors
// partial_stats gave it.
void pack_moments(const ChannelMoments& m, Index C, double* out) {
  out[0] = m.count;
  if (m.count == 0.0) {
    std::fill(out + 1, out + 1 + 2 * C, 0.0);
    return;
  }
  if (m.mean.size() != C || m.m2.size() != C)
    throw std::runtime_error("partial_stats gave " + std::to_string(m.mean.size()) + " means and " +
                             std::to_string(m.m2.size()) + " m2 for " + std::to_string(C) +
                             " channels");
  for (Index c = 0; c < C; ++c) {
    out[1 + c] = m.mean(c);
    out[1 + C + c] = m.m2(c);
  }
}

ChannelMoments unpack_moments(const double* in, Index C) {
  ChannelMoments m;
  m.count = in[0];
  m.mean.resize(C);
  m.m2.resize(C);
  for (Index c = 0; c < C; ++c) {
    m.mean(c) = in[1 + c];
    m.m2(c) = in[1 + C + c];
  }
  return m;
}

// The user-defined reduction: inout = merge(in, inout) for each of the len elements. The
// channel count comes from the datatype's size. The op is registered as non-commutative,
// so MPI combines the shards in rank order (in holds lower ranks than inout); only the
// grouping may vary, which the tolerances cover. normkit::merge is Chan, Golub and
// LeVeque's pairwise update and accepts either side with count 0. It cannot throw here:
// both sides are unpacked with C channels.
void merge_moments_op(void* in, void* inout, int* len, MPI_Datatype* type) {
  int bytes = 0;
  MPI_Type_size(*type, &bytes);
  const Index width = static_cast<Index>(static_cast<std::size_t>(bytes) / sizeof(double));
  const Index C = (width - 1) / 2;
  const double* a = static_cast<const double*>(in);
  double* b = static_cast<double*>(inout);
  for (int k = 0; k < *len; ++k, a += width, b += width)
    pack_moments(normkit::merge(unpack_moments(a, C), unpack_moments(b, C)), C, b);
}

ChannelMoments allreduce_moments(const ChannelMoments& local, Index C, MPI_Comm comm) {
  std::vector<double> buf(static_cast<std::size_t>(1 + 2 * C));
  pack_moments(local, C, buf.data());
  MPI_Datatype type;
  MPI_Type_contiguous(static_cast<int>(buf.size()), MPI_DOUBLE, &type);
  MPI_Type_commit(&type);
  MPI_Op op;
  MPI_Op_create(&merge_moments_op, /*commute=*/0, &op);
  MPI_Allreduce(MPI_IN_PLACE, buf.data(), 1, type, op, comm);
  MPI_Op_free(&op);
  MPI_Type_free(&type);
  return unpack_moments(buf.data(), C);
}

// The gradient sums merge by addition: one MPI_SUM over [sum_dy[C], sum_dy_xhat[C]]. An
// empty shard may give empty tensors: it sends zeros.
ChannelGradSums allreduce_grad_sums(const ChannelGradSums& local, Index C, MPI_Comm comm) {
  std::vector<double> buf(static_cast<std::size_t>(2 * C), 0.0);
  const bool empty = local.sum_dy.size() == 0 && local.sum_dy_xhat.size() == 0;
  if (!empty && (local.sum_dy.size() != C || local.sum_dy_xhat.size() != C))
    throw std::runtime_error("partial_grad_sums gave " + std::to_string(local.sum_dy.size()) +
                             " and " + std::to_string(local.sum_dy_xhat.size()) + " sums for " +
                             std::to_string(C) + " channels");
  for (Index c = 0; !empty && c < C; ++c) {
    buf[static_cast<std::size_t>(c)] = local.sum_dy(c);
    buf[static_cast<std::size_t>(C + c)] = local.sum_dy_xhat(c);
  }
  MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(buf.size()), MPI_DOUBLE, MPI_SUM, comm);
  ChannelGradSums g;
  g.sum_dy.resize(C);
  g.sum_dy_xhat.resize(C);
  for (Index c = 0; c < C; ++c) {
    g.sum_dy(c) = buf[static_cast<std::size_t>(c)];
    g.sum_dy_xhat(c) = buf[static_cast<std::size_t>(C + c)];
  }
  return g;
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

// One quantity compared element by element: the largest |got - want|, the largest
// |got - want| / tol, and how many elements exceeded tol (NaN counts as exceeding).
struct Check {
  const char* name;
  double max_diff = 0.0;
  double worst = 0.0;
  long failures = 0;

  void operator()(double got, double want, double tol) {
    const double d = std::fabs(got - want);
    if (!(d <= tol)) ++failures;
    const double inf = std::numeric_limits<double>::infinity();
    const double dd = std::isnan(d) ? inf : d;
    const double r = dd == 0.0 ? 0.0 : (tol > 0.0 ? dd / tol : inf);
    max_diff = std::max(max_diff, dd);
    worst = std::max(worst, r);
  }
};

// Combines every rank's checks (same names in the same order on every rank).
void reduce_checks(std::vector<Check>& checks, MPI_Comm comm) {
  std::vector<double> mx;
  std::vector<long> bad;
  for (const Check& c : checks) {
    mx.push_back(c.max_diff);
    mx.push_back(c.worst);
    bad.push_back(c.failures);
  }
  MPI_Allreduce(MPI_IN_PLACE, mx.data(), static_cast<int>(mx.size()), MPI_DOUBLE, MPI_MAX, comm);
  MPI_Allreduce(MPI_IN_PLACE, bad.data(), static_cast<int>(bad.size()), MPI_LONG, MPI_SUM, comm);
  for (std::size_t i = 0; i < checks.size(); ++i) {
    checks[i].max_diff = mx[2 * i];
    checks[i].worst = mx[2 * i + 1];
    checks[i].failures = bad[i];
  }
}

// Every rank's text, concatenated in rank order on rank 0 (empty elsewhere).
std::string gather_text(const std::string& mine, int rank, int ranks, MPI_Comm comm) {
  int len = static_cast<int>(mine.size());
  std::vector<int> lens(static_cast<std::size_t>(ranks)), displs(lens.size());
  MPI_Gather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, 0, comm);
  int total = 0;
  for (std::size_t r = 0; r < lens.size(); ++r) {
    displs[r] = total;
    total += lens[r];
  }
  std::string all(rank == 0 ? static_cast<std::size_t>(total) : 0, '\0');
  MPI_Gatherv(mine.data(), len, MPI_CHAR, &all[0], lens.data(), displs.data(), MPI_CHAR, 0, comm);
  return all;
}

// ---------------------------------------------------------------------------------------
// One configuration
// ---------------------------------------------------------------------------------------

struct Case {
  const char* name;
  ChannelFormat format;
  std::vector<Index> dims;  // RowMajor extents, outermost first; dims[0] = N
  bool last_rank_empty;     // the last rank gets no samples
};

// Samples per rank: N split as evenly as possible (the first ranks get one more), over
// all ranks or over all but the last.
std::vector<Index> split(Index N, int ranks, bool last_rank_empty) {
  const int holders = (last_rank_empty && ranks > 1) ? ranks - 1 : ranks;
  std::vector<Index> n(static_cast<std::size_t>(ranks), 0);
  for (int r = 0; r < holders; ++r)
    n[static_cast<std::size_t>(r)] = N / holders + (r < N % holders ? 1 : 0);
  return n;
}

// The exact (double, two-pass) moments of each channel of the whole batch, and its
// range: the scale of the tolerances, and the reference of the sanity checks.
struct Exact {
  std::vector<double> mean, var, rstd, lo, hi;  // lo, hi: the smallest and largest value
};

template <int R>
bool run_case(const Case& cs, int rank, int ranks, MPI_Comm comm, std::uint64_t seed) {
  using Map = Eigen::TensorMap<Eigen::Tensor<float, R, Eigen::RowMajor>>;
  using CMap = Eigen::TensorMap<Eigen::Tensor<const float, R, Eigen::RowMajor>>;
  using Vec = Eigen::Tensor<float, 1>;
  const bool first = cs.format == ChannelFormat::First;

  std::array<Index, R> dims{};
  std::copy(cs.dims.begin(), cs.dims.end(), dims.begin());
  const Index N = dims[0];
  const Index C = first ? dims[1] : dims[R - 1];
  const Index per_sample = std::accumulate(dims.begin() + 1, dims.end(), Index{1},
                                           [](Index a, Index b) { return a * b; });
  const Index S = per_sample / C;  // spatial positions per sample
  const Index n = N * S;           // values per channel in the whole batch
  const auto channel = [&](Index i) { return first ? (i / S) % C : i % C; };
  const auto sz = [](Index i) { return static_cast<std::size_t>(i); };

  // The whole batch, the same on every rank (fixed seed): channel c ~ mu[c] + sd[c] z,
  // with offsets up to 1000 times the spread; dy ~ z. gamma, beta and the initial
  // running statistics are distinct per channel.
  const double mu[] = {-3.0, 0.5, 2.0, 10.0, 100.0, 1000.0};
  const double sd[] = {1.0, 0.5, 2.0, 0.1, 3.0, 1.0};
  std::vector<float> x(sz(N * per_sample)), dy(x.size());
  {
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> z(0.0, 1.0);
    for (Index i = 0; i < N * per_sample; ++i) {
      const Index c = channel(i) % 6;
      x[sz(i)] = static_cast<float>(mu[c] + sd[c] * z(gen));
      dy[sz(i)] = static_cast<float>(z(gen));
    }
  }
  Vec gamma(C), beta(C), rm0(C), rv0(C);
  for (Index c = 0; c < C; ++c) {
    gamma(c) = 0.5f + 0.25f * static_cast<float>(c);
    beta(c) = 0.1f * static_cast<float>(c) - 0.2f;
    rm0(c) = 0.25f * static_cast<float>(c);
    rv0(c) = 1.0f + 0.5f * static_cast<float>(c);
  }
  const auto params = normkit::affine(gamma, beta);
  const normkit::BatchNorm<float> bn(cs.format, kBnEps, kMomentum);

  // This rank's shard: samples [n0, n0 + nr) of the whole batch.
  const std::vector<Index> shard = split(N, ranks, cs.last_rank_empty);
  Index n0 = 0;
  for (int r = 0; r < rank; ++r) n0 += shard[sz(r)];
  const Index nr = shard[sz(rank)];
  std::array<Index, R> sdims = dims;
  sdims[0] = nr;
  const CMap xs(x.data() + n0 * per_sample, sdims);
  const CMap dys(dy.data() + n0 * per_sample, sdims);

  // ---- Data-parallel forward and backward ----
  const ChannelMoments local = bn.partial_stats(xs);
  const ChannelMoments global = allreduce_moments(local, C, comm);

  std::vector<float> ys(sz(nr * per_sample)), dxs(ys.size());
  normkit::RowStats<float> saved;
  Vec rm = rm0, rv = rv0;  // this rank's copy of the running statistics
  std::int64_t tracked = 0;
  bn.forward_global(xs, params, global, Map(ys.data(), sdims), saved,
                    normkit::running(rm, rv, tracked));

  const ChannelGradSums local_sums = bn.partial_grad_sums(dys, xs, saved);
  const ChannelGradSums sums = allreduce_grad_sums(local_sums, C, comm);
  Vec dgamma(C), dbeta(C);
  bn.backward_global(dys, xs, params, saved, sums, global.count, Map(dxs.data(), sdims), dgamma,
                     dbeta);

  // ---- The single-process reference on the whole batch (every rank) ----
  const CMap xw(x.data(), dims), dyw(dy.data(), dims);
  std::vector<float> yw(x.size()), dxw(x.size());
  normkit::RowStats<float> saved_w;
  Vec rm_w = rm0, rv_w = rv0, dgamma_w(C), dbeta_w(C);
  std::int64_t tracked_w = 0;
  bn.forward(xw, params, Map(yw.data(), dims), saved_w, normkit::running(rm_w, rv_w, tracked_w));
  bn.backward(dyw, xw, params, saved_w, Map(dxw.data(), dims), dgamma_w, dbeta_w);

  // ---- Gather y and dx on rank 0 ----
  std::vector<int> counts(sz(ranks)), displs(sz(ranks));
  for (int r = 0, off = 0; r < ranks; ++r) {
    counts[sz(r)] = static_cast<int>(shard[sz(r)] * per_sample);
    displs[sz(r)] = off;
    off += counts[sz(r)];
  }
  std::vector<float> y_all(rank == 0 ? x.size() : 0), dx_all(y_all.size());
  MPI_Gatherv(ys.data(), counts[sz(rank)], MPI_FLOAT, y_all.data(), counts.data(), displs.data(),
              MPI_FLOAT, 0, comm);
  MPI_Gatherv(dxs.data(), counts[sz(rank)], MPI_FLOAT, dx_all.data(), counts.data(), displs.data(),
              MPI_FLOAT, 0, comm);
  std::vector<double> shard_counts(sz(ranks));
  MPI_Gather(&local.count, 1, MPI_DOUBLE, shard_counts.data(), 1, MPI_DOUBLE, 0, comm);

  // ---- Do the replicas hold bitwise the same merged numbers? (Informational: MPI
  // recommends but does not promise it.) ----
  int same = 1;
  {
    std::vector<double> mine(sz(1 + 4 * C)), root;
    pack_moments(global, C, mine.data());
    for (Index c = 0; c < C; ++c) {
      mine[sz(1 + 2 * C + c)] = sums.sum_dy(c);
      mine[sz(1 + 3 * C + c)] = sums.sum_dy_xhat(c);
    }
    root = mine;
    MPI_Bcast(root.data(), static_cast<int>(root.size()), MPI_DOUBLE, 0, comm);
    same = std::memcmp(root.data(), mine.data(), root.size() * sizeof(double)) == 0 ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &same, 1, MPI_INT, MPI_LAND, comm);
  }

  // ---- Compare ----
  bool ok = true;
  std::string notes;  // this rank's failed expectations, printed by rank 0
  const auto expect = [&](bool cond, const std::string& what) {
    if (!cond) {
      notes += "  rank " + std::to_string(rank) + ": FAILED: " + what + "\n";
      ok = false;
    }
  };
  const auto sizes_ok = [&](const normkit::RowStats<float>& s) {
    return s.mean.size() == C && s.mean_lo.size() == C && s.rstd.size() == C;
  };
  const auto num = [](double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.17g", v);
    return std::string(b);
  };
  expect(local.count == static_cast<double>(nr * S),
         "partial_stats count " + num(local.count) + ", expected " + std::to_string(nr * S));
  expect(global.count == static_cast<double>(n),
         "merged count " + num(global.count) + ", expected " + std::to_string(n));
  expect(sizes_ok(saved), "forward_global's saved statistics do not have C entries");
  expect(sizes_ok(saved_w), "forward's saved statistics do not have C entries");
  expect(tracked == 1 && tracked_w == 1, "num_batches_tracked " + std::to_string(tracked) +
                                             " (sharded), " + std::to_string(tracked_w) +
                                             " (whole), expected 1");

  // Exact per-channel moments and range of the whole batch (double, two passes over the
  // float data).
  Exact ex;
  ex.mean.assign(sz(C), 0.0);
  ex.var.assign(sz(C), 0.0);
  ex.rstd.assign(sz(C), 0.0);
  ex.lo.assign(sz(C), std::numeric_limits<double>::infinity());
  ex.hi.assign(sz(C), -std::numeric_limits<double>::infinity());
  for (Index i = 0; i < N * per_sample; ++i) {
    const std::size_t c = sz(channel(i));
    ex.mean[c] += x[sz(i)];
    ex.lo[c] = std::min(ex.lo[c], static_cast<double>(x[sz(i)]));
    ex.hi[c] = std::max(ex.hi[c], static_cast<double>(x[sz(i)]));
  }
  for (Index c = 0; c < C; ++c) ex.mean[sz(c)] /= static_cast<double>(n);
  for (Index i = 0; i < N * per_sample; ++i) {
    const double d = x[sz(i)] - ex.mean[sz(channel(i))];
    ex.var[sz(channel(i))] += d * d;
  }
  for (Index c = 0; c < C; ++c) {
    ex.var[sz(c)] /= static_cast<double>(n);
    ex.rstd[sz(c)] = 1.0 / std::sqrt(ex.var[sz(c)] + kBnEps);
  }
  const auto xhat = [&](Index i) {
    const Index c = channel(i);
    return (static_cast<double>(x[sz(i)]) - ex.mean[sz(c)]) * ex.rstd[sz(c)];
  };
  // Per-channel sums of magnitudes, and the exact gradient sums.
  std::vector<double> abs_dy(sz(C), 0.0), abs_dy_xhat(sz(C), 0.0), s_dy(sz(C), 0.0),
      s_dy_xhat(sz(C), 0.0);
  for (Index i = 0; i < N * per_sample; ++i) {
    const std::size_t c = sz(channel(i));
    const double g = dy[sz(i)], h = xhat(i);
    abs_dy[c] += std::fabs(g);
    abs_dy_xhat[c] += std::fabs(g * h);
    s_dy[c] += g;
    s_dy_xhat[c] += g * h;
  }

  // Tolerances. eps = FLT_EPSILON (2u, u = float's unit roundoff), n values per channel,
  // R = max - min of the channel. Two columns: "sharded vs whole" (two computations,
  // their bounds added) and "whole vs exact" (one computation against the double
  // formulas above).
  // Moments of one computation (partial_stats, or merged shards) against exact: the
  // statistics of float data may be summed from d = x - shift in float, in trees of a
  // few terms, then in double (the engine's fast path; its exact path is tighter), with
  // shift an element of the channel, so |d| <= R. Each d carries <= u |d|, each tree
  // 3u more, d*d 2u + u more: the sum of d is within 4u n R, that of d*d within 6u n R^2;
  // var = sum d^2 / n - (sum d / n)^2 adds 2 R (2 eps R); Chan's merge of shards adds
  // their mean errors times R again. With the double sums' own n DBL_EPSILON:
  //   e_mean = 2 eps R + 2 n DBL_EPSILON (|mean| + R)
  //   e_var  = 10 eps R^2 + 4 n DBL_EPSILON (var + |mean| R)
  // and d_mean = 2 e_mean, d_var = 2 e_var between two computations. Then float outputs:
  //   rstd (relative): e_var / (2 (var + beps)) + eps per computation (one rounding to
  //                    float, one inside)
  //   mean hi+lo:      d_mean + 2 eps^2 |mean|      (mean_lo is the float residue)
  //   xhat_i:          exh = 2 eps |xhat| + e_mean rstd + |xhat| rstd_rel per computation
  //   y:               |gamma| exh + 8 eps |xhat gamma| + 2 eps |beta| per computation
  //                    (README's forward bound for the element-wise pass)
  //   running:         4 eps ((1 - m) |old| + m |new|) + m (mean or var error, x n/(n-1))
  //   sum dy:          dS1 = 2 eps sum|dy| + 2 n DBL_EPSILON sum|dy|  (float trees, order)
  //   sum dy xhat:     dS2 = 2 eps sum|dy xhat| + sum |dy| exh + 2 n DBL_EPSILON sum|dy xhat|
  //   dbeta, dgamma:   dS1, dS2 + 2 eps |result| (the final rounding to float)
  //   dx:              |gamma| rstd (16 eps A + rstd_rel A + exh |S2| / n
  //                    + (dS1 + |xhat| dS2) / n), A = |dy| + |S1| / n + |xhat S2| / n,
  //                    S1 = sum dy, S2 = sum dy xhat: the roundings of dx's few float
  //                    operations, and the errors of rstd, xhat and the sums
  // "Whole vs exact" is a sanity check (both computations could agree on a wrong answer):
  // its element-wise rounding terms are 64 eps of the same magnitudes (64 eps^2 for the
  // split mean); tests/ checks the engine's accuracy closely.
  const double eps = kFltEps, nd = static_cast<double>(n), m = kMomentum;
  const double unbias = nd / (nd - 1.0);
  // Per channel: [0] one computation against exact, [1] two computations apart.
  struct Tol {
    double mean, var, rstd_rel;
  };
  std::vector<std::array<Tol, 2>> tol(sz(C));
  for (Index c = 0; c < C; ++c) {
    const std::size_t k = sz(c);
    const double range = ex.hi[k] - ex.lo[k], mean = std::fabs(ex.mean[k]), var = ex.var[k];
    const double e_mean = 2.0 * eps * range + 2.0 * nd * kDblEps * (mean + range);
    const double e_var = 10.0 * eps * range * range + 4.0 * nd * kDblEps * (var + mean * range);
    for (int two = 0; two < 2; ++two) {
      const double f = two ? 2.0 : 1.0;
      tol[k][sz(two)] = {f * e_mean, f * e_var, f * (e_var / (2.0 * (var + kBnEps)) + eps)};
    }
  }
  // xhat's error at element i, for one (two = 0) or two (two = 1) computations.
  const auto exh = [&](Index i, int two) {
    const std::size_t k = sz(channel(i));
    const Tol& t = tol[k][sz(two)];
    const double h = std::fabs(xhat(i));
    return (two ? 4.0 : 2.0) * eps * h + t.mean * ex.rstd[k] + h * t.rstd_rel;
  };
  std::vector<std::array<double, 2>> d_s1(sz(C)), d_s2(sz(C));
  for (Index c = 0; c < C; ++c) {
    const std::size_t k = sz(c);
    for (int two = 0; two < 2; ++two) {
      const double f = two ? 2.0 : 1.0;
      d_s1[k][sz(two)] = f * (eps + nd * kDblEps) * abs_dy[k];
      d_s2[k][sz(two)] = f * (eps + nd * kDblEps) * abs_dy_xhat[k];
    }
  }
  for (Index i = 0; i < N * per_sample; ++i)
    for (int two = 0; two < 2; ++two)
      d_s2[sz(channel(i))][sz(two)] += std::fabs(dy[sz(i)]) * exh(i, two);

  // The first two rows compare the merged moments (double) with partial_stats of the
  // whole batch, and those with the exact moments.
  std::vector<Check> vs_whole = {{"merged mean (f64)"},
                                 {"merged var (f64)"},
                                 {"saved mean (hi+lo)"},
                                 {"saved rstd"},
                                 {"running mean"},
                                 {"running var"},
                                 {"dgamma"},
                                 {"dbeta"},
                                 {"y (gathered)"},
                                 {"dx (gathered)"}};
  std::vector<Check> vs_exact = vs_whole;
  const ChannelMoments whole = bn.partial_stats(xw);
  const auto moments_ok = [&](const ChannelMoments& mm) {
    return mm.mean.size() == C && mm.m2.size() == C;
  };
  expect(moments_ok(whole) && whole.count == static_cast<double>(n),
         "partial_stats of the whole batch: count " + num(whole.count) + ", " +
             std::to_string(whole.mean.size()) + " means");
  const bool shapes = sizes_ok(saved) && sizes_ok(saved_w) && moments_ok(whole);
  for (Index c = 0; shapes && c < C; ++c) {
    const std::size_t k = sz(c);
    const Tol &t1 = tol[k][0], &t2 = tol[k][1];
    const double mean = ex.mean[k], var = ex.var[k], rstd = ex.rstd[k];
    const double mh = static_cast<double>(saved.mean(c)) + static_cast<double>(saved.mean_lo(c));
    const double mh_w =
        static_cast<double>(saved_w.mean(c)) + static_cast<double>(saved_w.mean_lo(c));
    const double rm_scale = (1.0 - m) * std::fabs(rm0(c)) + m * std::fabs(mean);
    const double rv_scale = (1.0 - m) * std::fabs(rv0(c)) + m * var * unbias;

    vs_whole[0](global.mean(c), whole.mean(c), t2.mean);
    vs_whole[1](global.m2(c) / nd, whole.m2(c) / nd, t2.var);
    vs_whole[2](mh, mh_w, t2.mean + 2.0 * eps * eps * std::fabs(mean));
    vs_whole[3](saved.rstd(c), saved_w.rstd(c), t2.rstd_rel * rstd);
    vs_whole[4](rm(c), rm_w(c), 4.0 * eps * rm_scale + m * t2.mean);
    vs_whole[5](rv(c), rv_w(c), 4.0 * eps * rv_scale + m * t2.var * unbias);
    vs_whole[6](dgamma(c), dgamma_w(c), 2.0 * eps * std::fabs(dgamma_w(c)) + d_s2[k][1]);
    vs_whole[7](dbeta(c), dbeta_w(c), 2.0 * eps * std::fabs(dbeta_w(c)) + d_s1[k][1]);

    if (rank == 0) {
      vs_exact[0](whole.mean(c), mean, t1.mean);
      vs_exact[1](whole.m2(c) / nd, var, t1.var);
      vs_exact[2](mh_w, mean, t1.mean + 64.0 * eps * eps * std::fabs(mean));
      vs_exact[3](saved_w.rstd(c), rstd, (t1.rstd_rel + 64.0 * eps) * rstd);
      vs_exact[4](rm_w(c), (1.0 - m) * rm0(c) + m * mean, 64.0 * eps * rm_scale + m * t1.mean);
      vs_exact[5](rv_w(c), (1.0 - m) * rv0(c) + m * var * unbias,
                  64.0 * eps * rv_scale + m * t1.var * unbias);
      vs_exact[6](dgamma_w(c), s_dy_xhat[k], 64.0 * eps * abs_dy_xhat[k] + d_s2[k][0]);
      vs_exact[7](dbeta_w(c), s_dy[k], 64.0 * eps * abs_dy[k] + d_s1[k][0]);
    }
  }
  if (rank == 0 && shapes) {
    for (Index i = 0; i < N * per_sample; ++i) {
      const Index c = channel(i);
      const std::size_t k = sz(c);
      const double g = gamma(c), b = beta(c), h = xhat(i), rstd = ex.rstd[k];
      const double s1 = s_dy[k], s2 = s_dy_xhat[k];
      const double a = std::fabs(dy[sz(i)]) + std::fabs(s1) / nd + std::fabs(h * s2) / nd;
      const double ag = std::fabs(g), ahg = std::fabs(h * g), ab = std::fabs(b);
      // Two computations apart (sharded vs whole), and one against exact (sanity).
      const double y_tol2 = ag * exh(i, 1) + 16.0 * eps * ahg + 4.0 * eps * ab;
      const double dx_tol2 =
          ag * rstd *
          (16.0 * eps * a + tol[k][1].rstd_rel * a + exh(i, 1) * std::fabs(s2) / nd +
           (d_s1[k][1] + std::fabs(h) * d_s2[k][1]) / nd);
      const double y_tol1 = ag * exh(i, 0) + 64.0 * eps * (ahg + ab);
      const double dx_tol1 =
          ag * rstd *
          (64.0 * eps * a + tol[k][0].rstd_rel * a + exh(i, 0) * std::fabs(s2) / nd +
           (d_s1[k][0] + std::fabs(h) * d_s2[k][0]) / nd);
      vs_whole[8](y_all[sz(i)], yw[sz(i)], y_tol2);
      vs_whole[9](dx_all[sz(i)], dxw[sz(i)], dx_tol2);
      vs_exact[8](yw[sz(i)], h * g + b, y_tol1);
      vs_exact[9](dxw[sz(i)], g * rstd / nd * (nd * dy[sz(i)] - s1 - h * s2), dx_tol1);
    }
  }
  reduce_checks(vs_whole, comm);
  reduce_checks(vs_exact, comm);
  const std::string all_notes = gather_text(notes, rank, ranks, comm);

  // ---- Report (rank 0) ----
  if (rank == 0) {
    std::string dstr;
    for (Index d : cs.dims) dstr += (dstr.empty() ? "" : ",") + std::to_string(d);
    std::printf("\n%s: x [%s] float, %s, C = %ld, %ld values per channel\n", cs.name, dstr.c_str(),
                first ? "channels first" : "channels last", static_cast<long>(C),
                static_cast<long>(n));
    for (int r = 0; r < ranks; ++r)
      std::printf("  rank %d: %ld of %ld samples, partial_stats count %.0f\n", r,
                  static_cast<long>(shard[sz(r)]), static_cast<long>(N), shard_counts[sz(r)]);
    std::printf("  merged count %.0f; replicas hold bitwise identical merged sums: %s\n",
                global.count, same ? "yes" : "no");
    std::printf("  %-20s %14s %12s   %14s %12s\n", "", "sharded-whole", "/tol", "whole-exact",
                "/tol");
    for (std::size_t q = 0; q < vs_whole.size(); ++q) {
      std::printf("  %-20s %14.3g %12.3g   %14.3g %12.3g%s\n", vs_whole[q].name,
                  vs_whole[q].max_diff, vs_whole[q].worst, vs_exact[q].max_diff, vs_exact[q].worst,
                  vs_whole[q].failures + vs_exact[q].failures > 0 ? "   FAILED" : "");
    }
    std::printf("%s", all_notes.c_str());
  }
  for (std::size_t q = 0; q < vs_whole.size(); ++q)
    ok = ok && vs_whole[q].failures == 0 && vs_exact[q].failures == 0;
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm comm = MPI_COMM_WORLD;
  int rank = 0, ranks = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  if (rank == 0)
    std::printf("sync_batch_norm: data-parallel BatchNorm on %d MPI rank%s\n", ranks,
                ranks == 1 ? "" : "s");

  const std::vector<Case> cases = {
      {"NCHW", ChannelFormat::First, {7, 6, 5, 5}, false},
      {"NHWC", ChannelFormat::Last, {7, 5, 5, 6}, false},
      {"NCL, last rank empty", ChannelFormat::First, {7, 6, 9}, true},
      {"NLC, last rank empty", ChannelFormat::Last, {7, 9, 6}, true},
      {"NC, last rank empty", ChannelFormat::First, {7, 6}, true},
  };

  bool ok = true;
  std::uint64_t seed = 20240501;
  for (const Case& cs : cases) {
    bool case_ok = false;
    try {
      switch (cs.dims.size()) {
        case 2:
          case_ok = run_case<2>(cs, rank, ranks, comm, seed);
          break;
        case 3:
          case_ok = run_case<3>(cs, rank, ranks, comm, seed);
          break;
        case 4:
          case_ok = run_case<4>(cs, rank, ranks, comm, seed);
          break;
        default:
          throw std::logic_error("unsupported rank");
      }
    } catch (const std::exception& e) {
      // The other ranks may be waiting in a collective: end the whole job.
      std::fprintf(stderr, "rank %d: %s: exception: %s\n", rank, cs.name, e.what());
      std::fflush(stderr);
      MPI_Abort(comm, 2);
    }
    ok = ok && case_ok;
    ++seed;
  }

  // Every rank leaves with the same status.
  int all_ok = ok ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &all_ok, 1, MPI_INT, MPI_LAND, comm);
  if (rank == 0) std::printf("\nsync_batch_norm: %s\n", all_ok ? "PASS" : "FAILED");
  MPI_Finalize();
  return all_ok ? 0 : 1;
}
