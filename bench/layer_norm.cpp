// clang-format off
// Benchmarks of normkit::LayerNorm<float> (gamma and beta), forward and backward, against
// the copy roofline of the same bytes, a naive Eigen-expression LayerNorm (forward) and
// the two-pass pattern (pattern_layer_norm, AVX-512 builds: the memory traffic of a row
// norm with no arithmetic, bench_common.hpp; the baselines table gives normkit's speed
// over it).
// After the runs a table gives each kernel's GB/s, the best roofline GB/s at the same
// shape and thread count, and their ratio. See bench_common.hpp for the byte counts.
//
// Built with oneDNN (bench/CMakeLists.txt, NORMKIT_BENCH_ONEDNN), it also times oneDNN's
// LayerNorm (onednn_layer_norm: training forward, backward with dgamma and dbeta) on the
// same shapes, buffers and thread counts, checks before timing that its outputs agree
// with normkit's (bench/onednn_check.hpp: tolerances, single-threading), and prints
// normkit's speed ratio over it (targets, single thread: >= 2x forward, >= 1.5x backward).
//
// Build (Release; the bench targets add -O3 -march=native):
//   cd /work/main
//   cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DNORMKIT_BUILD_TESTS=OFF -DNORMKIT_BUILD_EXAMPLES=OFF
//   cmake --build build/bench -j2
// Run:
//   build/bench/bench/bench_layer_norm --quick     # min_time 0.1 s, 3 repetitions (~30 s)
//   NORMKIT_BENCH_QUICK=1 build/bench/bench/bench_layer_norm        # the same
//   build/bench/bench/bench_layer_norm             # 5 repetitions, default min_time
//   build/bench/bench/bench_layer_norm --quick --benchmark_filter='/fwd/4096x4096/'
// Any --benchmark_* flag works and overrides the mode's defaults. The table uses the
// median of the repetitions. --benchmark_out=FILE.json writes every run, labelled for
// scripts/bench_report.py. Exit status 1 if a oneDNN check failed.
// clang-format on
#define EIGEN_USE_THREADS

// bench_common.hpp first: it defines EIGEN_USE_THREADS and includes Eigen and
// <immintrin.h> under its g++ 12 warning workaround.
#include "bench_common.hpp"
// (separate block: keep clang-format from reordering)
#include <normkit/layer_norm.hpp>

#ifdef NKBENCH_WITH_ONEDNN
#include "onednn_check.hpp"
#endif

namespace {

using namespace nkbench;

const normkit::LayerNorm<float> kLayerNorm(1, 1e-5, normkit::AffineMode::ScaleShift);

void forward(Workspace& w, int threads, normkit::RowStats<float>& saved) {
  const CMat x = cmat(w.x, w.shape);
  Mat y = mat(w.y, w.shape);
  const auto params = normkit::affine(cvec(w.gamma), cvec(w.beta));
  with_device(threads,
              [&](const auto& device) { kLayerNorm.forward(x, params, y, saved, device); });
}

void backward(Workspace& w, int threads, const normkit::RowStats<float>& saved) {
  const CMat x = cmat(w.x, w.shape);
  const CMat dy = cmat(w.dy, w.shape);
  Mat dx = mat(w.dx, w.shape);
  Vec dgamma = vec(w.dgamma);
  Vec dbeta = vec(w.dbeta);
  const auto params = normkit::affine(cvec(w.gamma), cvec(w.beta));
  with_device(threads, [&](const auto& device) {
    kLayerNorm.backward(dy, x, params, saved, dx, dgamma, dbeta, device);
  });
}

// bf16 storage (x and y in bf16, gamma and beta in float, statistics in float): the bytes counted
// are bf16's, against the copy roofline of the same bytes (Shape::elem = 2).
const normkit::LayerNorm<Eigen::bfloat16> kLayerNormBf16(1, 1e-5, normkit::AffineMode::ScaleShift);

using BMat = Eigen::TensorMap<Eigen::Tensor<Eigen::bfloat16, 2, Eigen::RowMajor>, Eigen::Aligned64>;
using CBMat =
    Eigen::TensorMap<const Eigen::Tensor<Eigen::bfloat16, 2, Eigen::RowMajor>, Eigen::Aligned64>;

const std::vector<Shape>& bf16_shapes() {
  static const std::vector<Shape> s{{4096, 4096, "4096x4096bf16", 2}, {16384, 768, "16384x768bf16", 2}};
  return s;
}

void forward_bf16(const Shape& s, normkit::RowStats<float>& saved) {
  Workspace& w = workspace(s);
  const CBMat x(narrow_copy<Eigen::bfloat16>(s, w.x, 0), s.rows, s.features);
  BMat y(narrow_copy<Eigen::bfloat16>(s, w.y, 1), s.rows, s.features);
  kLayerNormBf16.forward(x, normkit::affine(cvec(w.gamma), cvec(w.beta)), y, saved);
}

// LayerNorm as a user would write it with Eigen tensor expressions: a mean reduction,
// a variance reduction over the broadcast difference, then one element-wise expression.
// The two [rows] temporaries are kept across calls (no allocation in the loop).
struct Naive {
  Eigen::Tensor<float, 1, Eigen::RowMajor> mean, rstd;

