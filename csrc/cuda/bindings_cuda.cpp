// CUDA implementations of the fnf_kernels ops: torch tensors -> plain structs -> launchers in *.cu.
// Every tensor argument is checked (dtype, device) before a pointer reaches a kernel; empty tensors give what
// the CPU backend gives (zeros / empty) without a launch; any batch size launches (the kernels grid-stride).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "fnf/cuda_launchers.h"
#include "fnf/penalty_grid.h"
#include "../ops.h"
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

}  // namespace
}  // namespace fnf

TORCH_LIBRARY_IMPL(fnf_kernels, CUDA, m) {
  m.impl("penalty_norms", &fnf::penalty_norms_cuda);
  m.impl("penalty_backward", &fnf::penalty_backward_cuda);
  m.impl("threshold_dilate", &fnf::threshold_dilate_cuda);
}
