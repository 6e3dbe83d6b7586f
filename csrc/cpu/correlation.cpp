// Correlation volume on the CPU (semantics: tlg/ops/reference.py::correlation).
//
//   q̂_i = q_i / (||q_i|| + eps),   ŝ_j = m_j s_j / (|m_j| ||s_j|| + eps),   C_ij = max(0, <q̂_i, ŝ_j>)
//
// Forward: the support side is packed once per (batch, layer) into Ŝ (C x K), normalised, keeping
// only the K support positions whose mask is nonzero. Query rows are processed in cache-sized
// blocks, one block per task: a GEMM q_blockᵀ Ŝ lands in the output rows (or in a per-thread
// buffer when positions were skipped or the output is half precision), and the epilogue scales by
// 1/(||q_i|| + eps), applies the ReLU and scatters in place while the block is still in cache.
// The stacked op writes layer l of (B, L, Hq, Wq, Hs, Ws) the same way; nothing is copied afterwards.
//
// Backward: the ReLU gate is read from the forward's output (saved by autograd), not recomputed, which
// leaves two GEMMs per (batch, layer): dq̂ = Ŝ Hᵀ and dŝ = q̂ H (see backward_impl).
#include "common.h"

#include <cmath>
#include <vector>

namespace tlg_cpu {
namespace {

// d_i = <x_i, y_i> for the n columns of x, y (C x n); column blocks spread over the threads.
template <typename T>
std::vector<T> col_dots(const T* x, const T* y, int64_t c, int64_t n) {
  constexpr int64_t kCols = 256;
  std::vector<T> acc(n, T(0));
#pragma omp parallel for
  for (int64_t i0 = 0; i0 < n; i0 += kCols) {
    const int64_t i1 = std::min(n, i0 + kCols);
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t i = i0; i < i1; ++i) acc[i] += x[ch * n + i] * y[ch * n + i];
  }
  return acc;
}

// n_i = ||x_i|| for the n columns of x (C x n).
template <typename T>
std::vector<T> col_norms(const T* x, int64_t c, int64_t n) {
  std::vector<T> acc = col_dots(x, x, c, n);
  for (T& v : acc) v = std::sqrt(v);
  return acc;
}

// Support positions kept: all, or those with a nonzero mask.
template <typename T>
std::vector<int64_t> kept_columns(const T* mask, int64_t ns) {
  std::vector<int64_t> cols;
  cols.reserve(ns);
  for (int64_t j = 0; j < ns; ++j)
    if (mask == nullptr || mask[j] != T(0)) cols.push_back(j);
  return cols;
}

// A run of consecutive kept support columns: kept index kk0 .. kk0 + len - 1 are columns j0 .. j0 + len - 1.
struct Run {
  int64_t kk0, j0, len;
};

// The runs of `cols` (increasing): a rectangular mask on an H x W grid gives one run per masked grid row.
inline std::vector<Run> column_runs(const std::vector<int64_t>& cols) {
  std::vector<Run> runs;
  for (int64_t kk = 0; kk < static_cast<int64_t>(cols.size()); ++kk)
    if (!runs.empty() && cols[kk] == runs.back().j0 + runs.back().len)
      ++runs.back().len;
    else
      runs.push_back({kk, cols[kk], 1});
  return runs;
}

// The per-(batch, layer) prepared operands: query norms n_i and 1 / (n_i + eps); the support at its K kept
// columns (and their runs): norms n_k = |m_j| ||s_j||, scales r_k = m_j / (n_k + eps) and Ŝ (C x K) = s_j r_k.
template <typename T>
struct Packed {
  std::vector<T> norm_q, inv_q, norm_s, scale, shat;
  std::vector<int64_t> cols;
  std::vector<Run> runs;
};

template <typename T>
void pack_support(const T* s, const T* mask, int64_t c, int64_t ns, double eps, Packed<T>& p) {
  const int64_t k = p.cols.size();
  const std::vector<T> n = col_norms(s, c, ns);
  p.norm_s.resize(k);
  p.scale.resize(k);
  p.shat.resize(c * k);
  for (int64_t kk = 0; kk < k; ++kk) {
    const int64_t j = p.cols[kk];
    const T m = mask ? mask[j] : T(1);
    p.norm_s[kk] = std::abs(m) * n[j];
    p.scale[kk] = m / (p.norm_s[kk] + T(eps));
  }
  for (int64_t ch = 0; ch < c; ++ch)
    for (int64_t kk = 0; kk < k; ++kk) p.shat[ch * k + kk] = s[ch * ns + p.cols[kk]] * p.scale[kk];
}

template <typename T>
std::vector<Packed<T>> pack_all(const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ss,
                                const at::Tensor& mask, double eps) {
  const int64_t nb = qs[0].size(0), nl = qs.size();
  const int64_t nq = qs[0].size(2) * qs[0].size(3), ns = ss[0].size(2) * ss[0].size(3);
  std::vector<Packed<T>> packs(nb * nl);
  // Two tasks per (batch, layer): its query side and its support side.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < 2 * nb * nl; ++t) {
    const int64_t bl = t / 2, b = bl / nl, l = bl % nl;
    const int64_t c = qs[l].size(1);
    Packed<T>& p = packs[bl];
    if (t % 2 == 0) {
      p.norm_q = col_norms(qs[l].data_ptr<T>() + b * c * nq, c, nq);
      p.inv_q.resize(nq);
      for (int64_t i = 0; i < nq; ++i) p.inv_q[i] = T(1) / (p.norm_q[i] + T(eps));
    } else {
      const T* m = mask.defined() ? mask.data_ptr<T>() + b * ns : nullptr;
      p.cols = kept_columns(m, ns);
      p.runs = column_runs(p.cols);
      pack_support(ss[l].data_ptr<T>() + b * c * ns, m, c, ns, eps, p);
    }
  }
  return packs;
}

