// Argument checks shared by the CPU and CUDA registrations of cpl_fast::prompt_mix. The Python
// entry point (cpl_fast.ops.prompt_mix) raises ValueError with the same messages first; these guard
// direct torch.ops.cpl_fast calls.
#pragma once

#include <ATen/ATen.h>

namespace cpl_fast {

inline void check_prompt_mix_inputs(const at::Tensor& bank, const at::Tensor& indices, const at::Tensor& weights) {
  TORCH_CHECK(bank.dim() == 4, "prompt_mix: bank must be (n, C, S, S'), got ", bank.dim(), " dims");
  TORCH_CHECK(indices.dim() == 2 && indices.scalar_type() == at::kLong,
              "prompt_mix: indices must be a (B, k) int64 tensor");
  TORCH_CHECK(weights.sizes() == indices.sizes(), "prompt_mix: weights must have the shape of indices");
  TORCH_CHECK(weights.scalar_type() == bank.scalar_type(), "prompt_mix: weights and bank dtypes differ");
  TORCH_CHECK(indices.size(1) >= 1, "prompt_mix: indices must select at least one expert (k >= 1)");
  TORCH_CHECK(bank.size(2) >= 1 && bank.size(3) >= 1, "prompt_mix: bank must have S, S' >= 1");
  TORCH_CHECK(indices.device() == bank.device() && weights.device() == bank.device(),
              "prompt_mix: bank, indices and weights must be on one device");
}

inline void check_prompt_mix_grad(const at::Tensor& grad_out, const at::Tensor& bank, const at::Tensor& indices) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == indices.size(0) && grad_out.size(1) == bank.size(1),
              "prompt_mix backward: grad_out must be (B, C, H, W)");
  TORCH_CHECK(grad_out.scalar_type() == bank.scalar_type(), "prompt_mix backward: grad_out and bank dtypes differ");
  TORCH_CHECK(grad_out.device() == bank.device(), "prompt_mix backward: grad_out is on another device");
}

}  // namespace cpl_fast
