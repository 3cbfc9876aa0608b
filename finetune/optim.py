"""Optimizer and learning-rate schedule: AdamW/SGD over head/backbone groups, warmup then cosine."""

from __future__ import annotations

import math
from typing import Any

import torch

from finetune.backbones import Backbone, parameter_groups
from finetune.config import TrainConfig

MIN_LR_FACTOR = 0.01


def build_optimizer(backbone: Backbone, config: TrainConfig) -> torch.optim.Optimizer:
    """Discriminative LR: the head at ``lr``, the backbone at ``lr * backbone_lr_scale``."""
    groups: list[dict[str, Any]] = parameter_groups(
        backbone,
        lr=config.lr,
        backbone_lr=config.lr * config.backbone_lr_scale,
        weight_decay=config.weight_decay,
    )
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warmup from ~0 to 1, then cosine decay to MIN_LR_FACTOR."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, *, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch."""
    total = config.epochs * steps_per_epoch
    warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup_steps=max(0, warmup), total_steps=total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
