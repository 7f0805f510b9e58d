// Host emulation of the CUDA kernels of add_dropout_layernorm (forward, backward, mask), relu_dropout (forward,
// backward), bias_act, relu_backward_sum, scale_many, max_pool2d_nhwc, space_to_depth, linear_assignment, matching_cost and box_loss (forward,
// backward), for machines without a GPU (CI among them): the *_kernels.cuh headers of csrc/layernorm,
// csrc/bias_act, csrc/scale, csrc/pool, csrc/assignment and csrc/box_ops compiled for the host on top of
// tests/emulator/cuda_host.h. The launchers of those headers run as the device build runs them (dtype dispatch,
// vector paths, grid sizes, the backward's partial sums); `sms` stands in for the device's SM count, so a small value
// makes the grid-stride loops go round. Each entry point checks its arguments as the CUDA op does. Dropout needs an
// explicit seed (there is no device generator to draw one from). Driven by tests/test_cuda_emulated.py.
#include <torch/extension.h>

#include "cuda_host.h"

#include "assignment/assignment_kernels.cuh"
#include "bias_act/bias_act_kernels.cuh"
#include "box_ops/box_ops_kernels.cuh"
#include "layernorm/layernorm_kernels.cuh"
#include "pool/pool_kernels.cuh"
#include "pool/s2d_kernels.cuh"
#include "scale/scale_kernels.cuh"

