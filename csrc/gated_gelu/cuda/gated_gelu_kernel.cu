// CUDA kernels of cpl_fast::gated_gelu (no torch header: nvcc compiles this file on its own).
// One thread per output element (grid-stride): out = a Phi(a) g; the backward recomputes Phi(a) and
// phi(a) = exp(-a^2 / 2) / sqrt(2 pi): grad_a = grad g (Phi(a) + a phi(a)), grad_g = grad a Phi(a).
// Half types compute in float32 (erff, expf), float64 in float64 (erf, exp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "gated_gelu_launch.h"
#include "../../cuda_acc.cuh"

namespace cpl_fast {
namespace gated_gelu_cuda {
namespace {

constexpr int kThreads = 256;

using namespace cpl_fast::cuda_acc;  // AccOf, to_acc, from_acc

__device__ __forceinline__ float normal_cdf(float a) { return 0.5f * (1.0f + erff(a * 0.70710678118654752f)); }
__device__ __forceinline__ double normal_cdf(double a) { return 0.5 * (1.0 + erf(a * 0.70710678118654752440)); }
__device__ __forceinline__ float normal_pdf(float a) { return 0.39894228040143268f * expf(-0.5f * a * a); }
__device__ __forceinline__ double normal_pdf(double a) { return 0.39894228040143267794 * exp(-0.5 * a * a); }

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(int64_t B, int64_t M, const scalar_t* __restrict__ x, scalar_t* __restrict__ out) {
  const int64_t total = B * M;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / M, i = t % M;
    const acc_t a = to_acc(x[b * 2 * M + i]);
    const acc_t g = to_acc(x[b * 2 * M + M + i]);
    out[t] = from_acc<scalar_t>(a * normal_cdf(a) * g);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(int64_t B, int64_t M, const scalar_t* __restrict__ grad,
                                const scalar_t* __restrict__ x, scalar_t* __restrict__ grad_x) {
  const int64_t total = B * M;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / M, i = t % M;
    const acc_t gr = to_acc(grad[t]);
    const acc_t a = to_acc(x[b * 2 * M + i]);
    const acc_t g = to_acc(x[b * 2 * M + M + i]);
    const acc_t cdf = normal_cdf(a);
    grad_x[b * 2 * M + i] = from_acc<scalar_t>(gr * g * (cdf + a * normal_pdf(a)));
    grad_x[b * 2 * M + M + i] = from_acc<scalar_t>(gr * a * cdf);
  }
}

unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20)));
}

template <typename scalar_t>
cudaError_t forward_typed(int64_t B, int64_t M, const void* x, void* out, cudaStream_t stream) {
  if (B * M == 0) return cudaSuccess;
  forward_kernel<scalar_t, typename AccOf<scalar_t>::type><<<grid_for(B * M), kThreads, 0, stream>>>(
      B, M, static_cast<const scalar_t*>(x), static_cast<scalar_t*>(out));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_typed(int64_t B, int64_t M, const void* grad, const void* x, void* grad_x, cudaStream_t stream) {
  if (B * M == 0) return cudaSuccess;
  backward_kernel<scalar_t, typename AccOf<scalar_t>::type><<<grid_for(B * M), kThreads, 0, stream>>>(
      B, M, static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(x), static_cast<scalar_t*>(grad_x));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_forward(Dtype dtype, int64_t B, int64_t M, const void* x, void* out, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return forward_typed<float>(B, M, x, out, stream);
    case Dtype::kFloat64: return forward_typed<double>(B, M, x, out, stream);
    case Dtype::kFloat16: return forward_typed<__half>(B, M, x, out, stream);
    case Dtype::kBFloat16: return forward_typed<__nv_bfloat16>(B, M, x, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(Dtype dtype, int64_t B, int64_t M, const void* grad_out, const void* x, void* grad_x,
                            cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return backward_typed<float>(B, M, grad_out, x, grad_x, stream);
    case Dtype::kFloat64: return backward_typed<double>(B, M, grad_out, x, grad_x, stream);
    case Dtype::kFloat16: return backward_typed<__half>(B, M, grad_out, x, grad_x, stream);
    case Dtype::kBFloat16: return backward_typed<__nv_bfloat16>(B, M, grad_out, x, grad_x, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gated_gelu_cuda
}  // namespace cpl_fast
