// CPU kernels of cpl_fast::prompt_mix and cpl_fast::_prompt_mix_backward.
//
//   out[b, c, h, w] = sum_j weights[b, j] * bilinear(bank[indices[b, j], c], h, w)
//
// Bilinear resize follows F.interpolate(mode="bilinear", align_corners=False) exactly, with the
// scale in/out and the source coordinates computed in the accumulation type as PyTorch does.
// The resize is separable, so each output row is made in two passes:
//   1. vertical: mix the k selected experts' two source rows into one row of width S' (contiguous,
//      vectorisable, the experts are accumulated here so the second pass runs once per row);
//   2. horizontal: gather that row at the precomputed column indices/weights.
// The backward applies the transposed resize once per (sample, channel) and reuses it for every
// expert of the sample:
//   G = resize^T(grad_out[b, c])             (S x S')
//   grad_bank[indices[b, j], c] += weights[b, j] * G
//   grad_weights[b, j] = sum_c <G, bank[indices[b, j], c]>
// It is parallelised over channels: a parallel block owns grad_bank[:, c] for its channels and
// visits the samples in a fixed order, and grad_weights sums the per-channel dot products in a fixed
// order, so the result is bitwise reproducible (no atomics, no races).
//
// Inputs: bank, grad_out, indices and weights are read through .contiguous(), which is free for the
// contiguous tensors of the hot path (a parameter bank, a fresh output gradient) and copies
// otherwise. float32 and float64 accumulate in their own type, bfloat16 in float32. Scratch space
// (one row per parallel block in the forward; one S x S' plane per block, plus grad_bank[:, c] in
// float32 for bfloat16, in the backward) is an ATen tensor, so memory profilers see it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../prompt_mix_checks.h"

namespace cpl_fast {
namespace {

// Source indices and weights of one axis: output position d reads i0[d] (weight l0[d]) and
// i1[d] (weight l1[d]).
template <typename acc_t>
struct AxisInterp {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1;
  bool identity = false;  // in == out: every output position copies its source position

  AxisInterp(int64_t in, int64_t out) : i0(out), i1(out), l0(out), l1(out), identity(in == out) {
    // PyTorch's area_pixel_compute_scale / compute_source_index_and_lambda (align_corners=False).
    const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
    for (int64_t d = 0; d < out; ++d) {
      if (identity) {
        i0[d] = i1[d] = d;
        l0[d] = acc_t(1);
        l1[d] = acc_t(0);
        continue;
      }
      acc_t src = scale * (static_cast<acc_t>(d) + acc_t(0.5)) - acc_t(0.5);
      if (src < acc_t(0)) src = acc_t(0);
      const int64_t lo = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      const acc_t lambda = std::min(std::max(src - static_cast<acc_t>(lo), acc_t(0)), acc_t(1));
      i0[d] = lo;
      i1[d] = lo + (lo < in - 1 ? 1 : 0);
      l0[d] = acc_t(1) - lambda;
      l1[d] = lambda;
    }
  }
};

template <typename acc_t>
constexpr at::ScalarType acc_scalar() {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

// Number of blocks parallel_blocks splits [0, range) into: at most one per thread, each >= grain.
int64_t block_count(int64_t range, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (range + grain - 1) / grain));
}

// Runs fn(begin, end, block) over `blocks` contiguous slices of [0, range) in parallel. Scratch space
// is indexed by block (always < blocks), not by thread id.
template <typename F>
void parallel_blocks(int64_t range, int64_t blocks, const F& fn) {
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t begin = range * blk / blocks, end = range * (blk + 1) / blocks;
      if (begin < end) fn(begin, end, blk);
    }
  });
}