// out (B, L, nq, ns) in dtype O; T the compute dtype.
template <typename T, typename O>
void forward_impl(const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ss, const at::Tensor& mask,
                  double eps, O* out) {
  const int64_t nb = qs[0].size(0), nl = qs.size();
  const int64_t nq = qs[0].size(2) * qs[0].size(3), ns = ss[0].size(2) * ss[0].size(3);
  const auto packs = pack_all<T>(qs, ss, mask, eps);
  const int64_t k_max = packs.empty() ? 0 : static_cast<int64_t>(packs[0].cols.size());
  // Rows per block: the block's GEMM output (rows x K) near 1 MiB. On MKL, which packs all of Ŝ (C x K)
  // again for every call, 256 KiB blocks were 10-15% slower at 400 px; on oneDNN's micro-kernel (float32,
  // common.h) 256 KiB to 4 MiB measured alike.
  const int64_t rows = std::min<int64_t>(nq, std::max<int64_t>(16, (1 << 18) / std::max<int64_t>(k_max, 1)));
  const int64_t nblk = (nq + rows - 1) / rows;
  constexpr bool same = std::is_same_v<T, O>;
#pragma omp parallel
  {
    std::vector<T> buf, qt;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < nb * nl * nblk; ++t) {
      const int64_t bl = t / nblk, blk = t % nblk, b = bl / nl, l = bl % nl;
      const Packed<T>& p = packs[bl];
      const int64_t c = qs[l].size(1), k = p.cols.size();
      const int64_t i0 = blk * rows, r = std::min(rows, nq - i0);
      O* dst = out + (bl * nq + i0) * ns;
      const bool direct = same && k == ns;
      T* g = nullptr;
      if constexpr (same) {
        if (direct) g = reinterpret_cast<T*>(dst);
      }
      if (!direct) {
        buf.resize(r * std::max<int64_t>(k, 1));
        g = buf.data();
      }
      // g (r x K) = q[:, i0:i0+r]ᵀ Ŝ, with the block of q transposed first (r C values against r C K
      // products) so that the GEMM takes its operands untransposed (gemm's note)
      const T* q = qs[l].data_ptr<T>() + b * c * nq + i0;
      transpose(c, r, q, nq, grow(qt, r * c), c);
      if (k > 0) gemm<T>(false, false, r, k, c, T(1), qt.data(), c, p.shat.data(), k, T(0), g, k);
      for (int64_t i = 0; i < r; ++i) {
        const T iq = p.inv_q[i0 + i];
        T* gi = g + i * k;
        O* oi = dst + i * ns;
        if (direct) {
          for (int64_t j = 0; j < ns; ++j) gi[j] = std::max(T(0), gi[j] * iq);
        } else {  // run by run, the skipped columns between them zero: every output value written once
          int64_t j = 0;
          for (const Run& run : p.runs) {
            std::fill(oi + j, oi + run.j0, O(0));
            const T* src = gi + run.kk0;
            O* dst = oi + run.j0;
            for (int64_t t = 0; t < run.len; ++t) dst[t] = static_cast<O>(std::max(T(0), src[t] * iq));
            j = run.j0 + run.len;
          }
          std::fill(oi + j, oi + ns, O(0));
        }
      }
    }
  }
}

