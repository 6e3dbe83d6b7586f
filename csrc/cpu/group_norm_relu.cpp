// GroupNorm followed by ReLU in one op on the CPU (semantics: tlg/ops/reference.py::group_norm_relu),
// the epilogue of every center-pivot layer of HSNet's 4D encoder.
//
// x is (B, C, L) with L the product of the trailing dims, G groups of Cg = C / G channels, n = Cg L:
//
//   forward:  μ, σ² over each (b, group);  r = 1 / sqrt(σ² + eps);
//             y = max(0, x s_c + t_c)  with s_c = r γ_c, t_c = β_c - μ s_c        (one read, one write)
//   backward: g = dy where x s_c + t_c > 0, else 0 (the ReLU gate, recomputed from x: y is not kept);
//             x̂ = (x - μ) r;  A_c = Σ g, B_c = Σ g x̂  per (b, c);
//             dx = r (γ_c g - S1 / n - x̂ S2 / n),  S1 = Σ_c γ_c A_c, S2 = Σ_c γ_c B_c over the group;
//             dγ_c = Σ_b B_c,  dβ_c = Σ_b A_c                                  (two reads of x and dy)
//
// The unfused pair (torch's GroupNorm, then ReLU) runs about eight passes over the tensor in forward and
// backward together and keeps both x and y for the backward; this runs five and keeps x only.
// Statistics per channel row are sums around a shift (the row's first value), in the working precision
// over blocks of kBlock values (vectorised) and in double across blocks, then combined over the group's
// channels exactly (Chan et al.): large means cost no precision.
#include "common.h"

#include <cmath>
#include <vector>

namespace tlg_cpu {
namespace {

constexpr int64_t kBlock = 1024;  // values summed in the working precision before a double accumulator

// The ReLU's input, one expression for the forward and the backward's gate: both see the same value.
template <typename T>
inline T pre_relu(T x, T s, T t) {
  return x * s + t;
}

// ---- the four passes over one (b, c) row of length L (memory-bound; float gets AVX-512 clones) ----
// sums = (Σ u_i, Σ v_i) with term(i, u_i, v_i): in T over blocks of kBlock values (vectorised), in double
// across blocks.
template <typename T, typename Term>
inline __attribute__((always_inline)) void blocked_sums(int64_t len, Term term, double* sums) {
  double s1 = 0, s2 = 0;
  for (int64_t i0 = 0; i0 < len; i0 += kBlock) {
    const int64_t i1 = std::min(len, i0 + kBlock);
    T b1 = 0, b2 = 0;
#pragma omp simd reduction(+ : b1, b2)
    for (int64_t i = i0; i < i1; ++i) {
      T u, v;
      term(i, u, v);
      b1 += u;
      b2 += v;
    }
    s1 += b1, s2 += b2;
  }
  sums[0] = s1, sums[1] = s2;
}

// Moments: Σ (x - k) and Σ (x - k)² around k = x[0].
template <typename T>
inline __attribute__((always_inline)) void moments_row(const T* x, int64_t len, double* sums) {
  const T k = len ? x[0] : T(0);
  blocked_sums<T>(len, [&](int64_t i, T& u, T& v) { u = x[i] - k, v = u * u; }, sums);
}

// y = max(0, x s + t).
template <typename T>
inline __attribute__((always_inline)) void apply_row(const T* x, int64_t len, T s, T t, T* y) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) y[i] = std::max(pre_relu(x[i], s, t), T(0));
}

// Σ g and Σ g (x - m), g = dy where x s + t > 0 (both loads unconditional, so the select vectorises).
template <typename T>
inline __attribute__((always_inline)) void gate_sums_row(const T* x, const T* dy, int64_t len, T s, T t, T m,
                                                         double* sums) {
  blocked_sums<T>(len, [&](int64_t i, T& u, T& v) {
    const T di = dy[i];
    u = pre_relu(x[i], s, t) > T(0) ? di : T(0);
    v = u * (x[i] - m);
  }, sums);
}

// dx = kg g + kx (x - m) + k0, g gated as above.
template <typename T>
inline __attribute__((always_inline)) void dx_row(const T* x, const T* dy, int64_t len, T s, T t, T m, T kg, T kx,
                                                  T k0, T* dx) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const T di = dy[i], g = pre_relu(x[i], s, t) > T(0) ? di : T(0);
    dx[i] = kg * g + kx * (x[i] - m) + k0;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TLG_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define TLG_ROW_CLONES
#endif
TLG_ROW_CLONES void moments_row_f(const float* x, int64_t len, double* sums) { moments_row(x, len, sums); }
TLG_ROW_CLONES void apply_row_f(const float* x, int64_t len, float s, float t, float* y) { apply_row(x, len, s, t, y); }
TLG_ROW_CLONES void gate_sums_row_f(const float* x, const float* dy, int64_t len, float s, float t, float m,
                                    double* sums) {
  gate_sums_row(x, dy, len, s, t, m, sums);
}
TLG_ROW_CLONES void dx_row_f(const float* x, const float* dy, int64_t len, float s, float t, float m, float kg,
                             float kx, float k0, float* dx) {
  dx_row(x, dy, len, s, t, m, kg, kx, k0, dx);
}

