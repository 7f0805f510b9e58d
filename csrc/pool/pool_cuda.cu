// CUDA entry point of detr_fast::max_pool2d_nhwc: argument checks and the device guard, then the launcher of
// pool_kernels.cuh on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "pool/pool_kernels.cuh"

namespace detr_fast {
namespace {

at::Tensor max_pool_nhwc_cuda(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  const PoolParams p = check_max_pool_nhwc(x, kernel, stride, padding);
  c10::cuda::CUDAGuard guard(x.device());
  return max_pool_nhwc_launch(x, p, current_launch_ctx());
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CUDA, m) { m.impl("max_pool2d_nhwc", &detr_fast::max_pool_nhwc_cuda); }
