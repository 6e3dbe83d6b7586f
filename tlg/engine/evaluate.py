"""The evaluation protocol: episodes through a model, scored as HSNet does (1000 episodes per fold,
per-class IoU summed over episodes; see :mod:`tlg.engine.metrics`)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.episodes import EpisodeDataset, EpisodeSampler, collate_episodes
from . import distributed
from .metrics import FewShotMeter

Predictor = Callable[[Mapping[str, Any]], torch.Tensor]


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tensors of a batch moved to ``device`` (lists and strings untouched)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_predictor(model: nn.Module, original_size: bool = False) -> Predictor:
    """``model.predict`` (HSNet k-shot voting); with ``original_size`` the logits are upsampled
    bilinearly to each query's own size before the argmax (HSNet's ``use_original_imgsize``;
    with K > 1 this argmaxes the shots' mean logits instead of voting)."""

    def predict(batch: Mapping[str, Any]) -> torch.Tensor | list[torch.Tensor]:
        if not original_size:
            return model.predict(batch)
        logits = model(batch)
        return [F.interpolate(logits[i : i + 1].float(), size=tuple(m.shape[-2:]), mode="bilinear",
                              align_corners=True)[0].argmax(0) for i, m in enumerate(batch["org_query_mask"])]

    return predict


def pseudo_mask_predictor(threshold: float = 0.5) -> Predictor:
    """Baseline: the query's own pseudo-mask (``query_pseudo_mask``) thresholded, used as the answer."""

    def predict(batch: Mapping[str, Any]) -> torch.Tensor:
        if "query_pseudo_mask" not in batch:
            raise KeyError("the pseudo-mask baseline needs episodes built with query_pseudo_masks=")
        return (batch["query_pseudo_mask"] >= threshold).long()

    return predict


def support_mask_predictor(threshold: float = 0.5) -> Predictor:
    """Baseline: the first support's (pseudo-)mask, resized to the query, used as the query's answer
    (what the weak label alone says, with no correspondence between the two images)."""

    def predict(batch: Mapping[str, Any]) -> torch.Tensor:
        mask = batch["support_masks"][:, 0].float()
        size = batch["query_img"].shape[-2:]
        if mask.shape[-2:] != size:
            mask = torch.nn.functional.interpolate(mask[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        return (mask >= threshold).long()

    return predict


@torch.no_grad()
def evaluate(predictor: Predictor | nn.Module, dataset: EpisodeDataset, *, batch_size: int = 1,
             num_workers: int = 0, device: torch.device | str = "cpu", original_size: bool = False,
             autocast_dtype: Optional[torch.dtype] = None, progress: bool = True,
             desc: str = "eval") -> FewShotMeter:
    """Score ``predictor`` (a model, or a function batch -> (B, H, W) mask) on every episode of
    ``dataset``. Under torch.distributed each process takes every ``world``-th episode and the sums
    are all-reduced, so the numbers equal a single process's."""
    return evaluate_many({desc: predictor}, dataset, batch_size=batch_size, num_workers=num_workers, device=device,
                         original_size=original_size, autocast_dtype=autocast_dtype, progress=progress,
                         desc=desc)[desc]


@torch.no_grad()
def evaluate_many(predictors: Mapping[str, Predictor | nn.Module], dataset: EpisodeDataset, *,
                  batch_size: int = 1, num_workers: int = 0, device: torch.device | str = "cpu",
                  original_size: bool = False, autocast_dtype: Optional[torch.dtype] = None,
                  progress: bool = True, desc: str = "eval") -> dict[str, FewShotMeter]:
    """:func:`evaluate` for several predictors on the same episodes, loading each episode once."""
    info = distributed.current()
    if original_size and not dataset.keep_original:
        raise ValueError("original-size evaluation needs an EpisodeDataset built with keep_original=True")
    models = {name: p for name, p in predictors.items() if isinstance(p, nn.Module)}
    modes = {name: m.training for name, m in models.items()}
    functions = {name: model_predictor(p.eval(), original_size) if name in models else p
                 for name, p in predictors.items()}
    sampler = EpisodeSampler(len(dataset), rank=info.rank, world_size=info.world_size, pad=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_episodes)
    meters = {name: FewShotMeter(dataset.source.classes, len(dataset.source.class_names)) for name in predictors}
    device = torch.device(device)
    for batch in tqdm(loader, desc=desc, disable=not (progress and info.is_main), leave=False):
        batch = to_device(batch, device)
        for name, predict in functions.items():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                pred = predict(batch)
            if original_size:
                for p, target, c in zip(pred, batch["org_query_mask"], batch["class_id"]):
                    meters[name].update(p[None].cpu(), target[None].cpu(), c.view(1))
            else:
                meters[name].update(pred.cpu(), batch["query_mask"].cpu(), batch["class_id"].cpu())
    for name, meter in meters.items():
        meter.all_reduce()
        if name in models:
            models[name].train(modes[name])
    return meters
