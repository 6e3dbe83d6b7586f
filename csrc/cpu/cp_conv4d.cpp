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
//  * dense path, when at most a quarter of the support taps read padding (half for Cout = 16; a third
//    when per-position GEMMs would be thinner than kMinPerPosCols): the support taps join that GEMM
//    (zeros where a tap reads padding);
//  * per-position path otherwise: the main GEMM has the query taps only, and each p adds a GEMM over
//    its own valid taps T_p (operand rows copied from the task's x rows transposed, transposed_chunk:
//    measured against strided gathers straight from x, HSNet's l2.1 fwd+bwd 5% faster), or, on small
//    grids, one GEMM over (o, p) x (c, s) with few zeros in it;
//    on 2x2 grids with 3x3 support kernels at stride 1 (HSNet's mixing blocks) the 3-multiply Toeplitz
//    products of grid2_* below: 9 GEMMs of Cout x Cin where the (o, p) x (c, s) GEMM has 16 such blocks;
//  * 3x3 query kernels with enough channels and columns (HSNet's 64->128 and mixing layers at 400 px):
//    the query part by Winograd F(kWino x kWino, 3x3) over tasks of whole tile rows instead of the main
//    GEMM (winograd.h), in the forward and in both gradients;
//  * a 1x1 support grid (HSNet's mixing at 200 px): the support kernel's center joins the query
//    kernel's (folded_query_weights), no support part at all;
//  * tasks of at least kMinCols GEMM columns while every thread still gets one (small grids);
//  * Cout = 16 (forward, grad_w) and Cin = 16 (grad_x): AVX-512 16-row kernels that read the query
//    taps in place from a copy of x (or dy) with zero-padded query dims, no query im2col; on the dense
//    path their support taps too, per position p, from the task's transposed x rows (no support im2col:
//    HSNet's l2.0 fwd 24% faster, fwd+bwd 18%, than with the scalar gather into col it replaced).

#include "common.h"
#include "winograd.h"

#include <immintrin.h>

#include <map>
#include <tuple>
#include <vector>

namespace tlg_cpu {
namespace {

constexpr int kWino = 2;  // Winograd output tile of the 3x3 query convolutions: F(2x2, 3x3)
// Fewest GEMM columns of a task while every thread still gets one: on small grids (HSNet at 200 px:
// 13x13 or 25x25 queries, 1x1 or 2x2 supports) thinner GEMMs cost more than the balance gains.
constexpr int64_t kMinCols = 128;
// Fewest GEMM columns for Winograd (see Geometry), in the forward and in the backward.
constexpr int64_t kMinWinoCols = 256, kMinWinoColsBackward = 128;
constexpr int64_t kMinPerPosCols = 64;  // see Geometry: thinner per-position support GEMMs go dense

struct Geometry {
  int64_t nb, cin, cout, ha, wa, hb, wb, hp, wp, P, S, Sp, kq, ks, kq2, stride;
  std::vector<int64_t> ay, ax;           // query position a -> (row, col)
  std::vector<int64_t> kept;             // p -> support index s_p
  std::vector<int> pack_of;              // p -> index of its tap set
  std::vector<std::vector<int>> taps;    // tap set -> support taps t = dy ks + dx inside the grid
  std::vector<std::vector<int64_t>> src; // p -> support index read by each tap of its set
  std::vector<int> sidx;  // (t, p) -> support index read by tap t at p, S in the padding
  bool folded;            // a 1x1 support grid: the support part is folded into Wq (folded_query_weights)
  bool dense;             // few support taps read padding: they join the main GEMM (else per-p GEMMs)
  bool small_s;           // not dense, small support grid: one GEMM over (o, p) x (c, s) for the support part
  bool grid2;             // a 2x2 support grid, 3x3 support kernel, stride 1: the support part by grid2_*
  bool wino;              // query part by Winograd; tasks are whole tile rows (kWino query rows)
  int64_t chunk, nchunks;  // query positions per task

