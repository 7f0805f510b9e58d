// CUDA entry point of detr_fast::scale_many: argument checks and the device guard, then the launcher of
// scale_kernels.cuh on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "scale/scale_kernels.cuh"

namespace detr_fast {
namespace {

std::vector<at::Tensor> scale_many_cuda(at::TensorList xs_in, const at::Tensor& scale, at::ScalarType dtype) {
  std::vector<at::Tensor> xs(xs_in.begin(), xs_in.end());
  check_scale_many(xs, scale, dtype);
  c10::cuda::CUDAGuard guard(scale.device());
  return scale_many_launch(xs, scale, dtype, current_launch_ctx());
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CUDA, m) { m.impl("scale_many", &detr_fast::scale_many_cuda); }
