// Tensor-core attention kernels instantiated for __half (one translation unit per dtype compiles in parallel).
#include "attention/attention_kernels.cuh"

namespace detr_fast {
template void attn_launch_forward<__half, 32>(const AttnParams&, cudaStream_t);
template void attn_launch_forward<__half, 64>(const AttnParams&, cudaStream_t);
template void attn_launch_backward<__half, 32>(const AttnParams&, cudaStream_t);
template void attn_launch_backward<__half, 64>(const AttnParams&, cudaStream_t);
}  // namespace detr_fast
