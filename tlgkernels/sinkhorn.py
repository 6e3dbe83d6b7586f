r"""Batched log-domain Sinkhorn (forward) and its implicit-differentiation backward.

Forward, one program per problem and one launch for all iterations (f = g = 0 at start):

.. math::
    f_i \leftarrow \epsilon\big(\log a_i - \mathrm{LSE}_j\tfrac{g_j - C_{ij}}{\epsilon}\big),\quad
    g_j \leftarrow \epsilon\big(\log b_j - \mathrm{LSE}_i\tfrac{f_i - C_{ij}}{\epsilon}\big),\quad
    P_{ij} = \exp\tfrac{f_i + g_j - C_{ij}}{\epsilon}

Every ``check_every`` iterations and at ``max_iter`` the program computes
:math:`\lVert P1 - a\rVert_2` and stops (its potentials frozen) once it is ``<= tol``; the
iteration count and the flag are written per problem, with no host synchronisation.
Problems up to ``SMALL`` x ``SMALL`` keep C in registers for all iterations; larger ones stream
C tile by tile with an online log-sum-exp, keeping f and g in global memory.

Backward (``tlg.ops.reference.sinkhorn_implicit_grad``): row/column sums of P and G*P, the
Schur complement :math:`S = \mathrm{diag}(c) - P^T\mathrm{diag}(1/r)P + 11^T/m` as a GEMM,
``torch.linalg.solve`` for y, then one pass for x and :math:`\partial L/\partial C = P\circ(x1^T + 1y^T - G/\epsilon)`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, fp32_dot_precision, gemm_configs, supported_dtype

SMALL = 128  # largest side held whole on chip


@triton.jit
def _lse(z, axis: tl.constexpr):
    """log-sum-exp along ``axis``; -inf for an all -inf slice (no NaN)."""
    mx = tl.max(z, axis=axis)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.sum(tl.exp(z - tl.expand_dims(mx, axis)), axis=axis))


@triton.jit
def _is_check(it, max_iter, check_every):
    return (it % check_every == 0) | (it == max_iter)


@triton.jit
def _sinkhorn_small_kernel(c_ptr, a_ptr, b_ptr, plan_ptr, f_ptr, g_ptr, n_iter_ptr, conv_ptr,
                           N, M, eps, max_iter, tol, check_every,
                           BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_M)
    rmask, cmask = rows < N, cols < M
    valid = rmask[:, None] & cmask[None, :]
    offs = pid * N * M + rows[:, None] * M + cols[None, :]
    c = tl.load(c_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + pid * N + rows, mask=rmask, other=0.0).to(tl.float32)
    log_a = tl.log(a)
    log_b = tl.log(tl.load(b_ptr + pid * M + cols, mask=cmask, other=0.0).to(tl.float32))
    f = tl.zeros([BLOCK_N], dtype=tl.float32)
    g = tl.zeros([BLOCK_M], dtype=tl.float32)
    it = tl.full([], 0, tl.int32)
    done = tl.full([], 0, tl.int32)
    while (it < max_iter) & (done == 0):
        it += 1
        f = eps * (log_a - _lse(tl.where(valid, (g[None, :] - c) / eps, float("-inf")), 1))
        f = tl.where(rmask, f, 0.0)
        g = eps * (log_b - _lse(tl.where(valid, (f[:, None] - c) / eps, float("-inf")), 0))
        g = tl.where(cmask, g, 0.0)
        if _is_check(it, max_iter, check_every):
            p = tl.exp(tl.where(valid, (f[:, None] + g[None, :] - c) / eps, float("-inf")))
            d = tl.sum(p, axis=1) - a
            done = (tl.sqrt(tl.sum(d * d, axis=0)) <= tol).to(tl.int32)
    p = tl.exp(tl.where(valid, (f[:, None] + g[None, :] - c) / eps, float("-inf")))
    tl.store(plan_ptr + offs, p.to(plan_ptr.dtype.element_ty), mask=valid)
    tl.store(f_ptr + pid * N + rows, f, mask=rmask)
    tl.store(g_ptr + pid * M + cols, g, mask=cmask)
    tl.store(n_iter_ptr + pid, it.to(tl.int64))
    tl.store(conv_ptr + pid, done.to(tl.int8))


@triton.jit
def _stream_update(c_ptr, pot_ptr, other_ptr, marg_ptr, R, K, src, srk, eps,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """pot_r = eps (log marg_r - LSE_k (other_k - C[r, k]) / eps) over all r, C read through strides
    (src, srk) so that the same code updates f (rows) and g (columns)."""
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < R
        run_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            valid = rmask[:, None] & kmask[None, :]
            c = tl.load(c_ptr + rows[:, None] * src + ks[None, :] * srk, mask=valid, other=0.0).to(tl.float32)
            other = tl.load(other_ptr + ks, mask=kmask, other=0.0)
            z = tl.where(valid, (other[None, :] - c) / eps, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(z - safe[:, None]), axis=1)
            run_max = new_max
        lse = tl.where(run_max == float("-inf"), 0.0, run_max) + tl.log(run_sum)
        log_m = tl.log(tl.load(marg_ptr + rows, mask=rmask, other=1.0).to(tl.float32))
        tl.store(pot_ptr + rows, eps * (log_m - lse), mask=rmask)


@triton.jit
def _stream_row_error(c_ptr, f_ptr, g_ptr, a_ptr, N, M, eps, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """||P 1 - a||_2 with P streamed tile by tile."""
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        f = tl.load(f_ptr + rows, mask=rmask, other=0.0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, M, BLOCK_M):
            cols = c0 + tl.arange(0, BLOCK_M)
            cmask = cols < M
            valid = rmask[:, None] & cmask[None, :]
            c = tl.load(c_ptr + rows[:, None] * M + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + cols, mask=cmask, other=0.0)
            acc += tl.sum(tl.exp(tl.where(valid, (f[:, None] + g[None, :] - c) / eps, float("-inf"))), axis=1)
        d = acc - tl.load(a_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        sq += d * d
    return tl.sqrt(tl.sum(sq, axis=0))


@triton.jit
def _sinkhorn_stream_kernel(c_ptr, a_ptr, b_ptr, plan_ptr, f_ptr, g_ptr, n_iter_ptr, conv_ptr,
                            N, M, eps, max_iter, tol, check_every,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    c_ptr += pid * N * M
    plan_ptr += pid * N * M
    a_ptr += pid * N
    f_ptr += pid * N
    b_ptr += pid * M
    g_ptr += pid * M
    it = tl.full([], 0, tl.int32)
    done = tl.full([], 0, tl.int32)
    while (it < max_iter) & (done == 0):
        it += 1
        _stream_update(c_ptr, f_ptr, g_ptr, a_ptr, N, M, M, 1, eps, BLOCK_N, BLOCK_M)
        tl.debug_barrier()
        _stream_update(c_ptr, g_ptr, f_ptr, b_ptr, M, N, 1, M, eps, BLOCK_M, BLOCK_N)
        tl.debug_barrier()
        if _is_check(it, max_iter, check_every):
            done = (_stream_row_error(c_ptr, f_ptr, g_ptr, a_ptr, N, M, eps, BLOCK_N, BLOCK_M) <= tol).to(tl.int32)
            tl.debug_barrier()  # every thread has read f before the next iteration rewrites it
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        f = tl.load(f_ptr + rows, mask=rmask, other=0.0)
        for c0 in range(0, M, BLOCK_M):
            cols = c0 + tl.arange(0, BLOCK_M)
            cmask = cols < M
            valid = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * M + cols[None, :]
            c = tl.load(c_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + cols, mask=cmask, other=0.0)
            tl.store(plan_ptr + offs, tl.exp((f[:, None] + g[None, :] - c) / eps).to(plan_ptr.dtype.element_ty),
                     mask=valid)
    tl.store(n_iter_ptr + pid, it.to(tl.int64))
    tl.store(conv_ptr + pid, done.to(tl.int8))


def sinkhorn_forward(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int,
                     tol: float, check_every: int):
    """cost (B, N, M), a (B, N), b (B, M) -> (plan, f, g, n_iter int64, converged bool)."""
    supported_dtype(cost)
    cost, a, b = cost.contiguous(), a.contiguous(), b.contiguous()
    bsz, n, m = cost.shape
    plan = torch.empty_like(cost)
    f = torch.zeros((bsz, n), dtype=torch.float32, device=cost.device)
    g = torch.zeros((bsz, m), dtype=torch.float32, device=cost.device)  # the streamed kernel starts from these
    n_iter = torch.empty((bsz,), dtype=torch.int64, device=cost.device)
    conv = torch.empty((bsz,), dtype=torch.int8, device=cost.device)
    args = (cost, a, b, plan, f, g, n_iter, conv, n, m, float(eps), int(max_iter), float(tol), int(check_every))
    if max(n, m) <= SMALL:
        bn, bm = triton.next_power_of_2(n), triton.next_power_of_2(m)
        warps = min(16, max(1, bn * bm // 1024))  # ~32 elements of each (BLOCK_N, BLOCK_M) array per thread
        _sinkhorn_small_kernel[(bsz,)](*args, BLOCK_N=bn, BLOCK_M=bm, num_warps=warps)
    else:
        block = 32 if INTERPRET else 64
        _sinkhorn_stream_kernel[(bsz,)](*args, BLOCK_N=block, BLOCK_M=block, num_warps=4)
    return plan, f.to(cost.dtype), g.to(cost.dtype), n_iter, conv.bool()


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _plan_sums_kernel(p_ptr, gr_ptr, w_ptr, sum_p_ptr, sum_pw_ptr, sum_gp_ptr, R, K, sb, sr, sk,
                      HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row r of the (R, K) view: sum_k P, sum_k P w_k (HAS_W), sum_k G P."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    sp = tl.zeros([BLOCK_R], dtype=tl.float32)
    spw = tl.zeros([BLOCK_R], dtype=tl.float32)
    sgp = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        valid = rmask[:, None] & kmask[None, :]
        offs = b * sb + rows[:, None] * sr + ks[None, :] * sk
        p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        gr = tl.load(gr_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        sp += tl.sum(p, axis=1)
        sgp += tl.sum(gr * p, axis=1)
        if HAS_W:
            w = tl.load(w_ptr + b * K + ks, mask=kmask, other=0.0)
            spw += tl.sum(p * w[None, :], axis=1)
    tl.store(sum_p_ptr + b * R + rows, sp, mask=rmask)
    tl.store(sum_gp_ptr + b * R + rows, sgp, mask=rmask)
    if HAS_W:
        tl.store(sum_pw_ptr + b * R + rows, spw, mask=rmask)


@triton.autotune(configs=gemm_configs(32, 32, 32), key=["N", "M"])
@triton.jit
def _schur_kernel(p_ptr, rinv_ptr, diag_ptr, s_ptr, N, M, inv_m, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """S[j, k] = [j == k] diag_j + 1/m - sum_i P[i, j] rinv_i P[i, k]."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    js = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask, kmask = js < M, ks < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i0 in range(0, N, BLOCK_K):
        rows = i0 + tl.arange(0, BLOCK_K)
        imask = rows < N
        pt = tl.load(p_ptr + b * N * M + rows[None, :] * M + js[:, None], mask=jmask[:, None] & imask[None, :],
                     other=0.0).to(tl.float32)
        pk = tl.load(p_ptr + b * N * M + rows[:, None] * M + ks[None, :], mask=imask[:, None] & kmask[None, :],
                     other=0.0).to(tl.float32)
        rinv = tl.load(rinv_ptr + b * N + rows, mask=imask, other=0.0)
        acc = tl.dot(pt, pk * rinv[:, None], acc, input_precision=DOT_PRECISION)
    diag = tl.load(diag_ptr + b * M + js, mask=jmask, other=0.0)
    s = tl.where(js[:, None] == ks[None, :], diag[:, None], 0.0) + inv_m - acc
    tl.store(s_ptr + b * M * M + js[:, None] * M + ks[None, :], s, mask=jmask[:, None] & kmask[None, :])