namespace detr_fast {
namespace {

LaunchCtx emu_ctx(int64_t sms) {
  DETR_CHECK(sms >= 1, "emulator: sms must be at least 1, got ", sms);
  return {nullptr, static_cast<int>(sms)};
}

at::PhiloxCudaState explicit_philox(double p, std::optional<int64_t> seed, int64_t offset) {
  if (p <= 0.0) return at::PhiloxCudaState(0, 0);
  DETR_CHECK(seed.has_value(), "emulator: dropout needs an explicit seed");
  check_ln_seed(seed, offset);
  return at::PhiloxCudaState(static_cast<uint64_t>(*seed), static_cast<uint64_t>(offset));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emu_ln_forward(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& weight, const at::Tensor& bias, double p, double eps,
    std::optional<int64_t> seed, int64_t offset, int64_t sms) {
  check_ln_inputs(x, r, weight, bias, p, eps);
  check_cuda_d(x);
  return ln_forward(x, r, weight, bias, p, eps, explicit_philox(p, seed, offset), emu_ctx(sms));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emu_ln_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& r, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double p, const at::Tensor& rng_state, int64_t sms) {
  check_ln_backward_inputs(grad_out, x, r, weight, mean, rstd, p, rng_state);
  check_cuda_d(x);
  return ln_backward(grad_out, x, r, weight, mean, rstd, p, rng_state, emu_ctx(sms));
}

at::Tensor emu_ln_mask(const at::Tensor& rng_state, int64_t rows, int64_t d, double p, int64_t sms) {
  check_ln_mask_args(rng_state, rows, d, p);
  return ln_mask(rng_state, rows, d, p, emu_ctx(sms));
}

std::tuple<at::Tensor, at::Tensor> emu_relu_dropout(const at::Tensor& x, double p, std::optional<int64_t> seed,
                                                    int64_t offset, int64_t sms) {
  check_relu_dropout(x, p, "relu_dropout");
  return relu_dropout_forward(x, p, explicit_philox(p, seed, offset), emu_ctx(sms));
}

at::Tensor emu_relu_dropout_backward(const at::Tensor& grad_out, const at::Tensor& out, double p, int64_t sms) {
  check_relu_dropout_backward(grad_out, out, p);
  return relu_dropout_backward(grad_out, out, p, emu_ctx(sms));
}

at::Tensor emu_max_pool2d_nhwc(const at::Tensor& x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, int64_t sms) {
  const PoolParams p = check_max_pool_nhwc(x, kernel, stride, padding);
  return max_pool_nhwc_launch(x, p, emu_ctx(sms));
}

// dtype_like: a tensor of the output dtype (a dtype argument without a pybind caster for it)
at::Tensor emu_space_to_depth(const at::Tensor& x, int64_t kernel, std::vector<int64_t> padding, int64_t channels,
                              const at::Tensor& dtype_like, int64_t sms) {
  const S2dParams p = check_space_to_depth(x, kernel, padding, channels, dtype_like.scalar_type());
  return space_to_depth_launch(x, p, dtype_like.scalar_type(), emu_ctx(sms));
}

// dtype_like: a tensor of the output dtype (a dtype argument without a pybind caster for it)
std::vector<at::Tensor> emu_scale_many(const std::vector<at::Tensor>& xs, const at::Tensor& scale,
                                       const at::Tensor& dtype_like, int64_t sms) {
  const at::ScalarType dtype = dtype_like.scalar_type();
  check_scale_many(xs, scale, dtype);
  return scale_many_launch(xs, scale, dtype, emu_ctx(sms));
}

at::Tensor emu_bias_act(const at::Tensor& x, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                        bool relu, int64_t sms) {
  check_bias_act_inputs(x, bias, residual);
  return bias_act_launch(x, bias, residual, relu, emu_ctx(sms));
}

at::Tensor emu_relu_backward_sum(const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& out,
                                 int64_t sms) {
  check_relu_backward_sum_inputs(grad_a, grad_b, out);
  return relu_backward_sum_launch(grad_a, grad_b, out, emu_ctx(sms));
}

at::Tensor emu_linear_assignment(const at::Tensor& cost, const at::Tensor& num_targets, int64_t engine) {
  const auto shape = assignment::check_inputs(cost, num_targets);
  DETR_CHECK(engine >= 0 && engine <= 2, "emulator: engine must be 0 (auto), 1 (auction) or 2 (ssp)");
  return linear_assignment_launch(cost, num_targets, shape, static_cast<int>(engine), emu_ctx(1));
}

at::Tensor emu_matching_cost(const at::Tensor& logits, const at::Tensor& pred_boxes, const at::Tensor& labels,
                             const at::Tensor& boxes, const at::Tensor& num_targets, double w_class, double w_bbox,
                             double w_giou) {
  const auto s = box_ops::check_matching_cost(logits, pred_boxes, labels, boxes, num_targets);
  return boxk::matching_cost_launch(s, logits, pred_boxes, labels, boxes, num_targets, w_class, w_bbox, w_giou,
                                    nullptr);
}

std::tuple<at::Tensor, at::Tensor> emu_box_loss(const at::Tensor& pred, const at::Tensor& target) {
  box_ops::check_box_loss(pred, target, "box_loss");
  return boxk::box_loss_launch(pred, target, nullptr);
}

at::Tensor emu_box_loss_backward(const at::Tensor& grad_l1, const at::Tensor& grad_giou, const at::Tensor& pred,
                                 const at::Tensor& target) {
  box_ops::check_box_loss_backward(grad_l1, grad_giou, pred, target);
  return boxk::box_loss_backward_launch(grad_l1, grad_giou, pred, target, nullptr);
}

// The emulator's own check (tests/emulator/race_check.py): each thread reads its neighbour's shared-memory slot,
// after a __syncthreads when `sync`, racing with the neighbour's write otherwise; returns what was read.
__global__ void neighbour_read_kernel(float* out, bool sync) {
  __shared__ float slot[64];
  slot[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (sync) __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = slot[(threadIdx.x + 1) % 64];
}

at::Tensor emu_neighbour_read(bool sync) {
  at::Tensor out = at::empty({2, 64});
  launch_kernel(neighbour_read_kernel, dim3(2), dim3(64), nullptr, out.data_ptr<float>(), sync);
  return out;
}

// The emulator's check of barrier divergence: thread 0 returns while the rest of the block waits at __syncthreads,
// which the emulator must report as an error (on the device: undefined behavior).
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

void emu_divergent_barrier() {
  at::Tensor out = at::zeros({64});
  launch_kernel(divergent_barrier_kernel, dim3(1), dim3(64), nullptr, out.data_ptr<float>());
}

}  // namespace
}  // namespace detr_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("add_dropout_layernorm", &detr_fast::emu_ln_forward, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("bias"), py::arg("p"), py::arg("eps"), py::arg("seed") = py::none(), py::arg("offset") = 0,
        py::arg("sms") = 2);
  m.def("add_dropout_layernorm_backward", &detr_fast::emu_ln_backward, py::arg("grad_out"), py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("p"),
        py::arg("rng_state"), py::arg("sms") = 2);
  m.def("add_dropout_layernorm_mask", &detr_fast::emu_ln_mask, py::arg("rng_state"), py::arg("rows"), py::arg("d"),
        py::arg("p"), py::arg("sms") = 2);
  m.def("relu_dropout", &detr_fast::emu_relu_dropout, py::arg("x"), py::arg("p"), py::arg("seed") = py::none(),
        py::arg("offset") = 0, py::arg("sms") = 2);
  m.def("relu_dropout_backward", &detr_fast::emu_relu_dropout_backward, py::arg("grad_out"), py::arg("out"),
        py::arg("p"), py::arg("sms") = 2);
  m.def("linear_assignment", &detr_fast::emu_linear_assignment, py::arg("cost"), py::arg("num_targets"),
        py::arg("engine") = 0);
  m.def("matching_cost", &detr_fast::emu_matching_cost, py::arg("logits"), py::arg("pred_boxes"), py::arg("labels"),
        py::arg("boxes"), py::arg("num_targets"), py::arg("w_class"), py::arg("w_bbox"), py::arg("w_giou"));
  m.def("box_loss", &detr_fast::emu_box_loss, py::arg("pred"), py::arg("target"));
  m.def("box_loss_backward", &detr_fast::emu_box_loss_backward, py::arg("grad_l1"), py::arg("grad_giou"),
        py::arg("pred"), py::arg("target"));
  m.def("divergent_barrier", &detr_fast::emu_divergent_barrier);
  m.def("neighbour_read", &detr_fast::emu_neighbour_read, py::arg("sync"));
  m.def("bias_act", &detr_fast::emu_bias_act, py::arg("x"), py::arg("bias"), py::arg("residual"), py::arg("relu"),
        py::arg("sms") = 2);
  m.def("relu_backward_sum", &detr_fast::emu_relu_backward_sum, py::arg("grad_a"), py::arg("grad_b"), py::arg("out"),
        py::arg("sms") = 2);
  m.def("max_pool2d_nhwc", &detr_fast::emu_max_pool2d_nhwc, py::arg("x"), py::arg("kernel"), py::arg("stride"),
        py::arg("padding"), py::arg("sms") = 2);
  m.def("space_to_depth", &detr_fast::emu_space_to_depth, py::arg("x"), py::arg("kernel"), py::arg("padding"),
        py::arg("channels"), py::arg("dtype_like"), py::arg("sms") = 2);
  m.def("scale_many", &detr_fast::emu_scale_many, py::arg("xs"), py::arg("scale"), py::arg("dtype_like"),
        py::arg("sms") = 2);
}
