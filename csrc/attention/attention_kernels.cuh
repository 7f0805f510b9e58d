// Tensor-core attention kernels for fp16/bf16 (FlashAttention-2 style), mma.sync.m16n8k16 with fp32 accumulation.
//
// Forward: one CTA of 4 warps per (b, h, 64-query block); each warp owns 16 query rows and keeps its Q fragments,
// the running max / sum and the output accumulator in registers while it walks over 64-key blocks of K and V
// staged in shared memory (online softmax in base 2). Nothing of size Lq x Lk reaches global memory; the
// log-sum-exp of each query row is saved for the backward.
// Backward: a small kernel writes delta = rowsum(dO * O); then a dQ kernel per 64-query block and, concurrently on a
// second stream, a dK/dV kernel per 64-key block that walks over the query blocks; both recompute P = exp(s - lse)
// tile by tile and read the dropout flags the forward saved (else draw them again). No atomics: dQ, dK and dV
// are each owned by one CTA, so the results are deterministic. Key tiles whose keys are all padded are skipped
// (they contribute exactly nothing), which saves the padded part of DETR's batches.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16 (row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..2t+1), a2 = (g, 2t+8..2t+9), a3 = (g+8, 2t+8..2t+9)
//   B 16x8 (col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C 16x8:        c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1)
// Two adjacent C tiles (columns 0-7, 8-15) form the A fragment of the next product, so probabilities go from the
// score accumulators to the P.V product without leaving registers. B operands are read from shared memory as
// 32-bit pairs along k, so an operand whose k index is the row of a global matrix is stored transposed.
// Shared-memory rows are padded by 8 elements (16 bytes) so those 32-bit fragment reads hit distinct banks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <tuple>  // older torch headers use std::tuple in UnpackRaw.cuh without including it
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>

#include "attention/attention_common.h"
#include "attention/attention_cuda.cuh"
#include "attention/attention_device.cuh"
#include "common/launch.cuh"
#include "common/philox.h"

namespace detr_fast {
namespace attn {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBlockM = 64;    // queries per tile
constexpr int kBlockN = 64;    // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// A fragment (16 rows x 16 k) from a row-major shared tile with row pitch `pitch`, rows r0.., k columns k0...
template <typename T>
__device__ __forceinline__ void load_a(uint32_t a[4], const T* s, int pitch, int r0, int k0, int g, int t) {
  a[0] = ld32(s + (r0 + g) * pitch + k0 + 2 * t);
  a[1] = ld32(s + (r0 + g + 8) * pitch + k0 + 2 * t);
  a[2] = ld32(s + (r0 + g) * pitch + k0 + 2 * t + 8);
  a[3] = ld32(s + (r0 + g + 8) * pitch + k0 + 2 * t + 8);
}

// B fragment (16 k x 8 n) from a shared tile stored n-major: element (k, n) at s[n * pitch + k].
template <typename T>
__device__ __forceinline__ void load_b(uint32_t& b0, uint32_t& b1, const T* s, int pitch, int n0, int k0, int g,
                                       int t) {
  b0 = ld32(s + (n0 + g) * pitch + k0 + 2 * t);
  b1 = ld32(s + (n0 + g) * pitch + k0 + 2 * t + 8);
}

// Rows [r0, r0 + ROWS) of a [L, D] matrix (row stride ld, unit column stride) into shared memory: row-major
// dst[ROWS][D + 8] and/or transposed dstT[D][ROWS + 8]; rows >= L are zero. 16-byte global loads.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(const T* base, int64_t ld, int r0, int L, T* dst, T* dstT) {
  constexpr int kChunks = D / 8;
  static_assert((ROWS * kChunks) % kThreads == 0, "tile chunks must divide evenly among the threads");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / kThreads; ++it) {
    const int c = threadIdx.x + it * kThreads;
    const int r = c / kChunks, d = (c % kChunks) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r0 + r < L) val = dev::ldg16(base + static_cast<int64_t>(r0 + r) * ld + d);
    if (dst != nullptr) *reinterpret_cast<uint4*>(dst + r * (D + 8) + d) = val;
    if (dstT != nullptr) {
      const T* e = reinterpret_cast<const T*>(&val);
#pragma unroll
      for (int x = 0; x < 8; ++x) dstT[(d + x) * (ROWS + 8) + r] = e[x];
    }
  }
}

