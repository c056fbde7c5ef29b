// normkit::LayerNorm (Ba et al. 2016): per row of the innermost k dims,
//   y = (x - mean) / sqrt(var + eps) * gamma + beta,  var biased.
// Semantics: ../../shared/SPEC.md "LayerNorm", PyTorch's nn.LayerNorm.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "common.hpp"
#include "detail/narrow.hpp"
#include "detail/row_norm.hpp"
#include "detail/simd/dispatch.hpp"

namespace normkit {

// T: float or double, or the narrow storage types Eigen::bfloat16 and Eigen::half
// (statistics saved in float, float accumulation; parameters in float or in T: README
// "Narrow storage"). Isa: the SIMD backend (default: the widest the compiler targets).
template <class T, class Isa = detail::simd::Best>
class LayerNorm {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    detail::is_narrow<T>::value,
                "normkit::LayerNorm<T>: T must be float, double, Eigen::bfloat16 or Eigen::half");
  static constexpr bool kNarrow = detail::is_narrow<T>::value;
  // Narrow T: parameters may also be float (P), with float gradients.
  template <class P>
  using if_float_params = std::enable_if_t<kNarrow && std::is_same<P, float>::value, int>;

 public:
  // The element type of the saved statistics: T, or float for narrow storage.
  using Stat = detail::stat_t<T>;

  // normalized_dims: how many innermost (contiguous) dims form a row, >= 1 (PyTorch's
  // len(normalized_shape)). eps >= 0, added to the variance inside the sqrt.
  // Throws normkit::invalid_argument otherwise.
  explicit LayerNorm(int normalized_dims = 1, double eps = 1e-5,
                     AffineMode affine = AffineMode::ScaleShift)
      : k_(normalized_dims), eps_(eps), affine_(affine) {
    if (normalized_dims < 1 || normalized_dims > detail::kMaxRank)
      detail::fail("LayerNorm::LayerNorm", "normalized_dims", "1 to 8",
                   std::to_string(normalized_dims));
    if (!(eps >= 0.0) || std::isinf(eps))
      detail::fail("LayerNorm::LayerNorm", "eps", "a finite value >= 0", std::to_string(eps));
  }

  int normalized_dims() const { return k_; }
  double eps() const { return eps_; }
  AffineMode affine_mode() const { return affine_; }

  // y = LayerNorm(x); saved receives mean, mean_lo and rstd per row (resized to the row
  // count if needed). x, y: Eigen::Tensor or TensorMap of T, any rank >= k, either
  // layout; y has x's extents in memory order and may be x itself. params: {} or
  // normkit::affine(gamma[, beta]) as the affine mode says. Throws
  // normkit::invalid_argument before writing anything if an argument does not fit.
  // Narrow T: saved is RowStats<float>, and params may be Affine<float> as well.
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward(const X& x, const Affine<T>& params, Y&& y, RowStats<Stat>& saved,
               const Device& device = Device()) const {
    if constexpr (kNarrow) {
      forward_narrow(x, params, std::forward<Y>(y), saved, device);
    } else {
      detail::simd::visit<Isa, T>([&](auto isa_) {
        detail::forward<decltype(isa_), T, true>(spec(), detail::in<T>(x), params,
                                                 detail::out<T>(y), saved, detail::Exec(device));
      });
    }
  }
  template <class P, class X, class Y, class Device = Eigen::DefaultDevice,
            if_float_params<P> = 0>
  void forward(const X& x, const Affine<P>& params, Y&& y, RowStats<Stat>& saved,
               const Device& device = Device()) const {
    forward_narrow(x, params, std::forward<Y>(y), saved, device);
  }

  // As above, returning the saved statistics.
  template <class X, class Y, class Device = Eigen::DefaultDevice,
            class = std::enable_if_t<!detail::is_row_stats<std::decay_t<Device>>::value>>
  RowStats<Stat> forward(const X& x, const Affine<T>& params, Y&& y,
                         const Device& device = Device()) const {
    RowStats<Stat> saved;
    forward(x, params, std::forward<Y>(y), saved, device);
    return saved;
  }
  template <class P, class X, class Y, class Device = Eigen::DefaultDevice,
            class = std::enable_if_t<!detail::is_row_stats<std::decay_t<Device>>::value>,
            if_float_params<P> = 0>
  RowStats<Stat> forward(const X& x, const Affine<P>& params, Y&& y,
                         const Device& device = Device()) const {
    RowStats<Stat> saved;
    forward_narrow(x, params, std::forward<Y>(y), saved, device);
    return saved;
  }

