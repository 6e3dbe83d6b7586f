"""Reading state dicts from disk and checking that they fit, with errors that name file and keys."""
from __future__ import annotations

import os
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["read_state_dict", "load_fitting"]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (plain, or under ``"state_dict"`` / ``"model"``), without a
    DataParallel ``module.`` prefix. Raises ``FileNotFoundError`` / ``ValueError`` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"could not read weights from {path}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_fitting(module: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str,
                 skip_prefixes: Iterable[str] = ()) -> nn.Module:
    """Load ``state`` into ``module`` strictly, after dropping keys under ``skip_prefixes``.

    Missing keys, unexpected keys and shape mismatches raise one ``ValueError`` listing them.
    """
    skip = tuple(skip_prefixes)
    state = {k: v for k, v in state.items() if not (skip and k.startswith(skip))}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"weights in {path} do not fit {what}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state)
    return module
