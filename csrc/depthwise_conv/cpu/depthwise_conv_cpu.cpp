// CPU kernels of cpl_fast::depthwise_conv3x3 and cpl_fast::_depthwise_conv3x3_backward.
//
//   out[b, c, i, j] = sum_{p, q < 3} w[c, p, q] x[b, c, i + p - 1, j + q - 1]     (zero outside the map)
//   grad_x[b, c]    = the same convolution of grad_out[b, c] with w[c] rotated by 180 degrees
//   grad_w[c, p, q] = sum_{b, i, j} grad_out[b, c, i, j] x[b, c, i + p - 1, j + q - 1]
//
// The 3x3 depthwise convolution of Restormer's attention (qkv_dwconv) and feed-forward network (dwconv): stride
// 1, padding 1, no bias, on NCHW maps. Every (b, c) plane is computed on its own, row by row, from the three
// input rows it touches, so a plane is read once and stays in the first-level cache; the row interior (every
// column but the first and last) is one unit-stride loop that the compiler vectorises, the two border columns
// are written out. The backward reads grad_out and x once per plane and produces grad_x and that plane's share
// of grad_w together; it runs over channels (every batch element of a channel in one task), so grad_w needs
// no reduction across threads and is deterministic. grad_w's float32 partial sums are added in float64 every
// 2048 terms (a 128x128 map sums 16k products per weight and batch element).
//
// float32 loops are compiled for AVX-512, AVX2 and the baseline x86-64, chosen at load time; float64 is the
// same code in double; bfloat16 is widened to float32 and the results rounded back.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "../depthwise_conv_checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CPL_FAST_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CPL_FAST_SIMD_CLONES
#endif

