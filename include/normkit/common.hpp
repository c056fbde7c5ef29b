// normkit: types shared by the ops: affine parameters as arguments, the statistics
// saved for backward, and (channel norms) the memory format, caller-owned running
// statistics and the partial statistics of data-parallel BatchNorm.
#pragma once

#include <unsupported/Eigen/CXX11/Tensor>

#include <cstdint>

#include "detail/tensor_view.hpp"
#include "errors.hpp"

namespace normkit {

// Which learned parameters a LayerNorm applies: none; gamma only (PyTorch bias=False);
// gamma and beta (PyTorch's default).
enum class AffineMode { None, Scale, ScaleShift };

// Affine parameters passed to forward/backward: views of the caller's gamma and beta,
// made by normkit::affine(...). Pass {} for none. Each must have the normalized
// extents in memory order, or be rank 1 with their product.
template <class T>
struct Affine {
  detail::View<const T> gamma;
  detail::View<const T> beta;
};

template <class G>
Affine<detail::scalar_of<const G>> affine(const G& gamma) {
  using T = detail::scalar_of<const G>;
  return Affine<T>{detail::in<T>(gamma), {}};
}

template <class G, class B>
Affine<detail::scalar_of<const G>> affine(const G& gamma, const B& beta) {
  using T = detail::scalar_of<const G>;
  return Affine<T>{detail::in<T>(gamma), detail::in<T>(beta)};
}

// Statistics saved by forward for backward, one entry per row (LayerNorm, RMSNorm: rows
// in memory order, the flattened outer dims) or per statistic group (BatchNorm: per
// channel [C]; GroupNorm: per (sample, group), index n * G + g; InstanceNorm: per
// (sample, channel), index n * C + c). The true mean is mean + mean_lo: a single T
// cannot hold it accurately enough to rebuild xhat when |mean| >> std (a float 1e4 has
// an ulp of 1e-3), so the rounding residue is kept beside it. rstd = 1 / sqrt(var + eps)
// (RMSNorm: 1 / sqrt(mean(x^2) + eps), or 1 / (sqrt(mean(x^2)) + eps)). RMSNorm leaves
// mean and mean_lo empty.
template <class T>
struct RowStats {
  Eigen::Tensor<T, 1> mean;
  Eigen::Tensor<T, 1> mean_lo;
  Eigen::Tensor<T, 1> rstd;
};

// The memory format of a channel norm's input, by memory order (outermost first):
// First = (N, C, spatial...) as PyTorch's contiguous NCHW; Last = (N, spatial..., C) as
// PyTorch's channels_last (NHWC). A RowMajor Tensor<float,4>(N,C,H,W) and a ColMajor
// Tensor<float,4>(W,H,C,N) are both ChannelFormat::First. Never guessed from the shape.
enum class ChannelFormat { First, Last };

// Running statistics of BatchNorm / InstanceNorm: caller-owned state, updated in place
// by a training forward and read by an evaluation forward/backward. mean and var are
// rank-1 tensors of C elements of the op's T. num_batches_tracked (may be null) is
// incremented by each training forward; it is required when momentum is cumulative
// (std::nullopt), where the new statistics get weight 1 / num_batches_tracked.
// Make one with normkit::running(mean, var[, num_batches_tracked]); {} means none.
template <class T>
struct Running {
  detail::View<T> mean;
  detail::View<T> var;
  std::int64_t* num_batches_tracked = nullptr;
  bool present() const { return mean.present || var.present; }
};

template <class M, class V>
Running<detail::scalar_of<M>> running(M& mean, V& var) {
  using T = detail::scalar_of<M>;
  return Running<T>{detail::out<T>(mean), detail::out<T>(var), nullptr};
}

template <class M, class V>
Running<detail::scalar_of<M>> running(M& mean, V& var, std::int64_t& num_batches_tracked) {
  using T = detail::scalar_of<M>;
  return Running<T>{detail::out<T>(mean), detail::out<T>(var), &num_batches_tracked};
}

// Per-channel moments of one shard of a batch, for data-parallel (Sync) BatchNorm:
// count elements per channel (the same for every channel: N * spatial), their mean and
// M2 = sum (x - mean)^2, in double whatever T is. Merge shards with normkit::merge.
struct ChannelMoments {
  double count = 0.0;
  Eigen::Tensor<double, 1> mean;  // [C]
  Eigen::Tensor<double, 1> m2;    // [C]
};

// Per-channel gradient sums of one shard for data-parallel BatchNorm backward:
// sum_dy = sum dy, sum_dy_xhat = sum dy * xhat over the shard's elements of each channel
// (xhat from the global statistics). Shards merge by addition (normkit::merge); the
// merged sums are dbeta and dgamma.
struct ChannelGradSums {
  Eigen::Tensor<double, 1> sum_dy;       // [C]
  Eigen::Tensor<double, 1> sum_dy_xhat;  // [C]
};

// Chan, Golub and LeVeque's pairwise merge: the moments of the union of two shards.
// Either shard may have count 0 (its mean and m2 are then ignored; an empty shard may
// also have empty tensors). Throws normkit::invalid_argument when both have channels and
// the channel counts differ.
ChannelMoments merge(const ChannelMoments& a, const ChannelMoments& b);

// The sums of both shards.
ChannelGradSums merge(const ChannelGradSums& a, const ChannelGradSums& b);

namespace detail {
template <class X>
struct is_row_stats : std::false_type {};
template <class T>
struct is_row_stats<RowStats<T>> : std::true_type {};
}  // namespace detail

inline ChannelMoments merge(const ChannelMoments& a, const ChannelMoments& b) {
  if (b.count == 0.0) return a;
  if (a.count == 0.0) return b;
  if (a.mean.size() != b.mean.size() || a.m2.size() != a.mean.size() ||
      b.m2.size() != b.mean.size())
    detail::fail("merge(ChannelMoments)", "b",
                 "mean and m2 of " + std::to_string(a.mean.size()) + " channels (as a)",
                 std::to_string(b.mean.size()) + " and " + std::to_string(b.m2.size()));
  ChannelMoments r;
  r.count = a.count + b.count;
  r.mean.resize(a.mean.size());
  r.m2.resize(a.mean.size());
  const double fb = b.count / r.count, w = a.count * b.count / r.count;
  for (Eigen::Index c = 0; c < a.mean.size(); ++c) {
    const double d = b.mean(c) - a.mean(c);
    r.mean(c) = a.mean(c) + d * fb;
    r.m2(c) = a.m2(c) + b.m2(c) + d * d * w;
  }
  return r;
}

inline ChannelGradSums merge(const ChannelGradSums& a, const ChannelGradSums& b) {
  if (a.sum_dy.size() == 0 && a.sum_dy_xhat.size() == 0) return b;
  if (b.sum_dy.size() == 0 && b.sum_dy_xhat.size() == 0) return a;
  if (a.sum_dy.size() != b.sum_dy.size() || a.sum_dy_xhat.size() != b.sum_dy_xhat.size())
    detail::fail("merge(ChannelGradSums)", "b",
                 "sums of " + std::to_string(a.sum_dy.size()) + " channels (as a)",
                 std::to_string(b.sum_dy.size()));
  ChannelGradSums r;
  r.sum_dy = a.sum_dy + b.sum_dy;
  r.sum_dy_xhat = a.sum_dy_xhat + b.sum_dy_xhat;
  return r;
}

}  // namespace normkit
