// Shared declarations of the CUDA attention kernels: the launch parameters and one launcher per (dtype, head dim).
// The kernels themselves are in attention_kernels.cuh (tensor cores, fp16/bf16) and attention_cuda_f32.cu (fp32).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include <ATen/cuda/PhiloxCudaState.h>

namespace detr_fast {

struct AttnParams {
  // q [B, H, Lq, D], k/v [B, H, Lk, D] with unit stride in D; other strides in elements (multiples of 8, and
  // 16-byte aligned base pointers, for the vectorized tile loads).
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  const bool* mask;  // [B, Lk] contiguous, True = padded; nullptr when none
  int B, H, Lq, Lk;
  float scale;       // D ** -0.5
  float scale_log2;  // D ** -0.5 * log2(e)
  float keep_scale;  // 1 / (1 - dropout_p)
  uint32_t threshold;  // a weight is kept when its Philox word >= threshold
  bool dropout;
  // Element strides (b, h, row; unit in D) shared by every [B, H, Lq, D] output and gradient (out, out_f32, o,
  // dout, dq) and by dk / dv ([B, H, Lk, D]). The host lays them out [B, L, H, D] ("BLHD": row stride H * D), so
  // that out.transpose(1, 2) is the [B, L, H * D] input of the output projection, and the gradients arriving from
  // and returned to the projections need no reordering copy.
  int64_t oq_sb, oq_sh, oq_sl;
  int64_t ok_sb, ok_sh, ok_sl;
  // Forward.
  at::PhiloxCudaState philox;  // unpacked in the kernel (CUDA-graph safe)
  int64_t* rng_out;            // [2] (seed, offset), written by the forward
  uint16_t* keep_out;          // the dropout keep flags (attn_keep_words layout), or nullptr: not saved
  void* out;                   // [B, H, Lq, D], strides oq_*
  float* lse;                  // [B, H, Lq] contiguous, natural log; -inf for a query without unpadded keys
  float* out_f32;              // [B, H, Lq, D] fp32 copy of out before rounding (fp16/bf16), or nullptr; oq_*
  // Backward.
  const int64_t* rng_in;  // [2] (seed, offset) from the forward
  const uint16_t* keep_in;  // the forward's saved keep flags, or nullptr: drawn again from (seed, offset)
  const float* o;         // forward output before rounding [B, H, Lq, D] fp32, strides oq_*
  const void* dout;       // [B, H, Lq, D], strides oq_*
  const float* lse_in;    // [B, H, Lq] contiguous
  float* delta;           // [B, H, Lq] contiguous scratch: rowsum(dout * out)
  void* dq;               // [B, H, Lq, D], strides oq_*
  void* dk;               // [B, H, Lk, D], strides ok_*
  void* dv;               // [B, H, Lk, D], strides ok_*
};

// T is __half or __nv_bfloat16 (tensor-core kernels) or float (FMA kernels); D is 32 or 64.
template <typename T, int D>
void attn_launch_forward(const AttnParams& p, cudaStream_t stream);
// Runs the dQ kernel (which also writes delta) and then the dK/dV kernel.
template <typename T, int D>
void attn_launch_backward(const AttnParams& p, cudaStream_t stream);

}  // namespace detr_fast
