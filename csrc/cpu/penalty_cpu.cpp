// CPU (OpenMP) kernels of the masked Frobenius penalty: one pass for the per-sample norms, one pass for
// the gradient. Work is split over (sample, d0) planes; each plane accumulates in acc_t and the plane
// partials are summed in a fixed order, so results are deterministic for a given thread count.
#include <ATen/OpMathType.h>
#include <omp.h>

#include "fnf/penalty_core.h"
#include "../ops.h"
#include "../tensor_args.h"

namespace fnf {
namespace {

template <typename scalar_t, typename acc_t>
acc_t plane_sumsq(const PenaltyArgs& a, int64_t b, int64_t i0) {
  const auto p = penalty::plane<scalar_t>(a, b, i0);
  const scalar_t *x = p.x, *r = p.r, *m = p.m;
  const auto &vx = a.image_view.stride, &vr = a.reference_view.stride, &vm = a.mask_view.stride;
  const int64_t d1 = a.size[1], d2 = a.size[2];
  acc_t acc = 0;
  if (a.dense_planes) {
    const int64_t n = d1 * d2;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) {
      acc_t d = penalty::masked_diff<acc_t>(acc_t(x[j]), acc_t(r[j]), acc_t(m[j]));
      acc += d * d;
    }
    return acc;
  }
  for (int64_t i1 = 0; i1 < d1; ++i1) {
    const scalar_t* xr = x + i1 * vx[2];
    const scalar_t* rr = r + i1 * vr[2];
    const scalar_t* mr = m + i1 * vm[2];
    acc_t row = 0;
#pragma omp simd reduction(+ : row)
    for (int64_t i2 = 0; i2 < d2; ++i2) {
      acc_t d = penalty::masked_diff<acc_t>(acc_t(xr[i2 * vx[3]]), acc_t(rr[i2 * vr[3]]), acc_t(mr[i2 * vm[3]]));
      row += d * d;
    }
    acc += row;
  }
  return acc;
}

template <typename scalar_t, typename acc_t>
void plane_grad(const PenaltyArgs& a, const View4& vg, scalar_t* g, const acc_t* coef, int64_t b, int64_t i0,
                bool dense) {
  const auto p = penalty::plane<scalar_t>(a, b, i0);
  const scalar_t *x = p.x, *r = p.r, *m = p.m;
  const auto &vx = a.image_view.stride, &vr = a.reference_view.stride, &vm = a.mask_view.stride;
  g += b * vg.stride[0] + i0 * vg.stride[1];
  const acc_t c = coef[b];
  const int64_t d1 = a.size[1], d2 = a.size[2];
  if (dense) {
    const int64_t n = d1 * d2;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      g[j] = scalar_t(penalty::grad_image<acc_t>(acc_t(x[j]), acc_t(r[j]), acc_t(m[j]), c));
    return;
  }
  for (int64_t i1 = 0; i1 < d1; ++i1) {
    for (int64_t i2 = 0; i2 < d2; ++i2) {
      g[i1 * vg.stride[2] + i2 * vg.stride[3]] = scalar_t(penalty::grad_image<acc_t>(
          acc_t(x[i1 * vx[2] + i2 * vx[3]]), acc_t(r[i1 * vr[2] + i2 * vr[3]]), acc_t(m[i1 * vm[2] + i2 * vm[3]]), c));
    }
  }
}

template <typename scalar_t>
void all_planes_sumsq(const PenaltyArgs& a, at::Tensor& partial) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* out = partial.data_ptr<acc_t>();
  const int64_t planes = a.batch * a.size[0];
#pragma omp parallel for schedule(static) if (planes > 1)
  for (int64_t p = 0; p < planes; ++p) out[p] = plane_sumsq<scalar_t, acc_t>(a, p / a.size[0], p % a.size[0]);
}

template <typename scalar_t>
void all_planes_grad(const PenaltyArgs& a, const View4& vg, at::Tensor& out, const at::Tensor& coef, bool dense) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* c = coef.data_ptr<acc_t>();
  scalar_t* g = out.data_ptr<scalar_t>();
  const int64_t planes = a.batch * a.size[0];
#pragma omp parallel for schedule(static) if (planes > 1)
  for (int64_t p = 0; p < planes; ++p)
    plane_grad<scalar_t, acc_t>(a, vg, g, c, p / a.size[0], p % a.size[0], dense);
}

}  // namespace

at::Tensor penalty_norms_cpu(const at::Tensor& image, const at::Tensor& reference, const at::Tensor& mask,
                             bool squared) {
  check_penalty_inputs(image, reference, mask);
  TORCH_CHECK_VALUE(image.device().is_cpu(), "penalty_norms_cpu takes CPU tensors");
  const PenaltyArgs a = make_penalty_args(image, reference, mask);
  auto acc_type = accumulate_type(image.scalar_type());
  at::Tensor partial = at::empty({a.batch, a.size[0]}, image.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "penalty_norms_cpu",
                                  [&] { all_planes_sumsq<scalar_t>(a, partial); });
  at::Tensor sumsq = partial.sum(1);
  return squared ? sumsq : sumsq.sqrt();
}

at::Tensor penalty_coefficients(const at::Tensor& grad, const at::Tensor& norms, bool squared) {
  at::Tensor g = grad.to(norms.scalar_type());
  if (squared) return g * 2;
  // g / n where n > 0; exactly 0 where n == 0; NaN stays NaN.
  return at::where(norms > 0, g / norms, at::where(norms == norms, at::zeros_like(norms), norms));
}

at::Tensor penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& image, const at::Tensor& reference,
                                const at::Tensor& mask, const at::Tensor& norms, bool squared) {
  check_penalty_inputs(image, reference, mask);
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == image.size(0) && norms.sizes() == grad.sizes(),
                    "grad and norms must have shape (B,)");
  const PenaltyArgs a = make_penalty_args(image, reference, mask);
  at::Tensor coef = penalty_coefficients(grad, norms, squared).contiguous();
  at::Tensor out = at::empty_like(image);
  auto order = penalty_dim_order(image);
  View4 vg = make_view(out, order);
  const bool dense = a.dense_planes && out.strides() == image.strides();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "penalty_backward_cpu",
                                  [&] { all_planes_grad<scalar_t>(a, vg, out, coef, dense); });
  return out;
}

}  // namespace fnf
