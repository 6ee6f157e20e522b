// Arguments and launch geometry of the rms_norm_silu CUDA kernels (pure C++, no CUDA or torch headers).
#pragma once
#include <cstdint>

#include "fnf/grid_limits.h"
#include "fnf/norm_silu_args.h"
#include "fnf/types.h"

namespace fnf {

constexpr int kRmsThreads = 256;
// Blocks per launch: they stride over the tiles, and each owns one row of the dweight partials (blocks x D).
// Lowered with FNF_MAX_GRID_Y in the emulation harness so that small inputs take the striding path.
constexpr int64_t kRmsMaxBlocks = kMaxGridY < 1024 ? kMaxGridY : 1024;

// x viewed as (O, D, I) around the normalised dim: O = the dims before it merged, D = its size, I = the dims
// after it merged (contiguous and channels_last tensors merge for any dim the op takes). Statistics per (o, i).
struct RmsNormArgs {
  const void* x;
  DType dtype;                // of x, out, grad and dx
  int64_t outer, dim, inner;  // O, D, I
  int64_t stride[3];          // x strides (o, d, i) in elements
  const void* weight;         // (D,) contiguous, float (double for F64), or null
  double eps;
  bool silu;
};

inline bool rms_empty(const RmsNormArgs& a) { return a.outer * a.dim * a.inner == 0; }

// Columns (values of i) per tile: 32 consecutive columns when D is not the unit-stride dim (a warp reads 32
// neighbouring columns of one row), else 1 (the block's threads walk D of one column).
inline int rms_cols(const RmsNormArgs& a) { return (a.inner > 1 && a.stride[1] != 1) ? 32 : 1; }

inline int64_t rms_tiles(const RmsNormArgs& a) {
  const int64_t cols = rms_cols(a);
  return a.outer * ((a.inner + cols - 1) / cols);
}

// Blocks of a launch (also the rows of the dweight partials buffer, blocks x D).
inline int64_t rms_blocks(const RmsNormArgs& a) {
  const int64_t t = rms_tiles(a);
  return t < kRmsMaxBlocks ? t : kRmsMaxBlocks;
}

}  // namespace fnf
