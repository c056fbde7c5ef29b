// BatchNorm in a convolutional residual block, out = x + ReLU(BN(conv(x))), with the
// running statistics owned by the caller:
//
//   1. training: 60 steps, each on a fresh batch drawn from one distribution. BatchNorm
//      normalizes with the batch statistics and updates running_mean / running_var
//      (momentum 0.1, unbiased variance). Backward gives dgamma and dbeta, and SGD
//      moves gamma and beta towards a teacher's (gamma 1.5, beta 0.25). The running
//      statistics are printed converging to the true statistics of the norm's input.
//   2. evaluation: a new batch from the same distribution, normalized with the running
//      statistics (forward_eval), which are left unchanged.
//
// Checks (the program exits non-zero if one fails):
//   - every training step, every channel: (y - beta) / gamma has mean 0 and variance
//     var / (var + eps) (var: the batch's) to float precision, |error| <= 1e-5;
//   - the loss falls below a tenth of its first value;
//   - after training: the running mean is within 0.1 std and the running variance within
//     15% of the true statistics (an average of about 19 batches of 1024 values each);
//   - evaluation: per channel, (y - beta) / gamma has |mean| <= 0.1 and |var - 1| <= 0.15
//     (4096 values per channel: sampling noise about 0.016 in the mean, 0.02 in the var).
//
// Feature maps are Eigen::Tensor<float, 4, RowMajor> of extents (N, C, H, W): PyTorch's
// NCHW, normkit's ChannelFormat::First. The convolution is 1x1: for each sample, a
// (C, C) weight matrix times the sample's (C, H*W) block of memory.

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <normkit/normkit.hpp>
#include <random>
#include <unsupported/Eigen/CXX11/Tensor>
#include <vector>

namespace {

using Eigen::Index;
using Fmap = Eigen::Tensor<float, 4, Eigen::RowMajor>;  // (N, C, H, W)
using Param = Eigen::Tensor<float, 1>;                  // one value per channel
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index kC = 16, kH = 8, kW = 8, kBatch = 16, kEvalBatch = 64;
constexpr int kSteps = 60;
constexpr float kTeacherGamma = 1.5f, kTeacherBeta = 0.25f, kLearningRate = 1.0f;

// Sample n's (C, H*W) block of a feature map.
Eigen::Map<Mat> sample(Fmap& f, Index n) { return {f.data() + n * kC * kH * kW, kC, kH * kW}; }
Eigen::Map<const Mat> sample(const Fmap& f, Index n) {
  return {f.data() + n * kC * kH * kW, kC, kH * kW};
}

// The data: channel c of x is normal with mean mu[c] and std sigma[c].
struct Source {
  std::mt19937 gen{7};
  std::vector<double> mu, sigma;

  Source() {
    for (int c = 0; c < kC; ++c) {
      mu.push_back(0.5 + 0.25 * (c % 5));
      sigma.push_back(0.5 + 0.1 * (c % 7));
    }
  }
  Fmap batch(Index n) {
    Fmap x(n, kC, kH, kW);
    for (Index i = 0; i < n; ++i)
      for (Index c = 0; c < kC; ++c) {
        const auto k = static_cast<std::size_t>(c);
        std::normal_distribution<float> d(static_cast<float>(mu[k]), static_cast<float>(sigma[k]));
        for (Index p = 0; p < kH * kW; ++p) sample(x, i)(c, p) = d(gen);
      }
    return x;
  }
};

// Per-channel mean and biased variance, in double.
struct ChannelStats {
  std::vector<double> mean, var;

  // The statistics of (f - beta) / gamma: what the norm itself produced.
  ChannelStats unscaled(const Param& gamma, const Param& beta) const {
    ChannelStats s = *this;
    for (std::size_t c = 0; c < mean.size(); ++c) {
      const auto i = static_cast<Index>(c);
      s.mean[c] = (mean[c] - beta(i)) / gamma(i);
      s.var[c] = var[c] / (double{gamma(i)} * gamma(i));
    }
    return s;
  }
};

ChannelStats channel_stats(const Fmap& f) {
  ChannelStats s{std::vector<double>(kC, 0.0), std::vector<double>(kC, 0.0)};
  const auto count = static_cast<double>(f.dimension(0) * kH * kW);
  for (Index c = 0; c < kC; ++c) {
    const auto k = static_cast<std::size_t>(c);
    double sum = 0.0, sum_sq = 0.0;
    for (Index n = 0; n < f.dimension(0); ++n)
      for (Index p = 0; p < kH * kW; ++p) {
        const double v = sample(f, n)(c, p);
        sum += v;
        sum_sq += v * v;
      }
    s.mean[k] = sum / count;
    s.var[k] = sum_sq / count - s.mean[k] * s.mean[k];
  }
  return s;
}

}  // namespace

