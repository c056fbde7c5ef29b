// normkit::AdaptiveLayerNorm: LayerNorm whose output map depends on the input or on a
// condition, in the three forms of ../../shared/SPEC.md "Adaptive LayerNorm":
//   AdaNorm (Xu et al. 2019):     y = C (1 - k z) z,  z = xhat (no learned parameters);
//   Modulated (DiT's adaLN):      y = xhat (1 + scale[b]) + shift[b], per sample b;
//   Element-wise:                 y = xhat * ada_w + ada_b, ada_w and ada_b of x's shape.
// xhat is LayerNorm's over the innermost k dims (biased variance, eps inside the sqrt),
// with its numerics (README "Numerics").
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "common.hpp"
#include "detail/adaptive_norm.hpp"
#include "detail/narrow.hpp"
#include "detail/row_norm.hpp"
#include "detail/simd/dispatch.hpp"

namespace normkit {

enum class AdaptiveForm { AdaNorm, Modulated, Elementwise };

// T: float, double, or the narrow storage types Eigen::bfloat16 and Eigen::half (x, y, dy,
// dx in T; the condition in float or in T, its gradients in the condition's type;
// statistics saved in float: README "Narrow storage").
template <class T, class Isa = detail::simd::Best>
class AdaptiveLayerNorm {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    detail::is_narrow<T>::value,
                "normkit::AdaptiveLayerNorm<T>: T must be float, double, Eigen::bfloat16 or "
                "Eigen::half");
  static constexpr bool kNarrow = detail::is_narrow<T>::value;
  // Narrow T: the condition may also be float (P), with float gradients.
  template <class P>
  using if_float_cond = std::enable_if_t<kNarrow && std::is_same<P, float>::value, int>;

 public:
  // The element type of the saved statistics: T, or float for narrow storage.
  using Stat = detail::stat_t<T>;

  // AdaNorm: y = C (1 - k z) z. Backward treats C (1 - k z) as a constant (the paper's
  // detached gradient) unless full_gradient, which differentiates C (z - k z^2) exactly.
  static AdaptiveLayerNorm ada_norm(double C = 1.0, double k = 0.1, bool full_gradient = false,
                                    int normalized_dims = 1, double eps = 1e-5) {
    if (!std::isfinite(C))
      detail::fail("AdaptiveLayerNorm::ada_norm", "C", "a finite value", std::to_string(C));
    if (!std::isfinite(k))
      detail::fail("AdaptiveLayerNorm::ada_norm", "k", "a finite value", std::to_string(k));
    AdaptiveLayerNorm a(AdaptiveForm::AdaNorm, normalized_dims, eps);
    a.c_ = C;
    a.k_ada_ = k;
    a.full_ = full_gradient;
    return a;
  }
  // Modulated (DiT's adaLN): cond = normkit::affine(scale, shift), each [D, B] in memory
  // order (PyTorch (B, D)), B = x's outermost extent, broadcast over the dims between.
  // DiT's LayerNorm has eps 1e-6.
  static AdaptiveLayerNorm modulated(int normalized_dims = 1, double eps = 1e-6) {
    return AdaptiveLayerNorm(AdaptiveForm::Modulated, normalized_dims, eps);
  }
  // Element-wise: cond = normkit::affine(ada_w, ada_b), each with x's extents.
  static AdaptiveLayerNorm elementwise(int normalized_dims = 1, double eps = 1e-5) {
    return AdaptiveLayerNorm(AdaptiveForm::Elementwise, normalized_dims, eps);
  }

  AdaptiveForm form() const { return form_; }
  int normalized_dims() const { return k_; }
  double eps() const { return eps_; }

