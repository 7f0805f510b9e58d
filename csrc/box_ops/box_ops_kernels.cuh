// CUDA kernels of matching_cost, box_loss and box_loss_backward, and their launchers. The math is in
// csrc/common/box_math.h, shared with box_ops_cpu.cpp. No host-device sync: target values are never read on the host
// (invalid ones give NaN costs). Included by box_ops_cuda.cu (the device build) and by the host emulator
// (tests/emulator/), which runs them on the CPU.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "box_ops/box_ops.h"
#include "common/box_math.h"
#include "common/checks.h"
#include "common/launch.cuh"

namespace detr_fast {
namespace {
namespace boxk {

using box_ops::acc_type;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 32;     // query rows per block
constexpr int kColsPerChunk = 64;  // targets staged in shared memory at a time

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return __shfl_sync(0xffffffffu, v, 0);  // one value for every lane even when NaN made the lanes disagree
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One block per (layer p, image b, chunk of <= 32 query rows); one launch covers every layer and image.
// 1. each warp computes the softmax max and sum of its rows' C logits into shared memory;
// 2. the rows' predicted boxes and (in chunks of 64) the image's targets are staged in shared memory;
// 3. the threads walk the rows x targets tile in row-major order, so consecutive threads write consecutive
//    addresses of cost [P*B*Q, T] (the tile of a chunk is contiguous when T <= 64).
// The class probability is read back from the logits row, which step 1 just brought into L1/L2.
template <typename logit_t, typename box_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    matching_cost_kernel(const logit_t* __restrict__ logits,       // [P*B*Q, C]
                         const box_t* __restrict__ pred,           // [P*B*Q, 4]
                         const int64_t* __restrict__ labels,       // [B, T]
                         const acc_t* __restrict__ tboxes,         // [B, T, 4]
                         const int64_t* __restrict__ num_targets,  // [B]
                         acc_t* __restrict__ cost,                 // [P*B*Q, T]
                         int64_t B, int Q, int C, int T, int q_chunks, int rows_per_block, acc_t w_class,
                         acc_t w_bbox, acc_t w_giou) {
  __shared__ acc_t s_max[kMaxRows];
  __shared__ acc_t s_sum[kMaxRows];
  __shared__ acc_t s_pred[kMaxRows][4];
  __shared__ acc_t s_tgt[kColsPerChunk][4];
  __shared__ int64_t s_label[kColsPerChunk];

  const int64_t pb = blockIdx.x / q_chunks;  // p * B + b
  const int q0 = static_cast<int>(blockIdx.x % q_chunks) * rows_per_block;
  const int rows = max(0, min(rows_per_block, Q - q0));  // 0 only in a trailing chunk when Q > 1024
  const int64_t b = pb % B;
  const int64_t row0 = pb * Q + q0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int r = warp; r < rows; r += kWarps) {
    const logit_t* x = logits + (row0 + r) * C;
    acc_t m = -box::infinity<acc_t>();
    for (int c = lane; c < C; c += 32) {
      const acc_t v = static_cast<acc_t>(x[c]);
      m = v > m ? v : m;  // a NaN logit is skipped here and poisons the sum below
    }
    m = warp_max(m);
    acc_t s = 0;
    for (int c = lane; c < C; c += 32) s += box::exp_(static_cast<acc_t>(x[c]) - m);
    s = warp_sum(s);
    if (lane == 0) {
      s_max[r] = m;
      s_sum[r] = s;
    }
  }
  for (int i = threadIdx.x; i < rows * 4; i += kThreads) s_pred[i / 4][i % 4] = static_cast<acc_t>(pred[row0 * 4 + i]);
  const int64_t n = num_targets[b];

