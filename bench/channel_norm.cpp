// clang-format off
// Benchmarks of the channel norms, float, training forward and backward, against the
// copy roofline of the same bytes (see bench_common.hpp for the byte counts):
//   batch_norm     normkit::BatchNorm<float>, gamma and beta, running statistics updated
//                  by every forward        [32,64,56,56]  [32,256,14,14]
//   group_norm     normkit::GroupNorm<float>(32), gamma and beta
//                                          [8,512,32,32]  [16,64,56,56]
//   instance_norm  normkit::InstanceNorm<float>, PyTorch's defaults (no affine, no
//                  running statistics)     [8,512,32,32]
// Shapes are (N, C, H, W). Each op runs in both memory formats: _cf is channels-first, a
// RowMajor (N, C, H, W) tensor (PyTorch's contiguous NCHW); _cl is channels-last, a
// RowMajor (N, H, W, C) tensor with ChannelFormat::Last (PyTorch's channels_last). Both
// read the same buffers and move the same bytes, so they share one roofline. Backward
// computes every gradient the op has (dx, dgamma, dbeta; dx only for InstanceNorm).
//
// Before timing, each benchmark checks the engine on one statistic group (BatchNorm:
// channel 0; GroupNorm: sample 0, group 0; InstanceNorm: sample 0, channel 0): after
// forward, (y - beta) / gamma has mean 0 and variance 1 there; after backward, dx sums
// to 0 there. A failed check skips the benchmark with the reason.
//
// After the runs, the roofline table (targets: single thread, channels-first) and a
// table of channels-last against channels-first (CL/CF) are printed.
//
// Built with oneDNN (bench/CMakeLists.txt, NORMKIT_BENCH_ONEDNN), it also times oneDNN's
// BatchNorm (onednn_batch_norm: training forward with batch statistics, backward with
// dgamma and dbeta; NCHW, f32, scale and shift) on BatchNorm's shapes and thread counts,
// against batch_norm_cf, with the checks of bench/onednn_check.hpp before timing, and
// prints normkit's speed ratio over it (targets, single thread: >= 2x forward, >= 1.5x
// backward). normkit's forward also updates running statistics (O(C)); oneDNN has none.
//
// Build (Release; the bench targets add -O3 -march=native):
//   cd /work/main
//   cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DNORMKIT_BUILD_TESTS=OFF -DNORMKIT_BUILD_BENCH=ON
//   cmake --build build/bench --target bench_channel_norm -j2
// Run:
//   build/bench/bench/bench_channel_norm --quick   # min_time 0.1 s, 3 repetitions
//   NORMKIT_BENCH_QUICK=1 build/bench/bench/bench_channel_norm      # the same
//   build/bench/bench/bench_channel_norm           # 5 repetitions, default min_time
//   build/bench/bench/bench_channel_norm --quick --benchmark_filter='group_norm_c./bwd/'
// Any --benchmark_* flag works and overrides the mode's defaults. The tables use the
// median of the repetitions. --benchmark_out=FILE.json writes every run, labelled for
// scripts/bench_report.py. Exit status 1 if a oneDNN check failed.
// clang-format on
#define EIGEN_USE_THREADS

// bench_common.hpp first: it defines EIGEN_USE_THREADS and includes Eigen and
// <immintrin.h> under its g++ 12 warning workaround.
#include "bench_common.hpp"
// (separate block: keep clang-format from reordering)
#include <normkit/batch_norm.hpp>
#include <normkit/group_norm.hpp>
#include <normkit/instance_norm.hpp>

#ifdef NKBENCH_WITH_ONEDNN
#include "onednn_check.hpp"
#endif

