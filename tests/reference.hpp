// The oracle: plain LayerNorm and RMSNorm over flat rows, accumulating in long double,
// written straight from the formulas in SPEC.md with no attempt at speed. Every kernel
// is tested against these.
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

namespace ref {

using LD = long double;

struct RowNorm {
  bool center = true;        // LayerNorm (true) or RMSNorm (false)
  int scale = 1;             // 0: none, 1: gamma, 2: (1 + gamma)
  bool shift = true;         // beta
  bool eps_outside = false;  // RMSNorm: x / (sqrt(ms) + eps)
  double eps = 1e-5;
};

struct RowStatsLD {
  LD mean = 0, rstd = 0;
};

template <class T>
RowStatsLD stats(const RowNorm& op, const T* x, std::size_t n) {
  RowStatsLD s;
  LD m = 0;
  if (op.center) {
    for (std::size_t i = 0; i < n; ++i) m += static_cast<LD>(x[i]);
    m /= static_cast<LD>(n);
  }
  LD v = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const LD d = static_cast<LD>(x[i]) - m;
    v += d * d;
  }
  v /= static_cast<LD>(n);
  s.mean = m;
  s.rstd = op.eps_outside ? 1 / (std::sqrt(v) + static_cast<LD>(op.eps))
                          : 1 / std::sqrt(v + static_cast<LD>(op.eps));
  return s;
}

template <class T>
LD scale_of(const RowNorm& op, const T* gamma, std::size_t i) {
  if (op.scale == 0) return 1;
  const LD g = static_cast<LD>(gamma[i]);
  return op.scale == 2 ? 1 + g : g;
}

// y, row by row; returns per-row stats.
template <class T>
std::vector<RowStatsLD> forward(const RowNorm& op, const T* x, std::size_t rows, std::size_t n,
                                const T* gamma, const T* beta, std::vector<LD>& y) {
  std::vector<RowStatsLD> st(rows);
  y.assign(rows * n, 0);
  for (std::size_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    st[r] = stats(op, xr, n);
    for (std::size_t i = 0; i < n; ++i) {
      LD v = (static_cast<LD>(xr[i]) - st[r].mean) * st[r].rstd * scale_of(op, gamma, i);
      if (op.shift) v += static_cast<LD>(beta[i]);
      y[r * n + i] = v;
    }
  }
  return st;
}

// Closed-form gradients (SPEC.md), in long double.
template <class T>
void backward(const RowNorm& op, const T* dy, const T* x, std::size_t rows, std::size_t n,
              const T* gamma, std::vector<LD>& dx, std::vector<LD>& dgamma,
              std::vector<LD>& dbeta) {
  dx.assign(rows * n, 0);
  dgamma.assign(n, 0);
  dbeta.assign(n, 0);
  std::vector<LD> g(n), xhat(n);
  for (std::size_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    const T* dyr = dy + r * n;
    const RowStatsLD s = stats(op, xr, n);
    LD mg = 0, mgx = 0;
    for (std::size_t i = 0; i < n; ++i) {
      xhat[i] = (static_cast<LD>(xr[i]) - s.mean) * s.rstd;
      g[i] = static_cast<LD>(dyr[i]) * scale_of(op, gamma, i);
      mg += g[i];
      mgx += g[i] * xhat[i];
      dgamma[i] += static_cast<LD>(dyr[i]) * xhat[i];
      dbeta[i] += static_cast<LD>(dyr[i]);
    }
    mg /= static_cast<LD>(n);
    mgx /= static_cast<LD>(n);
    LD k = 1;  // eps outside the sqrt: term 3 gains (r + eps) / r = 1 / (1 - eps rstd)
    if (op.eps_outside) k = 1 / (1 - static_cast<LD>(op.eps) * s.rstd);
    for (std::size_t i = 0; i < n; ++i)
      dx[r * n + i] = s.rstd * (g[i] - (op.center ? mg : 0) - xhat[i] * mgx * k);
  }
}

}  // namespace ref
