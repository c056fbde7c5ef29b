// BatchNorm, GroupNorm and InstanceNorm: forward (training and evaluation) and backward
// against the long double reference (channel_reference.hpp), finite differences, running
// statistics, data-parallel BatchNorm, threads, the scalar twin, the hard numerics of
// SPEC.md, invariants between the ops, and every error case.
//
// Data are generated in logical (N, C, M) order (M = product of the spatial extents) and
// scattered into channels-first (N, C, spatial...) or channels-last (N, spatial..., C)
// memory; every result is gathered back to logical order before it is compared.
#include "channel_reference.hpp"
#include "row_norm_checks.hpp"

#include <functional>
#include <optional>

namespace {

using normkit::AffineMode;
using normkit::ChannelFormat;
using nt::Buffer;
using nt::Index;
using nt::LD;
using nt::Mismatch;
using ref::ChanKind;
using Best = normkit::detail::simd::Best;
using Scalar = normkit::detail::simd::scalar::Isa;
template <class T>
using Stats = normkit::RowStats<T>;
template <class T>
using Vec1 = nt::Map<T, 1, Eigen::ColMajor>;
template <class T>
using CVec1 = nt::CMap<T, 1, Eigen::ColMajor>;

constexpr ChannelFormat kFirst = ChannelFormat::First;
constexpr ChannelFormat kLast = ChannelFormat::Last;
constexpr AffineMode kModes[3] = {AffineMode::ScaleShift, AffineMode::Scale, AffineMode::None};
constexpr ChanKind kKinds[3] = {ChanKind::Batch, ChanKind::Group, ChanKind::Instance};
constexpr double kEpsD = DBL_EPSILON;

std::size_t Z(Index i) { return static_cast<std::size_t>(i); }
Index I(std::size_t i) { return static_cast<Index>(i); }
double Dz(std::size_t v) { return static_cast<double>(v); }
double Dl(LD v) { return static_cast<double>(v); }
const char* kind_name(ChanKind k) {
  return k == ChanKind::Batch ? "BatchNorm" : k == ChanKind::Group ? "GroupNorm" : "InstanceNorm";
}
const char* fmt_name(ChannelFormat f) { return f == kFirst ? "channels first" : "channels last"; }

// The three ops behind one calling convention. The functor holds only hyper-parameters,
// so it is rebuilt for each call.
template <class T, class Isa = Best>
struct Chan {
  using type = T;
  ref::ChanNorm r;
  ChannelFormat fmt;
  AffineMode mode;
  Chan(ChanKind kind, ChannelFormat f, AffineMode m, double eps = 1e-5, int groups = 1,
       std::optional<double> momentum = 0.1)
      : r{kind, static_cast<std::size_t>(groups), m != AffineMode::None,
          m == AffineMode::ScaleShift, eps, momentum},
        fmt(f),
        mode(m) {}
  normkit::BatchNorm<T, Isa> bn() const {
    return normkit::BatchNorm<T, Isa>(fmt, r.eps, r.momentum, mode);
  }
  normkit::GroupNorm<T, Isa> gn() const {
    return normkit::GroupNorm<T, Isa>(static_cast<int>(r.groups), fmt, r.eps, mode);
  }
  normkit::InstanceNorm<T, Isa> in() const {
    return normkit::InstanceNorm<T, Isa>(fmt, r.eps, mode, r.momentum);
  }
  bool has_running() const { return r.kind != ChanKind::Group; }
};

// Training needs more than one value per statistic (BatchNorm: N * M; InstanceNorm: M).
bool can_train(const ref::ChanNorm& r, const ref::ChanShape& s) {
  if (r.kind == ChanKind::Batch) return s.N * s.M > 1;
  if (r.kind == ChanKind::Instance) return s.M > 1;
  return true;
}

// One problem: logical data and its memory format.
template <class T>
struct ChanProblem {
  ref::ChanShape s;
  std::vector<Index> spatial;  // outermost first
  ChannelFormat fmt;
  std::size_t shift;                                // misalignment of every buffer, elements
  std::vector<T> x, dy, gamma, beta, rmean, rvar;  // logical (n, c, m); [C]