  // Gradients from dy = dL/dy and forward's x, params and saved statistics. Each of dx,
  // dgamma, dbeta is a tensor or normkit::skip. dx may be dy or x itself. dgamma and
  // dbeta are overwritten (not accumulated into), and zeroed when there are no rows.
  // Bitwise identical for any number of device threads. Narrow T: dgamma and dbeta have
  // the parameters' type (T or float).
  template <class DY, class X, class DX, class DG, class DB, class Device = Eigen::DefaultDevice>
  void backward(const DY& dy, const X& x, const Affine<T>& params, const RowStats<Stat>& saved,
                DX&& dx, DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    if constexpr (kNarrow) {
      backward_narrow(dy, x, params, saved, std::forward<DX>(dx), std::forward<DG>(dgamma),
                      std::forward<DB>(dbeta), device);
    } else {
      detail::simd::visit<Isa, T>([&](auto isa_) {
        detail::backward<decltype(isa_), T, true>(spec(), detail::in<T>(dy), detail::in<T>(x),
                                                  params, saved, detail::out<T>(dx),
                                                  detail::out<T>(dgamma), detail::out<T>(dbeta),
                                                  detail::Exec(device));
      });
    }
  }
  template <class P, class DY, class X, class DX, class DG, class DB,
            class Device = Eigen::DefaultDevice, if_float_params<P> = 0>
  void backward(const DY& dy, const X& x, const Affine<P>& params, const RowStats<Stat>& saved,
                DX&& dx, DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    backward_narrow(dy, x, params, saved, std::forward<DX>(dx), std::forward<DG>(dgamma),
                    std::forward<DB>(dbeta), device);
  }

  // Fused residual (pre-norm blocks, DeepNorm): s = alpha * x + r, then y = LayerNorm(s),
  // in one pass over memory; writes s (the new residual stream) and y, and saves the
  // statistics of s. s may be r itself (updating the stream in place) or x; y may be x or
  // r, not s. alpha = 1 for a plain pre-norm block, alpha > 1 for DeepNorm. Post-norm
  // (y = LN(x + sublayer(x))) is the same call with only y used.
  // Narrow T: s = T(alpha * x + r), the float op's add on the widened x and r (one fma)
  // rounded to nearest even, and y is LayerNorm<T>::forward of that stored s, bit for bit
  // (so the fused op equals add-then-norm in T, and backward_residual, which sees only the
  // stored s, differentiates the y it returned). saved is RowStats<float>; params may be
  // Affine<float> (README "Narrow storage").
  template <class X, class R, class S, class Y, class Device = Eigen::DefaultDevice>
  void forward_residual(const X& x, const R& r, const Affine<T>& params, S&& s, Y&& y,
                        RowStats<Stat>& saved, double alpha = 1.0,
                        const Device& device = Device()) const {
    const detail::Residual<T> res{detail::in<T>(r), detail::out<T>(s), alpha};
    if constexpr (kNarrow) {
      forward_residual_narrow(x, params, res, std::forward<Y>(y), saved, device);
    } else {
      detail::simd::visit<Isa, T>([&](auto isa_) {
        detail::forward<decltype(isa_), T, true>(spec(), detail::in<T>(x), params,
                                                  detail::out<T>(y), saved, detail::Exec(device),
                                                  &res);
      });
    }
  }
  template <class P, class X, class R, class S, class Y, class Device = Eigen::DefaultDevice,
            if_float_params<P> = 0>
  void forward_residual(const X& x, const R& r, const Affine<P>& params, S&& s, Y&& y,
                        RowStats<Stat>& saved, double alpha = 1.0,
                        const Device& device = Device()) const {
    const detail::Residual<T> res{detail::in<T>(r), detail::out<T>(s), alpha};
    forward_residual_narrow(x, params, res, std::forward<Y>(y), saved, device);
  }

