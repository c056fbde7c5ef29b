// normkit: types shared by the row norms (LayerNorm, RMSNorm): affine parameters as
// arguments and the statistics saved for backward.
#pragma once

#include <unsupported/Eigen/CXX11/Tensor>

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

// Statistics of each row saved by forward for backward, one entry per row, rows in
// memory order (the flattened outer dims). The true mean is mean + mean_lo: a single T
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

namespace detail {
template <class X>
struct is_row_stats : std::false_type {};
template <class T>
struct is_row_stats<RowStats<T>> : std::true_type {};
}  // namespace detail

}  // namespace normkit
