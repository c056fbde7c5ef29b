// normkit::InstanceNorm (Ulyanov et al. 2016): per sample and channel, over the spatial
// positions, y = (x - mean) / sqrt(var + eps) [* gamma_c + beta_c], var biased. Affine
// off by default (PyTorch's default); optional running statistics (PyTorch's
// track_running_stats), averaged over the batch, used by forward_eval/backward_eval.
// Inputs of rank 2 (N, C) to 8, channels first or last by memory order (ChannelFormat).
// Semantics: ../../shared/SPEC.md "InstanceNorm", PyTorch's nn.InstanceNorm{1,2,3}d.
#pragma once

#include <optional>
#include <type_traits>
#include <utility>

#include "common.hpp"
#include "detail/channel_norm.hpp"
#include "detail/narrow_channel.hpp"
#include "detail/simd/dispatch.hpp"

namespace normkit {

// T: float or double, or the narrow storage types Eigen::bfloat16 and Eigen::half
// (README "Narrow storage"): statistics saved in float (RowStats<float>), running
// statistics in float (Running<float>), float accumulation; parameters in float or in T,
// their gradients in the parameters' type.
template <class T, class Isa = detail::simd::Best>
class InstanceNorm {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    detail::is_narrow<T>::value,
                "normkit::InstanceNorm<T>: T must be float, double, Eigen::bfloat16 or Eigen::half");
  static constexpr bool kNarrow = detail::is_narrow<T>::value;
  // Narrow T: parameters may also be float (P), with float gradients.
  template <class P>
  using if_float_params = std::enable_if_t<kNarrow && std::is_same<P, float>::value, int>;

 public:
  // The element type of the saved and running statistics: T, or float for narrow T.
  using Stat = detail::stat_t<T>;

  explicit InstanceNorm(ChannelFormat format = ChannelFormat::First, double eps = 1e-5,
                        AffineMode affine = AffineMode::None, std::optional<double> momentum = 0.1)
      : spec_(detail::channel::make_spec("InstanceNorm", detail::channel::Kind::Instance, format, 0,
                                         eps, momentum, affine)) {}

  ChannelFormat format() const { return spec_.format; }
  double eps() const { return spec_.eps; }
  std::optional<double> momentum() const { return spec_.momentum; }
  AffineMode affine_mode() const { return spec_.affine; }

  // Each call below taking params has a twin for narrow T taking Affine<float> params
  // (then dgamma and dbeta are float tensors).

  // Instance statistics; saved receives mean, mean_lo, rstd per (sample, channel), index
  // n * C + c; running (optional) is updated with their batch average (unbiased var).
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward(const X& x, const Affine<T>& params, Y&& y, RowStats<Stat>& saved,
               const Running<Stat>& running = {}, const Device& device = Device()) const {
    detail::channel::api_forward<Isa, T>(spec_, x, params, std::forward<Y>(y), saved, running,
                                         nullptr, device);
  }
  template <class P, class X, class Y, class Device = Eigen::DefaultDevice, if_float_params<P> = 0>
  void forward(const X& x, const Affine<P>& params, Y&& y, RowStats<Stat>& saved,
               const Running<Stat>& running = {}, const Device& device = Device()) const {
    detail::channel::api_forward<Isa, T>(spec_, x, params, std::forward<Y>(y), saved, running,
                                         nullptr, device);
  }

  // Normalize with the running statistics (required), unchanged.
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward_eval(const X& x, const Affine<T>& params, const Running<Stat>& running, Y&& y,
                    const Device& device = Device()) const {
    detail::channel::api_forward_eval<Isa, T>(spec_, x, params, running, std::forward<Y>(y), device);
  }
  template <class P, class X, class Y, class Device = Eigen::DefaultDevice, if_float_params<P> = 0>
  void forward_eval(const X& x, const Affine<P>& params, const Running<Stat>& running, Y&& y,
                    const Device& device = Device()) const {
    detail::channel::api_forward_eval<Isa, T>(spec_, x, params, running, std::forward<Y>(y), device);
  }

  template <class DY, class X, class DX, class DG, class DB, class Device = Eigen::DefaultDevice>
  void backward(const DY& dy, const X& x, const Affine<T>& params, const RowStats<Stat>& saved,
                DX&& dx, DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    detail::channel::api_backward<Isa, T>(spec_, dy, x, params, saved, nullptr, std::forward<DX>(dx),
                                          std::forward<DG>(dgamma), std::forward<DB>(dbeta), device);
  }
  template <class P, class DY, class X, class DX, class DG, class DB,
            class Device = Eigen::DefaultDevice, if_float_params<P> = 0>
  void backward(const DY& dy, const X& x, const Affine<P>& params, const RowStats<Stat>& saved,
                DX&& dx, DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    detail::channel::api_backward<Isa, T>(spec_, dy, x, params, saved, nullptr, std::forward<DX>(dx),
                                          std::forward<DG>(dgamma), std::forward<DB>(dbeta), device);
  }

  template <class DY, class X, class DX, class DG, class DB, class Device = Eigen::DefaultDevice>
  void backward_eval(const DY& dy, const X& x, const Affine<T>& params, const Running<Stat>& running,
                     DX&& dx, DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    detail::channel::api_backward_eval<Isa, T>(spec_, dy, x, params, running, std::forward<DX>(dx),
                                               std::forward<DG>(dgamma), std::forward<DB>(dbeta),
                                               device);
  }
  template <class P, class DY, class X, class DX, class DG, class DB,
            class Device = Eigen::DefaultDevice, if_float_params<P> = 0>
  void backward_eval(const DY& dy, const X& x, const Affine<P>& params, const Running<Stat>& running,
                     DX&& dx, DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    detail::channel::api_backward_eval<Isa, T>(spec_, dy, x, params, running, std::forward<DX>(dx),
                                               std::forward<DG>(dgamma), std::forward<DB>(dbeta),
                                               device);
  }

 private:
  detail::channel::Spec spec_;
};

}  // namespace normkit