  // y from x and the condition (AdaNorm: {}); saved as LayerNorm's (mean, mean_lo, rstd
  // per row). y may be x. Throws normkit::invalid_argument before writing anything.
  // Narrow T: y = T(the float op's y on the widened x and condition), bit for bit; the
  // condition is Affine<T> or Affine<float>; saved is RowStats<float>.
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward(const X& x, const Affine<T>& cond, Y&& y, RowStats<Stat>& saved,
               const Device& device = Device()) const {
    if constexpr (kNarrow) {
      forward_narrow(x, cond, std::forward<Y>(y), saved, device);
    } else {
      const auto xv = detail::in<T>(x);
      const auto yv = detail::out<T>(y);
      switch (form_) {
        case AdaptiveForm::AdaNorm:
          detail::simd::visit<Isa, T>([&](auto isa_) {
            detail::forward<decltype(isa_), T, true>(spec(), xv, cond, yv, saved, detail::Exec(device));
          });
          break;
        case AdaptiveForm::Modulated:
          detail::simd::visit<Isa, T>([&](auto isa_) {
            detail::modulated_forward<decltype(isa_), T>(spec(), xv, cond, yv, saved, detail::Exec(device));
          });
          break;
        case AdaptiveForm::Elementwise:
          detail::simd::visit<Isa, T>([&](auto isa_) {
            detail::elementwise_forward<decltype(isa_), T>(spec(), xv, cond, yv, saved, detail::Exec(device));
          });
          break;
      }
    }
  }
  template <class P, class X, class Y, class Device = Eigen::DefaultDevice, if_float_cond<P> = 0>
  void forward(const X& x, const Affine<P>& cond, Y&& y, RowStats<Stat>& saved,
               const Device& device = Device()) const {
    forward_narrow(x, cond, std::forward<Y>(y), saved, device);
  }

  template <class X, class Y, class Device = Eigen::DefaultDevice,
            class = std::enable_if_t<!detail::is_row_stats<std::decay_t<Device>>::value>>
  RowStats<Stat> forward(const X& x, const Affine<T>& cond, Y&& y,
                         const Device& device = Device()) const {
    RowStats<Stat> saved;
    forward(x, cond, std::forward<Y>(y), saved, device);
    return saved;
  }
  template <class P, class X, class Y, class Device = Eigen::DefaultDevice,
            class = std::enable_if_t<!detail::is_row_stats<std::decay_t<Device>>::value>,
            if_float_cond<P> = 0>
  RowStats<Stat> forward(const X& x, const Affine<P>& cond, Y&& y,
                         const Device& device = Device()) const {
    RowStats<Stat> saved;
    forward_narrow(x, cond, std::forward<Y>(y), saved, device);
    return saved;
  }

  // Gradients: dx, and the condition's: (dscale, dshift) for Modulated, (dada_w, dada_b)
  // for Element-wise, normkit::skip for AdaNorm. Each output may be normkit::skip; dx may
  // be dy or x. dscale/dshift are sums over each sample's rows, overwritten.
  // Narrow T: dx = T(the float op's dx), bit for bit; the condition's gradients in its
  // type, from the float op (modulated: per-block float sums added in double, rounded once
  // to float, then to T for a T condition; element-wise: rounded once).
  template <class DY, class X, class DX, class D1, class D2, class Device = Eigen::DefaultDevice>
  void backward(const DY& dy, const X& x, const Affine<T>& cond, const RowStats<Stat>& saved,
                DX&& dx, D1&& dcond1, D2&& dcond2, const Device& device = Device()) const {
    if constexpr (kNarrow) {
      backward_narrow(dy, x, cond, saved, std::forward<DX>(dx), std::forward<D1>(dcond1),
                      std::forward<D2>(dcond2), device);
    } else {
      const auto dyv = detail::in<T>(dy);
      const auto xv = detail::in<T>(x);
      const auto dxv = detail::out<T>(dx);
      const auto d1 = detail::out<T>(dcond1);
      const auto d2 = detail::out<T>(dcond2);
      switch (form_) {
        case AdaptiveForm::AdaNorm:
          check_no_cond_grads(d1, d2);
          detail::simd::visit<Isa, T>([&](auto isa_) {
            detail::backward<decltype(isa_), T, true>(spec(), dyv, xv, cond, saved, dxv,
                                                      detail::View<T>{}, detail::View<T>{},
                                                      detail::Exec(device));
          });
          break;
        case AdaptiveForm::Modulated:
          detail::simd::visit<Isa, T>([&](auto isa_) {
            detail::modulated_backward<decltype(isa_), T>(spec(), dyv, xv, cond, saved, dxv, d1, d2,
                                                          detail::Exec(device));
          });
          break;
        case AdaptiveForm::Elementwise:
          detail::simd::visit<Isa, T>([&](auto isa_) {
            detail::elementwise_backward<decltype(isa_), T>(spec(), dyv, xv, cond, saved, dxv, d1,
                                                            d2, detail::Exec(device));
          });
          break;
      }
    }
  }
  template <class P, class DY, class X, class DX, class D1, class D2,
            class Device = Eigen::DefaultDevice, if_float_cond<P> = 0>
  void backward(const DY& dy, const X& x, const Affine<P>& cond, const RowStats<Stat>& saved,
                DX&& dx, D1&& dcond1, D2&& dcond2, const Device& device = Device()) const {
    backward_narrow(dy, x, cond, saved, std::forward<DX>(dx), std::forward<D1>(dcond1),
                    std::forward<D2>(dcond2), device);
  }

