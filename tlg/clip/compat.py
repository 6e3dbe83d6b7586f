"""Import ``open_clip`` safely on a CPU-only torch with a mismatched torchvision wheel.

The problem: ``open_clip`` imports ``torchvision`` (transforms, ``FrozenBatchNorm2d``). When the installed
torchvision wheel was built for another torch (e.g. a CUDA wheel beside a CPU torch), its compiled library
``torchvision/_C.so`` fails to load; torchvision swallows that, but then ``torchvision/_meta_registrations.py``
calls ``torch.library.register_fake("torchvision::nms")`` (and ``::qnms``) for operators that were never
defined, and the import dies with ``RuntimeError: operator torchvision::nms does not exist``.

The fix (:func:`ensure_torchvision`), applied only when exactly that failure happens:

1. try ``import torchvision``; if it succeeds, do nothing (healthy install: no-op);
2. if it raises a ``RuntimeError`` whose message names an operator ``torchvision::<op>``, drop the
   half-imported ``torchvision*`` modules from ``sys.modules``, define a placeholder schema for each
   operator torchvision registers fake kernels for at import (``nms``, ``qnms``; plus any other one named in
   the error) in a ``torch.library`` fragment, whose kernel raises ``NotImplementedError`` when called;
3. import torchvision again. Its pure-Python parts (transforms, ``ops.misc``) work; its compiled ops do not
   (they raise ``NotImplementedError`` instead of being absent). tlg needs none of them.

Idempotent: the placeholders are defined once per process; later calls return the cached module.
Any other import error propagates unchanged.
"""
from __future__ import annotations

import re
import sys
import types

import torch

__all__ = ["ensure_torchvision", "import_open_clip", "torchvision_patched"]

# Operators torchvision 0.2x registers with ``torch.library.register_fake`` at import time (not guarded by
# ``extension._has_ops()``, unlike its other meta kernels): these must exist for the import to succeed.
_FAKE_REGISTERED_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")

_library: torch.library.Library | None = None  # keeps the placeholder definitions alive
_patched_ops: list[str] = []


def torchvision_patched() -> list[str]:
    """Names of the ``torchvision::`` operators replaced by placeholders in this process ([] if none)."""
    return list(_patched_ops)


def _placeholder(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision::{name} is a placeholder registered by tlg.clip.compat: the installed torchvision "
            "wheel does not match this torch build, so its compiled operators are unavailable."
        )

    return kernel


def _define_placeholders(names: set[str]) -> None:
    global _library
    if _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in sorted(names):
        if name in _patched_ops:
            continue
        schema = _FAKE_REGISTERED_OPS.get(name)
        if schema is None:  # an op we do not know the schema of: a generic one is enough to register fakes
            schema = f"{name}(Tensor[] args) -> Tensor"
        try:
            _library.define(schema)
        except RuntimeError as err:  # already defined elsewhere (e.g. by a real torchvision build)
            if "already" not in str(err) and "multiple times" not in str(err):
                raise
            continue
        _library.impl(name, _placeholder(name), "CompositeExplicitAutograd")
        _patched_ops.append(name)


def _forget_torchvision() -> None:
    for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[key]


def ensure_torchvision() -> types.ModuleType:
    """Import torchvision, applying the placeholder-op fix above only if its compiled ops fail to load."""
    try:
        import torchvision

        return torchvision
    except RuntimeError as err:
        match = _MISSING_OP.search(str(err))
        if match is None:
            raise
        missing = {match.group(1)}
    names = set(_FAKE_REGISTERED_OPS) | missing
    for _ in range(8):  # each retry may reveal one more missing operator
        _forget_torchvision()
        _define_placeholders(names)
        try:
            import torchvision

            return torchvision
        except RuntimeError as err:
            match = _MISSING_OP.search(str(err))
            if match is None or match.group(1) in names:
                raise
            names.add(match.group(1))
    raise RuntimeError("tlg.clip.compat: could not make torchvision importable (too many missing operators)")


def import_open_clip() -> types.ModuleType:
    """The one entry point through which tlg imports ``open_clip`` (after :func:`ensure_torchvision`)."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    try:
        ensure_torchvision()
        import open_clip
    except ImportError as err:
        raise ImportError(
            f"tlg.clip needs open_clip_torch and torchvision (pip install open_clip_torch); import failed: {err}"
        ) from err
    return open_clip
