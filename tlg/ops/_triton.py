"""The Triton backend: ``tlg::triton_*`` ops backed by :mod:`tlgkernels`.

The six ops carry the schemas of ``csrc/ops.cpp`` (prefix ``triton_``); :mod:`tlg.ops._library`
adds their fake kernels and autograd. They run on CUDA tensors, and on CPU tensors when Triton's
interpreter is on (``TRITON_INTERPRET=1`` in the environment before ``tlgkernels`` is imported).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import _backends, _library

# Verification level each kernel reached: forward and backward parity with the reference under
# the interpreter (tests/test_triton_kernels.py); every kernel also compiles to PTX for sm_80 and
# sm_90 (python -m tlgkernels.compile_check). Not run on a GPU yet, so not "GPU-verified".
TRITON_LEVELS = {"correlation": "interpreter-verified", "cp_conv4d": "interpreter-verified",
                 "sinkhorn": "interpreter-verified"}

try:
    import tlgkernels as _k
except Exception as exc:  # triton missing, or a broken install: the backend is then unavailable
    _k = None
    _IMPORT_ERROR: Optional[str] = f"tlgkernels/triton not importable ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = None

INTERPRET = _k is not None and _k.INTERPRET
DEVICE_TYPES = ("cuda", "cpu") if INTERPRET else ("cuda",)


def load_error() -> Optional[str]:
    """None when the Triton kernels can run here, else the reason."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if INTERPRET or torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "no CUDA device, and TRITON_INTERPRET=1 was set after tlgkernels was imported (set it before tlg)"
    return "no CUDA device, and Triton's interpreter is off (set TRITON_INTERPRET=1 before importing tlg)"


if _k is not None:  # tlgkernels exposes one wrapper per op, named like the op
    for _name, _schema in _library.SCHEMAS.items():
        torch.library.custom_op(f"tlg::triton_{_name}", getattr(_k, _name), mutates_args=(), schema=_schema)
    _library.register("triton_")
    _library.register_stack("triton_")

_backends.add(_backends.LibraryBackend("triton", "triton_", DEVICE_TYPES, None, load_error, TRITON_LEVELS))
