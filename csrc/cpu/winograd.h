// 3x3 convolution over a 2-D grid by Winograd's minimal filtering F(m x m, 3x3)
// (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).
//
// The center-pivot kernel's query-dims convolution has a trailing batch dim: the input is
// (C, H W, n) with n support positions innermost, the output (M, H W, n). Per m x m output tile,
// with α = m + 2 and d_c the α x α input patch (zero padding 1):
//
//   Y = Aᵀ [ Σ_c (G g_{o,c} Gᵀ) ⊙ (Bᵀ d_c B) ] A,
//
// one GEMM (M x C) · (C x tiles n) per each of the α² transform positions: α²/m² multiplies per
// output and channel pair instead of 9. Only F(2x2, 3x3) is instantiated (4 multiplies; adds and
// halvings in the transforms, exact in binary arithmetic): F(4x4, 3x3) (2.25 multiplies) measured
// slower here, its heavier transforms and 36 thinner GEMMs outweighing the saved multiplies.
#pragma once

#include "common.h"

#include <immintrin.h>

#include <vector>

namespace tlg_cpu {

template <int M>
struct WinogradF;

template <>
struct WinogradF<2> {  // Bᵀ (α x α), G (α x 3), Aᵀ (m x α)
  static constexpr int m = 2, a = 4;
  static constexpr double BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  static constexpr double AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

// U[ξ, j] = (G g_j Gᵀ)[ξ] for the M C kernels g_j = w[j] (3x3) of w (M, C, 3, 3), into u (α² x M C):
// separable, G along the kernel's rows then its columns; parallel over blocks of kBlockJ kernels, each
// written out row by row (U's α² rows lie M C apart: a store per row and kernel thrashed L1). With
// `flipped`, w is (C, M, 3, 3) and g_(m, c) = w[c, m] rotated by 180° (the kernel of the input gradient).
constexpr int64_t kBlockJ = 64;
template <int Mt, typename T>
void winograd_weights(const T* w, int64_t m, int64_t c, std::vector<T>& u, bool flipped = false) {
  using F = WinogradF<Mt>;
  constexpr int A = F::a;
  const int64_t mc = m * c;
  T* out = grow(u, A * A * mc);
#pragma omp parallel for schedule(static)
  for (int64_t j0 = 0; j0 < mc; j0 += kBlockJ) {
    const int64_t nj = std::min(kBlockJ, mc - j0);
    T blk[A * A][kBlockJ];
    for (int64_t jj = 0; jj < nj; ++jj) {
      const int64_t j = j0 + jj;
      T g[9];
      for (int k = 0; k < 9; ++k) g[k] = flipped ? w[((j % c) * m + j / c) * 9 + 8 - k] : w[j * 9 + k];
      T t[A][3];  // G g
      for (int r = 0; r < A; ++r)
        for (int x = 0; x < 3; ++x) t[r][x] = T(F::G[r][0]) * g[x] + T(F::G[r][1]) * g[3 + x] + T(F::G[r][2]) * g[6 + x];
      for (int r = 0; r < A; ++r)
        for (int q = 0; q < A; ++q)
          blk[r * A + q][jj] = t[r][0] * T(F::G[q][0]) + t[r][1] * T(F::G[q][1]) + t[r][2] * T(F::G[q][2]);
    }
    for (int xi = 0; xi < A * A; ++xi) std::copy(blk[xi], blk[xi] + nj, out + xi * mc + j0);
  }
}

// Per-thread buffers of one call: transformed input (α² x C x N), products (α² x M x N) and rows.
template <typename T>
struct WinogradScratch {
  std::vector<T> v, prod, rows, zero;
};

// Tiles of the rows [r0, r1) (r0 a multiple of m): tile rows ty0 .. ty1-1, tw tiles each; N = tiles x n.
struct WinogradTiles {
  int64_t ty0, ty1, tw, N;
  WinogradTiles(int m, int64_t wd, int64_t n, int64_t r0, int64_t r1)
      : ty0(r0 / m), ty1((r1 + m - 1) / m), tw((wd + m - 1) / m), N((ty1 - ty0) * tw * n) {}
};

// out[q os + tx n + j] = Σ_i coef(q, i) t[(m tx + i) n + j], q < Q, i < I: a small constant matrix
// applied along x to the columns of every tile of a transformed row t (n values per column).
template <int Mt, int Q, int I, typename T, typename Coef>
void along_x(const T* t, int64_t tw, int64_t n, Coef coef, T* out, int64_t os) {
  for (int64_t tx = 0; tx < tw; ++tx)
    for (int64_t j = 0; j < n; ++j) {
      const T* x = t + Mt * tx * n + j;
#pragma GCC unroll 8
      for (int q = 0; q < Q; ++q) {
        T acc = 0;
#pragma GCC unroll 8
        for (int i = 0; i < I; ++i)
          if (coef(q, i) != 0) acc += T(coef(q, i)) * x[i * n];
        out[q * os + tx * n + j] = acc;
      }
    }
}

// ---- F(2x2, 3x3) with n = 4 (every Winograd layer of HSNet: 2x2 support grids), AVX-512 ----
// One 16-float vector holds 4 grid columns x 4 support positions: its 128-bit quarters are columns, so
// a transform along y is 4 vector adds over 4 rows and one along x is quarter shuffles and adds. The
// generic code's along-x step runs on n = 4 scalars; these are chosen at run time (has_avx512).
namespace wino4 {

// The quarters (q0, q1, q2, q3) of v (each a quarter index of v).
template <int Q0, int Q1, int Q2, int Q3>
__attribute__((target("avx512f"))) inline __m512 quarters(__m512 v) {
  return _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(Q3, Q2, Q1, Q0));
}

// Stores the quarter ξ of v at out + ξ os (ξ = 0..3).
__attribute__((target("avx512f"))) inline void store_quarters(__m512 v, float* out, int64_t os) {
  _mm_storeu_ps(out, _mm512_castps512_ps128(v));
  _mm_storeu_ps(out + os, _mm512_extractf32x4_ps(v, 1));
  _mm_storeu_ps(out + 2 * os, _mm512_extractf32x4_ps(v, 2));
  _mm_storeu_ps(out + 3 * os, _mm512_extractf32x4_ps(v, 3));
}

// Bᵀ (c0, c1, c2, c3) by quarters: (c0 - c2, c1 + c2, c2 - c1, c1 - c3).
__attribute__((target("avx512f"))) inline __m512 bt_quarters(__m512 t) {
  const __m512 x = quarters<0, 1, 2, 1>(t), y = quarters<2, 2, 1, 3>(t);
  return _mm512_mask_add_ps(_mm512_sub_ps(x, y), 0x00F0, x, y);
}

// Four consecutive tiles' transforms, q[k][i] of tile tx0 + k holding ξ = 4 i .. 4 i + 3 in its quarters,
// stored as 16 floats per ξ at out + ξ os (4 x 4 quarter transposes: full-width stores).
__attribute__((target("avx512f"))) inline void store_tiles4(const __m512 q[4][4], float* out, int64_t os) {
  for (int i = 0; i < 4; ++i) {
    const __m512 a = _mm512_shuffle_f32x4(q[0][i], q[1][i], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 b = _mm512_shuffle_f32x4(q[2][i], q[3][i], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 c = _mm512_shuffle_f32x4(q[0][i], q[1][i], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512 d = _mm512_shuffle_f32x4(q[2][i], q[3][i], _MM_SHUFFLE(3, 2, 3, 2));
    _mm512_storeu_ps(out + (4 * i) * os, _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(out + (4 * i + 1) * os, _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(out + (4 * i + 2) * os, _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(out + (4 * i + 3) * os, _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}

// The tiles of a row by `tile(tx, q)` (q[i]: ξ = 4 i .. 4 i + 3 in quarters), stored at out[ξ os + 4 tx + j]:
// four tiles at a time with full-width stores, the rest by quarters.
template <typename Tile>
__attribute__((target("avx512f"))) inline void store_row(int64_t tw, float* out, int64_t os, Tile&& tile) {
  int64_t tx = 0;
  for (; tx + 4 <= tw; tx += 4) {
    __m512 q[4][4];
    for (int k = 0; k < 4; ++k) tile(tx + k, q[k]);
    store_tiles4(q, out + 4 * tx, os);
  }
  for (; tx < tw; ++tx) {
    __m512 q[4];
    tile(tx, q);
    for (int i = 0; i < 4; ++i) store_quarters(q[i], out + 4 * i * os + 4 * tx, os);
  }
}

// The input transform of one tile row of one channel: d[r] is grid row 2 ty - 1 + r (nullptr outside
// the grid, read as zeros), v[ξ xs + 4 tx + j] = (Bᵀ d B)[ξ] of tile tx.
__attribute__((target("avx512f"))) inline void input_row(const float* const d[4], int64_t wd, int64_t tw, float* v,
                                                         int64_t xs) {
  store_row(tw, v, xs, [&](int64_t tx, __m512 q[4]) __attribute__((target("avx512f"))) {
    const int64_t x0 = 2 * tx - 1;  // the patch's columns x0 .. x0 + 3, zero outside 0 .. wd - 1
    unsigned bits = 0;
    for (int k = 0; k < 4; ++k)
      if (x0 + k >= 0 && x0 + k < wd) bits |= 0xFu << (4 * k);
    const __mmask16 mask = static_cast<__mmask16>(bits);
    __m512 r[4];
    for (int i = 0; i < 4; ++i)  // (masked lanes are not read: no fault before column 0)
      r[i] = d[i] ? _mm512_maskz_loadu_ps(mask, d[i] + 4 * x0) : _mm512_setzero_ps();
    q[0] = bt_quarters(_mm512_sub_ps(r[0], r[2]));
    q[1] = bt_quarters(_mm512_add_ps(r[1], r[2]));
    q[2] = bt_quarters(_mm512_sub_ps(r[2], r[1]));
    q[3] = bt_quarters(_mm512_sub_ps(r[1], r[3]));
  });
}

// The output transform of one tile row of one output channel: P[ξ] at p + ξ ps + 4 tx, added to the
// rows (`rows` of them: 1 at the grid's last odd row) at y (row stride 4 wd) as Aᵀ P A.
__attribute__((target("avx512f"))) inline void output_row(const float* p, int64_t ps, int64_t wd, int64_t tw, int rows,
                                                          float* y) {
  for (int64_t tx = 0; tx < tw; ++tx) {
    __m512 pr[4];  // row r of the tile's P: quarters P[r, 0..3]
    for (int r = 0; r < 4; ++r) {
      const float* q = p + 4 * r * ps + 4 * tx;
      __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(q));
      v = _mm512_insertf32x4(v, _mm_loadu_ps(q + ps), 1);
      v = _mm512_insertf32x4(v, _mm_loadu_ps(q + 2 * ps), 2);
      pr[r] = _mm512_insertf32x4(v, _mm_loadu_ps(q + 3 * ps), 3);
    }
    const __m512 s[2] = {_mm512_add_ps(_mm512_add_ps(pr[0], pr[1]), pr[2]),  // Aᵀ along y
                         _mm512_sub_ps(_mm512_sub_ps(pr[1], pr[2]), pr[3])};
    const __mmask16 mask = 2 * tx + 1 < wd ? 0x00FF : 0x000F;  // columns 2 tx, 2 tx + 1 inside
    for (int R = 0; R < rows; ++R) {  // along x: (q0 + q1 + q2, q1 - q2 - q3) in quarters 0, 1
      const __m512 b = quarters<1, 2, 1, 2>(s[R]), c = quarters<2, 3, 2, 3>(s[R]);
      __m512 o = _mm512_mask_sub_ps(_mm512_add_ps(s[R], b), 0x00F0, s[R], b);
      o = _mm512_mask_sub_ps(_mm512_add_ps(o, c), 0x00F0, o, c);
      float* out = y + R * 4 * wd + 8 * tx;
      _mm512_mask_storeu_ps(out, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), o));
    }
  }
}

// The weight gradient's transform of one tile row of one output channel's gradient g (rows g, g + 4 wd;
// `rows` of them inside, zeros beyond): e[ξ es + 4 tx + j] = (A g Aᵀ)[ξ] of tile tx.
__attribute__((target("avx512f"))) inline void grad_row(const float* g, int rows, int64_t wd, int64_t tw, float* e,
                                                        int64_t es) {
  store_row(tw, e, es, [&](int64_t tx, __m512 q[4]) __attribute__((target("avx512f"))) {
    const __mmask16 mask = 2 * tx + 1 < wd ? 0x00FF : 0x000F;
    const __m512 g0 = _mm512_maskz_loadu_ps(mask, g + 8 * tx);
    const __m512 g1 = rows > 1 ? _mm512_maskz_loadu_ps(mask, g + 4 * wd + 8 * tx) : _mm512_setzero_ps();
    const __m512 t[4] = {g0, _mm512_add_ps(g0, g1), _mm512_sub_ps(g0, g1), _mm512_sub_ps(_mm512_setzero_ps(), g1)};
    for (int i = 0; i < 4; ++i) {  // along x: (c0, c0 + c1, c0 - c1, -c1)
      const __m512 a = _mm512_maskz_shuffle_f32x4(0x0FFF, t[i], t[i], 0);
      const __m512 b = _mm512_maskz_shuffle_f32x4(0xFFF0, t[i], t[i], 0x55);
      q[i] = _mm512_mask_sub_ps(_mm512_add_ps(a, b), 0xFF00, a, b);
    }
  });
}

}  // namespace wino4

// Whether the n = 4 AVX-512 transforms apply.
template <int Mt, typename T>
bool use_wino4(int64_t n) {
  return Mt == 2 && n == 4 && std::is_same<T, float>::value && has_avx512();
}

// v[ξ, ci, (tile, j)] = (Bᵀ d B)[ξ], d the α x α patch of `in` (C, h wd, n) at each tile, zeros outside.
// Separable: along y on whole grid rows (wd n contiguous values), then along x on the α columns of
// each tile (n values each).
template <int Mt, typename T>
void winograd_input(const T* in, int64_t c, int64_t h, int64_t wd, int64_t n, const WinogradTiles& tl, T* v,
                    WinogradScratch<T>& s) {
  using F = WinogradF<Mt>;
  constexpr int A = F::a;
  if constexpr (std::is_same<T, float>::value) {
    if (use_wino4<Mt, T>(n)) {
      for (int64_t ci = 0; ci < c; ++ci)
        for (int64_t ty = tl.ty0; ty < tl.ty1; ++ty) {
          const float* d[4];
          for (int r = 0; r < 4; ++r) {
            const int64_t y = 2 * ty - 1 + r;
            d[r] = (y >= 0 && y < h) ? in + (ci * h + y) * wd * 4 : nullptr;
          }
          wino4::input_row(d, wd, tl.tw, v + ci * tl.N + (ty - tl.ty0) * tl.tw * 4, c * tl.N);
        }
      return;
    }
  }
  const int64_t rowlen = (Mt * tl.tw + 2) * n, N = tl.N;  // a row with a zero column before, 1+ after
  T* rows = grow(s.rows, A * rowlen);
  std::fill(rows, rows + A * rowlen, T(0));
  s.zero.assign(wd * n, T(0));
  for (int64_t ci = 0; ci < c; ++ci)
    for (int64_t ty = tl.ty0; ty < tl.ty1; ++ty) {
      const T* d[A];  // input rows m ty - 1 .. m ty + α - 2
      for (int r = 0; r < A; ++r) {
        const int64_t y = Mt * ty - 1 + r;
        d[r] = (y >= 0 && y < h) ? in + (ci * h + y) * wd * n : s.zero.data();
      }
      for (int r = 0; r < A; ++r) {  // along y, into row r at column offset 1
        T* t = rows + r * rowlen + n;
        for (int64_t e = 0; e < wd * n; ++e) {
          T acc = 0;
#pragma GCC unroll 8
          for (int i = 0; i < A; ++i)
            if (F::BT[r][i] != 0) acc += T(F::BT[r][i]) * d[i][e];
          t[e] = acc;
        }
      }
      const int64_t col0 = (ty - tl.ty0) * tl.tw * n;
      for (int r = 0; r < A; ++r)  // along x: tile tx reads columns m tx .. m tx + α - 1 of row r
        along_x<Mt, A, A>(rows + r * rowlen, tl.tw, n, [](int q, int i) { return F::BT[q][i]; },
                          v + (r * A * c + ci) * N + col0, c * N);
    }
}

// out[o, (y - r0) wd + x, j] += (Aᵀ P A)[y, x] per tile, P = prod[:, o, (tile, j)] (α² x M x N);
// rows >= r1 and columns >= wd are cut off. Along y (over all N columns), then along x.
template <int Mt, typename T>
void winograd_output(const T* p, int64_t m, int64_t wd, int64_t n, int64_t r0, int64_t r1, const WinogradTiles& tl,
                     T* out, int64_t ld, WinogradScratch<T>& s) {
  using F = WinogradF<Mt>;
  constexpr int A = F::a;
  const int64_t N = tl.N;
  if constexpr (std::is_same<T, float>::value) {
    if (use_wino4<Mt, T>(n)) {
      for (int64_t o = 0; o < m; ++o)
        for (int64_t ty = tl.ty0; ty < tl.ty1; ++ty)
          wino4::output_row(p + o * N + (ty - tl.ty0) * tl.tw * 4, m * N, wd, tl.tw,
                            static_cast<int>(std::min<int64_t>(2, r1 - 2 * ty)), out + o * ld + (2 * ty - r0) * wd * 4);
      return;
    }
  }
  T* sy = grow(s.rows, Mt * A * N);  // sy[R, q, col] = Σ_r Aᵀ[R, r] P[(r, q), o, col]
  for (int64_t o = 0; o < m; ++o) {
    for (int R = 0; R < Mt; ++R)
      for (int q = 0; q < A; ++q) {
        T* dst = sy + (R * A + q) * N;
        for (int64_t e = 0; e < N; ++e) {
          T acc = 0;
#pragma GCC unroll 8
          for (int r = 0; r < A; ++r)
            if (F::AT[R][r] != 0) acc += T(F::AT[R][r]) * p[((r * A + q) * m + o) * N + e];
          dst[e] = acc;
        }
      }
    for (int64_t ty = tl.ty0; ty < tl.ty1; ++ty)
      for (int R = 0; R < Mt && Mt * ty + R < r1; ++R) {
        const T* sr = sy + R * A * N + (ty - tl.ty0) * tl.tw * n;
        T* y = out + o * ld + (Mt * ty + R - r0) * wd * n;
        for (int64_t tx = 0; tx < tl.tw; ++tx) {
          const int cols = static_cast<int>(std::min<int64_t>(Mt, wd - Mt * tx));
          for (int64_t j = 0; j < n; ++j) {
            const T* x = sr + tx * n + j;
            for (int cc = 0; cc < cols; ++cc) {
              T acc = 0;
#pragma GCC unroll 8
              for (int q = 0; q < A; ++q)
                if (F::AT[cc][q] != 0) acc += T(F::AT[cc][q]) * x[q * N];
              y[(Mt * tx + cc) * n + j] += acc;
            }
          }
        }
      }
  }
}

// out[o, (y - r0) wd + x, j] += Σ_c Σ_{dy,dx} w[o, c, dy, dx] in[c, (y + dy - 1) wd + (x + dx - 1), j]
// for the rows y in [r0, r1) (r0 a multiple of m) of an (h, wd) grid with n batch entries per
// position; `u` from winograd_weights; out has row stride `ld` per output channel.
template <int Mt, typename T>
void winograd_conv3x3_rows(const std::vector<T>& u, int64_t m, int64_t c, const T* in, int64_t h, int64_t wd,
                           int64_t n, int64_t r0, int64_t r1, T* out, int64_t ld, WinogradScratch<T>& s) {
  constexpr int A2 = WinogradF<Mt>::a * WinogradF<Mt>::a;
  const WinogradTiles tl(Mt, wd, n, r0, r1);
  T* v = grow(s.v, A2 * c * tl.N);
  T* p = grow(s.prod, A2 * m * tl.N);
  winograd_input<Mt>(in, c, h, wd, n, tl, v, s);
  for (int xi = 0; xi < A2; ++xi)
    gemm<T>(false, false, m, tl.N, c, T(1), u.data() + xi * m * c, c, v + xi * c * tl.N, tl.N, T(0),
            p + xi * m * tl.N, tl.N);
  winograd_output<Mt>(p, m, wd, n, r0, r1, tl, out, ld, s);
}

// The weight gradient of winograd_conv3x3_rows before its last step: acc[ξ, o, c] +=
// Σ_{tiles, j} (A g Aᵀ)[ξ] (Bᵀ d B)[ξ] for the m x m tiles g of `grad` (M, rows from r0, n; channel
// stride h wd n) in the rows [r0, r1), zero beyond r1 and wd, and the input patches d of `in`.
// The adjoint of Y = Aᵀ [(G w Gᵀ) ⊙ V] A in w is Gᵀ [(A dY Aᵀ) ⊙ V] G: see winograd_weight_grad_finish.
template <int Mt, typename T>
void winograd_weight_grad_rows(const T* grad, int64_t m, const T* in, int64_t c, int64_t h, int64_t wd, int64_t n,
                               int64_t r0, int64_t r1, T* acc, WinogradScratch<T>& s) {
  using F = WinogradF<Mt>;
  constexpr int A = F::a, A2 = A * A;
  const WinogradTiles tl(Mt, wd, n, r0, r1);
  const int64_t N = tl.N, rowlen = Mt * tl.tw * n;  // a grad row, zero columns after wd
  T* v = grow(s.v, A2 * c * N);
  T* e = grow(s.prod, A2 * m * N);
  winograd_input<Mt>(in, c, h, wd, n, tl, v, s);
  T* rows = use_wino4<Mt, T>(n) ? nullptr : grow(s.rows, A * rowlen);
  for (int64_t o = 0; o < m; ++o)
    for (int64_t ty = tl.ty0; ty < tl.ty1; ++ty) {
      const int nr = static_cast<int>(std::min<int64_t>(Mt, r1 - Mt * ty));  // grad rows inside
      const T* g = grad + o * h * wd * n + (Mt * ty - r0) * wd * n;
      if constexpr (std::is_same<T, float>::value) {
        if (use_wino4<Mt, T>(n)) {
          wino4::grad_row(g, nr, wd, tl.tw, e + o * N + (ty - tl.ty0) * tl.tw * 4, m * N);
          continue;
        }
      }
      for (int r = 0; r < A; ++r) {  // along y: row r = Σ_R Aᵀ[R, r] g_R
        T* t = rows + r * rowlen;
        std::fill(t, t + rowlen, T(0));
        for (int R = 0; R < nr; ++R)
          if (F::AT[R][r] != 0)
            for (int64_t x = 0; x < wd * n; ++x) t[x] += T(F::AT[R][r]) * g[R * wd * n + x];
      }
      const int64_t col0 = (ty - tl.ty0) * tl.tw * n;
      for (int r = 0; r < A; ++r)  // along x: E[r, q] = Σ_C Aᵀ[C, q] row_r[m tx + C]
        along_x<Mt, A, Mt>(rows + r * rowlen, tl.tw, n, [](int q, int i) { return F::AT[i][q]; },
                           e + (r * A * m + o) * N + col0, m * N);
    }
  // (transposed B: MKL here; brgemm wants it untransposed, and transposing v per ξ measured slower)
  for (int xi = 0; xi < A2; ++xi)
    gemm<T>(false, true, m, c, N, T(1), e + xi * m * N, N, v + xi * c * N, N, T(1), acc + xi * m * c, c);
}

// dw[j] = Gᵀ A_j G (3x3 from the α x α A_j) with A = Σ_i accs[i] (α² x M C each, the threads' sums of
// winograd_weight_grad_rows): separable, like winograd_weights, over blocks of kBlockJ kernels read row
// by row.
template <int Mt, typename T>
void winograd_weight_grad_finish(const std::vector<const T*>& accs, int64_t m, int64_t c, T* dw) {
  using F = WinogradF<Mt>;
  constexpr int A = F::a;
  const int64_t mc = m * c;
#pragma omp parallel for schedule(static)
  for (int64_t j0 = 0; j0 < mc; j0 += kBlockJ) {
    const int64_t nj = std::min(kBlockJ, mc - j0);
    T blk[A * A][kBlockJ] = {};
    for (const T* acc : accs)
      for (int xi = 0; xi < A * A; ++xi)
        for (int64_t jj = 0; jj < nj; ++jj) blk[xi][jj] += acc[xi * mc + j0 + jj];
    for (int64_t jj = 0; jj < nj; ++jj) {
      T t[A][3] = {};  // A_j G
      for (int r = 0; r < A; ++r)
        for (int q = 0; q < A; ++q)
          for (int x = 0; x < 3; ++x) t[r][x] += blk[r * A + q][jj] * T(F::G[q][x]);
      for (int y = 0; y < 3; ++y)
        for (int x = 0; x < 3; ++x) {
          T v = 0;
          for (int r = 0; r < A; ++r) v += T(F::G[r][y]) * t[r][x];
          dw[(j0 + jj) * 9 + y * 3 + x] = v;
        }
    }
  }
}

}  // namespace tlg_cpu
