// normkit benchmarks: what bench/layer_norm.cpp, bench/rms_norm.cpp and
// bench/channel_norm.cpp share.
//
//  - the shapes, the 64-byte-aligned buffers and a per-shape workspace of them;
//  - the 2-thread Eigen::ThreadPool / ThreadPoolDevice;
//  - the copy roofline: memcpy and non-temporal-store copies (forward bytes) and
//    dst = a + b with ordinary or non-temporal stores (backward bytes);
//  - registration of benchmarks with metadata, a reporter that records every result
//    (median of the repetitions) while the default display reporter prints as usual,
//    and a main() that adds the --quick mode and prints the ratio-to-roofline table
//    (a bench may supply its own targets and print further tables after it);
//  - comparisons with baselines (a baseline whose Meta names the normkit op it is
//    compared with, e.g. oneDNN's LayerNorm against layer_norm): a speed-ratio table
//    with its targets, and the record of the checks run before timing (the agreement of
//    oneDNN's outputs with normkit's; a failed one makes the binary exit non-zero);
//  - machine-readable metadata in --benchmark_out JSON files: every run's label
//    holds key=value fields (op, kind, dir, shape, threads, bytes, target, vs, ...) that
//    scripts/bench_report.py reads. The console output is unchanged.
//
// Byte counts (the bytes_per_second counter, and the roofline moving the same bytes):
//   forward:  read x, write y            2 * rows * features * sizeof(float)
//   backward: read x and dy, write dx    3 * rows * features * sizeof(float)
// dgamma/dbeta and the per-row statistics are not counted (they are O(features + rows)).
// The channel norms use the same counts with rows * features = every element of x and
// features = C (the size of gamma and beta), and label the shape with its full extents.
#pragma once

#ifndef EIGEN_USE_THREADS
#define EIGEN_USE_THREADS
#endif

#include <benchmark/benchmark.h>

// g++ 12 flags its own AVX-512 intrinsics that start from _mm512_undefined_ps() (the
// broadcast and gather that Eigen's tensor block code uses, inlined into the naive
// baseline) with -Wmaybe-uninitialized: a false positive (GCC bug 105593).
// The diagnostic is attributed to the intrinsic header's lines, so ignoring it while
// the headers are first included silences exactly those.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <unsupported/Eigen/CXX11/Tensor>
#include <unsupported/Eigen/CXX11/ThreadPool>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// The row norms' streaming threshold and prefetch distance, which the two-pass pattern
// below shares.
#include <normkit/detail/row_norm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

