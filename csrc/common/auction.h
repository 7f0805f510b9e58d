// Exact linear assignment for one problem: an auction warm start, then shortest augmenting paths.
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
// Stage 1 (auction, Bertsekas; the warm start). Forward auction with rows as bidders, columns as objects, prices
// P >= 0 that only rise. A round lets all free rows bid at once (Jacobi): row i finds its best column j1 and the best
// and second best values m1 <= m2 of c(i, k) + P_k and bids P_j1 + (m2 - m1) + eps; each column takes its highest
// bid (lowest row index on equal bids) and frees its previous holder. Equal values are broken by a row-dependent
// rotation of the column order, so identical rows spread over equal columns. The total number of rounds is capped
// (kRoundsPerRow * (n + 16)); the cap only leaves more work to stage 3. The result is epsilon-optimal, not exact
// (with float costs no epsilon makes epsilon-optimal imply optimal): it is a warm start that stage 2 trims to a
// partial matching satisfying (F), (T), (Z) exactly.
//   - Rectangular (n < Q): ONE phase from P = 0 with eps = range / (4 n Q) (no epsilon-scaling). This is the
//     asymmetric forward auction in its simplest correct form: a column keeps price 0 until it first receives a bid,
//     and from then on it is held by some row for the rest of the phase (forward auction never frees an object,
//     only changes its holder). So at the end every free column has price 0, the lowest possible price: (Z) holds
//     for the auction's own result. Epsilon-scaling breaks exactly this (a column held in phase k and not in phase
//     k + 1 keeps its positive price; measured: the warm start then lost more than half of its rows on every DETR
//     shape), which is why Bertsekas and Castanon add reverse (price-lowering) iterations. Padding to square with
//     Q - n identical dummy rows of cost 0 is also correct (a dummy adds 0 whichever column it takes), but its
//     Q - n identical bidders all want the same cheapest column after each phase restart: about one dummy seated
//     per Jacobi round, Q - n rounds per phase, on Q persons instead of n. DETR's rows rarely compete (30 targets
//     among 100 queries), so one phase without scaling ends in a few rounds (numbers below); where rows do compete
//     the round cap bounds the work and stage 3 finishes exactly.
//   - Square (n == Q, only when forced, see "Engine choice"): epsilon-scaling eps_0 > eps_1 > ... (factor 1/8, from
//     range/4 down to range/(4 n Q), never below the double resolution of the costs, so every bid raises a price).
//     Each phase frees every row and keeps the prices (columns nobody held in the previous phase restart at 0). A
//     square problem has no free column at the end, so (Z) is empty there.
//
// Stage 2 (what of the warm start is kept). (a) Each held column's price drops by its holder's slack
// c(i, s(i)) + P_s(i) - min_k (c(i, k) + P_k) <= eps (clamped at 0), which makes most holders exactly tight.
// (b) Rectangular: every free column gets price 0 (already so after a complete auction; after the round cap it may
// not be). (c) Every row that is not tight (exact comparison in double) releases its column; rectangular: the
// released column drops to price 0 (Z). Lowering a price can untighten other rows, so (c) repeats until it releases
// nobody (at most n + 1 passes). Kept rows are then tight (T), prices are >= 0 (F), and in a rectangular problem
// every free column has price 0 (Z): a valid start for stage 3. (d) If more than half of the rows were released,
// everything is reset (empty matching, P = 0: the cold start).
//
// Stage 3 (shortest augmenting paths, exact; Hungarian / Jonker-Volgenant with implicit row potentials
// u_r = c(r, s(r)) + P_s(r)). For each unmatched row i: Dijkstra over the columns with reduced costs
// c(r, j) + P_j - u_r >= 0 (dist_j = length of the shortest alternating path from i to column j), stopping at the
// first free column j* reached (on equal distances free columns are preferred, then lower indices); then
// P_j += dist_j* - dist_j for every scanned column and the path is flipped. This is the classic invariant-keeping
// step: reduced costs stay >= 0 and matched rows stay tight (T), prices only rise (F), and the only free column that
// is scanned is j*, whose price changes by 0, so free columns keep their prices. Each Dijkstra scans at most Q
// columns and matches one more row: at most n * Q steps. Then every row is matched with (F) and (T), and:
//   - free columns still have price 0 (from the cold start, and from stage 2's warm start, which satisfies (Z)
//     exactly): (Z) holds, the matching is optimal;
//   - the warm start is nevertheless checked once more at the end, against rounding in the price updates, with the
//     certificate (Z'): with L = the lowest price of a held column, c(i, j) + L >= u_i for every row i and free
//     column j. Then the prices P' = P - L on held columns, 0 on free ones satisfy (F), (T), (Z): optimal. (Z') holds
//     whenever (Z) does (L >= 0); if it ever fails, stage 3 is rerun from the cold start, which needs no certificate.
//     It failed on none of the problems measured below.
// In floating point this is "exact" in the same sense as scipy.optimize.linear_sum_assignment (the same kind of
// shortest augmenting path in double): the duals certify optimality up to double rounding of the potentials, far
// below the float32 resolution of the costs.
//
// Bounded work on every input: stage 0 O(nQ); stage 1 at most kRoundsPerRow * (n + 16) rounds of O(nQ);
// stage 2 at most n + 2 passes of O(nQ); stage 3 at most twice n Dijkstras of at most Q steps of O(Q) each, plus the
// O(nQ) certificate.
//
// Engine choice (la::Engine; DETR_FAST_LA_ENGINE=auto|auction|ssp selects it for tests and tuning). Both engines
// return an optimal assignment; they differ only in work. Measured on the CPU with the work counters
// (DETR_FAST_LA_STATS=1; benchmarks/RESULTS.md has the full table), per problem, B = 64, every problem full (n = T):
// rounds = bidding rounds, steps = Dijkstra steps, scans = row scans (the total work, in units of Q operations),
// barriers = team barriers, i.e. the sequential depth of one CUDA block (every round, step and check is one to three
// barriers; a barrier interval of the auction holds a few row scans per warp, one of stage 3 a Q / blockDim slice).
// Certificate failures: 0 everywhere.
//                          cold SSP (ssp)                 auction warm start (auction)
//   costs  Q    n    steps  scans  barriers      rounds  steps  scans  barriers
//   detr   100  7     7.3   14.3    28.3           1.3    0.1   36.2    15.5
//   detr   100  30   37.1   67.1   104.1           3.8    3.7  198.8    34.2
//   detr   100  50   78.3  128.3   185.3           8.9   25.8  456.2   103.0
//   detr   100  70  158.8  228.8   305.8          28.1  142.0  764.3   374.4
//   detr   100  100 881.2  981.2  1088.2         363.5   62.3 2257.0  1218.3   (square: epsilon-scaling)
//   detr   300  7     7.1   14.1    28.1           1.1    0.0   35.3    14.4
//   detr   300  30   32.0   62.0    99.0           1.9    0.6  166.2    19.4
//   detr   300  100 130.4  230.4   337.4           5.9   20.4  852.7    82.9
//   ties   100  100 112.3  212.3   319.3         627.0   26.8 4709.0  1972.1
//   wide   100  100 794.8  894.8  1001.8        1181.3  794.8 10024.4 4562.8   (warm start lost: cold)
//   detr   100  1     1.0    2.0    10.0           1.0    0.0    5.0    14.0
//   detr   100  4     4.1    8.1    19.1           1.1    0.0   20.2    14.3
// The auction always does more total work (scans: 2.5 - 3.7x for n <= Q / 2, up to 22x on square tied costs; it reads
// every row at least three times: bid, stage 2, certificate), but on the GPU the rows of a round are read in parallel
// and what counts is the sequential depth: for 4 <= n <= Q / 2 it needs fewer barriers than cold SSP on DETR, uniform,
// tied and wide-range costs: 1.3x at n = 4, 1.8x at n = 7, 2 - 5x at n = 30 (13x for tied costs, 300 x 100), 1.1 - 2x
// at n = Q / 2; above about 0.6 Q rows compete, the warm start loses most rows and cold SSP needs fewer barriers; for
// square problems cold SSP needs fewer barriers on every family measured (the epsilon-scaled Jacobi auction ends in a
// long tail of rounds with one or two bidders). So kAuto runs the auction for 4 <= n <= Q / 2, which covers DETR's real
// shapes (7 or 30 targets among 100 or 300 queries), and cold SSP otherwise.
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

