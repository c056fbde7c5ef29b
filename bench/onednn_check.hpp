// oneDNN baselines in the benches: registration, and the checks run once per benchmark
// before it is timed. Included by bench/layer_norm.cpp and bench/channel_norm.cpp when
// they are built with oneDNN (NKBENCH_WITH_ONEDNN).
//
// A oneDNN benchmark times one call of a primitive created beforehand (once per shape,
// direction and thread count, in the benchmark's setup, as a user creates a layer's
// primitives once): forward = training forward (y, mean, variance), backward =
// prop_kind::backward (dx, dgamma, dbeta from x, dy, gamma and the forward's
// statistics). Same buffers, byte counts and roofline as the normkit kernel it is
// compared with.
//
// Before timing (once per benchmark) it checks, and a failure is fatal (the benchmark is
// skipped, the check is listed after the summary, the binary exits 1):
//  1. agreement with normkit on the same x, gamma, beta, dy (normkit on one thread: its
//     results are bitwise the same for any thread count): forward y, mean, variance;
//     backward also dx, dgamma, dbeta; every element, against the tolerances below;
//  2. for a 1-thread benchmark, that oneDNN ran on the calling thread alone: the other
//     threads of the process took at most 5% of its CPU time while the primitive ran
//     repeatedly (measure_thread_use; measured up to 4 times, the last one counts).
//     2-thread benchmarks report the share (~50%).
//
// Tolerances (max |oneDNN - normkit| over every element). With eps_f = FLT_EPSILON
// (1.19e-7), K = 4 (a safety factor), n the number of elements per statistic (features
// for LayerNorm, N*H*W for BatchNorm), m the number per parameter (rows for LayerNorm,
// N*H*W for BatchNorm), s = sqrt(n) eps_f (the growth of a float sum's rounding error
// over n terms, relative to the terms' magnitude), and magnitudes over the tensor,
// computed in double from normkit's statistics: |x|max, d2 = max (x - mean)^2,
// xhat = max |x - mean| rstd, r = max rstd, V = 1 / rstd^2 = var + eps (min and max over
// the groups), |gamma|max, |beta|max, g = dy gamma:
//   mean      T_mean = K s |x|max
//   variance  T_var  = K (s d2 + eps_f Vmax)
// The outputs' tolerances then carry the statistics' measured differences (dmean,
// dvar: within the above, or the check fails there) to first order, plus each output's
// own float rounding:
//   rstd      relative rho = dvar / (2 Vmin) + K eps_f                 (derived)
//   xhat      dxh = r dmean + xhat rho                                 (derived)
//   y         |gamma|max dxh + K eps_f (|gamma|max xhat + |beta|max)
//   dx        r (K s |g|max + xhat (K s |g xhat|max + |g|max dxh) + dxh |g xhat|max
//               + K eps_f (2 |g|max + xhat |g xhat|max)) + rho |dx|max
//             (dx = rstd (g - mean(g) - xhat mean(g xhat)) with means over a group)
//   dbeta     K sqrt(m) eps_f max_j sum_i |dy|                 (sums over a parameter's m)
//   dgamma    K sqrt(m) eps_f max_j sum_i |dy xhat| + dxh max_j sum_i |dy|
// The sums' bounds take every term with the same sign (the worst case), so they sit far
// above the differences measured on this data (zero-mean dy); the element-wise y is
// within a few times. A wrong layout, parameter or formula gives differences of the
// order of the values themselves (0.1 to 100), far above every tolerance.
#pragma once

#include <cfloat>
#include <chrono>
#include <exception>
#include <optional>
#include <thread>

#include "bench_common.hpp"
#include "onednn.hpp"

namespace nkbench {

// How a normalization's elements map to its statistic groups and parameters, by flat
// index i into x:  group(i) = (i / group_div) % groups, param(i) = (i / param_div) % params.
struct NormLayout {
  Index size;
  Index group_div, groups;
  Index param_div, params;

  Index group(Index i) const { return (i / group_div) % groups; }
  Index param(Index i) const { return (i / param_div) % params; }
  Index group_size() const { return size / groups; }  // n above
  Index param_size() const { return size / params; }  // m above