  // Its backward: ds = dL/ds from downstream (normkit::skip when s is not used, as in a
  // post-norm block) and dy = dL/dy; s and saved from forward_residual. With t = ds +
  // (LayerNorm's dL/ds): dx = alpha * t, dr = t; dgamma, dbeta as in backward. Each output
  // may be normkit::skip; dr may be ds itself, dx may be dy itself.
  // Narrow T: t in float from the widened ds, dy and s (the float op's), dx = T(alpha t),
  // dr = T(t); dgamma and dbeta in the parameters' type, as backward.
  template <class DS, class DY, class S, class DX, class DR, class DG, class DB,
            class Device = Eigen::DefaultDevice>
  void backward_residual(const DS& ds, const DY& dy, const S& s, const Affine<T>& params,
                         const RowStats<Stat>& saved, DX&& dx, DR&& dr, DG&& dgamma, DB&& dbeta,
                         double alpha = 1.0, const Device& device = Device()) const {
    if constexpr (kNarrow) {
      backward_residual_narrow(ds, dy, s, params, saved, std::forward<DX>(dx),
                               std::forward<DR>(dr), std::forward<DG>(dgamma),
                               std::forward<DB>(dbeta), alpha, device);
    } else {
      detail::simd::visit<Isa, T>([&](auto isa_) {
        detail::backward_residual<decltype(isa_), T, true>(
            spec(), detail::in<T>(ds), detail::in<T>(dy), detail::in<T>(s), params, saved, alpha,
            detail::out<T>(dx), detail::out<T>(dr), detail::out<T>(dgamma), detail::out<T>(dbeta),
            detail::Exec(device));
      });
    }
  }
  template <class P, class DS, class DY, class S, class DX, class DR, class DG, class DB,
            class Device = Eigen::DefaultDevice, if_float_params<P> = 0>
  void backward_residual(const DS& ds, const DY& dy, const S& s, const Affine<P>& params,
                         const RowStats<Stat>& saved, DX&& dx, DR&& dr, DG&& dgamma, DB&& dbeta,
                         double alpha = 1.0, const Device& device = Device()) const {
    backward_residual_narrow(ds, dy, s, params, saved, std::forward<DX>(dx), std::forward<DR>(dr),
                             std::forward<DG>(dgamma), std::forward<DB>(dbeta), alpha, device);
  }

 private:
  template <class P, class X, class Y, class Device>
  void forward_residual_narrow(const X& x, const Affine<P>& params, const detail::Residual<T>& res,
                               Y&& y, RowStats<float>& saved, const Device& device) const {
    detail::simd::visit<Isa, T>([&](auto isa_) {
      detail::forward_narrow<decltype(isa_), T, P, true>(spec(), false, detail::in<T>(x), params,
                                                         detail::out<T>(y), saved,
                                                         detail::Exec(device), &res);
    });
  }
  template <class P, class DS, class DY, class S, class DX, class DR, class DG, class DB,
            class Device>
  void backward_residual_narrow(const DS& ds, const DY& dy, const S& s, const Affine<P>& params,
                                const RowStats<float>& saved, DX&& dx, DR&& dr, DG&& dgamma,
                                DB&& dbeta, double alpha, const Device& device) const {
    detail::simd::visit<Isa, T>([&](auto isa_) {
      detail::backward_residual_narrow<decltype(isa_), T, P, true>(
          spec(), detail::in<T>(ds), detail::in<T>(dy), detail::in<T>(s), params, saved, alpha,
          detail::out<T>(dx), detail::out<T>(dr), detail::out<P>(dgamma), detail::out<P>(dbeta),
          detail::Exec(device));
    });
  }
  template <class P, class X, class Y, class Device>
  void forward_narrow(const X& x, const Affine<P>& params, Y&& y, RowStats<float>& saved,
                      const Device& device) const {
    detail::simd::visit<Isa, T>([&](auto isa_) {
      detail::forward_narrow<decltype(isa_), T, P, true>(spec(), false, detail::in<T>(x), params,
                                                         detail::out<T>(y), saved, detail::Exec(device));
    });
  }
  template <class P, class DY, class X, class DX, class DG, class DB, class Device>
  void backward_narrow(const DY& dy, const X& x, const Affine<P>& params,
                       const RowStats<float>& saved, DX&& dx, DG&& dgamma, DB&& dbeta,
                       const Device& device) const {
    detail::simd::visit<Isa, T>([&](auto isa_) {
      detail::backward_narrow<decltype(isa_), T, P, true>(
          spec(), detail::in<T>(dy), detail::in<T>(x), params, saved, detail::out<T>(dx),
          detail::out<P>(dgamma), detail::out<P>(dbeta), detail::Exec(device));
    });
  }

  detail::RowNormSpec spec() const {
    return {"LayerNorm",
            k_,
            eps_,
            affine_ == AffineMode::None ? detail::ScaleKind::None : detail::ScaleKind::Gamma,
            affine_ == AffineMode::ScaleShift,
            false};
  }

  int k_;
  double eps_;
  AffineMode affine_;
};

}  // namespace normkit
