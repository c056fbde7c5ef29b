// A DiT block (Peebles & Xie 2023) with adaLN-Zero conditioning, forward, in float:
//
//   (shift1, scale1, gate1, shift2, scale2, gate2) = SiLU(c) W_ada + b_ada    per sample
//   x1  = x  + gate1 * attn(LN(x)  * (1 + scale1) + shift1)
//   out = x1 + gate2 * mlp(LN(x1) * (1 + scale2) + shift2)
//
// on B = 2 samples of T = 16 tokens (patches), model width D = 32, MLP 32 -> 128 -> 32,
// a conditioning vector c of 16 per sample (in DiT: the timestep and class embedding).
// Every LN(.) * (1 + scale) + shift is one call of normkit's modulated LayerNorm,
// normkit::AdaptiveLayerNorm<float>::modulated() (no learned affine, eps 1e-6, as DiT),
// with scale and shift (B, D) tensors broadcast over the tokens of their sample.
//
// Checks (the program exits non-zero if one fails):
//   - adaLN-Zero: with W_ada and b_ada zero (DiT's initialization) every gate is 0 and
//     the block is exactly the identity: max |out - x| = 0;
//   - after a random W_ada the gates open and the output moves (max |out - x| > 0.01);
//   - the modulated norm against the explicit formula xhat * (1 + scale) + shift,
//     evaluated in double from the same float inputs, on sample 1: per element,
//       |y - ref| <= 8 eps_f |xhat (1 + scale)| + 2 eps_f |shift| + 4 D eps_d |xhat| |1 + scale|
//                    + (xm + |xhat| xr) |1 + scale|
//     (README "Tests": the forward bound with gamma = 1 + scale: the float roundings of
//     the element-wise pass, including 1 + scale, plus the double accumulation; xm and xr
//     are the error of the statistics' float trees in xhat units, README "Numerics":
//     with u = eps_f / 2, x0 the lower median of the row's first 5 values, dm and d2 the
//     mean |x - x0| and (x - x0)^2, xm = 5 u dm rstd and
//     xr = (7 u d2 + 10 u |mean - x0| dm) rstd^2 / 2);
//   - the modulated norm's backward (in double) against central finite differences of
//     L = sum(y * G) for a few elements of x, scale and shift: |fd(h) - grad| <=
//     2 (|fd(2h) - fd(h)| / 3 + D u sum|y G| / h), the Richardson estimate of the
//     truncation error plus the rounding of the two losses over 2h, doubled.
//
// Activations are Eigen::Tensor<float, 3, RowMajor> of extents (B, T, D); a sample's
// tokens are a row-major (T, D) Eigen matrix over the same memory. scale and shift are
// Eigen::Tensor<float, 2, RowMajor> (B, D): memory dims [D, B], what modulated() wants.

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
using Act = Eigen::Tensor<float, 3, Eigen::RowMajor>;   // (batch, tokens, model dim)
using Cond = Eigen::Tensor<float, 2, Eigen::RowMajor>;  // (batch, model dim)
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVec = Eigen::RowVectorXf;

constexpr Index kB = 2, kT = 16, kD = 32, kHidden = 4 * kD, kCond = 16;

// Sample b's (T, D) block of an activation.
Eigen::Map<Mat> sample(Act& a, Index b) { return {a.data() + b * kT * kD, kT, kD}; }
Eigen::Map<const Mat> sample(const Act& a, Index b) { return {a.data() + b * kT * kD, kT, kD}; }

Mat random_matrix(std::mt19937& gen, Index rows, Index cols, float stddev) {
  std::normal_distribution<float> normal(0.0f, stddev);
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = normal(gen);
  return m;
}

// The six (B, D) modulation tensors of one block.
struct Modulation {
  std::array<Cond, 6> chunk;  // shift1, scale1, gate1, shift2, scale2, gate2
  const Cond& shift1() const { return chunk[0]; }
  const Cond& scale1() const { return chunk[1]; }
  const Cond& gate1() const { return chunk[2]; }
  const Cond& shift2() const { return chunk[3]; }
  const Cond& scale2() const { return chunk[4]; }
  const Cond& gate2() const { return chunk[5]; }
};

struct DitBlock {
  Mat w_ada;           // (C, 6D): the adaLN modulation projection; zero at initialization
  RowVec b_ada;        // (6D)
  Mat wq, wk, wv, wo;  // (D, D)
  Mat w1, w2;          // (D, 4D), (4D, D)
  RowVec b1, b2;
  normkit::AdaptiveLayerNorm<float> ada_ln = normkit::AdaptiveLayerNorm<float>::modulated();

