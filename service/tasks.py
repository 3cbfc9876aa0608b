"""Tasks: what a model's logits mean, and how they become answers. The one place that knows.

A package's manifest names its ``task``; :func:`for_manifest` gives the task object that every
consumer asks: the server's data plane (probabilities, the classification extension, TorchServe
answers), the TorchServe handler, offline ``predict``, the parity check at load and, through
``finetune.tasks``, training and evaluation.

- ``multiclass``: one label per image. Softmax over C logits; the answer is the top-k.
- ``multilabel``: any number of labels per image. A sigmoid per label; the answer is every label at
  or above its own decision threshold (tuned on the validation split, stored in the manifest).
- ``binary``: one logit, the positive label's. ``labels`` are (negative, positive); the answer is
  the positive label when its sigmoid probability is at or above the threshold, else the negative.

    task = for_manifest(manifest)
    probs = task.probabilities(logits)              # (N, task.width)
    task.answers(probs)                             # [{label: probability}, ...] best first

NumPy only: the server with ONNX Runtime never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

DEFAULT_THRESHOLD = 0.5
CONFIDENT = 0.8  # a probability from which an answer counts as confident (and 1 - CONFIDENT for "confidently no")


def sigmoid(values: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings for large negative logits."""
    result: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(values, dtype=np.float64)))
    return result


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


@dataclass(frozen=True)
class Task:
    """A task bound to a model's labels (and, where it decides by threshold, its thresholds)."""

    labels: tuple[str, ...]
    thresholds: tuple[float, ...] = ()

    name: ClassVar[str] = ""
    # drift of a precision's logits is measured after centring each row when a shift changes no answer
    shift_invariant: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("a task needs at least one label")
        expected = self.threshold_count
        if self.thresholds and len(self.thresholds) != expected:
            raise ValueError(
                f"{self.name} with {len(self.labels)} labels needs {expected} thresholds, got {len(self.thresholds)}"
            )
        if any(not 0.0 < t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must lie strictly between 0 and 1, got {list(self.thresholds)}")

    # ---- what the model computes ------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Logits per image."""
        return len(self.labels)

    @property
    def threshold_count(self) -> int:
        return 0

    @property
    def cutoffs(self) -> np.ndarray:
        """Decision thresholds per label (default 0.5 each where the manifest stores none)."""
        count = self.threshold_count
        return np.asarray(self.thresholds or (DEFAULT_THRESHOLD,) * count, dtype=np.float64)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, width) probabilities from (N, width) logits."""
        raise NotImplementedError

    def label_scores(self, values: np.ndarray, *, logits: bool) -> np.ndarray:
        """(N, len(labels)) per-label values of an output tensor (``logits`` or ``probabilities``)."""
        return np.asarray(values)

    # ---- decisions ----------------------------------------------------------------------------------
    def decisions(self, probs: np.ndarray) -> np.ndarray:
        """(N, len(labels)) booleans: the labels each image is given."""
        raise NotImplementedError

    def ranked(self, probs: np.ndarray, k: int, *, at_least_one: bool = False) -> list[list[int]]:
        """Label indices each image is given, best first, at most ``k``; with ``at_least_one`` an image
        given no label gets its most probable one."""
        return _given(self.label_scores(probs, logits=False), self.decisions(probs), k, at_least_one=at_least_one)

    def decided(self, probs: np.ndarray) -> list[dict[str, float]]:
        """``{label: probability}`` of the labels each image is given, best first: its decision, not a
        ranking (the top class; the labels at or above their thresholds, at least one; the decided side)."""
        scores = self.label_scores(probs, logits=False)
        rows = _given(scores, self.decisions(probs), len(self.labels), at_least_one=True)
        return [{self.labels[i]: float(scores[r, i]) for i in row} for r, row in enumerate(rows)]

    def answers(self, probs: np.ndarray, k: int | None = None) -> list[dict[str, float]]:
        """``{label: probability}`` per image, best first (TorchServe's answer, ``predict``'s rows)."""
        scores = self.label_scores(probs, logits=False)
        ranked = self.ranked(probs, k or len(self.labels), at_least_one=True)
        return [{self.labels[i]: float(scores[r, i]) for i in row} for r, row in enumerate(ranked)]

    def answer_columns(self, k: int) -> int:
        """Entries per image in a classification-extension tensor asked for ``k``."""
        return max(1, min(k, len(self.labels)))

    def classification(self, logits: np.ndarray, k: int, *, of_logits: bool) -> list[bytes]:
        """Triton's classification extension over the logits or probabilities output: per image the labels
        it is given as b"value:index:label", best first, padded with b"" to :meth:`answer_columns` (row-major)."""
        probs = self.probabilities(logits)
        shown = self.label_scores(logits if of_logits else probs, logits=of_logits)
        columns = self.answer_columns(k)
        strings: list[bytes] = []
        for r, row in enumerate(self.ranked(probs, columns)):
            strings += [f"{shown[r, i]:f}:{i}:{self.labels[i]}".encode() for i in row]
            strings += [b""] * (columns - len(row))
        return strings

    # ---- checking a precision: per "unit" (an image; for multi-label, an image and one label) -----------
    def per_unit(self, matches: np.ndarray) -> np.ndarray:
        """(N, len(labels)) booleans -> one per unit: an image counts when all its labels match."""
        return np.asarray(np.asarray(matches).all(axis=1))

    def confident(self, logits: np.ndarray) -> np.ndarray:
        """Per unit: is the model's answer confident (probability >= 0.8 either way)?"""
        scores = self.label_scores(self.probabilities(logits), logits=False)
        return np.asarray(((scores >= CONFIDENT) | (scores <= 1 - CONFIDENT)).all(axis=1))

    def confident_flips(self, reference: np.ndarray, candidate: np.ndarray) -> tuple[int, int]:
        """(confident answers that change, confident answers) between fp32 ``reference`` and ``candidate``
        logits: only answers the fp32 model is confident of count."""
        agree = self.per_unit(
            self.decisions(self.probabilities(reference)) == self.decisions(self.probabilities(candidate))
        )
        confident = self.confident(reference)
        return int((~agree & confident).sum()), int(confident.sum())

    def describe(self) -> str:
        if not self.threshold_count:
            return self.name
        return f"{self.name} (thresholds {', '.join(f'{t:.3g}' for t in self.cutoffs)})"


