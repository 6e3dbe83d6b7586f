// Batched log-domain Sinkhorn (Cuturi 2013; Peyre & Cuturi 2019, eq. 4.43) on CUDA.
//
// One block per problem, f = g = 0, then per iteration
//   f_i = eps (log a_i - LSE_j (g_j - C_ij)/eps)      one warp per row
//   g_j = eps (log b_j - LSE_i (f_i - C_ij)/eps)      one thread per column
// and every `check_every` iterations (and at max_iter) the row-marginal error
//   err = || P 1 - a ||_2,  P_ij = exp((f_i + g_j - C_ij)/eps)
// stops the problem once err <= tol (its potentials freeze there; n_iter = iterations run).
// The loop never syncs with the host: each block decides for itself.
// Zero-mass entries: log 0 = -inf gives f_i (g_j) = -inf, an exactly zero plan row (column), and
// the LSE skips -inf terms, so no NaN appears.
//
// Small problems hold the whole problem (cost, potentials, log-marginals) in shared memory;
// large ones stream the cost from global memory and keep the potentials in a global workspace.
//
// Backward (reference.sinkhorn_implicit_grad), G = dL/dP:
//   u = (G o P) 1 / eps, v = (G o P)^T 1 / eps, r = P 1, c = P^T 1, ri = 1/r (0 where r = 0)
//   schur = diag(c) - P^T diag(ri) P + 1/M + diag([c = 0]),  rhs = v - P^T (u o ri)
//   (the caller solves schur y = rhs), x = (u - P y) o ri,
//   dC = P o (x 1^T + 1 y^T - G/eps),  da = eps x,  db = eps y.
#include "common.cuh"