namespace nkbench {

using Index = Eigen::Index;

// ---------------------------------------------------------------------------------
// Shapes.

// rows x features floats; features is also the size of the parameter buffers (gamma,
// beta, dgamma, dbeta). label, if set, names the shape instead of "rowsxfeatures" (in
// benchmark names and tables), e.g. "32x64x56x56" for an (N, C, H, W) input.
struct Shape {
  Index rows;
  Index features;
  std::string label = {};
  // Bytes per stored element: 4 (float), or 2 for bf16 / half storage, whose benches
  // count 2-byte elements and take the copy roofline of those bytes (label them apart,
  // e.g. "4096x4096bf16").
  int elem = 4;
  Index size() const { return rows * features; }
  std::string str() const {
    return label.empty() ? std::to_string(rows) + "x" + std::to_string(features) : label;
  }
  bool operator<(const Shape& o) const {
    if (rows != o.rows) return rows < o.rows;
    if (features != o.features) return features < o.features;
    return label < o.label;
  }
  bool operator==(const Shape& o) const {
    return rows == o.rows && features == o.features && label == o.label;
  }
};

// The row norms' shapes (LayerNorm, RMSNorm).
inline const std::vector<Shape>& shapes() {
  static const std::vector<Shape> s{{64, 4096}, {4096, 4096}, {16384, 768}, {2048, 8192}};
  return s;
}

inline const std::vector<int>& thread_counts() {
  static const std::vector<int> t{1, 2};
  return t;
}

enum class Dir { Fwd, Bwd };
inline const char* dir_str(Dir d) { return d == Dir::Fwd ? "fwd" : "bwd"; }

// Bytes one call moves (see the top of this file).
inline std::int64_t bytes_of(Dir d, const Shape& s) {
  return (d == Dir::Fwd ? 2 : 3) * static_cast<std::int64_t>(s.size()) *
         static_cast<std::int64_t>(s.elem);
}

// ---------------------------------------------------------------------------------
// 64-byte-aligned float buffers.

class Buffer {
 public:
  explicit Buffer(Index n) : n_(n) {
    const std::size_t bytes = static_cast<std::size_t>(std::max<Index>(n, 1)) * sizeof(float);
    const std::size_t rounded = (bytes + 63) / 64 * 64;
    p_ = static_cast<float*>(std::aligned_alloc(64, rounded));
    if (p_ == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  float* data() { return p_; }
  const float* data() const { return p_; }
  Index size() const { return n_; }

  // Deterministic uniform values in [center - half_width, center + half_width).
  void fill_uniform(std::uint64_t seed, float center, float half_width) {
    std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
    for (Index i = 0; i < n_; ++i) {
      // splitmix64
      std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      const float u = static_cast<float>(z >> 40) * 0x1p-24f;  // [0, 1)
      p_[i] = center + half_width * (2.0f * u - 1.0f);
    }
  }
  void fill_value(float v) { std::fill(p_, p_ + n_, v); }

 private:
  Index n_;
  float* p_ = nullptr;
};

// Every buffer the ops use at one shape, filled once (first touch happens here).
struct Workspace {
  explicit Workspace(const Shape& sh)
      : shape(sh),
        x(sh.size()),
        y(sh.size()),
        dy(sh.size()),
        dx(sh.size()),
        gamma(sh.features),
        beta(sh.features),
        dgamma(sh.features),
        dbeta(sh.features) {
    x.fill_uniform(1, 0.5f, 2.0f);  // non-zero mean: the centring matters
    dy.fill_uniform(2, 0.0f, 1.0f);
    gamma.fill_uniform(3, 1.0f, 0.25f);
    beta.fill_uniform(4, 0.0f, 0.25f);
    y.fill_value(0.0f);
    dx.fill_value(0.0f);
    dgamma.fill_value(0.0f);
    dbeta.fill_value(0.0f);
  }

  Shape shape;
  Buffer x, y, dy, dx, gamma, beta, dgamma, dbeta;
};

// One workspace per shape, created on first use and kept (the four row-norm shapes
// together hold about 1 GB).
// A narrow-storage shape shares the float workspace of its rows x features (its
// rooflines copy the first elem / 4 of those buffers).
inline Workspace& workspace(const Shape& s) {
  static std::map<Shape, std::unique_ptr<Workspace>> cache;
  std::unique_ptr<Workspace>& w = cache[s.elem == 4 ? s : Shape{s.rows, s.features}];
  if (!w) w = std::make_unique<Workspace>(s);
  return *w;
}

// RowMajor [rows, features] and [features] maps over the buffers.
using Mat = Eigen::TensorMap<Eigen::Tensor<float, 2, Eigen::RowMajor>, Eigen::Aligned64>;
using CMat = Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>, Eigen::Aligned64>;
using Vec = Eigen::TensorMap<Eigen::Tensor<float, 1, Eigen::RowMajor>, Eigen::Aligned64>;
using CVec = Eigen::TensorMap<const Eigen::Tensor<float, 1, Eigen::RowMajor>, Eigen::Aligned64>;

inline Mat mat(Buffer& b, const Shape& s) { return Mat(b.data(), s.rows, s.features); }
inline CMat cmat(const Buffer& b, const Shape& s) { return CMat(b.data(), s.rows, s.features); }
inline Vec vec(Buffer& b) { return Vec(b.data(), b.size()); }
inline CVec cvec(const Buffer& b) { return CVec(b.data(), b.size()); }

// ---------------------------------------------------------------------------------
// Threads.

constexpr int kPoolThreads = 2;

struct Pool {
  Eigen::ThreadPool pool{kPoolThreads};
  Eigen::ThreadPoolDevice device{&pool, kPoolThreads};
};

inline Pool& pool() {
  static Pool p;
  return p;
}

// f(device) with Eigen::DefaultDevice for 1 thread, the pool's ThreadPoolDevice for 2.
template <class F>
void with_device(int threads, F&& f) {
  if (threads <= 1) {
    f(Eigen::DefaultDevice{});
  } else {
    f(pool().device);
  }
}

// f(begin, end) over [0, n) split into `threads` contiguous parts whose boundaries are
// multiples of 16 floats (64 bytes). Part 0 runs on the calling thread, the others on
// the pool, as Eigen's ThreadPoolDevice::parallelFor does with its first block.
template <class F>
void split_run(int threads, Index n, F&& f) {
  const int t = std::max(1, std::min(threads, kPoolThreads));
  if (t == 1) {
    f(Index{0}, n);
    return;
  }
  auto bound = [&](int k) {
    if (k >= t) return n;
    return (n * k / t) / 16 * 16;
  };
  Eigen::Barrier done(static_cast<unsigned int>(t - 1));
  for (int k = 1; k < t; ++k) {
    const Index b = bound(k), e = bound(k + 1);
    pool().pool.Schedule([&f, &done, b, e] {
      f(b, e);
      done.Notify();
    });
  }
  f(Index{0}, bound(1));
  done.Wait();
}

// ---------------------------------------------------------------------------------
// Copy roofline kernels. Each moves exactly the bytes of the op it bounds.

// Forward: dst = src with memcpy (glibc picks its own strategy, non-temporal stores
// for large sizes).
inline void copy_memcpy(const float* src, float* dst, Index n, int threads) {
  split_run(threads, n, [&](Index b, Index e) {
    std::memcpy(dst + b, src + b, static_cast<std::size_t>(e - b) * sizeof(float));
  });
}

// Forward: dst = src with non-temporal stores and an sfence.
inline void copy_stream(const float* src, float* dst, Index n, int threads) {
  split_run(threads, n, [&](Index b, Index e) {
    Index i = b;
#if defined(__AVX512F__)
    for (; i < e && reinterpret_cast<std::uintptr_t>(dst + i) % 64 != 0; ++i) dst[i] = src[i];
    for (; i + 64 <= e; i += 64) {
      const __m512 v0 = _mm512_loadu_ps(src + i);
      const __m512 v1 = _mm512_loadu_ps(src + i + 16);
      const __m512 v2 = _mm512_loadu_ps(src + i + 32);
      const __m512 v3 = _mm512_loadu_ps(src + i + 48);
      _mm512_stream_ps(dst + i, v0);
      _mm512_stream_ps(dst + i + 16, v1);
      _mm512_stream_ps(dst + i + 32, v2);
      _mm512_stream_ps(dst + i + 48, v3);
    }
    for (; i + 16 <= e; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX__)
    for (; i < e && reinterpret_cast<std::uintptr_t>(dst + i) % 32 != 0; ++i) dst[i] = src[i];
    for (; i + 8 <= e; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#else
    // x86-64's baseline (a build without -march, NORMKIT_BENCH_MARCH=""): SSE2 streams.
    for (; i < e && reinterpret_cast<std::uintptr_t>(dst + i) % 16 != 0; ++i) dst[i] = src[i];
    for (; i + 4 <= e; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#endif
    for (; i < e; ++i) dst[i] = src[i];
    _mm_sfence();
  });
}

// Backward: dst = a + b with ordinary stores (the cached-store counterpart of memcpy;
// a memcpy of 1.5 n floats would move the same bytes but in a 1:1 instead of the
// op's 2:1 read:write mix).
inline void add_store(const float* a, const float* bsrc, float* dst, Index n, int threads) {
  split_run(threads, n, [&](Index b, Index e) {
    Index i = b;
#if defined(__AVX512F__)
    for (; i + 32 <= e; i += 32) {
      _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(bsrc + i)));
      _mm512_storeu_ps(dst + i + 16,
                       _mm512_add_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(bsrc + i + 16)));
    }
#endif
    for (; i < e; ++i) dst[i] = a[i] + bsrc[i];
  });
}

// Backward: dst = a + b with non-temporal stores and an sfence.
inline void add_stream(const float* a, const float* bsrc, float* dst, Index n, int threads) {
  split_run(threads, n, [&](Index b, Index e) {
    Index i = b;
#if defined(__AVX512F__)
    for (; i < e && reinterpret_cast<std::uintptr_t>(dst + i) % 64 != 0; ++i)
      dst[i] = a[i] + bsrc[i];
    for (; i + 32 <= e; i += 32) {
      const __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(bsrc + i));
      const __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(bsrc + i + 16));
      _mm512_stream_ps(dst + i, v0);
      _mm512_stream_ps(dst + i + 16, v1);
    }
    for (; i + 16 <= e; i += 16)
      _mm512_stream_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(bsrc + i)));
#elif defined(__AVX__)
    for (; i < e && reinterpret_cast<std::uintptr_t>(dst + i) % 32 != 0; ++i)
      dst[i] = a[i] + bsrc[i];
    for (; i + 8 <= e; i += 8)
      _mm256_stream_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(bsrc + i)));
