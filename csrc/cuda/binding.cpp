// Thin torch binding of the CUDA kernels: tensors in, raw pointers to csrc/cuda/tlg_cuda.h, tensors
// out; registered for the CUDA dispatch key of the schemas in csrc/ops.cpp. Built by setup.py only
// when torch has CUDA and nvcc exists (it defines TLG_WITH_CUDA). Inputs arrive validated
// (tlg/ops/_checks.py), the mask resized; here they are only made contiguous and of one dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "tlg_cuda.h"

namespace {

using tlg_cuda::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: break;
  }
  TORCH_CHECK(false, "tlg CUDA kernels: unsupported dtype ", t.scalar_type());
  return DType::f32;
}

// Potentials, Schur systems and scratch are kept in the accumulation type.
at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check(int rc, const char* op) {
  TORCH_CHECK(rc == 0, "tlg CUDA ", op, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(rc)));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor scratch(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor like_contig(const std::optional<at::Tensor>& t, const at::Tensor& ref) {
  return t.has_value() && t->defined() ? t->to(ref.scalar_type()).contiguous() : at::Tensor();
}

// ---- correlation ----
at::Tensor correlation_forward(const at::Tensor& query, const at::Tensor& support,
                               const std::optional<at::Tensor>& support_mask, double eps) {
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous(), s = support.to(q.scalar_type()).contiguous();
  const at::Tensor m = like_contig(support_mask, q);
  const int64_t B = q.size(0), C = q.size(1), Hq = q.size(2), Wq = q.size(3), Hs = s.size(2), Ws = s.size(3);
  at::Tensor out = at::empty({B, Hq, Wq, Hs, Ws}, q.options());
  if (out.numel() == 0) return out;
  const DType dt = dtype_of(q);
  at::Tensor work = scratch(tlg_cuda::correlation_workspace(dt, B, C, Hq * Wq, Hs * Ws, false), q);
  check(tlg_cuda::correlation_forward(dt, q.data_ptr(), s.data_ptr(), ptr_or_null(m), out.data_ptr(),
                                      work.data_ptr(), B, C, Hq * Wq, Hs * Ws, eps, 0, stream()),
        "correlation_forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor> correlation_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                                        const at::Tensor& query, const at::Tensor& support,
                                                        const std::optional<at::Tensor>& support_mask, double eps) {
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous(), s = support.to(q.scalar_type()).contiguous();
  const at::Tensor go = grad_out.to(q.scalar_type()).contiguous(), o = out.to(q.scalar_type()).contiguous();
  const at::Tensor m = like_contig(support_mask, q);
  const int64_t B = q.size(0), C = q.size(1), Pq = q.size(2) * q.size(3), Ps = s.size(2) * s.size(3);
  at::Tensor gq = at::zeros_like(q), gs = at::zeros_like(s);
  if (B * C * Pq * Ps == 0) return {gq, gs};
  const DType dt = dtype_of(q);
  at::Tensor work = scratch(tlg_cuda::correlation_workspace(dt, B, C, Pq, Ps, true), q);
  check(tlg_cuda::correlation_backward(dt, go.data_ptr(), o.data_ptr(), q.data_ptr(), s.data_ptr(), ptr_or_null(m),
                                       gq.data_ptr(), gs.data_ptr(), work.data_ptr(), B, C, Pq, Ps, eps, 0, stream()),
        "correlation_backward");
  return {gq, gs};
}

// Layers of equal spatial sizes (channels may differ) written straight into (B, L, Hq, Wq, Hs, Ws):
// layer l is the strided view out[:, l], batch stride L*Pq*Ps.
at::Tensor correlation_stack_forward(at::TensorList query, at::TensorList support,
                                     const std::optional<at::Tensor>& support_mask, double eps) {
  TORCH_CHECK(!query.empty() && query.size() == support.size(), "correlation_stack: one support per query layer");
  const c10::cuda::CUDAGuard guard(query[0].device());
  const at::Tensor q0 = query[0], s0 = support[0];
  const int64_t B = q0.size(0), L = static_cast<int64_t>(query.size()), Hq = q0.size(2), Wq = q0.size(3);
  const int64_t Hs = s0.size(2), Ws = s0.size(3), Pq = Hq * Wq, Ps = Hs * Ws;
  at::Tensor out = at::empty({B, L, Hq, Wq, Hs, Ws}, q0.options());
  if (out.numel() == 0) return out;
  const at::Tensor m = like_contig(support_mask, q0);
  const DType dt = dtype_of(q0);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor q = query[l].to(q0.scalar_type()).contiguous(), s = support[l].to(q0.scalar_type()).contiguous();
    TORCH_CHECK(q.size(0) == B && q.size(2) == Hq && q.size(3) == Wq && s.size(2) == Hs && s.size(3) == Ws,
                "correlation_stack: layers must share batch and spatial sizes");
    const int64_t C = q.size(1);
    at::Tensor work = scratch(tlg_cuda::correlation_workspace(dt, B, C, Pq, Ps, false), q);
    at::Tensor out_l = out.select(1, l);  // strided: batch stride L*Pq*Ps
    check(tlg_cuda::correlation_forward(dt, q.data_ptr(), s.data_ptr(), ptr_or_null(m), out_l.data_ptr(),
                                        work.data_ptr(), B, C, Pq, Ps, eps, out.stride(0), stream()),
          "correlation_stack_forward");
  }
  return out;
}

// Layer l of grad_out and out (B, L, Hq, Wq, Hs, Ws) is read through the batch stride L*Pq*Ps.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> correlation_stack_backward(
    const at::Tensor& grad_out, const at::Tensor& out, at::TensorList query, at::TensorList support,
    const std::optional<at::Tensor>& support_mask, double eps) {
  TORCH_CHECK(!query.empty() && query.size() == support.size(), "correlation_stack: one support per query layer");
  const c10::cuda::CUDAGuard guard(query[0].device());
  const at::ScalarType dtype = query[0].scalar_type();
  const at::Tensor go = grad_out.to(dtype).contiguous(), o = out.to(dtype).contiguous();
  const at::Tensor m = like_contig(support_mask, query[0]);
  std::vector<at::Tensor> gqs, gss;
  for (size_t l = 0; l < query.size(); ++l) {
    const at::Tensor q = query[l].to(dtype).contiguous(), s = support[l].to(dtype).contiguous();
    const int64_t B = q.size(0), C = q.size(1), Pq = q.size(2) * q.size(3), Ps = s.size(2) * s.size(3);
    at::Tensor gq = at::zeros_like(q), gs = at::zeros_like(s);
    if (B * C * Pq * Ps > 0) {
      const int64_t layer = static_cast<int64_t>(l);
      const DType dt = dtype_of(q);
      at::Tensor work = scratch(tlg_cuda::correlation_workspace(dt, B, C, Pq, Ps, true), q);
      check(tlg_cuda::correlation_backward(dt, go.select(1, layer).data_ptr(), o.select(1, layer).data_ptr(),
                                           q.data_ptr(), s.data_ptr(), ptr_or_null(m), gq.data_ptr(), gs.data_ptr(),
                                           work.data_ptr(), B, C, Pq, Ps, eps, go.stride(0), stream()),
            "correlation_stack_backward");
    }
    gqs.push_back(gq);
    gss.push_back(gs);
  }
  return {gqs, gss};
}

