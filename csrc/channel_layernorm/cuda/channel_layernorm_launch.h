// Plain C++ interface between the CUDA kernels of channel_layernorm (channel_layernorm_kernel.cu, which
// includes no torch header) and their torch registration (channel_layernorm_cuda.cpp). Tensors travel as raw
// pointers to contiguous memory; x is (B, C, N) with N pixels per channel plane.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cpl_fast {
namespace channel_layernorm_cuda {

// Element type of x, weight, bias, out, grad_out and grad_x. mean and rstd are float64 for kFloat64, else
// float32 (the accumulation type).
enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

// out = (x - mean) * rstd * weight + bias (bias non-null) or x * rstd * weight; mean, rstd (B, N).
cudaError_t launch_forward(Dtype dtype, int64_t B, int64_t C, int64_t N, const void* x, const void* weight,
                           const void* bias, double eps, void* out, void* mean, void* rstd, cudaStream_t stream);

// Number of pixel chunks per channel the weight/bias reduction uses: partial_w and partial_b hold
// C * backward_chunks(B, N) values of the accumulation type each.
int64_t backward_chunks(int64_t B, int64_t N);

// grad_x (B, C, N); partial_w[c * chunks + k] / partial_b[...]: chunk k's sum of g * n / of g for channel c
// (summed over k by the caller, in a fixed order).
cudaError_t launch_backward(Dtype dtype, int64_t B, int64_t C, int64_t N, const void* grad_out, const void* x,
                            const void* weight, const void* mean, const void* rstd, bool with_bias, void* grad_x,
                            void* partial_w, void* partial_b, cudaStream_t stream);

}  // namespace channel_layernorm_cuda
}  // namespace cpl_fast