#else
    for (; i < e && reinterpret_cast<std::uintptr_t>(dst + i) % 16 != 0; ++i)
      dst[i] = a[i] + bsrc[i];
    for (; i + 4 <= e; i += 4)
      _mm_stream_ps(dst + i, _mm_add_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(bsrc + i)));
#endif
    for (; i < e; ++i) dst[i] = a[i] + bsrc[i];
    _mm_sfence();
  });
}

// ---------------------------------------------------------------------------------
// The two-pass pattern (AVX-512 builds): the memory traffic of a row norm with nothing
// else. A row norm must read a whole row before it writes any of it (its statistics come
// first), so x is read twice, the second time from cache. Per row: pass 1 sums the row
// (forward: x; backward: dy and x) in four independent chains; pass 2 writes y = x * c
// (forward) or dx = dy * c + x (backward) from the row in cache, with non-temporal stores
// where normkit streams (normkit::detail::stream_output: outputs of 8 MiB or more), and
// prefetches a later row into L2 (normkit::detail::prefetch_ahead_rows, as normkit's
// forward does). No statistics, parameters or special cases: what it moves in a
// given time bounds what any two-pass kernel can move, and normkit's speed over it (the
// baselines table, "pattern_layer_norm" and "pattern_rms_norm") is the share of that
// bound it reaches.
#if defined(__AVX512F__)

// Pass 1 over k rows' worth of arrays a[0..k) at one row (n floats): their sum.
inline float pattern_sum(const float* const* a, int k, Index n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  float tail = 0.0f;
  for (int j = 0; j < k; ++j) {
    const float* p = a[j];
    Index i = 0;
    for (; i + 64 <= n; i += 64) {
      s0 = _mm512_add_ps(s0, _mm512_loadu_ps(p + i));
      s1 = _mm512_add_ps(s1, _mm512_loadu_ps(p + i + 16));
      s2 = _mm512_add_ps(s2, _mm512_loadu_ps(p + i + 32));
      s3 = _mm512_add_ps(s3, _mm512_loadu_ps(p + i + 48));
    }
    for (; i < n; ++i) tail += p[i];
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3))) + tail;
}

