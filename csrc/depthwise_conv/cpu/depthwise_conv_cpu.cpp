// CPU kernels of cpl_fast::depthwise_conv3x3 and cpl_fast::_depthwise_conv3x3_backward.
//
//   out[b, c, i, j] = sum_{p, q < 3} w[c, p, q] x[b, c, i + p - 1, j + q - 1]     (zero outside the map)
//   grad_x[b, c]    = the same convolution of grad_out[b, c] with w[c] rotated by 180 degrees
//   grad_w[c, p, q] = sum_{b, i, j} grad_out[b, c, i, j] x[b, c, i + p - 1, j + q - 1]
//
// The 3x3 depthwise convolution of Restormer's attention (qkv_dwconv) and feed-forward network (dwconv): stride
// 1, padding 1, no bias, on NCHW maps. Every (b, c) plane is computed on its own, so it stays in the first- or
// second-level cache. A plane at least 32 wide goes row by row: each output row from the three input rows it
// touches, its interior one vectorised loop, the border columns written out. A narrower plane, and grad_w at
// every width, is one flat array (rows of 8 or 16 would leave the loops mostly in their remainders): element
// n = i W + j takes its row neighbours at n -+ W and its column neighbours at n -+ 1; the plane is first copied
// into a buffer with a zero row above and below (one memcpy), and the column neighbours that the flat view
// takes from the next or previous row (left of j = 0, right of j = W - 1) are cleared by a bit mask, not a
// multiply, so an infinity or NaN there cannot leak into a column it does not touch. The backward reads
// grad_out and x once per plane and produces grad_x and that plane's share of grad_w together; it runs over
// channels (every batch element of a channel in one task), so grad_w needs no reduction across threads and is
// deterministic. grad_w's float32 partial sums are added in float64 every 2048 terms (a 128x128 map sums 16k
// products per weight and batch element).
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
#include <cstring>
#include <type_traits>
#include <vector>

#include "../depthwise_conv_checks.h"
#include "../../simd_clones.h"

