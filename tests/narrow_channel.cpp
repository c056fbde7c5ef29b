// Narrow storage (Eigen::bfloat16, Eigen::half) for BatchNorm, GroupNorm and
// InstanceNorm, staged through the float engine in blocks of whole channels
// (detail/narrow_channel.hpp). Against the float op on the exactly widened inputs: y and
// dx bit for bit T(the float op's), saved and running statistics bit for bit, float
// parameter gradients bit for bit (T ones within half an ulp of T of the float op's);
// against the long double reference within tolerances from T's unit roundoff and n;
// Sync-BN over two shards; threads; in place; NaN channels; every error before writing,
// with the float op's message.
//
// Data are generated in logical (N, C, M) order and scattered into channels-first or
// channels-last memory (as tests/channel_norm.cpp does).
#include "channel_reference.hpp"
#include "test_util.hpp"

#include <optional>
#include <type_traits>

namespace {

using normkit::AffineMode;
using normkit::ChannelFormat;
using nt::Buffer;
using nt::Index;
using nt::LD;
using ref::ChanKind;
using BF = Eigen::bfloat16;
using HF = Eigen::half;
using Stats = normkit::RowStats<float>;
template <class T>
using CVec1 = nt::CMap<T, 1, Eigen::ColMajor>;
template <class T>
using Vec1 = nt::Map<T, 1, Eigen::ColMajor>;

constexpr ChannelFormat kFirst = ChannelFormat::First;
constexpr ChannelFormat kLast = ChannelFormat::Last;
constexpr double kUf = 0x1p-24;  // float's unit roundoff

std::size_t Z(Index i) { return static_cast<std::size_t>(i); }
Index I(std::size_t i) { return static_cast<Index>(i); }

// T's unit roundoff: half 2^-11, bf16 2^-8 (float: 2^-24).
template <class T>
double u_of() {
  return std::is_same<T, BF>::value ? 0x1p-8 : std::is_same<T, HF>::value ? 0x1p-11 : kUf;
}

template <class T>
std::uint64_t bits_of(T v) {
  std::uint64_t b = 0;
  std::memcpy(&b, &v, sizeof v);
  return b;
}
// The same bits, or both NaN (half's and bf16's NaN payloads are the float's, but the
// float op's NaN may differ from the narrow op's in payload only through its source).
template <class T>
bool same(T a, T b) {
  const float fa = static_cast<float>(a), fb = static_cast<float>(b);
  return (std::isnan(fa) && std::isnan(fb)) || bits_of(a) == bits_of(b);
}

// One problem's shape: the op, the format and the extents.
struct Shape {
  ChanKind kind;
  int groups;  // GroupNorm
  ChannelFormat fmt;
  Index N, C;
  std::vector<Index> spatial;  // outermost first
  bool big;                    // must span at least 3 staging blocks

  Index M() const {
    Index m = 1;
    for (Index e : spatial) m *= e;
    return m;
  }
  std::size_t size() const { return Z(N * C * M()); }
  std::vector<Index> mem() const {  // memory order, innermost first
    std::vector<Index> d;
    if (fmt == kLast) d.push_back(C);
    for (auto it = spatial.rbegin(); it != spatial.rend(); ++it) d.push_back(*it);
    if (fmt == kFirst) d.push_back(C);
    d.push_back(N);
    return d;
  }
  std::size_t at(std::size_t n, std::size_t c, std::size_t m) const {
    const std::size_t Cs = Z(C), Ms = Z(M());
    return fmt == kFirst ? (n * Cs + c) * Ms + m : (n * Ms + m) * Cs + c;
  }
  ref::ChanShape rs() const { return {Z(N), Z(C), Z(M())}; }
  bool has_running() const { return kind != ChanKind::Group; }
  // Channels per statistic unit: 1, or C / G for GroupNorm.
  Index unit(bool eval) const { return kind == ChanKind::Group && !eval ? C / groups : 1; }
  Index blocks(bool eval) const {
    const Index cpb = normkit::detail::channel::narrow_block_channels(N, C, M(), unit(eval),
                                                                      fmt == kLast);
    return (C + cpb - 1) / cpb;
  }
  std::string str() const {
    std::string s = kind == ChanKind::Batch ? "BatchNorm" : kind == ChanKind::Group ? "GroupNorm" : "InstanceNorm";
    s += fmt == kFirst ? " first" : " last";
    s += " N " + std::to_string(N) + " C " + std::to_string(C) + " spatial";
    for (Index e : spatial) s += " " + std::to_string(e);
    return s;
  }
};

template <class P>
normkit::Affine<P> affine_of(AffineMode m, const P* g, const P* b, Index C) {
  const CVec1<P> gm(g, C), bm(b, C);
  if (m == AffineMode::None) return {};
  if (m == AffineMode::Scale) return normkit::affine(gm);
  return normkit::affine(gm, bm);
}

// Everything one op call reads and writes, for storage T and parameters P.
template <class T, class P>
struct Io {
  const T* x = nullptr;
  T* y = nullptr;
  const T* dy = nullptr;
  T* dx = nullptr;  // nullptr: skip
  const P* g = nullptr;
  const P* b = nullptr;
  P* dg = nullptr;  // nullptr: skip
  P* db = nullptr;
  float* rm = nullptr;  // nullptr: no running statistics
  float* rv = nullptr;
  std::int64_t* nbt = nullptr;
  Stats* saved = nullptr;
};

// The op for storage T (narrow, or float for the twin).
template <class T>
struct Op {
  Shape s;
  AffineMode mode;
  std::optional<double> momentum = 0.1;
  double eps = 1e-5;
  normkit::BatchNorm<T> bn() const { return normkit::BatchNorm<T>(s.fmt, eps, momentum, mode); }
  normkit::GroupNorm<T> gn() const { return normkit::GroupNorm<T>(s.groups, s.fmt, eps, mode); }
  normkit::InstanceNorm<T> in() const { return normkit::InstanceNorm<T>(s.fmt, eps, mode, momentum); }

