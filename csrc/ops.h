// Declarations of the op implementations registered in bindings.cpp (CPU) and cuda/bindings_cuda.cpp.
#pragma once
#include <torch/extension.h>

namespace fnf {

at::Tensor penalty_norms_cpu(const at::Tensor& image, const at::Tensor& reference, const at::Tensor& mask,
                             bool squared);
at::Tensor penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& image, const at::Tensor& reference,
                                const at::Tensor& mask, const at::Tensor& norms, bool squared);
at::Tensor threshold_dilate_cpu(const at::Tensor& heatmap, const at::Tensor& threshold, int64_t radius, bool disk,
                                at::ScalarType dtype);

// Shared validation of direct torch.ops calls of threshold_dilate.
void check_dilate_inputs(const at::Tensor& heatmap, const at::Tensor& threshold, int64_t radius);
// Per-sample backward coefficients (see penalty_core.h), computed with ATen on the op's device.
at::Tensor penalty_coefficients(const at::Tensor& grad, const at::Tensor& norms, bool squared);

}  // namespace fnf
