// CUDA entry point of linear_assignment: argument checks, the device guard and the engine choice (read on the host),
// then the launcher of assignment_kernels.cuh on the current stream. No host-device sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "assignment/assignment_kernels.cuh"

namespace detr_fast {
namespace {

at::Tensor linear_assignment_cuda(const at::Tensor& cost, const at::Tensor& num_targets) {
  const auto shape = assignment::check_inputs(cost, num_targets);
  c10::cuda::CUDAGuard guard(cost.device());
  return linear_assignment_launch(cost, num_targets, shape, assignment::engine_from_env(),
                                  LaunchCtx{c10::cuda::getCurrentCUDAStream(), 0});
}

}  // namespace

TORCH_LIBRARY_IMPL(detr_fast, CUDA, m) { m.impl("linear_assignment", &linear_assignment_cuda); }

}  // namespace detr_fast
