// CUDA entry point of detr_fast::space_to_depth: argument checks and the device guard, then the launcher of
// s2d_kernels.cuh on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "pool/s2d_kernels.cuh"

namespace detr_fast {
namespace {

at::Tensor space_to_depth_cuda(const at::Tensor& x, int64_t kernel, at::IntArrayRef padding, int64_t channels,
                               at::ScalarType dtype) {
  const S2dParams p = check_space_to_depth(x, kernel, padding, channels, dtype);
  c10::cuda::CUDAGuard guard(x.device());
  return space_to_depth_launch(x, p, dtype, current_launch_ctx());
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CUDA, m) { m.impl("space_to_depth", &detr_fast::space_to_depth_cuda); }