 private:
  template <class P>
  static void check_no_cond_grads(const detail::View<P>& d1, const detail::View<P>& d2) {
    if (d1.present || d2.present)
      detail::fail("AdaptiveLayerNorm::backward", d1.present ? "dcond1" : "dcond2",
                   "normkit::skip (AdaNorm has no condition)", (d1.present ? d1 : d2).str());
  }

  template <class P, class X, class Y, class Device>
  void forward_narrow(const X& x, const Affine<P>& cond, Y&& y, RowStats<float>& saved,
                      const Device& device) const {
    const auto xv = detail::in<T>(x);
    const auto yv = detail::out<T>(y);
    detail::simd::visit<Isa, T>([&](auto isa_) {
      using I = decltype(isa_);
      const detail::Exec exec(device);
      switch (form_) {
        case AdaptiveForm::AdaNorm:
          detail::forward_narrow<I, T, P, true>(spec(), false, xv, cond, yv, saved, exec);
          break;
        case AdaptiveForm::Modulated:
          detail::modulated_forward_narrow<I, T, P>(spec(), xv, cond, yv, saved, exec);
          break;
        case AdaptiveForm::Elementwise:
          detail::elementwise_forward_narrow<I, T, P>(spec(), xv, cond, yv, saved, exec);
          break;
      }
    });
  }
  template <class P, class DY, class X, class DX, class D1, class D2, class Device>
  void backward_narrow(const DY& dy, const X& x, const Affine<P>& cond,
                       const RowStats<float>& saved, DX&& dx, D1&& dcond1, D2&& dcond2,
                       const Device& device) const {
    const auto dyv = detail::in<T>(dy);
    const auto xv = detail::in<T>(x);
    const auto dxv = detail::out<T>(dx);
    const auto d1 = detail::out<P>(dcond1);
    const auto d2 = detail::out<P>(dcond2);
    if (form_ == AdaptiveForm::AdaNorm) check_no_cond_grads(d1, d2);
    detail::simd::visit<Isa, T>([&](auto isa_) {
      using I = decltype(isa_);
      const detail::Exec exec(device);
      switch (form_) {
        case AdaptiveForm::AdaNorm:
          detail::backward_narrow<I, T, P, true>(spec(), dyv, xv, cond, saved, dxv,
                                                 detail::View<P>{}, detail::View<P>{}, exec);
          break;
        case AdaptiveForm::Modulated:
          detail::modulated_backward_narrow<I, T, P>(spec(), dyv, xv, cond, saved, dxv, d1, d2, exec);
          break;
        case AdaptiveForm::Elementwise:
          detail::elementwise_backward_narrow<I, T, P>(spec(), dyv, xv, cond, saved, dxv, d1, d2,
                                                       exec);
          break;
      }
    });
  }

  AdaptiveLayerNorm(AdaptiveForm form, int k, double eps) : form_(form), k_(k), eps_(eps) {
    const char* where = form == AdaptiveForm::AdaNorm     ? "AdaptiveLayerNorm::ada_norm"
                        : form == AdaptiveForm::Modulated ? "AdaptiveLayerNorm::modulated"
                                                          : "AdaptiveLayerNorm::elementwise";
    if (k < 1 || k > detail::kMaxRank)
      detail::fail(where, "normalized_dims", "1 to 8", std::to_string(k));
    if (!(eps >= 0.0) || std::isinf(eps))
      detail::fail(where, "eps", "a finite value >= 0", std::to_string(eps));
  }

  detail::RowNormSpec spec() const {
    detail::RowNormSpec s{"AdaptiveLayerNorm", k_, eps_, detail::ScaleKind::None, false, false};
    switch (form_) {
      case AdaptiveForm::AdaNorm:
        s.ada = true;
        s.ada_c = c_;
        s.ada_k = k_ada_;
        s.ada_full_grad = full_;
        break;
      case AdaptiveForm::Modulated:
        s.scale = detail::ScaleKind::OnePlusGamma;
        s.shift = true;
        break;
      case AdaptiveForm::Elementwise:
        s.scale = detail::ScaleKind::Gamma;
        s.shift = true;
        break;
    }
    return s;
  }

  AdaptiveForm form_;
  int k_;
  double eps_;
  double c_ = 1.0, k_ada_ = 0.1;
  bool full_ = false;
};

}  // namespace normkit
