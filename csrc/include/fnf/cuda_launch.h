// FNF_LAUNCH(kernel, grid, block, smem, stream)(args...): a kernel launch that the .cu sources write once.
// Under nvcc it is kernel<<<grid, block, smem, stream>>>(args...); compiled as host C++ it is the CPU
// emulator's launch (tests/cuda_emulation/include/fnf_cuda_emu.h defines FNF_EMU_LAUNCH), so the kernels'
// own source runs on CPU unchanged. A kernel name holding a comma goes in parentheses: FNF_LAUNCH((k<T, 1>), ...).
#pragma once

#if defined(__CUDACC__)
#define FNF_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#elif defined(FNF_EMU_LAUNCH)
#define FNF_LAUNCH(kernel, grid, block, smem, stream) FNF_EMU_LAUNCH(kernel, grid, block, smem, stream)
#else
#error "the .cu sources compile with nvcc, or as C++ with the CUDA emulation of tests/cuda_emulation"
#endif
