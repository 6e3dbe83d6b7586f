// Center-pivot 4D convolution on the CPU (semantics: tlg/ops/reference.py::cp_conv4d).
//
// Per batch element x is (Cin, P, S) with P = Ha Wa query and S = Hb Wb support positions, the output
// y is (Cout, P, Sp). For an output support position p (kept input position s_p = (s py, s px)):
//
//   y[:, a, p] = Wq (Cout x Cin kq²) · x[:, a + d_t, s_p]_t             (conv over the query dims)
//              + Σ_{t ∈ T_p} Ws[:, :, t] · x[:, a, src_p(t)]             (conv over the support dims)
//              + bias_q + bias_s
//
// Tasks are chunks of query positions; each owns the disjoint slab y[:, chunk, :] (and the rows
// x[:, chunk, :] of grad_x in the backward). A task builds its operand in a per-thread buffer with
// columns (a, p) in y's own order and runs one GEMM that writes y[:, chunk, :] in place: no permutes
// of x or y, the stride pruning folded into the gather (s_p, src_p).
//  * dense path: the support taps join that GEMM (zeros where a tap reads padding);
//  * per-position path, when more than half of the support taps would read padding (HSNet's mixing
//    blocks on 2x2 grids keep 4 of 9 taps): the main GEMM has the query taps only, and each p adds
//    a GEMM over its own valid taps T_p.

#include "common.h"

#include <map>
#include <tuple>
#include <vector>

namespace tlg_cpu {
namespace {

struct Geometry {
  int64_t nb, cin, cout, ha, wa, hb, wb, hp, wp, P, S, Sp, kq, ks, kq2, stride;
  std::vector<int64_t> ay, ax;           // query position a -> (row, col)
  std::vector<int64_t> kept;             // p -> support index s_p
  std::vector<int> pack_of;              // p -> index of its tap set
  std::vector<std::vector<int>> taps;    // tap set -> support taps t = dy ks + dx inside the grid
  std::vector<std::vector<int64_t>> src; // p -> support index read by each tap of its set
  bool dense;             // few support taps read padding: they join the main GEMM (else per-p GEMMs)
  int64_t chunk, nchunks;  // query positions per task

