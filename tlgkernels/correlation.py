r"""Correlation volume: ReLU'd cosine similarity of every query pixel with every support pixel.

With per-pixel scales :math:`r^q_i = 1/(\lVert q_i\rVert + \epsilon)` and
:math:`r^s_j = m_j/(|m_j|\,\lVert s_j\rVert + \epsilon)` (so that :math:`r^s_j s_j` is
:math:`\hat s_j = m_j s_j/(\lVert m_j s_j\rVert + \epsilon)`), the volume is one tiled GEMM with
the normalisation folded into its epilogue:

.. math::  C_{ij} = \max\big(0,\ r^q_i\, r^s_j\, \langle q_i, s_j\rangle\big)

written straight into the (B, Hq, Wq, Hs, Ws) layout (or any view with that inner layout, e.g.
one layer of a stacked volume). Support tiles whose scales are all zero (masked out) skip the
channel loop. Backward: with the clamp's gradient mask
:math:`G = \partial L/\partial C\,[r^q_i r^s_j \langle q_i, s_j\rangle \ge 0]` (passing at 0, as torch's clamp does),
:math:`H_{ij} = G_{ij} r^q_i r^s_j` and :math:`\rho_i = \sum_j G_{ij} C_{ij}`, :math:`\gamma_j = \sum_i G_{ij} C_{ij}`,

.. math::
    \partial L/\partial q_i = \sum_j H_{ij} s_j - q_i\, r^q_i \rho_i/\lVert q_i\rVert,\qquad
    \partial L/\partial s_j = \sum_i H_{ij} q_i - s_j\, m_j r^s_j \gamma_j/\lVert m_j s_j\rVert

(the second terms vanish where the norm is zero, as in autograd).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, fp32_dot_precision, gemm_configs, supported_dtype


@triton.jit
def _scale_kernel(x_ptr, m_ptr, scale_ptr, norm_ptr, C, P, sxb, sxc, eps,
                  HAS_MASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """norm_p = |m_p| ||x_p||,  scale_p = m_p / (norm_p + eps)  (m = 1 without a mask)."""
    b = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + offs_p[None, :],
                    mask=(offs_c[:, None] < C) & pmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=0)
    norm = tl.sqrt(acc)
    if HAS_MASK:
        m = tl.load(m_ptr + b * P + offs_p, mask=pmask, other=0.0).to(tl.float32)
        norm = tl.abs(m) * norm
        scale = m / (norm + eps)
    else:
        scale = 1.0 / (norm + eps)
    tl.store(norm_ptr + b * P + offs_p, norm, mask=pmask)
    tl.store(scale_ptr + b * P + offs_p, scale, mask=pmask)


# the GRAD variant accumulates rho/gamma atomically: the autotuner zeroes them between trial runs
@triton.autotune(configs=gemm_configs(32, 32, 32), key=["C", "PQ", "PS", "GRAD"],
                 reset_to_zero=["rowdot_ptr", "coldot_ptr"])
@triton.jit
def _corr_kernel(q_ptr, s_ptr, rq_ptr, rs_ptr, out_ptr, g_ptr, rowdot_ptr, coldot_ptr,
                 C, PQ, PS, sqb, ssb, sob,
                 GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward: out = relu(rq_i rs_j <q_i, s_j>).  GRAD: out = H, and rho/gamma accumulated."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = offs_m < PQ, offs_n < PS
    rq = tl.load(rq_ptr + b * PQ + offs_m, mask=mmask, other=0.0)
    rs = tl.load(rs_ptr + b * PS + offs_n, mask=nmask, other=0.0)
    # a masked-out support tile (all scales zero) contributes exactly zero: skip its channel loop
    k_end = tl.where(tl.max(tl.abs(rs), axis=0) > 0, C, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < C
        a = tl.load(q_ptr + b * sqb + offs_k[None, :] * PQ + offs_m[:, None],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        s = tl.load(s_ptr + b * ssb + offs_k[:, None] * PS + offs_n[None, :],
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, s, acc, input_precision=DOT_PRECISION)
    val = acc * rq[:, None] * rs[None, :]
    offs = b * sob + offs_m[:, None] * PS + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if GRAD:
        g = tl.load(g_ptr + offs, mask=omask, other=0.0).to(tl.float32)
        g = tl.where(val >= 0, g, 0.0)  # clamp(min=0) passes the gradient at 0, as the reference
        tl.store(out_ptr + offs, g * rq[:, None] * rs[None, :], mask=omask)
        gv = g * val
        tl.atomic_add(rowdot_ptr + b * PQ + offs_m, tl.sum(gv, axis=1), mask=mmask)
        tl.atomic_add(coldot_ptr + b * PS + offs_n, tl.sum(gv, axis=0), mask=nmask)
    else:
        tl.store(out_ptr + offs, tl.maximum(val, 0.0).to(out_ptr.dtype.element_ty), mask=omask)


@triton.autotune(configs=gemm_configs(32, 32, 32), key=["C", "P", "K", "shk"])
@triton.jit
def _grad_kernel(x_ptr, h_ptr, y_ptr, coef_ptr, out_ptr, C, P, K, sxb, shb, shk, shp,
                 DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, c, p] = sum_k x[b, c, k] h[b, k, p] - y[b, c, p] coef[b, p]  (x: (C, K), y, out: (C, P))."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask, pmask = offs_c < C, offs_p < P
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(x_ptr + b * sxb + offs_c[:, None] * K + offs_k[None, :],
                    mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        h = tl.load(h_ptr + b * shb + offs_k[:, None] * shk + offs_p[None, :] * shp,
                    mask=kmask[:, None] & pmask[None, :], other=0.0)
        acc = tl.dot(x, h, acc, input_precision=DOT_PRECISION)
    omask = cmask[:, None] & pmask[None, :]
    offs = b * C * P + offs_c[:, None] * P + offs_p[None, :]
    y = tl.load(y_ptr + offs, mask=omask, other=0.0).to(tl.float32)
    coef = tl.load(coef_ptr + b * P + offs_p, mask=pmask, other=0.0)
    tl.store(out_ptr + offs, (acc - y * coef[None, :]).to(out_ptr.dtype.element_ty), mask=omask)


def _scales(x: torch.Tensor, mask: Optional[torch.Tensor], eps: float):
    """(scale, norm), both (B, H*W) float32; see :func:`_scale_kernel`."""
    b, c, h, w = x.shape
    p = h * w
    scale = torch.empty((b, p), dtype=torch.float32, device=x.device)
    norm = torch.empty_like(scale)
    block_p = 16 if INTERPRET else 128
    grid = (triton.cdiv(p, block_p), b)
    _scale_kernel[grid](x, mask if mask is not None else scale, scale, norm, c, p, x.stride(0), x.stride(1), eps,
                        HAS_MASK=mask is not None, BLOCK_C=16 if INTERPRET else 32, BLOCK_P=block_p)
    return scale, norm


def _grid(rows: int, cols: int, batch: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]), batch)


def _prepare(query, support, support_mask):
    supported_dtype(query)
    query, support = query.contiguous(), support.contiguous()
    mask = None if support_mask is None else support_mask.to(torch.float32).contiguous()
    return query, support, mask


def correlation_forward(query: torch.Tensor, support: torch.Tensor, support_mask: Optional[torch.Tensor],
                        eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, C, Hq, Wq), (B, C, Hs, Ws), (B, Hs, Ws)? -> (B, Hq, Wq, Hs, Ws).

    ``out`` may be any tensor whose last four dims are contiguous with that shape (e.g. ``stack[:, l]``
    of a (B, L, Hq, Wq, Hs, Ws) volume); the kernel writes into it and returns it.
    """
    query, support, mask = _prepare(query, support, support_mask)
    b, c, hq, wq = query.shape
    hs, ws = support.shape[-2:]
    if out is None:
        out = torch.empty((b, hq, wq, hs, ws), dtype=query.dtype, device=query.device)
    elif out.shape != (b, hq, wq, hs, ws) or out.stride()[1:] != (wq * hs * ws, hs * ws, ws, 1):
        raise ValueError(f"out must be a {(b, hq, wq, hs, ws)} view with contiguous inner dims, got shape "
                         f"{tuple(out.shape)} and strides {out.stride()}")
    rq, _ = _scales(query, None, eps)
    rs, _ = _scales(support, mask, eps)
    unused = rq.new_zeros(1)  # the GRAD-only arguments
    _corr_kernel[_grid(hq * wq, hs * ws, b)](
        query, support, rq, rs, out, unused, unused, unused, c, hq * wq, hs * ws,
        query.stride(0), support.stride(0), out.stride(0),
        GRAD=False, DOT_PRECISION=fp32_dot_precision())
    return out


