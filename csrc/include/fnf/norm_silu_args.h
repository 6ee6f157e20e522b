// Arguments and launch geometry of the group_norm_silu kernels (pure C++, no CUDA or torch headers).
#pragma once
#include <cstdint>

#include "fnf/grid_limits.h"
#include "fnf/types.h"

namespace fnf {

// Threads per block, elements per thread and elements per block (chunk of one (n, c) plane).
constexpr int kNormThreads = 256;
constexpr int kNormItems = 4;
constexpr int64_t kNormChunk = int64_t(kNormThreads) * kNormItems;

// x viewed as (N, C, S): the spatial dims merged into one stride (contiguous and channels_last both merge).
struct NormSiluArgs {
  const void* x;
  DType dtype;            // of x, out, grad and dx
  int64_t batch, channels, spatial, groups;
  int64_t stride[3];      // x strides (n, c, s) in elements
  const void* weight;     // (C,) contiguous, float (double for F64), or null
  const void* bias;       // same, or null
  double eps;
  bool silu;
};

struct Strides3 {
  int64_t s[3];  // (n, c, s) strides of an (N, C, S) view, in elements
};

inline bool norm_empty(const NormSiluArgs& a) { return a.batch * a.channels * a.spatial == 0; }

// Chunks per (n, c) plane = partial sums per plane.
inline int64_t norm_chunks(const NormSiluArgs& a) { return (a.spatial + kNormChunk - 1) / kNormChunk; }

// Whether the grid fits: chunks on x (up to 2^31 - 1); planes on y are capped at kMaxGridY and strided over.
inline bool norm_grid_ok(const NormSiluArgs& a) { return norm_chunks(a) <= kMaxGridX && a.batch * a.groups <= kMaxGridX; }

}  // namespace fnf
