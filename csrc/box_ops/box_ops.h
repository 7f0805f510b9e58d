// Argument checks and output shapes of the box ops, shared by box_ops_cpu.cpp and box_ops_cuda.cu. None of them
// reads tensor values, so the CUDA path stays free of host-device syncs.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>
#include <vector>

#include "common/checks.h"

namespace detr_fast {
namespace box_ops {

// The compute type of a kernel: double when asked for fp64, float for fp32, fp16 and bf16.
template <bool kDouble>
using acc_type = std::conditional_t<kDouble, double, float>;

struct MatchingCostSizes {
  int64_t P, B, Q, C, T;  // P = product of the leading dims (decoder layers), flattened
  std::vector<int64_t> out_sizes;  // [*, B, Q, T]
  at::ScalarType out_dtype;  // float64 for float64 logits, else float32
};

inline MatchingCostSizes check_matching_cost(const at::Tensor& logits, const at::Tensor& pred_boxes,
                                             const at::Tensor& labels, const at::Tensor& boxes,
                                             const at::Tensor& num_targets) {
  check_float(logits, "matching_cost: logits");
  check_float(pred_boxes, "matching_cost: pred_boxes");
  check_float(boxes, "matching_cost: boxes");
  DETR_CHECK(logits.dim() >= 3, "matching_cost: logits must be [*, B, Q, C], got shape ", logits.sizes());
  std::vector<int64_t> box_sizes(logits.sizes().begin(), logits.sizes().end());
  box_sizes.back() = 4;
  DETR_CHECK(pred_boxes.sizes() == at::IntArrayRef(box_sizes), "matching_cost: pred_boxes must be ", box_sizes,
             " to match logits ", logits.sizes(), ", got ", pred_boxes.sizes());
  DETR_CHECK(logits.size(-1) >= 1, "matching_cost: logits need at least one class, got shape ", logits.sizes());
  DETR_CHECK(labels.dim() == 2 && labels.scalar_type() == at::kLong, "matching_cost: labels must be int64 [B, T], got ",
             labels.scalar_type(), " ", labels.sizes());
  DETR_CHECK(boxes.dim() == 3 && boxes.size(0) == labels.size(0) && boxes.size(1) == labels.size(1) &&
                 boxes.size(2) == 4,
             "matching_cost: boxes must be [B, T, 4] matching labels ", labels.sizes(), ", got ", boxes.sizes());
  DETR_CHECK(num_targets.dim() == 1 && num_targets.size(0) == labels.size(0) && num_targets.scalar_type() == at::kLong,
             "matching_cost: num_targets must be int64 [B=", labels.size(0), "], got ", num_targets.scalar_type(), " ",
             num_targets.sizes());
  DETR_CHECK(labels.size(0) == logits.size(-3), "matching_cost: targets hold ", labels.size(0),
             " images but the predictions ", logits.size(-3));
  check_same_device(logits, pred_boxes, "matching_cost: logits", "pred_boxes");
  check_same_device(logits, labels, "matching_cost: logits", "labels");
  check_same_device(logits, boxes, "matching_cost: logits", "boxes");
  check_same_device(logits, num_targets, "matching_cost: logits", "num_targets");

  MatchingCostSizes s;
  s.B = logits.size(-3);
  s.Q = logits.size(-2);
  s.C = logits.size(-1);
  s.T = labels.size(1);
  s.P = 1;
  for (int64_t d = 0; d < logits.dim() - 3; ++d) s.P *= logits.size(d);
  s.out_sizes.assign(logits.sizes().begin(), logits.sizes().end());
  s.out_sizes.back() = s.T;
  s.out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return s;
}

// box_loss computes in float64 when either input is float64, else in float32 (fp16 and bf16 are upcast), and
// returns its losses in that type.
inline at::ScalarType box_loss_dtype(const at::Tensor& pred, const at::Tensor& target) {
  return (pred.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// box_loss's inputs made contiguous and its outputs allocated (l1 [N], giou_loss [N] in box_loss_dtype): what the CPU
// and CUDA entry points share before their kernels.
struct BoxLossIO {
  at::Tensor pred, target, l1, giou_loss;
  int64_t N = 0;
};

inline BoxLossIO box_loss_io(const at::Tensor& pred, const at::Tensor& target) {
  BoxLossIO io;
  const at::ScalarType dtype = box_loss_dtype(pred, target);
  io.N = pred.size(0);
  io.l1 = at::empty({io.N}, pred.options().dtype(dtype));
  io.giou_loss = at::empty({io.N}, pred.options().dtype(dtype));
  io.pred = pred.contiguous();
  io.target = target.contiguous();
  return io;
}

inline void check_box_loss(const at::Tensor& pred, const at::Tensor& target, const char* op) {
  check_float(pred, "box_loss: pred");
  check_float(target, "box_loss: target");
  DETR_CHECK(pred.dim() == 2 && pred.size(1) == 4 && pred.sizes() == target.sizes(), op,
             ": pred and target must both be [N, 4], got ", pred.sizes(), " and ", target.sizes());
  check_same_device(pred, target, "box_loss: pred", "target");
}

inline void check_box_loss_backward(const at::Tensor& grad_l1, const at::Tensor& grad_giou, const at::Tensor& pred,
                                    const at::Tensor& target) {
  check_box_loss(pred, target, "box_loss_backward");
  check_float(grad_l1, "box_loss_backward: grad_l1");
  check_float(grad_giou, "box_loss_backward: grad_giou");
  DETR_CHECK(grad_l1.dim() == 1 && grad_l1.size(0) == pred.size(0) && grad_giou.sizes() == grad_l1.sizes(),
             "box_loss_backward: grad_l1 and grad_giou must be [N=", pred.size(0), "], got ", grad_l1.sizes(), " and ",
             grad_giou.sizes());
  check_same_device(pred, grad_l1, "box_loss_backward: pred", "grad_l1");
  check_same_device(pred, grad_giou, "box_loss_backward: pred", "grad_giou");
}

}  // namespace box_ops
}  // namespace detr_fast

// Dispatch over the float types a box op accepts (float64, float32, float16, bfloat16), binding the type to NAME.
#define DETR_BOX_DISPATCH(TYPE, NAME, OP, ...)                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, OP, [&] {             \
    using NAME = scalar_t;                                                              \
    __VA_ARGS__();                                                                      \
  })