class Multiclass(Task):
    name = "multiclass"
    shift_invariant = True

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)

    def decisions(self, probs: np.ndarray) -> np.ndarray:
        chosen = np.zeros(probs.shape, dtype=bool)
        chosen[np.arange(len(probs)), probs.argmax(axis=1)] = True
        return chosen

    def ranked(self, probs: np.ndarray, k: int, *, at_least_one: bool = False) -> list[list[int]]:
        order = np.argsort(-probs, axis=1, kind="stable")[:, : max(1, k)]
        return [[int(i) for i in row] for row in order]

    def confident(self, logits: np.ndarray) -> np.ndarray:
        result: np.ndarray = self.probabilities(logits).max(axis=1) >= CONFIDENT
        return result


class Multilabel(Task):
    name = "multilabel"

    @property
    def threshold_count(self) -> int:
        return len(self.labels)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(logits)

    def decisions(self, probs: np.ndarray) -> np.ndarray:
        result: np.ndarray = probs >= self.cutoffs[None, :]
        return result

    def per_unit(self, matches: np.ndarray) -> np.ndarray:
        return np.asarray(matches).reshape(-1)

    def confident(self, logits: np.ndarray) -> np.ndarray:
        probs = self.probabilities(logits)
        return ((probs >= CONFIDENT) | (probs <= 1 - CONFIDENT)).reshape(-1)


class Binary(Task):
    name = "binary"

    def __post_init__(self) -> None:
        if len(self.labels) != 2:
            raise ValueError(f"a binary task needs exactly two labels (negative, positive), got {list(self.labels)}")
        super().__post_init__()

    @property
    def width(self) -> int:
        return 1

    @property
    def threshold_count(self) -> int:
        return 1

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(logits)

    def label_scores(self, values: np.ndarray, *, logits: bool) -> np.ndarray:
        """(negative, positive) per image: (-z, z) for a logit, (1 - p, p) for a probability."""
        positive = np.asarray(values, dtype=np.float64).reshape(-1, 1)
        return np.concatenate([-positive if logits else 1.0 - positive, positive], axis=1)

    def decisions(self, probs: np.ndarray) -> np.ndarray:
        positive = np.asarray(probs).reshape(-1) >= self.cutoffs[0]
        return np.stack([~positive, positive], axis=1)

    def answer_columns(self, k: int) -> int:
        return 1


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Multiclass, Multilabel, Binary)}


def _given(scores: np.ndarray, chosen: np.ndarray, k: int, *, at_least_one: bool) -> list[list[int]]:
    """Per row the indices ``chosen`` marks, by descending score, at most ``k``; with ``at_least_one`` a
    row with none gets its best."""
    order = np.argsort(-scores, axis=1, kind="stable")
    rows = []
    for r in range(len(scores)):
        picked = [int(i) for i in order[r] if chosen[r, i]][:k]
        if not picked and at_least_one:
            picked = [int(order[r, 0])]
        rows.append(picked)
    return rows


def make_task(name: str, labels: Sequence[str], thresholds: Sequence[float] = ()) -> Task:
    """The task called ``name``; ValueError naming the known ones for any other name."""
    cls = TASKS.get(name)
    if cls is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return cls(tuple(labels), tuple(float(t) for t in thresholds))
