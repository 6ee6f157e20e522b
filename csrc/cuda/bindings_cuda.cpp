// CUDA implementations of the fnf_kernels ops: torch tensors -> plain structs -> launchers in *.cu.
// Every tensor argument is checked (dtype, device) before a pointer reaches a kernel; empty tensors give what
// the CPU backend gives (zeros / empty) without a launch; any batch size launches (the kernels grid-stride).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "fnf/cuda_launchers.h"
#include "fnf/penalty_grid.h"
#include "../ops.h"
#include "../rms_view.h"
#include "../tensor_args.h"

namespace fnf {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fnf_kernels: ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor penalty_norms_cuda(const at::Tensor& image, const at::Tensor& reference, const at::Tensor& mask,
                              bool squared) {
  check_penalty_inputs(image, reference, mask);
  TORCH_CHECK_VALUE(image.is_cuda(), "penalty_norms_cuda takes CUDA tensors, got image on ", image.device());
  const c10::cuda::CUDAGuard guard(image.device());
  const auto acc = image.options().dtype(accumulate_type(image.scalar_type()));
  if (image.numel() == 0) return at::zeros({image.size(0)}, acc);  // as the CPU backend: norms of nothing are 0
  const PenaltyArgs a = make_penalty_args(image, reference, mask);
  const PenaltyGrid grid = penalty_grid(a.batch * a.size[0], a.size[1] * a.size[2]);
  TORCH_CHECK_VALUE(grid.ok, "image planes are too large for the CUDA kernel: ", a.size[1] * a.size[2],
                    " elements, at most ", kMaxGridX * kPenaltyChunk);
  const int64_t count = cuda::penalty_partials_count(a);
  TORCH_INTERNAL_ASSERT(count % a.batch == 0);
  at::Tensor partial = at::empty({a.batch, count / a.batch}, acc);
  check_launch(cuda::penalty_partials(a, partial.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()), "penalty_partials");
  at::Tensor sumsq = partial.sum(1);
  return squared ? sumsq : sumsq.sqrt();
}

at::Tensor penalty_backward_cuda(const at::Tensor& grad, const at::Tensor& image, const at::Tensor& reference,
                                 const at::Tensor& mask, const at::Tensor& norms, bool squared) {
  check_penalty_inputs(image, reference, mask);
  TORCH_CHECK_VALUE(image.is_cuda(), "penalty_backward_cuda takes CUDA tensors, got image on ", image.device());
  check_penalty_backward_inputs(grad, norms, image);
  const c10::cuda::CUDAGuard guard(image.device());
  if (image.numel() == 0) return at::empty_like(image);
  const PenaltyArgs a = make_penalty_args(image, reference, mask);
  at::Tensor coef = penalty_coefficients(grad, norms, squared).contiguous();
  at::Tensor out = at::empty_like(image);
  const View4 gv = make_view(out, penalty_dim_order(image));
  const bool grad_dense = out.strides() == image.strides();
  check_launch(cuda::penalty_backward(a, gv, grad_dense, coef.data_ptr(), out.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream().stream()),
               "penalty_backward");
  return out;
}

at::Tensor threshold_dilate_cuda(const at::Tensor& heatmap, const at::Tensor& threshold, int64_t radius, bool disk,
                                 at::ScalarType dtype) {
  check_dilate_inputs(heatmap, threshold, radius);
  TORCH_CHECK_VALUE(heatmap.is_cuda(), "threshold_dilate_cuda takes CUDA tensors, got heatmap on ", heatmap.device());
  const c10::cuda::CUDAGuard guard(heatmap.device());
  const int64_t B = heatmap.size(0), H = heatmap.size(1), W = heatmap.size(2);
  const DType out_dtype = dtype_of(dtype);  // throws for an output dtype the kernel does not write
  at::Tensor out = at::empty({B, H, W}, heatmap.options().dtype(dtype));
  if (out.numel() == 0) return out;  // as the CPU backend, without a launch
  at::Tensor thr = threshold.contiguous();
  at::Tensor scratch = at::empty({B, H, W}, heatmap.options().dtype(at::kInt));
  DilateArgs a;
  a.heatmap = heatmap.data_ptr();
  a.in_dtype = dtype_of(heatmap.scalar_type());
  a.batch = B;
  a.height = H;
  a.width = W;
  for (int i = 0; i < 3; ++i) a.stride[i] = heatmap.stride(i);
  a.threshold = thr.data_ptr();
  a.radius = int(radius);
  a.disk = disk;
  a.out = out.data_ptr();
  a.out_dtype = out_dtype;
  a.scratch = reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>());
  check_launch(cuda::threshold_dilate(a, c10::cuda::getCurrentCUDAStream().stream()), "threshold_dilate");
  return out;
}

