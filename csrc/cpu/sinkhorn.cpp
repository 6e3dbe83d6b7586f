// Batched log-domain Sinkhorn on the CPU (semantics: tlg/ops/reference.py::sinkhorn).
//
// With scaled potentials f̂ = f/eps, ĝ = g/eps and the log-kernel L = -C/eps (kept in both row- and
// column-major order so that both half-iterations stream contiguous rows):
//
//   f̂_i = log a_i - LSE_j(ĝ_j + L_ij),   ĝ_j = log b_j - LSE_i(f̂_i + L_ij),   P_ij = exp(f̂_i + ĝ_j + L_ij)
//
// Each LSE runs over the stored transpose so that its loops are over the outputs, contiguous and
// vectorised (maxima, then sums of exp(x - max): two passes over an L1/L2-resident matrix, one exp
// per element). Each problem runs its own loop and stops on its own
// convergence (||P1 - a||_2 <= tol checked every check_every iterations and at max_iter), so there
// is no host round trip and no masking of finished problems. When -C/eps spans a small range, a problem
// runs the same iterations in the scaling form (solve_scaling_impl). Problems run in parallel with at least
// kGrain cost entries per thread; fewer problems than threads, each of many entries, parallelise the
// log-domain loop over rows instead.
// Backward: implicit differentiation through the converged plan, as reference.sinkhorn_implicit_grad.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace tlg_cpu {

// exp for |x| < 2^22 (x <= 88), exactly 0 below -87.3: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 Taylor
// polynomial (relative error < 2e-7), 2^n through the exponent bits. Branch-free so loops vectorise.
__attribute__((always_inline)) static inline float exp_f32(float x) {
  const float t = (x * 1.44269504089f + 12582912.f) - 12582912.f;  // round to nearest (|x| < 2^22)
  const float r = (x - t * 0.693145751953125f) - t * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float tc = t < -126.f ? -126.f : t;
  int32_t bits = (static_cast<int32_t>(tc) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.f : p * scale;
}

// log for finite x >= 1 (the LSE sums): x = 2^e m, m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s) = 2 (s + s³/3 + s⁵/5 + s⁷/7 + s⁹/9), s = (m - 1)/(m + 1), |s| < 0.172. Branch-free.
__attribute__((always_inline)) static inline float log_f32(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float t = (m - 1.f) / (m + 1.f), t2 = t * t;
  const float p = 1.f + t2 * (1.f / 3.f + t2 * (1.f / 5.f + t2 * (1.f / 7.f + t2 * (1.f / 9.f))));
  return static_cast<float>(e) * 0.693147180559945f + 2.f * t * p;
}

// LSE over the rows of a transposed matrix: out_i = log Σ_j exp(v_j + lt[j, i]) for i < n_out, lt stored
// (n_in x n_out, row stride ld). The loops run over i, contiguous: pass 1 the maxima, pass 2 the sums of
// exp(x - max), then one log per output; no horizontal reductions, so short rows vectorise as well as
// long ones. -inf when every term is -inf. `sum` is scratch of n_out.
template <typename T, typename Exp, typename Log>
__attribute__((always_inline)) inline void lse_cols_impl(const T* lt, int64_t ld, const T* v, int64_t n_in,
                                                         int64_t n_out, T* out, T* sum, Exp exp_fn, Log log_fn) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n_out; ++i) out[i] = ninf, sum[i] = T(0);
  for (int64_t j = 0; j < n_in; ++j) {
    const T vj = v[j];
    const T* row = lt + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < n_out; ++i) {
      const T x = vj + row[i];
      out[i] = x > out[i] ? x : out[i];
    }
  }
  for (int64_t j = 0; j < n_in; ++j) {
    const T vj = v[j];
    const T* row = lt + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < n_out; ++i) sum[i] += exp_fn(vj + row[i] - out[i]);
  }
#pragma omp simd
  for (int64_t i = 0; i < n_out; ++i) out[i] = out[i] == ninf ? ninf : out[i] + log_fn(sum[i]);
}

