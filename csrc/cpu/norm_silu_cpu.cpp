// CPU kernels of group_norm_silu and rms_norm_silu (at::parallel_for over independent statistics).
//
// group_norm_silu: x as (N, C, S); one task per (n, g). Forward: the group's statistics in one pass over x
// (blocks of kBlock elements: block mean and squared deviations from it in the accumulate dtype, the blocks
// merged in double with Chan's formula: exact to ~1e-7 for any mean / spread), then out = silu(x * scale + shift)
// in a second pass. Backward: one pass for the per-channel sums of dy * xhat and dy (dy = grad * silu'(y)
// recomputed from x), the group's coefficients, then dx in a second pass; a group of at most kCache elements
// keeps dy and xhat of the first pass in a per-thread float buffer (the second pass then reads nothing).
// rms_norm_silu: x as (O, D, I); rows (I = 1, or D unit-stride: one task per (o, i)) or tiles of kCols columns
// (one task per (o, column tile), D walked row by row, the columns unit-stride). dweight from per-thread (D,)
// partials summed in thread order. Every inner loop runs over a contiguous float buffer, so the compiler
// vectorizes it, including the sigmoid (a rational tanh, no libm call).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "../rms_view.h"
#include "../tensor_args.h"

// Comparisons may trap under GCC's default -ftrapping-math, which keeps the clamps of fast_tanh (and so every loop
// that calls it) from vectorizing; nothing here reads floating-point exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#define FNF_INLINE __attribute__((always_inline)) inline
#else
#define FNF_INLINE inline
#endif

