// The oracle for the adaptive LayerNorm forms and the fused residual: SPEC.md "Adaptive
// LayerNorm" and "Fused residual" evaluated in long double, row by row, with no attempt
// at speed. Rows are flat (n elements, rows in memory order); a Modulated condition is
// [B][n] with `per` consecutive rows per sample, an Element-wise one has x's shape.
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include "reference.hpp"

namespace adref {

using ref::LD;

enum class Form { AdaNorm, Modulated, Elementwise };

struct Op {
  Form form = Form::AdaNorm;
  double eps = 1e-5;
  double C = 1.0, k = 0.1;  // AdaNorm: y = C (1 - k z) z
  bool full = false;        // AdaNorm: differentiate C (1 - k z) too (else detached)
};

// Index of the condition of row r, element i.
inline std::size_t cond_index(const Op& op, std::size_t r, std::size_t i, std::size_t n,
                              std::size_t per) {
  return op.form == Form::Modulated ? (r / per) * n + i : r * n + i;
}

// The multiplier of z: 1 + scale (Modulated), ada_w (Element-wise), 1 (AdaNorm, unused).
template <class T>
LD scale_at(const Op& op, const T* c1, std::size_t r, std::size_t i, std::size_t n,
            std::size_t per) {
  if (op.form == Form::AdaNorm) return 1;
  const LD c = static_cast<LD>(c1[cond_index(op, r, i, n, per)]);
  return op.form == Form::Modulated ? 1 + c : c;
}

template <class T>
LD shift_at(const Op& op, const T* c2, std::size_t r, std::size_t i, std::size_t n,
            std::size_t per) {
  if (op.form == Form::AdaNorm) return 0;
  return static_cast<LD>(c2[cond_index(op, r, i, n, per)]);
}

// z = xhat of LayerNorm (biased variance, eps inside the sqrt) for every element.
template <class T>
std::vector<ref::RowStatsLD> xhat(const Op& op, const T* x, std::size_t rows, std::size_t n,
                                  std::vector<LD>& z) {
  const ref::RowNorm ln{true, 0, false, false, op.eps};
  std::vector<ref::RowStatsLD> st(rows);
  z.assign(rows * n, 0);
  for (std::size_t r = 0; r < rows; ++r) {
    st[r] = ref::stats(ln, x + r * n, n);
    for (std::size_t i = 0; i < n; ++i)
      z[r * n + i] = (static_cast<LD>(x[r * n + i]) - st[r].mean) * st[r].rstd;
  }
  return st;
}

template <class T>
std::vector<ref::RowStatsLD> forward(const Op& op, const T* x, std::size_t rows, std::size_t n,
                                     std::size_t per, const T* c1, const T* c2,
                                     std::vector<LD>& y, std::vector<LD>& z) {
  auto st = xhat(op, x, rows, n, z);
  y.assign(rows * n, 0);
  const LD C = static_cast<LD>(op.C), k = static_cast<LD>(op.k);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t j = r * n + i;
      y[j] = op.form == Form::AdaNorm
                 ? C * (1 - k * z[j]) * z[j]
                 : z[j] * scale_at(op, c1, r, i, n, per) + shift_at(op, c2, r, i, n, per);
    }
  return st;
}

// dL/dz given dL/dy = dy: AdaNorm C (1 - k z) dy (detached: the factor is a constant) or
// C (1 - 2 k z) dy (the derivative of C (z - k z^2)); otherwise dy times z's multiplier.
inline LD grad_z(const Op& op, LD dy, LD z, LD scale) {
  if (op.form != Form::AdaNorm) return dy * scale;
  const LD C = static_cast<LD>(op.C), k = static_cast<LD>(op.k);
  return dy * C * (1 - (op.full ? 2 : 1) * k * z);
}

// dx = rstd (g - mean(g) - z mean(g z)) with g = dL/dz; d1, d2: Modulated dscale[b] =
// sum over the sample's rows of dy z and dshift[b] = sum dy ([B][n]); Element-wise
// dada_w = dy z and dada_b = dy (x's shape); AdaNorm: empty.
template <class T>
void backward(const Op& op, const T* dy, const T* x, std::size_t rows, std::size_t n,
              std::size_t per, const T* c1, std::vector<LD>& dx, std::vector<LD>& d1,
              std::vector<LD>& d2) {
  std::vector<LD> z;
  const auto st = xhat(op, x, rows, n, z);
  dx.assign(rows * n, 0);
  const std::size_t nc = op.form == Form::AdaNorm     ? 0
                         : op.form == Form::Modulated ? (rows / per) * n
                                                      : rows * n;
  d1.assign(nc, 0);
  d2.assign(nc, 0);
  std::vector<LD> g(n);
  for (std::size_t r = 0; r < rows; ++r) {
    LD mg = 0, mgz = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t j = r * n + i;
      const LD d = static_cast<LD>(dy[j]);
      g[i] = grad_z(op, d, z[j], scale_at(op, c1, r, i, n, per));
      mg += g[i];
      mgz += g[i] * z[j];
      if (nc) {
        const std::size_t c = cond_index(op, r, i, n, per);
        d1[c] += d * z[j];
        d2[c] += d;
      }
    }
    mg /= static_cast<LD>(n);
    mgz /= static_cast<LD>(n);
    for (std::size_t i = 0; i < n; ++i)
      dx[r * n + i] = st[r].rstd * (g[i] - mg - z[r * n + i] * mgz);
  }
}

// Fused residual, backward. s = alpha x + r fed y = norm(s) and the stream, so the
// gradient reaching s is t = ds + g, g = the norm's dL/ds at s (ref::backward, given
// dy); dx = alpha t, dr = t. ds may be null (not used downstream: 0).
template <class T>
void residual_backward(const ref::RowNorm& op, const T* ds, const T* dy, const T* s,
                       std::size_t rows, std::size_t n, const T* gamma, double alpha,
                       std::vector<LD>& g, std::vector<LD>& dx, std::vector<LD>& dr,
                       std::vector<LD>& dgamma, std::vector<LD>& dbeta) {
  ref::backward(op, dy, s, rows, n, gamma, g, dgamma, dbeta);
  dx.assign(rows * n, 0);
  dr.assign(rows * n, 0);
  for (std::size_t j = 0; j < rows * n; ++j) {
    const LD t = g[j] + (ds ? static_cast<LD>(ds[j]) : 0);
    dr[j] = t;
    dx[j] = static_cast<LD>(alpha) * t;
  }
}

}  // namespace adref
