// A small host emulation of the CUDA execution model, to run tlg's kernel sources unchanged on
// the CPU (tests/test_cuda_kernels.py). Build with g++ -std=c++20 -DTLG_CUDA_EMULATION -pthread.
//
// Model:
//   * A launch creates one host thread per CUDA thread of a block (blockDim.x*y*z threads).
//     The blocks of the grid run one after another on these threads; thread 0 sets blockIdx and
//     fresh shared memory before each block, and every thread finishes a block before the next.
//   * __shared__ variables become function-local statics (one copy, reused block after block);
//     dynamic shared memory is a per-block buffer filled with 0xFF bytes (NaN for floats), so
//     reading shared memory that was never written shows up in the results.
//   * __syncthreads() is a barrier over the block's threads; a thread that returns from the kernel
//     leaves the barrier (as exited threads do on the GPU).
//   * Warps are groups of 32 consecutive threads. __shfl_xor_sync exchanges through a per-warp
//     slot array between two warp barriers: write own value, wait, read the partner's, wait.
//   * atomicAdd is an atomic read-modify-write (std::atomic_ref).
//   * __half and __nv_bfloat16 are 16-bit storage types with the CUDA conversion functions
//     (round to nearest even; half through the compiler's _Float16), enough for kernels that
//     compute in float and only load/store 16-bit values.
// What it does not model: memory-ordering races inside a block without __syncthreads (threads
// truly run concurrently here, so such races may or may not show), timing, occupancy.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// 16-bit floating-point storage types, bit-compatible with CUDA's and torch's.
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return static_cast<float>(f); }
inline __half __float2half(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even on the dropped 16 bits
  return {uint16_t(u >> 16)};
}

namespace tlg_emu {

// Barrier whose party count can shrink (threads leaving) and be reset between blocks. The count
// is kept under a mutex; waiters sleep on the atomic phase (futex), so a release does not make
// every woken thread queue for the mutex again.
class Barrier {
 public:
  void reset(int n) { std::lock_guard<std::mutex> l(m_); expected_ = n; arrived_ = 0; }
  void arrive_and_wait() {
    uint32_t p;
    {
      std::lock_guard<std::mutex> l(m_);
      p = phase_.load(std::memory_order_relaxed);
      if (++arrived_ == expected_) { next_phase(); return; }
    }
    while (phase_.load(std::memory_order_acquire) == p) phase_.wait(p, std::memory_order_acquire);
  }
  void arrive_and_drop() {
    std::lock_guard<std::mutex> l(m_);
    if (--expected_ > 0 && arrived_ == expected_) next_phase();
  }
 private:
  void next_phase() { arrived_ = 0; phase_.fetch_add(1, std::memory_order_release); phase_.notify_all(); }
  std::mutex m_;
  int expected_ = 0, arrived_ = 0;
  std::atomic<uint32_t> phase_{0};
};

struct Warp {
  Barrier bar;
  alignas(8) unsigned char slot[32][8];
};

struct Block {
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
};

inline uint3 g_block_idx;                // same for every thread of the running block
inline dim3 g_block_dim, g_grid_dim;
inline Block* g_block = nullptr;
inline thread_local uint3 t_thread_idx;
inline thread_local int t_lane = 0;
inline thread_local Warp* t_warp = nullptr;

inline void* dynamic_smem() { return g_block->smem.data(); }

inline void syncthreads() { g_block->bar.arrive_and_wait(); }

template <typename T> T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  Warp& w = *t_warp;
  std::memcpy(w.slot[t_lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, w.slot[t_lane ^ lane_mask], sizeof(T));
  w.bar.arrive_and_wait();
  return out;
}

// Run `kernel` (a closure over the kernel and its arguments) for every block of `grid`.
inline void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& kernel) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024 || nthreads % 32 != 0)
    throw std::runtime_error("emulation: block size must be a multiple of 32, at most 1024");
  const int nwarps = nthreads / 32;
  Block blk;
  for (int w = 0; w < nwarps; ++w) blk.warps.push_back(std::make_unique<Warp>());
  g_block = &blk;
  g_block_dim = block;
  g_grid_dim = grid;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::barrier<> pool(nthreads);  // separates blocks

  auto worker = [&](int t) {
    t_thread_idx = {unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / (block.x * block.y))};
    t_lane = t % 32;
    t_warp = blk.warps[t / 32].get();
    for (uint64_t b = 0; b < nblocks; ++b) {
      if (t == 0) {  // set up the block while everyone else waits at `pool`
        g_block_idx = {unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
        blk.smem.assign(smem_bytes + 16, 0xFF);
        blk.bar.reset(nthreads);
        for (auto& w : blk.warps) w->bar.reset(32);
      }
      pool.arrive_and_wait();
      kernel();
      blk.bar.arrive_and_drop();  // this thread has exited the block
      t_warp->bar.arrive_and_drop();
      pool.arrive_and_wait();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (int t = 0; t < nthreads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  g_block = nullptr;
}

}  // namespace tlg_emu

#define threadIdx (::tlg_emu::t_thread_idx)
#define blockIdx (::tlg_emu::g_block_idx)
#define blockDim (::tlg_emu::g_block_dim)
#define gridDim (::tlg_emu::g_grid_dim)

inline void __syncthreads() { tlg_emu::syncthreads(); }
template <typename T> inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  return tlg_emu::shfl_xor(v, lane_mask);
}
template <typename T> inline T atomicAdd(T* addr, T v) { return std::atomic_ref<T>(*addr).fetch_add(v); }
