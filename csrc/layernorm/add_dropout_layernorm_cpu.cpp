// CPU kernels of detr_fast::add_dropout_layernorm, its backward and its dropout mask, and of relu_dropout (the
// FFN activation on the same dropout stream): the same math and dropout stream as the CUDA kernels
// (common/layernorm_math.h), parallel over rows with at::parallel_for; statistics in acc_t (float, double for
// double inputs).
//
// Dropout seed on the CPU: without an explicit seed, one 63-bit seed is drawn from torch's default CPU generator
// (under its mutex) and the offset is 0, so torch.manual_seed makes runs reproducible and every call draws a fresh
// seed. The (seed, offset) used is returned as rng_state.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <mutex>
#include <tuple>
#include <vector>

#include "layernorm/layernorm_common.h"

namespace detr_fast {
namespace {

struct Rng {
  uint64_t seed = 0, offset = 0;
};

Rng cpu_dropout_state(double p, std::optional<int64_t> seed, int64_t offset) {
  Rng r;
  if (p <= 0.0) return r;
  check_ln_seed(seed, offset);
  if (seed.has_value()) {
    r.seed = static_cast<uint64_t>(*seed);
    r.offset = static_cast<uint64_t>(offset);
    return r;
  }
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  r.seed = gen.get<at::CPUGeneratorImpl>()->random64() >> 1;  // fits int64 for rng_state
  return r;
}

// rng_state [2] int64 = (seed, offset), as the ops return it.
at::Tensor rng_tensor(const Rng& rng, const at::TensorOptions& options) {
  at::Tensor t = at::empty({2}, options.dtype(at::kLong));
  t.mutable_data_ptr<int64_t>()[0] = static_cast<int64_t>(rng.seed);
  t.mutable_data_ptr<int64_t>()[1] = static_cast<int64_t>(rng.offset);
  return t;
}

Rng read_rng(const at::Tensor& rng_state) {
  const at::Tensor rs = rng_state.contiguous();
  return Rng{static_cast<uint64_t>(rs.const_data_ptr<int64_t>()[0]),
             static_cast<uint64_t>(rs.const_data_ptr<int64_t>()[1])};
}

// Rows per task: small problems stay on one thread.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 16384 / d); }

// Values per part of a row whose (count, mean, M2) are combined (the CUDA kernels combine per-thread parts).
constexpr int64_t kPart = 32;

// Keep decisions of one row (one Philox block per four columns, as the CUDA kernel draws them).
void row_keep(int64_t row, int64_t d, bool dropout, Rng rng, uint32_t thr, uint8_t* keep) {
  if (!dropout) {
    std::fill(keep, keep + d, uint8_t(1));
    return;
  }
  for (int64_t c4 = 0; 4 * c4 < d; ++c4) {
    const U32x4 blk = ln_dropout_block(rng.seed, rng.offset, row, c4);
    for (int j = 0; j < 4 && 4 * c4 + j < d; ++j) keep[4 * c4 + j] = u32x4_word(blk, j) >= thr;
  }
}

// h[c] = residual + dropout(x) of one row, in acc_t; keep[c] receives the row's keep decisions.
template <typename x_t, typename scalar_t, typename acc_t>
void row_h(const x_t* x, const scalar_t* r, int64_t row, int64_t d, bool dropout, Rng rng, uint32_t thr,
           acc_t keep_scale, acc_t* h, uint8_t* keep) {
  row_keep(row, d, dropout, rng, thr, keep);
  for (int64_t c = 0; c < d; ++c)
    h[c] = ln_add_dropout(static_cast<acc_t>(x[c]), static_cast<acc_t>(r[c]), keep[c] != 0, keep_scale);
}

// scalar_t: the residual's and the output's dtype; x_t: x's (scalar_t, or float16/bfloat16 with a float residual).
template <typename scalar_t, typename x_t = scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, const at::Tensor& b,
                    at::Tensor& out, at::Tensor& mean, at::Tensor& rstd, double p, double eps, Rng rng) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const x_t* xp = x.const_data_ptr<x_t>();
  const scalar_t* rp = r.const_data_ptr<scalar_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const acc_t* bp = b.const_data_ptr<acc_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* sp = rstd.mutable_data_ptr<acc_t>();
  const bool dropout = p > 0.0;
  const uint32_t thr = dropout_threshold(p);
  const acc_t keep_scale = static_cast<acc_t>(1.0 / (1.0 - p));
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> h(d);
    std::vector<uint8_t> keep(d);
    for (int64_t row = begin; row < end; ++row) {
      row_h(xp + row * d, rp + row * d, row, d, dropout, rng, thr, keep_scale, h.data(), keep.data());
      MeanM2<acc_t> st{acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t c0 = 0; c0 < d; c0 += kPart)
        st = meanm2_combine(st, meanm2_of(h.data() + c0, static_cast<int>(std::min(kPart, d - c0))));
      const acc_t rs = ln_rstd(st, static_cast<acc_t>(eps));
      scalar_t* o = op + row * d;
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(ln_normalize(h[c], st.mean, rs, wp[c], bp[c]));
      mp[row] = st.mean;
      sp[row] = rs;
    }
  });
}