  template <class P>
  normkit::Running<float> running(const Io<T, P>& a) const {
    if (!a.rm) return {};
    Vec1<float> m(a.rm, s.C), v(a.rv, s.C);
    return a.nbt ? normkit::running(m, v, *a.nbt) : normkit::running(m, v);
  }

  template <class P, class Dev = Eigen::DefaultDevice>
  void forward(bool row_major, bool eval, const Io<T, P>& a, const Dev& dev = Dev()) const {
    const auto p = affine_of(mode, a.g, a.b, s.C);
    const auto run = running(a);
    nt::with_tensors(row_major, s.mem(), [&](auto mk) {
      const auto x = mk(a.x);
      auto y = mk(a.y);
      if (eval) {
        if (s.kind == ChanKind::Batch) bn().forward_eval(x, p, run, y, dev);
        else in().forward_eval(x, p, run, y, dev);
      } else if (s.kind == ChanKind::Batch) {
        bn().forward(x, p, y, *a.saved, run, dev);
      } else if (s.kind == ChanKind::Group) {
        gn().forward(x, p, y, *a.saved, dev);
      } else {
        in().forward(x, p, y, *a.saved, run, dev);
      }
    });
  }

  template <class P, class Dev = Eigen::DefaultDevice>
  void backward(bool row_major, bool eval, const Io<T, P>& a, const Dev& dev = Dev()) const {
    const auto p = affine_of(mode, a.g, a.b, s.C);
    const auto run = running(a);
    nt::with_tensors(row_major, s.mem(), [&](auto mk) {
      const auto dy = mk(a.dy);
      const auto x = mk(a.x);
      auto go = [&](auto&& dx) {
        nt::with_grad(a.dg, s.C, [&](auto&& dg) {
          nt::with_grad(a.db, s.C, [&](auto&& db) {
            if (eval) {
              if (s.kind == ChanKind::Batch) bn().backward_eval(dy, x, p, run, dx, dg, db, dev);
              else in().backward_eval(dy, x, p, run, dx, dg, db, dev);
            } else if (s.kind == ChanKind::Batch) {
              bn().backward(dy, x, p, *a.saved, dx, dg, db, dev);
            } else if (s.kind == ChanKind::Group) {
              gn().backward(dy, x, p, *a.saved, dx, dg, db, dev);
            } else {
              in().backward(dy, x, p, *a.saved, dx, dg, db, dev);
            }
          });
        });
      };
      if (a.dx) go(mk(a.dx));
      else go(normkit::skip);
    });
  }
};

// Logical data of a shape, as T values (x, dy) and float parameters; memory buffers.
template <class T>
struct Problem {
  Shape s;
  std::vector<T> x, dy;              // logical (n, c, m)
  std::vector<float> gf, bf;         // float parameters (any float)
  std::vector<T> gt, bt;             // T parameters
  std::vector<float> rmean, rvar;    // running statistics before the call
  std::size_t shift;
  Problem(const Shape& sh, std::uint64_t seed, std::size_t shift_) : s(sh), shift(shift_) {
    const std::size_t n = s.size(), C = Z(s.C);
    std::vector<float> t(n);
    nt::fill_normal(t.data(), n, seed, 0.5, 2.0);
    for (float v : t) x.push_back(T(v));
    nt::fill_normal(t.data(), n, seed + 1);
    for (float v : t) dy.push_back(T(v));
    gf.resize(C);
    bf.resize(C);
    rmean.resize(C);
    rvar.resize(C);
    nt::fill_normal(gf.data(), C, seed + 2, 1.0, 0.5);
    nt::fill_normal(bf.data(), C, seed + 3, 0.0, 0.5);
    nt::fill_normal(rmean.data(), C, seed + 4, 0.3, 1.0);
    nt::fill_normal(rvar.data(), C, seed + 5, 0.0, 1.0);
    for (auto& v : rvar) v = std::fabs(v) + 0.25f;
    for (std::size_t c = 0; c < C; ++c) {
      gt.push_back(T(gf[c]));
      bt.push_back(T(bf[c]));
    }
  }
  template <class U>
  Buffer<U> to_mem(const std::vector<T>& v) const {  // widened when U = float
    Buffer<U> b(v.size(), shift);
    for (std::size_t n = 0; n < Z(s.N); ++n)
      for (std::size_t c = 0; c < Z(s.C); ++c)
        for (std::size_t m = 0; m < Z(s.M()); ++m)
          b[s.at(n, c, m)] = static_cast<U>(static_cast<float>(v[(n * Z(s.C) + c) * Z(s.M()) + m]));
    return b;
  }
  std::vector<LD> logical(const float* p) const {
    std::vector<LD> v(s.size());
    for (std::size_t n = 0; n < Z(s.N); ++n)
      for (std::size_t c = 0; c < Z(s.C); ++c)
        for (std::size_t m = 0; m < Z(s.M()); ++m)
          v[(n * Z(s.C) + c) * Z(s.M()) + m] = static_cast<LD>(p[s.at(n, c, m)]);
    return v;
  }
};

// The outputs of a training (or evaluation) forward and backward of storage U with
// parameters P.
template <class U, class P>
struct Out {
  Buffer<U> y, dx;
  Buffer<P> dg, db;
  Buffer<float> rm, rv;
  std::int64_t nbt = 5;
  Stats saved;
  Out(std::size_t n, std::size_t C, std::size_t shift)
      : y(n, shift), dx(n, shift), dg(C, 0), db(C, 0), rm(C, 0), rv(C, 0) {}
};

template <class U, class P, class T, class Dev = Eigen::DefaultDevice>
Out<U, P> run(const Op<U>& op, const Problem<T>& pr, const Buffer<U>& x, const Buffer<U>& dy,
              const P* g, const P* b, bool row_major, bool eval, const Dev& dev = Dev()) {
  const std::size_t n = pr.s.size(), C = Z(pr.s.C);
  Out<U, P> o(n, C, pr.shift);
  std::copy(pr.rmean.begin(), pr.rmean.end(), o.rm.data());
  std::copy(pr.rvar.begin(), pr.rvar.end(), o.rv.data());
  Io<U, P> a;
  a.x = x.data();
  a.y = o.y.data();
  a.dy = dy.data();
  a.dx = o.dx.data();
  a.g = g;
  a.b = b;
  a.dg = op.mode != AffineMode::None ? o.dg.data() : nullptr;
  a.db = op.mode == AffineMode::ScaleShift ? o.db.data() : nullptr;
  if (pr.s.has_running()) {
    a.rm = o.rm.data();
    a.rv = o.rv.data();
    a.nbt = &o.nbt;
  }
  a.saved = &o.saved;
  op.forward(row_major, eval, a, dev);
  op.backward(row_major, eval, a, dev);
  return o;
}

bool same_stats(const Stats& a, const Stats& b) {
  auto eq = [](const Eigen::Tensor<float, 1>& p, const Eigen::Tensor<float, 1>& q) {
    if (p.size() != q.size()) return false;
    for (Index i = 0; i < p.size(); ++i)
      if (!same(p(i), q(i))) return false;
    return true;
  };
  return eq(a.mean, b.mean) && eq(a.mean_lo, b.mean_lo) && eq(a.rstd, b.rstd);
}

// Counts the elements where narrow != T(float), reporting the first.
template <class T>
std::size_t count_unlike(const T* narrow, const float* wide, std::size_t n, const char* what) {
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (!same(narrow[i], T(wide[i])) && bad++ == 0)
      UNSCOPED_INFO(what << "[" << i << "]: " << static_cast<float>(narrow[i]) << " vs T("
                         << wide[i] << ")");
  return bad;
}

std::vector<Shape> shapes() {
  return {
      // Several staging blocks each (asserted), odd channel counts.
      {ChanKind::Batch, 1, kFirst, 4, 5, {100, 100}, true},
      {ChanKind::Batch, 1, kLast, 2, 67, {32, 32}, true},
      {ChanKind::Group, 3, kFirst, 2, 9, {10, 20, 30}, true},
      {ChanKind::Group, 23, kLast, 2, 69, {8, 128}, true},
      {ChanKind::Instance, 1, kFirst, 3, 7, {7000}, true},
      {ChanKind::Instance, 1, kLast, 2, 67, {4, 8, 32}, true},
      // Small: ranks 2 and 3, one block.
      {ChanKind::Batch, 1, kFirst, 37, 5, {}, false},
      {ChanKind::Batch, 1, kLast, 5, 3, {13}, false},
      {ChanKind::Group, 2, kLast, 3, 6, {11}, false},
      {ChanKind::Group, 3, kFirst, 2, 3, {}, false},
      {ChanKind::Instance, 1, kLast, 3, 5, {17}, false},
  };
}

// Tolerances against the long double reference on the same (narrow) inputs: the float
// op's error, a few float roundings per element plus sqrt(n) u_f from its sums, in units
// of the element's scale, then T's rounding, u_T |ref|.
template <class T>
double tol_elem(double ref, double scale, std::size_t n) {
  return u_of<T>() * std::fabs(ref) + (16.0 + 4.0 * std::sqrt(static_cast<double>(n))) * kUf * scale +
         (std::is_same<T, HF>::value ? 0x1p-25 : 0.0);
}

}  // namespace

