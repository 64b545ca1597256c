// Torch-facing helpers shared by the CPU and CUDA registrations of cpr_distances: input checks,
// the explicit layout normalisation, and the per-sample coefficients of the backward.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace cpl_fast {
namespace cpr {

// Elements per sample of the features (N) and negatives per sample (m).
struct Sizes {
  int64_t batch;
  int64_t negatives;
  int64_t per_sample;
};

// Shape, dtype and device checks. Errors surface in Python as ValueError / TypeError.
inline Sizes check_inputs(const at::Tensor& f_pos, const at::Tensor& f_gt, const at::Tensor& f_neg,
                          const c10::optional<at::Tensor>& neg_weights) {
  TORCH_CHECK_VALUE(f_pos.dim() >= 1, "cpr_distances: f_pos must have a batch dimension, got shape ",
                    f_pos.sizes());
  TORCH_CHECK_VALUE(f_gt.sizes() == f_pos.sizes(), "cpr_distances: f_gt shape ", f_gt.sizes(),
                    " does not match f_pos shape ", f_pos.sizes());
  TORCH_CHECK_VALUE(f_neg.dim() == f_pos.dim() + 1 && f_neg.sizes().slice(1) == f_pos.sizes(),
                    "cpr_distances: f_neg must have shape (m, *f_pos.shape) = (m, ", f_pos.sizes(),
                    "), got ", f_neg.sizes());
  const int64_t m = f_neg.size(0);
  TORCH_CHECK_VALUE(m > 0, "cpr_distances: f_neg has no negatives (m = 0)");
  TORCH_CHECK_TYPE(at::isFloatingType(f_pos.scalar_type()), "cpr_distances: features must be floating point, got ",
                   f_pos.scalar_type());
  TORCH_CHECK_TYPE(f_gt.scalar_type() == f_pos.scalar_type() && f_neg.scalar_type() == f_pos.scalar_type(),
                   "cpr_distances: f_pos, f_gt and f_neg must share one dtype, got ", f_pos.scalar_type(), ", ",
                   f_gt.scalar_type(), " and ", f_neg.scalar_type());
  TORCH_CHECK_VALUE(f_gt.device() == f_pos.device() && f_neg.device() == f_pos.device(),
                    "cpr_distances: f_pos, f_gt and f_neg must be on one device, got ", f_pos.device(), ", ",
                    f_gt.device(), " and ", f_neg.device());
  const int64_t batch = f_pos.size(0);
  TORCH_CHECK_VALUE(batch > 0, "cpr_distances: empty batch (B = 0), shape ", f_pos.sizes());
  int64_t per_sample = 1;
  for (int64_t size : f_pos.sizes().slice(1)) per_sample *= size;
  TORCH_CHECK_VALUE(per_sample > 0, "cpr_distances: features have no elements per sample, shape ", f_pos.sizes());
  if (neg_weights.has_value()) {
    const at::Tensor& w = *neg_weights;
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == batch && w.size(1) == m,
                      "cpr_distances: neg_weights must have shape (B, m) = (", batch, ", ", m, "), got ", w.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), "cpr_distances: neg_weights must be floating point, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == f_pos.device(), "cpr_distances: neg_weights is on ", w.device(),
                      ", the features on ", f_pos.device());
  }
  return {batch, m, per_sample};
}

// Whether the dims from `first` on are row-major contiguous (size-1 dims may have any stride): then every
// sample is one dense run of N elements and the kernels only need the batch strides.
inline bool samples_are_dense(const at::Tensor& t, int64_t first) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= first; --d) {
    if (t.size(d) == 1) continue;
    if (t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// The kernels read each sample as a dense run and take arbitrary batch strides, so views such as
// feats[:B] and feats[B:].view(m, B, ...) are read in place. A tensor whose samples are not dense runs
// (a strided slice inside a sample, channels-last) is copied once here, on purpose and only then.
inline at::Tensor dense_samples(const at::Tensor& t, int64_t batch_dims) {
  return samples_are_dense(t, batch_dims) ? t : t.contiguous();
}

// Per-sample weights of the negatives in the accumulation dtype, (B, m) contiguous; ones when absent.
inline at::Tensor weights_or_ones(const c10::optional<at::Tensor>& neg_weights, int64_t batch, int64_t m,
                                  const at::TensorOptions& options) {
  if (neg_weights.has_value()) return neg_weights->to(options).contiguous();
  return at::ones({batch, m}, options);
}

// Backward coefficients: grad_f_gt = -c_pos[b] (f_pos - f_gt), grad_f_neg[t, b] = c_neg[b, t] (f_neg - f_pos),
// grad_f_pos = -grad_f_gt - sum_t grad_f_neg[t, b]; c_pos = 2 g_pos / N, c_neg = 2 g_neg w / (N m).
inline std::pair<at::Tensor, at::Tensor> backward_coefficients(const at::Tensor& grad_l_pos,
                                                               const at::Tensor& grad_l_neg,
                                                               const c10::optional<at::Tensor>& neg_weights,
                                                               const Sizes& s, const at::TensorOptions& acc) {
  TORCH_CHECK_VALUE(grad_l_pos.dim() == 1 && grad_l_pos.size(0) == s.batch, "cpr_distances backward: grad_l_pos must have shape (",
                    s.batch, "), got ", grad_l_pos.sizes());
  TORCH_CHECK_VALUE(grad_l_neg.dim() == 1 && grad_l_neg.size(0) == s.batch, "cpr_distances backward: grad_l_neg must have shape (",
                    s.batch, "), got ", grad_l_neg.sizes());
  const double n = static_cast<double>(s.per_sample);
  at::Tensor c_pos = (grad_l_pos.to(acc) * (2.0 / n)).contiguous();
  at::Tensor w = weights_or_ones(neg_weights, s.batch, s.negatives, acc);
  at::Tensor c_neg = (grad_l_neg.to(acc).unsqueeze(1) * w * (2.0 / (n * static_cast<double>(s.negatives)))).contiguous();
  return {c_pos, c_neg};
}

}  // namespace cpr
}  // namespace cpl_fast