namespace {

using namespace nkbench;
using normkit::ChannelFormat;

constexpr int kGroups = 32;

enum class Op { Batch, Group, Instance };

// (N, C, H, W): the logical extents, whatever the memory format.
struct Nchw {
  Index n, c, h, w;
  Index spatial() const { return h * w; }
};

// The workspace's shape: every element of x, features = C (gamma and beta), labelled NxCxHxW.
Shape shape_of(const Nchw& d) {
  return {d.n * d.h * d.w, d.c,
          std::to_string(d.n) + "x" + std::to_string(d.c) + "x" + std::to_string(d.h) + "x" +
              std::to_string(d.w)};
}

struct Case {
  Op op;
  Nchw dims;
  ChannelFormat format;
};

std::string op_name(Op op, ChannelFormat f) {
  const char* base = op == Op::Batch   ? "batch_norm"
                     : op == Op::Group ? "group_norm"
                                       : "instance_norm";
  return std::string(base) + (f == ChannelFormat::First ? "_cf" : "_cl");
}

using Act = Eigen::TensorMap<Eigen::Tensor<float, 4, Eigen::RowMajor>, Eigen::Aligned64>;
using CAct = Eigen::TensorMap<const Eigen::Tensor<float, 4, Eigen::RowMajor>, Eigen::Aligned64>;

// RowMajor (N, C, H, W) for channels-first, (N, H, W, C) for channels-last.
Eigen::array<Index, 4> extents(const Case& cs) {
  const Nchw& d = cs.dims;
  if (cs.format == ChannelFormat::First) return {d.n, d.c, d.h, d.w};
  return {d.n, d.h, d.w, d.c};
}
Act act(Buffer& b, const Case& cs) { return Act(b.data(), extents(cs)); }
CAct cact(const Buffer& b, const Case& cs) { return CAct(b.data(), extents(cs)); }

// The ops, one per format (the format is a hyper-parameter of the functor).
template <class Norm>
const Norm& by_format(const Norm& first, const Norm& last, ChannelFormat f) {
  return f == ChannelFormat::First ? first : last;
}
const normkit::BatchNorm<float> kBatchFirst(ChannelFormat::First), kBatchLast(ChannelFormat::Last);
const normkit::GroupNorm<float> kGroupFirst(kGroups, ChannelFormat::First),
    kGroupLast(kGroups, ChannelFormat::Last);
const normkit::InstanceNorm<float> kInstFirst(ChannelFormat::First), kInstLast(ChannelFormat::Last);

// What one benchmark keeps between calls: the saved statistics and BatchNorm's running ones.
struct State {
  Case cs;
  normkit::RowStats<float> saved;
  Eigen::Tensor<float, 1> running_mean, running_var;