// ---- center-pivot 4D convolution ----
tlg_cuda::Conv4dShape conv_shape(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, int64_t stride) {
  return {x.size(0), x.size(1), wq.size(0), x.size(2), x.size(3), x.size(4), x.size(5),
          static_cast<int>(wq.size(-1)), static_cast<int>(ws.size(-1)), static_cast<int>(stride)};
}

at::Tensor cp_conv4d_forward(const at::Tensor& x_, const at::Tensor& weight_q, const std::optional<at::Tensor>& bias_q,
                             const at::Tensor& weight_s, const std::optional<at::Tensor>& bias_s, int64_t stride) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor wq = weight_q.to(x.scalar_type()).contiguous(), ws = weight_s.to(x.scalar_type()).contiguous();
  const at::Tensor bq = like_contig(bias_q, x), bs = like_contig(bias_s, x);
  const tlg_cuda::Conv4dShape sh = conv_shape(x, wq, ws, stride);
  at::Tensor out = at::empty({sh.B, sh.Cout, sh.Ha, sh.Wa, sh.Hp(), sh.Wp()}, x.options());
  if (out.numel() == 0) return out;
  check(tlg_cuda::cp_conv4d_forward(dtype_of(x), x.data_ptr(), wq.data_ptr(), ptr_or_null(bq), ws.data_ptr(),
                                    ptr_or_null(bs), out.data_ptr(), sh, stream()),
        "cp_conv4d_forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cp_conv4d_backward(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& weight_q, const at::Tensor& weight_s,
    int64_t stride, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), go = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor wq = weight_q.to(x.scalar_type()).contiguous(), ws = weight_s.to(x.scalar_type()).contiguous();
  const tlg_cuda::Conv4dShape sh = conv_shape(x, wq, ws, stride);
  const at::Tensor none = x.new_empty({0});
  at::Tensor gx = output_mask[0] ? at::zeros_like(x) : none;
  at::Tensor gwq = output_mask[1] ? at::zeros_like(wq) : none, gws = output_mask[1] ? at::zeros_like(ws) : none;
  at::Tensor gb = output_mask[2] ? at::zeros({sh.Cout}, x.options()) : none;
  if (go.numel() > 0 && x.numel() > 0)
    check(tlg_cuda::cp_conv4d_backward(dtype_of(x), go.data_ptr(), x.data_ptr(), wq.data_ptr(), ws.data_ptr(),
                                       output_mask[0] ? gx.data_ptr() : nullptr,
                                       output_mask[1] ? gwq.data_ptr() : nullptr,
                                       output_mask[1] ? gws.data_ptr() : nullptr,
                                       output_mask[2] ? gb.data_ptr() : nullptr, sh, stream()),
          "cp_conv4d_backward");
  // Both biases are added to every output element: the same gradient.
  return {gx, gwq, gb, gws, output_mask[2] ? gb.clone() : none};
}