TEMPLATE_TEST_CASE("Narrow channel norms: bitwise the float op on widened inputs, and near the reference",
                   "[narrow][channel]", BF, HF) {
  using T = TestType;
  const AffineMode modes[3] = {AffineMode::ScaleShift, AffineMode::Scale, AffineMode::None};
  std::size_t k = 0;
  for (const Shape& s : shapes()) {
    for (int eval = 0; eval < 2; ++eval) {
      if (eval && !s.has_running()) continue;
      if (s.big) {
        INFO(s.str() << (eval ? " eval" : " train"));
        REQUIRE(s.blocks(eval) >= 3);
      }
      for (int rm = 0; rm < 2; ++rm)
        for (int pfloat = 0; pfloat < 2; ++pfloat, ++k) {
          const AffineMode mode = modes[k % 3 == 2 && !s.big ? 2 : k % 2];
          const std::size_t shift = (k + 1) % 2;  // misaligned by one element half the time
          INFO(s.str() << (eval ? " eval" : " train") << (rm ? " RowMajor" : " ColMajor")
                       << (pfloat ? " float params" : " T params") << " mode "
                       << static_cast<int>(mode) << " shift " << shift);
          const Problem<T> pr(s, 100 + k, shift);
          const std::size_t n = s.size(), C = Z(s.C);
          const Buffer<T> x = pr.template to_mem<T>(pr.x), dy = pr.template to_mem<T>(pr.dy);
          const Buffer<float> xw = pr.template to_mem<float>(pr.x), dyw = pr.template to_mem<float>(pr.dy);
          const Op<T> op{s, mode};
          const Op<float> fop{s, mode};
          // The float op's parameters: the float ones, or T's widened.
          std::vector<float> gw(C), bw(C);
          for (std::size_t c = 0; c < C; ++c) {
            gw[c] = pfloat ? pr.gf[c] : static_cast<float>(pr.gt[c]);
            bw[c] = pfloat ? pr.bf[c] : static_cast<float>(pr.bt[c]);
          }
          const auto f = run(fop, pr, xw, dyw, gw.data(), bw.data(), rm, eval);
          std::vector<float> dgn(C, 0.0f), dbn(C, 0.0f);
          if (pfloat) {
            const auto o = run(op, pr, x, dy, pr.gf.data(), pr.bf.data(), rm, eval);
            CHECK(count_unlike(o.y.data(), f.y.data(), n, "y") == 0);
            CHECK(count_unlike(o.dx.data(), f.dx.data(), n, "dx") == 0);
            // Float parameter gradients: the float op's, bit for bit.
            for (std::size_t c = 0; c < C; ++c) {
              CHECK(same(o.dg[c], f.dg[c]));
              CHECK(same(o.db[c], f.db[c]));
              dgn[c] = o.dg[c];
              dbn[c] = o.db[c];
            }
            if (!eval) CHECK(same_stats(o.saved, f.saved));
            for (std::size_t c = 0; c < C; ++c) {
              CHECK(same(o.rm[c], f.rm[c]));
              CHECK(same(o.rv[c], f.rv[c]));
            }
            CHECK(o.nbt == f.nbt);
          } else {
            const auto o = run(op, pr, x, dy, pr.gt.data(), pr.bt.data(), rm, eval);
            CHECK(count_unlike(o.y.data(), f.y.data(), n, "y") == 0);
            CHECK(count_unlike(o.dx.data(), f.dx.data(), n, "dx") == 0);
            // T gradients: the float op's double sums rounded once; within half an ulp
            // of T of the float op's float.
            for (std::size_t c = 0; c < C; ++c) {
              for (auto [got, want] : {std::pair<T, float>{o.dg[c], f.dg[c]}, {o.db[c], f.db[c]}})
                CHECK(std::fabs(static_cast<double>(got) - want) <=
                      u_of<T>() * std::fabs(static_cast<double>(want)) * (1 + 0x1p-20));
              dgn[c] = static_cast<float>(o.dg[c]);
              dbn[c] = static_cast<float>(o.db[c]);
            }
            if (!eval) CHECK(same_stats(o.saved, f.saved));
            for (std::size_t c = 0; c < C; ++c) {
              CHECK(same(o.rm[c], f.rm[c]));
              CHECK(same(o.rv[c], f.rv[c]));
            }
            CHECK(o.nbt == f.nbt);
            // y and dx of the narrow op checked against the reference below through the
            // float op's (bitwise equal), rounded to T.
          }
          // Against the long double reference, on the narrow inputs.
          const ref::ChanNorm rop{s.kind == ChanKind::Batch   ? ChanKind::Batch
                                  : s.kind == ChanKind::Group ? ChanKind::Group
                                                              : ChanKind::Instance,
                                  Z(s.groups), mode != AffineMode::None,
                                  mode == AffineMode::ScaleShift, 1e-5, 0.1};
          const ref::ChanShape rs = s.rs();
          std::vector<float> xl(n), dyl(n);
          for (std::size_t i = 0; i < n; ++i) {
            xl[i] = static_cast<float>(pr.x[i]);
            dyl[i] = static_cast<float>(pr.dy[i]);
          }
          const ref::ChanStatsLD st = eval ? ref::eval_stats(rop, rs, pr.rmean.data(), pr.rvar.data())
                                           : ref::chan_stats(rop, rs, xl.data());
          const auto yref = ref::chan_forward(rop, rs, xl.data(), gw.data(), bw.data(), st);
          const auto gr = ref::chan_backward(rop, rs, dyl.data(), xl.data(), gw.data(), st, eval != 0);
          const std::size_t cnt = eval ? 0 : ref::stat_count(rop, rs);
          nt::Mismatch my, mdx, mdg, mdb;
          const auto yl = pr.logical(f.y.data()), dxl = pr.logical(f.dx.data());
          double dxmax = 0;
          for (std::size_t i = 0; i < n; ++i) dxmax = std::max(dxmax, std::fabs(static_cast<double>(gr.dx[i])));
          for (std::size_t i = 0; i < n; ++i) {
            const std::size_t c = (i / Z(s.M())) % C;
            const double yr = static_cast<double>(yref[i]);
            const double scale = 1.0 + std::fabs(yr - bw[c]) + std::fabs(static_cast<double>(bw[c]));
            my.check(static_cast<float>(T(static_cast<float>(yl[i]))), yr, tol_elem<T>(yr, scale, cnt), i, "y");
            // dx's scale: rstd |gamma| (|dy| + 1 + |xhat|), the size of its terms.
            const std::size_t kk = ref::stat_of(rop, rs, i / (C * Z(s.M())), c);
            const double xh = std::fabs(static_cast<double>((static_cast<LD>(xl[i]) - st.mean[kk]) * st.rstd[kk]));
            const double dsc = static_cast<double>(st.rstd[kk]) * std::fabs(static_cast<double>(gw[c])) *
                                   (std::fabs(static_cast<double>(dyl[i])) + 1.0 + xh) + dxmax;
            const double dr = static_cast<double>(gr.dx[i]);
            mdx.check(static_cast<float>(T(static_cast<float>(dxl[i]))), dr, tol_elem<T>(dr, dsc, cnt), i, "dx");
          }
          // Parameter gradients: sums of n terms in float trees and double, then one
          // rounding to P.
          const double up = pfloat ? kUf : u_of<T>();
          const double nc = static_cast<double>(s.N * s.M());  // terms per channel
          std::vector<double> sabs_g(C, 0.0), sabs_b(C, 0.0);
          for (std::size_t i = 0; i < n; ++i) {
            const std::size_t nn = i / (C * Z(s.M())), c = (i / Z(s.M())) % C;
            const std::size_t kk = ref::stat_of(rop, rs, nn, c);
            const LD xhat = (static_cast<LD>(xl[i]) - st.mean[kk]) * st.rstd[kk];
            sabs_g[c] += std::fabs(static_cast<double>(dyl[i] * xhat));
            sabs_b[c] += std::fabs(static_cast<double>(dyl[i]));
          }
          for (std::size_t c = 0; c < C; ++c) {
            const double tg = up * std::fabs(static_cast<double>(gr.dgamma[c])) + (8.0 + 4.0 * std::sqrt(nc)) * kUf * sabs_g[c];
            const double tb = up * std::fabs(static_cast<double>(gr.dbeta[c])) + (8.0 + 4.0 * std::sqrt(nc)) * kUf * sabs_b[c];
            if (mode != AffineMode::None) mdg.check(dgn[c], static_cast<double>(gr.dgamma[c]), tg, c, "dgamma");
            if (mode == AffineMode::ScaleShift) mdb.check(dbn[c], static_cast<double>(gr.dbeta[c]), tb, c, "dbeta");
          }
          CHECK(my.count == 0);
          CHECK(mdx.count == 0);
          CHECK(mdg.count == 0);
          CHECK(mdb.count == 0);
          if (my.count) UNSCOPED_INFO(my.first);
          if (mdx.count) UNSCOPED_INFO(mdx.first);
          if (mdg.count) UNSCOPED_INFO(mdg.first);
          if (mdb.count) UNSCOPED_INFO(mdb.first);
        }
    }
  }
}