// plan_ij = exp(fh_i + gh_j + l_ij)
template <typename T, typename Exp>
__attribute__((always_inline)) inline void plan_rows_impl(const T* l, const T* fh, const T* gh, int64_t n, int64_t m, T* plan, Exp exp_fn) {
  for (int64_t i = 0; i < n; ++i) {
    const T fi = fh[i];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) plan[i * m + j] = exp_fn(fi + gh[j] + l[i * m + j]);
  }
}

// float: vectorised for AVX-512 / AVX2 with runtime dispatch, portable default.
__attribute__((target_clones("avx512f", "avx2", "default"))) void lse_cols_f32(const float* lt, int64_t ld,
                                                                               const float* v, int64_t n_in,
                                                                               int64_t n_out, float* out, float* sum) {
  lse_cols_impl(
      lt, ld, v, n_in, n_out, out, sum, [](float x) __attribute__((always_inline)) { return exp_f32(x); },
      [](float x) __attribute__((always_inline)) { return log_f32(x); });
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void plan_rows_f32(const float* l, const float* fh,
                                                                                const float* gh, int64_t n, int64_t m,
                                                                                float* plan) {
  plan_rows_impl(l, fh, gh, n, m, plan, [](float x) __attribute__((always_inline)) { return exp_f32(x); });
}

// Fixed-width SIMD vectors of N lanes of T (GCC/Clang vector extensions; 64 bytes: one AVX-512 register, two
// AVX2 or four SSE ones, whichever target clone includes them). The helpers are always inlined, so no vector
// crosses a call and -Wpsabi's ABI warning does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename T, int N = 64 / int(sizeof(T))>
struct Simd {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
  static constexpr int64_t lanes = N;
  __attribute__((always_inline)) static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  __attribute__((always_inline)) static void store(T* p, const type& v) { std::memcpy(p, &v, sizeof v); }
  // Σ of the lanes, by halving: log2(N) vector adds.
  __attribute__((always_inline)) static T sum(const type& v) {
    if constexpr (N == 1) {
      return v[0];
    } else {
      typename Simd<T, N / 2>::type lo, hi;
      std::memcpy(&lo, &v, sizeof lo);
      std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
      return Simd<T, N / 2>::sum(lo + hi);
    }
  }
};

// out[0, NV lanes) = Σ_j v_j mt[j, :] (mt: n_in rows, row stride ld): NV vectors accumulating in registers.
template <typename T, int NV>
__attribute__((always_inline)) inline void matvec_block(const T* mt, int64_t ld, const T* v, int64_t n_in, T* out) {
  using S = Simd<T>;
  typename S::type acc[NV] = {};
  for (int64_t j = 0; j < n_in; ++j) {
    const typename S::type vj = typename S::type{} + v[j];
    for (int q = 0; q < NV; ++q) acc[q] += vj * S::load(mt + j * ld + q * S::lanes);
  }
  for (int q = 0; q < NV; ++q) S::store(out + q * S::lanes, acc[q]);
}

// out_i = Σ_j v_j mt[j, i] for i < n_out (mt: n_in x n_out, row stride ld): axpys over the rows, vectorised
// over i, no horizontal sums. n_out: a multiple of 16.
template <typename T>
__attribute__((always_inline)) inline void matvec_cols_impl(const T* mt, int64_t ld, const T* v, int64_t n_in,
                                                            int64_t n_out, T* out) {
  constexpr int64_t L = Simd<T>::lanes;
  int64_t i = 0;
  for (; i + 4 * L <= n_out; i += 4 * L) matvec_block<T, 4>(mt + i, ld, v, n_in, out + i);
  for (; i < n_out; i += L) matvec_block<T, 1>(mt + i, ld, v, n_in, out + i);
}

// out[r] = Σ_j k[r, j] v_j for r < R (k: R rows of stride ld, a multiple of 16 covering the columns): R
// independent vector accumulators sharing each load of v, then one horizontal sum per row.
template <typename T, int R>
__attribute__((always_inline)) inline void dot_rows(const T* k, int64_t ld, const T* v, T* out) {
  using S = Simd<T>;
  typename S::type acc[R] = {};
  for (int64_t j = 0; j < ld; j += S::lanes) {
    const typename S::type vj = S::load(v + j);
    for (int r = 0; r < R; ++r) acc[r] += S::load(k + r * ld + j) * vj;
  }
  for (int r = 0; r < R; ++r) out[r] = S::sum(acc[r]);
}

// out_i = Σ_j k[i, j] v_j for i < n (k: n x ld): dot products over all ld lanes, four rows at a time.
template <typename T>
__attribute__((always_inline)) inline void matvec_rows_impl(const T* k, int64_t ld, const T* v, int64_t n, T* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) dot_rows<T, 4>(k + i * ld, ld, v, out + i);
  for (; i < n; ++i) dot_rows<T, 1>(k + i * ld, ld, v, out + i);
}

