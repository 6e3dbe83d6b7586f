// Center-pivot 4D convolution (HSNet section 3.2) on CUDA, by direct indexing of the 6-D tensor.
//
//   y[b,o,i,j,p,q] = bq[o] + bs[o]
//     + sum_{c,dy,dx} Wq[o,c,dy,dx] x[b,c, i+dy-kq/2, j+dx-kq/2, p*s, q*s]        (conv over query dims
//                                                                              at the kept support position)
//     + sum_{c,dy,dx} Ws[o,c,dy,dx] x[b,c, i, j, p*s+dy-ks/2, q*s+dx-ks/2]        (strided conv over support dims)
//
// x (B,Cin,Ha,Wa,Hb,Wb), y (B,Cout,Ha,Wa,Hp,Wp), Hp = ceil(Hb/s); taps outside the tensor are zero padding.
// The pruning x[..., ::s, ::s] is folded into the indexing (p*s, q*s), never materialised.
//
// Backward:
//   dx[b,c,i,j,h,w] = sum_{o,dy,dx} Ws[o,c,dy,dx] dy[b,o,i,j,(h+ks/2-dy)/s,(w+ks/2-dx)/s]   (when divisible, in range)
//                   + [s|h, s|w] sum_{o,dy,dx} Wq[o,c,dy,dx] dy[b,o,i-dy+kq/2,j-dx+kq/2,h/s,w/s]
//   dWq[o,c,dy,dx] = sum dy[b,o,i,j,p,q] x[b,c,i+dy-kq/2,j+dx-kq/2,p*s,q*s]    (one block per weight)
//   dWs likewise, dbq = dbs = sum dy[b,o,...]
#include "common.cuh"