// Checked inside the kernel too, so a direct torch.ops call cannot read out of bounds.
void check_index_range(const int64_t* idx, int64_t count, int64_t n) {
  for (int64_t t = 0; t < count; ++t) {
    TORCH_CHECK(idx[t] >= 0 && idx[t] < n, "prompt_mix: index ", idx[t], " out of range [0, ", n, ")");
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& bank, const at::Tensor& indices, const at::Tensor& weights,
                    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;  // accumulate in the output itself
  const int64_t n = bank.size(0), C = bank.size(1), S = bank.size(2), Sp = bank.size(3);
  const int64_t B = indices.size(0), k = indices.size(1), H = out.size(2), W = out.size(3);
  const AxisInterp<acc_t> ry(S, H), rx(Sp, W);
  const scalar_t* bank_p = bank.const_data_ptr<scalar_t>();
  const int64_t* idx_p = indices.const_data_ptr<int64_t>();
  const scalar_t* w_p = weights.const_data_ptr<scalar_t>();
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  check_index_range(idx_p, B * k, n);
  const int64_t plane = S * Sp;
  const bool row_in_out = direct && rx.identity;  // the vertical pass can write the output row
  const int64_t per_block = row_in_out ? 0 : Sp;
  // Tasks are (b, c) output planes; the grain keeps a block at ~32k output elements or more.
  const int64_t blocks = block_count(B * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W)));
  at::Tensor scratch = at::empty({blocks * per_block}, out.options().dtype(acc_scalar<acc_t>()));
  acc_t* scratch_p = scratch.mutable_data_ptr<acc_t>();

  parallel_blocks(B * C, blocks, [&](int64_t begin, int64_t end, int64_t block) {
    acc_t* row_buf = scratch_p + block * per_block;
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      for (int64_t h = 0; h < H; ++h) {
        scalar_t* out_row = out_p + (bc * H + h) * W;
        acc_t* row = row_in_out ? reinterpret_cast<acc_t*>(out_row) : row_buf;
        const acc_t ly0 = ry.l0[h], ly1 = ry.l1[h];
        const int64_t y0 = ry.i0[h] * Sp, y1 = ry.i1[h] * Sp;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t wj = static_cast<acc_t>(w_p[b * k + j]);
          const scalar_t* src = bank_p + (idx_p[b * k + j] * C + c) * plane;
          const scalar_t* r0 = src + y0;
          const scalar_t* r1 = src + y1;
          const acc_t a0 = wj * ly0, a1 = wj * ly1;
          if (ly1 == acc_t(0)) {  // the row sits on a source row (always so for an identity resize)
            if (j == 0) {
              for (int64_t x = 0; x < Sp; ++x) row[x] = a0 * static_cast<acc_t>(r0[x]);
            } else {
              for (int64_t x = 0; x < Sp; ++x) row[x] += a0 * static_cast<acc_t>(r0[x]);
            }
          } else {
            if (j == 0) {
              for (int64_t x = 0; x < Sp; ++x)
                row[x] = a0 * static_cast<acc_t>(r0[x]) + a1 * static_cast<acc_t>(r1[x]);
            } else {
              for (int64_t x = 0; x < Sp; ++x)
                row[x] += a0 * static_cast<acc_t>(r0[x]) + a1 * static_cast<acc_t>(r1[x]);
            }
          }
        }
        if (row_in_out) continue;
        if (rx.identity) {
          for (int64_t x = 0; x < W; ++x) out_row[x] = static_cast<scalar_t>(row[x]);
        } else {
          const int64_t* x0 = rx.i0.data();
          const int64_t* x1 = rx.i1.data();
          const acc_t* lx0 = rx.l0.data();
          const acc_t* lx1 = rx.l1.data();
          for (int64_t x = 0; x < W; ++x)
            out_row[x] = static_cast<scalar_t>(lx0[x] * row[x0[x]] + lx1[x] * row[x1[x]]);
        }
      }
    }
  });
}