// Vector-friendly padding: outputs are computed in whole multiples of kLanes (no scalar remainders).
constexpr int64_t kLanes = 16;
inline int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// The same iterations in the scaling form, for problems whose log-kernel L = -C/eps spans a small range R:
// with K = exp(L - max L) (entries in [e^-R, 1], no under/overflow), u = exp(f̂ + max L), v = exp(ĝ):
//   u = a / (K v),  v = b / (Kᵀ u),  P = diag(u) K diag(v),  row sums r = u ∘ (K v),
// the same iterates as the log-domain updates, with no exp per element and iteration. Only K is stored
// (n x padded(m), padding lanes 0): K v by row dot products, Kᵀ u by axpys over its rows.
// The K v of a convergence check is the next iteration's. Returns false (nothing written) when R is too
// large for T; the caller then runs the log-domain loop.
template <typename T, typename Exp>
__attribute__((always_inline)) inline bool solve_scaling_impl(const T* cost, const T* a, const T* b, int64_t n,
                                                              int64_t m, double eps, int64_t max_iter, double tol,
                                                              int64_t check_every, T* plan, T* f, T* g,
                                                              int64_t* n_iter, bool* converged, Exp exp_fn) {
  constexpr double kMaxRange = sizeof(T) == 4 ? 30.0 : 200.0;
  const T inv_eps = T(1) / T(eps);
  T cmin = cost[0], cmax = cost[0];
#pragma omp simd reduction(min : cmin) reduction(max : cmax)
  for (int64_t k = 0; k < n * m; ++k) {
    cmin = cost[k] < cmin ? cost[k] : cmin;
    cmax = cost[k] > cmax ? cost[k] : cmax;
  }
  const double lmax = -double(cmin) * inv_eps, range = (double(cmax) - double(cmin)) * inv_eps;
  if (!(range <= kMaxRange)) return false;
  const int64_t np = padded(n), mp = padded(m);
  std::unique_ptr<T[]> work(new T[n * mp + 2 * np + 2 * mp]);
  T *k = work.get(), *u = k + n * mp, *kv = u + np, *v = kv + np, *ktu = v + mp;
  // K = exp(L - max L), first into the plan's storage (contiguous: no padding lanes to exponentiate).
#pragma omp simd
  for (int64_t l = 0; l < n * m; ++l) plan[l] = exp_fn((cmin - cost[l]) * inv_eps);
  for (int64_t i = 0; i < n; ++i) {
    std::copy(plan + i * m, plan + (i + 1) * m, k + i * mp);
    std::fill(k + i * mp + m, k + (i + 1) * mp, T(0));
  }
  std::fill(v, v + mp, T(1));
  int64_t it = 0;
  bool conv = false, kv_fresh = false;
  while (it < max_iter && !conv) {
    ++it;
    if (!kv_fresh) matvec_rows_impl(k, mp, v, n, kv);  // K v
    for (int64_t i = 0; i < n; ++i) u[i] = a[i] / kv[i];
    matvec_cols_impl(k, mp, u, n, mp, ktu);  // Kᵀ u
    for (int64_t j = 0; j < m; ++j) v[j] = b[j] / ktu[j];
    kv_fresh = it % check_every == 0 || it == max_iter;
    if (kv_fresh) {
      matvec_rows_impl(k, mp, v, n, kv);
      T err2 = 0;
      for (int64_t i = 0; i < n; ++i) {
        const T r = u[i] * kv[i];
        err2 += (r - a[i]) * (r - a[i]);
      }
      conv = std::sqrt(err2) <= T(tol);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const T ui = u[i];
    const T* kr = k + i * mp;
    T* pr = plan + i * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) pr[j] = ui * kr[j] * v[j];
  }
  for (int64_t i = 0; i < n; ++i) f[i] = T(eps) * (std::log(u[i]) - T(lmax));
  for (int64_t j = 0; j < m; ++j) g[j] = T(eps) * std::log(v[j]);
  *n_iter = it;
  *converged = conv;
  return true;
}

