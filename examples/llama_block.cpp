// A LLaMA-style pre-norm decoder block, forward and a hand-written backward, in double:
//
//   a   = RMSNorm_1(x)
//   h   = x + attn(a)                   single-head causal self-attention
//   b   = RMSNorm_2(h)                  h and b from one fused call:
//                                       rms2.forward_residual(attn_out, x, g2, h, b, saved)
//   out = h + W2 (SiLU(b W1) * (b W3))  the SwiGLU feed-forward network
//
// on one sequence of T = 8 tokens, model width D = 32, FFN hidden width 64. The loss is
// L = sum(out * G) for a fixed random G, so dL/dout = G. Backward goes through every
// matrix product by hand and through the norms with normkit: rms2.backward_residual
// gives the gradients reaching attn_out and x through the fused add, rms1.backward the
// one reaching x through the first norm.
//
// In a stack of blocks, out = h + ffn would fuse the same way with the next block's
// RMSNorm_1.
//
// Checks (the program exits non-zero if one fails):
//   - forward_residual's s is exactly x + attn_out;
//   - Gemma's weight convention: RMSNorm with RmsWeight::OnePlusScale and w = gamma - 1
//     gives RMSNorm_1's output to 2 ulps (w = gamma - 1 and 1 + w are exact here,
//     gamma being within [0.5, 2]);
//   - causality: changing the last token leaves the outputs of the other tokens
//     bitwise unchanged;
//   - central finite differences of the whole block's L against the analytic gradient,
//     w.r.t. every element of x, of W_q (whose gradient crosses the softmax and the
//     first norm) and of RMSNorm_2's gamma. Per element, with step h,
//       |fd(h) - grad| <= 2 (|fd(2h) - fd(h)| / 3 + n u sum|out G| / h)
//     must hold on the whole set at once (the worst element against the largest bound):
//     the first term is the Richardson estimate of the truncation error c h^2 (fd(2h)
//     carries 4 c h^2), the second the rounding of the two losses (each a sum whose
//     longest chain has n = T + D + 64 terms, u = DBL_EPSILON / 2, divided by 2h),
//     doubled for safety. The max relative error (max |fd - grad| / max |grad|) and
//     that bound are printed.
//
// Activations are Eigen::Tensor<double, 2, RowMajor> of extents (T, D), PyTorch's
// (tokens, features): normkit normalizes the innermost dim D. The matrix products see
// the same memory as a row-major (T, D) Eigen matrix, one token per row.

#include <Eigen/Dense>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <normkit/normkit.hpp>
#include <random>
#include <unsupported/Eigen/CXX11/Tensor>

namespace {

using Eigen::Index;
using Act = Eigen::Tensor<double, 2, Eigen::RowMajor>;  // (tokens, model dim)
using Vec = Eigen::Tensor<double, 1>;                   // RMSNorm gamma: one per model dim
using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index kT = 8, kD = 32, kHidden = 64;

Eigen::Map<Mat> mat(Act& a) { return {a.data(), a.dimension(0), a.dimension(1)}; }
Eigen::Map<const Mat> mat(const Act& a) { return {a.data(), a.dimension(0), a.dimension(1)}; }

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }
double silu(double v) { return v * sigmoid(v); }
double silu_grad(double v) {
  const double s = sigmoid(v);
  return s * (1.0 + v * (1.0 - s));
}

struct Weights {
  Mat wq, wk, wv, wo;  // (D, D), applied as a * W
  Mat w1, w3;          // (D, H): the SwiGLU gate (W1) and up (W3) projections
  Mat w2;              // (H, D): down projection
  Vec g1{kD}, g2{kD};  // RMSNorm weights (LLaMA: gamma, initialized to 1; here 1 + noise)
};

// Everything forward keeps for backward.
struct Cache {
  Act a{kT, kD};     // RMSNorm_1(x)
  Mat q, k, v, p;    // queries, keys, values, attention probabilities (T, T)
  Mat ctx;           // p v
  Act attn{kT, kD};  // ctx Wo
  Act h{kT, kD};     // x + attn: the residual stream after attention
  Act b{kT, kD};     // RMSNorm_2(h)
  Mat u, up, m;      // b W1, b W3, SiLU(u) * up
  normkit::RowStats<double> saved1, saved2;
};

