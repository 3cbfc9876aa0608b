"""One training epoch and one evaluation pass; nothing here knows about run folders."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.config import TrainConfig

logger = logging.getLogger(__name__)
Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Runtime:
    """Where and how tensors run: device, autocast dtype (None = fp32), channels_last, grad scaler."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def resolve_runtime(config: TrainConfig) -> Runtime:
    """Device, AMP dtype and memory format: AMP and channels_last only on CUDA unless asked for."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    amp = config.amp
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 or off on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    return Runtime(device, dtype, channels_last=config.channels_last and device.type == "cuda", scaler=scaler)


def maybe_compile(model: nn.Module, *, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when ``enabled`` (``--compile true``), else the model itself."""
    if not enabled:
        return model
    compiled: nn.Module = torch.compile(model)  # type: ignore[assignment]
    return compiled


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    data_wait_seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_seconds / self.seconds if self.seconds > 0 else 0.0


def progress(iterable: Iterable[Any], *, total: int, desc: str) -> Iterable[Any]:
    """A tqdm bar on a terminal; the bare iterable otherwise (the caller logs a line per epoch)."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    bar: Iterable[Any] = tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
    return bar


def _timed(loader: Iterable[Any]) -> Iterator[tuple[float, Any]]:
    """Yield (seconds spent waiting for the batch, batch)."""
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield time.perf_counter() - start, batch


class WeightEMA:
    """An exponential moving average of a model's weights and buffers (as timm's ``ModelEmaV3``).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short
    fine-tune is not dominated by the starting weights. ``module`` is evaluated and published in
    place of the trained weights when ``--ema true``.
    """

    def __init__(self, source: nn.Module, decay: float) -> None:
        import copy

        self.source, self.decay, self.updates = source, decay, 0
        self.module = copy.deepcopy(source).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, live in zip(self.module.state_dict().values(), self.source.state_dict().values(), strict=True):
            if ema.dtype.is_floating_point:
                ema.lerp_(live.detach(), 1.0 - decay)
            else:
                ema.copy_(live)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def top1_hits(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """Images whose top-1 class is the target (the multiclass task's ``hits``)."""
    return int((logits.detach().argmax(dim=1) == targets).sum().item())


@dataclass
class StepContext:
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    runtime: Runtime
    clip_grad: float = 0.0
    mixer: Mixer | None = None
    ema: WeightEMA | None = None
    hits: Callable[[torch.Tensor, torch.Tensor], int] = top1_hits  # images answered right (the task's)


def train_step(ctx: StepContext, images: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """One optimisation step; returns (loss, number of images answered right vs hard targets)."""
    images, targets = ctx.runtime.to_device(images), targets.to(ctx.runtime.device, non_blocking=True)
    soft = None
    if ctx.mixer is not None:
        images, soft = ctx.mixer(images, targets)
    with ctx.runtime.autocast():
        logits = ctx.model(images)
        loss = ctx.criterion(logits, soft if soft is not None else targets)
    ctx.optimizer.zero_grad(set_to_none=True)
    scaler = ctx.runtime.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(ctx.optimizer)
    else:
        loss.backward()
    if ctx.clip_grad > 0:
        params = [p for p in ctx.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, ctx.clip_grad)
    if scaler is not None:
        scaler.step(ctx.optimizer)
        scaler.update()
    else:
        ctx.optimizer.step()
    ctx.scheduler.step()
    if ctx.ema is not None:
        ctx.ema.update()
    return float(loss.detach().item()), ctx.hits(logits.detach(), targets)


def train_one_epoch(ctx: StepContext, loader: Iterable[Any], *, total: int, desc: str) -> EpochStats:
    """Train over ``loader`` once; the caller has already set train/eval modes of the modules."""
    loss_sum, correct, seen, waited = 0.0, 0, 0, 0.0
    start = time.perf_counter()
    for wait, (images, targets) in progress(_timed(loader), total=total, desc=desc):
        waited += wait
        loss, hits = train_step(ctx, images, targets)
        batch = int(targets.shape[0])
        loss_sum, correct, seen = loss_sum + loss * batch, correct + hits, seen + batch
    seconds = time.perf_counter() - start
    if seen == 0:
        raise RuntimeError("the training loader yielded no batches")
    return EpochStats(loss_sum / seen, correct / seen, seen, seconds, waited)


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable[Any], runtime: Runtime, *, total: int, desc: str, tta: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode logits (float32, N x C) and targets (N) over a loader; ``tta`` averages with the mirror image."""
    model.eval()
    all_logits: list[np.ndarray] = []
    all_targets: list[np.ndarray] = []
    for images, targets in progress(loader, total=total, desc=desc):
        with runtime.autocast():
            inputs = runtime.to_device(images)
            logits = model(inputs)
            if tta:
                logits = (logits + model(inputs.flip(-1))) / 2
        all_logits.append(logits.float().cpu().numpy())
        all_targets.append(targets.numpy())
    if not all_logits:
        raise RuntimeError("the evaluation loader yielded no batches")
    return np.concatenate(all_logits), np.concatenate(all_targets)
