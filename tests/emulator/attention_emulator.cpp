// Host emulation of the CUDA attention kernels (csrc/attention/attention_kernels*.cuh), for machines without a GPU.
// Blocks of 128 threads run through tests/emulator/cuda_host.h (threads as fibers, or OS threads for the
// sanitizer; __syncthreads, warp shuffles); on top of it, mma.m16n8k16 gathers the 32 lanes' fragments, rebuilds the
// 16x16 A and 16x8 B tiles from the PTX fragment layout and gives each lane its accumulator elements (fp32 sums).
// The kernels' indexing, masking, online softmax, dropout stream and backward algebra, and the ops' host side
// (attention_launch.cuh: layouts, BLHD outputs, launch parameters), are thereby executed as written. Built and driven
// by tests/emulator/run_attention.py.
#include <torch/extension.h>

#include "cuda_host.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define __log2f log2f
#define DETR_ATTN_EMULATE 1

namespace detr_fast {
namespace dev {

inline float shfl_xor(float v, int lane_mask) { return emu::shfl_xor(v, lane_mask); }
inline void block_sync() { emu::syncthreads(); }
inline bool block_any(bool pred) { return emu::block_any(pred); }

inline uint4 ldg16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) throw std::runtime_error("misaligned 16-byte load");
  uint4 r;
  std::memcpy(&r, p, 16);
  return r;
}

template <typename T>
float half_bits(uint32_t bits);
template <>
inline float half_bits<__nv_bfloat16>(uint32_t bits) {
  const uint32_t u = (bits & 0xffffu) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <>
inline float half_bits<__half>(uint32_t bits) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits & 0xffffu);
  return __half2float(__half(raw));
}

template <typename T>
void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  const int lane = emu::lane();
  emu::Warp& w = emu::warp();
  for (int e = 0; e < 4; ++e) w.a[lane][e] = a[e];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, t = L % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = half_bits<T>(w.a[L][0] >> (16 * h));
      A[g + 8][2 * t + h] = half_bits<T>(w.a[L][1] >> (16 * h));
      A[g][2 * t + 8 + h] = half_bits<T>(w.a[L][2] >> (16 * h));
      A[g + 8][2 * t + 8 + h] = half_bits<T>(w.a[L][3] >> (16 * h));
      B[2 * t + h][g] = half_bits<T>(w.b[L][0] >> (16 * h));
      B[2 * t + 8 + h][g] = half_bits<T>(w.b[L][1] >> (16 * h));
    }
  }
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float acc = 0.f;
    for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
    c[e] += acc;
  }
  w.bar.arrive_and_wait();
}

}  // namespace dev
}  // namespace detr_fast

#include "attention/attention_kernels.cuh"
#include "attention/attention_kernels_f32.cuh"

namespace detr_fast {
DETR_ATTN_F32_LAUNCHERS(32)
DETR_ATTN_F32_LAUNCHERS(64)
}  // namespace detr_fast

#include "attention/attention_launch.cuh"

namespace detr_fast {
namespace {

// The CUDA ops' host side (attention_launch.cuh: layouts, parameters, dispatch, launches) with an explicit dropout
// seed in place of the device generator. Returns (out, lse, rng_state, the output the backward takes: out_f32 for
// fp16/bf16, out for fp32).
std::vector<at::Tensor> emu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& mask, double dp, int64_t seed, int64_t offset) {
  check_attention_inputs(q, k, v, mask, dp);
  check_cuda_supported(q);
  const at::PhiloxCudaState philox(dp > 0 ? static_cast<uint64_t>(seed) : 0,
                                   dp > 0 ? static_cast<uint64_t>(offset) : 0);
  auto [out, lse, rng, out_f32] = attention_forward_launch(q, k, v, mask, dp, philox, nullptr);
  return {out, lse, rng, out_f32.numel() > 0 ? out_f32 : out};
}

std::vector<at::Tensor> emu_backward(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& mask, double dp, const at::Tensor& rng) {
  check_attention_backward_inputs(go, q, k, v, out, lse, mask, dp, rng);
  check_cuda_supported(q);
  auto [dq, dk, dv] = attention_backward_launch(go, q, k, v, out, lse, mask, dp, rng, nullptr);
  return {dq, dk, dv};
}

at::Tensor emu_dropout_mask(const at::Tensor& rng, int64_t B, int64_t H, int64_t Lq, int64_t Lk, double dp) {
  check_dropout_mask_args(rng, B, H, Lq, Lk, dp);
  return attention_dropout_mask_launch(rng, B, H, Lq, Lk, dp, nullptr);
}

}  // namespace
}  // namespace detr_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &detr_fast::emu_forward);
  m.def("backward", &detr_fast::emu_backward);
  m.def("dropout_mask", &detr_fast::emu_dropout_mask);
}