struct Grads {
  Act dx{kT, kD};
  Mat dwq, dwk, dwv, dwo, dw1, dw2, dw3;
  Vec dg1{kD}, dg2{kD};
};

class Block {
 public:
  // LLaMA's RMSNorm: eps inside the sqrt, weight gamma. (Gemma would construct with
  // normkit::RmsWeight::OnePlusScale and store gamma - 1.)
  normkit::RMSNorm<double> rms1{1, 1e-6}, rms2{1, 1e-6};

  Act forward(const Weights& w, const Act& x, Cache& c) const {
    rms1.forward(x, normkit::affine(w.g1), c.a, c.saved1);
    c.q = mat(c.a) * w.wq;
    c.k = mat(c.a) * w.wk;
    c.v = mat(c.a) * w.wv;
    c.p = c.q * c.k.transpose() * kScale;
    for (Index i = 0; i < kT; ++i) {  // causal softmax: token i attends to tokens 0..i
      auto seen = c.p.row(i).head(i + 1);
      seen = (seen.array() - seen.maxCoeff()).exp().matrix();
      seen /= seen.sum();
      c.p.row(i).tail(kT - 1 - i).setZero();
    }
    c.ctx = c.p * c.v;
    mat(c.attn) = c.ctx * w.wo;
    // h = 1 * attn + x (the residual add) and b = RMSNorm_2(h), in one pass.
    rms2.forward_residual(c.attn, x, normkit::affine(w.g2), c.h, c.b, c.saved2);
    c.u = mat(c.b) * w.w1;
    c.up = mat(c.b) * w.w3;
    c.m = c.u.unaryExpr(&silu).cwiseProduct(c.up);
    Act out(kT, kD);
    mat(out) = mat(c.h) + c.m * w.w2;
    return out;
  }

  // Gradients of L = sum(out * dout) w.r.t. x and every weight.
  Grads backward(const Weights& w, const Act& x, const Cache& c, const Act& dout) const {
    Grads g;
    // out = h + m W2.
    g.dw2 = c.m.transpose() * mat(dout);
    const Mat dm = mat(dout) * w.w2.transpose();
    // m = SiLU(u) * up, u = b W1, up = b W3.
    const Mat du = dm.cwiseProduct(c.up).cwiseProduct(c.u.unaryExpr(&silu_grad));
    const Mat dup = dm.cwiseProduct(c.u.unaryExpr(&silu));
    g.dw1 = mat(c.b).transpose() * du;
    g.dw3 = mat(c.b).transpose() * dup;
    Act db(kT, kD);
    mat(db) = du * w.w1.transpose() + dup * w.w3.transpose();
    // h = attn + x, b = RMSNorm_2(h): h reaches out directly (ds = dout) and through b.
    Act dattn(kT, kD), dx_residual(kT, kD);
    rms2.backward_residual(dout, db, c.h, normkit::affine(w.g2), c.saved2, dattn, dx_residual,
                           g.dg2);
    // attn = ctx Wo, ctx = p v.
    g.dwo = c.ctx.transpose() * mat(dattn);
    const Mat dctx = mat(dattn) * w.wo.transpose();
    const Mat dp = dctx * c.v.transpose();
    const Mat dv = c.p.transpose() * dctx;
    // Softmax rows: ds = p * (dp - sum_j p dp); masked entries have p = 0, so ds = 0.
    Mat ds = c.p.cwiseProduct(dp);
    const Eigen::VectorXd row_dot = ds.rowwise().sum();
    ds = (c.p.array() * (dp.colwise() - row_dot).array()).matrix() * kScale;
    const Mat dq = ds * c.k;
    const Mat dk = ds.transpose() * c.q;
    g.dwq = mat(c.a).transpose() * dq;
    g.dwk = mat(c.a).transpose() * dk;
    g.dwv = mat(c.a).transpose() * dv;
    Act da(kT, kD);
    mat(da) = dq * w.wq.transpose() + dk * w.wk.transpose() + dv * w.wv.transpose();
    // a = RMSNorm_1(x).
    Act dx_norm(kT, kD);
    rms1.backward(da, x, normkit::affine(w.g1), c.saved1, dx_norm, g.dg1);
    g.dx = dx_residual + dx_norm;
    return g;
  }