  template <class Device>
  void run(Workspace& w, const Device& device) {
    const Index rows = w.shape.rows, features = w.shape.features;
    const CMat x = cmat(w.x, w.shape);
    Mat y = mat(w.y, w.shape);
    const CVec gamma = cvec(w.gamma), beta = cvec(w.beta);
    if (mean.size() != rows) mean.resize(rows);
    if (rstd.size() != rows) rstd.resize(rows);
    const Eigen::array<Index, 1> along_features{1};
    const Eigen::array<Index, 2> as_column{rows, 1}, across_features{1, features};
    const Eigen::array<Index, 2> as_row{1, features}, across_rows{rows, 1};
    mean.device(device) = x.mean(along_features);
    auto centred = x - mean.reshape(as_column).broadcast(across_features);
    rstd.device(device) = (centred.square().mean(along_features) + 1e-5f).rsqrt();
    y.device(device) = centred * rstd.reshape(as_column).broadcast(across_features) *
                           gamma.reshape(as_row).broadcast(across_rows) +
                       beta.reshape(as_row).broadcast(across_rows);
  }
};

// The naive baseline must agree with normkit (checked on the first and last rows).
// Returns an error message, empty if they agree.
std::string naive_mismatch(Workspace& w, Naive& naive) {
  normkit::RowStats<float> saved;
  forward(w, 1, saved);
  const Index f = w.shape.features, last = (w.shape.rows - 1) * f;
  std::vector<float> ref(w.y.data(), w.y.data() + f);
  ref.insert(ref.end(), w.y.data() + last, w.y.data() + last + f);
  naive.run(w, Eigen::DefaultDevice{});
  double err = 0.0;
  for (Index i = 0; i < f; ++i) {
    const auto k = static_cast<std::size_t>(i);
    err = std::max(err, std::fabs(static_cast<double>(ref[k] - w.y.data()[i])));
    err = std::max(err,
                   std::fabs(static_cast<double>(ref[k + ref.size() / 2] - w.y.data()[last + i])));
  }
  if (err <= 1e-4) return {};
  return "naive Eigen LayerNorm differs from normkit by " + std::to_string(err);
}

#ifdef NKBENCH_WITH_ONEDNN
// oneDNN's LayerNorm at shape s and t threads: the same eps (1e-5), gamma and beta.
void add_onednn(const Shape& s, int t, Dir dir) {
  add_onednn_bench(
      {"onednn_layer_norm", Kind::Baseline, dir, s, t, "layer_norm"},
      NormLayout::rows_features(s.rows, s.features), 1e-5,
      [s](const onednn::Buffers& b, int threads) {
        return onednn::Norm::layer(s.rows, s.features, 1e-5f, threads, b);
      },
      [s](Dir d, std::vector<double>& mean, std::vector<double>& rstd) {
        Workspace& w = workspace(s);
        normkit::RowStats<float> saved;
        forward(w, 1, saved);
        if (d == Dir::Bwd) backward(w, 1, saved);
        onednn_check::saved_in_double(saved, s.rows, mean, rstd);
      });
}
#endif

void register_all() {
#ifdef NKBENCH_WITH_ONEDNN
  benchmark::AddCustomContext("normkit_onednn", onednn::describe());
#endif
  for (const Shape& s : shapes()) {
    for (int t : thread_counts()) {
      register_rooflines(s, t);
      register_pattern(s, t, "layer_norm");

      auto fwd_saved = std::make_shared<normkit::RowStats<float>>();
      add_bench({"layer_norm", Kind::Kernel, Dir::Fwd, s, t},
                [s, t, fwd_saved] { forward(workspace(s), t, *fwd_saved); });

      // Backward uses statistics from a forward pass over the same x, run in setup.
      auto bwd_saved = std::make_shared<normkit::RowStats<float>>();
      add_bench(
          {"layer_norm", Kind::Kernel, Dir::Bwd, s, t},
          [s, t, bwd_saved] { backward(workspace(s), t, *bwd_saved); },
          [s, t, bwd_saved] {
            forward(workspace(s), t, *bwd_saved);
            return std::string();
          });

      auto naive = std::make_shared<Naive>();
      add_bench(
          {"eigen_naive_layer_norm", Kind::Baseline, Dir::Fwd, s, t},
          [s, t, naive] {
            with_device(t, [&](const auto& device) { naive->run(workspace(s), device); });
          },
          [s, naive] { return naive_mismatch(workspace(s), *naive); });

#ifdef NKBENCH_WITH_ONEDNN
      if (t <= onednn::max_threads()) {
        add_onednn(s, t, Dir::Fwd);
        add_onednn(s, t, Dir::Bwd);
      }
#endif
    }
  }
  // bf16 storage, forward, one thread.
  for (const Shape& s : bf16_shapes()) {
    register_rooflines(s, 1);
    auto saved = std::make_shared<normkit::RowStats<float>>();
    add_bench({"layer_norm_bf16", Kind::Kernel, Dir::Fwd, s, 1}, [s, saved] { forward_bf16(s, *saved); });
  }
}

}  // namespace

int main(int argc, char** argv) { return nkbench::run_main(argc, argv, register_all); }
