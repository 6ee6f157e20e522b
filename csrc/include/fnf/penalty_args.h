// Sizes and strides -> PenaltyArgs, pure C++ (no torch): used by tensor_args.h for the CPU and CUDA
// bindings, and by the CUDA emulation harness (tests/cuda_emulation) on the same sizes and strides.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>

#include "fnf/types.h"

namespace fnf {

// Sizes and strides (in elements) of a 4-D (B, C, H, W) tensor.
struct Dims4 {
  int64_t size[4];
  int64_t stride[4];
};

// Order of the (C, H, W) dims by decreasing image stride (size-1 dims count as stride 0; ties keep C, H, W).
inline std::array<int, 3> penalty_dim_order(const Dims4& image) {
  std::array<int, 3> order{1, 2, 3};
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    int64_t sa = image.size[a] == 1 ? 0 : image.stride[a], sb = image.size[b] == 1 ? 0 : image.stride[b];
    return sa > sb;
  });
  return order;
}

inline View4 make_view(const Dims4& t, const std::array<int, 3>& order) {
  View4 v;
  v.stride[0] = t.size[0] == 1 ? 0 : t.stride[0];
  for (int i = 0; i < 3; ++i) {
    int d = order[i];
    v.stride[i + 1] = t.size[d] == 1 ? 0 : t.stride[d];
  }
  return v;
}

inline bool dense_plane(const View4& v, const int64_t size[3]) {
  bool inner = v.stride[3] == 1 || size[2] == 1;
  bool middle = v.stride[2] == size[2] || size[1] == 1;
  return inner && middle;
}

// A mask with one channel broadcasts over the image's C (as expand_as: that dim gets stride 0).
inline Dims4 broadcast_mask(Dims4 mask, const Dims4& image) {
  if (mask.size[1] != image.size[1]) {
    mask.size[1] = image.size[1];
    mask.stride[1] = 0;
  }
  return mask;
}

inline PenaltyArgs make_penalty_args(DType dtype, const void* image, const Dims4& di, const void* reference,
                                     const Dims4& dr, const void* mask, const Dims4& mask_dims) {
  PenaltyArgs a;
  const auto order = penalty_dim_order(di);
  const Dims4 dm = broadcast_mask(mask_dims, di);
  a.image = image;
  a.reference = reference;
  a.mask = mask;
  a.dtype = dtype;
  a.batch = di.size[0];
  for (int i = 0; i < 3; ++i) a.size[i] = di.size[order[i]];
  a.image_view = make_view(di, order);
  a.reference_view = make_view(dr, order);
  a.mask_view = make_view(dm, order);
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
