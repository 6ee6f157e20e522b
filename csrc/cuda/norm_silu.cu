// CUDA kernels of group_norm_silu (no torch headers; launched from bindings_cuda.cpp and the emulation driver).
//
// x is (N, C, S) through NormSiluArgs::stride. Grid of the per-element kernels: x = chunks of kNormChunk
// elements of one (n, c) plane, y = planes (a block strides over planes beyond gridDim.y). Forward: stats_kernel
// writes each chunk's mean and sum of squared deviations; combine_kernel (one block per (n, g)) merges them with
// Chan's formula in a fixed order (deterministic, no atomics) into mean and rstd; apply_kernel writes
// silu(xhat * w + b). Backward: sums_kernel writes per chunk sums of dy * xhat and dy (dy = grad * silu'(y),
// recomputed from x); reduce_kernel (one block per (n, g)) sums them per (n, c) and forms the per-group
// coefficients; dx_kernel writes dx = rstd * (w * dy - a - xhat * b). Only partials of x's size / kNormChunk
// are stored besides out and dx.
#include <cuda_runtime.h>

#include "fnf/cuda_launch.h"
#include "fnf/cuda_launchers.h"
#include "fnf/cuda_types.h"
#include "fnf/norm_silu_args.h"

namespace fnf {
namespace cuda {
namespace {

constexpr int kThreads = kNormThreads;
constexpr int kItems = kNormItems;
constexpr int64_t kChunk = kNormChunk;

__device__ __forceinline__ float math_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double math_sqrt(double v) { return sqrt(v); }
__device__ __forceinline__ float math_exp(float v) { return expf(v); }
__device__ __forceinline__ double math_exp(double v) { return exp(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t y) { return acc_t(1) / (acc_t(1) + math_exp(-y)); }

// The block's sum, returned to every thread in the same order (deterministic). Every thread must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum_all(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  __syncthreads();  // warp_sums is reused by the next call
  return total;
}

template <typename acc_t>
__device__ __forceinline__ acc_t param(const void* p, int64_t c, acc_t fallback) {
  return p ? static_cast<const acc_t*>(p)[c] : fallback;
}

// silu'(y) * g for y = xhat * w + b (g itself when silu is off).
template <typename acc_t>
__device__ __forceinline__ acc_t dy_of(acc_t g, acc_t xhat, acc_t w, acc_t b, bool silu) {
  if (!silu) return g;
  const acc_t y = xhat * w + b, s = sigmoid(y);
  return g * (s * (acc_t(1) + y * (acc_t(1) - s)));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) stats_kernel(NormSiluArgs a, typename AccOf<scalar_t>::type* part_mean,
                                                         typename AccOf<scalar_t>::type* part_m2) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t planes = a.batch * a.channels, start = int64_t(blockIdx.x) * kChunk;
  const int64_t count = (a.spatial - start) < kChunk ? (a.spatial - start) : kChunk;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t n = plane / a.channels, c = plane - n * a.channels;
    const scalar_t* x = static_cast<const scalar_t*>(a.x) + n * a.stride[0] + c * a.stride[1];
    acc_t v[kItems];
    acc_t sum = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = start + int64_t(k) * kThreads + threadIdx.x;
      v[k] = j < a.spatial ? to_acc(x[j * a.stride[2]]) : acc_t(0);
      sum += v[k];
    }
    const acc_t mean = block_sum_all(sum) / acc_t(count);
    acc_t m2 = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = start + int64_t(k) * kThreads + threadIdx.x;
      const acc_t d = v[k] - mean;
      if (j < a.spatial) m2 += d * d;
    }
    m2 = block_sum_all(m2);
    if (threadIdx.x == 0) {
      part_mean[plane * int64_t(gridDim.x) + blockIdx.x] = mean;
      part_m2[plane * int64_t(gridDim.x) + blockIdx.x] = m2;
    }
  }
}

