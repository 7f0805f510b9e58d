// CUDA entry points of detr_fast::add_dropout_layernorm, its backward, its dropout mask and relu_dropout: argument
// checks, the device guard, the dropout stream's Philox state, then the launchers of layernorm_kernels.cuh on the
// current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>

#include "layernorm/layernorm_kernels.cuh"

namespace detr_fast {
namespace {

int sm_count(int device) {
  static int cached[64] = {0};
  if (device >= 0 && device < 64 && cached[device] > 0) return cached[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cached[device] = n;
  return n;
}

LaunchCtx ctx_of(const at::Tensor& t) { return {c10::cuda::getCurrentCUDAStream(), sm_count(t.device().index())}; }

// The Philox state of one dropout call over `rows` rows: the explicit (seed, offset), or a reserved range of the
// device's default generator (no host sync; CUDA-graph safe).
at::PhiloxCudaState dropout_philox(const at::Tensor& x, double p, int64_t rows, std::optional<int64_t> seed,
                                   int64_t offset) {
  if (p <= 0.0) return at::PhiloxCudaState(0, 0);
  check_ln_seed(seed, offset);
  if (seed.has_value()) return at::PhiloxCudaState(static_cast<uint64_t>(*seed), static_cast<uint64_t>(offset));
  at::Generator gen = at::cuda::detail::getDefaultCUDAGenerator(x.device().index());
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get<at::CUDAGeneratorImpl>()->philox_cuda_state(ln_dropout_offset_increment(rows));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_dropout_layernorm_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& weight, const at::Tensor& bias, double p,
    double eps, std::optional<int64_t> seed, int64_t offset) {
  check_ln_inputs(x, r, weight, bias, p, eps);
  check_cuda_d(x);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.numel() / x.size(-1);
  return ln_forward(x, r, weight, bias, p, eps, dropout_philox(x, p, rows, seed, offset), ctx_of(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_dropout_layernorm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& r, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double p, const at::Tensor& rng_state) {
  check_ln_backward_inputs(grad_out, x, r, weight, mean, rstd, p, rng_state);
  check_cuda_d(x);
  c10::cuda::CUDAGuard guard(x.device());
  return ln_backward(grad_out, x, r, weight, mean, rstd, p, rng_state, ctx_of(x));
}

at::Tensor add_dropout_layernorm_mask_cuda(const at::Tensor& rng_state, int64_t rows, int64_t d, double p) {
  check_ln_mask_args(rng_state, rows, d, p);
  c10::cuda::CUDAGuard guard(rng_state.device());
  return ln_mask(rng_state, rows, d, p, ctx_of(rng_state));
}

std::tuple<at::Tensor, at::Tensor> relu_dropout_cuda(const at::Tensor& x, double p, std::optional<int64_t> seed,
                                                     int64_t offset) {
  check_relu_dropout(x, p, "relu_dropout");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.numel() / std::max<int64_t>(x.size(-1), 1);
  return relu_dropout_forward(x, p, dropout_philox(x, p, rows, seed, offset), ctx_of(x));
}

at::Tensor relu_dropout_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out, double p) {
  check_relu_dropout_backward(grad_out, out, p);
  c10::cuda::CUDAGuard guard(out.device());
  return relu_dropout_backward(grad_out, out, p, ctx_of(out));
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CUDA, m) {
  m.impl("relu_dropout", &detr_fast::relu_dropout_cuda);
  m.impl("relu_dropout_backward", &detr_fast::relu_dropout_backward_cuda);
  m.impl("add_dropout_layernorm", &detr_fast::add_dropout_layernorm_cuda);
  m.impl("add_dropout_layernorm_backward", &detr_fast::add_dropout_layernorm_backward_cuda);
  m.impl("add_dropout_layernorm_mask", &detr_fast::add_dropout_layernorm_mask_cuda);
}
