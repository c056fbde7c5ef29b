// normkit: narrow storage (Eigen::bfloat16, Eigen::half) for the channel norms
// (BatchNorm, GroupNorm, InstanceNorm), staged through the float engine of
// channel_norm.hpp as narrow.hpp stages the row norms.
//
// Blocks of whole channels. Every statistic of a channel norm, every running-statistics
// update and every parameter gradient belongs to one channel (BatchNorm, evaluation) or
// one group of channels (GroupNorm, InstanceNorm: G = C) and reads that channel's or
// group's elements only. A block of channels [c0, c1) of an (N, C, M) tensor is
//   - channels first: N runs of (c1 - c0) * M contiguous elements, C * M apart, from
//     offset c0 * M;
//   - channels last: N * M runs of (c1 - c0) elements, C apart, from offset c0;
// and, gathered (widened exactly) into a float scratch, it is itself an (N, c1 - c0, M)
// tensor in the same format. The float engine's own passes run on it (with a serial
// device: the blocks are the parallel tasks) and see every channel's data in the same
// order and with the same neighbours within its group as on the whole widened tensor,
// so they compute the same numbers: the statistics, y and dx before their rounding,
// and the double parameter sums are those of the float op on the widened tensor, bit
// for bit (tests/narrow_channel.cpp checks it; the only code that sees the block's edges
// is the split of a channels-last row into packets and a scalar tail, whose scalar code
// evaluates the same float operations, fused where the packets fuse).
//
// Results are then rounded to T, to nearest even (kernels::narrow_row): y and dx are
// bit for bit T(the float op's y or dx on the widened inputs). Statistics are saved in
// float (RowStats<float>), exactly the float op's. Parameter gradients are the float
// op's double sums rounded once to the parameters' type (float, or T: round_once).
// Running statistics are Running<float> only: they are state accumulated over many
// steps, and a momentum update (1 - m) r + m v stored in bfloat16 would lose every
// change below 2^-8 of r (with m = 0.1, any batch statistic within about 4% of the
// running one would leave it unchanged forever). Nothing is squared or summed in T.
//
// Block size: from the shape only (never the thread count), about kNarrowChannelElems
// float elements per staged array (256 KB: L2) and at least one unit (a channel, or a
// group of channels); channels last at least kNarrowLastMinChannels channels, so that a
// block's runs cover whole 64-byte lines of T (one channel per block would read every
// line of the tensor once per channel).
//
// All the checks run on the full narrow tensors first, with the float op's code and
// messages (check_forward_train etc. are templates over the data's, parameters' and
// statistics' types); nothing is written before they pass.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "channel_norm.hpp"
#include "narrow.hpp"
#include "simd/dispatch.hpp"

