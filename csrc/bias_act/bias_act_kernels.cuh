// CUDA kernels of detr_fast::bias_act (and, at the end, relu_backward_sum) and their launchers. bias_act: one
// grid-stride pass, each thread V contiguous elements per step (V = 16 bytes / element size: one 16-byte load of x,
// one of residual, one store) when every vector lies in one row of channels (inner == 1, C % V == 0) or in one
// channel's line (inner % V == 0) and the pointers are 16-byte aligned; one element per step otherwise. Math in
// common/bias_act_math.h. Included by bias_act_cuda.cu (the device build) and by the host emulator (tests/emulator/).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "bias_act/bias_act_common.h"
#include "common/launch.cuh"
#include "common/vec.cuh"

namespace detr_fast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t, int V, bool kResidual>
__global__ void __launch_bounds__(kThreads)
    bias_act_vec_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, const acc_t* __restrict__ b,
                        scalar_t* __restrict__ out, int64_t nvec, int64_t C, int64_t inner, bool relu) {
  using VecT = Vec<scalar_t, V>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < nvec; k += stride) {
    const int64_t i0 = k * V;
    const VecT xv = reinterpret_cast<const VecT*>(x)[k];
    VecT rv;
    if constexpr (kResidual) rv = reinterpret_cast<const VecT*>(r)[k];
    const int64_t c0 = bias_act_channel(i0, C, inner);
    VecT ov;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      // inner == 1: the vector holds channels c0 .. c0 + V - 1 of one row; otherwise V values of channel c0
      const acc_t bj = inner == 1 ? b[c0 + j] : b[c0];
      const acc_t rj = kResidual ? static_cast<acc_t>(rv.v[j]) : acc_t(0);
      ov.v[j] = static_cast<scalar_t>(bias_act_value<acc_t>(static_cast<acc_t>(xv.v[j]), bj, rj, relu));
    }
    reinterpret_cast<VecT*>(out)[k] = ov;
  }
}

template <typename scalar_t, typename acc_t, bool kResidual>
__global__ void __launch_bounds__(kThreads)
    bias_act_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, const acc_t* __restrict__ b,
                    scalar_t* __restrict__ out, int64_t n, int64_t C, int64_t inner, bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t rj = kResidual ? static_cast<acc_t>(r[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(
        bias_act_value<acc_t>(static_cast<acc_t>(x[i]), b[bias_act_channel(i, C, inner)], rj, relu));
  }
}

template <typename scalar_t, bool kResidual>
void launch(const BiasActLayout& l, bool relu, const LaunchCtx& ctx) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t n = l.x.numel(), C = l.C, inner = l.inner;
  const scalar_t* x = l.x.const_data_ptr<scalar_t>();
  const scalar_t* r = kResidual ? l.residual.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* b = l.bias_acc.const_data_ptr<acc_t>();
  scalar_t* out = l.out.mutable_data_ptr<scalar_t>();
  const bool vec = (inner == 1 ? C % V == 0 : inner % V == 0) && aligned16(x) && aligned16(out) &&
                   (!kResidual || aligned16(r));
  const int64_t work = vec ? n / V : n;
  // Enough blocks to fill the device (8 resident blocks of 256 threads per SM), each striding over the rest.
  const int64_t max_blocks = static_cast<int64_t>(ctx.sms) * 8;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(max_blocks, (work + kThreads - 1) / kThreads));
  if (vec) {
    launch_kernel(bias_act_vec_kernel<scalar_t, acc_t, V, kResidual>, dim3(blocks), dim3(kThreads), ctx.stream, x, r,
                  b, out, work, C, inner, relu);
  } else {
    launch_kernel(bias_act_kernel<scalar_t, acc_t, kResidual>, dim3(blocks), dim3(kThreads), ctx.stream, x, r, b,
                  out, n, C, inner, relu);
  }
}

// The op on checked inputs: out = relu(x + bias[c] + residual) in x's layout.
inline at::Tensor bias_act_launch(const at::Tensor& x, const at::Tensor& bias,
                                  const std::optional<at::Tensor>& residual, bool relu, const LaunchCtx& ctx) {
  BiasActLayout l = bias_act_layout(x, residual);
  if (l.x.numel() == 0) return l.out;
  l.bias_acc = bias.to(bias_act_acc_dtype(x)).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.x.scalar_type(), "bias_act_cuda", [&] {
    if (l.residual.defined()) {
      launch<scalar_t, true>(l, relu, ctx);
    } else {
      launch<scalar_t, false>(l, relu, ctx);
    }
  });
  return l.out;
}

// relu_backward_sum: a flat pass over the three inputs (one layout), V elements per step by 16-byte vectors where
// every pointer is 16-byte aligned, the rest (n % V elements) one each by the same threads.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    relu_backward_sum_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                             const scalar_t* __restrict__ o, scalar_t* __restrict__ r, int64_t n, bool vec) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecT = Vec<scalar_t, V>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = vec ? n / V : 0;
  for (int64_t k = first; k < nvec; k += stride) {
    const VecT av = reinterpret_cast<const VecT*>(a)[k];
    const VecT bv = reinterpret_cast<const VecT*>(b)[k];
    const VecT ov = reinterpret_cast<const VecT*>(o)[k];
    VecT rv;
#pragma unroll
    for (int j = 0; j < V; ++j) rv.v[j] = relu_backward_sum_value<acc_t>(av.v[j], bv.v[j], ov.v[j]);
    reinterpret_cast<VecT*>(r)[k] = rv;
  }
  for (int64_t i = nvec * V + first; i < n; i += stride) r[i] = relu_backward_sum_value<acc_t>(a[i], b[i], o[i]);
}

// The op on checked inputs: (grad_a + grad_b) where out > 0, else 0, in out's layout.
inline at::Tensor relu_backward_sum_launch(const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& out,
                                           const LaunchCtx& ctx) {
  ReluBackwardSumLayout l = relu_backward_sum_layout(grad_a, grad_b, out);
  const int64_t n = l.out.numel();
  if (n == 0) return l.result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.out.scalar_type(), "relu_backward_sum_cuda", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t* a = l.a.const_data_ptr<scalar_t>();
    const scalar_t* b = l.b.const_data_ptr<scalar_t>();
    const scalar_t* o = l.out.const_data_ptr<scalar_t>();
    scalar_t* r = l.result.mutable_data_ptr<scalar_t>();
    const bool vec = aligned16(a) && aligned16(b) && aligned16(o) && aligned16(r);
    const int64_t work = vec ? std::max<int64_t>(n / V, n % V) : n;
    const int64_t max_blocks = static_cast<int64_t>(ctx.sms) * 8;
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(max_blocks, (work + kThreads - 1) / kThreads));
    launch_kernel(relu_backward_sum_kernel<scalar_t, V>, dim3(blocks), dim3(kThreads), ctx.stream, a, b, o, r, n,
                  vec);
  });
  return l.result;
}

}  // namespace
}  // namespace detr_fast
