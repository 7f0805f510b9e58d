// The one registration point of detr_fast's operators: every schema on one screen.
// Kernels live in csrc/<op>/<op>_cpu.cpp (TORCH_LIBRARY_IMPL(detr_fast, CPU, m)) and csrc/<op>/<op>_cuda.cu
// (TORCH_LIBRARY_IMPL(detr_fast, CUDA, m)); the dispatcher picks the device. Python wrappers with fake tensors
// and autograd are in detr_fast/ops/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing detr_fast._C loads this library and with it the registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(detr_fast, m) {
  // Box kernels (csrc/box_ops). logits [*, B, Q, C], pred_boxes [*, B, Q, 4], labels [B, T], boxes [B, T, 4],
  // num_targets [B] -> cost [*, B, Q, T] (fp32; fp64 for fp64 input), padded columns +inf.
  m.def(
      "matching_cost(Tensor logits, Tensor pred_boxes, Tensor labels, Tensor boxes, Tensor num_targets, "
      "float w_class, float w_bbox, float w_giou) -> Tensor");
  // pred [N, 4], target [N, 4] (cxcywh) -> (l1 [N], giou_loss [N]).
  m.def("box_loss(Tensor pred, Tensor target) -> (Tensor, Tensor)");
  m.def("box_loss_backward(Tensor grad_l1, Tensor grad_giou, Tensor pred, Tensor target) -> Tensor");

  // Linear assignment (csrc/assignment). cost [*, B, Q, T], num_targets [B] -> assignment [*, B, Q] int64.
  m.def("linear_assignment(Tensor cost, Tensor num_targets) -> Tensor");

  // Fused attention (csrc/attention). q [B, H, Lq, D], k/v [B, H, Lk, D], mask [B, Lk] bool (True = padded).
  // Returns (out [B, H, Lq, D], lse [B, H, Lq] fp32 (fp64 for fp64 input), rng_state [2] int64 = (seed, offset) of
  // the Philox dropout stream, out_f32: out before rounding, fp32 [B, H, Lq, D] for fp16/bf16 inputs and empty
  // otherwise), all on q's device. Without a seed, dropout draws (seed, offset) from the device's default generator;
  // backward and attention_dropout_mask regenerate the same keep mask from rng_state. The backward's `out` is
  // out_f32 for fp16/bf16 inputs and out otherwise (its rowsum(grad_out * out) then carries no output rounding).
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float dropout_p, int? seed=None, "
      "int offset=0) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, float dropout_p, Tensor rng_state) -> (Tensor, Tensor, Tensor)");
  // keep [B, H, Lq, Lk] bool (True = kept): the dropout mask the kernels apply for rng_state (tests).
  m.def("attention_dropout_mask(Tensor rng_state, int B, int H, int Lq, int Lk, float dropout_p) -> Tensor");

  // Fused residual add + dropout + LayerNorm (csrc/layernorm): out = layer_norm(residual + dropout(x, p)).
  // x, residual [..., d] of one dtype; weight, bias [d] in x's dtype or float32. Returns (out [..., d] in x's dtype,
  // mean [rows], rstd [rows] (float32; float64 for float64 input; rows = numel / d), rng_state [2] int64 =
  // (seed, offset) of the Philox dropout stream, (0, 0) when p == 0). Without a seed, dropout draws (seed, offset)
  // from the device's default generator; the backward and add_dropout_layernorm_mask regenerate the keep mask.
  m.def(
      "add_dropout_layernorm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float p, float eps, "
      "int? seed=None, int offset=0) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  // -> (grad_x, grad_residual, grad_weight, grad_bias); grad_weight and grad_bias in weight's dtype.
  m.def(
      "add_dropout_layernorm_backward(Tensor grad_out, Tensor x, Tensor residual, Tensor weight, Tensor mean, "
      "Tensor rstd, float p, Tensor rng_state) -> (Tensor, Tensor, Tensor, Tensor)");
  // keep [rows, d] bool (True = kept): the dropout mask the kernels apply to x viewed as [rows, d] (tests).
  m.def("add_dropout_layernorm_mask(Tensor rng_state, int rows, int d, float p) -> Tensor");
  // The FFN activation dropout(relu(x), p) (csrc/layernorm, same dropout stream as add_dropout_layernorm with x
  // viewed as [rows, d], so add_dropout_layernorm_mask rebuilds its mask). Returns (out in x's dtype and shape,
  // rng_state). The backward needs only out (no mask): grad_x = grad_out / (1 - p) where out > 0, else 0.
  m.def("relu_dropout(Tensor x, float p, int? seed=None, int offset=0) -> (Tensor, Tensor)",
        {at::Tag::nondeterministic_seeded});
  m.def("relu_dropout_backward(Tensor grad_out, Tensor out, float p) -> Tensor");

  // Bias + residual + ReLU (csrc/bias_act): out = relu(x + bias[c] + residual), relu and residual optional.
  // x [N, C, ...] float; bias [C] in x's dtype or float32; residual with x's shape and dtype. out: x's shape and
  // dtype, channels_last when x is. The backward is torch's threshold_backward and sum (detr_fast/ops/bias_act.py).
  m.def("bias_act(Tensor x, Tensor bias, Tensor? residual, bool relu) -> Tensor");
  // The gradient of a ReLU's output that reaches it along two paths, summed and masked in one pass: (grad_a + grad_b)
  // rounded to their dtype, 0 where out <= 0; as threshold_backward(grad_a + grad_b, out, 0). All three of one shape,
  // dtype and device; the result in out's layout (channels_last when out is). model.residual_grad_fusion.
  m.def("relu_backward_sum(Tensor grad_a, Tensor grad_b, Tensor out) -> Tensor");

  // Per-channel scaling of many tensors in one pass (csrc/scale): out[k] = xs[k] * scale[channels of k] in dtype,
  // each tensor's dimension 0 its channel (outermost in memory: contiguous or channels_last), tensor k's channels
  // after tensor k-1's in scale (float32/float64). Outputs keep their input's shape and strides. The folding of a
  // trunk's trainable convolution weights with their frozen BatchNorm scales, forward and backward, in one launch.
  m.def("scale_many(Tensor[] xs, Tensor scale, ScalarType dtype) -> Tensor[]");

  // Max pool of a channels_last input (csrc/pool): x [N, C, H, W] -> [N, C, Ho, Wo] channels_last, dilation 1, floor
  // mode, padded positions ignored, NaN propagated as torch's max_pool2d does; forward only (the frozen stem's pool).
  m.def("max_pool2d_nhwc(Tensor x, int[2] kernel, int[2] stride, int[2] padding) -> Tensor");

  // Space-to-depth input of a stride-2 convolution (csrc/pool): x [B, C, H, W] (any strides) -> S [B, channels, Hs,
  // Ws] channels_last in dtype, S[b, 4c + 2r + s, Y, X] = x[b, c, 2Y + r - ph, 2X + s - pw] or zero; the stride-2
  // convolution with an odd k x k kernel is then a stride-1 one over S with a ceil(k / 2)-wide kernel (the frozen stem:
  // model.stem_space_to_depth). Forward only.
  m.def("space_to_depth(Tensor x, int kernel, int[2] padding, int channels, ScalarType dtype) -> Tensor");
}