// Pass 2: out = a * c (+ b if b), the lines of next (n floats per array in nexts[0..k))
// prefetched into L2 one per packet written.
template <bool Stream>
void pattern_write(const float* a, const float* b, float* out, Index n, float c,
                   const float* const* nexts, int k) {
  const __m512 vc = _mm512_set1_ps(c);
  auto scalar_at = [&](Index i) { out[i] = a[i] * c + (b ? b[i] : 0.0f); };
  Index i = 0;
  if (Stream)
    for (; i < n && reinterpret_cast<std::uintptr_t>(out + i) % 64 != 0; ++i) scalar_at(i);
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < k; ++j) _mm_prefetch(reinterpret_cast<const char*>(nexts[j] + i), _MM_HINT_T1);
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(a + i), vc);
    if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + i));
    if (Stream)
      _mm512_stream_ps(out + i, v);
    else
      _mm512_storeu_ps(out + i, v);
  }
  for (; i < n; ++i) scalar_at(i);
}

// Rows [0, rows) of n floats: forward (dy == nullptr: y = f(x)) or backward (dx = f(dy, x)).
inline void two_pass_pattern(const float* dy, const float* x, float* out, Index rows, Index n,
                             int threads) {
  const bool stream = normkit::detail::stream_output<float>(rows * n);
  const Index ahead = normkit::detail::prefetch_ahead_rows(n * static_cast<Index>(sizeof(float)));
  split_run(threads, rows, [&](Index r0, Index r1) {
    for (Index r = r0; r < r1; ++r) {
      const float* xr = x + r * n;
      const float* dyr = dy ? dy + r * n : nullptr;
      const float* both[2] = {xr, dyr};
      const float c = 1.0f / (1.0f + std::fabs(pattern_sum(both, dy ? 2 : 1, n)));
      const Index next = std::min(r + 1 + ahead, r1 - 1);
      const float* nexts[2] = {x + next * n, dy ? dy + next * n : nullptr};
      // forward: y = x c; backward: dx = dy c + x.
      const float* a = dy ? dyr : xr;
      const float* b = dy ? xr : nullptr;
      if (stream)
        pattern_write<true>(a, b, out + r * n, n, c, nexts, dy ? 2 : 1);
      else
        pattern_write<false>(a, b, out + r * n, n, c, nexts, dy ? 2 : 1);
    }
    if (stream) _mm_sfence();
  });
}
#endif

// ---------------------------------------------------------------------------------
// Registration with metadata.

enum class Kind { Kernel, Baseline, Roofline };

struct Meta {
  std::string op;  // "layer_norm", "rms_norm", "eigen_naive_layer_norm", "batch_norm_cf", ...,
                   // or the roofline variant
  Kind kind;
  Dir dir;
  Shape shape;
  int threads;
  // For a baseline: the normkit op it is compared with at the same direction, shape and
  // thread count (e.g. "layer_norm" for "onednn_layer_norm"), and the target of normkit's
  // speed ratio over it (<= 0 for none).
  std::string vs = {};
  double vs_target = -1.0;
};

struct Registry {
  std::vector<std::string> order;    // registration order
  std::map<std::string, Meta> meta;  // by benchmark function name
  // Further key=value fields for a benchmark's label in --benchmark_out files, by name
  // (e.g. "impl=simple_layer_normalization:any"), set while it runs.
  std::map<std::string, std::string> extra_label;
};

inline Registry& registry() {
  static Registry r;
  return r;
}

inline std::string bench_name(const Meta& m) {
  const std::string prefix = m.kind == Kind::Roofline ? "roofline_" + m.op : m.op;
  return prefix + "/" + dir_str(m.dir) + "/" + m.shape.str() + "/t" + std::to_string(m.threads);
}

// Registers a benchmark named from m that times op(). Before the timing loop it runs
// setup() (if given; a non-empty message skips the benchmark with that error), then
// op() once as the warm-up (the buffers were filled when the workspace was created).
template <class Op>
void add_bench(const Meta& m, Op op, std::function<std::string()> setup = {}) {
  const std::string name = bench_name(m);
  const std::int64_t bytes = bytes_of(m.dir, m.shape);
  registry().order.push_back(name);
  registry().meta.emplace(name, m);
  benchmark::RegisterBenchmark(
      name.c_str(),
      [op, setup, bytes](benchmark::State& state) {
        if (setup) {
          const std::string err = setup();
          if (!err.empty()) {
            state.SkipWithError(err.c_str());
            return;
          }
        }
        op();
        for (auto _ : state) {
          op();
          benchmark::ClobberMemory();
        }
        state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes);
      })
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
}

// The copy rooflines of both directions at one shape and thread count.
// The copy rooflines of both directions at one shape and thread count (moving
// s.size() * s.elem bytes per array).
inline void register_rooflines(const Shape& s, int t) {
  const Index n = s.size() * s.elem / static_cast<Index>(sizeof(float));
  add_bench({"copy_memcpy", Kind::Roofline, Dir::Fwd, s, t}, [s, t, n] {
    Workspace& w = workspace(s);
    copy_memcpy(w.x.data(), w.y.data(), n, t);
  });
  add_bench({"copy_stream", Kind::Roofline, Dir::Fwd, s, t}, [s, t, n] {
    Workspace& w = workspace(s);
    copy_stream(w.x.data(), w.y.data(), n, t);
  });
  add_bench({"add_store", Kind::Roofline, Dir::Bwd, s, t}, [s, t, n] {
    Workspace& w = workspace(s);
    add_store(w.x.data(), w.dy.data(), w.dx.data(), n, t);
  });
  add_bench({"add_stream", Kind::Roofline, Dir::Bwd, s, t}, [s, t, n] {
    Workspace& w = workspace(s);
    add_stream(w.x.data(), w.dy.data(), w.dx.data(), n, t);
  });
}

