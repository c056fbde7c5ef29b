// normkit::RMSNorm (Zhang & Sennrich 2019): per row of the innermost k dims,
//   y = x / sqrt(mean(x^2) + eps) * gamma        (eps inside, the default), or
//   y = x / (sqrt(mean(x^2)) + eps) * gamma      (EpsPlacement::Outside).
// Semantics: ../../shared/SPEC.md "RMSNorm", PyTorch's nn.RMSNorm.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "common.hpp"
#include "detail/narrow.hpp"
#include "detail/row_norm.hpp"
#include "detail/simd/dispatch.hpp"

namespace normkit {

// The learned scale of an RMSNorm: none; gamma (PyTorch, LLaMA); or Gemma's zero-centred
// weight w applied as (1 + w), with w stored centred at 0.
enum class RmsWeight { None, Scale, OnePlusScale };

// Where eps goes: inside the sqrt (PyTorch nn.RMSNorm, LLaMA, ONNX, ggml) or added to the
// root mean square (some code bases).
enum class EpsPlacement { Inside, Outside };

// Narrow storage only (bfloat16, half): where the rounding to the storage type happens.
// WeightThenCast (Gemma, PyTorch nn.RMSNorm): y = T(x * rstd * w), all in float, rounded
// once. CastThenWeight (LLaMA, Hugging Face LlamaRMSNorm): y = T(w * T(x * rstd)), the
// normalized value rounded to T before the weight multiplies it (in float), then rounded
// again. Backward is the same for both: the exact gradient of the unrounded function
// (README "Narrow storage").
enum class CastOrder { WeightThenCast, CastThenWeight };

// T: float, double, Eigen::bfloat16 or Eigen::half (as LayerNorm).
template <class T, class Isa = detail::simd::Best>
class RMSNorm {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    detail::is_narrow<T>::value,
                "normkit::RMSNorm<T>: T must be float, double, Eigen::bfloat16 or Eigen::half");
  static constexpr bool kNarrow = detail::is_narrow<T>::value;
  template <class P>
  using if_float_params = std::enable_if_t<kNarrow && std::is_same<P, float>::value, int>;

 public:
  // The element type of the saved statistics: T, or float for narrow storage.
  using Stat = detail::stat_t<T>;

  // normalized_dims >= 1; eps >= 0. Throws normkit::invalid_argument otherwise. cast: for
  // narrow T only (ignored for float and double).
  explicit RMSNorm(int normalized_dims = 1, double eps = 1e-6, RmsWeight weight = RmsWeight::Scale,
                   EpsPlacement placement = EpsPlacement::Inside,
                   CastOrder cast = CastOrder::WeightThenCast)
      : k_(normalized_dims), eps_(eps), weight_(weight), placement_(placement), cast_(cast) {
    if (normalized_dims < 1 || normalized_dims > detail::kMaxRank)
      detail::fail("RMSNorm::RMSNorm", "normalized_dims", "1 to 8",
                   std::to_string(normalized_dims));
    if (!(eps >= 0.0) || std::isinf(eps))
      detail::fail("RMSNorm::RMSNorm", "eps", "a finite value >= 0", std::to_string(eps));
  }

  int normalized_dims() const { return k_; }
  double eps() const { return eps_; }
  RmsWeight weight() const { return weight_; }
  EpsPlacement eps_placement() const { return placement_; }
  CastOrder cast_order() const { return cast_; }

