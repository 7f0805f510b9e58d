// CUDA kernels of detr_fast::add_dropout_layernorm, its backward, its dropout mask and relu_dropout, with their
// launchers. Included by add_dropout_layernorm_cuda.cu (the device build) and by the host emulator
// (tests/emulator/), which runs these kernels and launchers on the CPU. Kernels run on the launch context's stream.
//
// Layout: the input is viewed as [rows, d]. A row group of TPR threads owns one row: one warp (TPR = 32, four rows
// per 128-thread block) for d <= 1024, one 256-thread block for 1024 < d <= 8192. Thread t of the group holds the
// 4-element vectors t, t + TPR, ... (NV of them, in registers), loaded with one vector load each when d % 4 == 0 and
// the pointers are aligned. Statistics in acc_t (float; double for double inputs): per-thread (count, mean, M2)
// from two passes over its registers, combined across the group (common/layernorm_math.h).
//
// Backward: stage 1 recomputes h (regenerating the dropout mask from rng_state), writes grad_x and grad_residual
// per row, and accumulates each thread's columns of grad_weight / grad_bias over the rows its group visits
// (grid-stride) into a [groups, d] partial; stage 2 sums the partials column by column in a fixed order
// (deterministic, no atomics).
//
// Dropout seed: without an explicit seed, the op reserves round_up(rows, 4) offsets of the device's default CUDA
// generator (philox_cuda_state, as torch's own random kernels do); the kernel unpacks (seed, offset) on the device
// (no host sync; CUDA-graph safe) and writes them to rng_state, which the backward reads on the device.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <tuple>  // older torch headers use std::tuple in UnpackRaw.cuh without including it
#include <ATen/cuda/PhiloxUtils.cuh>

#include <algorithm>
#include <cstdint>

#include "common/launch.cuh"
#include "layernorm/layernorm_common.h"

namespace detr_fast {
namespace {

constexpr int kMaxCudaD = 8192;  // larger rows run the reference (detr_fast/ops/layernorm.py)

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

struct FwdParams {
  const void* x;
  const void* r;
  const void* w;  // acc_t [d]
  const void* b;  // acc_t [d]
  void* out;
  void* mean;  // acc_t [rows]
  void* rstd;  // acc_t [rows]
  int64_t rows, d;
  double eps;
  float keep_scale;
  double keep_scale64;
  uint32_t threshold;
  bool dropout, vec;
  at::PhiloxCudaState philox;
  int64_t* rng_out;
};

struct BwdParams {
  const void* g;
  const void* x;
  const void* r;
  const void* w;  // acc_t [d]
  const void* mean;
  const void* rstd;
  void* dx;
  void* dr;
  void* partial;  // acc_t [groups, 2, d]
  int64_t rows, d;
  float keep_scale;
  double keep_scale64;
  uint32_t threshold;
  bool dropout, vec;
  const int64_t* rng_in;
};

// The dropout fields the forward and backward parameters share: keep scale 1 / (1 - p) and the Philox threshold.
template <class Params>
void set_dropout(Params& prm, double p) {
  prm.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  prm.keep_scale64 = 1.0 / (1.0 - p);
  prm.threshold = dropout_threshold(p);
  prm.dropout = p > 0.0;
}

template <typename acc_t>
__device__ __forceinline__ acc_t shfl_xor(acc_t v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}

template <typename acc_t>
__device__ __forceinline__ acc_t shfl0(acc_t v) {
  return __shfl_sync(0xffffffffu, v, 0);
}

// All-reduce of (count, mean, M2) over a row group of TPR threads; every thread gets the same result (lane or
// thread 0's). `shm` holds TPR / 32 entries and is only used when TPR > 32 (one row per block).
template <int TPR, typename acc_t>
__device__ MeanM2<acc_t> group_meanm2(MeanM2<acc_t> s, MeanM2<acc_t>* shm) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
    const MeanM2<acc_t> o{shfl_xor(s.n, m), shfl_xor(s.mean, m), shfl_xor(s.m2, m)};
    s = meanm2_combine(s, o);
  }
  s = MeanM2<acc_t>{shfl0(s.n), shfl0(s.mean), shfl0(s.m2)};
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shm[warp] = s;
    __syncthreads();
    if (warp == 0) {
      s = lane < TPR / 32 ? shm[lane] : MeanM2<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
      for (int m = 16; m >= 1; m >>= 1) {
        const MeanM2<acc_t> o{shfl_xor(s.n, m), shfl_xor(s.mean, m), shfl_xor(s.m2, m)};
        s = meanm2_combine(s, o);
      }
      if (lane == 0) shm[0] = s;
    }
    __syncthreads();
    s = shm[0];
    __syncthreads();  // shm is reused by the next row
  }
  return s;
}