namespace tlg_cuda {
namespace {

constexpr int kCinTile = 16;  // input channels whose weights are staged in shared memory at once

struct Geo {  // sizes as the kernels use them
  int64_t B, Cin, Cout, Ha, Wa, Hb, Wb, Hp, Wp;
  int kq, ks, s;
  explicit Geo(const Conv4dShape& sh)
      : B(sh.B), Cin(sh.Cin), Cout(sh.Cout), Ha(sh.Ha), Wa(sh.Wa), Hb(sh.Hb), Wb(sh.Wb), Hp(sh.Hp()), Wp(sh.Wp()),
        kq(sh.kq), ks(sh.ks), s(sh.stride) {}
};

// grid (ceil(Ha*Wa*Hp*Wp / block), Cout, B); one output element per thread.
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cp_conv4d_forward_kernel(const T* __restrict__ x, const T* __restrict__ wq, const T* __restrict__ bq,
                         const T* __restrict__ ws, const T* __restrict__ bs, T* __restrict__ y, Geo g) {
  TLG_DYNAMIC_SMEM(A, wsm);  // [kCinTile][kq*kq + ks*ks]: this block's output channel's weights
  const int64_t o = blockIdx.y, b = blockIdx.z;
  const int kq2 = g.kq * g.kq, ks2 = g.ks * g.ks, kk = kq2 + ks2, pq = g.kq / 2, ps = g.ks / 2;
  const int64_t S = g.Ha * g.Wa * g.Hp * g.Wp, idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = idx < S;
  const int64_t q = idx % g.Wp, p = idx / g.Wp % g.Hp, j = idx / (g.Wp * g.Hp) % g.Wa, i = idx / (g.Wp * g.Hp * g.Wa);
  const int64_t hb0 = p * g.s, wb0 = q * g.s, plane = g.Ha * g.Wa * g.Hb * g.Wb;

  A acc = (bq ? to_acc(bq[o]) : A(0)) + (bs ? to_acc(bs[o]) : A(0));
  for (int64_t c0 = 0; c0 < g.Cin; c0 += kCinTile) {
    const int nc = static_cast<int>(g.Cin - c0 < kCinTile ? g.Cin - c0 : kCinTile);
    for (int e = threadIdx.x; e < nc * kk; e += blockDim.x) {
      const int64_t c = c0 + e / kk;
      const int t = e % kk;
      wsm[e] = t < kq2 ? to_acc(wq[(o * g.Cin + c) * kq2 + t]) : to_acc(ws[(o * g.Cin + c) * ks2 + t - kq2]);
    }
    __syncthreads();
    if (active) {
      for (int c = 0; c < nc; ++c) {
        const T* xc = x + (b * g.Cin + c0 + c) * plane;
        const A* w = wsm + c * kk;
        for (int dy = 0; dy < g.kq; ++dy) {  // query taps at the kept support position
          const int64_t ii = i + dy - pq;
          if (ii < 0 || ii >= g.Ha) continue;
          for (int dx = 0; dx < g.kq; ++dx) {
            const int64_t jj = j + dx - pq;
            if (jj < 0 || jj >= g.Wa) continue;
            acc += w[dy * g.kq + dx] * to_acc(xc[((ii * g.Wa + jj) * g.Hb + hb0) * g.Wb + wb0]);
          }
        }
        const T* xs = xc + (i * g.Wa + j) * g.Hb * g.Wb;
        for (int dy = 0; dy < g.ks; ++dy) {  // support taps, strided
          const int64_t hh = hb0 + dy - ps;
          if (hh < 0 || hh >= g.Hb) continue;
          for (int dx = 0; dx < g.ks; ++dx) {
            const int64_t ww = wb0 + dx - ps;
            if (ww < 0 || ww >= g.Wb) continue;
            acc += w[kq2 + dy * g.ks + dx] * to_acc(xs[hh * g.Wb + ww]);
          }
        }
      }
    }
    __syncthreads();
  }
  if (active) y[(b * g.Cout + o) * S + idx] = from_acc<T>(acc);
}

// One thread per input element, gathering from the outputs it contributed to (no atomics).
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cp_conv4d_grad_x_kernel(const T* __restrict__ gy, const T* __restrict__ wq, const T* __restrict__ ws,
                        T* __restrict__ gx, Geo g) {
  const int kq2 = g.kq * g.kq, ks2 = g.ks * g.ks, pq = g.kq / 2, ps = g.ks / 2;
  const int64_t S = g.Ha * g.Wa * g.Hp * g.Wp, total = g.B * g.Cin * g.Ha * g.Wa * g.Hb * g.Wb;
  for (int64_t idx = global_thread(); idx < total; idx += global_threads()) {
    // spatial indices fit in int: the tap loops below stay in 32-bit arithmetic
    const int w = static_cast<int>(idx % g.Wb), h = static_cast<int>(idx / g.Wb % g.Hb);
    const int j = static_cast<int>(idx / (g.Wb * g.Hb) % g.Wa), i = static_cast<int>(idx / (g.Wb * g.Hb * g.Wa) % g.Ha);
    const int64_t c = idx / (g.Wb * g.Hb * g.Wa * g.Ha) % g.Cin, b = idx / (g.Wb * g.Hb * g.Wa * g.Ha * g.Cin);
    const int s = g.s, Ha = static_cast<int>(g.Ha), Wa = static_cast<int>(g.Wa);
    const int Hp = static_cast<int>(g.Hp), Wp = static_cast<int>(g.Wp);
    const bool kept = h % s == 0 && w % s == 0;  // support position kept by the pruning
    A acc = 0;
    for (int64_t o = 0; o < g.Cout; ++o) {
      const T* gyo = gy + (b * g.Cout + o) * S;
      const T* wso = ws + (o * g.Cin + c) * ks2;
      const T* wqo = wq + (o * g.Cin + c) * kq2;
      // support conv: output (p,q) with p*s + dy - ps = h
      for (int dy = 0; dy < g.ks; ++dy) {
        const int ph = h + ps - dy;
        if (ph < 0 || ph % s != 0 || ph / s >= Hp) continue;
        for (int dx = 0; dx < g.ks; ++dx) {
          const int qw = w + ps - dx;
          if (qw < 0 || qw % s != 0 || qw / s >= Wp) continue;
          acc += to_acc(wso[dy * g.ks + dx]) * to_acc(gyo[((int64_t(i) * Wa + j) * Hp + ph / s) * Wp + qw / s]);
        }
      }
      // query conv: only kept support positions, output (i', j') with i' + dy - pq = i
      if (!kept) continue;
      for (int dy = 0; dy < g.kq; ++dy) {
        const int ii = i - dy + pq;
        if (ii < 0 || ii >= Ha) continue;
        for (int dx = 0; dx < g.kq; ++dx) {
          const int jj = j - dx + pq;
          if (jj < 0 || jj >= Wa) continue;
          acc += to_acc(wqo[dy * g.kq + dx]) * to_acc(gyo[((int64_t(ii) * Wa + jj) * Hp + h / s) * Wp + w / s]);
        }
      }
    }
    gx[idx] = from_acc<T>(acc);
  }
}

// grid (kq*kq + ks*ks, Cin, Cout): one block per weight, reducing over (b, i, j, p, q).
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cp_conv4d_grad_w_kernel(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gwq, T* __restrict__ gws,
                        Geo g) {
  __shared__ A scratch[kWarp];
  const int kq2 = g.kq * g.kq, pq = g.kq / 2, ps = g.ks / 2;
  const int t = blockIdx.x;
  const int64_t c = blockIdx.y, o = blockIdx.z;
  const bool query_tap = t < kq2;
  const int k = query_tap ? g.kq : g.ks, tt = query_tap ? t : t - kq2, dy = tt / k, dx = tt % k;
  const int64_t S = g.Ha * g.Wa * g.Hp * g.Wp, plane = g.Ha * g.Wa * g.Hb * g.Wb;
  A acc = 0;
  for (int64_t e = threadIdx.x; e < g.B * S; e += blockDim.x) {
    const int64_t b = e / S, r = e % S;
    const int64_t q = r % g.Wp, p = r / g.Wp % g.Hp, j = r / (g.Wp * g.Hp) % g.Wa, i = r / (g.Wp * g.Hp * g.Wa);
    const T* xc = x + (b * g.Cin + c) * plane;
    int64_t ii = i, jj = j, hh = p * g.s, ww = q * g.s;
    if (query_tap) { ii += dy - pq; jj += dx - pq; }
    else { hh += dy - ps; ww += dx - ps; }
    if (ii < 0 || ii >= g.Ha || jj < 0 || jj >= g.Wa || hh < 0 || hh >= g.Hb || ww < 0 || ww >= g.Wb) continue;
    acc += to_acc(gy[(b * g.Cout + o) * S + r]) * to_acc(xc[((ii * g.Wa + jj) * g.Hb + hh) * g.Wb + ww]);
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) {
    if (query_tap) gwq[(o * g.Cin + c) * kq2 + tt] = from_acc<T>(acc);
    else gws[(o * g.Cin + c) * g.ks * g.ks + tt] = from_acc<T>(acc);
  }
}

// grid (Cout): db[o] = sum over (b, i, j, p, q) of dy[b,o,...]; the same for both biases.
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cp_conv4d_grad_b_kernel(const T* __restrict__ gy, T* __restrict__ gb, Geo g) {
  __shared__ A scratch[kWarp];
  const int64_t o = blockIdx.x, S = g.Ha * g.Wa * g.Hp * g.Wp;
  A acc = 0;
  for (int64_t e = threadIdx.x; e < g.B * S; e += blockDim.x) acc += to_acc(gy[(e / S * g.Cout + o) * S + e % S]);
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) gb[o] = from_acc<T>(acc);
}

template <typename T>
void forward_impl(const T* x, const T* wq, const T* bq, const T* ws, const T* bs, T* y, const Geo& g,
                  cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t S = g.Ha * g.Wa * g.Hp * g.Wp;
  const size_t smem = sizeof(A) * kCinTile * (g.kq * g.kq + g.ks * g.ks);
  launch(cp_conv4d_forward_kernel<T, A>, dim3(ceil_div(S, kBlock), static_cast<unsigned>(g.Cout),
                                              static_cast<unsigned>(g.B)),
         dim3(kBlock), smem, stream, x, wq, bq, ws, bs, y, g);
}

template <typename T>
void backward_impl(const T* gy, const T* x, const T* wq, const T* ws, T* gx, T* gwq, T* gws, T* gb, const Geo& g,
                   cudaStream_t stream) {
  using A = acc_t<T>;
  if (gx) {
    const int64_t total = g.B * g.Cin * g.Ha * g.Wa * g.Hb * g.Wb;
    const int blocks = static_cast<int>(ceil_div(total, kBlock) < 65535 ? ceil_div(total, kBlock) : 65535);
    launch(cp_conv4d_grad_x_kernel<T, A>, dim3(blocks > 0 ? blocks : 1), dim3(kBlock), 0, stream, gy, wq, ws, gx, g);
  }
  if (gwq && gws)
    launch(cp_conv4d_grad_w_kernel<T, A>, dim3(g.kq * g.kq + g.ks * g.ks, static_cast<unsigned>(g.Cin),
                                               static_cast<unsigned>(g.Cout)),
           dim3(kBlock), 0, stream, gy, x, gwq, gws, g);
  if (gb) launch(cp_conv4d_grad_b_kernel<T, A>, dim3(static_cast<unsigned>(g.Cout)), dim3(kBlock), 0, stream, gy, gb, g);
}

}  // namespace

