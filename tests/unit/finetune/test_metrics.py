from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.metrics import compute_metrics, confusion_figure, format_report, write_evaluation

LABELS = ["cat", "dog", "bird"]
# targets 0 0 0 1 1 2, predictions 0 0 1 1 1 0: "bird" is never predicted (a zero division).
TARGETS = np.array([0, 0, 0, 1, 1, 2])
LOGITS = np.array(
    [
        [3.0, 2.0, 1.0],
        [3.0, 1.0, 2.0],
        [2.0, 3.0, 1.0],
        [1.0, 3.0, 2.0],
        [2.0, 3.0, 1.0],
        [3.0, 2.0, 1.0],
    ]
)


@pytest.fixture(scope="module")
def result() -> dict:
    return compute_metrics(TARGETS, LOGITS, LABELS, topk=(1, 2, 5))


def test_hand_computed_confusion_and_accuracy(result: dict) -> None:
    assert result["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert result["num_samples"] == 6
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["labels"] == LABELS


def test_hand_computed_per_class(result: dict) -> None:
    cat, dog, bird = (result["per_class"][name] for name in LABELS)
    assert cat == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert dog == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert bird == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_hand_computed_averages(result: dict) -> None:
    assert result["macro"] == pytest.approx({"precision": 4 / 9, "recall": 5 / 9, "f1": (2 / 3 + 0.8) / 3})
    # weights 3/6, 2/6, 1/6
    assert result["weighted"] == pytest.approx({"precision": 5 / 9, "recall": 2 / 3, "f1": (2 + 1.6) / 6})


def test_topk_only_up_to_num_classes(result: dict) -> None:
    assert result["top1_accuracy"] == result["accuracy"]
    assert result["top2_accuracy"] == pytest.approx(5 / 6)  # the last sample ranks "bird" third
    assert "top5_accuracy" not in result
    assert compute_metrics(TARGETS, LOGITS, LABELS, topk=(3,))["top3_accuracy"] == 1.0


def test_ties_rank_like_argmax() -> None:
    targets = np.array([0, 1, 2, 1])
    logits = np.zeros((4, 3))
    out = compute_metrics(targets, logits, LABELS, topk=(1, 2))
    assert out["accuracy"] == out["top1_accuracy"] == 0.25
    assert out["top2_accuracy"] == 0.75


def test_zero_division_is_zero() -> None:
    out = compute_metrics(np.array([0, 0]), np.array([[1.0, 0.0], [2.0, 0.0]]), ["a", "b"])
    assert out["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert out["per_class"]["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert out["macro"]["f1"] == 0.5
    assert out["weighted"]["f1"] == 1.0


def test_empty_input_and_json_serialisable(result: dict) -> None:
    empty = compute_metrics(np.zeros(0, dtype=np.int64), np.zeros((0, 3)), LABELS)
    assert empty["num_samples"] == 0 and empty["accuracy"] == 0.0 and empty["macro"]["f1"] == 0.0
    for metrics in (result, empty):
        assert json.loads(json.dumps(metrics)) == metrics


@pytest.mark.parametrize(
    ("targets", "logits", "match"),
    [
        (np.array([0, 1]), np.zeros((3, 3)), "shape"),
        (np.array([0, 1]), np.zeros((2, 4)), "labels"),
        (np.array([0, 3]), np.zeros((2, 3)), "class indices"),
        (np.array([0.0, 1.0]), np.zeros((2, 3)), "class indices"),
    ],
)
def test_bad_inputs(targets: np.ndarray, logits: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(targets, logits, LABELS)


def test_write_evaluation(result: dict, tmp_path: Path) -> None:
    paths = write_evaluation(result, tmp_path / "run", split="val")
    assert paths == {
        "json": tmp_path / "run" / "val_metrics.json",
        "csv": tmp_path / "run" / "val_confusion_matrix.csv",
        "png": tmp_path / "run" / "val_confusion_matrix.png",
    }
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == result
    rows = list(csv.reader(paths["csv"].read_text(encoding="utf-8").splitlines()))
    assert rows[0] == ["true\\predicted", *LABELS]
    assert rows[1:] == [["cat", "2", "1", "0"], ["dog", "0", "2", "0"], ["bird", "1", "0", "0"]]
    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and min(image.size) > 200


def test_confusion_figure_many_classes_renders() -> None:
    n = 50
    rng = np.random.default_rng(0)
    confusion = (rng.random((n, n)) < 0.05).astype(np.int64) + np.eye(n, dtype=np.int64) * 40
    confusion[7] = 0  # a class without samples must not divide by zero
    fig = confusion_figure(confusion.tolist(), [f"class_{i}" for i in range(n)], title="many")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        assert image.size[0] > 400


def test_confusion_figure_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        confusion_figure([[1, 0], [0, 1]], LABELS)


def test_format_report(result: dict) -> None:
    metrics = compute_metrics(TARGETS, LOGITS, ["cat", "dog|wolf", "bird"], topk=(1, 2)) | {"loss": 0.5}
    text = format_report(metrics, title="pets: test set")
    assert text.startswith("# pets: test set\n")
    for needle in ("cat", "dog\\|wolf", "bird", "Accuracy: 0.6667", "Top-2 accuracy: 0.8333", "Loss: 0.5000"):
        assert needle in text
    assert "| cat | 2 | 1 | 0 |" in text
    assert "Macro precision / recall / F1: 0.4444 / 0.5556 / 0.4889" in text
