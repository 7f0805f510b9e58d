// CPU kernel of detr_fast::scale_many: each tensor in turn, its channels in parallel (at::parallel_for), every
// channel one contiguous run of `fan` elements. Math in common/scale_math.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "scale/scale_common.h"

namespace detr_fast {
namespace {

template <typename in_t, typename out_t, typename acc_t>
void scale_one_cpu(const at::Tensor& x, const at::Tensor& out, const acc_t* s) {
  const int64_t C = x.size(0), n = x.numel();
  if (n == 0) return;
  const int64_t fan = n / C;
  const in_t* xp = x.const_data_ptr<in_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / fan);
  at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const acc_t sc = s[c];
      for (int64_t j = c * fan; j < (c + 1) * fan; ++j) {
        op[j] = static_cast<out_t>(scale_value<acc_t>(static_cast<acc_t>(xp[j]), sc));
      }
    }
  });
}

std::vector<at::Tensor> scale_many_cpu(at::TensorList xs_in, const at::Tensor& scale, at::ScalarType dtype) {
  std::vector<at::Tensor> xs(xs_in.begin(), xs_in.end());
  check_scale_many(xs, scale, dtype);
  std::vector<at::Tensor> out = scale_many_outputs(xs, dtype);
  if (xs.empty()) return out;
  scale_many_dispatch(xs, scale, dtype, [&](auto in_tag, auto out_tag, const auto* s) {
    using in_t = decltype(in_tag);
    using out_t = decltype(out_tag);
    using acc_t = std::remove_cv_t<std::remove_pointer_t<decltype(s)>>;
    int64_t off = 0;
    for (size_t k = 0; k < xs.size(); ++k) {
      scale_one_cpu<in_t, out_t, acc_t>(xs[k], out[k], s + off);
      off += xs[k].size(0);
    }
  });
  return out;
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CPU, m) { m.impl("scale_many", &detr_fast::scale_many_cpu); }