// One block per (n, g): Chan's merge of the group's cpg * K chunk statistics (thread k takes chunks k, k + 256,
// ... of every channel), then a tree over the threads.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) combine_kernel(NormSiluArgs a, int64_t chunks, const acc_t* part_mean,
                                                           const acc_t* part_m2, acc_t* mean, acc_t* rstd) {
  __shared__ acc_t s_cnt[kThreads], s_mean[kThreads], s_m2[kThreads];
  const int64_t cpg = a.channels / a.groups, items = cpg * chunks;
  for (int64_t ng = blockIdx.x; ng < a.batch * a.groups; ng += gridDim.x) {
    const int64_t n = ng / a.groups, g = ng - n * a.groups;
    const int64_t base = (n * a.channels + g * cpg) * chunks;  // the group's partials are consecutive
    acc_t cnt = 0, mu = 0, m2 = 0;
    for (int64_t i0 = 0; i0 < items; i0 += chunks) {
      for (int64_t k = threadIdx.x; k < chunks; k += kThreads) {
        const int64_t rest = a.spatial - k * kChunk;
        const acc_t nb = acc_t(rest < kChunk ? rest : kChunk);
        const acc_t tot = cnt + nb, delta = part_mean[base + i0 + k] - mu;
        mu += delta * nb / tot;
        m2 += part_m2[base + i0 + k] + delta * delta * cnt * nb / tot;
        cnt = tot;
      }
    }
    s_cnt[threadIdx.x] = cnt;
    s_mean[threadIdx.x] = mu;
    s_m2[threadIdx.x] = m2;
    __syncthreads();
    for (unsigned half = kThreads / 2; half > 0; half >>= 1) {
      if (threadIdx.x < half) {
        const acc_t na = s_cnt[threadIdx.x], nb = s_cnt[threadIdx.x + half], tot = na + nb;
        if (nb > 0) {
          const acc_t delta = s_mean[threadIdx.x + half] - s_mean[threadIdx.x];
          s_mean[threadIdx.x] += delta * nb / tot;
          s_m2[threadIdx.x] += s_m2[threadIdx.x + half] + delta * delta * na * nb / tot;
          s_cnt[threadIdx.x] = tot;
        }
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      mean[ng] = s_mean[0];
      rstd[ng] = acc_t(1) / math_sqrt(s_m2[0] / s_cnt[0] + acc_t(a.eps));
    }
    __syncthreads();  // the shared arrays are reused by the next group
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) apply_kernel(NormSiluArgs a, const typename AccOf<scalar_t>::type* mean,
                                                         const typename AccOf<scalar_t>::type* rstd, scalar_t* out,
                                                         Strides3 os) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t planes = a.batch * a.channels, start = int64_t(blockIdx.x) * kChunk, cpg = a.channels / a.groups;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t n = plane / a.channels, c = plane - n * a.channels, ng = n * a.groups + c / cpg;
    const scalar_t* x = static_cast<const scalar_t*>(a.x) + n * a.stride[0] + c * a.stride[1];
    scalar_t* o = out + n * os.s[0] + c * os.s[1];
    const acc_t mu = mean[ng], r = rstd[ng];
    const acc_t w = param<acc_t>(a.weight, c, acc_t(1)), b = param<acc_t>(a.bias, c, acc_t(0));
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = start + int64_t(k) * kThreads + threadIdx.x;
      if (j < a.spatial) {
        acc_t y = (to_acc(x[j * a.stride[2]]) - mu) * r * w + b;
        if (a.silu) y = y * sigmoid(y);
        o[j * os.s[2]] = from_acc<scalar_t>(y);
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sums_kernel(NormSiluArgs a, const scalar_t* grad, Strides3 gs,
                                                        const typename AccOf<scalar_t>::type* mean,
                                                        const typename AccOf<scalar_t>::type* rstd,
                                                        typename AccOf<scalar_t>::type* part_dyx,
                                                        typename AccOf<scalar_t>::type* part_dy) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t planes = a.batch * a.channels, start = int64_t(blockIdx.x) * kChunk, cpg = a.channels / a.groups;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t n = plane / a.channels, c = plane - n * a.channels, ng = n * a.groups + c / cpg;
    const scalar_t* x = static_cast<const scalar_t*>(a.x) + n * a.stride[0] + c * a.stride[1];
    const scalar_t* g = grad + n * gs.s[0] + c * gs.s[1];
    const acc_t mu = mean[ng], r = rstd[ng];
    const acc_t w = param<acc_t>(a.weight, c, acc_t(1)), b = param<acc_t>(a.bias, c, acc_t(0));
    acc_t sdyx = 0, sdy = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = start + int64_t(k) * kThreads + threadIdx.x;
      if (j < a.spatial) {
        const acc_t xhat = (to_acc(x[j * a.stride[2]]) - mu) * r;
        const acc_t dy = dy_of(to_acc(g[j * gs.s[2]]), xhat, w, b, a.silu);
        sdyx += dy * xhat;
        sdy += dy;
      }
    }
    sdyx = block_sum_all(sdyx);
    sdy = block_sum_all(sdy);
    if (threadIdx.x == 0) {
      part_dyx[plane * int64_t(gridDim.x) + blockIdx.x] = sdyx;
      part_dy[plane * int64_t(gridDim.x) + blockIdx.x] = sdy;
    }
  }
}

