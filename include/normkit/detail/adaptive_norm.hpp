// normkit: the adaptive LayerNorm forms on the row-norm engine (row_norm.hpp):
//   AdaNorm: the engine's own flag (spec.ada), rows as LayerNorm;
//   Modulated (DiT's adaLN): per sample, the rows of that sample with gamma = 1 + scale[b]
//     and beta = shift[b] (ScaleKind::OnePlusGamma), dscale[b] and dshift[b] as the
//     dgamma and dbeta of those rows: one engine pass per sample;
//   Element-wise: every row with its own (ada_w, ada_b) row; backward writes dada_w and
//     dada_b element by element (no reduction).
// Narrow storage (bfloat16, half; the *_narrow functions): the same forms staged through
// the float engine by narrow.hpp, the condition in float or in T. Modulated rows are
// staged one sample at a time, so that no block crosses a sample boundary.
#pragma once

#include <string>

#include "../common.hpp"
#include "narrow.hpp"
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

// P: the condition's type (T, or float for narrow storage).
template <class T, class P>
void check_cond(const RowNormSpec& spec, const std::string& where, const View<const T>& x,
                const Affine<P>& c, bool modulated, const char* first, const char* second) {
  if (x.rank < spec.k + (modulated ? 1 : 0))
    fail(where, "x",
         "rank >= " + std::to_string(spec.k + (modulated ? 1 : 0)) +
             (modulated ? " (the normalized dims and a sample dim)" : " (the normalized dims)"),
         "rank " + std::to_string(x.rank));
  if (!c.gamma.present || !c.beta.present)
    fail(where, "cond", std::string("both ") + first + " and " + second + " (normkit::affine(" +
                            first + ", " + second + "))",
         c.gamma.present ? "only the first" : (c.beta.present ? "only the second" : "none"));
  for (const View<const P>* v : {&c.gamma, &c.beta}) {
    const char* name = v == &c.gamma ? first : second;
    const bool ok = modulated ? matches_per_sample(*v, x, spec.k) : same_dims(*v, x);
    if (!ok) fail(where, name, "dims " + (modulated ? per_sample_str(x, spec.k) : x.str()), v->str());
    require_data(where, name, *v);
  }
}

// Modulated forward: y = xhat (1 + scale[b]) + shift[b].
// The checks of a modulated forward, before any write. P: the condition's type.
template <class T, class P>
void check_modulated_forward(const RowNormSpec& spec, const std::string& where,
                             const View<const T>& x, const Affine<P>& c, const View<T>& y) {
  check_x(spec, where, "x", x);
  check_cond(spec, where, x, c, true, "scale", "shift");
  if (!same_dims(x, y)) fail(where, "y", "dims " + x.str() + " (those of x)", y.str());
  require_data(where, "y", y);
  if (partial_overlap(y, x)) fail(where, "y", "x itself or memory disjoint from x", "a partial overlap");
  if (any_overlap(y, c.gamma) || any_overlap(y, c.beta))
    fail(where, "y", "memory disjoint from scale and shift", "an overlap");
}