at::Tensor prompt_mix_cpu(const at::Tensor& bank_in, const at::Tensor& indices_in, const at::Tensor& weights_in,
                          c10::SymInt height, c10::SymInt width) {
  check_prompt_mix_inputs(bank_in, indices_in, weights_in);
  const int64_t H = height.expect_int(), W = width.expect_int();
  TORCH_CHECK(H >= 1 && W >= 1, "prompt_mix: output size must be positive, got (", H, ", ", W, ")");
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor out = at::empty({indices.size(0), bank.size(1), H, W}, bank.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, bank.scalar_type(), "prompt_mix_cpu", [&] {
    forward_kernel<scalar_t>(bank, indices, weights, out);
  });
  return out;
}

// Dot product with four independent partial sums, so the loop is not one serial dependency chain.
template <typename acc_t, typename scalar_t>
acc_t axpy_dot(acc_t* __restrict__ y, acc_t a, const acc_t* __restrict__ g, const scalar_t* __restrict__ v,
               int64_t len) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t p = 0;
  for (; p + 4 <= len; p += 4) {
    y[p] += a * g[p];
    y[p + 1] += a * g[p + 1];
    y[p + 2] += a * g[p + 2];
    y[p + 3] += a * g[p + 3];
    s0 += g[p] * static_cast<acc_t>(v[p]);
    s1 += g[p + 1] * static_cast<acc_t>(v[p + 1]);
    s2 += g[p + 2] * static_cast<acc_t>(v[p + 2]);
    s3 += g[p + 3] * static_cast<acc_t>(v[p + 3]);
  }
  for (; p < len; ++p) {
    y[p] += a * g[p];
    s0 += g[p] * static_cast<acc_t>(v[p]);
  }
  return (s0 + s1) + (s2 + s3);
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& bank, const at::Tensor& indices,
                     const at::Tensor& weights, at::Tensor& grad_bank, at::Tensor& grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;  // accumulate grad_bank in place
  const int64_t n = bank.size(0), C = bank.size(1), S = bank.size(2), Sp = bank.size(3);
  const int64_t B = indices.size(0), k = indices.size(1), H = grad_out.size(2), W = grad_out.size(3);
  const AxisInterp<acc_t> ry(S, H), rx(Sp, W);
  const scalar_t* g_p = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* bank_p = bank.const_data_ptr<scalar_t>();
  const int64_t* idx_p = indices.const_data_ptr<int64_t>();
  const scalar_t* w_p = weights.const_data_ptr<scalar_t>();
  scalar_t* gb_p = grad_bank.mutable_data_ptr<scalar_t>();
  check_index_range(idx_p, B * k, n);
  const int64_t plane = S * Sp;
  const bool identity = ry.identity && rx.identity;
  // partial[(b * k + j) * C + c] = <G[b, c], bank[indices[b, j], c]>, summed over c afterwards.
  const at::TensorOptions acc_options = bank.options().dtype(acc_scalar<acc_t>());
  at::Tensor partial_t = at::empty({B * k * C}, acc_options);
  acc_t* partial = partial_t.mutable_data_ptr<acc_t>();
  // Per block: G of one (b, c), one row of the horizontal resize^T, grad_bank[:, c] in acc_t.
  const int64_t t_len = (identity && direct) ? 0 : plane;
  const int64_t row_len = (rx.identity && direct) ? 0 : Sp;
  const int64_t gb_len = direct ? 0 : n * plane;
  const int64_t per_block = t_len + row_len + gb_len;
  const int64_t blocks = block_count(C, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, B * H * W)));
  at::Tensor scratch = at::empty({blocks * per_block}, acc_options);
  acc_t* scratch_p = scratch.mutable_data_ptr<acc_t>();

  parallel_blocks(C, blocks, [&](int64_t begin, int64_t end, int64_t block) {
    acc_t* t_buf = scratch_p + block * per_block;
    acc_t* row_buf = t_buf + t_len;
    acc_t* gb_buf = row_buf + row_len;
    for (int64_t c = begin; c < end; ++c) {
      if (!direct) std::fill(gb_buf, gb_buf + gb_len, acc_t(0));
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* g_plane = g_p + (b * C + c) * H * W;
        const acc_t* t;
        if (identity && direct) {
          t = reinterpret_cast<const acc_t*>(g_plane);
        } else {
          std::fill(t_buf, t_buf + t_len, acc_t(0));
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t* g_row = g_plane + h * W;
            const acc_t* r;
            if (rx.identity && direct) {
              r = reinterpret_cast<const acc_t*>(g_row);
            } else if (rx.identity) {
              for (int64_t x = 0; x < Sp; ++x) row_buf[x] = static_cast<acc_t>(g_row[x]);
              r = row_buf;
            } else {
              std::fill(row_buf, row_buf + row_len, acc_t(0));
              for (int64_t x = 0; x < W; ++x) {
                const acc_t gv = static_cast<acc_t>(g_row[x]);
                row_buf[rx.i0[x]] += rx.l0[x] * gv;
                row_buf[rx.i1[x]] += rx.l1[x] * gv;
              }
              r = row_buf;
            }
            acc_t* t0 = t_buf + ry.i0[h] * Sp;
            const acc_t ly0 = ry.l0[h], ly1 = ry.l1[h];
            for (int64_t x = 0; x < Sp; ++x) t0[x] += ly0 * r[x];
            if (ly1 != acc_t(0)) {
              acc_t* t1 = t_buf + ry.i1[h] * Sp;
              for (int64_t x = 0; x < Sp; ++x) t1[x] += ly1 * r[x];
            }
          }
          t = t_buf;
        }
        for (int64_t j = 0; j < k; ++j) {
          const int64_t i = idx_p[b * k + j];
          acc_t* gb_plane = direct ? reinterpret_cast<acc_t*>(gb_p + (i * C + c) * plane) : gb_buf + i * plane;
          partial[(b * k + j) * C + c] =
              axpy_dot(gb_plane, static_cast<acc_t>(w_p[b * k + j]), t, bank_p + (i * C + c) * plane, plane);
        }
      }
      if (!direct) {
        for (int64_t i = 0; i < n; ++i) {
          scalar_t* dst = gb_p + (i * C + c) * plane;
          const acc_t* src = gb_buf + i * plane;
          for (int64_t p = 0; p < plane; ++p) dst[p] = static_cast<scalar_t>(src[p]);
        }
      }
    }
  });
  scalar_t* gw_p = grad_weights.mutable_data_ptr<scalar_t>();
  for (int64_t bj = 0; bj < B * k; ++bj) {  // fixed summation order over channels
    acc_t sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += partial[bj * C + c];
    gw_p[bj] = static_cast<scalar_t>(sum);
  }
}

std::tuple<at::Tensor, at::Tensor> prompt_mix_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& bank_in,
                                                           const at::Tensor& indices_in,
                                                           const at::Tensor& weights_in) {
  check_prompt_mix_inputs(bank_in, indices_in, weights_in);
  check_prompt_mix_grad(grad_out_in, bank_in, indices_in);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  // grad_bank is dense (zeros for experts no sample picked): the bank is one parameter.
  at::Tensor grad_bank = at::zeros_like(bank, at::MemoryFormat::Contiguous);
  at::Tensor grad_weights = at::empty(indices.sizes(), weights.options());
  if (grad_out.size(2) > 0 && grad_out.size(3) > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, bank.scalar_type(), "prompt_mix_backward_cpu", [&] {
      backward_kernel<scalar_t>(grad_out, bank, indices, weights, grad_bank, grad_weights);
    });
  } else {
    grad_weights.zero_();
  }
  return {grad_bank, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl_fast, CPU, m) {
  m.impl("prompt_mix", &prompt_mix_cpu);
  m.impl("_prompt_mix_backward", &prompt_mix_backward_cpu);
}

}  // namespace cpl_fast
