// CUDA kernel of linear_assignment and its launcher: every problem of the [*, B] batch in one launch, one thread
// block per problem, running the solver of csrc/common/auction.h (the same code the CPU kernel runs with a team of
// one thread).
//
// Exactness, in short (the full argument is the header comment of csrc/common/auction.h): the auction warm start
// (Bertsekas, Jacobi bidding by warps; one phase from zero prices for rectangular problems, epsilon-scaling for square
// ones; which problems run it: DETR_FAST_LA_ENGINE, read on the host) is only epsilon-optimal; the result returned is
// the one of a shortest augmenting path stage (Hungarian / Jonker-Volgenant, double precision) that keeps dual prices P
// >= 0 with every row tight and every free column at price 0 (or, after a warm start, passes the explicit certificate
// (Z')), which proves optimality by LP duality. Every stage has a fixed bound on its iterations, so no input can hang
// it.
//
// No host-device sync. Invalid problems cannot raise from here: a problem whose real costs hold NaN or +-inf, or
// whose num_targets lies outside [0, T], gets -2 in every query slot of its output. detr_fast.ops.assignment
// .check_assignment() turns such a result into a ValueError (one sync, for log intervals or debugging).
//
// Shared memory per block: the solver's workspace (about 53 bytes per query) and, when it fits, the problem's
// T x Q costs, transposed so that a target's costs are contiguous; otherwise costs are read from global memory.
//
// Included by assignment_cuda.cu (the device build) and by the host emulator (tests/emulator/), which runs this
// kernel and its launcher on the CPU.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_runtime.h>

#include "assignment/assignment.h"
#include "common/auction.h"
#include "common/checks.h"
#include "common/launch.cuh"

namespace detr_fast {
namespace {

using la::ArgMin;
using la::Top2;
using la::u64;

constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kCostCacheBytes = 64 * 1024;  // largest cost copy kept in shared memory

// The solver's team: one CUDA block. blockDim.x is a multiple of 32.
struct BlockTeam {
  double* red_v;  // [2][32] scratch of the block reductions, double-buffered so one barrier per reduction suffices
  int* red_k;
  int parity = 0;

  __device__ int tid() const { return threadIdx.x; }
  __device__ int nthreads() const { return blockDim.x; }
  __device__ int warp() const { return threadIdx.x >> 5; }
  __device__ int nwarps() const { return blockDim.x >> 5; }
  __device__ int lane() const { return threadIdx.x & 31; }
  __device__ int warp_size() const { return 32; }
  __device__ void sync() { __syncthreads(); }
  __device__ bool any(bool p) { return __syncthreads_or(p) != 0; }

  __device__ Top2 warp_top2(Top2 t) {
    for (int o = 16; o > 0; o >>= 1) {
      Top2 u;
      u.m1 = __shfl_xor_sync(kFull, t.m1, o);
      u.k1 = __shfl_xor_sync(kFull, t.k1, o);
      u.j1 = __shfl_xor_sync(kFull, t.j1, o);
      u.m2 = __shfl_xor_sync(kFull, t.m2, o);
      t = la::top2_merge(t, u);
    }
    return t;
  }

  __device__ double warp_min(double v) {
    for (int o = 16; o > 0; o >>= 1) v = la::dmin(v, __shfl_xor_sync(kFull, v, o));
    return v;
  }

  // Block-wide lexicographic min of (v, k); every thread gets the result. Contains one barrier.
  __device__ ArgMin argmin(ArgMin a) {
    for (int o = 16; o > 0; o >>= 1) {
      const ArgMin b{__shfl_xor_sync(kFull, a.v, o), __shfl_xor_sync(kFull, a.k, o)};
      a = la::argmin_merge(a, b);
    }
    double* bv = red_v + parity * 32;
    int* bk = red_k + parity * 32;
    parity ^= 1;
    if (lane() == 0) {
      bv[warp()] = a.v;
      bk[warp()] = a.k;
    }
    __syncthreads();
    ArgMin r{bv[0], bk[0]};
    for (int w = 1; w < nwarps(); ++w) r = la::argmin_merge(r, ArgMin{bv[w], bk[w]});
    return r;
  }

