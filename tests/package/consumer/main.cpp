// A user's program: LayerNorm over the last dim of a (2, 3, 40) tensor with gamma and
// beta, checked against a double-precision reference. Exits non-zero on any mismatch.
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <normkit/normkit.hpp>
#include <string>
#include <vector>

int main() {
  const std::string header_version = std::to_string(NORMKIT_VERSION_MAJOR) + "." +
                                     std::to_string(NORMKIT_VERSION_MINOR) + "." +
                                     std::to_string(NORMKIT_VERSION_PATCH);
  if (header_version != CONSUMER_EXPECTED_VERSION) {
    std::printf("FAIL: header says normkit %s, the CMake package %s\n", header_version.c_str(),
                CONSUMER_EXPECTED_VERSION);
    return 1;
  }

  constexpr int kRows = 6, kDim = 40;
  // The input lives in the caller's buffer, as it would in a real program: rows with
  // different offsets and scales, so that a missed mean or rstd shows.
  std::vector<float> buffer(kRows * kDim);
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kDim; ++i)
      buffer[static_cast<std::size_t>(r * kDim + i)] =
          static_cast<float>(r - 2) * 10.0f +
          static_cast<float>(r + 1) * std::sin(0.7f * static_cast<float>(i));
  Eigen::TensorMap<Eigen::Tensor<const float, 3, Eigen::RowMajor>> x(buffer.data(), 2, 3, kDim);

  Eigen::Tensor<float, 1> gamma(kDim), beta(kDim);
  for (int i = 0; i < kDim; ++i) {
    gamma(i) = 0.5f + 0.025f * static_cast<float>(i);
    beta(i) = -1.0f + 0.05f * static_cast<float>(i);
  }

  const double eps = 1e-5;
  const normkit::LayerNorm<float> ln(1, eps);
  Eigen::Tensor<float, 3, Eigen::RowMajor> y(2, 3, kDim);
  const normkit::RowStats<float> saved = ln.forward(x, normkit::affine(gamma, beta), y);

  int bad = 0;
  const float* yp = y.data();
  for (int r = 0; r < kRows; ++r) {
    const float* xr = buffer.data() + r * kDim;
    double mean = 0.0, var = 0.0;
    for (int i = 0; i < kDim; ++i) mean += xr[i];
    mean /= kDim;
    for (int i = 0; i < kDim; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= kDim;
    const double rstd = 1.0 / std::sqrt(var + eps);
    // float output of a D-term computation: a few sqrt(D) ulps of the terms' size.
    const double tol_scale = 4.0 * std::sqrt(double{kDim}) * FLT_EPSILON;
    for (int i = 0; i < kDim; ++i) {
      const double xhat = (xr[i] - mean) * rstd;
      const double ref = xhat * gamma(i) + beta(i);
      const double tol = tol_scale * (std::fabs(xhat * gamma(i)) + std::fabs(beta(i)) + 1.0);
      if (!(std::fabs(yp[r * kDim + i] - ref) <= tol)) {
        if (++bad <= 5)
          std::printf("FAIL: row %d, element %d: got %.8g, expected %.8g\n", r, i,
                      double{yp[r * kDim + i]}, ref);
      }
    }
    const double saved_mean = double{saved.mean(r)} + double{saved.mean_lo(r)};
    if (!(std::fabs(saved_mean - mean) <= tol_scale * (std::fabs(mean) + 1.0)) ||
        !(std::fabs(saved.rstd(r) / rstd - 1.0) <= tol_scale)) {
      ++bad;
      std::printf("FAIL: row %d: saved mean %.8g rstd %.8g, expected %.8g and %.8g\n", r,
                  saved_mean, double{saved.rstd(r)}, mean, rstd);
    }
  }
  if (bad != 0) {
    std::printf("normkit %s consumer: %d mismatches\n", header_version.c_str(), bad);
    return 1;
  }
  std::printf("normkit %s consumer: LayerNorm over %d rows of %d matches the reference\n",
              header_version.c_str(), kRows, kDim);
  return 0;
}