// Which stage-1 engine runs (see the header comment): kAuto picks by shape, kAuction always runs the auction as the
// warm start, kSsp never does (cold shortest augmenting paths). All three return an optimal assignment.
enum Engine : int { kAuto = 0, kAuction = 1, kSsp = 2 };
constexpr int kAuctionMinRows = 4;  // kAuto runs the auction for 4 <= n <= Q / 2 (measured crossovers, see above)

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
  int rounds = 0;     // stage 1 bidding rounds
  int released = 0;   // rows left for stage 3
  int steps = 0;      // stage 3 Dijkstra steps
  bool cold = false;  // certificate (Z') failed: stage 3 ran again from the cold start
  bool auction = false;  // stage 1 ran
  long long scans = 0;   // row scans (one row's Q costs read once): the total work, in units of Q operations
  long long barriers = 0;  // team barriers (SeqTeam counts them): the sequential depth of the CUDA block
};

// A team of one thread (the CPU kernel). The CUDA BlockTeam has the same members.
struct SeqTeam {
  long long barriers = 0;  // what a CUDA block would synchronize (sync, any and argmin each hold one barrier)
  LA_HD int tid() const { return 0; }
  LA_HD int nthreads() const { return 1; }
  LA_HD int warp() const { return 0; }
  LA_HD int nwarps() const { return 1; }
  LA_HD int lane() const { return 0; }
  LA_HD int warp_size() const { return 1; }
  LA_HD void sync() { ++barriers; }
  LA_HD bool any(bool p) {
    ++barriers;
    return p;
  }
  LA_HD Top2 warp_top2(Top2 t) { return t; }
  LA_HD double warp_min(double v) { return v; }
  LA_HD ArgMin argmin(ArgMin a) {
    ++barriers;
    return a;
  }
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

// kAuto's choice of stage-1 engine for an n x Q problem (the measurements behind it are in the header comment).
LA_HD bool use_auction(int n, int Q) { return n >= kAuctionMinRows && 2 * n <= Q; }

// Solves one problem and writes out[j] = row matched to column j or -1 (every entry -2 for invalid input).
// Returns 0, or 1 when a real cost is NaN or infinite. Every thread of the team calls it.
template <class Team, class Cost>
LA_HD int solve(Team& tm, const Cost& c, int n, int Q, const Workspace& w, int64_t* out, Stats* stats,
                int engine = kAuto) {
  const int tid = tm.tid(), nt = tm.nthreads();
  long long scans = n;  // work counter (stats only): stage 0 reads every row once
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
  const bool run_auction = engine == kAuction || (engine == kAuto && use_auction(n, Q));
  const bool rect = n < Q;
  if (rect) eps = eps_final;  // rectangular: one phase from zero prices, so that free columns keep price 0 (Z)
  bool capped = !run_auction;
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
        ++scans;
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

  // ---- Stage 2: keep the part of the auction's matching that satisfies (F), (T), (Z) exactly.
  if (run_auction) {
    // min_j c(i, j) + price[j] over row i, reduced across the warp (every lane gets it); counts one scan
    auto row_min = [&](int i) {
      double m = kInf;
      for (int j = lane; j < Q; j += ws) m = dmin(m, c(i, j) + w.price[j]);
      ++scans;
      return tm.warp_min(m);
    };
    // (a) Lower each held column's price by its holder's slack (at most eps), which makes most holders tight.
    for (int i = warp; i < n; i += nw) {
      const int s = w.row_col[i];
      if (s < 0) continue;
      const double m = row_min(i);
      if (lane == 0) w.dist[i] = c(i, s) + w.price[s] - m;
    }
    tm.sync();
    for (int i = tid; i < n; i += nt) {
      const int s = w.row_col[i];
      if (s >= 0) w.price[s] = dmax(w.price[s] - w.dist[i], 0.0);
    }
    // (b) Every free column to price 0 (Z). Raising a price never breaks (T); lowering one can, hence (c).
    for (int j = tid; j < Q; j += nt) {
      if (w.owner[j] < 0 && rect) w.price[j] = 0.0;
    }
    tm.sync();
    // (c) Release every row that is not tight (exact comparison in double); its column becomes free at price 0,
    // which can untighten other rows: repeat until no row is released (at most n + 1 passes).
    while (true) {
      bool any_released = false;
      for (int i = warp; i < n; i += nw) {
        const int s = w.row_col[i];
        if (s < 0) continue;
        const bool loose = c(i, s) + w.price[s] > row_min(i);
        any_released |= loose;
        if (lane == 0) w.bid_col[i] = loose ? 1 : 0;
      }
      if (!tm.any(any_released)) break;  // also the barrier after the flags
      for (int i = tid; i < n; i += nt) {
        const int s = w.row_col[i];
        if (s >= 0 && w.bid_col[i]) {
          w.owner[s] = -1;
          if (rect) w.price[s] = 0.0;
          w.row_col[i] = -1;
        }
      }
      tm.sync();
    }
  }
  // (d) A warm start that keeps fewer than half of the rows costs more Dijkstra steps than it saves: start cold.
  int unmatched = 0;
  for (int i = 0; i < n; ++i) unmatched += w.row_col[i] < 0;  // same count in every thread
  const bool warm = run_auction && 2 * unmatched <= n;
  if (!warm) {
    tm.sync();  // every thread has counted before any of them clears row_col
    reset_cold(tm, n, Q, w);
  }

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
    ++scans;
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
    stats->auction = run_auction;
    stats->scans = scans + steps;  // each Dijkstra step reads one row
  }
  return 0;
}

}  // namespace la
}  // namespace detr_fast
