// CUDA kernels of the masked Frobenius penalty (no torch headers; launched from bindings_cuda.cpp).
//
// Forward: grid (chunks of kChunk elements, planes) from penalty_grid(): chunks on x (up to 2^31 - 1, so
// planes above 65535 * kChunk = 134M elements work), planes on y (a block strides over planes beyond
// 65535). Each block reads kChunk elements of image,
// reference and mask (3 loads per element, mask often broadcast from cache) and writes one partial sum;
// the partials are summed by the caller in a fixed order: deterministic, no atomics.
// Backward: same grid, 3 loads and 1 store per element. Both are memory bound: at (16,3,1024,1024)
// float32 the forward moves 2 x 201 MB (+ mask), the backward 3 x 201 MB.
#include <cuda_runtime.h>

#include "fnf/cuda_launch.h"
#include "fnf/cuda_launchers.h"
#include "fnf/cuda_types.h"
#include "fnf/penalty_core.h"
#include "fnf/penalty_grid.h"

namespace fnf {
namespace cuda {
namespace {

constexpr int kThreads = kPenaltyThreads;
constexpr int kItems = kPenaltyItems;
constexpr int64_t kChunk = kPenaltyChunk;

template <bool kDense>
__device__ __forceinline__ int64_t in_plane(const View4& v, int64_t j, int64_t d2) {
  if (kDense) return j;
  const int64_t i1 = j / d2, i2 = j - i1 * d2;
  return i1 * v.stride[2] + i2 * v.stride[3];
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : acc_t(0);
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

template <typename scalar_t, bool kDense>
__global__ void __launch_bounds__(kThreads) partials_kernel(PenaltyArgs a, typename AccOf<scalar_t>::type* partials) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t planes = a.batch * a.size[0];
  const int64_t n = a.size[1] * a.size[2], d2 = a.size[2];
  const int64_t start = int64_t(blockIdx.x) * kChunk;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t b = plane / a.size[0], i0 = plane - b * a.size[0];
    const auto p = penalty::plane<scalar_t>(a, b, i0);
    const scalar_t *x = p.x, *r = p.r, *m = p.m;
    acc_t acc = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = start + int64_t(k) * kThreads + threadIdx.x;
      if (j < n) {
        const acc_t d = penalty::masked_diff<acc_t>(to_acc(x[in_plane<kDense>(a.image_view, j, d2)]),
                                                    to_acc(r[in_plane<kDense>(a.reference_view, j, d2)]),
                                                    to_acc(m[in_plane<kDense>(a.mask_view, j, d2)]));
        acc += d * d;
      }
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[plane * int64_t(gridDim.x) + blockIdx.x] = acc;
    __syncthreads();  // block_sum's shared memory is reused by the next plane
  }
}

template <typename scalar_t, bool kDense>
__global__ void __launch_bounds__(kThreads) backward_kernel(PenaltyArgs a, View4 gv,
                                                            const typename AccOf<scalar_t>::type* coef,
                                                            scalar_t* grad) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t planes = a.batch * a.size[0];
  const int64_t n = a.size[1] * a.size[2], d2 = a.size[2];
  const int64_t start = int64_t(blockIdx.x) * kChunk;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t b = plane / a.size[0], i0 = plane - b * a.size[0];
    const auto p = penalty::plane<scalar_t>(a, b, i0);
    const scalar_t *x = p.x, *r = p.r, *m = p.m;
    scalar_t* g = grad + b * gv.stride[0] + i0 * gv.stride[1];
    const acc_t c = coef[b];
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = start + int64_t(k) * kThreads + threadIdx.x;
      if (j < n) {
        const acc_t v = penalty::grad_image<acc_t>(to_acc(x[in_plane<kDense>(a.image_view, j, d2)]),
                                                   to_acc(r[in_plane<kDense>(a.reference_view, j, d2)]),
                                                   to_acc(m[in_plane<kDense>(a.mask_view, j, d2)]), c);
        g[in_plane<kDense>(gv, j, d2)] = from_acc<scalar_t>(v);
      }
    }
  }
}

bool empty(const PenaltyArgs& a) { return a.batch * a.size[0] * a.size[1] * a.size[2] == 0; }

PenaltyGrid grid_geometry(const PenaltyArgs& a) {
  return penalty_grid(a.batch * a.size[0], a.size[1] * a.size[2], kChunk);
}

dim3 grid_of(const PenaltyArgs& a) {
  const PenaltyGrid g = grid_geometry(a);
  return dim3(unsigned(g.x), unsigned(g.y));
}

template <typename scalar_t>
cudaError_t launch_partials(const PenaltyArgs& a, void* partials, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  auto* out = static_cast<acc_t*>(partials);
  if (a.dense_planes) {
    FNF_LAUNCH((partials_kernel<scalar_t, true>), grid_of(a), kThreads, 0, stream)(a, out);
  } else {
    FNF_LAUNCH((partials_kernel<scalar_t, false>), grid_of(a), kThreads, 0, stream)(a, out);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const PenaltyArgs& a, const View4& gv, bool grad_dense, const void* coef, void* grad,
                            cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* c = static_cast<const acc_t*>(coef);
  auto* g = static_cast<scalar_t*>(grad);
  if (a.dense_planes && grad_dense) {
    FNF_LAUNCH((backward_kernel<scalar_t, true>), grid_of(a), kThreads, 0, stream)(a, gv, c, g);
  } else {
    FNF_LAUNCH((backward_kernel<scalar_t, false>), grid_of(a), kThreads, 0, stream)(a, gv, c, g);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t penalty_chunk_elements() { return kChunk; }

int64_t penalty_chunks_per_plane(const PenaltyArgs& a) { return grid_geometry(a).chunks; }

int64_t penalty_partials_count(const PenaltyArgs& a) {
  return empty(a) ? 0 : a.batch * a.size[0] * grid_geometry(a).chunks;
}

cudaError_t penalty_partials(const PenaltyArgs& a, void* partials, cudaStream_t stream) {
  if (empty(a)) return cudaSuccess;  // no partials, nothing launched
  if (!grid_geometry(a).ok) return cudaErrorInvalidConfiguration;
  switch (a.dtype) {
    case DType::F16: return launch_partials<__half>(a, partials, stream);
    case DType::BF16: return launch_partials<__nv_bfloat16>(a, partials, stream);
    case DType::F32: return launch_partials<float>(a, partials, stream);
    case DType::F64: return launch_partials<double>(a, partials, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t penalty_backward(const PenaltyArgs& a, const View4& grad_view, bool grad_dense, const void* coef,
                             void* grad, cudaStream_t stream) {
  if (empty(a)) return cudaSuccess;
  if (!grid_geometry(a).ok) return cudaErrorInvalidConfiguration;
  switch (a.dtype) {
    case DType::F16: return launch_backward<__half>(a, grad_view, grad_dense, coef, grad, stream);
    case DType::BF16: return launch_backward<__nv_bfloat16>(a, grad_view, grad_dense, coef, grad, stream);
    case DType::F32: return launch_backward<float>(a, grad_view, grad_dense, coef, grad, stream);
    case DType::F64: return launch_backward<double>(a, grad_view, grad_dense, coef, grad, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fnf
