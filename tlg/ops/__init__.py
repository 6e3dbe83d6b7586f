"""tlg.ops: one front door per hot operation.

Each function validates its input (clear ``ValueError``/``TypeError`` naming the argument), picks
a backend (``backend=`` or ``TLG_BACKEND``; see :mod:`tlg.ops._backends`) and runs it. The
definitions are in :mod:`tlg.ops.reference`; every compiled backend is tested against them.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

from . import _backends, _checks, _native, _triton, reference  # noqa: F401  (_native, _triton register backends)
from .reference import SinkhornResult

__all__ = [
    "correlation",
    "multilayer_correlation",
    "cp_conv4d",
    "CenterPivotConv4d",
    "group_norm_relu",
    "GroupNormReLU",
    "sinkhorn",
    "SinkhornResult",
    "backend_info",
    "reference",
]


def correlation(
    query: torch.Tensor,
    support: torch.Tensor,
    support_mask: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """ReLU'd cosine-similarity volume (B, Hq, Wq, Hs, Ws) of one layer; see
    :func:`tlg.ops.reference.correlation`. No gradient flows into ``support_mask``."""
    _checks.correlation_inputs(query, support, support_mask)
    _checks.positive("eps", eps)
    mask = _support_mask_at(support_mask, support)
    return _backends.select("correlation", backend, query.device).correlation(query, support, mask, eps)


def multilayer_correlation(
    query_feats: Sequence[torch.Tensor],
    support_feats: Sequence[torch.Tensor],
    stack_ids: Sequence[int],
    support_mask: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-5,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """HSNet's multi-layer correlation: ``[corr_l4, corr_l3, corr_l2]``, each
    (B, n_layers, Hq, Wq, Hs, Ws); see :func:`tlg.ops.reference.multilayer_correlation`."""
    _checks.layer_lists(query_feats, support_feats, stack_ids)
    for q, s in zip(query_feats, support_feats):
        _checks.correlation_inputs(q, s, support_mask)
    _checks.positive("eps", eps)
    impl = _backends.select("correlation", backend, query_feats[0].device)
    n = len(query_feats)
    bounds = [0, *[int(i) for i in stack_ids]]
    stacks = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        qs, ss = query_feats[n - hi : n - lo], support_feats[n - hi : n - lo]
        mask = _support_mask_at(support_mask, ss[0])
        stacks.append(impl.correlation_stack(qs, ss, mask, eps))
    return stacks


def _support_mask_at(support_mask: Optional[torch.Tensor], support: torch.Tensor) -> Optional[torch.Tensor]:
    if support_mask is None:
        return None
    return reference.resize_mask(support_mask.detach(), support.shape[-2:]).to(support.dtype).contiguous()


def cp_conv4d(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    bias_q: Optional[torch.Tensor],
    weight_s: torch.Tensor,
    bias_s: Optional[torch.Tensor],
    stride: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Center-pivot 4D convolution (B, Cout, Ha, Wa, ceil(Hb/s), ceil(Wb/s)); see
    :func:`tlg.ops.reference.cp_conv4d`."""
    _checks.cp_conv4d_inputs(x, weight_q, bias_q, weight_s, bias_s, stride)
    impl = _backends.select("cp_conv4d", backend, x.device)
    return impl.cp_conv4d(x, weight_q, bias_q, weight_s, bias_s, stride)


