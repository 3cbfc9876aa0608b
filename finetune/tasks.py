"""The training side of the task seam: loss, target encoding, metrics and decision thresholds per task.

``service.tasks`` says what a model's logits mean (probabilities, decisions, answers) and is what a
server ships; this module adds what only training needs, for the same three tasks:

- ``multiclass``: cross-entropy (class weights, label smoothing), integer targets, the metrics of
  ``finetune.metrics``.
- ``multilabel``: BCE with logits (``pos_weight`` for rare labels), multi-hot targets, per-label
  thresholds tuned on validation for F1, the metrics of ``finetune.label_metrics``.
- ``binary``: BCE on one logit (``pos_weight`` when imbalanced), 0/1 targets, one tuned threshold,
  ROC AUC and PR AUC.

    task = training_task(splits.task, splits.classes)
    criterion = task.criterion(splits.train, balance="auto", label_smoothing=0.1)
    dataset = ImageDataset(splits.train, transform, target=task.target)
    result = task.metrics(targets, logits)            # "accuracy", "macro"["f1"], "loss" for every task
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from finetune import label_metrics, metrics
from finetune.data import Sample, class_counts, class_weights, resolve_balance
from finetune.loop import top1_hits
from service.tasks import Task, make_task, sigmoid

logger = logging.getLogger(__name__)
MAX_POS_WEIGHT = 10.0  # rare labels are up-weighted by negatives/positives, at most this much


def truth_matrix(samples: Sequence[Sample], num_labels: int) -> np.ndarray:
    """(N, num_labels) booleans: the labels each sample has, whatever the task."""
    truth = np.zeros((len(samples), num_labels), dtype=bool)
    for row, sample in enumerate(samples):
        truth[row, list(sample.indices)] = True
    return truth


def _pos_weight(counts: Sequence[int], images: int) -> torch.Tensor:
    """negatives / positives per label (``counts``: positives among ``images``), within [1, MAX_POS_WEIGHT]."""
    positives = np.asarray(counts, dtype=np.float64)
    negatives = images - positives
    weight = np.clip(negatives / np.maximum(positives, 1.0), 1.0, MAX_POS_WEIGHT)
    return torch.tensor(weight, dtype=torch.float32)


@dataclass
class TrainingTask:
    """A task as training sees it; ``head`` is the serving-side task (its thresholds once tuned)."""

    head: Task
    balance: str = "none"  # what ``criterion`` resolved the balance mode to
    name: ClassVar[str] = ""
    # the validation metric that picks the best epoch with ``--early-stop-metric auto``: subset accuracy
    # of a multi-label model and accuracy of an imbalanced binary one say too little
    selection_metric: ClassVar[str] = "macro_f1"

    @property
    def labels(self) -> tuple[str, ...]:
        return self.head.labels

    @property
    def width(self) -> int:
        return self.head.width

    def target(self, sample: Sample) -> Any:
        """What the loader yields as a sample's target."""
        return sample.label

    def criterion(self, samples: Sequence[Sample], *, balance: str, label_smoothing: float) -> nn.Module:
        raise NotImplementedError

    def per_image(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The unweighted, unsmoothed loss of each image: the honest one."""
        raise NotImplementedError

    def plain_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.per_image(logits, targets).mean()

    @property
    def chance_loss(self) -> float:
        """``plain_loss`` of a model that knows nothing (uniform answers)."""
        return math.log(2)

    def metric(self, metric: str) -> str:
        """The validation metric ``--early-stop-metric`` names (auto: the task's own)."""
        return self.selection_metric if metric == "auto" else metric

    def score(self, val: dict[str, Any], metric: str) -> float:
        """Higher is better: the validation ``metric`` (``--early-stop-metric``; auto: the task's own)."""
        metric = self.metric(metric)
        if metric == "loss":
            return -float(val["loss"])
        return float(val["macro"]["f1"] if metric == "macro_f1" else val["accuracy"])

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> int:
        """Images answered exactly right (a multi-label image: every label right), at the default thresholds."""
        raise NotImplementedError

    def losses(self, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Per-image loss (the top-losses analysis); its mean is the validation loss."""
        with torch.no_grad():
            result: np.ndarray = self.per_image(torch.from_numpy(np.asarray(logits)), torch.from_numpy(targets)).numpy()
        return result

    def loss(self, logits: np.ndarray, targets: np.ndarray) -> float:
        return float(self.losses(logits, targets).mean())

    def metrics(self, targets: np.ndarray, logits: np.ndarray, *, topk: int = 5) -> dict[str, Any]:
        raise NotImplementedError

    def report(self, result: dict[str, Any], *, title: str) -> str:
        """The Markdown report of an evaluation."""
        return metrics.format_report(result, title=title)

    def write_evaluation(self, result: dict[str, Any], out_dir: Path, *, split: str) -> None:
        """``{split}_metrics.json`` and the confusion files of an evaluation."""
        metrics.write_evaluation(result, out_dir, split=split)

    def tune(self, logits: np.ndarray, targets: np.ndarray) -> str:
        """Tune the decision thresholds on validation logits; returns what was done, for the log (nothing to do
        for a multiclass model)."""
        return ""

    def truth(self, targets: np.ndarray) -> np.ndarray:
        """(N, labels) booleans from the targets a loader yielded."""
        raise NotImplementedError


class MulticlassTask(TrainingTask):
    name = "multiclass"
    selection_metric = "accuracy"

    def criterion(self, samples: Sequence[Sample], *, balance: str, label_smoothing: float) -> nn.Module:
        counts = class_counts(samples, len(self.labels))
        self.balance = resolve_balance(balance, counts)
        weight = class_weights(counts) if self.balance == "weights" else None
        if self.balance != "none":
            logger.info("class balance: %s (train counts %s)", self.balance, counts)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def per_image(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), targets.long(), reduction="none")

    @property
    def chance_loss(self) -> float:
        return math.log(max(2, len(self.labels)))

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> int:
        return top1_hits(logits, targets)

    def metrics(self, targets: np.ndarray, logits: np.ndarray, *, topk: int = 5) -> dict[str, Any]:
        result = metrics.compute_metrics(targets, logits, self.labels, topk=(1, topk))
        result["loss"] = self.loss(logits, targets)
        return result

    def truth(self, targets: np.ndarray) -> np.ndarray:
        return np.eye(len(self.labels), dtype=bool)[np.asarray(targets, dtype=np.int64)]


class _SigmoidTask(TrainingTask):
    """Shared by multilabel and binary: BCE with logits on float targets of the model's width."""

    def criterion(self, samples: Sequence[Sample], *, balance: str, label_smoothing: float) -> nn.Module:
        counts = class_counts(samples, len(self.labels))
        weight = _pos_weight(counts, len(samples))[-self.width :]  # binary: the positive label's
        mode = "weights" if balance == "sampler" else balance
        self.balance = "none" if resolve_balance(mode, counts) == "none" else "weights"
        if balance == "sampler":
            logger.warning("balance sampler is for single-label tasks; %s uses positive weights instead", self.name)
        if label_smoothing:
            logger.info("label smoothing is not applied to the %s task's BCE loss", self.name)
        if self.balance == "none":
            return nn.BCEWithLogitsLoss()
        logger.info("positive weights %s (train positives %s)", [round(float(w), 2) for w in weight], counts)
        return nn.BCEWithLogitsLoss(pos_weight=weight)

    def per_image(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
        return loss.mean(dim=1)

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> int:
        return int(((logits.detach() >= 0) == (targets >= 0.5)).all(dim=1).sum().item())


class MultilabelTask(_SigmoidTask):
    name = "multilabel"

    def target(self, sample: Sample) -> Any:
        encoded = torch.zeros(len(self.labels), dtype=torch.float32)
        encoded[list(sample.indices)] = 1.0
        return encoded

    def metrics(self, targets: np.ndarray, logits: np.ndarray, *, topk: int = 5) -> dict[str, Any]:
        probs = self.head.probabilities(logits)
        result = label_metrics.multilabel_metrics(targets >= 0.5, probs, self.head.decisions(probs), self.labels)
        result["loss"] = self.loss(logits, targets)
        result["thresholds"] = [float(t) for t in self.head.cutoffs]
        return result

    def report(self, result: dict[str, Any], *, title: str) -> str:
        return label_metrics.format_multilabel_report(result, title=title)

    def write_evaluation(self, result: dict[str, Any], out_dir: Path, *, split: str) -> None:
        label_metrics.write_multilabel_evaluation(result, out_dir, split=split)

    def tune(self, logits: np.ndarray, targets: np.ndarray) -> str:
        probs = sigmoid(logits)
        thresholds = [label_metrics.best_f1_threshold(probs[:, i], targets[:, i] >= 0.5) for i in range(self.width)]
        self.head = make_task(self.name, self.labels, thresholds)
        return "per-label thresholds for F1 on validation: " + ", ".join(
            f"{label} {t:.3g}" for label, t in zip(self.labels, thresholds, strict=True)
        )

    def truth(self, targets: np.ndarray) -> np.ndarray:
        result: np.ndarray = np.asarray(targets) >= 0.5
        return result


class BinaryTask(_SigmoidTask):
    name = "binary"

    def target(self, sample: Sample) -> Any:
        return torch.tensor([float(sample.label)], dtype=torch.float32)

    def metrics(self, targets: np.ndarray, logits: np.ndarray, *, topk: int = 5) -> dict[str, Any]:
        probs = self.head.probabilities(logits)
        positive = np.asarray(targets).reshape(-1) >= 0.5
        result = label_metrics.binary_metrics(positive, probs.reshape(-1), float(self.head.cutoffs[0]), self.labels)
        result["loss"] = self.loss(logits, targets)
        return result

    def report(self, result: dict[str, Any], *, title: str) -> str:
        lines = metrics.format_report(result, title=title).split("\n")
        at = next(i for i, line in enumerate(lines) if line.startswith("- Accuracy")) + 1
        return "\n".join(lines[:at] + label_metrics.binary_headline(result) + lines[at:])

    def tune(self, logits: np.ndarray, targets: np.ndarray) -> str:
        threshold = label_metrics.best_f1_threshold(sigmoid(logits).reshape(-1), np.asarray(targets).reshape(-1) >= 0.5)
        self.head = make_task(self.name, self.labels, [threshold])
        return f"threshold for F1 of {self.labels[1]!r} on validation: {threshold:.3g}"

    def truth(self, targets: np.ndarray) -> np.ndarray:
        positive = np.asarray(targets).reshape(-1) >= 0.5
        return np.stack([~positive, positive], axis=1)


TRAINING_TASKS: dict[str, type[TrainingTask]] = {cls.name: cls for cls in (MulticlassTask, MultilabelTask, BinaryTask)}


def training_task(name: str, labels: Sequence[str], thresholds: Sequence[float] = ()) -> TrainingTask:
    """The training side of task ``name`` (ValueError naming the known tasks for any other)."""
    head = make_task(name, labels, thresholds)
    return TRAINING_TASKS[name](head)