TEMPLATE_TEST_CASE("Narrow channel norms: in place (y = x, dx = dy) and threads 1 vs 2, bitwise",
                   "[narrow][channel][threads]", BF, HF) {
  using T = TestType;
  Eigen::ThreadPool pool(2);
  const Eigen::ThreadPoolDevice dev(&pool, 2);
  for (const Shape& s : shapes()) {
    if (!s.big) continue;
    for (int eval = 0; eval < 2; ++eval) {
      if (eval && !s.has_running()) continue;
      INFO(s.str() << (eval ? " eval" : " train"));
      const Problem<T> pr(s, 7, 1);
      const std::size_t n = s.size(), C = Z(s.C);
      const Buffer<T> x = pr.template to_mem<T>(pr.x), dy = pr.template to_mem<T>(pr.dy);
      const Op<T> op{s, AffineMode::ScaleShift};
      const auto a = run(op, pr, x, dy, pr.gf.data(), pr.bf.data(), true, eval);
      const auto b = run(op, pr, x, dy, pr.gf.data(), pr.bf.data(), true, eval, dev);
      std::size_t bad = 0;
      for (std::size_t i = 0; i < n; ++i) bad += !same(a.y[i], b.y[i]) + !same(a.dx[i], b.dx[i]);
      for (std::size_t c = 0; c < C; ++c)
        bad += !same(a.dg[c], b.dg[c]) + !same(a.db[c], b.db[c]) + !same(a.rm[c], b.rm[c]) +
               !same(a.rv[c], b.rv[c]);
      CHECK(bad == 0);
      if (!eval) CHECK(same_stats(a.saved, b.saved));
      // In place, on two threads: y over x, then dx over dy.
      Out<T, float> c(n, C, pr.shift);
      Buffer<T> xy = x, dydx = dy;
      std::copy(pr.rmean.begin(), pr.rmean.end(), c.rm.data());
      std::copy(pr.rvar.begin(), pr.rvar.end(), c.rv.data());
      Io<T, float> io;
      io.x = xy.data();
      io.y = xy.data();
      io.g = pr.gf.data();
      io.b = pr.bf.data();
      io.saved = &c.saved;
      if (s.has_running()) {
        io.rm = c.rm.data();
        io.rv = c.rv.data();
        io.nbt = &c.nbt;
      }
      op.forward(true, eval, io, dev);
      // Backward reads forward's x: the original.
      io.x = x.data();
      io.dy = dydx.data();
      io.dx = dydx.data();
      io.dg = c.dg.data();
      io.db = c.db.data();
      if (io.rm) {  // evaluation backward reads the running statistics forward read
        std::copy(a.rm.data(), a.rm.data() + C, c.rm.data());
        std::copy(a.rv.data(), a.rv.data() + C, c.rv.data());
      }
      op.backward(true, eval, io, dev);
      bad = 0;
      for (std::size_t i = 0; i < n; ++i) bad += !same(a.y[i], xy[i]) + !same(a.dx[i], dydx[i]);
      for (std::size_t c2 = 0; c2 < C; ++c2) bad += !same(a.dg[c2], c.dg[c2]) + !same(a.db[c2], c.db[c2]);
      CHECK(bad == 0);
    }
  }
}