  // LayerNorm over the features of a [rows, features] tensor.
  static NormLayout rows_features(Index rows, Index features) {
    return {rows * features, features, rows, 1, features};
  }
  // BatchNorm over (N, H, W) per channel of an (N, C, H, W) tensor.
  static NormLayout nchw(Index n, Index c, Index hw) { return {n * c * hw, hw, c, hw, c}; }
};

// Runs normkit on one thread over the workspace of the benchmark's shape: forward (into
// y), and for Dir::Bwd then backward (into dx, dgamma, dbeta), and returns its statistics
// per group (mean + mean_lo, rstd).
using NormkitRun = std::function<void(Dir, std::vector<double>& mean, std::vector<double>& rstd)>;
// Creates the oneDNN primitives over the workspace's buffers for a thread count.
using OnednnCreate = std::function<std::unique_ptr<onednn::Norm>(const onednn::Buffers&, int)>;

namespace onednn_check {

// normkit's saved statistics in double: mean (mean + mean_lo where saved) and rstd, for
// `count` statistics.
inline void saved_in_double(const normkit::RowStats<float>& saved, Index count,
                            std::vector<double>& mean, std::vector<double>& rstd) {
  mean.resize(static_cast<std::size_t>(count));
  rstd.resize(static_cast<std::size_t>(count));
  for (Index k = 0; k < count; ++k) {
    const double lo = saved.mean_lo.size() == count ? saved.mean_lo(k) : 0.0f;
    mean[static_cast<std::size_t>(k)] = static_cast<double>(saved.mean(k)) + lo;
    rstd[static_cast<std::size_t>(k)] = saved.rstd(k);
  }
}

struct Compared {
  std::string what;
  double err = 0.0;
  double tol = 0.0;
  bool ok() const { return err <= tol; }  // false for NaN
};

// err = max(err, |a - b|), and infinity if either is NaN.
inline void track(double& err, double a, double b) {
  const double d = std::fabs(a - b);
  if (std::isnan(d))
    err = INFINITY;
  else
    err = std::max(err, d);
}

inline std::vector<Compared> compare(Dir dir, const NormLayout& L, double eps, const Workspace& w,
                                     const std::vector<double>& mean,
                                     const std::vector<double>& rstd,
                                     const std::vector<float>& ref_out,
                                     const std::vector<float>& ref_dgamma,
                                     const std::vector<float>& ref_dbeta, const onednn::Norm& d) {
  const double fe = FLT_EPSILON, K = 4.0;
  const double s = std::sqrt(static_cast<double>(L.group_size())) * fe;
  const double sm = std::sqrt(static_cast<double>(L.param_size())) * fe;
  const float* x = w.x.data();
  const float* gamma = w.gamma.data();
  const float* beta = w.beta.data();

  // Statistics.
  double err_mean = 0, err_var = 0, r_max = 0, v_min = INFINITY, v_max = 0;
  for (Index g = 0; g < L.groups; ++g) {
    const auto k = static_cast<std::size_t>(g);
    const double v = 1.0 / (rstd[k] * rstd[k]);  // var + eps
    r_max = std::max(r_max, rstd[k]);
    v_min = std::min(v_min, v);
    v_max = std::max(v_max, v);
    track(err_mean, d.mean()[g], mean[k]);
    track(err_var, d.variance()[g], v - eps);
  }
  double gamma_max = 0, beta_max = 0;
  for (Index p = 0; p < L.params; ++p) {
    gamma_max = std::max(gamma_max, std::fabs(static_cast<double>(gamma[p])));
    beta_max = std::max(beta_max, std::fabs(static_cast<double>(beta[p])));
  }

  // Element-wise: magnitudes, and y or dx against normkit's.
  double x_max = 0, d2_max = 0, xh_max = 0, out_max = 0, err_out = 0, g_max = 0, gx_max = 0;
  std::vector<double> sum_dy, sum_dyx;
  if (dir == Dir::Bwd) {
    sum_dy.assign(static_cast<std::size_t>(L.params), 0.0);
    sum_dyx.assign(static_cast<std::size_t>(L.params), 0.0);
  }
  const float* out = dir == Dir::Fwd ? w.y.data() : w.dx.data();
  for (Index i = 0; i < L.size; ++i) {
    const auto g = static_cast<std::size_t>(L.group(i));
    const Index p = L.param(i);
    const double xc = static_cast<double>(x[i]) - mean[g];
    const double xh = xc * rstd[g];
    x_max = std::max(x_max, std::fabs(static_cast<double>(x[i])));
    d2_max = std::max(d2_max, xc * xc);
    xh_max = std::max(xh_max, std::fabs(xh));
    const auto k = static_cast<std::size_t>(i);
    out_max = std::max(out_max, std::fabs(static_cast<double>(ref_out[k])));
    track(err_out, out[i], ref_out[k]);
    if (dir == Dir::Bwd) {
      const double dy = w.dy.data()[i];
      const double gi = dy * gamma[p];
      g_max = std::max(g_max, std::fabs(gi));
      gx_max = std::max(gx_max, std::fabs(gi * xh));
      sum_dy[static_cast<std::size_t>(p)] += std::fabs(dy);
      sum_dyx[static_cast<std::size_t>(p)] += std::fabs(dy * xh);
    }
  }

  const double t_mean = K * s * x_max;
  const double t_var = K * (s * d2_max + fe * v_max);
  const double rho = err_var / (2.0 * v_min) + K * fe;
  const double dxh = r_max * err_mean + xh_max * rho;
  std::vector<Compared> c;
  if (dir == Dir::Fwd) {
    const double t_y = gamma_max * dxh + K * fe * (gamma_max * xh_max + beta_max);
    c.push_back({"y", err_out, t_y});
  } else {
    const double t_dx = r_max * (K * s * g_max + xh_max * (K * s * gx_max + g_max * dxh) +
                                 dxh * gx_max + K * fe * (2.0 * g_max + xh_max * gx_max)) +
                        rho * out_max;
    c.push_back({"dx", err_out, t_dx});
    double err_dg = 0, err_db = 0, sdy_max = 0, sdyx_max = 0;
    for (Index p = 0; p < L.params; ++p) {
      const auto k = static_cast<std::size_t>(p);
      track(err_dg, w.dgamma.data()[p], ref_dgamma[k]);
      track(err_db, w.dbeta.data()[p], ref_dbeta[k]);
      sdy_max = std::max(sdy_max, sum_dy[k]);
      sdyx_max = std::max(sdyx_max, sum_dyx[k]);
    }
    c.push_back({"dgamma", err_dg, K * sm * sdyx_max + dxh * sdy_max});
    c.push_back({"dbeta", err_db, K * sm * sdy_max});
  }
  c.push_back({"mean", err_mean, t_mean});
  c.push_back({"variance", err_var, t_var});
  return c;
}

inline std::string sci(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1e", v);
  return b;
}

// Share of the process's CPU time that other threads may take in a 1-thread run.
constexpr double kMaxHelperShare = 0.05;

struct State {
  Meta meta;
  NormLayout layout;
  double eps;
  OnednnCreate create;
  NormkitRun normkit;
  std::unique_ptr<onednn::Norm> norm;
  std::optional<std::string> verdict;  // set by the first setup: empty if every check passed

