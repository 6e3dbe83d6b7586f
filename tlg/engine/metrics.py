"""Few-shot segmentation metrics, computed as the FSS literature does (HSNet's ``common/evaluation.py``
and ``common/logger.py``, github.com/juhongm999/hsnet).

Per episode, foreground/background intersection and union are counted over non-ignored pixels;
they are summed per class over all episodes. Then

* mIoU   = mean over the fold's classes of ``I_fg(c) / max(U_fg(c), 1)`` (x100);
* FB-IoU = mean over {background, foreground} of ``sum_c I(c) / sum_c U(c)`` (x100).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..data.base import IGNORE_INDEX


def intersection_and_union(pred: torch.Tensor, target: torch.Tensor,
                           ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Background/foreground areas of each episode: ``(intersection, union)``, each (B, 2) [bg, fg].

    ``pred`` (B, H, W) in {0, 1}; ``target`` (B, H, W) in {0, 1, ignore_index}. Pixels whose target
    is ``ignore_index`` do not count."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    pred, target = pred.long(), target.long()
    inter, union = [], []
    for label in (0, 1):
        p = (pred == label) & valid
        t = (target == label) & valid
        inter.append((p & t).flatten(1).sum(1))
        union.append((p | t).flatten(1).sum(1))
    return torch.stack(inter, 1), torch.stack(union, 1)


class FewShotMeter:
    """Per-class sums of intersection and union over episodes (HSNet's AverageMeter).

    Args:
        class_ids: the classes the scores average over (a fold's test classes).
        num_classes: size of the buffers (the source's number of class names).
    """

    def __init__(self, class_ids: Sequence[int], num_classes: int):
        self.class_ids = torch.as_tensor(list(class_ids), dtype=torch.long)
        self.intersection = torch.zeros(2, num_classes, dtype=torch.float64)
        self.union = torch.zeros(2, num_classes, dtype=torch.float64)
        self.episodes = 0
        self.loss_sum = 0.0
        self.loss_count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_id: torch.Tensor, loss: float | None = None) -> None:
        """Add a batch: predictions and targets (B, H, W) of classes ``class_id`` (B,)."""
        inter, union = intersection_and_union(pred, target)
        self.add(inter, union, class_id)
        if loss is not None:
            self.loss_sum += float(loss) * len(class_id)
            self.loss_count += len(class_id)

    def add(self, inter: torch.Tensor, union: torch.Tensor, class_id: torch.Tensor) -> None:
        """Add per-episode (B, 2) areas."""
        class_id = torch.as_tensor(class_id, dtype=torch.long).cpu().view(-1)
        self.intersection.index_add_(1, class_id, inter.double().cpu().t())
        self.union.index_add_(1, class_id, union.double().cpu().t())
        self.episodes += len(class_id)

    def all_reduce(self) -> None:
        """Sum the buffers over the processes of the default group (DDP evaluation)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        packed = torch.cat([self.intersection.flatten(), self.union.flatten(),
                            torch.tensor([self.episodes, self.loss_sum, self.loss_count], dtype=torch.float64)])
        if dist.get_backend() == "nccl":
            packed = packed.cuda()
        dist.all_reduce(packed)
        packed = packed.cpu()
        n = self.intersection.numel()
        self.intersection = packed[:n].view_as(self.intersection).clone()
        self.union = packed[n:2 * n].view_as(self.union).clone()
        self.episodes, self.loss_sum, self.loss_count = int(packed[-3]), float(packed[-2]), int(packed[-1])

    def class_iou(self) -> dict[int, float]:
        """Foreground IoU (x100) of each class of interest."""
        iou = self.intersection[1] / self.union[1].clamp_min(1)
        return {int(c): float(iou[c]) * 100 for c in self.class_ids}

    def miou(self) -> float:
        iou = self.intersection[1] / self.union[1].clamp_min(1)
        return float(iou[self.class_ids].mean()) * 100

    def fb_iou(self) -> float:
        inter = self.intersection[:, self.class_ids].sum(1)
        union = self.union[:, self.class_ids].sum(1)
        return float((inter / union.clamp_min(1)).mean()) * 100

    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else float("nan")

    def summary(self) -> dict[str, float]:
        return {"miou": self.miou(), "fb_iou": self.fb_iou(), "episodes": self.episodes, "loss": self.mean_loss()}
