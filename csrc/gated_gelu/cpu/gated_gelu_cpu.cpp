// CPU kernels of cpl_fast::gated_gelu and cpl_fast::_gated_gelu_backward.
//
//   out = gelu(a) * g,   a = x[:, :C], g = x[:, C:],   gelu(a) = a Phi(a) = a (1 + erf(a / sqrt 2)) / 2
//   grad_a = grad * g * (Phi(a) + a phi(a)),   grad_g = grad * gelu(a)
// One pass each way: the forward reads x once and writes out, the backward reads grad and x once and writes
// grad_x (the eager composite writes gelu(a) and, in the backward, grad * g and the two halves separately
// before they are concatenated).
//
// float32 (and bfloat16, computed in float32) uses the erf that PyTorch's vectorised CPU GELU uses
// (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7) with exp(-a^2 / 2) from a Cephes-style polynomial, written
// without branches so that the compiler vectorises it; the same exponential gives phi(a) in the backward.
// The float32 loops are compiled for AVX-512, AVX2 and the baseline x86-64, chosen at load time. float64
// uses std::erf and std::exp (exact to rounding: the float64 tests compare against PyTorch at 1e-12).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../gated_gelu_checks.h"
#include "../../simd_clones.h"

namespace cpl_fast {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

constexpr int32_t kClampBits = 0x4114cccd;  // the bits of 9.3f: erf(9.3 / sqrt 2) is 1 in float32

// The helpers below are written without float comparisons or branches (GCC will not if-convert a float
// compare under the default -ftrapping-math, and then vectorises nothing) and are force-inlined (GCC does not
// inline ordinary functions into the target_clones versions of the loops).

// exp(x) for -86.5 <= x <= 0: 2^n * p(r), r = x - n ln 2, |r| <= ln 2 / 2 (Cephes' expf), relative error
// about 1e-7; n >= -125, so 2^n is built as a normal float from its exponent bits.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  const float v = x * 1.44269504088896341f;
  const int32_t n = -static_cast<int32_t>(0.5f - v);  // round to nearest for v <= 0
  const float nf = static_cast<float>(n);
  float r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// Phi(a) = (1 + erf(a / sqrt 2)) / 2 and, in *density, phi(a) = exp(-a^2 / 2) / sqrt(2 pi).
__attribute__((always_inline)) inline float normal_cdf(float a, float* density) {
  const float z = a * kSqrtHalf;
  // |z| clamped at 9.3 by an integer compare of the bits (non-negative floats order as their bits; a NaN
  // is clamped too, but a * Phi(a) stays NaN).
  float az = __builtin_fabsf(z);
  int32_t az_bits;
  std::memcpy(&az_bits, &az, sizeof(az));
  az_bits = std::min(az_bits, kClampBits);
  std::memcpy(&az, &az_bits, sizeof(az));
  const float t = 1.0f / (1.0f + 0.3275911f * az);
  const float r = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
                   0.254829592f) * t;
  const float e = exp_nonpositive(-az * az);
  const float erf_abs = 1.0f - r * e;
  const float erf_z = __builtin_copysignf(erf_abs, z);
  *density = kInvSqrt2Pi * e;
  return 0.5f * (1.0f + erf_z);
}

CPL_FAST_SIMD_CLONES
void forward_f32(const float* __restrict__ a, const float* __restrict__ g, float* __restrict__ out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float density;
    out[i] = a[i] * normal_cdf(a[i], &density) * g[i];
  }
}

CPL_FAST_SIMD_CLONES
void backward_f32(const float* __restrict__ grad, const float* __restrict__ a, const float* __restrict__ g,
                  float* __restrict__ da, float* __restrict__ dg, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float density;
    const float cdf = normal_cdf(a[i], &density);
    da[i] = grad[i] * g[i] * (cdf + a[i] * density);
    dg[i] = grad[i] * a[i] * cdf;
  }
}

void forward_f64(const double* a, const double* g, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * 0.5 * (1.0 + std::erf(a[i] * M_SQRT1_2)) * g[i];
}

void backward_f64(const double* grad, const double* a, const double* g, double* da, double* dg, int64_t n) {
  constexpr double inv_sqrt_2pi = 0.39894228040143267794;
  for (int64_t i = 0; i < n; ++i) {
    const double cdf = 0.5 * (1.0 + std::erf(a[i] * M_SQRT1_2));
    const double density = inv_sqrt_2pi * std::exp(-0.5 * a[i] * a[i]);
    da[i] = grad[i] * g[i] * (cdf + a[i] * density);
    dg[i] = grad[i] * a[i] * cdf;
  }
}

