// Host side of the CUDA attention ops: the layouts the kernels read (q/k/v strides, BLHD outputs and gradients), the
// launch parameters, dtype / head-dim dispatch to the launchers of attention_kernels.cuh and attention_kernels_f32.cuh,
// and the dropout-mask kernel. Included by attention_cuda.cu (the device build: argument checks, device guard and the
// dropout generator come first) and by the host emulator (tests/emulator/attention_emulator.cpp), which runs all of
// it on the CPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "attention/attention_common.h"
#include "attention/attention_cuda.cuh"
#include "common/launch.cuh"

namespace detr_fast {
namespace {

inline void check_cuda_supported(const at::Tensor& q) {
  const auto dt = q.scalar_type();
  DETR_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
             "attention (CUDA): dtype must be float32, float16 or bfloat16, got ", dt);
  DETR_CHECK(q.size(3) == 32 || q.size(3) == 64, "attention (CUDA): head dim must be 32 or 64, got ", q.size(3),
             " (detr_fast.ops.attention runs the reference for other head dims)");
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Contiguous with a 16-byte aligned base pointer.
inline at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

// q/k/v as the kernels read them: unit stride in D, the other strides multiples of 8 elements and a 16-byte
// aligned base (16-byte vector loads); anything else is copied to a contiguous tensor.
inline at::Tensor kernel_layout(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && aligned16(t);
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  return ok ? t : contiguous_aligned(t);
}

inline AttnParams base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                              double dropout_p) {
  DETR_CHECK(q.size(0) * q.size(1) < (int64_t(1) << 31) && q.size(2) < (int64_t(1) << 31) &&
                 k.size(2) < (int64_t(1) << 31),
             "attention (CUDA): B*H, Lq and Lk must each be below 2^31");
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  p.B = static_cast<int>(q.size(0));
  p.H = static_cast<int>(q.size(1));
  p.Lq = static_cast<int>(q.size(2));
  p.Lk = static_cast<int>(k.size(2));
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.threshold = dropout_threshold(dropout_p);
  p.dropout = dropout_p > 0.0;
  const int64_t grid = q.size(0) * q.size(1) * ((std::max(q.size(2), k.size(2)) + 31) / 32);
  DETR_CHECK(grid < (int64_t(1) << 31), "attention (CUDA): too many blocks for one launch");
  return p;
}

// BLHD (see empty_blhd) with a 16-byte aligned base, as the kernels read out / dout and out_f32 / o.
inline at::Tensor blhd_aligned(const at::Tensor& t) {
  at::Tensor c = as_blhd(t);
  if (aligned16(c)) return c;
  at::Tensor a = empty_blhd(c.sizes(), c.options());
  a.copy_(c);
  return a;
}

// The BLHD element strides (b, h, row) of a [B, H, L, D] tensor, whatever the strides of its size-1 dimensions.
inline void blhd_strides(const at::Tensor& t, int64_t& sb, int64_t& sh, int64_t& sl) {
  const int64_t H = t.size(1), L = t.size(2), D = t.size(3);
  sb = L * H * D, sh = D, sl = H * D;
}

inline at::Tensor mask_layout(const std::optional<at::Tensor>& mask) {
  return (mask.has_value() && mask->defined()) ? mask->contiguous() : at::Tensor();
}

template <typename F>
void dispatch(const at::Tensor& q, F&& f) {
  const int64_t D = q.size(3);
  switch (q.scalar_type()) {
    case at::kFloat:
      D == 32 ? f(float{}, std::integral_constant<int, 32>{}) : f(float{}, std::integral_constant<int, 64>{});
      break;
    case at::kHalf:
      D == 32 ? f(__half{}, std::integral_constant<int, 32>{}) : f(__half{}, std::integral_constant<int, 64>{});
      break;
    default:
      D == 32 ? f(__nv_bfloat16{}, std::integral_constant<int, 32>{})
              : f(__nv_bfloat16{}, std::integral_constant<int, 64>{});
  }
}

// The forward on checked inputs: (out [B, H, Lq, D] laid out BLHD, lse, rng_state, out_f32 or an empty tensor).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward_launch(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& mask_in,
    double dropout_p, const at::PhiloxCudaState& philox, cudaStream_t stream) {
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const at::Tensor mask = mask_layout(mask_in);
  at::Tensor out = empty_blhd(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  // the tensor-core kernels (fp16/bf16) save the dropout flags they draw after (seed, offset) in rng_state
  const bool keep_bits = dropout_p > 0.0 && q.scalar_type() != at::kFloat && attn_keep_bits_enabled();
  const int64_t words = keep_bits ? attn_keep_words(q.size(0), q.size(1), q.size(2), k.size(2)) : 0;
  at::Tensor rng_state = at::empty({2 + words}, q.options().dtype(at::kLong));
  at::Tensor out_f32 = make_out_f32(q);
  AttnParams p = base_params(q, k, v, mask, dropout_p);
  blhd_strides(out, p.oq_sb, p.oq_sh, p.oq_sl);  // out and out_f32
  p.philox = philox;
  p.rng_out = rng_state.mutable_data_ptr<int64_t>();
  p.keep_out = words > 0 ? reinterpret_cast<uint16_t*>(p.rng_out + 2) : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.out_f32 = out_f32.numel() > 0 ? out_f32.mutable_data_ptr<float>() : nullptr;
  if (out.numel() == 0) {
    // No forward block runs to write rng_state; empty inputs only, so the small host-to-device copy is harmless.
    const int64_t s = philox.captured_ ? 0 : static_cast<int64_t>(philox.seed_.val);
    const int64_t o = philox.captured_ ? 0 : static_cast<int64_t>(philox.offset_.val);
    rng_state.copy_(at::tensor({s, o}, at::TensorOptions().dtype(at::kLong)));
    return {out, lse, rng_state, out_f32};
  }
  dispatch(q, [&](auto t, auto d) { attn_launch_forward<decltype(t), decltype(d)::value>(p, stream); });
  return {out, lse, rng_state, out_f32};
}

// The backward on checked inputs: (dq, dk, dv) laid out BLHD.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_launch(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask_in, double dropout_p,
    const at::Tensor& rng_state, cudaStream_t stream) {
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const at::Tensor mask = mask_layout(mask_in);
  // grad_out arrives BLHD from the output projection's backward (no copy); out is the forward's own
  const at::Tensor go = blhd_aligned(grad_out), o = blhd_aligned(out);
  const at::Tensor lse_c = lse.contiguous(), rng = rng_state.contiguous();
  at::Tensor dq = empty_blhd(q.sizes(), q.options());
  at::Tensor dk = empty_blhd(k.sizes(), k.options());
  at::Tensor dv = empty_blhd(v.sizes(), v.options());
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  AttnParams p = base_params(q, k, v, mask, dropout_p);
  blhd_strides(dq, p.oq_sb, p.oq_sh, p.oq_sl);  // dq, dout and o
  blhd_strides(dk, p.ok_sb, p.ok_sh, p.ok_sl);  // dk and dv
  p.rng_in = rng.const_data_ptr<int64_t>();
  // saved flags (only a tensor-core forward writes them, so only those kernels read them); else drawn again
  p.keep_in = rng.numel() > 2 && p.dropout && q.scalar_type() != at::kFloat
                  ? reinterpret_cast<const uint16_t*>(p.rng_in + 2) : nullptr;
  p.o = o.const_data_ptr<float>();
  p.dout = go.data_ptr();
  p.lse_in = lse_c.const_data_ptr<float>();
  p.delta = delta.mutable_data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  dispatch(q, [&](auto t, auto d) { attn_launch_backward<decltype(t), decltype(d)::value>(p, stream); });
  return {dq, dk, dv};
}

