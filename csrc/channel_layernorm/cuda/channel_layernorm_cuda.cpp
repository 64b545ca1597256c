// CUDA registration of cpl_fast::channel_layernorm and cpl_fast::_channel_layernorm_backward: tensors to raw
// pointers, the current stream, and error checks around the plain launchers of channel_layernorm_kernel.cu.
// Inputs are read through .contiguous() (free for the model's activations). grad_weight and grad_bias are the
// sums, in a fixed order, of the kernels' per-chunk slots: reproducible.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../channel_layernorm_checks.h"
#include "channel_layernorm_launch.h"

namespace cpl_fast {
namespace {

namespace clc = channel_layernorm_cuda;

clc::Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return clc::Dtype::kFloat32;
    case at::kDouble: return clc::Dtype::kFloat64;
    case at::kHalf: return clc::Dtype::kFloat16;
    case at::kBFloat16: return clc::Dtype::kBFloat16;
    default: TORCH_CHECK(false, "channel_layernorm (CUDA): unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                             const std::optional<at::Tensor>& bias_in, double eps) {
  check_channel_layernorm_inputs(x_in, weight_in, bias_in);
  TORCH_CHECK(x_in.is_cuda(), "channel_layernorm (CUDA): x must be a CUDA tensor");
  TORCH_CHECK(eps >= 0, "channel_layernorm: eps must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous())
                                                             : std::nullopt;
  std::vector<int64_t> stat_sizes(x.sizes().begin(), x.sizes().end());
  stat_sizes.erase(stat_sizes.begin() + 1);
  const auto acc_options = x.options().dtype(channel_layernorm_acc_type(x.scalar_type()));
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty(stat_sizes, acc_options);
  at::Tensor rstd = at::empty(stat_sizes, acc_options);
  if (x.numel() > 0) {
    const int64_t B = x.size(0), C = x.size(1), N = x.numel() / (B * C);
    C10_CUDA_CHECK(clc::launch_forward(dtype_of(x.scalar_type()), B, C, N, x.const_data_ptr(), weight.const_data_ptr(),
                                       bias ? bias->const_data_ptr() : nullptr, eps, out.mutable_data_ptr(),
                                       mean.mutable_data_ptr(), rstd.mutable_data_ptr(),
                                       c10::cuda::getCurrentCUDAStream().stream()));
  }
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                              const at::Tensor& weight_in, const at::Tensor& mean_in,
                                                              const at::Tensor& rstd_in, bool with_bias) {
  check_channel_layernorm_grad(grad_in, x_in, weight_in, mean_in, rstd_in);
  TORCH_CHECK(x_in.is_cuda(), "channel_layernorm (CUDA): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const int64_t C = x.size(1);
  if (x.numel() == 0) return {grad_x, at::zeros_like(weight), at::zeros_like(weight)};
  const int64_t B = x.size(0), N = x.numel() / (B * C);
  const int64_t chunks = clc::backward_chunks(B, N);
  const auto acc_options = x.options().dtype(channel_layernorm_acc_type(x.scalar_type()));
  at::Tensor partial_w = at::empty({C, chunks}, acc_options);
  at::Tensor partial_b = at::empty({C, chunks}, acc_options);
  C10_CUDA_CHECK(clc::launch_backward(dtype_of(x.scalar_type()), B, C, N, grad.const_data_ptr(), x.const_data_ptr(),
                                      weight.const_data_ptr(), mean.const_data_ptr(), rstd.const_data_ptr(), with_bias,
                                      grad_x.mutable_data_ptr(), partial_w.mutable_data_ptr(),
                                      partial_b.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return {grad_x, partial_w.sum(1).to(weight.scalar_type()), partial_b.sum(1).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl_fast, CUDA, m) {
  m.impl("channel_layernorm", &forward_cuda);
  m.impl("_channel_layernorm_backward", &backward_cuda);
}

}  // namespace cpl_fast