  ChanProblem(std::size_t N, std::size_t C, std::vector<Index> sp, ChannelFormat f,
              std::size_t sh, std::uint64_t seed, double mean = 0.5, double sd = 2.0)
      : spatial(std::move(sp)), fmt(f), shift(sh) {
    s.N = N;
    s.C = C;
    s.M = 1;
    for (Index e : spatial) s.M *= Z(e);
    x.resize(s.size());
    dy.resize(s.size());
    gamma.resize(C);
    beta.resize(C);
    rmean.resize(C);
    rvar.resize(C);
    nt::fill_normal(x.data(), x.size(), seed, mean, sd);
    nt::fill_normal(dy.data(), dy.size(), seed + 1);
    nt::fill_normal(gamma.data(), C, seed + 2, 1.0, 0.5);
    nt::fill_normal(beta.data(), C, seed + 3, 0.0, 0.5);
    nt::fill_normal(rmean.data(), C, seed + 4, 0.3, 1.0);
    nt::fill_normal(rvar.data(), C, seed + 5, 0.0, 1.0);
    for (auto& v : rvar) v = std::fabs(v) + T(0.25);
  }
  // Extents in memory order, innermost first (what the engine sees).
  std::vector<Index> mem() const {
    std::vector<Index> d;
    if (fmt == kLast) d.push_back(I(s.C));
    for (auto it = spatial.rbegin(); it != spatial.rend(); ++it) d.push_back(*it);
    if (fmt == kFirst) d.push_back(I(s.C));
    d.push_back(I(s.N));
    return d;
  }
  std::size_t at(std::size_t n, std::size_t c, std::size_t m) const {
    return fmt == kFirst ? (n * s.C + c) * s.M + m : (n * s.M + m) * s.C + c;
  }
  Buffer<T> to_mem(const std::vector<T>& v) const {
    Buffer<T> b(s.size(), shift);
    for (std::size_t n = 0; n < s.N; ++n)
      for (std::size_t c = 0; c < s.C; ++c)
        for (std::size_t m = 0; m < s.M; ++m) b[at(n, c, m)] = v[s.at(n, c, m)];
    return b;
  }
  std::vector<T> from_mem(const T* p) const {
    std::vector<T> v(s.size());
    for (std::size_t n = 0; n < s.N; ++n)
      for (std::size_t c = 0; c < s.C; ++c)
        for (std::size_t m = 0; m < s.M; ++m) v[s.at(n, c, m)] = p[at(n, c, m)];
    return v;
  }
  Buffer<T> param(const std::vector<T>& v) const {
    Buffer<T> b(v.size(), shift);
    std::copy(v.begin(), v.end(), b.data());
    return b;
  }
};

template <class T>
normkit::Affine<T> affine_of(AffineMode m, const T* g, const T* b, Index C) {
  const CVec1<T> gm(g, C), bm(b, C);
  if (m == AffineMode::None) return {};
  if (m == AffineMode::Scale) return normkit::affine(gm);
  return normkit::affine(gm, bm);
}

template <class T>
normkit::Running<T> running_of(T* mean, T* var, Index C, std::int64_t* nbt) {
  Vec1<T> mm(mean, C), vm(var, C);
  return nbt ? normkit::running(mm, vm, *nbt) : normkit::running(mm, vm);
}

// ---- One call through any rank and layout -------------------------------------------

enum class Call { Fwd, FwdEval, Bwd, BwdEval };

template <class T>
struct Args {
  const T* x = nullptr;
  T* y = nullptr;  // may be x (in place)
  const T* dy = nullptr;
  T* dx = nullptr;  // nullptr: normkit::skip; may be dy (in place)
  T* dg = nullptr;
  T* db = nullptr;
  Index C = 0;
  normkit::Affine<T> p;
  normkit::Running<T> run;
  Stats<T>* saved = nullptr;
};

template <class T, class Isa, class Dev = Eigen::DefaultDevice>
void call(const Chan<T, Isa>& op, Call what, bool row_major, const std::vector<Index>& mem,
          const Args<T>& a, const Dev& dev = Dev()) {
  nt::with_tensors(row_major, mem, [&](auto tn) {
    if (what == Call::Fwd || what == Call::FwdEval) {
      const auto x = tn(a.x);
      auto y = tn(a.y);
      if (what == Call::Fwd) {
        if (op.r.kind == ChanKind::Batch)
          op.bn().forward(x, a.p, y, *a.saved, a.run, dev);
        else if (op.r.kind == ChanKind::Group)
          op.gn().forward(x, a.p, y, *a.saved, dev);
        else
          op.in().forward(x, a.p, y, *a.saved, a.run, dev);
      } else {
        if (op.r.kind == ChanKind::Batch)
          op.bn().forward_eval(x, a.p, a.run, y, dev);
        else if (op.r.kind == ChanKind::Instance)
          op.in().forward_eval(x, a.p, a.run, y, dev);
        else
          FAIL("GroupNorm has no evaluation mode");
      }
      return;
    }
    const auto dy = tn(a.dy);
    const auto x = tn(a.x);
    auto bwd = [&](auto&& dx) {
      nt::with_grad(a.dg, a.C, [&](auto&& dg) {
        nt::with_grad(a.db, a.C, [&](auto&& db) {
          if (what == Call::Bwd) {
            if (op.r.kind == ChanKind::Batch)
              op.bn().backward(dy, x, a.p, *a.saved, dx, dg, db, dev);
            else if (op.r.kind == ChanKind::Group)
              op.gn().backward(dy, x, a.p, *a.saved, dx, dg, db, dev);
            else
              op.in().backward(dy, x, a.p, *a.saved, dx, dg, db, dev);
          } else {
            if (op.r.kind == ChanKind::Batch)
              op.bn().backward_eval(dy, x, a.p, a.run, dx, dg, db, dev);
            else if (op.r.kind == ChanKind::Instance)
              op.in().backward_eval(dy, x, a.p, a.run, dx, dg, db, dev);
            else
              FAIL("GroupNorm has no evaluation mode");
          }
        });
      });
    };
    if (a.dx)
      bwd(tn(a.dx));
    else
      bwd(normkit::skip);
  });
}

// ---- A forward and backward run -----------------------------------------------------

struct Mask {
  bool dx = true, dg = true, db = true;
};

template <class T>
struct Result {
  Buffer<T> y, dx, dg, db, rm, rv;  // memory order; rm, rv: the running buffers after
  Stats<T> saved;
  std::int64_t nbt = 5;  // num_batches_tracked before the call
  Result(std::size_t n, std::size_t C, std::size_t shift)
      : y(n, shift), dx(n, shift), dg(C, shift), db(C, shift), rm(C, shift), rv(C, shift) {}
};

// Training (forward with batch statistics, running stats updated when the op has them,
// then backward) or evaluation (forward_eval, backward_eval with the running stats).
// Outputs start as NaN so that an element left unwritten fails the comparison.
template <class T, class Isa, class Dev = Eigen::DefaultDevice>
Result<T> run(const Chan<T, Isa>& op, const ChanProblem<T>& pr, const Buffer<T>& xb,
              const Buffer<T>& dyb, const normkit::Affine<T>& p, bool row_major, bool in_place,
              bool eval, Mask mk = {}, const Dev& dev = Dev()) {
  const std::size_t n = pr.s.size(), C = pr.s.C;
  Result<T> r(n, C, pr.shift);
  for (Buffer<T>* b : {&r.y, &r.dx, &r.dg, &r.db}) b->fill(std::numeric_limits<T>::quiet_NaN());
  std::copy(pr.rmean.begin(), pr.rmean.end(), r.rm.data());
  std::copy(pr.rvar.begin(), pr.rvar.end(), r.rv.data());
  const auto mem = pr.mem();
  Args<T> a;
  a.C = I(C);
  a.p = p;
  a.saved = &r.saved;
  if (op.has_running()) a.run = running_of(r.rm.data(), r.rv.data(), I(C), &r.nbt);
  a.x = xb.data();
  a.y = r.y.data();
  if (in_place) {
    std::copy(xb.data(), xb.data() + n, r.y.data());
    a.x = r.y.data();
  }
  call(op, eval ? Call::FwdEval : Call::Fwd, row_major, mem, a, dev);
  a.x = xb.data();
  a.dy = dyb.data();
  if (in_place && mk.dx) {
    std::copy(dyb.data(), dyb.data() + n, r.dx.data());
    a.dy = r.dx.data();
  }
  a.dx = mk.dx ? r.dx.data() : nullptr;
  a.dg = mk.dg && op.r.scale ? r.dg.data() : nullptr;
  a.db = mk.db && op.r.shift ? r.db.data() : nullptr;
  call(op, eval ? Call::BwdEval : Call::Bwd, row_major, mem, a, dev);
  return r;
}

// ---- Tolerances -----------------------------------------------------------------------
//
// Forward, element i of statistic group k (n_k elements; xhat from the reference):
// the engine computes y = fma((x - mean_hi) - mean_lo, A, B), A = T(rstd gamma) and B =
// beta rounded once, from statistics accumulated in double. Roundings of T: the two
// subtractions, A, and the fma: 8 eps_T |xhat gamma| + 2 eps_T |beta| (as the row norms).
// The double statistics add E_k = 4 n_k eps_d max|xhat| (the relative error of a double
// sum of n terms) plus 2 eps_d |mean| rstd (the double mean's own rounding, in xhat
// units), times |gamma|. Evaluation statistics are not accumulated: n_k counts as 0.
//
// Backward, dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy gamma (per group k):
//   (a) rstd: eps_T + 4 n eps_d relative, on every term;
//   (b) xhat_i: error e |xhat_i| + E_k (as forward), on the xhat mean(g xhat) term and
//       inside mean(g xhat) (<= e mean|g xhat| + E_k mean|g|);
//   (c) the element-wise roundings (coefficients rounded once to T, two fmas): e each term;
//   (d) the double sums mean(g), mean(g xhat): 4 n eps_d of their absolute sums.
// dgamma_c = sum dy xhat over the N*M elements of channel c: sum |dy| (e |xhat| + E_k),
// plus 4 N M eps_d sum |dy xhat| for the double sum and eps_T for the final rounding.
// dbeta_c = sum dy: (2 eps_T + 4 N M eps_d) sum |dy|.
// Evaluation backward: dx = dy A, A = T(gamma rstd_run): two roundings, 4 eps_T |g| rstd.
//
// Two kernels (the scalar twin, the other format) against each other ("ulp" bounds):
// their double statistics differ at the double rounding level, which can move A, mean_hi
// and the backward coefficients by one ulp of T and the result across one rounding
// boundary: y within 2 eps_T (|y| + |xhat gamma|) + 2 E_k |gamma|; dx within
// 2 eps_T (|dx| + rstd (|g| + mean|g| + |xhat| mean|g xhat|)) plus twice the double terms
// and an ulp of mean_hi in xc (eps_T |mean| rstd). dgamma, dbeta, saved statistics: twice
// the reference bound (each side is within it).
//
// typical = true replaces n by sqrt(n) in the double terms: the random-walk growth of
// rounding in a long sum (Eigen's sqrt(n) epsilon convention), for the large groups.
// Float statistics (include/normkit/detail/row_kernels.hpp, blocked_sums): the terms
// d = x - x0 (x0: the lower median of the group's first 5 elements in (n, c, m) order,
// or of a shard's: channel_norm.hpp group_shift) are rounded once in float (u = eps_f / 2)
// and summed in float trees of up to 16 terms (depth 4; channels last: 4 rows, depth 2)
// before the double accumulation: a sum term carries at most 5 roundings of u, a
// square 7 (2 from d, its product, the pair's fma, 3 adds). So, with dm = mean |x - x0|
// and d2 = mean (x - x0)^2 over the group (as nt::float_stats_err for the row norms):
//   |error of mean| <= 5 u dm,
//   |error of var|  <= 7 u d2 + 10 u |mean - x0| dm   (var = mean d^2 - (mean d)^2).
// Double data is summed exactly in double: no such term. worst: the bound over every
// possible x0 in the group (shards of a batch each shift by their own first element).
struct TreeErr {
  double mean = 0, var = 0;
};

template <class T>
std::vector<TreeErr> tree_err(const ref::ChanNorm& r, const ref::ChanShape& s,
                              const ref::ChanStatsLD& st, const T* x, bool worst = false) {
  const std::size_t G = ref::num_stats(r, s);
  std::vector<TreeErr> out(G);
  if (!std::is_same<T, float>::value) return out;
  std::vector<double> x0(G, 0), dm(G, 0), d2(G, 0), cnt(G, 0), far(G, 0);
  std::vector<std::vector<double>> first(G);
  for (std::size_t n = 0; n < s.N; ++n)
    for (std::size_t c = 0; c < s.C; ++c) {
      const std::size_t k = ref::stat_of(r, s, n, c);
      for (std::size_t m = 0; m < s.M; ++m) {
        const double v = static_cast<double>(x[s.at(n, c, m)]);
        if (first[k].size() < 5) first[k].push_back(v);
        far[k] = std::max(far[k], std::fabs(v - Dl(st.mean[k])));
      }
    }
  for (std::size_t k = 0; k < G; ++k) {
    if (!first[k].empty()) {
      std::sort(first[k].begin(), first[k].end());
      x0[k] = first[k][(first[k].size() - 1) / 2];
    }
    // The shift is a member of the group: none is farther from the mean than far.
    if (worst) x0[k] = Dl(st.mean[k]) + far[k];
  }
  for (std::size_t n = 0; n < s.N; ++n)
    for (std::size_t c = 0; c < s.C; ++c) {
      const std::size_t k = ref::stat_of(r, s, n, c);
      for (std::size_t m = 0; m < s.M; ++m) {
        const double d = static_cast<double>(x[s.at(n, c, m)]) - x0[k];
        dm[k] += std::fabs(d);
        d2[k] += d * d;
        cnt[k] += 1;
      }
    }
  const double eT = nt::eps_of<T>();
  for (std::size_t k = 0; k < G; ++k) {
    if (cnt[k] == 0) continue;
    dm[k] /= cnt[k];
    d2[k] /= cnt[k];
    const double u = eT / 2;
    out[k].mean = 5 * u * dm[k];
    out[k].var = 7 * u * d2[k] + 10 * u * std::fabs(Dl(st.mean[k]) - x0[k]) * dm[k];
  }
  return out;
}

struct Tol {
  ref::ChanStatsLD st;
  std::vector<TreeErr> tree;  // per statistic group; zero for eval and double
  std::vector<double> xhat, y, ytol, yulp, dx, dxtol, dxulp;  // per element, logical order
  std::vector<double> dg, dgtol, db, dbtol;                   // per channel
  std::vector<double> mean, meantol, rstd, rstdtol;           // per statistic group
};

template <class T>
Tol make_tol(const ref::ChanNorm& r, const ChanProblem<T>& pr, bool eval, bool typical = false,
             bool worst_shift = false) {
  const auto& s = pr.s;
  const double eT = nt::eps_of<T>(), e = 8 * eT;
  auto acc = [&](double n) { return 4 * (typical ? std::sqrt(n) : n) * kEpsD; };
  Tol t;
  t.st = eval ? ref::eval_stats(r, s, pr.rmean.data(), pr.rvar.data())
              : ref::chan_stats(r, s, pr.x.data());
  t.tree = eval ? std::vector<TreeErr>(ref::num_stats(r, s))
                : tree_err(r, s, t.st, pr.x.data(), worst_shift);
  const std::size_t G = ref::num_stats(r, s), n = s.size();
  const double en = eval ? 0.0 : acc(Dz(ref::stat_count(r, s)));
  const double er = acc(Dz(s.N * s.M));
  const auto yref = ref::chan_forward(r, s, pr.x.data(), pr.gamma.data(), pr.beta.data(), t.st);
  const auto gr = ref::chan_backward(r, s, pr.dy.data(), pr.x.data(), pr.gamma.data(), t.st, eval);
  t.xhat.resize(n);
  std::vector<double> g(n), xmax(G, 0), mg(G, 0), mgx(G, 0), E(G, 0), cnt(G, 0), rs(G, 0);
  for (std::size_t nn = 0; nn < s.N; ++nn)
    for (std::size_t c = 0; c < s.C; ++c) {
      const std::size_t k = ref::stat_of(r, s, nn, c);
      for (std::size_t m = 0; m < s.M; ++m) {
        const std::size_t i = s.at(nn, c, m);
        t.xhat[i] = Dl((static_cast<LD>(pr.x[i]) - t.st.mean[k]) * t.st.rstd[k]);
        g[i] = Dl(static_cast<LD>(pr.dy[i]) * ref::gamma_of(r, pr.gamma.data(), c));
        xmax[k] = std::max(xmax[k], std::fabs(t.xhat[i]));
        mg[k] += std::fabs(g[i]);
        mgx[k] += std::fabs(g[i] * t.xhat[i]);
        cnt[k] += 1;
      }
    }
  t.mean.resize(G);
  t.meantol.resize(G);
  t.rstd.resize(G);
  t.rstdtol.resize(G);
  for (std::size_t k = 0; k < G; ++k) {
    mg[k] /= std::max(cnt[k], 1.0);
    mgx[k] /= std::max(cnt[k], 1.0);
    rs[k] = Dl(t.st.rstd[k]);
    t.mean[k] = Dl(t.st.mean[k]);
    t.rstd[k] = rs[k];
    // Float statistics: xhat = (x - mean) rstd is off by err(mean) rstd + |xhat| err(rstd) /
    // rstd, and err(rstd) / rstd <= err(var) rstd^2 / 2.
    const double tm = t.tree[k].mean, tv = t.tree[k].var;
    E[k] = en * xmax[k] + 2 * kEpsD * std::fabs(t.mean[k]) * rs[k] + tm * rs[k] +
           xmax[k] * 0.5 * tv * rs[k] * rs[k];
    const double spread = rs[k] > 0 ? xmax[k] / rs[k] : 0.0;
    t.meantol[k] = (2 * eT * eT + en) * (std::fabs(t.mean[k]) + spread) +
                   2 * kEpsD * std::fabs(t.mean[k]) + tm;
    t.rstdtol[k] = (eT + en) * rs[k] + 0.5 * tv * rs[k] * rs[k] * rs[k];
  }
  t.y.resize(n);
  t.ytol.resize(n);
  t.yulp.resize(n);
  t.dx.resize(n);
  t.dxtol.resize(n);
  t.dxulp.resize(n);
  t.dg.assign(s.C, 0);
  t.dgtol.assign(s.C, 0);
  t.db.assign(s.C, 0);
  t.dbtol.assign(s.C, 0);
  std::vector<double> sdy(s.C, 0), sdyx(s.C, 0);
  for (std::size_t nn = 0; nn < s.N; ++nn)
    for (std::size_t c = 0; c < s.C; ++c) {
      const std::size_t k = ref::stat_of(r, s, nn, c);
      const double ga = std::fabs(Dl(ref::gamma_of(r, pr.gamma.data(), c)));
      const double ba = std::fabs(Dl(ref::beta_of(r, pr.beta.data(), c)));
      for (std::size_t m = 0; m < s.M; ++m) {
        const std::size_t i = s.at(nn, c, m);
        const double xh = std::fabs(t.xhat[i]), gi = std::fabs(g[i]);
        t.y[i] = Dl(yref[i]);
        t.ytol[i] = (e * xh + E[k]) * ga + 2 * eT * ba;
        t.yulp[i] = 2 * eT * (std::fabs(t.y[i]) + xh * ga) + 2 * E[k] * ga;
        t.dx[i] = Dl(gr.dx[i]);
        if (eval) {
          t.dxtol[i] = 4 * eT * gi * rs[k];
          t.dxulp[i] = 4 * eT * gi * rs[k];
        } else {
          t.dxtol[i] = rs[k] * ((e + en) * (gi + mg[k] + xh * mgx[k]) + (e * xh + E[k]) * mgx[k] +
                                xh * (e * mgx[k] + E[k] * mg[k]));
          t.dxulp[i] = 2 * eT * (std::fabs(t.dx[i]) + rs[k] * (gi + mg[k] + xh * mgx[k])) +
                       2 * rs[k] *
                           (en * (mg[k] + xh * mgx[k]) +
                            (E[k] + eT * std::fabs(t.mean[k]) * rs[k]) * (mgx[k] + xh * mg[k]));
        }
        const double ady = std::fabs(static_cast<double>(pr.dy[i]));
        t.dgtol[c] += ady * (e * xh + E[k]);
        sdyx[c] += ady * xh;
        sdy[c] += ady;
      }
    }
  for (std::size_t c = 0; c < s.C; ++c) {
    t.dg[c] = Dl(gr.dgamma[c]);
    t.db[c] = Dl(gr.dbeta[c]);
    t.dgtol[c] += (er + eT) * sdyx[c];
    t.dbtol[c] = (2 * eT + er) * sdy[c];
  }
  return t;
}

// Running statistics after one training forward from old_m, old_v, against the reference
// update. The engine forms (1 - w) old + w stat in double and rounds once to T: eps_T of
// the result, plus the double error of the batch statistics (4 n eps_d relative to the
// spread for the mean, to var for var, and N terms more for InstanceNorm's batch average)
// and of the update itself (a few eps_d), all scaled by `factor`.
template <class T>
void check_running(const ref::ChanNorm& r, const ref::ChanShape& s, const ref::ChanStatsLD& st,
                   const std::vector<TreeErr>& tree, const T* old_m, const T* old_v, long long nbt_after, const T* got_m,
                   const T* got_v, Mismatch& mm, double factor = 1.0) {
  std::vector<LD> nm(s.C), nv(s.C);
  for (std::size_t c = 0; c < s.C; ++c) {
    nm[c] = static_cast<LD>(old_m[c]);
    nv[c] = static_cast<LD>(old_v[c]);
  }
  ref::chan_running_update<T>(r, s, st, nbt_after, nm, nv);
  const double w = r.momentum ? *r.momentum : 1.0 / static_cast<double>(nbt_after);
  const double cnt = Dz(ref::stat_count(r, s));
  const double acc = 4 * (cnt + Dz(s.N) + 4) * kEpsD, eT = nt::eps_of<T>();
  for (std::size_t c = 0; c < s.C; ++c) {
    double mabs = 0, vabs = 0, spread = 0, K = 0, tm = 0, tv = 0;
    for (std::size_t n = 0; n < s.N; ++n) {
      const std::size_t k = ref::stat_of(r, s, n, c);
      tm += tree[k].mean;
      tv += tree[k].var * cnt / (cnt - 1);
      mabs += std::fabs(Dl(st.mean[k]));
      vabs += Dl(st.var[k]) * cnt / (cnt - 1);
      spread = std::max(spread, std::sqrt(Dl(st.var[k]) * cnt));
      K += 1;
      if (r.kind == ChanKind::Batch) break;
    }
    mabs /= K;
    vabs /= K;
    tm = eT * std::fabs(Dl(nm[c])) + w * tm / K +
         acc * ((1 - w) * std::fabs(static_cast<double>(old_m[c])) + w * (mabs + spread));
    tv = eT * std::fabs(Dl(nv[c])) + w * tv / K +
         acc * ((1 - w) * std::fabs(static_cast<double>(old_v[c])) + w * vabs);
    // A value beyond T's range (a float var of data ~ 1e20 is ~ 1e40) is stored as inf.
    auto in_t = [](LD v) {
      return std::fabs(v) > static_cast<LD>(std::numeric_limits<T>::max())
                 ? static_cast<double>(static_cast<T>(v > 0 ? std::numeric_limits<T>::infinity()
                                                            : -std::numeric_limits<T>::infinity()))
                 : Dl(v);
    };
    mm.check(static_cast<double>(got_m[c]), in_t(nm[c]), factor * tm, c, "running mean");
    mm.check(static_cast<double>(got_v[c]), in_t(nv[c]), factor * tv, c, "running var");
  }
}

template <class T>
bool same(const T* a, const T* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(T)) == 0;
}
template <class T>
bool same(const Eigen::Tensor<T, 1>& a, const Eigen::Tensor<T, 1>& b) {
  return a.size() == b.size() && same(a.data(), b.data(), Z(a.size()));
}

