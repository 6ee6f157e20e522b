// Torch -> plain-struct conversion shared by the CPU and CUDA bindings, with the checks every backend
// relies on (the Python wrapper validates user input; these guard direct torch.ops calls).
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <array>

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

// Order of the (C, H, W) dims by decreasing image stride (ties keep C, H, W order).
inline std::array<int, 3> penalty_dim_order(const at::Tensor& image) {
  std::array<int, 3> order{1, 2, 3};
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    int64_t sa = image.size(a) == 1 ? 0 : image.stride(a), sb = image.size(b) == 1 ? 0 : image.stride(b);
    return sa > sb;
  });
  return order;
}

inline View4 make_view(const at::Tensor& t, const std::array<int, 3>& order) {
  View4 v;
  v.stride[0] = t.size(0) == 1 ? 0 : t.stride(0);
  for (int i = 0; i < 3; ++i) {
    int d = order[i];
    v.stride[i + 1] = t.size(d) == 1 ? 0 : t.stride(d);
  }
  return v;
}

inline bool dense_plane(const View4& v, const int64_t size[3]) {
  bool inner = v.stride[3] == 1 || size[2] == 1;
  bool middle = v.stride[2] == size[2] || size[1] == 1;
  return inner && middle;
}

inline PenaltyArgs make_penalty_args(const at::Tensor& image, const at::Tensor& reference, const at::Tensor& mask) {
  PenaltyArgs a;
  auto order = penalty_dim_order(image);
  // A mask with one channel broadcasts over C.
  at::Tensor m = mask.size(1) == image.size(1) ? mask : mask.expand_as(image);
  a.image = image.data_ptr();
  a.reference = reference.data_ptr();
  a.mask = m.data_ptr();
  a.dtype = dtype_of(image.scalar_type());
  a.batch = image.size(0);
  for (int i = 0; i < 3; ++i) a.size[i] = image.size(order[i]);
  a.image_view = make_view(image, order);
  a.reference_view = make_view(reference, order);
  a.mask_view = make_view(m, order);
  // Size-1 dims get stride 0 above; for the dense test use the stride a contiguous walk would have.
  auto fix = [&](View4 v) {
    if (a.size[2] == 1) v.stride[3] = 1;
    if (a.size[1] == 1) v.stride[2] = a.size[2];
    return v;
  };
  a.dense_planes = dense_plane(fix(a.image_view), a.size) && dense_plane(fix(a.reference_view), a.size) &&
                   dense_plane(fix(a.mask_view), a.size);
  return a;
}

}  // namespace fnf