  Geometry(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, int64_t s, bool backward) : stride(s) {
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
    // Dense while at most a quarter of the support taps read padding (measured: HSNet's 16->64 layers,
    // 64-69% valid, run faster per position), at most half for Cout = 16, whose kernel wants one operand.
    const int64_t all_taps = Sp * ks * ks;
    folded = S == 1;
    dense = !folded && (cout == 16 ? 2 * valid >= all_taps : 4 * valid >= 3 * all_taps);
    // Per-position support GEMMs merged into one whose weights are zero where s is no tap source of p;
    // worth it while at most 1/3 of that GEMM's products are such zeros (a 2x3 grid, k3: 1/3).
    grid2 = hb == 2 && wb == 2 && ks == 3 && s == 1;
    small_s = !dense && !folded && !grid2 && 2 * S * Sp <= 3 * valid;
    sidx.assign(ks * ks * Sp, 0);
    for (int64_t t = 0; t < ks * ks; ++t)
      for (int64_t py = 0; py < hp; ++py)
        for (int64_t px = 0; px < wp; ++px) {
          const int64_t sy = py * s + t / ks - rs, sx = px * s + t % ks - rs;
          sidx[t * Sp + py * wp + px] = (sy >= 0 && sy < hb && sx >= 0 && sx < wb) ? static_cast<int>(sy * wb + sx)
                                                                                : static_cast<int>(S);
        }
    // Winograd wants wide GEMMs: at least kMinWinoCols columns (tiles x Sp) in all, else the im2col GEMM
    // (K = 9 Cin) is faster (measured: HSNet's 1x1-grid mixing at 200 px, 49 columns). In between, layer4's
    // 64->128 at 400 px b1 (196 columns) measured 11-13% faster by Winograd in quiet runs, but its forward
    // 0.89-0.90x the reference's in two of four benchmark runs where the machine ran slow (the im2col
    // GEMM: 1.01-1.13x in four); its backward was faster by Winograd in all of them.
    const int64_t wino_cols = nb * ((ha + kWino - 1) / kWino) * ((wa + kWino - 1) / kWino) * Sp;
    wino = kq == 3 && cin >= 16 && cout >= 32 && wino_cols >= (backward ? kMinWinoColsBackward : kMinWinoCols);
    plan_tasks();
    // Per-position GEMMs thinner than kMinPerPosCols columns (small queries: HSNet's layer4 at 400 px) run
    // slower than the dense GEMM with up to a third of zeros in it (measured: 64->128 at 13x13, 69% valid).
    if (per_position() && chunk < kMinPerPosCols && 3 * valid >= 2 * all_taps) {
      dense = true;
      plan_tasks();
    }
  }
  // Query positions per task (chunk, nchunks).
  void plan_tasks() {
    if (wino) {  // tasks of tile rows, about 256 GEMM columns (tiles x Sp) per task (measured against 128 to
                 // 1024: HSNet's l2.2 and mix32 fwd+bwd 4-10% faster than at 512, whose transformed input
                 // and products, 4 MiB each at 128 channels, outgrew L2)
      const int64_t per_row = (wa + kWino - 1) / kWino * Sp;
      chunk = std::min(P, kWino * wa * balanced((ha + kWino - 1) / kWino, std::max<int64_t>(1, 256 / per_row), per_row));
    } else {  // the main operand (K_main x chunk Sp) up to 2 MiB
      chunk = balanced(P, std::max<int64_t>(1, (1 << 19) / std::max<int64_t>(k_main(true) * Sp, 1)), Sp);
      // Per-position GEMMs are chunk columns wide: a multiple of 16, the micro-kernel's vector width
      // (measured: HSNet's l2.1 forward 5% faster at 80 than at 81).
      if (per_position() && chunk > 16) chunk = chunk / 16 * 16;
    }
    nchunks = (P + chunk - 1) / chunk;
  }
  // Units per task for `units` work units (of `cols` GEMM columns each) per batch element: about `per`,
  // fewer when that gives less than 4 tasks per thread, so that the dynamic schedule evens the threads
  // out, but not below kMinCols columns while every thread still gets a task.
  int64_t balanced(int64_t units, int64_t per, int64_t cols) const {
    auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
    const int64_t threads = num_threads();
    per = std::max<int64_t>(1, std::min(units, per));
    if (nb * ceil_div(units, per) < 4 * threads) per = std::max<int64_t>(1, ceil_div(units, ceil_div(4 * threads, nb)));
    const int64_t floor = ceil_div(kMinCols, std::max<int64_t>(cols, 1));
    const int64_t cap = ceil_div(units, ceil_div(threads, nb));  // the most that still gives each thread a task
    per = std::min(units, std::max(per, std::min(floor, cap)));
    return ceil_div(units, ceil_div(units, per));  // the same number of tasks, of even sizes
  }
  // Rows of the main GEMM: the query taps (unless by Winograd) and, on the dense path, the support taps.
  int64_t k_main(bool with_query) const { return cin * ((with_query ? kq2 : 0) + (dense ? ks * ks : 0)); }
  int64_t nt(int64_t p) const { return taps[pack_of[p]].size(); }
  // The support part as one GEMM per output position p over its own valid taps.
  bool per_position() const { return !dense && !small_s && !folded && !grid2; }
};

// Per-thread scratch kept across calls (grown by grow(), common.h): a task's buffers (MiBs) cost no page
// faults or zero fills after the first call. Slots below kCallSlots are a task's, in the thread that runs
// it; from kCallSlots up, a call's own (weights transformed for it, the threads' gradient sums), taken in
// the calling thread.
constexpr int kCallSlots = 16;
template <typename T, int Slot>
std::vector<T>& scratch() {
  static thread_local std::vector<T> buf;
  return buf;
}

// ---- operands of one query chunk [a0, a0 + na); columns (i, p) in y's own order, N = na Sp ----
// Query taps: col[(c, t), (i, p)] = xp[c, a0 + i + d_t, p] (0 in the query padding), xp the pruned x
// (Cin, P, Sp); each row segment copies one contiguous xp[c, a, :] row.
// Also the query part of dx, from dy (Cout, P, Sp): channels = Cout.
template <typename T>
void query_cols(const Geometry& g, const T* xpb, int64_t a0, int64_t na, T* col, int64_t channels = -1) {
  const int64_t n = na * g.Sp, rq = g.kq / 2;
  if (channels < 0) channels = g.cin;
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < g.kq2; ++t) {
      const int64_t dy = t / g.kq - rq, dx = t % g.kq - rq;
      T* out = col + (c * g.kq2 + t) * n;
      // One query row at a time: its positions x0..x1-1 read one contiguous run of xp.
      for (int64_t i = 0; i < na;) {
        const int64_t r = g.ay[a0 + i], x0 = g.ax[a0 + i], x1 = std::min(g.wa, x0 + na - i), qy = r + dy;
        const int64_t v0 = std::max(x0, -dx), v1 = std::min(x1, g.wa - dx);  // qx = x + dx inside
        T* o = out + i * g.Sp;
        if (qy < 0 || qy >= g.ha || v0 >= v1) {
          std::fill(o, o + (x1 - x0) * g.Sp, T(0));
        } else {
          std::fill(o, o + (v0 - x0) * g.Sp, T(0));
          const T* in = xpb + (c * g.P + qy * g.wa + v0 + dx) * g.Sp;
          std::copy(in, in + (v1 - v0) * g.Sp, o + (v0 - x0) * g.Sp);
          std::fill(o + (v1 - x0) * g.Sp, o + (x1 - x0) * g.Sp, T(0));
        }
        i += x1 - x0;
      }
    }
}

// All support taps (dense path): col[(c, t), (i, p)] = x[c, a0 + i, src_p(t)], 0 where t reads padding.
template <typename T>
void support_cols(const Geometry& g, const T* xb, int64_t a0, int64_t na, T* col) {
  const int64_t n = na * g.Sp, ks2 = g.ks * g.ks;
  std::vector<T> row(g.S + 1);  // x row and a zero, read by the padding taps (index S)
  row[g.S] = T(0);
  for (int64_t c = 0; c < g.cin; ++c)
    for (int64_t i = 0; i < na; ++i) {  // all taps of one x row while it is in L1
      const T* in = xb + c * g.P * g.S + (a0 + i) * g.S;
      std::copy(in, in + g.S, row.begin());
      for (int64_t t = 0; t < ks2; ++t) {
        T* out = col + (c * ks2 + t) * n + i * g.Sp;
        const int* idx = g.sidx.data() + t * g.Sp;
        for (int64_t p = 0; p < g.Sp; ++p) out[p] = row[idx[p]];
      }
    }
}

// Small support grids: xs[(c, s), i] = x[c, a0 + i, s].
template <typename T>
void support_rows(const Geometry& g, const T* xb, int64_t a0, int64_t na, T* xs) {
  for (int64_t c = 0; c < g.cin; ++c) {
    const T* in = xb + c * g.P * g.S + a0 * g.S;
    for (int64_t i = 0; i < na; ++i)
      for (int64_t s = 0; s < g.S; ++s) xs[(c * g.S + s) * na + i] = in[i * g.S + s];
  }
}

// Small support grids: wbig[(o, p), (c, s)] = Ws[o, c, t] where tap t of p reads s, else 0; into a
// kept buffer, rows zeroed and filled in parallel.
template <typename T>
const T* big_weights(const Geometry& g, const T* ws, std::vector<T>& buf) {
  const int64_t ks2 = g.ks * g.ks, kb = g.cin * g.S;
  grow(buf, g.cout * g.Sp * kb);
  T* w = buf.data();
#pragma omp parallel for
  for (int64_t o = 0; o < g.cout; ++o) {
    std::fill_n(w + o * g.Sp * kb, g.Sp * kb, T(0));
    for (int64_t p = 0; p < g.Sp; ++p)
      for (int64_t t = 0; t < ks2; ++t) {
        const int src = g.sidx[t * g.Sp + p];
        if (src == g.S) continue;
        for (int64_t c = 0; c < g.cin; ++c) w[(o * g.Sp + p) * kb + c * g.S + src] = ws[(o * g.cin + c) * ks2 + t];
      }
  }
  return w;
}

// ---- The support part on 2x2 grids with 3x3 kernels at stride 1 (Geometry::grid2) ----
// Along one support dim it is a Toeplitz product, y0 = w1 x0 + w2 x1 and y1 = w0 x0 + w1 x1, which
// takes 3 multiplies instead of 4 (Winograd's minimal filtering for 2 outputs, Lavin & Gray 2016):
// y = Aᵀ [(G w) ⊙ (B x)] with G w = (w1, w2 - w1, w0 - w1), B x = (x0 + x1, x1, x0) and
// Aᵀ m = (m0 + m1, m0 + m2). Over both dims (ξ in 3 x 3): one GEMM of Cout x Cin per ξ, 9 in all where
// the (o, p) x (c, s) GEMM has 16 blocks of that size. The gradients, per dim: dx = Bᵀ [(G w) ⊙ (A dy)]
// and dw = Gᵀ Σ_a (A dy) ⊙ (B x), the sum over query positions one GEMM per ξ.
struct Grid2 {
  static constexpr int B[3][2] = {{1, 1}, {0, 1}, {1, 0}};              // x (2 values) -> ξ
  static constexpr int A[3][2] = {{1, 1}, {1, 0}, {0, 1}};              // dy -> ξ (A = (Aᵀ)ᵀ)
  static constexpr int AT[2][3] = {{1, 1, 0}, {1, 0, 1}};               // ξ -> y
  static constexpr int BT[2][3] = {{1, 0, 1}, {1, 1, 0}};               // ξ -> dx
  static constexpr int G[3][3] = {{0, 1, 0}, {0, -1, 1}, {1, -1, 0}};   // w (3 taps) -> ξ
};

// AVX-512 float versions of grid2_in and grid2_out for 16 positions at a time: their 64 grid values
// (position-major) de-interleaved into one vector per grid point, and back. `n` (1 .. 16) positions.
namespace grid2_avx512 {

__attribute__((target("avx512f"))) inline void load4(const float* v, int64_t n, __m512 x[4]) {
  __m512 q[4];
  for (int k = 0; k < 4; ++k) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, 4 * n - 16 * k));
    q[k] = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1), v + 16 * k);
  }
  const __m512i even = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i odd = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
  // t0: grid points 0, 1 of positions 0..7; t1: points 2, 3; t2, t3: the same for positions 8..15
  const __m512 t0 = _mm512_permutex2var_ps(q[0], even, q[1]), t1 = _mm512_permutex2var_ps(q[0], odd, q[1]);
  const __m512 t2 = _mm512_permutex2var_ps(q[2], even, q[3]), t3 = _mm512_permutex2var_ps(q[2], odd, q[3]);
  x[0] = _mm512_shuffle_f32x4(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  x[1] = _mm512_shuffle_f32x4(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  x[2] = _mm512_shuffle_f32x4(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  x[3] = _mm512_shuffle_f32x4(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
}

__attribute__((target("avx512f"))) inline void add4(const __m512 x[4], int64_t n, float* v) {
  const __m512 t0 = _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(1, 0, 1, 0));  // positions 0..7 of points 0, 1
  const __m512 t2 = _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 2, 3, 2));  // positions 8..15
  const __m512 t1 = _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 t3 = _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 2, 3, 2));
  const __m512i lo = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
  const __m512i hi = _mm512_setr_epi32(4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31);
  const __m512 q[4] = {_mm512_permutex2var_ps(t0, lo, t1), _mm512_permutex2var_ps(t0, hi, t1),
                       _mm512_permutex2var_ps(t2, lo, t3), _mm512_permutex2var_ps(t2, hi, t3)};
  for (int k = 0; k < 4; ++k) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, 4 * n - 16 * k));
    const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1);
    _mm512_mask_storeu_ps(v + 16 * k, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, v + 16 * k), q[k]));
  }
}