namespace fnf {
namespace {

constexpr int64_t kBlock = 2048;       // elements per block of a channel row / of D
constexpr int64_t kCache = 1 << 15;    // groups up to this many elements keep dy and xhat between the passes
constexpr int64_t kCols = 64;          // columns per rms tile

// sigmoid(y) = (1 + tanh(y / 2)) / 2 with a rational tanh (odd degree-13 over even degree-6 polynomial, the
// minimax form Eigen uses; |error| < 3e-7 on every float y), inlined and branch-free so that loops over buffers
// vectorize. (An exp through a 2^n exponent-bit scale vectorized too, but ran ~10x slower per element here.)
FNF_INLINE float fast_tanh(float x) {
  x = x < -7.90531110763549805f ? -7.90531110763549805f : x;  // tanh rounds to +-1 in float beyond
  x = x > 7.90531110763549805f ? 7.90531110763549805f : x;
  const float x2 = x * x;
  float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  return x * p / q;
}
FNF_INLINE float sigmoid(float y) { return 0.5f + 0.5f * fast_tanh(0.5f * y); }
FNF_INLINE double sigmoid(double y) { return 1.0 / (1.0 + std::exp(-y)); }
// grad * silu'(y).
template <typename T> FNF_INLINE T silu_grad(T g, T y) {
  const T s = sigmoid(y);
  return g * (s * (T(1) + y * (T(1) - s)));
}

// buf[k] = p[k * stride] for k < len, in the accumulate dtype.
template <typename scalar_t, typename acc_t>
inline void load(const scalar_t* p, int64_t stride, int64_t len, acc_t* buf) {
  if (stride == 1) {
    #pragma omp simd
    for (int64_t k = 0; k < len; ++k) buf[k] = acc_t(p[k]);
  } else {
    for (int64_t k = 0; k < len; ++k) buf[k] = acc_t(p[k * stride]);
  }
}

template <typename scalar_t, typename acc_t>
inline void store(const acc_t* buf, int64_t len, scalar_t* p, int64_t stride) {
  if (stride == 1) {
    #pragma omp simd
    for (int64_t k = 0; k < len; ++k) p[k] = scalar_t(buf[k]);
  } else {
    for (int64_t k = 0; k < len; ++k) p[k * stride] = scalar_t(buf[k]);
  }
}

struct Moments {  // count, mean, sum of squared deviations (Chan's merge)
  double n = 0, mean = 0, m2 = 0;
  void add(double nb, double mb, double m2b) {
    const double tot = n + nb, delta = mb - mean;
    mean += delta * nb / tot;
    m2 += m2b + delta * delta * n * nb / tot;
    n = tot;
  }
};

template <typename acc_t>
inline const acc_t* opt_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<acc_t>() : nullptr; }

// ------------------------------------------------------------------------------------------ group_norm_silu
struct GroupArgs {
  int64_t N, C, S, G;
  Strides3 xs, os;  // x and out (or grad and dx) strides of the (N, C, S) views
};

template <typename scalar_t, typename acc_t>
void gn_forward(const GroupArgs& a, const scalar_t* x, const acc_t* w, const acc_t* b, double eps, bool silu,
                scalar_t* out, acc_t* mean, acc_t* rstd) {
  const int64_t cpg = a.C / a.G;
  at::parallel_for(0, a.N * a.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kBlock);
    acc_t* v = buf.data();
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / a.G, c0 = (ng % a.G) * cpg;
      Moments m;
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        const scalar_t* row = x + n * a.xs.s[0] + c * a.xs.s[1];
        for (int64_t j = 0; j < a.S; j += kBlock) {
          const int64_t len = std::min(kBlock, a.S - j);
          load(row + j * a.xs.s[2], a.xs.s[2], len, v);
          acc_t s = 0;
          #pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < len; ++k) s += v[k];
          const acc_t bm = s / acc_t(len);
          acc_t q = 0;
          #pragma omp simd reduction(+ : q)
          for (int64_t k = 0; k < len; ++k) q += (v[k] - bm) * (v[k] - bm);
          m.add(double(len), double(bm), double(q));
        }
      }
      const acc_t mu = acc_t(m.mean), r = acc_t(1.0 / std::sqrt(m.m2 / m.n + eps));
      mean[ng] = mu;
      rstd[ng] = r;
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        const acc_t scale = r * (w ? w[c] : acc_t(1)), shift = (b ? b[c] : acc_t(0)) - mu * scale;
        const scalar_t* row = x + n * a.xs.s[0] + c * a.xs.s[1];
        scalar_t* orow = out + n * a.os.s[0] + c * a.os.s[1];
        for (int64_t j = 0; j < a.S; j += kBlock) {
          const int64_t len = std::min(kBlock, a.S - j);
          load(row + j * a.xs.s[2], a.xs.s[2], len, v);
          if (silu) {
            #pragma omp simd
            for (int64_t k = 0; k < len; ++k) {
              const acc_t y = v[k] * scale + shift;
              v[k] = y * sigmoid(y);
            }
          } else {
            #pragma omp simd
            for (int64_t k = 0; k < len; ++k) v[k] = v[k] * scale + shift;
          }
          store(v, len, orow + j * a.os.s[2], a.os.s[2]);
        }
      }
    }
  });
}

// xv (x block) -> xhat in place, gv (grad block) -> dy = grad * silu'(xhat * w + b) in place.
template <typename acc_t>
inline void gn_dy(acc_t* xv, acc_t* gv, int64_t len, acc_t mu, acc_t r, acc_t wc, acc_t bc, bool silu) {
  #pragma omp simd
  for (int64_t k = 0; k < len; ++k) xv[k] = (xv[k] - mu) * r;
  if (silu) {
    #pragma omp simd
    for (int64_t k = 0; k < len; ++k) gv[k] = silu_grad(gv[k], xv[k] * wc + bc);
  }
}

