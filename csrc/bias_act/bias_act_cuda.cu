// CUDA entry point of detr_fast::bias_act: argument checks and the device guard, then the launcher of
// bias_act_kernels.cuh on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "bias_act/bias_act_kernels.cuh"

namespace detr_fast {
namespace {

at::Tensor bias_act_cuda(const at::Tensor& x, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                         bool relu) {
  check_bias_act_inputs(x, bias, residual);
  c10::cuda::CUDAGuard guard(x.device());
  const LaunchCtx ctx{c10::cuda::getCurrentCUDAStream(), at::cuda::getCurrentDeviceProperties()->multiProcessorCount};
  return bias_act_launch(x, bias, residual, relu, ctx);
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CUDA, m) { m.impl("bias_act", &detr_fast::bias_act_cuda); }