// Saved statistics against the reference, `factor` times the bound.
template <class T>
void check_saved(const Stats<T>& sv, const Tol& t, Mismatch& mm, double factor = 1.0) {
  const std::size_t G = t.mean.size();
  if (Z(sv.mean.size()) != G || Z(sv.mean_lo.size()) != G || Z(sv.rstd.size()) != G) {
    mm.check(static_cast<double>(sv.rstd.size()), Dz(G), 0, 0, "saved size");
    mm.check(static_cast<double>(sv.mean.size()), Dz(G), 0, 0, "saved size");
    mm.check(static_cast<double>(sv.mean_lo.size()), Dz(G), 0, 0, "saved size");
    return;
  }
  for (std::size_t k = 0; k < G; ++k) {
    const double m = static_cast<double>(sv.mean(I(k))) + static_cast<double>(sv.mean_lo(I(k)));
    mm.check(m, t.mean[k], factor * t.meantol[k], k, "saved mean + mean_lo");
    mm.check(static_cast<double>(sv.rstd(I(k))), t.rstd[k], factor * t.rstdtol[k], k, "saved rstd");
  }
}

// A run against the reference: what the mask asked for, saved and running statistics.
template <class T>
void compare(const ref::ChanNorm& r, const ChanProblem<T>& pr, const Tol& t, const Result<T>& res,
             Mask mk, bool eval, const std::string& what) {
  Mismatch my, ms, mx, mg, mb;
  const auto y = pr.from_mem(res.y.data());
  for (std::size_t i = 0; i < y.size(); ++i)
    my.check(static_cast<double>(y[i]), t.y[i], t.ytol[i], i, "y");
  const bool has_run = r.kind != ChanKind::Group;
  if (!eval) {
    check_saved(res.saved, t, ms);
    if (has_run) {
      check_running(r, pr.s, t.st, t.tree, pr.rmean.data(), pr.rvar.data(), 6, res.rm.data(),
                    res.rv.data(), ms);
      CHECK(res.nbt == 6);
    }
  } else {
    // Evaluation reads the running statistics and leaves them alone.
    CHECK(same(res.rm.data(), pr.rmean.data(), pr.s.C));
    CHECK(same(res.rv.data(), pr.rvar.data(), pr.s.C));
    CHECK(res.nbt == 5);
  }
  if (mk.dx) {
    const auto dx = pr.from_mem(res.dx.data());
    for (std::size_t i = 0; i < dx.size(); ++i)
      mx.check(static_cast<double>(dx[i]), t.dx[i], t.dxtol[i], i, "dx");
  }
  for (std::size_t c = 0; c < pr.s.C; ++c) {
    if (mk.dg && r.scale) mg.check(static_cast<double>(res.dg[c]), t.dg[c], t.dgtol[c], c, "dgamma");
    if (mk.db && r.shift) mb.check(static_cast<double>(res.db[c]), t.db[c], t.dbtol[c], c, "dbeta");
  }
  INFO(what << (eval ? " (eval)" : " (train)") << ": " << my.first << " | " << ms.first << " | "
            << mx.first << " | " << mg.first << " | " << mb.first);
  CHECK(my.count == 0);
  CHECK(ms.count == 0);
  CHECK(mx.count == 0);
  CHECK(mg.count == 0);
  CHECK(mb.count == 0);
}

// Two runs of the same logical problem (other backend or other format) against each other
// with the "ulp" bounds above; running statistics each against the reference.
template <class T>
void compare_pair(const ref::ChanNorm& r, const Tol& t, const ChanProblem<T>& pa, const Result<T>& a,
                  const ChanProblem<T>& pb, const Result<T>& b, bool eval, const std::string& what) {
  Mismatch my, ms, mx, mg, mb;
  const auto ya = pa.from_mem(a.y.data()), yb = pb.from_mem(b.y.data());
  const auto xa = pa.from_mem(a.dx.data()), xb = pb.from_mem(b.dx.data());
  for (std::size_t i = 0; i < ya.size(); ++i) {
    my.check(static_cast<double>(ya[i]), static_cast<double>(yb[i]), t.yulp[i], i, "y pair");
    mx.check(static_cast<double>(xa[i]), static_cast<double>(xb[i]), t.dxulp[i], i, "dx pair");
  }
  for (std::size_t c = 0; c < pa.s.C; ++c) {
    if (r.scale) mg.check(static_cast<double>(a.dg[c]), static_cast<double>(b.dg[c]), 2 * t.dgtol[c], c, "dgamma pair");
    if (r.shift) mb.check(static_cast<double>(a.db[c]), static_cast<double>(b.db[c]), 2 * t.dbtol[c], c, "dbeta pair");
  }
  if (!eval) {
    check_saved(a.saved, t, ms);
    check_saved(b.saved, t, ms);
    if (r.kind != ChanKind::Group) {
      check_running(r, pa.s, t.st, t.tree, pa.rmean.data(), pa.rvar.data(), 6, a.rm.data(), a.rv.data(), ms);
      check_running(r, pb.s, t.st, t.tree, pb.rmean.data(), pb.rvar.data(), 6, b.rm.data(), b.rv.data(), ms);
    }
  }
  INFO(what << (eval ? " (eval)" : " (train)") << ": " << my.first << " | " << ms.first << " | "
            << mx.first << " | " << mg.first << " | " << mb.first);
  CHECK(my.count == 0);
  CHECK(ms.count == 0);
  CHECK(mx.count == 0);
  CHECK(mg.count == 0);
  CHECK(mb.count == 0);
}

// Bitwise equality of every output of two runs.
template <class T>
void check_same_bits(const Result<T>& a, const Result<T>& b, const std::string& what) {
  INFO(what);
  CHECK(same(a.y.data(), b.y.data(), a.y.n));
  CHECK(same(a.dx.data(), b.dx.data(), a.dx.n));
  CHECK(same(a.dg.data(), b.dg.data(), a.dg.n));
  CHECK(same(a.db.data(), b.db.data(), a.db.n));
  CHECK(same(a.rm.data(), b.rm.data(), a.rm.n));
  CHECK(same(a.rv.data(), b.rv.data(), a.rv.n));
  CHECK(same(a.saved.mean, b.saved.mean));
  CHECK(same(a.saved.mean_lo, b.saved.mean_lo));
  CHECK(same(a.saved.rstd, b.saved.rstd));
  CHECK(a.nbt == b.nbt);
}