  void run() {
    if (meta.dir == Dir::Fwd)
      norm->forward();
    else
      norm->backward();
  }
};

// The setup of a oneDNN benchmark: the first call creates the primitives and runs the
// checks (see the top of this file); every call returns their verdict.
inline std::string prepare(State& st) {
  if (st.verdict) return *st.verdict;
  const std::string name = bench_name(st.meta);
  auto fail = [&](const std::string& why) {
    check_records().push_back({name, false, why});
    st.verdict = "oneDNN check failed: " + why;
    return *st.verdict;
  };
  Workspace& w = workspace(st.meta.shape);
  try {
    st.norm = st.create({w.x.data(), w.gamma.data(), w.beta.data(), w.y.data(), w.dy.data(),
                         w.dx.data(), w.dgamma.data(), w.dbeta.data()},
                        st.meta.threads);
  } catch (const std::exception& e) {
    return fail(std::string("creating the primitives: ") + e.what());
  }

  // normkit's results, then oneDNN's over the same buffers.
  std::vector<double> mean, rstd;
  st.normkit(st.meta.dir, mean, rstd);
  const bool fwd = st.meta.dir == Dir::Fwd;
  const Buffer& out = fwd ? w.y : w.dx;
  const std::vector<float> ref_out(out.data(), out.data() + out.size());
  std::vector<float> ref_dgamma, ref_dbeta;
  if (!fwd) {
    ref_dgamma.assign(w.dgamma.data(), w.dgamma.data() + w.dgamma.size());
    ref_dbeta.assign(w.dbeta.data(), w.dbeta.data() + w.dbeta.size());
  }
  try {
    st.norm->forward();
    if (!fwd) st.norm->backward();
  } catch (const std::exception& e) {
    return fail(std::string("executing: ") + e.what());
  }
  const std::vector<Compared> c = compare(st.meta.dir, st.layout, st.eps, w, mean, rstd, ref_out,
                                          ref_dgamma, ref_dbeta, *st.norm);

  // Threads.
  // A 1-thread run measured above the limit is measured again (up to 3 times, 50 ms
  // apart): OpenMP workers left from an earlier multi-threaded benchmark may still be
  // spinning (OMP_WAIT_POLICY unset), which is not this primitive's work; a primitive
  // that does use a second thread shows ~50% every time.
  ThreadUse use = measure_thread_use([&st] { st.run(); }, 0.05);
  for (int retry = 0; st.meta.threads == 1 && !(use.helper_share <= kMaxHelperShare) && retry < 3;
       ++retry) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    use = measure_thread_use([&st] { st.run(); }, 0.05);
  }

