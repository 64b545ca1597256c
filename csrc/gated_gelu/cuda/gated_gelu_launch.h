// Plain C++ interface between the CUDA kernels of gated_gelu (gated_gelu_kernel.cu, which includes no torch
// header) and their torch registration (gated_gelu_cuda.cpp). x is (B, 2, M) contiguous: the two halves of
// each sample's channels, M = C * H * W elements each.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cpl_fast {
namespace gated_gelu_cuda {

enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

// out (B, M) = gelu(x[:, 0]) * x[:, 1].
cudaError_t launch_forward(Dtype dtype, int64_t B, int64_t M, const void* x, void* out, cudaStream_t stream);

// grad_x (B, 2, M) from grad_out (B, M).
cudaError_t launch_backward(Dtype dtype, int64_t B, int64_t M, const void* grad_out, const void* x, void* grad_x,
                            cudaStream_t stream);

}  // namespace gated_gelu_cuda
}  // namespace cpl_fast