// 0 for an unpadded key inside [0, Lk), -inf otherwise.
__device__ __forceinline__ float key_bias(const AttnParams& p, int b, int j) {
  return (j < p.Lk && !(p.mask != nullptr && p.mask[static_cast<int64_t>(b) * p.Lk + j])) ? 0.f : -INFINITY;
}

// Offset (in 16-bit words) of the saved keep flags of (bh, row) for the key tile starting at key n0.
__device__ __forceinline__ int64_t keep_index(const AttnParams& p, int64_t bh, int row, int n0) {
  return ((bh * p.Lq + row) * ((p.Lk + kBlockN - 1) / kBlockN) + n0 / kBlockN) * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const AttnParams p) {
  constexpr int DP = D + 8, NP = kBlockN + 8, KD = D / 16;
  __shared__ __align__(16) T Ks[kBlockN * DP];  // also stages Q
  __shared__ __align__(16) T Vt[D * NP];
  __shared__ float kbias[kBlockN];

  const int nmb = (p.Lq + kBlockM - 1) / kBlockM;
  const int bh = blockIdx.x / nmb, m0 = (blockIdx.x % nmb) * kBlockM;
  const int b = bh / p.H, h = bh % p.H;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4, wr = warp * 16;
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;

  const auto seeds = at::cuda::philox::unpack(p.philox);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  if (blockIdx.x == 0 && tid == 0) {
    p.rng_out[0] = static_cast<int64_t>(seed);
    p.rng_out[1] = static_cast<int64_t>(offset);
  }

  load_tile<T, kBlockM, D>(qb, p.q_sl, m0, p.Lq, Ks, nullptr);
  dev::block_sync();
  uint32_t qa[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) load_a(qa[kk], Ks, DP, wr, kk * 16, g, t);

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const int row0 = m0 + wr + g;  // this thread's rows: row0 and row0 + 8 (bit 3 of row0 is clear)

  for (int n0 = 0; n0 < p.Lk; n0 += kBlockN) {
    dev::block_sync();  // the previous tile (or Q) is no longer read
    const float bias = key_bias(p, b, n0 + tid % kBlockN);
    if (tid < kBlockN) kbias[tid] = bias;
    if (!dev::block_any(bias == 0.f)) continue;  // every key of the tile is padded: it adds nothing
    load_tile<T, kBlockN, D>(kb, p.k_sl, n0, p.Lk, Ks, nullptr);
    load_tile<T, kBlockN, D>(vb, p.v_sl, n0, p.Lk, nullptr, Vt);
    dev::block_sync();

    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t b0, b1;
        load_b(b0, b1, Ks, DP, nt * 8, kk * 16, g, t);
        dev::mma16816<T>(s[nt], qa[kk], b0, b1);
      }
    }
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      const float b0 = kbias[nt * 8 + 2 * t], b1 = kbias[nt * 8 + 2 * t + 1];
      s[nt][0] = fmaf(s[nt][0], p.scale_log2, b0);
      s[nt][1] = fmaf(s[nt][1], p.scale_log2, b1);
      s[nt][2] = fmaf(s[nt][2], p.scale_log2, b0);
      s[nt][3] = fmaf(s[nt][3], p.scale_log2, b1);
      mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float mu[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], dev::shfl_xor(mx[r], 1));
      mx[r] = fmaxf(mx[r], dev::shfl_xor(mx[r], 2));
      mu[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // no unpadded key yet: keep exp2 finite
      const float alpha = exp2f(m_run[r] - mu[r]);
      m_run[r] = mx[r];
      l_run[r] *= alpha;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }
    uint32_t kept[2] = {0u, 0u};  // this lane's keep flags of rows row0 and row0 + 8 (attn_keep_words layout)
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - mu[0]);
      s[nt][1] = exp2f(s[nt][1] - mu[0]);
      s[nt][2] = exp2f(s[nt][2] - mu[1]);
      s[nt][3] = exp2f(s[nt][3] - mu[1]);
      l_run[0] += s[nt][0] + s[nt][1];
      l_run[1] += s[nt][2] + s[nt][3];
      if (p.dropout) {
        const U32x4 rnd = attn_dropout_block(seed, offset, bh, row0, n0 + nt * 8 + 2 * t);
        const bool k0 = rnd.x >= p.threshold, k1 = rnd.y >= p.threshold;
        const bool k2 = rnd.z >= p.threshold, k3 = rnd.w >= p.threshold;
        kept[0] |= (uint32_t(k0) | uint32_t(k1) << 1) << (2 * nt);
        kept[1] |= (uint32_t(k2) | uint32_t(k3) << 1) << (2 * nt);
        s[nt][0] = k0 ? s[nt][0] : 0.f;
        s[nt][1] = k1 ? s[nt][1] : 0.f;
        s[nt][2] = k2 ? s[nt][2] : 0.f;
        s[nt][3] = k3 ? s[nt][3] : 0.f;
      }
    }
    if (p.keep_out != nullptr) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (row0 + 8 * r < p.Lq) p.keep_out[keep_index(p, bh, row0 + 8 * r, n0) + t] = static_cast<uint16_t>(kept[r]);
    }
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t b0, b1;
        load_b(b0, b1, Vt, NP, dt * 8, kk * 16, g, t);
        dev::mma16816<T>(o[dt], pa, b0, b1);
      }
    }
  }

  T* ob = static_cast<T*>(p.out);
  const int64_t obase = static_cast<int64_t>(b) * p.oq_sb + static_cast<int64_t>(h) * p.oq_sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += dev::shfl_xor(l, 1);
    l += dev::shfl_xor(l, 2);
    const int row = row0 + 8 * r;
    if (row >= p.Lq) continue;
    const float inv = l > 0.f ? p.keep_scale / l : 0.f;
    const int64_t base = obase + static_cast<int64_t>(row) * p.oq_sl;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const float o0 = o[dt][2 * r] * inv, o1 = o[dt][2 * r + 1] * inv;
      *reinterpret_cast<uint32_t*>(ob + base + dt * 8 + 2 * t) = pack2<T>(o0, o1);
      if (p.out_f32 != nullptr) *reinterpret_cast<float2*>(p.out_f32 + base + dt * 8 + 2 * t) = make_float2(o0, o1);
    }
    if (t == 0)
      p.lse[static_cast<int64_t>(bh) * p.Lq + row] = l > 0.f ? (m_run[r] + __log2f(l)) * kLn2 : -INFINITY;
  }
}