TEMPLATE_TEST_CASE("Narrow BatchNorm: Sync-BN over two shards, bitwise the float op per step, near the whole batch",
                   "[narrow][channel][sync]", BF, HF) {
  using T = TestType;
  for (const Shape& s : {Shape{ChanKind::Batch, 1, kFirst, 4, 5, {100, 100}, true},
                         Shape{ChanKind::Batch, 1, kLast, 4, 67, {16, 32}, true}}) {
    INFO(s.str());
    REQUIRE(s.blocks(false) >= 3);
    const Problem<T> pr(s, 31, 1);
    const std::size_t n = s.size(), C = Z(s.C), half = n / 2;
    const Buffer<T> x = pr.template to_mem<T>(pr.x), dy = pr.template to_mem<T>(pr.dy);
    const Buffer<float> xw = pr.template to_mem<float>(pr.x), dyw = pr.template to_mem<float>(pr.dy);
    const Op<T> op{s, AffineMode::ScaleShift};
    // The whole batch through the ordinary calls.
    const auto whole = run(op, pr, x, dy, pr.gf.data(), pr.bf.data(), true, false);
    // A shard: samples [0, N/2) or [N/2, N), the first or second half of memory.
    Shape hs = s;
    hs.N = s.N / 2;
    const auto mem = hs.mem();
    const auto bn = op.bn();
    const Op<float> fop{s, AffineMode::ScaleShift};
    const auto fbn = fop.bn();
    auto p = normkit::affine(CVec1<float>(pr.gf.data(), s.C), CVec1<float>(pr.bf.data(), s.C));
    Buffer<T> y(n, 1), dx(n, 1);
    Buffer<float> yw(n, 1), dxw(n, 1), dg(C, 0), db(C, 0), dgw(C, 0), dbw(C, 0), rm(C, 0), rv(C, 0),
        rmw(C, 0), rvw(C, 0);
    std::copy(pr.rmean.begin(), pr.rmean.end(), rm.data());
    std::copy(pr.rvar.begin(), pr.rvar.end(), rv.data());
    std::copy(pr.rmean.begin(), pr.rmean.end(), rmw.data());
    std::copy(pr.rvar.begin(), pr.rvar.end(), rvw.data());
    Stats saved[2], savedw[2];
    nt::with_tensors(true, mem, [&](auto mk) {
      normkit::ChannelMoments m[2], mw[2];
      for (int h = 0; h < 2; ++h) {
        m[h] = bn.partial_stats(mk(x.data() + h * half));
        mw[h] = fbn.partial_stats(mk(xw.data() + h * half));
        CHECK(m[h].count == mw[h].count);
        for (std::size_t c = 0; c < C; ++c) {
          CHECK(bits_of(m[h].mean(I(c))) == bits_of(mw[h].mean(I(c))));
          CHECK(bits_of(m[h].m2(I(c))) == bits_of(mw[h].m2(I(c))));
        }
      }
      const auto g = normkit::merge(m[0], m[1]);
      for (int h = 0; h < 2; ++h) {
        // The running statistics on shard 0 only.
        Vec1<float> a(rm.data(), s.C), b(rv.data(), s.C), aw(rmw.data(), s.C), bw(rvw.data(), s.C);
        auto y_h = mk(y.data() + h * half);
        auto yw_h = mk(yw.data() + h * half);
        if (h == 0) {
          bn.forward_global(mk(static_cast<const T*>(x.data())), p, g, y_h, saved[h], normkit::running(a, b));
          fbn.forward_global(mk(static_cast<const float*>(xw.data())), p, g, yw_h, savedw[h],
                             normkit::running(aw, bw));
        } else {
          bn.forward_global(mk(static_cast<const T*>(x.data() + half)), p, g, y_h, saved[h]);
          fbn.forward_global(mk(static_cast<const float*>(xw.data() + half)), p, g, yw_h, savedw[h]);
        }
        CHECK(same_stats(saved[h], savedw[h]));
      }
      normkit::ChannelGradSums gs[2], gsw[2];
      for (int h = 0; h < 2; ++h) {
        gs[h] = bn.partial_grad_sums(mk(dy.data() + h * half), mk(x.data() + h * half), saved[h]);
        gsw[h] = fbn.partial_grad_sums(mk(dyw.data() + h * half), mk(xw.data() + h * half), savedw[h]);
        for (std::size_t c = 0; c < C; ++c) {
          CHECK(bits_of(gs[h].sum_dy(I(c))) == bits_of(gsw[h].sum_dy(I(c))));
          CHECK(bits_of(gs[h].sum_dy_xhat(I(c))) == bits_of(gsw[h].sum_dy_xhat(I(c))));
        }
      }
      const auto sums = normkit::merge(gs[0], gs[1]);
      for (int h = 0; h < 2; ++h) {
        Vec1<float> dgm(dg.data(), s.C), dbm(db.data(), s.C), dgmw(dgw.data(), s.C), dbmw(dbw.data(), s.C);
        bn.backward_global(mk(dy.data() + h * half), mk(x.data() + h * half), p, saved[h], sums, g.count,
                           mk(dx.data() + h * half), dgm, dbm);
        fbn.backward_global(mk(dyw.data() + h * half), mk(xw.data() + h * half), p, savedw[h], sums,
                            g.count, mk(dxw.data() + h * half), dgmw, dbmw);
      }
    });
    CHECK(count_unlike(y.data(), yw.data(), n, "y") == 0);
    CHECK(count_unlike(dx.data(), dxw.data(), n, "dx") == 0);
    std::size_t bad = 0;
    for (std::size_t c = 0; c < C; ++c)
      bad += !same(dg[c], dgw[c]) + !same(db[c], dbw[c]) + !same(rm[c], rmw[c]) + !same(rv[c], rvw[c]);
    CHECK(bad == 0);
    // Against the whole batch: the float results agree within float's rounding, so the
    // narrow ones within one rounding of T.
    nt::Mismatch my, mdx, mp;
    const double u = u_of<T>();
    for (std::size_t i = 0; i < n; ++i) {
      const double yv = static_cast<double>(whole.y[i]), dv = static_cast<double>(whole.dx[i]);
      my.check(static_cast<double>(y[i]), yv, 2 * u * std::fabs(yv) + 1e-5, i, "y");
      mdx.check(static_cast<double>(dx[i]), dv, 2 * u * std::fabs(dv) + 1e-5, i, "dx");
    }
    for (std::size_t c = 0; c < C; ++c) {
      mp.check(dg[c], whole.dg[c], 1e-4 * (1 + std::fabs(whole.dg[c])), c, "dgamma");
      mp.check(db[c], whole.db[c], 1e-4 * (1 + std::fabs(whole.db[c])), c, "dbeta");
      mp.check(rm[c], whole.rm[c], 1e-6 * (1 + std::fabs(whole.rm[c])), c, "running mean");
      mp.check(rv[c], whole.rv[c], 1e-6 * (1 + std::fabs(whole.rv[c])), c, "running var");
    }
    CHECK(my.count == 0);
    CHECK(mdx.count == 0);
    CHECK(mp.count == 0);
    if (my.count + mdx.count + mp.count) UNSCOPED_INFO(my.first << " " << mdx.first << " " << mp.first);
  }
}