// The two-pass pattern at one shape and thread count, both directions, as the baseline
// "pattern_<vs>" of the normkit op vs (the baselines table gives normkit's speed over
// it); AVX-512 builds.
inline void register_pattern(const Shape& s, int t, const std::string& vs) {
#if defined(__AVX512F__)
  add_bench({"pattern_" + vs, Kind::Baseline, Dir::Fwd, s, t, vs}, [s, t] {
    Workspace& w = workspace(s);
    two_pass_pattern(nullptr, w.x.data(), w.y.data(), s.rows, s.features, t);
  });
  add_bench({"pattern_" + vs, Kind::Baseline, Dir::Bwd, s, t, vs}, [s, t] {
    Workspace& w = workspace(s);
    two_pass_pattern(w.dy.data(), w.x.data(), w.dx.data(), s.rows, s.features, t);
  });
#else
  (void)s;
  (void)t;
  (void)vs;
#endif
}

// Narrow-storage copies of a float buffer (bf16 or half), 64-byte aligned, one per
// shape and type, kept across benchmarks.
template <class T>
T* narrow_copy(const Shape& s, const Buffer& src, int which) {
  static std::map<std::pair<Shape, int>, std::unique_ptr<Buffer>> cache;
  std::unique_ptr<Buffer>& b = cache[{Shape{s.rows, s.features}, which}];
  if (!b) {
    const Index n = src.size();
    b = std::make_unique<Buffer>((n * static_cast<Index>(sizeof(T)) + 3) / 4);
    T* p = reinterpret_cast<T*>(b->data());
    for (Index i = 0; i < n; ++i) p[i] = T(src.data()[i]);
  }
  return reinterpret_cast<T*>(b->data());
}

// ---------------------------------------------------------------------------------
// Checks run before timing whose failure must fail the binary (the agreement of another
// library's outputs with normkit's): each records one line, printed after the summary;
// run_main returns 1 if any failed.

struct CheckRecord {
  std::string bench;  // benchmark name
  bool ok;
  std::string detail;  // what was compared, the errors and tolerances
};

inline std::vector<CheckRecord>& check_records() {
  static std::vector<CheckRecord> r;
  return r;
}

// How a timed op uses threads: the CPU time of the process's other threads as a share of
// the process's CPU time, and process CPU time / wall time, while op() runs repeatedly
// for at least `seconds` of wall time and at least twice. The share is what shows that
// a 1-thread run is single-threaded: the calling thread does all the work (~0), whereas
// a second worker would take about half. Unlike CPU / wall time it does not depend on
// how much of the (shared) machine the process gets.
struct ThreadUse {
  double helper_share = 0.0;
  double cpu_per_wall = 0.0;
};

inline double clock_seconds(clockid_t id) {
  timespec t{};
  clock_gettime(id, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

template <class Op>
ThreadUse measure_thread_use(Op&& op, double seconds) {
  const double p0 = clock_seconds(CLOCK_PROCESS_CPUTIME_ID);
  const double t0 = clock_seconds(CLOCK_THREAD_CPUTIME_ID);
  const double w0 = clock_seconds(CLOCK_MONOTONIC);
  double w1 = w0;
  for (int calls = 0; calls < 2 || w1 - w0 < seconds; ++calls) {
    op();
    w1 = clock_seconds(CLOCK_MONOTONIC);
  }
  const double process = clock_seconds(CLOCK_PROCESS_CPUTIME_ID) - p0;
  const double self = clock_seconds(CLOCK_THREAD_CPUTIME_ID) - t0;
  ThreadUse u;
  u.helper_share = process > 0.0 ? std::max(0.0, process - self) / process : 0.0;
  u.cpu_per_wall = w1 > w0 ? process / (w1 - w0) : 0.0;
  return u;
}

// ---------------------------------------------------------------------------------
// Collecting results: forwards everything to the display reporter (so --benchmark_format
// and the console output behave as usual) and keeps bytes_per_second per benchmark.

struct Result {
  std::vector<double> samples;  // per repetition (absent with display_aggregates_only)
  double median = -1.0;         // the "median" aggregate, if repetitions > 1
  std::int64_t repetitions = 1;

  double value() const {
    if (median >= 0.0) return median;
    if (samples.empty()) return -1.0;
    std::vector<double> s = samples;
    std::sort(s.begin(), s.end());
    const std::size_t k = s.size() / 2;
    return s.size() % 2 ? s[k] : 0.5 * (s[k - 1] + s[k]);
  }
};

class Collector : public benchmark::BenchmarkReporter {
 public:
  explicit Collector(benchmark::BenchmarkReporter* display) : display_(display) {}

  bool ReportContext(const Context& context) override { return display_->ReportContext(context); }

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      const auto it = r.counters.find("bytes_per_second");
      if (it == r.counters.end()) continue;
      Result& res = results_[r.run_name.function_name];
      res.repetitions = r.repetitions;
      if (r.run_type == Run::RT_Aggregate) {
        if (r.aggregate_name == "median") res.median = it->second.value;
      } else {
        res.samples.push_back(it->second.value);
      }
    }
    display_->ReportRuns(runs);
  }

  void Finalize() override { display_->Finalize(); }

  const std::map<std::string, Result>& results() const { return results_; }

  // The median bytes/s of the benchmark of that name, or -1 if it did not run.
  double value(const std::string& name) const {
    const auto it = results_.find(name);
    return it == results_.end() ? -1.0 : it->second.value();
  }

 private:
  benchmark::BenchmarkReporter* display_;
  std::map<std::string, Result> results_;
};

