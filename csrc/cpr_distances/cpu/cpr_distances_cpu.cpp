// CPU kernels of cpl_fast::cpr_distances and its backward.
//
// Forward: the work is split into (sample, chunk of kChunk elements) items. Each item reads its slice of
// f_pos once and accumulates, in double, the squared distance to f_gt and to all m negatives into
// kLanes independent lanes (so the compiler can vectorise without reassociating a sum). The per-item
// partials are then reduced in a fixed order. Chunking does not depend on the thread count, so results are
// bitwise reproducible. Backward: one elementwise pass over the same items.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../cpr_distances_common.h"

namespace cpl_fast {
namespace cpr {
namespace {

constexpr int64_t kChunk = 4096;  // elements of one sample per work item (fixed: reproducible sums)
constexpr int kLanes = 16;        // independent accumulators per distance

// Squared distances of one chunk: out[0] = sum (pos - gt)^2, out[1 + t] = sum (neg_t - pos)^2.
template <typename scalar_t>
void chunk_sums(const scalar_t* pos, const scalar_t* gt, const std::vector<const scalar_t*>& negs, int64_t len,
                double* out) {
  const int64_t m = static_cast<int64_t>(negs.size());
  double acc_pos[kLanes] = {};
  std::vector<double> acc_neg(static_cast<size_t>(m * kLanes), 0.0);
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    double p[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      p[l] = static_cast<double>(pos[i + l]);
      const double d = p[l] - static_cast<double>(gt[i + l]);
      acc_pos[l] += d * d;
    }
    for (int64_t t = 0; t < m; ++t) {
      const scalar_t* neg = negs[t] + i;
      double* acc = acc_neg.data() + t * kLanes;
      for (int l = 0; l < kLanes; ++l) {
        const double d = static_cast<double>(neg[l]) - p[l];
        acc[l] += d * d;
      }
    }
  }
  for (int l = 0; i < len; ++i, ++l) {  // tail, one element per lane
    const double p = static_cast<double>(pos[i]);
    const double d = p - static_cast<double>(gt[i]);
    acc_pos[l] += d * d;
    for (int64_t t = 0; t < m; ++t) {
      const double dn = static_cast<double>(negs[t][i]) - p;
      acc_neg[t * kLanes + l] += dn * dn;
    }
  }
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += acc_pos[l];
  out[0] = total;
  for (int64_t t = 0; t < m; ++t) {
    total = 0.0;
    for (int l = 0; l < kLanes; ++l) total += acc_neg[t * kLanes + l];
    out[1 + t] = total;
  }
}

// Gradients of L consecutive elements of one sample. L is fixed at compile time so the lane loops vectorise;
// the f_pos gradient stays in op_t across the m negatives. neg / g_neg point at negative 0 of this sample.
template <int L, typename scalar_t, typename op_t>
inline void backward_lanes(const scalar_t* pos, const scalar_t* gt, const scalar_t* neg, int64_t neg_stride,
                           op_t c_pos, const op_t* c_neg, int64_t m, scalar_t* g_pos, scalar_t* g_gt,
                           scalar_t* g_neg, int64_t g_neg_stride) {
  op_t p[L], gp[L];
  for (int l = 0; l < L; ++l) {
    p[l] = static_cast<op_t>(pos[l]);
    gp[l] = c_pos * (p[l] - static_cast<op_t>(gt[l]));
    g_gt[l] = static_cast<scalar_t>(-gp[l]);
  }
  for (int64_t t = 0; t < m; ++t) {
    const scalar_t* n_in = neg + t * neg_stride;
    scalar_t* n_out = g_neg + t * g_neg_stride;
    const op_t c = c_neg[t];
    for (int l = 0; l < L; ++l) {
      const op_t gn = c * (static_cast<op_t>(n_in[l]) - p[l]);
      n_out[l] = static_cast<scalar_t>(gn);
      gp[l] -= gn;
    }
  }
  for (int l = 0; l < L; ++l) g_pos[l] = static_cast<scalar_t>(gp[l]);
}

std::tuple<at::Tensor, at::Tensor> cpr_distances_cpu(const at::Tensor& f_pos_in, const at::Tensor& f_gt_in,
                                                     const at::Tensor& f_neg_in,
                                                     const c10::optional<at::Tensor>& neg_weights) {
  const Sizes s = check_inputs(f_pos_in, f_gt_in, f_neg_in, neg_weights);
  const at::Tensor f_pos = dense_samples(f_pos_in, 1);
  const at::Tensor f_gt = dense_samples(f_gt_in, 1);
  const at::Tensor f_neg = dense_samples(f_neg_in, 2);
  const int64_t batch = s.batch, m = s.negatives, n = s.per_sample;
  const int64_t chunks = (n + kChunk - 1) / kChunk;

  at::Tensor l_pos = at::empty({batch}, f_pos.options());
  at::Tensor l_neg = at::empty({batch}, f_pos.options());
  const at::Tensor w = weights_or_ones(neg_weights, batch, m, f_pos.options().dtype(at::kDouble));
  at::Tensor partials = at::empty({batch, chunks, 1 + m}, f_pos.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f_pos.scalar_type(), "cpr_distances_cpu", [&] {
    const scalar_t* pos = f_pos.const_data_ptr<scalar_t>();
    const scalar_t* gt = f_gt.const_data_ptr<scalar_t>();
    const scalar_t* neg = f_neg.const_data_ptr<scalar_t>();
    const int64_t sp = f_pos.stride(0), sg = f_gt.stride(0), snt = f_neg.stride(0), snb = f_neg.stride(1);
    double* part = partials.data_ptr<double>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> negs(static_cast<size_t>(m));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / chunks, start = (item % chunks) * kChunk;
        for (int64_t t = 0; t < m; ++t) negs[t] = neg + t * snt + b * snb + start;
        chunk_sums(pos + b * sp + start, gt + b * sg + start, negs, std::min(kChunk, n - start),
                   part + item * (1 + m));
      }
    });
    const double* wp = w.const_data_ptr<double>();
    scalar_t* out_pos = l_pos.data_ptr<scalar_t>();
    scalar_t* out_neg = l_neg.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<double> sums(static_cast<size_t>(1 + m), 0.0);
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t j = 0; j <= m; ++j) sums[j] += part[(b * chunks + c) * (1 + m) + j];
      double weighted = 0.0;
      for (int64_t t = 0; t < m; ++t) weighted += wp[b * m + t] * (sums[1 + t] / static_cast<double>(n));
      out_pos[b] = static_cast<scalar_t>(sums[0] / static_cast<double>(n));
      out_neg[b] = static_cast<scalar_t>(weighted / static_cast<double>(m));
    }
  });
  return {l_pos, l_neg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpr_distances_backward_cpu(
    const at::Tensor& grad_l_pos, const at::Tensor& grad_l_neg, const at::Tensor& f_pos_in, const at::Tensor& f_gt_in,
    const at::Tensor& f_neg_in, const c10::optional<at::Tensor>& neg_weights) {
  const Sizes s = check_inputs(f_pos_in, f_gt_in, f_neg_in, neg_weights);
  const at::Tensor f_pos = dense_samples(f_pos_in, 1);
  const at::Tensor f_gt = dense_samples(f_gt_in, 1);
  const at::Tensor f_neg = dense_samples(f_neg_in, 2);
  const int64_t batch = s.batch, m = s.negatives, n = s.per_sample;
  const int64_t chunks = (n + kChunk - 1) / kChunk;

  // Gradients are contiguous: sample b of grad_f_pos starts at b * N, of grad_f_neg[t] at (t * B + b) * N.
  at::Tensor grad_pos = at::empty(f_pos.sizes(), f_pos.options());
  at::Tensor grad_gt = at::empty(f_gt.sizes(), f_gt.options());
  at::Tensor grad_neg = at::empty(f_neg.sizes(), f_neg.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f_pos.scalar_type(), "cpr_distances_backward_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const auto acc = f_pos.options().dtype(c10::CppTypeToScalarType<op_t>::value);
    const auto [c_pos_t, c_neg_t] = backward_coefficients(grad_l_pos, grad_l_neg, neg_weights, s, acc);
    const op_t* c_pos = c_pos_t.const_data_ptr<op_t>();
    const op_t* c_neg = c_neg_t.const_data_ptr<op_t>();
    const scalar_t* pos = f_pos.const_data_ptr<scalar_t>();
    const scalar_t* gt = f_gt.const_data_ptr<scalar_t>();
    const scalar_t* neg = f_neg.const_data_ptr<scalar_t>();
    const int64_t sp = f_pos.stride(0), sg = f_gt.stride(0), snt = f_neg.stride(0), snb = f_neg.stride(1);
    scalar_t* g_pos = grad_pos.data_ptr<scalar_t>();
    scalar_t* g_gt = grad_gt.data_ptr<scalar_t>();
    scalar_t* g_neg = grad_neg.data_ptr<scalar_t>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / chunks, start = (item % chunks) * kChunk;
        const int64_t len = std::min(kChunk, n - start);
        const scalar_t* p_in = pos + b * sp + start;
        const scalar_t* g_in = gt + b * sg + start;
        const scalar_t* n_in = neg + b * snb + start;
        const int64_t out = b * n + start;
        const op_t* cn = c_neg + b * m;
        int64_t i = 0;
        for (; i + kLanes <= len; i += kLanes) {
          backward_lanes<kLanes>(p_in + i, g_in + i, n_in + i, snt, c_pos[b], cn, m, g_pos + out + i,
                                 g_gt + out + i, g_neg + out + i, batch * n);
        }
        for (; i < len; ++i) {
          backward_lanes<1>(p_in + i, g_in + i, n_in + i, snt, c_pos[b], cn, m, g_pos + out + i, g_gt + out + i,
                            g_neg + out + i, batch * n);
        }
      }
    });
  });
  return {grad_pos, grad_gt, grad_neg};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl_fast, CPU, m) {
  m.impl("cpr_distances", &cpr_distances_cpu);
  m.impl("_cpr_distances_backward", &cpr_distances_backward_cpu);
}

}  // namespace cpr
}  // namespace cpl_fast
