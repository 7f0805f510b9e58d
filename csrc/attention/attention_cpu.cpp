// CPU kernels of detr_fast::attention, attention_backward and attention_dropout_mask: the same semantics as the CUDA
// kernels (padding, fully padded queries, the Philox dropout stream of common/philox.h), written for clarity and
// correctness, not speed. Parallel over (b, h) with at::parallel_for; accumulation in at::opmath_type (fp32, fp64
// for fp64 inputs).
//
// Dropout seed on the CPU: when no seed is passed, one 63-bit seed is drawn from torch's default CPU generator
// (random64() under the generator's mutex) and the offset is 0; torch.manual_seed therefore makes runs
// reproducible, and every call draws a fresh seed. The (seed, offset) used is returned as rng_state.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "attention/attention_common.h"

namespace detr_fast {
namespace {

struct Rng {
  uint64_t seed = 0, offset = 0;
};

Rng cpu_dropout_state(double dropout_p, std::optional<int64_t> seed, int64_t offset) {
  Rng r;
  if (dropout_p <= 0.0) return r;
  if (seed.has_value()) {
    DETR_CHECK(*seed >= 0 && offset >= 0, "attention: seed and offset must be non-negative");
    r.seed = static_cast<uint64_t>(*seed);
    r.offset = static_cast<uint64_t>(offset);
    return r;
  }
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  r.seed = gen.get<at::CPUGeneratorImpl>()->random64() >> 1;  // fits int64 for rng_state
  return r;
}

bool key_padded(const bool* mask, int64_t b, int64_t Lk, int64_t j) { return mask != nullptr && mask[b * Lk + j]; }

// Offset of row i of slice bh = b * H + h in a BLHD [B, H, L, D] tensor (attention_common.h: empty_blhd).
int64_t blhd_row(int64_t bh, int64_t i, int64_t H, int64_t L, int64_t D) {
  return ((bh / H * L + i) * H + bh % H) * D;
}

// (b, h) slices per task: small problems run on one thread instead of waking the pool.
int64_t grain(int64_t Lq, int64_t Lk, int64_t D) {
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, Lq * Lk * D));
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
                    at::Tensor& out, at::Tensor& lse, float* out_f32, double dropout_p, Rng rng) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const acc_t scale = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(D)));
  const acc_t rp = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
  const uint32_t thr = dropout_threshold(dropout_p);
  const bool dropout = dropout_p > 0.0;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* lp = lse.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B * H, grain(Lq, Lk, D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(Lk), o(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const scalar_t* kb = kp + bh * Lk * D;
      const scalar_t* vb = vp + bh * Lk * D;
      for (int64_t i = 0; i < Lq; ++i) {
        const scalar_t* qi = qp + (bh * Lq + i) * D;
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < Lk; ++j) {
          if (key_padded(mask, b, Lk, j)) continue;
          acc_t dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(qi[d]) * static_cast<acc_t>(kb[j * D + d]);
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        const int64_t orow = blhd_row(bh, i, H, Lq, D);
        scalar_t* oi = op + orow;
        if (mx == -std::numeric_limits<acc_t>::infinity()) {  // no unpadded key: output 0, lse -inf
          for (int64_t d = 0; d < D; ++d) oi[d] = scalar_t(0);
          if (out_f32 != nullptr)
            for (int64_t d = 0; d < D; ++d) out_f32[orow + d] = 0.f;
          lp[bh * Lq + i] = mx;
          continue;
        }
        acc_t sum = 0;
        for (int64_t j = 0; j < Lk; ++j) {
          if (key_padded(mask, b, Lk, j)) continue;
          s[j] = std::exp(s[j] - mx);
          sum += s[j];
        }
        std::fill(o.begin(), o.end(), acc_t(0));
        for (int64_t j = 0; j < Lk; ++j) {
          if (key_padded(mask, b, Lk, j)) continue;
          acc_t w = s[j] / sum;
          if (dropout) w = attn_dropout_keep(rng.seed, rng.offset, bh, i, j, thr) ? w * rp : acc_t(0);
          for (int64_t d = 0; d < D; ++d) o[d] += w * static_cast<acc_t>(vb[j * D + d]);
        }
        for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<scalar_t>(o[d]);
        if (out_f32 != nullptr)
          for (int64_t d = 0; d < D; ++d) out_f32[orow + d] = static_cast<float>(o[d]);
        lp[bh * Lq + i] = mx + std::log(sum);
      }
    }
  });
}