// ---------------------------------------------------------------------------------
// The summary table.

// Targets of the issue (single thread, medians): forward >= 0.85 of the roofline on
// the DRAM-sized shapes (x larger than 16 MiB: all but [64, 4096], whose 1 MiB x stays
// in L2/L3 between iterations) and >= 0.60 on [64, 4096]; backward >= 0.75.
// Narrow storage (bf16, half): forward >= 0.80 of the copy of the same bytes.
inline double target_of(const Meta& m) {
  if (m.kind != Kind::Kernel || m.threads != 1) return -1.0;
  if (m.shape.elem != 4) return m.dir == Dir::Fwd ? 0.80 : -1.0;
  if (m.dir == Dir::Bwd) return 0.75;
  const bool dram = static_cast<double>(m.shape.size()) * sizeof(float) > 16.0 * (1 << 20);
  return dram ? 0.85 : 0.60;
}

// The Meta of the normkit kernel a baseline is compared with (m.vs at m's direction,
// shape and thread count).
inline Meta versus_of(const Meta& m) { return {m.vs, Kind::Kernel, m.dir, m.shape, m.threads}; }

// What a bench may change in the summary.
struct SummaryOptions {
  // A kernel's target ratio to the roofline, <= 0 for none. Default: target_of.
  std::function<double(const Meta&)> target;
  // Printed after the table (further comparisons between the results), if set.
  std::function<void(std::FILE*, const Collector&)> extra;
};

// normkit against the baselines that name a normkit op (Meta::vs), if any ran.
inline void print_versus(std::FILE* out, const Collector& c) {
  const Registry& reg = registry();
  bool header = false;
  for (const std::string& name : reg.order) {
    const Meta& m = reg.meta.at(name);
    if (m.vs.empty()) continue;
    const double other = c.value(name), ours = c.value(bench_name(versus_of(m)));
    if (other <= 0 && ours <= 0) continue;  // filtered out or skipped
    if (!header) {
      std::fprintf(out,
                   "\nnormkit against the baselines: speedup = normkit GB/s / baseline GB/s "
                   "(same direction, shape, threads and bytes)\n");
      std::fprintf(out, "\n%-24s %-24s %-4s %-12s %3s %9s %9s %8s %7s\n", "op", "baseline", "dir",
                   "shape", "thr", "GB/s", "base GB/s", "speedup", "target");
      header = true;
    }
    std::fprintf(out, "%-24s %-24s %-4s %-12s %3d", m.vs.c_str(), m.op.c_str(), dir_str(m.dir),
                 m.shape.str().c_str(), m.threads);
    for (const double v : {ours, other}) {
      if (v > 0)
        std::fprintf(out, " %9.2f", v / 1e9);
      else
        std::fprintf(out, " %9s", "n/a");
    }
    const double tgt = m.vs_target;
    if (ours > 0 && other > 0) {
      std::fprintf(out, " %7.2fx", ours / other);
      if (tgt > 0)
        std::fprintf(out, " %6.1fx %s\n", tgt, ours / other >= tgt ? "ok" : "MISS");
      else
        std::fprintf(out, " %7s\n", "-");
    } else {
      std::fprintf(out, " %8s %7s\n", "n/a", "-");
    }
  }
}

// The checks recorded before timing (check_records()), if any.
inline void print_checks(std::FILE* out) {
  const std::vector<CheckRecord>& checks = check_records();
  if (checks.empty()) return;
  std::fprintf(out, "\nchecks run before timing (max |difference| against tolerance):\n\n");
  for (const CheckRecord& r : checks)
    std::fprintf(out, "%-4s %s: %s\n", r.ok ? "ok" : "FAIL", r.bench.c_str(), r.detail.c_str());
}