// Σ_i row[i] v[i] for a row of 0s and 1s (Grid2's B, A, Aᵀ and Bᵀ).
template <int N>
__attribute__((target("avx512f"))) inline __m512 ones(const int (&row)[N], const __m512* v) {
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < N; ++i)
    if (row[i]) acc = _mm512_add_ps(acc, v[i]);
  return acc;
}

__attribute__((target("avx512f"))) void in(const float* from, int64_t fs, int64_t rows, int64_t na,
                                            const int (&m)[3][2], float* to, int64_t xs) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < na; i += 16) {
      const int64_t n = std::min<int64_t>(16, na - i);
      __m512 x[4], h[2][3];
      load4(from + r * fs + 4 * i, n, x);
      for (int y = 0; y < 2; ++y)
        for (int u = 0; u < 3; ++u) h[y][u] = ones(m[u], x + 2 * y);
      const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
      for (int u = 0; u < 3; ++u)
        for (int w = 0; w < 3; ++w) {
          const __m512 hw[2] = {h[0][w], h[1][w]};
          _mm512_mask_storeu_ps(to + (3 * u + w) * xs + r * na + i, mask, ones(m[u], hw));
        }
    }
}

__attribute__((target("avx512f"))) void out(const float* from, int64_t xs, int64_t rows, int64_t na,
                                             const int (&m)[2][3], float* to, int64_t ts) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < na; i += 16) {
      const int64_t n = std::min<int64_t>(16, na - i);
      const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
      __m512 h[2][3];  // along x: h[x][u] = Σ_w m[x][w] P[u, w]
      for (int u = 0; u < 3; ++u) {
        __m512 p[3];
        for (int w = 0; w < 3; ++w) p[w] = _mm512_maskz_loadu_ps(mask, from + (3 * u + w) * xs + r * na + i);
        for (int x = 0; x < 2; ++x) h[x][u] = ones(m[x], p);
      }
      __m512 o[4];
      for (int y = 0; y < 2; ++y)
        for (int x = 0; x < 2; ++x) o[2 * y + x] = ones(m[y], h[x]);
      add4(o, n, to + r * ts + 4 * i);
    }
}

}  // namespace grid2_avx512

// to[ξ xs + r na + i] = (M v M')[ξ], ξ = 3 u + v', of the 2x2 grid values v = from[r fs + 4 i + (0..3)]
// (M = Grid2::B or Grid2::A, 3 x 2), for `rows` rows of na positions.
template <typename T>
void grid2_in(const T* from, int64_t fs, int64_t rows, int64_t na, const int (&m)[3][2], T* to, int64_t xs) {
  if constexpr (std::is_same<T, float>::value) {
    if (has_avx512()) return grid2_avx512::in(from, fs, rows, na, m, to, xs);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* f = from + r * fs;
    T* t = to + r * na;
    for (int64_t i = 0; i < na; ++i) {
      const T* v = f + 4 * i;
      T h[2][3];  // along x
      for (int y = 0; y < 2; ++y)
        for (int u = 0; u < 3; ++u) h[y][u] = T(m[u][0]) * v[2 * y] + T(m[u][1]) * v[2 * y + 1];
      for (int u = 0; u < 3; ++u)  // along y
        for (int w = 0; w < 3; ++w) t[(3 * u + w) * xs + i] = T(m[u][0]) * h[0][w] + T(m[u][1]) * h[1][w];
    }
  }
}

// to[r ts + 4 i + (y, x)] += (M P M')[y, x] of P[ξ] = from[ξ xs + r na + i] (M = Grid2::AT or Grid2::BT, 2 x 3).
template <typename T>
void grid2_out(const T* from, int64_t xs, int64_t rows, int64_t na, const int (&m)[2][3], T* to, int64_t ts) {
  if constexpr (std::is_same<T, float>::value) {
    if (has_avx512()) return grid2_avx512::out(from, xs, rows, na, m, to, ts);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* f = from + r * na;
    T* t = to + r * ts;
    for (int64_t i = 0; i < na; ++i) {
      T h[3][2];  // along x
      for (int u = 0; u < 3; ++u)
        for (int x = 0; x < 2; ++x) {
          T acc = 0;
          for (int w = 0; w < 3; ++w)
            if (m[x][w]) acc += T(m[x][w]) * f[(3 * u + w) * xs + i];
          h[u][x] = acc;
        }
      for (int y = 0; y < 2; ++y)  // along y
        for (int x = 0; x < 2; ++x) {
          T acc = 0;
          for (int u = 0; u < 3; ++u)
            if (m[y][u]) acc += T(m[y][u]) * h[u][x];
          t[4 * i + 2 * y + x] += acc;
        }
    }
  }
}

// U[ξ] = (G w G')[ξ] of each support kernel w = ws[o, c] (3x3): u (9 x Cout x Cin) and, when asked, ut
// (9 x Cin x Cout, for the input gradient; by block transposes of u), into kept buffers.
template <typename T>
void grid2_weights(const Geometry& g, const T* ws, std::vector<T>& u, std::vector<T>* ut) {
  const int64_t co = g.cout, ci = g.cin;
  T* uo = grow(u, 9 * co * ci);
  T* to = ut ? grow(*ut, 9 * co * ci) : nullptr;
#pragma omp parallel
  {
#pragma omp for
  for (int64_t o = 0; o < co; ++o)
    for (int64_t c = 0; c < ci; ++c) {
      const T* w = ws + (o * ci + c) * 9;
      T h[3][3];  // along x: h[ky][v] = Σ_kx G[v][kx] w[ky, kx]
      for (int ky = 0; ky < 3; ++ky)
        for (int v = 0; v < 3; ++v)
          h[ky][v] = T(Grid2::G[v][0]) * w[3 * ky] + T(Grid2::G[v][1]) * w[3 * ky + 1] + T(Grid2::G[v][2]) * w[3 * ky + 2];
      for (int u0 = 0; u0 < 3; ++u0)
        for (int v = 0; v < 3; ++v) {
          const T val = T(Grid2::G[u0][0]) * h[0][v] + T(Grid2::G[u0][1]) * h[1][v] + T(Grid2::G[u0][2]) * h[2][v];
          uo[((3 * u0 + v) * co + o) * ci + c] = val;
        }
    }
#pragma omp for
  for (int64_t xi = 0; xi < (to ? 9 : 0); ++xi) transpose(co, ci, uo + xi * co * ci, ci, to + xi * co * ci, co);
  }
}

// Pruned x (nb, Cin, P, Sp): xp[.., a, p] = x[.., a, s_p]; x itself when nothing is pruned.
template <typename T>
const T* pruned_x(const Geometry& g, const T* x, std::vector<T>& buf) {
  if (g.Sp == g.S) return x;  // stride 1 (or a 1x1 grid): s_p = p
  const int64_t rows = g.nb * g.cin * g.P;
  grow(buf, rows * g.Sp);
  T* xp = buf.data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = x + r * g.S;
    T* out = xp + r * g.Sp;
    for (int64_t p = 0; p < g.Sp; ++p) out[p] = in[g.kept[p]];
  }
  return xp;
}

// The task's x rows transposed, xt[(c, s), i] = x[c, a0 + i, s] (Cin S x na), and a row of na zeros after
// them: a support tap t of position p then reads one contiguous row, xt[(c, src_p(t)), :] (the zero row
// where t reads padding).
template <typename T>
T* transposed_chunk(const Geometry& g, const T* xb, int64_t a0, int64_t na, std::vector<T>& buf) {
  T* xt = grow(buf, (g.cin * g.S + 1) * na);
  for (int64_t c = 0; c < g.cin; ++c) transpose(na, g.S, xb + (c * g.P + a0) * g.S, g.S, xt + c * g.S * na, na);
  std::fill_n(xt + g.cin * g.S * na, na, T(0));
  return xt;
}