// All-reduce of two sums over a row group (same layout rules as group_meanm2). Lane/thread 0's result is broadcast
// so that every thread of the row uses bit-identical values.
template <int TPR, typename acc_t>
__device__ void group_sum2(acc_t& a, acc_t& b, acc_t* shm) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
    a += shfl_xor(a, m);
    b += shfl_xor(b, m);
  }
  a = shfl0(a);
  b = shfl0(b);
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      shm[2 * warp] = a;
      shm[2 * warp + 1] = b;
    }
    __syncthreads();
    if (warp == 0) {
      a = lane < TPR / 32 ? shm[2 * lane] : acc_t(0);
      b = lane < TPR / 32 ? shm[2 * lane + 1] : acc_t(0);
#pragma unroll
      for (int m = 16; m >= 1; m >>= 1) {
        a += shfl_xor(a, m);
        b += shfl_xor(b, m);
      }
      if (lane == 0) {
        shm[0] = a;
        shm[1] = b;
      }
    }
    __syncthreads();
    a = shm[0];
    b = shm[1];
    __syncthreads();
  }
}

// Loads 4 consecutive elements starting at column c (c % 4 == 0, c < d) as acc_t; missing tail elements read 0.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load4(const scalar_t* row, int64_t c, int64_t d, bool vec, acc_t* v) {
  if (vec) {
    const Vec4<scalar_t> t = *reinterpret_cast<const Vec4<scalar_t>*>(row + c);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = static_cast<acc_t>(t.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = c + j < d ? static_cast<acc_t>(row[c + j]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store4(scalar_t* row, int64_t c, int64_t d, bool vec, const acc_t* v) {
  if (vec) {
    Vec4<scalar_t> t;
#pragma unroll
    for (int j = 0; j < 4; ++j) t.v[j] = static_cast<scalar_t>(v[j]);
    *reinterpret_cast<Vec4<scalar_t>*>(row + c) = t;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (c + j < d) row[c + j] = static_cast<scalar_t>(v[j]);
  }
}

// Keep bits of the 4 elements at vector index c4 of `row` (bit j = column 4 * c4 + j kept).
__device__ __forceinline__ uint32_t keep_bits(bool dropout, uint64_t seed, uint64_t offset, int64_t row,
                                              int64_t c4, uint32_t threshold) {
  if (!dropout) return 0xFu;
  const U32x4 blk = ln_dropout_block(seed, offset, row, c4);
  return uint32_t(blk.x >= threshold) | (uint32_t(blk.y >= threshold) << 1) | (uint32_t(blk.z >= threshold) << 2) |
         (uint32_t(blk.w >= threshold) << 3);
}

template <typename acc_t>
__device__ __forceinline__ acc_t keep_scale_of(float s32, double s64) {
  if constexpr (sizeof(acc_t) == 8) {
    return s64;
  } else {
    return s32;
  }
}

template <int TPR>
constexpr int block_threads() {
  return TPR < 128 ? 128 : TPR;
}

// scalar_t: the residual's and the output's dtype; x_t: x's (scalar_t, or half/bfloat16 with a float residual).
template <typename scalar_t, typename x_t, int TPR, int NV>
__global__ void __launch_bounds__(block_threads<TPR>()) ln_forward_kernel(FwdParams p) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int RPB = block_threads<TPR>() / TPR;
  __shared__ MeanM2<acc_t> shm[TPR > 32 ? TPR / 32 : 1];
  const auto seeds = at::cuda::philox::unpack(p.philox);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.rng_out[0] = p.dropout ? static_cast<int64_t>(seed) : 0;
    p.rng_out[1] = p.dropout ? static_cast<int64_t>(offset) : 0;
  }
  const int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR;
  if (row >= p.rows) return;  // uniform over the row group (a warp, or the whole block when TPR > 32)
  const int t = threadIdx.x % TPR;
  const int64_t d = p.d;
  const x_t* xr = static_cast<const x_t*>(p.x) + row * d;
  const scalar_t* rr = static_cast<const scalar_t*>(p.r) + row * d;
  const acc_t* w = static_cast<const acc_t*>(p.w);
  const acc_t* b = static_cast<const acc_t*>(p.b);
  const acc_t ks = keep_scale_of<acc_t>(p.keep_scale, p.keep_scale64);

  acc_t h[NV][4];
  int nloc = 0;
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c4 = t + static_cast<int64_t>(k) * TPR, c = 4 * c4;
    if (c < d) {
      acc_t xv[4], rv[4];
      load4(xr, c, d, p.vec, xv);
      load4(rr, c, d, p.vec, rv);
      const uint32_t keep = keep_bits(p.dropout, seed, offset, row, c4, p.threshold);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        h[k][j] = c + j < d ? ln_add_dropout(xv[j], rv[j], ((keep >> j) & 1u) != 0, ks) : acc_t(0);
        sum += h[k][j];
      }
      nloc += static_cast<int>(min(d - c, int64_t(4)));
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) h[k][j] = 0;
    }
  }
  // Two passes over this thread's values, then the combination over the row group.
  const acc_t mloc = nloc > 0 ? sum / static_cast<acc_t>(nloc) : acc_t(0);
  acc_t m2 = 0;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c = 4 * (t + static_cast<int64_t>(k) * TPR);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (c + j < d) {
        const acc_t dv = h[k][j] - mloc;
        m2 += dv * dv;
      }
    }
  }
  const MeanM2<acc_t> st = group_meanm2<TPR>(MeanM2<acc_t>{static_cast<acc_t>(nloc), mloc, m2}, shm);
  const acc_t rs = ln_rstd(st, static_cast<acc_t>(p.eps));
  scalar_t* orow = static_cast<scalar_t*>(p.out) + row * d;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c = 4 * (t + static_cast<int64_t>(k) * TPR);
    if (c < d) {
      acc_t y[4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        y[j] = c + j < d ? ln_normalize(h[k][j], st.mean, rs, w[c + j], b[c + j]) : acc_t(0);
      store4(orow, c, d, p.vec, y);
    }
  }
  if (t == 0) {
    static_cast<acc_t*>(p.mean)[row] = st.mean;
    static_cast<acc_t*>(p.rstd)[row] = rs;
  }
}

