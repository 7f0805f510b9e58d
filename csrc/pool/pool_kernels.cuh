// CUDA kernel of detr_fast::max_pool2d_nhwc and its launcher: one thread per (output pixel, group of V channels),
// grid-stride. With C % V == 0 and 16-byte aligned pointers V = 16 bytes / element size, each window pixel one
// 16-byte load (the window's overlapping rows come from the caches: DRAM sees the input about once); V = 1 otherwise.
// Math in common/pool_math.h. Included by pool_cuda.cu (the device build) and by the host emulator (tests/emulator/).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/launch.cuh"
#include "common/vec.cuh"
#include "pool/pool_common.h"

namespace detr_fast {
namespace {

constexpr int kPoolThreads = 256;

// idx_t: uint32_t when every index fits (the index arithmetic is then 32-bit), int64_t otherwise.
template <typename scalar_t, int V, typename idx_t>
__global__ void __launch_bounds__(kPoolThreads)
    max_pool_nhwc_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const PoolParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecT = Vec<scalar_t, V>;
  const idx_t groups = static_cast<idx_t>(p.C / V), Wo = static_cast<idx_t>(p.Wo), Ho = static_cast<idx_t>(p.Ho);
  const idx_t total = static_cast<idx_t>(p.N * p.Ho * p.Wo) * groups;
  const idx_t stride = static_cast<idx_t>(gridDim.x) * blockDim.x;
  for (idx_t t = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const idx_t g = t % groups;
    const idx_t pix = t / groups;  // (n, oh, ow)
    const int64_t ow = pix % Wo, oh = (pix / Wo) % Ho, n = pix / (Wo * Ho);
    int64_t h0, h1, w0, w1;
    pool_window(oh, p.H, p.kh, p.sh, p.ph, h0, h1);
    pool_window(ow, p.W, p.kw, p.sw, p.pw, w0, w1);
    acc_t m[V];
#pragma unroll
    for (int j = 0; j < V; ++j) m[j] = -std::numeric_limits<acc_t>::infinity();
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = w0; w < w1; ++w) {
        const VecT xv = reinterpret_cast<const VecT*>(x + ((n * p.H + h) * p.W + w) * p.C)[g];
#pragma unroll
        for (int j = 0; j < V; ++j) m[j] = pool_max<acc_t>(m[j], static_cast<acc_t>(xv.v[j]));
      }
    }
    VecT ov;
#pragma unroll
    for (int j = 0; j < V; ++j) ov.v[j] = static_cast<scalar_t>(m[j]);
    reinterpret_cast<VecT*>(out + pix * p.C)[g] = ov;
  }
}

// The op on checked inputs.
inline at::Tensor max_pool_nhwc_launch(const at::Tensor& x, const PoolParams& p, const LaunchCtx& ctx) {
  at::Tensor out = max_pool_nhwc_output(x, p);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_nhwc_cuda", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vec = p.C % V == 0 && aligned16(xp) && aligned16(op);
    const int64_t work = p.N * p.Ho * p.Wo * (vec ? p.C / V : p.C);
    const int64_t max_blocks = static_cast<int64_t>(ctx.sms) * 8;
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(max_blocks, (work + kPoolThreads - 1) / kPoolThreads));
    // 32-bit indices when the input, the output and the grid-stride loop's last step all stay below 2^31
    const bool small = x.numel() < (int64_t(1) << 31) && out.numel() + max_blocks * kPoolThreads < (int64_t(1) << 31);
    if (vec && small) {
      launch_kernel(max_pool_nhwc_kernel<scalar_t, V, uint32_t>, dim3(blocks), dim3(kPoolThreads), ctx.stream, xp,
                    op, p);
    } else if (vec) {
      launch_kernel(max_pool_nhwc_kernel<scalar_t, V, int64_t>, dim3(blocks), dim3(kPoolThreads), ctx.stream, xp, op,
                    p);
    } else if (small) {
      launch_kernel(max_pool_nhwc_kernel<scalar_t, 1, uint32_t>, dim3(blocks), dim3(kPoolThreads), ctx.stream, xp,
                    op, p);
    } else {
      launch_kernel(max_pool_nhwc_kernel<scalar_t, 1, int64_t>, dim3(blocks), dim3(kPoolThreads), ctx.stream, xp, op,
                    p);
    }
  });
  return out;
}

}  // namespace
}  // namespace detr_fast