// Per query row: P = exp(s - lse), dZ = dO v^T, dP = dZ * keep / (1 - p), Z = P * keep / (1 - p),
// Drow = sum_j P dP (computed directly in the accumulation type, so `out` is not read), dS = P (dP - Drow);
// dQ = scale dS K, dK = scale dS^T Q, dV = Z^T dO.
template <typename scalar_t>
void backward_kernel(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& lse, const bool* mask, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                     double dropout_p, Rng rng) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const acc_t scale = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(D)));
  const acc_t rp = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
  const uint32_t thr = dropout_threshold(dropout_p);
  const bool dropout = dropout_p > 0.0;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const scalar_t* gp = go.const_data_ptr<scalar_t>();
  const acc_t* lp = lse.const_data_ptr<acc_t>();
  scalar_t* dqp = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, B * H, grain(Lq, Lk, D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(Lk), dp(Lk), kept(Lk), dqi(D), dk_acc(Lk * D), dv_acc(Lk * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const scalar_t* kb = kp + bh * Lk * D;
      const scalar_t* vb = vp + bh * Lk * D;
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      for (int64_t i = 0; i < Lq; ++i) {
        const scalar_t* qi = qp + (bh * Lq + i) * D;
        const scalar_t* gi = gp + blhd_row(bh, i, H, Lq, D);  // grad_out BLHD (made so by the caller)
        const acc_t lse_i = lp[bh * Lq + i];
        std::fill(dqi.begin(), dqi.end(), acc_t(0));
        if (lse_i != -std::numeric_limits<acc_t>::infinity()) {
          acc_t drow = 0;
          for (int64_t j = 0; j < Lk; ++j) {
            if (key_padded(mask, b, Lk, j)) {
              p[j] = dp[j] = kept[j] = 0;
              continue;
            }
            acc_t dot = 0, dz = 0;
            for (int64_t d = 0; d < D; ++d) {
              dot += static_cast<acc_t>(qi[d]) * static_cast<acc_t>(kb[j * D + d]);
              dz += static_cast<acc_t>(gi[d]) * static_cast<acc_t>(vb[j * D + d]);
            }
            kept[j] = (!dropout || attn_dropout_keep(rng.seed, rng.offset, bh, i, j, thr)) ? rp : acc_t(0);
            p[j] = std::exp(dot * scale - lse_i);
            dp[j] = dz * kept[j];
            drow += p[j] * dp[j];
          }
          for (int64_t j = 0; j < Lk; ++j) {
            if (key_padded(mask, b, Lk, j)) continue;
            const acc_t ds = p[j] * (dp[j] - drow) * scale;
            const acc_t z = p[j] * kept[j];
            for (int64_t d = 0; d < D; ++d) {
              dqi[d] += ds * static_cast<acc_t>(kb[j * D + d]);
              dk_acc[j * D + d] += ds * static_cast<acc_t>(qi[d]);
              dv_acc[j * D + d] += z * static_cast<acc_t>(gi[d]);
            }
          }
        }
        for (int64_t d = 0; d < D; ++d) dqp[blhd_row(bh, i, H, Lq, D) + d] = static_cast<scalar_t>(dqi[d]);
      }
      for (int64_t j = 0; j < Lk; ++j) {
        const int64_t krow = blhd_row(bh, j, H, Lk, D);
        for (int64_t d = 0; d < D; ++d) {
          dkp[krow + d] = static_cast<scalar_t>(dk_acc[j * D + d]);
          dvp[krow + d] = static_cast<scalar_t>(dv_acc[j * D + d]);
        }
      }
    }
  });
}

