// Math of detr_fast::scale_many shared by the CPU and CUDA kernels.
//
//   out[i] = x[i] * scale[channel(i)]   for each tensor x of the list, its elements in memory order
//
// Every tensor holds its dimension 0 (the channel: a convolution's output channel) outermost in memory (contiguous
// or channels_last), so element i of a tensor with `fan` elements per channel belongs to channel i / fan. The product
// is formed in acc_t (float; double when any operand is double) and rounded once to the output dtype: what
// torch.mul(x, scale.view(C, 1, ...), out=out) computes.
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace detr_fast {

// The channel of element i (memory order) of a tensor with `fan` elements per channel; 32-bit arithmetic (every
// tensor has fewer than 2^31 elements, checked by the entry points).
DF_HD uint32_t scale_channel(uint32_t i, uint32_t fan) { return i / fan; }

template <typename acc_t>
DF_HD acc_t scale_value(acc_t x, acc_t s) { return x * s; }

}  // namespace detr_fast