TEMPLATE_TEST_CASE("Narrow channel norms: NaN poisons only its own channel or group",
                   "[narrow][channel][nan]", BF, HF) {
  using T = TestType;
  for (const Shape& s : shapes()) {
    if (!s.big) continue;
    INFO(s.str());
    Problem<T> pr(s, 11, 0);
    const std::size_t n = s.size(), C = Z(s.C), M = Z(s.M());
    const Buffer<T> x = pr.template to_mem<T>(pr.x), dy = pr.template to_mem<T>(pr.dy);
    const std::size_t n0 = Z(s.N) - 1, c0 = C / 2, m0 = M / 3;
    pr.x[(n0 * C + c0) * M + m0] = T(std::numeric_limits<float>::quiet_NaN());
    const Buffer<T> xn = pr.template to_mem<T>(pr.x);
    const Op<T> op{s, AffineMode::ScaleShift};
    const auto a = run(op, pr, x, dy, pr.gf.data(), pr.bf.data(), true, false);
    const auto b = run(op, pr, xn, dy, pr.gf.data(), pr.bf.data(), true, false);
    const Index cg = s.kind == ChanKind::Group ? s.C / s.groups : 1;
    auto channel_hit = [&](std::size_t c) {  // dgamma, running stats
      return s.kind == ChanKind::Group ? c / Z(cg) == c0 / Z(cg) : c == c0;
    };
    auto elem_hit = [&](std::size_t nn, std::size_t c) {
      return channel_hit(c) && (s.kind == ChanKind::Batch || nn == n0);
    };
    std::size_t bad = 0;
    for (std::size_t nn = 0; nn < Z(s.N); ++nn)
      for (std::size_t c = 0; c < C; ++c)
        for (std::size_t m = 0; m < M; ++m) {
          const std::size_t i = s.at(nn, c, m);
          const float yb = static_cast<float>(b.y[i]), dxb = static_cast<float>(b.dx[i]);
          if (elem_hit(nn, c))
            bad += !std::isnan(yb) + !std::isnan(dxb);
          else
            bad += !same(a.y[i], b.y[i]) + !same(a.dx[i], b.dx[i]);
        }
    for (std::size_t c = 0; c < C; ++c) {
      if (channel_hit(c)) {
        bad += !std::isnan(b.dg[c]);
        if (s.has_running()) bad += !std::isnan(b.rm[c]) + !std::isnan(b.rv[c]);
      } else {
        bad += !same(a.dg[c], b.dg[c]) + !same(a.db[c], b.db[c]) + !same(a.rm[c], b.rm[c]) +
               !same(a.rv[c], b.rv[c]);
      }
    }
    CHECK(bad == 0);
    (void)n;
  }
}

