// CPU kernel of linear_assignment: the solver of csrc/common/auction.h (its header comment argues exactness and the
// bound on the work) with a team of one thread per problem, problems spread over threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdio>
#include <vector>

#include "assignment/assignment.h"
#include "common/auction.h"
#include "common/checks.h"

namespace detr_fast {
namespace {

// Scratch of one thread, sized for Q columns and an n x Q cost copy.
struct CpuScratch {
  std::vector<double> price, dist, cost;
  std::vector<la::u64> bid, bid_val;
  std::vector<int> bidder, owner, row_col, bid_col, pred;
  std::vector<unsigned char> scanned;

  la::Workspace resize(int64_t Q, int64_t n) {
    price.resize(Q);
    dist.resize(Q);
    bid.resize(Q);
    bid_val.resize(Q);
    bidder.resize(Q);
    owner.resize(Q);
    row_col.resize(Q);
    bid_col.resize(Q);
    pred.resize(Q);
    scanned.resize(Q);
    cost.resize(n * Q);
    return la::Workspace{price.data(), dist.data(),   bid.data(),     bidder.data(), owner.data(),
                         row_col.data(), bid_col.data(), bid_val.data(), pred.data(),   scanned.data()};
  }
};

// Set DETR_FAST_LA_STATS=1 to print per-call totals of the solver's work counters (tuning aid): problems solved,
// problems that ran the auction, bidding rounds, rows left to stage 3, Dijkstra steps, certificate failures, row
// scans (total work in units of Q operations) and team barriers (what one CUDA block per problem would sync).
// Read on every call (one getenv), so tests can switch it.
bool stats_enabled() {
  const char* v = std::getenv("DETR_FAST_LA_STATS");
  return v != nullptr && v[0] == '1';
}

at::Tensor linear_assignment_cpu(const at::Tensor& cost_in, const at::Tensor& num_targets) {
  const auto shape = assignment::check_inputs(cost_in, num_targets);
  const int64_t B = shape.B, Q = shape.Q, T = shape.T, P = shape.problems;
  const at::Tensor nt = num_targets.contiguous();
  const int64_t* nt_p = nt.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    DETR_CHECK(nt_p[b] >= 0 && nt_p[b] <= T, "num_targets must lie in [0, T=", T, "], got ", nt_p[b],
               " for image ", b);
  }
  at::Tensor cost = assignment::as_solver_dtype(cost_in).contiguous();
  at::Tensor out = at::empty(shape.out_sizes, cost_in.options().dtype(at::kLong));
  if (P == 0 || Q == 0) return out;
  int64_t* out_p = out.data_ptr<int64_t>();
  std::atomic<int64_t> bad_problem{-1};
  std::atomic<long long> sum_rounds{0}, sum_released{0}, sum_steps{0}, sum_cold{0}, sum_auction{0}, sum_scans{0},
      sum_barriers{0};
  const bool want_stats = stats_enabled();
  const int engine = assignment::engine_from_env();

  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "linear_assignment_cpu", [&] {
    const scalar_t* cost_p = cost.data_ptr<scalar_t>();
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      CpuScratch scratch;
      for (int64_t p = begin; p < end; ++p) {
        const int n = static_cast<int>(nt_p[p % B]);
        int64_t* o = out_p + p * Q;
        if (n == 0) {
          std::fill(o, o + Q, int64_t{-1});
          continue;
        }
        la::Workspace ws = scratch.resize(Q, n);
        // Copy the n real columns, transposed, so that a row's Q costs are contiguous.
        const scalar_t* g = cost_p + p * Q * T;
        double* cc = scratch.cost.data();
        for (int64_t j = 0; j < Q; ++j) {
          for (int64_t i = 0; i < n; ++i) cc[i * Q + j] = static_cast<double>(g[j * T + i]);
        }
        la::SeqTeam team;
        la::Stats st;
        const la::CostView<double> view{cc, Q, 1};
        if (la::solve(team, view, n, static_cast<int>(Q), ws, o, want_stats ? &st : nullptr, engine) != 0) {
          int64_t expected = -1;
          bad_problem.compare_exchange_strong(expected, p);
          continue;
        }
        if (want_stats) {
          sum_rounds += st.rounds;
          sum_released += st.released;
          sum_steps += st.steps;
          sum_cold += st.cold;
          sum_auction += st.auction;
          sum_scans += st.scans;
          sum_barriers += team.barriers;
        }
      }
    });
  });
  if (want_stats) {
    std::fprintf(stderr,
                 "linear_assignment_cpu: %lld problems, auction %lld, rounds %lld, released %lld, steps %lld, "
                 "cold %lld, scans %lld, barriers %lld\n",
                 static_cast<long long>(P), sum_auction.load(), sum_rounds.load(), sum_released.load(),
                 sum_steps.load(), sum_cold.load(), sum_scans.load(), sum_barriers.load());
  }
  const int64_t bad = bad_problem.load();
  DETR_CHECK(bad < 0, "cost holds NaN or infinite values among the real targets (problem ", bad,
             " of the flattened [*, B] batch); +inf is allowed only in padded columns t >= num_targets");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(detr_fast, CPU, m) { m.impl("linear_assignment", &linear_assignment_cpu); }

}  // namespace detr_fast
