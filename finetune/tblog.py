"""TensorBoard event files in the run folder: scalars, histograms, graph, images, confusion matrix."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.manifest import Preprocess

logger = logging.getLogger(__name__)


class TensorBoardLog:
    """Thin wrapper over ``SummaryWriter``; ``enabled=False`` writes nothing."""

    def __init__(self, log_dir: Path, *, enabled: bool = True, purge_step: int | None = None) -> None:
        self._writer: Any = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def histograms(self, model: nn.Module, step: int) -> None:
        """Weights, and gradients where the last step left them, of the trainable parameters."""
        if self._writer is None:
            return
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            self._writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), step)
            if param.grad is not None:
                self._writer.add_histogram(f"gradients/{name}", param.grad.detach().float().cpu(), step)

    def graph(self, model: nn.Module, example: torch.Tensor) -> None:
        if self._writer is None:
            return
        was_training = model.training
        try:
            model.eval()
            with warnings.catch_warnings():  # add_graph traces with torch.jit, deprecated but working
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                self._writer.add_graph(model, example)
        except Exception as exc:  # some architectures do not trace; the graph is a nicety
            logger.warning("TensorBoard graph skipped: %s", exc)
        finally:
            model.train(was_training)

    def images(self, tag: str, batch: torch.Tensor, spec: Preprocess, step: int) -> None:
        """A grid of (augmented, normalized) input images, de-normalized for viewing."""
        if self._writer is None:
            return
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        shown = (batch[:16].float().cpu() * std + mean).clamp(0, 1)
        self._writer.add_images(tag, shown, step)

    def figure(self, tag: str, figure: Any, step: int) -> None:
        if self._writer is None:
            return
        self._writer.add_figure(tag, figure, step, close=False)

    def text(self, tag: str, text: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def history_row(epoch: int, stats: Any, val: dict[str, Any], *, lr: float) -> dict[str, float]:
    """One epoch of ``history.json``: training stats (an ``EpochStats``), validation metrics, the head's LR."""
    return {
        "epoch": epoch + 1,
        "train_loss": stats.loss,
        "train_accuracy": stats.accuracy,
        "val_loss": float(val["loss"]),
        "val_accuracy": float(val["accuracy"]),
        "val_macro_f1": float(val["macro"]["f1"]),
        "lr": lr,
        "images_per_second": stats.images_per_second,
        "data_wait_fraction": stats.data_wait_fraction,
    }


def log_epoch(
    tb: TensorBoardLog, model: nn.Module, labels: Any, row: dict[str, float], val: dict[str, Any], *, epochs: int
) -> None:
    """An epoch's scalars, histograms and confusion matrix to TensorBoard, and its line to the log."""
    from finetune.metrics import confusion_figure

    step = int(row["epoch"])
    tb.scalars(
        {
            "loss/train": row["train_loss"], "loss/val": row["val_loss"],
            "accuracy/train": row["train_accuracy"], "accuracy/val": row["val_accuracy"],
            "f1/val_macro": row["val_macro_f1"], "lr": row["lr"],
            "speed/images_per_second": row["images_per_second"],
            "speed/data_wait_fraction": row["data_wait_fraction"],
        },
        step,
    )  # fmt: skip
    tb.histograms(model, step)
    if "confusion_matrix" in val:  # single-label tasks; a multi-label model has a table per label instead
        tb.figure("val/confusion_matrix", confusion_figure(val["confusion_matrix"], labels), step)
    logger.info(
        "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f F1 %.4f  lr %.2e  %.1f img/s  "
        "data wait %.0f%%",
        step, epochs, row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"],
        row["val_macro_f1"], row["lr"], row["images_per_second"], 100 * row["data_wait_fraction"],
    )  # fmt: skip