  explicit DitBlock(std::mt19937& gen)
      : w_ada(Mat::Zero(kCond, 6 * kD)),
        b_ada(RowVec::Zero(6 * kD)),
        wq(random_matrix(gen, kD, kD, 1.0f / std::sqrt(float{kD}))),
        wk(random_matrix(gen, kD, kD, 1.0f / std::sqrt(float{kD}))),
        wv(random_matrix(gen, kD, kD, 1.0f / std::sqrt(float{kD}))),
        wo(random_matrix(gen, kD, kD, 1.0f / std::sqrt(float{kD}))),
        w1(random_matrix(gen, kD, kHidden, 1.0f / std::sqrt(float{kD}))),
        w2(random_matrix(gen, kHidden, kD, 1.0f / std::sqrt(float{kHidden}))),
        b1(random_matrix(gen, 1, kHidden, 0.02f)),
        b2(random_matrix(gen, 1, kD, 0.02f)) {}

  // adaLN: SiLU(c) W_ada + b_ada, split into six (B, D) chunks.
  Modulation modulation(const Mat& c) const {
    const Mat silu_c = c.unaryExpr([](float v) { return v / (1.0f + std::exp(-v)); });
    const Mat mod = (silu_c * w_ada).rowwise() + b_ada;
    Modulation m;
    for (Index j = 0; j < 6; ++j) {
      m.chunk[static_cast<std::size_t>(j)] = Cond(kB, kD);
      for (Index b = 0; b < kB; ++b)
        for (Index d = 0; d < kD; ++d)
          m.chunk[static_cast<std::size_t>(j)](b, d) = mod(b, j * kD + d);
    }
    return m;
  }

  // Single-head (non-causal) self-attention within each sample.
  Act attn(const Act& a) const {
    Act y(kB, kT, kD);
    const float scale = 1.0f / std::sqrt(float{kD});
    for (Index b = 0; b < kB; ++b) {
      const Mat q = sample(a, b) * wq, k = sample(a, b) * wk, v = sample(a, b) * wv;
      Mat p = q * k.transpose() * scale;
      for (Index i = 0; i < kT; ++i) {
        p.row(i) = (p.row(i).array() - p.row(i).maxCoeff()).exp().matrix();
        p.row(i) /= p.row(i).sum();
      }
      sample(y, b) = p * v * wo;
    }
    return y;
  }

  Act mlp(const Act& a) const {
    const auto gelu = [](float v) {
      const float k = 0.7978845608f;  // sqrt(2 / pi)
      return 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
    };
    Act y(kB, kT, kD);
    for (Index b = 0; b < kB; ++b) {
      const Mat hidden = ((sample(a, b) * w1).rowwise() + b1).unaryExpr(gelu);
      sample(y, b) = (hidden * w2).rowwise() + b2;
    }
    return y;
  }

  // x + gate[b] * f, the gate broadcast over the tokens of sample b.
  static Act gated_add(const Act& x, const Cond& gate, const Act& f) {
    Act y(kB, kT, kD);
    for (Index b = 0; b < kB; ++b)
      for (Index t = 0; t < kT; ++t)
        for (Index d = 0; d < kD; ++d) y(b, t, d) = x(b, t, d) + gate(b, d) * f(b, t, d);
    return y;
  }

  Act forward(const Act& x, const Mat& c) const {
    const Modulation m = modulation(c);
    Act a(kB, kT, kD);
    ada_ln.forward(x, normkit::affine(m.scale1(), m.shift1()), a);
    const Act x1 = gated_add(x, m.gate1(), attn(a));
    ada_ln.forward(x1, normkit::affine(m.scale2(), m.shift2()), a);
    return gated_add(x1, m.gate2(), mlp(a));
  }
};

float max_abs_diff(const Act& a, const Act& b) {
  float worst = 0.0f;
  for (Index i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::fabs(a.data()[i] - b.data()[i]));
  return worst;
}

