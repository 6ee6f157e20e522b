// CUDA kernels of threshold_dilate (no torch headers; launched from bindings_cuda.cpp).
//
// The two-pass scan of the CPU kernel, built from the shared steps of fnf/dilate_core.h, laid out so that a
// warp always touches consecutive addresses:
//  column kernel: a block holds kCols adjacent columns (the lanes of a warp) x kSegments row segments (one
//                 warp each). Each warp sweeps its segment down, writing the packed distances with in-segment
//                 carries only, and leaves the segment's first/last active rows in shared memory; after
//                 __syncthreads the carries from the segments above/below are applied in the upward sweep.
//                 A warp reads one row of 32 columns per step (heatmap: e bytes per pixel, scratch: 4 + 4 + 4).
//  row kernel:    one warp per row, 32 consecutive pixels per step; the running max/min of the scan become
//                 warp prefix/suffix scans (shuffles) plus a carry across steps. Left-to-right writes the
//                 reaches and left-coverage flags into the scratch, right-to-left writes the output
//                 (scratch: 4 + 4 + 4 bytes, output o bytes per pixel).
// Batches beyond gridDim.y and rows beyond the row grid are strided over, so any batch size launches.
// Cost per pixel does not depend on the radius.
#include <cuda_runtime.h>

#include "fnf/cuda_launch.h"
#include "fnf/cuda_launchers.h"
#include "fnf/cuda_types.h"
#include "fnf/dilate_core.h"
#include "fnf/grid_limits.h"

