"""Backends behind the op front doors, and how ``"auto"`` chooses among them.

``"auto"`` (or ``TLG_BACKEND`` when set) picks, per op and device type:
CPU tensors  -> cpp, else reference;
CUDA tensors -> triton, else cuda, else reference.
A backend named explicitly must support the op on that device, or the call fails clearly.

Each backend states a verification level per op, as in the README status table:
``spec`` (the reference itself), ``measured-CPU``, ``interpreter-verified``,
``emulation-verified``, ``compiled-only``, ``GPU-verified``.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Optional, Sequence

import torch

from . import reference

OPS = ("correlation", "cp_conv4d", "group_norm_relu", "sinkhorn")
NAMES = ("auto", "reference", "cpp", "cuda", "triton")
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")}


class Backend:
    """One implementation of the ops. Subclasses override the ops they provide."""

    name: str = ""
    device_types: tuple[str, ...] = ()

    def load_error(self) -> Optional[str]:
        """Why this backend cannot run here at all, or None."""
        return None

    def status(self, op: str) -> Optional[str]:
        """Verification level of ``op``, or None when the backend does not provide it."""
        raise NotImplementedError

    def supports(self, op: str, device_type: str) -> bool:
        return self.load_error() is None and device_type in self.device_types and self.status(op) is not None

    # --- the ops, on validated input (support mask at support size, marginals materialised) ---
    def correlation(self, query, support, support_mask, eps):
        raise NotImplementedError

    def correlation_stack(self, queries: Sequence[torch.Tensor], supports: Sequence[torch.Tensor], support_mask, eps):
        """(B, L, Hq, Wq, Hs, Ws) for L layers of equal sizes. Backends with a kernel that writes
        the stacked layout directly override this."""
        return torch.stack([self.correlation(q, s, support_mask, eps) for q, s in zip(queries, supports)], dim=1)

    def cp_conv4d(self, x, weight_q, bias_q, weight_s, bias_s, stride):
        raise NotImplementedError

    def group_norm_relu(self, x, groups, weight, bias, eps):
        raise NotImplementedError

    def sinkhorn(self, cost, a, b, eps, max_iter, tol, check_every) -> reference.SinkhornResult:
        raise NotImplementedError


class ReferenceBackend(Backend):
    name = "reference"
    device_types = ("cpu", "cuda")

    def status(self, op):
        return "spec"

    def correlation(self, query, support, support_mask, eps):
        return reference.correlation(query, support, support_mask, eps)

    def cp_conv4d(self, x, weight_q, bias_q, weight_s, bias_s, stride):
        return reference.cp_conv4d(x, weight_q, bias_q, weight_s, bias_s, stride)

    def group_norm_relu(self, x, groups, weight, bias, eps):
        return reference.group_norm_relu(x, groups, weight, bias, eps)

    def sinkhorn(self, cost, a, b, eps, max_iter, tol, check_every):
        return reference.sinkhorn(cost, a, b, eps, max_iter, tol, check_every)


class LibraryBackend(Backend):
    """A backend whose kernels are the ``torch.ops.tlg.<prefix>*`` family of ``csrc/ops.cpp``.

    Whether it loads and which ops it has are computed once, when it is added, so that
    ``torch.compile`` traces dictionary reads rather than dispatcher queries.
    """

    def __init__(self, name: str, prefix: str, device_types: tuple[str, ...], dispatch_key: Optional[str],
                 loader: Callable[[], Optional[str]], levels: dict[str, str]):
        self.name, self.prefix, self.device_types = name, prefix, device_types
        self._dispatch_key, self._loader, self._levels = dispatch_key, loader, levels
        self._load_error = loader()
        self._status = {op: self._find(op) for op in OPS}
        self._has_stack = self._load_error is None and self._has_kernel("correlation_stack_forward")

    def _has_kernel(self, name: str) -> bool:
        name = self.prefix + name
        if not hasattr(torch.ops.tlg, name):
            return False
        return not self._dispatch_key or torch._C._dispatch_has_kernel_for_dispatch_key(f"tlg::{name}", self._dispatch_key)

    def _find(self, op: str) -> Optional[str]:
        if self._load_error is not None or op not in self._levels or not self._has_kernel(f"{op}_forward"):
            return None
        return self._levels[op]

    def load_error(self):
        return self._load_error

    def status(self, op):
        return self._status.get(op)

    def _op(self, name):
        return getattr(torch.ops.tlg, self.prefix + name)

    def correlation(self, query, support, support_mask, eps):
        return self._op("correlation_forward")(query, support, support_mask, eps)

    def correlation_stack(self, queries, supports, support_mask, eps):
        """Straight into (B, L, Hq, Wq, Hs, Ws) when the library has the stacked kernel and the
        layers agree in sizes and dtype; otherwise per layer, then stacked."""
        q0, s0 = queries[0], supports[0]
        uniform = all(q.shape[2:] == q0.shape[2:] and s.shape[2:] == s0.shape[2:] and q.dtype == q0.dtype
                      for q, s in zip(queries, supports))
        if not (self._has_stack and uniform):
            return super().correlation_stack(queries, supports, support_mask, eps)
        return self._op("correlation_stack_forward")(list(queries), list(supports), support_mask, eps)

    def cp_conv4d(self, x, weight_q, bias_q, weight_s, bias_s, stride):
        return self._op("cp_conv4d_forward")(x, weight_q, bias_q, weight_s, bias_s, stride)

    def group_norm_relu(self, x, groups, weight, bias, eps):
        """The kernel's schema takes weight and bias: None means 1 and 0, as in the reference."""
        weight = x.new_ones(x.shape[1]) if weight is None else weight
        bias = x.new_zeros(x.shape[1]) if bias is None else bias
        return self._op("group_norm_relu_forward")(x.contiguous(), groups, weight, bias, eps)[0]

    def sinkhorn(self, cost, a, b, eps, max_iter, tol, check_every):
        """With no gradient wanted, the kernel runs below the autograd key directly: what the op's registered
        autograd kernel would do then, without its Python frames (half the op's fixed cost, which matters
        for batches of small problems)."""
        op, args = self._op("sinkhorn_forward"), (cost, a, b, eps, max_iter, tol, check_every)
        if torch.is_grad_enabled() and (cost.requires_grad or a.requires_grad or b.requires_grad):
            return reference.SinkhornResult(*op(*args))
        with torch._C._AutoDispatchBelowAutograd():
            return reference.SinkhornResult(*op(*args))


