// One transformer block's forward pass written twice, with every norm from normkit:
//
//   pre-norm  (GPT-2, LLaMA):             h = x + attn(LayerNorm(x));  out = h + ffn(RMSNorm(h))
//   post-norm (the 2017 Transformer):     h = LayerNorm(x + attn(x));  out = RMSNorm(h + ffn(h))
//
// on small random data (B=2 sequences of T=8 tokens, model width D=64, one causal
// attention head, an FFN 64 -> 256 -> 64). For a few tokens it prints the mean, the
// variance and the mean square of the row before and after each norm, and the std the
// norm saved for backward (1/rstd); every row is checked against what the norm
// promises, and the program exits non-zero if one is off.
//
// Activations are Eigen::Tensor<float, 3, RowMajor> of extents (B, T, D): normkit
// normalizes the innermost (contiguous) dim D. The matrix products see the same buffer
// as a (B*T, D) row-major matrix, one token a row.

#include <Eigen/Dense>
#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <normkit/normkit.hpp>
#include <random>
#include <unsupported/Eigen/CXX11/Tensor>

namespace {

using Eigen::Index;
using Act = Eigen::Tensor<float, 3, Eigen::RowMajor>;  // (batch, time, model dim)
using Param = Eigen::Tensor<float, 1>;                 // gamma, beta: one per model dim
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVec = Eigen::RowVectorXf;

constexpr Index kBatch = 2, kTime = 8, kDim = 64, kHidden = 4 * kDim;

// The (B*T, D) matrix over a (B, T, D) activation's memory.
Eigen::Map<Mat> tokens(Act& a) {
  return {a.data(), a.dimension(0) * a.dimension(1), a.dimension(2)};
}
Eigen::Map<const Mat> tokens(const Act& a) {
  return {a.data(), a.dimension(0) * a.dimension(1), a.dimension(2)};
}

class Rng {
 public:
  explicit Rng(unsigned seed) : gen_(seed) {}
  float normal(float mean, float stddev) {
    return std::normal_distribution<float>(mean, stddev)(gen_);
  }
  Mat matrix(Index rows, Index cols, float stddev) {
    Mat m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = normal(0.0f, stddev);
    return m;
  }

 private:
  std::mt19937 gen_;
};

// Single-head causal self-attention: softmax(Q K^T / sqrt(D) + causal mask) V, then W_o.
struct Attention {
  Mat wq, wk, wv, wo;  // (D, D), applied as x * W

  explicit Attention(Rng& rng)
      : wq(rng.matrix(kDim, kDim, 1.0f / std::sqrt(float{kDim}))),
        wk(rng.matrix(kDim, kDim, 1.0f / std::sqrt(float{kDim}))),
        wv(rng.matrix(kDim, kDim, 1.0f / std::sqrt(float{kDim}))),
        wo(rng.matrix(kDim, kDim, 1.0f / std::sqrt(float{kDim}))) {}

  Act operator()(const Act& x) const {
    const Index seqs = x.dimension(0), len = x.dimension(1);
    const Mat q = tokens(x) * wq, k = tokens(x) * wk, v = tokens(x) * wv;
    const float scale = 1.0f / std::sqrt(static_cast<float>(x.dimension(2)));
    Mat context(q.rows(), q.cols());
    for (Index b = 0; b < seqs; ++b) {
      const Index first = b * len;
      Mat p = q.middleRows(first, len) * k.middleRows(first, len).transpose() * scale;
      for (Index i = 0; i < len; ++i) {  // token i attends to tokens 0..i
        auto seen = p.row(i).head(i + 1);
        seen = (seen.array() - seen.maxCoeff()).exp().matrix();
        seen /= seen.sum();
        p.row(i).tail(len - 1 - i).setZero();
      }
      context.middleRows(first, len) = p * v.middleRows(first, len);
    }
    Act y(x.dimensions());
    tokens(y) = context * wo;
    return y;
  }
};

// Two-layer feed-forward network with a GELU (tanh form) between.
struct Ffn {
  Mat w1, w2;  // (D, 4D), (4D, D)
  RowVec b1, b2;