template <class Isa, class T>
void modulated_forward(const RowNormSpec& spec, const View<const T>& x, const Affine<T>& c,
                       const View<T>& y, RowStats<T>& saved, const Exec& device) {
  const std::string where = std::string(spec.op) + "::forward";
  check_modulated_forward(spec, where, x, c, y);
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
// The checks of a modulated backward, before any write. P: the condition's and its
// gradients' type; S: the saved statistics'.
template <class T, class P, class S>
void check_modulated_backward(const RowNormSpec& spec, const std::string& where,
                              const View<const T>& dy, const View<const T>& x, const Affine<P>& c,
                              const RowStats<S>& saved, const View<T>& dx, const View<P>& dscale,
                              const View<P>& dshift) {
  check_x(spec, where, "x", x);
  check_cond(spec, where, x, c, true, "scale", "shift");
  if (!same_dims(dy, x)) fail(where, "dy", "dims " + x.str() + " (those of x)", dy.str());
  require_data(where, "dy", dy);
  check_saved<true>(where, saved, x.outer(spec.k));
  if (dx.present && !same_dims(dx, x)) fail(where, "dx", "dims " + x.str() + " (those of x)", dx.str());
  require_data(where, "dx", dx);
  for (const View<P>* o : {&dscale, &dshift}) {
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
}

template <class Isa, class T>
void modulated_backward(const RowNormSpec& spec, const View<const T>& dy, const View<const T>& x,
                        const Affine<T>& c, const RowStats<T>& saved, const View<T>& dx,
                        const View<T>& dscale, const View<T>& dshift, const Exec& device) {
  const std::string where = std::string(spec.op) + "::backward";
  check_modulated_backward(spec, where, dy, x, c, saved, dx, dscale, dshift);
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
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
// The checks of an element-wise forward, before any write. P: the condition's type.
template <class T, class P>
void check_elementwise_forward(const RowNormSpec& spec, const std::string& where,
                               const View<const T>& x, const Affine<P>& c, const View<T>& y) {
  check_x(spec, where, "x", x);
  check_cond(spec, where, x, c, false, "ada_w", "ada_b");
  if (!same_dims(x, y)) fail(where, "y", "dims " + x.str() + " (those of x)", y.str());
  require_data(where, "y", y);
  if (partial_overlap(y, x)) fail(where, "y", "x itself or memory disjoint from x", "a partial overlap");
  if (partial_overlap(y, c.gamma) || partial_overlap(y, c.beta))
    fail(where, "y", "ada_w or ada_b itself, or memory disjoint from them", "a partial overlap");
}

template <class Isa, class T>
void elementwise_forward(const RowNormSpec& spec, const View<const T>& x, const Affine<T>& c,
                         const View<T>& y, RowStats<T>& saved, const Exec& device) {
  const std::string where = std::string(spec.op) + "::forward";
  check_elementwise_forward(spec, where, x, c, y);
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
// The checks of an element-wise backward, before any write. P: the condition's and its
// gradients' type; S: the saved statistics'.
template <class T, class P, class S>
void check_elementwise_backward(const RowNormSpec& spec, const std::string& where,
                                const View<const T>& dy, const View<const T>& x,
                                const Affine<P>& c, const RowStats<S>& saved, const View<T>& dx,
                                const View<P>& dw, const View<P>& db) {
  check_x(spec, where, "x", x);
  check_cond(spec, where, x, c, false, "ada_w", "ada_b");
  if (!same_dims(dy, x)) fail(where, "dy", "dims " + x.str() + " (those of x)", dy.str());
  require_data(where, "dy", dy);
  check_saved<true>(where, saved, x.outer(spec.k));
  auto check_out = [&](const auto& o, const char* name) {
    if (o.present && !same_dims(o, x)) fail(where, name, "dims " + x.str() + " (those of x)", o.str());
    require_data(where, name, o);
    if (any_overlap(o, c.gamma) || any_overlap(o, c.beta))
      fail(where, name, "memory disjoint from ada_w and ada_b", "an overlap");
  };
  check_out(dx, "dx");
  check_out(dw, "dada_w");
  check_out(db, "dada_b");
  if (partial_overlap(dx, x) || partial_overlap(dx, dy))
    fail(where, "dx", "dy itself, x itself, or memory disjoint from both", "a partial overlap");
  for (const View<P>* o : {&dw, &db}) {
    const char* name = o == &dw ? "dada_w" : "dada_b";
    if (any_overlap(*o, x) || any_overlap(*o, dy) || any_overlap(*o, dx))
      fail(where, name, "memory disjoint from x, dy and dx", "an overlap");
  }
  if (any_overlap(dw, db)) fail(where, "dada_b", "memory disjoint from dada_w", "an overlap");
}

template <class Isa, class T>
void elementwise_backward(const RowNormSpec& spec, const View<const T>& dy, const View<const T>& x,
                          const Affine<T>& c, const RowStats<T>& saved, const View<T>& dx,
                          const View<T>& dw, const View<T>& db, const Exec& device) {
  const std::string where = std::string(spec.op) + "::backward";
  check_elementwise_backward(spec, where, dy, x, c, saved, dx, dw, db);
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
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

// ---------------------------------------------------------------------------------
// Narrow storage. x, y, dy, dx in T; the condition in P (float or T), its gradients in P;
// statistics in float.

// Modulated forward: per sample b, y = T(the float op's y), the sample's rows in blocks
// with gamma = 1 + scale[b] and beta = shift[b] widened to float (n per sample).
template <class Isa, class T, class P>
void modulated_forward_narrow(const RowNormSpec& spec, const View<const T>& x, const Affine<P>& c,
                              const View<T>& y, RowStats<float>& saved, const Exec& device) {
  check_modulated_forward(spec, std::string(spec.op) + "::forward", x, c, y);
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  const Index B = x.dims[static_cast<std::size_t>(x.rank - 1)];
  const Index per = B > 0 ? rows / B : 0;
  if (!prepare_saved<true>(saved, rows, n)) return;
  const WideParams wp = widen_params(c, n * B);
  for (Index b = 0; b < B; ++b) {
    const Index r0 = b * per;
    NarrowPass<T> q{x.data + r0 * n, y.data + r0 * n, n, per};
    q.gamma = wp.gamma + b * n;
    q.beta = wp.beta + b * n;
    q.mean_hi = saved.mean.data() + r0;
    q.mean_lo = saved.mean_lo.data() + r0;
    q.rstd = saved.rstd.data() + r0;
    forward_narrow_rows<Isa, T, true>(spec, false, q, device);
  }
}

// Modulated backward: per sample, dx = T(the float op's dx); dscale[b] and dshift[b] the
// sample's per-block float sums added in double in block order, rounded to float and P.
template <class Isa, class T, class P>
void modulated_backward_narrow(const RowNormSpec& spec, const View<const T>& dy,
                               const View<const T>& x, const Affine<P>& c,
                               const RowStats<float>& saved, const View<T>& dx,
                               const View<P>& dscale, const View<P>& dshift, const Exec& device) {
  check_modulated_backward(spec, std::string(spec.op) + "::backward", dy, x, c, saved, dx, dscale,
                           dshift);
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  const Index B = x.dims[static_cast<std::size_t>(x.rank - 1)];
  const Index per = B > 0 ? rows / B : 0;
  const WideParams wp = widen_params(c, n * B);
  for (Index b = 0; b < B; ++b) {
    const Index r0 = b * per, o = r0 * n;
    const NarrowGradPass<T> q{dy.data + o,          x.data + o,
                              dx.present ? dx.data + o : nullptr,
                              n,                    per,
                              wp.gamma + b * n,     saved.mean.data() + r0,
                              saved.mean_lo.data() + r0, saved.rstd.data() + r0};
    backward_narrow_grads<Isa, T, P, true>(spec, q, dscale.present ? dscale.data + b * n : nullptr,
                                           dshift.present ? dshift.data + b * n : nullptr, device);
  }
}

// Element-wise forward: y = T(the float op's y); ada_w and ada_b rows in float as given,
// or in T widened a block at a time.
template <class Isa, class T, class P>
void elementwise_forward_narrow(const RowNormSpec& spec, const View<const T>& x,
                                const Affine<P>& c, const View<T>& y, RowStats<float>& saved,
                                const Exec& device) {
  check_elementwise_forward(spec, std::string(spec.op) + "::forward", x, c, y);
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  if (!prepare_saved<true>(saved, rows, n)) return;
  NarrowPass<T> q{x.data, y.data, n, rows};
  if constexpr (std::is_same<P, float>::value) {
    q.gamma = c.gamma.data;
    q.beta = c.beta.data;
    q.param_stride = n;
  } else {
    static_assert(std::is_same<P, T>::value, "elementwise_forward_narrow: condition in float or T");
    q.gamma_t = c.gamma.data;
    q.beta_t = c.beta.data;
  }
  q.mean_hi = saved.mean.data();
  q.mean_lo = saved.mean_lo.data();
  q.rstd = saved.rstd.data();
  forward_narrow_rows<Isa, T, true>(spec, false, q, device);
}

// Element-wise backward: per block, dy, x (and ada_w in T) widened, the float kernel per
// row, then dx = T(its dx); dada_w = dy xhat and dada_b = dy from the same kernel, written
// as float (P = float) or rounded once to T.
template <class Isa, class T, class P>
void elementwise_backward_narrow(const RowNormSpec& spec, const View<const T>& dy,
                                 const View<const T>& x, const Affine<P>& c,
                                 const RowStats<float>& saved, const View<T>& dx,
                                 const View<P>& dw, const View<P>& db, const Exec& device) {
  check_elementwise_backward(spec, std::string(spec.op) + "::backward", dy, x, c, saved, dx, dw, db);
  const Index n = x.inner(spec.k), rows = x.outer(spec.k);
  if (rows == 0 || n == 0) return;
  constexpr bool kFloatP = std::is_same<P, float>::value;
  const Index block = narrow_block_rows(n);
  const Index blocks = (rows + block - 1) / block;
  const double bytes = 3.0 * static_cast<double>(block * n * static_cast<Index>(sizeof(T)));
  const Eigen::TensorOpCost cost(bytes, bytes, 12.0 * static_cast<double>(block * n));
  with_bool(dx.present, [&](auto Dx) {
    with_bool(dw.present, [&](auto Dw) {
      with_bool(db.present, [&](auto Db) {
        constexpr bool kDx = decltype(Dx)::value, kDw = decltype(Dw)::value, kDb = decltype(Db)::value;
        if constexpr (kDx || kDw || kDb) {
          // Scratch: dy (dx over it), x, and for P = T: ada_w, dada_w, dada_b.
          constexpr Index arrays = 2 + (kFloatP ? 0 : 1 + (kDw ? 1 : 0) + (kDb ? 1 : 0));
          parallel_for<Isa>(device, blocks, cost, [&](Index b0, Index b1) {
            std::vector<float> buf(static_cast<std::size_t>(arrays * block * n));
            float* bdy = buf.data();
            float* bx = bdy + block * n;
            float* next = bx + block * n;
            float* bw = kFloatP ? nullptr : std::exchange(next, next + block * n);
            float* bdw = !kFloatP && kDw ? std::exchange(next, next + block * n) : nullptr;
            float* bdb = !kFloatP && kDb ? next : nullptr;
            for (Index b = b0; b < b1; ++b) {
              const Index r0 = b * block, nr = std::min(block, rows - r0), o = r0 * n;
              kernels::widen_row<Isa>(dy.data + o, bdy, nr * n);
              kernels::widen_row<Isa>(x.data + o, bx, nr * n);
              if constexpr (!kFloatP) kernels::widen_row<Isa>(c.gamma.data + o, bw, nr * n);
              for (Index r = 0; r < nr; ++r) {
                const Index ro = r * n, go = o + ro;
                float* dwr = nullptr;
                float* dbr = nullptr;
                const float* w = nullptr;
                if constexpr (kFloatP) {
                  if (kDw) dwr = dw.data + go;
                  if (kDb) dbr = db.data + go;
                  w = c.gamma.data + go;
                } else {
                  if (kDw) dwr = bdw + ro;
                  if (kDb) dbr = bdb + ro;
                  w = bw + ro;
                }
                kernels::elementwise_backward<Isa, float, kDx, kDw, kDb>(
                    bdy + ro, bx + ro, w, n,
                    {saved.mean(r0 + r), saved.mean_lo(r0 + r), saved.rstd(r0 + r)},
                    kDx ? bdy + ro : nullptr, dwr, dbr);
              }
              if (kDx) kernels::narrow_row<Isa>(bdy, dx.data + o, nr * n);
              if constexpr (!kFloatP) {
                if (kDw) kernels::narrow_row<Isa>(bdw, dw.data + o, nr * n);
                if (kDb) kernels::narrow_row<Isa>(bdb, db.data + o, nr * n);
              }
            }
          });
        }
      });
    });
  });
}

}  // namespace detail
}  // namespace normkit