// ---- Sinkhorn ----
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward(
    const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps, int64_t max_iter, double tol,
    int64_t check_every) {
  const c10::cuda::CUDAGuard guard(cost.device());
  const at::Tensor c = cost.contiguous();
  const at::Tensor ac = a.to(c.scalar_type()).contiguous(), bc = b.to(c.scalar_type()).contiguous();
  const int64_t B = c.size(0), N = c.size(1), M = c.size(2);
  at::Tensor plan = at::empty_like(c), f = at::empty({B, N}, c.options()), g = at::empty({B, M}, c.options());
  at::Tensor n_iter = at::zeros({B}, c.options().dtype(at::kLong));
  at::Tensor converged = at::zeros({B}, c.options().dtype(at::kBool));
  if (B == 0 || N == 0 || M == 0) return {plan, f, g, n_iter, converged};
  const DType dt = dtype_of(c);
  at::Tensor work = scratch(tlg_cuda::sinkhorn_workspace(dt, B, N, M), c);
  check(tlg_cuda::sinkhorn_forward(dt, c.data_ptr(), ac.data_ptr(), bc.data_ptr(), plan.data_ptr(), f.data_ptr(),
                                   g.data_ptr(), n_iter.data_ptr<int64_t>(), converged.data_ptr<bool>(),
                                   work.data_ptr(), B, N, M, eps, max_iter, tol, check_every, -1, stream()),
        "sinkhorn_forward");
  return {plan, f, g, n_iter, converged};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_backward(const at::Tensor& grad_plan, const at::Tensor& plan_,
                                                                 double eps) {
  const c10::cuda::CUDAGuard guard(plan_.device());
  const at::Tensor p = plan_.contiguous(), gp = grad_plan.to(p.scalar_type()).contiguous();
  const int64_t B = p.size(0), N = p.size(1), M = p.size(2);
  at::Tensor gc = at::zeros_like(p), ga = at::zeros({B, N}, p.options()), gb = at::zeros({B, M}, p.options());
  if (B == 0 || N == 0 || M == 0) return {gc, ga, gb};
  const DType dt = dtype_of(p);
  const auto acc = p.options().dtype(acc_type(p));
  at::Tensor schur = at::empty({B, M, M}, acc), rhs = at::empty({B, M}, acc);
  at::Tensor work = scratch(tlg_cuda::sinkhorn_backward_workspace(dt, B, N, M), p);
  check(tlg_cuda::sinkhorn_backward_prepare(dt, gp.data_ptr(), p.data_ptr(), schur.data_ptr(), rhs.data_ptr(),
                                            work.data_ptr(), B, N, M, eps, stream()),
        "sinkhorn_backward (prepare)");
  // schur y = rhs: B small M x M systems, solved by cuSOLVER/MAGMA through ATen.
  const at::Tensor y = at::linalg_solve(schur, rhs.unsqueeze(2)).squeeze(2).contiguous();
  check(tlg_cuda::sinkhorn_backward_finish(dt, gp.data_ptr(), p.data_ptr(), y.data_ptr(), work.data_ptr(),
                                           gc.data_ptr(), ga.data_ptr(), gb.data_ptr(), B, N, M, eps, stream()),
        "sinkhorn_backward (finish)");
  return {gc, ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(tlg, CUDA, m) {
  m.impl("correlation_forward", &correlation_forward);
  m.impl("correlation_backward", &correlation_backward);
  m.impl("correlation_stack_forward", &correlation_stack_forward);
  m.impl("correlation_stack_backward", &correlation_stack_backward);
  m.impl("cp_conv4d_forward", &cp_conv4d_forward);
  m.impl("cp_conv4d_backward", &cp_conv4d_backward);
  m.impl("sinkhorn_forward", &sinkhorn_forward);
  m.impl("sinkhorn_backward", &sinkhorn_backward);
}
