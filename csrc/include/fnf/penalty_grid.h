// Launch geometry of the penalty kernels, pure C++ (no CUDA headers) so that it is unit-tested on CPU
// (tests/test_build.py compiles a test of it with g++).
//
// grid.x = chunks of one (D1, D2) plane (CUDA allows up to 2^31 - 1 blocks on x), grid.y = planes
// (B * D0), capped at 65535; a block walks planes blockIdx.y, blockIdx.y + gridDim.y, ... So a plane may
// hold up to (2^31 - 1) * chunk elements and any number of planes fit.
#pragma once
#include <cstdint>

#include "fnf/grid_limits.h"

namespace fnf {

// Threads per block, elements per thread and elements per block (chunk) of the penalty kernels.
constexpr int kPenaltyThreads = 256;
constexpr int kPenaltyItems = 8;
constexpr int64_t kPenaltyChunk = int64_t(kPenaltyThreads) * kPenaltyItems;

struct PenaltyGrid {
  int64_t chunks;  // blocks per plane = partials per plane
  int64_t x;       // gridDim.x = chunks
  int64_t y;       // gridDim.y = min(planes, 65535)
  bool ok;         // false when the plane needs more than 2^31 - 1 chunks (or there is nothing to do)
};

inline PenaltyGrid penalty_grid(int64_t planes, int64_t plane_elements, int64_t chunk_elements = kPenaltyChunk) {
  PenaltyGrid g{0, 0, 0, false};
  if (planes <= 0 || plane_elements <= 0 || chunk_elements <= 0) return g;
  g.chunks = (plane_elements + chunk_elements - 1) / chunk_elements;
  g.x = g.chunks;
  g.y = planes < kMaxGridY ? planes : kMaxGridY;
  g.ok = g.chunks <= kMaxGridX;
  return g;
}

}  // namespace fnf
