// The residual block of a UNet (as in diffusion models), with GroupNorm(32):
//
//   h   = conv3x3(SiLU(GroupNorm(x)))
//   out = x + conv3x3(SiLU(GroupNorm(h)))
//
// on x of (N=2, C=64, H=16, W=16), run twice: with the feature maps channels-first
// (RowMajor (N, C, H, W): PyTorch's NCHW, ChannelFormat::First) and channels-last
// (RowMajor (N, H, W, C): PyTorch's channels_last, ChannelFormat::Last). GroupNorm(32)
// normalizes each sample's groups of 2 consecutive channels over all positions; gamma
// and beta are per channel (the first norm at PyTorch's initialization, ones and zeros;
// the second with random values).
//
// Printed: per-group statistics of the first norm's input and output (sample 0, a few
// groups), then how far the two formats' outputs are apart.
// Checks (the program exits non-zero if one fails):
//   - every group of the first norm's output has mean 0 and variance var / (var + eps)
//     (var: the group's) to float precision, |error| <= 1e-5;
//   - the channels-last block gives the channels-first block's output, element by
//     element within 1e-6 of the output's largest magnitude. Both formats use the same
//     algorithm, but memory order decides the order of the additions, so the last bits
//     may differ: a rounding of the norm's output grows by a few roundings through the
//     convolutions, far below 1e-6.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <normkit/normkit.hpp>
#include <random>
#include <unsupported/Eigen/CXX11/Tensor>
#include <vector>

namespace {

using Eigen::Index;
using normkit::ChannelFormat;
using Param = Eigen::Tensor<float, 1>;  // one value per channel

constexpr Index kN = 2, kC = 64, kH = 16, kW = 16;
constexpr int kGroups = 32;

// A feature map of logical extents (N, C, H, W), stored in either format.
struct Fmap {
  ChannelFormat format;
  std::vector<float> v = std::vector<float>(kN * kC * kH * kW, 0.0f);

  std::size_t index(Index n, Index c, Index y, Index x) const {
    const Index i = format == ChannelFormat::First ? ((n * kC + c) * kH + y) * kW + x
                                                   : ((n * kH + y) * kW + x) * kC + c;
    return static_cast<std::size_t>(i);
  }
  float& at(Index n, Index c, Index y, Index x) { return v[index(n, c, y, x)]; }
  float at(Index n, Index c, Index y, Index x) const { return v[index(n, c, y, x)]; }

  // The tensor normkit sees: channels where the format puts them in memory.
  Eigen::TensorMap<Eigen::Tensor<float, 4, Eigen::RowMajor>> tensor() {
    if (format == ChannelFormat::First) return {v.data(), kN, kC, kH, kW};
    return {v.data(), kN, kH, kW, kC};
  }
};

// A 3x3 convolution with zero padding, C -> C channels: the same arithmetic, in the
// same order, whatever the format.
struct Conv3x3 {
  std::vector<float> w, b;  // w[((o * C + i) * 3 + ky) * 3 + kx], b[o]

  explicit Conv3x3(std::mt19937& gen) {
    std::normal_distribution<float> d(0.0f, 1.0f / std::sqrt(9.0f * kC));
    for (Index i = 0; i < kC * kC * 9; ++i) w.push_back(d(gen));
    for (Index i = 0; i < kC; ++i) b.push_back(0.1f * d(gen));
  }

  Fmap operator()(const Fmap& in) const {
    Fmap out{in.format};
    for (Index n = 0; n < kN; ++n)
      for (Index o = 0; o < kC; ++o)
        for (Index y = 0; y < kH; ++y)
          for (Index x = 0; x < kW; ++x) {
            float acc = b[static_cast<std::size_t>(o)];
            for (Index i = 0; i < kC; ++i)
              for (Index ky = 0; ky < 3; ++ky)
                for (Index kx = 0; kx < 3; ++kx) {
                  const Index sy = y + ky - 1, sx = x + kx - 1;
                  if (sy < 0 || sy >= kH || sx < 0 || sx >= kW) continue;
                  acc += w[static_cast<std::size_t>(((o * kC + i) * 3 + ky) * 3 + kx)] *
                         in.at(n, i, sy, sx);
                }
            out.at(n, o, y, x) = acc;
          }
    return out;
  }
};

void silu(Fmap& f) {
  for (float& a : f.v) a = a / (1.0f + std::exp(-a));
}

// Mean and biased variance, in double, of group g of sample n.
struct Moments {
  double mean = 0.0, var = 0.0;
};
Moments group_moments(const Fmap& f, Index n, Index g) {
  const Index per_group = kC / kGroups;
  double sum = 0.0, sum_sq = 0.0;
  for (Index c = g * per_group; c < (g + 1) * per_group; ++c)
    for (Index y = 0; y < kH; ++y)
      for (Index x = 0; x < kW; ++x) {
        const double a = f.at(n, c, y, x);
        sum += a;
        sum_sq += a * a;
      }
  const auto count = static_cast<double>(per_group * kH * kW);
  Moments m;
  m.mean = sum / count;
  m.var = sum_sq / count - m.mean * m.mean;
  return m;
}

struct Block {
  normkit::GroupNorm<float> norm;  // GroupNorm(32), eps 1e-5, gamma and beta
  Param gamma1, beta1, gamma2, beta2;
  Conv3x3 conv1, conv2;

