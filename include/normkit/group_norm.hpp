// normkit::GroupNorm (Wu & He 2018): per sample and group of C / G consecutive channels,
// over the group's channels and all spatial positions,
// y = (x - mean) / sqrt(var + eps) * gamma_c + beta_c, var biased, gamma/beta per channel.
// Inputs of rank 2 (N, C) to 8, channels first or last by memory order (ChannelFormat).
// Semantics: ../../shared/SPEC.md "GroupNorm", PyTorch's nn.GroupNorm.
#pragma once

#include <type_traits>

#include "common.hpp"
#include "detail/channel_norm.hpp"
#include "detail/simd/dispatch.hpp"

namespace normkit {

template <class T, class Isa = detail::simd::Best>
class GroupNorm {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "normkit::GroupNorm<T>: T must be float or double");

 public:
  // groups >= 1 (C % groups == 0 is checked against each input); eps >= 0.
  explicit GroupNorm(int groups, ChannelFormat format = ChannelFormat::First, double eps = 1e-5,
                     AffineMode affine = AffineMode::ScaleShift)
      : spec_(detail::channel::make_spec("GroupNorm", detail::channel::Kind::Group, format, groups,
                                         eps, 0.1, affine)) {}

  int groups() const { return spec_.groups; }
  ChannelFormat format() const { return spec_.format; }
  double eps() const { return spec_.eps; }
  AffineMode affine_mode() const { return spec_.affine; }

  // saved receives mean, mean_lo, rstd per (sample, group), index n * G + g.
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward(const X& x, const Affine<T>& params, Y&& y, RowStats<T>& saved,
               const Device& device = Device()) const {
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::forward_train<decltype(isa_), T>(
          spec_, detail::in<T>(x), params, detail::out<T>(y), saved, Running<T>{}, nullptr, detail::Exec(device));
    });
  }

  template <class X, class Y, class Device = Eigen::DefaultDevice,
            class = std::enable_if_t<!detail::is_row_stats<std::decay_t<Device>>::value>>
  RowStats<T> forward(const X& x, const Affine<T>& params, Y&& y,
                      const Device& device = Device()) const {
    RowStats<T> saved;
    forward(x, params, std::forward<Y>(y), saved, device);
    return saved;
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

 private:
  detail::channel::Spec spec_;
};

}  // namespace normkit
