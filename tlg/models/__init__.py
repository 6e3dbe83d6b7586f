"""tlg.models: backbones, HSNet, TLG and IMR-HSNet behind one registry.

>>> model = tlg.build_model("tlg", backbone="resnet50", backbone_weights="resnet50-19c8e357.pth")
>>> logits = model(batch)            # (B, 2, H, W) query logits; batch format: tlg.data.base
>>> loss, logits = model.loss(batch)
>>> mask = model.predict(batch)      # (B, H, W) long, k-shot voting

Each model declares its options as a dataclass (``tlg.models.HSNet.Config`` ...); unknown
options raise a ``TypeError`` listing the valid ones. Batch keys beyond the basic episode:
TLG and IMR-HSNet take ``query_pseudo_mask`` (the query's CLIP pseudo-mask); TLG with CLIP
guidance (``use_clip=True``, the default) takes ``text_embeddings`` (B, 3, 512). TLG is built
for one square image size, ``img_size`` (default 400); IMR-HSNet sizes its learned initial
state by ``img_size`` (and resizes it for other inputs); HSNet takes any size.
Published checkpoints load with ``model.load_checkpoint(path)``; torchvision backbone weights
with ``backbone_weights=path``.

Layout: ``backbones`` (ResNet50/101, VGG16, resnet_tiny), ``components`` (HSNet's 4D encoder,
decoder, pseudo-mask head), ``base`` (batch checks, shots, loss, voting), one module per model.

CPU demo configuration: ``backbone="resnet_tiny"`` (a 0.87 M-parameter bottleneck ResNet with
the same tap structure, trained from scratch, unfrozen) at 64-100 px images, e.g.
``tlg.build_model("hsnet", backbone="resnet_tiny")`` or
``tlg.build_model("tlg", backbone="resnet_tiny", img_size=96)`` (add ``use_clip=False`` when
the episodes carry no text embeddings).
"""
from __future__ import annotations

from typing import Any

from .backbones import Backbone, build_backbone, list_backbones, load_backbone_weights
from .base import FewShotSegmenter, ModelConfig, check_batch
from .hsnet import HSNet, HSNetConfig
from .imr_hsnet import IMRHSNet, IMRHSNetConfig
from .tlg import TLG, TLGConfig

_MODELS: dict[str, type[FewShotSegmenter]] = {"hsnet": HSNet, "imr_hsnet": IMRHSNet, "tlg": TLG}

__all__ = ["build_model", "list_models", "FewShotSegmenter", "ModelConfig", "check_batch",
           "Backbone", "build_backbone", "list_backbones", "load_backbone_weights",
           "HSNet", "HSNetConfig", "TLG", "TLGConfig", "IMRHSNet", "IMRHSNetConfig"]


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_MODELS)


def build_model(name: str, backbone: str = "resnet50", **config: Any) -> FewShotSegmenter:
    """Build model ``name`` (``"tlg"``, ``"hsnet"``, ``"imr_hsnet"``) with its default config
    updated by ``backbone`` and ``config`` (fields of ``<Model>.Config``)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name].from_config(backbone=backbone, **config)
