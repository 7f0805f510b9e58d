// Host-side argument checks of linear_assignment, shared by the CPU and CUDA entry points (no device reads).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/checks.h"

namespace detr_fast {
namespace assignment {

struct Shape {
  int64_t B, Q, T;
  int64_t problems;                // prod(leading dims) * B
  std::vector<int64_t> out_sizes;  // [*, B, Q]
};

// cost [*, B, Q, T] floating, num_targets [B] int64 on the same device; T <= Q (a static shape rule, so that it can
// be checked without reading num_targets: T > Q is an error even when the extra columns are padding).
inline Shape check_inputs(const at::Tensor& cost, const at::Tensor& num_targets) {
  DETR_CHECK(cost.dim() >= 3, "linear_assignment: cost must be [*, B, Q, T], got shape ", cost.sizes());
  check_float(cost, "linear_assignment: cost");
  DETR_CHECK(num_targets.scalar_type() == at::kLong, "linear_assignment: num_targets must be int64, got ",
             num_targets.scalar_type());
  check_same_device(cost, num_targets, "linear_assignment: cost", "num_targets");
  const int64_t d = cost.dim();
  Shape s;
  s.B = cost.size(d - 3);
  s.Q = cost.size(d - 2);
  s.T = cost.size(d - 1);
  DETR_CHECK(num_targets.dim() == 1 && num_targets.size(0) == s.B, "linear_assignment: num_targets must be [B=", s.B,
             "], got shape ", num_targets.sizes());
  DETR_CHECK(s.T <= s.Q, "linear_assignment: more target columns than queries (T=", s.T, " > Q=", s.Q,
             "); every target needs its own query");
  DETR_CHECK(s.Q < (int64_t{1} << 30), "linear_assignment: Q=", s.Q, " is too large");
  s.problems = 1;
  for (int64_t k = 0; k < d - 2; ++k) s.problems *= cost.size(k);
  s.out_sizes.assign(cost.sizes().begin(), cost.sizes().end() - 1);
  return s;
}

// Stage-1 engine of the solver (la::Engine in common/auction.h), from DETR_FAST_LA_ENGINE: "auto" (default, or
// unset), "auction" (always warm-start with the auction) or "ssp" (always cold shortest augmenting paths). Read on
// every call, so tests can switch it; any other value is an error.
inline int engine_from_env() {
  const char* v = std::getenv("DETR_FAST_LA_ENGINE");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return 0;
  if (std::strcmp(v, "auction") == 0) return 1;
  if (std::strcmp(v, "ssp") == 0) return 2;
  DETR_CHECK(false, "DETR_FAST_LA_ENGINE must be auto, auction or ssp, got '", v, "'");
  return 0;
}

// The solver reads float32 or float64; lower precisions are widened to float32 (exactly).
inline at::Tensor as_solver_dtype(const at::Tensor& cost) {
  if (cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble) return cost;
  return cost.to(at::kFloat);
}

}  // namespace assignment
}  // namespace detr_fast