  for (int t0 = 0; t0 < T; t0 += kColsPerChunk) {
    const int cols = min(kColsPerChunk, T - t0);
    __syncthreads();  // the previous chunk's targets are no longer read (and the row data above is written)
    for (int i = threadIdx.x; i < cols * 4; i += kThreads) s_tgt[i / 4][i % 4] = tboxes[(b * T + t0) * 4 + i];
    for (int i = threadIdx.x; i < cols; i += kThreads) s_label[i] = labels[b * T + t0 + i];
    __syncthreads();
    for (int i = threadIdx.x; i < rows * cols; i += kThreads) {
      const int r = i / cols;
      const int c = i - r * cols;
      const int64_t label = s_label[c];
      acc_t v;
      switch (box::column_kind(t0 + c, n, T, label, C)) {
        case box::Column::kPadded:
          v = box::infinity<acc_t>();
          break;
        case box::Column::kInvalid:
          v = box::quiet_nan<acc_t>();
          break;
        default: {
          const acc_t prob = box::exp_(static_cast<acc_t>(logits[(row0 + r) * C + label]) - s_max[r]) / s_sum[r];
          v = box::matching_cost_entry(prob, s_pred[r], s_tgt[c], w_class, w_bbox, w_giou);
        }
      }
      cost[(row0 + r) * T + t0 + c] = v;
    }
  }
}

// matching_cost on inputs checked by box_ops::check_matching_cost (its result `s`).
inline at::Tensor matching_cost_launch(const box_ops::MatchingCostSizes& s, const at::Tensor& logits,
                                       const at::Tensor& pred_boxes, const at::Tensor& labels, const at::Tensor& boxes,
                                       const at::Tensor& num_targets, double w_class, double w_bbox, double w_giou,
                                       cudaStream_t stream) {
  at::Tensor cost = at::empty(s.out_sizes, logits.options().dtype(s.out_dtype));
  if (cost.numel() == 0) return cost;
  DETR_CHECK(s.C <= INT32_MAX && s.Q <= INT32_MAX && s.T <= INT32_MAX, "matching_cost: Q, C and T must fit in int32");
  const at::Tensor x = logits.contiguous();
  const at::Tensor pb = pred_boxes.contiguous();
  const at::Tensor lab = labels.contiguous();
  const at::Tensor num = num_targets.contiguous();
  const at::Tensor tb = boxes.to(s.out_dtype).contiguous();
  const int q_chunks = static_cast<int>((s.Q + kMaxRows - 1) / kMaxRows);
  const int rows_per_block = static_cast<int>((s.Q + q_chunks - 1) / q_chunks);  // balanced chunks
  const int64_t blocks = s.P * s.B * q_chunks;
  DETR_CHECK(blocks <= INT32_MAX, "matching_cost: too many (layer, image, query chunk) blocks: ", blocks);
  DETR_BOX_DISPATCH(x.scalar_type(), logit_t, "matching_cost_cuda", [&] {
    DETR_BOX_DISPATCH(pb.scalar_type(), box_t, "matching_cost_cuda", [&] {
      using acc_t = acc_type<std::is_same_v<logit_t, double>>;
      launch_kernel(matching_cost_kernel<logit_t, box_t, acc_t>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                    stream, x.data_ptr<logit_t>(), pb.data_ptr<box_t>(), lab.data_ptr<int64_t>(),
                    tb.data_ptr<acc_t>(), num.data_ptr<int64_t>(), cost.data_ptr<acc_t>(), s.B,
                    static_cast<int>(s.Q), static_cast<int>(s.C), static_cast<int>(s.T), q_chunks, rows_per_block,
                    static_cast<acc_t>(w_class), static_cast<acc_t>(w_bbox), static_cast<acc_t>(w_giou));
    });
  });
  return cost;
}

// ---- box_loss: one thread per (pred, target) pair ----

template <typename pred_t, typename tgt_t, typename acc_t>
__device__ __forceinline__ void load_pair(const pred_t* pred, const tgt_t* target, int64_t i, acc_t* a, acc_t* b) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    a[k] = static_cast<acc_t>(pred[i * 4 + k]);
    b[k] = static_cast<acc_t>(target[i * 4 + k]);
  }
}

template <typename pred_t, typename tgt_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    box_loss_kernel(const pred_t* __restrict__ pred, const tgt_t* __restrict__ target, acc_t* __restrict__ l1,
                    acc_t* __restrict__ giou_loss, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= N) return;
  acc_t a[4], b[4];
  load_pair(pred, target, i, a, b);
  l1[i] = box::l1(a, b);
  giou_loss[i] = acc_t(1) - box::giou(box::to_xyxy(a), box::to_xyxy(b));
}