template <typename scalar_t, typename acc_t>
void gn_backward(const GroupArgs& a, const scalar_t* x, const scalar_t* grad, Strides3 gs, const acc_t* w,
                 const acc_t* b, const acc_t* mean, const acc_t* rstd, scalar_t* dx, acc_t* sum_dyx, acc_t* sum_dy,
                 bool silu) {
  const int64_t cpg = a.C / a.G, group = cpg * a.S;
  const bool cache = group <= kCache;
  at::parallel_for(0, a.N * a.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> bx(cache ? group : kBlock), bg(cache ? group : kBlock);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / a.G, c0 = (ng % a.G) * cpg;
      const acc_t mu = mean[ng], r = rstd[ng];
      double ca = 0, cb = 0;
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        const acc_t wc = w ? w[c] : acc_t(1), bc = b ? b[c] : acc_t(0);
        const scalar_t* xrow = x + n * a.xs.s[0] + c * a.xs.s[1];
        const scalar_t* grow = grad + n * gs.s[0] + c * gs.s[1];
        double sdyx = 0, sdy = 0;
        for (int64_t j = 0; j < a.S; j += kBlock) {
          const int64_t len = std::min(kBlock, a.S - j);
          acc_t* xv = bx.data() + (cache ? (c - c0) * a.S + j : 0);
          acc_t* gv = bg.data() + (cache ? (c - c0) * a.S + j : 0);
          load(xrow + j * a.xs.s[2], a.xs.s[2], len, xv);
          load(grow + j * gs.s[2], gs.s[2], len, gv);
          gn_dy(xv, gv, len, mu, r, wc, bc, silu);
          acc_t s1 = 0, s2 = 0;
          #pragma omp simd reduction(+ : s1, s2)
          for (int64_t k = 0; k < len; ++k) {
            s1 += gv[k] * xv[k];
            s2 += gv[k];
          }
          sdyx += double(s1);
          sdy += double(s2);
        }
        sum_dyx[n * a.C + c] = acc_t(sdyx);
        sum_dy[n * a.C + c] = acc_t(sdy);
        ca += double(wc) * sdy;
        cb += double(wc) * sdyx;
      }
      if (dx == nullptr) continue;
      const acc_t fa = acc_t(ca / double(group)), fb = acc_t(cb / double(group));
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        const acc_t wc = w ? w[c] : acc_t(1), bc = b ? b[c] : acc_t(0);
        const scalar_t* xrow = x + n * a.xs.s[0] + c * a.xs.s[1];
        const scalar_t* grow = grad + n * gs.s[0] + c * gs.s[1];
        scalar_t* drow = dx + n * a.os.s[0] + c * a.os.s[1];
        for (int64_t j = 0; j < a.S; j += kBlock) {
          const int64_t len = std::min(kBlock, a.S - j);
          acc_t* xv = bx.data() + (cache ? (c - c0) * a.S + j : 0);
          acc_t* gv = bg.data() + (cache ? (c - c0) * a.S + j : 0);
          if (!cache) {
            load(xrow + j * a.xs.s[2], a.xs.s[2], len, xv);
            load(grow + j * gs.s[2], gs.s[2], len, gv);
            gn_dy(xv, gv, len, mu, r, wc, bc, silu);
          }
          #pragma omp simd
          for (int64_t k = 0; k < len; ++k) xv[k] = (wc * gv[k] - fa - xv[k] * fb) * r;
          store(xv, len, drow + j * a.os.s[2], a.os.s[2]);
        }
      }
    }
  });
}

GroupArgs group_args(const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have at least 2 dims (N, C, ...), got ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "group_norm_silu_cpu takes CPU tensors, got x on ", x.device());
  TORCH_CHECK_VALUE(num_groups >= 1 && x.size(1) % num_groups == 0, "num_groups must divide C = ", x.size(1),
                    ", got ", num_groups);
  const NcsView v = ncs_view(x);
  TORCH_CHECK_VALUE(v.ok, "x's spatial dims must merge into one stride (contiguous or channels_last), got strides ",
                    x.strides());
  return GroupArgs{x.size(0), x.size(1), v.spatial, num_groups, v.strides, v.strides};
}

