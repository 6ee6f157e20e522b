// Torch -> plain-struct conversion shared by the CPU and CUDA bindings, with the checks every backend
// relies on (the Python wrapper validates user input; these guard direct torch.ops calls).
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <array>

#include "fnf/norm_silu_args.h"
#include "fnf/penalty_args.h"
#include "fnf/types.h"

namespace fnf {

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kBool: return DType::Bool;
    case at::kByte: return DType::U8;
    default: TORCH_CHECK_TYPE(false, "fnf_kernels: unsupported dtype ", t);
  }
  return DType::F32;
}

inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_penalty_inputs(const at::Tensor& image, const at::Tensor& reference, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(image.dim() == 4, "image must be 4-D (B, C, H, W), got ", image.sizes());
  TORCH_CHECK_VALUE(reference.sizes() == image.sizes(), "reference must have image's shape ", image.sizes(),
                    ", got ", reference.sizes());
  TORCH_CHECK_VALUE(mask.dim() == 4 && mask.size(0) == image.size(0) &&
                        (mask.size(1) == 1 || mask.size(1) == image.size(1)) && mask.size(2) == image.size(2) &&
                        mask.size(3) == image.size(3),
                    "mask must be (B, 1|C, H, W) for image ", image.sizes(), ", got ", mask.sizes());
  TORCH_CHECK_TYPE(reference.scalar_type() == image.scalar_type() && mask.scalar_type() == image.scalar_type(),
                   "image, reference and mask must share a dtype");
  TORCH_CHECK_TYPE(at::isFloatingType(image.scalar_type()), "image must be floating point, got ",
                   image.scalar_type());
  TORCH_CHECK_VALUE(reference.device() == image.device() && mask.device() == image.device(),
                    "image, reference and mask must be on one device");
}

inline Dims4 dims_of(const at::Tensor& t) {
  Dims4 d;
  for (int i = 0; i < 4; ++i) {
    d.size[i] = t.size(i);
    d.stride[i] = t.stride(i);
  }
  return d;
}

inline std::array<int, 3> penalty_dim_order(const at::Tensor& image) { return penalty_dim_order(dims_of(image)); }

inline View4 make_view(const at::Tensor& t, const std::array<int, 3>& order) { return make_view(dims_of(t), order); }

inline PenaltyArgs make_penalty_args(const at::Tensor& image, const at::Tensor& reference, const at::Tensor& mask) {
  return make_penalty_args(dtype_of(image.scalar_type()), image.data_ptr(), dims_of(image), reference.data_ptr(),
                           dims_of(reference), mask.data_ptr(), dims_of(mask));
}

// grad and norms of penalty_backward (after check_penalty_inputs): one clear error on every backend instead of
// garbage read through the wrong dtype or a pointer to another device.
inline void check_penalty_backward_inputs(const at::Tensor& grad, const at::Tensor& norms, const at::Tensor& image) {
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == image.size(0) && norms.sizes() == grad.sizes(),
                    "grad and norms must have shape (B,)");
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "grad must be floating point, got ", grad.scalar_type());
  TORCH_CHECK_TYPE(norms.scalar_type() == accumulate_type(image.scalar_type()), "norms must be ",
                   accumulate_type(image.scalar_type()), " for a ", image.scalar_type(), " image (as penalty_norms "
                   "returns), got ", norms.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == image.device() && norms.device() == image.device(), "grad (on ", grad.device(),
                    ") and norms (on ", norms.device(), ") must be on image's device ", image.device());
}

// x (N, C, *) as (N, C, S) strides when its spatial dims merge into one stride (contiguous, channels_last and
// their 3-D kin); ok = false otherwise.
struct NcsView {
  Strides3 strides;
  int64_t spatial;
  bool ok;
};

inline NcsView ncs_view(const at::Tensor& x) {
  NcsView v{{{x.stride(0), x.stride(1), 1}}, 1, true};
  int64_t expect = -1;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    v.spatial *= x.size(d);
    if (x.size(d) == 1) continue;
    if (expect == -1) {
      v.strides.s[2] = x.stride(d);
    } else if (x.stride(d) != expect) {
      v.ok = false;
    }
    expect = x.stride(d) * x.size(d);
  }
  return v;
}

}  // namespace fnf