const bool* mask_ptr(const std::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  holder = mask->contiguous();
  return holder.const_data_ptr<bool>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& v_in,
                                                             const std::optional<at::Tensor>& mask,
                                                             double dropout_p, std::optional<int64_t> seed,
                                                             int64_t offset) {
  check_attention_inputs(q_in, k_in, v_in, mask, dropout_p);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = empty_blhd(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q)));
  at::Tensor out_f32 = make_out_f32(q);
  float* of = out_f32.numel() > 0 ? out_f32.mutable_data_ptr<float>() : nullptr;
  const Rng rng = cpu_dropout_state(dropout_p, seed, offset);
  at::Tensor rng_state = at::empty({2}, q.options().dtype(at::kLong));
  rng_state.mutable_data_ptr<int64_t>()[0] = static_cast<int64_t>(rng.seed);
  rng_state.mutable_data_ptr<int64_t>()[1] = static_cast<int64_t>(rng.offset);
  at::Tensor mask_holder;
  const bool* mp = mask_ptr(mask, mask_holder);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_cpu", [&] {
    forward_kernel<scalar_t>(q, k, v, mp, out, lse, of, dropout_p, rng);
  });
  return {out, lse, rng_state, out_f32};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse_in, const std::optional<at::Tensor>& mask, double dropout_p,
    const at::Tensor& rng_state) {
  check_attention_backward_inputs(grad_out, q_in, k_in, v_in, out, lse_in, mask, dropout_p, rng_state);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor go = as_blhd(grad_out), lse = lse_in.contiguous();
  at::Tensor dq = empty_blhd(q.sizes(), q.options());
  at::Tensor dk = empty_blhd(k.sizes(), k.options());
  at::Tensor dv = empty_blhd(v.sizes(), v.options());
  const at::Tensor rs = rng_state.contiguous();
  Rng rng;
  rng.seed = static_cast<uint64_t>(rs.const_data_ptr<int64_t>()[0]);
  rng.offset = static_cast<uint64_t>(rs.const_data_ptr<int64_t>()[1]);
  at::Tensor mask_holder;
  const bool* mp = mask_ptr(mask, mask_holder);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(go, q, k, v, lse, mp, dq, dk, dv, dropout_p, rng);
  });
  return {dq, dk, dv};
}

// keep [B, H, Lq, Lk] bool: True where the kernels keep the attention weight (drawn from rng_state = (seed, offset)).
at::Tensor attention_dropout_mask_cpu(const at::Tensor& rng_state, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                                      double dropout_p) {
  check_dropout_mask_args(rng_state, B, H, Lq, Lk, dropout_p);
  const at::Tensor rs = rng_state.contiguous();
  const uint64_t seed = static_cast<uint64_t>(rs.const_data_ptr<int64_t>()[0]);
  const uint64_t offset = static_cast<uint64_t>(rs.const_data_ptr<int64_t>()[1]);
  const uint32_t thr = dropout_threshold(dropout_p);
  at::Tensor keep = at::empty({B, H, Lq, Lk}, rng_state.options().dtype(at::kBool));
  bool* kp = keep.mutable_data_ptr<bool>();
  at::parallel_for(0, B * H, grain(Lq, Lk, 1), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      for (int64_t i = 0; i < Lq; ++i)
        for (int64_t j = 0; j < Lk; ++j)
          kp[(bh * Lq + i) * Lk + j] = attn_dropout_keep(seed, offset, static_cast<uint64_t>(bh), i, j, thr);
  });
  return keep;
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CPU, m) {
  m.impl("attention", &detr_fast::attention_cpu);
  m.impl("attention_backward", &detr_fast::attention_backward_cpu);
  m.impl("attention_dropout_mask", &detr_fast::attention_dropout_mask_cpu);
}

// The backward and the mask op are not differentiable (no double backward): autograd passes through them.
TORCH_LIBRARY_IMPL(detr_fast, Autograd, m) {
  m.impl("attention_backward", torch::CppFunction::makeFallthrough());
  m.impl("attention_dropout_mask", torch::CppFunction::makeFallthrough());
}
