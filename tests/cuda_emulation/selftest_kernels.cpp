// Self-tests of the CUDA emulation (fnf_cuda_emu.h): what it must run correctly and what it must refuse.
// Run by the driver's "T name" command; tests/test_cuda_emulation.py checks the results.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "fnf/cuda_launch.h"

namespace {

__global__ void indices_kernel(unsigned* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned per_block = blockDim.x * blockDim.y * blockDim.z;
  unsigned* o = out + 4 * (block * per_block + t);
  o[0] = blockIdx.x + 100 * blockIdx.y + 10000 * blockIdx.z;
  o[1] = threadIdx.x + 100 * threadIdx.y + 10000 * threadIdx.z;
  o[2] = blockDim.x + 100 * blockDim.y + 10000 * blockDim.z;
  o[3] = gridDim.x + 100 * gridDim.y + 10000 * gridDim.z;
}

// Block sum through shared memory with a barrier, then warp-level checks of every shuffle flavour.
__global__ void shuffles_kernel(int* out) {
  __shared__ int values[64];
  const int t = threadIdx.x, lane = t & 31;
  values[t] = t * 3 + 1;
  __syncthreads();
  int down = t, xr = t, up = t;
  for (int off = 16; off > 0; off >>= 1) down += __shfl_down_sync(0xffffffffu, down, off);
  for (int off = 16; off > 0; off >>= 1) xr += __shfl_xor_sync(0xffffffffu, xr, off);
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, up, off);
    if (lane >= off) up += v;
  }
  const int from5 = __shfl_sync(0xffffffffu, values[63 - t], 5);
  const unsigned ballot = __ballot_sync(0xffffffffu, t % 3 == 0);
  const double d = __shfl_down_sync(0xffffffffu, double(t) + 0.5, 1, 8);
  out[t * 6 + 0] = down;
  out[t * 6 + 1] = xr;
  out[t * 6 + 2] = up;
  out[t * 6 + 3] = from5;
  out[t * 6 + 4] = int(ballot);
  out[t * 6 + 5] = int(d * 2);
}

__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x < 48) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1;
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void partial_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, int(threadIdx.x), 1);
}

__global__ void divergent_shuffle_kernel(int* out) {
  const int t = threadIdx.x;
  out[t] = t < 16 ? __shfl_down_sync(0xffffffffu, t, 1) : __shfl_xor_sync(0xffffffffu, t, 1);
}

__global__ void full_mask_in_partial_warp_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);  // the block has 40 threads
}

__global__ void spin_kernel(volatile int* flag) {
  while (*flag == 0) {
  }
}

__global__ void out_of_bounds_kernel(int* out) { out[threadIdx.x + 1] = 1; }

int expect_config_error(dim3 grid, dim3 block, size_t smem) {
  std::vector<unsigned> out(64 * 4);
  FNF_LAUNCH(indices_kernel, grid, block, smem, nullptr)(out.data());
  const cudaError_t e = cudaGetLastError();
  std::printf("launch error %d (%s)\n", int(e), cudaGetErrorString(e));
  return e == cudaErrorInvalidConfiguration ? 0 : 1;
}

}  // namespace

int run_selftest(const std::string& name) {
  if (name == "indices") {
    const dim3 grid(3, 2, 2), block(5, 3, 2);
    std::vector<unsigned> out(size_t(12 * 30 * 4), 0xffffffffu);
    FNF_LAUNCH(indices_kernel, grid, block, 0, nullptr)(out.data());
    if (cudaGetLastError() != cudaSuccess) return 1;
    int bad = 0;
    for (unsigned bz = 0; bz < 2; ++bz)
      for (unsigned by = 0; by < 2; ++by)
        for (unsigned bx = 0; bx < 3; ++bx)
          for (unsigned tz = 0; tz < 2; ++tz)
            for (unsigned ty = 0; ty < 3; ++ty)
              for (unsigned tx = 0; tx < 5; ++tx) {
                const unsigned b = bx + 3 * (by + 2 * bz), t = tx + 5 * (ty + 3 * tz);
                const unsigned* o = &out[size_t(4 * (b * 30 + t))];
                bad += o[0] != bx + 100 * by + 10000 * bz || o[1] != tx + 100 * ty + 10000 * tz ||
                       o[2] != 5 + 300 + 20000 || o[3] != 3 + 200 + 20000;
              }
    std::printf("indices: %d wrong\n", bad);
    return bad != 0;
  }
  if (name == "shuffles") {
    std::vector<int> out(64 * 6, -1);
    FNF_LAUNCH(shuffles_kernel, 1, 64, 0, nullptr)(out.data());
    int bad = 0;
    for (int t = 0; t < 64; ++t) {
      const int lane = t & 31, w = t & ~31;
      int down = 0;  // shfl_down tree: lane 0 holds the warp sum; other lanes partial sums (checked via lane 0)
      for (int k = 0; k < 32; ++k) down += w + k;
      const int* o = &out[size_t(t * 6)];
      int up = 0;
      for (int k = 0; k <= lane; ++k) up += w + k;
      const int from5 = (63 - (w + 5)) * 3 + 1;
      unsigned ballot = 0;
      for (int k = 0; k < 32; ++k) ballot |= unsigned((w + k) % 3 == 0) << k;
      const double d = (lane % 8) + 1 < 8 ? double(t + 1) + 0.5 : double(t) + 0.5;
      bad += (lane == 0 && o[0] != down) || o[1] != down || o[2] != up || o[3] != from5 || o[4] != int(ballot) ||
             o[5] != int(d * 2);
    }
    std::printf("shuffles: %d wrong\n", bad);
    return bad != 0;
  }
  if (name == "zero_grid") return expect_config_error(dim3(0, 1, 1), dim3(32), 0);
  if (name == "grid_y") return expect_config_error(dim3(1, 65536, 1), dim3(32), 0);
  if (name == "grid_z") return expect_config_error(dim3(1, 1, 65536), dim3(32), 0);
  if (name == "big_block") return expect_config_error(dim3(1), dim3(1025), 0);
  if (name == "block_2d") return expect_config_error(dim3(1), dim3(64, 17), 0);
  if (name == "zero_block") return expect_config_error(dim3(1), dim3(0), 0);
  if (name == "big_smem") return expect_config_error(dim3(1), dim3(32), 48 * 1024 + 1);
  std::vector<int> out(64, 0);
  if (name == "deadlock") FNF_LAUNCH(deadlock_kernel, 1, 64, 0, nullptr)(out.data());
  else if (name == "early_exit") FNF_LAUNCH(early_exit_kernel, 1, 64, 0, nullptr)(out.data());
  else if (name == "partial_mask") FNF_LAUNCH(partial_mask_kernel, 1, 32, 0, nullptr)(out.data());
  else if (name == "divergent_shuffle") FNF_LAUNCH(divergent_shuffle_kernel, 1, 32, 0, nullptr)(out.data());
  else if (name == "partial_warp") FNF_LAUNCH(full_mask_in_partial_warp_kernel, 1, 40, 0, nullptr)(out.data());
  else if (name == "out_of_bounds") {
    std::vector<int> small(32, 0);
    FNF_LAUNCH(out_of_bounds_kernel, 1, 32, 0, nullptr)(small.data());
  } else if (name == "timeout") {
    int flag = 0;
    FNF_LAUNCH(spin_kernel, 1, 32, 0, nullptr)(&flag);
  } else {
    std::printf("unknown self-test %s\n", name.c_str());
    return 2;
  }
  return 0;  // the error cases abort before this
}