int main() {
  try {
    Source source;
    std::mt19937 gen(11);
    std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(float{kC}));
    Mat conv_w(kC, kC);  // 1x1 convolution, no bias (BatchNorm's beta is the bias)
    for (Index i = 0; i < conv_w.size(); ++i) conv_w.data()[i] = normal(gen);
    const auto conv = [&](const Fmap& x) {
      Fmap h(x.dimensions());
      for (Index n = 0; n < x.dimension(0); ++n) sample(h, n) = conv_w * sample(x, n);
      return h;
    };

    // The true statistics of h = conv(x): mean W mu, variance sum_k W_ck^2 sigma_k^2.
    std::vector<double> true_mean(kC, 0.0), true_var(kC, 0.0);
    for (Index c = 0; c < kC; ++c)
      for (Index k = 0; k < kC; ++k) {
        const auto i = static_cast<std::size_t>(c), j = static_cast<std::size_t>(k);
        true_mean[i] += conv_w(c, k) * source.mu[j];
        true_var[i] += double{conv_w(c, k)} * conv_w(c, k) * source.sigma[j] * source.sigma[j];
      }

    // BatchNorm and its state: the functor holds only hyper-parameters (eps 1e-5,
    // momentum 0.1); gamma, beta and the running statistics belong to the caller.
    const normkit::BatchNorm<float> bn(normkit::ChannelFormat::First, 1e-5, 0.1);
    Param gamma(kC), beta(kC), dgamma(kC), dbeta(kC), running_mean(kC), running_var(kC);
    gamma.setConstant(1.0f);
    beta.setZero();
    running_mean.setZero();  // PyTorch's initial running statistics
    running_var.setConstant(1.0f);
    std::int64_t batches = 0;

    std::printf(
        "normkit %d.%d.%d: out = x + ReLU(BatchNorm(conv1x1(x))), x of (N=%ld, C=%ld, "
        "H=%ld, W=%ld)\n\n",
        NORMKIT_VERSION_MAJOR, NORMKIT_VERSION_MINOR, NORMKIT_VERSION_PATCH,
        static_cast<long>(kBatch), static_cast<long>(kC), static_cast<long>(kH),
        static_cast<long>(kW));
    std::printf("training: SGD on gamma and beta towards a teacher's (%.2f, %.2f)\n",
                double{kTeacherGamma}, double{kTeacherBeta});
    std::printf("%5s %9s  %8s %8s   %12s %12s  %12s %12s\n", "step", "loss", "gamma[0]", "beta[0]",
                "run_mean[0]", "run_var[0]", "run_mean[5]", "run_var[5]");
    std::printf("%5s %9s  %8.4f %8.4f   %12.4f %12.4f  %12.4f %12.4f\n", "true", "",
                double{kTeacherGamma}, double{kTeacherBeta}, true_mean[0], true_var[0],
                true_mean[5], true_var[5]);

    int failures = 0;
    double train_worst = 0.0, first_loss = 0.0, last_loss = 0.0;
    for (int step = 1; step <= kSteps; ++step) {
      const Fmap x = source.batch(kBatch);
      const Fmap h = conv(x);
      Fmap z(h.dimensions());
      normkit::RowStats<float> saved;
      bn.forward(h, normkit::affine(gamma, beta), z, saved,
                 normkit::running(running_mean, running_var, batches));

      // Training mode: each channel of (z - beta) / gamma is centred and scaled exactly.
      const ChannelStats zs = channel_stats(z).unscaled(gamma, beta), hs = channel_stats(h);
      for (std::size_t c = 0; c < kC; ++c)
        train_worst = std::max({train_worst, std::fabs(zs.mean[c]),
                                std::fabs(zs.var[c] - hs.var[c] / (hs.var[c] + bn.eps()))});

      // The teacher's block: x + ReLU(teacher_gamma * (h - true mean) / true std +
      // teacher_beta). err = out - teacher's out = ReLU(z) - ReLU(teacher's z). The
      // loss, mean(err^2) / 2 per channel summed over channels, has d loss / d z =
      // err / (N * H * W) where z > 0, and 0 elsewhere. Only gamma and beta learn here:
      // dx (towards the convolution) is skipped.
      Fmap dz(z.dimensions());
      const auto per_channel = static_cast<double>(kBatch * kH * kW);
      double loss = 0.0;
      for (Index n = 0; n < kBatch; ++n)
        for (Index c = 0; c < kC; ++c)
          for (Index p = 0; p < kH * kW; ++p) {
            const auto k = static_cast<std::size_t>(c);
            const double teacher =
                kTeacherGamma * (sample(h, n)(c, p) - true_mean[k]) / std::sqrt(true_var[k]) +
                kTeacherBeta;
            const double zv = sample(z, n)(c, p);
            const double e = std::max(zv, 0.0) - std::max(teacher, 0.0);
            loss += 0.5 * e * e / per_channel;
            sample(dz, n)(c, p) = zv > 0.0 ? static_cast<float>(e / per_channel) : 0.0f;
          }
      bn.backward(dz, h, normkit::affine(gamma, beta), saved, normkit::skip, dgamma, dbeta);
      gamma -= kLearningRate * dgamma;
      beta -= kLearningRate * dbeta;
      if (step == 1) first_loss = loss;
      last_loss = loss;

      if (step == 1 || step == 2 || step == 5 || step % 10 == 0)
        std::printf("%5d %9.5f  %8.4f %8.4f   %12.4f %12.4f  %12.4f %12.4f\n", step, loss,
                    double{gamma(0)}, double{beta(0)}, double{running_mean(0)},
                    double{running_var(0)}, double{running_mean(5)}, double{running_var(5)});
    }

    const bool train_ok = train_worst <= 1e-5;
    std::printf(
        "\ntraining mode, every step and channel: |mean| and |var - var/(var+eps)| of "
        "(y - beta) / gamma <= %.1e (tolerance 1e-5): %s\n",
        train_worst, train_ok ? "ok" : "FAILED");
    const bool learned = last_loss < 0.1 * first_loss;
    std::printf("loss from %.5f to %.5f (tolerance: below a tenth): %s\n", first_loss, last_loss,
                learned ? "ok" : "FAILED");
    double mean_dev = 0.0, var_dev = 0.0;
    for (Index c = 0; c < kC; ++c) {
      const auto k = static_cast<std::size_t>(c);
      mean_dev =
          std::max(mean_dev, std::fabs(running_mean(c) - true_mean[k]) / std::sqrt(true_var[k]));
      var_dev = std::max(var_dev, std::fabs(running_var(c) / true_var[k] - 1.0));
    }
    const bool running_ok = mean_dev <= 0.1 && var_dev <= 0.15 && batches == kSteps;
    std::printf(
        "running statistics after %lld batches, worst channel: mean off by %.3f std "
        "(tolerance 0.1), var off by %.1f%% (tolerance 15%%): %s\n",
        static_cast<long long>(batches), mean_dev, 100.0 * var_dev, running_ok ? "ok" : "FAILED");
    failures += (train_ok ? 0 : 1) + (learned ? 0 : 1) + (running_ok ? 0 : 1);

    // Evaluation: a new batch, normalized with the running statistics.
    const Fmap x = source.batch(kEvalBatch);
    const Fmap h = conv(x);
    Fmap z(h.dimensions());
    const Param mean_before = running_mean, var_before = running_var;
    bn.forward_eval(h, normkit::affine(gamma, beta), normkit::running(running_mean, running_var),
                    z);
    const Fmap out = x + z.cwiseMax(0.0f);
    const ChannelStats es = channel_stats(z).unscaled(gamma, beta);
    double eval_mean = 0.0, eval_var = 0.0;
    for (std::size_t c = 0; c < kC; ++c) {
      eval_mean = std::max(eval_mean, std::fabs(es.mean[c]));
      eval_var = std::max(eval_var, std::fabs(es.var[c] - 1.0));
    }
    const bool unchanged = Eigen::Tensor<bool, 0>((running_mean == mean_before).all())() &&
                           Eigen::Tensor<bool, 0>((running_var == var_before).all())();
    const bool eval_ok = eval_mean <= 0.1 && eval_var <= 0.15 && unchanged;
    std::printf(
        "\nevaluation on %ld new samples, per channel (y - beta) / gamma: worst |mean| "
        "%.3f (tolerance 0.1), worst |var - 1| %.3f (tolerance 0.15); running "
        "statistics unchanged: %s: %s\n",
        static_cast<long>(kEvalBatch), eval_mean, eval_var, unchanged ? "yes" : "no",
        eval_ok ? "ok" : "FAILED");
    std::printf("block output mean %.4f (input mean %.4f)\n",
                double{Eigen::Tensor<float, 0, Eigen::RowMajor>(out.mean())()},
                double{Eigen::Tensor<float, 0, Eigen::RowMajor>(x.mean())()});
    failures += eval_ok ? 0 : 1;

    if (failures != 0) {
      std::printf("%d check(s) FAILED\n", failures);
      return EXIT_FAILURE;
    }
    std::printf("all checks ok\n");
    return EXIT_SUCCESS;
  } catch (const normkit::invalid_argument& e) {
    std::fprintf(stderr, "normkit rejected an argument: %s\n", e.what());
    return EXIT_FAILURE;
  }
}