 private:
  const double kScale = 1.0 / std::sqrt(static_cast<double>(kD));  // attention's 1/sqrt(d)
};

Mat random_matrix(std::mt19937& gen, Index rows, Index cols, double stddev) {
  std::normal_distribution<double> normal(0.0, stddev);
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = normal(gen);
  return m;
}

// One finite-difference check: central differences of L(theta) at steps h and 2h for
// every element of a parameter block, against the analytic gradient.
struct FdResult {
  double max_err = 0.0, max_grad = 0.0, max_bound = 0.0;
  bool ok() const { return max_err <= max_bound; }
};

FdResult fd_check(double* theta, Index count, const double* grad,
                  const std::function<double(double*)>& loss, double step) {
  // loss(abs_sum) returns L and writes sum |out * G| (the rounding scale) into abs_sum.
  constexpr double kChain = static_cast<double>(kT + kD + kHidden);
  const double u = DBL_EPSILON / 2.0;
  FdResult r;
  for (Index i = 0; i < count; ++i) {
    const double saved = theta[i];
    double abs_sum = 0.0, scratch = 0.0;
    const auto at = [&](double delta) {
      theta[i] = saved + delta;
      const double l = loss(&scratch);
      abs_sum = std::max(abs_sum, scratch);
      return l;
    };
    const double fd1 = (at(step) - at(-step)) / (2.0 * step);
    const double fd2 = (at(2.0 * step) - at(-2.0 * step)) / (4.0 * step);
    theta[i] = saved;
    const double bound = 2.0 * (std::fabs(fd2 - fd1) / 3.0 + kChain * u * abs_sum / step);
    r.max_err = std::max(r.max_err, std::fabs(fd1 - grad[i]));
    r.max_grad = std::max(r.max_grad, std::fabs(grad[i]));
    r.max_bound = std::max(r.max_bound, bound);
  }
  return r;
}

}  // namespace

