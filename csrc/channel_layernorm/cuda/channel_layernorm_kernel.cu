// CUDA kernels of cpl_fast::channel_layernorm (no torch header: nvcc compiles this file on its own).
//
// x is (B, C, N): the C values of pixel p lie N apart, and neighbouring threads take neighbouring pixels, so
// every load of a loop over the channels is coalesced across a warp.
// Forward: one thread per pixel; three loops over the channels (mean, centred variance, output).
// Backward, kernel 1: one thread per pixel; s1 = sum_c g w and s2 = sum_c g w n, then grad_x.
// Backward, kernel 2: grid (chunks, C); block (k, c) reduces g * n and g over its chunk of channel c's B * N
// pixels in a fixed order and writes one slot each; the caller sums the slots. No atomics: reproducible.
// Half types accumulate in float32, float64 in float64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "channel_layernorm_launch.h"
#include "../../cuda_acc.cuh"

namespace cpl_fast {
namespace channel_layernorm_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxChunks = 256;

using namespace cpl_fast::cuda_acc;  // AccOf, to_acc, from_acc

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(int64_t B, int64_t C, int64_t N, const scalar_t* __restrict__ x,
                               const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias, acc_t eps,
                               scalar_t* __restrict__ out, acc_t* __restrict__ mean, acc_t* __restrict__ rstd) {
  const int64_t total = B * N;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / N, p = t % N;
    const scalar_t* xp = x + b * C * N + p;
    acc_t sum = acc_t(0);
    for (int64_t c = 0; c < C; ++c) sum += to_acc(xp[c * N]);
    const acc_t mu = sum / static_cast<acc_t>(C);
    acc_t var = acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = to_acc(xp[c * N]) - mu;
      var += d * d;
    }
    const acc_t rs = rsqrt_acc(var / static_cast<acc_t>(C) + eps);
    scalar_t* op = out + b * C * N + p;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = to_acc(xp[c * N]);
      const acc_t y = bias != nullptr ? (v - mu) * rs * to_acc(weight[c]) + to_acc(bias[c]) : v * rs * to_acc(weight[c]);
      op[c * N] = from_acc<scalar_t>(y);
    }
    mean[t] = mu;
    rstd[t] = rs;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_input_kernel(int64_t B, int64_t C, int64_t N, const scalar_t* __restrict__ grad,
                                      const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                      const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, bool with_bias,
                                      scalar_t* __restrict__ grad_x) {
  const int64_t total = B * N;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / N, p = t % N;
    const int64_t base = b * C * N + p;
    const acc_t mu = mean[t], rs = rstd[t];
    const acc_t sub = with_bias ? mu : acc_t(0);  // n = (x - sub) * rstd: the bias-free norm does not centre
    acc_t s1 = acc_t(0), s2 = acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t gw = to_acc(grad[base + c * N]) * to_acc(weight[c]);
      s1 += gw;
      s2 += gw * (to_acc(x[base + c * N]) - sub) * rs;
    }
    const acc_t a = with_bias ? s1 / static_cast<acc_t>(C) : acc_t(0);
    s2 /= static_cast<acc_t>(C);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t xhat = (to_acc(x[base + c * N]) - mu) * rs;
      grad_x[base + c * N] = from_acc<scalar_t>(rs * (to_acc(grad[base + c * N]) * to_acc(weight[c]) - a - xhat * s2));
    }
  }
}

// Sum over the block in a fixed order (same result on every run for the same inputs).
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shm) {
  shm[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shm[threadIdx.x] += shm[threadIdx.x + stride];
    __syncthreads();
  }
  const acc_t r = shm[0];
  __syncthreads();
  return r;
}

