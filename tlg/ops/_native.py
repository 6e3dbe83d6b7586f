"""The compiled extension ``tlg._C``: the C++ (CPU) and CUDA backends.

Importing the extension registers its kernels with the dispatcher; this module then adds the
shared autograd and fake registrations (:mod:`tlg.ops._library`) and the two backends.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

from . import _backends, _library

# Verification level each kernel reached (README status table). Update when a level is earned.
CPP_LEVELS = {"correlation": "measured-CPU", "cp_conv4d": "measured-CPU", "group_norm_relu": "measured-CPU",
              "sinkhorn": "measured-CPU"}
CUDA_LEVELS = {"correlation": "emulation-verified", "cp_conv4d": "emulation-verified", "sinkhorn": "emulation-verified"}


@functools.cache
def load_error() -> Optional[str]:
    """None when ``tlg._C`` imported and registered its ops, else the reason."""
    try:
        importlib.import_module("tlg._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        return f"tlg._C not available ({type(exc).__name__}: {exc}); reinstall with `pip install --no-build-isolation -e .`"
    _library.register("")
    _library.register_stack("")
    _library.register_group_norm_relu("")
    return None


def cuda_load_error() -> Optional[str]:
    err = load_error()
    if err is not None:
        return err
    from tlg import _C

    return None if _C.compiled_with_cuda() else "tlg._C was built without CUDA (no CUDA torch or nvcc at build time)"


_backends.add(_backends.LibraryBackend("cpp", "", ("cpu",), "CPU", load_error, CPP_LEVELS))
_backends.add(_backends.LibraryBackend("cuda", "", ("cuda",), "CUDA", cuda_load_error, CUDA_LEVELS))
