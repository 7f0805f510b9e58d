// CUDA entry points of matching_cost, box_loss and box_loss_backward: argument checks and the device guard, then the
// launchers of box_ops_kernels.cuh on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "box_ops/box_ops_kernels.cuh"

namespace detr_fast {
namespace {

at::Tensor matching_cost_cuda(const at::Tensor& logits, const at::Tensor& pred_boxes, const at::Tensor& labels,
                              const at::Tensor& boxes, const at::Tensor& num_targets, double w_class, double w_bbox,
                              double w_giou) {
  const auto s = box_ops::check_matching_cost(logits, pred_boxes, labels, boxes, num_targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  return boxk::matching_cost_launch(s, logits, pred_boxes, labels, boxes, num_targets, w_class, w_bbox, w_giou,
                                    c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor> box_loss_cuda(const at::Tensor& pred, const at::Tensor& target) {
  box_ops::check_box_loss(pred, target, "box_loss");
  const c10::cuda::CUDAGuard guard(pred.device());
  return boxk::box_loss_launch(pred, target, c10::cuda::getCurrentCUDAStream());
}

at::Tensor box_loss_backward_cuda(const at::Tensor& grad_l1, const at::Tensor& grad_giou, const at::Tensor& pred,
                                  const at::Tensor& target) {
  box_ops::check_box_loss_backward(grad_l1, grad_giou, pred, target);
  const c10::cuda::CUDAGuard guard(pred.device());
  return boxk::box_loss_backward_launch(grad_l1, grad_giou, pred, target, c10::cuda::getCurrentCUDAStream());
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CUDA, m) {
  m.impl("matching_cost", &detr_fast::matching_cost_cuda);
  m.impl("box_loss", &detr_fast::box_loss_cuda);
  m.impl("box_loss_backward", &detr_fast::box_loss_backward_cuda);
}
