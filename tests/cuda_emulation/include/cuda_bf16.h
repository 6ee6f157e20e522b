// Stand-in for the CUDA header of that name under the CPU emulation (see fnf_cuda_emu.h).
#pragma once
#include "fnf_cuda_emu.h"