// Position p's operand on the per-position path, its valid taps' rows of a transposed_chunk copied:
// out[(c, ti), i] = x[c, a0 + i, src_p(ti)] (Cin |T_p| x na).
template <typename T>
void position_operand(const Geometry& g, const T* xt, int64_t na, int64_t p, T* out) {
  const auto& src = g.src[p];
  const int64_t nt = src.size();
  for (int64_t c = 0; c < g.cin; ++c)
    for (int64_t ti = 0; ti < nt; ++ti) std::copy_n(xt + (c * g.S + src[ti]) * na, na, out + (c * nt + ti) * na);
}

// Row pointers of all support taps (c, t) of position p into a transposed_chunk.
template <typename T>
void support_tap_rows(const Geometry& g, const T* xt, int64_t na, int64_t p, const T** rows) {
  const int64_t ks2 = g.ks * g.ks;
  for (int64_t c = 0; c < g.cin; ++c)
    for (int64_t t = 0; t < ks2; ++t) {
      const int64_t src = g.sidx[t * g.Sp + p];
      rows[c * ks2 + t] = xt + (src == g.S ? g.cin * g.S : c * g.S + src) * na;
    }
}

// A zero border of kq/2 around the query dims, (nb, channels, Ha + 2r, Wa + 2r, Sp), written into `out`
// (a kept scratch buffer: no page faults, every element written in parallel): a query tap of one query
// row reads a contiguous run of it, so the 16-row kernel reads it in place. `src` is x (S values per
// position, pruned to the kept ones) or has Sp values per position (dy).
template <typename T>
const T* padded_query_dims(const Geometry& g, const T* src, int64_t channels, bool prune, std::vector<T>& out) {
  const int64_t r = g.kq / 2, hh = g.ha + 2 * r, ww = g.wa + 2 * r, per = prune ? g.S : g.Sp, len = ww * g.Sp;
  grow(out, g.nb * channels * hh * len);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < g.nb * channels * hh; ++row) {  // (b, c, padded query row)
    const int64_t bc = row / hh, ay = row % hh - r;
    T* o = out.data() + row * len;
    if (ay < 0 || ay >= g.ha) {
      std::fill_n(o, len, T(0));
      continue;
    }
    std::fill_n(o, r * g.Sp, T(0));
    std::fill_n(o + (r + g.wa) * g.Sp, r * g.Sp, T(0));
    for (int64_t ax = 0; ax < g.wa; ++ax) {
      const T* in = src + ((bc * g.ha + ay) * g.wa + ax) * per;
      T* d = o + (ax + r) * g.Sp;
      for (int64_t p = 0; p < g.Sp; ++p) d[p] = prune ? in[g.kept[p]] : in[p];
    }
  }
  return out.data();
}

// Row pointers of the query taps (c, t) of `channels` channels for the query-row segment that starts at
// position (ay, x0) of batch element b, into a padded_query_dims copy.
template <typename T>
void query_tap_rows(const Geometry& g, const T* padded, int64_t channels, int64_t b, int64_t ay, int64_t x0,
                    const T** rows) {
  const int64_t hh = g.ha + g.kq - 1, ww = g.wa + g.kq - 1;
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < g.kq2; ++t)
      rows[c * g.kq2 + t] = padded + (((b * channels + c) * hh + ay + t / g.kq) * ww + x0 + t % g.kq) * g.Sp;
}

// f(i, len) for each run [i, i + len) of the positions a0 .. a0 + na - 1 that lies in one query row.
template <typename F>
void for_query_row_runs(const Geometry& g, int64_t a0, int64_t na, F&& f) {
  for (int64_t i = 0; i < na;) {
    const int64_t len = std::min(g.wa - g.ax[a0 + i], na - i);
    f(i, len);
    i += len;
  }
}

// Cout = 16 (the first layer of each HSNet stack; K = 2 Cin k² is small): C (16 x n, row stride ldc) =
// Wt' (K x 16, the weights transposed) B (K x n) + bias, B's row kk read at rows[kk] (in place: no
// im2col copy where a row is a shifted run of the input). One 16-column block at a time with its 16
// rows in registers: per k one load of B and 16 FMAs with broadcast weights. MKL's kernels do poorly
// with 16 rows. AVX-512 only, chosen at run time.
__attribute__((target("avx512f"))) void gemm16_avx512(int64_t n, int64_t k, const float* wt, const float* const* rows,
                                                        const float* bias, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    __m512 acc[16];
    for (int o = 0; o < 16; ++o) acc[o] = _mm512_set1_ps(bias[o]);
    for (int64_t kk = 0; kk < k; ++kk) {
      const __m512 v = _mm512_maskz_loadu_ps(mask, rows[kk] + j);
      const float* w = wt + kk * 16;
      for (int o = 0; o < 16; ++o) acc[o] = _mm512_fmadd_ps(_mm512_set1_ps(w[o]), v, acc[o]);
    }
    for (int o = 0; o < 16; ++o) _mm512_mask_storeu_ps(c + o * ldc + j, mask, acc[o]);
  }
}

// The Cout = 16 weight gradient: dwt (K x 16, dW transposed) += B dyᵀ, i.e. dwt[kk, o] += Σ_j B[kk, j]
// dy[o, j], with dyt = dyᵀ (n x 16) and B's row kk at rows[kk]. Blocks of 12 rows of B against 256
// columns, 12 accumulators of 16 outputs in registers: per column one load of dyt and 12 FMAs.
__attribute__((target("avx512f"))) void wgrad16_avx512(int64_t n, int64_t k, const float* dyt,
                                                         const float* const* rows, float* dwt) {
  constexpr int R = 12;
  for (int64_t j0 = 0; j0 < n; j0 += 256) {
    const int64_t j1 = std::min(n, j0 + 256);
    for (int64_t k0 = 0; k0 < k; k0 += R) {
      const int nr = static_cast<int>(std::min<int64_t>(R, k - k0));
      __m512 acc[R];
      const float* rp[R];
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_setzero_ps();
        rp[r] = rows[k0 + std::min(r, nr - 1)];  // a short last block repeats its last row, result unused
      }
      for (int64_t j = j0; j < j1; ++j) {
        const __m512 v = _mm512_loadu_ps(dyt + j * 16);
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(rp[r][j]), v, acc[r]);
      }
      for (int r = 0; r < nr; ++r) {
        float* d = dwt + (k0 + r) * 16;
        _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), acc[r]));
      }
    }
  }
}

template <typename T>
bool use_gemm16(int64_t rows) {
  return std::is_same<T, float>::value && rows == 16 && has_avx512();
}

// The main GEMM's weights: Wq (per-position path) or [Wq | Ws] (dense path), Cout x K_main; without
// Wq when the query part is done otherwise. Into a kept buffer (no page faults), rows in parallel.
template <typename T>
const T* main_weights(const Geometry& g, const T* wq, const T* ws, bool with_query, std::vector<T>& buf) {
  const int64_t qc = with_query ? g.cin * g.kq2 : 0, sc = g.dense ? g.cin * g.ks * g.ks : 0, k = qc + sc;
  T* w = grow(buf, g.cout * k);
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < g.cout; ++o) {
    std::copy(wq + o * qc, wq + (o + 1) * qc, w + o * k);
    std::copy(ws + o * sc, ws + (o + 1) * sc, w + o * k + qc);
  }
  return w;
}

// Per tap set (per-position path): Ws restricted to the set, Cout x Cin |T|.
template <typename T>
std::vector<std::vector<T>> tap_weights(const Geometry& g, const T* ws) {
  const int64_t ks2 = g.ks * g.ks, nsets = g.taps.size();
  std::vector<std::vector<T>> packs(nsets);
  for (int64_t k = 0; k < nsets; ++k) packs[k].resize(g.cout * g.cin * g.taps[k].size());
#pragma omp parallel for collapse(2)
  for (int64_t k = 0; k < nsets; ++k)
    for (int64_t o = 0; o < g.cout; ++o) {
      const auto& taps = g.taps[k];
      const int64_t nt = taps.size();
      T* w = packs[k].data();
      for (int64_t c = 0; c < g.cin; ++c)
        for (int64_t ti = 0; ti < nt; ++ti) w[(o * g.cin + c) * nt + ti] = ws[(o * g.cin + c) * ks2 + taps[ti]];
    }
  return packs;
}