namespace normkit {
namespace detail {
namespace channel {

constexpr Index kNarrowChannelElems = Index{1} << 16;
constexpr Index kNarrowLastMinChannels = 32;

// Channels per staging block of an (N, C, M) tensor whose units (what a statistic
// spans across channels) are `unit` channels: 1 for per-channel statistics, C / G for
// GroupNorm, 1 for InstanceNorm. A multiple of unit, at least unit, at most C (C is a
// multiple of unit).
inline Index narrow_block_channels(Index N, Index C, Index M, Index unit, bool last) {
  unit = std::max<Index>(1, unit);
  const Index per_unit = std::max<Index>(1, N * unit * M);
  Index units = std::max<Index>(1, kNarrowChannelElems / per_unit);
  if (last) units = std::max(units, (kNarrowLastMinChannels + unit - 1) / unit);
  return std::max(unit, std::min(units * unit, C));
}
inline Index narrow_block_channels(const Geo& g) {
  return narrow_block_channels(g.N, g.C, g.M, g.batch ? 1 : g.Cg, g.last);
}

// f(offset in the full tensor, offset in the block, length) for each contiguous run of
// the channels [c0, c0 + cb).
template <class F>
void for_runs(const Geo& g, Index c0, Index cb, F&& f) {
  if (!g.last) {
    for (Index n = 0; n < g.N; ++n) f((n * g.C + c0) * g.M, n * cb * g.M, cb * g.M);
  } else {
    for (Index r = 0; r < g.N * g.M; ++r) f(r * g.C + c0, r * cb, cb);
  }
}

// (Each enters Isa::run itself: for_blocks' tasks do not, see there.)
template <class Isa, class T>
void widen_block(const Geo& g, Index c0, Index cb, const T* src, float* dst) {
  Isa::run([&] {
    for_runs(g, c0, cb,
             [&](Index o, Index b, Index n) { kernels::widen_row<Isa>(src + o, dst + b, n); });
  });
}

template <class Isa, class T>
void narrow_block(const Geo& g, Index c0, Index cb, const float* src, T* dst) {
  Isa::run([&] {
    for_runs(g, c0, cb,
             [&](Index o, Index b, Index n) { kernels::narrow_row<Isa>(src + b, dst + o, n); });
  });
}

// The block as a tensor: x's extents with cb channels, over data.
template <class A, class B>
View<B> block_view(const View<A>& full, B* data, const Geo& g, Index cb) {
  View<B> v;
  v.data = data;
  v.rank = full.rank;
  v.dims = full.dims;
  v.present = true;
  v.dims[static_cast<std::size_t>(g.last ? 0 : full.rank - 2)] = cb;
  return v;
}

// Elements [c0, c0 + cb) of a per-channel array (absent stays absent).
template <class A>
View<A> slice(const View<A>& v, Index c0, Index cb) {
  if (!v.present) return {};
  View<A> s;
  s.data = v.data + c0;
  s.rank = 1;
  s.dims[0] = cb;
  s.present = true;
  return s;
}
inline View<const float> slice(const float* p, Index c0, Index cb) {
  if (!p) return {};
  View<const float> s;
  s.data = p + c0;
  s.rank = 1;
  s.dims[0] = cb;
  s.present = true;
  return s;
}

// The float parameters of a block.
inline Affine<float> block_params(const WideParams& wp, Index c0, Index cb) {
  return {slice(wp.gamma, c0, cb), slice(wp.beta, c0, cb)};
}

// One block: its channels, its geometry and spec (GroupNorm: cb / Cg groups).
struct Block {
  Index c0 = 0, cb = 0;
  Geo g;
  Spec spec;
};

// Scratch of one parallel task: `arrays` staged arrays of a block, and a block's saved
// statistics.
struct Stage {
  std::vector<float> buf;
  Index elems = 0;  // per array
  RowStats<float> st;
  float* array(int k) { return buf.data() + k * elems; }
};

// Runs f(block, stage) over the channel blocks of the checked tensor of geometry g,
// blocks in parallel on device, one Stage per task.
//
// The tasks do not run inside Isa::run (parallel_for's region, compiled for the
// backend's target): the float engine's code between its own regions (moments_last_batch
// finishing its column sums, update_running) is then compiled exactly as when the float
// op calls it, for the build's base target. Inside a region built with FMA, GCC contracts
// its a * b + c (s2 - s * md, the momentum update) into fused operations where the
// float op does not (GNU mode's -ffp-contract=fast): BatchNorm channels last differed
// from the float op in the last bits of m2 and the running variance in the dispatch
// build, until this. The engine's hot regions enter Isa::run themselves, as for the
// float op, and so do widen_block / narrow_block.
template <class Isa, class F>
void for_blocks(const Spec& spec, const Geo& g, int arrays, const Exec& device, F&& f) {
  const Index cpb = narrow_block_channels(g);
  const Index blocks = g.C == 0 ? 0 : (g.C + cpb - 1) / cpb;
  const Index elems = g.N * cpb * g.M;
  const double bytes = static_cast<double>(elems) * 2.0;
  const Eigen::TensorOpCost cost(bytes * arrays, bytes, 10.0 * static_cast<double>(elems));
  const auto task = [&](Index b0, Index b1) {
    Stage stage;
    stage.elems = elems;
    stage.buf.resize(static_cast<std::size_t>(elems * arrays));
    for (Index b = b0; b < b1; ++b) {
      Block k;
      k.c0 = b * cpb;
      k.cb = std::min(cpb, g.C - k.c0);
      k.g = g;
      k.g.C = k.cb;
      if (!g.batch) k.g.G = k.cb / g.Cg;
      k.spec = spec;
      if (spec.kind == Kind::Group) k.spec.groups = static_cast<int>(k.g.G);
      f(k, stage);
    }
  };
  if (blocks <= 0) return;
  if (device.parallel())
    device.parallelFor(blocks, cost, std::function<void(Index, Index)>(task));
  else
    task(Index{0}, blocks);
}

// f(index in the full statistics, index in the block's) for each statistic of block k.
template <class F>
void for_block_stats(const Geo& g, const Block& k, F&& f) {
  if (g.batch) {
    for (Index c = 0; c < k.cb; ++c) f(k.c0 + c, c);
  } else {
    const Index g0 = k.c0 / g.Cg;
    for (Index n = 0; n < g.N; ++n)
      for (Index j = 0; j < k.g.G; ++j) f(n * g.G + g0 + j, n * k.g.G + j);
  }
}

// A double rounded once to P: float as the float op does (static_cast), narrow T by
// rounding to float with round-to-odd first (the inexact results keep an odd last bit),
// which float's 13 (half) or 16 (bf16) extra bits then round to nearest even exactly as
// a direct rounding of the double would. (Eigen's T(double) goes through an ordinary
// float rounding: a double rounding.)
template <class P>
P round_once(double v) {
  if constexpr (is_narrow<P>::value) {
    float f = static_cast<float>(v);
    if (std::isfinite(f) && static_cast<double>(f) != v) {
      std::uint32_t b;
      std::memcpy(&b, &f, sizeof b);
      if ((b & 1u) == 0)
        f = std::nextafter(f, static_cast<double>(f) < v ? HUGE_VALF : -HUGE_VALF);
    }
    return P(f);
  } else {
    return static_cast<P>(v);
  }
}

template <class P>
void write_grads_once(const View<P>& dgamma, const View<P>& dbeta, const GradSums& sums) {
  for (std::size_t c = 0; c < sums.dg.size(); ++c) dgamma.data[c] = round_once<P>(sums.dg[c]);
  for (std::size_t c = 0; c < sums.db.size(); ++c) dbeta.data[c] = round_once<P>(sums.db[c]);
}

// ---------------------------------------------------------------------------------
// The entry points for narrow T (parameters P: float or T).

template <class Isa, class T, class P>
void forward_train_narrow(const Spec& spec, const View<const T>& x, const Affine<P>& p,
                          const View<T>& y, RowStats<float>& saved, const Running<float>& run,
                          const ChannelMoments* global, const Exec& device) {
  static_assert(is_narrow<T>::value, "forward_train_narrow: bfloat16 or half storage");
  const Geo g = check_forward_train(spec, forward_where(spec, global), x, p, y, run, global);
  const Index S = g.stats();
  if (saved.mean.size() != S) saved.mean.resize(S);
  if (saved.mean_lo.size() != S) saved.mean_lo.resize(S);
  if (saved.rstd.size() != S) saved.rstd.resize(S);
  const WideParams wp = widen_params(p, g.C);
  // Each block updates its channels' running statistics, counting the batch on its own
  // copy of the counter; the caller's counts it once.
  const std::int64_t batches = run.num_batches_tracked ? *run.num_batches_tracked : 0;
  for_blocks<Isa>(spec, g, 1, device, [&](const Block& k, Stage& st) {
    float* buf = st.array(0);
    widen_block<Isa>(g, k.c0, k.cb, x.data, buf);
    std::int64_t count = batches;
    const Running<float> rb{slice(run.mean, k.c0, k.cb), slice(run.var, k.c0, k.cb),
                            run.num_batches_tracked ? &count : nullptr};
    ChannelMoments gm;
    if (global) {
      gm.count = global->count;
      gm.mean.resize(k.cb);
      gm.m2.resize(k.cb);
      for (Index c = 0; c < k.cb; ++c) {
        gm.mean(c) = global->mean(k.c0 + c);
        gm.m2(c) = global->m2(k.c0 + c);
      }
    }
    forward_train_run<Isa, float>(k.spec, k.g, block_view(x, static_cast<const float*>(buf), g, k.cb),
                                  block_params(wp, k.c0, k.cb), block_view(y, buf, g, k.cb), st.st,
                                  rb, global ? &gm : nullptr, Exec());
    narrow_block<Isa>(g, k.c0, k.cb, buf, y.data);
    for_block_stats(g, k, [&](Index i, Index j) {
      saved.mean(i) = st.st.mean(j);
      saved.mean_lo(i) = st.st.mean_lo(j);
      saved.rstd(i) = st.st.rstd(j);
    });
  });
  if (run.present() && run.num_batches_tracked) ++*run.num_batches_tracked;
}

template <class Isa, class T, class P>
void forward_eval_narrow(const Spec& spec, const View<const T>& x, const Affine<P>& p,
                         const Running<float>& run, const View<T>& y, const Exec& device) {
  static_assert(is_narrow<T>::value, "forward_eval_narrow: bfloat16 or half storage");
  const Geo g = check_forward_eval(spec, std::string(spec.op) + "::forward_eval", x, p, run, y);
  const WideParams wp = widen_params(p, g.C);
  for_blocks<Isa>(spec, g, 1, device, [&](const Block& k, Stage& st) {
    float* buf = st.array(0);
    widen_block<Isa>(g, k.c0, k.cb, x.data, buf);
    const Running<float> rb{slice(run.mean, k.c0, k.cb), slice(run.var, k.c0, k.cb), nullptr};
    forward_eval_run<Isa, float>(k.spec, k.g, block_view(x, static_cast<const float*>(buf), g, k.cb),
                                 block_params(wp, k.c0, k.cb), rb, block_view(y, buf, g, k.cb),
                                 Exec());
    narrow_block<Isa>(g, k.c0, k.cb, buf, y.data);
  });
}

template <class Isa, class T, class P>
void backward_train_narrow(const Spec& spec, const View<const T>& dy, const View<const T>& x,
                           const Affine<P>& p, const RowStats<float>& saved, const GlobalGrad* gg,
                           const View<T>& dx, const View<P>& dgamma, const View<P>& dbeta,
                           const Exec& device) {
  static_assert(is_narrow<T>::value, "backward_train_narrow: bfloat16 or half storage");
  const Geo g = check_backward_train(spec, backward_where(spec, gg), dy, x, p, saved, gg, dx,
                                     dgamma, dbeta);
  GradSums sums(g.C, dgamma, dbeta);
  const ParamGrads pg = sums.ptrs();
  const WideParams wp = widen_params(p, g.C);
  for_blocks<Isa>(spec, g, 2, device, [&](const Block& k, Stage& st) {
    float* bdy = st.array(0);
    float* bx = st.array(1);
    widen_block<Isa>(g, k.c0, k.cb, dy.data, bdy);
    widen_block<Isa>(g, k.c0, k.cb, x.data, bx);
    const Index S = k.g.stats();
    if (st.st.mean.size() != S) st.st.mean.resize(S);
    if (st.st.mean_lo.size() != S) st.st.mean_lo.resize(S);
    if (st.st.rstd.size() != S) st.st.rstd.resize(S);
    for_block_stats(g, k, [&](Index i, Index j) {
      st.st.mean(j) = saved.mean(i);
      st.st.mean_lo(j) = saved.mean_lo(i);
      st.st.rstd(j) = saved.rstd(i);
    });
    ChannelGradSums gs;
    GlobalGrad ggb{&gs, gg ? gg->count : 0.0};
    if (gg) {
      gs.sum_dy.resize(k.cb);
      gs.sum_dy_xhat.resize(k.cb);
      for (Index c = 0; c < k.cb; ++c) {
        gs.sum_dy(c) = gg->sums->sum_dy(k.c0 + c);
        gs.sum_dy_xhat(c) = gg->sums->sum_dy_xhat(k.c0 + c);
      }
    }
    const ParamGrads pgb{pg.dgamma ? pg.dgamma + k.c0 : nullptr, pg.dbeta ? pg.dbeta + k.c0 : nullptr};
    // dx in place of the staged dy.
    const View<float> dxb = dx.present ? block_view(dx, bdy, g, k.cb) : View<float>{};
    backward_train_run<Isa, float>(k.spec, k.g, block_view(dy, static_cast<const float*>(bdy), g, k.cb),
                                   block_view(x, static_cast<const float*>(bx), g, k.cb),
                                   wp.gamma ? wp.gamma + k.c0 : nullptr, st.st, gg ? &ggb : nullptr,
                                   dxb, pgb, Exec());
    if (dx.present) narrow_block<Isa>(g, k.c0, k.cb, bdy, dx.data);
  });
  write_grads_once(dgamma, dbeta, sums);
}

template <class Isa, class T, class P>
void backward_eval_narrow(const Spec& spec, const View<const T>& dy, const View<const T>& x,
                          const Affine<P>& p, const Running<float>& run, const View<T>& dx,
                          const View<P>& dgamma, const View<P>& dbeta, const Exec& device) {
  static_assert(is_narrow<T>::value, "backward_eval_narrow: bfloat16 or half storage");
  const Geo g = check_backward_eval(spec, std::string(spec.op) + "::backward_eval", dy, x, p, run,
                                    dx, dgamma, dbeta);
  GradSums sums(g.C, dgamma, dbeta);
  const ParamGrads pg = sums.ptrs();
  const WideParams wp = widen_params(p, g.C);
  for_blocks<Isa>(spec, g, 2, device, [&](const Block& k, Stage& st) {
    float* bdy = st.array(0);
    float* bx = st.array(1);
    widen_block<Isa>(g, k.c0, k.cb, dy.data, bdy);
    widen_block<Isa>(g, k.c0, k.cb, x.data, bx);
    const Running<float> rb{slice(run.mean, k.c0, k.cb), slice(run.var, k.c0, k.cb), nullptr};
    const ParamGrads pgb{pg.dgamma ? pg.dgamma + k.c0 : nullptr, pg.dbeta ? pg.dbeta + k.c0 : nullptr};
    const View<float> dxb = dx.present ? block_view(dx, bdy, g, k.cb) : View<float>{};
    backward_eval_run<Isa, float>(k.spec, k.g, block_view(dy, static_cast<const float*>(bdy), g, k.cb),
                                  block_view(x, static_cast<const float*>(bx), g, k.cb),
                                  wp.gamma ? wp.gamma + k.c0 : nullptr, rb, dxb, pgb, Exec());
    if (dx.present) narrow_block<Isa>(g, k.c0, k.cb, bdy, dx.data);
  });
  write_grads_once(dgamma, dbeta, sums);
}

template <class Isa, class T>
ChannelMoments partial_stats_narrow(const Spec& spec, const View<const T>& x, const Exec& device) {
  static_assert(is_narrow<T>::value, "partial_stats_narrow: bfloat16 or half storage");
  const Geo g = check_x(spec, std::string(spec.op) + "::partial_stats", "x", x, true);
  ChannelMoments out;
  out.count = static_cast<double>(g.count());
  out.mean.resize(g.C);
  out.m2.resize(g.C);
  out.mean.setZero();
  out.m2.setZero();
  if (g.count() == 0) return out;
  for_blocks<Isa>(spec, g, 1, device, [&](const Block& k, Stage& st) {
    float* buf = st.array(0);
    widen_block<Isa>(g, k.c0, k.cb, x.data, buf);
    const ChannelMoments b = partial_stats_run<Isa, float>(
        k.g, block_view(x, static_cast<const float*>(buf), g, k.cb), Exec());
    for (Index c = 0; c < k.cb; ++c) {
      out.mean(k.c0 + c) = b.mean(c);
      out.m2(k.c0 + c) = b.m2(c);
    }
  });
  return out;
}

template <class Isa, class T>
ChannelGradSums partial_grad_sums_narrow(const Spec& spec, const View<const T>& dy,
                                         const View<const T>& x, const RowStats<float>& saved,
                                         const Exec& device) {
  static_assert(is_narrow<T>::value, "partial_grad_sums_narrow: bfloat16 or half storage");
  const Geo g = check_partial_grad_sums(spec, std::string(spec.op) + "::partial_grad_sums", dy, x,
                                        saved);
  ChannelGradSums out;
  out.sum_dy.resize(g.C);
  out.sum_dy_xhat.resize(g.C);
  for_blocks<Isa>(spec, g, 2, device, [&](const Block& k, Stage& st) {
    float* bdy = st.array(0);
    float* bx = st.array(1);
    widen_block<Isa>(g, k.c0, k.cb, dy.data, bdy);
    widen_block<Isa>(g, k.c0, k.cb, x.data, bx);
    st.st.mean.resize(k.cb);
    st.st.mean_lo.resize(k.cb);
    st.st.rstd.resize(k.cb);
    for (Index c = 0; c < k.cb; ++c) {
      st.st.mean(c) = saved.mean(k.c0 + c);
      st.st.mean_lo(c) = saved.mean_lo(k.c0 + c);
      st.st.rstd(c) = saved.rstd(k.c0 + c);
    }
    const ChannelGradSums b = partial_grad_sums_run<Isa, float>(
        k.g, block_view(dy, static_cast<const float*>(bdy), g, k.cb),
        block_view(x, static_cast<const float*>(bx), g, k.cb), st.st, Exec());
    for (Index c = 0; c < k.cb; ++c) {
      out.sum_dy(k.c0 + c) = b.sum_dy(c);
      out.sum_dy_xhat(k.c0 + c) = b.sum_dy_xhat(c);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------
// What the public headers call: the float engine for float and double T, the staged one
// for narrow T. P: the parameters' type (T, or float for narrow T); S: the statistics'
// (stat_t<T>).

template <class Isa, class T, class P, class X, class Y, class Device>
void api_forward(const Spec& spec, const X& x, const Affine<P>& p, Y&& y,
                 RowStats<stat_t<T>>& saved, const Running<stat_t<T>>& run,
                 const ChannelMoments* global, const Device& device) {
  simd::visit<Isa, T>([&](auto isa_) {
    using I = decltype(isa_);
    if constexpr (is_narrow<T>::value)
      forward_train_narrow<I, T, P>(spec, in<T>(x), p, out<T>(y), saved, run, global, Exec(device));
    else
      forward_train<I, T>(spec, in<T>(x), p, out<T>(y), saved, run, global, Exec(device));
  });
}

template <class Isa, class T, class P, class X, class Y, class Device>
void api_forward_eval(const Spec& spec, const X& x, const Affine<P>& p,
                      const Running<stat_t<T>>& run, Y&& y, const Device& device) {
  simd::visit<Isa, T>([&](auto isa_) {
    using I = decltype(isa_);
    if constexpr (is_narrow<T>::value)
      forward_eval_narrow<I, T, P>(spec, in<T>(x), p, run, out<T>(y), Exec(device));
    else
      forward_eval<I, T>(spec, in<T>(x), p, run, out<T>(y), Exec(device));
  });
}

template <class Isa, class T, class P, class DY, class X, class DX, class DG, class DB,
          class Device>
void api_backward(const Spec& spec, const DY& dy, const X& x, const Affine<P>& p,
                  const RowStats<stat_t<T>>& saved, const GlobalGrad* gg, DX&& dx, DG&& dgamma,
                  DB&& dbeta, const Device& device) {
  simd::visit<Isa, T>([&](auto isa_) {
    using I = decltype(isa_);
    if constexpr (is_narrow<T>::value)
      backward_train_narrow<I, T, P>(spec, in<T>(dy), in<T>(x), p, saved, gg, out<T>(dx),
                                     out<P>(dgamma), out<P>(dbeta), Exec(device));
    else
      backward_train<I, T>(spec, in<T>(dy), in<T>(x), p, saved, gg, out<T>(dx), out<T>(dgamma),
                           out<T>(dbeta), Exec(device));
  });
}

template <class Isa, class T, class P, class DY, class X, class DX, class DG, class DB,
          class Device>
void api_backward_eval(const Spec& spec, const DY& dy, const X& x, const Affine<P>& p,
                       const Running<stat_t<T>>& run, DX&& dx, DG&& dgamma, DB&& dbeta,
                       const Device& device) {
  simd::visit<Isa, T>([&](auto isa_) {
    using I = decltype(isa_);
    if constexpr (is_narrow<T>::value)
      backward_eval_narrow<I, T, P>(spec, in<T>(dy), in<T>(x), p, run, out<T>(dx), out<P>(dgamma),
                                    out<P>(dbeta), Exec(device));
    else
      backward_eval<I, T>(spec, in<T>(dy), in<T>(x), p, run, out<T>(dx), out<T>(dgamma),
                          out<T>(dbeta), Exec(device));
  });
}

template <class Isa, class T, class X, class Device>
ChannelMoments api_partial_stats(const Spec& spec, const X& x, const Device& device) {
  return simd::visit<Isa, T>([&](auto isa_) {
    using I = decltype(isa_);
    if constexpr (is_narrow<T>::value)
      return partial_stats_narrow<I, T>(spec, in<T>(x), Exec(device));
    else
      return partial_stats<I, T>(spec, in<T>(x), Exec(device));
  });
}

template <class Isa, class T, class DY, class X, class Device>
ChannelGradSums api_partial_grad_sums(const Spec& spec, const DY& dy, const X& x,
                                      const RowStats<stat_t<T>>& saved, const Device& device) {
  return simd::visit<Isa, T>([&](auto isa_) {
    using I = decltype(isa_);
    if constexpr (is_narrow<T>::value)
      return partial_grad_sums_narrow<I, T>(spec, in<T>(dy), in<T>(x), saved, Exec(device));
    else
      return partial_grad_sums<I, T>(spec, in<T>(dy), in<T>(x), saved, Exec(device));
  });
}

}  // namespace channel
}  // namespace detail
}  // namespace normkit