namespace cpl_fast {
namespace {

// One output row from the three input rows above, at and below it (`up`/`down` point at a zero row on the
// border). Force-inlined so that each target_clones version of the callers gets its own vector code.
template <typename T>
__attribute__((always_inline)) inline void conv_row(const T* __restrict__ up, const T* __restrict__ mid,
                                                    const T* __restrict__ down, const T* w, T* __restrict__ out,
                                                    int64_t W) {
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
  if (W == 1) {
    out[0] = w1 * up[0] + w4 * mid[0] + w7 * down[0];
    return;
  }
  out[0] = (w1 * up[0] + w2 * up[1]) + (w4 * mid[0] + w5 * mid[1]) + (w7 * down[0] + w8 * down[1]);
#pragma omp simd
  for (int64_t j = 1; j < W - 1; ++j) {
    out[j] = (w0 * up[j - 1] + w1 * up[j] + w2 * up[j + 1]) + (w3 * mid[j - 1] + w4 * mid[j] + w5 * mid[j + 1]) +
             (w6 * down[j - 1] + w7 * down[j] + w8 * down[j + 1]);
  }
  const int64_t e = W - 1;
  out[e] = (w0 * up[e - 1] + w1 * up[e]) + (w3 * mid[e - 1] + w4 * mid[e]) + (w6 * down[e - 1] + w7 * down[e]);
}

template <typename T>
__attribute__((always_inline)) inline void conv_plane_body(const T* x, const T* w, T* out, int64_t H, int64_t W,
                                                           const T* zero) {
  for (int64_t i = 0; i < H; ++i) {
    const T* up = i > 0 ? x + (i - 1) * W : zero;
    const T* down = i + 1 < H ? x + (i + 1) * W : zero;
    conv_row(up, x + i * W, down, w, out + i * W, W);
  }
}

constexpr int64_t kBlock = 2048;  // grad_w's float32 partial sums are added into float64 every this many terms

// grad_w's nine sums for one plane, added to sums[3 p + q]. With the plane read as one flat array of H W
// elements, the tap (p, q) pairs grad element n with input element n + (p - 1) W + (q - 1): one long
// unit-stride product per row shift p (three column shifts at once), whatever the plane's width, instead of
// H short rows. Taken flat, the first and last columns also pair with the neighbouring row's far column
// (q = 0 at j = 0, q = 2 at j = W - 1); those H terms per shift are subtracted after.
template <typename T>
__attribute__((always_inline)) inline void wgrad_plane_body(const T* __restrict__ g, const T* __restrict__ x,
                                                            int64_t H, int64_t W, double* sums) {
  const int64_t n_all = H * W;
  for (int64_t p = 0; p < 3; ++p) {
    const int64_t shift = (p - 1) * W;
    // [lo, hi): every n whose three partners n + shift - 1 .. n + shift + 1 lie in the plane.
    const int64_t lo = std::min(n_all, std::max<int64_t>(0, 1 - shift));
    const int64_t hi = std::max(lo, std::min(n_all, n_all - shift - 1));
    double a[3] = {0.0, 0.0, 0.0};
    for (int64_t start = lo; start < hi; start += kBlock) {
      const int64_t stop = std::min(hi, start + kBlock);
      T s0 = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s0, s1, s2)
      for (int64_t n = start; n < stop; ++n) {
        const T gn = g[n];
        s0 += gn * x[n + shift - 1];
        s1 += gn * x[n + shift];
        s2 += gn * x[n + shift + 1];
      }
      a[0] += static_cast<double>(s0);
      a[1] += static_cast<double>(s1);
      a[2] += static_cast<double>(s2);
    }
    const auto tail = [&](int64_t n) {
      for (int64_t q = 0; q < 3; ++q) {
        const int64_t m = n + shift + q - 1;
        if (m >= 0 && m < n_all) a[q] += static_cast<double>(g[n]) * static_cast<double>(x[m]);
      }
    };
    for (int64_t n = 0; n < lo; ++n) tail(n);
    for (int64_t n = hi; n < n_all; ++n) tail(n);
    if (W == 1) {
      a[0] = a[2] = 0.0;  // every column is a border column: only the centre column of the kernel acts
    } else {
      for (int64_t i = 0; i < H; ++i) {
        const int64_t first = i * W, last = i * W + W - 1;
        if (first + shift - 1 >= 0 && first + shift - 1 < n_all)
          a[0] -= static_cast<double>(g[first]) * static_cast<double>(x[first + shift - 1]);
        if (last + shift + 1 >= 0 && last + shift + 1 < n_all)
          a[2] -= static_cast<double>(g[last]) * static_cast<double>(x[last + shift + 1]);
      }
    }
    for (int64_t q = 0; q < 3; ++q) sums[3 * p + q] += a[q];
  }
}

CPL_FAST_SIMD_CLONES
void conv_plane_f32(const float* x, const float* w, float* out, int64_t H, int64_t W, const float* zero) {
  conv_plane_body(x, w, out, H, W, zero);
}
void conv_plane(const float* x, const float* w, float* out, int64_t H, int64_t W, const float* zero) {
  conv_plane_f32(x, w, out, H, W, zero);
}
void conv_plane(const double* x, const double* w, double* out, int64_t H, int64_t W, const double* zero) {
  conv_plane_body(x, w, out, H, W, zero);
}

CPL_FAST_SIMD_CLONES
void wgrad_plane_f32(const float* g, const float* x, int64_t H, int64_t W, double* sums) {
  wgrad_plane_body(g, x, H, W, sums);
}
void wgrad_plane(const float* g, const float* x, int64_t H, int64_t W, double* sums) {
  wgrad_plane_f32(g, x, H, W, sums);
}
void wgrad_plane(const double* g, const double* x, int64_t H, int64_t W, double* sums) {
  wgrad_plane_body(g, x, H, W, sums);
}

// Small planes (width below kRowWidth) go through a zero-padded copy of (H + 2) x (W + 2): tap (p, q) of padded
// element m is element m + (p - 1)(W + 2) + (q - 1), so the whole plane is one long unit-stride loop with no
// border cases (rows of 8 or 16 would leave the vector loops mostly in their remainders). The loop also
// computes the padding columns, which are dropped when the rows are copied out.
constexpr int64_t kRowWidth = 32;

template <typename T>
__attribute__((always_inline)) inline void pad_plane(const T* src, int64_t H, int64_t W, T* pad) {
  const int64_t P = W + 2;
  for (int64_t i = 0; i < H; ++i) std::copy(src + i * W, src + i * W + W, pad + (i + 1) * P + 1);
}

// out_pad[m] for the interior rows; pad must hold zeros outside the copied plane.
template <typename T>
__attribute__((always_inline)) inline void conv_padded_body(const T* __restrict__ pad, const T* w,
                                                            T* __restrict__ out_pad, int64_t H, int64_t W) {
  const int64_t P = W + 2;
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
  const T* up = pad - P;
  const T* down = pad + P;
#pragma omp simd
  for (int64_t m = P + 1; m < (H + 1) * P - 1; ++m) {
    out_pad[m] = (w0 * up[m - 1] + w1 * up[m] + w2 * up[m + 1]) + (w3 * pad[m - 1] + w4 * pad[m] + w5 * pad[m + 1]) +
                 (w6 * down[m - 1] + w7 * down[m] + w8 * down[m + 1]);
  }
}

// grad_w's nine sums from padded grad and input planes (the grad's padding, zero, cancels every product with
// a padding element of the input's frame, so no border terms are needed).
template <typename T>
__attribute__((always_inline)) inline void wgrad_padded_body(const T* __restrict__ gpad, const T* __restrict__ xpad,
                                                             int64_t H, int64_t W, double* sums) {
  const int64_t P = W + 2;
  for (int64_t p = 0; p < 3; ++p) {
    const T* xr = xpad + (p - 1) * P;
    double a[3] = {0.0, 0.0, 0.0};
    for (int64_t start = P + 1; start < (H + 1) * P - 1; start += kBlock) {
      const int64_t stop = std::min((H + 1) * P - 1, start + kBlock);
      T s0 = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s0, s1, s2)
      for (int64_t m = start; m < stop; ++m) {
        const T gm = gpad[m];
        s0 += gm * xr[m - 1];
        s1 += gm * xr[m];
        s2 += gm * xr[m + 1];
      }
      a[0] += static_cast<double>(s0);
      a[1] += static_cast<double>(s1);
      a[2] += static_cast<double>(s2);
    }
    for (int64_t q = 0; q < 3; ++q) sums[3 * p + q] += a[q];
  }
}

