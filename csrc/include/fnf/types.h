// Plain argument structs shared by the CPU and CUDA kernels. No torch headers: the .cu files include
// this, and must compile with nvcc alone.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FNF_HD __host__ __device__ __forceinline__
#else
#define FNF_HD inline
#endif

namespace fnf {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3, Bool = 4, U8 = 5 };

// Element (b, i0, i1, i2) of a (B, D0, D1, D2) view of a 4-D tensor. The dims (C, H, W) are permuted
// so that the image's strides decrease: contiguous and channels_last both walk memory in order.
struct View4 {
  int64_t stride[4];  // batch, d0, d1, d2 (elements; 0 = broadcast)
};

struct PenaltyArgs {
  const void* image;
  const void* reference;
  const void* mask;
  DType dtype;      // of image, reference and mask
  int64_t batch;    // B
  int64_t size[3];  // D0, D1, D2 (permuted C, H, W)
  View4 image_view, reference_view, mask_view;
  // True when for every tensor the (D1, D2) plane is dense: stride[d2] == 1 and stride[d1] == D2.
  bool dense_planes;
};

struct DilateArgs {
  const void* heatmap;
  DType in_dtype;
  int64_t batch, height, width;
  int64_t stride[3];       // heatmap strides (b, y, x) in elements
  const void* threshold;   // (B,) float32, float64 when in_dtype is F64
  int radius;              // 0 <= radius <= H + W < 32767
  bool disk;
  void* out;               // contiguous (B, H, W)
  DType out_dtype;
  uint32_t* scratch;       // contiguous (B, H, W)
};

}  // namespace fnf