def correlation_backward(grad_out: torch.Tensor, query: torch.Tensor, support: torch.Tensor,
                         support_mask: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients with respect to query and support (none flows into the mask)."""
    query, support, mask = _prepare(query, support, support_mask)
    grad_out = grad_out.contiguous()
    b, c, hq, wq = query.shape
    hs, ws = support.shape[-2:]
    pq, ps = hq * wq, hs * ws
    rq, nq = _scales(query, None, eps)
    rs, ns = _scales(support, mask, eps)
    h = torch.empty((b, pq, ps), dtype=torch.float32, device=query.device)
    rho = torch.zeros_like(rq)
    gamma = torch.zeros_like(rs)
    prec = fp32_dot_precision()
    _corr_kernel[_grid(pq, ps, b)](query, support, rq, rs, h, grad_out, rho, gamma, c, pq, ps,
                                   query.stride(0), support.stride(0), pq * ps, GRAD=True, DOT_PRECISION=prec)
    m = 1.0 if mask is None else mask.reshape(b, ps)
    coef_q = torch.where(nq > 0, rq * rho / nq.clamp_min(1e-30), torch.zeros_like(nq))
    coef_s = torch.where(ns > 0, m * rs * gamma / ns.clamp_min(1e-30), torch.zeros_like(ns))
    grad_q = torch.empty_like(query)
    grad_s = torch.empty_like(support)
    # grad_q[c, i] = sum_j s[c, j] H[i, j] - ...: h read transposed (k = j, p = i)
    _grad_kernel[_grid(c, pq, b)](support, h, query, coef_q, grad_q, c, pq, ps, support.stride(0), pq * ps, 1, ps,
                                  DOT_PRECISION=prec)
    _grad_kernel[_grid(c, ps, b)](query, h, support, coef_s, grad_s, c, ps, pq, query.stride(0), pq * ps, ps, 1,
                                  DOT_PRECISION=prec)
    return grad_q, grad_s


def correlation_stack_forward(queries: Sequence[torch.Tensor], supports: Sequence[torch.Tensor],
                              support_mask: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """L layers of equal sizes -> (B, L, Hq, Wq, Hs, Ws), each layer's kernel writing its own slot."""
    q0, s0 = queries[0], supports[0]
    out = q0.new_empty((q0.shape[0], len(queries), *q0.shape[2:], *s0.shape[2:]))
    for layer, (q, s) in enumerate(zip(queries, supports)):
        correlation_forward(q, s, support_mask, eps, out=out[:, layer])
    return out


def correlation_stack_backward(grad_out: torch.Tensor, queries: Sequence[torch.Tensor],
                               supports: Sequence[torch.Tensor], support_mask: Optional[torch.Tensor],
                               eps: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer gradients of :func:`correlation_stack_forward`."""
    grads = [correlation_backward(grad_out[:, layer], q, s, support_mask, eps)
             for layer, (q, s) in enumerate(zip(queries, supports))]
    return [g for g, _ in grads], [g for _, g in grads]
