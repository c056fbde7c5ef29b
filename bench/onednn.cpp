// oneDNN's LayerNorm and BatchNorm for the benches: see onednn.hpp.
#include "onednn.hpp"

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wconversion"
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#endif
#include <oneapi/dnnl/dnnl.hpp>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <unordered_map>
#include <utility>
#include <vector>

#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#elif DNNL_CPU_THREADING_RUNTIME != DNNL_RUNTIME_SEQ
#error "the benches drive oneDNN's OpenMP or sequential runtime only (see bench/CMakeLists.txt)"
#endif

namespace nkbench::onednn {

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

// Sets the calling thread's OpenMP thread count, which oneDNN's OpenMP runtime uses for
// the primitives created and executed from this thread.
void use_threads([[maybe_unused]] int threads) {
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
  omp_set_num_threads(threads);
#endif
}

const char* runtime_name(unsigned rt) {
  switch (rt) {
    case DNNL_RUNTIME_SEQ:
      return "sequential";
    case DNNL_RUNTIME_OMP:
      return "OpenMP";
    case DNNL_RUNTIME_TBB:
      return "TBB";
    case DNNL_RUNTIME_THREADPOOL:
      return "threadpool";
    default:
      return "unknown";
  }
}

dnnl::engine& cpu_engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

dnnl::stream& cpu_stream() {
  static dnnl::stream s(cpu_engine());
  return s;
}

memory bind(const memory::desc& md, const float* p) {
  return memory(md, cpu_engine(), const_cast<float*>(p));
}

}  // namespace

std::string describe() {
  const dnnl_version_t* v = dnnl_version();
  char buf[256];
  std::snprintf(buf, sizeof buf, "oneDNN %d.%d.%d, CPU runtime %s", v->major, v->minor, v->patch,
                runtime_name(v->cpu_runtime));
  std::string d = buf;
  if (v->cpu_runtime == DNNL_RUNTIME_OMP) {
    d += " (thread count set per primitive with omp_set_num_threads; OMP_WAIT_POLICY=";
    const char* policy = std::getenv("OMP_WAIT_POLICY");
    d += policy != nullptr ? std::string(policy) + ")"
                           : "unset: idle threads spin, see bench/onednn.hpp)";
  }
  return d;
}

int max_threads() {
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_SEQ
  return 1;
#else
  return INT_MAX;
#endif
}

struct Norm::Impl {
  int threads = 1;
  std::int64_t stats = 0;
  std::vector<float> mean, variance;
  dnnl::primitive fwd, bwd;
  std::unordered_map<int, memory> fwd_args, bwd_args;
  std::string fwd_impl, bwd_impl;

  // A primitive pair over `stats` statistics, run with `threads` threads.
  static std::unique_ptr<Impl> make(int threads, std::int64_t stats) {
    auto impl = std::make_unique<Impl>();
    impl->threads = threads;
    impl->stats = stats;
    impl->mean.assign(static_cast<std::size_t>(stats), 0.0f);
    impl->variance.assign(static_cast<std::size_t>(stats), 0.0f);
    use_threads(threads);
    return impl;
  }

  // The primitives of the two descriptors, their names, and their arguments.
  template <class F, class B>
  void finish(const typename F::primitive_desc& fpd, const typename B::primitive_desc& bpd,
              const memory::desc& data, const memory::desc& stat, const memory::desc& param,
              const Buffers& b) {
    fwd = F(fpd);
    bwd = B(bpd);
    fwd_impl = fpd.impl_info_str();
    bwd_impl = bpd.impl_info_str();
    bind_args(data, stat, param, b);
  }