template <typename scalar_t, typename acc_t>
__global__ void backward_params_kernel(int64_t B, int64_t C, int64_t N, const scalar_t* __restrict__ grad,
                                       const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                                       const acc_t* __restrict__ rstd, bool with_bias, acc_t* __restrict__ partial_w,
                                       acc_t* __restrict__ partial_b) {
  __shared__ acc_t shm[kThreads];
  const int64_t chunks = gridDim.x;
  const int64_t total = B * N;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    acc_t sw = acc_t(0), sb = acc_t(0);
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < total; t += chunks * kThreads) {
      const int64_t b = t / N, p = t % N;
      const int64_t i = (b * C + c) * N + p;
      const acc_t g = to_acc(grad[i]);
      const acc_t sub = with_bias ? mean[t] : acc_t(0);
      sw += g * (to_acc(x[i]) - sub) * rstd[t];
      sb += g;
    }
    sw = block_sum(sw, shm);
    sb = block_sum(sb, shm);
    if (threadIdx.x == 0) {
      partial_w[c * chunks + blockIdx.x] = sw;
      partial_b[c * chunks + blockIdx.x] = sb;
    }
  }
}

int64_t grid_for(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20));
}

template <typename scalar_t>
cudaError_t forward_typed(int64_t B, int64_t C, int64_t N, const void* x, const void* weight, const void* bias,
                          double eps, void* out, void* mean, void* rstd, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (B * N == 0) return cudaSuccess;
  forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(grid_for(B * N)), kThreads, 0, stream>>>(
      B, C, N, static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(weight),
      static_cast<const scalar_t*>(bias), static_cast<acc_t>(eps), static_cast<scalar_t*>(out),
      static_cast<acc_t*>(mean), static_cast<acc_t*>(rstd));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_typed(int64_t B, int64_t C, int64_t N, const void* grad, const void* x, const void* weight,
                           const void* mean, const void* rstd, bool with_bias, void* grad_x, void* partial_w,
                           void* partial_b, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (B * N == 0) return cudaSuccess;
  backward_input_kernel<scalar_t, acc_t><<<static_cast<unsigned>(grid_for(B * N)), kThreads, 0, stream>>>(
      B, C, N, static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(x),
      static_cast<const scalar_t*>(weight), static_cast<const acc_t*>(mean), static_cast<const acc_t*>(rstd),
      with_bias, static_cast<scalar_t*>(grad_x));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(backward_chunks(B, N)), static_cast<unsigned>(std::min<int64_t>(C, 65535)));
  backward_params_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
      B, C, N, static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(x), static_cast<const acc_t*>(mean),
      static_cast<const acc_t*>(rstd), with_bias, static_cast<acc_t*>(partial_w), static_cast<acc_t*>(partial_b));
  return cudaGetLastError();
}

}  // namespace

int64_t backward_chunks(int64_t B, int64_t N) {
  return std::max<int64_t>(1, std::min<int64_t>((B * N + kThreads - 1) / kThreads, kMaxChunks));
}

cudaError_t launch_forward(Dtype dtype, int64_t B, int64_t C, int64_t N, const void* x, const void* weight,
                           const void* bias, double eps, void* out, void* mean, void* rstd, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return forward_typed<float>(B, C, N, x, weight, bias, eps, out, mean, rstd, stream);
    case Dtype::kFloat64: return forward_typed<double>(B, C, N, x, weight, bias, eps, out, mean, rstd, stream);
    case Dtype::kFloat16: return forward_typed<__half>(B, C, N, x, weight, bias, eps, out, mean, rstd, stream);
    case Dtype::kBFloat16:
      return forward_typed<__nv_bfloat16>(B, C, N, x, weight, bias, eps, out, mean, rstd, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(Dtype dtype, int64_t B, int64_t C, int64_t N, const void* grad_out, const void* x,
                            const void* weight, const void* mean, const void* rstd, bool with_bias, void* grad_x,
                            void* partial_w, void* partial_b, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32:
      return backward_typed<float>(B, C, N, grad_out, x, weight, mean, rstd, with_bias, grad_x, partial_w, partial_b,
                                   stream);
    case Dtype::kFloat64:
      return backward_typed<double>(B, C, N, grad_out, x, weight, mean, rstd, with_bias, grad_x, partial_w, partial_b,
                                    stream);
    case Dtype::kFloat16:
      return backward_typed<__half>(B, C, N, grad_out, x, weight, mean, rstd, with_bias, grad_x, partial_w, partial_b,
                                    stream);
    case Dtype::kBFloat16:
      return backward_typed<__nv_bfloat16>(B, C, N, grad_out, x, weight, mean, rstd, with_bias, grad_x, partial_w,
                                           partial_b, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace channel_layernorm_cuda
}  // namespace cpl_fast
