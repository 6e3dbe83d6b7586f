// Correlation volume (HSNet eq. 1) on CUDA.
//
//   q^ = q / (||q|| + eps),  s^ = m s / (||m s|| + eps),  out[b,i,j] = max(0, <q^_i, s^_j>)
//
// The normalisation never materialises q^ or s^: it becomes a row scale rq[i] = 1/(||q_i||+eps)
// and a column scale rs[j] = m_j/(|m_j| ||s_j|| + eps) applied in the epilogue of a tiled
// batched GEMM over the channels (query (C,Pq) and support (C,Ps) are read in place).
//
// Backward, with the ReLU gate read from the forward's output (not recomputed):
//   Gz = G * [out > 0 or ||q_i|| = 0 or ||m_j s_j|| = 0]   (a zero-norm vector's products are exactly 0,
//   where torch's clamp passes the gradient), then
//   dq^[c,i] = sum_j Gz[i,j] rs[j] s[c,j],      ds^[c,j] = sum_i Gz[i,j] rq[i] q[c,i]
//   (same GEMM kernel, the scale on the reduced index), then through x^ = u/(||u||+eps):
//   du = r dx^ - u (u . dx^) r^2 / ||u||   (r = 1/(||u||+eps); 0 for the second term when u = 0),
//   dq = du (u = q),  ds = m du (u = m s).
#include "common.cuh"