// Backward of x̂ = x / (n + eps), n = ||x||, for one column: dx = (dx̂ - x̂ c) / (n + eps) with
// c = <x̂, dx̂> (n + eps) / n, and c = 0 at n = 0 (as torch's norm backward).
template <typename T>
inline T norm_back_coef(T dot, T n, double eps) {
  return n > T(0) ? dot * (n + T(eps)) / n : T(0);
}

// Row i of H (1 x K) = G at the open gates: out > 0, or a zero-norm q_i (open_row) or support column.
// Direct: every support column kept (cols[kk] == kk), so the loads are contiguous and the loop vectorises.
template <typename T, bool Direct>
void gate_row(const T* g, const T* o, const Packed<T>& p, bool open_row, T* h) {
  const int64_t k = p.cols.size();
  for (int64_t kk = 0; kk < k; ++kk) {
    const int64_t j = Direct ? kk : p.cols[kk];
    const T gv = g[j];
    h[kk] = ((o[j] > T(0)) | open_row | (p.norm_s[kk] == T(0))) ? gv : T(0);
  }
}

// Per (batch, layer): H (nq x K) = G at the open gates, dq̂ = Ŝ Hᵀ, dŝ = q̂ H, then through the
// normalisations: dq = (dq̂ - q̂ c_q) / (n_q + eps), ds = m (dŝ - ŝ c_s) / (n_s + eps) = (dŝ - ŝ c_s) r.
// The ReLU gate comes from the forward's output: open where out > 0, and on the rows and columns of
// zero-norm q_i or m_j s_j, whose products are exactly 0, where clamp(min=0) passes the gradient.
template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& out, const std::vector<at::Tensor>& qs,
                   const std::vector<at::Tensor>& ss, const at::Tensor& mask, double eps, std::vector<at::Tensor>& gqs,
                   std::vector<at::Tensor>& gss) {
  const int64_t nb = qs[0].size(0), nl = qs.size();
  const int64_t nq = qs[0].size(2) * qs[0].size(3), ns = ss[0].size(2) * ss[0].size(3);
  const auto packs = pack_all<T>(qs, ss, mask, eps);
  int64_t c_max = 0;
  for (const auto& q : qs) c_max = std::max(c_max, q.size(1));
  // Scratch for every (batch, layer), uninitialised: q̂, dq̂ (C x nq), H (nq x K), dŝ (C x K).
  const auto scratch = [&](int64_t n) { return at::empty({n}, grad.options()); };
  const at::Tensor qhat_t = scratch(c_max * nq), dqhat_t = scratch(c_max * nq), h_t = scratch(nq * ns),
                   dshat_t = scratch(c_max * ns);
  T *const qhat = qhat_t.data_ptr<T>(), *const dqhat = dqhat_t.data_ptr<T>(), *const h = h_t.data_ptr<T>(),
           *const dshat = dshat_t.data_ptr<T>();
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t l = 0; l < nl; ++l) {
      const Packed<T>& p = packs[b * nl + l];
      const int64_t c = qs[l].size(1), k = p.cols.size();
      const T* q = qs[l].data_ptr<T>() + b * c * nq;
      const T* g = grad.data_ptr<T>() + (b * nl + l) * nq * ns;
      const T* o = out.data_ptr<T>() + (b * nl + l) * nq * ns;
      T* gq = gqs[l].data_ptr<T>() + b * c * nq;
      T* gs = gss[l].data_ptr<T>() + b * c * ns;
      if (k < ns) std::fill(gs, gs + c * ns, T(0));
      if (k == 0) {
        std::fill(gq, gq + c * nq, T(0));
        continue;
      }
#pragma omp parallel for
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t i = 0; i < nq; ++i) qhat[ch * nq + i] = q[ch * nq + i] * p.inv_q[i];
#pragma omp parallel for
      for (int64_t i = 0; i < nq; ++i) {
        const bool open_row = p.norm_q[i] == T(0);
        if (k == ns)
          gate_row<T, true>(g + i * ns, o + i * ns, p, open_row, h + i * k);
        else
          gate_row<T, false>(g + i * ns, o + i * ns, p, open_row, h + i * k);
      }
      gemm<T>(false, true, c, nq, k, T(1), p.shat.data(), k, h, k, T(0), dqhat, nq);
      gemm<T>(false, false, c, k, nq, T(1), qhat, nq, h, k, T(0), dshat, k);
      std::vector<T> coef_q = col_dots(qhat, dqhat, c, nq), coef_s = col_dots(p.shat.data(), dshat, c, k);
      for (int64_t i = 0; i < nq; ++i) coef_q[i] = norm_back_coef(coef_q[i], p.norm_q[i], eps);
      for (int64_t kk = 0; kk < k; ++kk) coef_s[kk] = norm_back_coef(coef_s[kk], p.norm_s[kk], eps);
