// Argument checks and the per-tensor layout shared by the CPU and CUDA entry points of detr_fast::scale_many.
//
// Contract (see detr_fast/ops/scale.py): xs a list of tensors of one floating dtype on one device, each with its
// dimension 0 outermost in memory (contiguous, or channels_last when 4-D) and fewer than 2^31 elements; scale 1-D,
// float32 or float64, on their device, with sum(x.size(0)) elements (tensor k's channels follow tensor k-1's);
// dtype the outputs' floating dtype. Output k: xs[k]'s shape and strides, out[i] = x[i] * scale[off_k + channel].
#pragma once
#include <ATen/Dispatch.h>

#include <vector>

#include "common/checks.h"
#include "common/scale_math.h"

namespace detr_fast {

inline bool scale_outer_dense(const at::Tensor& x) {
  return x.dim() == 0 ? false
                      : x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast));
}

inline bool scale_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The accumulation dtype: double when the input, the scale or the output is double, float otherwise.
inline at::ScalarType scale_acc_dtype(at::ScalarType in, at::ScalarType scale, at::ScalarType out) {
  return (in == at::kDouble || scale == at::kDouble || out == at::kDouble) ? at::kDouble : at::kFloat;
}

inline void check_scale_many(const std::vector<at::Tensor>& xs, const at::Tensor& scale, at::ScalarType dtype) {
  const char* op = "scale_many";
  DETR_CHECK(scale.dim() == 1, op, ": scale must be 1-D, got shape ", scale.sizes());
  DETR_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble, op,
             ": scale must be float32 or float64, got ", scale.scalar_type());
  DETR_CHECK(scale_float_dtype(dtype), op, ": dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  int64_t channels = 0;
  for (size_t k = 0; k < xs.size(); ++k) {
    const at::Tensor& x = xs[k];
    DETR_CHECK(scale_float_dtype(x.scalar_type()), op, ": tensor ", k,
               " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
    DETR_CHECK(x.scalar_type() == xs[0].scalar_type(), op, ": every tensor must have one dtype; tensor ", k, " is ",
               x.scalar_type(), ", tensor 0 ", xs[0].scalar_type());
    check_same_device(x, scale, "scale_many: each tensor", "scale");
    DETR_CHECK(x.dim() >= 1, op, ": tensor ", k, " must have a channel dimension, got a scalar");
    DETR_CHECK(scale_outer_dense(x), op, ": tensor ", k,
               " must be contiguous or channels_last (its dimension 0 outermost in memory), got strides ",
               x.strides());
    DETR_CHECK(x.numel() < (int64_t(1) << 31), op, ": tensor ", k, " has ", x.numel(),
               " elements; at most 2^31 - 1 are supported");
    channels += x.size(0);
  }
  DETR_CHECK(scale.numel() == channels, op, ": scale must have one value per channel of all tensors (", channels,
             "), got ", scale.numel());
}

// f(in_t{}, out_t{}, scale pointer in the accumulation type) for the inputs' and the output's dtypes, with the scale
// converted to the accumulation dtype: the dispatch both entry points run.
template <typename F>
void scale_many_dispatch(const std::vector<at::Tensor>& xs, const at::Tensor& scale, at::ScalarType dtype, F&& f) {
  const at::ScalarType acc = scale_acc_dtype(xs[0].scalar_type(), scale.scalar_type(), dtype);
  const at::Tensor s = scale.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "scale_many_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_many_out", [&] {
      if (acc == at::kDouble) {
        f(in_t{}, scalar_t{}, s.const_data_ptr<double>());
      } else {
        f(in_t{}, scalar_t{}, s.const_data_ptr<float>());
      }
    });
  });
}

// The outputs, each with its input's shape and strides, in dtype.
inline std::vector<at::Tensor> scale_many_outputs(const std::vector<at::Tensor>& xs, at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const at::Tensor& x : xs) out.push_back(at::empty_like(x, x.options().dtype(dtype)));
  return out;
}

}  // namespace detr_fast