int main() {
  try {
    std::mt19937 gen(31);
    Weights w;
    const double sd = 1.0 / std::sqrt(double{kD});
    w.wq = random_matrix(gen, kD, kD, sd);
    w.wk = random_matrix(gen, kD, kD, sd);
    w.wv = random_matrix(gen, kD, kD, sd);
    w.wo = random_matrix(gen, kD, kD, sd);
    w.w1 = random_matrix(gen, kD, kHidden, sd);
    w.w3 = random_matrix(gen, kD, kHidden, sd);
    w.w2 = random_matrix(gen, kHidden, kD, 1.0 / std::sqrt(double{kHidden}));
    const Mat g_noise = random_matrix(gen, 2, kD, 0.1);
    for (Index i = 0; i < kD; ++i) {
      w.g1(i) = 1.0 + g_noise(0, i);
      w.g2(i) = 1.0 + g_noise(1, i);
    }
    Act x(kT, kD), dout(kT, kD);
    mat(x) = random_matrix(gen, kT, kD, 1.0);
    mat(dout) = random_matrix(gen, kT, kD, 1.0);  // G: L = sum(out * G)

    const Block block;
    Cache cache;
    const Act out = block.forward(w, x, cache);
    const Grads grads = block.backward(w, x, cache, dout);
    const double loss = (mat(out).array() * mat(dout).array()).sum();

    std::printf("normkit %d.%d.%d LLaMA-style decoder block (double): T=%ld D=%ld hidden=%ld\n",
                NORMKIT_VERSION_MAJOR, NORMKIT_VERSION_MINOR, NORMKIT_VERSION_PATCH,
                static_cast<long>(kT), static_cast<long>(kD), static_cast<long>(kHidden));
    std::printf(
        "  h = x + attn(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)); L = sum(out * G) = %.6f\n",
        loss);
    int failures = 0;

    // The fused add: s must be exactly x + attn (alpha = 1).
    const Act sum = x + cache.attn;
    double fused_diff = 0.0;
    for (Index i = 0; i < sum.size(); ++i)
      fused_diff = std::max(fused_diff, std::fabs(sum.data()[i] - cache.h.data()[i]));
    std::printf("  forward_residual: max |s - (x + attn)| = %.1e (exact expected): %s\n",
                fused_diff, fused_diff == 0.0 ? "ok" : "FAILED");
    failures += fused_diff == 0.0 ? 0 : 1;

    // Gemma's zero-centred weight: (1 + w) with w = gamma - 1 is the same norm.
    {
      const normkit::RMSNorm<double> gemma(1, 1e-6, normkit::RmsWeight::OnePlusScale);
      const Vec w_centred = w.g1 - w.g1.constant(1.0);
      Act a2(kT, kD);
      gemma.forward(x, normkit::affine(w_centred), a2);
      double worst = 0.0;  // in units of 2 ulps of the value
      for (Index i = 0; i < a2.size(); ++i)
        worst = std::max(worst, std::fabs(a2.data()[i] - cache.a.data()[i]) /
                                    (2.0 * DBL_EPSILON * std::fabs(cache.a.data()[i])));
      const bool ok = worst <= 1.0;
      std::printf(
          "  RmsWeight::OnePlusScale with w = gamma - 1: max difference %.2f x 2 ulps: %s\n", worst,
          ok ? "ok" : "FAILED");
      failures += ok ? 0 : 1;
    }

    // Causality: perturbing the last token must not move any earlier output.
    {
      Act x2 = x;
      for (Index j = 0; j < kD; ++j) x2(kT - 1, j) += 0.5;
      Cache c2;
      const Act out2 = block.forward(w, x2, c2);
      double earlier = 0.0, last = 0.0;
      for (Index i = 0; i < kT; ++i)
        for (Index j = 0; j < kD; ++j) {
          double& worst = i + 1 < kT ? earlier : last;
          worst = std::max(worst, std::fabs(out2(i, j) - out(i, j)));
        }
      const bool ok = earlier == 0.0 && last > 0.0;
      std::printf(
          "  causal mask: last token moved, max change of tokens 0..%ld: %.1e, of "
          "token %ld: %.3f: %s\n",
          static_cast<long>(kT - 2), earlier, static_cast<long>(kT - 1), last,
          ok ? "ok" : "FAILED");
      failures += ok ? 0 : 1;
    }

    // Finite differences of the whole block.
    Weights wp = w;
    Act xp = x;
    const auto loss_of = [&](double* abs_sum) {
      Cache c;
      const Act o = block.forward(wp, xp, c);
      *abs_sum = (mat(o).array() * mat(dout).array()).abs().sum();
      return (mat(o).array() * mat(dout).array()).sum();
    };
    const double step = std::ldexp(1.0, -17);  // ~ cbrt(u) * O(1) values: 7.6e-6
    std::printf("  central differences (step %.2g) against the hand-written backward:\n", step);
    struct Target {
      const char* name;
      double* theta;
      Index count;
      const double* grad;
    };
    const Target targets[] = {
        {"dL/dx   ", xp.data(), xp.size(), grads.dx.data()},
        {"dL/dW_q ", wp.wq.data(), wp.wq.size(), grads.dwq.data()},
        {"dL/dg_2 ", wp.g2.data(), wp.g2.size(), grads.dg2.data()},
    };
    for (const Target& t : targets) {
      const FdResult r = fd_check(t.theta, t.count, t.grad, loss_of, step);
      const double rel = r.max_err / r.max_grad, rel_bound = r.max_bound / r.max_grad;
      std::printf(
          "    %s %4ld elements: max |grad| %.3f, max relative error %.2e (bound %.2e): %s\n",
          t.name, static_cast<long>(t.count), r.max_grad, rel, rel_bound, r.ok() ? "ok" : "FAILED");
      failures += r.ok() ? 0 : 1;
    }

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
