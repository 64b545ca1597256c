// CPU kernels of cpl_fast::channel_layernorm and cpl_fast::_channel_layernorm_backward.
//
// x is NCHW, read as (B, C, N) with N = H * W: the statistics of pixel p of sample b are taken over the C
// values x[b, :, p], which lie N elements apart. Instead of transposing to (B, N, C) (what the published
// to_3d / to_4d does, two copies each way), the kernels walk tiles of kTile neighbouring pixels: for a tile,
// every channel's kTile values are contiguous, so each pass over the channels is a run of short unit-stride
// loops that vectorise, and the tile (C x kTile values) stays in cache between the passes:
//   forward:  mean over c; biased variance over c (two-pass, as accurate as PyTorch's); write the output.
//   backward: per pixel s1 = sum_c g w and s2 = sum_c g w n (n: the normalised value), then
//             dx = rstd (g w - a - xhat * s2 / C), with a = s1 / C and xhat = (x - mean) rstd for the
//             with-bias norm, and a = 0 for the bias-free one (x * rstd: its mean is not subtracted, but the
//             variance is still the centred one, hence the same xhat term).
// grad_weight = sum over pixels of g n and grad_bias = sum of g are accumulated per parallel block in a
// fixed order and summed over blocks in block order, so the backward is reproducible run to run (no
// atomics); the split into blocks depends on the thread count.
//
// Inputs are read through .contiguous() (free for the contiguous activations of the model; a strided view
// is copied once). float32 and float64 accumulate in their own type, bfloat16 in float32; mean and rstd are
// returned in the accumulation type.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../channel_layernorm_checks.h"

namespace cpl_fast {
namespace {

constexpr int64_t kTile = 64;  // pixels per tile: 256 contiguous bytes of float32 per channel

int64_t block_count(int64_t range, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (range + grain - 1) / grain));
}

