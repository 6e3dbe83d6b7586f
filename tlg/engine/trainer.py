"""Episodic training: AdamW, mixed precision, gradient clipping, DistributedDataParallel,
atomic per-epoch checkpoints and an exact resume, with tqdm, CSV and TensorBoard logs.

Resume is bit-exact: episodes are a pure function of ``(seed, epoch, index)``, the sampler's
order of ``(seed, epoch)``, and the checkpoint holds model, optimizer, scheduler, grad scaler,
sampler and the Python / NumPy / torch random states at the end of the epoch.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.episodes import EpisodeDataset, EpisodeSampler, collate_episodes
from . import distributed
from .checkpoint import load_checkpoint, restore_rng_states, rng_states, save_atomic, seed_everything
from .evaluate import evaluate, to_device

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Training options. ``lr``/``weight_decay`` left ``None`` come from the model's config
    (``model.config.lr`` / ``.weight_decay``) or fall back to HSNet's 1e-3 and 0.

    ``precision``: ``"fp32"``, ``"bf16"`` (autocast, CPU or GPU), ``"fp16"`` (GPU, with a grad
    scaler) or ``"auto"`` (bf16 on a GPU that supports it, else fp16 on GPU; fp32 on CPU).
    """

    out_dir: str = "runs/tlg"
    epochs: int = 10
    batch_size: int = 8
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"  # or "constant"
    warmup_steps: int = 0
    grad_clip: Optional[float] = 1.0
    precision: str = "auto"
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    eval_batch_size: int = 8
    progress: bool = True
    tensorboard: bool = True
    find_unused_parameters: bool = False
    time_limit: Optional[float] = None  # seconds: stop (and checkpoint) after the step that passes it


