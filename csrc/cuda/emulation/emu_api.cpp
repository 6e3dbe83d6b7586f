// C entry points of the emulated kernels, for ctypes (tests/test_cuda_kernels.py).
// Built with the kernel sources (compiled as C++ with -DTLG_CUDA_EMULATION) into one shared library.
#include "../tlg_cuda.h"

using tlg_cuda::DType;

extern "C" {

size_t emu_correlation_workspace(int dt, int64_t B, int64_t C, int64_t Pq, int64_t Ps, int backward) {
  return tlg_cuda::correlation_workspace(DType(dt), B, C, Pq, Ps, backward != 0);
}
int emu_correlation_forward(int dt, const void* q, const void* s, const void* mask, void* out, void* work, int64_t B,
                            int64_t C, int64_t Pq, int64_t Ps, double eps, int64_t batch_stride) {
  return tlg_cuda::correlation_forward(DType(dt), q, s, mask, out, work, B, C, Pq, Ps, eps, batch_stride, nullptr);
}
int emu_correlation_backward(int dt, const void* go, const void* out, const void* q, const void* s, const void* mask,
                             void* gq, void* gs, void* work, int64_t B, int64_t C, int64_t Pq, int64_t Ps, double eps,
                             int64_t batch_stride) {
  return tlg_cuda::correlation_backward(DType(dt), go, out, q, s, mask, gq, gs, work, B, C, Pq, Ps, eps, batch_stride,
                                        nullptr);
}

static tlg_cuda::Conv4dShape shape(const int64_t* d) {  // B, Cin, Cout, Ha, Wa, Hb, Wb, kq, ks, stride
  return {d[0], d[1], d[2], d[3], d[4], d[5], d[6], int(d[7]), int(d[8]), int(d[9])};
}
int emu_cp_conv4d_forward(int dt, const void* x, const void* wq, const void* bq, const void* ws, const void* bs,
                          void* out, const int64_t* dims) {
  return tlg_cuda::cp_conv4d_forward(DType(dt), x, wq, bq, ws, bs, out, shape(dims), nullptr);
}
int emu_cp_conv4d_backward(int dt, const void* go, const void* x, const void* wq, const void* ws, void* gx, void* gwq,
                           void* gws, void* gb, const int64_t* dims) {
  return tlg_cuda::cp_conv4d_backward(DType(dt), go, x, wq, ws, gx, gwq, gws, gb, shape(dims), nullptr);
}

size_t emu_sinkhorn_workspace(int dt, int64_t B, int64_t N, int64_t M) { return tlg_cuda::sinkhorn_workspace(DType(dt), B, N, M); }
int emu_sinkhorn_forward(int dt, const void* cost, const void* a, const void* b, void* plan, void* f, void* g,
                         int64_t* n_iter, bool* converged, void* work, int64_t B, int64_t N, int64_t M, double eps,
                         int64_t max_iter, double tol, int64_t check_every, int streamed) {
  return tlg_cuda::sinkhorn_forward(DType(dt), cost, a, b, plan, f, g, n_iter, converged, work, B, N, M, eps, max_iter,
                                    tol, check_every, streamed, nullptr);
}
size_t emu_sinkhorn_backward_workspace(int dt, int64_t B, int64_t N, int64_t M) {
  return tlg_cuda::sinkhorn_backward_workspace(DType(dt), B, N, M);
}
int emu_sinkhorn_backward_prepare(int dt, const void* gp, const void* plan, void* schur, void* rhs, void* work,
                                  int64_t B, int64_t N, int64_t M, double eps) {
  return tlg_cuda::sinkhorn_backward_prepare(DType(dt), gp, plan, schur, rhs, work, B, N, M, eps, nullptr);
}
int emu_sinkhorn_backward_finish(int dt, const void* gp, const void* plan, const void* y, void* work, void* gc,
                                 void* ga, void* gb, int64_t B, int64_t N, int64_t M, double eps) {
  return tlg_cuda::sinkhorn_backward_finish(DType(dt), gp, plan, y, work, gc, ga, gb, B, N, M, eps, nullptr);
}

}  // extern "C"
