"""What every tlg model shares: its config, batch checks, the shot loop, loss, voting.

A model implements :meth:`FewShotSegmenter.forward_shot` for one support image per episode and
returns the logits of each refinement step; the base class turns that into

* ``model(batch)``: query logits (B, 2, H, W) at image size (mean over the K shots);
* ``model.loss(batch) -> (loss, logits)``: ``sum_steps(w_q CE(query) + w_s CE(support))``,
  averaged over shots (cross-entropy over {background, foreground}, 255 ignored);
* ``model.predict(batch) -> (B, H, W) long``: HSNet's k-shot voting (a pixel is foreground
  when at least half of the highest per-image vote count says so);
* ``model.parameter_counts() -> {"learnable", "total"}``.

The batch format is :mod:`tlg.data.base`'s.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone, build_backbone
from .components import resize
from .weights import load_fitting, read_state_dict

IGNORE_INDEX = 255

__all__ = ["ModelConfig", "FewShotSegmenter", "StepOutput", "check_batch"]


@dataclass
class ModelConfig:
    """Options every model takes.

    Attributes:
        backbone: ``"resnet50"``, ``"resnet101"``, ``"vgg16"`` or ``"resnet_tiny"`` (CPU demos).
        backbone_weights: path to a torchvision-format state dict; None keeps the random init.
        backbone_frozen: None = the backbone's default (frozen, except ``resnet_tiny``).
        backend: ``tlg.ops`` backend for correlation, 4D conv and Sinkhorn (``"auto"``, ...).
    """

    backbone: str = "resnet50"
    backbone_weights: Optional[str] = None
    backbone_frozen: Optional[bool] = None
    backend: str = "auto"


class StepOutput(NamedTuple):
    """Logits (B, 2, h, w) at the model's output resolution for one refinement step."""

    query: torch.Tensor
    support: Optional[torch.Tensor] = None


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_batch(batch: Mapping[str, Any], require: Sequence[str] = ()) -> tuple[int, int, int, int]:
    """Validate a batch dict; return (B, K, H, W). Errors name the key and the shapes."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"a model takes the batch dict of tlg.data.base, got {type(batch).__name__}")
    for key in ("query_img", "support_imgs", "support_masks", *require):
        if key not in batch:
            raise KeyError(f"batch is missing {key!r} (see tlg.data.base for the batch format)")
    q, s, m = batch["query_img"], batch["support_imgs"], batch["support_masks"]
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[1] != 3:
        raise ValueError(f"query_img must be (B, 3, H, W), got {_shape(q)}")
    b, _, h, w = q.shape
    if not isinstance(s, torch.Tensor) or s.dim() != 5 or s.shape[2] != 3 or s.shape[0] != b:
        raise ValueError(f"support_imgs must be (B, K, 3, H, W) with B={b}, got {_shape(s)}")
    k = s.shape[1]
    if k < 1:
        raise ValueError("support_imgs holds no shot (K = 0)")
    if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[0] != b:
        raise ValueError(f"support_masks must be (B, K, H, W) with B={b}, got {_shape(m)}")
    if m.shape[1] != k:
        raise ValueError(f"shot counts differ: support_imgs has K={k} but support_masks has K={m.shape[1]}")
    if tuple(s.shape[-2:]) != (h, w):
        raise ValueError(f"image sizes differ: query_img is {h}x{w} but support_imgs are "
                         f"{s.shape[-2]}x{s.shape[-1]}; resize them to one size")
    if tuple(m.shape[-2:]) != (h, w):
        raise ValueError(f"support_masks are {m.shape[-2]}x{m.shape[-1]} but the images are {h}x{w}")
    for key in ("query_mask", "query_pseudo_mask"):
        t = batch.get(key)
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (b, h, w)):
            raise ValueError(f"{key} must be (B, H, W) = {(b, h, w)}, got {_shape(t)}")
    names = batch.get("class_names")
    if names is not None and len(names) != b:
        raise ValueError(f"class_names has {len(names)} entries for a batch of {b}")
    return b, k, h, w


class FewShotSegmenter(nn.Module):
    """Base class: backbone, batch handling, loss and k-shot voting.

    Subclasses set ``Config`` (a :class:`ModelConfig` dataclass), ``query_weight`` and
    ``support_weight`` (loss weights), and implement :meth:`forward_shot`.
    """

    Config: ClassVar[type] = ModelConfig
    name: ClassVar[str] = ""
    required_keys: ClassVar[tuple[str, ...]] = ()
    ignored_keys: ClassVar[tuple[str, ...]] = ()  # checkpoint keys load_checkpoint drops

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone: Backbone = build_backbone(config.backbone, config.backbone_weights, config.backbone_frozen)

    # --- to implement ------------------------------------------------------------------------
    def forward_shot(self, batch: Mapping[str, Any], query_taps: list[torch.Tensor],
                     support_taps: list[torch.Tensor], support_mask: torch.Tensor) -> list[StepOutput]:
        """Logits for one shot: ``support_taps`` / ``support_mask`` (B, H, W) of that shot."""
        raise NotImplementedError

    @property
    def query_weight(self) -> float:
        return 1.0

    @property
    def support_weight(self) -> float:
        return 0.0

    def extra_loss(self) -> torch.Tensor | float:
        return 0.0

    def check(self, batch: Mapping[str, Any]) -> tuple[int, int, int, int]:
        return check_batch(batch, self.required_keys)

    # --- shared -------------------------------------------------------------------------------
    def _shots(self, batch: Mapping[str, Any]) -> tuple[list[list[StepOutput]], tuple[int, int, int, int]]:
        b, k, h, w = self.check(batch)
        query_taps = self.backbone(batch["query_img"])
        support_all = self.backbone(batch["support_imgs"].flatten(0, 1))
        outs = []
        for shot in range(k):
            support_taps = [t.unflatten(0, (b, k))[:, shot] for t in support_all]
            outs.append(self.forward_shot(batch, query_taps, support_taps, batch["support_masks"][:, shot]))
        return outs, (b, k, h, w)

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Query logits (B, 2, H, W) at image size; with K shots, the mean of the K shots' logits."""
        outs, (_, _, h, w) = self._shots(batch)
        return torch.stack([resize(o[-1].query, (h, w)) for o in outs]).mean(dim=0)

    def loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, query logits (B, 2, H, W)); needs ``query_mask`` (and ``support_masks``)."""
        if "query_mask" not in batch:
            raise KeyError("loss needs batch['query_mask'] (B, H, W) with {0, 1, 255=ignore}")
        outs, (_, k, h, w) = self._shots(batch)
        target_q = batch["query_mask"].long()
        total = 0.0
        for shot, steps in enumerate(outs):
            target_s = (batch["support_masks"][:, shot] >= 0.5).long()
            for step in steps:
                total = total + self.query_weight * F.cross_entropy(resize(step.query, (h, w)), target_q,
                                                                    ignore_index=IGNORE_INDEX)
                if self.support_weight and step.support is not None:
                    total = total + self.support_weight * F.cross_entropy(resize(step.support, (h, w)), target_s)
        logits = torch.stack([resize(o[-1].query, (h, w)) for o in outs]).mean(dim=0)
        return total / k + self.extra_loss(), logits

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """(B, H, W) long mask by HSNet's k-shot voting over per-shot argmax masks."""
        outs, (b, k, h, w) = self._shots(batch)
        votes = sum(resize(o[-1].query, (h, w)).argmax(dim=1) for o in outs)
        if k == 1:
            return votes.long()
        max_vote = votes.flatten(1).max(dim=1).values.clamp(min=1).view(b, 1, 1)
        return (votes.float() / max_vote >= 0.5).long()

    def load_checkpoint(self, path: str) -> "FewShotSegmenter":
        """Load a whole-model state dict (ours, or the published code's: a ``module.`` prefix and
        the backbone's classification head are dropped, as are keys under ``ignored_keys``)."""
        ignored = ("backbone.fc.", "backbone.classifier.", *self.ignored_keys)
        load_fitting(self, read_state_dict(path), str(path), f"{self.name or type(self).__name__} "
                     f"({self.config.backbone})", ignored)
        return self

    def parameter_counts(self) -> dict[str, int]:
        """``learnable`` (requires_grad) and ``total`` parameter counts, backbone included."""
        params = list(self.parameters())
        return {"learnable": sum(p.numel() for p in params if p.requires_grad),
                "total": sum(p.numel() for p in params)}

    def train(self, mode: bool = True) -> "FewShotSegmenter":
        super().train(mode)
        self.backbone.train(mode)  # a frozen backbone keeps BatchNorm in eval mode
        return self

    def extra_repr(self) -> str:
        return f"config={self.config}"

    @classmethod
    def from_config(cls, **config: Any) -> "FewShotSegmenter":
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise TypeError(f"{cls.name or cls.__name__} has no option(s) {', '.join(unknown)}; "
                            f"options: {', '.join(sorted(fields))}")
        return cls(cls.Config(**config))
