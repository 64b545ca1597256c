// CUDA kernels of cpl_fast::prompt_mix (no torch header: nvcc compiles this file on its own).
//
// Forward: one thread per output element; it reads the four source pixels of each of the k
// selected experts (PyTorch's align_corners=False bilinear rule, scale = in / out computed on the
// host in the accumulation type, as PyTorch does).
// Backward, kernel 1: one thread per output pixel and expert spreads w * lambda * grad onto the four
// source pixels with atomicAdd into a float32 (float64 for double) gradient buffer, so grad_bank is
// not bitwise reproducible; every block also reduces its share of <bilinear(bank[idx]), grad_out> and
// writes it to its own slot of `partial`. Kernel 2 sums each sample's slots in a fixed order, so
// grad_weights is deterministic.
// An index outside [0, n) stops the kernel with __trap() (checking on the host would need a device
// synchronisation); the CUDA context is then unusable, as after a failed device assertion.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "prompt_mix_launch.h"
#include "../../cuda_acc.cuh"

namespace cpl_fast {
namespace prompt_mix_cuda {
namespace {

constexpr int kThreads = 256;

using namespace cpl_fast::cuda_acc;  // AccOf, to_acc, from_acc

template <typename acc_t>
struct Source {
  int64_t i0, i1;
  acc_t l0, l1;
};

// PyTorch's compute_source_index_and_lambda (align_corners=False).
template <typename acc_t>
__device__ __forceinline__ Source<acc_t> source_index(int64_t dst, int64_t in, int64_t out, acc_t scale) {
  Source<acc_t> r;
  if (in == out) {
    r.i0 = r.i1 = dst;
    r.l0 = acc_t(1);
    r.l1 = acc_t(0);
    return r;
  }
  acc_t src = scale * (static_cast<acc_t>(dst) + acc_t(0.5)) - acc_t(0.5);
  if (src < acc_t(0)) src = acc_t(0);
  const int64_t lo = min(static_cast<int64_t>(floor(src)), in - 1);
  const acc_t lambda = min(max(src - static_cast<acc_t>(lo), acc_t(0)), acc_t(1));
  r.i0 = lo;
  r.i1 = lo + (lo < in - 1 ? 1 : 0);
  r.l0 = acc_t(1) - lambda;
  r.l1 = lambda;
  return r;
}

__device__ __forceinline__ int64_t checked_index(const int64_t* indices, int64_t t, int64_t n) {
  const int64_t i = indices[t];
  if (i < 0 || i >= n) __trap();
  return i;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(Sizes s, const scalar_t* __restrict__ bank, const int64_t* __restrict__ indices,
                               const scalar_t* __restrict__ weights, scalar_t* __restrict__ out, acc_t scale_y,
                               acc_t scale_x) {
  const int64_t total = s.B * s.C * s.H * s.W;
  const int64_t plane = s.S * s.Sp;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = t % s.W;
    const int64_t y = (t / s.W) % s.H;
    const int64_t c = (t / (s.W * s.H)) % s.C;
    const int64_t b = t / (s.W * s.H * s.C);
    const Source<acc_t> sy = source_index(y, s.S, s.H, scale_y);
    const Source<acc_t> sx = source_index(x, s.Sp, s.W, scale_x);
    acc_t acc = acc_t(0);
    for (int64_t j = 0; j < s.k; ++j) {
      const int64_t i = checked_index(indices, b * s.k + j, s.n);
      const scalar_t* p = bank + (i * s.C + c) * plane;
      const acc_t top = sx.l0 * to_acc(p[sy.i0 * s.Sp + sx.i0]) + sx.l1 * to_acc(p[sy.i0 * s.Sp + sx.i1]);
      const acc_t bottom = sx.l0 * to_acc(p[sy.i1 * s.Sp + sx.i0]) + sx.l1 * to_acc(p[sy.i1 * s.Sp + sx.i1]);
      acc += to_acc(weights[b * s.k + j]) * (sy.l0 * top + sy.l1 * bottom);
    }
    out[t] = from_acc<scalar_t>(acc);
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

// grid: x = pixel chunks of one plane (gx), y = planes (b, c), strided when B * C > gridDim.y.
// partial[((b * k + j) * C + c) * gx + blockIdx.x] = this block's share of <bilinear(bank[idx]), grad>.
template <typename scalar_t, typename acc_t>
__global__ void backward_bank_kernel(Sizes s, const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ bank,
                                     const int64_t* __restrict__ indices, const scalar_t* __restrict__ weights,
                                     acc_t* __restrict__ grad_bank, acc_t* __restrict__ partial, acc_t scale_y,
                                     acc_t scale_x) {
  __shared__ acc_t shm[kThreads];
  const int64_t hw = s.H * s.W;
  const int64_t plane = s.S * s.Sp;
  const int64_t gx = gridDim.x;
  for (int64_t bc = blockIdx.y; bc < s.B * s.C; bc += gridDim.y) {
    const int64_t b = bc / s.C, c = bc % s.C;
    const scalar_t* g_plane = grad_out + bc * hw;
    for (int64_t j = 0; j < s.k; ++j) {
      const int64_t i = checked_index(indices, b * s.k + j, s.n);
      const acc_t wj = to_acc(weights[b * s.k + j]);
      const scalar_t* p = bank + (i * s.C + c) * plane;
      acc_t* gp = grad_bank + (i * s.C + c) * plane;
      acc_t dot = acc_t(0);
      for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < hw; q += gx * kThreads) {
        const Source<acc_t> sy = source_index(q / s.W, s.S, s.H, scale_y);
        const Source<acc_t> sx = source_index(q % s.W, s.Sp, s.W, scale_x);
        const acc_t g = to_acc(g_plane[q]);
        const int64_t o00 = sy.i0 * s.Sp + sx.i0, o01 = sy.i0 * s.Sp + sx.i1;
        const int64_t o10 = sy.i1 * s.Sp + sx.i0, o11 = sy.i1 * s.Sp + sx.i1;
        const acc_t top = sx.l0 * to_acc(p[o00]) + sx.l1 * to_acc(p[o01]);
        const acc_t bottom = sx.l0 * to_acc(p[o10]) + sx.l1 * to_acc(p[o11]);
        dot += g * (sy.l0 * top + sy.l1 * bottom);
        const acc_t wg = wj * g;
        atomicAdd(gp + o00, wg * sy.l0 * sx.l0);
        if (sx.l1 != acc_t(0)) atomicAdd(gp + o01, wg * sy.l0 * sx.l1);
        if (sy.l1 != acc_t(0)) {
          atomicAdd(gp + o10, wg * sy.l1 * sx.l0);
          if (sx.l1 != acc_t(0)) atomicAdd(gp + o11, wg * sy.l1 * sx.l1);
        }
      }
      dot = block_sum(dot, shm);
      if (threadIdx.x == 0) partial[((b * s.k + j) * s.C + c) * gx + blockIdx.x] = dot;
    }
  }
}

// One block per (b, j): grad_weights[b, j] = sum of its C * gx slots of `partial`.
template <typename scalar_t, typename acc_t>
__global__ void backward_weights_kernel(int64_t bk, int64_t slots, const acc_t* __restrict__ partial,
                                        scalar_t* __restrict__ grad_weights) {
  __shared__ acc_t shm[kThreads];
  for (int64_t row = blockIdx.x; row < bk; row += gridDim.x) {
    acc_t sum = acc_t(0);
    for (int64_t q = threadIdx.x; q < slots; q += kThreads) sum += partial[row * slots + q];
    sum = block_sum(sum, shm);
    if (threadIdx.x == 0) grad_weights[row] = from_acc<scalar_t>(sum);
  }
}

int64_t chunks_per_plane(const Sizes& s) {
  const int64_t hw = s.H * s.W;
  return std::max<int64_t>(1, std::min<int64_t>((hw + kThreads - 1) / kThreads, 1024));
}

template <typename scalar_t>
cudaError_t forward_typed(const Sizes& s, const void* bank, const int64_t* indices, const void* weights, void* out,
                          cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t total = s.B * s.C * s.H * s.W;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 30);
  forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      s, static_cast<const scalar_t*>(bank), indices, static_cast<const scalar_t*>(weights),
      static_cast<scalar_t*>(out), static_cast<acc_t>(s.S) / static_cast<acc_t>(s.H),
      static_cast<acc_t>(s.Sp) / static_cast<acc_t>(s.W));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_typed(const Sizes& s, const void* grad_out, const void* bank, const int64_t* indices,
                           const void* weights, void* grad_bank_acc, void* partial, void* grad_weights,
                           cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (s.B * s.k == 0) return cudaSuccess;
  const int64_t gx = chunks_per_plane(s);
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>(s.B * s.C, 65535));
  if (s.C > 0 && s.H * s.W > 0) {
    backward_bank_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0,
                                            stream>>>(
        s, static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(bank), indices,
        static_cast<const scalar_t*>(weights), static_cast<acc_t*>(grad_bank_acc), static_cast<acc_t*>(partial),
        static_cast<acc_t>(s.S) / static_cast<acc_t>(s.H), static_cast<acc_t>(s.Sp) / static_cast<acc_t>(s.W));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t rows = s.B * s.k;
  const int64_t slots = (s.H * s.W > 0) ? s.C * gx : 0;  // an empty output leaves zero slots: grad 0
  backward_weights_kernel<scalar_t, acc_t><<<static_cast<unsigned>(std::min<int64_t>(rows, 65535)), kThreads, 0,
                                             stream>>>(rows, slots, static_cast<const acc_t*>(partial),
                                                       static_cast<scalar_t*>(grad_weights));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_forward(Dtype dtype, const Sizes& s, const void* bank, const int64_t* indices, const void* weights,
                           void* out, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return forward_typed<float>(s, bank, indices, weights, out, stream);
    case Dtype::kFloat64: return forward_typed<double>(s, bank, indices, weights, out, stream);
    case Dtype::kFloat16: return forward_typed<__half>(s, bank, indices, weights, out, stream);
    case Dtype::kBFloat16: return forward_typed<__nv_bfloat16>(s, bank, indices, weights, out, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t backward_partial_elems(const Sizes& s) { return s.B * s.k * s.C * chunks_per_plane(s); }

cudaError_t launch_backward(Dtype dtype, const Sizes& s, const void* grad_out, const void* bank,
                            const int64_t* indices, const void* weights, void* grad_bank_acc, void* partial,
                            void* grad_weights, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32:
      return backward_typed<float>(s, grad_out, bank, indices, weights, grad_bank_acc, partial, grad_weights, stream);
    case Dtype::kFloat64:
      return backward_typed<double>(s, grad_out, bank, indices, weights, grad_bank_acc, partial, grad_weights, stream);
    case Dtype::kFloat16:
      return backward_typed<__half>(s, grad_out, bank, indices, weights, grad_bank_acc, partial, grad_weights, stream);
    case Dtype::kBFloat16:
      return backward_typed<__nv_bfloat16>(s, grad_out, bank, indices, weights, grad_bank_acc, partial, grad_weights,
                                           stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace prompt_mix_cuda
}  // namespace cpl_fast
