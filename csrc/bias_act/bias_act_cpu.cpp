// CPU kernels of detr_fast::bias_act and relu_backward_sum, with at::parallel_for. Math in common/bias_act_math.h.
// bias_act: x viewed as [outer, C, inner]; parallel over rows of C values (inner == 1, channels_last or [N, C]) or
// over lines of `inner` values that share one channel (contiguous NCHW). relu_backward_sum: one flat pass.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "bias_act/bias_act_common.h"

namespace detr_fast {
namespace {

template <typename scalar_t, bool kResidual>
void bias_act_cpu_impl(const BiasActLayout& l, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = l.C, inner = l.inner, n = l.x.numel();
  const scalar_t* x = l.x.const_data_ptr<scalar_t>();
  const scalar_t* r = kResidual ? l.residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = l.out.mutable_data_ptr<scalar_t>();
  const acc_t* b = l.bias_acc.const_data_ptr<acc_t>();
  // A line: `inner` values of one channel, or (inner == 1) one row of C channels.
  const int64_t line = inner == 1 ? C : inner;
  const int64_t lines = n / line;
  const int64_t grain = std::max<int64_t>(1, 32768 / line);
  at::parallel_for(0, lines, grain, [&](int64_t begin, int64_t end) {
    for (int64_t li = begin; li < end; ++li) {
      const int64_t base = li * line;
      if (inner == 1) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t rv = kResidual ? static_cast<acc_t>(r[base + c]) : acc_t(0);
          out[base + c] = static_cast<scalar_t>(bias_act_value<acc_t>(static_cast<acc_t>(x[base + c]), b[c], rv, relu));
        }
      } else {
        const acc_t bc = b[bias_act_channel(base, C, inner)];
        for (int64_t j = 0; j < inner; ++j) {
          const acc_t rv = kResidual ? static_cast<acc_t>(r[base + j]) : acc_t(0);
          out[base + j] = static_cast<scalar_t>(bias_act_value<acc_t>(static_cast<acc_t>(x[base + j]), bc, rv, relu));
        }
      }
    }
  });
}

at::Tensor bias_act_cpu(const at::Tensor& x_in, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                        bool relu) {
  check_bias_act_inputs(x_in, bias, residual);
  BiasActLayout l = bias_act_layout(x_in, residual);
  if (l.x.numel() == 0) return l.out;
  l.bias_acc = bias.to(bias_act_acc_dtype(x_in)).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.x.scalar_type(), "bias_act_cpu", [&] {
    if (l.residual.defined()) {
      bias_act_cpu_impl<scalar_t, true>(l, relu);
    } else {
      bias_act_cpu_impl<scalar_t, false>(l, relu);
    }
  });
  return l.out;
}

at::Tensor relu_backward_sum_cpu(const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& out) {
  check_relu_backward_sum_inputs(grad_a, grad_b, out);
  ReluBackwardSumLayout l = relu_backward_sum_layout(grad_a, grad_b, out);
  const int64_t n = l.out.numel();
  if (n == 0) return l.result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.out.scalar_type(), "relu_backward_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = l.a.const_data_ptr<scalar_t>();
    const scalar_t* b = l.b.const_data_ptr<scalar_t>();
    const scalar_t* o = l.out.const_data_ptr<scalar_t>();
    scalar_t* r = l.result.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) r[i] = relu_backward_sum_value<acc_t>(a[i], b[i], o[i]);
    });
  });
  return l.result;
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CPU, m) {
  m.impl("bias_act", &detr_fast::bias_act_cpu);
  m.impl("relu_backward_sum", &detr_fast::relu_backward_sum_cpu);
}
