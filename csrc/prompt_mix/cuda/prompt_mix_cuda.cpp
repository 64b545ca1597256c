// CUDA registration of cpl_fast::prompt_mix and cpl_fast::_prompt_mix_backward: tensors to raw
// pointers, the current stream, and error checks around the plain launchers of
// prompt_mix_kernel.cu.
//
// Inputs are read through .contiguous() (free for the contiguous tensors of the hot path). Index
// range is not checked on the host (it would need a device synchronisation): the kernels trap on an
// index outside [0, n). grad_bank is accumulated with atomicAdd (float32 for half types, then cast),
// so it is not bitwise reproducible; grad_weights is.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../prompt_mix_checks.h"
#include "prompt_mix_launch.h"

namespace cpl_fast {
namespace {

namespace pmc = prompt_mix_cuda;

pmc::Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return pmc::Dtype::kFloat32;
    case at::kDouble: return pmc::Dtype::kFloat64;
    case at::kHalf: return pmc::Dtype::kFloat16;
    case at::kBFloat16: return pmc::Dtype::kBFloat16;
    default: TORCH_CHECK(false, "prompt_mix (CUDA): unsupported dtype ", t);
  }
}

pmc::Sizes sizes_of(const at::Tensor& bank, const at::Tensor& indices, int64_t H, int64_t W) {
  return pmc::Sizes{bank.size(0), bank.size(1), bank.size(2), bank.size(3), indices.size(0), indices.size(1), H, W};
}

at::Tensor forward_cuda(const at::Tensor& bank_in, const at::Tensor& indices_in, const at::Tensor& weights_in,
                           c10::SymInt height, c10::SymInt width) {
  check_prompt_mix_inputs(bank_in, indices_in, weights_in);
  TORCH_CHECK(bank_in.is_cuda(), "prompt_mix (CUDA): bank must be a CUDA tensor");
  const int64_t H = height.expect_int(), W = width.expect_int();
  TORCH_CHECK(H >= 1 && W >= 1, "prompt_mix: output size must be positive, got (", H, ", ", W, ")");
  const c10::cuda::CUDAGuard guard(bank_in.device());
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor out = at::empty({indices.size(0), bank.size(1), H, W}, bank.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(pmc::launch_forward(dtype_of(bank.scalar_type()), sizes_of(bank, indices, H, W), bank.const_data_ptr(),
                                     indices.const_data_ptr<int64_t>(), weights.const_data_ptr(),
                                     out.mutable_data_ptr(), stream));
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& bank_in,
                                                            const at::Tensor& indices_in,
                                                            const at::Tensor& weights_in) {
  check_prompt_mix_inputs(bank_in, indices_in, weights_in);
  check_prompt_mix_grad(grad_out_in, bank_in, indices_in);
  TORCH_CHECK(bank_in.is_cuda(), "prompt_mix (CUDA): bank must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(bank_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const pmc::Sizes s = sizes_of(bank, indices, grad_out.size(2), grad_out.size(3));
  // The bank gradient is accumulated with atomics in float32 (float64 for double) and cast at the end.
  const at::ScalarType acc_type = bank.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_bank_acc = at::zeros(bank.sizes(), bank.options().dtype(acc_type));
  at::Tensor partial = at::empty({pmc::backward_partial_elems(s)}, bank.options().dtype(acc_type));
  at::Tensor grad_weights = at::empty(indices.sizes(), weights.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(pmc::launch_backward(dtype_of(bank.scalar_type()), s, grad_out.const_data_ptr(), bank.const_data_ptr(),
                                      indices.const_data_ptr<int64_t>(), weights.const_data_ptr(),
                                      grad_bank_acc.mutable_data_ptr(), partial.mutable_data_ptr(),
                                      grad_weights.mutable_data_ptr(), stream));
  at::Tensor grad_bank = acc_type == bank.scalar_type() ? grad_bank_acc : grad_bank_acc.to(bank.scalar_type());
  return {grad_bank, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl_fast, CUDA, m) {
  m.impl("prompt_mix", &forward_cuda);
  m.impl("_prompt_mix_backward", &backward_cuda);
}

}  // namespace cpl_fast