  explicit Ffn(Rng& rng)
      : w1(rng.matrix(kDim, kHidden, 1.0f / std::sqrt(float{kDim}))),
        w2(rng.matrix(kHidden, kDim, 1.0f / std::sqrt(float{kHidden}))),
        b1(rng.matrix(1, kHidden, 0.02f)),
        b2(rng.matrix(1, kDim, 0.02f)) {}

  Act operator()(const Act& x) const {
    const auto gelu = [](float a) {
      const float c = 0.7978845608f;  // sqrt(2 / pi)
      return 0.5f * a * (1.0f + std::tanh(c * (a + 0.044715f * a * a * a)));
    };
    Mat hidden = (tokens(x) * w1).rowwise() + b1;
    hidden = hidden.unaryExpr(gelu);
    Act y(x.dimensions());
    tokens(y) = (hidden * w2).rowwise() + b2;
    return y;
  }
};

// Row (token) statistics in double.
struct Moments {
  double mean = 0.0, var = 0.0, ms = 0.0;  // ms: mean square, what RMSNorm divides by
};

Moments moments(const Act& a, Index row) {
  const Index n = a.dimension(2);
  const float* p = a.data() + row * n;
  Moments m;
  for (Index i = 0; i < n; ++i) {
    m.mean += p[i];
    m.ms += double{p[i]} * p[i];
  }
  m.mean /= static_cast<double>(n);
  m.ms /= static_cast<double>(n);
  for (Index i = 0; i < n; ++i) m.var += (p[i] - m.mean) * (p[i] - m.mean);
  m.var /= static_cast<double>(n);
  return m;
}

Index row_count(const Act& a) { return a.dimension(0) * a.dimension(1); }

// The tokens printed: the first and last of the first sequence, the last of the last.
constexpr std::array<Index, 3> kShown = {0, kTime - 1, (kBatch * kTime) - 1};

bool shown(Index row) { return std::find(kShown.begin(), kShown.end(), row) != kShown.end(); }

void print_header(const char* title) {
  std::printf("  %-14s %5s  %9s %9s %9s  ->  %9s %9s %9s  %9s\n", title, "token", "mean", "var",
              "mean sq", "mean", "var", "mean sq", "1/rstd");
}

void print_moments(const char* title, const Act& a) {
  std::printf("  %-14s %5s  %9s %9s %9s\n", title, "token", "mean", "var", "mean sq");
  for (const Index r : kShown) {
    const Moments m = moments(a, r);
    std::printf("  %-14s  b%ldt%ld  %9.4f %9.4f %9.4f\n", "", static_cast<long>(r / kTime),
                static_cast<long>(r % kTime), m.mean, m.var, m.ms);
  }
}

// Checks what a norm with gamma = 1 (and beta = 0) promises for every row, in float
// arithmetic on D elements: LayerNorm leaves mean 0 and variance var / (var + eps);
// RMSNorm leaves mean square ms / (ms + eps); the saved rstd is 1 / sqrt(var + eps) or
// 1 / sqrt(ms + eps). Each printed value rounds D floats of magnitude ~1, so a few
// sqrt(D) * FLT_EPSILON is the size of an honest error.
class Checker {
 public:
  // One norm: prints the shown rows of x and y beside the saved 1/rstd, checks all rows.
  void norm(const char* title, bool centered, double eps, const Act& x, const Act& y,
            const normkit::RowStats<float>& saved) {
    print_header(title);
    const double tol = 8.0 * std::sqrt(static_cast<double>(x.dimension(2))) * FLT_EPSILON;
    double worst = 0.0;
    for (Index r = 0; r < row_count(x); ++r) {
      const Moments in = moments(x, r), out = moments(y, r);
      const double spread = centered ? in.var : in.ms;  // what the norm divides by
      const double saved_std = 1.0 / double{saved.rstd(r)};
      double err = std::fabs(saved_std / std::sqrt(spread + eps) - 1.0);
      if (centered)
        err = std::max(
            {err, std::fabs(out.mean), std::fabs(out.var / (spread / (spread + eps)) - 1.0)});
      else
        err = std::max(err, std::fabs(out.ms / (spread / (spread + eps)) - 1.0));
      worst = std::max(worst, err);
      if (shown(r))
        std::printf("  %-14s  b%ldt%ld  %9.4f %9.4f %9.4f  ->  %9.2e %9.6f %9.6f  %9.4f\n", "",
                    static_cast<long>(r / kTime), static_cast<long>(r % kTime), in.mean, in.var,
                    in.ms, out.mean, out.var, out.ms, saved_std);
    }
    const bool ok = worst <= tol;
    std::printf("  %-14s all %ld rows: worst deviation %.1e (tolerance %.1e): %s\n", "",
                static_cast<long>(row_count(x)), worst, tol, ok ? "ok" : "FAILED");
    failures_ += ok ? 0 : 1;
  }