at::Tensor group_param(const c10::optional<at::Tensor>& p, const char* name, const at::Tensor& x) {
  if (!p.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == x.size(1), name, " must have shape (C,) = (", x.size(1),
                    ",), got ", p->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(p->scalar_type()), name, " must be floating point, got ", p->scalar_type());
  TORCH_CHECK_VALUE(p->device() == x.device(), name, " is on ", p->device(), " but x is on ", x.device());
  return p->to(accumulate_type(x.scalar_type())).contiguous();
}

// ------------------------------------------------------------------------------------------- rms_norm_silu
// Rows: I = 1 or D unit-stride: one task per (o, i) walks D. Returns rstd per row.
template <typename scalar_t, typename acc_t>
void rms_forward(const RmsNormArgs& a, const scalar_t* x, const acc_t* w, scalar_t* out, Strides3 os, acc_t* rstd) {
  std::vector<acc_t> ones(w ? 0 : a.dim, acc_t(1));
  if (!w) w = ones.data();
  const bool rows = a.inner == 1 || a.stride[1] == 1;
  const int64_t tiles = rows ? a.outer * a.inner : a.outer * ((a.inner + kCols - 1) / kCols);
  const int64_t col_tiles = (a.inner + kCols - 1) / kCols;
  at::parallel_for(0, tiles, rows ? 16 : 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(std::max(kBlock, kCols));
    std::vector<double> ss(kCols);
    std::vector<acc_t> r(kCols);
    acc_t* v = buf.data();
    for (int64_t t = begin; t < end; ++t) {
      if (rows) {
        const int64_t o = t / a.inner, i = t % a.inner;
        const scalar_t* xr = x + o * a.stride[0] + i * a.stride[2];
        scalar_t* orow = out + o * os.s[0] + i * os.s[2];
        double sum = 0;
        for (int64_t j = 0; j < a.dim; j += kBlock) {
          const int64_t len = std::min(kBlock, a.dim - j);
          load(xr + j * a.stride[1], a.stride[1], len, v);
          acc_t s = 0;
          #pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < len; ++k) s += v[k] * v[k];
          sum += double(s);
        }
        const acc_t rs = acc_t(1.0 / std::sqrt(sum / double(a.dim) + a.eps));
        rstd[t] = rs;
        for (int64_t j = 0; j < a.dim; j += kBlock) {
          const int64_t len = std::min(kBlock, a.dim - j);
          load(xr + j * a.stride[1], a.stride[1], len, v);
          #pragma omp simd
          for (int64_t k = 0; k < len; ++k) v[k] = v[k] * rs * w[j + k];
          if (a.silu) {
            #pragma omp simd
            for (int64_t k = 0; k < len; ++k) v[k] = v[k] * sigmoid(v[k]);
          }
          store(v, len, orow + j * os.s[1], os.s[1]);
        }
        continue;
      }
      const int64_t o = t / col_tiles, i0 = (t % col_tiles) * kCols, cols = std::min(kCols, a.inner - i0);
      const scalar_t* xt = x + o * a.stride[0] + i0 * a.stride[2];
      scalar_t* ot = out + o * os.s[0] + i0 * os.s[2];
      std::fill(ss.begin(), ss.end(), 0.0);
      for (int64_t d = 0; d < a.dim; ++d) {
        load(xt + d * a.stride[1], a.stride[2], cols, v);
        #pragma omp simd
        for (int64_t k = 0; k < cols; ++k) ss[k] += double(v[k] * v[k]);
      }
      for (int64_t k = 0; k < cols; ++k) {
        r[k] = acc_t(1.0 / std::sqrt(ss[k] / double(a.dim) + a.eps));
        rstd[o * a.inner + i0 + k] = r[k];
      }
      for (int64_t d = 0; d < a.dim; ++d) {
        const acc_t wd = w[d];
        load(xt + d * a.stride[1], a.stride[2], cols, v);
        #pragma omp simd
        for (int64_t k = 0; k < cols; ++k) v[k] = v[k] * r[k] * wd;
        if (a.silu) {
          #pragma omp simd
          for (int64_t k = 0; k < cols; ++k) v[k] = v[k] * sigmoid(v[k]);
        }
        store(v, cols, ot + d * os.s[1], os.s[2]);
      }
    }
  });
}

