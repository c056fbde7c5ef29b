// Test helpers: deterministic data, aligned and misaligned buffers, Eigen views of any
// rank and layout over the same memory, and tolerances derived from n and epsilon.
#pragma once

#define EIGEN_USE_THREADS
#include <catch2/catch.hpp>
// The engines are compiled once, in tests/engines_*.cpp (normkit/extern_templates.hpp);
// a binary of one test file (NORMKIT_TEST_OWN_ENGINES: normkit_tests_avx512bf16) compiles
// those it uses itself.
#ifdef NORMKIT_TEST_OWN_ENGINES
#include <normkit/normkit.hpp>
#else
#include <normkit/extern_templates.hpp>
#endif

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <string>
#include <vector>

#include "reference.hpp"

namespace nt {

// Lanes of T in the backend the ops run.
template <class T>
std::ptrdiff_t best_lanes() {
  return normkit::detail::simd::visit<normkit::detail::simd::Best>(
      [](auto isa) { return static_cast<std::ptrdiff_t>(decltype(isa)::template Pack<T>::W); });
}


using Index = Eigen::Index;
using LD = long double;

inline const std::vector<Index>& sweep_sizes() {
  static const std::vector<Index> s{1,  2,   3,   7,   15,  16,  17,   31,   32,   33,  63,
                                    64, 65,  127, 128, 129, 767, 768, 4095, 4096, 4097};
  return s;
}

// Aligned storage with an optional offset of `shift` elements from a 64-byte boundary.
// Rows of n elements of T that make a [rows, n] tensor of NORMKIT_STREAM_MIN_BYTES and
// more (3 rows over): forward and backward stream their outputs there.
template <class T>
Index streamed_rows(Index n) {
  return static_cast<Index>(NORMKIT_STREAM_MIN_BYTES / (static_cast<std::size_t>(n) * sizeof(T))) + 3;
}

template <class T>
struct Buffer {
  std::vector<T> store;
  T* p = nullptr;
  std::size_t n = 0, shift = 0;
  Buffer(std::size_t count, std::size_t shift_) : n(count), shift(shift_) { place(); }
  // A copy owns its memory, with the same misalignment and contents (p must not point
  // into the original's storage).
  Buffer(const Buffer& o) : n(o.n), shift(o.shift) {
    place();
    std::copy(o.p, o.p + n, p);
  }
  Buffer& operator=(const Buffer& o) {
    if (this != &o) {
      n = o.n;
      shift = o.shift;
      place();
      std::copy(o.p, o.p + n, p);
    }
    return *this;
  }
  Buffer(Buffer&&) noexcept = default;  // the vector's storage moves with p into it
  Buffer& operator=(Buffer&&) noexcept = default;
  // 64-byte aligned, then `shift` elements further.
  void place() {
    store.assign(n + shift + 64 / sizeof(T), T(0));
    auto a = reinterpret_cast<std::uintptr_t>(store.data());
    std::size_t pad = ((64 - a % 64) % 64) / sizeof(T);
    p = store.data() + pad + shift;
  }
  T* data() { return p; }
  const T* data() const { return p; }
  T& operator[](std::size_t i) { return p[i]; }
  const T& operator[](std::size_t i) const { return p[i]; }
  void fill(T v) { std::fill(p, p + n, v); }
  bool all_equal(T v) const {
    return std::all_of(p, p + n, [&](T a) { return std::memcmp(&a, &v, sizeof(T)) == 0; });
  }
};

template <class T>
void fill_normal(T* p, std::size_t n, std::uint64_t seed, double mean = 0.0, double sd = 1.0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> d(mean, sd);
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<T>(d(g));
}

// Extents in memory order (innermost first) -> an Eigen::DSizes in the index order of
// the given layout. RowMajor indexes outermost first; ColMajor innermost first.
template <int R, int Layout>
Eigen::DSizes<Index, R> index_dims(const std::array<Index, R>& mem) {
  Eigen::DSizes<Index, R> d;
  for (int i = 0; i < R; ++i)
    d[i] = Layout == Eigen::RowMajor ? mem[static_cast<std::size_t>(R - 1 - i)]
                                     : mem[static_cast<std::size_t>(i)];
  return d;
}

template <class T, int R, int Layout>
using Map = Eigen::TensorMap<Eigen::Tensor<T, R, Layout>>;
template <class T, int R, int Layout>
using CMap = Eigen::TensorMap<Eigen::Tensor<const T, R, Layout>>;

template <class T, int R, int Layout>
Map<T, R, Layout> map(T* p, const std::array<Index, R>& mem) {
  return Map<T, R, Layout>(p, index_dims<R, Layout>(mem));
}
template <class T, int R, int Layout>
CMap<T, R, Layout> cmap(const T* p, const std::array<Index, R>& mem) {
  return CMap<T, R, Layout>(p, index_dims<R, Layout>(mem));
}

template <class T>
constexpr double eps_of() {
  return static_cast<double>(std::numeric_limits<T>::epsilon());
}

// |a - b| <= tol, reporting the first failure with its context.
struct Mismatch {
  std::size_t count = 0;
  std::string first;
  void check(double got, double want, double tol, std::size_t i, const char* what) {
    const bool ok = (std::isnan(want) && std::isnan(got)) ||
                    (std::isinf(want) && got == want) || std::fabs(got - want) <= tol;
    if (!ok && count++ == 0) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "%s[%zu]: got %.10g, want %.10g, tol %.3g, diff %.3g", what,
                    i, got, want, tol, std::fabs(got - want));
      first = buf;
    }
  }
};

