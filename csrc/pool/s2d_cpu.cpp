// CPU kernel of detr_fast::space_to_depth: parallel over output rows (b, Y); each output pixel's channels are
// written in order, each from its source element in x (common/s2d_math.h) or zero.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "pool/s2d_common.h"

namespace detr_fast {
namespace {

template <typename in_t, typename out_t>
void space_to_depth_cpu_impl(const at::Tensor& x, at::Tensor& out, const S2dParams& p) {
  const in_t* xp = x.const_data_ptr<in_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  at::parallel_for(0, p.B * p.Hs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t rowi = begin; rowi < end; ++rowi) {
      const int64_t b = rowi / p.Hs, Y = rowi % p.Hs;
      for (int64_t X = 0; X < p.Ws; ++X) {
        out_t* po = op + (rowi * p.Ws + X) * p.channels;
        for (int64_t q = 0; q < p.channels; ++q) {
          int64_t c, r, s;
          po[q] = s2d_source(q, Y, X, p.C, p.H, p.W, p.ph, p.pw, c, r, s)
                      ? static_cast<out_t>(xp[b * p.sb + c * p.sc + r * p.sh + s * p.sw])
                      : out_t(0);
        }
      }
    }
  });
}

at::Tensor space_to_depth_cpu(const at::Tensor& x, int64_t kernel, at::IntArrayRef padding, int64_t channels,
                              at::ScalarType dtype) {
  const S2dParams p = check_space_to_depth(x, kernel, padding, channels, dtype);
  at::Tensor out = space_to_depth_output(x, p, dtype);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "space_to_depth_cpu", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "space_to_depth_cpu_out",
                                    [&] { space_to_depth_cpu_impl<in_t, scalar_t>(x, out, p); });
  });
  return out;
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CPU, m) { m.impl("space_to_depth", &detr_fast::space_to_depth_cpu); }
