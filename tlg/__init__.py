"""tlg: a compiled-kernel engine for weakly-supervised few-shot semantic segmentation.

``tlg.ops`` holds the kernels' front doors; ``tlg.build_model`` / ``tlg.list_models`` the models.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401


def __getattr__(name):  # models load lazily: `import tlg` stays light for kernel users
    if name in ("build_model", "list_models"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'tlg' has no attribute {name!r}")