template <typename pred_t, typename tgt_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    box_loss_backward_kernel(const acc_t* __restrict__ grad_l1, int64_t s1, const acc_t* __restrict__ grad_giou,
                             int64_t sg, const pred_t* __restrict__ pred, const tgt_t* __restrict__ target,
                             pred_t* __restrict__ grad, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= N) return;
  acc_t a[4], b[4];
  load_pair(pred, target, i, a, b);
  const auto gr = box::giou_with_grad(a, box::to_xyxy(b));
  const acc_t w1 = grad_l1[i * s1], wg = grad_giou[i * sg];
#pragma unroll
  for (int k = 0; k < 4; ++k) grad[i * 4 + k] = static_cast<pred_t>(w1 * box::sign0(a[k] - b[k]) - wg * gr.d[k]);
}

inline unsigned pair_blocks(int64_t N) {
  const int64_t blocks = (N + kThreads - 1) / kThreads;
  DETR_CHECK(blocks <= INT32_MAX, "box_loss: too many boxes: ", N);
  return static_cast<unsigned>(blocks);
}

// box_loss on inputs checked by box_ops::check_box_loss.
inline std::tuple<at::Tensor, at::Tensor> box_loss_launch(const at::Tensor& pred, const at::Tensor& target,
                                                          cudaStream_t stream) {
  box_ops::BoxLossIO io = box_ops::box_loss_io(pred, target);
  const at::Tensor &p = io.pred, &t = io.target;
  at::Tensor &l1 = io.l1, &giou_loss = io.giou_loss;
  const int64_t N = io.N;
  if (N == 0) return {l1, giou_loss};
  DETR_BOX_DISPATCH(p.scalar_type(), pred_t, "box_loss_cuda", [&] {
    DETR_BOX_DISPATCH(t.scalar_type(), tgt_t, "box_loss_cuda", [&] {
      using acc_t = acc_type<std::is_same_v<pred_t, double> || std::is_same_v<tgt_t, double>>;
      launch_kernel(box_loss_kernel<pred_t, tgt_t, acc_t>, dim3(pair_blocks(N)), dim3(kThreads), stream,
                    p.data_ptr<pred_t>(), t.data_ptr<tgt_t>(), l1.data_ptr<acc_t>(), giou_loss.data_ptr<acc_t>(), N);
    });
  });
  return {l1, giou_loss};
}

// box_loss_backward on inputs checked by box_ops::check_box_loss_backward.
inline at::Tensor box_loss_backward_launch(const at::Tensor& grad_l1, const at::Tensor& grad_giou,
                                           const at::Tensor& pred, const at::Tensor& target, cudaStream_t stream) {
  const auto dtype = box_ops::box_loss_dtype(pred, target);
  const int64_t N = pred.size(0);
  at::Tensor grad = at::empty({N, 4}, pred.options());  // [N, 4]
  if (N == 0) return grad;
  const at::Tensor p = pred.contiguous(), t = target.contiguous();
  const at::Tensor g1 = grad_l1.to(dtype), gg = grad_giou.to(dtype);  // read with their strides (expanded grads)
  DETR_BOX_DISPATCH(p.scalar_type(), pred_t, "box_loss_backward_cuda", [&] {
    DETR_BOX_DISPATCH(t.scalar_type(), tgt_t, "box_loss_backward_cuda", [&] {
      using acc_t = acc_type<std::is_same_v<pred_t, double> || std::is_same_v<tgt_t, double>>;
      launch_kernel(box_loss_backward_kernel<pred_t, tgt_t, acc_t>, dim3(pair_blocks(N)), dim3(kThreads), stream,
                    g1.data_ptr<acc_t>(), g1.stride(0), gg.data_ptr<acc_t>(), gg.stride(0), p.data_ptr<pred_t>(),
                    t.data_ptr<tgt_t>(), grad.data_ptr<pred_t>(), N);
    });
  });
  return grad;
}

}  // namespace boxk
}  // namespace
}  // namespace detr_fast
