// Argument checks shared by every kernel: each failure is a clear Python exception (ValueError/RuntimeError).
#pragma once
#include <torch/library.h>

#include <ATen/ATen.h>

#define DETR_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "detr_fast: ", __VA_ARGS__)

namespace detr_fast {

inline void check_float(const at::Tensor& t, const char* name) {
  DETR_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  DETR_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  DETR_CHECK(a.device() == b.device(), na, " and ", nb, " must be on the same device, got ", a.device(), " and ",
             b.device());
}

}  // namespace detr_fast
