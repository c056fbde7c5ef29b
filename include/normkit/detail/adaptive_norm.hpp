// normkit: the adaptive LayerNorm forms on the row-norm engine (row_norm.hpp):
//   AdaNorm: the engine's own flag (spec.ada), rows as LayerNorm;
//   Modulated (DiT's adaLN): per sample, the rows of that sample with gamma = 1 + scale[b]
//     and beta = shift[b] (ScaleKind::OnePlusGamma), dscale[b] and dshift[b] as the
//     dgamma and dbeta of those rows: one engine pass per sample;
//   Element-wise: every row with its own (ada_w, ada_b) row; backward writes dada_w and
//     dada_b element by element (no reduction).
#pragma once

#include <string>

#include "../common.hpp"
#include "row_norm.hpp"

namespace normkit {
namespace detail {

// x: rows of n (the innermost k dims); the outermost dim is the sample. A per-sample
// parameter has the normalized extents then the samples: rank 2 [n, B] in memory order
// (PyTorch (B, D) row-major), or the k normalized dims then B.
template <class A, class B>
bool matches_per_sample(const View<A>& p, const View<B>& x, int k) {
  const Index Bn = x.dims[static_cast<std::size_t>(x.rank - 1)];
  if (p.rank == 2 && p.dims[0] == x.inner(k) && p.dims[1] == Bn) return true;
  if (p.rank != k + 1 || p.dims[static_cast<std::size_t>(k)] != Bn) return false;
  for (int i = 0; i < k; ++i)
    if (p.dims[static_cast<std::size_t>(i)] != x.dims[static_cast<std::size_t>(i)]) return false;
  return true;
}

template <class B>
std::string per_sample_str(const View<B>& x, int k) {
  return "[" + std::to_string(x.inner(k)) + ", " +
         std::to_string(x.dims[static_cast<std::size_t>(x.rank - 1)]) +
         "] (memory order: normalized extent, samples; PyTorch (B, D))";
}

template <class T>
void check_cond(const RowNormSpec& spec, const std::string& where, const View<const T>& x,
                const Affine<T>& c, bool modulated, const char* first, const char* second) {
  if (x.rank < spec.k + (modulated ? 1 : 0))
    fail(where, "x",
         "rank >= " + std::to_string(spec.k + (modulated ? 1 : 0)) +
             (modulated ? " (the normalized dims and a sample dim)" : " (the normalized dims)"),
         "rank " + std::to_string(x.rank));
  if (!c.gamma.present || !c.beta.present)
    fail(where, "cond", std::string("both ") + first + " and " + second + " (normkit::affine(" +
                            first + ", " + second + "))",
         c.gamma.present ? "only the first" : (c.beta.present ? "only the second" : "none"));
  for (const View<const T>* v : {&c.gamma, &c.beta}) {
    const char* name = v == &c.gamma ? first : second;
    const bool ok = modulated ? matches_per_sample(*v, x, spec.k) : same_dims(*v, x);
    if (!ok) fail(where, name, "dims " + (modulated ? per_sample_str(x, spec.k) : x.str()), v->str());
    require_data(where, name, *v);
  }
}

// Modulated forward: y = xhat (1 + scale[b]) + shift[b].
template <class Isa, class T>
void modulated_forward(const RowNormSpec& spec, const View<const T>& x, const Affine<T>& c,
                       const View<T>& y, RowStats<T>& saved, const Exec& device) {
  const std::string where = std::string(spec.op) + "::forward";
  check_x(spec, where, "x", x);
  check_cond(spec, where, x, c, true, "scale", "shift");
  if (!same_dims(x, y)) fail(where, "y", "dims " + x.str() + " (those of x)", y.str());
  require_data(where, "y", y);
  if (partial_overlap(y, x)) fail(where, "y", "x itself or memory disjoint from x", "a partial overlap");
  if (any_overlap(y, c.gamma) || any_overlap(y, c.beta))
    fail(where, "y", "memory disjoint from scale and shift", "an overlap");
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  const Index B = x.dims[static_cast<std::size_t>(x.rank - 1)];
  const Index per = B > 0 ? rows / B : 0;
  for (auto* t : {&saved.mean, &saved.mean_lo, &saved.rstd})
    if (t->size() != rows) t->resize(rows);
  if (n == 0) {
    for (Index r = 0; r < rows; ++r)
      saved.mean(r) = saved.mean_lo(r) = saved.rstd(r) = static_cast<T>(kNaN);
    return;
  }
  const bool stream = stream_output<T>(x.size());
  for (Index b = 0; b < B; ++b) {
    const Index r0 = b * per;
    const RowPass<T> q{x.data + r0 * n, y.data + r0 * n, n, per, c.gamma.data + b * n,
                       c.beta.data + b * n, 0, saved.mean.data() + r0,
                       saved.mean_lo.data() + r0, saved.rstd.data() + r0, stream};
    forward_rows<Isa, T, true>(spec, q, device);
  }
}

// Modulated backward: per sample, LayerNorm's backward with gamma = 1 + scale[b]; dscale[b]
// and dshift[b] are that pass's dgamma and dbeta (sums over the sample's rows).
template <class Isa, class T>
void modulated_backward(const RowNormSpec& spec, const View<const T>& dy, const View<const T>& x,
                        const Affine<T>& c, const RowStats<T>& saved, const View<T>& dx,
                        const View<T>& dscale, const View<T>& dshift, const Exec& device) {
  const std::string where = std::string(spec.op) + "::backward";
  check_x(spec, where, "x", x);
  check_cond(spec, where, x, c, true, "scale", "shift");
  if (!same_dims(dy, x)) fail(where, "dy", "dims " + x.str() + " (those of x)", dy.str());
  require_data(where, "dy", dy);
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  check_saved<true>(where, saved, rows);
  if (dx.present && !same_dims(dx, x)) fail(where, "dx", "dims " + x.str() + " (those of x)", dx.str());
  require_data(where, "dx", dx);
  for (const View<T>* o : {&dscale, &dshift}) {
    const char* name = o == &dscale ? "dscale" : "dshift";
    if (o->present && !matches_per_sample(*o, x, spec.k))
      fail(where, name, "dims " + per_sample_str(x, spec.k), o->str());
    require_data(where, name, *o);
    if (any_overlap(*o, x) || any_overlap(*o, dy) || any_overlap(*o, dx) ||
        any_overlap(*o, c.gamma) || any_overlap(*o, c.beta))
      fail(where, name, "memory disjoint from every other argument", "an overlap");
  }
  if (any_overlap(dscale, dshift)) fail(where, "dshift", "memory disjoint from dscale", "an overlap");
  if (partial_overlap(dx, x) || partial_overlap(dx, dy))
    fail(where, "dx", "dy itself, x itself, or memory disjoint from both", "a partial overlap");
  if (any_overlap(dx, c.gamma) || any_overlap(dx, c.beta))
    fail(where, "dx", "memory disjoint from scale and shift", "an overlap");
  const Index B = x.dims[static_cast<std::size_t>(x.rank - 1)];
  const Index per = B > 0 ? rows / B : 0;
  for (Index b = 0; b < B; ++b) {
    const Index r0 = b * per;
    const RowGradPass<T> q{dy.data + r0 * n, x.data + r0 * n, dx.present ? dx.data + r0 * n : nullptr,
                           n, per, c.gamma.data + b * n, saved.mean.data() + r0,
                           saved.mean_lo.data() + r0, saved.rstd.data() + r0,
                           dscale.present ? dscale.data + b * n : nullptr,
                           dshift.present ? dshift.data + b * n : nullptr, x.size()};
    backward_pass<Isa, T, true>(spec, q, device);
  }
}

// Element-wise forward: y = xhat * ada_w + ada_b, all of x's shape.
template <class Isa, class T>
void elementwise_forward(const RowNormSpec& spec, const View<const T>& x, const Affine<T>& c,
                         const View<T>& y, RowStats<T>& saved, const Exec& device) {
  const std::string where = std::string(spec.op) + "::forward";
  check_x(spec, where, "x", x);
  check_cond(spec, where, x, c, false, "ada_w", "ada_b");
  if (!same_dims(x, y)) fail(where, "y", "dims " + x.str() + " (those of x)", y.str());
  require_data(where, "y", y);
  if (partial_overlap(y, x)) fail(where, "y", "x itself or memory disjoint from x", "a partial overlap");
  if (partial_overlap(y, c.gamma) || partial_overlap(y, c.beta))
    fail(where, "y", "ada_w or ada_b itself, or memory disjoint from them", "a partial overlap");
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  for (auto* t : {&saved.mean, &saved.mean_lo, &saved.rstd})
    if (t->size() != rows) t->resize(rows);
  if (n == 0) {
    for (Index r = 0; r < rows; ++r)
      saved.mean(r) = saved.mean_lo(r) = saved.rstd(r) = static_cast<T>(kNaN);
    return;
  }
  const RowPass<T> q{x.data, y.data, n, rows, c.gamma.data, c.beta.data, n, saved.mean.data(),
                     saved.mean_lo.data(), saved.rstd.data(), stream_output<T>(x.size())};
  forward_rows<Isa, T, true>(spec, q, device);
}

// Element-wise backward: dx, dada_w = dy * xhat, dada_b = dy (each may be skipped).
template <class Isa, class T>
void elementwise_backward(const RowNormSpec& spec, const View<const T>& dy, const View<const T>& x,
                          const Affine<T>& c, const RowStats<T>& saved, const View<T>& dx,
                          const View<T>& dw, const View<T>& db, const Exec& device) {
  const std::string where = std::string(spec.op) + "::backward";
  check_x(spec, where, "x", x);
  check_cond(spec, where, x, c, false, "ada_w", "ada_b");
  if (!same_dims(dy, x)) fail(where, "dy", "dims " + x.str() + " (those of x)", dy.str());
  require_data(where, "dy", dy);
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  check_saved<true>(where, saved, rows);
  for (const View<T>* o : {&dx, &dw, &db}) {
    const char* name = o == &dx ? "dx" : (o == &dw ? "dada_w" : "dada_b");
    if (o->present && !same_dims(*o, x)) fail(where, name, "dims " + x.str() + " (those of x)", o->str());
    require_data(where, name, *o);
    if (any_overlap(*o, c.gamma) || any_overlap(*o, c.beta))
      fail(where, name, "memory disjoint from ada_w and ada_b", "an overlap");
  }
  if (partial_overlap(dx, x) || partial_overlap(dx, dy))
    fail(where, "dx", "dy itself, x itself, or memory disjoint from both", "a partial overlap");
  for (const View<T>* o : {&dw, &db}) {
    const char* name = o == &dw ? "dada_w" : "dada_b";
    if (any_overlap(*o, x) || any_overlap(*o, dy) || any_overlap(*o, dx))
      fail(where, name, "memory disjoint from x, dy and dx", "an overlap");
  }
  if (any_overlap(dw, db)) fail(where, "dada_b", "memory disjoint from dada_w", "an overlap");
  if (rows == 0 || n == 0) return;
  const Eigen::TensorOpCost cost(3.0 * static_cast<double>(n) * sizeof(T),
                                 3.0 * static_cast<double>(n) * sizeof(T), 10.0 * static_cast<double>(n));
  with_bool(dx.present, [&](auto Dx) {
    with_bool(dw.present, [&](auto Dw) {
      with_bool(db.present, [&](auto Db) {
        constexpr bool kDx = decltype(Dx)::value, kDw = decltype(Dw)::value, kDb = decltype(Db)::value;
        if constexpr (kDx || kDw || kDb) {
          parallel_for<Isa>(device, rows, cost, [&](Index r0, Index r1) {
            for (Index r = r0; r < r1; ++r) {
              const Index o = r * n;
              kernels::elementwise_backward<Isa, T, kDx, kDw, kDb>(
                  dy.data + o, x.data + o, c.gamma.data + o, n,
                  {saved.mean(r), saved.mean_lo(r), saved.rstd(r)}, kDx ? dx.data + o : nullptr,
                  kDw ? dw.data + o : nullptr, kDb ? db.data + o : nullptr);
            }
          });
        }
      });
    });
  });
}

}  // namespace detail
}  // namespace normkit