CPL_FAST_SIMD_CLONES
void conv_padded_f32(const float* pad, const float* w, float* out_pad, int64_t H, int64_t W) {
  conv_padded_body(pad, w, out_pad, H, W);
}
void conv_padded(const float* pad, const float* w, float* out_pad, int64_t H, int64_t W) {
  conv_padded_f32(pad, w, out_pad, H, W);
}
void conv_padded(const double* pad, const double* w, double* out_pad, int64_t H, int64_t W) {
  conv_padded_body(pad, w, out_pad, H, W);
}
CPL_FAST_SIMD_CLONES
void wgrad_padded_f32(const float* gpad, const float* xpad, int64_t H, int64_t W, double* sums) {
  wgrad_padded_body(gpad, xpad, H, W, sums);
}
void wgrad_padded(const float* gpad, const float* xpad, int64_t H, int64_t W, double* sums) {
  wgrad_padded_f32(gpad, xpad, H, W, sums);
}
void wgrad_padded(const double* gpad, const double* xpad, int64_t H, int64_t W, double* sums) {
  wgrad_padded_body(gpad, xpad, H, W, sums);
}

// Per-task scratch of three padded planes (input, grad, output), zeroed once: the copies only ever write the
// interior, and the output's padding columns are never read.
template <typename T>
struct PaddedScratch {
  std::vector<T> x, g, out;
  PaddedScratch(int64_t H, int64_t W) : x((H + 2) * (W + 2), T(0)), g(x.size(), T(0)), out(x.size(), T(0)) {}
};

template <typename T>
void copy_out(const T* out_pad, int64_t H, int64_t W, T* dst) {
  const int64_t P = W + 2;
  for (int64_t i = 0; i < H; ++i) std::copy(out_pad + (i + 1) * P + 1, out_pad + (i + 1) * P + 1 + W, dst + i * W);
}

// Planes per task: about 16k elements, at least one plane.
int64_t plane_grain(int64_t plane) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1)); }

// bfloat16 is computed in float32: widened here, rounded back by the callers.
at::Tensor compute_tensor(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return c.scalar_type() == at::kBFloat16 ? c.to(at::kFloat) : c;
}

