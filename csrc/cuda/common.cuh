// Shared helpers of tlg's CUDA kernels. No torch headers: kernels see raw pointers and sizes.
//
// The same source also compiles with a host C++ compiler when TLG_CUDA_EMULATION is defined;
// then emulation/cuda_emu.h supplies threadIdx, __syncthreads, warp shuffles, the 16-bit types
// and the launch (see that file).
#pragma once

#include <cstdint>
#include <cmath>
#include <utility>

#ifdef TLG_CUDA_EMULATION
#include "emulation/cuda_emu.h"
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#include "tlg_cuda.h"

namespace tlg_cuda {

constexpr int kWarp = 32;

// Block sizes. The emulation may build with smaller ones (fewer host threads); every kernel
// is written for any multiple of 32 up to 1024.
#ifndef TLG_CUDA_BLOCK
#define TLG_CUDA_BLOCK 256
#endif
constexpr int kBlock = TLG_CUDA_BLOCK;

// ---- accumulation type: float for float/half/bfloat16, double for double ----
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// Explicit conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__, so no implicit ones).
__host__ __device__ __forceinline__ float to_acc(float x) { return x; }
__host__ __device__ __forceinline__ double to_acc(double x) { return x; }
template <typename T> __host__ __device__ __forceinline__ T from_acc(float x) { return static_cast<T>(x); }
template <typename T> __host__ __device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// ---- math in the accumulation type ----
__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
__device__ __forceinline__ float d_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double d_sqrt(double x) { return sqrt(x); }
template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }

// ---- reductions ----
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 values in shared
// memory. Ends with a barrier, so scratch may be reused right after.
template <typename A> __device__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A total = lane < nwarps ? scratch[lane] : A(0);
  total = warp_sum(total);
  __syncthreads();
  return total;
}

// Log-sum-exp accumulated online as (max, sum of exp(x - max)); -inf terms contribute nothing.
template <typename A> struct Lse {
  A mx, sum;
  __device__ __forceinline__ Lse() : mx(neg_inf<A>()), sum(A(0)) {}
  __device__ __forceinline__ void add(A x) {
    if (x == neg_inf<A>()) return;
    if (x > mx) { sum = sum * d_exp(mx - x) + A(1); mx = x; }
    else sum += d_exp(x - mx);
  }
  __device__ __forceinline__ void merge(A omx, A osum) {
    if (omx == neg_inf<A>()) return;
    if (mx == neg_inf<A>()) { mx = omx; sum = osum; return; }
    const A m = mx > omx ? mx : omx;
    sum = sum * d_exp(mx - m) + osum * d_exp(omx - m);
    mx = m;
  }
  __device__ __forceinline__ A value() const { return mx == neg_inf<A>() ? mx : mx + d_log(sum); }
};

// Warp-wide log-sum-exp: lanes hold partial (max, sum); all lanes get the total.
template <typename A> __device__ __forceinline__ A warp_lse(Lse<A> l) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const A omx = __shfl_xor_sync(0xffffffffu, l.mx, o);
    const A osum = __shfl_xor_sync(0xffffffffu, l.sum, o);
    l.merge(omx, osum);
  }
  return l.value();
}

// Launch a kernel by pointer. Under the emulation, the grid runs on host threads.
template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
#ifdef TLG_CUDA_EMULATION
  (void)stream;
  tlg_emu::run_grid(grid, block, smem, [=] { kernel(static_cast<KArgs>(args)...); });
#else
  kernel<<<grid, block, smem, stream>>>(static_cast<KArgs>(args)...);
#endif
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Grid-stride loop index helpers (64-bit: volumes exceed 2^31 elements).
__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t global_threads() { return int64_t(gridDim.x) * blockDim.x; }

}  // namespace tlg_cuda

// Dynamic shared memory as an array of A.
#ifdef TLG_CUDA_EMULATION
#define TLG_DYNAMIC_SMEM(A, name) A* name = reinterpret_cast<A*>(tlg_emu::dynamic_smem())
#else
#define TLG_DYNAMIC_SMEM(A, name)                                   \
  extern __shared__ __align__(16) unsigned char tlg_smem_raw[];     \
  A* name = reinterpret_cast<A*>(tlg_smem_raw)
#endif

// Run a statement with scalar_t bound to the element type of `dtype`.
#define TLG_DISPATCH_DTYPE(dtype, ...)                                                  \
  switch (dtype) {                                                                      \
    case ::tlg_cuda::DType::f32: { using scalar_t = float; __VA_ARGS__; break; }          \
    case ::tlg_cuda::DType::f64: { using scalar_t = double; __VA_ARGS__; break; }         \
    case ::tlg_cuda::DType::f16: { using scalar_t = __half; __VA_ARGS__; break; }         \
    case ::tlg_cuda::DType::bf16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return 1;                                                                  \
  }