int cp_conv4d_forward(DType dt, const void* x, const void* weight_q, const void* bias_q, const void* weight_s,
                      const void* bias_s, void* out, const Conv4dShape& s, cudaStream_t stream) {
  const Geo g(s);
  TLG_DISPATCH_DTYPE(dt, forward_impl<scalar_t>(
      static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(weight_q), static_cast<const scalar_t*>(bias_q),
      static_cast<const scalar_t*>(weight_s), static_cast<const scalar_t*>(bias_s), static_cast<scalar_t*>(out), g,
      stream));
  return static_cast<int>(cudaGetLastError());
}

int cp_conv4d_backward(DType dt, const void* grad_out, const void* x, const void* weight_q, const void* weight_s,
                       void* grad_x, void* grad_weight_q, void* grad_weight_s, void* grad_bias, const Conv4dShape& s,
                       cudaStream_t stream) {
  const Geo g(s);
  TLG_DISPATCH_DTYPE(dt, backward_impl<scalar_t>(
      static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(x),
      static_cast<const scalar_t*>(weight_q), static_cast<const scalar_t*>(weight_s),
      static_cast<scalar_t*>(grad_x), static_cast<scalar_t*>(grad_weight_q), static_cast<scalar_t*>(grad_weight_s),
      static_cast<scalar_t*>(grad_bias), g, stream));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace tlg_cuda