// The modulated norm of sample b against xhat * (1 + scale) + shift in double.
// Returns the worst |error| / bound (<= 1 passes); writes the worst |error|.
double check_formula(const Act& x, const Cond& scale, const Cond& shift, const Act& y, Index b,
                     double eps, double* max_err) {
  const double eps_f = FLT_EPSILON, eps_d = DBL_EPSILON, n = static_cast<double>(kD);
  double worst_ratio = 0.0;
  *max_err = 0.0;
  for (Index t = 0; t < kT; ++t) {
    double mean = 0.0, var = 0.0;
    for (Index d = 0; d < kD; ++d) mean += double{x(b, t, d)};
    mean /= n;
    for (Index d = 0; d < kD; ++d) var += (double{x(b, t, d)} - mean) * (double{x(b, t, d)} - mean);
    var /= n;
    const double rstd = 1.0 / std::sqrt(var + eps);
    // The statistics' float trees: their shift x0 and its distances.
    double first[5];
    for (Index d = 0; d < 5; ++d) first[d] = double{x(b, t, d)};
    std::sort(first, first + 5);
    const double x0 = first[2], u = eps_f / 2;
    double dm = 0.0, d2 = 0.0;
    for (Index d = 0; d < kD; ++d) {
      const double e = double{x(b, t, d)} - x0;
      dm += std::fabs(e) / n;
      d2 += e * e / n;
    }
    const double xm = 5 * u * dm * rstd;
    const double xr = 0.5 * (7 * u * d2 + 10 * u * std::fabs(mean - x0) * dm) * rstd * rstd;
    for (Index d = 0; d < kD; ++d) {
      const double xhat = (double{x(b, t, d)} - mean) * rstd;
      const double g = 1.0 + double{scale(b, d)}, s = double{shift(b, d)};
      const double ref = xhat * g + s;
      const double bound = 8.0 * eps_f * std::fabs(xhat * g) + 2.0 * eps_f * std::fabs(s) +
                           4.0 * n * eps_d * std::fabs(xhat) * std::fabs(g) +
                           (xm + std::fabs(xhat) * xr) * std::fabs(g);
      const double err = std::fabs(double{y(b, t, d)} - ref);
      *max_err = std::max(*max_err, err);
      worst_ratio = std::max(worst_ratio, err / bound);
    }
  }
  return worst_ratio;
}

