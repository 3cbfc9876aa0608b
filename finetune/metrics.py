"""Classification metrics from logits, in NumPy: accuracy, top-k, per-class P/R/F1, confusion matrix.

    result = compute_metrics(targets, logits, labels, topk=(1, 5))
    write_evaluation(result, run_dir, split="test")   # test_metrics.json, _confusion_matrix.csv/.png
    print(format_report(result, title="flowers: test set"))

Zero divisions count as 0.0, as scikit-learn's ``zero_division=0``. The figure uses Matplotlib's
object API (no pyplot global state), so it is safe in worker threads and headless runs.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_AVERAGED = ("precision", "recall", "f1")


def compute_metrics(
    targets: np.ndarray, logits: np.ndarray, labels: Sequence[str], *, topk: Sequence[int] = (1, 5)
) -> dict[str, Any]:
    """Metrics of a multiclass classifier as a JSON-serialisable dict.

    ``targets`` holds N class indices, ``logits`` is (N, C) scores (logits or probabilities),
    ``labels`` names the C classes. Keys: ``num_samples``, ``accuracy``, ``top{k}_accuracy`` for
    each k <= C, ``per_class`` {label: precision/recall/f1/support}, ``macro`` and ``weighted``
    averages, ``confusion_matrix`` (rows = true, columns = predicted) and ``labels``.
    """
    targets, logits = _check_inputs(targets, logits, labels)
    num_classes = logits.shape[1]
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (targets, predicted), 1)
    per_class = _per_class(confusion)
    support = confusion.sum(axis=1)
    result: dict[str, Any] = {
        "num_samples": len(targets),
        "accuracy": _ratio(int(np.trace(confusion)), len(targets)),
    }
    for k in sorted(set(topk)):
        if 1 <= k <= num_classes:
            result[f"top{k}_accuracy"] = _topk_accuracy(targets, logits, k)
    result["per_class"] = {
        str(label): {name: float(per_class[name][i]) for name in _AVERAGED} | {"support": int(support[i])}
        for i, label in enumerate(labels)
    }
    weights = support / support.sum() if support.sum() else np.zeros(num_classes)
    result["macro"] = {name: float(per_class[name].mean()) for name in _AVERAGED}
    result["weighted"] = {name: float((per_class[name] * weights).sum()) for name in _AVERAGED}
    result["confusion_matrix"] = confusion.tolist()
    result["labels"] = [str(label) for label in labels]
    return result


def _check_inputs(targets: np.ndarray, logits: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    targets = np.asarray(targets).reshape(-1)
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"need logits of shape (N, C) for N={targets.shape[0]} targets, got {logits.shape}")
    if not labels or logits.shape[1] != len(labels):
        raise ValueError(f"logits have {logits.shape[1]} classes but {len(labels)} labels were given (need >= 1)")
    if targets.size and (
        not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0 or targets.max() >= len(labels)
    ):
        raise ValueError(f"targets must be integer class indices in [0, {len(labels)})")
    return targets.astype(np.int64), logits


def _per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 per class; 0.0 where a denominator is zero."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    return {
        "precision": _safe_divide(tp, predicted),
        "recall": _safe_divide(tp, actual),
        "f1": _safe_divide(2 * tp, predicted + actual),  # = 2PR/(P+R) = 2TP/(2TP+FP+FN)
    }


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _topk_accuracy(targets: np.ndarray, logits: np.ndarray, k: int) -> float:
    """Share of samples whose target is among the k highest scores; ties rank the lower index first,
    as ``argmax`` does, so top-1 equals accuracy."""
    if not len(targets):
        return 0.0
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


def confusion_figure(
    confusion: Sequence[Sequence[int]], labels: Sequence[str], *, title: str = "Confusion matrix"
) -> Figure:
    """A confusion-matrix figure: colour = share of the true class (row-normalised), text = counts.

    Sized for 2 to about 50 classes. Built on the Agg canvas without pyplot; save it with
    ``fig.savefig(path)`` or hand it to TensorBoard's ``add_figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match {n} labels")
    rows = counts.sum(axis=1, keepdims=True)
    shares = _safe_divide(counts.astype(np.float64), np.broadcast_to(rows, counts.shape))
    side = min(max(4.5, 0.32 * n + 2.5), 20.0)  # about 0.3 inch per cell
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of true class")
    _label_axes(ax, labels, title)
    _annotate(ax, counts, shares)
    return fig


