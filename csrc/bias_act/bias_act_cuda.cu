// CUDA entry points of detr_fast::bias_act and relu_backward_sum: argument checks and the device guard, then the
// launchers of bias_act_kernels.cuh on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "bias_act/bias_act_kernels.cuh"

namespace detr_fast {
namespace {

at::Tensor bias_act_cuda(const at::Tensor& x, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                         bool relu) {
  check_bias_act_inputs(x, bias, residual);
  c10::cuda::CUDAGuard guard(x.device());
  return bias_act_launch(x, bias, residual, relu, current_launch_ctx());
}

at::Tensor relu_backward_sum_cuda(const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& out) {
  check_relu_backward_sum_inputs(grad_a, grad_b, out);
  c10::cuda::CUDAGuard guard(out.device());
  return relu_backward_sum_launch(grad_a, grad_b, out, current_launch_ctx());
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CUDA, m) {
  m.impl("bias_act", &detr_fast::bias_act_cuda);
  m.impl("relu_backward_sum", &detr_fast::relu_backward_sum_cuda);
}
