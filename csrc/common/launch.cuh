// Kernel launches written once for the device build and for the host emulator of the CUDA kernels.
//
// launch_kernel(kernel, grid, block, stream, args...) is kernel<<<grid, block, 0, stream>>>(args...) followed by the
// launch check. With DETR_EMULATE defined (tests/emulator/cuda_host.h, included first), the same call runs the grid
// on the CPU through emu::run_grid, so a kernel's launcher (grid sizes, vector paths, dtype dispatch) is exercised
// by the emulator exactly as the device build runs it.
//
// LaunchCtx: what a launcher needs to know of the device: its stream and its number of SMs (grid sizing).
#pragma once
#include <cuda_runtime.h>

#include <utility>

#ifndef DETR_EMULATE
#include <c10/cuda/CUDAException.h>
#endif

namespace detr_fast {

struct LaunchCtx {
  cudaStream_t stream;
  int sms;
};

template <typename... P, typename... A>
inline void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A&&... args) {
#ifdef DETR_EMULATE
  (void)stream;
  emu::run_grid(kernel, grid, block, static_cast<P>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace detr_fast