  __device__ void atomic_max(u64* p, u64 v) { atomicMax(p, v); }
  __device__ void atomic_min(int* p, int v) { atomicMin(p, v); }
};

__host__ __device__ inline int64_t align16(int64_t x) { return (x + 15) & ~int64_t{15}; }

// Bytes of the solver workspace for Q columns (plus the reduction scratch).
__host__ __device__ inline int64_t workspace_bytes(int64_t Q) {
  return align16(Q * 8) * 4 + align16(Q * 4) * 5 + align16(Q) + align16(64 * 8) + align16(64 * 4);
}

template <typename scalar_t, bool kCache>
__global__ void __launch_bounds__(256) linear_assignment_kernel(const scalar_t* __restrict__ cost,
                                                                const int64_t* __restrict__ num_targets,
                                                                int64_t* __restrict__ out, int B, int Q, int T,
                                                                int engine) {
  DF_DYNAMIC_SMEM(smem);
  const int64_t p = blockIdx.x;
  const int64_t nt64 = num_targets[p % B];
  int64_t* o = out + p * Q;
  if (nt64 < 0 || nt64 > T || nt64 == 0) {
    for (int j = threadIdx.x; j < Q; j += blockDim.x) o[j] = nt64 == 0 ? -1 : -2;
    return;
  }
  const int n = static_cast<int>(nt64);

  unsigned char* ptr = smem;
  auto take = [&](int64_t bytes) {
    unsigned char* r = ptr;
    ptr += align16(bytes);
    return r;
  };
  la::Workspace ws;
  ws.price = reinterpret_cast<double*>(take(Q * 8));
  ws.dist = reinterpret_cast<double*>(take(Q * 8));
  ws.bid = reinterpret_cast<u64*>(take(Q * 8));
  ws.bid_val = reinterpret_cast<u64*>(take(Q * 8));
  ws.bidder = reinterpret_cast<int*>(take(Q * 4));
  ws.owner = reinterpret_cast<int*>(take(Q * 4));
  ws.row_col = reinterpret_cast<int*>(take(Q * 4));
  ws.bid_col = reinterpret_cast<int*>(take(Q * 4));
  ws.pred = reinterpret_cast<int*>(take(Q * 4));
  ws.scanned = take(Q);
  BlockTeam team;
  team.red_v = reinterpret_cast<double*>(take(64 * 8));
  team.red_k = reinterpret_cast<int*>(take(64 * 4));

  const scalar_t* g = cost + p * static_cast<int64_t>(Q) * T;
  if constexpr (kCache) {
    scalar_t* cc = reinterpret_cast<scalar_t*>(ptr);
    for (int idx = threadIdx.x; idx < n * Q; idx += blockDim.x) {  // read along targets (contiguous in memory)
      const int j = idx / n, i = idx - j * n;
      cc[i * Q + j] = g[static_cast<int64_t>(j) * T + i];
    }
    __syncthreads();
    const la::CostView<scalar_t> view{cc, Q, 1};
    la::solve(team, view, n, Q, ws, o, nullptr, engine);
  } else {
    const la::CostView<scalar_t> view{g, 1, T};
    la::solve(team, view, n, Q, ws, o, nullptr, engine);
  }
}

template <typename scalar_t, bool kCache>
void launch(const at::Tensor& cost, const at::Tensor& nt, at::Tensor& out, int64_t P, int B, int Q, int T,
            int64_t smem, int engine, cudaStream_t stream) {
  const int threads = Q <= 128 ? 128 : 256;
  launch_kernel_smem(linear_assignment_kernel<scalar_t, kCache>, dim3(static_cast<unsigned>(P)), dim3(threads),
                     static_cast<size_t>(smem), stream, cost.data_ptr<scalar_t>(), nt.data_ptr<int64_t>(),
                     out.data_ptr<int64_t>(), B, Q, T, engine);
}

// Solves every problem of checked inputs (shape from assignment::check_inputs) with the given engine.
inline at::Tensor linear_assignment_launch(const at::Tensor& cost_in, const at::Tensor& num_targets,
                                           const assignment::Shape& shape, int engine, const LaunchCtx& ctx) {
  const at::Tensor cost = assignment::as_solver_dtype(cost_in).contiguous();
  const at::Tensor nt = num_targets.contiguous();
  at::Tensor out = at::empty(shape.out_sizes, cost_in.options().dtype(at::kLong));
  const int64_t P = shape.problems, Q = shape.Q, T = shape.T;
  if (P == 0 || Q == 0) return out;
  DETR_CHECK(P < (int64_t{1} << 31), "linear_assignment: too many problems (", P, ")");
  const int64_t base = workspace_bytes(Q);
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "linear_assignment_cuda", [&] {
    const int64_t cache = align16(Q * T * static_cast<int64_t>(sizeof(scalar_t)));
    if (cache <= kCostCacheBytes) {
      launch<scalar_t, true>(cost, nt, out, P, static_cast<int>(shape.B), static_cast<int>(Q), static_cast<int>(T),
                             base + cache, engine, ctx.stream);
    } else {
      launch<scalar_t, false>(cost, nt, out, P, static_cast<int>(shape.B), static_cast<int>(Q), static_cast<int>(T),
                              base, engine, ctx.stream);
    }
  });
  return out;
}

}  // namespace
}  // namespace detr_fast
