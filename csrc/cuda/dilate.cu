// CUDA kernels of threshold_dilate (no torch headers; launched from bindings_cuda.cpp).
//
// The same two-pass scan as the CPU kernel, built from the shared steps of fnf/dilate_core.h:
//  column kernel: one thread per column, adjacent threads on adjacent columns (coalesced); reads the
//                 heatmap once, writes and re-reads the packed uint32 distances (12 B per pixel).
//  row kernel:    one thread per row, left-to-right then right-to-left over the packed values
//                 (rows are walked in order; a warp's 32 rows stay in L1), writes the output once.
// Cost per pixel does not depend on the radius.
#include <cuda_runtime.h>

#include "fnf/cuda_launchers.h"
#include "fnf/cuda_types.h"
#include "fnf/dilate_core.h"

namespace fnf {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) column_kernel(DilateArgs a) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t x = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (x >= a.width) return;
  const int H = int(a.height), cap = a.radius + 1;
  const scalar_t* h = static_cast<const scalar_t*>(a.heatmap) + b * a.stride[0] + x * a.stride[2];
  const acc_t thr = static_cast<const acc_t*>(a.threshold)[b];
  uint32_t* g = a.scratch + b * a.height * a.width + x;
  int last1 = dilate::far_before(cap), last2 = dilate::far_before(cap);
  for (int y = 0; y < H; ++y) {
    const int s = dilate::state_of<acc_t>(to_acc(h[int64_t(y) * a.stride[1]]), thr);
    g[int64_t(y) * a.width] = dilate::column_down(s, y, cap, last1, last2);
  }
  int next1 = dilate::far_after(H, cap), next2 = dilate::far_after(H, cap);
  for (int y = H - 1; y >= 0; --y) {
    uint32_t* p = g + int64_t(y) * a.width;
    *p = dilate::column_up(*p, y, cap, next1, next2);
  }
}

template <typename out_t>
__global__ void __launch_bounds__(kThreads) row_kernel(DilateArgs a) {
  const int64_t row = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= a.batch * a.height) return;
  const int W = int(a.width), r = a.radius;
  uint32_t* g = a.scratch + row * a.width;
  out_t* out = static_cast<out_t*>(a.out) + row * a.width;
  int best1 = dilate::row_left_init(), best2 = dilate::row_left_init();
  for (int x = 0; x < W; ++x) g[x] = dilate::row_left(g[x], x, r, a.disk, best1, best2);
  best1 = best2 = dilate::row_right_init(W);
  const out_t nan_value = from_float<out_t>(__int_as_float(0x7fc00000));  // NaN, or 1 for bool/uint8
  for (int x = W - 1; x >= 0; --x) {
    const int s = dilate::row_right(g[x], x, best1, best2);
    out[x] = s == 2 ? nan_value : from_float<out_t>(s == 1 ? 1.0f : 0.0f);
  }
}

template <typename scalar_t>
cudaError_t launch_columns(const DilateArgs& a, cudaStream_t stream) {
  const dim3 grid(unsigned((a.width + kThreads - 1) / kThreads), unsigned(a.batch));
  column_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename out_t>
cudaError_t launch_rows(const DilateArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned((a.batch * a.height + kThreads - 1) / kThreads);
  row_kernel<out_t><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t threshold_dilate(const DilateArgs& a, cudaStream_t stream) {
  if (a.batch > 65535) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaErrorInvalidValue;
  switch (a.in_dtype) {
    case DType::F16: err = launch_columns<__half>(a, stream); break;
    case DType::BF16: err = launch_columns<__nv_bfloat16>(a, stream); break;
    case DType::F32: err = launch_columns<float>(a, stream); break;
    case DType::F64: err = launch_columns<double>(a, stream); break;
    default: break;
  }
  if (err != cudaSuccess) return err;
  switch (a.out_dtype) {
    case DType::F16: return launch_rows<__half>(a, stream);
    case DType::BF16: return launch_rows<__nv_bfloat16>(a, stream);
    case DType::F32: return launch_rows<float>(a, stream);
    case DType::F64: return launch_rows<double>(a, stream);
    case DType::Bool: return launch_rows<bool>(a, stream);
    case DType::U8: return launch_rows<uint8_t>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fnf