namespace tlg_cuda {
namespace {

constexpr size_t kSmemLimit = 47 * 1024;  // 48 KiB per block without opt-in, less the static scratch

template <typename T, typename A, bool kSmem>
__global__ void __launch_bounds__(kBlock)
sinkhorn_kernel(const T* __restrict__ cost, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ plan,
                T* __restrict__ f_out, T* __restrict__ g_out, int64_t* __restrict__ n_iter, bool* __restrict__ converged,
                A* __restrict__ work, int64_t N, int64_t M, A eps, int64_t max_iter, A tol, int64_t check_every) {
  TLG_DYNAMIC_SMEM(A, sm);
  __shared__ A scratch[kWarp];
  const int64_t pb = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, nwarps = blockDim.x / kWarp;
  const T* Cg = cost + pb * N * M;
  a += pb * N;
  b += pb * M;
  A* base = kSmem ? sm : work + pb * 2 * (N + M);
  A *la = base, *lb = la + N, *f = lb + M, *g = f + N;
  A* Cs = g + M;  // only with kSmem
  if (kSmem)
    for (int64_t k = tid; k < N * M; k += blockDim.x) Cs[k] = to_acc(Cg[k]);
  for (int64_t i = tid; i < N; i += blockDim.x) { la[i] = d_log(to_acc(a[i])); f[i] = 0; }
  for (int64_t j = tid; j < M; j += blockDim.x) { lb[j] = d_log(to_acc(b[j])); g[j] = 0; }
  __syncthreads();
  auto C = [&](int64_t i, int64_t j) -> A {
    if constexpr (kSmem) return Cs[i * M + j];
    else return to_acc(Cg[i * M + j]);
  };
  const A inv_eps = A(1) / eps;

  int64_t it = 1, next_check = check_every;  // checks at multiples of check_every (no 64-bit modulo)
  bool done = false;
  for (; it <= max_iter; ++it) {
    for (int64_t i = warp; i < N; i += nwarps) {  // f update, a warp per row
      Lse<A> l;
      for (int64_t j = lane; j < M; j += kWarp) l.add((g[j] - C(i, j)) * inv_eps);
      const A lse = warp_lse(l);
      if (lane == 0) f[i] = eps * (la[i] - lse);
    }
    __syncthreads();
    for (int64_t j = tid; j < M; j += blockDim.x) {  // g update, a thread per column
      Lse<A> l;
      for (int64_t i = 0; i < N; ++i) l.add((f[i] - C(i, j)) * inv_eps);
      g[j] = eps * (lb[j] - l.value());
    }
    __syncthreads();
    if (it == next_check || it == max_iter) {  // err^2 = sum_i (sum_j P_ij - a_i)^2
      if (it == next_check) next_check += check_every;
      A part = 0;
      for (int64_t i = warp; i < N; i += nwarps) {
        A row = 0;
        for (int64_t j = lane; j < M; j += kWarp) row += d_exp((f[i] + g[j] - C(i, j)) * inv_eps);
        row = warp_sum(row);
        const A d = row - to_acc(a[i]);
        if (lane == 0) part += d * d;
      }
      const A err2 = block_sum(part, scratch);  // identical in every thread: a uniform decision
      if (d_sqrt(err2) <= tol) { done = true; break; }
    }
  }

  // Outputs: n_iter counts the iterations run (`it` stopped at the converging one, else max_iter).
  if (tid == 0) {
    n_iter[pb] = done ? it : max_iter;
    converged[pb] = done;
  }
  T* P = plan + pb * N * M;
  for (int64_t k = tid; k < N * M; k += blockDim.x) {
    const int64_t i = k / M, j = k % M;
    P[k] = from_acc<T>(d_exp((f[i] + g[j] - C(i, j)) * inv_eps));
  }
  for (int64_t i = tid; i < N; i += blockDim.x) f_out[pb * N + i] = from_acc<T>(f[i]);
  for (int64_t j = tid; j < M; j += blockDim.x) g_out[pb * M + j] = from_acc<T>(g[j]);
}

// ---- backward ----
// grid (B): u, ri (work, (B,N) each) by rows; rhs by columns.
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
sinkhorn_bwd_rows_kernel(const T* __restrict__ gp, const T* __restrict__ plan, A* __restrict__ rhs,
                         A* __restrict__ work, int64_t B, int64_t N, int64_t M, A eps) {
  const int64_t pb = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, nwarps = blockDim.x / kWarp;
  const T* G = gp + pb * N * M;
  const T* P = plan + pb * N * M;
  A* u = work + pb * N;
  A* ri = work + B * N + pb * N;
  for (int64_t i = warp; i < N; i += nwarps) {
    A su = 0, sr = 0;
    for (int64_t j = lane; j < M; j += kWarp) {
      const A p = to_acc(P[i * M + j]);
      su += to_acc(G[i * M + j]) * p;
      sr += p;
    }
    su = warp_sum(su);
    sr = warp_sum(sr);
    if (lane == 0) {
      u[i] = su / eps;
      ri[i] = sr > A(0) ? A(1) / sr : A(0);
    }
  }
  __syncthreads();
  for (int64_t j = tid; j < M; j += blockDim.x) {  // rhs_j = v_j - sum_i P_ij u_i ri_i
    A v = 0, pu = 0;
    for (int64_t i = 0; i < N; ++i) {
      const A p = to_acc(P[i * M + j]);
      v += to_acc(G[i * M + j]) * p;
      pu += p * u[i] * ri[i];
    }
    rhs[pb * M + j] = v / eps - pu;
  }
}

// grid (ceil(M*M/block), B): schur[j,k] = [j=k](c_j + [c_j=0]) - sum_i P_ij ri_i P_ik + 1/M.
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
sinkhorn_bwd_schur_kernel(const T* __restrict__ plan, A* __restrict__ schur, const A* __restrict__ work, int64_t B,
                          int64_t N, int64_t M) {
  const int64_t pb = blockIdx.y, e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= M * M) return;
  const int64_t j = e / M, k = e % M;
  const T* P = plan + pb * N * M;
  const A* ri = work + B * N + pb * N;
  A s = 0, cj = 0;
  for (int64_t i = 0; i < N; ++i) {
    const A pj = to_acc(P[i * M + j]);
    s += pj * ri[i] * to_acc(P[i * M + k]);
    cj += pj;
  }
  A d = A(1) / A(M) - s;
  if (j == k) d += cj > A(0) ? cj : A(1);
  schur[pb * M * M + e] = d;
}

// grid (B): x = (u - P y) o ri, da = eps x, db = eps y, dC = P o (x + y - G/eps).
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
sinkhorn_bwd_finish_kernel(const T* __restrict__ gp, const T* __restrict__ plan, const A* __restrict__ y,
                           A* __restrict__ work, T* __restrict__ gc, T* __restrict__ ga, T* __restrict__ gb,
                           int64_t B, int64_t N, int64_t M, A eps) {
  const int64_t pb = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, nwarps = blockDim.x / kWarp;
  const T* G = gp + pb * N * M;
  const T* P = plan + pb * N * M;
  A* x = work + pb * N;  // x_i overwrites u_i (each read once, by the lane that writes it)
  const A* ri = work + B * N + pb * N;
  y += pb * M;
  for (int64_t i = warp; i < N; i += nwarps) {
    A py = 0;
    for (int64_t j = lane; j < M; j += kWarp) py += to_acc(P[i * M + j]) * y[j];
    py = warp_sum(py);
    if (lane == 0) {
      x[i] = (x[i] - py) * ri[i];
      ga[pb * N + i] = from_acc<T>(eps * x[i]);
    }
  }
  for (int64_t j = tid; j < M; j += blockDim.x) gb[pb * M + j] = from_acc<T>(eps * y[j]);
  __syncthreads();
  for (int64_t k = tid; k < N * M; k += blockDim.x) {
    const int64_t i = k / M, j = k % M;
    gc[pb * N * M + k] = from_acc<T>(to_acc(P[k]) * (x[i] + y[j] - to_acc(G[k]) / eps));
  }
}

template <typename T>
void forward_impl(const T* cost, const T* a, const T* b, T* plan, T* f, T* g, int64_t* n_iter, bool* conv, void* work,
                  int64_t B, int64_t N, int64_t M, double eps, int64_t max_iter, double tol, int64_t check_every,
                  int streamed, cudaStream_t stream) {
  using A = acc_t<T>;
  const size_t smem = sizeof(A) * size_t(N * M + 2 * (N + M));
  const bool use_smem = streamed == 0 || (streamed < 0 && smem <= kSmemLimit);
  auto kernel = use_smem ? sinkhorn_kernel<T, A, true> : sinkhorn_kernel<T, A, false>;
  launch(kernel, dim3(static_cast<unsigned>(B)), dim3(kBlock), use_smem ? smem : 0, stream, cost, a, b, plan, f, g,
         n_iter, conv, static_cast<A*>(work), N, M, A(eps), max_iter, A(tol), check_every);
}

template <typename T>
void backward_prepare_impl(const T* gp, const T* plan, void* schur, void* rhs, void* work, int64_t B, int64_t N,
                           int64_t M, double eps, cudaStream_t stream) {
  using A = acc_t<T>;
  launch(sinkhorn_bwd_rows_kernel<T, A>, dim3(static_cast<unsigned>(B)), dim3(kBlock), 0, stream, gp, plan,
         static_cast<A*>(rhs), static_cast<A*>(work), B, N, M, A(eps));
  launch(sinkhorn_bwd_schur_kernel<T, A>, dim3(ceil_div(M * M, kBlock), static_cast<unsigned>(B)), dim3(kBlock), 0,
         stream, plan, static_cast<A*>(schur), static_cast<const A*>(work), B, N, M);
}

template <typename T>
void backward_finish_impl(const T* gp, const T* plan, const void* y, void* work, T* gc, T* ga, T* gb, int64_t B,
                          int64_t N, int64_t M, double eps, cudaStream_t stream) {
  using A = acc_t<T>;
  launch(sinkhorn_bwd_finish_kernel<T, A>, dim3(static_cast<unsigned>(B)), dim3(kBlock), 0, stream, gp, plan,
         static_cast<const A*>(y), static_cast<A*>(work), gc, ga, gb, B, N, M, A(eps));
}

size_t acc_size(DType dt) { return dt == DType::f64 ? sizeof(double) : sizeof(float); }

}  // namespace