__attribute__((target_clones("avx512f", "avx2", "default"))) bool solve_scaling_f32(
    const float* cost, const float* a, const float* b, int64_t n, int64_t m, double eps, int64_t max_iter, double tol,
    int64_t check_every, float* plan, float* f, float* g, int64_t* n_iter, bool* converged) {
  return solve_scaling_impl(cost, a, b, n, m, eps, max_iter, tol, check_every, plan, f, g, n_iter, converged,
                            [](float x) __attribute__((always_inline)) { return exp_f32(x); });
}

namespace {

void lse_cols(const float* lt, int64_t ld, const float* v, int64_t n_in, int64_t n_out, float* out, float* sum) {
  lse_cols_f32(lt, ld, v, n_in, n_out, out, sum);
}
void lse_cols(const double* lt, int64_t ld, const double* v, int64_t n_in, int64_t n_out, double* out, double* sum) {
  lse_cols_impl(
      lt, ld, v, n_in, n_out, out, sum, [](double x) { return std::exp(x); }, [](double x) { return std::log(x); });
}
void plan_rows(const float* l, const float* fh, const float* gh, int64_t n, int64_t m, float* plan) {
  plan_rows_f32(l, fh, gh, n, m, plan);
}
void plan_rows(const double* l, const double* fh, const double* gh, int64_t n, int64_t m, double* plan) {
  plan_rows_impl(l, fh, gh, n, m, plan, [](double x) { return std::exp(x); });
}

// The fewest cost entries worth a thread (see solve_all).
constexpr int64_t kGrain = 1 << 15;

// [0, n) split into one contiguous range per thread (multiples of kLanes) when `par`.
template <typename F>
void for_rows(int64_t n, bool par, F&& fn) {
  if (!par) return fn(int64_t(0), n);
#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num(), blocks = padded(n) / kLanes;
    const int64_t lo = std::min(n, blocks * t / nt * kLanes), hi = std::min(n, blocks * (t + 1) / nt * kLanes);
    if (hi > lo) fn(lo, hi);
  }
}

// LSE_j(v_j + L_ij) for i < n (computed for padded(n) lanes) from lt = Lᵀ (m x ld, ld = padded(n)).
template <typename T>
void lse_of_rows(const T* lt, const T* v, int64_t n, int64_t m, T* out, T* scratch, bool par) {
  const int64_t ld = padded(n);
  for_rows(n, par, [&](int64_t lo, int64_t hi) {
    lse_cols(lt + lo, ld, v, m, std::min(padded(hi), ld) - lo, out + lo, scratch + lo);
  });
}

// One half-iteration: out_i = logw_i - LSE_j(v_j + L_ij) (-inf where w_i = 0), from lt = Lᵀ.
template <typename T>
void half_step(const T* lt, const T* logw, const T* v, int64_t n, int64_t m, T* out, T* lse, T* scratch, bool par) {
  lse_of_rows(lt, v, n, m, lse, scratch, par);
  for (int64_t i = 0; i < n; ++i)
    out[i] = logw[i] == -std::numeric_limits<T>::infinity() ? logw[i] : logw[i] - lse[i];
}

bool solve_scaling(const float* cost, const float* a, const float* b, int64_t n, int64_t m, double eps,
                   int64_t max_iter, double tol, int64_t check_every, float* plan, float* f, float* g, int64_t* n_iter,
                   bool* converged) {
  return solve_scaling_f32(cost, a, b, n, m, eps, max_iter, tol, check_every, plan, f, g, n_iter, converged);
}
bool solve_scaling(const double* cost, const double* a, const double* b, int64_t n, int64_t m, double eps,
                   int64_t max_iter, double tol, int64_t check_every, double* plan, double* f, double* g,
                   int64_t* n_iter, bool* converged) {
  return solve_scaling_impl(cost, a, b, n, m, eps, max_iter, tol, check_every, plan, f, g, n_iter, converged,
                            [](double x) { return std::exp(x); });
}