// Modulated norm backward (double) against central differences on a few elements.
bool check_backward(std::mt19937& gen, const Act& xf, const Cond& scalef, const Cond& shiftf) {
  using ActD = Eigen::Tensor<double, 3, Eigen::RowMajor>;
  using CondD = Eigen::Tensor<double, 2, Eigen::RowMajor>;
  const auto ln = normkit::AdaptiveLayerNorm<double>::modulated();
  ActD x = xf.cast<double>(), g(kB, kT, kD), y(kB, kT, kD), dx(kB, kT, kD);
  CondD scale = scalef.cast<double>(), shift = shiftf.cast<double>(), dscale(kB, kD),
        dshift(kB, kD);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (Index i = 0; i < g.size(); ++i) g.data()[i] = normal(gen);  // L = sum(y * G)

  const normkit::RowStats<double> saved = ln.forward(x, normkit::affine(scale, shift), y);
  ln.backward(g, x, normkit::affine(scale, shift), saved, dx, dscale, dshift);

  const auto loss = [&](double* abs_sum) {
    ActD yy(kB, kT, kD);
    ln.forward(x, normkit::affine(scale, shift), yy);
    const ActD prod = yy * g;
    const Eigen::Tensor<double, 0, Eigen::RowMajor> l = prod.sum(), a = prod.abs().sum();
    *abs_sum = a();
    return l();
  };
  const double step = std::ldexp(1.0, -17), u = DBL_EPSILON / 2.0;
  struct Probe {
    const char* name;
    double* theta;
    const double* grad;
  };
  // A few elements of each: a token of each sample, and a few features of each sample.
  const Probe probes[] = {
      {"dx(0,0,0)", &x(0, 0, 0), &dx(0, 0, 0)},        {"dx(0,5,17)", &x(0, 5, 17), &dx(0, 5, 17)},
      {"dx(1,15,31)", &x(1, 15, 31), &dx(1, 15, 31)},  {"dscale(0,3)", &scale(0, 3), &dscale(0, 3)},
      {"dscale(1,30)", &scale(1, 30), &dscale(1, 30)}, {"dshift(0,7)", &shift(0, 7), &dshift(0, 7)},
      {"dshift(1,0)", &shift(1, 0), &dshift(1, 0)},
  };
  double max_err = 0.0, max_grad = 0.0, max_bound = 0.0;
  bool ok = true;
  for (const Probe& p : probes) {
    const double saved_theta = *p.theta;
    double abs_sum = 0.0, scratch = 0.0;
    const auto at = [&](double delta) {
      *p.theta = saved_theta + delta;
      const double l = loss(&scratch);
      abs_sum = std::max(abs_sum, scratch);
      return l;
    };
    const double fd1 = (at(step) - at(-step)) / (2.0 * step);
    const double fd2 = (at(2.0 * step) - at(-2.0 * step)) / (4.0 * step);
    *p.theta = saved_theta;
    const double bound =
        2.0 * (std::fabs(fd2 - fd1) / 3.0 + static_cast<double>(kD) * u * abs_sum / step);
    const double err = std::fabs(fd1 - *p.grad);
    ok = ok && err <= bound;
    max_err = std::max(max_err, err);
    max_grad = std::max(max_grad, std::fabs(*p.grad));
    max_bound = std::max(max_bound, bound);
  }
  std::printf(
      "  modulated backward (double) vs central differences, %zu elements of dx, "
      "dscale, dshift:\n    max |grad| %.3f, max |fd - grad| %.2e (bound %.2e): %s\n",
      sizeof(probes) / sizeof(probes[0]), max_grad, max_err, max_bound, ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

int main() {
  try {
    std::mt19937 gen(7);
    DitBlock block(gen);
    Act x(kB, kT, kD);
    for (Index i = 0; i < x.size(); ++i)
      x.data()[i] = std::normal_distribution<float>(0.3f, 1.5f)(gen);
    const Mat c = random_matrix(gen, kB, kCond, 1.0f);
    int failures = 0;

    std::printf(
        "normkit %d.%d.%d DiT block with adaLN-Zero (float): B=%ld T=%ld D=%ld, MLP "
        "%ld -> %ld -> %ld, condition %ld\n",
        NORMKIT_VERSION_MAJOR, NORMKIT_VERSION_MINOR, NORMKIT_VERSION_PATCH, static_cast<long>(kB),
        static_cast<long>(kT), static_cast<long>(kD), static_cast<long>(kD),
        static_cast<long>(kHidden), static_cast<long>(kD), static_cast<long>(kCond));

    // 1. adaLN-Zero: the modulation projection starts at zero, so every gate is 0.
    const Act out0 = block.forward(x, c);
    const float identity_diff = max_abs_diff(out0, x);
    const bool identity_ok = identity_diff == 0.0f;
    std::printf(
        "  W_ada = 0 (adaLN-Zero init): gates 0, max |out - x| = %.1e (exact identity "
        "expected): %s\n",
        static_cast<double>(identity_diff), identity_ok ? "ok" : "FAILED");
    failures += identity_ok ? 0 : 1;

    // 2. As if after some training: a nonzero projection opens the gates.
    block.w_ada = random_matrix(gen, kCond, 6 * kD, 0.1f);
    block.b_ada = random_matrix(gen, 1, 6 * kD, 0.05f);
    const Modulation m = block.modulation(c);
    const Act out1 = block.forward(x, c);
    const float moved = max_abs_diff(out1, x);
    float gate_max = 0.0f;
    for (Index i = 0; i < m.gate1().size(); ++i)
      gate_max =
          std::max({gate_max, std::fabs(m.gate1().data()[i]), std::fabs(m.gate2().data()[i])});
    const bool moved_ok = moved > 0.01f;
    std::printf(
        "  W_ada random (std 0.1):      max |gate| = %.3f, max |out - x| = %.3f "
        "(> 0.01 expected): %s\n",
        static_cast<double>(gate_max), static_cast<double>(moved), moved_ok ? "ok" : "FAILED");
    failures += moved_ok ? 0 : 1;

    // 3. The modulated norm against its formula, sample 1 (scale1/shift1 of that sample).
    Act y(kB, kT, kD);
    block.ada_ln.forward(x, normkit::affine(m.scale1(), m.shift1()), y);
    double max_err = 0.0;
    const double ratio =
        check_formula(x, m.scale1(), m.shift1(), y, 1, block.ada_ln.eps(), &max_err);
    const bool formula_ok = ratio <= 1.0;
    std::printf(
        "  modulated LN vs xhat*(1+scale)+shift in double, sample 1 (%ld values): max "
        "|error| %.2e, worst error/bound %.3f: %s\n",
        static_cast<long>(kT * kD), max_err, ratio, formula_ok ? "ok" : "FAILED");
    failures += formula_ok ? 0 : 1;

    // 4. Its backward, in double, by finite differences.
    failures += check_backward(gen, x, m.scale1(), m.shift1()) ? 0 : 1;

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