template <typename T>
void main_cols(const Geometry& g, const T* xb, const T* xpb, int64_t a0, int64_t na, T* col, bool with_query) {
  if (with_query) query_cols(g, xpb, a0, na, col);
  if (g.dense) support_cols(g, xb, a0, na, col + (with_query ? g.cin * g.kq2 * na * g.Sp : 0));
}

template <typename T>
WinogradScratch<T>& winograd_scratch() {
  static thread_local WinogradScratch<T> s;
  return s;
}

// y[:, chunk, :] = W_main col_main (+ per p: Ws_p col_s(p)) (+ the query part by Winograd) + bias
template <typename T>
void forward_impl(const Geometry& g, const T* x, const T* wq, const T* ws, const T* bias, T* y) {
  const bool query_in_main = !g.wino;
  const T* w = main_weights(g, wq, ws, query_in_main, scratch<T, kCallSlots + 3>());
  const auto packs = g.per_position() ? tap_weights(g, ws) : std::vector<std::vector<T>>();
  const T* wbig = g.small_s ? big_weights(g, ws, scratch<T, kCallSlots>()) : nullptr;
  if (g.grid2) grid2_weights(g, ws, scratch<T, kCallSlots>(), static_cast<std::vector<T>*>(nullptr));
  const T* u2 = scratch<T, kCallSlots>().data();
  auto& uq = scratch<T, kCallSlots + 1>();
  if (g.wino) winograd_weights<kWino>(wq, g.cout, g.cin, uq);
  const int64_t k = g.k_main(query_in_main), ldy = g.P * g.Sp;
  const bool g16 = use_gemm16<T>(g.cout);
  std::vector<T> wt(g16 ? k * 16 : 0), zeros16(16, T(0));  // W_main transposed, K x 16
  if (g16)
    for (int64_t o = 0; o < 16; ++o)
      for (int64_t kk = 0; kk < k; ++kk) wt[kk * 16 + o] = w[o * k + kk];
  // (the Cout = 16 path reads the padded copy instead)
  const T* xp = g16 ? nullptr : pruned_x(g, x, scratch<T, kCallSlots + 2>());
  const T* xpp = g16 ? padded_query_dims(g, x, g.cin, true, scratch<T, 7>()) : nullptr;
#pragma omp parallel
  {
    auto &col = scratch<T, 0>(), &cs = scratch<T, 1>(), &tmp = scratch<T, 2>(), &xtr = scratch<T, 3>();
    std::vector<const T*> rows(k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < g.nb * g.nchunks; ++task) {
      const int64_t b = task / g.nchunks, a0 = (task % g.nchunks) * g.chunk, na = std::min(g.chunk, g.P - a0);
      const int64_t n = na * g.Sp;
      const T* xb = x + b * g.cin * g.P * g.S;
      const T* xpb = xp ? xp + b * g.cin * g.P * g.Sp : nullptr;
      T* yc = y + b * g.cout * ldy + a0 * g.Sp;
      if (k == 0) {
        for (int64_t o = 0; o < g.cout; ++o) std::fill(yc + o * ldy, yc + o * ldy + n, bias[o]);
      } else {
        if (g16) {  // query taps read in place from the padded x, per query row run, into y
          const int64_t kqc = g.cin * g.kq2;
          for_query_row_runs(g, a0, na, [&](int64_t i, int64_t len) {
            query_tap_rows(g, xpp, g.cin, b, g.ay[a0 + i], g.ax[a0 + i], rows.data());
            gemm16_avx512(len * g.Sp, kqc, reinterpret_cast<const float*>(wt.data()),
                          reinterpret_cast<const float* const*>(rows.data()), reinterpret_cast<const float*>(bias),
                          reinterpret_cast<float*>(yc + i * g.Sp), ldy);
          });
          if (g.dense) {  // support taps per p, read in place from the transposed chunk: sp[o, p, i], added to y
            const T* xt = transposed_chunk(g, xb, a0, na, xtr);
            T* sp = grow(tmp, 16 * n);
            for (int64_t p = 0; p < g.Sp; ++p) {
              support_tap_rows(g, xt, na, p, rows.data() + kqc);
              gemm16_avx512(na, k - kqc, reinterpret_cast<const float*>(wt.data() + kqc * 16),
                            reinterpret_cast<const float* const*>(rows.data() + kqc),
                            reinterpret_cast<const float*>(zeros16.data()), reinterpret_cast<float*>(sp + p * na), n);
            }
            for (int64_t o = 0; o < 16; ++o) transpose<T, true>(g.Sp, na, sp + o * n, na, yc + o * ldy, g.Sp);
          }
        } else {
          grow(col, k * n);
          main_cols(g, xb, xpb, a0, na, col.data(), query_in_main);
          gemm<T>(false, false, g.cout, n, k, T(1), w, k, col.data(), n, T(0), yc, ldy);
          for (int64_t o = 0; o < g.cout; ++o)
            for (int64_t j = 0; j < n; ++j) yc[o * ldy + j] += bias[o];
        }
      }
      if (g.grid2) {  // per ξ: m[ξ] = U[ξ] (B x)[ξ], y += Aᵀ m A
        T* xt = grow(cs, 9 * g.cin * na);
        T* m = grow(tmp, 9 * g.cout * na);
        grid2_in(xb + a0 * 4, g.P * 4, g.cin, na, Grid2::B, xt, g.cin * na);
        for (int xi = 0; xi < 9; ++xi)
          gemm<T>(false, false, g.cout, na, g.cin, T(1), u2 + xi * g.cout * g.cin, g.cin, xt + xi * g.cin * na, na, T(0),
                  m + xi * g.cout * na, na);
        grid2_out(m, g.cout * na, g.cout, na, Grid2::AT, yc, ldy);
      } else if (g.small_s) {  // tmp[(o, p), i] = wbig xs, added to y[o, a0 + i, p]
        const int64_t kb = g.cin * g.S, mb = g.cout * g.Sp;
        grow(cs, kb * na);
        grow(tmp, mb * na);
        support_rows(g, xb, a0, na, cs.data());
        gemm<T>(false, false, mb, na, kb, T(1), wbig, kb, cs.data(), na, T(0), tmp.data(), na);
        for (int64_t o = 0; o < g.cout; ++o)
          for (int64_t i = 0; i < na; ++i)
            for (int64_t p = 0; p < g.Sp; ++p) yc[o * ldy + i * g.Sp + p] += tmp[(o * g.Sp + p) * na + i];
      } else if (g.per_position()) {  // each p's GEMM into its slice of tmp, then one pass adds all to y
        T* sp = grow(tmp, g.Sp * g.cout * na);
        const T* xt = transposed_chunk(g, xb, a0, na, xtr);
        for (int64_t p = 0; p < g.Sp; ++p) {
          const int64_t kp = g.cin * g.nt(p);
          position_operand(g, xt, na, p, grow(cs, kp * na));
          gemm<T>(false, false, g.cout, na, kp, T(1), packs[g.pack_of[p]].data(), kp, cs.data(), na, T(0),
                  sp + p * g.cout * na, na);
        }
        // y[o, a0 + i, p] += sp[p, o, i]: by 16 x 16 block transposes where Sp fills half a block or more
        // (measured: HSNet's l2.1 forward, Sp = 16, 5% faster; l2.2, Sp = 4, 8% slower than the loop)
        const int64_t per_p = g.cout * na;
        for (int64_t o = 0; o < g.cout; ++o)
          if (g.Sp >= 8) {
            transpose<T, true>(g.Sp, na, sp + o * na, per_p, yc + o * ldy, g.Sp);
          } else {
            for (int64_t i = 0; i < na; ++i) {
              T* yr = yc + o * ldy + i * g.Sp;
              const T* in = sp + o * na + i;
              for (int64_t p = 0; p < g.Sp; ++p) yr[p] += in[p * per_p];
            }
          }
      }
      if (g.wino)
        winograd_conv3x3_rows<kWino>(uq, g.cout, g.cin, xpb, g.ha, g.wa, g.Sp, a0 / g.wa, (a0 + na) / g.wa, yc, ldy,
                              winograd_scratch<T>());
    }
  }
}