// The passes for T: float through the clones, double inline.
template <typename T>
struct Rows {
  static void moments(const T* x, int64_t len, double* sums) { moments_row(x, len, sums); }
  static void apply(const T* x, int64_t len, T s, T t, T* y) { apply_row(x, len, s, t, y); }
  static void gate_sums(const T* x, const T* dy, int64_t len, T s, T t, T m, double* sums) {
    gate_sums_row(x, dy, len, s, t, m, sums);
  }
  static void dx(const T* x, const T* dy, int64_t len, T s, T t, T m, T kg, T kx, T k0, T* out) {
    dx_row(x, dy, len, s, t, m, kg, kx, k0, out);
  }
};
template <>
struct Rows<float> {
  static void moments(const float* x, int64_t len, double* sums) { moments_row_f(x, len, sums); }
  static void apply(const float* x, int64_t len, float s, float t, float* y) { apply_row_f(x, len, s, t, y); }
  static void gate_sums(const float* x, const float* dy, int64_t len, float s, float t, float m, double* sums) {
    gate_sums_row_f(x, dy, len, s, t, m, sums);
  }
  static void dx(const float* x, const float* dy, int64_t len, float s, float t, float m, float kg, float kx,
                 float k0, float* out) {
    dx_row_f(x, dy, len, s, t, m, kg, kx, k0, out);
  }
};

// Row r's scale and shift from the (saved) group statistics: the forward and the backward's gate both
// use these, so the gate opens exactly where the forward's output is positive.
template <typename T>
void row_affine(const T* gamma, const T* beta, const T* mean, const T* rstd, int64_t c, int64_t cg, int64_t r, T& s,
                T& t) {
  const int64_t bg = r / cg, ch = r % c;
  const double m = static_cast<double>(mean[bg]), rs = static_cast<double>(rstd[bg]);
  s = static_cast<T>(rs * static_cast<double>(gamma[ch]));
  t = static_cast<T>(static_cast<double>(beta[ch]) - m * rs * static_cast<double>(gamma[ch]));
}

template <typename T>
void forward_impl(const T* x, const T* gamma, const T* beta, int64_t nb, int64_t c, int64_t len, int64_t groups,
                  double eps, T* y, T* mean_out, T* rstd_out) {
  const int64_t cg = c / groups;
  std::vector<double> mean_c(nb * c), m2_c(nb * c);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < nb * c; ++r) {  // per row: mean and Σ (x - mean)², from sums around x[0]
    double sums[2];
    Rows<T>::moments(x + r * len, len, sums);
    mean_c[r] = static_cast<double>(x[r * len]) + sums[0] / static_cast<double>(len);
    m2_c[r] = std::max(0.0, sums[1] - sums[0] * sums[0] / static_cast<double>(len));
  }
  std::vector<T> scale(nb * c), shift(nb * c);
  for (int64_t bg = 0; bg < nb * groups; ++bg) {
    const int64_t r0 = bg * cg;  // first row (b, c) of the group
    double mean = 0, m2 = 0;
    for (int64_t k = 0; k < cg; ++k) mean += mean_c[r0 + k];
    mean /= static_cast<double>(cg);
    for (int64_t k = 0; k < cg; ++k) {
      const double d = mean_c[r0 + k] - mean;
      m2 += m2_c[r0 + k] + static_cast<double>(len) * d * d;
    }
    mean_out[bg] = static_cast<T>(mean);
    rstd_out[bg] = static_cast<T>(1.0 / std::sqrt(m2 / static_cast<double>(cg * len) + eps));
    for (int64_t k = 0; k < cg; ++k) row_affine(gamma, beta, mean_out, rstd_out, c, cg, r0 + k, scale[r0 + k], shift[r0 + k]);
  }
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < nb * c; ++r) Rows<T>::apply(x + r * len, len, scale[r], shift[r], y + r * len);
}