template <typename F>
void parallel_blocks(int64_t range, int64_t blocks, const F& fn) {
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t begin = range * blk / blocks, end = range * (blk + 1) / blocks;
      if (begin < end) fn(begin, end, blk);
    }
  });
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias, double eps,
                    at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(1), N = x.numel() / (B * C);
  const int64_t tiles = (N + kTile - 1) / kTile;
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const scalar_t* w_p = weight.const_data_ptr<scalar_t>();
  const scalar_t* b_p = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
  acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
  acc_t* rstd_p = rstd.mutable_data_ptr<acc_t>();
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  const acc_t eps_a = static_cast<acc_t>(eps);
  const int64_t grain = std::max<int64_t>(1, 32768 / (C * kTile));

  at::parallel_for(0, B * tiles, grain, [&](int64_t begin, int64_t end) {
    acc_t mu[kTile], rs[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, p0 = (task % tiles) * kTile;
      const int64_t len = std::min(kTile, N - p0);
      const scalar_t* xb = x_p + b * C * N + p0;
      scalar_t* ob = o_p + b * C * N + p0;
      std::fill(mu, mu + len, acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = xb + c * N;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) mu[t] += static_cast<acc_t>(row[t]);
      }
      for (int64_t t = 0; t < len; ++t) {
        mu[t] *= inv_c;
        rs[t] = acc_t(0);
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = xb + c * N;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) {
          const acc_t d = static_cast<acc_t>(row[t]) - mu[t];
          rs[t] += d * d;
        }
      }
      for (int64_t t = 0; t < len; ++t) rs[t] = acc_t(1) / std::sqrt(rs[t] * inv_c + eps_a);
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = xb + c * N;
        scalar_t* orow = ob + c * N;
        const acc_t wc = static_cast<acc_t>(w_p[c]);
        if (b_p) {
          const acc_t bc = static_cast<acc_t>(b_p[c]);
#pragma omp simd
          for (int64_t t = 0; t < len; ++t)
            orow[t] = static_cast<scalar_t>((static_cast<acc_t>(row[t]) - mu[t]) * rs[t] * wc + bc);
        } else {
#pragma omp simd
          for (int64_t t = 0; t < len; ++t) orow[t] = static_cast<scalar_t>(static_cast<acc_t>(row[t]) * rs[t] * wc);
        }
      }
      std::copy(mu, mu + len, mean_p + b * N + p0);
      std::copy(rs, rs + len, rstd_p + b * N + p0);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_layernorm_cpu(const at::Tensor& x_in,
                                                                      const at::Tensor& weight_in,
                                                                      const std::optional<at::Tensor>& bias_in,
                                                                      double eps) {
  check_channel_layernorm_inputs(x_in, weight_in, bias_in);
  TORCH_CHECK(eps >= 0, "channel_layernorm: eps must be >= 0, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous())
                                                             : std::nullopt;
  at::Tensor out = at::empty(x.sizes(), x.options());
  std::vector<int64_t> stat_sizes(x.sizes().begin(), x.sizes().end());
  stat_sizes.erase(stat_sizes.begin() + 1);
  const auto acc_options = x.options().dtype(channel_layernorm_acc_type(x.scalar_type()));
  at::Tensor mean = at::empty(stat_sizes, acc_options);
  at::Tensor rstd = at::empty(stat_sizes, acc_options);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "channel_layernorm_cpu", [&] {
      forward_kernel<scalar_t>(x, weight, bias ? &*bias : nullptr, eps, out, mean, rstd);
    });
  }
  return {out, mean, rstd};
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& mean, const at::Tensor& rstd, bool with_bias, at::Tensor& grad_x,
                     at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(1), N = x.numel() / (B * C);
  const int64_t tiles = (N + kTile - 1) / kTile;
  const scalar_t* g_p = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const scalar_t* w_p = weight.const_data_ptr<scalar_t>();
  const acc_t* mean_p = mean.const_data_ptr<acc_t>();
  const acc_t* rstd_p = rstd.const_data_ptr<acc_t>();
  scalar_t* dx_p = grad_x.mutable_data_ptr<scalar_t>();
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  const int64_t blocks = block_count(B * tiles, std::max<int64_t>(1, 32768 / (C * kTile)));
  // Per block: grad_weight (C) then grad_bias (C) partial sums.
  at::Tensor partial = at::zeros({blocks, 2 * C}, x.options().dtype(channel_layernorm_acc_type(x.scalar_type())));
  acc_t* part_p = partial.mutable_data_ptr<acc_t>();

  parallel_blocks(B * tiles, blocks, [&](int64_t begin, int64_t end, int64_t block) {
    acc_t mu[kTile], rs[kTile], s1[kTile], s2[kTile];
    acc_t* dw = part_p + block * 2 * C;
    acc_t* db = dw + C;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, p0 = (task % tiles) * kTile;
      const int64_t len = std::min(kTile, N - p0);
      const int64_t off = b * C * N + p0;
      for (int64_t t = 0; t < len; ++t) {
        mu[t] = mean_p[b * N + p0 + t];
        rs[t] = rstd_p[b * N + p0 + t];
        s1[t] = s2[t] = acc_t(0);
        // n = (x - sub) * rstd: the with-bias norm centres x, the bias-free one does not.
        if (!with_bias) mu[t] = acc_t(0);
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* grow = g_p + off + c * N;
        const scalar_t* xrow = x_p + off + c * N;
        const acc_t wc = static_cast<acc_t>(w_p[c]);
        acc_t gn = acc_t(0), gs = acc_t(0);
#pragma omp simd reduction(+ : gn, gs)
        for (int64_t t = 0; t < len; ++t) {
          const acc_t g = static_cast<acc_t>(grow[t]);
          const acc_t n = (static_cast<acc_t>(xrow[t]) - mu[t]) * rs[t];
          s1[t] += g * wc;
          s2[t] += g * wc * n;
          gn += g * n;
          gs += g;
        }
        dw[c] += gn;
        db[c] += gs;
      }
      if (!with_bias) {  // xhat needs the centring the bias-free n left out
        for (int64_t t = 0; t < len; ++t) {
          mu[t] = mean_p[b * N + p0 + t];
          s1[t] = acc_t(0);
        }
      }
      for (int64_t t = 0; t < len; ++t) {
        s1[t] *= inv_c;
        s2[t] *= inv_c;
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* grow = g_p + off + c * N;
        const scalar_t* xrow = x_p + off + c * N;
        scalar_t* dxrow = dx_p + off + c * N;
        const acc_t wc = static_cast<acc_t>(w_p[c]);
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) {
          const acc_t xhat = (static_cast<acc_t>(xrow[t]) - mu[t]) * rs[t];
          dxrow[t] = static_cast<scalar_t>(rs[t] * (static_cast<acc_t>(grow[t]) * wc - s1[t] - xhat * s2[t]));
        }
      }
    }
  });
  scalar_t* gw_p = grad_weight.mutable_data_ptr<scalar_t>();
  scalar_t* gb_p = grad_bias.mutable_data_ptr<scalar_t>();
  for (int64_t c = 0; c < C; ++c) {  // fixed summation order over blocks
    acc_t sw = 0, sb = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      sw += part_p[blk * 2 * C + c];
      sb += part_p[blk * 2 * C + C + c];
    }
    gw_p[c] = static_cast<scalar_t>(sw);
    gb_p[c] = static_cast<scalar_t>(sb);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_layernorm_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, bool with_bias) {
  check_channel_layernorm_grad(grad_out_in, x_in, weight_in, mean_in, rstd_in);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty(weight.sizes(), weight.options());
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "channel_layernorm_backward_cpu", [&] {
      backward_kernel<scalar_t>(grad_out, x, weight, mean, rstd, with_bias, grad_x, grad_weight, grad_bias);
    });
  } else {
    grad_weight.zero_();
    grad_bias.zero_();
  }
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl_fast, CPU, m) {
  m.impl("channel_layernorm", &channel_layernorm_cpu);
  m.impl("_channel_layernorm_backward", &channel_layernorm_backward_cpu);
}

}  // namespace cpl_fast