void check_norm_param(const c10::optional<at::Tensor>& p, const char* name, const at::Tensor& x) {
  if (!p.has_value()) return;
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == x.size(1), name, " must have shape (C,) = (", x.size(1), ",), got ",
                    p->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(p->scalar_type()), name, " must be floating point, got ", p->scalar_type());
  TORCH_CHECK_VALUE(p->device() == x.device(), name, " is on ", p->device(), " but x is on ", x.device());
}

// Checks of x, weight, bias and num_groups shared by the forward and the backward; returns the kernel arguments
// (weight and bias converted to the accumulate dtype, kept alive in w and b).
NormSiluArgs norm_args(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps, bool silu, at::Tensor& w,
                       at::Tensor& b) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have at least 2 dims (N, C, ...), got ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.is_cuda(), "group_norm_silu_cuda takes CUDA tensors, got x on ", x.device());
  TORCH_CHECK_VALUE(num_groups >= 1 && x.size(1) % num_groups == 0, "num_groups must divide C = ", x.size(1), ", got ",
                    num_groups);
  check_norm_param(weight, "weight", x);
  check_norm_param(bias, "bias", x);
  const NcsView v = ncs_view(x);
  TORCH_CHECK_VALUE(v.ok, "x's spatial dims must merge into one stride (contiguous or channels_last), got strides ",
                    x.strides());
  const auto acc = accumulate_type(x.scalar_type());
  if (weight.has_value()) w = weight->to(acc).contiguous();
  if (bias.has_value()) b = bias->to(acc).contiguous();
  NormSiluArgs a;
  a.x = x.data_ptr();
  a.dtype = dtype_of(x.scalar_type());
  a.batch = x.size(0);
  a.channels = x.size(1);
  a.spatial = v.spatial;
  a.groups = num_groups;
  for (int i = 0; i < 3; ++i) a.stride[i] = v.strides.s[i];
  a.weight = w.defined() ? w.data_ptr() : nullptr;
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.eps = eps;
  a.silu = silu;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(const at::Tensor& x,
                                                                     const c10::optional<at::Tensor>& weight,
                                                                     const c10::optional<at::Tensor>& bias,
                                                                     int64_t num_groups, double eps, bool silu) {
  at::Tensor w, b;
  const c10::cuda::CUDAGuard guard(x.device());
  const NormSiluArgs a = norm_args(x, weight, bias, num_groups, eps, silu, w, b);
  TORCH_CHECK_VALUE(norm_grid_ok(a), "x is too large for the CUDA group_norm_silu kernels: ", x.sizes());
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({a.batch, num_groups}, acc), rstd = at::empty({a.batch, num_groups}, acc);
  if (norm_empty(a)) return {out, mean.fill_(NAN), rstd.fill_(NAN)};
  const int64_t parts = a.batch * a.channels * norm_chunks(a);
  at::Tensor part_mean = at::empty({parts}, acc), part_m2 = at::empty({parts}, acc);
  check_launch(cuda::group_norm_silu_forward(a, part_mean.data_ptr(), part_m2.data_ptr(), mean.data_ptr(),
                                             rstd.data_ptr(), out.data_ptr(), ncs_view(out).strides,
                                             c10::cuda::getCurrentCUDAStream().stream()),
               "group_norm_silu_forward");
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu, bool need_x, bool need_weight, bool need_bias) {
  at::Tensor w, b;
  const c10::cuda::CUDAGuard guard(x.device());
  const NormSiluArgs a = norm_args(x, weight, bias, num_groups, 0.0, silu, w, b);
  TORCH_CHECK_VALUE(norm_grid_ok(a), "x is too large for the CUDA group_norm_silu kernels: ", x.sizes());
  TORCH_CHECK_VALUE(grad_in.sizes() == x.sizes() && grad_in.device() == x.device(), "grad must have x's shape ",
                    x.sizes(), " and device, got ", grad_in.sizes(), " on ", grad_in.device());
  TORCH_CHECK_TYPE(grad_in.scalar_type() == x.scalar_type(), "grad must have x's dtype ", x.scalar_type(), ", got ",
                   grad_in.scalar_type());
  const auto acc_type = accumulate_type(x.scalar_type());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == a.batch && t->size(1) == num_groups && t->is_contiguous() &&
                          t->device() == x.device(),
                      "mean and rstd must be contiguous (N, G) = (", a.batch, ", ", num_groups, ") on x's device");
    TORCH_CHECK_TYPE(t->scalar_type() == acc_type, "mean and rstd must be ", acc_type, " for a ", x.scalar_type(),
                     " x, got ", t->scalar_type());
  }
  const at::Tensor grad = ncs_view(grad_in).ok ? grad_in : grad_in.contiguous();
  const auto acc = x.options().dtype(acc_type);
  at::Tensor dx = need_x ? at::empty_like(x) : x.new_empty({0});
  at::Tensor sum_dyx = at::zeros({a.batch, a.channels}, acc), sum_dy = at::zeros({a.batch, a.channels}, acc);
  if (!norm_empty(a)) {
    const int64_t parts = a.batch * a.channels * norm_chunks(a);
    at::Tensor p1 = at::empty({parts}, acc), p2 = at::empty({parts}, acc);
    at::Tensor coef = at::empty({2 * a.batch * num_groups}, acc);
    check_launch(cuda::group_norm_silu_backward(a, grad.data_ptr(), ncs_view(grad).strides, mean.data_ptr(),
                                                rstd.data_ptr(), p1.data_ptr(), p2.data_ptr(), sum_dyx.data_ptr(),
                                                sum_dy.data_ptr(), coef.data_ptr(), need_x ? dx.data_ptr() : nullptr,
                                                need_x ? ncs_view(dx).strides : Strides3{{0, 0, 0}},
                                                c10::cuda::getCurrentCUDAStream().stream()),
                 "group_norm_silu_backward");
  } else if (need_x) {
    dx.zero_();
  }
  at::Tensor dw = need_weight ? sum_dyx.sum(0).to(weight->scalar_type()) : x.new_empty({0});
  at::Tensor db = need_bias ? sum_dy.sum(0).to(bias->scalar_type()) : x.new_empty({0});
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_silu_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                      int64_t dim, double eps, bool silu) {
  at::Tensor w;
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_VALUE(x.is_cuda(), "rms_norm_silu_cuda takes CUDA tensors, got x on ", x.device());
  const RmsNormArgs a = rms_args(x, weight, dim, eps, silu, w);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.erase(shape.begin() + dim);
  at::Tensor out = at::empty_like(x);
  at::Tensor rstd = at::empty(shape, x.options().dtype(accumulate_type(x.scalar_type())));
  const RmsView ov = rms_view(out, dim);
  TORCH_INTERNAL_ASSERT(ov.ok, "empty_like(x) does not merge around dim");
  check_launch(cuda::rms_norm_silu_forward(a, out.data_ptr(), ov.strides, rstd.data_ptr(),
                                           c10::cuda::getCurrentCUDAStream().stream()),
               "rms_norm_silu_forward");
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_silu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x,
                                                               const c10::optional<at::Tensor>& weight,
                                                               const at::Tensor& rstd, int64_t dim, bool silu,
                                                               bool need_x, bool need_weight) {
  at::Tensor w;
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_VALUE(x.is_cuda(), "rms_norm_silu_backward_cuda takes CUDA tensors, got x on ", x.device());
  const RmsNormArgs a = rms_args(x, weight, dim, 0.0, silu, w);
  check_rms_backward(grad_in, x, rstd, dim);
  TORCH_CHECK_VALUE(!need_weight || weight.has_value(), "need_weight without a weight");
  const at::Tensor grad = rms_view(grad_in, dim).ok ? grad_in : grad_in.contiguous();
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor dx = need_x ? at::empty_like(x) : x.new_empty({0});
  at::Tensor part = need_weight ? at::zeros({rms_blocks(a), a.dim}, acc) : x.new_empty({0}, acc);
  if (!rms_empty(a) && (need_x || need_weight)) {
    check_launch(cuda::rms_norm_silu_backward(a, grad.data_ptr(), rms_view(grad, dim).strides, rstd.data_ptr(),
                                              need_x ? dx.data_ptr() : nullptr,
                                              need_x ? rms_view(dx, dim).strides : Strides3{{0, 0, 0}},
                                              need_weight ? part.data_ptr() : nullptr,
                                              c10::cuda::getCurrentCUDAStream().stream()),
                 "rms_norm_silu_backward");
  } else if (need_x) {
    dx.zero_();
  }
  at::Tensor dw = need_weight ? part.sum(0).to(weight->scalar_type()) : x.new_empty({0});
  return {dx, dw};
}

}  // namespace
}  // namespace fnf

TORCH_LIBRARY_IMPL(fnf_kernels, CUDA, m) {
  m.impl("group_norm_silu", &fnf::group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &fnf::group_norm_silu_backward_cuda);
  m.impl("rms_norm_silu", &fnf::rms_norm_silu_cuda);
  m.impl("rms_norm_silu_backward", &fnf::rms_norm_silu_backward_cuda);
  m.impl("penalty_norms", &fnf::penalty_norms_cuda);
  m.impl("penalty_backward", &fnf::penalty_backward_cuda);
  m.impl("threshold_dilate", &fnf::threshold_dilate_cuda);
}
