// Plain C++ interface between the CUDA kernels of prompt_mix (prompt_mix_kernel.cu, which includes
// no torch header) and their torch registration (prompt_mix_cuda.cpp). Tensors travel as raw
// pointers to contiguous memory plus sizes; every launcher returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cpl_fast {
namespace prompt_mix_cuda {

// Element type of bank, weights, out and grad_out. Half types accumulate in float32, float64 in
// float64.
enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

struct Sizes {
  int64_t n, C, S, Sp;  // bank (n, C, S, S')
  int64_t B, k;         // indices and weights (B, k)
  int64_t H, W;         // output (B, C, H, W)
};

// out = sum_j weights[b, j] * bilinear(bank[indices[b, j]]).
cudaError_t launch_forward(Dtype dtype, const Sizes& s, const void* bank, const int64_t* indices,
                           const void* weights, void* out, cudaStream_t stream);

// Elements of the accumulation type that launch_backward needs in `partial`.
int64_t backward_partial_elems(const Sizes& s);

// grad_bank_acc (n, C, S, S') in the accumulation type (float64 for kFloat64, else float32),
// zero-filled by the caller, receives the bank gradient through atomicAdd; `partial` is scratch
// (backward_partial_elems); grad_weights (B, k) of the element type is written deterministically.
cudaError_t launch_backward(Dtype dtype, const Sizes& s, const void* grad_out, const void* bank,
                            const int64_t* indices, const void* weights, void* grad_bank_acc,
                            void* partial, void* grad_weights, cudaStream_t stream);

}  // namespace prompt_mix_cuda
}  // namespace cpl_fast
