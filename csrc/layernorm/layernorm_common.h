// Argument checks shared by the CPU and CUDA entry points of detr_fast::add_dropout_layernorm.
//
// Contract (see detr_fast/ops/layernorm.py): x and residual [..., d] of one floating dtype, or "mixed": x float16 or
// bfloat16 with a float32 residual (autocast's residual stream), d >= 1; weight and bias [d] of one dtype, either
// x's or float32; p in [0, 1); eps >= 0. Outputs: out [..., d] in residual's dtype, mean and rstd [rows]
// (rows = x.numel() / d) in acc dtype (float32, float64 for float64 inputs), rng_state [2] int64 = (seed, offset) of
// the dropout stream (common/layernorm_math.h), (0, 0) when p == 0. The backward takes grad_out in residual's dtype
// and returns (d x in x's dtype, d residual in residual's dtype, d weight, d bias) with d weight / d bias in
// weight's dtype.
#pragma once
#include <optional>

#include "common/checks.h"
#include "common/layernorm_math.h"

namespace detr_fast {

inline at::ScalarType ln_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The floating dtypes the kernels take for x.
inline void check_ln_float(const at::Tensor& x, const char* op) {
  const at::ScalarType dt = x.scalar_type();
  DETR_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
             ": x must be float32, float64, float16 or bfloat16, got ", dt);
}

// x float16/bfloat16 with a float32 residual: the kernels read x in its own dtype (no cast pass before them).
inline bool ln_mixed(const at::Tensor& x, const at::Tensor& residual) {
  return (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) && residual.scalar_type() == at::kFloat;
}

inline void check_ln_dtypes(const at::Tensor& x, const at::Tensor& residual, const char* op) {
  DETR_CHECK(residual.scalar_type() == x.scalar_type() || ln_mixed(x, residual), op,
             ": x and residual must share one dtype (or be a float16/bfloat16 x with a float32 residual), got ",
             x.scalar_type(), " and ", residual.scalar_type());
}

inline void check_ln_params(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double p,
                            const char* op) {
  const int64_t d = x.size(-1);
  DETR_CHECK(weight.dim() == 1 && weight.size(0) == d && bias.dim() == 1 && bias.size(0) == d, op,
             ": weight and bias must have shape [d] = [", d, "] (the last dimension of x), got ", weight.sizes(),
             " and ", bias.sizes());
  DETR_CHECK(weight.scalar_type() == bias.scalar_type() &&
                 (weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat),
             op, ": weight and bias must share one dtype, x's (", x.scalar_type(), ") or float32, got ",
             weight.scalar_type(), " and ", bias.scalar_type());
  check_same_device(x, weight, op, "weight");
  check_same_device(x, bias, op, "bias");
  DETR_CHECK(p >= 0.0 && p < 1.0, op, ": dropout probability p must lie in [0, 1), got ", p);
}

inline void check_ln_inputs(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                            const at::Tensor& bias, double p, double eps) {
  const char* op = "add_dropout_layernorm";
  DETR_CHECK(x.dim() >= 1 && x.size(-1) >= 1, op, ": x must have shape [..., d] with d >= 1, got ", x.sizes());
  check_float(x, "add_dropout_layernorm: x");
  check_ln_float(x, op);
  DETR_CHECK(residual.sizes() == x.sizes(), op, ": x and residual must have the same shape, got ", x.sizes(),
             " and ", residual.sizes());
  check_ln_dtypes(x, residual, op);
  check_same_device(x, residual, "add_dropout_layernorm: x", "residual");
  check_ln_params(x, weight, bias, p, op);
  DETR_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
}

