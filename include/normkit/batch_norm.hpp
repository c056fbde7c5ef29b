// normkit::BatchNorm (Ioffe & Szegedy 2015): per channel, over all samples and spatial
// positions, y = (x - mean) / sqrt(var + eps) * gamma + beta, var biased; running
// statistics updated with the unbiased variance. Inputs of rank 2 (N, C) to 8
// (N, C, spatial...), channels first or last by memory order (ChannelFormat).
// Semantics: ../../shared/SPEC.md "BatchNorm", PyTorch's nn.BatchNorm{1,2,3}d.
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
// their gradients in the parameters' type. Isa: the SIMD backend (default: the widest the
// compiler targets).
template <class T, class Isa = detail::simd::Best>
class BatchNorm {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    detail::is_narrow<T>::value,
                "normkit::BatchNorm<T>: T must be float, double, Eigen::bfloat16 or Eigen::half");
  static constexpr bool kNarrow = detail::is_narrow<T>::value;
  // Narrow T: parameters may also be float (P), with float gradients.
  template <class P>
  using if_float_params = std::enable_if_t<kNarrow && std::is_same<P, float>::value, int>;

 public:
  // The element type of the saved and running statistics: T, or float for narrow T.
  using Stat = detail::stat_t<T>;

  // format: where the channel axis sits in memory. eps >= 0, inside the sqrt. momentum in
  // [0, 1] weights the new batch statistics in the running ones (PyTorch's convention);
  // std::nullopt gives the cumulative average (weight 1 / num_batches_tracked). affine:
  // None or ScaleShift (gamma and beta of C elements), or Scale (gamma only).
  explicit BatchNorm(ChannelFormat format = ChannelFormat::First, double eps = 1e-5,
                     std::optional<double> momentum = 0.1,
                     AffineMode affine = AffineMode::ScaleShift)
      : spec_(detail::channel::make_spec("BatchNorm", detail::channel::Kind::Batch, format, 0, eps,
                                         momentum, affine)) {}

  ChannelFormat format() const { return spec_.format; }
  double eps() const { return spec_.eps; }
  std::optional<double> momentum() const { return spec_.momentum; }
  AffineMode affine_mode() const { return spec_.affine; }

  // Each call below taking params has a twin for narrow T taking Affine<float> params
  // (then dgamma and dbeta are float tensors).

  // Training: normalize with the batch statistics; saved receives mean, mean_lo, rstd
  // per channel; running (optional: {} for none, PyTorch track_running_stats=False) is
  // updated in place. Throws before writing anything if an argument does not fit,
  // including a channel of a single value. y may be x itself.
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

  // Evaluation: normalize with the running statistics (required), which are not changed.
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

  // Training backward from forward's x, params and saved statistics. Each of dx,
  // dgamma, dbeta is a tensor or normkit::skip; dgamma and dbeta ([C]) are overwritten.
  // dx may be dy or x itself. Bitwise identical for any number of device threads.
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

  // Evaluation backward: the running statistics are constants, dx = dy * gamma * rstd_run.
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

  // --- Data-parallel (Sync) BatchNorm, in three steps per direction ---
  // 1. Each shard: moments = partial_stats(x_shard). 2. Merge all shards' moments
  // (normkit::merge, or an MPI_Allreduce with a merging op). 3. Each shard:
  // forward_global(x_shard, params, merged, y_shard, saved, running).
  // Splitting a batch this way reproduces the whole batch's forward within rounding.
  // (Narrow T: the moments are the float op's on the widened shard.)
  template <class X, class Device = Eigen::DefaultDevice>
  ChannelMoments partial_stats(const X& x, const Device& device = Device()) const {
    return detail::channel::api_partial_stats<Isa, T>(spec_, x, device);
  }

  // Normalize a shard with the global (merged) moments; saved as in forward; running
  // (optional) updated with the global mean and the unbiased global variance, as a
  // training forward on the whole batch would (update it on one shard, or on every
  // shard's own copy). global.count must exceed 1.
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward_global(const X& x, const Affine<T>& params, const ChannelMoments& global, Y&& y,
                      RowStats<Stat>& saved, const Running<Stat>& running = {},
                      const Device& device = Device()) const {
    detail::channel::api_forward<Isa, T>(spec_, x, params, std::forward<Y>(y), saved, running,
                                         &global, device);
  }
  template <class P, class X, class Y, class Device = Eigen::DefaultDevice, if_float_params<P> = 0>
  void forward_global(const X& x, const Affine<P>& params, const ChannelMoments& global, Y&& y,
                      RowStats<Stat>& saved, const Running<Stat>& running = {},
                      const Device& device = Device()) const {
    detail::channel::api_forward<Isa, T>(spec_, x, params, std::forward<Y>(y), saved, running,
                                         &global, device);
  }

  // Backward, step 1 per shard: sums of dy and dy * xhat per channel (xhat from saved,
  // the global statistics). Step 2: merge (addition). Step 3 per shard: backward_global.
  template <class DY, class X, class Device = Eigen::DefaultDevice>
  ChannelGradSums partial_grad_sums(const DY& dy, const X& x, const RowStats<Stat>& saved,
                                    const Device& device = Device()) const {
    return detail::channel::api_partial_grad_sums<Isa, T>(spec_, dy, x, saved, device);
  }

  // dx of a shard from the merged sums and the global count (global.count of the
  // forward's merged moments); dgamma = sum_dy_xhat and dbeta = sum_dy (the same on
  // every shard; skip them where not needed).
  template <class DY, class X, class DX, class DG, class DB, class Device = Eigen::DefaultDevice>
  void backward_global(const DY& dy, const X& x, const Affine<T>& params, const RowStats<Stat>& saved,
                       const ChannelGradSums& global_sums, double global_count, DX&& dx,
                       DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    const detail::channel::GlobalGrad g{&global_sums, global_count};
    detail::channel::api_backward<Isa, T>(spec_, dy, x, params, saved, &g, std::forward<DX>(dx),
                                          std::forward<DG>(dgamma), std::forward<DB>(dbeta), device);
  }
  template <class P, class DY, class X, class DX, class DG, class DB,
            class Device = Eigen::DefaultDevice, if_float_params<P> = 0>
  void backward_global(const DY& dy, const X& x, const Affine<P>& params, const RowStats<Stat>& saved,
                       const ChannelGradSums& global_sums, double global_count, DX&& dx,
                       DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    const detail::channel::GlobalGrad g{&global_sums, global_count};
    detail::channel::api_backward<Isa, T>(spec_, dy, x, params, saved, &g, std::forward<DX>(dx),
                                          std::forward<DG>(dgamma), std::forward<DB>(dbeta), device);
  }

 private:
  detail::channel::Spec spec_;
};

}  // namespace normkit