  // y = RMSNorm(x); saved receives rstd per row (mean and mean_lo are left empty).
  // params: {} or normkit::affine(gamma). Otherwise as LayerNorm::forward.
  // Narrow T: saved is RowStats<float>, and params may be Affine<float> as well.
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward(const X& x, const Affine<T>& params, Y&& y, RowStats<Stat>& saved,
               const Device& device = Device()) const {
    if constexpr (kNarrow) {
      forward_narrow(x, params, std::forward<Y>(y), saved, device);
    } else {
      detail::simd::visit<Isa, T>([&](auto isa_) {
        detail::forward<decltype(isa_), T, false>(spec(), detail::in<T>(x), params,
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

  // dx and dgamma (each a tensor or normkit::skip) from dy and forward's x, params and
  // saved statistics. As LayerNorm::backward.
  // Narrow T: dgamma has the parameters' type (T or float).
  template <class DY, class X, class DX, class DG, class Device = Eigen::DefaultDevice>
  void backward(const DY& dy, const X& x, const Affine<T>& params, const RowStats<Stat>& saved,
                DX&& dx, DG&& dgamma, const Device& device = Device()) const {
    if constexpr (kNarrow) {
      backward_narrow(dy, x, params, saved, std::forward<DX>(dx), std::forward<DG>(dgamma), device);
    } else {
      detail::simd::visit<Isa, T>([&](auto isa_) {
        detail::backward<decltype(isa_), T, false>(spec(), detail::in<T>(dy), detail::in<T>(x),
                                                   params, saved, detail::out<T>(dx),
                                                   detail::out<T>(dgamma), detail::View<T>{},
                                                   detail::Exec(device));
      });
    }
  }
  template <class P, class DY, class X, class DX, class DG, class Device = Eigen::DefaultDevice,
            if_float_params<P> = 0>
  void backward(const DY& dy, const X& x, const Affine<P>& params, const RowStats<Stat>& saved,
                DX&& dx, DG&& dgamma, const Device& device = Device()) const {
    backward_narrow(dy, x, params, saved, std::forward<DX>(dx), std::forward<DG>(dgamma), device);
  }

  // Fused residual: s = alpha * x + r, y = RMSNorm(s) (the add + RMSNorm of LLaMA-style
  // blocks, in one pass over memory). As LayerNorm::forward_residual; for narrow T, y is
  // RMSNorm<T>::forward of the stored s, with this functor's cast order.
  template <class X, class R, class S, class Y, class Device = Eigen::DefaultDevice>
  void forward_residual(const X& x, const R& r, const Affine<T>& params, S&& s, Y&& y,
                        RowStats<Stat>& saved, double alpha = 1.0,
                        const Device& device = Device()) const {
    const detail::Residual<T> res{detail::in<T>(r), detail::out<T>(s), alpha};
    if constexpr (kNarrow) {
      forward_residual_narrow(x, params, res, std::forward<Y>(y), saved, device);
    } else {
      detail::simd::visit<Isa, T>([&](auto isa_) {
        detail::forward<decltype(isa_), T, false>(spec(), detail::in<T>(x), params,
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

  // As LayerNorm::backward_residual, without dbeta.
  template <class DS, class DY, class S, class DX, class DR, class DG,
            class Device = Eigen::DefaultDevice>
  void backward_residual(const DS& ds, const DY& dy, const S& s, const Affine<T>& params,
                         const RowStats<Stat>& saved, DX&& dx, DR&& dr, DG&& dgamma,
                         double alpha = 1.0, const Device& device = Device()) const {
    if constexpr (kNarrow) {
      backward_residual_narrow(ds, dy, s, params, saved, std::forward<DX>(dx),
                               std::forward<DR>(dr), std::forward<DG>(dgamma), alpha, device);
    } else {
      detail::simd::visit<Isa, T>([&](auto isa_) {
        detail::backward_residual<decltype(isa_), T, false>(
            spec(), detail::in<T>(ds), detail::in<T>(dy), detail::in<T>(s), params, saved, alpha,
            detail::out<T>(dx), detail::out<T>(dr), detail::out<T>(dgamma), detail::View<T>{},
            detail::Exec(device));
      });
    }
  }
  template <class P, class DS, class DY, class S, class DX, class DR, class DG,
            class Device = Eigen::DefaultDevice, if_float_params<P> = 0>
  void backward_residual(const DS& ds, const DY& dy, const S& s, const Affine<P>& params,
                         const RowStats<Stat>& saved, DX&& dx, DR&& dr, DG&& dgamma,
                         double alpha = 1.0, const Device& device = Device()) const {
    backward_residual_narrow(ds, dy, s, params, saved, std::forward<DX>(dx), std::forward<DR>(dr),
                             std::forward<DG>(dgamma), alpha, device);
  }

 private:
  template <class P, class X, class Y, class Device>
  void forward_residual_narrow(const X& x, const Affine<P>& params, const detail::Residual<T>& res,
                               Y&& y, RowStats<float>& saved, const Device& device) const {
    detail::simd::visit<Isa, T>([&](auto isa_) {
      detail::forward_narrow<decltype(isa_), T, P, false>(
          spec(), cast_ == CastOrder::CastThenWeight, detail::in<T>(x), params, detail::out<T>(y),
          saved, detail::Exec(device), &res);
    });
  }
  template <class P, class DS, class DY, class S, class DX, class DR, class DG, class Device>
  void backward_residual_narrow(const DS& ds, const DY& dy, const S& s, const Affine<P>& params,
                                const RowStats<float>& saved, DX&& dx, DR&& dr, DG&& dgamma,
                                double alpha, const Device& device) const {
    detail::simd::visit<Isa, T>([&](auto isa_) {
      detail::backward_residual_narrow<decltype(isa_), T, P, false>(
          spec(), detail::in<T>(ds), detail::in<T>(dy), detail::in<T>(s), params, saved, alpha,
          detail::out<T>(dx), detail::out<T>(dr), detail::out<P>(dgamma), detail::View<P>{},
          detail::Exec(device));
    });
  }
  template <class P, class X, class Y, class Device>
  void forward_narrow(const X& x, const Affine<P>& params, Y&& y, RowStats<float>& saved,
                      const Device& device) const {
    detail::simd::visit<Isa, T>([&](auto isa_) {
      detail::forward_narrow<decltype(isa_), T, P, false>(
          spec(), cast_ == CastOrder::CastThenWeight, detail::in<T>(x), params, detail::out<T>(y),
          saved, detail::Exec(device));
    });
  }
  template <class P, class DY, class X, class DX, class DG, class Device>
  void backward_narrow(const DY& dy, const X& x, const Affine<P>& params,
                       const RowStats<float>& saved, DX&& dx, DG&& dgamma,
                       const Device& device) const {
    detail::simd::visit<Isa, T>([&](auto isa_) {
      detail::backward_narrow<decltype(isa_), T, P, false>(
          spec(), detail::in<T>(dy), detail::in<T>(x), params, saved, detail::out<T>(dx),
          detail::out<P>(dgamma), detail::View<P>{}, detail::Exec(device));
    });
  }

  detail::RowNormSpec spec() const {
    return {"RMSNorm",
            k_,
            eps_,
            weight_ == RmsWeight::None    ? detail::ScaleKind::None
            : weight_ == RmsWeight::Scale ? detail::ScaleKind::Gamma
                                          : detail::ScaleKind::OnePlusGamma,
            false,
            placement_ == EpsPlacement::Outside};
  }

  int k_;
  double eps_;
  RmsWeight weight_;
  EpsPlacement placement_;
  CastOrder cast_;
};

}  // namespace normkit
