r"""Correlation volume: ReLU'd cosine similarity of every query pixel with every support pixel.

With per-pixel scales :math:`r^q_i = 1/(\lVert q_i\rVert + \epsilon)` and
:math:`r^s_j = m_j/(|m_j|\,\lVert s_j\rVert + \epsilon)` (so that :math:`r^s_j s_j` is
:math:`\hat s_j = m_j s_j/(\lVert m_j s_j\rVert + \epsilon)`), the volume is one tiled GEMM with
the normalisation folded into its epilogue:

.. math::  C_{ij} = \max\big(0,\ r^q_i\, r^s_j\, \langle q_i, s_j\rangle\big)

written straight into the (B, Hq, Wq, Hs, Ws) layout (or any view with that inner layout, e.g.
one layer of a stacked volume). Support tiles whose scales are all zero (masked out) skip the
channel loop. Backward: the ReLU gate is read from the forward's output, not recomputed. With
:math:`G = \partial L/\partial C\,[C_{ij} > 0 \lor n^q_i = 0 \lor n^s_j = 0]` (the norms
:math:`n^q_i = \lVert q_i\rVert`, :math:`n^s_j = \lVert m_j s_j\rVert`: a zero-norm vector's products are
exactly 0, where torch's clamp passes the gradient), :math:`H_{ij} = G_{ij} r^q_i r^s_j` and
:math:`\rho_i = \sum_j G_{ij} C_{ij}`, :math:`\gamma_j = \sum_i G_{ij} C_{ij}` (one elementwise pass, then two GEMMs),

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


@triton.jit
def _pair_tile(rq_ptr, rs_ptr, PQ, PS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (query, support) tile of batch element b: offsets, bounds masks and the two scales."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = offs_m < PQ, offs_n < PS
    rq = tl.load(rq_ptr + b * PQ + offs_m, mask=mmask, other=0.0)
    rs = tl.load(rs_ptr + b * PS + offs_n, mask=nmask, other=0.0)
    return b, offs_m, offs_n, mmask, nmask, rq, rs


@triton.autotune(configs=gemm_configs(32, 32, 32), key=["C", "PQ", "PS"])
@triton.jit
def _corr_kernel(q_ptr, s_ptr, rq_ptr, rs_ptr, out_ptr, C, PQ, PS, sqb, ssb, sob,
                 DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = relu(rq_i rs_j <q_i, s_j>)."""
    b, offs_m, offs_n, mmask, nmask, rq, rs = _pair_tile(rq_ptr, rs_ptr, PQ, PS, BLOCK_M, BLOCK_N)
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
    tl.store(out_ptr + offs, tl.maximum(val, 0.0).to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gate_kernel(g_ptr, c_ptr, rq_ptr, rs_ptr, nq_ptr, ns_ptr, h_ptr, rowdot_ptr, coldot_ptr, PQ, PS,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """H = G [C > 0 or nq_i = 0 or ns_j = 0] rq_i rs_j;  rho_i += sum_j G C,  gamma_j += sum_i G C  (atomics)."""
    b, offs_m, offs_n, mmask, nmask, rq, rs = _pair_tile(rq_ptr, rs_ptr, PQ, PS, BLOCK_M, BLOCK_N)
    nq = tl.load(nq_ptr + b * PQ + offs_m, mask=mmask, other=1.0)
    ns = tl.load(ns_ptr + b * PS + offs_n, mask=nmask, other=1.0)
    offs = b * PQ * PS + offs_m[:, None] * PS + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    g = tl.load(g_ptr + offs, mask=omask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs, mask=omask, other=0.0).to(tl.float32)
    gate = (c > 0) | (nq[:, None] == 0) | (ns[None, :] == 0)
    tl.store(h_ptr + offs, tl.where(gate, g, 0.0) * rq[:, None] * rs[None, :], mask=omask)
    gc = g * c  # the gate is open wherever C > 0
    tl.atomic_add(rowdot_ptr + b * PQ + offs_m, tl.sum(gc, axis=1), mask=mmask)
    tl.atomic_add(coldot_ptr + b * PS + offs_n, tl.sum(gc, axis=0), mask=nmask)


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
    _corr_kernel[_grid(hq * wq, hs * ws, b)](
        query, support, rq, rs, out, c, hq * wq, hs * ws, query.stride(0), support.stride(0), out.stride(0),
        DOT_PRECISION=fp32_dot_precision())
    return out


def correlation_backward(grad_out: torch.Tensor, out: torch.Tensor, query: torch.Tensor, support: torch.Tensor,
                         support_mask: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients with respect to query and support (none flows into the mask); ``out`` is the forward's
    result, whose positive entries open the ReLU gate."""
    query, support, mask = _prepare(query, support, support_mask)
    grad_out, out = grad_out.contiguous(), out.contiguous()
    b, c, hq, wq = query.shape
    hs, ws = support.shape[-2:]
    pq, ps = hq * wq, hs * ws
    rq, nq = _scales(query, None, eps)
    rs, ns = _scales(support, mask, eps)
    h = torch.empty((b, pq, ps), dtype=torch.float32, device=query.device)
    rho = torch.zeros_like(rq)
    gamma = torch.zeros_like(rs)
    block = 16 if INTERPRET else 64
    _gate_kernel[(triton.cdiv(pq, block), triton.cdiv(ps, block), b)](
        grad_out, out, rq, rs, nq, ns, h, rho, gamma, pq, ps, BLOCK_M=block, BLOCK_N=block)
    prec = fp32_dot_precision()
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


def correlation_stack_backward(grad_out: torch.Tensor, out: torch.Tensor, queries: Sequence[torch.Tensor],
                               supports: Sequence[torch.Tensor], support_mask: Optional[torch.Tensor],
                               eps: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer gradients of :func:`correlation_stack_forward` (``out`` its stacked result)."""
    grads = [correlation_backward(grad_out[:, layer], out[:, layer], q, s, support_mask, eps)
             for layer, (q, s) in enumerate(zip(queries, supports))]
    return [g for g, _ in grads], [g for _, g in grads]
