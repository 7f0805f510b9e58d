// Math of detr_fast::bias_act shared by the CPU and CUDA kernels.
//
//   out = relu(x + bias[c] + residual)   (the ReLU and the residual optional)
//
// x is viewed as [outer, C, inner]: inner = 1 for channels_last (and [N, C]) tensors, the product of the spatial
// sizes for contiguous NCHW ones. The sum is formed in acc_t (float; double for double inputs) and rounded once.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace detr_fast {

// The channel of flat element i of x viewed as [outer, C, inner].
DF_HD int64_t bias_act_channel(int64_t i, int64_t C, int64_t inner) { return inner == 1 ? i % C : (i / inner) % C; }

// One output value. NaN stays NaN through the ReLU, as torch.relu keeps it.
template <typename acc_t>
DF_HD acc_t bias_act_value(acc_t x, acc_t b, acc_t r, bool relu) {
  const acc_t v = x + b + r;
  return (relu && v < acc_t(0)) ? acc_t(0) : v;
}

// One value of detr_fast::relu_backward_sum: the gradient reaching a ReLU's output along two paths (a and b), summed
// and masked by that output, as autograd's sum followed by threshold_backward(a + b, out, 0) gives it: the sum
// rounded once to the tensors' dtype (round), then 0 where out <= 0 (a NaN out lets the sum through).
template <typename acc_t, typename scalar_t>
DF_HD scalar_t relu_backward_sum_value(scalar_t a, scalar_t b, scalar_t out) {
  const scalar_t sum = static_cast<scalar_t>(static_cast<acc_t>(a) + static_cast<acc_t>(b));
  return static_cast<acc_t>(out) <= acc_t(0) ? scalar_t(0) : sum;
}

}  // namespace detr_fast