// Rows per chunk of the column reduction: fixed, so d weight and d bias do not depend on the thread count.
constexpr int64_t kChunkRows = 64;

template <typename scalar_t, typename x_t = scalar_t>
void backward_kernel(const at::Tensor& go, const at::Tensor& x, const at::Tensor& r, const at::Tensor& w,
                     const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dr,
                     at::Tensor& dw, at::Tensor& db, double p, Rng rng) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const scalar_t* gp = go.const_data_ptr<scalar_t>();
  const x_t* xp = x.const_data_ptr<x_t>();
  const scalar_t* rp = r.const_data_ptr<scalar_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  const acc_t* sp = rstd.const_data_ptr<acc_t>();
  x_t* dxp = dx.mutable_data_ptr<x_t>();
  scalar_t* drp = dr.mutable_data_ptr<scalar_t>();
  const bool dropout = p > 0.0;
  const uint32_t thr = dropout_threshold(p);
  const acc_t keep_scale = static_cast<acc_t>(1.0 / (1.0 - p));
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  // Stage 1: per chunk of rows, the input gradients and partial column sums [chunks, 2, d] (g * xhat, g).
  std::vector<acc_t> partial(static_cast<size_t>(chunks * 2 * d), acc_t(0));
  at::parallel_for(0, chunks, std::max<int64_t>(1, row_grain(d) / kChunkRows), [&](int64_t cb, int64_t ce) {
    std::vector<acc_t> h(d), dxhat(d);
    std::vector<uint8_t> keep(d);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      acc_t* pw = partial.data() + chunk * 2 * d;
      acc_t* pb = pw + d;
      for (int64_t row = chunk * kChunkRows; row < std::min(rows, (chunk + 1) * kChunkRows); ++row) {
        row_h(xp + row * d, rp + row * d, row, d, dropout, rng, thr, keep_scale, h.data(), keep.data());
        const acc_t mu = mp[row], rs = sp[row];
        const scalar_t* g = gp + row * d;
        acc_t s1 = 0, s2 = 0;
        for (int64_t c = 0; c < d; ++c) {
          const acc_t gc = static_cast<acc_t>(g[c]);
          const acc_t xhat = (h[c] - mu) * rs;
          h[c] = xhat;
          dxhat[c] = gc * wp[c];
          s1 += dxhat[c];
          s2 += dxhat[c] * xhat;
          pw[c] += gc * xhat;
          pb[c] += gc;
        }
        const acc_t c1 = s1 / static_cast<acc_t>(d), c2 = s2 / static_cast<acc_t>(d);
        for (int64_t c = 0; c < d; ++c) {
          const acc_t dh = ln_grad_h(dxhat[c], h[c], rs, c1, c2);
          drp[row * d + c] = static_cast<scalar_t>(dh);
          dxp[row * d + c] = static_cast<x_t>(keep[c] ? dh * keep_scale : acc_t(0));
        }
      }
    }
  });
  // Stage 2: sum the chunks' partials column by column, in chunk order.
  acc_t* dwp = dw.mutable_data_ptr<acc_t>();
  acc_t* dbp = db.mutable_data_ptr<acc_t>();
  at::parallel_for(0, d, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, chunks)), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t sw = 0, sb = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        sw += partial[k * 2 * d + c];
        sb += partial[k * 2 * d + d + c];
      }
      dwp[c] = sw;
      dbp[c] = sb;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_dropout_layernorm_cpu(
    const at::Tensor& x_in, const at::Tensor& r_in, const at::Tensor& weight, const at::Tensor& bias, double p,
    double eps, std::optional<int64_t> seed, int64_t offset) {
  check_ln_inputs(x_in, r_in, weight, bias, p, eps);
  LnForwardIO io = ln_forward_io(x_in, r_in, weight, bias);
  const at::Tensor &x = io.x, &r = io.r, &w = io.w, &b = io.b;
  at::Tensor &out = io.out, &mean = io.mean, &rstd = io.rstd;
  const int64_t rows = io.rows;
  const Rng rng = cpu_dropout_state(p, seed, offset);
  const at::Tensor rng_state = rng_tensor(rng, x.options());
  if (rows == 0) return {out, mean, rstd, rng_state};
  if (ln_mixed(x, r)) {
    if (x.scalar_type() == at::kHalf) {
      forward_kernel<float, at::Half>(x, r, w, b, out, mean, rstd, p, eps, rng);
    } else {
      forward_kernel<float, at::BFloat16>(x, r, w, b, out, mean, rstd, p, eps, rng);
    }
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_dropout_layernorm_cpu", [&] {
      forward_kernel<scalar_t>(x, r, w, b, out, mean, rstd, p, eps, rng);
    });
  }
  return {out, mean, rstd, rng_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_dropout_layernorm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& r_in, const at::Tensor& weight,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, double p, const at::Tensor& rng_state) {
  check_ln_backward_inputs(grad_out, x_in, r_in, weight, mean_in, rstd_in, p, rng_state);
  const at::ScalarType acc = ln_acc_dtype(x_in);
  LnBackwardIO io = ln_backward_io(grad_out, x_in, r_in, weight, mean_in, rstd_in);
  const at::Tensor &x = io.x, &r = io.r, &go = io.go, &w = io.w, &mean = io.mean, &rstd = io.rstd;
  at::Tensor &dx = io.dx, &dr = io.dr;
  const int64_t d = io.d;
  at::Tensor dw = at::zeros({d}, x.options().dtype(acc));
  at::Tensor db = at::zeros({d}, x.options().dtype(acc));
  const Rng rng = p > 0.0 ? read_rng(rng_state) : Rng{};
  if (x.numel() > 0) {
    if (ln_mixed(x, r)) {
      if (x.scalar_type() == at::kHalf) {
        backward_kernel<float, at::Half>(go, x, r, w, mean, rstd, dx, dr, dw, db, p, rng);
      } else {
        backward_kernel<float, at::BFloat16>(go, x, r, w, mean, rstd, dx, dr, dw, db, p, rng);
      }
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_dropout_layernorm_bwd_cpu", [&] {
        backward_kernel<scalar_t>(go, x, r, w, mean, rstd, dx, dr, dw, db, p, rng);
      });
    }
  }
  return {dx, dr, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

// relu_dropout: y = relu(x) * keep / (1 - p) with the keep mask of the stream above (x viewed as [rows, d]).
template <typename scalar_t>
void relu_dropout_kernel(const at::Tensor& x, at::Tensor& out, double p, Rng rng) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const bool dropout = p > 0.0;
  const uint32_t thr = dropout_threshold(p);
  const acc_t keep_scale = static_cast<acc_t>(1.0 / (1.0 - p));
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> keep(d);
    for (int64_t row = begin; row < end; ++row) {
      row_keep(row, d, dropout, rng, thr, keep.data());
      for (int64_t c = 0; c < d; ++c)
        op[row * d + c] = static_cast<scalar_t>(
            relu_dropout_value(static_cast<acc_t>(xp[row * d + c]), keep[c] != 0, keep_scale));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> relu_dropout_cpu(const at::Tensor& x_in, double p, std::optional<int64_t> seed,
                                                    int64_t offset) {
  check_relu_dropout(x_in, p, "relu_dropout");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const Rng rng = cpu_dropout_state(p, seed, offset);
  const at::Tensor rng_state = rng_tensor(rng, x.options());
  if (x.numel() == 0) return {out, rng_state};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_dropout_cpu",
                                  [&] { relu_dropout_kernel<scalar_t>(x, out, p, rng); });
  return {out, rng_state};
}

// The gradient from the output alone (no mask): relu_dropout_grad per element.
at::Tensor relu_dropout_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out_in, double p) {
  check_relu_dropout_backward(grad_out, out_in, p);
  const at::Tensor g = grad_out.contiguous(), y = out_in.contiguous();
  at::Tensor dx = at::empty(y.sizes(), y.options());
  const int64_t n = y.numel();
  if (n == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "relu_dropout_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t keep_scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e)
        dp[e] = static_cast<scalar_t>(
            relu_dropout_grad(static_cast<acc_t>(gp[e]), static_cast<acc_t>(yp[e]), keep_scale));
    });
  });
  return dx;
}