_REGISTRY: dict[str, Backend] = {"reference": ReferenceBackend()}


def add(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def get(name: str) -> Backend:
    return _REGISTRY[name]


def all_backends() -> dict[str, Backend]:
    return dict(_REGISTRY)


@functools.cache
def _warn_fallback(reason: str) -> None:
    """Once per process: the compiled CPU kernels are missing, so every op runs on the reference."""
    warnings.warn(
        f"tlg: the compiled CPU kernels are not available ({reason}); all ops run on the pure-PyTorch "
        "reference. See tlg.ops.backend_info().",
        RuntimeWarning,
        stacklevel=4,
    )


def auto_choice(op: str, device_type: str) -> str:
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        backend = _REGISTRY.get(name)
        if backend is not None and backend.supports(op, device_type):
            return name
    return "reference"


def select_or_reference(op: str, backend: str, device: torch.device) -> Backend:
    """As :func:`select`, except that a backend named explicitly which runs on ``device`` but has no
    kernel for ``op`` gives way to the reference (for ops that are epilogues of another op's layers,
    such as ``group_norm_relu``: a model built for one backend keeps running on it)."""
    if backend in NAMES and backend not in ("auto", "reference"):
        chosen = _REGISTRY.get(backend)
        if chosen is not None and chosen.load_error() is None and device.type in chosen.device_types \
                and chosen.status(op) is None:
            return _REGISTRY["reference"]
    return select(op, backend, device)


def select(op: str, backend: str, device: torch.device) -> Backend:
    """The backend that runs ``op`` for tensors on ``device``."""
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("TLG_BACKEND", "auto") or "auto"
        if backend not in NAMES:
            raise ValueError(f"TLG_BACKEND must be one of {NAMES}, got {backend!r}")
    if backend == "auto":
        name = auto_choice(op, device.type)
        if name == "reference" and device.type == "cpu":
            cpp = _REGISTRY.get("cpp")
            reason = cpp.load_error() if cpp is not None else "not registered"
            if reason:  # the extension is missing: say so once; a missing single kernel is silent
                _warn_fallback(reason)
        return _REGISTRY[name]
    chosen = _REGISTRY.get(backend)
    if chosen is None or not chosen.supports(op, device.type):
        why = "not installed" if chosen is None else (chosen.load_error() or f"no {op} kernel for {device.type} tensors")
        raise RuntimeError(f"backend {backend!r} cannot run {op} on {device.type}: {why}")
    return chosen
