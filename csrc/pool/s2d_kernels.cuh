// CUDA kernel of detr_fast::space_to_depth and its launcher: one thread per (output pixel, group of V channels),
// grid-stride; each thread gathers its V elements from x (any strides: the images' NCHW or NHWC layout) and writes
// them as one 16-byte store where channels % V == 0 and the output is 16-byte aligned (V = 16 bytes / element size),
// one element at a time otherwise. Math in common/s2d_math.h. Included by s2d_cuda.cu (the device build) and by the
// host emulator (tests/emulator/).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/launch.cuh"
#include "common/vec.cuh"
#include "pool/s2d_common.h"

namespace detr_fast {
namespace {

constexpr int kS2dThreads = 256;

// idx_t: uint32_t when every index fits (the index arithmetic is then 32-bit), int64_t otherwise.
template <typename in_t, typename out_t, int V, typename idx_t>
__global__ void __launch_bounds__(kS2dThreads)
    space_to_depth_kernel(const in_t* __restrict__ x, out_t* __restrict__ out, const S2dParams p) {
  using VecT = Vec<out_t, V>;
  const idx_t groups = static_cast<idx_t>(p.channels / V), Ws = static_cast<idx_t>(p.Ws),
              Hs = static_cast<idx_t>(p.Hs);
  const idx_t total = static_cast<idx_t>(p.B * p.Hs * p.Ws) * groups;
  const idx_t stride = static_cast<idx_t>(gridDim.x) * blockDim.x;
  for (idx_t t = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const idx_t g = t % groups;
    const idx_t pix = t / groups;  // (b, Y, X)
    const int64_t X = pix % Ws, Y = (pix / Ws) % Hs, b = pix / (Ws * Hs);
    VecT ov;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      int64_t c, r, s;
      ov.v[j] = s2d_source(static_cast<int64_t>(g) * V + j, Y, X, p.C, p.H, p.W, p.ph, p.pw, c, r, s)
                    ? static_cast<out_t>(x[b * p.sb + c * p.sc + r * p.sh + s * p.sw])
                    : out_t(0);
    }
    reinterpret_cast<VecT*>(out + static_cast<int64_t>(pix) * p.channels)[g] = ov;
  }
}

// The op on checked inputs.
inline at::Tensor space_to_depth_launch(const at::Tensor& x, const S2dParams& p, at::ScalarType dtype,
                                        const LaunchCtx& ctx) {
  at::Tensor out = space_to_depth_output(x, p, dtype);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "space_to_depth_cuda", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "space_to_depth_cuda_out", [&] {
      using out_t = scalar_t;
      constexpr int V = 16 / sizeof(out_t);
      const in_t* xp = x.const_data_ptr<in_t>();
      out_t* op = out.mutable_data_ptr<out_t>();
      const bool vec = p.channels % V == 0 && aligned16(op);
      const int64_t work = p.B * p.Hs * p.Ws * (vec ? p.channels / V : p.channels);
      const int64_t max_blocks = static_cast<int64_t>(ctx.sms) * 8;
      const auto blocks =
          static_cast<unsigned>(std::min<int64_t>(max_blocks, (work + kS2dThreads - 1) / kS2dThreads));
      // 32-bit indices when x's last element, the output and the grid-stride loop's last step all stay below 2^31
      const int64_t x_span = 1 + (p.B - 1) * p.sb + (p.C - 1) * p.sc + (p.H - 1) * p.sh + (p.W - 1) * p.sw;
      const bool small = x_span < (int64_t(1) << 31) &&
                         out.numel() + max_blocks * kS2dThreads < (int64_t(1) << 31);
      if (vec && small) {
        launch_kernel(space_to_depth_kernel<in_t, out_t, V, uint32_t>, dim3(blocks), dim3(kS2dThreads), ctx.stream,
                      xp, op, p);
      } else if (vec) {
        launch_kernel(space_to_depth_kernel<in_t, out_t, V, int64_t>, dim3(blocks), dim3(kS2dThreads), ctx.stream,
                      xp, op, p);
      } else if (small) {
        launch_kernel(space_to_depth_kernel<in_t, out_t, 1, uint32_t>, dim3(blocks), dim3(kS2dThreads), ctx.stream,
                      xp, op, p);
      } else {
        launch_kernel(space_to_depth_kernel<in_t, out_t, 1, int64_t>, dim3(blocks), dim3(kS2dThreads), ctx.stream,
                      xp, op, p);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace detr_fast
