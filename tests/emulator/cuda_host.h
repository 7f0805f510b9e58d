// Host emulation of CUDA thread blocks, for running the project's CUDA kernels on a machine without a GPU.
//
// Include this first, then a kernel header (csrc/**/*_kernels.cuh). A launch runs the grid's blocks one after
// another, so __shared__ arrays become function-level statics and dynamic shared memory is one buffer. Each thread
// of a block is
//  - by default, a fiber (its own stack, switched with _setjmp/_longjmp on one OS thread): a thread runs until it
//    reaches a barrier, then the next one runs, so a block's threads interleave only at barriers, deterministically.
//    A barrier that some thread can never reach (a thread returned while its warp or block went on to a shuffle or
//    __syncthreads: undefined behavior on the device) is detected when no thread can run, and fails the launch;
//  - with DETR_EMULATE_OS_THREADS, an OS thread, barriers being a mutex and condition variable, for running under
//    ThreadSanitizer (race_check.py), which then reports any access pair not ordered by a barrier or an atomic. A
//    barrier not reached by all its threads within 20 s fails the launch.
// __syncthreads and __syncthreads_or are barriers over the block; a warp shuffle is an exchange through a per-warp
// buffer between two warp barriers; atomics go through std::atomic_ref. With DETR_EMULATE defined,
// csrc/common/launch.cuh's launch_kernel calls emu::run_grid.
//
// Not emulated: the device's floating-point modes (--use_fast_math), memory-model races between blocks (blocks are
// sequential), and 2-D / 3-D blocks.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csetjmp>
#include <functional>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#ifndef DETR_EMULATE_OS_THREADS
#include <ucontext.h>
#endif

#define DETR_EMULATE 1
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

inline thread_local uint3 emu_thread_idx, emu_block_idx;
inline thread_local dim3 emu_block_dim, emu_grid_dim;
#define threadIdx emu_thread_idx
#define blockIdx emu_block_idx
#define blockDim emu_block_dim
#define gridDim emu_grid_dim

using std::max;
using std::min;

namespace emu {

inline std::atomic<bool> g_failed{false};
inline std::mutex g_error_mutex;
inline std::string g_error;

inline void fail(const std::string& msg) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  if (!g_failed.exchange(true)) g_error = msg;
}

#ifndef DETR_EMULATE_OS_THREADS
// ---- Fibers ----------------------------------------------------------------------------------------------------
struct Fiber {
  ucontext_t start;  // first entry
  jmp_buf resume;    // where it yielded
  std::unique_ptr<char[]> stack;
  unsigned tid = 0;
  bool started = false, done = false;
};

inline Fiber* g_current = nullptr;
inline jmp_buf g_scheduler;
inline uint64_t g_progress = 0;  // arrivals at barriers and finished threads: what makes another thread runnable
inline void (*g_body)() = nullptr;  // the kernel call of the launch, with its arguments bound

// The running fiber gives the OS thread back to the scheduler; returns when the scheduler resumes it.
inline void yield() {
  if (!_setjmp(g_current->resume)) _longjmp(g_scheduler, 1);
}

inline void fiber_entry() {
  g_body();
  g_current->done = true;
  ++g_progress;
  _longjmp(g_scheduler, 1);
}
#endif

// A barrier over n threads; fails the launch (instead of hanging) when its threads cannot all arrive.
class Barrier {
 public:
  explicit Barrier(int n, const char* what) : n_(n), what_(what) {}
#ifndef DETR_EMULATE_OS_THREADS
  void arrive_and_wait() {
    if (g_failed) return;
    const uint64_t gen = gen_;
    ++g_progress;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      return;
    }
    while (gen_ == gen && !g_failed) yield();
  }
  const char* what() const { return what_; }

 private:
#else
  void arrive_and_wait() {
    if (g_failed) return;
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    // polls, so that the threads of a failed launch leave promptly
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return gen_ != gen || g_failed.load(); })) {
      if (std::chrono::steady_clock::now() > deadline) {
        fail(std::string("emulated ") + what_ + " timed out: not every thread reached it (divergent " + what_ + ")");
        return;
      }
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
#endif
  int n_, count_ = 0;
  uint64_t gen_ = 0;
  const char* what_;
};

struct Warp {
  Barrier bar{32, "warp shuffle"};
  uint64_t slot[32];
  uint32_t a[32][4];  // mma fragments (attention emulator)
  uint32_t b[32][2];
};

struct Block {
  Block(int threads, size_t smem_bytes)
      : bar(threads, "__syncthreads"), flags(threads), smem((smem_bytes + 15) / 16 + 1) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
    std::memset(smem.data(), 0xA5, smem.size() * 16);  // not zero: the device gives no initial value either
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<char> flags;
  std::vector<uint4> smem;  // dynamic shared memory, 16-byte aligned
};
inline Block* g_block = nullptr;

inline Warp& warp() { return *g_block->warps[threadIdx.x / 32]; }
inline int lane() { return static_cast<int>(threadIdx.x % 32); }

