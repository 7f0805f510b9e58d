// CUDA entry points of detr_fast::attention, attention_backward and attention_dropout_mask: argument checks, the
// device guard and the dropout generator state, then the host side of attention_launch.cuh (layouts, parameters,
// dispatch to the tensor-core kernels for fp16/bf16 and the FMA kernels for fp32) on the current stream.
//
// Dropout seed on CUDA: without an explicit seed, the op takes the device's default CUDA generator, locks its
// mutex and reserves an offset range with philox_cuda_state(round_up(B*H, 4)), exactly as torch's own random
// kernels do. The kernel unpacks (seed, offset) on the device (at::cuda::philox::unpack: no host sync, and under
// CUDA-graph capture the values come from the graph's seed/offset tensors) and the forward writes them to
// rng_state, which the backward reads on the device. torch.manual_seed therefore makes runs reproducible, and
// successive calls use disjoint Philox counters (philox.h).
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>

#include "attention/attention_launch.cuh"

namespace detr_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    double dropout_p, std::optional<int64_t> seed, int64_t offset) {
  check_attention_inputs(q, k, v, mask, dropout_p);
  check_cuda_supported(q);
  c10::cuda::CUDAGuard guard(q.device());
  at::PhiloxCudaState philox(0, 0);
  if (dropout_p > 0.0) {
    if (seed.has_value()) {
      DETR_CHECK(*seed >= 0 && offset >= 0, "attention: seed and offset must be non-negative");
      philox = at::PhiloxCudaState(static_cast<uint64_t>(*seed), static_cast<uint64_t>(offset));
    } else {
      at::Generator gen = at::cuda::detail::getDefaultCUDAGenerator(q.device().index());
      std::lock_guard<std::mutex> lock(gen.mutex());
      philox = gen.get<at::CUDAGeneratorImpl>()->philox_cuda_state(
          attn_dropout_offset_increment(q.size(0) * q.size(1)));
    }
  }
  return attention_forward_launch(q, k, v, mask, dropout_p, philox, c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, double dropout_p, const at::Tensor& rng_state) {
  check_attention_backward_inputs(grad_out, q, k, v, out, lse, mask, dropout_p, rng_state);
  check_cuda_supported(q);
  c10::cuda::CUDAGuard guard(q.device());
  return attention_backward_launch(grad_out, q, k, v, out, lse, mask, dropout_p, rng_state,
                                   c10::cuda::getCurrentCUDAStream());
}

at::Tensor attention_dropout_mask_cuda(const at::Tensor& rng_state, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                                       double dropout_p) {
  check_dropout_mask_args(rng_state, B, H, Lq, Lk, dropout_p);
  c10::cuda::CUDAGuard guard(rng_state.device());
  return attention_dropout_mask_launch(rng_state, B, H, Lq, Lk, dropout_p, c10::cuda::getCurrentCUDAStream());
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CUDA, m) {
  m.impl("attention", &detr_fast::attention_cuda);
  m.impl("attention_backward", &detr_fast::attention_backward_cuda);
  m.impl("attention_dropout_mask", &detr_fast::attention_dropout_mask_cuda);
}
