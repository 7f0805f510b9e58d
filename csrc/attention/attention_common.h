// Argument checks and dropout-stream bookkeeping shared by the CPU and CUDA attention kernels.
//
// Contract (see detr_fast/ops/attention.py): q [B, H, Lq, D], k and v [B, H, Lk, D], one floating dtype;
// key_padding_mask [B, Lk] bool with True = padded key; out [B, H, Lq, D] in q's dtype; lse [B, H, Lq] holds the
// natural-log sum of exp(scale * q.k) over the unpadded keys (fp32, fp64 for fp64 input), -inf for a query whose
// keys are all padded (its output and gradients are 0); rng_state int64 = (seed, offset) of the dropout stream
// (philox.h), (0, 0) when dropout_p == 0, followed, where the forward ran the tensor-core CUDA kernels with dropout, by
// the keep flags it drew (attn_keep_words below), so that the backward reads them instead of drawing them twice
// more; out_f32 = out before rounding (fp32) for fp16/bf16 inputs, else empty.
// attention_backward takes as `out` the forward's out_f32 for fp16/bf16 inputs and out otherwise.
#pragma once
#include <cstdlib>
#include <cstring>
#include <optional>

#include "common/checks.h"
#include "common/philox.h"

namespace detr_fast {

// The dropout keep flags saved by the tensor-core forward: for each (b * H + h, query row, 64-key tile) one int64
// holding four 16-bit words, word t for keys tile * 64 + 8 * n + 2 * t + e (n < 8, e < 2) at bit 2 * n + e (the keys
// lane t of a quad owns in the kernels' fragment layout), 1 = kept. Tiles whose keys are all padded and rows past Lq
// are not written (the backward skips them too). 9 MB for DETR's encoder (B=8, H=8, L=1050), against three Philox
// draws per attention weight when the backward draws them again.
inline int64_t attn_keep_words(int64_t B, int64_t H, int64_t Lq, int64_t Lk) {
  return B * H * Lq * ((Lk + 63) / 64);
}

// A switch of the environment that is on unless set to "0" (read at each call, so a benchmark can flip it).
inline bool env_switch_on(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// Whether the tensor-core CUDA forward saves its dropout keep flags for the backward (DETR_FAST_ATTN_KEEP_BITS=0:
// not; for benchmarks/bench_step.py's comparison, both ways compute the same values).
inline bool attn_keep_bits_enabled() { return env_switch_on("DETR_FAST_ATTN_KEEP_BITS"); }

// Whether the tensor-core CUDA backward runs its dQ kernel on a second stream beside dK/dV
// (DETR_FAST_ATTN_CONCURRENT_BWD=0: one stream; the same values either way).
inline bool attn_concurrent_backward() { return env_switch_on("DETR_FAST_ATTN_CONCURRENT_BWD"); }

inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& mask, double dropout_p) {
  check_dim(q, 4, "attention: q");
  check_dim(k, 4, "attention: k");
  check_dim(v, 4, "attention: v");
  DETR_CHECK(k.sizes() == v.sizes(), "attention: k and v must have the same shape [B, H, Lk, D], got ", k.sizes(),
             " and ", v.sizes());
  DETR_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
             "attention: q [B, H, Lq, D] and k [B, H, Lk, D] disagree in B, H or D: ", q.sizes(), " vs ", k.sizes());
  DETR_CHECK(q.size(3) > 0, "attention: head dim D must be positive");
  check_float(q, "attention: q");
  DETR_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
             "attention: q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
             v.scalar_type());
  check_same_device(q, k, "attention: q", "k");
  check_same_device(q, v, "attention: q", "v");
  DETR_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention: dropout_p must lie in [0, 1), got ", dropout_p);
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    DETR_CHECK(m.scalar_type() == at::kBool, "attention: key_padding_mask must be bool, got ", m.scalar_type());
    DETR_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == k.size(2),
               "attention: key_padding_mask must have shape [B, Lk] = [", q.size(0), ", ", k.size(2), "], got ",
               m.sizes());
    check_same_device(q, m, "attention: q", "key_padding_mask");
  }
}

// dtype of the `out` that attention_backward takes: fp32 for fp16/bf16 inputs (the forward's out_f32), else q's.
inline at::ScalarType out_dtype(const at::Tensor& q) {
  const auto dt = q.scalar_type();
  return (dt == at::kHalf || dt == at::kBFloat16) ? at::kFloat : dt;
}

