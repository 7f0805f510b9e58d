// fp32 attention launchers (kernels and the launcher macro in attention_kernels_f32.cuh).
#include "attention/attention_kernels_f32.cuh"

namespace detr_fast {

DETR_ATTN_F32_LAUNCHERS(32)
DETR_ATTN_F32_LAUNCHERS(64)

}  // namespace detr_fast
