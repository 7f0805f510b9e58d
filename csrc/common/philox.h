// Counter-based Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) and the
// attention dropout stream built on it. __host__ __device__ so the CPU kernel, the CUDA kernels and the mask op
// that tests read draw bit-identical keep decisions from (seed, offset, b*H + h, query i, key j).
#pragma once
#include <cstdint>

#include "common/hd.h"

namespace detr_fast {

struct U32x4 {
  uint32_t x, y, z, w;
};

DF_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#ifdef __CUDA_ARCH__
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds: counter (x, y, z, w), key (k0, k1). Matches the Random123 known-answer vectors.
DF_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(0xD2511F53u, c.x, &hi0);
    const uint32_t lo1 = philox_mulhilo(0xCD9E8D57u, c.z, &hi1);
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

// ---- Attention dropout stream ----------------------------------------------------------------------------------
// Element (bh, i, j) of the [B*H, Lq, Lk] attention matrix takes one 32-bit word of one Philox block:
//   key     = (seed low, seed high)
//   counter = (j >> 1, ATTN_COUNTER_Y | ((i >> 4) << 3) | (i & 7), low(offset + bh), high(offset + bh))
//   word    = (j & 1) | (((i >> 3) & 1) << 1)
// so one block covers queries (i, i + 8) x keys (j, j + 1) for i with bit 3 clear and even j: exactly the four
// accumulator elements one thread owns in a 16x8 tensor-core tile, so the CUDA forward makes one Philox call per
// four scores. A call reserves offsets [offset, offset + B*H) (rounded up to 4), so successive calls never
// share a counter. The element is kept when word >= threshold, threshold = dropout_threshold(p).
// ATTN_COUNTER_Y (bit 30) keeps these counters apart from those of torch's own random kernels on the same
// generator, whose second counter word is the high word of a Philox offset (0 in any real run), and, with bit 31
// clear, from the LayerNorm stream's (layernorm_math.h). Lq < 2^31 keeps the row bits below bit 30.
constexpr uint32_t ATTN_COUNTER_Y = 0x40000000u;

DF_HD U32x4 attn_dropout_block(uint64_t seed, uint64_t offset, uint64_t bh, int64_t i, int64_t j) {
  const uint64_t sub = offset + bh;
  const U32x4 ctr{static_cast<uint32_t>(j >> 1), ATTN_COUNTER_Y | static_cast<uint32_t>(((i >> 4) << 3) | (i & 7)),
                  static_cast<uint32_t>(sub), static_cast<uint32_t>(sub >> 32)};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

DF_HD uint32_t attn_dropout_word(uint64_t seed, uint64_t offset, uint64_t bh, int64_t i, int64_t j) {
  const U32x4 r = attn_dropout_block(seed, offset, bh, i, j);
  const int w = static_cast<int>((j & 1) | (((i >> 3) & 1) << 1));
  return w == 0 ? r.x : (w == 1 ? r.y : (w == 2 ? r.z : r.w));
}

// Whether element (bh, i, j) is kept (not dropped).
DF_HD bool attn_dropout_keep(uint64_t seed, uint64_t offset, uint64_t bh, int64_t i, int64_t j, uint32_t threshold) {
  return attn_dropout_word(seed, offset, bh, i, j) >= threshold;
}

// Words below the threshold are dropped: P(drop) = threshold / 2^32 = p up to 2^-32.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

// Offsets one attention call reserves in the generator's Philox stream (a multiple of 4, as torch requires).
inline uint64_t attn_dropout_offset_increment(int64_t batch_heads) {
  return (static_cast<uint64_t>(batch_heads) + 3u) / 4u * 4u;
}

}  // namespace detr_fast