// Finite differences in double. The loss L = sum_i w_i y_i, summed in long double, has
// dL/dy = w: backward's dy. central: (L(v + h) - L(v - h)) / 2h for one input v of the
// loss (which reads v through a reference), restoring v.
template <class W>
double weighted_sum(const W* w, const double* y, std::size_t n) {
  LD l = 0;
  for (std::size_t i = 0; i < n; ++i) l += static_cast<LD>(w[i]) * y[i];
  return static_cast<double>(l);
}

template <class L>
double central(const L& loss, double& v, double h) {
  const double v0 = v;
  v = v0 + h;
  const double lp = loss();
  v = v0 - h;
  const double lm = loss();
  v = v0;
  return (lp - lm) / (2 * h);
}

// s = alpha x + r as the backend under test rounds it (README "Fused residual"): once (an
// fma) where the target has FMA, as every AVX2, AVX-512 and aarch64 build; twice (alpha x,
// then + r) in a scalar build without FMA, where a software fma would cost more than the op.
// With runtime dispatch the backend under test fuses when it is AVX2 or AVX-512 even
// though this file's flags lack FMA (Isa::has_fma of the dispatched backend).
inline bool best_fuses() {
  return normkit::detail::simd::visit<normkit::detail::simd::Best>(
      [](auto isa) { return decltype(isa)::has_fma; });
}

// Tensors over memory of memory-order extents mem (rank 2 to 5, the channel tests'
// shapes), in either layout: with_tensors(row_major, mem, f) calls f(maker), and maker(p)
// maps p, as a const tensor where p is const.
template <int R, int L>
struct Maker {
  std::array<Index, R> d;
  template <class T>
  auto operator()(T* p) const {
    if constexpr (std::is_const<T>::value)
      return cmap<std::remove_const_t<T>, R, L>(p, d);
    else
      return map<T, R, L>(p, d);
  }
};
template <int R, class F>
void with_rank(bool row_major, const std::vector<Index>& mem, F& f) {
  std::array<Index, R> d{};
  for (std::size_t i = 0; i < static_cast<std::size_t>(R); ++i) d[i] = mem[i];
  if (row_major)
    f(Maker<R, Eigen::RowMajor>{d});
  else
    f(Maker<R, Eigen::ColMajor>{d});
}
template <class F>
void with_tensors(bool row_major, const std::vector<Index>& mem, F&& f) {
  switch (mem.size()) {
    case 2: with_rank<2>(row_major, mem, f); break;
    case 3: with_rank<3>(row_major, mem, f); break;
    case 4: with_rank<4>(row_major, mem, f); break;
    case 5: with_rank<5>(row_major, mem, f); break;
    default: FAIL("rank " << mem.size() << " is not instantiated by the tests");
  }
}

// f(a gradient output of C elements at p), or f(normkit::skip) where p is nullptr.
template <class T, class F>
void with_grad(T* p, Index C, F&& f) {
  if (p)
    f(Map<T, 1, Eigen::ColMajor>(p, C));
  else
    f(normkit::skip);
}

template <class T>
T residual_sum(T alpha, T x, T r, bool fused) {
  if (fused) return std::fma(alpha, x, r);
  volatile T ax = alpha * x;  // rounded on its own, whatever the compiler contracts
  return ax + r;
}

}  // namespace nt
