// x viewed as (O, D, I) around a dim for the rms_norm_silu kernels (CPU and CUDA bindings), with the checks
// their direct torch.ops calls rely on.
#pragma once
#include <torch/extension.h>

#include "fnf/norm_silu_args.h"
#include "fnf/rms_norm_silu_args.h"
#include "tensor_args.h"

namespace fnf {

// (O, D, I) and strides of t around dim; ok = false when the dims before or after dim do not merge into one
// stride (then the caller copies x to contiguous).
struct RmsView {
  int64_t outer, dim, inner;
  Strides3 strides;
  bool ok;
};

// The stride of dims [begin, end) of t merged into one (1 for none), and their element count; ok = false when
// they do not merge.
inline bool merged_stride(const at::Tensor& t, int64_t begin, int64_t end, int64_t& stride, int64_t& count) {
  stride = 1;
  count = 1;
  int64_t expect = -1;
  for (int64_t d = end - 1; d >= begin; --d) {
    count *= t.size(d);
    if (t.size(d) == 1) continue;
    if (expect == -1) {
      stride = t.stride(d);
    } else if (t.stride(d) != expect) {
      return false;
    }
    expect = t.stride(d) * t.size(d);
  }
  return true;
}

inline RmsView rms_view(const at::Tensor& t, int64_t dim) {
  RmsView v{1, t.size(dim), 1, {{1, t.stride(dim), 1}}, true};
  v.ok = merged_stride(t, 0, dim, v.strides.s[0], v.outer) &&
         merged_stride(t, dim + 1, t.dim(), v.strides.s[2], v.inner);
  return v;
}

// Checks of x, weight and dim shared by the forward and backward of every backend; returns the kernel arguments
// (weight converted to the accumulate dtype and kept alive in w).
inline RmsNormArgs rms_args(const at::Tensor& x, const c10::optional<at::Tensor>& weight, int64_t dim, double eps,
                            bool silu, at::Tensor& w) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK_VALUE(dim >= 0 && dim < x.dim(), "dim must be in [0, ", x.dim() - 1, "] for x of shape ", x.sizes(),
                    ", got ", dim);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == x.size(dim), "weight must have shape (",
                      x.size(dim), ",) (the size of dim ", dim, " of x), got ", weight->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(weight->scalar_type()), "weight must be floating point, got ",
                     weight->scalar_type());
    TORCH_CHECK_VALUE(weight->device() == x.device(), "weight is on ", weight->device(), " but x is on ", x.device());
    w = weight->to(accumulate_type(x.scalar_type())).contiguous();
  }
  const RmsView v = rms_view(x, dim);
  TORCH_CHECK_VALUE(v.ok, "x's dims before and after dim ", dim, " must each merge into one stride (contiguous or "
                    "channels_last), got strides ", x.strides());
  RmsNormArgs a;
  a.x = x.data_ptr();
  a.dtype = dtype_of(x.scalar_type());
  a.outer = v.outer;
  a.dim = v.dim;
  a.inner = v.inner;
  for (int i = 0; i < 3; ++i) a.stride[i] = v.strides.s[i];
  a.weight = w.defined() ? w.data_ptr() : nullptr;
  a.eps = eps;
  a.silu = silu;
  return a;
}

// rstd of the backward: (O * I) contiguous values of the accumulate dtype on x's device, shaped as x without dim.
inline void check_rms_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& rstd, int64_t dim) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.device() == x.device(), "grad must have x's shape ", x.sizes(),
                    " and device, got ", grad.sizes(), " on ", grad.device());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "grad must have x's dtype ", x.scalar_type(), ", got ",
                   grad.scalar_type());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.erase(shape.begin() + dim);
  TORCH_CHECK_VALUE(rstd.sizes() == at::IntArrayRef(shape) && rstd.is_contiguous() && rstd.device() == x.device(),
                    "rstd must be contiguous, shaped ", at::IntArrayRef(shape), " (x without dim ", dim,
                    ") on x's device, got ", rstd.sizes());
  TORCH_CHECK_TYPE(rstd.scalar_type() == accumulate_type(x.scalar_type()), "rstd must be ",
                   accumulate_type(x.scalar_type()), " for a ", x.scalar_type(), " x, got ", rstd.scalar_type());
}

}  // namespace fnf