@triton.jit
def _grad_cost_kernel(p_ptr, gr_ptr, y_ptr, u_ptr, rinv_ptr, gc_ptr, ga_ptr, N, M, eps,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """x = (u - P y) / r;  grad_cost = P (x_i + y_j - G / eps);  grad_a = eps x."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    py = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        valid = rmask[:, None] & (ks < M)[None, :]
        p = tl.load(p_ptr + b * N * M + rows[:, None] * M + ks[None, :], mask=valid, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b * M + ks, mask=ks < M, other=0.0)
        py += tl.sum(p * y[None, :], axis=1)
    u = tl.load(u_ptr + b * N + rows, mask=rmask, other=0.0)
    x = (u - py) * tl.load(rinv_ptr + b * N + rows, mask=rmask, other=0.0)
    tl.store(ga_ptr + b * N + rows, (eps * x).to(ga_ptr.dtype.element_ty), mask=rmask)
    for k0 in range(0, M, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        valid = rmask[:, None] & (ks < M)[None, :]
        offs = b * N * M + rows[:, None] * M + ks[None, :]
        p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        gr = tl.load(gr_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b * M + ks, mask=ks < M, other=0.0)
        tl.store(gc_ptr + offs, (p * (x[:, None] + y[None, :] - gr / eps)).to(gc_ptr.dtype.element_ty), mask=valid)


def sinkhorn_backward(grad_plan: torch.Tensor, plan: torch.Tensor, eps: float):
    """(grad_cost, grad_a, grad_b) through the converged plan; see the module docstring."""
    supported_dtype(plan)
    grad_plan, plan = grad_plan.contiguous(), plan.contiguous()
    bsz, n, m = plan.shape
    dev, f32 = plan.device, torch.float32
    block_r, block_k = (32, 32) if INTERPRET else (32, 128)

    def sums(rows, cols, sr, sk, w):
        sp, spw, sgp = (torch.empty((bsz, rows), dtype=f32, device=dev) for _ in range(3))
        _plan_sums_kernel[(triton.cdiv(rows, block_r), bsz)](
            plan, grad_plan, w if w is not None else sp, sp, spw, sgp, rows, cols, n * m, sr, sk,
            HAS_W=w is not None, BLOCK_R=block_r, BLOCK_K=block_k)
        return sp, spw, sgp

    r, _, gp_rows = sums(n, m, m, 1, None)
    u = gp_rows / eps
    r_inv = torch.where(r > 0, 1.0 / r.clamp_min(torch.finfo(f32).tiny), torch.zeros_like(r))
    cs, pt_w, gp_cols = sums(m, n, 1, m, (u * r_inv).contiguous())
    rhs = gp_cols / eps - pt_w
    diag = cs + (cs <= 0).to(f32)  # zero-mass columns: pin y_j = 0
    schur = torch.empty((bsz, m, m), dtype=f32, device=dev)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(m, meta["BLOCK_N"]), bsz)  # noqa: E731
    _schur_kernel[grid](plan, r_inv, diag, schur, n, m, 1.0 / m, DOT_PRECISION=fp32_dot_precision())
    y = torch.linalg.solve(schur, rhs.unsqueeze(2)).squeeze(2).contiguous()
    grad_cost = torch.empty_like(plan)
    grad_a = torch.empty((bsz, n), dtype=plan.dtype, device=dev)
    _grad_cost_kernel[(triton.cdiv(n, block_r), bsz)](plan, grad_plan, y, u, r_inv, grad_cost, grad_a, n, m, eps,
                                                     BLOCK_R=block_r, BLOCK_K=block_k)
    return grad_cost, grad_a, (eps * y).to(plan.dtype)