template <typename T>
void solve_one(const T* cost, const T* a, const T* b, int64_t n, int64_t m, double eps, int64_t max_iter, double tol,
               int64_t check_every, T* plan, T* f, T* g, int64_t* n_iter, bool* converged, bool par) {
  if (solve_scaling(cost, a, b, n, m, eps, max_iter, tol, check_every, plan, f, g, n_iter, converged)) return;
  // lk = L (n x padded(m)) and lkt = Lᵀ (m x padded(n)); padding lanes hold 0 and are never read back.
  const int64_t np = padded(n), mp = padded(m);
  std::vector<T> lk(n * mp, T(0)), lkt(m * np, T(0)), la(n), lb(m), fh(n, T(0)), gh(m, T(0)),
      lse(std::max(np, mp)), scratch(std::max(np, mp));
  const T inv_eps = T(1) / T(eps);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) lk[i * mp + j] = lkt[j * np + i] = -cost[i * m + j] * inv_eps;
  for (int64_t i = 0; i < n; ++i) la[i] = std::log(a[i]);
  for (int64_t j = 0; j < m; ++j) lb[j] = std::log(b[j]);
  int64_t it = 0;
  bool conv = false;
  while (it < max_iter && !conv) {
    ++it;
    half_step(lkt.data(), la.data(), gh.data(), n, m, fh.data(), lse.data(), scratch.data(), par);
    half_step(lk.data(), lb.data(), fh.data(), m, n, gh.data(), lse.data(), scratch.data(), par);
    if (it % check_every == 0 || it == max_iter) {
      // row sums r_i = exp(f̂_i + LSE_j(ĝ_j + L_ij)); error ||r - a||_2
      lse_of_rows(lkt.data(), gh.data(), n, m, lse.data(), scratch.data(), par);
      T err2 = 0;
      for (int64_t i = 0; i < n; ++i) {
        const T r = std::exp(fh[i] + lse[i]);
        err2 += (r - a[i]) * (r - a[i]);
      }
      conv = std::sqrt(err2) <= T(tol);
    }
  }
  for_rows(n, par, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) plan_rows(lk.data() + i * mp, fh.data() + i, gh.data(), 1, m, plan + i * m);
  });
  for (int64_t i = 0; i < n; ++i) f[i] = T(eps) * fh[i];
  for (int64_t j = 0; j < m; ++j) g[j] = T(eps) * gh[j];
  *n_iter = it;
  *converged = conv;
}