  std::string detail;
  bool ok = true;
  for (const Compared& e : c) {
    detail += (detail.empty() ? "" : ", ") + e.what + " " + sci(e.err) + (e.ok() ? " <= " : " > ") +
              sci(e.tol);
    ok = ok && e.ok();
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "; other threads %.1f%% of CPU time (cpu/wall %.2f)",
                100.0 * use.helper_share, use.cpu_per_wall);
  detail += buf;
  const bool single = st.meta.threads == 1;
  if (single && !(use.helper_share <= kMaxHelperShare)) {
    ok = false;
    detail += " > 5%: not single-threaded";
  }
  const std::string impl = fwd ? st.norm->impl_forward() : st.norm->impl_backward();
  detail += "; impl " + impl;
  std::snprintf(buf, sizeof buf, " helper_cpu=%.3f", use.helper_share);
  registry().extra_label[name] = "impl=" + impl + buf;
  if (!ok) return fail(detail);
  check_records().push_back({name, true, detail});
  st.verdict = std::string();
  return *st.verdict;
}

}  // namespace onednn_check

// The targets for normkit's speed ratio over oneDNN, single thread (medians).
constexpr double kOnednnFwdTarget = 2.0, kOnednnBwdTarget = 1.5;

// Registers oneDNN's benchmark m (m.kind Baseline, m.vs the normkit op it is compared
// with; m.vs_target is set here), timed on the workspace of m.shape, with the checks
// above in its setup.
inline void add_onednn_bench(Meta m, const NormLayout& layout, double eps, OnednnCreate create,
                             NormkitRun normkit) {
  if (m.threads == 1) m.vs_target = m.dir == Dir::Fwd ? kOnednnFwdTarget : kOnednnBwdTarget;
  auto st = std::make_shared<onednn_check::State>();
  st->meta = m;
  st->layout = layout;
  st->eps = eps;
  st->create = std::move(create);
  st->normkit = std::move(normkit);
  add_bench(
      m, [st] { st->run(); }, [st] { return onednn_check::prepare(*st); });
}

}  // namespace nkbench
