// normkit: the one place that knows about Eigen tensor types and layouts. Every tensor
// argument becomes a View: a pointer and its extents in memory order (innermost, i.e.
// contiguous, first). RowMajor (B,T,D) and ColMajor (D,T,B) give the same View.
#pragma once

#include <unsupported/Eigen/CXX11/Tensor>

#include <array>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "../errors.hpp"
#include "row_kernels.hpp"

namespace normkit {

// Pass normkit::skip for an output you do not want (PyTorch's output_mask).
struct Skip {};
constexpr Skip skip{};

namespace detail {

constexpr int kMaxRank = 8;

template <class T>
struct View {
  T* data = nullptr;
  int rank = 0;
  std::array<Index, kMaxRank> dims{};  // memory order: dims[0] is contiguous
  bool present = false;                // false for a skipped output or absent parameter

  Index size() const {
    Index s = 1;
    for (int i = 0; i < rank; ++i) s *= dims[static_cast<std::size_t>(i)];
    return s;
  }
  // Product of the innermost k extents (k <= rank).
  Index inner(int k) const {
    Index s = 1;
    for (int i = 0; i < k; ++i) s *= dims[static_cast<std::size_t>(i)];
    return s;
  }
  // Product of the extents outside the innermost k: the number of rows.
  Index outer(int k) const {
    Index s = 1;
    for (int i = k; i < rank; ++i) s *= dims[static_cast<std::size_t>(i)];
    return s;
  }
  std::string str() const {
    if (!present) return "nothing (skipped)";
    std::string s = "[";
    for (int i = 0; i < rank; ++i) {
      if (i) s += ", ";
      s += std::to_string(dims[static_cast<std::size_t>(i)]);
    }
    return s + (rank > 1 ? "] (memory order, innermost first)" : "]");
  }
};

template <class X>
using scalar_of = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<X&>().data())>>;

template <class T, class X>
View<std::add_const_t<T>> make_view(X& x) {
  using Xd = std::decay_t<X>;
  static_assert(std::is_same<scalar_of<X>, T>::value,
                "normkit: tensor scalar type does not match the op's type");
  constexpr int R = Xd::NumDimensions;
  static_assert(R >= 1 && R <= kMaxRank, "normkit: tensor rank must be 1 to 8");
  constexpr bool row_major = static_cast<int>(Xd::Layout) == static_cast<int>(Eigen::RowMajor);
  View<std::add_const_t<T>> v;
  v.data = x.data();
  v.rank = R;
  v.present = true;
  const auto& d = x.dimensions();
  for (int i = 0; i < R; ++i)
    v.dims[static_cast<std::size_t>(i)] =
        static_cast<Index>(d[static_cast<std::size_t>(row_major ? R - 1 - i : i)]);
  return v;
}

// An input tensor (Eigen::Tensor, TensorMap, const or not).
template <class T, class X>
View<const T> in(const X& x) {
  return make_view<T>(x);
}
template <class T>
View<const T> in(Skip) {
  return {};
}

// An output tensor: must be writable.
template <class T, class X>
View<T> out(X&& x) {
  static_assert(!std::is_const<std::remove_pointer_t<decltype(x.data())>>::value,
                "normkit: an output tensor must be writable (not const)");
  View<const T> c = make_view<T>(x);
  View<T> v;
  v.data = x.data();
  v.rank = c.rank;
  v.dims = c.dims;
  v.present = true;
  return v;
}
template <class T>
View<T> out(Skip) {
  return {};
}

template <class A, class B>
bool same_dims(const View<A>& a, const View<B>& b) {
  if (a.rank != b.rank) return false;
  for (int i = 0; i < a.rank; ++i)
    if (a.dims[static_cast<std::size_t>(i)] != b.dims[static_cast<std::size_t>(i)]) return false;
  return true;
}

// A parameter's view against the normalized (innermost k) extents of x: it must have
// exactly those extents in memory order, or be rank 1 with their product.
template <class A, class B>
bool matches_inner(const View<A>& p, const View<B>& x, int k) {
  if (p.rank == 1 && p.dims[0] == x.inner(k)) return true;
  if (p.rank != k) return false;
  for (int i = 0; i < k; ++i)
    if (p.dims[static_cast<std::size_t>(i)] != x.dims[static_cast<std::size_t>(i)]) return false;
  return true;
}

template <class B>
std::string inner_str(const View<B>& x, int k) {
  View<B> v = x;
  v.rank = k;
  const std::string flat = "[" + std::to_string(x.inner(k)) + "]";
  return k == 1 ? flat : v.str() + " or " + flat;
}

// Outputs may be exactly an input (in place) but must not partly overlap an input or
// each other: that would make the result depend on the order of the writes.
template <class A, class B>
bool partial_overlap(const View<A>& a, const View<B>& b) {
  if (!a.present || !b.present || a.size() == 0 || b.size() == 0) return false;
  auto a0 = reinterpret_cast<std::uintptr_t>(a.data);
  auto b0 = reinterpret_cast<std::uintptr_t>(b.data);
  auto a1 = a0 + static_cast<std::uintptr_t>(a.size()) * sizeof(*a.data);
  auto b1 = b0 + static_cast<std::uintptr_t>(b.size()) * sizeof(*b.data);
  bool overlap = a0 < b1 && b0 < a1;
  return overlap && !(a0 == b0 && a1 == b1);
}
template <class A, class B>
bool any_overlap(const View<A>& a, const View<B>& b) {
  if (!a.present || !b.present || a.size() == 0 || b.size() == 0) return false;
  auto a0 = reinterpret_cast<std::uintptr_t>(a.data);
  auto b0 = reinterpret_cast<std::uintptr_t>(b.data);
  return a0 < b0 + static_cast<std::uintptr_t>(b.size()) * sizeof(*b.data) &&
         b0 < a0 + static_cast<std::uintptr_t>(a.size()) * sizeof(*a.data);
}

template <class A>
void require_data(const std::string& where, const char* arg, const View<A>& v) {
  if (v.present && v.size() > 0 && v.data == nullptr)
    fail(where, arg, "a non-null data pointer for " + std::to_string(v.size()) + " elements",
         "nullptr");
}

}  // namespace detail
}  // namespace normkit
