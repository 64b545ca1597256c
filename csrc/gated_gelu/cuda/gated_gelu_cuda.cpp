// CUDA registration of cpl_fast::gated_gelu and cpl_fast::_gated_gelu_backward: tensors to raw pointers, the
// current stream, and error checks around the plain launchers of gated_gelu_kernel.cu. Inputs are read
// through .contiguous() (free for the model's activations).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gated_gelu_checks.h"
#include "gated_gelu_launch.h"

namespace cpl_fast {
namespace {

namespace ggc = gated_gelu_cuda;

ggc::Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ggc::Dtype::kFloat32;
    case at::kDouble: return ggc::Dtype::kFloat64;
    case at::kHalf: return ggc::Dtype::kFloat16;
    case at::kBFloat16: return ggc::Dtype::kBFloat16;
    default: TORCH_CHECK(false, "gated_gelu (CUDA): unsupported dtype ", t);
  }
}

at::Tensor forward_cuda(const at::Tensor& x_in) {
  check_gated_gelu_input(x_in);
  TORCH_CHECK(x_in.is_cuda(), "gated_gelu (CUDA): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  auto sizes = x.sizes().vec();
  sizes[1] /= 2;
  at::Tensor out = at::empty(sizes, x.options());
  if (out.numel() > 0) {
    const int64_t B = x.size(0), M = out.numel() / B;
    C10_CUDA_CHECK(ggc::launch_forward(dtype_of(x.scalar_type()), B, M, x.const_data_ptr(), out.mutable_data_ptr(),
                                       c10::cuda::getCurrentCUDAStream().stream()));
  }
  return out;
}

at::Tensor backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_gated_gelu_grad(grad_in, x_in);
  TORCH_CHECK(x_in.is_cuda(), "gated_gelu (CUDA): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  if (grad.numel() > 0) {
    const int64_t B = x.size(0), M = grad.numel() / B;
    C10_CUDA_CHECK(ggc::launch_backward(dtype_of(x.scalar_type()), B, M, grad.const_data_ptr(), x.const_data_ptr(),
                                        grad_x.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  }
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl_fast, CUDA, m) {
  m.impl("gated_gelu", &forward_cuda);
  m.impl("_gated_gelu_backward", &backward_cuda);
}

}  // namespace cpl_fast