// Everything about one problem: training and evaluation, out of place in one layout
// (against the reference), the other layout over the same memory (the same bits), in
// place (forward y over x, backward dx over dy), and each gradient alone.
template <class T, class Isa>
void check_case(const Chan<T, Isa>& op, const ChanProblem<T>& pr, bool row_major, bool in_place) {
  const Buffer<T> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy);
  const Buffer<T> gb = pr.param(pr.gamma), bb = pr.param(pr.beta);
  const auto p = affine_of(op.mode, gb.data(), bb.data(), I(pr.s.C));
  const Mask singles[3] = {{true, false, false}, {false, true, false}, {false, false, true}};
  if (can_train(op.r, pr.s)) {
    const Tol t = make_tol(op.r, pr, false);
    const auto a = run(op, pr, xb, dyb, p, row_major, false, false);
    compare(op.r, pr, t, a, {}, false, "out of place");
    check_same_bits(a, run(op, pr, xb, dyb, p, !row_major, false, false),
                    "the other Eigen layout over the same memory");
    if (in_place) compare(op.r, pr, t, run(op, pr, xb, dyb, p, row_major, true, false), {}, false, "in place");
    for (const Mask& mk : singles) {
      if ((mk.dg && !op.r.scale) || (mk.db && !op.r.shift)) continue;
      compare(op.r, pr, t, run(op, pr, xb, dyb, p, row_major, false, false, mk), mk, false,
              "one gradient");
    }
  }
  if (op.has_running()) {
    const Tol t = make_tol(op.r, pr, true);
    const auto a = run(op, pr, xb, dyb, p, row_major, in_place, true);
    compare(op.r, pr, t, a, {}, true, in_place ? "in place" : "out of place");
    const auto b = run(op, pr, xb, dyb, p, !row_major, false, true);
    compare(op.r, pr, t, b, {}, true, "other layout");
    if (!in_place) check_same_bits(a, b, "eval, the other Eigen layout over the same memory");
    compare(op.r, pr, t, run(op, pr, xb, dyb, p, row_major, false, true, Mask{true, false, false}),
            Mask{true, false, false}, true, "dx only");
  }
}

// A divisor of C, chosen by i (GroupNorm's groups).
int divisor_of(std::size_t C, std::size_t i) {
  std::vector<int> d;
  for (std::size_t g = 1; g <= C; ++g)
    if (C % g == 0) d.push_back(static_cast<int>(g));
  return d[i % d.size()];
}

}  // namespace

// ---- Against the reference ----------------------------------------------------------

TEMPLATE_TEST_CASE("Channel norms: C and spatial sizes around the vector width, vs the reference",
                   "[channel]", float, double) {
  // Every (C, M) pair, both formats; the layout, misalignment, in-place and affine mode
  // cycle with the case index i (bits 1, 2, 3 and i % 3) so that each combination occurs.
  const std::size_t W[] = {1, 2, 3, 7, 8, 15, 16, 17, 31, 33};
  std::size_t i = 0;
  for (ChanKind kind : kKinds)
    for (std::size_t C : W)
      for (std::size_t M : W)
        for (ChannelFormat f : {kFirst, kLast}) {
          ++i;
          const AffineMode mode = kModes[i % 3];
          const bool row_major = (i >> 1) & 1, in_place = (i >> 3) & 1;
          const std::size_t shift = (i >> 2) & 1;
          const int G = kind == ChanKind::Group ? divisor_of(C, i) : 1;
          INFO(kind_name(kind) << ", " << fmt_name(f) << ", N 2, C " << C << ", M " << M << ", G "
                               << G << ", mode " << static_cast<int>(mode) << ", row major "
                               << row_major << ", shift " << shift << ", in place " << in_place);
          const ChanProblem<TestType> pr(2, C, {I(M)}, f, shift, 1000 + i);
          check_case(Chan<TestType>(kind, f, mode, 1e-5, G), pr, row_major, in_place);
        }
}

TEMPLATE_TEST_CASE("Channel norms: ranks 2 to 5, both layouts, in place, every affine mode",
                   "[channel]", float, double) {
  struct Shape {
    std::size_t N, C;
    std::vector<Index> sp;
  };
  const Shape shapes[] = {{5, 6, {}}, {3, 6, {7}}, {2, 6, {3, 5}}, {2, 6, {2, 3, 4}}};
  std::size_t i = 0;
  for (const Shape& sh : shapes)
    for (ChanKind kind : kKinds)
      for (ChannelFormat f : {kFirst, kLast})
        for (AffineMode mode : kModes)
          for (bool row_major : {true, false}) {
            ++i;
            const bool in_place = i % 2 == 0;
            const std::size_t shift = (i / 2) % 2;
            const int G = kind == ChanKind::Group ? (i % 3 == 0 ? 2 : 3) : 1;
            INFO(kind_name(kind) << ", " << fmt_name(f) << ", rank " << sh.sp.size() + 2
                                 << ", mode " << static_cast<int>(mode) << ", G " << G
                                 << ", row major " << row_major << ", in place " << in_place
                                 << ", shift " << shift);
            const ChanProblem<TestType> pr(sh.N, sh.C, sh.sp, f, shift, 2000 + i);
            check_case(Chan<TestType>(kind, f, mode, i % 4 == 0 ? 0.0 : 1e-3, G), pr, row_major,
                       in_place);
          }
}

TEST_CASE("Channel norms: training backward against central finite differences in double",
          "[channel][fd]") {
  // L = sum w y with w = dy, through the op's own forward. h = 1e-4 / rstd moves xhat by
  // 1e-4. Error of the central quotient: truncation h^2/6 |L'''| <= 5 h^2 rstd^3 sum_S |g|
  // (each third derivative of xhat over its group S is a few rstd^3 terms), plus the
  // rounding of L (16 eps_d sum (|w y| + |w|), both evaluations) divided by h. L is
  // linear in gamma and beta: only rounding remains there (h = 1e-3).
  struct Shape {
    ChanKind kind;
    std::size_t N, C;
    std::vector<Index> sp;
    int G;
  };
  const Shape shapes[] = {{ChanKind::Batch, 3, 2, {2, 2}, 1},
                          {ChanKind::Group, 2, 4, {3}, 2},
                          {ChanKind::Instance, 2, 3, {5}, 1}};
  std::uint64_t seed = 3000;
  for (const Shape& sh : shapes)
    for (ChannelFormat f : {kFirst, kLast})
      for (AffineMode mode : kModes) {
        INFO(kind_name(sh.kind) << ", " << fmt_name(f) << ", mode " << static_cast<int>(mode));
        const ChanProblem<double> pr(sh.N, sh.C, sh.sp, f, 0, ++seed);
        const Chan<double> op(sh.kind, f, mode, 1e-5, sh.G);
        const auto& s = pr.s;
        Buffer<double> xb = pr.to_mem(pr.x), gb = pr.param(pr.gamma), bb = pr.param(pr.beta);
        const Buffer<double> dyb = pr.to_mem(pr.dy);
        const auto mem = pr.mem();
        std::vector<double> y(s.size());
        auto loss = [&]() {
          Stats<double> sv;
          Args<double> a;
          a.x = xb.data();
          a.y = y.data();
          a.p = affine_of(mode, gb.data(), bb.data(), I(s.C));
          a.saved = &sv;
          call(op, Call::Fwd, true, mem, a);
          return nt::weighted_sum(dyb.data(), y.data(), y.size());
        };
        const auto p = affine_of(mode, gb.data(), bb.data(), I(s.C));
        const auto res = run(op, pr, xb, dyb, p, true, false, false);
        const auto st = ref::chan_stats(op.r, s, pr.x.data());
        loss();
        double sum_wy = 0;
        for (std::size_t i = 0; i < y.size(); ++i) sum_wy += std::fabs(dyb[i] * y[i]) + std::fabs(dyb[i]);
        const double round = 16 * kEpsD * sum_wy;
        std::vector<double> sum_g(ref::num_stats(op.r, s), 0.0);
        for (std::size_t n = 0; n < s.N; ++n)
          for (std::size_t c = 0; c < s.C; ++c)
            for (std::size_t m = 0; m < s.M; ++m)
              sum_g[ref::stat_of(op.r, s, n, c)] +=
                  std::fabs(pr.dy[s.at(n, c, m)] * Dl(ref::gamma_of(op.r, pr.gamma.data(), c)));
        Mismatch mm;
        for (std::size_t n = 0; n < s.N; ++n)
          for (std::size_t c = 0; c < s.C; ++c)
            for (std::size_t m = 0; m < s.M; ++m) {
              const std::size_t k = ref::stat_of(op.r, s, n, c), j = pr.at(n, c, m);
              const double rstd = Dl(st.rstd[k]), h = 1e-4 / rstd;
              const double tol = 5 * h * h * rstd * rstd * rstd * sum_g[k] + round / h;
              mm.check(res.dx[j], nt::central(loss, xb[j], h), tol, j, "dx vs finite difference");
            }
        const double hg = 1e-3;
        for (std::size_t c = 0; c < s.C; ++c) {
          if (op.r.scale) mm.check(res.dg[c], nt::central(loss, gb[c], hg), round / hg, c, "dgamma vs finite difference");
          if (op.r.shift) mm.check(res.db[c], nt::central(loss, bb[c], hg), round / hg, c, "dbeta vs finite difference");
        }
        INFO(mm.first);
        CHECK(mm.count == 0);
      }
}

// ---- Running statistics ---------------------------------------------------------------

TEMPLATE_TEST_CASE("BatchNorm and InstanceNorm: running statistics over three batches",
                   "[channel][running]", float, double) {
  using T = TestType;
  const std::optional<double> momenta[] = {0.1, 0.0, 1.0, std::nullopt};
  for (ChanKind kind : {ChanKind::Batch, ChanKind::Instance})
    for (ChannelFormat f : {kFirst, kLast})
      for (const auto& mom : momenta)
        for (bool track : {true, false}) {
          if (!mom && !track) continue;  // cumulative needs the counter: an error case
          INFO(kind_name(kind) << ", " << fmt_name(f) << ", momentum "
                               << (mom ? std::to_string(*mom) : "none (cumulative)")
                               << ", tracked " << track);
          const std::size_t C = 5;
          const ChanProblem<T> init(3, C, {4, 3}, f, 1, 4000);
          const Buffer<T> rm0 = init.param(init.rmean), rv0 = init.param(init.rvar);
          Buffer<T> rm = init.param(init.rmean), rv = init.param(init.rvar);
          std::int64_t nbt = 0;
          const Chan<T> op(kind, f, AffineMode::ScaleShift, 1e-5, 1, mom);
          for (int b = 0; b < 3; ++b) {
            INFO("batch " << b);
            // Each batch has its own data, with a different mean and spread.
            const ChanProblem<T> pr(3, C, {4, 3}, f, 1, 4100 + static_cast<std::uint64_t>(b),
                                    0.5 + b, 1.0 + 0.5 * b);
            const Buffer<T> xb = pr.to_mem(pr.x), gb = pr.param(pr.gamma), bb = pr.param(pr.beta);
            Buffer<T> y(pr.s.size(), 1);
            const std::vector<T> old_m(rm.data(), rm.data() + C), old_v(rv.data(), rv.data() + C);
            Stats<T> sv;
            Args<T> a;
            a.x = xb.data();
            a.y = y.data();
            a.p = affine_of(op.mode, gb.data(), bb.data(), I(C));
            a.saved = &sv;
            a.run = running_of(rm.data(), rv.data(), I(C), track ? &nbt : nullptr);
            call(op, Call::Fwd, b % 2 == 0, pr.mem(), a);
            CHECK(nbt == (track ? b + 1 : 0));
            if (mom && *mom == 0.0) {
              // (1 - 0) old + 0 stat is old exactly, in double and after rounding to T.
              CHECK(same(rm.data(), rm0.data(), C));
              CHECK(same(rv.data(), rv0.data(), C));
              continue;
            }
            Mismatch mm;
            const auto st = ref::chan_stats(op.r, pr.s, pr.x.data());
            check_running(op.r, pr.s, st, tree_err(op.r, pr.s, st, pr.x.data()), old_m.data(),
                          old_v.data(), b + 1, rm.data(), rv.data(), mm);
            INFO(mm.first);
            CHECK(mm.count == 0);
          }
        }
}