inline void print_summary(std::FILE* out, const Collector& c, const SummaryOptions& opt = {}) {
  const Registry& reg = registry();
  const auto& res = c.results();
  auto value_of = [&](const std::string& name) { return c.value(name); };
  const std::function<double(const Meta&)> target = opt.target ? opt.target : target_of;

  std::int64_t reps = 0;
  for (const auto& r : res) reps = std::max(reps, r.second.repetitions);
  std::fprintf(out,
               "\n==== normkit roofline summary: GB/s = 1e9 bytes/s of the counted traffic, "
               "median of %lld repetition(s);\n"
               "     ratio = kernel GB/s / best roofline GB/s at the same shape, direction "
               "and thread count\n\n",
               static_cast<long long>(reps));

  // Rooflines first: every variant, and the best.
  std::fprintf(out, "%-4s %-12s %3s %12s %12s %12s %12s  %s\n", "dir", "shape", "thr", "memcpy",
               "copy_stream", "add_store", "add_stream", "best");
  std::map<std::string, std::pair<double, std::string>> best;  // key: dir/shape/threads
  auto key_of = [](const Meta& m) {
    return std::string(dir_str(m.dir)) + "/" + m.shape.str() + "/" + std::to_string(m.threads);
  };
  std::vector<Shape> roof_shapes;  // in registration order
  for (const std::string& name : reg.order) {
    const Meta& m = reg.meta.at(name);
    if (m.kind != Kind::Roofline) continue;
    if (std::find(roof_shapes.begin(), roof_shapes.end(), m.shape) == roof_shapes.end())
      roof_shapes.push_back(m.shape);
    const double v = value_of(name);
    auto& b = best[key_of(m)];
    if (v > b.first) b = {v, m.op};
  }
  for (Dir d : {Dir::Fwd, Dir::Bwd}) {
    for (const Shape& s : roof_shapes) {
      for (int t : thread_counts()) {
        const std::string k = std::string(dir_str(d)) + "/" + s.str() + "/" + std::to_string(t);
        if (best.find(k) == best.end() || best[k].first <= 0.0) continue;  // not run
        std::fprintf(out, "%-4s %-12s %3d", dir_str(d), s.str().c_str(), t);
        for (const char* variant : {"copy_memcpy", "copy_stream", "add_store", "add_stream"}) {
          const double v = value_of(bench_name({variant, Kind::Roofline, d, s, t}));
          if (v > 0)
            std::fprintf(out, " %12.2f", v / 1e9);
          else
            std::fprintf(out, " %12s", "-");
        }
        std::fprintf(out, "  %s\n", best[k].second.c_str());
      }
    }
  }

  std::fprintf(out, "\n%-24s %-4s %-12s %3s %9s %9s %-12s %7s %7s\n", "op", "dir", "shape", "thr",
               "GB/s", "roof GB/s", "roof kind", "ratio", "target");
  for (const std::string& name : reg.order) {
    const Meta& m = reg.meta.at(name);
    if (m.kind == Kind::Roofline) continue;
    const double v = value_of(name);
    if (res.find(name) == res.end()) continue;  // filtered out or skipped
    const auto bit = best.find(key_of(m));
    const double roof = bit == best.end() ? -1.0 : bit->second.first;
    std::fprintf(out, "%-24s %-4s %-12s %3d", m.op.c_str(), dir_str(m.dir), m.shape.str().c_str(),
                 m.threads);
    if (v > 0)
      std::fprintf(out, " %9.2f", v / 1e9);
    else
      std::fprintf(out, " %9s", "n/a");
    if (roof > 0)
      std::fprintf(out, " %9.2f %-12s", roof / 1e9, bit->second.second.c_str());
    else
      std::fprintf(out, " %9s %-12s", "n/a", "");
    if (v > 0 && roof > 0)
      std::fprintf(out, " %7.3f", v / roof);
    else
      std::fprintf(out, " %7s", "n/a");
    const double tgt = target(m);
    if (tgt > 0 && v > 0 && roof > 0)
      std::fprintf(out, " %7.2f %s\n", tgt, v / roof >= tgt ? "ok" : "MISS");
    else
      std::fprintf(out, " %7s\n", "-");
  }
  print_versus(out, c);
  if (opt.extra) opt.extra(out, c);
  print_checks(out);
  std::fflush(out);
}

// ---------------------------------------------------------------------------------
// Labels in --benchmark_out JSON files: key=value fields separated by spaces, for scripts
// (scripts/bench_report.py). Values have no spaces.
//   op=layer_norm kind=kernel dir=fwd shape=4096x4096 rows=4096 features=4096 threads=1
//   bytes=134217728 seq=17 target=0.85
//   op=onednn_layer_norm kind=baseline ... vs=layer_norm vs_target=2.0 impl=...
//   op=copy_stream kind=roofline ...
// bytes: per call (the bytes_per_second counter's numerator); seq: the registration order
// (runs are interleaved at random in the file; this orders them as the summary table);
// target: the kernel's target ratio to the roofline (absent if none); vs, vs_target: the
// normkit op a baseline is compared with and the target of normkit's speed ratio over it
// (absent if none); further fields from Registry::extra_label (oneDNN's: impl, the
// implementation it picked, and helper_cpu, the other threads' share of its CPU time).

inline const char* kind_str(Kind k) {
  return k == Kind::Kernel ? "kernel" : k == Kind::Baseline ? "baseline" : "roofline";
}

