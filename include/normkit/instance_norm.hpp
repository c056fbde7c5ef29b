// normkit::InstanceNorm (Ulyanov et al. 2016): per sample and channel, over the spatial
// positions, y = (x - mean) / sqrt(var + eps) [* gamma_c + beta_c], var biased. Affine
// off by default (PyTorch's default); optional running statistics (PyTorch's
// track_running_stats), averaged over the batch, used by forward_eval/backward_eval.
// Inputs of rank 2 (N, C) to 8, channels first or last by memory order (ChannelFormat).
// Semantics: ../../shared/SPEC.md "InstanceNorm", PyTorch's nn.InstanceNorm{1,2,3}d.
#pragma once

#include <optional>
#include <type_traits>

#include "common.hpp"
#include "detail/channel_norm.hpp"
#include "detail/simd/dispatch.hpp"

namespace normkit {

template <class T, class Isa = detail::simd::Best>
class InstanceNorm {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "normkit::InstanceNorm<T>: T must be float or double");

 public:
  explicit InstanceNorm(ChannelFormat format = ChannelFormat::First, double eps = 1e-5,
                        AffineMode affine = AffineMode::None, std::optional<double> momentum = 0.1)
      : spec_(detail::channel::make_spec("InstanceNorm", detail::channel::Kind::Instance, format, 0,
                                         eps, momentum, affine)) {}

  ChannelFormat format() const { return spec_.format; }
  double eps() const { return spec_.eps; }
  std::optional<double> momentum() const { return spec_.momentum; }
  AffineMode affine_mode() const { return spec_.affine; }

  // Instance statistics; saved receives mean, mean_lo, rstd per (sample, channel), index
  // n * C + c; running (optional) is updated with their batch average (unbiased var).
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward(const X& x, const Affine<T>& params, Y&& y, RowStats<T>& saved,
               const Running<T>& running = {}, const Device& device = Device()) const {
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::forward_train<decltype(isa_), T>(
          spec_, detail::in<T>(x), params, detail::out<T>(y), saved, running, nullptr, detail::Exec(device));
    });
  }

  // Normalize with the running statistics (required), unchanged.
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward_eval(const X& x, const Affine<T>& params, const Running<T>& running, Y&& y,
                    const Device& device = Device()) const {
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::forward_eval<decltype(isa_), T>(spec_, detail::in<T>(x), params, running,
                                                       detail::out<T>(y), detail::Exec(device));
    });
  }

  template <class DY, class X, class DX, class DG, class DB, class Device = Eigen::DefaultDevice>
  void backward(const DY& dy, const X& x, const Affine<T>& params, const RowStats<T>& saved,
                DX&& dx, DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::backward_train<decltype(isa_), T>(
          spec_, detail::in<T>(dy), detail::in<T>(x), params, saved, nullptr, detail::out<T>(dx),
          detail::out<T>(dgamma), detail::out<T>(dbeta), detail::Exec(device));
    });
  }

  template <class DY, class X, class DX, class DG, class DB, class Device = Eigen::DefaultDevice>
  void backward_eval(const DY& dy, const X& x, const Affine<T>& params, const Running<T>& running,
                     DX&& dx, DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::backward_eval<decltype(isa_), T>(
          spec_, detail::in<T>(dy), detail::in<T>(x), params, running, detail::out<T>(dx),
          detail::out<T>(dgamma), detail::out<T>(dbeta), detail::Exec(device));
    });
  }

 private:
  detail::channel::Spec spec_;
};

}  // namespace normkit