// An [B, H, L, D] tensor laid out [B, L, H, D] ("BLHD"): the layout of every output and gradient of the op (out,
// out_f32, dq, dk, dv), so that x.transpose(1, 2) is the [B, L, H * D] activation of the neighbouring projection,
// a view, and a gradient coming back from that projection is already in this layout.
inline at::Tensor empty_blhd(at::IntArrayRef size, const at::TensorOptions& options) {
  return at::empty({size[0], size[2], size[1], size[3]}, options).transpose(1, 2);
}

// Whether t [B, H, L, D] is laid out BLHD (dimensions of size 1 may have any stride).
inline bool is_blhd(const at::Tensor& t) {
  const int64_t H = t.size(1), L = t.size(2), D = t.size(3);
  const int64_t want[4] = {L * H * D, D, H * D, 1};
  for (int d = 0; d < 4; ++d)
    if (t.size(d) > 1 && t.stride(d) != want[d]) return false;
  return true;
}

// t itself when laid out BLHD, else a BLHD copy.
inline at::Tensor as_blhd(const at::Tensor& t) {
  if (is_blhd(t)) return t;
  at::Tensor c = empty_blhd(t.sizes(), t.options());
  c.copy_(t);
  return c;
}

// out_f32 of the forward: fp32 [B, H, Lq, D] (BLHD) for fp16/bf16 inputs, an empty fp32 tensor otherwise.
inline at::Tensor make_out_f32(const at::Tensor& q) {
  return out_dtype(q) == q.scalar_type() ? at::empty({0}, q.options().dtype(at::kFloat))
                                         : empty_blhd(q.sizes(), q.options().dtype(at::kFloat));
}

inline void check_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                            const std::optional<at::Tensor>& mask, double dropout_p,
                                            const at::Tensor& rng_state) {
  check_attention_inputs(q, k, v, mask, dropout_p);
  DETR_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
             "attention_backward: grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(),
             " and ", out.sizes());
  DETR_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == out_dtype(q),
             "attention_backward: grad_out must have q's dtype ", q.scalar_type(), " and out must be ", out_dtype(q),
             " (the forward's out_f32 for fp16/bf16 inputs), got ", grad_out.scalar_type(), " and ",
             out.scalar_type());
  DETR_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
             "attention_backward: lse must have shape [B, H, Lq], got ", lse.sizes());
  DETR_CHECK(lse.scalar_type() == (q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
             "attention_backward: lse must be float32 (float64 for float64 inputs), got ", lse.scalar_type());
  const int64_t words = attn_keep_words(q.size(0), q.size(1), q.size(2), k.size(2));
  DETR_CHECK(rng_state.scalar_type() == at::kLong && rng_state.dim() == 1 &&
                 (rng_state.numel() == 2 || rng_state.numel() == 2 + words),
             "attention_backward: rng_state must be the forward's int64 [2] (or [2 + ", words,
             "] with its saved dropout flags), got ", rng_state.scalar_type(), " ", rng_state.sizes());
  check_same_device(q, grad_out, "attention_backward: q", "grad_out");
  check_same_device(q, out, "attention_backward: q", "out");
  check_same_device(q, lse, "attention_backward: q", "lse");
  check_same_device(q, rng_state, "attention_backward: q", "rng_state");
}

inline void check_dropout_mask_args(const at::Tensor& rng_state, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                                    double dropout_p) {
  DETR_CHECK(rng_state.scalar_type() == at::kLong && rng_state.dim() == 1 &&
                 (rng_state.numel() == 2 || rng_state.numel() == 2 + attn_keep_words(B, H, Lq, Lk)),
             "attention_dropout_mask: rng_state must be a forward's int64 [2] (or [2 + saved dropout flags]), got ",
             rng_state.scalar_type(), " ", rng_state.sizes());
  DETR_CHECK(B >= 0 && H >= 0 && Lq >= 0 && Lk >= 0, "attention_dropout_mask: sizes must be non-negative");
  DETR_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention_dropout_mask: dropout_p must lie in [0, 1), got ",
             dropout_p);
}

inline at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace detr_fast