  explicit State(const Case& c) : cs(c), running_mean(c.dims.c), running_var(c.dims.c) {
    running_mean.setZero();
    running_var.setConstant(1.0f);
  }
  Workspace& ws() const { return workspace(shape_of(cs.dims)); }
};

void forward(State& st, int threads) {
  Workspace& w = st.ws();
  const CAct x = cact(w.x, st.cs);
  Act y = act(w.y, st.cs);
  const auto params = normkit::affine(cvec(w.gamma), cvec(w.beta));
  const ChannelFormat f = st.cs.format;
  with_device(threads, [&](const auto& device) {
    switch (st.cs.op) {
      case Op::Batch:
        by_format(kBatchFirst, kBatchLast, f)
            .forward(x, params, y, st.saved, normkit::running(st.running_mean, st.running_var),
                     device);
        break;
      case Op::Group:
        by_format(kGroupFirst, kGroupLast, f).forward(x, params, y, st.saved, device);
        break;
      case Op::Instance:
        by_format(kInstFirst, kInstLast, f).forward(x, {}, y, st.saved, {}, device);
        break;
    }
  });
}

void backward(State& st, int threads) {
  Workspace& w = st.ws();
  const CAct x = cact(w.x, st.cs), dy = cact(w.dy, st.cs);
  Act dx = act(w.dx, st.cs);
  Vec dgamma = vec(w.dgamma), dbeta = vec(w.dbeta);
  const auto params = normkit::affine(cvec(w.gamma), cvec(w.beta));
  const ChannelFormat f = st.cs.format;
  with_device(threads, [&](const auto& device) {
    switch (st.cs.op) {
      case Op::Batch:
        by_format(kBatchFirst, kBatchLast, f)
            .backward(dy, x, params, st.saved, dx, dgamma, dbeta, device);
        break;
      case Op::Group:
        by_format(kGroupFirst, kGroupLast, f)
            .backward(dy, x, params, st.saved, dx, dgamma, dbeta, device);
        break;
      case Op::Instance:
        by_format(kInstFirst, kInstLast, f)
            .backward(dy, x, {}, st.saved, dx, normkit::skip, normkit::skip, device);
        break;
    }
  });
}

// ---------------------------------------------------------------------------------
// The engine checks run before timing (see the top of this file).

// f(index, channel) for every element of statistic group 0.
template <class F>
void for_group0(const Case& cs, F&& f) {
  const Nchw& d = cs.dims;
  const Index samples = cs.op == Op::Batch ? d.n : 1;
  const Index channels = cs.op == Op::Group ? d.c / kGroups : 1;
  for (Index n = 0; n < samples; ++n)
    for (Index c = 0; c < channels; ++c)
      for (Index s = 0; s < d.spatial(); ++s)
        f(cs.format == ChannelFormat::First ? (n * d.c + c) * d.spatial() + s
                                            : (n * d.spatial() + s) * d.c + c,
          c);
}

std::string check_forward(const State& st) {
  const Workspace& w = st.ws();
  const bool affine = st.cs.op != Op::Instance;
  double sum = 0.0, sum_sq = 0.0, count = 0.0;
  for_group0(st.cs, [&](Index i, Index c) {
    const double y = w.y.data()[i];
    const double v = affine ? (y - w.beta.data()[c]) / w.gamma.data()[c] : y;
    sum += v;
    sum_sq += v * v;
    count += 1.0;
  });
  const double mean = sum / count, var = sum_sq / count - mean * mean;
  // Each y carries a few float roundings (relative 1e-7); 1e-4 leaves ample room.
  if (std::fabs(mean) <= 1e-4 && std::fabs(var - 1.0) <= 1e-4) return {};
  return "engine check: statistic group 0 of the normalized output has mean " +
         std::to_string(mean) + " and variance " + std::to_string(var) + ", expected 0 and 1";
}

std::string check_backward(const State& st) {
  const Workspace& w = st.ws();
  double sum = 0.0, sum_abs = 0.0;
  bool finite = true;
  for_group0(st.cs, [&](Index i, Index) {
    const double g = w.dx.data()[i];
    finite = finite && std::isfinite(g);
    sum += g;
    sum_abs += std::fabs(g);
  });
  // dx is orthogonal to a constant shift of the group: sum dx = -rstd * mean(g * xhat) *
  // sum xhat = 0 (BatchNorm likewise). Rounding leaves ~sqrt(n) * 1e-7 * mean|dx|.
  if (finite && sum_abs > 0.0 && std::fabs(sum) <= 1e-4 * sum_abs) return {};
  return "engine check: dx of statistic group 0 sums to " + std::to_string(sum) +
         " (sum |dx| = " + std::to_string(sum_abs) + "), expected 0";
}

// ---------------------------------------------------------------------------------
// Targets and the channels-last table.

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Single thread, channels-first: BatchNorm forward >= 0.70 of the roofline, GroupNorm and
// InstanceNorm forward >= 0.75, every backward >= 0.60.
double channel_target(const Meta& m) {
  if (m.kind != Kind::Kernel || m.threads != 1 || !ends_with(m.op, "_cf")) return -1.0;
  if (m.dir == Dir::Bwd) return 0.60;
  return starts_with(m.op, "batch_norm") ? 0.70 : 0.75;
}

// Channels-last should run within 0.8x of channels-first (target on one thread).
constexpr double kLastVsFirstTarget = 0.80;

void print_last_vs_first(std::FILE* out, const Collector& c) {
  std::fprintf(
      out,
      "\nchannels-last (_cl) against channels-first (_cf), same shape, direction and threads\n");
  std::fprintf(out, "\n%-24s %-4s %-14s %3s %9s %9s %7s %7s\n", "op", "dir", "shape", "thr",
               "CF GB/s", "CL GB/s", "CL/CF", "target");
  const Registry& reg = registry();
  for (const std::string& name : reg.order) {
    const Meta& m = reg.meta.at(name);
    if (m.kind != Kind::Kernel || !ends_with(m.op, "_cl")) continue;
    const std::string base = m.op.substr(0, m.op.size() - 3);
    Meta first = m;
    first.op = base + "_cf";
    const double cl = c.value(name), cf = c.value(bench_name(first));
    if (cl <= 0 && cf <= 0) continue;  // filtered out or skipped
    std::fprintf(out, "%-24s %-4s %-14s %3d", base.c_str(), dir_str(m.dir), m.shape.str().c_str(),
                 m.threads);
    for (const double v : {cf, cl}) {
      if (v > 0)
        std::fprintf(out, " %9.2f", v / 1e9);
      else
        std::fprintf(out, " %9s", "n/a");
    }
    if (cf > 0 && cl > 0) {
      std::fprintf(out, " %7.3f", cl / cf);
      if (m.threads == 1)
        std::fprintf(out, " %7.2f %s\n", kLastVsFirstTarget,
                     cl / cf >= kLastVsFirstTarget ? "ok" : "MISS");
      else
        std::fprintf(out, " %7s\n", "-");
    } else {
      std::fprintf(out, " %7s %7s\n", "n/a", "-");
    }
  }
}

// ---------------------------------------------------------------------------------
// oneDNN's BatchNorm (channels first), against batch_norm_cf.

#ifdef NKBENCH_WITH_ONEDNN
void add_onednn(const Nchw& d, int t, Dir dir) {
  const Shape s = shape_of(d);
  add_onednn_bench(
      {"onednn_batch_norm", Kind::Baseline, dir, s, t, op_name(Op::Batch, ChannelFormat::First)},
      NormLayout::nchw(d.n, d.c, d.spatial()), 1e-5,  // normkit's default eps
      [d](const onednn::Buffers& b, int threads) {
        return onednn::Norm::batch(d.n, d.c, d.h, d.w, 1e-5f, threads, b);
      },
      [d](Dir dr, std::vector<double>& mean, std::vector<double>& rstd) {
        State st(Case{Op::Batch, d, ChannelFormat::First});
        forward(st, 1);
        if (dr == Dir::Bwd) backward(st, 1);
        const normkit::RowStats<float>& saved = st.saved;
        onednn_check::saved_in_double(saved, d.c, mean, rstd);
      });
}
#endif

// ---------------------------------------------------------------------------------
// Registration.

void register_all() {
#ifdef NKBENCH_WITH_ONEDNN
  benchmark::AddCustomContext("normkit_onednn", onednn::describe());
#endif
  const Nchw bn_a{32, 64, 56, 56}, bn_b{32, 256, 14, 14}, gn_a{8, 512, 32, 32},
      gn_b{16, 64, 56, 56};
  const std::vector<std::pair<Op, Nchw>> cases{{Op::Batch, bn_a},
                                               {Op::Batch, bn_b},
                                               {Op::Group, gn_a},
                                               {Op::Group, gn_b},
                                               {Op::Instance, gn_a}};

  // One set of rooflines per shape and thread count (GroupNorm and InstanceNorm share
  // [8,512,32,32]).
  for (const Nchw& d : {bn_a, bn_b, gn_a, gn_b})
    for (int t : thread_counts()) register_rooflines(shape_of(d), t);

  for (const auto& [op, dims] : cases) {
    const Shape s = shape_of(dims);
    for (int t : thread_counts()) {
      for (Dir dir : {Dir::Fwd, Dir::Bwd}) {
        for (ChannelFormat f : {ChannelFormat::First, ChannelFormat::Last}) {
          auto st = std::make_shared<State>(Case{op, dims, f});
          const Meta m{op_name(op, f), Kind::Kernel, dir, s, t};
          if (dir == Dir::Fwd) {
            add_bench(
                m, [st, t] { forward(*st, t); },
                [st, t] {
                  forward(*st, t);
                  return check_forward(*st);
                });
          } else {
            // Backward uses statistics from a forward pass over the same x, run in setup.
            add_bench(
                m, [st, t] { backward(*st, t); },
                [st, t] {
                  forward(*st, t);
                  backward(*st, t);
                  return check_backward(*st);
                });
          }
        }
#ifdef NKBENCH_WITH_ONEDNN
        if (op == Op::Batch && t <= onednn::max_threads()) add_onednn(dims, t, dir);
#endif
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  nkbench::SummaryOptions summary;
  summary.target = channel_target;
  summary.extra = print_last_vs_first;
  return nkbench::run_main(argc, argv, register_all, summary);
}
