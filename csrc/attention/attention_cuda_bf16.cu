// Tensor-core attention kernels instantiated for __nv_bfloat16 (one translation unit per dtype compiles in parallel).
#include "attention/attention_kernels.cuh"

namespace detr_fast {
template void attn_launch_forward<__nv_bfloat16, 32>(const AttnParams&, cudaStream_t);
template void attn_launch_forward<__nv_bfloat16, 64>(const AttnParams&, cudaStream_t);
template void attn_launch_backward<__nv_bfloat16, 32>(const AttnParams&, cudaStream_t);
template void attn_launch_backward<__nv_bfloat16, 64>(const AttnParams&, cudaStream_t);
}  // namespace detr_fast
