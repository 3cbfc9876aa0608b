from __future__ import annotations

import numpy as np
import pytest

from finetune.guard import judge, mcnemar_one_sided
from service.tasks import make_task

TASK = make_task("multiclass", ("a", "b"))


def _truth(labels: list[int]) -> np.ndarray:
    return np.eye(2, dtype=bool)[labels]


def _logits(predicted: list[int], *, margin: float = 4.0) -> np.ndarray:
    """Two-class logits predicting ``predicted`` with softmax top-1 ~0.98 at the default margin."""
    out = np.zeros((len(predicted), 2), dtype=np.float32)
    out[np.arange(len(predicted)), predicted] = margin
    return out


def test_mcnemar_one_sided() -> None:
    assert mcnemar_one_sided(0, 0) == 1.0
    assert mcnemar_one_sided(1, 0) == 0.5  # one flip is no evidence of anything
    assert mcnemar_one_sided(6, 0) == pytest.approx(1 / 64)
    assert mcnemar_one_sided(0, 6) == 1.0


def test_identical_answers_pass() -> None:
    labels = [0, 1] * 50
    verdict = judge(_logits(labels), _logits(labels), _truth(labels), task=TASK)
    assert verdict["verdict"] == "pass" and verdict["agreement"] == 1.0 and verdict["accuracy_change_points"] == 0


def test_one_flip_on_a_small_split_is_inconclusive_not_failed() -> None:
    labels = [0, 1] * 16 + [0]  # 33 images: one image is 3 points
    candidate = list(labels)
    candidate[0] = 1 - candidate[0]
    fp32 = _logits(labels, margin=0.5)  # not confident: only the paired test judges the flip
    verdict = judge(fp32, _logits(candidate, margin=0.5), _truth(labels), task=TASK)
    assert verdict["verdict"] == "inconclusive", verdict["summary"]
    assert (verdict["right_to_wrong"], verdict["wrong_to_right"]) == (1, 0)
    assert "too small to judge" in verdict["summary"]


def test_a_significant_loss_fails() -> None:
    labels = [0, 1] * 100
    candidate = list(labels)
    for i in range(0, 20, 2):
        candidate[i] = 1  # ten right answers become wrong, none the other way
    verdict = judge(_logits(labels, margin=0.5), _logits(candidate, margin=0.5), _truth(labels), task=TASK)
    assert verdict["verdict"] == "fail" and verdict["accuracy_change_points"] == -5.0
    assert verdict["recall_change"] == pytest.approx({"a": -0.1, "b": 0.0})


def test_gains_and_losses_that_cancel_pass_but_confident_flips_fail() -> None:
    labels = [0, 1] * 100
    wrong_fp32 = list(labels)
    wrong_fp32[0], wrong_fp32[1] = 1, 0
    candidate = list(labels)  # fixes both of fp32's mistakes ...
    candidate[2], candidate[3] = 1, 0  # ... and makes two of its own
    unsure = judge(_logits(wrong_fp32, margin=0.5), _logits(candidate, margin=0.5), _truth(labels), task=TASK)
    assert unsure["verdict"] == "pass" and unsure["accuracy_change_points"] == 0.0
    confident = judge(_logits(wrong_fp32), _logits(candidate), _truth(labels), task=TASK)
    assert confident["verdict"] == "fail" and confident["confident_agreement"] == pytest.approx(0.98)
    assert "confident agreement below 99%" in confident["summary"]


def test_multilabel_answers_are_judged_per_image_label() -> None:
    task = make_task("multilabel", ("x", "y", "z"), (0.5, 0.5, 0.5))
    truth = np.tile(np.array([[True, False, True]]), (50, 1))
    fp32 = np.where(truth, 3.0, -3.0).astype(np.float32)  # every answer right and confident
    candidate = fp32.copy()
    candidate[0, 1] = 1.0  # one image now also gets y: one confident answer of 150 changes
    verdict = judge(fp32, candidate, truth, task=task)
    assert verdict["answers"] == 150 and verdict["images"] == 50
    assert (verdict["right_to_wrong"], verdict["wrong_to_right"]) == (1, 0)
    assert verdict["confident_agreement"] == pytest.approx(149 / 150)
    assert verdict["verdict"] == "inconclusive"  # loses 0.67 points of 150 answers: one flip proves nothing
    assert verdict["recall_change"] == {"x": 0.0, "z": 0.0}  # no image has y
