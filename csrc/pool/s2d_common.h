// Argument checks shared by the CPU and CUDA entry points of detr_fast::space_to_depth.
//
// Contract (see detr_fast/ops/pool.py): x [B, C, H, W] float32/float64/float16/bfloat16, any strides; kernel odd and
// positive with H + 2 ph >= kernel and W + 2 pw >= kernel; padding two non-negative sizes; channels >= 4 C; dtype a
// floating type. Output S [B, channels, Hs, Ws] channels_last in dtype (common/s2d_math.h).
#pragma once
#include "common/checks.h"
#include "common/s2d_math.h"

namespace detr_fast {

struct S2dParams {
  int64_t B, C, H, W, Hs, Ws, ph, pw, channels;
  int64_t sb, sc, sh, sw;  // x's strides, in elements
};

inline bool s2d_floating(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16;
}

inline S2dParams check_space_to_depth(const at::Tensor& x, int64_t kernel, at::IntArrayRef padding, int64_t channels,
                                      at::ScalarType dtype) {
  const char* op = "space_to_depth";
  DETR_CHECK(x.dim() == 4, op, ": x must have shape [B, C, H, W], got ", x.sizes());
  DETR_CHECK(s2d_floating(x.scalar_type()), op, ": x must be float32, float64, float16 or bfloat16, got ",
             x.scalar_type());
  DETR_CHECK(s2d_floating(dtype), op, ": dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  DETR_CHECK(kernel >= 1 && kernel % 2 == 1, op, ": kernel must be odd and positive, got ", kernel);
  DETR_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
             ": padding must be two non-negative sizes, got ", padding);
  DETR_CHECK(x.size(2) + 2 * padding[0] >= kernel && x.size(3) + 2 * padding[1] >= kernel, op, ": the padded input ",
             x.size(2) + 2 * padding[0], "x", x.size(3) + 2 * padding[1], " is smaller than the kernel ", kernel);
  DETR_CHECK(channels >= 4 * x.size(1), op, ": channels must be at least 4 * C = ", 4 * x.size(1), ", got ",
             channels);
  return S2dParams{x.size(0), x.size(1), x.size(2), x.size(3), s2d_extent(x.size(2), kernel, padding[0]),
                   s2d_extent(x.size(3), kernel, padding[1]), padding[0], padding[1], channels,
                   x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

inline at::Tensor space_to_depth_output(const at::Tensor& x, const S2dParams& p, at::ScalarType dtype) {
  return at::empty({p.B, p.channels, p.Hs, p.Ws}, x.options().dtype(dtype).memory_format(at::MemoryFormat::ChannelsLast));
}

}  // namespace detr_fast
