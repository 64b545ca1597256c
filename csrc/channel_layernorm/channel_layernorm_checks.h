// Argument checks shared by the CPU and CUDA registrations of cpl_fast::channel_layernorm. The Python
// entry point (cpl_fast.ops.channel_layernorm) raises ValueError with the same messages first; these guard
// direct torch.ops.cpl_fast calls.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace cpl_fast {

inline at::ScalarType channel_layernorm_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_channel_layernorm_inputs(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 2, "channel_layernorm: x must be (B, C, ...), got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) >= 1, "channel_layernorm: x must have at least one channel");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1),
              "channel_layernorm: weight must be (C,) with C = x.size(1) = ", x.size(1));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "channel_layernorm: weight and x dtypes differ");
  TORCH_CHECK(weight.device() == x.device(), "channel_layernorm: weight is on another device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->sizes() == weight.sizes(), "channel_layernorm: bias must have the shape of weight");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "channel_layernorm: bias and x dtypes differ");
    TORCH_CHECK(bias->device() == x.device(), "channel_layernorm: bias is on another device");
  }
}

inline void check_channel_layernorm_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& mean, const at::Tensor& rstd) {
  check_channel_layernorm_inputs(x, weight, std::nullopt);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "channel_layernorm backward: grad_out must have the shape of x");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "channel_layernorm backward: grad_out and x dtypes differ");
  TORCH_CHECK(grad_out.device() == x.device(), "channel_layernorm backward: grad_out is on another device");
  const at::ScalarType acc = channel_layernorm_acc_type(x.scalar_type());
  TORCH_CHECK(mean.scalar_type() == acc && rstd.scalar_type() == acc,
              "channel_layernorm backward: mean and rstd must be ", acc);
  TORCH_CHECK(mean.numel() * x.size(1) == x.numel() && rstd.numel() == mean.numel(),
              "channel_layernorm backward: mean and rstd must hold one value per pixel");
  TORCH_CHECK(mean.device() == x.device() && rstd.device() == x.device(),
              "channel_layernorm backward: mean and rstd are on another device");
}

}  // namespace cpl_fast
