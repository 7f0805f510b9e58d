// fp32 CUDA attention kernels (FMA, no tensor cores: fp32 results stay within 1e-5 of an fp64 reference).
// SPLIT = D / 16 consecutive lanes share one row; lane s of a row owns the elements d = s + SPLIT * e (e < 16), so
// the lanes of a row read consecutive shared-memory words, and dot products end with a SPLIT-lane xor shuffle.
// Same semantics as the tensor-core kernels (attention_kernels.cuh): online softmax in base 2, lse saved per
// query, dQ kernel (writing delta = rowsum(dO * O)) then dK/dV kernel, per-element Philox dropout.
#pragma once
#include <tuple>  // older torch headers use std::tuple in UnpackRaw.cuh without including it
#include <ATen/cuda/PhiloxUtils.cuh>

#include "attention/attention_cuda.cuh"
#include "attention/attention_device.cuh"
#include "common/launch.cuh"
#include "common/philox.h"

namespace detr_fast {
namespace attn32 {

constexpr int kThreads = 128;
constexpr int kTile = 32;  // keys (forward, dQ) or queries (dK/dV) per shared-memory tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int SPLIT>
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int o = 1; o < SPLIT; o <<= 1) x += dev::shfl_xor(x, o);
  return x;
}

// Rows [r0, r0 + kTile) of a [L, D] matrix (row stride ld) into dst[kTile][D]; rows >= L are zero.
template <int D>
__device__ __forceinline__ void load_rows(const float* base, int64_t ld, int r0, int L, float* dst) {
  for (int c = threadIdx.x; c < kTile * D; c += kThreads) {
    const int r = c / D, d = c % D;
    dst[c] = r0 + r < L ? base[static_cast<int64_t>(r0 + r) * ld + d] : 0.f;
  }
}

__device__ __forceinline__ bool key_ok(const AttnParams& p, int b, int j) {
  return j < p.Lk && !(p.mask != nullptr && p.mask[static_cast<int64_t>(b) * p.Lk + j]);
}

__device__ __forceinline__ float lse2_of(const AttnParams& p, int64_t bh, int row) {
  if (row >= p.Lq) return INFINITY;
  const float l = p.lse_in[bh * p.Lq + row];
  return l == -INFINITY ? INFINITY : l * kLog2e;
}

template <int D>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const AttnParams p) {
  constexpr int SPLIT = D / 16, RPB = kThreads / SPLIT;
  __shared__ float Ks[kTile * D], Vs[kTile * D], kbias[kTile];
  const int nmb = (p.Lq + RPB - 1) / RPB;
  const int bh = blockIdx.x / nmb, b = bh / p.H, h = bh % p.H;
  const int row = (blockIdx.x % nmb) * RPB + threadIdx.x / SPLIT, sub = threadIdx.x % SPLIT;
  const float* qb = static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh;
  const float* kb = static_cast<const float*>(p.k) + b * p.k_sb + h * p.k_sh;
  const float* vb = static_cast<const float*>(p.v) + b * p.v_sb + h * p.v_sh;
  const auto seeds = at::cuda::philox::unpack(p.philox);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.rng_out[0] = static_cast<int64_t>(seed);
    p.rng_out[1] = static_cast<int64_t>(offset);
  }
  float q[16], o[16];
#pragma unroll
  for (int e = 0; e < 16; ++e) {
    q[e] = row < p.Lq ? qb[static_cast<int64_t>(row) * p.q_sl + sub + SPLIT * e] * p.scale_log2 : 0.f;
    o[e] = 0.f;
  }
  float m_run = -INFINITY, l_run = 0.f;
  for (int n0 = 0; n0 < p.Lk; n0 += kTile) {
    dev::block_sync();
    load_rows<D>(kb, p.k_sl, n0, p.Lk, Ks);
    load_rows<D>(vb, p.v_sl, n0, p.Lk, Vs);
    if (threadIdx.x < kTile) kbias[threadIdx.x] = key_ok(p, b, n0 + threadIdx.x) ? 0.f : -INFINITY;
    dev::block_sync();
    float s[kTile];
    float mx = m_run;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      float acc = 0.f;
#pragma unroll
      for (int e = 0; e < 16; ++e) acc = fmaf(q[e], Ks[j * D + sub + SPLIT * e], acc);
      s[j] = row_sum<SPLIT>(acc) + kbias[j];
      mx = fmaxf(mx, s[j]);
    }
    const float mu = mx == -INFINITY ? 0.f : mx;
    const float alpha = exp2f(m_run - mu);
    m_run = mx;
    l_run *= alpha;
#pragma unroll
    for (int e = 0; e < 16; ++e) o[e] *= alpha;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      float pj = exp2f(s[j] - mu);
      l_run += pj;
      if (p.dropout && !attn_dropout_keep(seed, offset, bh, row, n0 + j, p.threshold)) pj = 0.f;
