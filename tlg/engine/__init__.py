"""Training, the evaluation protocol, metrics, checkpoints and visualisation."""
from __future__ import annotations

from .checkpoint import load_checkpoint, save_atomic
from .distributed import DistInfo, init_distributed
from .evaluate import evaluate, evaluate_many, model_predictor, pseudo_mask_predictor, support_mask_predictor, to_device
from .metrics import FewShotMeter, intersection_and_union
from .trainer import TrainConfig, Trainer, autocast_dtype
from .visualize import episode_panel, overlay, save_episode_panel, stack_panels

__all__ = ["Trainer", "TrainConfig", "autocast_dtype", "evaluate", "evaluate_many", "model_predictor", "pseudo_mask_predictor", "support_mask_predictor",
           "to_device", "FewShotMeter", "intersection_and_union", "save_atomic", "load_checkpoint", "DistInfo",
           "init_distributed", "episode_panel", "save_episode_panel", "overlay", "stack_panels"]