template <typename scalar_t, typename x_t, int TPR, int NV>
__global__ void __launch_bounds__(block_threads<TPR>()) ln_backward_kernel(BwdParams p) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int RPB = block_threads<TPR>() / TPR;
  __shared__ acc_t shm[TPR > 32 ? 2 * (TPR / 32) : 2];
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(p.rng_in[0]) : 0;
  const uint64_t offset = p.dropout ? static_cast<uint64_t>(p.rng_in[1]) : 0;
  const int t = threadIdx.x % TPR;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * RPB;
  const int64_t d = p.d;
  const acc_t* w = static_cast<const acc_t*>(p.w);
  const acc_t* mean = static_cast<const acc_t*>(p.mean);
  const acc_t* rstd = static_cast<const acc_t*>(p.rstd);
  const acc_t ks = keep_scale_of<acc_t>(p.keep_scale, p.keep_scale64);
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);

  acc_t pw[NV][4], pb[NV][4], wv[NV][4];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c = 4 * (t + static_cast<int64_t>(k) * TPR);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      pw[k][j] = 0;
      pb[k][j] = 0;
      wv[k][j] = c + j < d ? w[c + j] : acc_t(0);
    }
  }
  // Rows are visited with a stride of `groups`; the loop bound is uniform over a row group.
  for (int64_t row = group; row < p.rows; row += groups) {
    const x_t* xr = static_cast<const x_t*>(p.x) + row * d;
    const scalar_t* rr = static_cast<const scalar_t*>(p.r) + row * d;
    const scalar_t* gr = static_cast<const scalar_t*>(p.g) + row * d;
    const acc_t mu = mean[row], rs = rstd[row];
    acc_t xhat[NV][4], dxhat[NV][4];
    uint32_t keeps = 0;  // 4 bits per vector
    acc_t s1 = 0, s2 = 0;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c4 = t + static_cast<int64_t>(k) * TPR, c = 4 * c4;
      if (c < d) {
        acc_t xv[4], rv[4], gv[4];
        load4(xr, c, d, p.vec, xv);
        load4(rr, c, d, p.vec, rv);
        load4(gr, c, d, p.vec, gv);
        const uint32_t keep = keep_bits(p.dropout, seed, offset, row, c4, p.threshold);
        keeps |= keep << (4 * k);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const acc_t hv = ln_add_dropout(xv[j], rv[j], ((keep >> j) & 1u) != 0, ks);
          xhat[k][j] = c + j < d ? (hv - mu) * rs : acc_t(0);
          dxhat[k][j] = gv[j] * wv[k][j];  // 0 beyond d (gv and wv are 0 there)
          s1 += dxhat[k][j];
          s2 += dxhat[k][j] * xhat[k][j];
          pw[k][j] += gv[j] * xhat[k][j];
          pb[k][j] += gv[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) xhat[k][j] = dxhat[k][j] = 0;
      }
    }
    group_sum2<TPR>(s1, s2, shm);
    const acc_t c1 = s1 * inv_d, c2 = s2 * inv_d;
    x_t* dxr = static_cast<x_t*>(p.dx) + row * d;
    scalar_t* drr = static_cast<scalar_t*>(p.dr) + row * d;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c = 4 * (t + static_cast<int64_t>(k) * TPR);
      if (c < d) {
        acc_t dh[4], dxv[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          dh[j] = ln_grad_h(dxhat[k][j], xhat[k][j], rs, c1, c2);
          dxv[j] = ((keeps >> (4 * k + j)) & 1u) ? dh[j] * ks : acc_t(0);
        }
        store4(drr, c, d, p.vec, dh);
        store4(dxr, c, d, p.vec, dxv);
      }
    }
  }
  // Every group writes its partial row (zeros for a group that visited no row).
  acc_t* pwr = static_cast<acc_t*>(p.partial) + group * 2 * d;
  acc_t* pbr = pwr + d;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c = 4 * (t + static_cast<int64_t>(k) * TPR);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (c + j < d) {
        pwr[c + j] = pw[k][j];
        pbr[c + j] = pb[k][j];
      }
    }
  }
}

// Stage 2: dw[c] = sum over groups of partial[g, 0, c], db[c] likewise; a 32 x 32 block per 32 columns (d / 32
// blocks: 8 for DETR's d = 256, so each block needs many rows in flight to hide the partials' load latency; with
// 32 x 8 threads each looped over a quarter as many groups four times as long).
constexpr int kColRows = 32;

template <typename acc_t>
__global__ void __launch_bounds__(32 * kColRows) ln_column_sum_kernel(const acc_t* partial, int64_t groups, int64_t d,
                                                                     acc_t* dw, acc_t* db) {
  __shared__ acc_t sw[kColRows][33], sb[kColRows][33];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  acc_t aw = 0, ab = 0;
  if (c < d) {
    for (int64_t g = ty; g < groups; g += kColRows) {
      aw += partial[g * 2 * d + c];
      ab += partial[g * 2 * d + d + c];
    }
  }
  sw[ty][tx] = aw;
  sb[ty][tx] = ab;
  __syncthreads();
  if (ty == 0 && c < d) {
    for (int i = 1; i < kColRows; ++i) {
      aw += sw[i][tx];
      ab += sb[i][tx];
    }
    dw[c] = aw;
    db[c] = ab;
  }
}

__global__ void ln_mask_kernel(const int64_t* rng, int64_t rows, int64_t d, uint32_t threshold, bool* keep) {
  const uint64_t seed = static_cast<uint64_t>(rng[0]), offset = static_cast<uint64_t>(rng[1]);
  const int64_t nv = (d + 3) / 4, n = rows * nv;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / nv, c4 = e % nv;
    const uint32_t bits = keep_bits(true, seed, offset, row, c4, threshold);
    for (int j = 0; j < 4; ++j)
      if (4 * c4 + j < d) keep[row * d + 4 * c4 + j] = (bits >> j) & 1u;
  }
}

// relu_dropout: one thread per 4-element group (row, c4) of x viewed as [rows, d], grid-stride; the keep bits of
// the group are one Philox block of the add_dropout_layernorm stream. Reads x, out, rows, d, the dropout fields,
// philox and rng_out of FwdParams (the LayerNorm fields stay unset).
template <typename scalar_t>
__global__ void __launch_bounds__(256) relu_dropout_kernel(FwdParams p) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto seeds = at::cuda::philox::unpack(p.philox);
  const uint64_t seed = std::get<0>(seeds), offset = std::get<1>(seeds);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.rng_out[0] = p.dropout ? static_cast<int64_t>(seed) : 0;
    p.rng_out[1] = p.dropout ? static_cast<int64_t>(offset) : 0;
  }
  const acc_t ks = keep_scale_of<acc_t>(p.keep_scale, p.keep_scale64);
  const int64_t nv = (p.d + 3) / 4, n = p.rows * nv;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / nv, c4 = e % nv, c = 4 * c4;
    acc_t v[4];
    load4(static_cast<const scalar_t*>(p.x) + row * p.d, c, p.d, p.vec, v);
    const uint32_t keep = keep_bits(p.dropout, seed, offset, row, c4, p.threshold);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = relu_dropout_value(v[j], ((keep >> j) & 1u) != 0, ks);
    store4(static_cast<scalar_t*>(p.out) + row * p.d, c, p.d, p.vec, v);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(256) relu_dropout_backward_kernel(const scalar_t* g, const scalar_t* y,
                                                                    scalar_t* dx, int64_t n, float ks32,
                                                                    double ks64) {
  using acc_t = typename AccOf<scalar_t>::type;
  const acc_t ks = keep_scale_of<acc_t>(ks32, ks64);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    dx[e] = static_cast<scalar_t>(relu_dropout_grad(static_cast<acc_t>(g[e]), static_cast<acc_t>(y[e]), ks));
}

// ---- Launchers (host) ------------------------------------------------------------------------------------------
// Each takes inputs already checked by its entry point (the CUDA op, or the emulator's) and allocates its outputs
// like the inputs.

inline bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Calls f(TPR, NV) for the configuration that covers d (checked by the caller: 1 <= d <= kMaxCudaD).
template <typename F>
void dispatch_config(int64_t d, F&& f) {
  const int64_t nv32 = (d + 127) / 128;  // vectors per thread with a warp per row
  if (nv32 <= 1) return f(std::integral_constant<int, 32>{}, std::integral_constant<int, 1>{});
  if (nv32 <= 2) return f(std::integral_constant<int, 32>{}, std::integral_constant<int, 2>{});
  if (nv32 <= 4) return f(std::integral_constant<int, 32>{}, std::integral_constant<int, 4>{});
  if (nv32 <= 8) return f(std::integral_constant<int, 32>{}, std::integral_constant<int, 8>{});
  const int64_t nv256 = (d + 1023) / 1024;
  if (nv256 <= 2) return f(std::integral_constant<int, 256>{}, std::integral_constant<int, 2>{});
  if (nv256 <= 4) return f(std::integral_constant<int, 256>{}, std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, 256>{}, std::integral_constant<int, 8>{});
}

// Calls f(scalar_t{}, x_t{}): the residual's (and output's) dtype and x's; they differ only for the mixed case
// (float residual, half/bfloat16 x), checked by the caller.
template <typename F>
void dispatch_dtype(at::ScalarType x_dt, at::ScalarType r_dt, F&& f) {
  if (r_dt == at::kFloat && x_dt == at::kHalf) return f(float{}, at::Half{});
  if (r_dt == at::kFloat && x_dt == at::kBFloat16) return f(float{}, at::BFloat16{});
  switch (x_dt) {
    case at::kFloat:
      return f(float{}, float{});
    case at::kDouble:
      return f(double{}, double{});
    case at::kHalf:
      return f(at::Half{}, at::Half{});
    default:
      return f(at::BFloat16{}, at::BFloat16{});
  }
}

inline void check_cuda_d(const at::Tensor& x) {
  DETR_CHECK(x.size(-1) <= kMaxCudaD, "add_dropout_layernorm (CUDA): d must be at most ", kMaxCudaD, ", got ",
             x.size(-1), " (detr_fast.ops.add_dropout_layernorm runs the reference for larger rows)");
  DETR_CHECK(x.numel() / x.size(-1) < (int64_t(1) << 31), "add_dropout_layernorm (CUDA): rows must be below 2^31");
}

// Blocks of 256 threads for a grid-stride pass over n items: enough to fill the device (8 per SM), at least one.
inline unsigned elementwise_blocks(int64_t n, int sms) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, int64_t(8) * sms)));
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ln_forward(
    const at::Tensor& x_in, const at::Tensor& r_in, const at::Tensor& weight, const at::Tensor& bias, double p,
    double eps, const at::PhiloxCudaState& philox, const LaunchCtx& ctx) {
  LnForwardIO io = ln_forward_io(x_in, r_in, weight, bias);
  const at::Tensor &x = io.x, &r = io.r, &w = io.w, &b = io.b;
  at::Tensor &out = io.out, &mean = io.mean, &rstd = io.rstd;
  const int64_t d = io.d, rows = io.rows;
  at::Tensor rng_state = at::empty({2}, x.options().dtype(at::kLong));

  FwdParams prm{};
  prm.x = x.data_ptr();
  prm.r = r.data_ptr();
  prm.w = w.data_ptr();
  prm.b = b.data_ptr();
  prm.out = out.data_ptr();
  prm.mean = mean.data_ptr();
  prm.rstd = rstd.data_ptr();
  prm.rows = rows;
  prm.d = d;
  prm.eps = eps;
  set_dropout(prm, p);
  const size_t xbytes = 4 * x.element_size(), rbytes = 4 * r.element_size();  // one 4-element vector each
  prm.vec = d % 4 == 0 && aligned(prm.x, xbytes) && aligned(prm.r, rbytes) && aligned(prm.out, rbytes);
  prm.philox = philox;
  prm.rng_out = rng_state.mutable_data_ptr<int64_t>();
  dispatch_dtype(x.scalar_type(), r.scalar_type(), [&](auto s, auto xs) {
    using scalar_t = decltype(s);
    using x_t = decltype(xs);
    dispatch_config(d, [&](auto tpr, auto nv) {
      constexpr int TPR = decltype(tpr)::value, NV = decltype(nv)::value;
      constexpr int RPB = block_threads<TPR>() / TPR;
      // At least one block, so that rng_state is written even for zero rows.
      const int64_t blocks = std::max<int64_t>(1, (rows + RPB - 1) / RPB);
      launch_kernel(ln_forward_kernel<scalar_t, x_t, TPR, NV>, dim3(static_cast<unsigned>(blocks)),
                    dim3(block_threads<TPR>()), ctx.stream, prm);
    });
  });
  return {out, mean, rstd, rng_state};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ln_backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& r_in, const at::Tensor& weight,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, double p, const at::Tensor& rng_state,
    const LaunchCtx& ctx) {
  const at::ScalarType acc = ln_acc_dtype(x_in);
  LnBackwardIO io = ln_backward_io(grad_out, x_in, r_in, weight, mean_in, rstd_in);
  const at::Tensor &x = io.x, &r = io.r, &go = io.go, &w = io.w, &mean = io.mean, &rstd = io.rstd;
  at::Tensor &dx = io.dx, &dr = io.dr;
  const at::Tensor rng = rng_state.contiguous();
  const int64_t d = io.d, rows = io.rows;
  if (rows == 0) {
    at::Tensor z = at::zeros({d}, weight.options());
    return {dx, dr, z, z.clone()};
  }
  at::Tensor dw = at::empty({d}, x.options().dtype(acc));
  at::Tensor db = at::empty({d}, x.options().dtype(acc));
  BwdParams prm{};
  prm.g = go.data_ptr();
  prm.x = x.data_ptr();
  prm.r = r.data_ptr();
  prm.w = w.data_ptr();
  prm.mean = mean.data_ptr();
  prm.rstd = rstd.data_ptr();
  prm.dx = dx.data_ptr();
  prm.dr = dr.data_ptr();
  prm.rows = rows;
  prm.d = d;
  set_dropout(prm, p);
  prm.rng_in = rng.const_data_ptr<int64_t>();
  const size_t xbytes = 4 * x.element_size(), rbytes = 4 * r.element_size();  // one 4-element vector each
  prm.vec = d % 4 == 0 && aligned(prm.g, rbytes) && aligned(prm.x, xbytes) && aligned(prm.r, rbytes) &&
            aligned(prm.dx, xbytes) && aligned(prm.dr, rbytes);
  dispatch_dtype(x.scalar_type(), r.scalar_type(), [&](auto s, auto xs) {
    using scalar_t = decltype(s);
    using x_t = decltype(xs);
    using acc_t = typename AccOf<scalar_t>::type;
    dispatch_config(d, [&](auto tpr, auto nv) {
      constexpr int TPR = decltype(tpr)::value, NV = decltype(nv)::value;
      constexpr int RPB = block_threads<TPR>() / TPR;
      // Two blocks per SM: enough warps in flight to stream the rows, few enough groups that each folds several
      // rows into its partial (the partials cost groups * 2 * d values written and read again).
      const int64_t blocks = std::min<int64_t>((rows + RPB - 1) / RPB, std::max(1, 2 * ctx.sms));
      const int64_t groups = blocks * RPB;
      at::Tensor partial = at::empty({groups, 2, d}, x.options().dtype(acc));
      prm.partial = partial.data_ptr();
      launch_kernel(ln_backward_kernel<scalar_t, x_t, TPR, NV>, dim3(static_cast<unsigned>(blocks)),
                    dim3(block_threads<TPR>()), ctx.stream, prm);
      launch_kernel(ln_column_sum_kernel<acc_t>, dim3(static_cast<unsigned>((d + 31) / 32)), dim3(32 * kColRows),
                    ctx.stream,
                    partial.const_data_ptr<acc_t>(), groups, d, dw.mutable_data_ptr<acc_t>(),
                    db.mutable_data_ptr<acc_t>());
    });
  });
  return {dx, dr, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

inline at::Tensor ln_mask(const at::Tensor& rng_state, int64_t rows, int64_t d, double p, const LaunchCtx& ctx) {
  const at::Tensor rng = rng_state.contiguous();
  at::Tensor keep = at::empty({rows, d}, rng.options().dtype(at::kBool));
  const int64_t n = rows * ((d + 3) / 4);
  if (n == 0) return keep;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  launch_kernel(ln_mask_kernel, dim3(blocks), dim3(threads), ctx.stream, rng.const_data_ptr<int64_t>(), rows, d,
                dropout_threshold(p), keep.mutable_data_ptr<bool>());
  return keep;
}

inline std::tuple<at::Tensor, at::Tensor> relu_dropout_forward(const at::Tensor& x_in, double p,
                                                               const at::PhiloxCudaState& philox,
                                                               const LaunchCtx& ctx) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor rng_state = at::empty({2}, x.options().dtype(at::kLong));
  const int64_t d = std::max<int64_t>(x.size(-1), 1), rows = x.numel() / d;  // d = 0: no rows
  FwdParams prm{};
  prm.x = x.data_ptr();
  prm.out = out.data_ptr();
  prm.rows = rows;
  prm.d = d;
  set_dropout(prm, p);
  const size_t vbytes = 4 * x.element_size();
  prm.vec = d % 4 == 0 && aligned(prm.x, vbytes) && aligned(prm.out, vbytes);
  prm.philox = philox;
  prm.rng_out = rng_state.mutable_data_ptr<int64_t>();
  const int64_t groups = rows * ((d + 3) / 4);
  // At least one block, so that rng_state is written even for an empty x.
  const unsigned blocks = elementwise_blocks(groups, ctx.sms);
  dispatch_dtype(x.scalar_type(), x.scalar_type(), [&](auto s, auto) {
    using scalar_t = decltype(s);
    launch_kernel(relu_dropout_kernel<scalar_t>, dim3(blocks), dim3(256), ctx.stream, prm);
  });
  return {out, rng_state};
}

inline at::Tensor relu_dropout_backward(const at::Tensor& grad_out, const at::Tensor& out_in, double p,
                                        const LaunchCtx& ctx) {
  const at::Tensor g = grad_out.contiguous(), y = out_in.contiguous();
  at::Tensor dx = at::empty(y.sizes(), y.options());
  const int64_t n = y.numel();
  if (n == 0) return dx;
  dispatch_dtype(y.scalar_type(), y.scalar_type(), [&](auto s, auto) {
    using scalar_t = decltype(s);
    launch_kernel(relu_dropout_backward_kernel<scalar_t>, dim3(elementwise_blocks(n, ctx.sms)), dim3(256),
                  ctx.stream, g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                  dx.mutable_data_ptr<scalar_t>(), n, static_cast<float>(1.0 / (1.0 - p)), 1.0 / (1.0 - p));
  });
  return dx;
}

}  // namespace
}  // namespace detr_fast
