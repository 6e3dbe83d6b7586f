// 3x3 convolution over a 2-D grid by Winograd's minimal filtering F(2x2, 3x3)
// (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).
//
// The center-pivot kernel's query-dims convolution has a trailing batch dim: the input is
// (C, H W, n) with n support positions innermost, the output (M, H W, n). Per 2x2 output tile and
// per channel pair it needs 16 multiplies instead of 36:
//
//   Y = Aᵀ [ Σ_c (G g_{o,c} Gᵀ) ⊙ (Bᵀ d_c B) ] A,   d_c the 4x4 input patch (zero padding 1),
//
// i.e. one GEMM (M x C) · (C x tiles n) per each of the 16 transform positions, between an input
// and an output transform of adds only. The transforms are exact in binary arithmetic (factors 1
// and 1/2), so results differ from the direct sum by rounding only.
#pragma once

#include "common.h"

#include <vector>

namespace tlg_cpu {

// U[ξ, o, c] = (G w[o, c] Gᵀ)[ξ] for w (M, C, 3, 3); G = [[1,0,0], [½,½,½], [½,-½,½], [0,0,1]].
template <typename T>
std::vector<T> winograd_weights(const T* w, int64_t m, int64_t c) {
  std::vector<T> u(16 * m * c);
  for (int64_t o = 0; o < m; ++o)
    for (int64_t i = 0; i < c; ++i) {
      const T* g = w + (o * c + i) * 9;
      T gg[4][3];  // G g
      for (int j = 0; j < 3; ++j) {
        gg[0][j] = g[j];
        gg[1][j] = T(0.5) * (g[j] + g[3 + j] + g[6 + j]);
        gg[2][j] = T(0.5) * (g[j] - g[3 + j] + g[6 + j]);
        gg[3][j] = g[6 + j];
      }
      for (int r = 0; r < 4; ++r) {  // (G g) Gᵀ
        const T row[4] = {gg[r][0], T(0.5) * (gg[r][0] + gg[r][1] + gg[r][2]),
                          T(0.5) * (gg[r][0] - gg[r][1] + gg[r][2]), gg[r][2]};
        for (int q = 0; q < 4; ++q) u[((r * 4 + q) * m + o) * c + i] = row[q];
      }
    }
  return u;
}

// Per-thread buffers of one call: transformed input (16 x C x N), products (16 x M x N) and rows.
template <typename T>
struct WinogradScratch {
  std::vector<T> v, prod, rows, zero;
};

// Tiles of the rows [r0, r1) (r0 even): tile rows ty0 .. ty1-1, tw tiles each; N = tiles x n columns.
struct WinogradTiles {
  int64_t ty0, ty1, tw, N;
  WinogradTiles(int64_t wd, int64_t n, int64_t r0, int64_t r1)
      : ty0(r0 / 2), ty1((r1 + 1) / 2), tw((wd + 1) / 2), N((ty1 - ty0) * tw * n) {}
};

template <typename T>
T* grown(std::vector<T>& v, int64_t size) {
  if (static_cast<int64_t>(v.size()) < size) v.resize(size);
  return v.data();
}

// v[ξ, ci, (tile, j)] = (Bᵀ d B)[ξ], d the 4x4 patch of `in` (C, h wd, n) at each tile, zeros outside;
// Bᵀ = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]]. Separable: along y on whole grid rows
// (wd n contiguous values), then along x on the 4 columns of each tile.
template <typename T>
void winograd_input(const T* in, int64_t c, int64_t h, int64_t wd, int64_t n, const WinogradTiles& tl, T* v,
                    WinogradScratch<T>& s) {
  const int64_t rowlen = (2 * tl.tw + 2) * n, N = tl.N;  // a row with a zero column before, 1-2 after
  T* rows = grown(s.rows, 4 * rowlen);
  std::fill(rows, rows + 4 * rowlen, T(0));
  s.zero.assign(wd * n, T(0));
  T* t[4] = {rows, rows + rowlen, rows + 2 * rowlen, rows + 3 * rowlen};
  for (int64_t ci = 0; ci < c; ++ci)
    for (int64_t ty = tl.ty0; ty < tl.ty1; ++ty) {
      const T* d[4];  // input rows 2ty-1 .. 2ty+2
      for (int r = 0; r < 4; ++r) {
        const int64_t y = 2 * ty - 1 + r;
        d[r] = (y >= 0 && y < h) ? in + (ci * h + y) * wd * n : s.zero.data();
      }
      for (int64_t e = 0; e < wd * n; ++e) {
        t[0][n + e] = d[0][e] - d[2][e];
        t[1][n + e] = d[1][e] + d[2][e];
        t[2][n + e] = d[2][e] - d[1][e];
        t[3][n + e] = d[1][e] - d[3][e];
      }
      const int64_t col0 = (ty - tl.ty0) * tl.tw * n;
      for (int r = 0; r < 4; ++r) {  // tile tx reads columns 2tx .. 2tx+3 of t[r]
        T* v0 = v + ((r * 4 + 0) * c + ci) * N + col0;
        T* v1 = v + ((r * 4 + 1) * c + ci) * N + col0;
        T* v2 = v + ((r * 4 + 2) * c + ci) * N + col0;
        T* v3 = v + ((r * 4 + 3) * c + ci) * N + col0;
        for (int64_t tx = 0; tx < tl.tw; ++tx) {
          const T* x = t[r] + 2 * tx * n;
          for (int64_t j = 0; j < n; ++j) {
            const T a0 = x[j], a1 = x[n + j], a2 = x[2 * n + j], a3 = x[3 * n + j];
            v0[tx * n + j] = a0 - a2;
            v1[tx * n + j] = a1 + a2;
            v2[tx * n + j] = a2 - a1;
            v3[tx * n + j] = a1 - a3;
          }
        }
      }
    }
}

// out[o, (y - r0) wd + x, j] += (Aᵀ P A)[y, x] per tile, P = prod[:, o, (tile, j)] (16 x M x N);
// Aᵀ = [[1,1,1,0], [0,1,-1,-1]]; rows >= r1 and columns >= wd are cut off. Along y, then along x.
template <typename T>
void winograd_output(const T* p, int64_t m, int64_t wd, int64_t n, int64_t r0, int64_t r1, const WinogradTiles& tl,
                     T* out, int64_t ld, WinogradScratch<T>& s) {
  const int64_t N = tl.N;
  T* a = grown(s.rows, 8 * N);
  for (int64_t o = 0; o < m; ++o) {
    for (int q = 0; q < 4; ++q) {
      const T *m0 = p + (q * m + o) * N, *m1 = p + ((4 + q) * m + o) * N, *m2 = p + ((8 + q) * m + o) * N,
              *m3 = p + ((12 + q) * m + o) * N;
      T *s0 = a + q * N, *s1 = a + (4 + q) * N;
      for (int64_t e = 0; e < N; ++e) {
        s0[e] = m0[e] + m1[e] + m2[e];
        s1[e] = m1[e] - m2[e] - m3[e];
      }
    }
    for (int64_t ty = tl.ty0; ty < tl.ty1; ++ty)
      for (int rr = 0; rr < 2 && 2 * ty + rr < r1; ++rr) {
        const T* sr = a + rr * 4 * N + (ty - tl.ty0) * tl.tw * n;
        T* y = out + o * ld + (2 * ty + rr - r0) * wd * n;
        for (int64_t tx = 0; tx < tl.tw; ++tx) {
          const bool col1 = 2 * tx + 1 < wd;
          for (int64_t j = 0; j < n; ++j) {
            const int64_t e = tx * n + j;
            const T b0 = sr[e], b1 = sr[N + e], b2 = sr[2 * N + e], b3 = sr[3 * N + e];
            y[2 * tx * n + j] += b0 + b1 + b2;
            if (col1) y[(2 * tx + 1) * n + j] += b1 - b2 - b3;
          }
        }
      }
  }
}

// out[o, (y - r0) wd + x, j] += Σ_c Σ_{dy,dx} w[o, c, dy, dx] in[c, (y + dy - 1) wd + (x + dx - 1), j]
// for the rows y in [r0, r1) (r0 even) of an (h, wd) grid with n batch entries per position;
// `u` from winograd_weights; out has row stride `ld` per output channel.
template <typename T>
void winograd_conv3x3_rows(const std::vector<T>& u, int64_t m, int64_t c, const T* in, int64_t h, int64_t wd,
                           int64_t n, int64_t r0, int64_t r1, T* out, int64_t ld, WinogradScratch<T>& s) {
  const WinogradTiles tl(wd, n, r0, r1);
  T* v = grown(s.v, 16 * c * tl.N);
  T* p = grown(s.prod, 16 * m * tl.N);
  winograd_input(in, c, h, wd, n, tl, v, s);
  for (int xi = 0; xi < 16; ++xi)
    gemm<T>(false, false, m, tl.N, c, T(1), u.data() + xi * m * c, c, v + xi * c * tl.N, tl.N, T(0),
            p + xi * m * tl.N, tl.N);
  winograd_output(p, m, wd, n, r0, r1, tl, out, ld, s);
}

// The weight gradient of winograd_conv3x3_rows, before its last step: acc[ξ, o, c] +=
// Σ_{tiles, j} (A g Aᵀ)[ξ] (Bᵀ d B)[ξ] for the 2x2 tiles g of `grad` (M, h wd, n) in the rows [r0, r1)
// (zero beyond r1 and wd) and the input patches d of `in`; A = [[1,0], [1,1], [1,-1], [0,-1]].
// The adjoint of Y = Aᵀ [(G w Gᵀ) ⊙ V] A in w is Gᵀ [(A dY Aᵀ) ⊙ V] G: see winograd_weight_grad_finish.
template <typename T>
void winograd_weight_grad_rows(const T* grad, int64_t m, const T* in, int64_t c, int64_t h, int64_t wd, int64_t n,
                               int64_t r0, int64_t r1, T* acc, WinogradScratch<T>& s) {
  const WinogradTiles tl(wd, n, r0, r1);
  const int64_t N = tl.N;
  T* v = grown(s.v, 16 * c * N);
  T* e = grown(s.prod, 16 * m * N);
  winograd_input(in, c, h, wd, n, tl, v, s);
  const int64_t rowlen = (2 * tl.tw) * n;  // a grad row with a zero column after an odd width
  T* rows = grown(s.rows, 4 * rowlen);
  s.zero.assign(rowlen, T(0));
  for (int64_t o = 0; o < m; ++o)
    for (int64_t ty = tl.ty0; ty < tl.ty1; ++ty) {
      const T* g0 = grad + (o * h + 2 * ty) * wd * n - r0 * wd * n;
      const T* g1 = 2 * ty + 1 < r1 ? g0 + wd * n : s.zero.data();
      T *t0 = rows, *t1 = rows + rowlen, *t2 = rows + 2 * rowlen, *t3 = rows + 3 * rowlen;
      for (int64_t x = 0; x < wd * n; ++x) {  // along y: A [g0; g1]
        t0[x] = g0[x];
        t1[x] = g0[x] + g1[x];
        t2[x] = g0[x] - g1[x];
        t3[x] = -g1[x];
      }
      for (int r = 0; r < 4; ++r) {
        T* tr = rows + r * rowlen;
        std::fill(tr + wd * n, tr + rowlen, T(0));
        const int64_t col0 = (ty - tl.ty0) * tl.tw * n;
        T* e0 = e + ((r * 4 + 0) * m + o) * N + col0;
        T* e1 = e + ((r * 4 + 1) * m + o) * N + col0;
        T* e2 = e + ((r * 4 + 2) * m + o) * N + col0;
        T* e3 = e + ((r * 4 + 3) * m + o) * N + col0;
        for (int64_t tx = 0; tx < tl.tw; ++tx)  // along x: columns 2tx, 2tx+1
          for (int64_t j = 0; j < n; ++j) {
            const T a0 = tr[2 * tx * n + j], a1 = tr[(2 * tx + 1) * n + j];
            e0[tx * n + j] = a0;
            e1[tx * n + j] = a0 + a1;
            e2[tx * n + j] = a0 - a1;
            e3[tx * n + j] = -a1;
          }
      }
    }
  for (int xi = 0; xi < 16; ++xi)
    gemm<T>(false, true, m, c, N, T(1), e + xi * m * N, N, v + xi * c * N, N, T(1), acc + xi * m * c, c);
}

// dw[o, c] += Gᵀ acc[:, o, c] G (3x3 from the 4x4 of acc); Gᵀ = [[1,½,½,0], [0,½,-½,0], [0,½,½,1]].
template <typename T>
void winograd_weight_grad_finish(const T* acc, int64_t m, int64_t c, T* dw) {
  for (int64_t o = 0; o < m; ++o)
    for (int64_t i = 0; i < c; ++i) {
      T a[4][4], b[3][4];
      for (int xi = 0; xi < 16; ++xi) a[xi / 4][xi % 4] = acc[(xi * m + o) * c + i];
      for (int q = 0; q < 4; ++q) {
        b[0][q] = a[0][q] + T(0.5) * (a[1][q] + a[2][q]);
        b[1][q] = T(0.5) * (a[1][q] - a[2][q]);
        b[2][q] = T(0.5) * (a[1][q] + a[2][q]) + a[3][q];
      }
      T* d = dw + (o * c + i) * 9;
      for (int r = 0; r < 3; ++r) {
        d[r * 3 + 0] += b[r][0] + T(0.5) * (b[r][1] + b[r][2]);
        d[r * 3 + 1] += T(0.5) * (b[r][1] - b[r][2]);
        d[r * 3 + 2] += T(0.5) * (b[r][1] + b[r][2]) + b[r][3];
      }
    }
}

}  // namespace tlg_cpu
