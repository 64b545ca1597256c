// Argument checks shared by the CPU and CUDA registrations of cpl_fast::gated_gelu. The Python entry point
// (cpl_fast.ops.gated_gelu) raises ValueError with the same messages first; these guard direct
// torch.ops.cpl_fast calls.
#pragma once

#include <ATen/ATen.h>

namespace cpl_fast {

inline void check_gated_gelu_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "gated_gelu: x must be (B, 2C, ...), got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) % 2 == 0, "gated_gelu: x must have an even number of channels, got ", x.size(1));
}

inline void check_gated_gelu_grad(const at::Tensor& grad_out, const at::Tensor& x) {
  check_gated_gelu_input(x);
  auto sizes = x.sizes().vec();
  sizes[1] /= 2;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(sizes), "gated_gelu backward: grad_out must be (B, C, ...) with 2C = ",
              x.size(1));
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "gated_gelu backward: grad_out and x dtypes differ");
  TORCH_CHECK(grad_out.device() == x.device(), "gated_gelu backward: grad_out is on another device");
}

}  // namespace cpl_fast