namespace tlg_cuda {
namespace {

// ---- per-position scales: scale[b,p] = m/(|m| ||x|| + eps), norm[b,p] = |m| ||x|| ----
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
corr_scales_kernel(const T* __restrict__ x, const T* __restrict__ mask, A* __restrict__ scale, A* __restrict__ norm,
                   int64_t B, int64_t C, int64_t P, A eps) {
  for (int64_t idx = global_thread(); idx < B * P; idx += global_threads()) {
    const int64_t b = idx / P, p = idx % P;
    const T* xp = x + b * C * P + p;
    A n2 = 0;
    for (int64_t c = 0; c < C; ++c) {  // consecutive threads read consecutive positions
      const A v = to_acc(xp[c * P]);
      n2 += v * v;
    }
    const A m = mask ? to_acc(mask[idx]) : A(1);
    const A n = (m < 0 ? -m : m) * d_sqrt(n2);
    scale[idx] = m / (n + eps);
    norm[idx] = n;
  }
}

// ---- tiled batched GEMM: out[b,m,n] = epilogue( sum_k A[b,m,k] sk[k] B[b,k,n] ) ----
enum class Epi { Relu, Plain };

template <typename TA, typename TB, typename TO, typename A>
struct GemmArgs {
  const TA* a; int64_t a_b, a_m, a_k;  // element strides of A over batch, m, k
  const TB* b; int64_t b_b, b_k, b_n;
  TO* out; int64_t o_b, o_m, o_n;
  const A* scale_m;   // (B,M) or null
  const A* scale_n;   // (B,N) or null
  const A* scale_k;   // (B,K) or null, applied to B's tile as it is loaded
  int64_t M, N, K;
};

constexpr int kTile = 64, kTileK = 16, kTileThreads = 16;  // 16x16 threads, 4x4 outputs each
constexpr int kSub = kTile / kTileThreads;

template <typename TA, typename TB, typename TO, typename A, Epi epi>
__global__ void __launch_bounds__(kTileThreads * kTileThreads)
corr_gemm_kernel(GemmArgs<TA, TB, TO, A> g) {
  __shared__ A As[kTileK][kTile + 1];
  __shared__ A Bs[kTileK][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileThreads + tx;
  const int64_t bz = blockIdx.z, m0 = int64_t(blockIdx.y) * kTile, n0 = int64_t(blockIdx.x) * kTile;
  const TA* a = g.a + bz * g.a_b;
  const TB* b = g.b + bz * g.b_b;
  const A* sk = g.scale_k ? g.scale_k + bz * g.K : nullptr;

  A acc[kSub][kSub];
  for (int i = 0; i < kSub; ++i)
    for (int j = 0; j < kSub; ++j) acc[i][j] = 0;

  for (int64_t k0 = 0; k0 < g.K; k0 += kTileK) {
    // Load a kTile x kTileK tile of A and kTileK x kTile of B; the fast thread index runs
    // along whichever index is contiguous in memory.
    for (int e = tid; e < kTile * kTileK; e += kTileThreads * kTileThreads) {
      const int mm = g.a_m == 1 ? e % kTile : e / kTileK, kk = g.a_m == 1 ? e / kTile : e % kTileK;
      const int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < g.M && k < g.K) ? to_acc(a[m * g.a_m + k * g.a_k]) : A(0);
      const int nn = g.b_n == 1 ? e % kTile : e / kTileK, kb = g.b_n == 1 ? e / kTile : e % kTileK;
      const int64_t n = n0 + nn, kg = k0 + kb;
      A v = (n < g.N && kg < g.K) ? to_acc(b[kg * g.b_k + n * g.b_n]) : A(0);
      if (sk && kg < g.K) v *= sk[kg];
      Bs[kb][nn] = v;
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; ++kk) {
      A av[kSub], bv[kSub];
      for (int i = 0; i < kSub; ++i) av[i] = As[kk][ty + i * kTileThreads];
      for (int j = 0; j < kSub; ++j) bv[j] = Bs[kk][tx + j * kTileThreads];
      for (int i = 0; i < kSub; ++i)
        for (int j = 0; j < kSub; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }

  for (int i = 0; i < kSub; ++i) {
    const int64_t m = m0 + ty + i * kTileThreads;
    if (m >= g.M) continue;
    const A smv = g.scale_m ? g.scale_m[bz * g.M + m] : A(1);
    for (int j = 0; j < kSub; ++j) {
      const int64_t n = n0 + tx + j * kTileThreads;
      if (n >= g.N) continue;
      const A snv = g.scale_n ? g.scale_n[bz * g.N + n] : A(1);
      const A z = acc[i][j] * smv * snv;
      const int64_t o = bz * g.o_b + m * g.o_m + n * g.o_n;
      if constexpr (epi == Epi::Relu) {
        g.out[o] = from_acc<TO>(z > A(0) ? z : A(0));
      } else {
        g.out[o] = from_acc<TO>(z);
      }
    }
  }
}

template <typename TA, typename TB, typename TO, typename A, Epi epi>
void run_gemm(const GemmArgs<TA, TB, TO, A>& g, int64_t B, cudaStream_t stream) {
  const dim3 grid(ceil_div(g.N, kTile), ceil_div(g.M, kTile), static_cast<unsigned>(B));
  launch(corr_gemm_kernel<TA, TB, TO, A, epi>, grid, dim3(kTileThreads, kTileThreads), 0, stream, g);
}

// ---- the ReLU gate from the forward's output: gz[b,i,j] = G[b,i,j] if out > 0 or a norm is 0, else 0 ----
// G and out (batch stride io_b) are indexed alike; gz is contiguous.
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
corr_gate_kernel(const T* __restrict__ grad, const T* __restrict__ out, const A* __restrict__ norm_q,
                 const A* __restrict__ norm_s, A* __restrict__ gz, int64_t B, int64_t Pq, int64_t Ps, int64_t io_b) {
  for (int64_t idx = global_thread(); idx < B * Pq * Ps; idx += global_threads()) {
    const int64_t b = idx / (Pq * Ps), ij = idx % (Pq * Ps), o = b * io_b + ij;
    const bool open = to_acc(out[o]) > A(0) || norm_q[b * Pq + ij / Ps] == A(0) || norm_s[b * Ps + ij % Ps] == A(0);
    gz[idx] = open ? to_acc(grad[o]) : A(0);
  }
}

// ---- backward through the normalisation, per position: dx = m (r dx^ - u (u.dx^) r^2/||u||) ----
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
corr_norm_backward_kernel(const A* __restrict__ dxh, const T* __restrict__ x, const T* __restrict__ mask,
                          const A* __restrict__ norm, T* __restrict__ dx, int64_t B, int64_t C, int64_t P, A eps) {
  for (int64_t idx = global_thread(); idx < B * P; idx += global_threads()) {
    const int64_t b = idx / P, p = idx % P, base = b * C * P + p;
    const A m = mask ? to_acc(mask[idx]) : A(1);
    const A n = norm[idx], r = A(1) / (n + eps);
    A dot = 0;
    for (int64_t c = 0; c < C; ++c) dot += m * to_acc(x[base + c * P]) * dxh[base + c * P];
    const A k = n > A(0) ? dot * r * r / n : A(0);
    for (int64_t c = 0; c < C; ++c) {
      const A u = m * to_acc(x[base + c * P]);
      dx[base + c * P] = from_acc<T>(m * (r * dxh[base + c * P] - u * k));
    }
  }
}

// Workspace, in the accumulation type: scale_q, norm_q (B*Pq), scale_s, norm_s (B*Ps);
// backward adds Gz (B*Pq*Ps), dq^ (B*C*Pq), ds^ (B*C*Ps).
template <typename A>
struct CorrWork {
  A *scale_q, *norm_q, *scale_s, *norm_s, *gz, *dqh, *dsh;
  CorrWork(void* w, int64_t B, int64_t C, int64_t Pq, int64_t Ps) {
    A* p = static_cast<A*>(w);
    scale_q = p; p += B * Pq;
    norm_q = p; p += B * Pq;
    scale_s = p; p += B * Ps;
    norm_s = p; p += B * Ps;
    gz = p; p += B * Pq * Ps;
    dqh = p; p += B * C * Pq;
    dsh = p;
  }
  static size_t elems(int64_t B, int64_t C, int64_t Pq, int64_t Ps, bool backward) {
    return size_t(2 * B * (Pq + Ps)) + (backward ? size_t(B * Pq * Ps + B * C * (Pq + Ps)) : 0);
  }
};

int grid_for(int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  return static_cast<int>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

template <typename T>
void scales(const T* q, const T* s, const T* mask, CorrWork<acc_t<T>>& w, int64_t B, int64_t C, int64_t Pq,
            int64_t Ps, double eps, cudaStream_t stream) {
  using A = acc_t<T>;
  launch(corr_scales_kernel<T, A>, dim3(grid_for(B * Pq)), dim3(kBlock), 0, stream, q, static_cast<const T*>(nullptr),
         w.scale_q, w.norm_q, B, C, Pq, A(eps));
  launch(corr_scales_kernel<T, A>, dim3(grid_for(B * Ps)), dim3(kBlock), 0, stream, s, mask, w.scale_s, w.norm_s, B, C,
         Ps, A(eps));
}

template <typename T>
void forward_impl(const T* q, const T* s, const T* mask, T* out, void* work, int64_t B, int64_t C, int64_t Pq,
                  int64_t Ps, double eps, int64_t out_b, cudaStream_t stream) {
  using A = acc_t<T>;
  CorrWork<A> w(work, B, C, Pq, Ps);
  scales(q, s, mask, w, B, C, Pq, Ps, eps, stream);
  // out[b,i,j] = relu(rq[i] rs[j] sum_c q[c,i] s[c,j]): A = q as (i,c), B = s as (c,j).
  GemmArgs<T, T, T, A> g{q, C * Pq, 1, Pq, s, C * Ps, Ps, 1, out, out_b, Ps, 1,
                         w.scale_q, w.scale_s, nullptr, Pq, Ps, C};
  run_gemm<T, T, T, A, Epi::Relu>(g, B, stream);
}

template <typename T>
void backward_impl(const T* grad_out, const T* out, const T* q, const T* s, const T* mask, T* dq, T* ds, void* work,
                   int64_t B, int64_t C, int64_t Pq, int64_t Ps, double eps, int64_t io_b, cudaStream_t stream) {
  using A = acc_t<T>;
  CorrWork<A> w(work, B, C, Pq, Ps);
  scales(q, s, mask, w, B, C, Pq, Ps, eps, stream);
  launch(corr_gate_kernel<T, A>, dim3(grid_for(B * Pq * Ps)), dim3(kBlock), 0, stream, grad_out, out,
         static_cast<const A*>(w.norm_q), static_cast<const A*>(w.norm_s), w.gz, B, Pq, Ps, io_b);
  // dq^[b,c,i] = sum_j Gz[i,j] rs[j] s[c,j]   (m=i, n=c, k=j)
  GemmArgs<A, T, A, A> gq{w.gz, Pq * Ps, Ps, 1, s, C * Ps, 1, Ps, w.dqh, C * Pq, 1, Pq,
                          nullptr, nullptr, w.scale_s, Pq, C, Ps};
  run_gemm<A, T, A, A, Epi::Plain>(gq, B, stream);
  // ds^[b,c,j] = sum_i Gz[i,j] rq[i] q[c,i]   (m=j, n=c, k=i)
  GemmArgs<A, T, A, A> gs{w.gz, Pq * Ps, 1, Ps, q, C * Pq, 1, Pq, w.dsh, C * Ps, 1, Ps,
                          nullptr, nullptr, w.scale_q, Ps, C, Pq};
  run_gemm<A, T, A, A, Epi::Plain>(gs, B, stream);
  launch(corr_norm_backward_kernel<T, A>, dim3(grid_for(B * Pq)), dim3(kBlock), 0, stream,
         static_cast<const A*>(w.dqh), q, static_cast<const T*>(nullptr), static_cast<const A*>(w.norm_q), dq, B, C,
         Pq, A(eps));
  launch(corr_norm_backward_kernel<T, A>, dim3(grid_for(B * Ps)), dim3(kBlock), 0, stream,
         static_cast<const A*>(w.dsh), s, mask, static_cast<const A*>(w.norm_s), ds, B, C, Ps, A(eps));
}

}  // namespace

size_t correlation_workspace(DType dt, int64_t B, int64_t C, int64_t Pq, int64_t Ps, bool backward) {
  const size_t acc_bytes = dt == DType::f64 ? sizeof(double) : sizeof(float);
  return acc_bytes * CorrWork<float>::elems(B, C, Pq, Ps, backward);
}

int correlation_forward(DType dt, const void* query, const void* support, const void* mask, void* out, void* work,
                        int64_t B, int64_t C, int64_t Pq, int64_t Ps, double eps, int64_t batch_stride,
                        cudaStream_t stream) {
  const int64_t out_b = batch_stride > 0 ? batch_stride : Pq * Ps;
  TLG_DISPATCH_DTYPE(dt, forward_impl<scalar_t>(static_cast<const scalar_t*>(query),
                                                static_cast<const scalar_t*>(support),
                                                static_cast<const scalar_t*>(mask), static_cast<scalar_t*>(out),
                                                work, B, C, Pq, Ps, eps, out_b, stream));
  return static_cast<int>(cudaGetLastError());
}

int correlation_backward(DType dt, const void* grad_out, const void* out, const void* query, const void* support,
                         const void* mask, void* grad_query, void* grad_support, void* work, int64_t B, int64_t C,
                         int64_t Pq, int64_t Ps, double eps, int64_t batch_stride, cudaStream_t stream) {
  const int64_t io_b = batch_stride > 0 ? batch_stride : Pq * Ps;
  TLG_DISPATCH_DTYPE(dt, backward_impl<scalar_t>(static_cast<const scalar_t*>(grad_out),
                                                 static_cast<const scalar_t*>(out),
                                                 static_cast<const scalar_t*>(query),
                                                 static_cast<const scalar_t*>(support),
                                                 static_cast<const scalar_t*>(mask),
                                                 static_cast<scalar_t*>(grad_query),
                                                 static_cast<scalar_t*>(grad_support), work, B, C, Pq, Ps, eps,
                                                 io_b, stream));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace tlg_cuda