__global__ void dropout_mask_kernel(const int64_t* rng, int64_t BH, int64_t Lq, int64_t Lk, uint32_t threshold,
                                    bool* keep) {
  const int64_t n = BH * Lq * Lk;
  const uint64_t seed = static_cast<uint64_t>(rng[0]), offset = static_cast<uint64_t>(rng[1]);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % Lk, i = (e / Lk) % Lq, bh = e / (Lk * Lq);
    keep[e] = attn_dropout_keep(seed, offset, static_cast<uint64_t>(bh), i, j, threshold);
  }
}

// The keep mask [B, H, Lq, Lk] of checked arguments.
inline at::Tensor attention_dropout_mask_launch(const at::Tensor& rng_state, int64_t B, int64_t H, int64_t Lq,
                                                int64_t Lk, double dropout_p, cudaStream_t stream) {
  const at::Tensor rng = rng_state.contiguous();
  at::Tensor keep = at::empty({B, H, Lq, Lk}, rng.options().dtype(at::kBool));
  const int64_t n = keep.numel();
  if (n == 0) return keep;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  launch_kernel(dropout_mask_kernel, dim3(blocks), dim3(threads), stream, rng.const_data_ptr<int64_t>(), B * H, Lq,
                Lk, dropout_threshold(dropout_p), keep.mutable_data_ptr<bool>());
  return keep;
}

}  // namespace
}  // namespace detr_fast