def group_norm_relu(
    x: torch.Tensor,
    groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """GroupNorm then ReLU in one op, (B, C, ...) -> same shape; see
    :func:`tlg.ops.reference.group_norm_relu`. A backend without this kernel (Triton, CUDA) runs the
    reference for it, so a model built for that backend still runs there."""
    _checks.group_norm_relu_inputs(x, groups, weight, bias, eps)
    impl = _backends.select_or_reference("group_norm_relu", backend, x.device)
    return impl.group_norm_relu(x, groups, weight, bias, float(eps))


def sinkhorn(
    cost: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    eps: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    check_every: int = 10,
    backend: str = "auto",
) -> SinkhornResult:
    """Batched log-domain Sinkhorn; see :func:`tlg.ops.reference.sinkhorn`.

    Compiled backends differentiate through the plan by implicit differentiation
    (:func:`tlg.ops.reference.sinkhorn_implicit_grad`) and return ``f``/``g`` without a graph;
    the reference unrolls the iterations.
    """
    _checks.sinkhorn_inputs(cost, a, b, eps, max_iter, tol, check_every)
    bsz, n, m = cost.shape
    a = cost.new_full((bsz, n), 1.0 / n) if a is None else a.to(cost.dtype)
    b = cost.new_full((bsz, m), 1.0 / m) if b is None else b.to(cost.dtype)
    impl = _backends.select("sinkhorn", backend, cost.device)
    return impl.sinkhorn(cost.contiguous(), a.contiguous(), b.contiguous(), float(eps), max_iter, float(tol), check_every)


class CenterPivotConv4d(nn.Module):
    """Center-pivot 4D convolution as a module, with HSNet's constructor and parameter names.

    ``conv1`` convolves the query dims (Ha, Wa), ``conv2`` the support dims (Hb, Wb), so HSNet
    checkpoints load as they are. Supported: odd kernels, stride (1, 1, s, s), padding k//2.
    Unlike HSNet's module, nothing is cached between calls: any input size is handled.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        kernel_size, stride, padding = (_four(v, name) for v, name in
                                        ((kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding")))
        kq, ks = kernel_size[0], kernel_size[2]
        if kernel_size != (kq, kq, ks, ks) or kq % 2 == 0 or ks % 2 == 0:
            raise ValueError(f"kernel_size must be (kq, kq, ks, ks) with odd kq, ks, got {kernel_size}")
        if stride[:2] != (1, 1) or stride[2] != stride[3] or stride[2] < 1:
            raise ValueError(f"stride must be (1, 1, s, s), got {stride}")
        if padding != (kq // 2, kq // 2, ks // 2, ks // 2):
            raise ValueError(f"padding must be (kq//2, kq//2, ks//2, ks//2) = {(kq // 2,) * 2 + (ks // 2,) * 2}, got {padding}")
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.backend = backend
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size[:2], stride[:2], padding[:2], bias=bias)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size[2:], stride[2:], padding[2:], bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cp_conv4d(x, self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias,
                         self.stride[2], backend=self.backend)


class GroupNormReLU(nn.GroupNorm):
    """``nn.GroupNorm`` followed by ReLU, run as :func:`group_norm_relu` (same parameters and state-dict
    keys as ``nn.GroupNorm``, so checkpoints of GroupNorm + ReLU stacks load unchanged)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 backend: str = "auto"):
        super().__init__(num_groups, num_channels, eps, affine)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_relu(x, self.num_groups, self.weight, self.bias, eps=self.eps, backend=self.backend)


def _four(value, name: str) -> tuple[int, int, int, int]:
    t = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 4
    if len(t) != 4 or not all(isinstance(v, int) for v in t):
        raise ValueError(f"{name} must be an int or a 4-tuple of ints, got {value!r}")
    return t


def backend_info() -> dict:
    """What is compiled, what ``"auto"`` picks per device type, and each backend's level per op."""
    backends = {}
    for name, be in _backends.all_backends().items():
        err = be.load_error()
        backends[name] = {
            "available": err is None,
            "reason": err,
            "devices": list(be.device_types),
            "ops": {op: be.status(op) for op in _backends.OPS} if err is None else {},
        }
    info = {
        "TLG_BACKEND": os.environ.get("TLG_BACKEND"),
        "auto": {dev: {op: _backends.auto_choice(op, dev) for op in _backends.OPS} for dev in ("cpu", "cuda")},
        "backends": backends,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if _native.load_error() is None:
        from tlg import _C

        info["extension"] = {"path": _C.__file__, "openmp_threads": _C.openmp_max_threads(),
                             "with_cuda": _C.compiled_with_cuda()}
    return info
