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
#include "detail/row_norm.hpp"
#include "detail/simd/dispatch.hpp"

namespace normkit {

enum class AdaptiveForm { AdaNorm, Modulated, Elementwise };

template <class T, class Isa = detail::simd::Best>
class AdaptiveLayerNorm {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "normkit::AdaptiveLayerNorm<T>: T must be float or double");

 public:
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
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward(const X& x, const Affine<T>& cond, Y&& y, RowStats<T>& saved,
               const Device& device = Device()) const {
    const auto xv = detail::in<T>(x);
    const auto yv = detail::out<T>(y);
    switch (form_) {
      case AdaptiveForm::AdaNorm:
        detail::simd::visit<Isa>([&](auto isa_) {
          detail::forward<decltype(isa_), T, true>(spec(), xv, cond, yv, saved, detail::Exec(device));
        });
        break;
      case AdaptiveForm::Modulated:
        detail::simd::visit<Isa>([&](auto isa_) {
          detail::modulated_forward<decltype(isa_), T>(spec(), xv, cond, yv, saved, detail::Exec(device));
        });
        break;
      case AdaptiveForm::Elementwise:
        detail::simd::visit<Isa>([&](auto isa_) {
          detail::elementwise_forward<decltype(isa_), T>(spec(), xv, cond, yv, saved, detail::Exec(device));
        });
        break;
    }
  }

  template <class X, class Y, class Device = Eigen::DefaultDevice,
            class = std::enable_if_t<!detail::is_row_stats<std::decay_t<Device>>::value>>
  RowStats<T> forward(const X& x, const Affine<T>& cond, Y&& y,
                      const Device& device = Device()) const {
    RowStats<T> saved;
    forward(x, cond, std::forward<Y>(y), saved, device);
    return saved;
  }

  // Gradients: dx, and the condition's: (dscale, dshift) for Modulated, (dada_w, dada_b)
  // for Element-wise, normkit::skip for AdaNorm. Each output may be normkit::skip; dx may
  // be dy or x. dscale/dshift are sums over each sample's rows, overwritten.
  template <class DY, class X, class DX, class D1, class D2, class Device = Eigen::DefaultDevice>
  void backward(const DY& dy, const X& x, const Affine<T>& cond, const RowStats<T>& saved, DX&& dx,
                D1&& dcond1, D2&& dcond2, const Device& device = Device()) const {
    const auto dyv = detail::in<T>(dy);
    const auto xv = detail::in<T>(x);
    const auto dxv = detail::out<T>(dx);
    const auto d1 = detail::out<T>(dcond1);
    const auto d2 = detail::out<T>(dcond2);
    switch (form_) {
      case AdaptiveForm::AdaNorm:
        if (d1.present || d2.present)
          detail::fail("AdaptiveLayerNorm::backward", d1.present ? "dcond1" : "dcond2",
                       "normkit::skip (AdaNorm has no condition)", (d1.present ? d1 : d2).str());
        detail::simd::visit<Isa>([&](auto isa_) {
          detail::backward<decltype(isa_), T, true>(spec(), dyv, xv, cond, saved, dxv,
                                                    detail::View<T>{}, detail::View<T>{}, detail::Exec(device));
        });
        break;
      case AdaptiveForm::Modulated:
        detail::simd::visit<Isa>([&](auto isa_) {
          detail::modulated_backward<decltype(isa_), T>(spec(), dyv, xv, cond, saved, dxv, d1, d2,
                                                        detail::Exec(device));
        });
        break;
      case AdaptiveForm::Elementwise:
        detail::simd::visit<Isa>([&](auto isa_) {
          detail::elementwise_backward<decltype(isa_), T>(spec(), dyv, xv, cond, saved, dxv, d1, d2,
                                                          detail::Exec(device));
        });
        break;
    }
  }

 private:
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
