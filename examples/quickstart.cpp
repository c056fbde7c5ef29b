// The README's example: LayerNorm and RMSNorm forward and backward over caller memory.
#include <normkit/normkit.hpp>

#include <cstdio>
#include <vector>

int main() {
  const Eigen::Index batch = 4, features = 768;
  std::vector<float> x(batch * features), y(x.size()), dy(x.size(), 1.0f), dx(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 1e4f + 0.01f * static_cast<float>(i % 97);

  // PyTorch order (batch, features), row-major: features are contiguous and normalized.
  using Map2 = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>>;
  using CMap2 = Eigen::TensorMap<Eigen::Tensor<const float, 2, Eigen::RowMajor>>;
  Eigen::Tensor<float, 1> gamma(features), beta(features), dgamma(features), dbeta(features);
  gamma.setConstant(1.0f);
  beta.setZero();

  normkit::LayerNorm<float> ln(/*normalized_dims=*/1, /*eps=*/1e-5);
  const CMap2 xm(x.data(), batch, features);
  normkit::RowStats<float> saved =
      ln.forward(xm, normkit::affine(gamma, beta), Map2(y.data(), batch, features));
  ln.backward(CMap2(dy.data(), batch, features), xm, normkit::affine(gamma, beta), saved,
              Map2(dx.data(), batch, features), dgamma, dbeta);

  normkit::RMSNorm<float> rms(1, 1e-6, normkit::RmsWeight::OnePlusScale);  // Gemma's (1 + w)
  Eigen::Tensor<float, 1> w(features);
  w.setZero();
  rms.forward(xm, normkit::affine(w), Map2(y.data(), batch, features));

  std::printf("LayerNorm row 0: mean %.6f + %.3g, rstd %.4f; dgamma[0] %.4f, dbeta[0] %.1f\n",
              static_cast<double>(saved.mean(0)), static_cast<double>(saved.mean_lo(0)),
              static_cast<double>(saved.rstd(0)), static_cast<double>(dgamma(0)),
              static_cast<double>(dbeta(0)));
  std::printf("RMSNorm y[0] = %.6f\n", static_cast<double>(y[0]));
  return 0;
}
