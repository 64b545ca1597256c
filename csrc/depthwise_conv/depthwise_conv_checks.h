// Argument checks of cpl_fast::depthwise_conv3x3 and its backward. The Python entry point
// (cpl_fast.ops.depthwise_conv3x3) raises ValueError with the same messages first; these guard direct
// torch.ops.cpl_fast calls.
#pragma once

#include <ATen/ATen.h>

namespace cpl_fast {

inline void check_depthwise_conv3x3_input(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4, "depthwise_conv3x3: x must be (B, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "depthwise_conv3x3: weight must be (", x.size(1), ", 1, 3, 3), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "depthwise_conv3x3: weight and x dtypes differ");
  TORCH_CHECK(weight.device() == x.device(), "depthwise_conv3x3: weight is on another device");
}

inline void check_depthwise_conv3x3_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                         const at::Tensor& weight) {
  check_depthwise_conv3x3_input(x, weight);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "depthwise_conv3x3 backward: grad_out must have x's shape ",
              x.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "depthwise_conv3x3 backward: grad_out and x dtypes differ");
  TORCH_CHECK(grad_out.device() == x.device(), "depthwise_conv3x3 backward: grad_out is on another device");
}

}  // namespace cpl_fast
