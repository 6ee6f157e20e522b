// CPU (OpenMP) kernel of threshold_dilate: the two-pass scan of fnf/dilate_core.h.
// Column pass: rows swept top-down then bottom-up with per-column carries held in arrays, so every
// access walks memory in order. Row pass: one row per task, left-to-right then right-to-left.
#include <ATen/Dispatch_v2.h>
#include <ATen/OpMathType.h>
#include <omp.h>

#include <vector>

#include "fnf/dilate_core.h"
#include "../ops.h"
#include "../tensor_args.h"

namespace fnf {
namespace {

template <typename scalar_t, typename acc_t>
void column_pass(const scalar_t* h, const int64_t* st, acc_t thr, int64_t H, int64_t W, int cap, uint32_t* g,
                 int64_t x0, int64_t x1) {
  const int64_t n = x1 - x0;
  std::vector<int> last1(n, dilate::far_before(cap)), last2(n, dilate::far_before(cap));
  for (int64_t y = 0; y < H; ++y) {
    const scalar_t* row = h + y * st[1];
    uint32_t* grow = g + y * W;
    for (int64_t i = 0; i < n; ++i) {
      int s = dilate::state_of<acc_t>(acc_t(row[(x0 + i) * st[2]]), thr);
      grow[x0 + i] = dilate::column_down(s, int(y), cap, last1[i], last2[i]);
    }
  }
  std::vector<int> next1(n, dilate::far_after(int(H), cap)), next2(n, dilate::far_after(int(H), cap));
  for (int64_t y = H - 1; y >= 0; --y) {
    uint32_t* grow = g + y * W;
    for (int64_t i = 0; i < n; ++i) grow[x0 + i] = dilate::column_up(grow[x0 + i], int(y), cap, next1[i], next2[i]);
  }
}

template <typename out_t>
void row_pass(uint32_t* g, out_t* out, int64_t W, int r, bool disk, out_t nan_value) {
  int best1 = dilate::row_left_init(), best2 = dilate::row_left_init();
  for (int64_t x = 0; x < W; ++x) g[x] = dilate::row_left(g[x], int(x), r, disk, best1, best2);
  best1 = best2 = dilate::row_right_init(int(W));
  for (int64_t x = W - 1; x >= 0; --x) {
    int s = dilate::row_right(g[x], int(x), best1, best2);
    out[x] = s == 2 ? nan_value : (s == 1 ? out_t(1) : out_t(0));
  }
}

template <typename out_t>
out_t nan_or_one() {
  if constexpr (std::is_same_v<out_t, bool> || std::is_same_v<out_t, uint8_t>) {
    return out_t(1);
  } else {
    return out_t(std::numeric_limits<float>::quiet_NaN());
  }
}

template <typename scalar_t>
void all_columns(const at::Tensor& heatmap, const at::Tensor& threshold, int cap, uint32_t* g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = heatmap.size(0), H = heatmap.size(1), W = heatmap.size(2);
  const int64_t st[3] = {heatmap.stride(0), heatmap.stride(1), heatmap.stride(2)};
  const int64_t col_block = 256, col_blocks = (W + col_block - 1) / col_block;
  const scalar_t* h = heatmap.data_ptr<scalar_t>();
  const acc_t* thr = threshold.data_ptr<acc_t>();
#pragma omp parallel for schedule(static) if (B * col_blocks > 1)
  for (int64_t task = 0; task < B * col_blocks; ++task) {
    const int64_t b = task / col_blocks, x0 = (task % col_blocks) * col_block;
    const int64_t x1 = std::min(W, x0 + col_block);
    column_pass<scalar_t, acc_t>(h + b * st[0], st, thr[b], H, W, cap, g + b * H * W, x0, x1);
  }
}

template <typename out_t>
void all_rows(at::Tensor& out, uint32_t* g, int r, bool disk) {
  const int64_t rows = out.size(0) * out.size(1), W = out.size(2);
  out_t* o = out.data_ptr<out_t>();
  const out_t nan_value = nan_or_one<out_t>();
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t row = 0; row < rows; ++row) row_pass<out_t>(g + row * W, o + row * W, W, r, disk, nan_value);
}

}  // namespace

void check_dilate_inputs(const at::Tensor& heatmap, const at::Tensor& threshold, int64_t radius) {
  TORCH_CHECK_VALUE(heatmap.dim() == 3, "heatmap must be (B, H, W), got ", heatmap.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(heatmap.scalar_type()), "heatmap must be floating point");
  TORCH_CHECK_VALUE(threshold.dim() == 1 && threshold.size(0) == heatmap.size(0), "threshold must be (B,)");
  TORCH_CHECK_TYPE(threshold.scalar_type() == accumulate_type(heatmap.scalar_type()),
                   "threshold must be float32 (float64 for float64 heatmaps)");
  TORCH_CHECK_VALUE(threshold.device() == heatmap.device(), "threshold must be on heatmap's device");
  TORCH_CHECK_VALUE(radius >= 0 && radius <= heatmap.size(1) + heatmap.size(2),
                    "radius must be in [0, H + W] (the wrapper clamps larger radii), got ", radius);
  TORCH_CHECK_VALUE(heatmap.size(1) + heatmap.size(2) < 32767, "H + W must be below 32767");
}

at::Tensor threshold_dilate_cpu(const at::Tensor& heatmap, const at::Tensor& threshold_in, int64_t radius, bool disk,
                                at::ScalarType dtype) {
  check_dilate_inputs(heatmap, threshold_in, radius);
  const int64_t B = heatmap.size(0), H = heatmap.size(1), W = heatmap.size(2);
  const int r = int(radius), cap = int(radius) + 1;
  at::Tensor threshold = threshold_in.contiguous();
  at::Tensor out = at::empty({B, H, W}, heatmap.options().dtype(dtype));
  at::Tensor scratch = at::empty({B, H, W}, heatmap.options().dtype(at::kInt));
  uint32_t* g = reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heatmap.scalar_type(), "dilate_columns",
                                  [&] { all_columns<scalar_t>(heatmap, threshold, cap, g); });
  AT_DISPATCH_V2(dtype, "dilate_rows", AT_WRAP([&] { all_rows<scalar_t>(out, g, r, disk); }),
                 AT_EXPAND(AT_FLOATING_TYPES), at::kHalf, at::kBFloat16, at::kBool, at::kByte);
  return out;
}

}  // namespace fnf