// ---- Data-parallel (Sync) BatchNorm -----------------------------------------------------

TEMPLATE_TEST_CASE("BatchNorm: shards of a batch reproduce the whole batch", "[channel][sync]",
                   float, double) {
  // Per shard: partial_stats; merge in order; forward_global; partial_grad_sums; merge;
  // backward_global. Against the whole batch: each side is within the reference bound,
  // so they are within twice it; one shard must give the same bits.
  using T = TestType;
  const std::vector<std::vector<std::size_t>> splits{{7}, {3, 4}, {2, 0, 5}, {1, 2, 0, 4}};
  const std::size_t N = 7, C = 5;
  std::uint64_t seed = 5000;
  for (ChannelFormat f : {kFirst, kLast})
    for (AffineMode mode : {AffineMode::ScaleShift, AffineMode::None}) {
      const ChanProblem<T> pr(N, C, {2, 3}, f, 1, ++seed);
      const Chan<T> op(ChanKind::Batch, f, mode);
      const auto bn = op.bn();
      const Buffer<T> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy), gb = pr.param(pr.gamma),
                      bb = pr.param(pr.beta);
      const auto p = affine_of(mode, gb.data(), bb.data(), I(C));
      const auto whole = run(op, pr, xb, dyb, p, true, false, false);
      // Every shard shifts its float sums by its own first element: the bounds that hold
      // for any shift (tree_err's worst).
      const Tol t = make_tol(op.r, pr, false, false, true);
      compare(op.r, pr, t, whole, {}, false, "whole batch");
      const std::size_t per = C * pr.s.M;  // elements per sample, contiguous in both formats
      const auto mem = pr.mem();
      auto dims = [&](std::size_t n) {
        std::array<Index, 4> d{mem[0], mem[1], mem[2], I(n)};
        return d;
      };
      for (const auto& split : splits) {
        INFO(fmt_name(f) << ", mode " << static_cast<int>(mode) << ", " << split.size() << " shards");
        std::vector<normkit::ChannelMoments> mom;
        std::size_t off = 0;
        for (std::size_t n : split) {
          mom.push_back(bn.partial_stats(nt::cmap<T, 4, Eigen::RowMajor>(xb.data() + off * per, dims(n))));
          CHECK(mom.back().count == Dz(n * pr.s.M));
          off += n;
        }
        normkit::ChannelMoments g = mom[0];
        for (std::size_t k = 1; k < mom.size(); ++k) g = normkit::merge(g, mom[k]);
        REQUIRE(g.count == Dz(N * pr.s.M));
        REQUIRE(g.mean.size() == I(C));
        REQUIRE(g.m2.size() == I(C));
        {
          // Merged moments in double: the mean within the reference mean bound, m2 = n var
          // within 4 n eps_d relative (a double sum) plus the merge's few roundings.
          Mismatch mm;
          for (std::size_t c = 0; c < C; ++c) {
            const double m2 = Dl(t.st.var[c]) * g.count;
            mm.check(g.mean(I(c)), t.mean[c], t.meantol[c], c, "merged mean");
            mm.check(g.m2(I(c)), m2, 4 * (g.count + 8) * kEpsD * m2 + t.tree[c].var * g.count, c,
                     "merged m2");
          }
          INFO(mm.first);
          CHECK(mm.count == 0);
        }
        Result<T> sh(pr.s.size(), C, pr.shift);
        sh.y.fill(std::numeric_limits<T>::quiet_NaN());
        sh.dx.fill(std::numeric_limits<T>::quiet_NaN());
        std::vector<Stats<T>> saved(split.size());
        std::vector<normkit::ChannelGradSums> sums;
        off = 0;
        Mismatch mr;
        for (std::size_t k = 0; k < split.size(); ++k) {
          const std::size_t n = split[k];
          Buffer<T> rm = pr.param(pr.rmean), rv = pr.param(pr.rvar);
          std::int64_t nbt = 5;
          const auto x = nt::cmap<T, 4, Eigen::RowMajor>(xb.data() + off * per, dims(n));
          bn.forward_global(x, p, g, nt::map<T, 4, Eigen::RowMajor>(sh.y.data() + off * per, dims(n)),
                            saved[k], running_of(rm.data(), rv.data(), I(C), &nbt));
          CHECK(nbt == 6);
          // Every shard's copy of the running statistics gets the whole batch's update.
          check_running(op.r, pr.s, t.st, t.tree, pr.rmean.data(), pr.rvar.data(), 6, rm.data(), rv.data(), mr);
          if (split.size() == 1) {
            CHECK(same(rm.data(), whole.rm.data(), C));
            CHECK(same(rv.data(), whole.rv.data(), C));
          }
          sums.push_back(bn.partial_grad_sums(
              nt::cmap<T, 4, Eigen::RowMajor>(dyb.data() + off * per, dims(n)), x, saved[k]));
          off += n;
        }
        normkit::ChannelGradSums gs = sums[0];
        for (std::size_t k = 1; k < sums.size(); ++k) gs = normkit::merge(gs, sums[k]);
        REQUIRE(gs.sum_dy.size() == I(C));
        REQUIRE(gs.sum_dy_xhat.size() == I(C));
        off = 0;
        for (std::size_t k = 0; k < split.size(); ++k) {
          const std::size_t n = split[k];
          const auto x = nt::cmap<T, 4, Eigen::RowMajor>(xb.data() + off * per, dims(n));
          const auto dy = nt::cmap<T, 4, Eigen::RowMajor>(dyb.data() + off * per, dims(n));
          auto dx = nt::map<T, 4, Eigen::RowMajor>(sh.dx.data() + off * per, dims(n));
          Buffer<T> dg(C, 0), db(C, 0);
          if (mode == AffineMode::ScaleShift)
            bn.backward_global(dy, x, p, saved[k], gs, g.count, dx, Vec1<T>(dg.data(), I(C)),
                               Vec1<T>(db.data(), I(C)));
          else
            bn.backward_global(dy, x, p, saved[k], gs, g.count, dx, normkit::skip, normkit::skip);
          if (mode == AffineMode::ScaleShift) {
            Mismatch mg;
            for (std::size_t c = 0; c < C; ++c) {
              mg.check(static_cast<double>(dg[c]), static_cast<double>(whole.dg[c]), 2 * t.dgtol[c], c, "dgamma");
              mg.check(static_cast<double>(db[c]), static_cast<double>(whole.db[c]), 2 * t.dbtol[c], c, "dbeta");
            }
            INFO("shard " << k << ": " << mg.first);
            CHECK(mg.count == 0);
            if (split.size() == 1) {
              CHECK(same(dg.data(), whole.dg.data(), C));
              CHECK(same(db.data(), whole.db.data(), C));
            }
          }
          off += n;
        }
        // The merged sums are the whole batch's dbeta and dgamma, in double.
        Mismatch ms;
        for (std::size_t c = 0; c < C; ++c) {
          ms.check(gs.sum_dy(I(c)), t.db[c], t.dbtol[c], c, "merged sum_dy");
          ms.check(gs.sum_dy_xhat(I(c)), t.dg[c], t.dgtol[c], c, "merged sum_dy_xhat");
        }
        for (std::size_t k = 0; k < split.size(); ++k) check_saved(saved[k], t, ms, 2.0);
        Mismatch my;
        const auto ys = pr.from_mem(sh.y.data()), yw = pr.from_mem(whole.y.data());
        const auto xs = pr.from_mem(sh.dx.data()), xw = pr.from_mem(whole.dx.data());
        for (std::size_t i = 0; i < ys.size(); ++i) {
          my.check(static_cast<double>(ys[i]), static_cast<double>(yw[i]), 2 * t.ytol[i], i, "y");
          my.check(static_cast<double>(xs[i]), static_cast<double>(xw[i]), 2 * t.dxtol[i], i, "dx");
        }
        INFO(my.first << " | " << ms.first << " | " << mr.first);
        CHECK(my.count == 0);
        CHECK(ms.count == 0);
        CHECK(mr.count == 0);
        if (split.size() == 1) {
          CHECK(same(sh.y.data(), whole.y.data(), sh.y.n));
          CHECK(same(sh.dx.data(), whole.dx.data(), sh.dx.n));
          CHECK(same(saved[0].mean, whole.saved.mean));
          CHECK(same(saved[0].mean_lo, whole.saved.mean_lo));
          CHECK(same(saved[0].rstd, whole.saved.rstd));
        }
      }
    }
}

// ---- Threads and backends ---------------------------------------------------------------

TEMPLATE_TEST_CASE("Channel norms: bitwise identical for any number of threads", "[channel][threads]",
                   float, double) {
  // Shapes large enough that two threads split the work: BatchNorm channels-last has
  // N * M = 4096 rows of C; channels-first 19 channels of N * M.
  using T = TestType;
  struct Shape {
    ChanKind kind;
    std::size_t N, C;
    std::vector<Index> sp;
    int G;
  };
  const Shape shapes[] = {{ChanKind::Batch, 4, 19, {32, 32}, 1},
                          {ChanKind::Group, 6, 32, {20, 20}, 8},
                          {ChanKind::Instance, 6, 24, {20, 20}, 1}};
  Eigen::ThreadPool pool1(1), pool2(2);
  const Eigen::ThreadPoolDevice dev1(&pool1, 1), dev2(&pool2, 2);
  std::uint64_t seed = 6000;
  for (const Shape& sh : shapes)
    for (ChannelFormat f : {kFirst, kLast}) {
      INFO(kind_name(sh.kind) << ", " << fmt_name(f));
      const ChanProblem<T> pr(sh.N, sh.C, sh.sp, f, 0, ++seed);
      const Chan<T> op(sh.kind, f, AffineMode::ScaleShift, 1e-5, sh.G);
      const Buffer<T> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy), gb = pr.param(pr.gamma),
                      bb = pr.param(pr.beta);
      const auto p = affine_of(op.mode, gb.data(), bb.data(), I(sh.C));
      for (bool eval : {false, true}) {
        if (eval && !op.has_running()) continue;
        const auto a = run(op, pr, xb, dyb, p, true, false, eval, {}, Eigen::DefaultDevice());
        check_same_bits(a, run(op, pr, xb, dyb, p, true, false, eval, {}, dev1), "pool of 1");
        check_same_bits(a, run(op, pr, xb, dyb, p, true, false, eval, {}, dev2), "pool of 2");
      }
      if (sh.kind == ChanKind::Batch) {
        const auto bn = op.bn();
        const auto x = nt::cmap<T, 4, Eigen::RowMajor>(xb.data(), {pr.mem()[0], pr.mem()[1], pr.mem()[2], pr.mem()[3]});
        const auto m0 = bn.partial_stats(x), m1 = bn.partial_stats(x, dev1), m2 = bn.partial_stats(x, dev2);
        CHECK(same(m0.mean, m1.mean));
        CHECK(same(m0.mean, m2.mean));
        CHECK(same(m0.m2, m1.m2));
        CHECK(same(m0.m2, m2.m2));
      }
    }
}

