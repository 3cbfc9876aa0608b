"""Optimizer and learning-rate schedule: AdamW/SGD over head/backbone groups, warmup then cosine."""

from __future__ import annotations

import math
from typing import Any

import torch

from finetune.backbones import Backbone, parameter_groups
from finetune.config import TrainConfig

MIN_LR_FACTOR = 0.01


def build_optimizer(backbone: Backbone, config: TrainConfig) -> torch.optim.Optimizer:
    """Discriminative LR: the head at ``lr``, the backbone at ``lr * backbone_lr_scale`` (``lr`` resolved)."""
    if config.lr is None or config.backbone_lr_scale is None:
        raise ValueError("the optimizer needs a resolved lr and backbone_lr_scale")
    groups: list[dict[str, Any]] = parameter_groups(
        backbone,
        lr=config.lr,
        backbone_lr=config.lr * config.backbone_lr_scale,
        weight_decay=config.weight_decay,
    )
    return new_optimizer(groups, kind=config.optimizer, lr=config.lr, momentum=config.momentum)


def new_optimizer(
    params: Any, *, kind: str, lr: float, momentum: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum; a parameter group's own ``weight_decay`` overrides the one here."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warmup from ~0 to 1, then cosine decay to MIN_LR_FACTOR."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_factor(step: int, *, steps_per_epoch: int, epochs: int, freeze_epochs: int, warmup_epochs: float) -> float:
    """The LR factor at ``step``: warmup + cosine over the head-only epochs, then again over the rest.

    A backbone unfrozen part-way warms up from ~0 instead of meeting the peak rate cold (as fastai's
    ``fine_tune`` runs two one-cycle fits); without frozen epochs (or a linear probe) it is one cycle.
    """
    boundary = freeze_epochs * steps_per_epoch if 0 < freeze_epochs < epochs else 0
    start, end = (0, boundary) if step < boundary else (boundary, epochs * steps_per_epoch)
    total = end - start
    warmup = max(0, min(total - 1, round(warmup_epochs * steps_per_epoch)))
    return warmup_cosine(step - start, warmup_steps=warmup, total_steps=total)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, *, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch; ``config`` must be resolved (no ``auto`` left)."""
    if config.epochs is None or config.freeze_epochs is None:
        raise ValueError("the schedule needs resolved epochs and freeze_epochs")
    epochs, freeze = config.epochs, config.freeze_epochs

    def factor(step: int) -> float:
        return schedule_factor(
            step,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            freeze_epochs=freeze,
            warmup_epochs=config.warmup_epochs,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
