// normkit: how work is split across a device's threads. Rows are independent, so any
// split gives the same per-row numbers; reductions across rows (dgamma, dbeta) use a
// fixed number of chunks that depends on the row count only, each reduced by one
// thread in row order, then combined in chunk order: bitwise-identical results for any
// number of threads.
#pragma once

#include <unsupported/Eigen/CXX11/Tensor>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#include "row_kernels.hpp"

namespace normkit {
namespace detail {

// At most 32 chunks: enough to balance a thread pool of a few dozen threads, few enough
// that the per-chunk double accumulators (32 * n * 16 bytes, 4 MiB at n = 8192) stay a
// few percent of the traffic of a backward pass. At least 64 rows per chunk, so that a
// small batch (64 rows of 4096) does not spend more time on the accumulators than on
// its rows.
constexpr Index kReduceChunks = 32;
constexpr Index kMinChunkRows = 64;

inline Index reduce_chunks(Index rows) {
  return std::max<Index>(1, std::min(rows / kMinChunkRows, kReduceChunks));
}
inline Index chunk_begin(Index c, Index rows, Index chunks) { return rows * c / chunks; }

// Scratch arrays of T on a cache line's boundary (64 bytes), for accumulators that are
// read and written a packet at a time: a packet there never straddles two lines. (Where
// the LayerNorm backward's double accumulators sat 16 bytes off a line, as std::vector
// left them, [16384, 768] ran at 0.49-0.54 of the roofline against 0.61 aligned: Zen 5,
// 2026-12-08.) Not zeroed.
struct LineFree {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
template <class T>
using LineArray = std::unique_ptr<T[], LineFree>;
template <class T>
LineArray<T> line_array(Index count) {
  const std::size_t bytes = static_cast<std::size_t>(count) * sizeof(T);
  return LineArray<T>(static_cast<T*>(::operator new[](bytes, std::align_val_t(64))));
}
// An array stride of n elements rounded up to whole lines for T of 4 and 8 bytes.
inline Index line_stride(Index n) { return (n + 15) / 16 * 16; }

template <class Device, class = void>
struct has_parallel_for : std::false_type {};
template <class Device>
struct has_parallel_for<Device, decltype(void(std::declval<const Device&>().parallelFor(
                                    Index{0}, Eigen::TensorOpCost(),
                                    std::function<void(Index, Index)>())))>
    : std::true_type {};

// The engines' device: the caller's Eigen device with its type erased, so that each
// engine (and each hot region it flattens for a backend, simd/target.hpp) is compiled
// once, not once per device type. Serial for a device without parallelFor
// (Eigen::DefaultDevice); otherwise its parallelFor, called through one pointer per
// parallel region. Holds a pointer to the device: lives only for the op call.
class Exec {
 public:
  Exec() = default;
  template <class Device, class = std::enable_if_t<!std::is_same<Device, Exec>::value>>
  explicit Exec(const Device& device) {
    if constexpr (has_parallel_for<Device>::value) {
      device_ = &device;
      run_ = [](const void* d, Index n, const Eigen::TensorOpCost& cost,
                std::function<void(Index, Index)> f) {
        static_cast<const Device*>(d)->parallelFor(n, cost, std::move(f));
      };
    } else {
      (void)device;
    }
  }

  bool parallel() const { return run_ != nullptr; }
  void parallelFor(Index n, const Eigen::TensorOpCost& cost,
                   std::function<void(Index, Index)> f) const {
    run_(device_, n, cost, std::move(f));
  }

 private:
  const void* device_ = nullptr;
  void (*run_)(const void*, Index, const Eigen::TensorOpCost&,
               std::function<void(Index, Index)>) = nullptr;
};

// Calls f(first, last) over [0, n), in blocks chosen by the device. cost is per item.
// Each block runs through Isa::run: compiled for the backend's target (with runtime
// dispatch, the whole of f is inlined into a function built for it; simd/target.hpp).
// One lambda enters Isa::run on both paths, so that each region is flattened once.
template <class Isa, class F>
void parallel_for(const Exec& device, Index n, const Eigen::TensorOpCost& cost, F&& f) {
  if (n <= 0) return;
  const auto block = [&f](Index a, Index b) { Isa::run([&] { f(a, b); }); };
  if (device.parallel())
    device.parallelFor(n, cost, std::function<void(Index, Index)>(block));
  else
    block(Index{0}, n);
}

}  // namespace detail
}  // namespace normkit
