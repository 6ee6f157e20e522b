// CPU (OpenMP) kernels of the masked Frobenius penalty: one pass for the per-sample norms, one pass for
// the gradient. The norms pass splits every (sample, d0) plane into blocks of kBlock elements (as the CUDA
// kernel does), sums each block in double and the block partials in double in a fixed order: relative
// error ~1e-7 for float32 planes of any size, and the same result for any thread count.
#include <ATen/OpMathType.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "fnf/penalty_core.h"
#include "../ops.h"
#include "../tensor_args.h"

namespace fnf {
namespace {

// Elements per partial sum (a range of the flattened (D1, D2) plane), as the CUDA kernel's blocks.
constexpr int64_t kBlock = 4096;

int64_t blocks_per_plane(const PenaltyArgs& a) { return (a.size[1] * a.size[2] + kBlock - 1) / kBlock; }

// Sum of squares of elements [start, end) of the (b, i0) plane. Element math in acc_t (opmath), the sum in
// double: float rounding then stays per element (~1e-7 relative) instead of growing with the block.
template <typename scalar_t, typename acc_t>
double block_sumsq(const PenaltyArgs& a, int64_t b, int64_t i0, int64_t start, int64_t end) {
  const auto p = penalty::plane<scalar_t>(a, b, i0);
  const scalar_t *x = p.x, *r = p.r, *m = p.m;
  double acc = 0;
  if (a.dense_planes) {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = start; j < end; ++j) {
      acc_t d = penalty::masked_diff<acc_t>(acc_t(x[j]), acc_t(r[j]), acc_t(m[j]));
      acc += double(d * d);
    }
    return acc;
  }
  const auto &vx = a.image_view.stride, &vr = a.reference_view.stride, &vm = a.mask_view.stride;
  const int64_t d2 = a.size[2];
  for (int64_t j = start; j < end;) {  // one row segment at a time
    const int64_t i1 = j / d2, first = j - i1 * d2, len = std::min(d2 - first, end - j);
    const scalar_t* xr = x + i1 * vx[2] + first * vx[3];
    const scalar_t* rr = r + i1 * vr[2] + first * vr[3];
    const scalar_t* mr = m + i1 * vm[2] + first * vm[3];
#pragma omp simd reduction(+ : acc)
    for (int64_t i2 = 0; i2 < len; ++i2) {
      acc_t d = penalty::masked_diff<acc_t>(acc_t(xr[i2 * vx[3]]), acc_t(rr[i2 * vr[3]]), acc_t(mr[i2 * vm[3]]));
      acc += double(d * d);
    }
    j += len;
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

// partial[b, i0 * blocks + k] = sum of squares of block k of plane (b, i0). Blocks, not planes, are the
// parallel unit, so a few large planes still use every thread.
template <typename scalar_t>
void all_blocks_sumsq(const PenaltyArgs& a, double* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = a.size[1] * a.size[2], blocks = blocks_per_plane(a);
  const int64_t total = a.batch * a.size[0] * blocks;
#pragma omp parallel for schedule(static) if (total > 1)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t plane = t / blocks, k = t - plane * blocks;
    const int64_t start = k * kBlock, end = std::min(start + kBlock, n);
    partial[t] = block_sumsq<scalar_t, acc_t>(a, plane / a.size[0], plane % a.size[0], start, end);
  }
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
  const int64_t per_sample = a.size[0] * blocks_per_plane(a);
  std::vector<double> partial(size_t(a.batch * per_sample));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "penalty_norms_cpu",
                                  [&] { all_blocks_sumsq<scalar_t>(a, partial.data()); });
  // Per sample, the partials are summed in double in a fixed order: deterministic for any thread count.
  at::Tensor sumsq = at::empty({a.batch}, image.options().dtype(at::kDouble));
  double* out = sumsq.data_ptr<double>();
  for (int64_t b = 0; b < a.batch; ++b) {
    double total = 0;
    for (int64_t k = 0; k < per_sample; ++k) total += partial[size_t(b * per_sample + k)];
    out[b] = total;
  }
  if (!squared) sumsq = sumsq.sqrt();  // sqrt in double, then one rounding to the result dtype
  return sumsq.to(accumulate_type(image.scalar_type()));
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
  check_penalty_backward_inputs(grad, norms, image);
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
