// Every schema of the cpl_fast:: namespace, in one place. Kernels register themselves per device
// in csrc/<op>/{cpu,cuda}/; fake kernels and autograd are registered from Python
// (cpl_fast/ops/<op>.py).
#include <Python.h>
#include <torch/library.h>

namespace cpl_fast {
PyMethodDef* cpu_allocator_methods();  // csrc/cpu_allocator/caching_allocator.cpp
}

// `import cpl_fast._C` runs the static registrations below; the module's own functions are the
// caching CPU allocator's controls (wrapped by cpl_fast/memory.py).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, cpl_fast::cpu_allocator_methods()};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(cpl_fast, m) {
  // out[b, c] = sum_j weights[b, j] * bilinear(bank[indices[b, j], c], (height, width))
  m.def("prompt_mix(Tensor bank, Tensor indices, Tensor weights, SymInt height, SymInt width) -> Tensor");
  // -> (grad_bank, grad_weights)
  m.def("_prompt_mix_backward(Tensor grad_out, Tensor bank, Tensor indices, Tensor weights) -> (Tensor, Tensor)");
  // -> (l_pos, l_neg), each (B,)
  m.def("cpr_distances(Tensor f_pos, Tensor f_gt, Tensor f_neg, Tensor? neg_weights) -> (Tensor, Tensor)");
  // -> (grad_f_pos, grad_f_gt, grad_f_neg)
  m.def(
      "_cpr_distances_backward(Tensor grad_l_pos, Tensor grad_l_neg, Tensor f_pos, Tensor f_gt, Tensor f_neg, "
      "Tensor? neg_weights) -> (Tensor, Tensor, Tensor)");
  // Layer norm over the channels of every pixel of an NCHW map x (B, C, *):
  //   with bias:  out = (x - mean_c x) * rstd * weight + bias   (Restormer's WithBias_LayerNorm)
  //   bias None:  out = x * rstd * weight                        (Restormer's BiasFree_LayerNorm)
  // rstd = 1 / sqrt(var_c x + eps), biased variance. -> (out, mean, rstd); mean and rstd (B, *) in the
  // accumulation type (float64 for float64, else float32), kept for the backward.
  m.def("channel_layernorm(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_weight, grad_bias); grad_bias is sum(grad_out) per channel whether or not the norm has
  // a bias, and the normalised value is the bias-free one when with_bias is false.
  m.def(
      "_channel_layernorm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd, "
      "bool with_bias) -> (Tensor, Tensor, Tensor)");
  // x (B, 2C, *) -> gelu(x[:, :C]) * x[:, C:], exact (erf) GELU: the gate of Restormer's feed-forward network.
  m.def("gated_gelu(Tensor x) -> Tensor");
  // -> grad_x (B, 2C, *)
  m.def("_gated_gelu_backward(Tensor grad_out, Tensor x) -> Tensor");
  // x (B, C, H, W), weight (C, 1, 3, 3) -> the depthwise 3x3 convolution, stride 1, padding 1, no bias
  // (F.conv2d(x, weight, padding=1, groups=C)).
  m.def("depthwise_conv3x3(Tensor x, Tensor weight) -> Tensor");
  // -> (grad_x, grad_weight)
  m.def("_depthwise_conv3x3_backward(Tensor grad_out, Tensor x, Tensor weight) -> (Tensor, Tensor)");
}