namespace fnf {
namespace cuda {
namespace {

constexpr int kCols = 32;        // columns per column-pass block: the lanes of a warp
constexpr int kSegments = 8;     // row segments per column-pass block: one warp each
constexpr int kRowWarps = 8;     // rows per row-pass block: one warp each
constexpr unsigned kFullWarp = 0xffffffffu;
// Row-pass blocks per launch: enough to fill any GPU; more rows are strided over.
constexpr int64_t kMaxRowBlocks = kMaxGridY * 16;
// Packed distances beyond every radius (reach -1 at both levels): the value of pixels past the row's end.
constexpr uint32_t kNoReach = 0x7fff7fffu;

template <typename scalar_t>
__global__ void __launch_bounds__(kCols * kSegments) column_kernel(DilateArgs a) {
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ int seg_last1[kSegments][kCols], seg_last2[kSegments][kCols];
  __shared__ int seg_first1[kSegments][kCols], seg_first2[kSegments][kCols];
  const int lane = threadIdx.x, seg = threadIdx.y;
  const int64_t x = int64_t(blockIdx.x) * kCols + lane;
  const bool col_ok = x < a.width;  // no early return: every thread reaches the block barriers
  const int H = int(a.height), cap = a.radius + 1;
  const int seg_len = (H + kSegments - 1) / kSegments;
  const int y0 = dilate::imin(H, seg * seg_len), y1 = dilate::imin(H, y0 + seg_len);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    // Down sweep of the segment: distances to the last active rows within it, first/last active rows.
    int last1 = dilate::far_before(cap), last2 = dilate::far_before(cap);
    int first1 = dilate::far_after(H, cap), first2 = dilate::far_after(H, cap);
    uint32_t* g = a.scratch + b * a.height * a.width + x;
    if (col_ok) {
      const scalar_t* h = static_cast<const scalar_t*>(a.heatmap) + b * a.stride[0] + x * a.stride[2];
      const acc_t thr = static_cast<const acc_t*>(a.threshold)[b];
      for (int y = y0; y < y1; ++y) {
        const int s = dilate::state_of<acc_t>(to_acc(h[int64_t(y) * a.stride[1]]), thr);
        first1 = s >= 1 ? dilate::imin(first1, y) : first1;
        first2 = s == 2 ? dilate::imin(first2, y) : first2;
        g[int64_t(y) * a.width] = dilate::column_down(s, y, cap, last1, last2);
      }
    }
    seg_last1[seg][lane] = last1;
    seg_last2[seg][lane] = last2;
    seg_first1[seg][lane] = first1;
    seg_first2[seg][lane] = first2;
    __syncthreads();
    // Carries: the last active row of the segments above, the first of the segments below.
    int above1 = dilate::far_before(cap), above2 = dilate::far_before(cap);
    int below1 = dilate::far_after(H, cap), below2 = dilate::far_after(H, cap);
    for (int k = 0; k < seg; ++k) {
      above1 = dilate::imax(above1, seg_last1[k][lane]);
      above2 = dilate::imax(above2, seg_last2[k][lane]);
    }
    for (int k = seg + 1; k < kSegments; ++k) {
      below1 = dilate::imin(below1, seg_first1[k][lane]);
      below2 = dilate::imin(below2, seg_first2[k][lane]);
    }
    if (col_ok) {
      for (int y = y1 - 1; y >= y0; --y) {
        uint32_t* p = g + int64_t(y) * a.width;
        const uint32_t down = *p;
        const uint32_t fixed = dilate::pack(uint32_t(dilate::imin(dilate::lo16(down), dilate::imin(y - above1, cap))),
                                            uint32_t(dilate::imin(dilate::hi16(down), dilate::imin(y - above2, cap))));
        *p = dilate::column_up(fixed, y, cap, below1, below2);
      }
    }
    __syncthreads();  // the segment summaries are rewritten for the next image
  }
}

// Inclusive prefix max / suffix min over the 32 lanes of a warp.
__device__ __forceinline__ int warp_prefix_max(int v, int lane) {
  for (int off = 1; off < 32; off <<= 1) {
    const int t = __shfl_up_sync(kFullWarp, v, off);
    v = lane >= off ? dilate::imax(v, t) : v;
  }
  return v;
}

__device__ __forceinline__ int warp_suffix_min(int v, int lane) {
  for (int off = 1; off < 32; off <<= 1) {
    const int t = __shfl_down_sync(kFullWarp, v, off);
    v = lane + off < 32 ? dilate::imin(v, t) : v;
  }
  return v;
}

template <typename out_t>
__global__ void __launch_bounds__(32 * kRowWarps) row_kernel(DilateArgs a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t rows = a.batch * a.height;
  const int W = int(a.width), r = a.radius;
  const out_t nan_value = from_float<out_t>(__int_as_float(0x7fc00000));  // NaN, or 1 for bool/uint8
  // The row is the same for the 32 lanes of a warp: the loops below are warp-uniform.
  for (int64_t row = int64_t(blockIdx.x) * kRowWarps + warp; row < rows; row += int64_t(gridDim.x) * kRowWarps) {
    uint32_t* g = a.scratch + row * a.width;
    out_t* out = static_cast<out_t*>(a.out) + row * a.width;
    // Left to right: reach of each column pixel and whether some x' <= x covers x (dilate::row_left).
    int carry1 = dilate::row_left_init(), carry2 = dilate::row_left_init();
    for (int x0 = 0; x0 < W; x0 += 32) {
      const int x = x0 + lane;
      const bool ok = x < W;
      const uint32_t dist = ok ? g[x] : kNoReach;
      const int s1 = dilate::reach(dilate::lo16(dist), r, a.disk), s2 = dilate::reach(dilate::hi16(dist), r, a.disk);
      const int e1 = dilate::imax(warp_prefix_max(s1 >= 0 ? x + s1 : -1, lane), carry1);
      const int e2 = dilate::imax(warp_prefix_max(s2 >= 0 ? x + s2 : -1, lane), carry2);
      if (ok) {
        g[x] = dilate::pack(uint32_t(s1 + 1) | (e1 >= x ? 0x8000u : 0u), uint32_t(s2 + 1) | (e2 >= x ? 0x8000u : 0u));
      }
      carry1 = __shfl_sync(kFullWarp, e1, 31);
      carry2 = __shfl_sync(kFullWarp, e2, 31);
    }
    // Right to left: whether some x' >= x covers x, combined with the flags (dilate::row_right).
    const int none = dilate::row_right_init(W);
    carry1 = carry2 = none;
    for (int x0 = ((W - 1) / 32) * 32; x0 >= 0; x0 -= 32) {
      const int x = x0 + lane;
      const bool ok = x < W;
      const uint32_t left = ok ? g[x] : 0u;  // past the end: no reach, no flag
      const int lo = dilate::lo16(left), hi = dilate::hi16(left);
      const int s1 = (lo & 0x7fff) - 1, s2 = (hi & 0x7fff) - 1;
      const int l1 = dilate::imin(warp_suffix_min(s1 >= 0 ? x - s1 : none, lane), carry1);
      const int l2 = dilate::imin(warp_suffix_min(s2 >= 0 ? x - s2 : none, lane), carry2);
      const bool cover2 = (hi & 0x8000) || l2 <= x;
      const bool cover1 = (lo & 0x8000) || l1 <= x;
      if (ok) out[x] = cover2 ? nan_value : from_float<out_t>(cover1 ? 1.0f : 0.0f);
      carry1 = __shfl_sync(kFullWarp, l1, 0);
      carry2 = __shfl_sync(kFullWarp, l2, 0);
    }
  }
}

template <typename scalar_t>
cudaError_t launch_columns(const DilateArgs& a, cudaStream_t stream) {
  const dim3 grid(unsigned((a.width + kCols - 1) / kCols), unsigned(a.batch < kMaxGridY ? a.batch : kMaxGridY));
  FNF_LAUNCH(column_kernel<scalar_t>, grid, dim3(kCols, kSegments), 0, stream)(a);
  return cudaGetLastError();
}

template <typename out_t>
cudaError_t launch_rows(const DilateArgs& a, cudaStream_t stream) {
  const int64_t blocks = (a.batch * a.height + kRowWarps - 1) / kRowWarps;
  FNF_LAUNCH(row_kernel<out_t>, unsigned(blocks < kMaxRowBlocks ? blocks : kMaxRowBlocks), 32 * kRowWarps, 0,
             stream)(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t threshold_dilate(const DilateArgs& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.height <= 0 || a.width <= 0) return cudaSuccess;  // nothing to do, nothing launched
  if ((a.width + kCols - 1) / kCols > kMaxGridX) return cudaErrorInvalidConfiguration;
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