template <typename T>
void backward_impl(const T* dy, const T* x, const T* mean, const T* rstd, const T* gamma, const T* beta, int64_t nb,
                   int64_t c, int64_t len, int64_t groups, T* dx, T* dgamma, T* dbeta) {
  const int64_t cg = c / groups;
  std::vector<double> a(nb * c), bsum(nb * c);  // A_c = Σ g, B_c = Σ g x̂ per row
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < nb * c; ++r) {
    T s, t;
    row_affine(gamma, beta, mean, rstd, c, cg, r, s, t);
    double sums[2];
    Rows<T>::gate_sums(x + r * len, dy + r * len, len, s, t, mean[r / cg], sums);
    a[r] = sums[0];
    bsum[r] = sums[1] * static_cast<double>(rstd[r / cg]);
  }
  if (dx) {
    std::vector<double> s1(nb * groups, 0.0), s2(nb * groups, 0.0);
    for (int64_t r = 0; r < nb * c; ++r) {
      const double gm = static_cast<double>(gamma[r % c]);
      s1[r / cg] += gm * a[r];
      s2[r / cg] += gm * bsum[r];
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < nb * c; ++r) {
      T s, t;
      row_affine(gamma, beta, mean, rstd, c, cg, r, s, t);
      const int64_t bg = r / cg;
      const double rs = static_cast<double>(rstd[bg]), n = static_cast<double>(cg * len);
      // dx = k_g g + k_x (x - μ) + k_0
      const T kg = static_cast<T>(rs * static_cast<double>(gamma[r % c]));
      const T kx = static_cast<T>(-rs * rs * s2[bg] / n), k0 = static_cast<T>(-rs * s1[bg] / n);
      Rows<T>::dx(x + r * len, dy + r * len, len, s, t, mean[bg], kg, kx, k0, dx + r * len);
    }
  }
  if (dgamma)
    for (int64_t ch = 0; ch < c; ++ch) {
      double sg = 0, sb = 0;
      for (int64_t b = 0; b < nb; ++b) sg += bsum[b * c + ch], sb += a[b * c + ch];
      dgamma[ch] = static_cast<T>(sg);
      dbeta[ch] = static_cast<T>(sb);
    }
}

void check_inputs(const at::Tensor& x, int64_t groups, const at::Tensor& gamma, const at::Tensor& beta) {
  check_cpu(x, "x");
  check_cpu(gamma, "weight");
  check_cpu(beta, "bias");
  TORCH_CHECK(x.dim() >= 2, "group_norm_relu: x must be (B, C, ...)");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "group_norm_relu: channels must be a multiple of groups");
  TORCH_CHECK(gamma.dim() == 1 && beta.dim() == 1 && gamma.size(0) == x.size(1) && beta.size(0) == x.size(1),
              "group_norm_relu: weight and bias must be (C,)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_forward(const at::Tensor& x_, int64_t groups,
                                                                       const at::Tensor& gamma_,
                                                                       const at::Tensor& beta_, double eps) {
  check_inputs(x_, groups, gamma_, beta_);
  const auto x = prepared(x_);
  const auto gamma = gamma_.to(x.scalar_type()).contiguous(), beta = beta_.to(x.scalar_type()).contiguous();
  const int64_t nb = x.size(0), c = x.size(1), len = nb * c ? x.numel() / (nb * c) : 0;
  // The statistics before y: allocated after it, these small blocks, freed at once by a caller that keeps
  // y only, made glibc hand y's pages back and fault them in again on every call (measured: 6x the
  // page faults of torch's group_norm on the encoder's shapes).
  auto mean = x.new_empty({nb, groups}), rstd = x.new_empty({nb, groups});
  auto y = at::empty_like(x);
  if (x.numel())
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tlg_group_norm_relu_forward", [&] {
      forward_impl<scalar_t>(x.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), nb, c,
                             len, groups, eps, y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                             rstd.data_ptr<scalar_t>());
    });
  return {y.to(x_.scalar_type()), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& gamma_, const at::Tensor& beta_, std::array<bool, 2> output_mask) {
  check_inputs(x_, mean.size(-1), gamma_, beta_);
  const auto x = prepared(x_);
  const auto dt = x.scalar_type();
  const auto dy = grad_out.to(dt).contiguous(), m = mean.to(dt).contiguous(), r = rstd.to(dt).contiguous();
  const auto gamma = gamma_.to(dt).contiguous(), beta = beta_.to(dt).contiguous();
  TORCH_CHECK(dy.sizes() == x.sizes(), "group_norm_relu backward: grad_out must have x's shape");
  const int64_t nb = x.size(0), c = x.size(1), groups = m.size(-1), len = nb * c ? x.numel() / (nb * c) : 0;
  auto none = x.new_empty({0});
  auto dx = output_mask[0] ? at::empty_like(x) : none;
  auto dgamma = output_mask[1] ? x.new_zeros({c}) : none, dbeta = output_mask[1] ? x.new_zeros({c}) : none;
  if (x.numel() && (output_mask[0] || output_mask[1]))
    AT_DISPATCH_FLOATING_TYPES(dt, "tlg_group_norm_relu_backward", [&] {
      auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
      backward_impl<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(),
                              r.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), nb, c,
                              len, groups, ptr(dx), ptr(dgamma), ptr(dbeta));
    });
  const auto out = x_.scalar_type();
  return {dx.to(out), dgamma.to(gamma_.scalar_type()), dbeta.to(beta_.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(tlg, CPU, m) {
  m.impl("group_norm_relu_forward", &group_norm_relu_forward);
  m.impl("group_norm_relu_backward", &group_norm_relu_backward);
}

}  // namespace tlg_cpu
