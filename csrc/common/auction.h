// Exact linear assignment for one problem: epsilon-scaling auction, then shortest augmenting paths.
// Shared by the CPU kernel (csrc/assignment/assignment_cpu.cpp, one thread per problem) and the CUDA kernel
// (csrc/assignment/assignment_cuda.cu, one thread block per problem): the solver is written once, SPMD style,
// against a small "team" interface (thread id, barrier, warp and block reductions, two atomics). SeqTeam below runs
// it with a team of one thread; BlockTeam in the .cu runs it with a CUDA block. Both execute the same arithmetic.
//
// Problem. n rows (the real targets t < num_targets, n <= Q) and Q columns (the queries), cost c(i, j) = cost[j, i].
// Find an injective map s: rows -> columns minimising sum_i c(i, s(i)). Every row is matched; Q - n columns stay free.
// LP dual (min form): maximise sum_i u_i - sum_j P_j  subject to  u_i - P_j <= c(i, j),  P_j >= 0.
// A matching s is optimal if there are prices P with
//   (F) P_j >= 0 for every column,
//   (T) every row is "tight": c(i, s(i)) + P_s(i) = min_k (c(i, k) + P_k)   (then u_i := that minimum), and
//   (Z) every free column has P_j = 0,
// because then primal cost - dual value = sum_i (c(i, s(i)) + P_s(i) - u_i) + sum_{j free} P_j = 0.
//
// Stage 0 (input check). Min, max and finiteness of the n x Q real costs. Any NaN or +-inf among them: the problem is
// reported invalid (CPU: ValueError; CUDA: assignment -2 in every query slot, see assignment_cuda.cu). Costs are
// read as double; every later step works in double.
//
// Stage 1 (auction, Bertsekas; warm start of square problems n == Q). Forward auction with rows as bidders, columns
// as objects, prices P >= 0 that only rise, epsilon-scaling eps_0 > eps_1 > ... (factor 1/8, from range/4 down to
// range/(4 n Q), never below the double resolution of the costs, so every bid raises a price). Each phase frees
// every row and keeps the prices (columns nobody held in the previous phase restart at 0); a round lets all free
// rows bid at once (Jacobi): row i finds its best column j1 and the best and second best values m1 <= m2 of
// c(i, k) + P_k and bids P_j1 + (m2 - m1) + eps; each column takes its highest bid (lowest row index on equal bids)
// and frees its previous holder. A phase ends when every row holds a column. Equal values are broken by a
// row-dependent rotation of the column order, so identical rows spread over equal columns instead of all bidding for
// the same one. The total number of rounds is capped (kRoundsPerRow * (n + 16)); the cap only leaves more work to
// stage 3. The auction's result is epsilon-optimal, not exact: with float costs there is no epsilon below which
// epsilon-optimal implies optimal. It is used as a warm start of stage 3 that stage 2 certifies row by row.
// Rectangular problems (n < Q) skip it: across scaling phases free columns keep positive prices, which violates (Z),
// and measured on DETR-like, uniform, tied and wide-range costs the certificate below then failed on almost every
// problem, while stage 3 alone needs only 1.0 - 1.4 Dijkstra steps per row there (rows rarely compete).
//
// Stage 2 (what of the warm start is kept). (a) Each held column's price drops by its holder's slack
// c(i, s(i)) + P_s(i) - min_k (c(i, k) + P_k) <= eps (clamped at 0), which makes most holders exactly tight.
// (b) Every row that is still not tight (exact comparison in double) releases its column. (c) If more than half of
// the rows were released, everything is reset (empty matching, P = 0: the cold start). Kept rows are tight (T) and
// prices are >= 0 (F); free columns may have positive prices, which is why stage 3 ends with a certificate.
//
// Stage 3 (shortest augmenting paths, exact; Hungarian / Jonker-Volgenant with implicit row potentials
// u_r = c(r, s(r)) + P_s(r)). For each unmatched row i: Dijkstra over the columns with reduced costs
// c(r, j) + P_j - u_r >= 0 (dist_j = length of the shortest alternating path from i to column j), stopping at the
// first free column j* reached (on equal distances free columns are preferred, then lower indices); then
// P_j += dist_j* - dist_j for every scanned column and the path is flipped. This is the classic invariant-keeping
// step: reduced costs stay >= 0 and matched rows stay tight (T), prices only rise (F), and the only free column that
// is scanned is j*, whose price changes by 0, so free columns keep their prices. Each Dijkstra scans at most Q
// columns and matches one more row: at most n * Q steps. Then every row is matched with (F) and (T), and:
//   - from the cold start, free columns still have price 0: (Z) holds, the matching is optimal;
//   - from a warm start, certificate (Z'): with L = the lowest price of a held column, c(i, j) + L >= u_i for every
//     row i and free column j. Then the prices P' = P - L on held columns, 0 on free ones satisfy (F), (T), (Z):
//     optimal. If (Z') fails, stage 3 is rerun from the cold start (which needs no certificate).
// In floating point this is "exact" in the same sense as scipy.optimize.linear_sum_assignment (the same kind of
// shortest augmenting path in double): the duals certify optimality up to double rounding of the potentials, far
// below the float32 resolution of the costs.
//
// Bounded work on every input: stage 0 O(nQ); stage 1 at most kRoundsPerRow * (n + 16) rounds of O(nQ);
// stage 2 O(nQ); stage 3 at most twice n Dijkstras of at most Q steps of O(Q) each, plus the O(nQ) certificate.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#ifdef __CUDACC__
#define LA_HD __host__ __device__ __forceinline__
#else
#define LA_HD inline
#endif

