"""Input validation shared by every backend: one clear error naming the argument.

Shape, dtype and device errors are checked from metadata only (no host sync). Value checks
(non-finite costs, negative or unequal-mass marginals) need one reduction each; they run once
per call in the front door, never inside a kernel loop.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# ATen reduces fewer elements than this on the calling thread (at::internal::GRAIN_SIZE).
_ATEN_GRAIN = 32768


def tensor(name: str, t: object, ndim: int, layout: str) -> torch.Tensor:
    """``t`` is a floating tensor of rank ``ndim`` (``layout`` names the dims for the message)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATING:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    return t


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: its min and max, which propagate NaN, are finite. One reduction pass, where
    ``torch.isfinite(t).all()`` takes several. A small CPU tensor (up to 8 grains) is reduced in slices
    along dim 0 of fewer than ``_ATEN_GRAIN`` elements, each on the calling thread: for a check this small
    a parallel region costs more than it saves, and a whole time slice when another process holds a core."""
    if t.numel() == 0:
        return True
    parts = (t,)
    if t.device.type == "cpu" and t.numel() <= 8 * _ATEN_GRAIN:
        rows = max(1, (_ATEN_GRAIN - 1) // (t.numel() // t.shape[0]))  # dim-0 entries per slice
        parts = t.tensor_split(-(-t.shape[0] // rows))
    return all(math.isfinite(v.item()) for part in parts for v in torch.aminmax(part))


def positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def int_at_least(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def per_channel(vectors: dict, count: int, label: str, dtype: Optional[torch.dtype] = None) -> None:
    """Each given (not None) tensor of ``vectors`` is 1-D with ``count`` entries (and of ``dtype``)."""
    for name, v in vectors.items():
        if v is None:
            continue
        tensor(name, v, 1, f"({label},)")
        if v.shape[0] != count:
            raise ValueError(f"{name} has {v.shape[0]} entries, expected {label}={count}")
        if dtype is not None and v.dtype != dtype:
            raise TypeError(f"{name} dtype {v.dtype} does not match x dtype {dtype}")


def correlation_inputs(query: torch.Tensor, support: torch.Tensor, support_mask: Optional[torch.Tensor]) -> None:
    tensor("query", query, 4, "(B, C, Hq, Wq)")
    tensor("support", support, 4, "(B, C, Hs, Ws)")
    if query.shape[:2] != support.shape[:2]:
        raise ValueError(
            f"query and support must agree in batch and channels, got query {tuple(query.shape)} "
            f"and support {tuple(support.shape)}"
        )
    if query.dtype != support.dtype:
        raise TypeError(f"query and support must share a dtype, got {query.dtype} and {support.dtype}")
    if support_mask is not None:
        tensor("support_mask", support_mask, 3, "(B, Hs, Ws)")
        if support_mask.shape[0] != support.shape[0]:
            raise ValueError(
                f"support_mask batch {support_mask.shape[0]} does not match support batch {support.shape[0]}"
            )
    same_device(query=query, support=support, support_mask=support_mask)


def layer_lists(query_feats: Sequence[torch.Tensor], support_feats: Sequence[torch.Tensor], stack_ids: Sequence[int]) -> None:
    if len(query_feats) != len(support_feats):
        raise ValueError(
            f"query_feats and support_feats must list the same layers, got {len(query_feats)} and {len(support_feats)}"
        )
    ids = [int(i) for i in stack_ids]
    if not ids or any(j <= i for i, j in zip([0, *ids], ids)) or ids[-1] > len(query_feats):
        raise ValueError(
            f"stack_ids must be increasing positive counts ending at most at the number of layers "
            f"({len(query_feats)}), got {list(stack_ids)}"
        )


def cp_conv4d_inputs(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    bias_q: Optional[torch.Tensor],
    weight_s: torch.Tensor,
    bias_s: Optional[torch.Tensor],
    stride: int,
) -> None:
    tensor("x", x, 6, "(B, Cin, Ha, Wa, Hb, Wb)")
    for name, w in (("weight_q", weight_q), ("weight_s", weight_s)):
        tensor(name, w, 4, "(Cout, Cin, k, k)")
        if w.shape[1] != x.shape[1]:
            raise ValueError(f"{name} has {w.shape[1]} input channels but x has {x.shape[1]}")
        if w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
            raise ValueError(f"{name} must have an odd square kernel, got {tuple(w.shape[2:])}")
        if w.dtype != x.dtype:
            raise TypeError(f"{name} dtype {w.dtype} does not match x dtype {x.dtype}")
    if weight_q.shape[0] != weight_s.shape[0]:
        raise ValueError(f"weight_q and weight_s must have the same out channels, got {weight_q.shape[0]} and {weight_s.shape[0]}")
    per_channel(dict(bias_q=bias_q, bias_s=bias_s), weight_q.shape[0], "Cout", x.dtype)
    int_at_least("stride", stride, 1)
    same_device(x=x, weight_q=weight_q, bias_q=bias_q, weight_s=weight_s, bias_s=bias_s)


def group_norm_relu_inputs(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], eps: float) -> None:
    if isinstance(x, torch.Tensor) and x.dim() < 2:
        raise ValueError(f"x must be (B, C, ...), at least 2-D, got shape {tuple(x.shape)}")
    tensor("x", x, getattr(x, "ndim", 0), "(B, C, ...)")
    int_at_least("groups", groups, 1)
    if x.shape[1] % groups:
        raise ValueError(f"x has {x.shape[1]} channels, not a multiple of groups={groups}")
    per_channel(dict(weight=weight, bias=bias), x.shape[1], "C")
    positive("eps", eps)
    same_device(x=x, weight=weight, bias=bias)


def sinkhorn_inputs(
    cost: torch.Tensor,
    a: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    eps: float,
    max_iter: int,
    tol: float,
    check_every: int,
) -> None:
    tensor("cost", cost, 3, "(B, N, M)")
    positive("eps", eps)
    int_at_least("max_iter", max_iter, 1)
    int_at_least("check_every", check_every, 1)
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    same_device(cost=cost, a=a, b=b)
    bsz, n, m = cost.shape
    if not all_finite(cost):
        raise ValueError("cost contains NaN or Inf")
    for name, marg, size in (("a", a, n), ("b", b, m)):
        if marg is None:
            continue
        tensor(name, marg, 2, f"(B, {'N' if name == 'a' else 'M'})")
        if tuple(marg.shape) != (bsz, size):
            raise ValueError(f"{name} must have shape {(bsz, size)} to match cost {tuple(cost.shape)}, got {tuple(marg.shape)}")
        if not all_finite(marg):
            raise ValueError(f"{name} contains NaN or Inf")
        if bool((marg < 0).any()):
            raise ValueError(f"{name} has negative entries; marginals must be nonnegative")
        if bool((marg.sum(dim=1) <= 0).any()):
            raise ValueError(f"{name} has a problem with zero total mass")
    if a is not None and b is not None:
        ma, mb = a.double().sum(1), b.double().sum(1)
        if not torch.allclose(ma, mb, rtol=1e-4, atol=1e-6):
            worst = int((ma - mb).abs().argmax())
            raise ValueError(
                f"a and b must have equal mass per problem; problem {worst} has sum(a)={ma[worst].item():.6g} "
                f"and sum(b)={mb[worst].item():.6g}"
            )
    elif (a is None) != (b is None):
        given = a if a is not None else b
        if not torch.allclose(given.double().sum(1), torch.ones(bsz, dtype=torch.float64, device=given.device), rtol=1e-4, atol=1e-6):
            raise ValueError(
                f"{'a' if a is not None else 'b'} must sum to 1 per problem when the other marginal is the uniform default"
            )
