// Shared helpers of the CPU kernels: row-major GEMM on raw pointers, dtype plumbing.
#pragma once
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <immintrin.h>

#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

// Fortran BLAS exported by libtorch_cpu (MKL, LP64); column-major.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace tlg_cpu {

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                      int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                      int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline int num_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Row-major C (m x n, row stride ldc) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C.
// A is stored (m x k) with row stride lda, or (k x m) when ta; likewise B.
// Note: float32 calls inside an OpenMP region (the kernels' tasks) with untransposed operands, alpha 1 and
// beta 0 or 1 run on oneDNN's batch-reduce GEMM micro-kernel through ATen's cpublas::brgemm (JIT-compiled
// for the CPU, cached per shape; ATen falls back to its own GEMM where the micro-kernel is unavailable).
// oneDNN's JIT kernels outrun MKL's sgemm on our AVX-512 Zen 4 machine: the benchmarks' roofline line
// prints both (oneDNN's 3x3 convolution against torch.mm), and a one-off single-core test gave 108-116
// GFLOP/s for brgemm against 60-102 for sgemm on the kernels' GEMM shapes. That is why the kernels lay
// out their operands untransposed where the layout costs little. Everything else goes to MKL:
// multithreaded outside an OpenMP region, sequential inside one.
template <typename T>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                 const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves C untouched only for beta = 1; make k = 0 mean C = beta C
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
#if defined(CPUBLAS_BRGEMM_F32F32F32) && defined(_OPENMP)
  if constexpr (std::is_same<T, float>::value) {
    if (!ta && !tb && alpha == T(1) && (beta == T(0) || beta == T(1)) && omp_in_parallel()) {
      at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, beta == T(1), a, b, c);
      return;
    }
  }
#endif
  // Column-major BLAS sees the transposes: C^T = op(B)^T op(A)^T. Leading dimensions must be >= 1.
  auto ld = [](int64_t v) { return static_cast<int>(std::max<int64_t>(v, 1)); };
  blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), alpha, b,
            ld(ldb), a, ld(lda), beta, c, ld(ldc));
}

// The AVX-512 kernels (functions with target("avx512f")) run where the CPU has it, chosen at run time.
inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

// One 16 x 16 float block: dst[j, i] = src[i, j] (or += with Add; rows `n` <= 16 of src, the rest read
// as zeros, and `m` <= 16 columns), by the unpack / shuffle / lane-shuffle network.
template <bool Add>
__attribute__((target("avx512f"))) inline void transpose16_avx512(int64_t n, int64_t m, const float* src, int64_t lds,
                                                                  float* dst, int64_t ldd) {
  const __mmask16 cols = static_cast<__mmask16>((1u << m) - 1), rows = static_cast<__mmask16>((1u << n) - 1);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < n ? _mm512_maskz_loadu_ps(cols, src + i * lds) : _mm512_setzero_ps();
  for (int k = 0; k < 8; ++k) {  // pairs of rows interleaved
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // quads: lane L of r[4k + j] holds column 4L + j of rows 4k .. 4k + 3
    r[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {  // lanes gathered across the quads
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
  }
  for (int j = 0; j < m; ++j) {
    if (Add) r[j] = _mm512_add_ps(r[j], _mm512_maskz_loadu_ps(rows, dst + j * ldd));
    _mm512_mask_storeu_ps(dst + j * ldd, rows, r[j]);
  }
}

// dst (cols x rows, row stride ldd) = srcᵀ (or += srcᵀ with Add) for src (rows x cols, row stride lds), in
// 16 x 16 blocks.
template <typename T, bool Add = false>
inline void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t kB = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kB)
    for (int64_t j0 = 0; j0 < cols; j0 += kB) {
      const int64_t i1 = std::min(rows, i0 + kB), j1 = std::min(cols, j0 + kB);
      if constexpr (std::is_same<T, float>::value) {
        if (has_avx512()) {
          transpose16_avx512<Add>(i1 - i0, j1 - j0, src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd);
          continue;
        }
      }
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * ldd + i] = (Add ? dst[j * ldd + i] : T(0)) + src[i * lds + j];
    }
}

// Σ x[0 .. n) in vector partial sums: a single running sum would be one chain of dependent adds.
template <typename T>
inline T sum_of(const T* x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
}

// A kept buffer at least n long (it never shrinks: a later larger request zero-fills only the new tail).
template <typename T>
inline T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// Compute dtype of a kernel: float for half inputs (float accumulation), else the input dtype.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

// `t` in the compute dtype, contiguous (a no-op when it already is).
inline at::Tensor prepared(const at::Tensor& t) {
  return t.to(compute_dtype(t.scalar_type())).contiguous();
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kHalf,
              name, " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

}  // namespace tlg_cpu