// keep [rows, d] bool: True where the kernels keep x's element for rng_state = (seed, offset).
at::Tensor add_dropout_layernorm_mask_cpu(const at::Tensor& rng_state, int64_t rows, int64_t d, double p) {
  check_ln_mask_args(rng_state, rows, d, p);
  const Rng rng = read_rng(rng_state);
  const uint32_t thr = dropout_threshold(p);
  at::Tensor keep = at::empty({rows, d}, rng_state.options().dtype(at::kBool));
  bool* kp = keep.mutable_data_ptr<bool>();
  if (keep.numel() == 0) return keep;
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> row_mask(d);
    for (int64_t row = begin; row < end; ++row) {
      row_keep(row, d, true, rng, thr, row_mask.data());
      for (int64_t c = 0; c < d; ++c) kp[row * d + c] = row_mask[c] != 0;
    }
  });
  return keep;
}

}  // namespace
}  // namespace detr_fast

TORCH_LIBRARY_IMPL(detr_fast, CPU, m) {
  m.impl("add_dropout_layernorm", &detr_fast::add_dropout_layernorm_cpu);
  m.impl("add_dropout_layernorm_backward", &detr_fast::add_dropout_layernorm_backward_cpu);
  m.impl("add_dropout_layernorm_mask", &detr_fast::add_dropout_layernorm_mask_cpu);
  m.impl("relu_dropout", &detr_fast::relu_dropout_cpu);
  m.impl("relu_dropout_backward", &detr_fast::relu_dropout_backward_cpu);
}

// The backward and the mask op are not differentiable (no double backward): autograd passes through them.
TORCH_LIBRARY_IMPL(detr_fast, Autograd, m) {
  m.impl("add_dropout_layernorm_backward", torch::CppFunction::makeFallthrough());
  m.impl("add_dropout_layernorm_mask", torch::CppFunction::makeFallthrough());
  m.impl("relu_dropout_backward", torch::CppFunction::makeFallthrough());
}
