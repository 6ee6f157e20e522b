// CUDA grid-size limits the launchers respect (pure C++). FNF_MAX_GRID_Y may be set lower at compile time:
// the CPU emulation harness (tests/test_cuda_emulation.py) does so to force the kernels' grid-striding paths
// (batches and planes beyond gridDim.y) on small inputs.
#pragma once
#include <cstdint>

#ifndef FNF_MAX_GRID_Y
#define FNF_MAX_GRID_Y 65535
#endif

namespace fnf {

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = FNF_MAX_GRID_Y;
static_assert(kMaxGridY >= 1 && kMaxGridY <= 65535, "FNF_MAX_GRID_Y must be in [1, 65535]");

}  // namespace fnf
