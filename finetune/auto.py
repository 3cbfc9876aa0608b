"""Defaults that adapt to the data: the learning rate, the budget and the head-first schedule.

Resolved once per run, before the first epoch, for every setting left at ``auto`` (the default);
an explicit value always wins. What was chosen, and why, goes to ``auto_choices.json`` in the run
folder, to the log, TensorBoard and ``report.md``; a resumed run reads it back instead of choosing
again.

- ``lr``: the learning-rate range test (``finetune.lr_find``'s exponential sweep and smoothing) on
  a copy of the new head over the backbone's features of the training images, computed once: 200
  steps that cost milliseconds instead of 200 training steps. The LR at the lowest loss / 10.
- ``freeze_epochs``: the head is fitted first on those cached features (the best of
  ``PROBE_EPOCHS`` passes by validation loss) and scored as "epoch 0". Below ``PROBE_ONLY_BELOW``
  training images per class only the head trains afterwards (a linear probe on augmented images);
  otherwise the whole network does, and the fitted head stays the best checkpoint unless
  fine-tuning beats it on validation.
- ``backbone_lr_scale``: after a fitted head the whole network trains at one LR (the range test's,
  at most ``BACKBONE_LR_CAP``); with an untrained head the backbone at a tenth of the head's.
- ``epochs``: a budget in optimizer steps: enough epochs for ``MIN_STEPS`` updates, within
  ``[MIN_EPOCHS, MAX_EPOCHS]``.

    plan, probe_logits = resolve(config, Inputs(model, head_prefixes, train_loader, val_loader, ...))
    config = plan.apply(config)          # every auto setting resolved (finetune.engine.Trainer)
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.backbones import init_head
from finetune.loop import Runtime, progress
from finetune.lr_find import LRFindResult, exponential_lrs, figure, smooth
from finetune.optim import new_optimizer, warmup_cosine
from finetune.tasks import TrainingTask

logger = logging.getLogger(__name__)
CHOICES_FILE = "auto_choices.json"
MIN_STEPS = 250  # optimizer updates a small data set gets at least (within MAX_EPOCHS)
MIN_EPOCHS = 5
MAX_EPOCHS = 18  # about 2x the time of a plain 10-epoch run at most, the range test and probe included
LR_RANGE = (1e-5, 10.0)  # the range test's span, and the steps it takes
RANGE_STEPS = 200
LR_BOUNDS = (1e-4, 3e-2)  # a suggestion outside this is clamped into it, and the log says so
# After a fitted head the whole network trains at one LR, at most this (AdamW; SGD x10): data unlike the
# pretraining set needs the backbone to move (a tenth of the head's LR underfits it), and a head-sized LR
# of 1e-2 blows up the fitted head and wrecks pretrained features in a few steps.
BACKBONE_LR_CAP = {"adamw": 1e-3, "sgd": 1e-2}
DEFAULT_BACKBONE_LR_SCALE = 0.1  # when the head starts untrained (no probe), as before
PROBE_EPOCHS = 60  # passes of the head fit over cached features (cheap); the best by validation loss is kept
# With fewer training images per class than this, fine-tuning the backbone overfits more than it adapts:
# the head alone trains afterwards (on augmented images, from the fitted head), a linear probe
PROBE_ONLY_BELOW = 25
# A head fit that peaks on validation within this many passes found features that already separate the classes
# (ImageNet-like photos: 2 of 60 on the demo and tux photos; digits 20-49): the backbone then moves at a tenth
# of the head's LR, else (data unlike the pretraining set) at the head's
READY_WITHIN = 6


@dataclass(frozen=True)
class Plan:
    """What ``auto`` resolved to, with the evidence: stored as ``auto_choices.json``."""

    lr: float
    epochs: int
    freeze_epochs: int
    backbone_lr_scale: float
    probe: bool  # the head was fitted on cached features before the first epoch
    reason: dict[str, str]
    lr_curve: dict[str, list[float]] | None = None  # the range test: lrs, losses, smoothed
    probe_val: dict[str, float] | None = None  # the probe's validation accuracy and loss, on images

    def save(self, run_dir: Path) -> None:
        (run_dir / CHOICES_FILE).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    def write(self, run_dir: Path, tb: Any) -> None:
        """``auto_choices.json``, the range test's curve as ``lr_find.png``, both to TensorBoard (``tb``)."""
        self.save(run_dir)
        tb.text("auto/choices", "\n\n".join(self.summary()), 0)
        if self.lr_curve is not None:
            curve = self.lr_curve
            chart = figure(LRFindResult(curve["lrs"], curve["losses"], curve["smoothed"], self.lr, False))
            chart.savefig(run_dir / "lr_find.png", dpi=100)
            tb.figure("auto/lr_range_test", chart, 0)

    def apply(self, config: Any) -> Any:
        """``config`` (a TrainConfig) with every setting this plan resolved."""
        return config.replace(
            lr=self.lr, epochs=self.epochs, freeze_epochs=self.freeze_epochs, backbone_lr_scale=self.backbone_lr_scale
        )

    @classmethod
    def load(cls, run_dir: Path) -> Plan:
        return cls(**json.loads((run_dir / CHOICES_FILE).read_text(encoding="utf-8")))

    def summary(self) -> list[str]:
        """One line per choice, for the log and report.md."""
        return [f"{key}: {text}" for key, text in self.reason.items()]


