// Math of detr_fast::space_to_depth shared by the CPU and CUDA kernels: where each element of the space-to-depth
// input of a stride-2 convolution comes from.
//
// A stride-2 convolution of x [B, C, H, W] with an odd k x k kernel and padding (ph, pw) equals a stride-1, unpadded
// convolution with a ceil(k / 2)-wide kernel of S[b, 4c + 2r + s, Y, X] = x[b, c, 2Y + r - ph, 2X + s - pw] (zero
// outside x), r, s in {0, 1}; channels 4C and up of S are zero. S spans the stride-2 output plus ceil(k / 2) - 1 rows
// and columns.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace detr_fast {

// S's extent along a dimension of `in` positions for kernel k (odd) and padding p: the stride-2 output's size plus
// ceil(k / 2) - 1.
DF_HD int64_t s2d_extent(int64_t in, int64_t k, int64_t p) { return (in + 2 * p - k) / 2 + (k + 1) / 2; }

// The source of channel q of S at (Y, X): true with x's (c, row, col) when it lies inside x [C, H, W], false for a
// zero (padding, or a channel at or past 4C).
DF_HD bool s2d_source(int64_t q, int64_t Y, int64_t X, int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw,
                      int64_t& c, int64_t& row, int64_t& col) {
  c = q >> 2;
  row = 2 * Y + ((q >> 1) & 1) - ph;
  col = 2 * X + (q & 1) - pw;
  return c < C && row >= 0 && row < H && col >= 0 && col < W;
}

}  // namespace detr_fast
