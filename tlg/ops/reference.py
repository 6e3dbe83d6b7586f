"""The specification of tlg's three hot operations (and the 4D encoder's GroupNorm + ReLU), in plain PyTorch.

Every compiled backend (C++, CUDA, Triton) is tested against these functions. They are written
to be read, not to be fast; they work in float64 and run under autograd and ``torch.compile``.
Half-precision inputs (float16, bfloat16) are computed in float32 and cast back, which is the
accumulation contract of the kernels.

Input validation lives in :mod:`tlg.ops._checks` and is applied by the front doors in
:mod:`tlg.ops`; these functions assume valid input.

References
----------
* Min et al., "Hypercorrelation Squeeze for Few-Shot Segmentation" (HSNet), ICCV 2021:
  the correlation volume and the center-pivot 4D convolution.
* Cuturi, "Sinkhorn Distances", NeurIPS 2013; Peyre & Cuturi, "Computational Optimal
  Transport", 2019, section 4.4 (log-domain stabilisation).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "SinkhornResult",
    "correlation",
    "multilayer_correlation",
    "split_stacks",
    "cp_conv4d",
    "group_norm_relu",
    "sinkhorn",
    "sinkhorn_marginal_error",
    "resize_mask",
]

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in _HALF else t.dtype


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize a (B, H, W) mask to ``size`` (align_corners=True, as HSNet does)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    m = mask.unsqueeze(1).to(_compute_dtype(mask))
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=True).squeeze(1).to(mask.dtype)


# --------------------------------------------------------------------------------------------
# Correlation volume
# --------------------------------------------------------------------------------------------
def correlation(
    query: torch.Tensor,
    support: torch.Tensor,
    support_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Cosine-similarity volume of one backbone layer, ReLU'd (HSNet eq. 1).

    .. math::
        \hat q = \frac{q}{\lVert q\rVert_2 + \epsilon},\quad
        \hat s = \frac{m\, s}{\lVert m\, s\rVert_2 + \epsilon},\quad
        C[b, i, j, k, l] = \max\big(0, \langle \hat q_{b,:,i,j}, \hat s_{b,:,k,l} \rangle\big)

    Args:
        query: (B, C, Hq, Wq) features.
        support: (B, C, Hs, Ws) features.
        support_mask: optional (B, Hs, Ws) mask ``m`` multiplied into the support features
            before normalisation; positions where it is zero correlate to exactly zero.
            A mask of another spatial size is bilinearly resized first (align_corners=True).
        eps: added to the L2 norm over channels.

    Returns:
        (B, Hq, Wq, Hs, Ws) volume in the input dtype.
    """
    dtype = query.dtype
    q = query.to(_compute_dtype(query))
    s = support.to(q.dtype)
    if support_mask is not None:
        s = s * resize_mask(support_mask, s.shape[-2:]).to(q.dtype).unsqueeze(1)
    b, c, hq, wq = q.shape
    hs, ws = s.shape[-2:]
    q = q / (q.norm(dim=1, p=2, keepdim=True) + eps)
    s = s / (s.norm(dim=1, p=2, keepdim=True) + eps)
    corr = torch.bmm(q.reshape(b, c, hq * wq).transpose(1, 2), s.reshape(b, c, hs * ws))
    return corr.clamp(min=0).reshape(b, hq, wq, hs, ws).to(dtype)


def split_stacks(corrs: Sequence[torch.Tensor], stack_ids: Sequence[int]) -> list[torch.Tensor]:
    """Group per-layer volumes into HSNet's three stacks, deepest first.

    ``stack_ids`` are HSNet's cumulative counts from the deep end, e.g. ``[3, 9, 13]`` for
    ResNet50 (3 layer4 maps, 6 layer3 maps, 4 layer2 maps). Each stack is
    (B, n_layers, Hq, Wq, Hs, Ws).
    """
    n = len(corrs)
    bounds = [0, *stack_ids]
    return [
        torch.stack(list(corrs[n - bounds[i + 1] : n - bounds[i]]), dim=1).contiguous()
        for i in range(len(stack_ids))
    ]