// One block per (n, g): per-channel sums over the chunks, then coef = (sum_c w_c sum_dy, sum_c w_c sum_dyx) / count.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) reduce_kernel(NormSiluArgs a, int64_t chunks, const acc_t* part_dyx,
                                                          const acc_t* part_dy, acc_t* sum_dyx, acc_t* sum_dy,
                                                          acc_t* coef) {
  const int64_t cpg = a.channels / a.groups;
  const acc_t count = acc_t(cpg * a.spatial);
  for (int64_t ng = blockIdx.x; ng < a.batch * a.groups; ng += gridDim.x) {
    const int64_t n = ng / a.groups, g = ng - n * a.groups;
    acc_t ca = 0, cb = 0;
    for (int64_t ci = 0; ci < cpg; ++ci) {
      const int64_t c = g * cpg + ci, base = (n * a.channels + c) * chunks;
      acc_t sdyx = 0, sdy = 0;
      for (int64_t k = threadIdx.x; k < chunks; k += kThreads) {
        sdyx += part_dyx[base + k];
        sdy += part_dy[base + k];
      }
      sdyx = block_sum_all(sdyx);
      sdy = block_sum_all(sdy);
      const acc_t w = param<acc_t>(a.weight, c, acc_t(1));
      ca += w * sdy;
      cb += w * sdyx;
      if (threadIdx.x == 0) {
        sum_dyx[n * a.channels + c] = sdyx;
        sum_dy[n * a.channels + c] = sdy;
      }
    }
    if (threadIdx.x == 0) {
      coef[2 * ng] = ca / count;
      coef[2 * ng + 1] = cb / count;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) dx_kernel(NormSiluArgs a, const scalar_t* grad, Strides3 gs,
                                                      const typename AccOf<scalar_t>::type* mean,
                                                      const typename AccOf<scalar_t>::type* rstd,
                                                      const typename AccOf<scalar_t>::type* coef, scalar_t* dx,
                                                      Strides3 ds) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t planes = a.batch * a.channels, start = int64_t(blockIdx.x) * kChunk, cpg = a.channels / a.groups;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t n = plane / a.channels, c = plane - n * a.channels, ng = n * a.groups + c / cpg;
    const scalar_t* x = static_cast<const scalar_t*>(a.x) + n * a.stride[0] + c * a.stride[1];
    const scalar_t* g = grad + n * gs.s[0] + c * gs.s[1];
    scalar_t* d = dx + n * ds.s[0] + c * ds.s[1];
    const acc_t mu = mean[ng], r = rstd[ng], ca = coef[2 * ng], cb = coef[2 * ng + 1];
    const acc_t w = param<acc_t>(a.weight, c, acc_t(1)), b = param<acc_t>(a.bias, c, acc_t(0));
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = start + int64_t(k) * kThreads + threadIdx.x;
      if (j < a.spatial) {
        const acc_t xhat = (to_acc(x[j * a.stride[2]]) - mu) * r;
        const acc_t dy = dy_of(to_acc(g[j * gs.s[2]]), xhat, w, b, a.silu);
        d[j * ds.s[2]] = from_acc<scalar_t>((w * dy - ca - xhat * cb) * r);
      }
    }
  }
}

dim3 element_grid(const NormSiluArgs& a) {
  const int64_t planes = a.batch * a.channels;
  return dim3(unsigned(norm_chunks(a)), unsigned(planes < kMaxGridY ? planes : kMaxGridY));
}

unsigned group_grid(const NormSiluArgs& a) { return unsigned(a.batch * a.groups); }