#pragma unroll
      for (int e = 0; e < 16; ++e) o[e] = fmaf(pj, Vs[j * D + sub + SPLIT * e], o[e]);
    }
  }
  if (row >= p.Lq) return;
  const float inv = l_run > 0.f ? p.keep_scale / l_run : 0.f;
  float* ob = static_cast<float*>(p.out) + static_cast<int64_t>(b) * p.oq_sb + static_cast<int64_t>(h) * p.oq_sh +
              static_cast<int64_t>(row) * p.oq_sl;
#pragma unroll
  for (int e = 0; e < 16; ++e) ob[sub + SPLIT * e] = o[e] * inv;
  if (sub == 0)
    p.lse[static_cast<int64_t>(bh) * p.Lq + row] = l_run > 0.f ? (m_run + __log2f(l_run)) * kLn2 : -INFINITY;
}

template <int D>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(const AttnParams p) {
  constexpr int SPLIT = D / 16, RPB = kThreads / SPLIT;
  __shared__ float Ks[kTile * D], Vs[kTile * D], kbias[kTile];
  const int nmb = (p.Lq + RPB - 1) / RPB;
  const int bh = blockIdx.x / nmb, b = bh / p.H, h = bh % p.H;
  const int row = (blockIdx.x % nmb) * RPB + threadIdx.x / SPLIT, sub = threadIdx.x % SPLIT;
  const bool in = row < p.Lq;
  const float* qb = static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh;
  const float* kb = static_cast<const float*>(p.k) + b * p.k_sb + h * p.k_sh;
  const float* vb = static_cast<const float*>(p.v) + b * p.v_sb + h * p.v_sh;
  // this row of dout, o and dq (row < Lq is checked before any access)
  const int64_t r_off = static_cast<int64_t>(b) * p.oq_sb + static_cast<int64_t>(h) * p.oq_sh +
                        static_cast<int64_t>(row) * p.oq_sl;
  const float* dob = static_cast<const float*>(p.dout);
  const float* ob = p.o;
  const uint64_t seed = static_cast<uint64_t>(p.rng_in[0]), offset = static_cast<uint64_t>(p.rng_in[1]);
  float q[16], dO[16], dq[16], dl = 0.f;
#pragma unroll
  for (int e = 0; e < 16; ++e) {
    const int d = sub + SPLIT * e;
    q[e] = in ? qb[static_cast<int64_t>(row) * p.q_sl + d] : 0.f;
    dO[e] = in ? dob[r_off + d] : 0.f;
    dl = fmaf(dO[e], in ? ob[r_off + d] : 0.f, dl);
    dq[e] = 0.f;
  }
  dl = row_sum<SPLIT>(dl);
  if (in && sub == 0) p.delta[static_cast<int64_t>(bh) * p.Lq + row] = dl;
  const float lse2 = lse2_of(p, bh, row);
  for (int n0 = 0; n0 < p.Lk; n0 += kTile) {
    dev::block_sync();
    load_rows<D>(kb, p.k_sl, n0, p.Lk, Ks);
    load_rows<D>(vb, p.v_sl, n0, p.Lk, Vs);
    if (threadIdx.x < kTile) kbias[threadIdx.x] = key_ok(p, b, n0 + threadIdx.x) ? 0.f : -INFINITY;
    dev::block_sync();
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        s = fmaf(q[e], Ks[j * D + sub + SPLIT * e], s);
        dp = fmaf(dO[e], Vs[j * D + sub + SPLIT * e], dp);
      }
      s = row_sum<SPLIT>(s);
      dp = row_sum<SPLIT>(dp);
      const float pr = exp2f(fmaf(s, p.scale_log2, kbias[j]) - lse2);
      float kf = p.keep_scale;
      if (p.dropout && !attn_dropout_keep(seed, offset, bh, row, n0 + j, p.threshold)) kf = 0.f;
      const float ds = pr * (dp * kf - dl);
#pragma unroll
      for (int e = 0; e < 16; ++e) dq[e] = fmaf(ds, Ks[j * D + sub + SPLIT * e], dq[e]);
    }
  }
  if (!in) return;
  float* dqb = static_cast<float*>(p.dq) + r_off;
#pragma unroll
  for (int e = 0; e < 16; ++e) dqb[sub + SPLIT * e] = dq[e] * p.scale;
}