  // data: x, y, dy, dx; stat: mean, variance; param: gamma, beta, dgamma, dbeta.
  void bind_args(const memory::desc& data, const memory::desc& stat, const memory::desc& param,
                 const Buffers& b) {
    const memory x = bind(data, b.x), y = bind(data, b.y), dy = bind(data, b.dy),
                 dx = bind(data, b.dx);
    const memory m = bind(stat, mean.data()), v = bind(stat, variance.data());
    const memory g = bind(param, b.gamma), be = bind(param, b.beta), dg = bind(param, b.dgamma),
                 db = bind(param, b.dbeta);
    fwd_args = {{DNNL_ARG_SRC, x},    {DNNL_ARG_DST, y},  {DNNL_ARG_SCALE, g},
                {DNNL_ARG_SHIFT, be}, {DNNL_ARG_MEAN, m}, {DNNL_ARG_VARIANCE, v}};
    // oneDNN 2.6 requires the shift among the backward arguments too (with use_shift).
    bwd_args = {{DNNL_ARG_SRC, x},       {DNNL_ARG_DIFF_DST, dy},   {DNNL_ARG_SCALE, g},
                {DNNL_ARG_SHIFT, be},    {DNNL_ARG_MEAN, m},        {DNNL_ARG_VARIANCE, v},
                {DNNL_ARG_DIFF_SRC, dx}, {DNNL_ARG_DIFF_SCALE, dg}, {DNNL_ARG_DIFF_SHIFT, db}};
  }
};

Norm::Norm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Norm::~Norm() = default;

namespace {
// Scale (gamma) and shift (beta), batch statistics (use_global_stats off).
dnnl::normalization_flags scale_shift() {
  return dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
}
}  // namespace

std::unique_ptr<Norm> Norm::layer(std::int64_t rows, std::int64_t features, float eps, int threads,
                                  const Buffers& b) {
  auto impl = Impl::make(threads, rows);

  const memory::desc data({rows, features}, dt::f32, tag::ab);
  const memory::desc stat({rows}, dt::f32, tag::a);
  const memory::desc param({features}, dt::f32, tag::a);
  using F = dnnl::layer_normalization_forward;
  using B = dnnl::layer_normalization_backward;
  const F::primitive_desc fpd(
      F::desc(dnnl::prop_kind::forward_training, data, stat, eps, scale_shift()), cpu_engine());
  const B::primitive_desc bpd(
      B::desc(dnnl::prop_kind::backward, data, data, stat, eps, scale_shift()), cpu_engine(), fpd);
  impl->finish<F, B>(fpd, bpd, data, stat, param, b);
  return std::unique_ptr<Norm>(new Norm(std::move(impl)));
}

std::unique_ptr<Norm> Norm::batch(std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w,
                                  float eps, int threads, const Buffers& b) {
  auto impl = Impl::make(threads, c);

  const memory::desc data({n, c, h, w}, dt::f32, tag::nchw);
  const memory::desc stat({c}, dt::f32, tag::a);
  const memory::desc param({c}, dt::f32, tag::a);
  using F = dnnl::batch_normalization_forward;
  using B = dnnl::batch_normalization_backward;
  const F::primitive_desc fpd(F::desc(dnnl::prop_kind::forward_training, data, eps, scale_shift()),
                              cpu_engine());
  const B::primitive_desc bpd(B::desc(dnnl::prop_kind::backward, data, data, eps, scale_shift()),
                              cpu_engine(), fpd);
  impl->finish<F, B>(fpd, bpd, data, stat, param, b);
  return std::unique_ptr<Norm>(new Norm(std::move(impl)));
}

void Norm::forward() {
  use_threads(impl_->threads);
  impl_->fwd.execute(cpu_stream(), impl_->fwd_args);
  cpu_stream().wait();
}

void Norm::backward() {
  use_threads(impl_->threads);
  impl_->bwd.execute(cpu_stream(), impl_->bwd_args);
  cpu_stream().wait();
}

const float* Norm::mean() const { return impl_->mean.data(); }
const float* Norm::variance() const { return impl_->variance.data(); }
std::int64_t Norm::stat_count() const { return impl_->stats; }
std::string Norm::impl_forward() const { return impl_->fwd_impl; }
std::string Norm::impl_backward() const { return impl_->bwd_impl; }

}  // namespace nkbench::onednn
