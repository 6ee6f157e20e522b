// CUDA kernels of rms_norm_silu (no torch headers; launched from bindings_cuda.cpp and the emulation driver).
//
// x is (O, D, I) through RmsNormArgs::stride; the statistic is rstd per column (o, i) over D. A tile is kCols
// columns of one o (32 when D is not the unit-stride dim, so a warp reads 32 neighbouring columns; else 1 and
// the block walks D of one column), the block's kRows = 256 / kCols thread rows walk D with step kRows, any D.
// A launch has at most kRmsMaxBlocks blocks striding over the tiles. Forward (one kernel): sum of squares,
// column sum through shared memory (a fixed tree: deterministic), rstd, then out = silu(x * rstd * w).
// Backward (one kernel): dy = grad * silu'(y) recomputed from x, the column's dot = sum_d dy * w * xhat, then
// dx = rstd * (dy * w - xhat * dot / D); dweight: each block adds its dy * xhat per d into its own row of the
// partials (blocks x D, no atomics), summed over the blocks by the caller. Reads: forward 2 x, backward 2 x +
// 2 grad (1 + 1 without dx); nothing of x's size is stored besides out and dx.
#include <cuda_runtime.h>

#include "fnf/cuda_launch.h"
#include "fnf/cuda_launchers.h"
#include "fnf/cuda_types.h"
#include "fnf/rms_norm_silu_args.h"

namespace fnf {
namespace cuda {
namespace {

constexpr int kThreads = kRmsThreads;

__device__ __forceinline__ float math_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double math_sqrt(double v) { return sqrt(v); }
__device__ __forceinline__ float math_exp(float v) { return expf(v); }
__device__ __forceinline__ double math_exp(double v) { return exp(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t y) { return acc_t(1) / (acc_t(1) + math_exp(-y)); }

// The sum of v over the threads of one column (same threadIdx.x % kCols), returned to each of them; a fixed
// tree over the rows. Every thread of the block must call it.
template <int kCols, typename acc_t>
__device__ __forceinline__ acc_t column_sum(acc_t v) {
  __shared__ acc_t red[kThreads];
  red[threadIdx.x] = v;
  __syncthreads();
  for (int half = kThreads / kCols / 2; half > 0; half >>= 1) {
    if (int(threadIdx.x) < half * kCols) red[threadIdx.x] += red[threadIdx.x + half * kCols];
    __syncthreads();
  }
  const acc_t total = red[threadIdx.x % kCols];
  __syncthreads();  // red is reused by the next call
  return total;
}

// The sum over the 32 lanes of a warp (one thread row when kCols = 32), in every lane.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t weight_at(const RmsNormArgs& a, int64_t d) {
  return a.weight ? static_cast<const acc_t*>(a.weight)[d] : acc_t(1);
}

// grad * silu'(y) for y = xhat * w (grad itself when silu is off).
template <typename acc_t>
__device__ __forceinline__ acc_t dy_of(acc_t g, acc_t y, bool silu) {
  if (!silu) return g;
  const acc_t s = sigmoid(y);
  return g * (s * (acc_t(1) + y * (acc_t(1) - s)));
}

template <typename scalar_t, int kCols>
__global__ void __launch_bounds__(kThreads) forward_kernel(RmsNormArgs a, scalar_t* out, Strides3 os,
                                                           typename AccOf<scalar_t>::type* rstd) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int kRows = kThreads / kCols;
  const int ti = int(threadIdx.x) % kCols, td = int(threadIdx.x) / kCols;
  const int64_t col_tiles = (a.inner + kCols - 1) / kCols, tiles = a.outer * col_tiles;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t o = t / col_tiles, i = (t - o * col_tiles) * kCols + ti;
    const bool live = i < a.inner;
    const scalar_t* x = static_cast<const scalar_t*>(a.x) + o * a.stride[0] + (live ? i : 0) * a.stride[2];
    acc_t ss = 0;
    if (live) {
      for (int64_t d = td; d < a.dim; d += kRows) {
        const acc_t v = to_acc(x[d * a.stride[1]]);
        ss += v * v;
      }
    }
    const acc_t r = acc_t(1) / math_sqrt(column_sum<kCols>(ss) / acc_t(a.dim) + acc_t(a.eps));
    if (!live) continue;  // the next tile's barriers are reached by every thread (t depends on the block only)
    if (td == 0) rstd[o * a.inner + i] = r;
    scalar_t* y_out = out + o * os.s[0] + i * os.s[2];
    for (int64_t d = td; d < a.dim; d += kRows) {
      acc_t y = to_acc(x[d * a.stride[1]]) * r * weight_at<acc_t>(a, d);
      if (a.silu) y = y * sigmoid(y);
      y_out[d * os.s[1]] = from_acc<scalar_t>(y);
    }
  }
}

template <typename scalar_t, int kCols>
__global__ void __launch_bounds__(kThreads) backward_kernel(RmsNormArgs a, const scalar_t* grad, Strides3 gs,
                                                            const typename AccOf<scalar_t>::type* rstd, scalar_t* dx,
                                                            Strides3 ds, typename AccOf<scalar_t>::type* part) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int kRows = kThreads / kCols;
  const int ti = int(threadIdx.x) % kCols, td = int(threadIdx.x) / kCols;
  const int64_t col_tiles = (a.inner + kCols - 1) / kCols, tiles = a.outer * col_tiles;
  acc_t* my_part = part ? part + int64_t(blockIdx.x) * a.dim : nullptr;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t o = t / col_tiles, i = (t - o * col_tiles) * kCols + ti;
    const bool live = i < a.inner;
    const scalar_t* x = static_cast<const scalar_t*>(a.x) + o * a.stride[0] + (live ? i : 0) * a.stride[2];
    const scalar_t* g = grad + o * gs.s[0] + (live ? i : 0) * gs.s[2];
    const acc_t r = live ? rstd[o * a.inner + i] : acc_t(0);
    acc_t dot = 0;
    // D in steps of kRows taken by every thread (the warp sums of dweight need all 32 lanes).
    for (int64_t d0 = 0; d0 < a.dim; d0 += kRows) {
      const int64_t d = d0 + td;
      acc_t dyx = 0;
      if (live && d < a.dim) {
        const acc_t xhat = to_acc(x[d * a.stride[1]]) * r, w = weight_at<acc_t>(a, d);
        const acc_t dy = dy_of(to_acc(g[d * gs.s[1]]), xhat * w, a.silu);
        dot += dy * w * xhat;
        dyx = dy * xhat;
      }
      if (my_part != nullptr) {
        if (kCols > 1) dyx = warp_sum(dyx);  // kCols = 32: a warp is one thread row, 32 columns
        if (ti == 0 && d < a.dim) my_part[d] += dyx;
      }
    }
    const acc_t c = column_sum<kCols>(dot) / acc_t(a.dim);
    if (!live || dx == nullptr) continue;
    scalar_t* dxp = dx + o * ds.s[0] + i * ds.s[2];
    for (int64_t d = td; d < a.dim; d += kRows) {
      const acc_t xhat = to_acc(x[d * a.stride[1]]) * r, w = weight_at<acc_t>(a, d);
      const acc_t dy = dy_of(to_acc(g[d * gs.s[1]]), xhat * w, a.silu);
      dxp[d * ds.s[1]] = from_acc<scalar_t>((dy * w - xhat * c) * r);
    }
  }
}