  Block(ChannelFormat format, std::mt19937& gen)
      : norm(kGroups, format),
        gamma1(kC),
        beta1(kC),
        gamma2(kC),
        beta2(kC),
        conv1(gen),
        conv2(gen) {
    std::normal_distribution<float> d(0.0f, 0.1f);
    gamma1.setConstant(1.0f);
    beta1.setZero();
    for (Index c = 0; c < kC; ++c) {
      gamma2(c) = 1.0f + d(gen);
      beta2(c) = d(gen);
    }
  }

  // Returns the block's output; norm1_out receives the first GroupNorm's output.
  Fmap operator()(Fmap& x, Fmap& norm1_out) const {
    norm.forward(x.tensor(), normkit::affine(gamma1, beta1), norm1_out.tensor());
    Fmap a = norm1_out;
    silu(a);
    Fmap h = conv1(a);
    Fmap b{x.format};
    norm.forward(h.tensor(), normkit::affine(gamma2, beta2), b.tensor());
    silu(b);
    Fmap out = conv2(b);
    for (std::size_t i = 0; i < out.v.size(); ++i) out.v[i] += x.v[i];
    return out;
  }
};

}  // namespace

int main() {
  try {
    // x: channel c has its own offset and scale, so the groups differ.
    Fmap x_first{ChannelFormat::First}, x_last{ChannelFormat::Last};
    std::mt19937 gen(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (Index n = 0; n < kN; ++n)
      for (Index c = 0; c < kC; ++c)
        for (Index y = 0; y < kH; ++y)
          for (Index x = 0; x < kW; ++x) {
            const float v = 2.0f * std::sin(static_cast<float>(c)) +
                            (0.5f + 0.25f * static_cast<float>(c % 8)) * normal(gen);
            x_first.at(n, c, y, x) = v;
            x_last.at(n, c, y, x) = v;
          }

    // The same parameters for both formats (the same seed).
    std::mt19937 gen_first(9), gen_last(9);
    const Block block_first(ChannelFormat::First, gen_first);
    const Block block_last(ChannelFormat::Last, gen_last);

    std::printf(
        "normkit %d.%d.%d UNet block: out = x + conv(SiLU(GN(conv(SiLU(GN(x)))))), "
        "GroupNorm(%d), x of (N=%ld, C=%ld, H=%ld, W=%ld)\n\n",
        NORMKIT_VERSION_MAJOR, NORMKIT_VERSION_MINOR, NORMKIT_VERSION_PATCH, kGroups,
        static_cast<long>(kN), static_cast<long>(kC), static_cast<long>(kH), static_cast<long>(kW));

    Fmap norm1_first{ChannelFormat::First}, norm1_last{ChannelFormat::Last};
    const Fmap out_first = block_first(x_first, norm1_first);
    const Fmap out_last = block_last(x_last, norm1_last);

    // The first norm, channels first: per-group statistics before and after.
    std::printf(
        "first GroupNorm (gamma 1, beta 0), channels first, per group of %ld channels "
        "x %ld positions:\n",
        static_cast<long>(kC / kGroups), static_cast<long>(kH * kW));
    std::printf("  %6s %5s  %9s %9s  ->  %10s %10s\n", "sample", "group", "mean", "var", "mean",
                "var");
    const double eps = block_first.norm.eps();
    double worst = 0.0;
    for (Index n = 0; n < kN; ++n)
      for (Index g = 0; g < kGroups; ++g) {
        const Moments in = group_moments(x_first, n, g), out = group_moments(norm1_first, n, g);
        worst =
            std::max({worst, std::fabs(out.mean), std::fabs(out.var - in.var / (in.var + eps))});
        if (n == 0 && (g < 3 || g == kGroups - 1))
          std::printf("  %6ld %5ld  %9.4f %9.4f  ->  %10.2e %10.6f\n", static_cast<long>(n),
                      static_cast<long>(g), in.mean, in.var, out.mean, out.var);
      }
    const bool norm_ok = worst <= 1e-5;
    std::printf(
        "  all %ld groups: |mean| and |var - var/(var+eps)| <= %.1e (tolerance 1e-5): "
        "%s\n\n",
        static_cast<long>(kN * kGroups), worst, norm_ok ? "ok" : "FAILED");

    // Channels last against channels first, element by element.
    double scale = 0.0, diff = 0.0;
    long equal = 0;
    for (Index n = 0; n < kN; ++n)
      for (Index c = 0; c < kC; ++c)
        for (Index y = 0; y < kH; ++y)
          for (Index x = 0; x < kW; ++x) {
            const float a = out_first.at(n, c, y, x), b = out_last.at(n, c, y, x);
            scale = std::max(scale, std::fabs(double{a}));
            diff = std::max(diff, std::fabs(double{a} - double{b}));
            equal += a == b ? 1 : 0;
          }
    const bool formats_ok = diff <= 1e-6 * scale;
    std::printf(
        "block output, channels last vs channels first: %ld of %ld elements bitwise "
        "equal, max |difference| %.2e (tolerance 1e-6 x max|out| = %.2e): %s\n",
        equal, static_cast<long>(kN * kC * kH * kW), diff, 1e-6 * scale,
        formats_ok ? "ok" : "FAILED");

    if (!norm_ok || !formats_ok) {
      std::printf("check(s) FAILED\n");
      return EXIT_FAILURE;
    }
    std::printf("all checks ok\n");
    return EXIT_SUCCESS;
  } catch (const normkit::invalid_argument& e) {
    std::fprintf(stderr, "normkit rejected an argument: %s\n", e.what());
    return EXIT_FAILURE;
  }
}
