// clang-format off
// Benchmarks of normkit::RMSNorm<float> (gamma), forward and backward, against the copy
// roofline of the same bytes and the two-pass pattern (pattern_rms_norm, AVX-512 builds:
// the memory traffic of a row norm with no arithmetic, bench_common.hpp). After the runs
// a table gives each kernel's GB/s, the best roofline GB/s at the same shape and thread
// count, and their ratio; a second, normkit's speed over the pattern. See
// bench_common.hpp for the byte counts.
//
// Build (Release; the bench targets add -O3 -march=native):
//   cd /work/main
//   cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DNORMKIT_BUILD_TESTS=OFF -DNORMKIT_BUILD_EXAMPLES=OFF
//   cmake --build build/bench -j2
// Run:
//   build/bench/bench/bench_rms_norm --quick       # min_time 0.1 s, 3 repetitions (~30 s)
//   NORMKIT_BENCH_QUICK=1 build/bench/bench/bench_rms_norm          # the same
//   build/bench/bench/bench_rms_norm               # 5 repetitions, default min_time
//   build/bench/bench/bench_rms_norm --quick --benchmark_filter='/bwd/2048x8192/'
// Any --benchmark_* flag works and overrides the mode's defaults. The table uses the
// median of the repetitions.
// clang-format on
#define EIGEN_USE_THREADS

// bench_common.hpp first: it defines EIGEN_USE_THREADS and includes Eigen and
// <immintrin.h> under its g++ 12 warning workaround.
#include "bench_common.hpp"
// (separate block: keep clang-format from reordering)
#include <normkit/rms_norm.hpp>

namespace {

using namespace nkbench;

const normkit::RMSNorm<float> kRMSNorm(1, 1e-6, normkit::RmsWeight::Scale,
                                       normkit::EpsPlacement::Inside);

void forward(Workspace& w, int threads, normkit::RowStats<float>& saved) {
  const CMat x = cmat(w.x, w.shape);
  Mat y = mat(w.y, w.shape);
  const auto params = normkit::affine(cvec(w.gamma));
  with_device(threads, [&](const auto& device) { kRMSNorm.forward(x, params, y, saved, device); });
}

void backward(Workspace& w, int threads, const normkit::RowStats<float>& saved) {
  const CMat x = cmat(w.x, w.shape);
  const CMat dy = cmat(w.dy, w.shape);
  Mat dx = mat(w.dx, w.shape);
  Vec dgamma = vec(w.dgamma);
  const auto params = normkit::affine(cvec(w.gamma));
  with_device(threads, [&](const auto& device) {
    kRMSNorm.backward(dy, x, params, saved, dx, dgamma, device);
  });
}

// bf16 storage (x and y in bf16, gamma in float, statistics in float): the bytes counted
// are bf16's, against the copy roofline of the same bytes (Shape::elem = 2).
const normkit::RMSNorm<Eigen::bfloat16> kRMSNormBf16(1, 1e-6, normkit::RmsWeight::Scale,
                                                 normkit::EpsPlacement::Inside);

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
  kRMSNormBf16.forward(x, normkit::affine(cvec(w.gamma)), y, saved);
}

void register_all() {
  for (const Shape& s : shapes()) {
    for (int t : thread_counts()) {
      register_rooflines(s, t);
      register_pattern(s, t, "rms_norm");

      auto fwd_saved = std::make_shared<normkit::RowStats<float>>();
      add_bench({"rms_norm", Kind::Kernel, Dir::Fwd, s, t},
                [s, t, fwd_saved] { forward(workspace(s), t, *fwd_saved); });

      // Backward uses statistics from a forward pass over the same x, run in setup.
      auto bwd_saved = std::make_shared<normkit::RowStats<float>>();
      add_bench(
          {"rms_norm", Kind::Kernel, Dir::Bwd, s, t},
          [s, t, bwd_saved] { backward(workspace(s), t, *bwd_saved); },
          [s, t, bwd_saved] {
            forward(workspace(s), t, *bwd_saved);
            return std::string();
          });
    }
  }
  // bf16 storage, forward, one thread.
  for (const Shape& s : bf16_shapes()) {
    register_rooflines(s, 1);
    auto saved = std::make_shared<normkit::RowStats<float>>();
    add_bench({"rms_norm_bf16", Kind::Kernel, Dir::Fwd, s, 1}, [s, saved] { forward_bf16(s, *saved); });
  }
}

}  // namespace

int main(int argc, char** argv) { return nkbench::run_main(argc, argv, register_all); }
