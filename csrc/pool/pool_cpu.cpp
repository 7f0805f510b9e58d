// CPU kernel of detr_fast::max_pool2d_nhwc: parallel over output rows (n, oh); for each output pixel the window's
// pixels are read as rows of C contiguous channels. Math in common/pool_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "pool/pool_common.h"

namespace detr_fast {
namespace {

template <typename scalar_t>
void max_pool_nhwc_cpu_impl(const at::Tensor& x, at::Tensor& out, const PoolParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, p.N * p.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(p.C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / p.Ho, oh = row % p.Ho;
      int64_t h0, h1;
      pool_window(oh, p.H, p.kh, p.sh, p.ph, h0, h1);
      for (int64_t ow = 0; ow < p.Wo; ++ow) {
        int64_t w0, w1;
        pool_window(ow, p.W, p.kw, p.sw, p.pw, w0, w1);
        std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            const scalar_t* px = xp + ((n * p.H + h) * p.W + w) * p.C;
            for (int64_t c = 0; c < p.C; ++c) m[c] = pool_max<acc_t>(m[c], static_cast<acc_t>(px[c]));
          }
        }
        scalar_t* po = op + ((n * p.Ho + oh) * p.Wo + ow) * p.C;
        for (int64_t c = 0; c < p.C; ++c) po[c] = static_cast<scalar_t>(m[c]);
      }
    }
  });
}

at::Tensor max_pool_nhwc_cpu(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding) {
  const PoolParams p = check_max_pool_nhwc(x, kernel, stride, padding);
  at::Tensor out = max_pool_nhwc_output(x, p);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_nhwc_cpu",
                                  [&] { max_pool_nhwc_cpu_impl<scalar_t>(x, out, p); });
  return out;
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CPU, m) { m.impl("max_pool2d_nhwc", &detr_fast::max_pool_nhwc_cpu); }
