"""Metrics of sigmoid tasks, in NumPy: multi-label (per label, micro/macro, mAP, subset accuracy) and binary
(ROC AUC, PR AUC, precision/recall at the threshold), and the F1-optimal decision threshold.

    result = multilabel_metrics(truth, probs, decided, labels)
    result = binary_metrics(positive, probs, threshold, labels)
    threshold = best_f1_threshold(probs[:, 0], truth[:, 0])

Zero divisions count as 0.0 (scikit-learn's ``zero_division=0``); average precision is scikit-learn's
``average_precision_score`` (no interpolation), ROC AUC its ``roc_auc_score`` (ties count half).
Every result has ``accuracy`` and ``macro`` {precision, recall, f1}, as multiclass metrics do.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.metrics import _cell, _safe_divide

_AVERAGED = ("precision", "recall", "f1")
THRESHOLD_BOUNDS = (0.02, 0.98)  # a tuned threshold stays inside these


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum over the ranked scores (0.0 with no positives)."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="stable")
    scores, positive = np.asarray(scores)[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last index of each distinct score
    tp = np.cumsum(positive)[last]
    precision = tp / (last + 1)
    recall = tp / positive.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive scores above a negative), ties half (Mann-Whitney); NaN without both kinds."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    values = np.asarray(scores, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average ranks, 1-based
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def best_f1_threshold(probs: np.ndarray, positive: np.ndarray, default: float = 0.5) -> float:
    """The threshold with the best F1 on these images: midway between neighbouring probabilities, so a
    slightly different image is decided the same way; ``default`` when there are no positives."""
    positive = np.asarray(positive, dtype=bool)
    values = np.unique(np.asarray(probs, dtype=np.float64))
    if not positive.any() or len(values) < 1:
        return default
    candidates = np.r_[(values[:-1] + values[1:]) / 2.0, values[0] / 2.0] if len(values) > 1 else values
    candidates = np.clip(candidates, *THRESHOLD_BOUNDS)
    given = np.asarray(probs)[None, :] >= candidates[:, None]
    tp = (given & positive).sum(axis=1)
    f1 = 2 * tp / (given.sum(axis=1) + positive.sum())
    best = np.flatnonzero(f1 == f1.max())
    # ties: the candidate closest to the default, so an easy label keeps a middling threshold
    return float(candidates[best[np.argmin(np.abs(candidates[best] - default))]])


def _counts(truth: np.ndarray, decided: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "tp": (truth & decided).sum(axis=0),
        "fp": (~truth & decided).sum(axis=0),
        "fn": (truth & ~decided).sum(axis=0),
        "tn": (~truth & ~decided).sum(axis=0),
    }


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    return {
        "precision": _safe_divide(tp, tp + fp),
        "recall": _safe_divide(tp, tp + fn),
        "f1": _safe_divide(2 * tp, 2 * tp + fp + fn),
    }


def multilabel_metrics(
    truth: np.ndarray, probs: np.ndarray, decided: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Metrics of a multi-label classifier: ``truth``, ``decided`` (N, L) booleans, ``probs`` (N, L)."""
    truth, decided = np.asarray(truth, dtype=bool), np.asarray(decided, dtype=bool)
    if truth.shape != decided.shape or truth.shape != np.shape(probs) or truth.shape[1] != len(labels):
        raise ValueError(f"truth {truth.shape}, probabilities {np.shape(probs)} and {len(labels)} labels disagree")
    counts = _counts(truth, decided)
    per_label = _prf(counts["tp"], counts["fp"], counts["fn"])
    micro = _prf(counts["tp"].sum(), counts["fp"].sum(), counts["fn"].sum())
    support = truth.sum(axis=0)
    ap = np.array([average_precision(probs[:, i], truth[:, i]) for i in range(len(labels))])
    weights = support / support.sum() if support.sum() else np.zeros(len(labels))
    n = len(truth)
    return {
        "task": "multilabel",
        "num_samples": n,
        "accuracy": float((truth == decided).all(axis=1).mean()) if n else 0.0,  # subset accuracy
        "label_accuracy": float((truth == decided).mean()) if n else 0.0,  # 1 - Hamming loss
        "mAP": float(ap[support > 0].mean()) if (support > 0).any() else 0.0,
        "per_class": {
            str(label): {name: float(per_label[name][i]) for name in _AVERAGED}
            | {"ap": float(ap[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "macro": {name: float(per_label[name].mean()) for name in _AVERAGED},
        "micro": {name: float(micro[name]) for name in _AVERAGED},
        "weighted": {name: float((per_label[name] * weights).sum()) for name in _AVERAGED},
        "label_confusion": {
            str(label): {key: int(values[i]) for key, values in counts.items()} for i, label in enumerate(labels)
        },
        "labels": [str(label) for label in labels],
    }


def binary_metrics(positive: np.ndarray, probs: np.ndarray, threshold: float, labels: Sequence[str]) -> dict[str, Any]:
    """Metrics of a binary classifier: ``positive`` (N,) truth, ``probs`` (N,) of the positive label, the
    decision ``threshold``, ``labels`` = (negative, positive). Per class and the 2x2 confusion matrix as a
    multiclass result has them, so reports and figures read the same."""
    positive = np.asarray(positive, dtype=bool)
    given = np.asarray(probs) >= threshold
    confusion = np.array(
        [[int((~positive & ~given).sum()), int((~positive & given).sum())],
         [int((positive & ~given).sum()), int((positive & given).sum())]]
    )  # fmt: skip
    tp, fp, fn = confusion[1, 1], confusion[0, 1], confusion[1, 0]
    at_threshold = _prf(np.array([tp]), np.array([fp]), np.array([fn]))
    both = _prf(
        np.diag(confusion), confusion.sum(axis=0) - np.diag(confusion), confusion.sum(axis=1) - np.diag(confusion)
    )
    support = confusion.sum(axis=1)
    weights = support / support.sum() if support.sum() else np.zeros(2)
    n = len(positive)
    return {
        "task": "binary",
        "num_samples": n,
        "accuracy": float((given == positive).mean()) if n else 0.0,
        "threshold": float(threshold),
        "roc_auc": roc_auc(probs, positive),
        "pr_auc": average_precision(probs, positive),
        "positive": {name: float(at_threshold[name][0]) for name in _AVERAGED} | {"label": str(labels[1])},
        "per_class": {
            str(label): {name: float(both[name][i]) for name in _AVERAGED} | {"support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "macro": {name: float(both[name].mean()) for name in _AVERAGED},
        "weighted": {name: float((both[name] * weights).sum()) for name in _AVERAGED},
        "confusion_matrix": confusion.tolist(),
        "labels": [str(label) for label in labels],
    }


def format_multilabel_report(result: dict[str, Any], *, title: str) -> str:
    """Markdown: headline numbers, then per label P/R/F1/AP/support, threshold and counts."""
    macro, micro = result["macro"], result["micro"]
    lines = [
        f"# {title}",
        "",
        f"- Samples: {result['num_samples']}",
        f"- Subset accuracy (every label right): {result['accuracy']:.4f}",
        f"- Label accuracy (1 - Hamming loss): {result['label_accuracy']:.4f}",
        f"- mAP: {result['mAP']:.4f}",
        f"- Macro precision / recall / F1: {macro['precision']:.4f} / {macro['recall']:.4f} / {macro['f1']:.4f}",
        f"- Micro precision / recall / F1: {micro['precision']:.4f} / {micro['recall']:.4f} / {micro['f1']:.4f}",
    ]
    if "loss" in result:
        lines.append(f"- Loss (BCE): {result['loss']:.4f}")
    thresholds = result.get("thresholds") or [None] * len(result["labels"])
    lines += ["", "## Per label", "",
              "| Label | Threshold | Precision | Recall | F1 | AP | Support | TP | FP | FN | TN |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, threshold in zip(result["labels"], thresholds, strict=True):
        row, counts = result["per_class"][label], result["label_confusion"][label]
        cut = f"{threshold:.3g}" if threshold is not None else "–"
        lines.append(
            f"| {_cell(label)} | {cut} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | "
            f"{row['ap']:.4f} | {row['support']} | {counts['tp']} | {counts['fp']} | {counts['fn']} | {counts['tn']} |"
        )
    return "\n".join(lines) + "\n"


def binary_headline(result: dict[str, Any]) -> list[str]:
    """The binary lines added to the multiclass-style report."""
    pos = result["positive"]
    return [
        f"- ROC AUC: {result['roc_auc']:.4f}",
        f"- PR AUC (average precision): {result['pr_auc']:.4f}",
        f"- At threshold {result['threshold']:.3g}, {_cell(pos['label'])}: precision {pos['precision']:.4f}, "
        f"recall {pos['recall']:.4f}, F1 {pos['f1']:.4f}",
    ]


def write_multilabel_evaluation(result: dict[str, Any], out_dir: Path, *, split: str = "test") -> dict[str, Path]:
    """``{split}_metrics.json`` and ``{split}_label_confusion.csv`` (per label TP/FP/FN/TN) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{split}_metrics.json", "csv": out_dir / f"{split}_label_confusion.csv"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "tp", "fp", "fn", "tn", "precision", "recall", "f1", "ap"])
        for label in result["labels"]:
            counts, row = result["label_confusion"][label], result["per_class"][label]
            writer.writerow([label, *(counts[k] for k in ("tp", "fp", "fn", "tn")),
                             *(f"{row[k]:.6f}" for k in ("precision", "recall", "f1", "ap"))])  # fmt: skip
    return paths
