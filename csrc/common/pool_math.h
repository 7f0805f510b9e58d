// Math of detr_fast::max_pool2d_nhwc shared by the CPU and CUDA kernels: a max pool over a kernel window with
// stride and zero-size implicit padding (padded positions take no part), dilation 1, floor rounding of the output
// size. A NaN in the window makes the output NaN, as torch's max_pool2d does; otherwise the largest value, exactly.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace detr_fast {

// Output extent of one spatial dimension (floor mode).
DF_HD int64_t pool_out_size(int64_t in, int64_t k, int64_t s, int64_t p) { return (in + 2 * p - k) / s + 1; }

// The window [begin, end) of output index o along a dimension of `in` positions, clipped to the input.
DF_HD void pool_window(int64_t o, int64_t in, int64_t k, int64_t s, int64_t p, int64_t& begin, int64_t& end) {
  const int64_t b = o * s - p;
  begin = b < 0 ? 0 : b;
  end = b + k < in ? b + k : in;
}

// One step of the running maximum: v replaces m when larger or NaN (a NaN, once in, stays).
template <typename acc_t>
DF_HD acc_t pool_max(acc_t m, acc_t v) { return (v > m || v != v) ? v : m; }

}  // namespace detr_fast
