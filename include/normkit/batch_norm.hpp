// normkit::BatchNorm (Ioffe & Szegedy 2015): per channel, over all samples and spatial
// positions, y = (x - mean) / sqrt(var + eps) * gamma + beta, var biased; running
// statistics updated with the unbiased variance. Inputs of rank 2 (N, C) to 8
// (N, C, spatial...), channels first or last by memory order (ChannelFormat).
// Semantics: ../../shared/SPEC.md "BatchNorm", PyTorch's nn.BatchNorm{1,2,3}d.
#pragma once

#include <optional>
#include <type_traits>

#include "common.hpp"
#include "detail/channel_norm.hpp"
#include "detail/simd/dispatch.hpp"

namespace normkit {

template <class T, class Isa = detail::simd::Best>
class BatchNorm {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "normkit::BatchNorm<T>: T must be float or double");

 public:
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

  // Training: normalize with the batch statistics; saved receives mean, mean_lo, rstd
  // per channel; running (optional: {} for none, PyTorch track_running_stats=False) is
  // updated in place. Throws before writing anything if an argument does not fit,
  // including a channel of a single value. y may be x itself.
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward(const X& x, const Affine<T>& params, Y&& y, RowStats<T>& saved,
               const Running<T>& running = {}, const Device& device = Device()) const {
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::forward_train<decltype(isa_), T>(
          spec_, detail::in<T>(x), params, detail::out<T>(y), saved, running, nullptr, detail::Exec(device));
    });
  }

  // Evaluation: normalize with the running statistics (required), which are not changed.
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward_eval(const X& x, const Affine<T>& params, const Running<T>& running, Y&& y,
                    const Device& device = Device()) const {
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::forward_eval<decltype(isa_), T>(spec_, detail::in<T>(x), params, running,
                                                       detail::out<T>(y), detail::Exec(device));
    });
  }

  // Training backward from forward's x, params and saved statistics. Each of dx,
  // dgamma, dbeta is a tensor or normkit::skip; dgamma and dbeta ([C]) are overwritten.
  // dx may be dy or x itself. Bitwise identical for any number of device threads.
  template <class DY, class X, class DX, class DG, class DB, class Device = Eigen::DefaultDevice>
  void backward(const DY& dy, const X& x, const Affine<T>& params, const RowStats<T>& saved,
                DX&& dx, DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::backward_train<decltype(isa_), T>(
          spec_, detail::in<T>(dy), detail::in<T>(x), params, saved, nullptr, detail::out<T>(dx),
          detail::out<T>(dgamma), detail::out<T>(dbeta), detail::Exec(device));
    });
  }

  // Evaluation backward: the running statistics are constants, dx = dy * gamma * rstd_run.
  template <class DY, class X, class DX, class DG, class DB, class Device = Eigen::DefaultDevice>
  void backward_eval(const DY& dy, const X& x, const Affine<T>& params, const Running<T>& running,
                     DX&& dx, DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::backward_eval<decltype(isa_), T>(
          spec_, detail::in<T>(dy), detail::in<T>(x), params, running, detail::out<T>(dx),
          detail::out<T>(dgamma), detail::out<T>(dbeta), detail::Exec(device));
    });
  }

  // --- Data-parallel (Sync) BatchNorm, in three steps per direction ---
  // 1. Each shard: moments = partial_stats(x_shard). 2. Merge all shards' moments
  // (normkit::merge, or an MPI_Allreduce with a merging op). 3. Each shard:
  // forward_global(x_shard, params, merged, y_shard, saved, running).
  // Splitting a batch this way reproduces the whole batch's forward within rounding.
  template <class X, class Device = Eigen::DefaultDevice>
  ChannelMoments partial_stats(const X& x, const Device& device = Device()) const {
    return detail::simd::visit<Isa>([&](auto isa_) {
      return detail::channel::partial_stats<decltype(isa_), T>(spec_, detail::in<T>(x), detail::Exec(device));
    });
  }

  // Normalize a shard with the global (merged) moments; saved as in forward; running
  // (optional) updated with the global mean and the unbiased global variance, as a
  // training forward on the whole batch would (update it on one shard, or on every
  // shard's own copy). global.count must exceed 1.
  template <class X, class Y, class Device = Eigen::DefaultDevice>
  void forward_global(const X& x, const Affine<T>& params, const ChannelMoments& global, Y&& y,
                      RowStats<T>& saved, const Running<T>& running = {},
                      const Device& device = Device()) const {
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::forward_train<decltype(isa_), T>(
          spec_, detail::in<T>(x), params, detail::out<T>(y), saved, running, &global, detail::Exec(device));
    });
  }

  // Backward, step 1 per shard: sums of dy and dy * xhat per channel (xhat from saved,
  // the global statistics). Step 2: merge (addition). Step 3 per shard: backward_global.
  template <class DY, class X, class Device = Eigen::DefaultDevice>
  ChannelGradSums partial_grad_sums(const DY& dy, const X& x, const RowStats<T>& saved,
                                    const Device& device = Device()) const {
    return detail::simd::visit<Isa>([&](auto isa_) {
      return detail::channel::partial_grad_sums<decltype(isa_), T>(spec_, detail::in<T>(dy),
                                                                   detail::in<T>(x), saved, detail::Exec(device));
    });
  }

  // dx of a shard from the merged sums and the global count (global.count of the
  // forward's merged moments); dgamma = sum_dy_xhat and dbeta = sum_dy (the same on
  // every shard; skip them where not needed).
  template <class DY, class X, class DX, class DG, class DB, class Device = Eigen::DefaultDevice>
  void backward_global(const DY& dy, const X& x, const Affine<T>& params, const RowStats<T>& saved,
                       const ChannelGradSums& global_sums, double global_count, DX&& dx,
                       DG&& dgamma, DB&& dbeta, const Device& device = Device()) const {
    const detail::channel::GlobalGrad g{&global_sums, global_count};
    detail::simd::visit<Isa>([&](auto isa_) {
      detail::channel::backward_train<decltype(isa_), T>(
          spec_, detail::in<T>(dy), detail::in<T>(x), params, saved, &g, detail::out<T>(dx),
          detail::out<T>(dgamma), detail::out<T>(dbeta), detail::Exec(device));
    });
  }

 private:
  detail::channel::Spec spec_;
};

}  // namespace normkit