TEMPLATE_TEST_CASE("Channel norms: the compiled backend matches its scalar twin",
                   "[channel][simd]", float, double) {
  // Sizes around every vector width, misaligned; bounds: the "ulp" ones of make_tol.
  INFO("backend " << normkit::active_isa());
  using T = TestType;
  const std::size_t W[] = {1, 2, 3, 7, 8, 15, 16, 17, 31, 33};
  std::size_t i = 0;
  for (ChanKind kind : kKinds)
    for (std::size_t C : W)
      for (std::size_t M : W) {
        ++i;
        const ChannelFormat f = i % 2 ? kFirst : kLast;
        const std::size_t shift = (i / 2) % 2;
        const AffineMode mode = kModes[i % 3];
        const int G = kind == ChanKind::Group ? divisor_of(C, i) : 1;
        INFO(kind_name(kind) << ", " << fmt_name(f) << ", C " << C << ", M " << M << ", G " << G
                             << ", shift " << shift << ", mode " << static_cast<int>(mode));
        const ChanProblem<T> pr(2, C, {I(M)}, f, shift, 7000 + i);
        const Chan<T> best(kind, f, mode, 1e-5, G);
        const Chan<T, Scalar> scal(kind, f, mode, 1e-5, G);
        const Buffer<T> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy), gb = pr.param(pr.gamma),
                        bb = pr.param(pr.beta);
        const auto p = affine_of(mode, gb.data(), bb.data(), I(C));
        for (bool eval : {false, true}) {
          if (eval ? !best.has_running() : !can_train(best.r, pr.s)) continue;
          const Tol t = make_tol(best.r, pr, eval);
          const auto a = run(best, pr, xb, dyb, p, true, false, eval);
          const auto b = run(scal, pr, xb, dyb, p, false, false, eval);
          compare_pair(best.r, t, pr, a, pr, b, eval, "best vs scalar twin");
        }
      }
}

// ---- Hard numerics ------------------------------------------------------------------------

TEST_CASE("Channel norms: large statistic groups, within sqrt(n) eps of the reference",
          "[channel][numerics]") {
  // A BatchNorm channel of 32 * 56 * 56 = 100352 floats and a GroupNorm group of
  // 4 * 512 * 512 = 1048576 doubles, with the typical (sqrt(n)) double bounds of make_tol.
  {
    const ChanProblem<float> pr(32, 2, {56, 56}, kFirst, 1, 8000);
    const Chan<float> op(ChanKind::Batch, kFirst, AffineMode::ScaleShift);
    const Buffer<float> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy), gb = pr.param(pr.gamma),
                        bb = pr.param(pr.beta);
    const auto p = affine_of(op.mode, gb.data(), bb.data(), 2);
    compare(op.r, pr, make_tol(op.r, pr, false, true), run(op, pr, xb, dyb, p, true, false, false),
            {}, false, "BatchNorm, 100352 per channel");
  }
  {
    const ChanProblem<double> pr(1, 4, {512, 512}, kLast, 0, 8001);
    const Chan<double> op(ChanKind::Group, kLast, AffineMode::ScaleShift, 1e-5, 1);
    const Buffer<double> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy), gb = pr.param(pr.gamma),
                         bb = pr.param(pr.beta);
    const auto p = affine_of(op.mode, gb.data(), bb.data(), 4);
    compare(op.r, pr, make_tol(op.r, pr, false, true), run(op, pr, xb, dyb, p, false, false, false),
            {}, false, "GroupNorm, 1048576 per group");
  }
}

TEMPLATE_TEST_CASE("Channel norms: x = 1e4 + 1e-2 randn is within 1e-4 of the reference",
                   "[channel][numerics]", float, double) {
  // SPEC.md: within 1e-4 of a reference from the same inputs (a float mean alone is off by
  // 0.1-0.3); also within make_tol's bounds, backward included (it rebuilds xhat from
  // mean + mean_lo).
  using T = TestType;
  struct Shape {
    ChanKind kind;
    std::size_t N, C;
    std::vector<Index> sp;
    int G;
  };
  const Shape shapes[] = {{ChanKind::Batch, 4, 3, {192}, 1},
                          {ChanKind::Group, 2, 8, {12, 16}, 2},
                          {ChanKind::Instance, 2, 3, {768}, 1}};
  std::uint64_t seed = 8100;
  for (const Shape& sh : shapes)
    for (ChannelFormat f : {kFirst, kLast}) {
      INFO(kind_name(sh.kind) << ", " << fmt_name(f));
      const ChanProblem<T> pr(sh.N, sh.C, sh.sp, f, 1, ++seed, 1e4, 1e-2);
      const Chan<T> op(sh.kind, f, AffineMode::ScaleShift, 1e-5, sh.G);
      const Buffer<T> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy), gb = pr.param(pr.gamma),
                      bb = pr.param(pr.beta);
      const auto p = affine_of(op.mode, gb.data(), bb.data(), I(sh.C));
      const Tol t = make_tol(op.r, pr, false);
      const auto r = run(op, pr, xb, dyb, p, f == kFirst, false, false);
      const auto y = pr.from_mem(r.y.data());
      double worst = 0;
      for (std::size_t i = 0; i < y.size(); ++i)
        worst = std::max(worst, std::fabs(static_cast<double>(y[i]) - t.y[i]));
      INFO("max |y - y_ref| = " << worst);
      CHECK(worst <= 1e-4);
      compare(op.r, pr, t, r, {}, false, "large mean");
    }
}

TEMPLATE_TEST_CASE("Channel norms: a constant group gives exactly beta, also with eps = 0",
                   "[channel][numerics]", float, double) {
  using T = TestType;
  for (ChanKind kind : kKinds)
    for (ChannelFormat f : {kFirst, kLast})
      for (double eps : {1e-5, 0.0})
        for (AffineMode mode : kModes) {
          INFO(kind_name(kind) << ", " << fmt_name(f) << ", eps " << eps << ", mode "
                               << static_cast<int>(mode));
          ChanProblem<T> pr(3, 6, {5, 3}, f, 1, 9000);
          const Chan<T> op(kind, f, mode, eps, 3);
          // Each statistic group its own constant (none exactly representable in binary).
          for (std::size_t n = 0; n < pr.s.N; ++n)
            for (std::size_t c = 0; c < pr.s.C; ++c)
              for (std::size_t m = 0; m < pr.s.M; ++m)
                pr.x[pr.s.at(n, c, m)] =
                    static_cast<T>(1234.5678 + 0.37 * Dz(ref::stat_of(op.r, pr.s, n, c)));
          const Buffer<T> xb = pr.to_mem(pr.x), gb = pr.param(pr.gamma), bb = pr.param(pr.beta);
          Buffer<T> y(pr.s.size(), 0);
          Stats<T> sv;
          Args<T> a;
          a.x = xb.data();
          a.y = y.data();
          a.p = affine_of(mode, gb.data(), bb.data(), I(pr.s.C));
          a.saved = &sv;
          call(op, Call::Fwd, true, pr.mem(), a);
          const auto yl = pr.from_mem(y.data());
          std::size_t bad = 0;
          for (std::size_t n = 0; n < pr.s.N; ++n)
            for (std::size_t c = 0; c < pr.s.C; ++c)
              for (std::size_t m = 0; m < pr.s.M; ++m) {
                const T v = yl[pr.s.at(n, c, m)];
                // fma(0, A, beta) is beta itself; without beta, 0 (either sign).
                if (mode == AffineMode::ScaleShift ? !same(&v, &pr.beta[c], 1) : v != T(0)) ++bad;
              }
          CHECK(bad == 0);
        }
}

TEMPLATE_TEST_CASE("Channel norms: |x| ~ 1e19, 1e20 and ~ 1e-25 give finite, correct results",
                   "[channel][numerics]", float, double) {
  // float: x^2 overflows (1e38 * spread) or underflows (1e-50); the statistics are in
  // double, so make_tol's bounds hold unchanged.
  using T = TestType;
  std::uint64_t seed = 9100;
  for (double sc : {1e19, 1e20, 1e-25})
    for (double eps : {1e-5, 0.0}) {
      if (sc < 1 && eps > 0) continue;  // eps would swamp the variance
      for (ChanKind kind : kKinds)
        for (ChannelFormat f : {kFirst, kLast}) {
          INFO(kind_name(kind) << ", " << fmt_name(f) << ", scale " << sc << ", eps " << eps);
          const ChanProblem<T> pr(2, 6, {4, 5}, f, 0, ++seed, 0.5 * sc, sc);
          const Chan<T> op(kind, f, AffineMode::ScaleShift, eps, 2);
          const Buffer<T> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy), gb = pr.param(pr.gamma),
                          bb = pr.param(pr.beta);
          const auto p = affine_of(op.mode, gb.data(), bb.data(), 6);
          const auto r = run(op, pr, xb, dyb, p, true, false, false);
          CHECK(std::all_of(r.y.data(), r.y.data() + r.y.n, [](T v) { return std::isfinite(v); }));
          CHECK(std::all_of(r.dx.data(), r.dx.data() + r.dx.n, [](T v) { return std::isfinite(v); }));
          compare(op.r, pr, make_tol(op.r, pr, false), r, {}, false, "extreme magnitude");
        }
    }
}

TEMPLATE_TEST_CASE("Channel norms: NaN or Inf poisons only its own statistic group",
                   "[channel][numerics]", float, double) {
  using T = TestType;
  for (T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()})
    for (ChanKind kind : kKinds)
      for (ChannelFormat f : {kFirst, kLast}) {
        INFO(kind_name(kind) << ", " << fmt_name(f) << ", bad " << bad);
        ChanProblem<T> pr(3, 6, {4, 5}, f, 0, 9200);
        const Chan<T> op(kind, f, AffineMode::ScaleShift, 1e-5, 3);
        const Buffer<T> gb = pr.param(pr.gamma), bb = pr.param(pr.beta);
        const auto p = affine_of(op.mode, gb.data(), bb.data(), 6);
        auto fwd = [&](Buffer<T>& y, Stats<T>& sv) {
          const Buffer<T> xb = pr.to_mem(pr.x);
          Args<T> a;
          a.x = xb.data();
          a.y = y.data();
          a.p = p;
          a.saved = &sv;
          call(op, Call::Fwd, false, pr.mem(), a);
        };
        Buffer<T> y0(pr.s.size(), 0), y1(pr.s.size(), 0);
        Stats<T> s0, s1;
        fwd(y0, s0);
        const std::size_t bn = 1, bc = 3, bm = 7;  // sample 1, channel 3 (group 1), position 7
        pr.x[pr.s.at(bn, bc, bm)] = bad;
        fwd(y1, s1);
        const std::size_t kb = ref::stat_of(op.r, pr.s, bn, bc);
        std::size_t wrong = 0;
        for (std::size_t n = 0; n < pr.s.N; ++n)
          for (std::size_t c = 0; c < pr.s.C; ++c)
            for (std::size_t m = 0; m < pr.s.M; ++m) {
              const std::size_t j = pr.at(n, c, m);
              if (ref::stat_of(op.r, pr.s, n, c) == kb ? !std::isnan(y1[j]) : !same(&y0[j], &y1[j], 1))
                ++wrong;
            }
        CHECK(wrong == 0);
        REQUIRE(s1.rstd.size() == s0.rstd.size());
        for (Index k = 0; k < s0.rstd.size(); ++k)
          if (Z(k) != kb) {
            CHECK(same(&s0.rstd(k), &s1.rstd(k), 1));
            CHECK(same(&s0.mean(k), &s1.mean(k), 1));
          }
      }
}