// __shfl_sync(full mask, v, src): lane src's v. Values of up to 8 bytes.
template <typename T>
T shfl(T v, int src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a value over 8 bytes");
  Warp& w = warp();
  std::memcpy(&w.slot[lane()], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &w.slot[src & 31], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}

template <typename T>
T shfl_xor(T v, int lane_mask) {
  return shfl(v, lane() ^ lane_mask);
}

inline void syncthreads() { g_block->bar.arrive_and_wait(); }

inline unsigned char* dynamic_smem() { return reinterpret_cast<unsigned char*>(g_block->smem.data()); }

// __syncthreads_or
inline bool block_any(bool pred) {
  g_block->flags[threadIdx.x] = pred;
  g_block->bar.arrive_and_wait();
  bool any = false;
  for (char f : g_block->flags) any = any || f;
  g_block->bar.arrive_and_wait();
  return any;
}

inline void check_launch(dim3 grid, dim3 block) {
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1 || block.x % 32 != 0 || block.x == 0)
    throw std::runtime_error("emulator: only 1-D grids of 1-D blocks of whole warps");
  g_failed = false;
  g_error.clear();
}

inline void run_kernel_body(const std::function<void()>& body) {
  try {
    body();
  } catch (const std::exception& e) {
    fail(e.what());
  }
}

#ifndef DETR_EMULATE_OS_THREADS
// Runs kernel<<<grid, block, smem_bytes>>>(args...) on the CPU: for each block, block.x fibers scheduled round-robin
// at their barriers.
template <typename... P, typename... A>
void run_grid(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A... args) {
  check_launch(grid, block);
  constexpr size_t kStack = 256 * 1024;
  Block blk(static_cast<int>(block.x), smem_bytes);
  g_block = &blk;
  std::vector<Fiber> fibers(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    fibers[t].stack.reset(new char[kStack]);
    fibers[t].tid = t;
  }
  static thread_local std::function<void()> body;
  body = [&] { run_kernel_body([&] { kernel(args...); }); };
  g_body = [] { body(); };
  emu_block_dim = block;
  emu_grid_dim = grid;
  for (unsigned b = 0; b < grid.x && !g_failed; ++b) {
    emu_block_idx = make_uint3(b, 0, 0);
    for (Fiber& f : fibers) {
      getcontext(&f.start);
      f.start.uc_stack.ss_sp = f.stack.get();
      f.start.uc_stack.ss_size = kStack;
      f.start.uc_link = nullptr;
      makecontext(&f.start, fiber_entry, 0);
      f.started = f.done = false;
    }
    size_t remaining = fibers.size();
    while (remaining > 0) {
      const uint64_t before = g_progress;
      for (Fiber& f : fibers) {
        if (f.done) continue;
        g_current = &f;
        emu_thread_idx = make_uint3(f.tid, 0, 0);
        if (!_setjmp(g_scheduler)) {
          if (!f.started) {
            f.started = true;
            setcontext(&f.start);
          }
          _longjmp(f.resume, 1);
        }
        if (f.done) --remaining;
      }
      if (remaining > 0 && g_progress == before && !g_failed) {
        // every unfinished thread waits at a barrier that can no longer fill: release them as failed
        fail("emulated barrier can never complete: some threads of block " + std::to_string(b) +
             " returned or took another path while the others wait (divergent __syncthreads or warp shuffle)");
      }
    }
  }
  g_current = nullptr;
  g_block = nullptr;
  if (g_failed) throw std::runtime_error("emulated kernel failed: " + g_error);
}
#else
// Runs kernel<<<grid, block, smem_bytes>>>(args...) on the CPU: block.x OS threads run the blocks in order, meeting
// at a barrier between blocks.
template <typename... P, typename... A>
void run_grid(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A... args) {
  check_launch(grid, block);
  Block blk(static_cast<int>(block.x), smem_bytes);
  Barrier next_block(static_cast<int>(block.x), "end of block");
  g_block = &blk;
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t)
    threads.emplace_back([&, t] {
      emu_thread_idx = make_uint3(t, 0, 0);
      emu_block_dim = block;
      emu_grid_dim = grid;
      for (unsigned b = 0; b < grid.x && !g_failed; ++b) {
        emu_block_idx = make_uint3(b, 0, 0);
        run_kernel_body([&] { kernel(args...); });
        next_block.arrive_and_wait();
      }
    });
  for (auto& th : threads) th.join();
  g_block = nullptr;
  if (g_failed) throw std::runtime_error("emulated kernel failed: " + g_error);
}
#endif

}  // namespace emu

// Device atomics: through std::atomic_ref (which the thread sanitizer also understands).
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

inline int atomicMin(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int old = a.load();
  while (old > v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

#define __syncthreads() emu::syncthreads()
#define __syncthreads_or(pred) static_cast<int>(emu::block_any((pred) != 0))
#define __shfl_xor_sync(mask, v, m) emu::shfl_xor(v, m)
#define __shfl_sync(mask, v, src) emu::shfl(v, src)