// xv -> xhat, gv -> dy (grad * silu'(xhat * w)) for len elements with per-element or one weight.
template <typename acc_t>
inline void rms_dy(acc_t* xv, acc_t* gv, int64_t len, const acc_t* r, acc_t r1, const acc_t* w, acc_t w1,
                   bool silu) {
  if (r) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) xv[k] *= r[k];
  } else {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) xv[k] *= r1;
  }
  if (silu && w) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) gv[k] = silu_grad(gv[k], xv[k] * w[k]);
  } else if (silu) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) gv[k] = silu_grad(gv[k], xv[k] * w1);
  }
}

template <typename scalar_t, typename acc_t>
void rms_backward(const RmsNormArgs& a, const scalar_t* x, const scalar_t* grad, Strides3 gs, const acc_t* w,
                  const acc_t* rstd, scalar_t* dx, Strides3 ds, acc_t* part /* (threads, D) or null */) {
  std::vector<acc_t> ones(w ? 0 : a.dim, acc_t(1));
  if (!w) w = ones.data();
  const bool rows = a.inner == 1 || a.stride[1] == 1;
  const int64_t col_tiles = (a.inner + kCols - 1) / kCols;
  const int64_t tiles = rows ? a.outer * a.inner : a.outer * col_tiles;
  const bool cache = a.dim <= kCache;
  at::parallel_for(0, tiles, rows ? 16 : 1, [&](int64_t begin, int64_t end) {
    acc_t* my_part = part ? part + int64_t(at::get_thread_num()) * a.dim : nullptr;
    const int64_t row_buf = rows ? (cache ? a.dim : kBlock) : kCols;
    std::vector<acc_t> bx(row_buf), bg(row_buf), dot(kCols);
    std::vector<double> dots(kCols);
    for (int64_t t = begin; t < end; ++t) {
      if (rows) {
        const int64_t o = t / a.inner, i = t % a.inner;
        const scalar_t* xr = x + o * a.stride[0] + i * a.stride[2];
        const scalar_t* gr = grad + o * gs.s[0] + i * gs.s[2];
        const acc_t rs = rstd[t];
        double sum = 0;
        for (int64_t j = 0; j < a.dim; j += kBlock) {
          const int64_t len = std::min(kBlock, a.dim - j);
          acc_t* xv = bx.data() + (cache ? j : 0);
          acc_t* gv = bg.data() + (cache ? j : 0);
          load(xr + j * a.stride[1], a.stride[1], len, xv);
          load(gr + j * gs.s[1], gs.s[1], len, gv);
          rms_dy(xv, gv, len, static_cast<const acc_t*>(nullptr), rs, w + j, acc_t(1), a.silu);
          acc_t s = 0;
          #pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < len; ++k) s += gv[k] * w[j + k] * xv[k];
          sum += double(s);
          if (my_part) {
            #pragma omp simd
            for (int64_t k = 0; k < len; ++k) my_part[j + k] += gv[k] * xv[k];
          }
        }
        if (dx == nullptr) continue;
        const acc_t c = acc_t(sum / double(a.dim));
        scalar_t* dr = dx + o * ds.s[0] + i * ds.s[2];
        for (int64_t j = 0; j < a.dim; j += kBlock) {
          const int64_t len = std::min(kBlock, a.dim - j);
          acc_t* xv = bx.data() + (cache ? j : 0);
          acc_t* gv = bg.data() + (cache ? j : 0);
          if (!cache) {
            load(xr + j * a.stride[1], a.stride[1], len, xv);
            load(gr + j * gs.s[1], gs.s[1], len, gv);
            rms_dy(xv, gv, len, static_cast<const acc_t*>(nullptr), rs, w + j, acc_t(1), a.silu);
          }
          #pragma omp simd
          for (int64_t k = 0; k < len; ++k) xv[k] = (gv[k] * w[j + k] - xv[k] * c) * rs;
          store(xv, len, dr + j * ds.s[1], ds.s[1]);
        }
        continue;
      }
      const int64_t o = t / col_tiles, i0 = (t % col_tiles) * kCols, cols = std::min(kCols, a.inner - i0);
      const scalar_t* xt = x + o * a.stride[0] + i0 * a.stride[2];
      const scalar_t* gt = grad + o * gs.s[0] + i0 * gs.s[2];
      const acc_t* r = rstd + o * a.inner + i0;
      std::fill(dots.begin(), dots.end(), 0.0);
      for (int64_t d = 0; d < a.dim; ++d) {
        const acc_t wd = w[d];
        load(xt + d * a.stride[1], a.stride[2], cols, bx.data());
        load(gt + d * gs.s[1], gs.s[2], cols, bg.data());
        rms_dy(bx.data(), bg.data(), cols, r, acc_t(1), static_cast<const acc_t*>(nullptr), wd, a.silu);
        acc_t s = 0;
        #pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < cols; ++k) {
          dots[k] += double(bg[k] * wd * bx[k]);
          s += bg[k] * bx[k];
        }
        if (my_part) my_part[d] += s;
      }
      if (dx == nullptr) continue;
      for (int64_t k = 0; k < cols; ++k) dot[k] = acc_t(dots[k] / double(a.dim));
      scalar_t* dt = dx + o * ds.s[0] + i0 * ds.s[2];
      for (int64_t d = 0; d < a.dim; ++d) {
        const acc_t wd = w[d];
        load(xt + d * a.stride[1], a.stride[2], cols, bx.data());
        load(gt + d * gs.s[1], gs.s[2], cols, bg.data());
        rms_dy(bx.data(), bg.data(), cols, r, acc_t(1), static_cast<const acc_t*>(nullptr), wd, a.silu);
        #pragma omp simd
        for (int64_t k = 0; k < cols; ++k) bx[k] = (bg[k] * wd - bx[k] * dot[k]) * r[k];
        store(bx.data(), cols, dt + d * ds.s[1], ds.s[2]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(const at::Tensor& x,
                                                                    const c10::optional<at::Tensor>& weight,
                                                                    const c10::optional<at::Tensor>& bias,
                                                                    int64_t num_groups, double eps, bool silu) {
  const GroupArgs ga = group_args(x, num_groups);
  const at::Tensor w = group_param(weight, "weight", x), b = group_param(bias, "bias", x);
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({ga.N, num_groups}, acc), rstd = at::empty({ga.N, num_groups}, acc);
  if (ga.N * ga.C * ga.S == 0) return {out, mean.fill_(NAN), rstd.fill_(NAN)};
  GroupArgs a = ga;
  a.os = ncs_view(out).strides;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gn_forward<scalar_t, acc_t>(a, x.data_ptr<scalar_t>(), opt_ptr<acc_t>(w), opt_ptr<acc_t>(b), eps, silu,
                                out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>());
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu, bool need_x, bool need_weight, bool need_bias) {
  GroupArgs a = group_args(x, num_groups);
  const at::Tensor w = group_param(weight, "weight", x), b = group_param(bias, "bias", x);
  TORCH_CHECK_VALUE(grad_in.sizes() == x.sizes() && grad_in.device() == x.device(), "grad must have x's shape ",
                    x.sizes(), " and device, got ", grad_in.sizes(), " on ", grad_in.device());
  TORCH_CHECK_TYPE(grad_in.scalar_type() == x.scalar_type(), "grad must have x's dtype ", x.scalar_type(), ", got ",
                   grad_in.scalar_type());
  const auto acc_type = accumulate_type(x.scalar_type());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == a.N && t->size(1) == num_groups && t->is_contiguous() &&
                          t->device() == x.device(),
                      "mean and rstd must be contiguous (N, G) = (", a.N, ", ", num_groups, ") on x's device");
    TORCH_CHECK_TYPE(t->scalar_type() == acc_type, "mean and rstd must be ", acc_type, " for a ", x.scalar_type(),
                     " x, got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(!need_weight || weight.has_value(), "need_weight without a weight");
  TORCH_CHECK_VALUE(!need_bias || bias.has_value(), "need_bias without a bias");
  const at::Tensor grad = ncs_view(grad_in).ok ? grad_in : grad_in.contiguous();
  const auto acc = x.options().dtype(acc_type);
  at::Tensor dx = need_x ? at::empty_like(x) : x.new_empty({0});
  at::Tensor sum_dyx = at::zeros({a.N, a.C}, acc), sum_dy = at::zeros({a.N, a.C}, acc);
  if (a.N * a.C * a.S == 0) {
    if (need_x) dx.zero_();
  } else {
    if (need_x) a.os = ncs_view(dx).strides;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gn_backward<scalar_t, acc_t>(a, x.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), ncs_view(grad).strides,
                                   opt_ptr<acc_t>(w), opt_ptr<acc_t>(b), mean.data_ptr<acc_t>(),
                                   rstd.data_ptr<acc_t>(), need_x ? dx.data_ptr<scalar_t>() : nullptr,
                                   sum_dyx.data_ptr<acc_t>(), sum_dy.data_ptr<acc_t>(), silu);
    });
  }
  at::Tensor dw = need_weight ? sum_dyx.sum(0).to(weight->scalar_type()) : x.new_empty({0});
  at::Tensor db = need_bias ? sum_dy.sum(0).to(bias->scalar_type()) : x.new_empty({0});
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_silu_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                     int64_t dim, double eps, bool silu) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "rms_norm_silu_cpu takes CPU tensors, got x on ", x.device());
  at::Tensor w;
  const RmsNormArgs a = rms_args(x, weight, dim, eps, silu, w);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.erase(shape.begin() + dim);
  at::Tensor out = at::empty_like(x);
  at::Tensor rstd = at::empty(shape, x.options().dtype(accumulate_type(x.scalar_type())));
  if (rms_empty(a)) return {out, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_silu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rms_forward<scalar_t, acc_t>(a, x.data_ptr<scalar_t>(), opt_ptr<acc_t>(w), out.data_ptr<scalar_t>(),
                                 rms_view(out, dim).strides, rstd.data_ptr<acc_t>());
  });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_silu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const at::Tensor& rstd, int64_t dim, bool silu,
                                                              bool need_x, bool need_weight) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "rms_norm_silu_backward_cpu takes CPU tensors, got x on ", x.device());
  at::Tensor w;
  const RmsNormArgs a = rms_args(x, weight, dim, 0.0, silu, w);
  check_rms_backward(grad_in, x, rstd, dim);
  TORCH_CHECK_VALUE(!need_weight || weight.has_value(), "need_weight without a weight");
  const at::Tensor grad = rms_view(grad_in, dim).ok ? grad_in : grad_in.contiguous();
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor dx = need_x ? at::empty_like(x) : x.new_empty({0});
  at::Tensor part = need_weight ? at::zeros({at::get_num_threads(), a.dim}, acc) : x.new_empty({0}, acc);
  if (rms_empty(a)) {
    if (need_x) dx.zero_();
  } else if (need_x || need_weight) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_silu_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      rms_backward<scalar_t, acc_t>(a, x.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                    rms_view(grad, dim).strides, opt_ptr<acc_t>(w), rstd.data_ptr<acc_t>(),
                                    need_x ? dx.data_ptr<scalar_t>() : nullptr,
                                    need_x ? rms_view(dx, dim).strides : Strides3{{0, 0, 0}},
                                    need_weight ? part.data_ptr<acc_t>() : nullptr);
    });
  }
  at::Tensor dw = need_weight ? part.sum(0).to(weight->scalar_type()) : x.new_empty({0});
  return {dx, dw};
}

}  // namespace fnf