inline std::string label_of(const std::string& name,
                            const std::function<double(const Meta&)>& target) {
  const Registry& reg = registry();
  const auto it = reg.meta.find(name);
  if (it == reg.meta.end()) return {};
  const Meta& m = it->second;
  char num[64];
  std::string l = "op=" + m.op + " kind=" + kind_str(m.kind) + " dir=" + dir_str(m.dir) +
                  " shape=" + m.shape.str() + " rows=" + std::to_string(m.shape.rows) +
                  " features=" + std::to_string(m.shape.features) +
                  " threads=" + std::to_string(m.threads) +
                  " bytes=" + std::to_string(bytes_of(m.dir, m.shape));
  const auto pos = std::find(reg.order.begin(), reg.order.end(), name);
  l += " seq=" + std::to_string(pos - reg.order.begin());
  if (const double t = target(m); t > 0) {
    std::snprintf(num, sizeof num, "%.2f", t);
    l += std::string(" target=") + num;
  }
  if (!m.vs.empty()) {
    l += " vs=" + m.vs;
    if (const double t = m.vs_target; t > 0) {
      std::snprintf(num, sizeof num, "%.1f", t);
      l += std::string(" vs_target=") + num;
    }
  }
  const auto extra = reg.extra_label.find(name);
  if (extra != reg.extra_label.end() && !extra->second.empty()) l += " " + extra->second;
  return l;
}

// The JSON file reporter, labelling every run with label_of.
class LabelledJsonReporter : public benchmark::JSONReporter {
 public:
  explicit LabelledJsonReporter(std::function<double(const Meta&)> target)
      : target_(std::move(target)) {}

  void ReportRuns(const std::vector<benchmark::BenchmarkReporter::Run>& runs) override {
    std::vector<benchmark::BenchmarkReporter::Run> labelled = runs;
    for (auto& r : labelled) {
      const std::string l = label_of(r.run_name.function_name, target_);
      if (!l.empty()) r.report_label = l;
    }
    JSONReporter::ReportRuns(labelled);
  }

 private:
  std::function<double(const Meta&)> target_;
};

// ---------------------------------------------------------------------------------
// main(): flags, run, summary.
//
// --quick (or NORMKIT_BENCH_QUICK=1 in the environment) prepends
//   --benchmark_min_time=0.1 --benchmark_repetitions=3
// otherwise --benchmark_repetitions=5 is prepended. Both modes also prepend
//   --benchmark_display_aggregates_only=true --benchmark_enable_random_interleaving=true
// Interleaving runs the repetitions of all benchmarks in random order, so that a kernel
// and its roofline sample the same stretches of a shared machine's memory bandwidth
// (which drifts by +-15% over minutes here) and their ratio is steadier. Flags given on
// the command line come later and win.
//
// --benchmark_out=FILE (with --benchmark_out_format=json, the default) writes every run
// with the labels above (other formats: Google Benchmark's own, without them). The exit
// status is 1 if a check recorded in check_records() failed (the summary lists it).

inline int run_main(int argc, char** argv, const std::function<void()>& register_all,
                    const SummaryOptions& summary = {}) {
  bool quick = false;
  if (const char* e = std::getenv("NORMKIT_BENCH_QUICK")) quick = e[0] != '\0' && e[0] != '0';
  bool console = true;
  bool file_out = false;
  std::string file_format = "json";
  std::vector<std::string> user;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
      continue;
    }
    if (a.rfind("--benchmark_format=", 0) == 0 && a != "--benchmark_format=console")
      console = false;
    if (a.rfind("--benchmark_out=", 0) == 0) file_out = a.size() > std::strlen("--benchmark_out=");
    if (a.rfind("--benchmark_out_format=", 0) == 0)
      file_format = a.substr(std::strlen("--benchmark_out_format="));
    user.push_back(a);
  }
  std::vector<std::string> args{argv[0]};
  if (quick) {
    args.push_back("--benchmark_min_time=0.1");
    args.push_back("--benchmark_repetitions=3");
  } else {
    args.push_back("--benchmark_repetitions=5");
  }
  args.push_back("--benchmark_display_aggregates_only=true");
  args.push_back("--benchmark_enable_random_interleaving=true");
  args.insert(args.end(), user.begin(), user.end());
  std::vector<char*> cargs;
  for (std::string& a : args) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  int cargc = static_cast<int>(args.size());

  benchmark::Initialize(&cargc, cargs.data());
  if (benchmark::ReportUnrecognizedArguments(cargc, cargs.data())) return 1;
  benchmark::AddCustomContext("normkit_bench_mode", quick ? "quick" : "full");

  register_all();
  Collector collector(benchmark::CreateDefaultDisplayReporter());
  const std::function<double(const Meta&)> target = summary.target ? summary.target : target_of;
  std::unique_ptr<benchmark::BenchmarkReporter> file_reporter;
  if (file_out && file_format == "json")
    file_reporter = std::make_unique<LabelledJsonReporter>(target);
  if (file_reporter)
    benchmark::RunSpecifiedBenchmarks(&collector, file_reporter.get());
  else
    benchmark::RunSpecifiedBenchmarks(&collector);
  // The summary goes to stdout with the console format, to stderr otherwise (so that
  // JSON or CSV on stdout stays parseable).
  print_summary(console ? stdout : stderr, collector, summary);
  benchmark::Shutdown();
  int failed = 0;
  for (const CheckRecord& r : check_records()) failed += r.ok ? 0 : 1;
  if (failed > 0) {
    std::fprintf(stderr, "\nerror: %d check(s) run before timing FAILED (listed above)\n", failed);
    return 1;
  }
  return 0;
}

}  // namespace nkbench
