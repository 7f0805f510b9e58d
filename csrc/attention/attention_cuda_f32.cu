// fp32 attention launchers (kernels in attention_kernels_f32.cuh).
#include <c10/cuda/CUDAException.h>

#include "attention/attention_kernels_f32.cuh"

namespace detr_fast {

#define DETR_ATTN_F32(D)                                                                               \
  template <>                                                                                          \
  void attn_launch_forward<float, D>(const AttnParams& p, cudaStream_t stream) {                      \
    const unsigned n = attn32::blocks(int64_t(p.B) * p.H, p.Lq, attn32::kThreads / (D / 16));          \
    if (n == 0) return;                                                                                \
    attn32::fwd_kernel<D><<<n, attn32::kThreads, 0, stream>>>(p);                                      \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                    \
  }                                                                                                    \
  template <>                                                                                          \
  void attn_launch_backward<float, D>(const AttnParams& p, cudaStream_t stream) {                     \
    const unsigned nq = attn32::blocks(int64_t(p.B) * p.H, p.Lq, attn32::kThreads / (D / 16));         \
    const unsigned nk = attn32::blocks(int64_t(p.B) * p.H, p.Lk, attn32::kThreads / (D / 16));         \
    if (nq > 0) {                                                                                      \
      attn32::bwd_dq_kernel<D><<<nq, attn32::kThreads, 0, stream>>>(p);                                \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                  \
    }                                                                                                  \
    if (nk > 0) {                                                                                      \
      attn32::bwd_dkdv_kernel<D><<<nk, attn32::kThreads, 0, stream>>>(p);                              \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                  \
    }                                                                                                  \
  }

DETR_ATTN_F32(32)
DETR_ATTN_F32(64)

}  // namespace detr_fast