template <typename T>
void solve_all(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps, int64_t max_iter,
               double tol, int64_t check_every, at::Tensor& plan, at::Tensor& f, at::Tensor& g, at::Tensor& n_iter,
               at::Tensor& conv) {
  const int64_t bsz = cost.size(0), n = cost.size(1), m = cost.size(2);
  // Every thread gets at least kGrain cost entries: below that a parallel region costs more than it saves,
  // and far more (a whole time slice) when another process holds a core the team waits for. A batch smaller
  // than the thread count parallelises inside its problems instead (the log-domain loop over rows; the
  // scaling form, several times cheaper, runs on one thread).
  const int64_t threads = num_threads();
  const bool rows = bsz < threads && n * m >= kGrain * threads;
  const int team = rows ? 1 : static_cast<int>(std::clamp<int64_t>(bsz * n * m / kGrain, 1, std::min(bsz, threads)));
  const T *c = cost.data_ptr<T>(), *pa = a.data_ptr<T>(), *pb = b.data_ptr<T>();
  T *pp = plan.data_ptr<T>(), *pf = f.data_ptr<T>(), *pg = g.data_ptr<T>();
  int64_t* pn = n_iter.data_ptr<int64_t>();
  bool* pc = conv.data_ptr<bool>();
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (team > 1)
  for (int64_t k = 0; k < bsz; ++k)
    solve_one<T>(c + k * n * m, pa + k * n, pb + k * m, n, m, eps, max_iter, tol, check_every, pp + k * n * m,
                 pf + k * n, pg + k * m, pn + k, pc + k, rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward(
    const at::Tensor& cost_, const at::Tensor& a_, const at::Tensor& b_, double eps, int64_t max_iter, double tol,
    int64_t check_every) {
  check_cpu(cost_, "cost");
  TORCH_CHECK(cost_.dim() == 3 && a_.dim() == 2 && b_.dim() == 2 && a_.size(0) == cost_.size(0) &&
                  b_.size(0) == cost_.size(0) && a_.size(1) == cost_.size(1) && b_.size(1) == cost_.size(2),
              "sinkhorn: cost (B,N,M), a (B,N), b (B,M) expected");
  TORCH_CHECK(eps > 0 && max_iter >= 1 && check_every >= 1, "sinkhorn: eps > 0, max_iter >= 1, check_every >= 1");
  const auto cost = prepared(cost_);
  const auto a = a_.to(cost.scalar_type()).contiguous(), b = b_.to(cost.scalar_type()).contiguous();
  const int64_t bsz = cost.size(0), n = cost.size(1), m = cost.size(2);
  auto plan = at::empty_like(cost);
  auto f = cost.new_empty({bsz, n}), g = cost.new_empty({bsz, m});
  auto n_iter = at::empty({bsz}, cost.options().dtype(at::kLong));
  auto conv = at::empty({bsz}, cost.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "tlg_sinkhorn_forward",
                             [&] { solve_all<scalar_t>(cost, a, b, eps, max_iter, tol, check_every, plan, f, g, n_iter, conv); });
  const auto dt = cost_.scalar_type();
  return {plan.to(dt), f.to(dt), g.to(dt), n_iter, conv};
}

// Implicit differentiation (reference.sinkhorn_implicit_grad): with gp = G∘P, u = gp 1/eps, v = gpᵀ1/eps,
// r = P1, c = Pᵀ1, solve the Schur system (diag(c) - Pᵀ diag(1/r) P + 11ᵀ/m) y = v - Pᵀ(u/r)
// (zero-mass columns pinned to y = 0), x = (u - P y)/r; then
// dC = P∘(x1ᵀ + 1yᵀ - G/eps), da = eps x, db = eps y.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_backward(const at::Tensor& grad_plan, const at::Tensor& plan_,
                                                                 double eps) {
  check_cpu(plan_, "plan");
  const auto p = prepared(plan_);
  const auto gr = grad_plan.to(p.scalar_type()).contiguous();
  const int64_t m = p.size(2);
  const auto gp = gr * p;
  const auto u = gp.sum(2) / eps, v = gp.sum(1) / eps;
  const auto r = p.sum(2), cs = p.sum(1);
  const auto tiny = std::numeric_limits<float>::min();
  const auto r_inv = at::where(r > 0, 1.0 / r.clamp_min(p.scalar_type() == at::kDouble ? 2.2250738585072014e-308 : tiny),
                               at::zeros_like(r));
  const auto pt = p.transpose(1, 2);
  auto schur = at::diag_embed(cs) - at::bmm(pt, r_inv.unsqueeze(2) * p);
  schur = schur + 1.0 / m + at::diag_embed((cs <= 0).to(p.scalar_type()));
  const auto rhs = v - at::bmm(pt, (u * r_inv).unsqueeze(2)).squeeze(2);
  const auto y = at::linalg_solve(schur, rhs.unsqueeze(2)).squeeze(2);
  const auto x = (u - at::bmm(p, y.unsqueeze(2)).squeeze(2)) * r_inv;
  const auto grad_cost = p * (x.unsqueeze(2) + y.unsqueeze(1) - gr / eps);
  const auto dt = plan_.scalar_type();
  return {grad_cost.to(dt), (eps * x).to(dt), (eps * y).to(dt)};
}

}  // namespace
}  // namespace tlg_cpu

TORCH_LIBRARY_IMPL(tlg, CPU, m) {
  m.impl("sinkhorn_forward", &tlg_cpu::sinkhorn_forward);
  m.impl("sinkhorn_backward", &tlg_cpu::sinkhorn_backward);
}