template <typename scalar_t>
cudaError_t launch_forward(const RmsNormArgs& a, void* out, const Strides3& os, void* rstd, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  auto* o = static_cast<scalar_t*>(out);
  auto* r = static_cast<acc_t*>(rstd);
  const unsigned blocks = unsigned(rms_blocks(a));
  if (rms_cols(a) == 32) {
    FNF_LAUNCH((forward_kernel<scalar_t, 32>), blocks, kThreads, 0, stream)(a, o, os, r);
  } else {
    FNF_LAUNCH((forward_kernel<scalar_t, 1>), blocks, kThreads, 0, stream)(a, o, os, r);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const RmsNormArgs& a, const void* grad, const Strides3& gs, const void* rstd, void* dx,
                            const Strides3& ds, void* part, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* g = static_cast<const scalar_t*>(grad);
  const auto* r = static_cast<const acc_t*>(rstd);
  auto* d = static_cast<scalar_t*>(dx);
  auto* p = static_cast<acc_t*>(part);
  const unsigned blocks = unsigned(rms_blocks(a));
  if (rms_cols(a) == 32) {
    FNF_LAUNCH((backward_kernel<scalar_t, 32>), blocks, kThreads, 0, stream)(a, g, gs, r, d, ds, p);
  } else {
    FNF_LAUNCH((backward_kernel<scalar_t, 1>), blocks, kThreads, 0, stream)(a, g, gs, r, d, ds, p);
  }
  return cudaGetLastError();
}

bool args_ok(const RmsNormArgs& a) { return a.outer > 0 && a.dim > 0 && a.inner > 0; }

}  // namespace

cudaError_t rms_norm_silu_forward(const RmsNormArgs& a, void* out, const Strides3& out_strides, void* rstd,
                                  cudaStream_t stream) {
  if (rms_empty(a)) return cudaSuccess;
  if (!args_ok(a)) return cudaErrorInvalidConfiguration;
  switch (a.dtype) {
    case DType::F16: return launch_forward<__half>(a, out, out_strides, rstd, stream);
    case DType::BF16: return launch_forward<__nv_bfloat16>(a, out, out_strides, rstd, stream);
    case DType::F32: return launch_forward<float>(a, out, out_strides, rstd, stream);
    case DType::F64: return launch_forward<double>(a, out, out_strides, rstd, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t rms_norm_silu_backward(const RmsNormArgs& a, const void* grad, const Strides3& grad_strides,
                                   const void* rstd, void* dx, const Strides3& dx_strides, void* part,
                                   cudaStream_t stream) {
  if (rms_empty(a) || (dx == nullptr && part == nullptr)) return cudaSuccess;
  if (!args_ok(a)) return cudaErrorInvalidConfiguration;
  switch (a.dtype) {
    case DType::F16: return launch_backward<__half>(a, grad, grad_strides, rstd, dx, dx_strides, part, stream);
    case DType::BF16:
      return launch_backward<__nv_bfloat16>(a, grad, grad_strides, rstd, dx, dx_strides, part, stream);
    case DType::F32: return launch_backward<float>(a, grad, grad_strides, rstd, dx, dx_strides, part, stream);
    case DType::F64: return launch_backward<double>(a, grad, grad_strides, rstd, dx, dx_strides, part, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fnf
