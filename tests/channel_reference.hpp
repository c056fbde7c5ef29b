// The oracle for the channel norms (BatchNorm, GroupNorm, InstanceNorm): plain loops in
// long double over a logical (N, C, M) array (M = the product of the spatial extents),
// element (n, c, m) at index (n * C + c) * M + m whatever the memory format. Written
// straight from SPEC.md, with no attempt at speed; the tests scatter the same logical
// data into channels-first or channels-last memory and compare against this.
#pragma once

#include <cmath>
#include <cstddef>
#include <optional>
#include <vector>

namespace ref {

using LD = long double;

enum class ChanKind { Batch, Group, Instance };

struct ChanNorm {
  ChanKind kind = ChanKind::Batch;
  std::size_t groups = 1;  // GroupNorm only
  bool scale = true;       // gamma
  bool shift = true;       // beta
  double eps = 1e-5;
  std::optional<double> momentum = 0.1;  // running statistics (BatchNorm, InstanceNorm)
};

struct ChanShape {
  std::size_t N = 1, C = 1, M = 1;
  std::size_t size() const { return N * C * M; }
  std::size_t at(std::size_t n, std::size_t c, std::size_t m) const { return (n * C + c) * M + m; }
};

// Statistic groups: BatchNorm one per channel c; GroupNorm one per (n, g), index
// n * G + g; InstanceNorm one per (n, c), index n * C + c (the engine's saved order).
inline std::size_t num_stats(const ChanNorm& op, const ChanShape& s) {
  switch (op.kind) {
    case ChanKind::Batch: return s.C;
    case ChanKind::Group: return s.N * op.groups;
    default: return s.N * s.C;
  }
}
inline std::size_t stat_of(const ChanNorm& op, const ChanShape& s, std::size_t n, std::size_t c) {
  switch (op.kind) {
    case ChanKind::Batch: return c;
    case ChanKind::Group: return n * op.groups + c / (s.C / op.groups);
    default: return n * s.C + c;
  }
}
// Elements per statistic group.
inline std::size_t stat_count(const ChanNorm& op, const ChanShape& s) {
  switch (op.kind) {
    case ChanKind::Batch: return s.N * s.M;
    case ChanKind::Group: return (s.C / op.groups) * s.M;
    default: return s.M;
  }
}

struct ChanStatsLD {
  std::vector<LD> mean, var, rstd;  // var biased
};

// Batch statistics: two passes in long double.
template <class T>
ChanStatsLD chan_stats(const ChanNorm& op, const ChanShape& s, const T* x) {
  const std::size_t G = num_stats(op, s);
  const LD cnt = static_cast<LD>(stat_count(op, s));
  ChanStatsLD st;
  st.mean.assign(G, 0);
  st.var.assign(G, 0);
  st.rstd.assign(G, 0);
  for (std::size_t n = 0; n < s.N; ++n)
    for (std::size_t c = 0; c < s.C; ++c)
      for (std::size_t m = 0; m < s.M; ++m) st.mean[stat_of(op, s, n, c)] += static_cast<LD>(x[s.at(n, c, m)]);
  for (auto& v : st.mean) v /= cnt;
  for (std::size_t n = 0; n < s.N; ++n)
    for (std::size_t c = 0; c < s.C; ++c)
      for (std::size_t m = 0; m < s.M; ++m) {
        const std::size_t k = stat_of(op, s, n, c);
        const LD d = static_cast<LD>(x[s.at(n, c, m)]) - st.mean[k];
        st.var[k] += d * d;
      }
  for (std::size_t k = 0; k < G; ++k) {
    st.var[k] /= cnt;
    st.rstd[k] = 1 / std::sqrt(st.var[k] + static_cast<LD>(op.eps));
  }
  return st;
}

// Evaluation statistics: per channel from the running mean and var, laid out as the
// statistic groups of the op (BatchNorm: [C]; InstanceNorm: [N * C]) so that the rest of
// the reference is shared. var is the running (unbiased) var, as the formula uses it.
template <class T>
ChanStatsLD eval_stats(const ChanNorm& op, const ChanShape& s, const T* rmean, const T* rvar) {
  const std::size_t G = num_stats(op, s);
  ChanStatsLD st;
  st.mean.assign(G, 0);
  st.var.assign(G, 0);
  st.rstd.assign(G, 0);
  for (std::size_t n = 0; n < s.N; ++n)
    for (std::size_t c = 0; c < s.C; ++c) {
      const std::size_t k = stat_of(op, s, n, c);
      st.mean[k] = static_cast<LD>(rmean[c]);
      st.var[k] = static_cast<LD>(rvar[c]);
      st.rstd[k] = 1 / std::sqrt(static_cast<LD>(rvar[c]) + static_cast<LD>(op.eps));
    }
  return st;
}

template <class T>
LD gamma_of(const ChanNorm& op, const T* gamma, std::size_t c) {
  return op.scale ? static_cast<LD>(gamma[c]) : LD(1);
}
template <class T>
LD beta_of(const ChanNorm& op, const T* beta, std::size_t c) {
  return op.shift ? static_cast<LD>(beta[c]) : LD(0);
}

// y = (x - mean) * rstd * gamma_c + beta_c with the given statistics (batch or running).
template <class T>
std::vector<LD> chan_forward(const ChanNorm& op, const ChanShape& s, const T* x, const T* gamma,
                             const T* beta, const ChanStatsLD& st) {
  std::vector<LD> y(s.size());
  for (std::size_t n = 0; n < s.N; ++n)
    for (std::size_t c = 0; c < s.C; ++c) {
      const std::size_t k = stat_of(op, s, n, c);
      for (std::size_t m = 0; m < s.M; ++m) {
        const std::size_t i = s.at(n, c, m);
        y[i] = (static_cast<LD>(x[i]) - st.mean[k]) * st.rstd[k] * gamma_of(op, gamma, c) +
               beta_of(op, beta, c);
      }
    }
  return y;
}

// The running statistics after one training forward (SPEC.md): new = (1 - m) old +
// m batch, var unbiased (n / (n - 1)); m = momentum, or 1 / num_batches_tracked after
// its increment when momentum is std::nullopt. InstanceNorm uses the batch average over
// N of the per-instance mean and unbiased var.
template <class T>
void chan_running_update(const ChanNorm& op, const ChanShape& s, const ChanStatsLD& st,
                         long long num_batches_tracked_after, std::vector<LD>& rmean,
                         std::vector<LD>& rvar) {
  const LD w = op.momentum ? static_cast<LD>(*op.momentum)
                           : 1 / static_cast<LD>(num_batches_tracked_after);
  const LD cnt = static_cast<LD>(stat_count(op, s));
  const LD unbias = cnt / (cnt - 1);
  for (std::size_t c = 0; c < s.C; ++c) {
    LD bm = 0, bv = 0;
    if (op.kind == ChanKind::Batch) {
      bm = st.mean[c];
      bv = st.var[c] * unbias;
    } else {
      for (std::size_t n = 0; n < s.N; ++n) {
        bm += st.mean[n * s.C + c];
        bv += st.var[n * s.C + c] * unbias;
      }
      bm /= static_cast<LD>(s.N);
      bv /= static_cast<LD>(s.N);
    }
    rmean[c] = (1 - w) * rmean[c] + w * bm;
    rvar[c] = (1 - w) * rvar[c] + w * bv;
  }
}

struct ChanGrads {
  std::vector<LD> dx, dgamma, dbeta;
};

// Training backward (SPEC.md), per statistic group S with g = dy * gamma_c:
//   dx = rstd * (g - mean_S(g) - xhat * mean_S(g * xhat));
// BatchNorm's closed form gamma rstd / n (n dy - sum dy - xhat sum dy xhat) is this with
// gamma constant over S. dgamma_c = sum dy xhat, dbeta_c = sum dy over all (n, m) of c.
// eval = true: the statistics are constants, dx = dy * gamma * rstd.
template <class T>
ChanGrads chan_backward(const ChanNorm& op, const ChanShape& s, const T* dy, const T* x,
                        const T* gamma, const ChanStatsLD& st, bool eval) {
  const std::size_t G = num_stats(op, s);
  const LD cnt = static_cast<LD>(stat_count(op, s));
  ChanGrads r;
  r.dx.assign(s.size(), 0);
  r.dgamma.assign(s.C, 0);
  r.dbeta.assign(s.C, 0);
  std::vector<LD> mg(G, 0), mgx(G, 0);
  for (std::size_t n = 0; n < s.N; ++n)
    for (std::size_t c = 0; c < s.C; ++c) {
      const std::size_t k = stat_of(op, s, n, c);
      for (std::size_t m = 0; m < s.M; ++m) {
        const std::size_t i = s.at(n, c, m);
        const LD xhat = (static_cast<LD>(x[i]) - st.mean[k]) * st.rstd[k];
        const LD d = static_cast<LD>(dy[i]);
        const LD g = d * gamma_of(op, gamma, c);
        mg[k] += g;
        mgx[k] += g * xhat;
        r.dgamma[c] += d * xhat;
        r.dbeta[c] += d;
      }
    }
  for (std::size_t k = 0; k < G; ++k) {
    mg[k] /= cnt;
    mgx[k] /= cnt;
  }
  for (std::size_t n = 0; n < s.N; ++n)
    for (std::size_t c = 0; c < s.C; ++c) {
      const std::size_t k = stat_of(op, s, n, c);
      for (std::size_t m = 0; m < s.M; ++m) {
        const std::size_t i = s.at(n, c, m);
        const LD xhat = (static_cast<LD>(x[i]) - st.mean[k]) * st.rstd[k];
        const LD g = static_cast<LD>(dy[i]) * gamma_of(op, gamma, c);
        r.dx[i] = eval ? g * st.rstd[k] : st.rstd[k] * (g - mg[k] - xhat * mgx[k]);
      }
    }
  return r;
}

}  // namespace ref