// ---- Invariants between the ops -----------------------------------------------------------

TEMPLATE_TEST_CASE("GroupNorm with G = 1 is LayerNorm over (C, spatial) with per-channel affine",
                   "[channel][invariant]", float, double) {
  // GroupNorm is within ytol of the reference; LayerNorm (no affine) is within the same
  // bound over gamma = 1, times |gamma| once gamma is applied, and the affine step here
  // (in double, rounded once) adds eps_T (|xhat gamma| + |beta|): the two are within
  // 2 ytol + eps_T (|xhat gamma| + |beta|) of each other.
  using T = TestType;
  for (ChannelFormat f : {kFirst, kLast}) {
    INFO(fmt_name(f));
    const ChanProblem<T> pr(3, 6, {5, 4}, f, 1, 9300);
    const Chan<T> op(ChanKind::Group, f, AffineMode::ScaleShift, 1e-5, 1);
    const Buffer<T> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy), gb = pr.param(pr.gamma),
                    bb = pr.param(pr.beta);
    const auto p = affine_of(op.mode, gb.data(), bb.data(), 6);
    const auto r = run(op, pr, xb, dyb, p, true, false, false);
    const Tol t = make_tol(op.r, pr, false);
    const Index N = 3, per = I(6 * pr.s.M);
    Buffer<T> yl(pr.s.size(), 0);
    normkit::LayerNorm<T> ln(1, 1e-5, AffineMode::None);
    const auto ls = ln.forward(nt::CMap<T, 2, Eigen::RowMajor>(xb.data(), N, per), {},
                               nt::Map<T, 2, Eigen::RowMajor>(yl.data(), N, per));
    Mismatch mm;
    const auto yg = pr.from_mem(r.y.data()), yn = pr.from_mem(yl.data());
    for (std::size_t n = 0; n < pr.s.N; ++n)
      for (std::size_t c = 0; c < pr.s.C; ++c)
        for (std::size_t m = 0; m < pr.s.M; ++m) {
          const std::size_t i = pr.s.at(n, c, m);
          const double g = static_cast<double>(pr.gamma[c]), b = static_cast<double>(pr.beta[c]);
          const T ya = static_cast<T>(static_cast<double>(yn[i]) * g + b);
          mm.check(static_cast<double>(yg[i]), static_cast<double>(ya),
                   2 * t.ytol[i] + nt::eps_of<T>() * (std::fabs(t.xhat[i] * g) + std::fabs(b)), i,
                   "GroupNorm(G=1) vs LayerNorm + affine");
        }
    REQUIRE(ls.rstd.size() == r.saved.rstd.size());
    for (Index k = 0; k < N; ++k) {
      mm.check(static_cast<double>(r.saved.rstd(k)), static_cast<double>(ls.rstd(k)), 2 * t.rstdtol[Z(k)], Z(k), "rstd");
      mm.check(static_cast<double>(r.saved.mean(k)) + static_cast<double>(r.saved.mean_lo(k)),
               static_cast<double>(ls.mean(k)) + static_cast<double>(ls.mean_lo(k)), 2 * t.meantol[Z(k)], Z(k), "mean");
    }
    INFO(mm.first);
    CHECK(mm.count == 0);
  }
}

TEMPLATE_TEST_CASE("GroupNorm with G = C is InstanceNorm with affine", "[channel][invariant]",
                   float, double) {
  // Same statistic groups, same saved index (n * C + c): each side within the reference
  // bound, so within twice it of each other.
  using T = TestType;
  for (ChannelFormat f : {kFirst, kLast}) {
    INFO(fmt_name(f));
    const ChanProblem<T> pr(3, 5, {3, 7}, f, 0, 9400);
    const Chan<T> gn(ChanKind::Group, f, AffineMode::ScaleShift, 1e-5, 5);
    const Chan<T> in(ChanKind::Instance, f, AffineMode::ScaleShift, 1e-5);
    const Buffer<T> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy), gb = pr.param(pr.gamma),
                    bb = pr.param(pr.beta);
    const auto p = affine_of(gn.mode, gb.data(), bb.data(), 5);
    const auto a = run(gn, pr, xb, dyb, p, true, false, false);
    const auto b = run(in, pr, xb, dyb, p, true, false, false);
    const Tol t = make_tol(gn.r, pr, false);
    Mismatch mm;
    const auto ya = pr.from_mem(a.y.data()), yb = pr.from_mem(b.y.data());
    const auto xa = pr.from_mem(a.dx.data()), xbb = pr.from_mem(b.dx.data());
    for (std::size_t i = 0; i < ya.size(); ++i) {
      mm.check(static_cast<double>(ya[i]), static_cast<double>(yb[i]), 2 * t.ytol[i], i, "y");
      mm.check(static_cast<double>(xa[i]), static_cast<double>(xbb[i]), 2 * t.dxtol[i], i, "dx");
    }
    for (std::size_t c = 0; c < 5; ++c) {
      mm.check(static_cast<double>(a.dg[c]), static_cast<double>(b.dg[c]), 2 * t.dgtol[c], c, "dgamma");
      mm.check(static_cast<double>(a.db[c]), static_cast<double>(b.db[c]), 2 * t.dbtol[c], c, "dbeta");
    }
    check_saved(a.saved, t, mm);
    check_saved(b.saved, t, mm);
    INFO(mm.first);
    CHECK(mm.count == 0);
  }
}

TEMPLATE_TEST_CASE("BatchNorm evaluation is the affine map (x - rm) / sqrt(rv + eps) * g + b",
                   "[channel][invariant]", float, double) {
  // The map evaluated here in double, independently of the reference: the engine's
  // roundings (make_tol, evaluation) are 8 eps_T |xhat g| + 2 eps_T |b| plus the double
  // rounding of rm in xhat units, 2 eps_d |rm| rstd |g|.
  using T = TestType;
  for (ChannelFormat f : {kFirst, kLast})
    for (AffineMode mode : kModes) {
      INFO(fmt_name(f) << ", mode " << static_cast<int>(mode));
      const ChanProblem<T> pr(4, 7, {3, 3}, f, 1, 9500);
      const Chan<T> op(ChanKind::Batch, f, mode, 1e-3);
      const Buffer<T> xb = pr.to_mem(pr.x), dyb = pr.to_mem(pr.dy), gb = pr.param(pr.gamma),
                      bb = pr.param(pr.beta);
      const auto r = run(op, pr, xb, dyb, affine_of(mode, gb.data(), bb.data(), 7), false, false, true);
      const auto y = pr.from_mem(r.y.data());
      Mismatch mm;
      for (std::size_t n = 0; n < 4; ++n)
        for (std::size_t c = 0; c < 7; ++c)
          for (std::size_t m = 0; m < pr.s.M; ++m) {
            const std::size_t i = pr.s.at(n, c, m);
            const double rstd = 1 / std::sqrt(static_cast<double>(pr.rvar[c]) + 1e-3);
            const double xh = (static_cast<double>(pr.x[i]) - static_cast<double>(pr.rmean[c])) * rstd;
            const double g = mode == AffineMode::None ? 1.0 : static_cast<double>(pr.gamma[c]);
            const double b = mode == AffineMode::ScaleShift ? static_cast<double>(pr.beta[c]) : 0.0;
            mm.check(static_cast<double>(y[i]), xh * g + b,
                     8 * nt::eps_of<T>() * std::fabs(xh * g) + 2 * nt::eps_of<T>() * std::fabs(b) +
                         2 * kEpsD * std::fabs(static_cast<double>(pr.rmean[c])) * rstd * std::fabs(g),
                     i, "eval y");
          }
      INFO(mm.first);
      CHECK(mm.count == 0);
    }
}

TEMPLATE_TEST_CASE("Channel norms: channels first and channels last give the same numbers",
                   "[channel][invariant]", float, double) {
  // The same logical data, transposed into each format: the two runs are held to the
  // "ulp" bounds of make_tol (same algorithm, different summation order).
  using T = TestType;
  std::uint64_t seed = 9600;
  for (ChanKind kind : kKinds)
    for (AffineMode mode : kModes) {
      INFO(kind_name(kind) << ", mode " << static_cast<int>(mode));
      ++seed;
      const ChanProblem<T> pf(3, 12, {5, 6}, kFirst, 0, seed), pl(3, 12, {5, 6}, kLast, 1, seed);
      const Chan<T> of(kind, kFirst, mode, 1e-5, 4), ol(kind, kLast, mode, 1e-5, 4);
      const Buffer<T> xf = pf.to_mem(pf.x), dyf = pf.to_mem(pf.dy), xl = pl.to_mem(pl.x),
                      dyl = pl.to_mem(pl.dy), gb = pf.param(pf.gamma), bb = pf.param(pf.beta);
      const auto p = affine_of(mode, gb.data(), bb.data(), 12);
      for (bool eval : {false, true}) {
        if (eval && !of.has_running()) continue;
        const Tol t = make_tol(of.r, pf, eval);
        compare_pair(of.r, t, pf, run(of, pf, xf, dyf, p, true, false, eval), pl,
                     run(ol, pl, xl, dyl, p, false, false, eval), eval, "first vs last");
      }
    }
}

// ---- Errors: thrown before any output is written --------------------------------------------

namespace {

// Every word must appear in what(); "a|b" accepts either.
void check_words(const std::string& w, const std::vector<std::string>& words) {
  INFO(w);
  for (const auto& word : words) {
    bool found = false;
    std::size_t start = 0;
    while (start <= word.size()) {
      const std::size_t bar = word.find('|', start);
      const std::string alt = word.substr(start, bar == std::string::npos ? std::string::npos : bar - start);
      if (w.find(alt) != std::string::npos) found = true;
      if (bar == std::string::npos) break;
      start = bar + 1;
    }
    INFO("expected: " << word);
    CHECK(found);
  }
}

template <class F>
void expect_error(F&& f, const std::vector<std::string>& words) {
  try {
    f();
    FAIL_CHECK("no exception; expected one naming " << words.front());
  } catch (const normkit::invalid_argument& e) {
    const std::invalid_argument& base = e;  // derived from std::invalid_argument
    check_words(base.what(), words);
  }
}

}  // namespace

