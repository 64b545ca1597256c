// CUDA registration of cpl_fast::cpr_distances and its backward: checks, layout, allocation, stream; the
// kernels and their launchers are in cpr_distances_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../cpr_distances_common.h"
#include "cpr_distances_cuda.h"

namespace cpl_fast {
namespace cpr {
namespace {

// ATen's storage types and the CUDA types the launchers are instantiated for (same bits).
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
const typename CudaType<scalar_t>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename CudaType<scalar_t>::type* cuda_mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

cuda::Layout make_layout(const Sizes& s, const at::Tensor& f_pos, const at::Tensor& f_gt, const at::Tensor& f_neg) {
  return {s.batch, s.negatives, s.per_sample, f_pos.stride(0), f_gt.stride(0), f_neg.stride(0), f_neg.stride(1)};
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor> cpr_distances_cuda(const at::Tensor& f_pos_in, const at::Tensor& f_gt_in,
                                                      const at::Tensor& f_neg_in,
                                                      const c10::optional<at::Tensor>& neg_weights) {
  const Sizes s = check_inputs(f_pos_in, f_gt_in, f_neg_in, neg_weights);
  const c10::cuda::CUDAGuard guard(f_pos_in.device());
  const at::Tensor f_pos = dense_samples(f_pos_in, 1);
  const at::Tensor f_gt = dense_samples(f_gt_in, 1);
  const at::Tensor f_neg = dense_samples(f_neg_in, 2);
  const cuda::Layout layout = make_layout(s, f_pos, f_gt, f_neg);
  at::Tensor l_pos = at::empty({s.batch}, f_pos.options());
  at::Tensor l_neg = at::empty({s.batch}, f_pos.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f_pos.scalar_type(), "cpr_distances_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = f_pos.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor w = weights_or_ones(neg_weights, s.batch, s.negatives, acc);
    at::Tensor partials = at::empty({cuda::forward_partials_size(layout)}, acc);
    check_launch(cuda::launch_cpr_distances_forward(
                     cuda_ptr<scalar_t>(f_pos), cuda_ptr<scalar_t>(f_gt), cuda_ptr<scalar_t>(f_neg),
                     w.const_data_ptr<acc_t>(), layout, partials.data_ptr<acc_t>(), cuda_mutable_ptr<scalar_t>(l_pos),
                     cuda_mutable_ptr<scalar_t>(l_neg), c10::cuda::getCurrentCUDAStream()),
                 "cpr_distances CUDA forward");
  });
  return {l_pos, l_neg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpr_distances_backward_cuda(
    const at::Tensor& grad_l_pos, const at::Tensor& grad_l_neg, const at::Tensor& f_pos_in, const at::Tensor& f_gt_in,
    const at::Tensor& f_neg_in, const c10::optional<at::Tensor>& neg_weights) {
  const Sizes s = check_inputs(f_pos_in, f_gt_in, f_neg_in, neg_weights);
  const c10::cuda::CUDAGuard guard(f_pos_in.device());
  const at::Tensor f_pos = dense_samples(f_pos_in, 1);
  const at::Tensor f_gt = dense_samples(f_gt_in, 1);
  const at::Tensor f_neg = dense_samples(f_neg_in, 2);
  const cuda::Layout layout = make_layout(s, f_pos, f_gt, f_neg);
  at::Tensor grad_pos = at::empty(f_pos.sizes(), f_pos.options());
  at::Tensor grad_gt = at::empty(f_gt.sizes(), f_gt.options());
  at::Tensor grad_neg = at::empty(f_neg.sizes(), f_neg.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f_pos.scalar_type(), "cpr_distances_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = f_pos.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const auto [c_pos, c_neg] = backward_coefficients(grad_l_pos, grad_l_neg, neg_weights, s, acc);
    check_launch(cuda::launch_cpr_distances_backward(
                     cuda_ptr<scalar_t>(f_pos), cuda_ptr<scalar_t>(f_gt), cuda_ptr<scalar_t>(f_neg),
                     c_pos.const_data_ptr<acc_t>(), c_neg.const_data_ptr<acc_t>(), layout,
                     cuda_mutable_ptr<scalar_t>(grad_pos), cuda_mutable_ptr<scalar_t>(grad_gt),
                     cuda_mutable_ptr<scalar_t>(grad_neg), c10::cuda::getCurrentCUDAStream()),
                 "cpr_distances CUDA backward");
  });
  return {grad_pos, grad_gt, grad_neg};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl_fast, CUDA, m) {
  m.impl("cpr_distances", &cpr_distances_cuda);
  m.impl("_cpr_distances_backward", &cpr_distances_backward_cuda);
}

}  // namespace cpr
}  // namespace cpl_fast