size_t sinkhorn_workspace(DType dt, int64_t B, int64_t N, int64_t M) { return acc_size(dt) * size_t(2 * B * (N + M)); }

int sinkhorn_forward(DType dt, const void* cost, const void* a, const void* b, void* plan, void* f, void* g,
                     int64_t* n_iter, bool* converged, void* work, int64_t B, int64_t N, int64_t M, double eps,
                     int64_t max_iter, double tol, int64_t check_every, int streamed, cudaStream_t stream) {
  if (B == 0) return 0;
  TLG_DISPATCH_DTYPE(dt, forward_impl<scalar_t>(
      static_cast<const scalar_t*>(cost), static_cast<const scalar_t*>(a), static_cast<const scalar_t*>(b),
      static_cast<scalar_t*>(plan), static_cast<scalar_t*>(f), static_cast<scalar_t*>(g), n_iter, converged, work, B,
      N, M, eps, max_iter, tol, check_every, streamed, stream));
  return static_cast<int>(cudaGetLastError());
}

size_t sinkhorn_backward_workspace(DType dt, int64_t B, int64_t N, int64_t /*M*/) {
  return acc_size(dt) * size_t(2 * B * N);
}

int sinkhorn_backward_prepare(DType dt, const void* grad_plan, const void* plan, void* schur, void* rhs, void* work,
                              int64_t B, int64_t N, int64_t M, double eps, cudaStream_t stream) {
  if (B == 0) return 0;
  TLG_DISPATCH_DTYPE(dt, backward_prepare_impl<scalar_t>(static_cast<const scalar_t*>(grad_plan),
                                                         static_cast<const scalar_t*>(plan), schur, rhs, work, B, N, M,
                                                         eps, stream));
  return static_cast<int>(cudaGetLastError());
}

int sinkhorn_backward_finish(DType dt, const void* grad_plan, const void* plan, const void* y, void* work,
                             void* grad_cost, void* grad_a, void* grad_b, int64_t B, int64_t N, int64_t M, double eps,
                             cudaStream_t stream) {
  if (B == 0) return 0;
  TLG_DISPATCH_DTYPE(dt, backward_finish_impl<scalar_t>(
      static_cast<const scalar_t*>(grad_plan), static_cast<const scalar_t*>(plan), y, work,
      static_cast<scalar_t*>(grad_cost), static_cast<scalar_t*>(grad_a), static_cast<scalar_t*>(grad_b), B, N, M, eps,
      stream));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace tlg_cuda