// Gradients, per query chunk (tasks own disjoint rows of grad_x):
//   dW_main += dy_chunk col_mainᵀ;  per p (per-position path): dWs_p += dy_p col_s(p)ᵀ;
//   support part of dx: (Wsᵀ dy) scattered to the taps' sources x[:, a, src] (inside the chunk's rows);
//   query part of dx as a gather: dx[:, a, s_p] += Wq_flippedᵀ col_q(dy)[:, (a, p)], nothing written
//   outside the chunk.
template <typename T>
void backward_impl(const Geometry& g, const T* x, const T* wq, const T* ws, const T* dy, T* dx, T* dwq, T* dws,
                   T* db) {
  const bool query_in_main = !g.wino;
  const T* w = main_weights(g, wq, ws, query_in_main, scratch<T, kCallSlots + 3>());
  const auto packs = g.per_position() ? tap_weights(g, ws) : std::vector<std::vector<T>>();
  const T* wbig = g.small_s ? big_weights(g, ws, scratch<T, kCallSlots>()) : nullptr;
  if (g.grid2 && dx) grid2_weights(g, ws, scratch<T, kCallSlots>(), &scratch<T, kCallSlots + 5>());
  const T* u2t = scratch<T, kCallSlots + 5>().data();
  const int64_t ks2 = g.ks * g.ks, ldy = g.P * g.Sp;
  const int64_t qc = query_in_main ? g.cin * g.kq2 : 0, k = g.k_main(query_in_main);  // main GEMM: [query | support]
  const int64_t kb = g.cin * g.S, mb = g.cout * g.Sp;
  const bool dw16 = dwq && use_gemm16<T>(g.cout);  // Cout = 16: the main weight gradient by wgrad16
  const T* xp = dwq && !dw16 ? pruned_x(g, x, scratch<T, kCallSlots + 2>()) : nullptr;
  const T* xpp = dw16 ? padded_query_dims(g, x, g.cin, true, scratch<T, 7>()) : nullptr;
  const int64_t npk = packs.size();
  std::vector<std::vector<T>> packs_t(dx ? npk : 0);  // Ws_pᵀ per tap set (Cin |T| x Cout)
  for (int64_t pk = 0; pk < static_cast<int64_t>(packs_t.size()); ++pk) {
    const int64_t kp = packs[pk].size() / g.cout;
    packs_t[pk].resize(packs[pk].size());
    transpose(g.cout, kp, packs[pk].data(), kp, packs_t[pk].data(), g.cout);
  }
  // The dense path's input gradient: Ws transposed (Cin ks² x Cout), the GEMM's operands untransposed.
  T* wst = g.dense && dx ? grow(scratch<T, kCallSlots + 4>(), g.cin * ks2 * g.cout) : nullptr;
  if (wst) transpose(g.cout, g.cin * ks2, w + qc, k, wst, g.cout);
  auto& uf = scratch<T, kCallSlots + 1>();  // by Winograd: the flipped Wq transformed
  if (g.wino && dx) winograd_weights<kWino>(wq, g.cin, g.cout, uf, true);
  // The input gradient's im2col and 16-row paths: wf[c, (o, u)] = Wq[o, c, kq²-1-u].
  const int64_t flipped = dx && !g.wino ? g.cin : 0;
  std::vector<T> wf(flipped * g.cout * g.kq2);
#pragma omp parallel for
  for (int64_t c = 0; c < flipped; ++c)
    for (int64_t o = 0; o < g.cout; ++o)
      for (int64_t u = 0; u < g.kq2; ++u) wf[(c * g.cout + o) * g.kq2 + u] = wq[(o * g.cin + c) * g.kq2 + g.kq2 - 1 - u];
  const bool dx16 = dx && !g.wino && use_gemm16<T>(g.cin);  // Cin = 16: the query part of dx by gemm16
  std::vector<T> wft(dx16 ? g.cout * g.kq2 * 16 : 0), zeros16(16, T(0));  // wf transposed, (Cout kq²) x 16
  const T* dy_padded = dx16 ? padded_query_dims(g, dy, g.cout, false, scratch<T, 8>()) : nullptr;
  for (int64_t c = 0; dx16 && c < 16; ++c)
    for (int64_t r = 0; r < g.cout * g.kq2; ++r) wft[r * 16 + c] = wf[c * g.cout * g.kq2 + r];
  const int nthr = num_threads();
  // Each thread's gradient sums, in one kept buffer of its own zeroed in the region: the bias's (Cout; of
  // the dy rows while a task has them in cache) and the weights': the main GEMM's (K_main x Cout: the
  // GEMM's right operand is dy's chunk transposed), Winograd's (α² x Cout x Cin), Cout = 16's
  // (K_main x 16), the small grids' (mb x kb) and each tap set's (Cout x Cin |T|), at these offsets.
  constexpr int64_t a2 = WinogradF<kWino>::a * WinogradF<kWino>::a;
  const int64_t off_main = db ? g.cout : 0, off_wino = off_main + g.cout * k;
  const int64_t off_t16 = off_wino + (g.wino ? a2 * g.cout * g.cin : 0), off_big = off_t16 + (dw16 ? k * 16 : 0);
  std::vector<int64_t> off_pack{off_big + (g.small_s ? mb * kb : g.grid2 ? 9 * g.cout * g.cin : 0)};
  for (int64_t pk = 0; pk < npk; ++pk) off_pack.push_back(off_pack.back() + static_cast<int64_t>(packs[pk].size()));
  const int64_t acc_size = dwq ? off_pack.back() : db ? g.cout : 0;
  std::vector<T*> sums(nthr, nullptr);
#pragma omp parallel num_threads(nthr)
  {
    T* part = nullptr;  // this thread's sums
    if (acc_size) {
      auto& buf = scratch<T, 9>();
      grow(buf, acc_size);
      part = buf.data();
      std::fill_n(part, acc_size, T(0));
      sums[thread_id()] = part;
    }
    T* dw = part + off_main;  // the main GEMM's sums
    auto &col = scratch<T, 0>(), &cs = scratch<T, 1>(), &tmp = scratch<T, 2>(), &dyp = scratch<T, 3>(),
         &dcol = scratch<T, 4>(), &dcolq = scratch<T, 5>(), &dxq = scratch<T, 6>(), &xtr = scratch<T, 10>(),
         &dyT = scratch<T, 11>(), &dxT = scratch<T, 12>();
    std::vector<T> acc, dyt;
    std::vector<const T*> rows;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < g.nb * g.nchunks; ++task) {
      const int64_t b = task / g.nchunks, a0 = (task % g.nchunks) * g.chunk, na = std::min(g.chunk, g.P - a0);
      const int64_t n = na * g.Sp;
      const T* xb = x + b * g.cin * g.P * g.S;
      const T* dyb = dy + b * g.cout * ldy;
      const T* dyc = dyb + a0 * g.Sp;  // Cout x n, row stride ldy
      T* dxb = dx ? dx + b * g.cin * g.P * g.S : nullptr;
      for (int64_t o = 0; db && o < g.cout; ++o) part[o] += sum_of(dyc + o * ldy, n);
      if (dx)  // the task's rows of dx start at zero here, in its own thread (no serial zero fill)
        for (int64_t c = 0; c < g.cin; ++c) std::fill_n(dxb + c * g.P * g.S + a0 * g.S, na * g.S, T(0));
      if (dw16) {  // dwt (K x 16) += B dyᵀ; B's rows in place (query rows: per query row run)
        const int64_t kqc = g.cin * g.kq2;
        grow(dyt, n * 16);
        transpose(int64_t(16), n, dyc, ldy, dyt.data(), int64_t(16));
        rows.resize(k);
        for_query_row_runs(g, a0, na, [&](int64_t i, int64_t len) {
          query_tap_rows(g, xpp, g.cin, b, g.ay[a0 + i], g.ax[a0 + i], rows.data());
          wgrad16_avx512(len * g.Sp, kqc, reinterpret_cast<const float*>(dyt.data() + i * g.Sp * 16),
                         reinterpret_cast<const float* const*>(rows.data()), reinterpret_cast<float*>(part + off_t16));
        });
        if (g.dense) {  // support rows per position p from the transposed chunk, dy's rows reordered to (p, i)
          const T* xt = transposed_chunk(g, xb, a0, na, xtr);
          T* dpt = grow(dyT, n * 16);
          for (int64_t p = 0; p < g.Sp; ++p)
            for (int64_t i = 0; i < na; ++i) std::copy_n(dyt.data() + (i * g.Sp + p) * 16, 16, dpt + (p * na + i) * 16);
          for (int64_t p = 0; p < g.Sp; ++p) {
            support_tap_rows(g, xt, na, p, rows.data() + kqc);
            wgrad16_avx512(na, k - kqc, reinterpret_cast<const float*>(dpt + p * na * 16),
                           reinterpret_cast<const float* const*>(rows.data() + kqc),
                           reinterpret_cast<float*>(part + off_t16 + kqc * 16));
          }
        }
      } else if (dwq && k > 0) {
        grow(col, k * n);
        main_cols(g, xb, xp + b * g.cin * g.P * g.Sp, a0, na, col.data(), query_in_main);
        transpose(g.cout, n, dyc, ldy, grow(dyt, n * g.cout), g.cout);
        gemm<T>(false, false, k, g.cout, n, T(1), col.data(), n, dyt.data(), g.cout, T(1), dw, g.cout);
      }
      if (dwq && g.wino)
        winograd_weight_grad_rows<kWino>(dyc, g.cout, xp + b * g.cin * g.P * g.Sp, g.cin, g.ha, g.wa, g.Sp, a0 / g.wa,
                                  (a0 + na) / g.wa, part + off_wino, winograd_scratch<T>());
      if (g.dense && dx) {  // support part, all taps
        grow(dcol, g.cin * ks2 * n);
        gemm<T>(false, false, g.cin * ks2, n, g.cout, T(1), wst, g.cout, dyc, ldy, T(0), dcol.data(), n);
        acc.resize(g.S + 1);  // one dx row and a sink for the padding taps (index S)
        for (int64_t c = 0; c < g.cin; ++c)
          for (int64_t i = 0; i < na; ++i) {
            std::fill(acc.begin(), acc.end(), T(0));
            for (int64_t t = 0; t < ks2; ++t) {
              const T* in = dcol.data() + (c * ks2 + t) * n + i * g.Sp;
              const int* idx = g.sidx.data() + t * g.Sp;
              for (int64_t p = 0; p < g.Sp; ++p) acc[idx[p]] += in[p];
            }
            T* out = dxb + c * g.P * g.S + (a0 + i) * g.S;
            for (int64_t s = 0; s < g.S; ++s) out[s] += acc[s];
          }
      }
      if (g.grid2) {  // support part: dt = A dy A' per ξ; sums[ξ] += dt[ξ] (B x B')[ξ]ᵀ; dx += Bᵀ (Uᵀ[ξ] dt[ξ]) B
        T* dt = grow(dyp, 9 * g.cout * na);
        grid2_in(dyc, ldy, g.cout, na, Grid2::A, dt, g.cout * na);
        if (dwq) {
          T* xt = grow(cs, 9 * g.cin * na);
          grid2_in(xb + a0 * 4, g.P * 4, g.cin, na, Grid2::B, xt, g.cin * na);
          for (int xi = 0; xi < 9; ++xi)
            gemm<T>(false, true, g.cout, g.cin, na, T(1), dt + xi * g.cout * na, na, xt + xi * g.cin * na, na, T(1),
                    part + off_big + xi * g.cout * g.cin, g.cin);
        }
        if (dx) {
          T* m = grow(dcol, 9 * g.cin * na);
          for (int xi = 0; xi < 9; ++xi)
            gemm<T>(false, false, g.cin, na, g.cout, T(1), u2t + xi * g.cin * g.cout, g.cout, dt + xi * g.cout * na, na,
                    T(0), m + xi * g.cin * na, na);
          grid2_out(m, g.cin * na, g.cin, na, Grid2::BT, dxb + a0 * 4, g.P * 4);
        }
      }
      if (g.small_s) {  // support part, one GEMM over (o, p) x (c, s)
        if (dwq) {  // sums (mb x kb) += dyp (mb x na) · xs (na x kb), xs[i, (c, s)] = x[c, a0 + i, s]
          grow(dyp, mb * na);
          for (int64_t o = 0; o < g.cout; ++o)
            for (int64_t i = 0; i < na; ++i)
              for (int64_t p = 0; p < g.Sp; ++p) dyp[(o * g.Sp + p) * na + i] = dyc[o * ldy + i * g.Sp + p];
          T* xs = grow(cs, na * kb);
          for (int64_t i = 0; i < na; ++i)
            for (int64_t c = 0; c < g.cin; ++c)
              std::copy_n(xb + c * g.P * g.S + (a0 + i) * g.S, g.S, xs + i * kb + c * g.S);
          gemm<T>(false, false, mb, kb, na, T(1), dyp.data(), na, xs, kb, T(1), part + off_big, kb);
        }
        if (dx) {  // dxs (na x kb) = dypt (na x mb) · wbig, dypt[i, (o, p)] = dy[o, a0 + i, p]
          T* dypt = grow(tmp, na * mb);
          for (int64_t o = 0; o < g.cout; ++o)
            for (int64_t i = 0; i < na; ++i)
              std::copy_n(dyc + o * ldy + i * g.Sp, g.Sp, dypt + i * mb + o * g.Sp);
          T* dxs = grow(dcol, na * kb);
          gemm<T>(false, false, na, kb, mb, T(1), dypt, mb, wbig, kb, T(0), dxs, kb);
          for (int64_t c = 0; c < g.cin; ++c)
            for (int64_t i = 0; i < na; ++i) {
              T* out = dxb + c * g.P * g.S + (a0 + i) * g.S;
              const T* in = dxs + i * kb + c * g.S;
              for (int64_t s = 0; s < g.S; ++s) out[s] += in[s];
            }
        }
      }
      if (g.per_position()) {  // support part, per p with its valid taps, on transposed chunks
        // dy_pi[o, p, i] = dy[o, a0 + i, p]: position p's (Cout x na) rows lie n apart, from p na on
        T* dy_pi = grow(dyT, g.cout * n);
        for (int64_t o = 0; o < g.cout; ++o) transpose(na, g.Sp, dyc + o * ldy, g.Sp, dy_pi + o * n, na);
        const T* xtc = dwq ? transposed_chunk(g, xb, a0, na, xtr) : nullptr;
        T* dxtc = dx ? grow(dxT, g.cin * g.S * na) : nullptr;  // dx's chunk, transposed like xtc
        if (dx) std::fill_n(dxtc, g.cin * g.S * na, T(0));
        for (int64_t p = 0; p < g.Sp; ++p) {
          const int64_t nt = g.nt(p), kp = g.cin * nt, pk = g.pack_of[p];
          const auto& src = g.src[p];
          if (dwq) {  // sums (kp x Cout) += xs (kp x na) · dyp (na x Cout), xs = p's operand (position_operand)
            T* xs = grow(cs, kp * na);
            position_operand(g, xtc, na, p, xs);
            T* dp = grow(tmp, na * g.cout);
            transpose(g.cout, na, dy_pi + p * na, n, dp, g.cout);
            gemm<T>(false, false, kp, g.cout, na, T(1), xs, na, dp, g.cout, T(1), part + off_pack[pk], g.cout);
          }
          if (dx) {  // (kp x na) = Ws_pᵀ (kp x Cout) · dyp (Cout x na), added to the taps' source rows
            T* d = grow(dcol, kp * na);
            gemm<T>(false, false, kp, na, g.cout, T(1), packs_t[pk].data(), g.cout, dy_pi + p * na, n, T(0), d, na);
            for (int64_t c = 0; c < g.cin; ++c)
              for (int64_t ti = 0; ti < nt; ++ti) {
                T* out = dxtc + (c * g.S + src[ti]) * na;
                const T* in = d + (c * nt + ti) * na;
                for (int64_t i = 0; i < na; ++i) out[i] += in[i];
              }
          }
        }
        for (int64_t c = 0; dx && c < g.cin; ++c)
          transpose<T, true>(g.S, na, dxtc + c * g.S * na, na, dxb + (c * g.P + a0) * g.S, g.S);
      }
      if (dx && g.wino && g.Sp == g.S) {  // query part by Winograd, added straight into dx (nothing pruned)
        winograd_conv3x3_rows<kWino>(uf, g.cin, g.cout, dyb, g.ha, g.wa, g.Sp, a0 / g.wa, (a0 + na) / g.wa,
                                     dxb + a0 * g.S, g.P * g.S, winograd_scratch<T>());
      } else if (dx) {  // query part: dy convolved with Wq flipped (Winograd; 16-row kernel on dy in place; im2col GEMM)
        grow(dxq, g.cin * n);
        if (g.wino) {
          std::fill(dxq.begin(), dxq.begin() + g.cin * n, T(0));
          winograd_conv3x3_rows<kWino>(uf, g.cin, g.cout, dyb, g.ha, g.wa, g.Sp, a0 / g.wa, (a0 + na) / g.wa,
                                       dxq.data(), n, winograd_scratch<T>());
        } else if (dx16) {  // per query-row segment, dy's taps read from its padded copy
          std::vector<const T*> rows(g.cout * g.kq2);
          for_query_row_runs(g, a0, na, [&](int64_t i, int64_t len) {
            query_tap_rows(g, dy_padded, g.cout, b, g.ay[a0 + i], g.ax[a0 + i], rows.data());
            gemm16_avx512(len * g.Sp, g.cout * g.kq2, reinterpret_cast<const float*>(wft.data()),
                          reinterpret_cast<const float* const*>(rows.data()),
                          reinterpret_cast<const float*>(zeros16.data()), reinterpret_cast<float*>(dxq.data() + i * g.Sp),
                          n);
          });
        } else {  // dcolq[(o, u), (i, p)] = dy[o, a0 + i + d_u, p]
          grow(dcolq, g.cout * g.kq2 * n);
          query_cols(g, dyb, a0, na, dcolq.data(), g.cout);
          gemm<T>(false, false, g.cin, n, g.cout * g.kq2, T(1), wf.data(), g.cout * g.kq2, dcolq.data(), n, T(0),
                  dxq.data(), n);
        }
        for (int64_t c = 0; c < g.cin; ++c)
          for (int64_t i = 0; i < na; ++i) {
            T* out = dxb + c * g.P * g.S + (a0 + i) * g.S;
            const T* in = dxq.data() + c * n + i * g.Sp;
            for (int64_t p = 0; p < g.Sp; ++p) out[g.kept[p]] += in[p];
          }
      }
    }
  }
  std::vector<const T*> parts, wino_parts;
  for (T* p : sums)
    if (p) parts.push_back(p), wino_parts.push_back(p + off_wino);
  for (int64_t o = 0; db && o < g.cout; ++o) {
    db[o] = T(0);
    for (const T* part : parts) db[o] += part[o];
  }
  if (dwq) {  // the threads' sums into (Cout, Cin, k, k), in parallel over Cout
#pragma omp parallel for
    for (int64_t o = 0; o < g.cout; ++o) {
      T* dq = dwq + o * g.cin * g.kq2;
      T* ds = dws + o * g.cin * ks2;
      if (!g.wino) std::fill_n(dq, g.cin * g.kq2, T(0));  // (by Winograd: written by the finish below)
      std::fill_n(ds, g.cin * ks2, T(0));
      for (const T* part : parts) {
        const T* main = part + off_main + o;  // [query | support] rows of the main GEMM's sums (K x Cout)
        auto main_at = [&](int64_t kk) { return main[kk * g.cout] + (dw16 ? part[off_t16 + kk * 16 + o] : T(0)); };
        for (int64_t j = 0; j < qc; ++j) dq[j] += main_at(j);
        for (int64_t j = 0; g.dense && j < g.cin * ks2; ++j) ds[j] += main_at(qc + j);
        for (int64_t p = 0; g.small_s && p < g.Sp; ++p)
          for (int64_t t = 0; t < ks2; ++t) {
            const int src = g.sidx[t * g.Sp + p];
            if (src == g.S) continue;
            const T* big = part + off_big + (o * g.Sp + p) * kb + src;
            for (int64_t c = 0; c < g.cin; ++c) ds[c * ks2 + t] += big[c * g.S];
          }
        for (int64_t c = 0; g.grid2 && c < g.cin; ++c) {  // dw = Gᵀ u G over the 9 sums of (o, c)
          T u[9], h[3][3];
          for (int xi = 0; xi < 9; ++xi) u[xi] = part[off_big + (xi * g.cout + o) * g.cin + c];
          for (int u0 = 0; u0 < 3; ++u0)  // along x: h[u0][kx] = Σ_v G[v][kx] u[u0, v]
            for (int kx = 0; kx < 3; ++kx)
              h[u0][kx] = T(Grid2::G[0][kx]) * u[3 * u0] + T(Grid2::G[1][kx]) * u[3 * u0 + 1] + T(Grid2::G[2][kx]) * u[3 * u0 + 2];
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx)
              ds[c * 9 + ky * 3 + kx] +=
                  T(Grid2::G[0][ky]) * h[0][kx] + T(Grid2::G[1][ky]) * h[1][kx] + T(Grid2::G[2][ky]) * h[2][kx];
        }
        for (int64_t pk = 0; pk < npk; ++pk) {
          const auto& taps = g.taps[pk];
          const int64_t nt = taps.size();
          const T* w = part + off_pack[pk] + o;  // (Cin |T| x Cout)
          for (int64_t c = 0; c < g.cin; ++c)
            for (int64_t ti = 0; ti < nt; ++ti) ds[c * ks2 + taps[ti]] += w[(c * nt + ti) * g.cout];
        }
      }
    }
    if (g.wino) winograd_weight_grad_finish<kWino>(wino_parts, g.cout, g.cin, dwq);
  }
}

