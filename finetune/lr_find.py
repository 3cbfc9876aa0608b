"""``finetune lr-find``: the learning-rate range test on the user's own data and backbone.

    finetune lr-find --backbone resnet50 --data ./imgs            # then: finetune ... --lr <suggested>

The learning rate grows exponentially from ``--start-lr`` to ``--end-lr`` over ``--steps`` batches
(cycling the training split) while the loss is recorded; the curve is smoothed, the test stops
once the loss diverges, and the suggestion is the rate where the smoothed loss falls fastest.
Writes ``lr_find.json`` and ``lr_find.png`` into ``runs/lr-find-<timestamp>/``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune import backbones, cli, data, transforms
from finetune.config import TrainConfig
from finetune.loop import Runtime, resolve_runtime
from finetune.tasks import training_task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    stopped_early: bool


def exponential_lrs(start: float, end: float, steps: int) -> list[float]:
    """``steps`` rates from ``start`` to ``end``, evenly spaced in log scale."""
    if not 0 < start < end or steps < 2:
        raise ValueError("lr-find needs 0 < start-lr < end-lr and at least 2 steps")
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as in fast.ai's and Leslie Smith's range test)."""
    average, out = 0.0, []
    for step, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**step))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The rate of steepest descent of the smoothed loss (per log-LR), before its minimum."""
    lowest = int(np.argmin(smoothed))
    if lowest < 2:
        return lrs[max(lowest, 0)] / 10
    slopes = np.gradient(np.asarray(smoothed[: lowest + 1]), np.log(np.asarray(lrs[: lowest + 1])))
    return float(lrs[int(np.argmin(slopes))])


def _batches(loader: DataLoader[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in itertools.count():
        yield from loader


def _setup(config: TrainConfig, runtime: Runtime) -> tuple[backbones.Backbone, DataLoader[Any], nn.Module]:
    splits = data.prepare_data(config.data, **config.data_options())
    task = training_task(splits.task, splits.classes)
    torch.manual_seed(config.seed)
    backbone = backbones.create_backbone(
        config.backbone, num_classes=task.width, weights=config.weights,
        head_dropout=config.head_dropout, img_size=config.img_size,
    )  # fmt: skip
    backbone.model.to(runtime.device).train()
    backbones.set_backbone_trainable(backbone, config.freeze_epochs == 0)
    preset = transforms.train_transform(backbone.preprocess, augment=config.augment)
    loader = DataLoader(
        data.ImageDataset(splits.train, preset, target=task.target), batch_size=config.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(config.seed), num_workers=config.workers,
        drop_last=len(splits.train) > config.batch_size,
    )  # fmt: skip
    return backbone, loader, task.criterion(splits.train, balance="none", label_smoothing=config.label_smoothing)


def range_test(
    config: TrainConfig, *, start_lr: float = 1e-6, end_lr: float = 1.0, steps: int = 100, diverge: float = 4.0
) -> LRFindResult:
    """Run the range test; ``freeze_epochs > 0`` tests the head alone (the linear-probe phase)."""
    runtime = resolve_runtime(config)
    backbone, loader, criterion = _setup(config, runtime)
    lrs = exponential_lrs(start_lr, end_lr, steps)
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=lrs[0], momentum=config.momentum)
        if config.optimizer == "sgd"
        else torch.optim.AdamW(params, lr=lrs[0], weight_decay=config.weight_decay)
    )
    losses: list[float] = []
    for lr, (images, targets) in zip(lrs, _batches(loader), strict=False):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = criterion(backbone.model(runtime.to_device(images)), targets.to(runtime.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
        smoothed = smooth(losses)
        if not math.isfinite(losses[-1]) or smoothed[-1] > diverge * min(smoothed):
            break
    smoothed = smooth(losses)
    done = lrs[: len(losses)]
    return LRFindResult(done, losses, smoothed, suggest(done, smoothed), len(losses) < steps)


def figure(result: LRFindResult) -> Any:
    """The curve (raw and smoothed loss against the LR, log scale) with the suggestion marked."""
    from matplotlib.figure import Figure

    chart = Figure(figsize=(6, 4))
    axes = chart.add_subplot()
    axes.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    axes.plot(result.lrs, result.smoothed, label="smoothed")
    axes.axvline(result.suggestion, color="red", linestyle="--", label=f"suggested {result.suggestion:.2e}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.legend()
    chart.tight_layout()
    return chart


def plot(result: LRFindResult, path: Path) -> None:
    figure(result).savefig(path, dpi=100)


def get_args_parser() -> argparse.ArgumentParser:
    """``finetune``'s parser (every training flag) plus the range-test settings."""
    parser = cli.get_args_parser()
    parser.prog = "finetune lr-find"
    parser.description = (
        "Learning-rate range test: train with an exponentially growing LR for a few hundred steps, record the "
        "loss, and suggest the LR where it falls fastest. --freeze-epochs > 0 tests the head alone."
    )
    group = parser.add_argument_group("range test")
    group.add_argument("--start-lr", type=float, default=1e-6, help="first learning rate")
    group.add_argument("--end-lr", type=float, default=1.0, help="last learning rate")
    group.add_argument("--steps", type=int, default=100, help="batches to run (the training split is cycled)")
    return parser


def main(args: argparse.Namespace) -> int:
    from finetune import errors
    from finetune.engine import default_name

    settings = {k: vars(args).pop(k) for k in ("start_lr", "end_lr", "steps")}
    try:
        config = cli.resolve_config(args)
        result = range_test(config, **settings)
    except errors.USER_ERRORS as exc:
        logger.error("%s", exc)
        return 2
    out = config.output_dir / f"lr-find-{default_name(config)}-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_find.json").write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    plot(result, out / "lr_find.png")
    print(f"suggested learning rate: {result.suggestion:.3g}  (curve: {out / 'lr_find.png'})")
    return 0