constexpr int64_t kChunk = 1024;  // bfloat16 is widened to float32 in chunks of this many elements

void forward_run(const float* a, const float* g, float* out, int64_t n) { forward_f32(a, g, out, n); }
void forward_run(const double* a, const double* g, double* out, int64_t n) { forward_f64(a, g, out, n); }
void forward_run(const at::BFloat16* a, const at::BFloat16* g, at::BFloat16* out, int64_t n) {
  float fa[kChunk], fg[kChunk], fo[kChunk];
  for (int64_t s = 0; s < n; s += kChunk) {
    const int64_t len = std::min(kChunk, n - s);
    for (int64_t i = 0; i < len; ++i) {
      fa[i] = static_cast<float>(a[s + i]);
      fg[i] = static_cast<float>(g[s + i]);
    }
    forward_f32(fa, fg, fo, len);
    for (int64_t i = 0; i < len; ++i) out[s + i] = static_cast<at::BFloat16>(fo[i]);
  }
}

void backward_run(const float* gr, const float* a, const float* g, float* da, float* dg, int64_t n) {
  backward_f32(gr, a, g, da, dg, n);
}
void backward_run(const double* gr, const double* a, const double* g, double* da, double* dg, int64_t n) {
  backward_f64(gr, a, g, da, dg, n);
}
void backward_run(const at::BFloat16* gr, const at::BFloat16* a, const at::BFloat16* g, at::BFloat16* da,
                  at::BFloat16* dg, int64_t n) {
  float fgr[kChunk], fa[kChunk], fg[kChunk], fda[kChunk], fdg[kChunk];
  for (int64_t s = 0; s < n; s += kChunk) {
    const int64_t len = std::min(kChunk, n - s);
    for (int64_t i = 0; i < len; ++i) {
      fgr[i] = static_cast<float>(gr[s + i]);
      fa[i] = static_cast<float>(a[s + i]);
      fg[i] = static_cast<float>(g[s + i]);
    }
    backward_f32(fgr, fa, fg, fda, fdg, len);
    for (int64_t i = 0; i < len; ++i) {
      da[s + i] = static_cast<at::BFloat16>(fda[i]);
      dg[s + i] = static_cast<at::BFloat16>(fdg[i]);
    }
  }
}

// Runs fn(row, begin, end) over the half-rows of (B, M): element e of [0, B * M) is (e / M, e % M); a
// parallel range is split at row boundaries so that every call sees unit-stride runs.
template <typename F>
void for_each_run(int64_t B, int64_t M, const F& fn) {
  at::parallel_for(0, B * M, 32768, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t row = begin / M, col = begin % M;
      const int64_t stop = std::min(end - row * M, M);
      fn(row, col, stop);
      begin = row * M + stop;
    }
  });
}

at::Tensor gated_gelu_cpu(const at::Tensor& x_in) {
  check_gated_gelu_input(x_in);
  const at::Tensor x = x_in.contiguous();
  auto sizes = x.sizes().vec();
  sizes[1] /= 2;
  at::Tensor out = at::empty(sizes, x.options());
  const int64_t B = x.size(0), M = out.numel() / std::max<int64_t>(B, 1);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gated_gelu_cpu", [&] {
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
    for_each_run(B, M, [&](int64_t row, int64_t begin, int64_t end) {
      const scalar_t* a = x_p + row * 2 * M;
      const scalar_t* g = a + M;
      scalar_t* o = o_p + row * M;
      forward_run(a + begin, g + begin, o + begin, end - begin);
    });
  });
  return out;
}

at::Tensor gated_gelu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_gated_gelu_grad(grad_in, x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const int64_t B = x.size(0), M = grad.numel() / std::max<int64_t>(B, 1);
  if (grad.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "gated_gelu_backward_cpu", [&] {
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    const scalar_t* g_p = grad.const_data_ptr<scalar_t>();
    scalar_t* d_p = grad_x.mutable_data_ptr<scalar_t>();
    for_each_run(B, M, [&](int64_t row, int64_t begin, int64_t end) {
      const scalar_t* a = x_p + row * 2 * M;
      const scalar_t* g = a + M;
      const scalar_t* gr = g_p + row * M;
      scalar_t* da = d_p + row * 2 * M;
      scalar_t* dg = da + M;
      backward_run(gr + begin, a + begin, g + begin, da + begin, dg + begin, end - begin);
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl_fast, CPU, m) {
  m.impl("gated_gelu", &gated_gelu_cpu);
  m.impl("_gated_gelu_backward", &gated_gelu_backward_cpu);
}

}  // namespace cpl_fast
