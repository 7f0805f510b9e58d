// Kernel launches written once for the device build and for the host emulator of the CUDA kernels.
//
// launch_kernel(kernel, grid, block, stream, args...) is kernel<<<grid, block, 0, stream>>>(args...) followed by the
// launch check. With DETR_EMULATE defined (tests/emulator/cuda_host.h, included first), the same call runs the grid
// on the CPU through emu::run_grid, so a kernel's launcher (grid sizes, vector paths, dtype dispatch) is exercised
// by the emulator exactly as the device build runs it.
//
// LaunchCtx: what a launcher needs to know of the device: its stream and its number of SMs (grid sizing; 0 where the
// launcher does not use it). current_launch_ctx() (device build): the current stream and device's, for an entry point
// after its device guard.
#pragma once
#include <cuda_runtime.h>

#include <utility>

#ifndef DETR_EMULATE
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace detr_fast {

struct LaunchCtx {
  cudaStream_t stream;
  int sms;
};

#ifndef DETR_EMULATE
inline LaunchCtx current_launch_ctx() {
  return {c10::cuda::getCurrentCUDAStream(), at::cuda::getCurrentDeviceProperties()->multiProcessorCount};
}
#endif

// kernel<<<grid, block, smem_bytes, stream>>>(args...); above 48 KiB of dynamic shared memory the kernel is first
// allowed that much (cudaFuncAttributeMaxDynamicSharedMemorySize).
template <typename... P, typename... A>
inline void launch_kernel_smem(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                               A&&... args) {
#ifdef DETR_EMULATE
  (void)stream;
  emu::run_grid(kernel, grid, block, smem_bytes, static_cast<P>(args)...);
#else
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

template <typename... P, typename... A>
inline void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A&&... args) {
  launch_kernel_smem(kernel, grid, block, 0, stream, std::forward<A>(args)...);
}

}  // namespace detr_fast

// DF_DYNAMIC_SMEM(name): `unsigned char name[]`, the block's dynamic shared memory (16-byte aligned), inside a kernel.
#ifdef DETR_EMULATE
#define DF_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()
#else
#define DF_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
