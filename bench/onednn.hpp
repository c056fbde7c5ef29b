// oneDNN's LayerNorm and BatchNorm (f32, training forward and backward with scale and
// shift), behind a small interface: only bench/onednn.cpp includes oneDNN's headers, so
// the benches compile without them and the OpenMP flags stay on that one file.
//
// Built into bench_layer_norm and bench_channel_norm when CMake finds oneDNN
// (NORMKIT_BENCH_ONEDNN=AUTO|ON|OFF, see bench/CMakeLists.txt); the benches then define
// NKBENCH_WITH_ONEDNN.
//
// Threads. Debian's libdnnl (2.6.3) runs its CPU primitives on OpenMP (libgomp): a
// primitive executed from a thread uses that thread's OpenMP thread count
// (omp_get_max_threads()), and some implementations also size their work split by it
// when the primitive is created. So every Norm is created for a fixed thread count,
// and sets that count (omp_set_num_threads, on the calling thread) both before creating
// its primitives and before each execution: a 1-thread Norm runs its parallel regions
// with one thread, on the calling thread, whatever OMP_NUM_THREADS says. The benches
// also measure it (process CPU time / wall time, see nkbench::cpu_per_wall).
// A oneDNN built with the sequential runtime is single-threaded throughout
// (max_threads() == 1); other runtimes (TBB, threadpool) are refused by CMake.
//
// Waiting. libgomp reads OMP_WAIT_POLICY when it loads (before main, so the bench cannot
// set it): unset, a thread that reaches a barrier spins before it sleeps. On a machine
// whose cores are shared with other jobs (this project's: 2 cores, other builds running)
// the 2-thread runs then collapse (oneDNN's BatchNorm measured 0.07 GB/s instead of
// 3 GB/s): the spinning thread holds a core while its partner waits for one.
// OMP_WAIT_POLICY=passive (threads sleep at once) avoids it; scripts/run-main.sh sets it
// for the benches unless it is set already. It does not affect 1-thread runs (no team,
// no barrier) nor normkit (which does not use OpenMP). The policy in force is part of
// describe(), printed in the run's context.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace nkbench::onednn {

// "oneDNN 2.6.3, CPU runtime OpenMP (thread count set per primitive with
// omp_set_num_threads)": the library's own version and runtime (dnnl_version()).
std::string describe();

// The largest thread count a Norm can be created with: 1 for the sequential runtime,
// else a large number.
int max_threads();

// The buffers a Norm reads and writes, laid out as normkit's benches hold them: x, y,
// dy, dx dense row-major ([rows, features] or (N, C, H, W)); gamma, beta, dgamma, dbeta
// with one float per feature (LayerNorm) or channel (BatchNorm). Bound once, when the
// Norm is created (as a user would bind a layer's tensors); they must outlive it.
struct Buffers {
  const float* x;
  const float* gamma;
  const float* beta;
  float* y;
  const float* dy;
  float* dx;
  float* dgamma;
  float* dbeta;
};

class Norm {
 public:
  // LayerNorm over the last dimension of a [rows, features] tensor.
  static std::unique_ptr<Norm> layer(std::int64_t rows, std::int64_t features, float eps,
                                     int threads, const Buffers& b);
  // BatchNorm, training (batch statistics, use_global_stats off), NCHW.
  static std::unique_ptr<Norm> batch(std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w,
                                     float eps, int threads, const Buffers& b);

  ~Norm();
  Norm(const Norm&) = delete;
  Norm& operator=(const Norm&) = delete;

  // Training forward: y, and the mean and variance of each statistic group (a row, a
  // channel), kept in the Norm. Waits for completion.
  void forward();
  // Backward (prop_kind::backward): dx, dgamma, dbeta from x, dy, gamma and the mean and
  // variance of the last forward(). Waits for completion.
  void backward();

  const float* mean() const;
  const float* variance() const;  // biased (divided by the group's size), without eps
  std::int64_t stat_count() const;

  // The implementations oneDNN picked (primitive_desc::impl_info_str()), e.g. "jit:uni".
  std::string impl_forward() const;
  std::string impl_backward() const;

  struct Impl;

 private:
  explicit Norm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nkbench::onednn