  Geometry(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, int64_t s) : stride(s) {
    nb = x.size(0), cin = x.size(1), ha = x.size(2), wa = x.size(3), hb = x.size(4), wb = x.size(5);
    cout = wq.size(0), kq = wq.size(2), ks = ws.size(2), kq2 = kq * kq;
    hp = (hb + s - 1) / s, wp = (wb + s - 1) / s;
    P = ha * wa, S = hb * wb, Sp = hp * wp;
    for (int64_t a = 0; a < P; ++a) ay.push_back(a / wa), ax.push_back(a % wa);
    const int64_t rs = ks / 2;
    std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, int> index;
    for (int64_t py = 0; py < hp; ++py)
      for (int64_t px = 0; px < wp; ++px) {
        kept.push_back(py * s * wb + px * s);
        // valid dy: 0 <= py s + dy - rs < hb, likewise dx
        const int64_t y0 = std::max<int64_t>(0, rs - py * s), y1 = std::min<int64_t>(ks, hb + rs - py * s);
        const int64_t x0 = std::max<int64_t>(0, rs - px * s), x1 = std::min<int64_t>(ks, wb + rs - px * s);
        auto key = std::make_tuple(y0, y1, x0, x1);
        auto it = index.find(key);
        if (it == index.end()) {
          std::vector<int> t;
          for (int64_t dy = y0; dy < y1; ++dy)
            for (int64_t dx = x0; dx < x1; ++dx) t.push_back(dy * ks + dx);
          it = index.emplace(key, static_cast<int>(taps.size())).first;
          taps.push_back(t);
        }
        pack_of.push_back(it->second);
        std::vector<int64_t> sp;
        for (int t : taps[it->second]) sp.push_back((py * s + t / ks - rs) * wb + (px * s + t % ks - rs));
        src.push_back(sp);
      }
    int64_t valid = 0;
    for (int64_t p = 0; p < Sp; ++p) valid += taps[pack_of[p]].size();
    dense = 2 * valid >= Sp * ks * ks;  // at most half of the support taps read padding
    // Query chunk: the main operand (K_main x chunk Sp) up to 2 MiB; MKL blocks it for cache.
    const int64_t k_main = cin * (kq2 + (dense ? ks * ks : 0));
    chunk = std::min(P, std::max<int64_t>(1, (1 << 19) / std::max<int64_t>(k_main * Sp, 1)));
    nchunks = (P + chunk - 1) / chunk;
  }
  int64_t nt(int64_t p) const { return taps[pack_of[p]].size(); }
};

// ---- operands of one query chunk [a0, a0 + na); columns (i, p) in y's own order, N = na Sp ----
// Query taps: col[(c, t), (i, p)] = x[c, a0 + i + d_t, s_p] (0 in the query padding); each row segment
// copies from one contiguous x[c, a, :] row.
template <typename T>
void query_cols(const Geometry& g, const T* xb, int64_t a0, int64_t na, T* col) {
  const int64_t n = na * g.Sp, rq = g.kq / 2;
  for (int64_t c = 0; c < g.cin; ++c)
    for (int64_t t = 0; t < g.kq2; ++t) {
      const int64_t dy = t / g.kq - rq, dx = t % g.kq - rq;
      for (int64_t i = 0; i < na; ++i) {
        T* out = col + (c * g.kq2 + t) * n + i * g.Sp;
        const int64_t qy = g.ay[a0 + i] + dy, qx = g.ax[a0 + i] + dx;
        if (qy < 0 || qy >= g.ha || qx < 0 || qx >= g.wa) {
          std::fill(out, out + g.Sp, T(0));
        } else {
          const T* in = xb + c * g.P * g.S + (qy * g.wa + qx) * g.S;
          for (int64_t p = 0; p < g.Sp; ++p) out[p] = in[g.kept[p]];
        }
      }
    }
}

// All support taps (dense path): col[(c, t), (i, p)] = x[c, a0 + i, src_p(t)], 0 where t reads padding.
template <typename T>
void support_cols(const Geometry& g, const T* xb, int64_t a0, int64_t na, T* col) {
  const int64_t n = na * g.Sp, rs = g.ks / 2, ks2 = g.ks * g.ks;
  for (int64_t c = 0; c < g.cin; ++c)
    for (int64_t t = 0; t < ks2; ++t) {
      const int64_t dy = t / g.ks - rs, dx = t % g.ks - rs;
      for (int64_t i = 0; i < na; ++i) {
        T* out = col + (c * ks2 + t) * n + i * g.Sp;
        const T* in = xb + c * g.P * g.S + (a0 + i) * g.S;
        for (int64_t py = 0; py < g.hp; ++py) {
          const int64_t sy = py * g.stride + dy;
          for (int64_t px = 0; px < g.wp; ++px) {
            const int64_t sx = px * g.stride + dx;
            out[py * g.wp + px] = (sy >= 0 && sy < g.hb && sx >= 0 && sx < g.wb) ? in[sy * g.wb + sx] : T(0);
          }
        }
      }
    }
}

// The valid support taps of one p (per-position path): col[(c, ti), i] = x[c, a0 + i, src_p(ti)].
template <typename T>
void support_cols_at(const Geometry& g, const T* xb, int64_t p, int64_t a0, int64_t na, T* col) {
  const auto& src = g.src[p];
  const int64_t nt = src.size();
  for (int64_t c = 0; c < g.cin; ++c)
    for (int64_t ti = 0; ti < nt; ++ti) {
      const T* in = xb + c * g.P * g.S + a0 * g.S + src[ti];
      T* out = col + (c * nt + ti) * na;
      for (int64_t i = 0; i < na; ++i) out[i] = in[i * g.S];
    }
}

// The main GEMM's weights: Wq (per-position path) or [Wq | Ws] (dense path), Cout x K_main.
template <typename T>
std::vector<T> main_weights(const Geometry& g, const T* wq, const T* ws) {
  const int64_t qc = g.cin * g.kq2, sc = g.dense ? g.cin * g.ks * g.ks : 0, k = qc + sc;
  std::vector<T> w(g.cout * k);
  for (int64_t o = 0; o < g.cout; ++o) {
    std::copy(wq + o * qc, wq + (o + 1) * qc, w.begin() + o * k);
    std::copy(ws + o * sc, ws + (o + 1) * sc, w.begin() + o * k + qc);
  }
  return w;
}

// Per tap set (per-position path): Ws restricted to the set, Cout x Cin |T|.
template <typename T>
std::vector<std::vector<T>> tap_weights(const Geometry& g, const T* ws) {
  std::vector<std::vector<T>> packs;
  const int64_t ks2 = g.ks * g.ks;
  for (const auto& taps : g.taps) {
    const int64_t nt = taps.size();
    std::vector<T> w(g.cout * g.cin * nt);
    for (int64_t o = 0; o < g.cout; ++o)
      for (int64_t c = 0; c < g.cin; ++c)
        for (int64_t ti = 0; ti < nt; ++ti) w[(o * g.cin + c) * nt + ti] = ws[(o * g.cin + c) * ks2 + taps[ti]];
    packs.push_back(std::move(w));
  }
  return packs;
}

template <typename T>
void main_cols(const Geometry& g, const T* xb, int64_t a0, int64_t na, T* col) {
  query_cols(g, xb, a0, na, col);
  if (g.dense) support_cols(g, xb, a0, na, col + g.cin * g.kq2 * na * g.Sp);
}

// y[:, chunk, :] = W_main col_main (+ per p: Ws_p col_s(p)) + bias
template <typename T>
void forward_impl(const Geometry& g, const T* x, const T* wq, const T* ws, const T* bias, T* y) {
  const auto w = main_weights(g, wq, ws);
  const auto packs = g.dense ? std::vector<std::vector<T>>() : tap_weights(g, ws);
  const int64_t k = g.cin * (g.kq2 + (g.dense ? g.ks * g.ks : 0)), ldy = g.P * g.Sp;
#pragma omp parallel
  {
    std::vector<T> col, cs, tmp;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < g.nb * g.nchunks; ++task) {
      const int64_t b = task / g.nchunks, a0 = (task % g.nchunks) * g.chunk, na = std::min(g.chunk, g.P - a0);
      const int64_t n = na * g.Sp;
      const T* xb = x + b * g.cin * g.P * g.S;
      T* yc = y + b * g.cout * ldy + a0 * g.Sp;
      col.resize(k * n);
      main_cols(g, xb, a0, na, col.data());
      gemm<T>(false, false, g.cout, n, k, T(1), w.data(), k, col.data(), n, T(0), yc, ldy);
      for (int64_t o = 0; o < g.cout; ++o)
        for (int64_t j = 0; j < n; ++j) yc[o * ldy + j] += bias[o];
      if (g.dense) continue;
      tmp.resize(g.cout * na);
      for (int64_t p = 0; p < g.Sp; ++p) {
        const int64_t kp = g.cin * g.nt(p);
        cs.resize(kp * na);
        support_cols_at(g, xb, p, a0, na, cs.data());
        gemm<T>(false, false, g.cout, na, kp, T(1), packs[g.pack_of[p]].data(), kp, cs.data(), na, T(0), tmp.data(), na);
        for (int64_t o = 0; o < g.cout; ++o)
          for (int64_t i = 0; i < na; ++i) yc[o * ldy + i * g.Sp + p] += tmp[o * na + i];
      }
    }
  }
}

// Gradients, per query chunk (tasks own disjoint rows of grad_x):
//   dW_main += dy_chunk col_mainᵀ;  per p (per-position path): dWs_p += dy_p col_s(p)ᵀ;
//   support part of dx: (Wsᵀ dy) scattered to the taps' sources x[:, a, src] (inside the chunk's rows);
//   query part of dx as a gather: dx[:, a, s_p] += Wq_flippedᵀ col_q(dy)[:, (a, p)], nothing written
//   outside the chunk.
template <typename T>
void backward_impl(const Geometry& g, const T* x, const T* wq, const T* ws, const T* dy, T* dx, T* dwq, T* dws) {
  const auto w = main_weights(g, wq, ws);
  const auto packs = g.dense ? std::vector<std::vector<T>>() : tap_weights(g, ws);
  const int64_t qc = g.cin * g.kq2, ks2 = g.ks * g.ks, k = qc + (g.dense ? g.cin * ks2 : 0), ldy = g.P * g.Sp;
  const int64_t rq = g.kq / 2, rs = g.ks / 2, npk = packs.size();
  std::vector<T> wf(g.cin * g.cout * g.kq2);  // wf[c, (o, u)] = Wq[o, c, kq²-1-u]
  for (int64_t c = 0; c < g.cin; ++c)
    for (int64_t o = 0; o < g.cout; ++o)
      for (int64_t u = 0; u < g.kq2; ++u) wf[(c * g.cout + o) * g.kq2 + u] = wq[(o * g.cin + c) * g.kq2 + g.kq2 - 1 - u];
  const int nthr = num_threads();
  std::vector<std::vector<T>> dw_thr(nthr);                // per thread: Cout x K_main
  std::vector<std::vector<std::vector<T>>> dwp_thr(nthr);  // per thread, per tap set: Cout x Cin |T|
  if (dwq)
    for (int i = 0; i < nthr; ++i) {
      dw_thr[i].assign(g.cout * k, T(0));
      for (int64_t pk = 0; pk < npk; ++pk) dwp_thr[i].emplace_back(packs[pk].size(), T(0));
    }
#pragma omp parallel num_threads(nthr)
  {
    std::vector<T> col, cs, dyp, dcol, dcolq, dxq;
    const int tid = thread_id();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < g.nb * g.nchunks; ++task) {
      const int64_t b = task / g.nchunks, a0 = (task % g.nchunks) * g.chunk, na = std::min(g.chunk, g.P - a0);
      const int64_t n = na * g.Sp;
      const T* xb = x + b * g.cin * g.P * g.S;
      const T* dyb = dy + b * g.cout * ldy;
      const T* dyc = dyb + a0 * g.Sp;  // Cout x n, row stride ldy
      T* dxb = dx ? dx + b * g.cin * g.P * g.S : nullptr;
      if (dwq) {
        col.resize(k * n);
        main_cols(g, xb, a0, na, col.data());
        gemm<T>(false, true, g.cout, k, n, T(1), dyc, ldy, col.data(), n, T(1), dw_thr[tid].data(), k);
      }
      if (g.dense && dx) {  // support part, all taps
        dcol.resize(g.cin * ks2 * n);
        gemm<T>(true, false, g.cin * ks2, n, g.cout, T(1), w.data() + qc, k, dyc, ldy, T(0), dcol.data(), n);
        for (int64_t c = 0; c < g.cin; ++c)
          for (int64_t t = 0; t < ks2; ++t) {
            const int64_t dy_ = t / g.ks - rs, dx_ = t % g.ks - rs;
            for (int64_t i = 0; i < na; ++i) {
              const T* in = dcol.data() + (c * ks2 + t) * n + i * g.Sp;
              T* out = dxb + c * g.P * g.S + (a0 + i) * g.S;
              for (int64_t py = 0; py < g.hp; ++py) {
                const int64_t sy = py * g.stride + dy_;
                if (sy < 0 || sy >= g.hb) continue;
                for (int64_t px = 0; px < g.wp; ++px) {
                  const int64_t sx = px * g.stride + dx_;
                  if (sx >= 0 && sx < g.wb) out[sy * g.wb + sx] += in[py * g.wp + px];
                }
              }
            }
          }
      }
      if (!g.dense) {  // support part, per p with its valid taps
        dyp.resize(g.cout * na);
        for (int64_t p = 0; p < g.Sp; ++p) {
          const int64_t nt = g.nt(p), kp = g.cin * nt, pk = g.pack_of[p];
          for (int64_t o = 0; o < g.cout; ++o)
            for (int64_t i = 0; i < na; ++i) dyp[o * na + i] = dyc[o * ldy + i * g.Sp + p];
          if (dwq) {
            cs.resize(kp * na);
            support_cols_at(g, xb, p, a0, na, cs.data());
            gemm<T>(false, true, g.cout, kp, na, T(1), dyp.data(), na, cs.data(), na, T(1), dwp_thr[tid][pk].data(), kp);
          }
          if (dx) {
            dcol.resize(kp * na);
            gemm<T>(true, false, kp, na, g.cout, T(1), packs[pk].data(), kp, dyp.data(), na, T(0), dcol.data(), na);
            const auto& src = g.src[p];
            for (int64_t c = 0; c < g.cin; ++c)
              for (int64_t ti = 0; ti < nt; ++ti) {
                T* out = dxb + c * g.P * g.S + a0 * g.S + src[ti];
                const T* in = dcol.data() + (c * nt + ti) * na;
                for (int64_t i = 0; i < na; ++i) out[i * g.S] += in[i];
              }
          }
        }
      }
      if (dx) {  // query part: dcolq[(o, u), (i, p)] = dy[o, a0 + i + d_u, p]
        dcolq.resize(g.cout * g.kq2 * n);
        for (int64_t o = 0; o < g.cout; ++o)
          for (int64_t u = 0; u < g.kq2; ++u) {
            const int64_t dy_ = u / g.kq - rq, dx_ = u % g.kq - rq;
            for (int64_t i = 0; i < na; ++i) {
              T* out = dcolq.data() + (o * g.kq2 + u) * n + i * g.Sp;
              const int64_t qy = g.ay[a0 + i] + dy_, qx = g.ax[a0 + i] + dx_;
              if (qy < 0 || qy >= g.ha || qx < 0 || qx >= g.wa) {
                std::fill(out, out + g.Sp, T(0));
              } else {
                const T* in = dyb + o * ldy + (qy * g.wa + qx) * g.Sp;
                std::copy(in, in + g.Sp, out);
              }
            }
          }
        dxq.resize(g.cin * n);
        gemm<T>(false, false, g.cin, n, g.cout * g.kq2, T(1), wf.data(), g.cout * g.kq2, dcolq.data(), n, T(0),
                dxq.data(), n);
        for (int64_t c = 0; c < g.cin; ++c)
          for (int64_t i = 0; i < na; ++i) {
            T* out = dxb + c * g.P * g.S + (a0 + i) * g.S;
            const T* in = dxq.data() + c * n + i * g.Sp;
            for (int64_t p = 0; p < g.Sp; ++p) out[g.kept[p]] += in[p];
          }
      }
    }
  }
  if (dwq) {  // reduce the per-thread accumulators into (Cout, Cin, k, k)
    std::fill(dwq, dwq + g.cout * qc, T(0));
    std::fill(dws, dws + g.cout * g.cin * ks2, T(0));
    for (int i = 0; i < nthr; ++i) {
      const auto& main = dw_thr[i];
      for (int64_t o = 0; o < g.cout; ++o) {
        for (int64_t j = 0; j < qc; ++j) dwq[o * qc + j] += main[o * k + j];
        if (g.dense)
          for (int64_t j = 0; j < g.cin * ks2; ++j) dws[o * g.cin * ks2 + j] += main[o * k + qc + j];
      }
      for (int64_t pk = 0; pk < npk; ++pk) {
        const auto& taps = g.taps[pk];
        const int64_t nt = taps.size();
        for (int64_t o = 0; o < g.cout; ++o)
          for (int64_t c = 0; c < g.cin; ++c)
            for (int64_t ti = 0; ti < nt; ++ti)
              dws[(o * g.cin + c) * ks2 + taps[ti]] += dwp_thr[i][pk][(o * g.cin + c) * nt + ti];
      }
    }
  }
}