inline void check_ln_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual,
                                     const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
                                     double p, const at::Tensor& rng_state) {
  const char* op = "add_dropout_layernorm_backward";
  DETR_CHECK(x.dim() >= 1 && x.size(-1) >= 1, op, ": x must have shape [..., d] with d >= 1, got ", x.sizes());
  check_float(x, "add_dropout_layernorm_backward: x");
  check_ln_float(x, op);
  DETR_CHECK(grad_out.sizes() == x.sizes() && residual.sizes() == x.sizes(), op,
             ": grad_out and residual must have x's shape ", x.sizes(), ", got ", grad_out.sizes(), " and ",
             residual.sizes());
  check_ln_dtypes(x, residual, op);
  DETR_CHECK(grad_out.scalar_type() == residual.scalar_type(), op,
             ": grad_out must have the output's (residual's) dtype ", residual.scalar_type(), ", got ",
             grad_out.scalar_type());
  check_ln_params(x, weight, weight, p, op);
  const int64_t rows = x.numel() / x.size(-1);
  DETR_CHECK(mean.dim() == 1 && mean.size(0) == rows && rstd.dim() == 1 && rstd.size(0) == rows, op,
             ": mean and rstd must have shape [rows] = [", rows, "], got ", mean.sizes(), " and ", rstd.sizes());
  DETR_CHECK(mean.scalar_type() == ln_acc_dtype(x) && rstd.scalar_type() == ln_acc_dtype(x), op,
             ": mean and rstd must be ", ln_acc_dtype(x), ", got ", mean.scalar_type(), " and ", rstd.scalar_type());
  DETR_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2, op,
             ": rng_state must be int64 [2], got ", rng_state.scalar_type(), " ", rng_state.sizes());
  check_same_device(x, grad_out, "add_dropout_layernorm_backward: x", "grad_out");
  check_same_device(x, residual, "add_dropout_layernorm_backward: x", "residual");
  check_same_device(x, mean, "add_dropout_layernorm_backward: x", "mean");
  check_same_device(x, rstd, "add_dropout_layernorm_backward: x", "rstd");
  check_same_device(x, rng_state, "add_dropout_layernorm_backward: x", "rng_state");
}

inline void check_ln_mask_args(const at::Tensor& rng_state, int64_t rows, int64_t d, double p) {
  DETR_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2,
             "add_dropout_layernorm_mask: rng_state must be int64 [2], got ", rng_state.scalar_type(), " ",
             rng_state.sizes());
  DETR_CHECK(rows >= 0 && d >= 0, "add_dropout_layernorm_mask: rows and d must be non-negative");
  DETR_CHECK(p >= 0.0 && p < 1.0, "add_dropout_layernorm_mask: p must lie in [0, 1), got ", p);
}

// relu_dropout(x, p) and its backward (grad_out, out, p): x any floating dtype, [..., d] with at least one dimension.
inline void check_relu_dropout(const at::Tensor& x, double p, const char* op) {
  DETR_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  check_ln_float(x, op);
  DETR_CHECK(p >= 0.0 && p < 1.0, op, ": dropout probability p must lie in [0, 1), got ", p);
}

inline void check_relu_dropout_backward(const at::Tensor& grad_out, const at::Tensor& out, double p) {
  const char* op = "relu_dropout_backward";
  check_relu_dropout(out, p, op);
  DETR_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == out.scalar_type(), op,
             ": grad_out must have out's shape and dtype ", out.sizes(), " ", out.scalar_type(), ", got ",
             grad_out.sizes(), " ", grad_out.scalar_type());
  check_same_device(out, grad_out, "relu_dropout_backward: out", "grad_out");
}

// The operands of the forward, contiguous (weight and bias in the accumulation dtype), and its outputs allocated
// like them: the CPU and CUDA entry points share this before their kernels.
struct LnForwardIO {
  at::Tensor x, r, w, b, out, mean, rstd;
  int64_t d = 0, rows = 0;
};

inline LnForwardIO ln_forward_io(const at::Tensor& x, const at::Tensor& r, const at::Tensor& weight,
                                 const at::Tensor& bias) {
  const at::ScalarType acc = ln_acc_dtype(x);
  LnForwardIO io;
  io.x = x.contiguous();
  io.r = r.contiguous();
  io.w = weight.to(acc).contiguous();
  io.b = bias.to(acc).contiguous();
  io.d = x.size(-1);
  io.rows = x.numel() / io.d;
  io.out = at::empty(x.sizes(), io.r.options());
  io.mean = at::empty({io.rows}, io.x.options().dtype(acc));
  io.rstd = at::empty({io.rows}, io.x.options().dtype(acc));
  return io;
}

// The backward's operands, contiguous (weight in the accumulation dtype), and its input gradients allocated.
struct LnBackwardIO {
  at::Tensor go, x, r, w, mean, rstd, dx, dr;
  int64_t d = 0, rows = 0;
};

inline LnBackwardIO ln_backward_io(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& r,
                                   const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd) {
  LnBackwardIO io;
  io.go = grad_out.contiguous();
  io.x = x.contiguous();
  io.r = r.contiguous();
  io.w = weight.to(ln_acc_dtype(x)).contiguous();
  io.mean = mean.contiguous();
  io.rstd = rstd.contiguous();
  io.d = x.size(-1);
  io.rows = x.numel() / io.d;
  io.dx = at::empty(x.sizes(), io.x.options());
  io.dr = at::empty(x.sizes(), io.r.options());
  return io;
}

inline void check_ln_seed(std::optional<int64_t> seed, int64_t offset) {
  DETR_CHECK(!seed.has_value() || (*seed >= 0 && offset >= 0),
             "add_dropout_layernorm: seed and offset must be non-negative");
}

}  // namespace detr_fast
