// Schemas of tlg's native ops (namespace "tlg"). Kernels register implementations for the CPU
// dispatch key in csrc/cpu/ and for the CUDA key in csrc/cuda/; tlg/ops/_native.py adds autograd
// and fake (meta) implementations, so the ops work under autograd and torch.compile.
//
// Semantics: tlg/ops/reference.py. Inputs reaching these ops are already validated, the support
// mask already resized to the support size, and the Sinkhorn marginals materialised.
#include <torch/extension.h>

TORCH_LIBRARY(tlg, m) {
  // (B,C,Hq,Wq), (B,C,Hs,Ws), (B,Hs,Ws)? -> (B,Hq,Wq,Hs,Ws)
  m.def("correlation_forward(Tensor query, Tensor support, Tensor? support_mask, float eps) -> Tensor");
  // `out` is the forward's result. The ReLU gate is read from it, not recomputed: open where out > 0 or where
  // q_i or m_j s_j has zero norm (products exactly 0, where the reference's clamp passes the gradient).
  m.def("correlation_backward(Tensor grad_out, Tensor out, Tensor query, Tensor support, Tensor? support_mask,"
        " float eps) -> (Tensor grad_query, Tensor grad_support)");
  // Layers of equal sizes written straight into the stacked layout: L x (B,C_l,Hq,Wq) -> (B,L,Hq,Wq,Hs,Ws).
  m.def("correlation_stack_forward(Tensor[] query, Tensor[] support, Tensor? support_mask, float eps) -> Tensor");
  m.def("correlation_stack_backward(Tensor grad_out, Tensor out, Tensor[] query, Tensor[] support,"
        " Tensor? support_mask, float eps) -> (Tensor[] grad_query, Tensor[] grad_support)");
  // (B,Cin,Ha,Wa,Hb,Wb) -> (B,Cout,Ha,Wa,ceil(Hb/s),ceil(Wb/s)); odd kernels, padding k//2.
  m.def("cp_conv4d_forward(Tensor x, Tensor weight_q, Tensor? bias_q, Tensor weight_s, Tensor? bias_s, int stride)"
        " -> Tensor");
  // output_mask = [grad_x, grad_weights, grad_biases]; gradients not asked for come back empty (numel 0).
  m.def("cp_conv4d_backward(Tensor grad_out, Tensor x, Tensor weight_q, Tensor weight_s, int stride, bool[3] output_mask)"
        " -> (Tensor grad_x, Tensor grad_weight_q, Tensor grad_bias_q, Tensor grad_weight_s, Tensor grad_bias_s)");
  // cost (B,N,M), a (B,N), b (B,M) -> plan (B,N,M), f (B,N), g (B,M), n_iter (B,) int64, converged (B,) bool
  m.def("sinkhorn_forward(Tensor cost, Tensor a, Tensor b, float eps, int max_iter, float tol, int check_every)"
        " -> (Tensor plan, Tensor f, Tensor g, Tensor n_iter, Tensor converged)");
  // GroupNorm then ReLU, x (B,C,...) -> y, mean (B,G), rstd (B,G) (HSNet encoder's epilogue). The backward
  // recomputes the ReLU gate from x and the statistics; gradients not asked for come back empty.
  m.def("group_norm_relu_forward(Tensor x, int groups, Tensor weight, Tensor bias, float eps)"
        " -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("group_norm_relu_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd, Tensor weight, Tensor bias,"
        " bool[2] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // Implicit-differentiation backward through the converged plan (reference.sinkhorn_implicit_grad).
  m.def("sinkhorn_backward(Tensor grad_plan, Tensor plan, float eps) -> (Tensor grad_cost, Tensor grad_a, Tensor grad_b)");
}

namespace {
bool compiled_with_cuda() {
#ifdef TLG_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tlg native kernels; the ops themselves live in torch.ops.tlg";
  m.def("compiled_with_cuda", &compiled_with_cuda, "whether the CUDA kernels were compiled in");
  m.def("openmp_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
}
