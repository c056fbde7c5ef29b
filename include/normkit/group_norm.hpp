// normkit::GroupNorm (Wu & He 2018): per sample and group of C / G consecutive channels,
// over the group's channels and all spatial positions,
// y = (x - mean) / sqrt(var + eps) * gamma_c + beta_c, var biased, gamma/beta per channel.
// Inputs of rank 2 (N, C) to 8, channels first or last by memory order (ChannelFormat).
// Semantics: ../../shared/SPEC.md "GroupNorm", PyTorch's nn.GroupNorm.
#pragma once

#include <type_traits>
#include <utility>

#include "common.hpp"
#include "detail/channel_norm.hpp"
#include "detail/narrow_channel.hpp"
#include "detail/simd/dispatch.hpp"

namespace normkit {

// T: float or double, or the narrow storage types Eigen::bfloat16 and Eigen::half
// (README "Narrow storage"): statistics saved in float (RowStats<float>), float
// accumulation; parameters in float or in T, their gradients in the parameters' type.
template <class T, class Isa = detail::simd::Best>
class GroupNorm {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    detail::is_narrow<T>::value,
                "normkit::GroupNorm<T>: T must be float, double, Eigen::bfloat16 or Eigen::half");
  static constexpr bool kNarrow = detail::is_narrow<T>::value;
  // Narrow T: parameters may also be float (P), with float gradients.
  template <class P>
  using if_float_params = std::enable_if_t<kNarrow && std::is_same<P, float>::value, int>;

 public:
  // The element type of the saved statistics: T, or float for narrow T.
  using Stat = detail::stat_t<T>;

  // groups >= 1 (C % groups == 0 is checked against each input); eps >= 0.
  explicit GroupNorm(int groups, ChannelFormat format = ChannelFormat::First, double eps = 1e-5,
                     AffineMode affine = AffineMode::ScaleShift)
      : spec_(detail::channel::make_spec("GroupNorm", detail::channel::Kind::Group, format, groups,
                                         eps, 0.1, affine)) {}

  int groups() const { return spec_.groups; }
  ChannelFormat format() const { return spec_.format; }
  double eps() const { return spec_.eps; }
  AffineMode affine_mode() const { return spec_.affine; }

  // saved receives mean, mean_lo, rstd per (sample, group), index n * G + g. y may be x.
  // Narrow T: params may be Affine<float> too (then dgamma, dbeta are float tensors).
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward(const X& x, const Affine<T>& params, Y&& y, RowStats<Stat>& saved,
               const Device& device = Device()) const {
    detail::channel::api_forward<Isa, T>(spec_, x, params, std::forward<Y>(y), saved,
                                         Running<Stat>{}, nullptr, device);
  }
  template <class P, class X, class Y, class Device = Eigen::DefaultDevice, if_float_params<P> = 0>
  void forward(const X& x, const Affine<P>& params, Y&& y, RowStats<Stat>& saved,
               const Device& device = Device()) const {
    detail::channel::api_forward<Isa, T>(spec_, x, params, std::forward<Y>(y), saved,
                                         Running<Stat>{}, nullptr, device);
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
    forward(x, params, std::forward<Y>(y), saved, device);
    return saved;
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

 private:
  detail::channel::Spec spec_;
};

}  // namespace normkit