namespace cpl_fast {
namespace {

template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

// value where mask is all ones, +0 where it is zero (helpers force-inlined: GCC does not inline ordinary
// functions into the target_clones versions of the loops).
template <typename T>
__attribute__((always_inline)) inline T keep(T value, Bits<T> mask) {
  Bits<T> bits;
  std::memcpy(&bits, &value, sizeof(T));
  bits &= mask;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// out[n] for one plane. mid: the plane inside a buffer with zero rows (W elements and one more) on both sides;
// left/right: all ones where column j - 1 / j + 1 exists (j > 0 / j < W - 1).
template <typename T>
__attribute__((always_inline)) inline void conv_flat_body(const T* __restrict__ mid, const Bits<T>* __restrict__ left,
                                                          const Bits<T>* __restrict__ right, const T* w,
                                                          T* __restrict__ out, int64_t HW, int64_t W) {
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
  const T* up = mid - W;
  const T* down = mid + W;
#pragma omp simd
  for (int64_t n = 0; n < HW; ++n) {
    const T l = w0 * up[n - 1] + w3 * mid[n - 1] + w6 * down[n - 1];
    const T c = w1 * up[n] + w4 * mid[n] + w7 * down[n];
    const T r = w2 * up[n + 1] + w5 * mid[n + 1] + w8 * down[n + 1];
    out[n] = keep(l, left[n]) + c + keep(r, right[n]);
  }
}

constexpr int64_t kBlock = 2048;  // grad_w's float32 partial sums are added into float64 every this many terms

// grad_w's nine sums for one plane, added to sums[3 p + q]: sum_n g[n] x[n + (p - 1) W + q - 1], the q = 0 / 2
// products masked where the column does not exist. x: padded as in conv_flat_body.
template <typename T>
__attribute__((always_inline)) inline void wgrad_flat_body(const T* __restrict__ g, const T* __restrict__ x,
                                                           const Bits<T>* __restrict__ left,
                                                           const Bits<T>* __restrict__ right, int64_t HW, int64_t W,
                                                           double* sums) {
  for (int64_t p = 0; p < 3; ++p) {
    const T* xr = x + (p - 1) * W;
    for (int64_t start = 0; start < HW; start += kBlock) {
      const int64_t stop = std::min(HW, start + kBlock);
      T s0 = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s0, s1, s2)
      for (int64_t n = start; n < stop; ++n) {
        const T gn = g[n];
        s0 += keep(gn * xr[n - 1], left[n]);
        s1 += gn * xr[n];
        s2 += keep(gn * xr[n + 1], right[n]);
      }
      sums[3 * p] += static_cast<double>(s0);
      sums[3 * p + 1] += static_cast<double>(s1);
      sums[3 * p + 2] += static_cast<double>(s2);
    }
  }
}

CPL_FAST_SIMD_CLONES
void conv_flat_f32(const float* mid, const uint32_t* left, const uint32_t* right, const float* w, float* out,
                   int64_t HW, int64_t W) {
  conv_flat_body(mid, left, right, w, out, HW, W);
}
void conv_flat(const float* mid, const uint32_t* left, const uint32_t* right, const float* w, float* out,
               int64_t HW, int64_t W) {
  conv_flat_f32(mid, left, right, w, out, HW, W);
}
void conv_flat(const double* mid, const uint64_t* left, const uint64_t* right, const double* w, double* out,
               int64_t HW, int64_t W) {
  conv_flat_body(mid, left, right, w, out, HW, W);
}

CPL_FAST_SIMD_CLONES
void wgrad_flat_f32(const float* g, const float* x, const uint32_t* left, const uint32_t* right, int64_t HW,
                    int64_t W, double* sums) {
  wgrad_flat_body(g, x, left, right, HW, W, sums);
}
void wgrad_flat(const float* g, const float* x, const uint32_t* left, const uint32_t* right, int64_t HW, int64_t W,
                double* sums) {
  wgrad_flat_f32(g, x, left, right, HW, W, sums);
}
void wgrad_flat(const double* g, const double* x, const uint64_t* left, const uint64_t* right, int64_t HW,
                int64_t W, double* sums) {
  wgrad_flat_body(g, x, left, right, HW, W, sums);
}

// Planes at least this wide are computed row by row (no masks to read; rows long enough to vectorise).
constexpr int64_t kRowWidth = 32;

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
__attribute__((always_inline)) inline void conv_rows_body(const T* x, const T* w, T* out, int64_t H, int64_t W,
                                                           const T* zero) {
  for (int64_t i = 0; i < H; ++i) {
    const T* up = i > 0 ? x + (i - 1) * W : zero;
    const T* down = i + 1 < H ? x + (i + 1) * W : zero;
    conv_row(up, x + i * W, down, w, out + i * W, W);
  }
}

CPL_FAST_SIMD_CLONES
void conv_rows_f32(const float* x, const float* w, float* out, int64_t H, int64_t W, const float* zero) {
  conv_rows_body(x, w, out, H, W, zero);
}
void conv_rows(const float* x, const float* w, float* out, int64_t H, int64_t W, const float* zero) {
  conv_rows_f32(x, w, out, H, W, zero);
}
void conv_rows(const double* x, const double* w, double* out, int64_t H, int64_t W, const double* zero) {
  conv_rows_body(x, w, out, H, W, zero);
}

// The column masks of an H x W plane, shared by every plane of a call.
template <typename T>
struct ColumnMasks {
  std::vector<Bits<T>> left, right;
  ColumnMasks(int64_t H, int64_t W) : left(H * W), right(H * W) {
    for (int64_t n = 0; n < H * W; ++n) {
      const int64_t j = n % W;
      left[n] = j > 0 ? ~Bits<T>(0) : Bits<T>(0);
      right[n] = j + 1 < W ? ~Bits<T>(0) : Bits<T>(0);
    }
  }
};

// A plane with a zero row (and one element more) on each side; only the plane's own span is ever rewritten.
template <typename T>
struct PaddedPlane {
  std::vector<T> buf;
  int64_t HW, W;
  PaddedPlane(int64_t H, int64_t W_) : buf((H + 2) * W_ + 2, T(0)), HW(H * W_), W(W_) {}
  const T* load(const T* plane) {
    std::memcpy(buf.data() + 1 + W, plane, HW * sizeof(T));
    return buf.data() + 1 + W;
  }
};

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
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv3x3_cpu", [&] {
      const scalar_t* x_p = x.const_data_ptr<scalar_t>();
      const scalar_t* w_p = weight.const_data_ptr<scalar_t>();
      scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
      if (W >= kRowWidth) {
        const std::vector<scalar_t> zero(W, scalar_t(0));
        at::parallel_for(0, B * C, plane_grain(HW), [&](int64_t begin, int64_t end) {
          for (int64_t plane = begin; plane < end; ++plane)
            conv_rows(x_p + plane * HW, w_p + (plane % C) * 9, o_p + plane * HW, H, W, zero.data());
        });
        return;
      }
      const ColumnMasks<scalar_t> masks(H, W);
      at::parallel_for(0, B * C, plane_grain(HW), [&](int64_t begin, int64_t end) {
        PaddedPlane<scalar_t> pad(H, W);
        for (int64_t plane = begin; plane < end; ++plane) {
          conv_flat(pad.load(x_p + plane * HW), masks.left.data(), masks.right.data(), w_p + (plane % C) * 9,
                    o_p + plane * HW, HW, W);
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
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv3x3_backward_cpu", [&] {
      const scalar_t* x_p = x.const_data_ptr<scalar_t>();
      const scalar_t* w_p = weight.const_data_ptr<scalar_t>();
      const scalar_t* g_p = grad.const_data_ptr<scalar_t>();
      scalar_t* gx_p = grad_x.mutable_data_ptr<scalar_t>();
      scalar_t* gw_p = grad_w.mutable_data_ptr<scalar_t>();
      const bool rows = W >= kRowWidth;
      const ColumnMasks<scalar_t> masks(H, W);
      const std::vector<scalar_t> zero(W, scalar_t(0));
      at::parallel_for(0, C, plane_grain(B * HW), [&](int64_t begin, int64_t end) {
        PaddedPlane<scalar_t> pad_g(rows ? 0 : H, W), pad_x(H, W);
        for (int64_t c = begin; c < end; ++c) {
          std::array<scalar_t, 9> flipped;
          for (int k = 0; k < 9; ++k) flipped[k] = w_p[c * 9 + 8 - k];
          std::array<double, 9> sums{};
          for (int64_t b = 0; b < B; ++b) {
            const int64_t offset = (b * C + c) * HW;
            if (rows) {
              conv_rows(g_p + offset, flipped.data(), gx_p + offset, H, W, zero.data());
            } else {
              conv_flat(pad_g.load(g_p + offset), masks.left.data(), masks.right.data(), flipped.data(),
                        gx_p + offset, HW, W);
            }
            wgrad_flat(g_p + offset, pad_x.load(x_p + offset), masks.left.data(), masks.right.data(), HW, W,
                       sums.data());
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