def _label_axes(ax: Axes, labels: Sequence[str], title: str) -> None:
    n = len(labels)
    fontsize = 10 if n <= 10 else 8 if n <= 25 else 6
    ticks = np.arange(n)
    ax.set_xticks(ticks, [str(label) for label in labels], fontsize=fontsize, rotation=45 if n <= 10 else 90)
    ax.set_yticks(ticks, [str(label) for label in labels], fontsize=fontsize)
    if n <= 10:
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
            tick.set_rotation_mode("anchor")
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)


def _annotate(ax: Axes, counts: np.ndarray, shares: np.ndarray) -> None:
    """Write each count in its cell; with many classes only non-zero cells, to keep it legible."""
    n = counts.shape[0]
    fontsize = 10 if n <= 10 else 7 if n <= 25 else 5
    for (row, col), count in np.ndenumerate(counts):
        if count == 0 and n > 15:
            continue
        colour = "white" if shares[row, col] > 0.5 else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=fontsize)


def write_evaluation(metrics: dict[str, Any], out_dir: Path, *, split: str = "test") -> dict[str, Path]:
    """Write ``{split}_metrics.json``, ``{split}_confusion_matrix.csv`` and ``.png`` into ``out_dir``.

    Returns the paths under the keys ``json``, ``csv`` and ``png``.
    """
    if not split or Path(split).name != split:
        raise ValueError(f"split must be a plain name, got {split!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / f"{split}_metrics.json",
        "csv": out_dir / f"{split}_confusion_matrix.csv",
        "png": out_dir / f"{split}_confusion_matrix.png",
    }
    paths["json"].write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    labels = [str(label) for label in metrics["labels"]]
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true\\predicted", *labels])
        for label, row in zip(labels, metrics["confusion_matrix"], strict=True):
            writer.writerow([label, *row])
    figure = confusion_figure(metrics["confusion_matrix"], labels, title=f"Confusion matrix ({split})")
    figure.savefig(paths["png"], dpi=120)
    return paths


def format_report(metrics: dict[str, Any], *, title: str) -> str:
    """A short Markdown report: headline numbers, a per-class table and the confusion matrix."""
    lines = [f"# {title}", "", f"- Samples: {metrics['num_samples']}", f"- Accuracy: {metrics['accuracy']:.4f}"]
    topk = sorted((int(key[3:-9]), key) for key in metrics if key.startswith("top") and key.endswith("_accuracy"))
    lines += [f"- Top-{k} accuracy: {metrics[key]:.4f}" for k, key in topk if k > 1]
    if "loss" in metrics:
        lines.append(f"- Loss: {metrics['loss']:.4f}")
    for average in ("macro", "weighted"):
        values = metrics[average]
        lines.append(
            f"- {average.capitalize()} precision / recall / F1: "
            f"{values['precision']:.4f} / {values['recall']:.4f} / {values['f1']:.4f}"
        )
    lines += ["", "## Per class", "", "| Class | Precision | Recall | F1 | Support |", "|---|---:|---:|---:|---:|"]
    for label, row in metrics["per_class"].items():
        lines.append(
            f"| {_cell(label)} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
        )
    lines += ["", "## Confusion matrix (rows = true, columns = predicted)", ""]
    lines += _confusion_table(metrics["confusion_matrix"], metrics["labels"])
    return "\n".join(lines) + "\n"


def _confusion_table(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> list[str]:
    header = "| true \\ predicted | " + " | ".join(_cell(label) for label in labels) + " |"
    rule = "|---|" + "---:|" * len(labels)
    rows = [
        f"| {_cell(label)} | " + " | ".join(str(count) for count in row) + " |"
        for label, row in zip(labels, confusion, strict=True)
    ]
    return [header, rule, *rows]


def _cell(text: str) -> str:
    """Escape a label for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
