// CPU kernels of matching_cost, box_loss and box_loss_backward (at::parallel_for over query rows / box pairs).
// The math is in csrc/common/box_math.h, shared with box_ops_cuda.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "box_ops/box_ops.h"
#include "common/box_math.h"
#include "common/checks.h"

namespace detr_fast {
namespace {

using box_ops::acc_type;

// One task per query row r = (p, b, q): the softmax statistics of its C logits, then its T cost entries.
template <typename logit_t, typename box_t, typename acc_t>
void matching_cost_rows(const logit_t* logits,       // [P*B*Q, C]
                        const box_t* pred,           // [P*B*Q, 4]
                        const int64_t* labels,       // [B, T]
                        const acc_t* tboxes,         // [B, T, 4]
                        const int64_t* num_targets,  // [B]
                        acc_t* cost,                 // [P*B*Q, T]
                        int64_t rows, int64_t B, int64_t Q, int64_t C, int64_t T, acc_t w_class, acc_t w_bbox,
                        acc_t w_giou) {
  const int64_t grain = std::max<int64_t>(1, 8192 / (C + 32 * T + 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = (r / Q) % B;
      const logit_t* x = logits + r * C;
      acc_t m = -box::infinity<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(x[c]);
        m = v > m ? v : m;  // a NaN logit is skipped here and poisons the sum below
      }
      acc_t s = 0;
      for (int64_t c = 0; c < C; ++c) s += box::exp_(static_cast<acc_t>(x[c]) - m);
      acc_t p[4];
      for (int k = 0; k < 4; ++k) p[k] = static_cast<acc_t>(pred[r * 4 + k]);
      const int64_t n = num_targets[b];
      acc_t* out = cost + r * T;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t label = labels[b * T + t];
        switch (box::column_kind(t, n, T, label, C)) {
          case box::Column::kPadded:
            out[t] = box::infinity<acc_t>();
            break;
          case box::Column::kInvalid:
            out[t] = box::quiet_nan<acc_t>();
            break;
          case box::Column::kReal: {
            const acc_t prob = box::exp_(static_cast<acc_t>(x[label]) - m) / s;
            out[t] = box::matching_cost_entry(prob, p, tboxes + (b * T + t) * 4, w_class, w_bbox, w_giou);
            break;
          }
        }
      }
    }
  });
}

// The CPU op validates the target values it can read for free (the CUDA op writes NaN instead, see box_math.h).
void check_target_values(const at::Tensor& labels, const at::Tensor& num_targets, int64_t C) {
  const int64_t B = labels.size(0), T = labels.size(1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* num = num_targets.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    DETR_CHECK(num[b] >= 0 && num[b] <= T, "matching_cost: num_targets must lie in [0, T=", T, "], got ", num[b],
               " for image ", b);
    for (int64_t t = 0; t < num[b]; ++t) {
      DETR_CHECK(lab[b * T + t] >= 0 && lab[b * T + t] < C, "matching_cost: labels must lie in [0, ", C,
                 ") for real targets, got ", lab[b * T + t], " for image ", b, " target ", t);
    }
  }
}

at::Tensor matching_cost_cpu(const at::Tensor& logits, const at::Tensor& pred_boxes, const at::Tensor& labels,
                             const at::Tensor& boxes, const at::Tensor& num_targets, double w_class, double w_bbox,
                             double w_giou) {
  const auto s = box_ops::check_matching_cost(logits, pred_boxes, labels, boxes, num_targets);
  const at::Tensor lab = labels.contiguous();
  const at::Tensor num = num_targets.contiguous();
  check_target_values(lab, num, s.C);
  at::Tensor cost = at::empty(s.out_sizes, logits.options().dtype(s.out_dtype));
  const int64_t rows = s.P * s.B * s.Q;
  if (cost.numel() == 0) return cost;
  const at::Tensor x = logits.contiguous();
  const at::Tensor pb = pred_boxes.contiguous();
  const at::Tensor tb = boxes.to(s.out_dtype).contiguous();
  DETR_BOX_DISPATCH(x.scalar_type(), logit_t, "matching_cost_cpu", [&] {
    DETR_BOX_DISPATCH(pb.scalar_type(), box_t, "matching_cost_cpu", [&] {
      using acc_t = acc_type<std::is_same_v<logit_t, double>>;
      matching_cost_rows<logit_t, box_t, acc_t>(x.data_ptr<logit_t>(), pb.data_ptr<box_t>(), lab.data_ptr<int64_t>(),
                                                tb.data_ptr<acc_t>(), num.data_ptr<int64_t>(), cost.data_ptr<acc_t>(),
                                                rows, s.B, s.Q, s.C, s.T, static_cast<acc_t>(w_class),
                                                static_cast<acc_t>(w_bbox), static_cast<acc_t>(w_giou));
    });
  });
  return cost;
}

