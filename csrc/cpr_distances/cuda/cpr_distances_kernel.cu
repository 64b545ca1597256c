// CUDA kernels of cpr_distances (see cpr_distances_cuda.h for what each launcher computes).
//
// Forward, pass 1: one block per (sample, chunk of kForwardChunk elements, group of up to kMaxGroup
// negatives). Each thread reads its elements of f_pos once, compares them with f_gt and with the group's
// negatives, and the block reduces its per-thread sums in a fixed tree (warp shuffles, then one warp).
// Pass 2: one block per sample sums the chunk partials in chunk order and applies the weights.
// With m <= kMaxGroup (the usual m = 4) f_pos is read once. No atomics anywhere: results are reproducible.
// Backward: elementwise, one pass writing all three gradients.
#include "cpr_distances_cuda.h"

namespace cpl_fast {
namespace cpr {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 8;            // negatives handled by one forward block
constexpr int kBackwardPerThread = 4;   // elements per thread in the backward

template <typename T>
struct Convert;
template <>
struct Convert<float> {
  __device__ static float to(float x) { return x; }
  __device__ static float from(float x) { return x; }
};
template <>
struct Convert<double> {
  __device__ static double to(double x) { return x; }
  __device__ static double from(double x) { return x; }
};
template <>
struct Convert<__half> {
  __device__ static float to(__half x) { return __half2float(x); }
  __device__ static __half from(float x) { return __float2half(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ static float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16(x); }
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Block-wide sums of VALUES per-thread accumulators; thread 0 returns them in `acc`. Fixed order.
template <typename acc_t, int VALUES>
__device__ void block_sums(acc_t (&acc)[VALUES]) {
  __shared__ acc_t shared[VALUES][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int v = 0; v < VALUES; ++v) {
    acc[v] = warp_sum(acc[v]);
    if (lane == 0) shared[v][warp] = acc[v];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int v = 0; v < VALUES; ++v) {
      acc[v] = warp_sum(lane < kWarps ? shared[v][lane] : acc_t(0));
    }
  }
}

// partials[(b * chunks + chunk) * (1 + m) + j]: j = 0 the f_gt term, j = 1 + t negative t.
template <typename scalar_t, typename acc_t, int GROUP>
__global__ void __launch_bounds__(kThreads) forward_partials_kernel(const scalar_t* __restrict__ f_pos,
                                                                    const scalar_t* __restrict__ f_gt,
                                                                    const scalar_t* __restrict__ f_neg,
                                                                    Layout layout, int64_t chunks,
                                                                    acc_t* __restrict__ partials) {
  const int64_t b = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t m = layout.negatives, n = layout.per_sample;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * GROUP;
  const int count = static_cast<int>(m - t0 < GROUP ? m - t0 : GROUP);
  const int64_t start = chunk * kForwardChunk;
  const int64_t end = start + kForwardChunk < n ? start + kForwardChunk : n;
  const scalar_t* pos = f_pos + b * layout.stride_pos_b;
  const scalar_t* gt = f_gt + b * layout.stride_gt_b;
  const scalar_t* neg = f_neg + t0 * layout.stride_neg_t + b * layout.stride_neg_b;

  acc_t acc[1 + GROUP];
#pragma unroll
  for (int v = 0; v <= GROUP; ++v) acc[v] = acc_t(0);
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    const acc_t p = Convert<scalar_t>::to(pos[i]);
    if (blockIdx.y == 0) {
      const acc_t d = p - static_cast<acc_t>(Convert<scalar_t>::to(gt[i]));
      acc[0] += d * d;
    }
#pragma unroll
    for (int j = 0; j < GROUP; ++j) {
      if (j < count) {
        const acc_t d = static_cast<acc_t>(Convert<scalar_t>::to(neg[j * layout.stride_neg_t + i])) - p;
        acc[1 + j] += d * d;
      }
    }
  }
  block_sums(acc);
  if (threadIdx.x == 0) {
    acc_t* out = partials + (b * chunks + chunk) * (1 + m);
    if (blockIdx.y == 0) out[0] = acc[0];
#pragma unroll
    for (int j = 0; j < GROUP; ++j) {
      if (j < count) out[1 + t0 + j] = acc[1 + j];
    }
  }
}

// One block per sample: sum the chunk partials in chunk order, then weight and average.
template <typename scalar_t, typename acc_t>
__global__ void forward_finish_kernel(const acc_t* __restrict__ partials, const acc_t* __restrict__ weights,
                                      Layout layout, int64_t chunks, scalar_t* __restrict__ l_pos,
                                      scalar_t* __restrict__ l_neg) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* sums = reinterpret_cast<acc_t*>(shared_bytes);
  const int64_t b = blockIdx.x, m = layout.negatives;
  const acc_t n = static_cast<acc_t>(layout.per_sample);
  for (int64_t j = threadIdx.x; j <= m; j += blockDim.x) {
    acc_t total = acc_t(0);
    for (int64_t c = 0; c < chunks; ++c) total += partials[(b * chunks + c) * (1 + m) + j];
    sums[j] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t weighted = acc_t(0);
    for (int64_t t = 0; t < m; ++t) weighted += weights[b * m + t] * (sums[1 + t] / n);
    l_pos[b] = Convert<scalar_t>::from(sums[0] / n);
    l_neg[b] = Convert<scalar_t>::from(weighted / static_cast<acc_t>(m));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(const scalar_t* __restrict__ f_pos,
                                                            const scalar_t* __restrict__ f_gt,
                                                            const scalar_t* __restrict__ f_neg,
                                                            const acc_t* __restrict__ c_pos,
                                                            const acc_t* __restrict__ c_neg, Layout layout,
                                                            int64_t blocks_per_sample,
                                                            scalar_t* __restrict__ grad_pos,
                                                            scalar_t* __restrict__ grad_gt,
                                                            scalar_t* __restrict__ grad_neg) {
  const int64_t b = blockIdx.x / blocks_per_sample, block = blockIdx.x % blocks_per_sample;
  const int64_t m = layout.negatives, n = layout.per_sample, batch = layout.batch;
  const acc_t cp = c_pos[b];
  const scalar_t* pos = f_pos + b * layout.stride_pos_b;
  const scalar_t* gt = f_gt + b * layout.stride_gt_b;
  const scalar_t* neg = f_neg + b * layout.stride_neg_b;
#pragma unroll
  for (int k = 0; k < kBackwardPerThread; ++k) {
    const int64_t i = (block * kBackwardPerThread + k) * kThreads + threadIdx.x;
    if (i >= n) break;
    const acc_t p = Convert<scalar_t>::to(pos[i]);
    acc_t gp = cp * (p - static_cast<acc_t>(Convert<scalar_t>::to(gt[i])));
    grad_gt[b * n + i] = Convert<scalar_t>::from(-gp);
    for (int64_t t = 0; t < m; ++t) {
      const acc_t gn = c_neg[b * m + t] * (static_cast<acc_t>(Convert<scalar_t>::to(neg[t * layout.stride_neg_t + i])) - p);
      grad_neg[(t * batch + b) * n + i] = Convert<scalar_t>::from(gn);
      gp -= gn;
    }
    grad_pos[b * n + i] = Convert<scalar_t>::from(gp);
  }
}

template <typename scalar_t, typename acc_t, int GROUP>
void launch_partials(const scalar_t* f_pos, const scalar_t* f_gt, const scalar_t* f_neg, const Layout& layout,
                     int64_t chunks, acc_t* partials, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(layout.batch * chunks),
                  static_cast<unsigned>((layout.negatives + GROUP - 1) / GROUP));
  forward_partials_kernel<scalar_t, acc_t, GROUP>
      <<<grid, kThreads, 0, stream>>>(f_pos, f_gt, f_neg, layout, chunks, partials);
}

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t launch_cpr_distances_forward(const scalar_t* f_pos, const scalar_t* f_gt, const scalar_t* f_neg,
                                         const acc_t* weights, const Layout& layout, acc_t* partials,
                                         scalar_t* l_pos, scalar_t* l_neg, cudaStream_t stream) {
  if (layout.batch == 0) return cudaSuccess;
  const int64_t chunks = (layout.per_sample + kForwardChunk - 1) / kForwardChunk;
  if (layout.batch * chunks > 0x7fffffff || (layout.negatives + kMaxGroup - 1) / kMaxGroup > 65535)
    return cudaErrorInvalidConfiguration;
  // The smallest group that holds every negative (up to kMaxGroup): fewer registers for small m.
  if (layout.negatives <= 1) {
    launch_partials<scalar_t, acc_t, 1>(f_pos, f_gt, f_neg, layout, chunks, partials, stream);
  } else if (layout.negatives <= 2) {
    launch_partials<scalar_t, acc_t, 2>(f_pos, f_gt, f_neg, layout, chunks, partials, stream);
  } else if (layout.negatives <= 4) {
    launch_partials<scalar_t, acc_t, 4>(f_pos, f_gt, f_neg, layout, chunks, partials, stream);
  } else {
    launch_partials<scalar_t, acc_t, kMaxGroup>(f_pos, f_gt, f_neg, layout, chunks, partials, stream);
  }
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const size_t shared = static_cast<size_t>(1 + layout.negatives) * sizeof(acc_t);
  forward_finish_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(layout.batch), 64, shared, stream>>>(partials, weights, layout, chunks, l_pos, l_neg);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_cpr_distances_backward(const scalar_t* f_pos, const scalar_t* f_gt, const scalar_t* f_neg,
                                          const acc_t* c_pos, const acc_t* c_neg, const Layout& layout,
                                          scalar_t* grad_pos, scalar_t* grad_gt, scalar_t* grad_neg,
                                          cudaStream_t stream) {
  if (layout.batch == 0) return cudaSuccess;
  const int64_t per_block = static_cast<int64_t>(kThreads) * kBackwardPerThread;
  const int64_t blocks_per_sample = (layout.per_sample + per_block - 1) / per_block;
  if (layout.batch * blocks_per_sample > 0x7fffffff) return cudaErrorInvalidConfiguration;
  backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(layout.batch * blocks_per_sample), kThreads, 0, stream>>>(
      f_pos, f_gt, f_neg, c_pos, c_neg, layout, blocks_per_sample, grad_pos, grad_gt, grad_neg);
  return cudaGetLastError();
}

#define CPL_FAST_INSTANTIATE_CPR(scalar_t, acc_t)                                                                 \
  template cudaError_t launch_cpr_distances_forward<scalar_t, acc_t>(                                             \
      const scalar_t*, const scalar_t*, const scalar_t*, const acc_t*, const Layout&, acc_t*, scalar_t*, scalar_t*, \
      cudaStream_t);                                                                                              \
  template cudaError_t launch_cpr_distances_backward<scalar_t, acc_t>(                                            \
      const scalar_t*, const scalar_t*, const scalar_t*, const acc_t*, const acc_t*, const Layout&, scalar_t*,     \
      scalar_t*, scalar_t*, cudaStream_t);

CPL_FAST_INSTANTIATE_CPR(float, float)
CPL_FAST_INSTANTIATE_CPR(double, double)
CPL_FAST_INSTANTIATE_CPR(__half, float)
CPL_FAST_INSTANTIATE_CPR(__nv_bfloat16, float)

#undef CPL_FAST_INSTANTIATE_CPR

}  // namespace cuda
}  // namespace cpr
}  // namespace cpl_fast
