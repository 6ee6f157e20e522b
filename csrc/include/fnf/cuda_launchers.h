// Host-side launchers of the CUDA kernels. Implemented in cuda/*.cu, which include no torch headers;
// called from cuda/bindings_cuda.cpp with the current stream.
#pragma once
#include <cuda_runtime_api.h>

#include "fnf/norm_silu_args.h"
#include "fnf/rms_norm_silu_args.h"
#include "fnf/types.h"

namespace fnf {
namespace cuda {

// Elements of one (D1, D2) plane handled by one block of the penalty kernels.
int64_t penalty_chunk_elements();
// Number of blocks per plane = partials per plane.
int64_t penalty_chunks_per_plane(const PenaltyArgs& a);
// Size of the partials buffer penalty_partials writes: B * D0 * chunks per plane (0 for an empty image).
int64_t penalty_partials_count(const PenaltyArgs& a);

// partials: (B * D0 * chunks_per_plane) float (double for F64) sums of squares, one per block. An empty
// image launches nothing and returns cudaSuccess (as does penalty_backward).
cudaError_t penalty_partials(const PenaltyArgs& a, void* partials, cudaStream_t stream);

// grad_image = -coef[b] * w^2 * (reference - image), written through grad_view's strides.
// coef: (B,) float (double for F64).
cudaError_t penalty_backward(const PenaltyArgs& a, const View4& grad_view, bool grad_dense, const void* coef,
                             void* grad, cudaStream_t stream);

// Two-pass threshold + dilation (see dilate_core.h); a.scratch holds B * H * W uint32. Any batch size (the
// kernels stride over gridDim); an empty heatmap launches nothing and returns cudaSuccess.
cudaError_t threshold_dilate(const DilateArgs& a, cudaStream_t stream);

// group_norm_silu forward: part_mean / part_m2 hold N * C * norm_chunks(a) accumulate-dtype values (float; double
// for F64), mean / rstd N * G; out is written through out_strides. An empty x launches nothing.
cudaError_t group_norm_silu_forward(const NormSiluArgs& a, void* part_mean, void* part_m2, void* mean, void* rstd,
                                    void* out, const Strides3& out_strides, cudaStream_t stream);

// group_norm_silu backward: part_dyx / part_dy N * C * norm_chunks(a); sum_dyx / sum_dy (N, C) sums of dy * xhat
// and dy (dweight and dbias are their sums over N); coef 2 * N * G; dx (null: not needed) through dx_strides.
cudaError_t group_norm_silu_backward(const NormSiluArgs& a, const void* grad, const Strides3& grad_strides,
                                     const void* mean, const void* rstd, void* part_dyx, void* part_dy, void* sum_dyx,
                                     void* sum_dy, void* coef, void* dx, const Strides3& dx_strides,
                                     cudaStream_t stream);

// rms_norm_silu forward: out through out_strides (an (O, D, I) view), rstd (O * I) in the accumulate dtype. An
// empty x launches nothing.
cudaError_t rms_norm_silu_forward(const RmsNormArgs& a, void* out, const Strides3& out_strides, void* rstd,
                                  cudaStream_t stream);

// rms_norm_silu backward: dx (null: not needed) through dx_strides; part (null: dweight not needed) holds
// rms_blocks(a) * D accumulate-dtype values, zeroed by the caller, whose sum over the blocks is dweight.
cudaError_t rms_norm_silu_backward(const RmsNormArgs& a, const void* grad, const Strides3& grad_strides,
                                   const void* rstd, void* dx, const Strides3& dx_strides, void* part,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace fnf
