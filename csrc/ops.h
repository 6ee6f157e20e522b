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

// group_norm_silu / rms_norm_silu on CPU (cpu/norm_silu_cpu.cpp); the contracts of fnf_kernels/_library.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(const at::Tensor& x,
                                                                    const c10::optional<at::Tensor>& weight,
                                                                    const c10::optional<at::Tensor>& bias,
                                                                    int64_t num_groups, double eps, bool silu);
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu, bool need_x, bool need_weight, bool need_bias);
std::tuple<at::Tensor, at::Tensor> rms_norm_silu_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                     int64_t dim, double eps, bool silu);
std::tuple<at::Tensor, at::Tensor> rms_norm_silu_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const at::Tensor& rstd, int64_t dim, bool silu,
                                                              bool need_x, bool need_weight);

// Shared validation of direct torch.ops calls of threshold_dilate.
void check_dilate_inputs(const at::Tensor& heatmap, const at::Tensor& threshold, int64_t radius);
// Per-sample backward coefficients (see penalty_core.h), computed with ATen on the op's device.
at::Tensor penalty_coefficients(const at::Tensor& grad, const at::Tensor& norms, bool squared);

}  // namespace fnf