at::Tensor depthwise_conv3x3_cpu(const at::Tensor& x_in, const at::Tensor& weight_in) {
  check_depthwise_conv3x3_input(x_in, weight_in);
  const at::Tensor x = compute_tensor(x_in), weight = compute_tensor(weight_in);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv3x3_cpu", [&] {
      const scalar_t* x_p = x.const_data_ptr<scalar_t>();
      const scalar_t* w_p = weight.const_data_ptr<scalar_t>();
      scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
      const std::vector<scalar_t> zero(W, scalar_t(0));
      at::parallel_for(0, B * C, plane_grain(H * W), [&](int64_t begin, int64_t end) {
        if (W >= kRowWidth) {
          for (int64_t plane = begin; plane < end; ++plane)
            conv_plane(x_p + plane * H * W, w_p + (plane % C) * 9, o_p + plane * H * W, H, W, zero.data());
          return;
        }
        PaddedScratch<scalar_t> scratch(H, W);
        for (int64_t plane = begin; plane < end; ++plane) {
          pad_plane(x_p + plane * H * W, H, W, scratch.x.data());
          conv_padded(scratch.x.data(), w_p + (plane % C) * 9, scratch.out.data(), H, W);
          copy_out(scratch.out.data(), H, W, o_p + plane * H * W);
        }
      });
    });
  }
  return out.scalar_type() == x_in.scalar_type() ? out : out.to(x_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv3x3_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                  const at::Tensor& weight_in) {
  check_depthwise_conv3x3_grad(grad_in, x_in, weight_in);
  const at::Tensor x = compute_tensor(x_in), weight = compute_tensor(weight_in), grad = compute_tensor(grad_in);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w = at::zeros(weight.sizes(), weight.options());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv3x3_backward_cpu", [&] {
      const scalar_t* x_p = x.const_data_ptr<scalar_t>();
      const scalar_t* w_p = weight.const_data_ptr<scalar_t>();
      const scalar_t* g_p = grad.const_data_ptr<scalar_t>();
      scalar_t* gx_p = grad_x.mutable_data_ptr<scalar_t>();
      scalar_t* gw_p = grad_w.mutable_data_ptr<scalar_t>();
      const std::vector<scalar_t> zero(W, scalar_t(0));
      at::parallel_for(0, C, plane_grain(B * H * W), [&](int64_t begin, int64_t end) {
        PaddedScratch<scalar_t> scratch(W >= kRowWidth ? 0 : H, W >= kRowWidth ? 0 : W);
        for (int64_t c = begin; c < end; ++c) {
          std::array<scalar_t, 9> flipped;
          for (int k = 0; k < 9; ++k) flipped[k] = w_p[c * 9 + 8 - k];
          std::array<double, 9> sums{};
          for (int64_t b = 0; b < B; ++b) {
            const int64_t offset = (b * C + c) * H * W;
            if (W >= kRowWidth) {
              conv_plane(g_p + offset, flipped.data(), gx_p + offset, H, W, zero.data());
              wgrad_plane(g_p + offset, x_p + offset, H, W, sums.data());
            } else {
              pad_plane(g_p + offset, H, W, scratch.g.data());
              pad_plane(x_p + offset, H, W, scratch.x.data());
              conv_padded(scratch.g.data(), flipped.data(), scratch.out.data(), H, W);
              copy_out(scratch.out.data(), H, W, gx_p + offset);
              wgrad_padded(scratch.g.data(), scratch.x.data(), H, W, sums.data());
            }
          }
          for (int k = 0; k < 9; ++k) gw_p[c * 9 + k] = static_cast<scalar_t>(sums[k]);
        }
      });
    });
  }
  const auto dtype = x_in.scalar_type();
  return {grad_x.scalar_type() == dtype ? grad_x : grad_x.to(dtype),
          grad_w.scalar_type() == dtype ? grad_w : grad_w.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl_fast, CPU, m) {
  m.impl("depthwise_conv3x3", &depthwise_conv3x3_cpu);
  m.impl("_depthwise_conv3x3_backward", &depthwise_conv3x3_backward_cpu);
}

}  // namespace cpl_fast