// dbias = Σ_{b, a, p} dy (the same for bias_q and bias_s).
template <typename T>
void bias_grad(const Geometry& g, const T* dy, T* db) {
#pragma omp parallel for
  for (int64_t o = 0; o < g.cout; ++o) {
    T acc = 0;
    for (int64_t b = 0; b < g.nb; ++b) acc += sum_of(dy + (b * g.cout + o) * g.P * g.Sp, g.P * g.Sp);
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

// A 1x1 support grid (Geometry::folded): the support kernel's one valid tap, its center, reads the same
// x[:, a, 0] as the query kernel's center tap, so Ws's center adds to Wq's and the support part is free.
at::Tensor folded_query_weights(const at::Tensor& wq, const at::Tensor& ws) {
  auto w = wq.clone();
  const int64_t cq = wq.size(2) / 2, cs = ws.size(2) / 2;
  w.select(2, cq).select(2, cq).add_(ws.select(2, cs).select(2, cs));
  return w;
}

at::Tensor cp_conv4d_forward(const at::Tensor& x_, const at::Tensor& wq_, const c10::optional<at::Tensor>& bq,
                             const at::Tensor& ws_, const c10::optional<at::Tensor>& bs, int64_t stride) {
  check_inputs(x_, wq_, ws_, stride);
  const auto x = prepared(x_), ws = prepared(ws_);
  Geometry g(x, wq_, ws, stride, false);  // shapes only
  const auto wq = g.folded ? folded_query_weights(prepared(wq_), ws) : prepared(wq_);
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
  const auto x = prepared(x_), ws = prepared(ws_);
  Geometry g(x, wq_, ws, stride, true);  // shapes only
  const auto wq = g.folded ? folded_query_weights(prepared(wq_), ws) : prepared(wq_);
  const auto dy = grad_out.to(x.scalar_type()).contiguous();
  TORCH_CHECK(dy.numel() == g.nb * g.cout * g.P * g.Sp, "cp_conv4d backward: grad_out has the wrong size");
  auto none = x.new_empty({0});
  auto dx = output_mask[0] ? at::empty_like(x) : none;  // every task zeroes its own rows first
  auto dwq = output_mask[1] ? at::empty_like(wq) : none;
  auto dws = output_mask[1] ? at::empty_like(ws) : none;
  auto db = output_mask[2] ? x.new_empty({g.cout}) : none;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tlg_cp_conv4d_backward", [&] {
    auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    if (output_mask[0] || output_mask[1])  // the bias gradient along, from the same pass over dy
      backward_impl<scalar_t>(g, x.data_ptr<scalar_t>(), wq.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(),
                              dy.data_ptr<scalar_t>(), ptr(dx), ptr(dwq), ptr(dws), ptr(db));
    else if (output_mask[2])
      bias_grad<scalar_t>(g, dy.data_ptr<scalar_t>(), ptr(db));
  });
  if (output_mask[1] && g.folded) {  // Ws's center took part as Wq's center; its other taps read padding
    const int64_t cq = g.kq / 2, cs = g.ks / 2;
    dws.zero_();
    dws.select(2, cs).select(2, cs).copy_(dwq.select(2, cq).select(2, cq));
  }
  const auto dt = x_.scalar_type();
  return {dx.to(dt), dwq.to(dt), db.to(dt), dws.to(dt), db.clone().to(dt)};
}

}  // namespace
}  // namespace tlg_cpu

TORCH_LIBRARY_IMPL(tlg, CPU, m) {
  m.impl("cp_conv4d_forward", &tlg_cpu::cp_conv4d_forward);
  m.impl("cp_conv4d_backward", &tlg_cpu::cp_conv4d_backward);
}