// dbias = Σ_{b, a, p} dy (the same for bias_q and bias_s).
template <typename T>
void bias_grad(const Geometry& g, const T* dy, T* db) {
#pragma omp parallel for
  for (int64_t o = 0; o < g.cout; ++o) {
    T acc = 0;
    for (int64_t b = 0; b < g.nb; ++b) {
      const T* d = dy + (b * g.cout + o) * g.P * g.Sp;
      for (int64_t i = 0; i < g.P * g.Sp; ++i) acc += d[i];
    }
    db[o] = acc;
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, int64_t stride) {
  check_cpu(x, "x");
  check_cpu(wq, "weight_q");
  check_cpu(ws, "weight_s");
  TORCH_CHECK(x.dim() == 6 && wq.dim() == 4 && ws.dim() == 4, "cp_conv4d: x must be 6-D and the weights 4-D");
  TORCH_CHECK(wq.size(1) == x.size(1) && ws.size(1) == x.size(1) && wq.size(0) == ws.size(0),
              "cp_conv4d: weight shapes do not match x");
  TORCH_CHECK(wq.size(2) == wq.size(3) && ws.size(2) == ws.size(3) && wq.size(2) % 2 == 1 && ws.size(2) % 2 == 1,
              "cp_conv4d: kernels must be odd and square");
  TORCH_CHECK(stride >= 1, "cp_conv4d: stride must be >= 1");
  TORCH_CHECK(wq.scalar_type() == x.scalar_type() && ws.scalar_type() == x.scalar_type(), "cp_conv4d: one dtype");
}

at::Tensor cp_conv4d_forward(const at::Tensor& x_, const at::Tensor& wq_, const c10::optional<at::Tensor>& bq,
                             const at::Tensor& ws_, const c10::optional<at::Tensor>& bs, int64_t stride) {
  check_inputs(x_, wq_, ws_, stride);
  const auto x = prepared(x_), wq = prepared(wq_), ws = prepared(ws_);
  Geometry g(x, wq, ws, stride);
  auto bias = at::zeros({g.cout}, x.options());  // bias_q + bias_s
  if (bq.has_value() && bq->defined()) bias += bq->to(x.scalar_type());
  if (bs.has_value() && bs->defined()) bias += bs->to(x.scalar_type());
  auto y = at::empty({g.nb, g.cout, g.ha, g.wa, g.hp, g.wp}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tlg_cp_conv4d_forward", [&] {
    forward_impl<scalar_t>(g, x.data_ptr<scalar_t>(), wq.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(),
                           bias.data_ptr<scalar_t>(), y.data_ptr<scalar_t>());
  });
  return y.to(x_.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cp_conv4d_backward(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& wq_, const at::Tensor& ws_, int64_t stride,
    std::array<bool, 3> output_mask) {
  check_inputs(x_, wq_, ws_, stride);
  const auto x = prepared(x_), wq = prepared(wq_), ws = prepared(ws_);
  const auto dy = grad_out.to(x.scalar_type()).contiguous();
  Geometry g(x, wq, ws, stride);
  TORCH_CHECK(dy.numel() == g.nb * g.cout * g.P * g.Sp, "cp_conv4d backward: grad_out has the wrong size");
  auto none = x.new_empty({0});
  auto dx = output_mask[0] ? at::zeros_like(x) : none;
  auto dwq = output_mask[1] ? at::empty_like(wq) : none;
  auto dws = output_mask[1] ? at::empty_like(ws) : none;
  auto db = output_mask[2] ? x.new_empty({g.cout}) : none;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tlg_cp_conv4d_backward", [&] {
    auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    if (output_mask[0] || output_mask[1])
      backward_impl<scalar_t>(g, x.data_ptr<scalar_t>(), wq.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(),
                              dy.data_ptr<scalar_t>(), ptr(dx), ptr(dwq), ptr(dws));
    if (output_mask[2]) bias_grad<scalar_t>(g, dy.data_ptr<scalar_t>(), ptr(db));
  });
  const auto dt = x_.scalar_type();
  return {dx.to(dt), dwq.to(dt), db.to(dt), dws.to(dt), db.clone().to(dt)};
}

}  // namespace
}  // namespace tlg_cpu

TORCH_LIBRARY_IMPL(tlg, CPU, m) {
  m.impl("cp_conv4d_forward", &tlg_cpu::cp_conv4d_forward);
  m.impl("cp_conv4d_backward", &tlg_cpu::cp_conv4d_backward);
}
