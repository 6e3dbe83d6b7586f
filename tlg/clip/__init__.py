"""CLIP text guidance and Grad-CAM pseudo-masks, on open_clip (imported lazily, through
:mod:`tlg.clip.compat`).

- :mod:`~tlg.clip.compat`: makes open_clip importable beside a mismatched torchvision wheel.
- :mod:`~tlg.clip.model`: ``load_clip(path, arch)`` for OpenAI / open_clip files (RN50, ViT-B/16, ViT-B/32), offline.
- :mod:`~tlg.clip.prompts`, :mod:`~tlg.clip.text`: prompts (VOC, COCO, backgrounds) and cached text embeddings.
- :mod:`~tlg.clip.gradcam`: Grad-CAM of the image-text score; ``pseudo_mask(image, class_name, ...)``.
- :mod:`~tlg.clip.pseudomasks`: ``generate(source, model, out_dir, ...)``, the resumable tool; :mod:`~tlg.clip.cli`.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_clip": "model", "build_clip": "model", "wrap_model": "model", "ClipModel": "model",
    "CheckpointError": "model", "ARCHS": "model", "tokenize": "model",
    "encode_texts": "text", "class_embeddings": "text", "background_embeddings": "text",
    "compute_cams": "gradcam", "pseudo_mask": "gradcam", "ClipCamEncoder": "gradcam",
    "generate": "pseudomasks", "import_open_clip": "compat", "ensure_torchvision": "compat",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'tlg.clip' has no attribute {name!r}")