namespace detr_fast {
namespace la {

using u64 = unsigned long long;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int kBigKey = std::numeric_limits<int>::max();
constexpr int kRoundsPerRow = 24;      // stage 1 round cap: kRoundsPerRow * (n + 16) rounds in all phases together
constexpr double kEpsStart = 0.25;     // first epsilon, as a fraction of the cost range
constexpr double kEpsFactor = 0.125;   // epsilon shrinks by this factor per phase
constexpr double kEpsFinal = 0.25;     // last epsilon: kEpsFinal * range / (n * Q)
constexpr double kResolution = 0x1p-40;  // epsilon never below this times the largest |cost| (bids must move prices)

// Value and key of a candidate; smaller (v, k) wins. Keys break ties deterministically.
struct ArgMin {
  double v;
  int k;
};

LA_HD bool argmin_less(double v1, int k1, double v2, int k2) { return v1 < v2 || (v1 == v2 && k1 < k2); }

LA_HD ArgMin argmin_merge(ArgMin a, ArgMin b) { return argmin_less(b.v, b.k, a.v, a.k) ? b : a; }

// Best (m1 at column j1, tie key k1) and second best value m2 of a set of column values.
struct Top2 {
  double m1;
  int k1;
  int j1;
  double m2;
};

LA_HD Top2 top2_empty() { return Top2{kInf, kBigKey, -1, kInf}; }

LA_HD Top2 top2_push(Top2 t, double v, int k, int j) {
  if (argmin_less(v, k, t.m1, t.k1)) {
    t.m2 = t.m1;
    t.m1 = v;
    t.k1 = k;
    t.j1 = j;
  } else if (v < t.m2) {
    t.m2 = v;
  }
  return t;
}

LA_HD Top2 top2_merge(Top2 a, Top2 b) {
  if (argmin_less(a.m1, a.k1, b.m1, b.k1)) {
    a.m2 = a.m2 < b.m1 ? a.m2 : b.m1;
    return a;
  }
  b.m2 = b.m2 < a.m1 ? b.m2 : a.m1;
  return b;
}

LA_HD bool is_finite(double x) { return x == x && x != kInf && x != -kInf; }

LA_HD double dmin(double a, double b) { return a < b ? a : b; }
LA_HD double dmax(double a, double b) { return a > b ? a : b; }
LA_HD double dabs(double a) { return a < 0 ? -a : a; }

// Bits of a non-negative double, ordered like the doubles themselves (for atomicMax on bids).
LA_HD u64 to_bits(double x) {
#ifdef __CUDA_ARCH__
  return static_cast<u64>(__double_as_longlong(x));
#else
  u64 b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

LA_HD double from_bits(u64 b) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double(static_cast<long long>(b));
#else
  double x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

// c(i, j) as double, read from a strided array: row i (target) stride si, column j (query) stride sj.
template <typename scalar_t>
struct CostView {
  const scalar_t* p;
  int64_t si;
  int64_t sj;
  LA_HD double operator()(int i, int j) const { return static_cast<double>(p[i * si + j * sj]); }
};

// Per-problem scratch, Q entries each (n <= Q).
struct Workspace {
  double* price;      // P_j
  double* dist;       // stage 3 distances
  u64* bid;           // stage 1: highest bid on column j this round (bits), 0 = none
  int* bidder;        // stage 1: lowest row index among the highest bidders on column j
  int* owner;         // row holding column j, -1 when free
  int* row_col;       // column held by row i, -1 when unmatched
  int* bid_col;       // stage 1: column row i bids on; stage 2: release flag
  u64* bid_val;       // stage 1: row i's bid (bits)
  int* pred;          // stage 3: row from which column j was reached
  unsigned char* scanned;  // stage 3
};

// Counters for tuning and tests (which stage did how much work).
struct Stats {
  int rounds = 0;    // stage 1 bidding rounds
  int released = 0;  // rows left for stage 3
  int steps = 0;     // stage 3 Dijkstra steps
  bool cold = false; // certificate (Z') failed: stage 3 ran again from the cold start
};

// A team of one thread (the CPU kernel). The CUDA BlockTeam has the same members.
struct SeqTeam {
  LA_HD int tid() const { return 0; }
  LA_HD int nthreads() const { return 1; }
  LA_HD int warp() const { return 0; }
  LA_HD int nwarps() const { return 1; }
  LA_HD int lane() const { return 0; }
  LA_HD int warp_size() const { return 1; }
  LA_HD void sync() {}
  LA_HD bool any(bool p) { return p; }
  LA_HD Top2 warp_top2(Top2 t) { return t; }
  LA_HD double warp_min(double v) { return v; }
  LA_HD ArgMin argmin(ArgMin a) { return a; }
  LA_HD void atomic_max(u64* p, u64 v) {
    if (v > *p) *p = v;
  }
  LA_HD void atomic_min(int* p, int v) {
    if (v < *p) *p = v;
  }
};

template <class Team>
LA_HD double team_min(Team& tm, double v) {
  return tm.argmin(ArgMin{v, 0}).v;
}

template <class Team>
LA_HD double team_max(Team& tm, double v) {
  return -tm.argmin(ArgMin{-v, 0}).v;
}

// Empty matching, all prices 0: the cold start of stage 3, which satisfies (F), (T), (Z) trivially.
template <class Team>
LA_HD void reset_cold(Team& tm, int n, int Q, const Workspace& w) {
  for (int j = tm.tid(); j < Q; j += tm.nthreads()) {
    w.price[j] = 0.0;
    w.owner[j] = -1;
  }
  for (int i = tm.tid(); i < n; i += tm.nthreads()) w.row_col[i] = -1;
  tm.sync();
}

// Stage 3: a shortest augmenting path (Dijkstra on reduced costs, implicit row potentials) for every unmatched row.
template <class Team, class Cost>
LA_HD void augment_all(Team& tm, const Cost& c, int n, int Q, const Workspace& w, int* released, int* steps) {
  const int tid = tm.tid(), nt = tm.nthreads();
  for (int i = 0; i < n; ++i) {
    if (w.row_col[i] >= 0) continue;  // uniform: row_col is only written between barriers
    ++*released;
    ArgMin best{kInf, kBigKey};
    for (int j = tid; j < Q; j += nt) {
      const double d = c(i, j) + w.price[j];
      w.dist[j] = d;
      w.pred[j] = i;
      w.scanned[j] = 0;
      best = argmin_merge(best, ArgMin{d, w.owner[j] >= 0 ? j + Q : j});
    }
    double dlast;
    int jstar;
    while (true) {
      ++*steps;
      const ArgMin m = tm.argmin(best);  // barrier: dist, pred, owner of this step are settled
      dlast = m.v;
      jstar = m.k >= Q ? m.k - Q : m.k;
      if (jstar % nt == tid) w.scanned[jstar] = 1;  // only the thread that owns column jstar reads its flag
      const int r = w.owner[jstar];
      if (r < 0) break;
      const double ur = c(r, jstar) + w.price[jstar];
      best = ArgMin{kInf, kBigKey};
      for (int j = tid; j < Q; j += nt) {
        if (w.scanned[j]) continue;
        const double nd = dlast + (c(r, j) + w.price[j] - ur);
        if (nd < w.dist[j]) {
          w.dist[j] = nd;
          w.pred[j] = r;
        }
        best = argmin_merge(best, ArgMin{w.dist[j], w.owner[j] >= 0 ? j + Q : j});
      }
    }
    for (int j = tid; j < Q; j += nt) {
      if (w.scanned[j]) w.price[j] += dlast - w.dist[j];
    }
    tm.sync();
    if (tid == 0) {  // flip the alternating path ending at jstar
      int j = jstar;
      while (true) {
        const int r = w.pred[j];
        const int next = w.row_col[r];
        w.owner[j] = r;
        w.row_col[r] = j;
        if (r == i) break;
        j = next;
      }
    }
    tm.sync();
  }

}

// Solves one problem and writes out[j] = row matched to column j or -1 (every entry -2 for invalid input).
// Returns 0, or 1 when a real cost is NaN or infinite. Every thread of the team calls it.
template <class Team, class Cost>
LA_HD int solve(Team& tm, const Cost& c, int n, int Q, const Workspace& w, int64_t* out, Stats* stats) {
  const int tid = tm.tid(), nt = tm.nthreads();
  const int warp = tm.warp(), nw = tm.nwarps(), lane = tm.lane(), ws = tm.warp_size();

  // ---- Stage 0: range and finiteness of the real costs.
  double lo = kInf, hi = -kInf;
  bool bad = false;
  for (int idx = tid; idx < n * Q; idx += nt) {
    const double x = c(idx / Q, idx % Q);
    bad |= !is_finite(x);
    lo = dmin(lo, x);
    hi = dmax(hi, x);
  }
  bad = tm.any(bad);
  if (bad) {
    for (int j = tid; j < Q; j += nt) out[j] = -2;
    return 1;
  }
  lo = team_min(tm, lo);
  hi = team_max(tm, hi);

  // ---- Stage 1: epsilon-scaling auction.
  const double range = hi - lo;
  const double floor_eps = dmax(dmax(dabs(hi), dabs(lo)) * kResolution, 1e-300);
  double eps = range > 0 ? range * kEpsStart : 1.0;
  const double eps_final = dmax(range > 0 ? kEpsFinal * range / (double(n) * double(Q)) : 1.0, floor_eps);
  eps = dmax(eps, eps_final);
  for (int j = tid; j < Q; j += nt) {
    w.price[j] = 0.0;
    w.owner[j] = -1;
    w.bid[j] = 0;
    w.bidder[j] = kBigKey;
  }
  for (int i = tid; i < n; i += nt) w.row_col[i] = -1;
  tm.sync();
  const int max_rounds = kRoundsPerRow * (n + 16);
  int rounds = 0;
  // Square problems only (see the header comment): with free columns the warm start rarely passes (Z').
  bool capped = n < Q;
  while (!capped) {
    for (int j = tid; j < Q; j += nt) {  // columns nobody held in the last phase restart from price 0
      if (w.owner[j] < 0) w.price[j] = 0.0;
      w.owner[j] = -1;
    }
    for (int i = tid; i < n; i += nt) w.row_col[i] = -1;
    tm.sync();
    while (true) {
      // Bids of the free rows (one warp per row, lanes over columns).
      bool any_free = false;
      for (int i = warp; i < n; i += nw) {
        if (w.row_col[i] >= 0) continue;
        any_free = true;
        Top2 t = top2_empty();
        for (int j = lane; j < Q; j += ws) {
          const int rot = j - i % Q;
          t = top2_push(t, c(i, j) + w.price[j], rot < 0 ? rot + Q : rot, j);
        }
        t = tm.warp_top2(t);
        if (lane == 0) {
          const double incr = (t.m2 < kInf ? t.m2 - t.m1 : 0.0) + eps;
          const u64 b = to_bits(w.price[t.j1] + incr);
          w.bid_col[i] = t.j1;
          w.bid_val[i] = b;
          tm.atomic_max(&w.bid[t.j1], b);
        }
      }
      any_free = tm.any(any_free);  // also the barrier after the bids
      if (!any_free) break;
      if (++rounds > max_rounds) {
        capped = true;
        for (int j = tid; j < Q; j += nt) {  // drop this round's bids
          w.bid[j] = 0;
          w.bidder[j] = kBigKey;
        }
        tm.sync();
        break;
      }
      for (int i = tid; i < n; i += nt) {
        if (w.row_col[i] < 0 && w.bid[w.bid_col[i]] == w.bid_val[i]) tm.atomic_min(&w.bidder[w.bid_col[i]], i);
      }
      tm.sync();
      for (int j = tid; j < Q; j += nt) {
        if (w.bid[j] == 0) continue;
        const int winner = w.bidder[j], prev = w.owner[j];
        if (prev >= 0) w.row_col[prev] = -1;  // prev held j, so it did not bid: no other thread writes it
        w.owner[j] = winner;
        w.row_col[winner] = j;
        w.price[j] = from_bits(w.bid[j]);
        w.bid[j] = 0;
        w.bidder[j] = kBigKey;
      }
      tm.sync();
    }
    if (eps <= eps_final) break;
    eps = dmax(eps * kEpsFactor, eps_final);
  }

  // ---- Stage 2: keep the tight part of the auction's matching.
  // (a) Lower each held column's price by its holder's slack (at most eps), which makes most holders exactly tight.
  for (int i = warp; i < n; i += nw) {
    const int s = w.row_col[i];
    if (s < 0) continue;
    double m = kInf;
    for (int j = lane; j < Q; j += ws) m = dmin(m, c(i, j) + w.price[j]);
    m = tm.warp_min(m);
    if (lane == 0) w.dist[i] = c(i, s) + w.price[s] - m;
  }
  tm.sync();
  for (int i = tid; i < n; i += nt) {
    const int s = w.row_col[i];
    if (s >= 0) w.price[s] = dmax(w.price[s] - w.dist[i], 0.0);
  }
  tm.sync();
  // (b) Release every row that is not tight (exact comparison in double).
  for (int i = warp; i < n; i += nw) {
    const int s = w.row_col[i];
    if (s < 0) continue;
    double m = kInf;
    for (int j = lane; j < Q; j += ws) m = dmin(m, c(i, j) + w.price[j]);
    m = tm.warp_min(m);
    if (lane == 0) w.bid_col[i] = (c(i, s) + w.price[s] > m) ? 1 : 0;
  }
  tm.sync();
  for (int i = tid; i < n; i += nt) {
    const int s = w.row_col[i];
    if (s >= 0 && w.bid_col[i]) {
      w.owner[s] = -1;
      w.row_col[i] = -1;
    }
  }
  tm.sync();
  // (c) A warm start that keeps fewer than half of the rows costs more Dijkstra steps than it saves: start cold.
  int unmatched = 0;
  for (int i = 0; i < n; ++i) unmatched += w.row_col[i] < 0;  // same count in every thread
  const bool warm = 2 * unmatched <= n;
  if (!warm) reset_cold(tm, n, Q, w);

  // ---- Stage 3: shortest augmenting paths; then the check of (Z'), with a cold restart when it fails.
  int released = 0, steps = 0;
  augment_all(tm, c, n, Q, w, &released, &steps);
  // Certificate (Z'): with L = the lowest price of a held column, every free column priced at L keeps every row
  // tight, i.e. c(i, j) + L >= u_i = c(i, s(i)) + P_s(i) for free j. Then prices P - L (free columns 0) prove
  // optimality. (Square problems have no free column.)
  double min_held = kInf;
  for (int j = warm ? tid : Q; j < Q; j += nt) {
    if (w.owner[j] >= 0) min_held = dmin(min_held, w.price[j]);
  }
  min_held = team_min(tm, min_held);
  bool violated = false;
  for (int i = warm ? warp : n; i < n; i += nw) {  // the cold start needs no certificate
    const int s = w.row_col[i];
    const double u = c(i, s) + w.price[s];
    for (int j = lane; j < Q; j += ws) {
      if (w.owner[j] < 0 && c(i, j) + min_held < u) violated = true;
    }
  }
  const bool cold = tm.any(violated);
  if (cold) {
    reset_cold(tm, n, Q, w);
    augment_all(tm, c, n, Q, w, &released, &steps);
  }

  for (int j = tid; j < Q; j += nt) out[j] = w.owner[j];
  if (stats != nullptr && tid == 0) {
    stats->rounds = rounds;
    stats->released = released;
    stats->steps = steps;
    stats->cold = cold;
  }
  return 0;
}

}  // namespace la
}  // namespace detr_fast
