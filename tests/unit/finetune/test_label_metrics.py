"""Metrics of sigmoid tasks, checked against scikit-learn (installed with nncf) on random data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from finetune.label_metrics import (
    average_precision,
    best_f1_threshold,
    binary_metrics,
    format_multilabel_report,
    multilabel_metrics,
    roc_auc,
    write_multilabel_evaluation,
)


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_and_roc_auc_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    positive = rng.random(60) < 0.3
    scores = np.round(rng.random(60) + positive * 0.3, 1)  # rounded: plenty of ties
    assert average_precision(scores, positive) == pytest.approx(skm.average_precision_score(positive, scores))
    assert roc_auc(scores, positive) == pytest.approx(skm.roc_auc_score(positive, scores))


def test_degenerate_curves() -> None:
    assert average_precision(np.array([0.2, 0.9]), np.array([False, False])) == 0.0
    assert np.isnan(roc_auc(np.array([0.2, 0.9]), np.array([True, True])))


def test_multilabel_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(7)
    truth = rng.random((40, 4)) < 0.35
    probs = np.clip(truth * 0.4 + rng.random((40, 4)) * 0.6, 0, 1)
    decided = probs >= 0.5
    result = multilabel_metrics(truth, probs, decided, ["a", "b", "c", "d"])
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(truth, decided))  # subset accuracy
    assert result["label_accuracy"] == pytest.approx(1 - skm.hamming_loss(truth, decided))
    for average in ("macro", "micro", "weighted"):
        assert result[average]["f1"] == pytest.approx(skm.f1_score(truth, decided, average=average, zero_division=0))
        assert result[average]["precision"] == pytest.approx(
            skm.precision_score(truth, decided, average=average, zero_division=0)
        )
    assert result["mAP"] == pytest.approx(skm.average_precision_score(truth, probs, average="macro"))
    assert result["per_class"]["b"]["support"] == int(truth[:, 1].sum())
    counts = result["label_confusion"]["c"]
    assert counts["tp"] + counts["fn"] == truth[:, 2].sum() and sum(counts.values()) == 40


def test_binary_metrics_at_a_threshold() -> None:
    positive = np.array([1, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
    probs = np.array([0.9, 0.6, 0.3, 0.4, 0.1, 0.2, 0.7, 0.8])
    result = binary_metrics(positive, probs, 0.5, ["no", "yes"])
    given = probs >= 0.5
    assert result["confusion_matrix"] == skm.confusion_matrix(positive, given).tolist()
    assert result["positive"]["precision"] == pytest.approx(skm.precision_score(positive, given))
    assert result["positive"]["recall"] == pytest.approx(skm.recall_score(positive, given))
    assert result["roc_auc"] == pytest.approx(skm.roc_auc_score(positive, probs))
    assert result["pr_auc"] == pytest.approx(skm.average_precision_score(positive, probs))
    assert result["macro"]["f1"] == pytest.approx(skm.f1_score(positive, given, average="macro"))


def test_best_f1_threshold_separates_and_falls_back() -> None:
    probs = np.array([0.1, 0.2, 0.35, 0.6, 0.7])
    positive = np.array([False, False, True, True, True])
    threshold = best_f1_threshold(probs, positive)
    assert 0.2 < threshold <= 0.35 and threshold == pytest.approx(0.275)  # midway: the next image decides the same
    assert best_f1_threshold(probs, np.zeros(5, dtype=bool)) == 0.5  # no positives: nothing to tune
    assert best_f1_threshold(np.array([0.99, 0.995]), np.array([True, True])) <= 0.98  # kept inside the bounds


def test_multilabel_report_and_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    truth = np.array([[True, False], [True, True], [False, False]])
    probs = np.array([[0.9, 0.2], [0.8, 0.4], [0.3, 0.1]])
    result = multilabel_metrics(truth, probs, probs >= 0.5, ["sky", "tree|bush"]) | {"thresholds": [0.5, 0.5]}
    text = format_multilabel_report(result, title="t")
    assert "Subset accuracy (every label right): 0.6667" in text and "| tree\\|bush | 0.5 |" in text
    paths = write_multilabel_evaluation(result, tmp_path, split="test")
    assert paths["csv"].read_text().splitlines()[2].startswith("tree|bush,0,0,1,2,")
