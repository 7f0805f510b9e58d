// Argument checks and layout handling shared by the CPU and CUDA entry points of detr_fast::bias_act.
//
// Contract (see detr_fast/ops/bias_act.py): x [N, C, ...] float32/float64/float16/bfloat16; bias [C] in x's dtype
// or float32; residual (optional) with x's shape, dtype and device. Output: x's shape and dtype, channels_last when
// x is channels_last (residual is brought to x's layout), contiguous otherwise.
#pragma once
#include <optional>

#include "common/bias_act_math.h"
#include "common/checks.h"

namespace detr_fast {

inline at::ScalarType bias_act_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_bias_act_inputs(const at::Tensor& x, const at::Tensor& bias,
                                  const std::optional<at::Tensor>& residual) {
  const char* op = "bias_act";
  DETR_CHECK(x.dim() >= 2, op, ": x must have shape [N, C, ...], got ", x.sizes());
  const at::ScalarType dt = x.scalar_type();
  DETR_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
             ": x must be float32, float64, float16 or bfloat16, got ", dt);
  DETR_CHECK(bias.dim() == 1 && bias.size(0) == x.size(1), op, ": bias must have shape [C] = [", x.size(1),
             "] (dimension 1 of x), got ", bias.sizes());
  DETR_CHECK(bias.scalar_type() == dt || bias.scalar_type() == at::kFloat, op, ": bias must be x's dtype (", dt,
             ") or float32, got ", bias.scalar_type());
  check_same_device(x, bias, "bias_act: x", "bias");
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    DETR_CHECK(r.sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ", r.sizes());
    DETR_CHECK(r.scalar_type() == dt, op, ": residual must have x's dtype ", dt, ", got ", r.scalar_type());
    check_same_device(x, r, "bias_act: x", "residual");
  }
}

// detr_fast::relu_backward_sum: grad_a, grad_b and out of one shape, dtype (float32/float64/float16/bfloat16) and
// device; the result takes out's layout (channels_last when out is, contiguous otherwise), the gradients are brought to
// it.
inline void check_relu_backward_sum_inputs(const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& out) {
  const char* op = "relu_backward_sum";
  const at::ScalarType dt = out.scalar_type();
  DETR_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
             ": out must be float32, float64, float16 or bfloat16, got ", dt);
  DETR_CHECK(grad_a.sizes() == out.sizes() && grad_b.sizes() == out.sizes(), op,
             ": grad_a, grad_b and out must have one shape, got ", grad_a.sizes(), ", ", grad_b.sizes(), " and ",
             out.sizes());
  DETR_CHECK(grad_a.scalar_type() == dt && grad_b.scalar_type() == dt, op,
             ": grad_a, grad_b and out must have one dtype, got ", grad_a.scalar_type(), ", ", grad_b.scalar_type(),
             " and ", dt);
  check_same_device(out, grad_a, "relu_backward_sum: out", "grad_a");
  check_same_device(out, grad_b, "relu_backward_sum: out", "grad_b");
}

// grad_a, grad_b, out and the result in out's layout, every one dense in it: the op is then a flat pass.
struct ReluBackwardSumLayout {
  at::Tensor a, b, out, result;
};

inline ReluBackwardSumLayout relu_backward_sum_layout(const at::Tensor& grad_a, const at::Tensor& grad_b,
                                                      const at::Tensor& out) {
  const bool channels_last =
      out.dim() == 4 && !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::MemoryFormat fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  ReluBackwardSumLayout l;
  l.a = grad_a.contiguous(fmt);
  l.b = grad_b.contiguous(fmt);
  l.out = out.contiguous(fmt);
  l.result = at::empty(out.sizes(), out.options().memory_format(fmt));
  return l;
}

// x, residual and the output in one layout, and x viewed as [outer, C, inner].
struct BiasActLayout {
  at::Tensor x, residual, out;  // residual undefined when absent
  at::Tensor bias_acc;           // bias in the accumulation dtype, contiguous (set by the entry point)
  int64_t C = 0, inner = 1;
};

inline BiasActLayout bias_act_layout(const at::Tensor& x_in, const std::optional<at::Tensor>& residual) {
  BiasActLayout l;
  const bool channels_last =
      x_in.dim() == 4 && !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::MemoryFormat fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  l.x = x_in.contiguous(fmt);
  if (residual.has_value()) l.residual = residual->contiguous(fmt);
  l.out = at::empty(x_in.sizes(), x_in.options().memory_format(fmt));
  l.C = x_in.size(1);
  if (!channels_last) {
    for (int64_t d = 2; d < x_in.dim(); ++d) l.inner *= x_in.size(d);
  }
  return l;
}

}  // namespace detr_fast