// lse in log2 units with -inf (no unpadded key) and rows outside [0, Lq) mapped to +inf, so exp2(s - lse) = 0.
__device__ __forceinline__ float lse2_of(const AttnParams& p, int64_t bh, int row) {
  if (row >= p.Lq) return INFINITY;
  const float l = p.lse_in[bh * p.Lq + row];
  return l == -INFINITY ? INFINITY : l * kLog2e;
}

// delta[bh, row] = rowsum(dO * O) with O in fp32 (the forward's unrounded output), for both backward kernels: two
// threads per row, D / 2 elements each, kThreads / 2 rows per block.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_delta_kernel(const AttnParams p) {
  const int tid = threadIdx.x, half = tid % 2;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 2) + tid / 2;  // (bh, row) flattened
  const int64_t bh = r / p.Lq;
  const int row = static_cast<int>(r % p.Lq);
  float acc = 0.f;
  if (bh < static_cast<int64_t>(p.B) * p.H) {
    const int64_t base = (bh / p.H) * p.oq_sb + (bh % p.H) * p.oq_sh + static_cast<int64_t>(row) * p.oq_sl;
    const T* dob = static_cast<const T*>(p.dout) + base;
    const float* ob = p.o + base;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      const int d = half * (D / 2) + c * 8;
      const uint4 a = dev::ldg16(dob + d);
      const uint4 o0 = dev::ldg16(ob + d), o1 = dev::ldg16(ob + d + 4);
      const T* ea = reinterpret_cast<const T*>(&a);
      const float* eo0 = reinterpret_cast<const float*>(&o0);
      const float* eo1 = reinterpret_cast<const float*>(&o1);
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        acc = fmaf(to_float<T>(ea[x]), eo0[x], acc);
        acc = fmaf(to_float<T>(ea[x + 4]), eo1[x], acc);
      }
    }
  }
  acc += dev::shfl_xor(acc, 1);
  if (half == 0 && bh < static_cast<int64_t>(p.B) * p.H) p.delta[r] = acc;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const AttnParams p) {
  constexpr int DP = D + 8, NP = kBlockN + 8, KD = D / 16;
  __shared__ __align__(16) T Ks[kBlockN * DP];  // also stages Q
  __shared__ __align__(16) T Vs[kBlockN * DP];  // also stages dO
  __shared__ __align__(16) T Kt[D * NP];
  __shared__ float kbias[kBlockN];
  __shared__ float lse_s[kBlockM], delta_s[kBlockM];

  const int nmb = (p.Lq + kBlockM - 1) / kBlockM;
  const int bh = blockIdx.x / nmb, m0 = (blockIdx.x % nmb) * kBlockM;
  const int b = bh / p.H, h = bh % p.H;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4, wr = warp * 16;
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const int64_t row_base = static_cast<int64_t>(bh) * p.Lq;  // lse and delta rows
  const int64_t obase = static_cast<int64_t>(b) * p.oq_sb + static_cast<int64_t>(h) * p.oq_sh;
  const T* dob = static_cast<const T*>(p.dout) + obase;
  const uint64_t seed = static_cast<uint64_t>(p.rng_in[0]), offset = static_cast<uint64_t>(p.rng_in[1]);

  load_tile<T, kBlockM, D>(qb, p.q_sl, m0, p.Lq, Ks, nullptr);
  load_tile<T, kBlockM, D>(dob, p.oq_sl, m0, p.Lq, Vs, nullptr);
  if (tid < kBlockM) {  // delta = rowsum(dO * O), from attn_delta_kernel
    const int row = m0 + tid;
    delta_s[tid] = row < p.Lq ? p.delta[row_base + row] : 0.f;
    lse_s[tid] = lse2_of(p, bh, row);
  }
  dev::block_sync();
  uint32_t qa[KD][4], da[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) {
    load_a(qa[kk], Ks, DP, wr, kk * 16, g, t);
    load_a(da[kk], Vs, DP, wr, kk * 16, g, t);
  }
  const float lse2[2] = {lse_s[wr + g], lse_s[wr + g + 8]};
  const float dlt[2] = {delta_s[wr + g], delta_s[wr + g + 8]};
  const int row0 = m0 + wr + g;

  float dq[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

  for (int n0 = 0; n0 < p.Lk; n0 += kBlockN) {
    dev::block_sync();
    const float bias = key_bias(p, b, n0 + tid % kBlockN);
    if (tid < kBlockN) kbias[tid] = bias;
    if (!dev::block_any(bias == 0.f)) continue;  // every key of the tile is padded: P = 0 there
    load_tile<T, kBlockN, D>(kb, p.k_sl, n0, p.Lk, Ks, Kt);
    load_tile<T, kBlockN, D>(vb, p.v_sl, n0, p.Lk, Vs, nullptr);
    dev::block_sync();

    float s[kBlockN / 8][4], dp[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t b0, b1;
        load_b(b0, b1, Ks, DP, nt * 8, kk * 16, g, t);
        dev::mma16816<T>(s[nt], qa[kk], b0, b1);
        load_b(b0, b1, Vs, DP, nt * 8, kk * 16, g, t);
        dev::mma16816<T>(dp[nt], da[kk], b0, b1);
      }
    }
    uint32_t kept[2] = {0u, 0u};  // the forward's saved keep flags of rows row0, row0 + 8 (keep_in)
    if (p.dropout && p.keep_in != nullptr) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (row0 + 8 * r < p.Lq) kept[r] = p.keep_in[keep_index(p, bh, row0 + 8 * r, n0) + t];
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      const float bias[2] = {kbias[nt * 8 + 2 * t], kbias[nt * 8 + 2 * t + 1]};
      float kf[4] = {p.keep_scale, p.keep_scale, p.keep_scale, p.keep_scale};
      if (p.dropout && p.keep_in != nullptr) {
#pragma unroll
        for (int e = 0; e < 4; ++e) kf[e] = (kept[e / 2] >> (2 * nt + e % 2)) & 1u ? p.keep_scale : 0.f;
      } else if (p.dropout) {
        const U32x4 rnd = attn_dropout_block(seed, offset, bh, row0, n0 + nt * 8 + 2 * t);
        kf[0] = rnd.x >= p.threshold ? p.keep_scale : 0.f;
        kf[1] = rnd.y >= p.threshold ? p.keep_scale : 0.f;
        kf[2] = rnd.z >= p.threshold ? p.keep_scale : 0.f;
        kf[3] = rnd.w >= p.threshold ? p.keep_scale : 0.f;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const float pr = exp2f(fmaf(s[nt][e], p.scale_log2, bias[e % 2]) - lse2[r]);
        s[nt][e] = pr * (dp[nt][e] * kf[e] - dlt[r]);  // dS (without the softmax scale)
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t b0, b1;
        load_b(b0, b1, Kt, NP, dt * 8, kk * 16, g, t);
        dev::mma16816<T>(dq[dt], pa, b0, b1);
      }
    }
  }

  T* dqb = static_cast<T*>(p.dq) + obase;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    if (row >= p.Lq) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(dqb + static_cast<int64_t>(row) * p.oq_sl + dt * 8 + 2 * t) =
          pack2<T>(dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(const AttnParams p) {
  constexpr int DP = D + 8, MP = kBlockM + 8, KD = D / 16;
  __shared__ __align__(16) T Qs[kBlockM * DP];   // also stages K
  __shared__ __align__(16) T dOs[kBlockM * DP];  // also stages V
  __shared__ __align__(16) T Qt[D * MP];
  __shared__ __align__(16) T dOt[D * MP];
  __shared__ float lse_s[kBlockM], delta_s[kBlockM];
  __shared__ uint16_t keep_w[kBlockM * 4];  // [query][word] dropout keep flags of the tile (attn_keep_words layout)

  const int nnb = (p.Lk + kBlockN - 1) / kBlockN;
  const int bh = blockIdx.x / nnb, n0 = (blockIdx.x % nnb) * kBlockN;
  const int b = bh / p.H, h = bh % p.H;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4, wr = warp * 16;
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const int64_t row_base = static_cast<int64_t>(bh) * p.Lq;  // lse and delta rows
  const T* dob = static_cast<const T*>(p.dout) + static_cast<int64_t>(b) * p.oq_sb + static_cast<int64_t>(h) * p.oq_sh;
  const uint64_t seed = static_cast<uint64_t>(p.rng_in[0]), offset = static_cast<uint64_t>(p.rng_in[1]);

  const int64_t kbase = static_cast<int64_t>(b) * p.ok_sb + static_cast<int64_t>(h) * p.ok_sh;
  T* dkb = static_cast<T*>(p.dk) + kbase;
  T* dvb = static_cast<T*>(p.dv) + kbase;
  if (!dev::block_any(key_bias(p, b, n0 + tid % kBlockN) == 0.f)) {
    // Every key of this block is padded: P = 0 in its columns, so dK = dV = 0.
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    for (int c = tid; c < kBlockN * D / 8; c += kThreads) {
      const int key = n0 + c / (D / 8), d = (c % (D / 8)) * 8;
      if (key >= p.Lk) continue;
      *reinterpret_cast<uint4*>(dkb + static_cast<int64_t>(key) * p.ok_sl + d) = zero;
      *reinterpret_cast<uint4*>(dvb + static_cast<int64_t>(key) * p.ok_sl + d) = zero;
    }
    return;
  }
  load_tile<T, kBlockN, D>(kb, p.k_sl, n0, p.Lk, Qs, nullptr);
  load_tile<T, kBlockN, D>(vb, p.v_sl, n0, p.Lk, dOs, nullptr);
  dev::block_sync();
  uint32_t ka[KD][4], va[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) {
    load_a(ka[kk], Qs, DP, wr, kk * 16, g, t);
    load_a(va[kk], dOs, DP, wr, kk * 16, g, t);
  }
  const int key0 = n0 + wr + g;  // this thread's keys: key0 and key0 + 8
  const bool kvalid[2] = {key_bias(p, b, key0) == 0.f, key_bias(p, b, key0 + 8) == 0.f};

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;

  for (int m0 = 0; m0 < p.Lq; m0 += kBlockM) {
    dev::block_sync();
    load_tile<T, kBlockM, D>(qb, p.q_sl, m0, p.Lq, Qs, Qt);
    load_tile<T, kBlockM, D>(dob, p.oq_sl, m0, p.Lq, dOs, dOt);
    if (tid < kBlockM) {
      lse_s[tid] = lse2_of(p, bh, m0 + tid);
      delta_s[tid] = m0 + tid < p.Lq ? p.delta[row_base + m0 + tid] : 0.f;
    }
    if (p.dropout && p.keep_in != nullptr) {  // the forward's flags; rows past Lq (P = 0 there) read as dropped
      for (int c = tid; c < kBlockM * 4; c += kThreads) {
        const int row = m0 + c / 4;
        keep_w[c] = row < p.Lq ? p.keep_in[keep_index(p, bh, row, n0) + c % 4] : uint16_t(0);
      }
    } else if (p.dropout) {
      // drawn again: one thread per (query pair il / il + 8, word w), one Philox block = queries (il, il + 8) x
      // keys (j, j + 1) for each of the word's eight key pairs j = 8 * n + 2 * w
      static_assert(kBlockM / 2 * 4 == kThreads, "one thread per query pair and word");
      const int w = tid % 4, grp = tid / 4, il = (grp / 8) * 16 + grp % 8;
      uint32_t lo = 0u, hi = 0u;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        const U32x4 rnd = attn_dropout_block(seed, offset, bh, m0 + il, n0 + nt * 8 + 2 * w);
        lo |= (uint32_t(rnd.x >= p.threshold) | uint32_t(rnd.y >= p.threshold) << 1) << (2 * nt);
        hi |= (uint32_t(rnd.z >= p.threshold) | uint32_t(rnd.w >= p.threshold) << 1) << (2 * nt);
      }
      keep_w[il * 4 + w] = static_cast<uint16_t>(lo);
      keep_w[(il + 8) * 4 + w] = static_cast<uint16_t>(hi);
    }
    dev::block_sync();

    // S^T and dP^T: 16 keys x 64 queries per warp.
    float st[kBlockM / 8][4], dpt[kBlockM / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t b0, b1;
        load_b(b0, b1, Qs, DP, nt * 8, kk * 16, g, t);
        dev::mma16816<T>(st[nt], ka[kk], b0, b1);
        load_b(b0, b1, dOs, DP, nt * 8, kk * 16, g, t);
        dev::mma16816<T>(dpt[nt], va[kk], b0, b1);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, ql = nt * 8 + 2 * t + (e % 2);  // key row g + 8r of the warp, local query ql
        const float pr = kvalid[r] ? exp2f(fmaf(st[nt][e], p.scale_log2, -lse_s[ql])) : 0.f;
        float kf = p.keep_scale;
        // key wr + g + 8r of the tile: word g / 2, bit 2 * (key / 8) + key % 2 = 2 * (2 * warp + r) + g % 2
        if (p.dropout) kf = (keep_w[ql * 4 + g / 2] >> (2 * (2 * warp + r) + g % 2)) & 1u ? p.keep_scale : 0.f;
        dpt[nt][e] = pr * (dpt[nt][e] * kf - delta_s[ql]);  // dS^T (without the softmax scale)
        st[nt][e] = pr * kf;                                 // Z^T = dropped, rescaled P^T
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      const uint32_t za[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]), pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                              pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                              pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
      const uint32_t sa[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                              pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                              pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t b0, b1;
        load_b(b0, b1, dOt, MP, dt * 8, kk * 16, g, t);
        dev::mma16816<T>(dv[dt], za, b0, b1);
        load_b(b0, b1, Qt, MP, dt * 8, kk * 16, g, t);
        dev::mma16816<T>(dk[dt], sa, b0, b1);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    if (key >= p.Lk) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int64_t off = static_cast<int64_t>(key) * p.ok_sl + dt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dkb + off) = pack2<T>(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvb + off) = pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

inline unsigned grid_blocks(int64_t bh, int64_t len, int block) {
  return static_cast<unsigned>(bh * ((len + block - 1) / block));
}

}  // namespace attn

template <typename T, int D>
void attn_launch_forward(const AttnParams& p, cudaStream_t stream) {
  const unsigned blocks = attn::grid_blocks(static_cast<int64_t>(p.B) * p.H, p.Lq, attn::kBlockM);
  if (blocks == 0) return;
  launch_kernel(attn::attn_fwd_kernel<T, D>, dim3(blocks), dim3(attn::kThreads), stream, p);
}

template <typename T, int D>
void attn_launch_backward(const AttnParams& p, cudaStream_t stream) {
  const int64_t bh = static_cast<int64_t>(p.B) * p.H;
  const unsigned dq_blocks = attn::grid_blocks(bh, p.Lq, attn::kBlockM);
  const unsigned dkdv_blocks = attn::grid_blocks(bh, p.Lk, attn::kBlockN);
  const unsigned delta_blocks = attn::grid_blocks(1, bh * p.Lq, attn::kThreads / 2);
  if (delta_blocks > 0) {
    launch_kernel(attn::attn_delta_kernel<T, D>, dim3(delta_blocks), dim3(attn::kThreads), stream, p);
  }
  // dQ and dK/dV read delta and write disjoint outputs: dQ runs on a side stream beside dK/dV, which rejoins before
  // this returns (also inside a CUDA-graph capture, where the two become parallel branches). The dQ grid of a short
  // query set (DETR's decoder: 100 queries, 128 blocks walking all key tiles) then hides behind dK/dV, and each
  // fills the other's last wave. Nothing is read back to the host.
  AttnSideStream side(stream, dq_blocks > 0 && dkdv_blocks > 0 && attn_concurrent_backward());
  if (dq_blocks > 0) {
    launch_kernel(attn::attn_bwd_dq_kernel<T, D>, dim3(dq_blocks), dim3(attn::kThreads), side.stream(), p);
  }
  if (dkdv_blocks > 0) {
    launch_kernel(attn::attn_bwd_dkdv_kernel<T, D>, dim3(dkdv_blocks), dim3(attn::kThreads), stream, p);
  }
}

}  // namespace detr_fast