def epochs_for(steps_per_epoch: int) -> int:
    """Enough epochs for MIN_STEPS updates, within [MIN_EPOCHS, MAX_EPOCHS]."""
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(MIN_STEPS / max(1, steps_per_epoch))))


def head_module(model: nn.Module, head_prefixes: tuple[str, ...]) -> nn.Module | None:
    """The new head (Dropout + classifier) when there is exactly one, else None (no probe)."""
    if len(head_prefixes) != 1:
        return None
    return model.get_submodule(head_prefixes[0].rstrip("."))


@torch.no_grad()
def head_inputs(
    model: nn.Module, head: nn.Module, loader: Iterable[Any], runtime: Runtime, *, total: int, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head receives for each image (the backbone's features, eval mode) and the targets, on the
    run's device (a few MB: N x feature size)."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach().float()))
    targets: list[torch.Tensor] = []
    model.eval()
    try:
        for images, labels in progress(loader, total=total, desc=desc):
            with runtime.autocast():
                model(runtime.to_device(images))
            targets.append(labels.to(runtime.device))
    finally:
        hook.remove()
    return torch.cat(captured), torch.cat(targets)


@torch.no_grad()
def train_mode_loss(
    model: nn.Module, loader: Iterable[Any], runtime: Runtime, task: TrainingTask, *, batches: int = 4
) -> float:
    """Mean plain loss of the task over the first ``batches`` of ``loader`` with BatchNorm on batch statistics, as
    fine-tuning will see it (running statistics left as they are, dropout off)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(layer.momentum, None if layer.num_batches_tracked is None else layer.num_batches_tracked.clone())
             for layer in layers]  # fmt: skip
    model.eval()
    for layer in layers:
        layer.train()
        layer.momentum = 0.0  # normalize with the batch's statistics, update nothing
    losses: list[float] = []
    try:
        for index, (images, labels) in enumerate(loader):
            if index == batches:
                break
            with runtime.autocast():
                logits = model(runtime.to_device(images))
            losses.append(float(task.plain_loss(logits.float(), labels.to(logits.device))))
    finally:
        for layer, (momentum, tracked) in zip(layers, saved, strict=True):
            layer.momentum = momentum
            if tracked is not None and layer.num_batches_tracked is not None:
                layer.num_batches_tracked.copy_(tracked)
        model.eval()
    return float(np.mean(losses)) if losses else math.inf


@dataclass(frozen=True)
class HeadFit:
    """How the head is trained on cached features: the run's task, optimizer, loss and batch size."""

    task: TrainingTask
    criterion: nn.Module
    optimizer: str
    weight_decay: float
    momentum: float
    batch_size: int
    seed: int

    def batches(self, count: int, steps: int) -> Iterable[torch.Tensor]:
        """``steps`` index batches over ``count`` rows, reshuffled each pass, seeded."""
        generator = torch.Generator().manual_seed(self.seed)
        done = 0
        while done < steps:
            order = torch.randperm(count, generator=generator)
            for start in range(0, count, self.batch_size):
                if done == steps:
                    return
                yield order[start : start + self.batch_size]
                done += 1

    def make_optimizer(self, head: nn.Module, lr: float) -> Any:
        return new_optimizer(
            head.parameters(), kind=self.optimizer, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


def head_range_test(head: nn.Module, features: torch.Tensor, targets: torch.Tensor, fit: HeadFit) -> LRFindResult:
    """The LR range test on a copy of the head over cached features (the real head is untouched).

    Steps on mini-batches as training does, but records the loss over every training feature after
    each step: with features cached that costs microseconds, and the curve is free of batch noise.
    """
    trial = copy.deepcopy(head).train()
    lrs = exponential_lrs(*LR_RANGE, RANGE_STEPS)
    optimizer = fit.make_optimizer(trial, lrs[0])
    losses: list[float] = []
    for lr, index in zip(lrs, fit.batches(len(features), RANGE_STEPS), strict=False):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = fit.criterion(trial(features[index]), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(_score(trial, features, targets, fit.task, fit.criterion)["loss"])
        trial.train()
        if not math.isfinite(losses[-1]) or losses[-1] > 4.0 * min(losses):
            break
    smoothed = smooth(losses, beta=0.5)
    done = lrs[: len(losses)]
    suggestion = done[int(np.argmin(smoothed))] / 10  # fastai's "minimum": a tenth of the LR at the lowest loss
    return LRFindResult(done, losses, smoothed, suggestion, len(losses) < RANGE_STEPS)


def clamp_lr(lr: float) -> float:
    low, high = LR_BOUNDS
    return min(high, max(low, lr))


def fit_head(
    head: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    fit: HeadFit,
    *,
    lr: float,
    epochs: int = PROBE_EPOCHS,
) -> dict[str, float]:
    """Train ``head`` in place on cached features (warmup + cosine), keep its best epoch by validation loss.

    Returns that epoch's validation loss and accuracy on the features (plain cross-entropy).
    """
    features, targets = train
    per_epoch = math.ceil(len(features) / fit.batch_size)
    total = epochs * per_epoch
    optimizer = fit.make_optimizer(head, lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=per_epoch, total_steps=total)
    )
    best: dict[str, float] = {"loss": math.inf}
    best_state = copy.deepcopy(head.state_dict())
    for step, index in enumerate(fit.batches(len(features), total), start=1):
        head.train()
        loss = fit.criterion(head(features[index]), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % per_epoch == 0:
            score = _score(head, *val, fit.task)
            if score["loss"] < best["loss"]:
                best, best_state = score | {"epoch": step // per_epoch}, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    head.train()
    return best


@torch.no_grad()
def _score(
    head: nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor,
    task: TrainingTask,
    criterion: nn.Module | None = None,
) -> dict[str, float]:
    """Loss (``criterion``, else the task's plain loss) and accuracy of the head in eval mode."""
    head.eval()
    logits = head(features)
    loss = criterion(logits, targets) if criterion is not None else task.plain_loss(logits, targets)
    return {"loss": float(loss), "accuracy": task.hits(logits, targets) / max(1, len(targets))}


def selection_margin(score: float, count: int) -> float:
    """How far below the best validation score a later epoch may be and still be the one published: the
    standard error of that score on ``count`` validation images (a proportion's, sqrt(p(1 - p) / n);
    9 points at 0.76 on 21 images, 2 at 0.9 on 200). In three runs on the quality benchmark's small sets
    the schedule's last epoch tested 5-12 points above the epoch with the best validation accuracy."""
    p = min(1.0, max(0.0, score))
    return math.sqrt(p * (1.0 - p) / max(1, count))


def describe_lr(result: LRFindResult, chosen: float) -> str:
    text = f"{chosen:.2g}, a tenth of the LR at the lowest loss of the range test on the head over cached features"
    if not np.isclose(chosen, result.suggestion):
        text += f" ({result.suggestion:.2g} clamped into [{LR_BOUNDS[0]:g}, {LR_BOUNDS[1]:g}])"
    return text


@dataclass(frozen=True)
class Inputs:
    """What resolving needs from the run: the model and its head, eval-transform loaders, the loss."""

    model: nn.Module
    head_prefixes: tuple[str, ...]
    train: Any  # DataLoader over the training split with the eval transform
    val: Any  # DataLoader over the validation split
    runtime: Runtime
    fit: HeadFit
    steps_per_epoch: int
    images_per_class: float  # training images / classes


@dataclass(frozen=True)
class Probe:
    """The fitted head as "epoch 0": its validation logits and targets, and its weights (the model's head
    may have been re-initialised for fine-tuning since)."""

    logits: torch.Tensor
    targets: torch.Tensor
    head_state: dict[str, torch.Tensor]


def resolve(config: Any, inputs: Inputs) -> tuple[Plan, Probe | None]:
    """Resolve every ``auto`` setting of ``config`` (a TrainConfig); fits the model's head in place when
    ``freeze_epochs`` is auto. Returns the plan and, after a head fit, the fitted head (``Probe``)."""
    reason: dict[str, str] = {}
    head = head_module(inputs.model, inputs.head_prefixes)
    probe = config.freeze_epochs is None and head is not None
    features = None
    if head is not None and (config.lr is None or probe):
        features = head_inputs(inputs.model, head, inputs.train, inputs.runtime, total=len(inputs.train), desc="train")
    lr, curve = _resolve_lr(config.lr, head, features, inputs.fit, reason)
    epochs = config.epochs
    if epochs is None:
        epochs = epochs_for(inputs.steps_per_epoch)
        reason["epochs"] = (
            f"{epochs}: {inputs.steps_per_epoch} steps per epoch, {epochs * inputs.steps_per_epoch} optimizer steps "
            f"(at least {MIN_STEPS} within {MIN_EPOCHS}-{MAX_EPOCHS} epochs)"
        )
    else:
        reason["epochs"] = f"{epochs}, given"
    freeze, probe_val, probe_out, fresh_head = config.freeze_epochs, None, None, False
    if probe and features is not None and head is not None:
        val = head_inputs(inputs.model, head, inputs.val, inputs.runtime, total=len(inputs.val), desc="val")
        probe_val = fit_head(head, features, val, inputs.fit, lr=lr)
        with torch.no_grad():
            probe_out = Probe(head.eval()(val[0]), val[1], copy.deepcopy(head.state_dict()))
        freeze = _probe_schedule(epochs, probe_val, inputs.images_per_class, reason)
        if freeze < epochs:
            fresh_head = not _head_survives(inputs, reason=reason)
    elif freeze is None:
        freeze = 0
        reason["freeze_epochs"] = "0: this backbone has no single head to fit first; the whole network trains"
    else:
        reason["freeze_epochs"] = f"{freeze}, given" + (" (a linear probe)" if freeze >= epochs else "")
    fitted = probe_val is not None and not fresh_head
    ready = fitted and probe_val is not None and probe_val["epoch"] <= READY_WITHIN
    lr, scale = _fine_tune_lr(config, lr, fitted=fitted, ready=ready, frozen=freeze >= epochs, reason=reason)
    plan = Plan(lr, epochs, freeze, scale, probe_val is not None, reason, curve, probe_val)
    for line in plan.summary():
        logger.info("auto %s", line)
    return plan, probe_out


def _resolve_lr(
    lr: float | None,
    head: nn.Module | None,
    features: tuple[torch.Tensor, torch.Tensor] | None,
    fit: HeadFit,
    reason: dict[str, str],
) -> tuple[float, dict[str, list[float]] | None]:
    if lr is not None:
        reason["lr"] = f"{lr:g}, given"
        return lr, None
    if head is None or features is None:
        reason["lr"] = "1e-3: this backbone has no single head to run the range test on"
        return 1e-3, None
    result = head_range_test(head, *features, fit)
    chosen = clamp_lr(result.suggestion)
    reason["lr"] = describe_lr(result, chosen)
    return chosen, {"lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed}


def _probe_schedule(epochs: int, probe_val: dict[str, float], images_per_class: float, reason: dict[str, str]) -> int:
    """freeze_epochs after a fitted head: all of them (a linear probe) on very small data, else none."""
    small = images_per_class < PROBE_ONLY_BELOW
    fitted = f"head fitted on cached features first (best of {PROBE_EPOCHS} feature epochs: validation accuracy "
    fitted += f"{probe_val['accuracy']:.4f}), then "
    if small:
        reason["freeze_epochs"] = fitted + (
            f"the head alone on augmented images for {epochs} epochs (a linear probe: {images_per_class:.0f} "
            f"training images per class is below {PROBE_ONLY_BELOW}, too few to fine-tune the backbone without "
            "overfitting)"
        )
        return epochs
    reason["freeze_epochs"] = fitted + (
        f"the whole network for {epochs} epochs ({images_per_class:.0f} training images per class); the fitted "
        "head is published only if every fine-tuned epoch is worse on validation by more than the split's "
        "standard error"
    )
    return 0


def _head_survives(inputs: Inputs, *, reason: dict[str, str]) -> bool:
    """Does the fitted head still work once BatchNorm runs on batch statistics? If not (small inputs,
    whose last maps are 1x1 or 2x2, make batch statistics far from the running ones), it is
    re-initialised for fine-tuning: a fitted head that sees other features starts from worse than chance
    and its large gradients wreck the backbone. It stays the "epoch 0" candidate either way."""
    loss = train_mode_loss(inputs.model, inputs.train, inputs.runtime, inputs.fit.task)
    chance = inputs.fit.task.chance_loss
    if loss < chance:
        return True
    init_head(inputs.model, inputs.head_prefixes)
    reason["freeze_epochs"] += (
        f"; fine-tuning starts from a new head: with BatchNorm on batch statistics the fitted head's loss is "
        f"{loss:.2f}, above chance ({chance:.2f})"
    )
    return False


def _fine_tune_lr(
    config: Any, lr: float, *, fitted: bool, ready: bool, frozen: bool, reason: dict[str, str]
) -> tuple[float, float]:
    """The head's LR and the backbone's scale of it. After a fitted head the head's LR is the range test's
    capped at ``BACKBONE_LR_CAP`` (it needs no large LR any more: a head-sized LR blows up the fitted head
    and wrecks pretrained features in a few steps); the backbone trains at the same LR unless the features
    were ``ready`` (the head fit peaked within ``READY_WITHIN`` passes), then at a tenth of it."""
    scale: float | None = config.backbone_lr_scale
    if scale is not None:
        reason["backbone_lr_scale"] = f"{scale:g}, given"
        return lr, scale
    if fitted and frozen:
        reason["backbone_lr_scale"] = "unused: the backbone stays frozen"
        return lr, DEFAULT_BACKBONE_LR_SCALE
    cap = BACKBONE_LR_CAP[config.optimizer]
    if fitted:
        if config.lr is None and lr > cap:
            reason["lr"] += f"; {cap:g} for the whole network once the head is fitted (at most {cap:g})"
            lr = cap
        if ready:
            reason["backbone_lr_scale"] = (
                f"{DEFAULT_BACKBONE_LR_SCALE:g}: the head fit peaked on validation within {READY_WITHIN} passes, so "
                "the pretrained features already separate these classes: the backbone moves at a tenth of the "
                "head's LR (at the head's, it overfits in a few epochs)"
            )
            return lr, DEFAULT_BACKBONE_LR_SCALE
        reason["backbone_lr_scale"] = (
            f"1: the head fit kept improving past {READY_WITHIN} passes, so these images are unlike the pretraining "
            "data and the backbone must adapt: the whole network trains at one LR"
        )
        return lr, 1.0
    if config.freeze_epochs is None:  # a new head for fine-tuning: the head at lr, the backbone at most the cap
        scale = min(1.0, cap / lr)
        reason["backbone_lr_scale"] = f"{scale:.3g}: the new head at the range test's LR, the backbone at most {cap:g}"
        return lr, scale
    reason["backbone_lr_scale"] = (
        f"{DEFAULT_BACKBONE_LR_SCALE:g}: the head starts untrained, the backbone at a tenth of its LR"
    )
    return lr, DEFAULT_BACKBONE_LR_SCALE
