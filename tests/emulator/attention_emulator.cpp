// Host emulation of the CUDA attention kernels (csrc/attention/attention_kernels*.cuh), for machines without a GPU.
// Blocks of 128 threads run through tests/emulator/cuda_host.h (threads as fibers, or OS threads for the
// sanitizer; __syncthreads, warp shuffles); on top of it, mma.m16n8k16 gathers the 32 lanes' fragments, rebuilds the
// 16x16 A and 16x8 B tiles from the PTX fragment layout and gives each lane its accumulator elements (fp32 sums).
// The kernels' indexing, masking, online softmax, dropout stream and backward algebra are thereby executed as
// written. Built and driven by tests/emulator/run_attention.py.
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
namespace {

template <typename K>
void run_grid(K kernel, int64_t blocks, const AttnParams& p) {
  emu::run_grid(kernel, dim3(static_cast<unsigned>(blocks)), dim3(128), 0, p);
}

AttnParams params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, double dp) {
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  p.B = q.size(0), p.H = q.size(1), p.Lq = q.size(2), p.Lk = k.size(2);
  const double scale = 1.0 / std::sqrt(double(q.size(3)));
  p.scale = float(scale);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.keep_scale = float(1.0 / (1.0 - dp));
  p.threshold = dropout_threshold(dp);
  p.dropout = dp > 0.0;
  return p;
}

int64_t nblocks(int64_t bh, int64_t len, int rows) { return bh * ((len + rows - 1) / rows); }

template <typename T, int D>
void fwd(const AttnParams& p) {
  const int64_t bh = int64_t(p.B) * p.H;
  if constexpr (std::is_same_v<T, float>)
    run_grid(attn32::fwd_kernel<D>, nblocks(bh, p.Lq, 128 / (D / 16)), p);
  else
    run_grid(attn::attn_fwd_kernel<T, D>, nblocks(bh, p.Lq, attn::kBlockM), p);
}

template <typename T, int D>
void bwd(const AttnParams& p) {
  const int64_t bh = int64_t(p.B) * p.H;
  if constexpr (std::is_same_v<T, float>) {
    run_grid(attn32::bwd_dq_kernel<D>, nblocks(bh, p.Lq, 128 / (D / 16)), p);
    run_grid(attn32::bwd_dkdv_kernel<D>, nblocks(bh, p.Lk, 128 / (D / 16)), p);
  } else {
    run_grid(attn::attn_bwd_dq_kernel<T, D>, nblocks(bh, p.Lq, attn::kBlockM), p);
    run_grid(attn::attn_bwd_dkdv_kernel<T, D>, nblocks(bh, p.Lk, attn::kBlockN), p);
  }
}

#define EMU_DISPATCH(FN, q, p)                                          \
  do {                                                                  \
    const bool d32 = (q).size(3) == 32;                                 \
    switch ((q).scalar_type()) {                                        \
      case at::kFloat: d32 ? FN<float, 32>(p) : FN<float, 64>(p); break; \
      case at::kHalf: d32 ? FN<__half, 32>(p) : FN<__half, 64>(p); break; \
      default: d32 ? FN<__nv_bfloat16, 32>(p) : FN<__nv_bfloat16, 64>(p); \
    }                                                                   \
  } while (0)

// [B, H, L, D] laid out [B, L, H, D], as the CUDA entry points allocate the outputs and gradients; its strides.
at::Tensor blhd(at::IntArrayRef s, const at::TensorOptions& o) {
  return at::empty({s[0], s[2], s[1], s[3]}, o).transpose(1, 2);
}
void strides_of(const at::Tensor& t, int64_t& sb, int64_t& sh, int64_t& sl) {
  sb = t.size(2) * t.size(1) * t.size(3), sh = t.size(3), sl = t.size(1) * t.size(3);
}
at::Tensor to_blhd(const at::Tensor& t) {
  at::Tensor c = blhd(t.sizes(), t.options());
  c.copy_(t);
  return c;
}

std::vector<at::Tensor> emu_forward(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> mask,
                                    double dp, int64_t seed, int64_t offset) {
  at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  at::Tensor out = blhd(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  at::Tensor rng = at::empty({2}, q.options().dtype(at::kLong));
  at::Tensor out_f32 = blhd(q.sizes(), q.options().dtype(at::kFloat));
  AttnParams p = params(q, k, v, m, dp);
  strides_of(out, p.oq_sb, p.oq_sh, p.oq_sl);
  p.philox = at::PhiloxCudaState(dp > 0 ? seed : 0, dp > 0 ? offset : 0);
  p.rng_out = rng.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_f32 = q.scalar_type() == at::kFloat ? nullptr : out_f32.data_ptr<float>();
  EMU_DISPATCH(fwd, q, p);
  return {out, lse, rng, q.scalar_type() == at::kFloat ? out : out_f32};
}

std::vector<at::Tensor> emu_backward(at::Tensor go, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                                     at::Tensor lse, std::optional<at::Tensor> mask, double dp, at::Tensor rng) {
  at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  go = to_blhd(go);
  out = to_blhd(out);
  at::Tensor dq = blhd(q.sizes(), q.options()), dk = blhd(k.sizes(), k.options()), dv = blhd(v.sizes(), v.options());
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  AttnParams p = params(q, k, v, m, dp);
  strides_of(dq, p.oq_sb, p.oq_sh, p.oq_sl);
  strides_of(dk, p.ok_sb, p.ok_sh, p.ok_sl);
  p.rng_in = rng.data_ptr<int64_t>();
  p.o = out.data_ptr<float>();
  p.dout = go.data_ptr();
  p.lse_in = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  EMU_DISPATCH(bwd, q, p);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace detr_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &detr_fast::emu_forward);
  m.def("backward", &detr_fast::emu_backward);
}
