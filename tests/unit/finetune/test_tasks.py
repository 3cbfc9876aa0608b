"""The training side of the task seam: loss, targets, hits, metrics and tuned thresholds per task."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from finetune.data import Sample
from finetune.tasks import MAX_POS_WEIGHT, training_task, truth_matrix


def _multilabel_samples() -> list[Sample]:
    # label 0 on every image, label 1 on 2 of 40, label 2 on 10 of 40
    return [
        Sample(Path(f"{i}.png"), -1, (0,) + ((1,) if i < 2 else ()) + ((2,) if i % 4 == 0 else ())) for i in range(40)
    ]


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known tasks: multiclass, multilabel, binary"):
        training_task("detection", ["a", "b"])


def test_multiclass_keeps_cross_entropy_with_class_weights() -> None:
    task = training_task("multiclass", ["a", "b"])
    samples = [Sample(Path(f"{i}"), int(i < 3)) for i in range(12)]
    criterion = task.criterion(samples, balance="auto", label_smoothing=0.1)
    assert isinstance(criterion, nn.CrossEntropyLoss) and criterion.label_smoothing == 0.1
    assert task.balance == "weights" and criterion.weight is not None
    assert task.target(samples[0]) == 1 and task.chance_loss == pytest.approx(math.log(2))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert task.hits(logits, torch.tensor([0, 0])) == 1
    assert task.truth(np.array([1, 0])).tolist() == [[False, True], [True, False]]


def test_multilabel_targets_pos_weight_and_plain_loss() -> None:
    task = training_task("multilabel", ["always", "rare", "some"])
    samples = _multilabel_samples()
    assert task.target(samples[0]).tolist() == [1.0, 1.0, 1.0] and task.target(samples[5]).tolist() == [1.0, 0.0, 0.0]
    criterion = task.criterion(samples, balance="auto", label_smoothing=0.1)
    assert isinstance(criterion, nn.BCEWithLogitsLoss) and task.balance == "weights"
    assert criterion.pos_weight.tolist() == pytest.approx([1.0, MAX_POS_WEIGHT, 3.0])  # negatives/positives, capped
    logits, targets = np.zeros((4, 3), np.float32), np.ones((4, 3), np.float32)
    assert task.loss(logits, targets) == pytest.approx(math.log(2)) == task.chance_loss
    assert task.losses(logits, targets).shape == (4,)
    assert task.hits(torch.tensor([[1.0, 1.0, -1.0]]), torch.tensor([[1.0, 1.0, 0.0]])) == 1
    assert truth_matrix(samples[:2], 3).tolist() == [[True, True, True], [True, True, False]]


def test_multilabel_thresholds_are_tuned_per_label_and_used_by_the_metrics() -> None:
    task = training_task("multilabel", ["a", "b"])
    # label a is present when its logit is above 1.0 (probability ~0.73), label b above -1.0 (~0.27)
    logits = np.array([[2.0, -2.0], [1.5, 0.0], [0.5, -0.5], [0.0, -1.5], [3.0, 1.0]], np.float32)
    targets = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 1]], np.float32)
    assert task.metrics(targets, logits)["macro"]["f1"] < 1.0  # at 0.5 each, label b misses two
    said = task.tune(logits, targets)
    assert said.startswith("per-label thresholds for F1 on validation: a ")
    a, b = task.head.thresholds
    assert 0.62 < a < 0.82 and 0.18 < b < 0.38
    result = task.metrics(targets, logits)
    assert result["macro"]["f1"] == 1.0 and result["accuracy"] == 1.0 and result["thresholds"] == [a, b]
    assert "| a | " in task.report(result, title="x")


def test_binary_is_one_logit_with_roc_auc_and_a_tuned_threshold() -> None:
    task = training_task("binary", ["no", "yes"])
    assert task.width == 1
    samples = [Sample(Path(f"{i}"), int(i < 4)) for i in range(20)]
    criterion = task.criterion(samples, balance="auto", label_smoothing=0.0)
    assert criterion.pos_weight.tolist() == pytest.approx([4.0])
    assert task.target(samples[0]).tolist() == [1.0]
    logits = np.array([[3.0], [0.2], [-0.4], [-2.0], [-3.0]], np.float32)
    targets = np.array([[1], [1], [1], [0], [0]], np.float32)
    assert task.tune(logits, targets).startswith("threshold for F1 of 'yes' on validation:")
    result = task.metrics(targets, logits)
    assert result["roc_auc"] == 1.0 and result["accuracy"] == 1.0 and result["threshold"] < 0.4
    report = task.report(result, title="binary")
    assert "- ROC AUC: 1.0000" in report and report.index("Accuracy") < report.index("ROC AUC")
    assert task.truth(targets).tolist()[3] == [True, False]