  int failures() const { return failures_; }

 private:
  int failures_ = 0;
};

// The block's norms, with gamma and beta at PyTorch's initialization (ones, zeros), so
// the printed rows show what normalization itself does.
struct Norms {
  normkit::LayerNorm<float> ln{1, 1e-5};  // over the last dim, gamma and beta
  normkit::RMSNorm<float> rms{1, 1e-6};   // over the last dim, gamma only
  Param ln_gamma{kDim}, ln_beta{kDim}, rms_gamma{kDim};

  Norms() {
    ln_gamma.setConstant(1.0f);
    ln_beta.setZero();
    rms_gamma.setConstant(1.0f);
  }

  Act layer_norm(const Act& x, Checker& check) const {
    Act y(x.dimensions());
    const normkit::RowStats<float> saved = ln.forward(x, normkit::affine(ln_gamma, ln_beta), y);
    check.norm("LayerNorm", true, ln.eps(), x, y, saved);
    return y;
  }

  Act rms_norm(const Act& x, Checker& check) const {
    Act y(x.dimensions());
    const normkit::RowStats<float> saved = rms.forward(x, normkit::affine(rms_gamma), y);
    check.norm("RMSNorm", false, rms.eps(), x, y, saved);
    return y;
  }
};

struct Block {
  Attention attn;
  Ffn ffn;
  Norms norms;

  explicit Block(Rng& rng) : attn(rng), ffn(rng) {}

  Act pre_norm(const Act& x, Checker& check) const {
    const Act h = x + attn(norms.layer_norm(x, check));
    return h + ffn(norms.rms_norm(h, check));
  }

  Act post_norm(const Act& x, Checker& check) const {
    const Act h = norms.layer_norm(x + attn(x), check);
    const Act h_ffn = h + ffn(h);
    return norms.rms_norm(h_ffn, check);
  }
};

}  // namespace

int main() {
  try {
    Rng rng(2024);
    // Token rows with a mean near 1.5 and a std near 2, far from what a norm outputs.
    Act x(kBatch, kTime, kDim);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = rng.normal(1.5f, 2.0f);
    const Block block(rng);
    Checker check;

    std::printf("normkit %d.%d.%d transformer block: B=%ld T=%ld D=%ld, FFN %ld -> %ld -> %ld\n",
                NORMKIT_VERSION_MAJOR, NORMKIT_VERSION_MINOR, NORMKIT_VERSION_PATCH,
                static_cast<long>(kBatch), static_cast<long>(kTime), static_cast<long>(kDim),
                static_cast<long>(kDim), static_cast<long>(kHidden), static_cast<long>(kDim));
    std::printf("row statistics per token (b: sequence, t: position); gamma = 1, beta = 0\n\n");

    std::printf("pre-norm:  h = x + attn(LayerNorm(x));  out = h + ffn(RMSNorm(h))\n");
    const Act pre = block.pre_norm(x, check);
    print_moments("out", pre);

    std::printf("\npost-norm: h = LayerNorm(x + attn(x));  out = RMSNorm(h + ffn(h))\n");
    const Act post = block.post_norm(x, check);
    print_moments("out", post);

    std::printf(
        "\npre-norm keeps the residual stream unnormalized (its scale grows block by "
        "block);\npost-norm hands the next block rows of mean square ~1.\n");
    if (check.failures() != 0) {
      std::printf("%d norm(s) FAILED their check\n", check.failures());
      return EXIT_FAILURE;
    }
    std::printf("all 4 norms ok\n");
    return EXIT_SUCCESS;
  } catch (const normkit::invalid_argument& e) {
    std::fprintf(stderr, "normkit rejected an argument: %s\n", e.what());
    return EXIT_FAILURE;
  }
}