#pragma omp parallel for
      for (int64_t ch = 0; ch < c; ++ch) {
        for (int64_t i = 0; i < nq; ++i)
          gq[ch * nq + i] = (dqhat[ch * nq + i] - qhat[ch * nq + i] * coef_q[i]) * p.inv_q[i];
        for (int64_t kk = 0; kk < k; ++kk)
          gs[ch * ns + p.cols[kk]] = (dshat[ch * k + kk] - p.shat[ch * k + kk] * coef_s[kk]) * p.scale[kk];
      }
    }
  }
}

// Shared entry points: L layers of equal spatial sizes.
void check_layers(const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ss) {
  TORCH_CHECK(!qs.empty() && qs.size() == ss.size(), "correlation: need matching non-empty query/support lists");
  for (size_t l = 0; l < qs.size(); ++l) {
    check_cpu(qs[l], "query");
    check_cpu(ss[l], "support");
    TORCH_CHECK(qs[l].dim() == 4 && ss[l].dim() == 4, "correlation: query and support must be 4-D");
    TORCH_CHECK(qs[l].size(0) == ss[l].size(0) && qs[l].size(1) == ss[l].size(1), "correlation: B, C mismatch");
    TORCH_CHECK(qs[l].sizes().slice(2) == qs[0].sizes().slice(2) && ss[l].sizes().slice(2) == ss[0].sizes().slice(2) &&
                    qs[l].size(0) == qs[0].size(0),
                "correlation: stacked layers must share batch and spatial sizes");
    TORCH_CHECK(qs[l].scalar_type() == qs[0].scalar_type() && ss[l].scalar_type() == qs[0].scalar_type(),
                "correlation: one dtype for all inputs");
  }
}

std::vector<at::Tensor> prepared_all(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(prepared(t));
  return out;
}