class _LossOf(nn.Module):
    """Routes DDP's forward to ``model.loss`` so its gradient hooks see the loss computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Any]):
        return self.model.loss(batch)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a precision setting (None = full float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a GPU; use bf16 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trainer:
    """Trains ``model`` on ``train_set`` episodes and scores it on ``val_set`` after each epoch.

    Args:
        model: a tlg model (``model.loss(batch) -> (loss, logits)``, ``model.predict(batch)``).
        train_set / val_set: episode datasets (``val_set`` optional).
        config: :class:`TrainConfig`.
        model_spec: how to rebuild the model (``{"name", "backbone", "config"}``), stored in checkpoints.
    """

    def __init__(self, model: nn.Module, train_set: EpisodeDataset, val_set: Optional[EpisodeDataset] = None,
                 config: Optional[TrainConfig] = None, model_spec: Optional[dict[str, Any]] = None):
        self.config = config = config or TrainConfig()
        self.dist = distributed.init_distributed(None if config.device == "auto" else config.device)
        if config.device == "auto" and torch.cuda.is_available():
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = resolve_device(config.device)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        self.model = model.to(self.device)
        self.model_spec = model_spec
        self.train_set, self.val_set = train_set, val_set
        self.sampler = EpisodeSampler(len(train_set), shuffle=True, seed=config.seed, rank=self.dist.rank,
                                      world_size=self.dist.world_size, pad=True)
        self.loader = DataLoader(train_set, batch_size=config.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=config.num_workers, collate_fn=collate_episodes,
                                 persistent_workers=False)
        if len(self.loader) == 0:
            raise ValueError(f"batch size {config.batch_size} exceeds the {len(self.sampler)} training episodes "
                             "per process")
        model_config = getattr(model, "config", None)
        lr = config.lr if config.lr is not None else getattr(model_config, "lr", 1e-3)
        weight_decay = config.weight_decay if config.weight_decay is not None else getattr(model_config, "weight_decay", 0.0)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                           betas=config.betas, weight_decay=weight_decay)
        total = config.epochs * len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config, total))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.train_module: nn.Module = _LossOf(self.model)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = nn.parallel.DistributedDataParallel(
                self.train_module, device_ids=ids, find_unused_parameters=config.find_unused_parameters)
        self.epoch = 0  # epochs completed
        self.step = 0
        self.best_miou = -math.inf
        self.history: list[dict[str, Any]] = []
        self._writer = None
        self._deadline: Optional[float] = None
        self.stopped_early = False

    # --- checkpoints ----------------------------------------------------------------------------
    @property
    def last_path(self) -> str:
        return os.path.join(self.config.out_dir, "last.pt")

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_miou": self.best_miou,
            "history": self.history,
            "rng": rng_states(),
            "model_spec": self.model_spec,
            "train_config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_miou, self.history = state["best_miou"], list(state["history"])
        restore_rng_states(state["rng"])

    def save(self, path: Optional[str] = None) -> None:
        if self.dist.is_main:
            save_atomic(self.state_dict(), path or self.last_path)
        distributed.barrier()

    def resume(self, path: Optional[str] = None) -> bool:
        """Continue from ``path`` (default ``<out_dir>/last.pt``); False when there is none yet."""
        path = path or self.last_path
        if not os.path.isfile(path):
            return False
        self.load_state_dict(load_checkpoint(path, map_location=self.device))
        return True

    # --- the loop -------------------------------------------------------------------------------
    def fit(self, resume: bool | str = False) -> list[dict[str, Any]]:
        """Train up to ``config.epochs`` (continuing a checkpoint when ``resume``); returns the
        per-epoch log rows."""
        resumed = bool(resume) and self.resume(resume if isinstance(resume, str) else None)
        if not resumed:
            seed_everything(self.config.seed)
        self._deadline = time.time() + self.config.time_limit if self.config.time_limit else None
        self.stopped_early = False
        while self.epoch < self.config.epochs and not self.stopped_early:
            started = time.time()
            train_loss = self.train_epoch(self.epoch)
            row: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, "train_loss": train_loss,
                                   "lr": self.optimizer.param_groups[0]["lr"]}
            if self.val_set is not None and (self.epoch + 1) % self.config.eval_every == 0:
                meter = evaluate(self.model, self.val_set, batch_size=self.config.eval_batch_size,
                                 num_workers=self.config.num_workers, device=self.device,
                                 autocast_dtype=self.amp_dtype, progress=self.config.progress,
                                 desc=f"val {self.epoch + 1}")
                row.update(val_miou=meter.miou(), val_fb_iou=meter.fb_iou())
                if meter.miou() > self.best_miou:
                    self.best_miou = meter.miou()
                    if self.dist.is_main:
                        save_atomic({"model": self.model.state_dict(), "model_spec": self.model_spec,
                                     "epoch": self.epoch + 1, "val_miou": self.best_miou},
                                    os.path.join(self.config.out_dir, "best.pt"))
            row["seconds"] = time.time() - started
            self.epoch += 1
            self.history.append(row)
            self.save()
            self._log(row)
        self._close()
        return self.history

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training episodes; returns the mean loss (over processes)."""
        self.model.train()
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        clip = self.config.grad_clip
        total, count = 0.0, 0
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False,
                   disable=not (self.config.progress and self.dist.is_main))
        for batch in bar:
            batch = to_device(batch, self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss, _ = self.train_module(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            total += float(loss.detach())
            count += 1
            bar.set_postfix(loss=f"{total / count:.4f}")
            if self._deadline is not None and distributed.any_true(time.time() > self._deadline):
                self.stopped_early = True  # the run ends after this epoch's checkpoint
                break
            if self._tensorboard() is not None:
                self._writer.add_scalar("train/loss", float(loss.detach()), self.step)
        return distributed.all_reduce_mean(total / max(count, 1))

    # --- logs -----------------------------------------------------------------------------------
    def _tensorboard(self):
        """The SummaryWriter (opened on first use), or None when TensorBoard logging is off."""
        if self._writer is None:
            self._writer = False
            if self.config.tensorboard and self.dist.is_main:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(os.path.join(self.config.out_dir, "tensorboard"))
                except Exception as error:  # noqa: BLE001 - TensorBoard is optional
                    warnings.warn(f"TensorBoard logging is off: {error}")
        return self._writer or None

    def _log(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        os.makedirs(self.config.out_dir, exist_ok=True)
        path = os.path.join(self.config.out_dir, "metrics.csv")
        fields = ["epoch", "step", "train_loss", "val_miou", "val_fb_iou", "lr", "seconds"]
        new = not os.path.isfile(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self._tensorboard() is not None:
            for key in ("train_loss", "val_miou", "val_fb_iou", "lr"):
                if key in row:
                    self._writer.add_scalar(f"epoch/{key}", row[key], row["epoch"])
            self._writer.flush()

    def _close(self) -> None:
        if self._writer:
            self._writer.close()
        self._writer = None


def _schedule(config: TrainConfig, total_steps: int):
    if config.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {config.schedule!r}")
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor
