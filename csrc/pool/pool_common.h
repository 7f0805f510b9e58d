// Argument checks shared by the CPU and CUDA entry points of detr_fast::max_pool2d_nhwc.
//
// Contract (see detr_fast/ops/pool.py): x [N, C, H, W] float32/float64/float16/bfloat16 in channels_last memory
// format; kernel, stride, padding two positive (padding: non-negative) sizes, padding at most half the kernel.
// Output [N, C, Ho, Wo] channels_last in x's dtype.
#pragma once
#include <vector>

#include "common/checks.h"
#include "common/pool_math.h"

namespace detr_fast {

struct PoolParams {
  int64_t N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw;
};

inline PoolParams check_max_pool_nhwc(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                      at::IntArrayRef padding) {
  const char* op = "max_pool2d_nhwc";
  DETR_CHECK(x.dim() == 4, op, ": x must have shape [N, C, H, W], got ", x.sizes());
  const at::ScalarType dt = x.scalar_type();
  DETR_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
             ": x must be float32, float64, float16 or bfloat16, got ", dt);
  DETR_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": x must be channels_last, got strides ",
             x.strides());
  DETR_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
             ": kernel, stride and padding must each have two sizes");
  DETR_CHECK(kernel[0] >= 1 && kernel[1] >= 1 && stride[0] >= 1 && stride[1] >= 1, op,
             ": kernel and stride must be positive, got ", kernel, " and ", stride);
  DETR_CHECK(padding[0] >= 0 && padding[1] >= 0 && 2 * padding[0] <= kernel[0] && 2 * padding[1] <= kernel[1], op,
             ": padding must lie in [0, kernel / 2], got ", padding, " for kernel ", kernel);
  PoolParams p{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, kernel[0], kernel[1], stride[0], stride[1],
               padding[0], padding[1]};
  DETR_CHECK(p.H + 2 * p.ph >= p.kh && p.W + 2 * p.pw >= p.kw, op, ": the padded input ", p.H + 2 * p.ph, "x",
             p.W + 2 * p.pw, " is smaller than the kernel ", kernel);
  p.Ho = pool_out_size(p.H, p.kh, p.sh, p.ph);
  p.Wo = pool_out_size(p.W, p.kw, p.sw, p.pw);
  return p;
}

inline at::Tensor max_pool_nhwc_output(const at::Tensor& x, const PoolParams& p) {
  return at::empty({p.N, p.C, p.Ho, p.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

}  // namespace detr_fast
