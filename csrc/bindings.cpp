// Op schemas (TORCH_LIBRARY) and CPU implementations of fnf_kernels._C. The CUDA implementations are
// registered in cuda/bindings_cuda.cpp when the extension is built with CUDA.
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(fnf_kernels, m) {
  m.def("penalty_norms(Tensor image, Tensor reference, Tensor mask, bool squared) -> Tensor");
  m.def("penalty_backward(Tensor grad, Tensor image, Tensor reference, Tensor mask, Tensor norms, "
        "bool squared) -> Tensor");
  m.def("threshold_dilate(Tensor heatmap, Tensor threshold, int radius, bool disk, ScalarType dtype) -> Tensor");
  // group_norm_silu / rms_norm_silu: CPU kernels in cpu/norm_silu_cpu.cpp, CUDA in cuda/bindings_cuda.cpp.
  m.def("group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, bool silu) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("group_norm_silu_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "int num_groups, bool silu, bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_silu(Tensor x, Tensor? weight, int dim, float eps, bool silu) -> (Tensor, Tensor)");
  m.def("rms_norm_silu_backward(Tensor grad, Tensor x, Tensor? weight, Tensor rstd, int dim, bool silu, "
        "bool need_x, bool need_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fnf_kernels, CPU, m) {
  m.impl("penalty_norms", &fnf::penalty_norms_cpu);
  m.impl("penalty_backward", &fnf::penalty_backward_cpu);
  m.impl("threshold_dilate", &fnf::threshold_dilate_cpu);
  m.impl("group_norm_silu", &fnf::group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &fnf::group_norm_silu_backward_cpu);
  m.impl("rms_norm_silu", &fnf::rms_norm_silu_cpu);
  m.impl("rms_norm_silu_backward", &fnf::rms_norm_silu_backward_cpu);
}

namespace {
bool built_with_cuda() {
#ifdef FNF_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "focus-n-fix compiled kernels; the ops are registered under torch.ops.fnf_kernels";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in");
  // The per-call batch limits of this build's CUDA kernels ({"<op>_batch": max, -1: none}): the dilation
  // kernels stride over batches and rows, so no grid-dimension limit applies (fnf_kernels.backends reads it).
  m.def("cuda_limits", []() {
    pybind11::dict limits;
    limits["threshold_dilate_batch"] = -1;
    return limits;
  }, "Per-call batch limits of the CUDA kernels (-1: none)");
}
