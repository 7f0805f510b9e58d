// CUDA kernel of detr_fast::scale_many and its launcher: all tensors of the list in one launch (up to
// kScaleMaxTensors per launch; longer lists take several). A 1-D grid: each tensor gets the same number of blocks,
// whose threads stride over its elements in memory order, 32-bit indices. Math in common/scale_math.h. Included by
// scale_cuda.cu (the device build) and by the host emulator (tests/emulator/).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/launch.cuh"
#include "scale/scale_common.h"

namespace detr_fast {
namespace {

constexpr int kScaleThreads = 256;
constexpr int kScaleMaxTensors = 48;  // the table below is a kernel argument: 48 x 28 bytes

struct ScaleTable {
  const void* in[kScaleMaxTensors];
  void* out[kScaleMaxTensors];
  uint32_t numel[kScaleMaxTensors];
  uint32_t fan[kScaleMaxTensors];
  uint32_t chan_off[kScaleMaxTensors];  // the tensor's first channel in scale
};

// A 1-D grid of `per_tensor` blocks per tensor: block b works on tensor b / per_tensor.
template <typename in_t, typename out_t, typename acc_t>
__global__ void __launch_bounds__(kScaleThreads)
    scale_many_kernel(const ScaleTable t, const acc_t* __restrict__ scale, uint32_t per_tensor) {
  const uint32_t k = blockIdx.x / per_tensor, b = blockIdx.x % per_tensor;
  const in_t* __restrict__ x = static_cast<const in_t*>(t.in[k]);
  out_t* __restrict__ y = static_cast<out_t*>(t.out[k]);
  const uint32_t n = t.numel[k], fan = t.fan[k];
  const acc_t* __restrict__ s = scale + t.chan_off[k];
  const uint32_t stride = per_tensor * blockDim.x;
  for (uint32_t i = b * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = static_cast<out_t>(scale_value<acc_t>(static_cast<acc_t>(x[i]), s[scale_channel(i, fan)]));
  }
}

template <typename in_t, typename out_t, typename acc_t>
void scale_many_launch_typed(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& out,
                             const acc_t* scale, const LaunchCtx& ctx) {
  uint32_t off = 0;
  for (size_t first = 0; first < xs.size(); first += kScaleMaxTensors) {
    const size_t count = std::min<size_t>(kScaleMaxTensors, xs.size() - first);
    ScaleTable t{};
    uint32_t largest = 0;
    for (size_t j = 0; j < count; ++j) {
      const at::Tensor& x = xs[first + j];
      t.in[j] = x.const_data_ptr();
      t.out[j] = out[first + j].mutable_data_ptr();
      t.numel[j] = static_cast<uint32_t>(x.numel());
      t.fan[j] = x.numel() == 0 ? 1 : static_cast<uint32_t>(x.numel() / x.size(0));
      t.chan_off[j] = off;
      off += static_cast<uint32_t>(x.size(0));
      largest = std::max(largest, t.numel[j]);
    }
    if (largest == 0) continue;
    // about 16 resident blocks per SM over all the tensors of this launch, at most one per 256 elements of the
    // largest; each block strides over the rest of its tensor
    const int64_t per_tensor = std::max<int64_t>(1, static_cast<int64_t>(ctx.sms) * 16 / static_cast<int64_t>(count));
    const int64_t need = (static_cast<int64_t>(largest) + kScaleThreads - 1) / kScaleThreads;
    const auto blocks = static_cast<uint32_t>(std::min(per_tensor, need));
    launch_kernel(scale_many_kernel<in_t, out_t, acc_t>, dim3(blocks * static_cast<uint32_t>(count)),
                  dim3(kScaleThreads), ctx.stream, t, scale, blocks);
  }
}

// The op on checked inputs.
inline std::vector<at::Tensor> scale_many_launch(const std::vector<at::Tensor>& xs, const at::Tensor& scale,
                                                 at::ScalarType dtype, const LaunchCtx& ctx) {
  std::vector<at::Tensor> out = scale_many_outputs(xs, dtype);
  if (xs.empty()) return out;
  scale_many_dispatch(xs, scale, dtype, [&](auto in_tag, auto out_tag, const auto* s) {
    using acc_t = std::remove_cv_t<std::remove_pointer_t<decltype(s)>>;
    scale_many_launch_typed<decltype(in_tag), decltype(out_tag), acc_t>(xs, out, s, ctx);
  });
  return out;
}

}  // namespace
}  // namespace detr_fast
