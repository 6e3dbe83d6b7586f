// Host-side entry points of tlg's CUDA kernels: raw pointers, sizes and a stream; no torch.
// The binding (binding.cpp) and the emulation harness (emulation/emu_api.cpp) call these.
// Every tensor is contiguous. Each function returns 0 on success, else a cudaError_t code
// (1 for an unsupported dtype). Semantics: tlg/ops/reference.py.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef TLG_CUDA_EMULATION
#include "emulation/cuda_emu.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace tlg_cuda {

enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// ---- correlation: query (B,C,Hq,Wq), support (B,C,Hs,Ws), mask (B,Hs,Ws) or null -> (B,Hq,Wq,Hs,Ws) ----
// Pq = Hq*Wq, Ps = Hs*Ws. `work` is caller-provided scratch of correlation_workspace() bytes.
// out / grad_out may be one layer of a stacked (B,L,Hq,Wq,Hs,Ws) volume: `batch_stride` is then
// the element stride between batches (L*Pq*Ps); 0 means contiguous (Pq*Ps). The backward reads the
// ReLU gate from the forward's `out` (laid out like grad_out, same batch stride).
size_t correlation_workspace(DType dt, int64_t B, int64_t C, int64_t Pq, int64_t Ps, bool backward);
int correlation_forward(DType dt, const void* query, const void* support, const void* mask, void* out,
                        void* work, int64_t B, int64_t C, int64_t Pq, int64_t Ps, double eps, int64_t batch_stride,
                        cudaStream_t stream);
int correlation_backward(DType dt, const void* grad_out, const void* out, const void* query, const void* support,
                         const void* mask, void* grad_query, void* grad_support, void* work, int64_t B, int64_t C,
                         int64_t Pq, int64_t Ps, double eps, int64_t batch_stride, cudaStream_t stream);

// ---- center-pivot 4D conv: x (B,Cin,Ha,Wa,Hb,Wb), weights (Cout,Cin,k,k) -> (B,Cout,Ha,Wa,Hp,Wp) ----
struct Conv4dShape {
  int64_t B, Cin, Cout, Ha, Wa, Hb, Wb;
  int kq, ks, stride;
  int64_t Hp() const { return (Hb + stride - 1) / stride; }
  int64_t Wp() const { return (Wb + stride - 1) / stride; }
};
int cp_conv4d_forward(DType dt, const void* x, const void* weight_q, const void* bias_q, const void* weight_s,
                      const void* bias_s, void* out, const Conv4dShape& s, cudaStream_t stream);
// Any of the gradient pointers may be null (not asked for). grad_bias is the same for both biases.
int cp_conv4d_backward(DType dt, const void* grad_out, const void* x, const void* weight_q, const void* weight_s,
                       void* grad_x, void* grad_weight_q, void* grad_weight_s, void* grad_bias,
                       const Conv4dShape& s, cudaStream_t stream);

// ---- Sinkhorn: cost (B,N,M), a (B,N), b (B,M) -> plan, f, g (input dtype), n_iter int64, converged bool ----
// `work` holds sinkhorn_workspace() bytes (potentials of streamed problems). streamed: 1 forces the
// streamed kernel, 0 forces the shared-memory one, -1 picks by size.
size_t sinkhorn_workspace(DType dt, int64_t B, int64_t N, int64_t M);
int sinkhorn_forward(DType dt, const void* cost, const void* a, const void* b, void* plan, void* f, void* g,
                     int64_t* n_iter, bool* converged, void* work, int64_t B, int64_t N, int64_t M, double eps,
                     int64_t max_iter, double tol, int64_t check_every, int streamed, cudaStream_t stream);

// Implicit-differentiation backward (reference.sinkhorn_implicit_grad) in two halves around a
// batched linear solve the caller does (at::linalg_solve):
//   prepare: u, v, row sums r, 1/r -> schur (B,M,M) and rhs (B,M), in the accumulation type
//            (float for float/half/bfloat16, double for double); `work` keeps u and 1/r.
//   finish:  y (B,M, solved, accumulation type) -> grad_cost (B,N,M), grad_a (B,N), grad_b (B,M)
//            (overwrites u in `work` with x).
size_t sinkhorn_backward_workspace(DType dt, int64_t B, int64_t N, int64_t M);
int sinkhorn_backward_prepare(DType dt, const void* grad_plan, const void* plan, void* schur, void* rhs, void* work,
                              int64_t B, int64_t N, int64_t M, double eps, cudaStream_t stream);
int sinkhorn_backward_finish(DType dt, const void* grad_plan, const void* plan, const void* y, void* work,
                             void* grad_cost, void* grad_a, void* grad_b, int64_t B, int64_t N, int64_t M,
                             double eps, cudaStream_t stream);

}  // namespace tlg_cuda