namespace {

template <class U>
Eigen::Tensor<U, 1> zeros(Index n) {
  Eigen::Tensor<U, 1> t(n);
  t.setZero();
  return t;
}

// Tiny (2, 3, 2, 2) channels-first problems in storage U (narrow, or float for the twin),
// float parameters and statistics, every output filled with a sentinel.
template <class U>
struct Env {
  using type = U;
  static constexpr Index N = 2, C = 3, H = 2, W = 2, n = N * C * H * W;
  Buffer<U> x{32, 0}, y{32, 0}, dy{32, 0}, dx{32, 0};
  Buffer<float> g{8, 0}, b{8, 0}, dg{8, 0}, db{8, 0}, rm{8, 0}, rv{8, 0};
  std::int64_t nbt = 3;
  Stats saved;
  static constexpr float kS = 7.25f;
  Env() {
    std::vector<float> t(32);
    nt::fill_normal(t.data(), 32, 5);
    for (std::size_t i = 0; i < 32; ++i) x[i] = U(t[i]);
    nt::fill_normal(t.data(), 32, 6);
    for (std::size_t i = 0; i < 32; ++i) dy[i] = U(t[i]);
    g.fill(1.0f);
    b.fill(0.0f);
    y.fill(U(kS));
    dx.fill(U(kS));
    for (Buffer<float>* p : {&dg, &db, &rm, &rv}) p->fill(kS);
    saved.mean = Eigen::Tensor<float, 1>(2);
    saved.mean_lo = Eigen::Tensor<float, 1>(2);
    saved.rstd = Eigen::Tensor<float, 1>(2);
    saved.mean.setConstant(kS);
    saved.mean_lo.setConstant(kS);
    saved.rstd.setConstant(kS);
  }
  bool untouched() const {
    bool ok = y.all_equal(U(kS)) && dx.all_equal(U(kS)) && nbt == 3;
    for (const Buffer<float>* p : {&dg, &db, &rm, &rv}) ok = ok && p->all_equal(kS);
    for (auto* t : {&saved.mean, &saved.mean_lo, &saved.rstd})
      ok = ok && t->size() == 2 && t->data()[0] == kS && t->data()[1] == kS;
    return ok;
  }
  static std::array<Index, 4> d4() { return {W, H, C, N}; }
  auto X(Index off = 0) const { return nt::cmap<U, 4, Eigen::RowMajor>(x.data() + off, d4()); }
  auto DY() const { return nt::cmap<U, 4, Eigen::RowMajor>(dy.data(), d4()); }
  auto Y(Index off = 0) { return nt::map<U, 4, Eigen::RowMajor>(y.data() + off, d4()); }
  auto DX(U* p) { return nt::map<U, 4, Eigen::RowMajor>(p, d4()); }
  auto Yd(std::array<Index, 4> d) { return nt::map<U, 4, Eigen::RowMajor>(y.data(), d); }
  Vec1<float> V(Buffer<float>& p, Index len = C) { return Vec1<float>(p.data(), len); }
  normkit::Affine<float> P() const {
    return normkit::affine(CVec1<float>(g.data(), C), CVec1<float>(b.data(), C));
  }
};

}  // namespace