at::Tensor prepared_mask(const c10::optional<at::Tensor>& mask, at::ScalarType cdt, const at::Tensor& s0) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  TORCH_CHECK(mask->dim() == 3 && mask->size(0) == s0.size(0) && mask->size(1) == s0.size(2) &&
                  mask->size(2) == s0.size(3),
              "correlation: support_mask must be (B, Hs, Ws) at the support size");
  return mask->to(cdt).contiguous();
}

// The inputs of a stacked call, checked and made contiguous in the compute dtype.
struct StackInputs {
  at::ScalarType dtype, cdt;
  std::vector<at::Tensor> qs, ss;
  at::Tensor mask;
  std::vector<int64_t> out_sizes;  // (B, L, Hq, Wq, Hs, Ws)

  StackInputs(at::TensorList query, at::TensorList support, const c10::optional<at::Tensor>& m) {
    std::vector<at::Tensor> q0(query.begin(), query.end()), s0(support.begin(), support.end());
    check_layers(q0, s0);
    dtype = q0[0].scalar_type();
    cdt = compute_dtype(dtype);
    qs = prepared_all(q0);
    ss = prepared_all(s0);
    mask = prepared_mask(m, cdt, ss[0]);
    out_sizes = {q0[0].size(0), static_cast<int64_t>(q0.size()), q0[0].size(2), q0[0].size(3), s0[0].size(2),
                 s0[0].size(3)};
  }
};

at::Tensor stack_forward(at::TensorList query, at::TensorList support, const c10::optional<at::Tensor>& mask,
                         double eps) {
  const StackInputs in(query, support, mask);
  auto out = at::empty(in.out_sizes, query[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.dtype, "tlg_correlation_forward", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_impl<T, scalar_t>(in.qs, in.ss, in.mask, eps, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> stack_backward(
    const at::Tensor& grad_out, const at::Tensor& out, at::TensorList query, at::TensorList support,
    const c10::optional<at::Tensor>& mask, double eps) {
  const StackInputs in(query, support, mask);
  const auto g = grad_out.to(in.cdt).contiguous(), o = out.to(in.cdt).contiguous();
  const int64_t numel = c10::multiply_integers(in.out_sizes);
  TORCH_CHECK(g.numel() == numel && o.numel() == numel, "correlation backward: grad_out or out has the wrong size");
  std::vector<at::Tensor> gq, gs;
  for (size_t l = 0; l < in.qs.size(); ++l) {
    gq.push_back(at::empty_like(in.qs[l]));
    gs.push_back(at::empty_like(in.ss[l]));
  }
  AT_DISPATCH_FLOATING_TYPES(in.cdt, "tlg_correlation_backward",
                             [&] { backward_impl<scalar_t>(g, o, in.qs, in.ss, in.mask, eps, gq, gs); });
  for (size_t l = 0; l < in.qs.size(); ++l) {
    gq[l] = gq[l].to(in.dtype);
    gs[l] = gs[l].to(in.dtype);
  }
  return {gq, gs};
}

at::Tensor correlation_forward(const at::Tensor& query, const at::Tensor& support,
                               const c10::optional<at::Tensor>& mask, double eps) {
  return stack_forward({query}, {support}, mask, eps).squeeze(1);
}

std::tuple<at::Tensor, at::Tensor> correlation_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                                        const at::Tensor& query, const at::Tensor& support,
                                                        const c10::optional<at::Tensor>& mask, double eps) {
  auto [gq, gs] = stack_backward(grad_out, out, {query}, {support}, mask, eps);
  return {gq[0], gs[0]};
}

}  // namespace
}  // namespace tlg_cpu

TORCH_LIBRARY_IMPL(tlg, CPU, m) {
  m.impl("correlation_forward", &tlg_cpu::correlation_forward);
  m.impl("correlation_backward", &tlg_cpu::correlation_backward);
  m.impl("correlation_stack_forward", &tlg_cpu::stack_forward);
  m.impl("correlation_stack_backward", &tlg_cpu::stack_backward);
}