def multilayer_correlation(
    query_feats: Sequence[torch.Tensor],
    support_feats: Sequence[torch.Tensor],
    stack_ids: Sequence[int],
    support_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> list[torch.Tensor]:
    """Correlation of every tapped layer, grouped by :func:`split_stacks` into
    ``[corr_l4, corr_l3, corr_l2]`` (HSNet ``Correlation.multilayer_correlation``).

    The optional support mask is resized to each layer's support size.
    """
    corrs = [correlation(q, s, support_mask, eps) for q, s in zip(query_feats, support_feats)]
    return split_stacks(corrs, stack_ids)


# --------------------------------------------------------------------------------------------
# Center-pivot 4D convolution
# --------------------------------------------------------------------------------------------
def cp_conv4d(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    bias_q: Optional[torch.Tensor],
    weight_s: torch.Tensor,
    bias_s: Optional[torch.Tensor],
    stride: int,
) -> torch.Tensor:
    r"""Center-pivot 4D convolution (HSNet section 3.2).

    .. math::
        y = \mathrm{conv}_q(\mathrm{prune}_s(x)) + \mathrm{conv}_s(x)

    ``conv_q`` is a k_q x k_q 2D convolution over the query dims (Ha, Wa), stride 1, padding
    k_q//2, applied at every kept support position; ``prune_s`` keeps support positions
    0, s, 2s, ...; ``conv_s`` is a k_s x k_s 2D convolution over the support dims (Hb, Wb) with
    stride s and padding k_s//2, applied at every query position. Both carry their bias.

    Args:
        x: (B, Cin, Ha, Wa, Hb, Wb).
        weight_q, weight_s: (Cout, Cin, k, k), odd k (may differ between the two).
        bias_q, bias_s: (Cout,) or None.
        stride: support stride s >= 1.

    Returns:
        (B, Cout, Ha, Wa, ceil(Hb/s), ceil(Wb/s)).
    """
    dtype = x.dtype
    cdt = _compute_dtype(x)
    x, weight_q, weight_s = x.to(cdt), weight_q.to(cdt), weight_s.to(cdt)
    bias_q = None if bias_q is None else bias_q.to(cdt)
    bias_s = None if bias_s is None else bias_s.to(cdt)
    b, cin, ha, wa, hb, wb = x.shape
    cout, kq, ks = weight_q.shape[0], weight_q.shape[-1], weight_s.shape[-1]

    pruned = x[..., ::stride, ::stride]
    hp, wp = pruned.shape[-2:]
    xq = pruned.permute(0, 4, 5, 1, 2, 3).reshape(b * hp * wp, cin, ha, wa)
    yq = F.conv2d(xq, weight_q, bias_q, stride=1, padding=kq // 2)
    yq = yq.reshape(b, hp, wp, cout, ha, wa).permute(0, 3, 4, 5, 1, 2)

    xs = x.permute(0, 2, 3, 1, 4, 5).reshape(b * ha * wa, cin, hb, wb)
    ys = F.conv2d(xs, weight_s, bias_s, stride=stride, padding=ks // 2)
    ys = ys.reshape(b, ha, wa, cout, hp, wp).permute(0, 3, 1, 2, 4, 5)
    return (yq + ys).contiguous().to(dtype)


def cp_conv4d_flops(x_shape: Sequence[int], cout: int, kq: int, ks: int, stride: int) -> int:
    """Multiply-adds x 2 of one :func:`cp_conv4d` forward (for GFLOP/s reports)."""
    b, cin, ha, wa, hb, wb = x_shape
    hp, wp = math.ceil(hb / stride), math.ceil(wb / stride)
    return 2 * b * cout * cin * ha * wa * hp * wp * (kq * kq + ks * ks)


# --------------------------------------------------------------------------------------------
# GroupNorm + ReLU (the epilogue of every center-pivot layer in HSNet's encoder)
# --------------------------------------------------------------------------------------------
def group_norm_relu(
    x: torch.Tensor, groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-5
) -> torch.Tensor:
    r"""GroupNorm (Wu & He, ECCV 2018) followed by ReLU.

    .. math::
        y = \max\Big(0,\ \gamma_c \frac{x - \mu_{b,g}}{\sqrt{\sigma^2_{b,g} + \epsilon}} + \beta_c\Big)

    with the mean and the biased variance over the channels of group ``g`` and all trailing dims.

    Args:
        x: (B, C, ...), C a multiple of ``groups``.
        weight, bias: (C,) or None (1 and 0).
    """
    cdt = _compute_dtype(x)
    w = None if weight is None else weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    # in place on group_norm's fresh output: the same op sequence as nn.GroupNorm + nn.ReLU(inplace=True)
    return F.relu(F.group_norm(x.to(cdt), groups, w, b, eps), inplace=True).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Batched log-domain Sinkhorn
# --------------------------------------------------------------------------------------------
class SinkhornResult(NamedTuple):
    """Output of :func:`sinkhorn`.

    plan: (B, N, M) transport plan; f: (B, N) and g: (B, M) dual potentials (``-inf`` where a
    marginal entry is zero); n_iter: (B,) int64 iterations each problem ran; converged: (B,) bool.
    """

    plan: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor


def _log_plan(cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return (f.unsqueeze(2) + g.unsqueeze(1) - cost) / eps


def sinkhorn_marginal_error(plan: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-problem L2 error of the row marginal, ``||plan 1 - a||_2`` (the stopping criterion;
    POT's criterion on the other marginal, which is the one its last update leaves inexact)."""
    return (plan.sum(dim=2) - a).norm(dim=1)


def sinkhorn(
    cost: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    eps: float = 0.1,
    max_iter: int = 1000,
    tol: float = 1e-6,
    check_every: int = 10,
) -> SinkhornResult:
    r"""Entropic optimal transport for a batch of problems, in the log domain.

    Solves :math:`\min_P \langle P, C\rangle - \epsilon H(P)` s.t. :math:`P1 = a,\ P^T1 = b`
    by alternating the dual updates (Peyre & Cuturi eq. 4.43), starting from f = g = 0:

    .. math::
        f_i \leftarrow \epsilon\big(\log a_i - \mathrm{LSE}_j\,\tfrac{g_j - C_{ij}}{\epsilon}\big),\qquad
        g_j \leftarrow \epsilon\big(\log b_j - \mathrm{LSE}_i\,\tfrac{f_i - C_{ij}}{\epsilon}\big),\qquad
        P_{ij} = \exp\tfrac{f_i + g_j - C_{ij}}{\epsilon}

    One iteration is one f update followed by one g update. Every ``check_every`` iterations
    (and at ``max_iter``) each still-running problem computes :func:`sinkhorn_marginal_error`;
    a problem whose error is ``<= tol`` is converged and its potentials are frozen from then on.

    Args:
        cost: (B, N, M) finite cost matrices.
        a, b: (B, N) and (B, M) nonnegative marginals of equal mass per problem; uniform
            (1/N, 1/M) when omitted. Zero entries give zero plan rows/columns and ``-inf`` potentials.
        eps: entropic regularisation, > 0.

    Returns:
        :class:`SinkhornResult`. Gradients flow by unrolling the iterations.
    """
    dtype = cost.dtype
    c = cost.to(_compute_dtype(cost))
    bsz, n, m = c.shape
    a = torch.full((bsz, n), 1.0 / n, dtype=c.dtype, device=c.device) if a is None else a.to(c.dtype)
    b = torch.full((bsz, m), 1.0 / m, dtype=c.dtype, device=c.device) if b is None else b.to(c.dtype)
    log_a, log_b = a.log(), b.log()
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    n_iter = torch.zeros(bsz, dtype=torch.int64, device=c.device)
    converged = torch.zeros(bsz, dtype=torch.bool, device=c.device)

    for it in range(1, max_iter + 1):
        running = ~converged
        f_new = eps * (log_a - torch.logsumexp((g.unsqueeze(1) - c) / eps, dim=2))
        g_new = eps * (log_b - torch.logsumexp((f_new.unsqueeze(2) - c) / eps, dim=1))
        f = torch.where(running.unsqueeze(1), f_new, f)
        g = torch.where(running.unsqueeze(1), g_new, g)
        n_iter = n_iter + running.long()
        if it % check_every == 0 or it == max_iter:
            err = sinkhorn_marginal_error(_log_plan(c, f, g, eps).exp(), a)
            converged = converged | (running & (err <= tol))
            if bool(converged.all()):
                break

    plan = _log_plan(c, f, g, eps).exp()
    return SinkhornResult(plan.to(dtype), f.to(dtype), g.to(dtype), n_iter, converged)


def sinkhorn_implicit_grad(
    grad_plan: torch.Tensor,
    plan: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradient of a loss through the *converged* Sinkhorn plan, by implicit differentiation.

    With :math:`G = \partial L/\partial P`, :math:`u = (G\circ P)1/\epsilon`,
    :math:`v = (G\circ P)^T1/\epsilon`, and :math:`(x, y)` solving
    :math:`\begin{pmatrix}\mathrm{diag}(r) & P\\ P^T & \mathrm{diag}(c)\end{pmatrix}
    \begin{pmatrix}x\\y\end{pmatrix} = \begin{pmatrix}u\\v\end{pmatrix}`
    (r, c the plan's row and column sums; the gauge direction (1, -1) is removed), the optimality
    conditions of the dual give

    .. math::
        \partial L/\partial C = P\circ(x 1^T + 1 y^T - G/\epsilon),\quad
        \partial L/\partial a = \epsilon x,\quad \partial L/\partial b = \epsilon y.

    This is the backward the compiled kernels implement; at convergence it equals the gradient
    of the unrolled iterations. Returns (grad_cost, grad_a, grad_b) in the plan's dtype.
    """
    dtype = plan.dtype
    p = plan.to(_compute_dtype(plan))
    gp = grad_plan.to(p.dtype) * p
    u = gp.sum(2) / eps
    v = gp.sum(1) / eps
    r = p.sum(2)
    cs = p.sum(1)
    r_inv = torch.where(r > 0, 1.0 / r.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(r))
    # Schur complement on y: (diag(c) - P^T diag(1/r) P) y = v - P^T (u / r); singular along 1,
    # whose right-hand side component is zero, so adding 1 1^T / m fixes the gauge 1^T y = 0.
    m = p.shape[2]
    schur = torch.diag_embed(cs) - p.transpose(1, 2) @ (r_inv.unsqueeze(2) * p)
    schur = schur + 1.0 / m
    empty = cs <= 0  # zero-mass columns: pin y_j = 0
    schur = schur + torch.diag_embed(empty.to(p.dtype))
    rhs = v - (p.transpose(1, 2) @ (u * r_inv).unsqueeze(2)).squeeze(2)
    y = torch.linalg.solve(schur, rhs.unsqueeze(2)).squeeze(2)
    x = (u - (p @ y.unsqueeze(2)).squeeze(2)) * r_inv
    grad_cost = p * (x.unsqueeze(2) + y.unsqueeze(1) - grad_plan.to(p.dtype) / eps)
    return grad_cost.to(dtype), (eps * x).to(dtype), (eps * y).to(dtype)
