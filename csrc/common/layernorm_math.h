// Math of detr_fast::add_dropout_layernorm shared by the CPU and CUDA kernels: the dropout stream, the per-element
// residual add, mean/variance partials and their combination, the normalization and its gradient.
//
//   h = residual + keep * x / (1 - p),  y = (h - mean(h)) * rstd * weight + bias,  rstd = 1 / sqrt(var(h) + eps)
//
// var is the biased variance over the last dimension d, as in torch.nn.functional.layer_norm. Statistics are
// accumulated in acc_t (float, double for double inputs).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/philox.h"  // DF_HD, philox4x32_10, dropout_threshold

namespace detr_fast {

// ---- Dropout stream of add_dropout_layernorm -------------------------------------------------------------------
// The input is viewed as [rows, d]. Element (row, col) takes word (col & 3) of the Philox block
//   key     = (seed low, seed high)
//   counter = (col >> 2, LN_COUNTER_Y, low(offset + row), high(offset + row))
// so one Philox call covers four consecutive columns (one 4-element vector of the CUDA kernel). LN_COUNTER_Y has its
// top bit set; the attention stream's second counter word stays below 2^31, so the two streams never share a
// counter even for the same (seed, offset). A call reserves offsets [offset, offset + rows) (rounded up to 4).
// The element is kept when word >= dropout_threshold(p) (philox.h): P(drop) = p up to 2^-32.
constexpr uint32_t LN_COUNTER_Y = 0x80004C4Eu;

DF_HD U32x4 ln_dropout_block(uint64_t seed, uint64_t offset, int64_t row, int64_t col4) {
  const uint64_t sub = offset + static_cast<uint64_t>(row);
  const U32x4 ctr{static_cast<uint32_t>(col4), LN_COUNTER_Y, static_cast<uint32_t>(sub),
                  static_cast<uint32_t>(sub >> 32)};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

DF_HD uint32_t u32x4_word(const U32x4& r, int w) { return w == 0 ? r.x : (w == 1 ? r.y : (w == 2 ? r.z : r.w)); }

// Whether element (row, col) is kept (not dropped).
DF_HD bool ln_dropout_keep(uint64_t seed, uint64_t offset, int64_t row, int64_t col, uint32_t threshold) {
  return u32x4_word(ln_dropout_block(seed, offset, row, col >> 2), static_cast<int>(col & 3)) >= threshold;
}

// Offsets one call reserves in the generator's Philox stream (a multiple of 4, as torch requires).
inline uint64_t ln_dropout_offset_increment(int64_t rows) { return (static_cast<uint64_t>(rows) + 3u) / 4u * 4u; }

// ---- relu_dropout: the transformer FFN's activation, y = dropout(relu(x)) ---------------------------------------
// Same stream as above, x viewed as [rows, d]: relu_dropout and add_dropout_layernorm_mask share the keep mask
// definition (each call reserves its own offsets). relu passes NaN (as torch's relu); a dropped element is
// relu(x) * 0 (NaN and inf give NaN, as torch's dropout). The gradient needs only y: y > 0 exactly where the element
// was kept and x > 0, where dy / dx = keep_scale; elsewhere the gradient is 0.
template <typename acc_t>
DF_HD acc_t relu_dropout_value(acc_t x, bool keep, acc_t keep_scale) {
  const acc_t r = x < acc_t(0) ? acc_t(0) : x;
  return r * (keep ? keep_scale : acc_t(0));
}

template <typename acc_t>
DF_HD acc_t relu_dropout_grad(acc_t grad_y, acc_t y, acc_t keep_scale) {
  return y > acc_t(0) ? grad_y * keep_scale : acc_t(0);
}

// ---- Per element -----------------------------------------------------------------------------------------------
// h = residual + x * keep_scale when kept, residual when dropped. keep_scale = 1 / (1 - p); with p == 0 every
// element is kept and keep_scale == 1, so h == residual + x exactly.
template <typename acc_t>
DF_HD acc_t ln_add_dropout(acc_t x, acc_t residual, bool keep, acc_t keep_scale) {
  return keep ? residual + x * keep_scale : residual;
}

template <typename acc_t>
DF_HD acc_t ln_normalize(acc_t h, acc_t mean, acc_t rstd, acc_t w, acc_t b) {
  return (h - mean) * rstd * w + b;
}

// Gradient of the row's h from dxhat = grad_out * weight and xhat = (h - mean) * rstd, with
// c1 = mean over the row of dxhat and c2 = mean over the row of dxhat * xhat:  dh = rstd * (dxhat - c1 - xhat * c2).
template <typename acc_t>
DF_HD acc_t ln_grad_h(acc_t dxhat, acc_t xhat, acc_t rstd, acc_t c1, acc_t c2) {
  return rstd * (dxhat - c1 - xhat * c2);
}

// ---- Mean and variance -----------------------------------------------------------------------------------------
// (count, mean, M2 = sum of squared deviations from the mean) of a part of a row. Parts are computed by two passes
// over values held in registers (or a row buffer) and combined pairwise (Chan, Golub and LeVeque 1979), which
// stays accurate when the mean is large compared with the spread.
template <typename acc_t>
struct MeanM2 {
  acc_t n, mean, m2;
};

template <typename acc_t>
DF_HD MeanM2<acc_t> meanm2_combine(const MeanM2<acc_t>& a, const MeanM2<acc_t>& b) {
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t n = a.n + b.n;
  const acc_t delta = b.mean - a.mean;
  const acc_t fb = b.n / n;
  return MeanM2<acc_t>{n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

// Two passes over v[0], v[stride], ..., v[(n - 1) * stride].
template <typename acc_t>
DF_HD MeanM2<acc_t> meanm2_of(const acc_t* v, int n, int stride = 1) {
  if (n <= 0) return MeanM2<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
  acc_t s = 0;
  for (int i = 0; i < n; ++i) s += v[i * stride];
  const acc_t mean = s / static_cast<acc_t>(n);
  acc_t m2 = 0;
  for (int i = 0; i < n; ++i) {
    const acc_t dv = v[i * stride] - mean;
    m2 += dv * dv;
  }
  return MeanM2<acc_t>{static_cast<acc_t>(n), mean, m2};
}

DF_HD float ln_rsqrt(float v) {
#ifdef __CUDA_ARCH__
  return ::rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}

DF_HD double ln_rsqrt(double v) {
#ifdef __CUDA_ARCH__
  return ::rsqrt(v);
#else
  return 1.0 / std::sqrt(v);
#endif
}

// 1 / sqrt(biased variance + eps) of a whole row (s.n == d >= 1).
template <typename acc_t>
DF_HD acc_t ln_rstd(const MeanM2<acc_t>& s, acc_t eps) {
  const acc_t var = s.m2 / s.n;
  return ln_rsqrt((var > acc_t(0) ? var : acc_t(0)) + eps);
}

}  // namespace detr_fast