template <typename scalar_t>
cudaError_t launch_forward(const NormSiluArgs& a, void* part_mean, void* part_m2, void* mean, void* rstd, void* out,
                           const Strides3& os, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  auto *pm = static_cast<acc_t*>(part_mean), *pv = static_cast<acc_t*>(part_m2);
  auto *m = static_cast<acc_t*>(mean), *r = static_cast<acc_t*>(rstd);
  FNF_LAUNCH((stats_kernel<scalar_t>), element_grid(a), kThreads, 0, stream)(a, pm, pv);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  FNF_LAUNCH((combine_kernel<acc_t>), group_grid(a), kThreads, 0, stream)(a, norm_chunks(a), pm, pv, m, r);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  FNF_LAUNCH((apply_kernel<scalar_t>), element_grid(a), kThreads, 0, stream)(a, m, r, static_cast<scalar_t*>(out), os);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const NormSiluArgs& a, const void* grad, const Strides3& gs, const void* mean,
                            const void* rstd, void* part_dyx, void* part_dy, void* sum_dyx, void* sum_dy, void* coef,
                            void* dx, const Strides3& ds, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* g = static_cast<const scalar_t*>(grad);
  const auto *m = static_cast<const acc_t*>(mean), *r = static_cast<const acc_t*>(rstd);
  auto *p1 = static_cast<acc_t*>(part_dyx), *p2 = static_cast<acc_t*>(part_dy);
  auto* cf = static_cast<acc_t*>(coef);
  FNF_LAUNCH((sums_kernel<scalar_t>), element_grid(a), kThreads, 0, stream)(a, g, gs, m, r, p1, p2);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  FNF_LAUNCH((reduce_kernel<acc_t>), group_grid(a), kThreads, 0, stream)(
      a, norm_chunks(a), p1, p2, static_cast<acc_t*>(sum_dyx), static_cast<acc_t*>(sum_dy), cf);
  e = cudaGetLastError();
  if (e != cudaSuccess || dx == nullptr) return e;
  FNF_LAUNCH((dx_kernel<scalar_t>), element_grid(a), kThreads, 0, stream)(a, g, gs, m, r, cf,
                                                                          static_cast<scalar_t*>(dx), ds);
  return cudaGetLastError();
}

}  // namespace

cudaError_t group_norm_silu_forward(const NormSiluArgs& a, void* part_mean, void* part_m2, void* mean, void* rstd,
                                    void* out, const Strides3& out_strides, cudaStream_t stream) {
  if (norm_empty(a)) return cudaSuccess;
  if (!norm_grid_ok(a) || a.groups <= 0 || a.channels % a.groups) return cudaErrorInvalidConfiguration;
  switch (a.dtype) {
    case DType::F16: return launch_forward<__half>(a, part_mean, part_m2, mean, rstd, out, out_strides, stream);
    case DType::BF16: return launch_forward<__nv_bfloat16>(a, part_mean, part_m2, mean, rstd, out, out_strides, stream);
    case DType::F32: return launch_forward<float>(a, part_mean, part_m2, mean, rstd, out, out_strides, stream);
    case DType::F64: return launch_forward<double>(a, part_mean, part_m2, mean, rstd, out, out_strides, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t group_norm_silu_backward(const NormSiluArgs& a, const void* grad, const Strides3& grad_strides,
                                     const void* mean, const void* rstd, void* part_dyx, void* part_dy, void* sum_dyx,
                                     void* sum_dy, void* coef, void* dx, const Strides3& dx_strides,
                                     cudaStream_t stream) {
  if (norm_empty(a)) return cudaSuccess;
  if (!norm_grid_ok(a) || a.groups <= 0 || a.channels % a.groups) return cudaErrorInvalidConfiguration;
  switch (a.dtype) {
    case DType::F16:
      return launch_backward<__half>(a, grad, grad_strides, mean, rstd, part_dyx, part_dy, sum_dyx, sum_dy, coef, dx,
                                     dx_strides, stream);
    case DType::BF16:
      return launch_backward<__nv_bfloat16>(a, grad, grad_strides, mean, rstd, part_dyx, part_dy, sum_dyx, sum_dy,
                                            coef, dx, dx_strides, stream);
    case DType::F32:
      return launch_backward<float>(a, grad, grad_strides, mean, rstd, part_dyx, part_dy, sum_dyx, sum_dy, coef, dx,
                                    dx_strides, stream);
    case DType::F64:
      return launch_backward<double>(a, grad, grad_strides, mean, rstd, part_dyx, part_dy, sum_dyx, sum_dy, coef, dx,
                                     dx_strides, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fnf
