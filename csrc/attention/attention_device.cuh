// The few device intrinsics the attention kernels use, behind small wrappers. Compiled with nvcc they are the real
// instructions; with DETR_ATTN_EMULATE defined, the host emulator (tests/emulator/attention_emulator.cpp) supplies
// its own versions (fibers for lanes, barriers for __syncthreads, the PTX fragment layout for mma), so the kernels'
// index arithmetic can be exercised without a GPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#ifndef DETR_ATTN_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace detr_fast {
namespace dev {

#ifndef DETR_ATTN_EMULATE
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

__device__ __forceinline__ void block_sync() { __syncthreads(); }

// Barrier that also tells every thread whether `pred` held in any thread of the block.
__device__ __forceinline__ bool block_any(bool pred) { return __syncthreads_or(pred) != 0; }

__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// c += a * b for one m16n8k16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

}  // namespace dev

// A second stream beside `main` for work independent of what `main` runs next (the dQ kernel beside dK/dV): forked
// from `main` at construction (the side stream waits for everything issued on `main` so far) and joined back at
// destruction (`main` waits for everything issued on the side stream), so callers see one stream's ordering; inside a
// CUDA-graph capture the two become parallel branches of the graph. With fork = false, or in the host emulator, the
// side stream is `main` itself.
#ifndef DETR_ATTN_EMULATE
class AttnSideStream {
 public:
  AttnSideStream(cudaStream_t main, bool fork) : main_(main) {
    if (!fork) return;
    side_ = c10::cuda::getStreamFromPool().stream();
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(fork_, main_));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side_, fork_, 0));
  }
  AttnSideStream(const AttnSideStream&) = delete;
  AttnSideStream& operator=(const AttnSideStream&) = delete;
  ~AttnSideStream() {
    if (side_ == nullptr) return;
    C10_CUDA_CHECK_WARN(cudaEventRecord(join_, side_));
    C10_CUDA_CHECK_WARN(cudaStreamWaitEvent(main_, join_, 0));
    C10_CUDA_CHECK_WARN(cudaEventDestroy(fork_));  // released once the recorded work completes
    C10_CUDA_CHECK_WARN(cudaEventDestroy(join_));
  }
  cudaStream_t stream() const { return side_ != nullptr ? side_ : main_; }

 private:
  cudaStream_t main_;
  cudaStream_t side_ = nullptr;
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
};
#else
class AttnSideStream {  // the emulator runs every launch to completion in order: one stream is enough
 public:
  AttnSideStream(cudaStream_t main, bool) : main_(main) {}
  cudaStream_t stream() const { return main_; }

 private:
  cudaStream_t main_;
};
#endif

}  // namespace detr_fast
