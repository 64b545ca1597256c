// Plain launchers of the cpr_distances CUDA kernels: pointers, sizes, strides and a stream; no torch header,
// so nvcc compiles cpr_distances_kernel.cu on its own. The torch-facing registration is cpr_distances_cuda.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace cpl_fast {
namespace cpr {
namespace cuda {

// Element strides of the inputs; every sample is one dense run of `per_sample` elements. The gradients
// written by the backward are contiguous: (B, N) for f_pos and f_gt, (m, B, N) for f_neg.
struct Layout {
  int64_t batch;
  int64_t negatives;
  int64_t per_sample;
  int64_t stride_pos_b;
  int64_t stride_gt_b;
  int64_t stride_neg_t;
  int64_t stride_neg_b;
};

// Elements of one sample reduced by one forward block: fixed, so the sums do not depend on the device.
constexpr int64_t kForwardChunk = 2048;

// Accumulators of the forward's first pass: (B, chunks, 1 + m) values of acc_t.
inline int64_t forward_partials_size(const Layout& layout) {
  const int64_t chunks = (layout.per_sample + kForwardChunk - 1) / kForwardChunk;
  return layout.batch * chunks * (1 + layout.negatives);
}

// l_pos[b] = mean (f_pos - f_gt)^2, l_neg[b] = (1/m) sum_t weights[b, t] mean (f_neg[t] - f_pos)^2.
// weights: (B, m) contiguous acc_t. Two passes (per-chunk partials, then a fixed-order sum): no atomics.
// acc_t is float for float, __half and __nv_bfloat16 inputs and double for double.
template <typename scalar_t, typename acc_t>
cudaError_t launch_cpr_distances_forward(const scalar_t* f_pos, const scalar_t* f_gt, const scalar_t* f_neg,
                                         const acc_t* weights, const Layout& layout, acc_t* partials,
                                         scalar_t* l_pos, scalar_t* l_neg, cudaStream_t stream);

// grad_f_gt = -c_pos[b] (f_pos - f_gt); grad_f_neg[t, b] = c_neg[b, t] (f_neg[t, b] - f_pos);
// grad_f_pos = -grad_f_gt - sum_t grad_f_neg[t, b]. c_pos (B,), c_neg (B, m) contiguous acc_t.
template <typename scalar_t, typename acc_t>
cudaError_t launch_cpr_distances_backward(const scalar_t* f_pos, const scalar_t* f_gt, const scalar_t* f_neg,
                                          const acc_t* c_pos, const acc_t* c_neg, const Layout& layout,
                                          scalar_t* grad_pos, scalar_t* grad_gt, scalar_t* grad_neg,
                                          cudaStream_t stream);

}  // namespace cuda
}  // namespace cpr
}  // namespace cpl_fast