constexpr int64_t kPairGrain = 2048;

std::tuple<at::Tensor, at::Tensor> box_loss_cpu(const at::Tensor& pred, const at::Tensor& target) {
  box_ops::check_box_loss(pred, target, "box_loss");
  box_ops::BoxLossIO io = box_ops::box_loss_io(pred, target);
  const at::Tensor &p = io.pred, &t = io.target;
  at::Tensor &l1 = io.l1, &giou_loss = io.giou_loss;
  const int64_t N = io.N;
  if (N == 0) return {l1, giou_loss};
  DETR_BOX_DISPATCH(p.scalar_type(), pred_t, "box_loss_cpu", [&] {
    DETR_BOX_DISPATCH(t.scalar_type(), tgt_t, "box_loss_cpu", [&] {
      using acc_t = acc_type<std::is_same_v<pred_t, double> || std::is_same_v<tgt_t, double>>;
      const pred_t* pp = p.data_ptr<pred_t>();
      const tgt_t* tp = t.data_ptr<tgt_t>();
      acc_t* l1p = l1.data_ptr<acc_t>();
      acc_t* gp = giou_loss.data_ptr<acc_t>();
      at::parallel_for(0, N, kPairGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          acc_t a[4], b[4];
          for (int k = 0; k < 4; ++k) {
            a[k] = static_cast<acc_t>(pp[i * 4 + k]);
            b[k] = static_cast<acc_t>(tp[i * 4 + k]);
          }
          l1p[i] = box::l1(a, b);
          gp[i] = acc_t(1) - box::giou(box::to_xyxy(a), box::to_xyxy(b));
        }
      });
    });
  });
  return {l1, giou_loss};
}

// grad_pred [N, 4] (pred's dtype) = grad_l1 * sign(pred - target) - grad_giou * dGIoU/dpred.
at::Tensor box_loss_backward_cpu(const at::Tensor& grad_l1, const at::Tensor& grad_giou, const at::Tensor& pred,
                                 const at::Tensor& target) {
  box_ops::check_box_loss_backward(grad_l1, grad_giou, pred, target);
  const auto dtype = box_ops::box_loss_dtype(pred, target);
  const int64_t N = pred.size(0);
  at::Tensor grad = at::empty({N, 4}, pred.options());
  if (N == 0) return grad;
  const at::Tensor p = pred.contiguous(), t = target.contiguous();
  const at::Tensor g1 = grad_l1.to(dtype), gg = grad_giou.to(dtype);  // strided reads below (expanded grads)
  DETR_BOX_DISPATCH(p.scalar_type(), pred_t, "box_loss_backward_cpu", [&] {
    DETR_BOX_DISPATCH(t.scalar_type(), tgt_t, "box_loss_backward_cpu", [&] {
      using acc_t = acc_type<std::is_same_v<pred_t, double> || std::is_same_v<tgt_t, double>>;
      const pred_t* pp = p.data_ptr<pred_t>();
      const tgt_t* tp = t.data_ptr<tgt_t>();
      const acc_t* g1p = g1.data_ptr<acc_t>();
      const acc_t* ggp = gg.data_ptr<acc_t>();
      const int64_t s1 = g1.stride(0), sg = gg.stride(0);
      pred_t* out = grad.data_ptr<pred_t>();
      at::parallel_for(0, N, kPairGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          acc_t a[4], b[4];
          for (int k = 0; k < 4; ++k) {
            a[k] = static_cast<acc_t>(pp[i * 4 + k]);
            b[k] = static_cast<acc_t>(tp[i * 4 + k]);
          }
          const auto gr = box::giou_with_grad(a, box::to_xyxy(b));
          const acc_t w1 = g1p[i * s1], wg = ggp[i * sg];
          for (int k = 0; k < 4; ++k) {
            out[i * 4 + k] = static_cast<pred_t>(w1 * box::sign0(a[k] - b[k]) - wg * gr.d[k]);
          }
        }
      });
    });
  });
  return grad;
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CPU, m) {
  m.impl("matching_cost", &detr_fast::matching_cost_cpu);
  m.impl("box_loss", &detr_fast::box_loss_cpu);
  m.impl("box_loss_backward", &detr_fast::box_loss_backward_cpu);
}