TEST_CASE("Channel norms: bad arguments throw before writing", "[channel][errors]") {
  using T = float;
  using C4 = nt::CMap<T, 4, Eigen::RowMajor>;
  using M4 = nt::Map<T, 4, Eigen::RowMajor>;
  using C2 = nt::CMap<T, 2, Eigen::RowMajor>;
  using M2 = nt::Map<T, 2, Eigen::RowMajor>;
  const T S = 7.25f;
  const Index N = 2, C = 3, H = 2, Wd = 2, n = N * C * H * Wd;
  Buffer<T> x(Z(n), 0), dy(Z(n), 0), y(Z(n), 0), dx(Z(n), 0), g(4, 0), b(4, 0), dg(4, 0),
      db(4, 0), rm(4, 0), rv(4, 0);
  nt::fill_normal(x.data(), x.n, 1);
  nt::fill_normal(dy.data(), dy.n, 2);
  g.fill(1);
  b.fill(0);
  std::int64_t nbt = 3;
  Stats<T> saved;
  auto reset = [&] {
    for (Buffer<T>* t : {&y, &dx, &dg, &db, &rm, &rv}) t->fill(S);
    nbt = 3;
    saved.mean = Eigen::Tensor<T, 1>(2);
    saved.mean_lo = Eigen::Tensor<T, 1>(2);
    saved.rstd = Eigen::Tensor<T, 1>(2);
    saved.mean.setConstant(S);
    saved.mean_lo.setConstant(S);
    saved.rstd.setConstant(S);
  };
  auto untouched = [&] {
    for (Buffer<T>* t : {&y, &dx, &dg, &db, &rm, &rv}) CHECK(t->all_equal(S));
    CHECK(nbt == 3);
    for (auto* t : {&saved.mean, &saved.mean_lo, &saved.rstd}) {
      CHECK(t->size() == 2);
      CHECK(std::all_of(t->data(), t->data() + t->size(), [&](T v) { return v == S; }));
    }
  };
  auto err = [&](auto&& f, std::vector<std::string> words) {
    reset();
    expect_error(f, words);
    untouched();
  };
  const C4 xm(x.data(), N, C, H, Wd), dym(dy.data(), N, C, H, Wd);
  const M4 ym(y.data(), N, C, H, Wd), dxm(dx.data(), N, C, H, Wd);
  Vec1<T> gm(g.data(), C), bm(b.data(), C), dgm(dg.data(), C), dbm(db.data(), C), rmm(rm.data(), C),
      rvm(rv.data(), C);
  const auto p = normkit::affine(gm, bm);
  const normkit::BatchNorm<T> bn;
  const normkit::GroupNorm<T> gn(3);
  const normkit::InstanceNorm<T> in(kFirst, 1e-5, AffineMode::ScaleShift);

  // Constructors: hyper-parameters.
  expect_error([] { normkit::BatchNorm<T>(kFirst, -1e-5); }, {"normkit::BatchNorm", "eps"});
  expect_error([] { normkit::BatchNorm<T>(kFirst, std::nan("")); }, {"normkit::BatchNorm", "eps"});
  expect_error([] { normkit::GroupNorm<T>(2, kFirst, -1.0); }, {"normkit::GroupNorm", "eps"});
  expect_error([] { normkit::InstanceNorm<T>(kLast, -1e-3); }, {"normkit::InstanceNorm", "eps"});
  expect_error([] { normkit::BatchNorm<T>(kFirst, 1e-5, 1.5); }, {"normkit::BatchNorm", "momentum"});
  expect_error([] { normkit::BatchNorm<T>(kFirst, 1e-5, -0.1); }, {"normkit::BatchNorm", "momentum"});
  expect_error([] { normkit::BatchNorm<T>(kFirst, 1e-5, std::nan("")); }, {"normkit::BatchNorm", "momentum"});
  expect_error([] { normkit::InstanceNorm<T>(kFirst, 1e-5, AffineMode::None, 2.0); },
               {"normkit::InstanceNorm", "momentum"});
  expect_error([] { normkit::GroupNorm<T>(0); }, {"normkit::GroupNorm", "groups"});
  expect_error([] { normkit::GroupNorm<T>(-2); }, {"normkit::GroupNorm", "groups"});

  // Forward: shapes.
  err([&] { bn.forward(xm, p, M4(y.data(), N, C, H, 1), saved, normkit::running(rmm, rvm)); },
      {"normkit::BatchNorm::forward", "'y'"});
  err([&] { bn.forward(xm, normkit::affine(Vec1<T>(g.data(), 4), bm), ym, saved); },
      {"normkit::BatchNorm::forward", "'gamma'", "[3]", "[4]"});
  err([&] { bn.forward(xm, normkit::affine(gm, Vec1<T>(b.data(), 2)), ym, saved); },
      {"normkit::BatchNorm::forward", "'beta'", "[2]"});
  err([&] { bn.forward(xm, {}, ym, saved); }, {"normkit::BatchNorm::forward", "'params'|'gamma'"});
  err([&] { gn.forward(xm, normkit::affine(Vec1<T>(g.data(), 2), bm), ym, saved); },
      {"normkit::GroupNorm::forward", "'gamma'"});
  err([&] { in.forward(xm, normkit::affine(gm, Vec1<T>(b.data(), 4)), ym, saved); },
      {"normkit::InstanceNorm::forward", "'beta'"});
  err([&] {
    Vec1<T> r4(rm.data(), 4);
    bn.forward(xm, p, ym, saved, normkit::running(r4, rvm, nbt));
  }, {"normkit::BatchNorm::forward", "running", "mean"});
  err([&] {
    Vec1<T> r2(rv.data(), 2);
    bn.forward(xm, p, ym, saved, normkit::running(rmm, r2, nbt));
  }, {"normkit::BatchNorm::forward", "running", "var"});
  err([&] {
    Vec1<T> r2(rm.data(), 2);
    in.forward(xm, p, ym, saved, normkit::running(r2, rvm, nbt));
  }, {"normkit::InstanceNorm::forward", "running", "mean"});
  // Groups that do not divide C (3 channels, 2 groups).
  err([&] { normkit::GroupNorm<T>(2).forward(xm, p, ym, saved); }, {"normkit::GroupNorm::forward", "group"});
  // One value per channel in training: BatchNorm (N = 1, no spatial), InstanceNorm (M = 1).
  err([&] {
    bn.forward(C2(x.data(), 1, C), p, M2(y.data(), 1, C), saved, normkit::running(rmm, rvm, nbt));
  }, {"normkit::BatchNorm::forward", "'x'"});
  err([&] {
    in.forward(C4(x.data(), N, C, 1, 1), p, M4(y.data(), N, C, 1, 1), saved, normkit::running(rmm, rvm, nbt));
  }, {"normkit::InstanceNorm::forward", "'x'"});
  err([&] { in.forward(C2(x.data(), N, C), p, M2(y.data(), N, C), saved); },
      {"normkit::InstanceNorm::forward", "'x'"});
  // Rank < 2.
  err([&] { bn.forward(Vec1<T>(x.data(), C), p, Vec1<T>(y.data(), C), saved); },
      {"normkit::BatchNorm::forward", "'x'", "rank"});
  err([&] { gn.forward(Vec1<T>(x.data(), C), p, Vec1<T>(y.data(), C), saved); },
      {"normkit::GroupNorm::forward", "'x'", "rank"});
  // Cumulative momentum without a counter.
  err([&] {
    normkit::BatchNorm<T>(kFirst, 1e-5, std::nullopt).forward(xm, p, ym, saved, normkit::running(rmm, rvm));
  }, {"normkit::BatchNorm::forward", "num_batches_tracked"});
  err([&] {
    normkit::InstanceNorm<T>(kFirst, 1e-5, AffineMode::ScaleShift, std::nullopt)
        .forward(xm, p, ym, saved, normkit::running(rmm, rvm));
  }, {"normkit::InstanceNorm::forward", "num_batches_tracked"});
  // Evaluation without running statistics.
  err([&] { bn.forward_eval(xm, p, {}, ym); }, {"normkit::BatchNorm::forward", "running"});
  err([&] { in.forward_eval(xm, p, {}, ym); }, {"normkit::InstanceNorm::forward", "running"});
  err([&] { bn.forward_eval(xm, p, normkit::running(rmm, rvm), M4(y.data(), N, C, 1, Wd)); },
      {"normkit::BatchNorm::forward", "'y'"});

  // Backward: saved statistics from a good forward.
  Stats<T> good_bn, good_gn;
  bn.forward(xm, p, ym, good_bn);
  gn.forward(xm, p, ym, good_gn);
  err([&] { bn.backward(C4(dy.data(), N, C, H, 1), xm, p, good_bn, dxm, dgm, dbm); },
      {"normkit::BatchNorm::backward", "'dy'"});
  err([&] { bn.backward(dym, xm, p, good_bn, M4(dx.data(), N, C, 1, Wd), dgm, dbm); },
      {"normkit::BatchNorm::backward", "'dx'"});
  err([&] { bn.backward(dym, xm, p, good_bn, dxm, Vec1<T>(dg.data(), 4), dbm); },
      {"normkit::BatchNorm::backward", "'dgamma'", "[4]"});
  err([&] { bn.backward(dym, xm, p, good_bn, dxm, dgm, Vec1<T>(db.data(), 2)); },
      {"normkit::BatchNorm::backward", "'dbeta'", "[2]"});
  err([&] { gn.backward(dym, xm, normkit::affine(Vec1<T>(g.data(), 4), bm), good_gn, dxm, dgm, dbm); },
      {"normkit::GroupNorm::backward", "'gamma'"});
  for (int which = 0; which < 3; ++which) {
    Stats<T> bad = good_bn;
    (which == 0 ? bad.mean : which == 1 ? bad.mean_lo : bad.rstd) = Eigen::Tensor<T, 1>(C + 1);
    err([&] { bn.backward(dym, xm, p, bad, dxm, dgm, dbm); }, {"normkit::BatchNorm::backward", "saved"});
  }
  // GroupNorm saves N * G = 6 entries; BatchNorm's [C] does not fit.
  err([&] { gn.backward(dym, xm, p, good_bn, dxm, dgm, dbm); }, {"normkit::GroupNorm::backward", "saved"});
  err([&] { bn.backward_eval(dym, xm, p, {}, dxm, dgm, dbm); }, {"normkit::BatchNorm::backward", "running"});
  err([&] {
    Vec1<T> r2(rv.data(), 2);
    in.backward_eval(dym, xm, p, normkit::running(rmm, r2), dxm, dgm, dbm);
  }, {"normkit::InstanceNorm::backward", "running"});
  err([&] {
    normkit::BatchNorm<T>(kFirst, 1e-5, 0.1, AffineMode::Scale)
        .backward(dym, xm, normkit::affine(gm), good_bn, dxm, dgm, dbm);
  }, {"normkit::BatchNorm::backward", "'dbeta'"});

  // Data-parallel BatchNorm.
  const auto mom = bn.partial_stats(xm);
  normkit::ChannelMoments one = mom;
  one.count = 1;
  err([&] { bn.forward_global(xm, p, one, ym, saved); }, {"normkit::BatchNorm", "global|count"});
  normkit::ChannelMoments wrong = mom;
  wrong.mean = Eigen::Tensor<double, 1>(4);
  wrong.m2 = Eigen::Tensor<double, 1>(4);
  err([&] { bn.forward_global(xm, p, wrong, ym, saved); }, {"normkit::BatchNorm", "global"});
  expect_error([&] { normkit::merge(mom, wrong); }, {"merge", "'b'"});
  Stats<T> gsaved;
  bn.forward_global(xm, p, mom, ym, gsaved);
  const auto sums = bn.partial_grad_sums(dym, xm, gsaved);
  normkit::ChannelGradSums bad_sums = sums;
  bad_sums.sum_dy = Eigen::Tensor<double, 1>(4);
  bad_sums.sum_dy_xhat = Eigen::Tensor<double, 1>(4);
  err([&] { bn.backward_global(dym, xm, p, gsaved, bad_sums, mom.count, dxm, dgm, dbm); },
      {"normkit::BatchNorm", "global|sum"});
  err([&] { bn.partial_grad_sums(C4(dy.data(), N, C, 1, Wd), xm, gsaved); },
      {"normkit::BatchNorm", "'dy'"});
}
