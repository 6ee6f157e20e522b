// Per-element math of the masked Frobenius penalty, shared by the CPU and CUDA kernels.
#pragma once
#include "fnf/types.h"

namespace fnf {
namespace penalty {

// 1 - clamp(m, 0, 1), written with comparisons so that a NaN mask value propagates.
template <typename acc_t>
FNF_HD acc_t weight(acc_t m) {
  acc_t c = m < acc_t(0) ? acc_t(0) : (m > acc_t(1) ? acc_t(1) : m);
  return acc_t(1) - c;
}

// w * (reference - image): the masked difference whose squares are summed.
template <typename acc_t>
FNF_HD acc_t masked_diff(acc_t x, acc_t r, acc_t m) {
  return weight(m) * (r - x);
}

// d(value)/d(image) for one element, given the per-sample coefficient coef: 2 g for n^2; g / n for n,
// exactly 0 where n == 0 (computed once per sample by penalty_coefficients in cpu/penalty_cpu.cpp).
template <typename acc_t>
FNF_HD acc_t grad_image(acc_t x, acc_t r, acc_t m, acc_t coef) {
  acc_t w = weight(m);
  return -coef * w * w * (r - x);
}

// Pointers to the (b, i0) plane of image, reference and mask.
template <typename scalar_t>
struct Plane {
  const scalar_t* x;
  const scalar_t* r;
  const scalar_t* m;
};

template <typename scalar_t>
FNF_HD Plane<scalar_t> plane(const PenaltyArgs& a, int64_t b, int64_t i0) {
  const int64_t* vx = a.image_view.stride;
  const int64_t* vr = a.reference_view.stride;
  const int64_t* vm = a.mask_view.stride;
  return {static_cast<const scalar_t*>(a.image) + b * vx[0] + i0 * vx[1],
          static_cast<const scalar_t*>(a.reference) + b * vr[0] + i0 * vr[1],
          static_cast<const scalar_t*>(a.mask) + b * vm[0] + i0 * vm[1]};
}

}  // namespace penalty
}  // namespace fnf