TEMPLATE_TEST_CASE("Narrow channel norms: bad arguments throw before writing, with the float op's message",
                   "[narrow][channel][errors]", BF, HF) {
  using T = TestType;
  auto check = [](const char* what, auto&& f) {
    Env<T> a;
    Env<float> w;
    std::string ma, mw;
    try {
      f(a);
    } catch (const normkit::invalid_argument& e) {
      ma = e.what();
    }
    try {
      f(w);
    } catch (const normkit::invalid_argument& e) {
      mw = e.what();
    }
    INFO(what << ": " << ma << " | float: " << mw);
    CHECK(!ma.empty());
    CHECK(ma == mw);
    CHECK(a.untouched());
  };
  using F = ChannelFormat;
  auto bn = [](auto& e) { return normkit::BatchNorm<typename std::decay_t<decltype(e)>::type>(); };
  check("y dims", [&](auto& e) {
    Vec1<float> m = e.V(e.rm), v = e.V(e.rv);
    bn(e).forward(e.X(), e.P(), e.Yd({1, 2, 3, 2}), e.saved, normkit::running(m, v, e.nbt));
  });
  check("gamma size", [&](auto& e) {
    bn(e).forward(e.X(), normkit::affine(CVec1<float>(e.g.data(), 4), CVec1<float>(e.b.data(), 3)),
                  e.Y(), e.saved);
  });
  check("params missing beta", [&](auto& e) {
    bn(e).forward(e.X(), normkit::affine(CVec1<float>(e.g.data(), 3)), e.Y(), e.saved);
  });
  check("running var missing", [&](auto& e) {
    normkit::Running<float> r;
    r.mean = normkit::detail::out<float>(e.V(e.rm));
    bn(e).forward(e.X(), e.P(), e.Y(), e.saved, r);
  });
  check("cumulative momentum without a counter", [&](auto& e) {
    using U = typename std::decay_t<decltype(e)>::type;
    Vec1<float> m = e.V(e.rm), v = e.V(e.rv);
    normkit::BatchNorm<U>(F::First, 1e-5, std::nullopt).forward(e.X(), e.P(), e.Y(), e.saved,
                                                                  normkit::running(m, v));
  });
  check("y partly overlaps x", [&](auto& e) {
    using U = typename std::decay_t<decltype(e)>::type;
    bn(e).forward(e.X(), e.P(), nt::map<U, 4, Eigen::RowMajor>(const_cast<U*>(e.x.data()) + 1, e.d4()),
                  e.saved);
  });
  check("running overlaps gamma", [&](auto& e) {
    Vec1<float> m(e.g.data(), 3), v = e.V(e.rv);
    bn(e).forward(e.X(), e.P(), e.Y(), e.saved, normkit::running(m, v, e.nbt));
  });
  check("eval without running", [&](auto& e) { bn(e).forward_eval(e.X(), e.P(), {}, e.Y()); });
  check("training, one value per channel", [&](auto& e) {
    using U = typename std::decay_t<decltype(e)>::type;
    bn(e).forward(nt::cmap<U, 2, Eigen::RowMajor>(e.x.data(), {3, 1}), e.P(),
                  nt::map<U, 2, Eigen::RowMajor>(e.y.data(), {3, 1}), e.saved);
  });
  check("InstanceNorm, one spatial element", [&](auto& e) {
    using U = typename std::decay_t<decltype(e)>::type;
    normkit::InstanceNorm<U>().forward(nt::cmap<U, 2, Eigen::RowMajor>(e.x.data(), {3, 2}), {},
                                       nt::map<U, 2, Eigen::RowMajor>(e.y.data(), {3, 2}), e.saved);
  });
  check("GroupNorm, C % G", [&](auto& e) {
    using U = typename std::decay_t<decltype(e)>::type;
    normkit::GroupNorm<U>(2).forward(e.X(), e.P(), e.Y(), e.saved);
  });
  check("backward, saved size", [&](auto& e) {
    Stats none;
    Vec1<float> dg = e.V(e.dg), db = e.V(e.db);
    bn(e).backward(e.DY(), e.X(), e.P(), none, e.DX(e.dx.data()), dg, db);
  });
  check("backward, dgamma without gamma", [&](auto& e) {
    using U = typename std::decay_t<decltype(e)>::type;
    Stats st;
    st.mean = st.mean_lo = st.rstd = zeros<float>(3);
    Vec1<float> dg = e.V(e.dg);
    normkit::BatchNorm<U>(F::First, 1e-5, 0.1, AffineMode::None)
        .backward(e.DY(), e.X(), normkit::Affine<float>{}, st, e.DX(e.dx.data()), dg,
                  normkit::skip);
  });
  check("backward, dx partly overlaps dy", [&](auto& e) {
    using U = typename std::decay_t<decltype(e)>::type;
    Stats st;
    st.mean = st.mean_lo = st.rstd = zeros<float>(3);
    bn(e).backward(e.DY(), e.X(), e.P(), st, e.DX(const_cast<U*>(e.dy.data()) + 1), normkit::skip,
                   normkit::skip);
  });
  check("backward_eval, running overlaps dgamma", [&](auto& e) {
    Vec1<float> m = e.V(e.rm), v(e.dg.data(), 3), dg = e.V(e.dg);
    bn(e).backward_eval(e.DY(), e.X(), e.P(), normkit::running(m, v), e.DX(e.dx.data()), dg, normkit::skip);
  });
  check("forward_global, channels", [&](auto& e) {
    normkit::ChannelMoments g;
    g.count = 8;
    g.mean = g.m2 = zeros<double>(2);
    bn(e).forward_global(e.X(), e.P(), g, e.Y(), e.saved);
  });
  check("backward_global, count", [&](auto& e) {
    Stats st;
    st.mean = st.mean_lo = st.rstd = zeros<float>(3);
    normkit::ChannelGradSums gs;
    gs.sum_dy = gs.sum_dy_xhat = zeros<double>(3);
    bn(e).backward_global(e.DY(), e.X(), e.P(), st, gs, 0.0, e.DX(e.dx.data()), normkit::skip,
                          normkit::skip);
  });
  check("partial_grad_sums, dy dims", [&](auto& e) {
    using U = typename std::decay_t<decltype(e)>::type;
    Stats st;
    st.mean = st.mean_lo = st.rstd = zeros<float>(3);
    (void)bn(e).partial_grad_sums(nt::cmap<U, 4, Eigen::RowMajor>(e.dy.data(), {1, 2, 3, 2}), e.X(), st);
  });
  check("partial_stats, rank 1", [&](auto& e) {
    using U = typename std::decay_t<decltype(e)>::type;
    (void)bn(e).partial_stats(nt::cmap<U, 1, Eigen::RowMajor>(e.x.data(), {3}));
  });
  // T parameters: y overlapping gamma.
  {
    Env<T> a;
    Buffer<T> gb(8, 0);
    gb.fill(T(1.0f));
    auto p = normkit::affine(CVec1<T>(a.y.data(), 3), CVec1<T>(gb.data(), 3));
    a.y.fill(T(1.0f));
    CHECK_THROWS_AS(normkit::BatchNorm<T>().forward(a.X(), p, a.Y(), a.saved), normkit::invalid_argument);
    CHECK(a.y.all_equal(T(1.0f)));
  }
}
