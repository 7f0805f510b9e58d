// Host emulation of CUDA thread blocks, for running the project's CUDA kernels on a machine without a GPU.
//
// Include this first, then a kernel header (csrc/**/*_kernels.cuh). A launch runs blockDim.x std::threads, which
// run the grid's blocks one after another, so __shared__ arrays become function-level statics. __syncthreads
// is a barrier over the block; a warp shuffle is an exchange through a per-warp buffer between two warp barriers.
// A barrier that is not reached by all of its threads within a timeout (a thread that returned while its warp or
// block went on to a shuffle or __syncthreads: undefined behavior on the device) fails the launch with an error
// instead of hanging. With DETR_EMULATE defined, csrc/common/launch.cuh's launch_kernel calls emu::run_grid.
//
// Not emulated: the device's floating-point modes (--use_fast_math), memory-model races between blocks (blocks are
// sequential), and 2-D / 3-D blocks.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

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

// A barrier over n threads that fails the launch (instead of hanging) when its threads do not all arrive.
class Barrier {
 public:
  explicit Barrier(int n, const char* what) : n_(n), what_(what) {}
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
  explicit Block(int threads) : bar(threads, "__syncthreads"), flags(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<char> flags;
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

// __syncthreads_or
inline bool block_any(bool pred) {
  g_block->flags[threadIdx.x] = pred;
  g_block->bar.arrive_and_wait();
  bool any = false;
  for (char f : g_block->flags) any = any || f;
  g_block->bar.arrive_and_wait();
  return any;
}

// Runs kernel<<<grid, block>>>(args...) on the CPU: block.x threads (a multiple of 32) run the blocks in order,
// meeting at a barrier between blocks.
template <typename... P, typename... A>
void run_grid(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1 || block.x % 32 != 0 || block.x == 0)
    throw std::runtime_error("emulator: only 1-D grids of 1-D blocks of whole warps");
  g_failed = false;
  g_error.clear();
  Block blk(static_cast<int>(block.x));
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
        try {
          kernel(args...);
        } catch (const std::exception& e) {
          fail(e.what());
        }
        next_block.arrive_and_wait();
      }
    });
  for (auto& th : threads) th.join();
  g_block = nullptr;
  if (g_failed) throw std::runtime_error("emulated kernel failed: " + g_error);
}

}  // namespace emu

#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, v, m) emu::shfl_xor(v, m)
#define __shfl_sync(mask, v, src) emu::shfl(v, src)