template <int D>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_kernel(const AttnParams p) {
  constexpr int SPLIT = D / 16, RPB = kThreads / SPLIT;
  __shared__ float Qs[kTile * D], dOs[kTile * D], lse_s[kTile], delta_s[kTile];
  const int nnb = (p.Lk + RPB - 1) / RPB;
  const int bh = blockIdx.x / nnb, b = bh / p.H, h = bh % p.H;
  const int key = (blockIdx.x % nnb) * RPB + threadIdx.x / SPLIT, sub = threadIdx.x % SPLIT;
  const bool in = key < p.Lk, valid = key_ok(p, b, key);
  const float* qb = static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh;
  const float* kb = static_cast<const float*>(p.k) + b * p.k_sb + h * p.k_sh;
  const float* vb = static_cast<const float*>(p.v) + b * p.v_sb + h * p.v_sh;
  const int64_t row_base = static_cast<int64_t>(bh) * p.Lq;  // lse and delta rows
  const float* dob =
      static_cast<const float*>(p.dout) + static_cast<int64_t>(b) * p.oq_sb + static_cast<int64_t>(h) * p.oq_sh;
  const uint64_t seed = static_cast<uint64_t>(p.rng_in[0]), offset = static_cast<uint64_t>(p.rng_in[1]);
  float k[16], v[16], dk[16], dv[16];
#pragma unroll
  for (int e = 0; e < 16; ++e) {
    const int d = sub + SPLIT * e;
    k[e] = in ? kb[static_cast<int64_t>(key) * p.k_sl + d] : 0.f;
    v[e] = in ? vb[static_cast<int64_t>(key) * p.v_sl + d] : 0.f;
    dk[e] = dv[e] = 0.f;
  }
  for (int m0 = 0; m0 < p.Lq; m0 += kTile) {
    dev::block_sync();
    load_rows<D>(qb, p.q_sl, m0, p.Lq, Qs);
    load_rows<D>(dob, p.oq_sl, m0, p.Lq, dOs);
    if (threadIdx.x < kTile) {
      lse_s[threadIdx.x] = lse2_of(p, bh, m0 + threadIdx.x);
      delta_s[threadIdx.x] = m0 + threadIdx.x < p.Lq ? p.delta[row_base + m0 + threadIdx.x] : 0.f;
    }
    dev::block_sync();
#pragma unroll 4
    for (int i = 0; i < kTile; ++i) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        s = fmaf(k[e], Qs[i * D + sub + SPLIT * e], s);
        dp = fmaf(v[e], dOs[i * D + sub + SPLIT * e], dp);
      }
      s = row_sum<SPLIT>(s);
      dp = row_sum<SPLIT>(dp);
      const float pr = valid ? exp2f(fmaf(s, p.scale_log2, -lse_s[i])) : 0.f;
      float kf = p.keep_scale;
      if (p.dropout && !attn_dropout_keep(seed, offset, bh, m0 + i, key, p.threshold)) kf = 0.f;
      const float z = pr * kf, ds = pr * (dp * kf - delta_s[i]);
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        dv[e] = fmaf(z, dOs[i * D + sub + SPLIT * e], dv[e]);
        dk[e] = fmaf(ds, Qs[i * D + sub + SPLIT * e], dk[e]);
      }
    }
  }
  if (!in) return;
  const int64_t off = static_cast<int64_t>(b) * p.ok_sb + static_cast<int64_t>(h) * p.ok_sh +
                      static_cast<int64_t>(key) * p.ok_sl;
  float* dkb = static_cast<float*>(p.dk) + off;
  float* dvb = static_cast<float*>(p.dv) + off;
#pragma unroll
  for (int e = 0; e < 16; ++e) {
    dkb[sub + SPLIT * e] = dk[e] * p.scale;
    dvb[sub + SPLIT * e] = dv[e];
  }
}

inline unsigned blocks(int64_t bh, int64_t len, int rows) {
  return static_cast<unsigned>(bh * ((len + rows - 1) / rows));
}

}  // namespace attn32

}  // namespace detr_fast

// The fp32 launchers for head dim D: explicit specializations, expanded in one translation unit (the device build's
// attention_cuda_f32.cu, or the host emulator's).
#define DETR_ATTN_F32_LAUNCHERS(D)                                                                      \
  template <>                                                                                          \
  void attn_launch_forward<float, D>(const AttnParams& p, cudaStream_t stream) {                      \
    const unsigned n = attn32::blocks(int64_t(p.B) * p.H, p.Lq, attn32::kThreads / (D / 16));          \
    if (n == 0) return;                                                                                \
    launch_kernel(attn32::fwd_kernel<D>, dim3(n), dim3(attn32::kThreads), stream, p);                  \
  }                                                                                                    \
  template <>                                                                                          \
  void attn_launch_backward<float, D>(const AttnParams& p, cudaStream_t stream) {                     \
    const unsigned nq = attn32::blocks(int64_t(p.B) * p.H, p.Lq, attn32::kThreads / (D / 16));         \
    const unsigned nk = attn32::blocks(int64_t(p.B) * p.H, p.Lk, attn32::kThreads / (D / 16));         \
    if (nq > 0) launch_kernel(attn32::bwd_dq_kernel<D>, dim3(nq), dim3(attn32::kThreads), stream, p);  \
    if (nk > 0) launch_kernel(attn32::bwd_dkdv_kernel<D>, dim3(nk), dim3(attn32::kThreads), stream, p); \
  }
