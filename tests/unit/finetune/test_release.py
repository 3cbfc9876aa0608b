from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.data import DataSplits, Sample
from finetune.release import write_predictions
from service.tasks import make_task


def test_predictions_name_each_test_image_with_its_true_and_predicted_class(tmp_path: Path) -> None:
    test = (Sample(Path("cats/a.jpg"), 0), Sample(Path("dogs/b.jpg"), 1), Sample(Path("dogs/c.jpg"), 1))
    splits = DataSplits(classes=("cats", "dogs"), train=(), val=(), test=test)
    logits = np.array([[2.0, 0.0], [0.0, 0.0], [1000.0, 0.0]], dtype=np.float32)  # the last would overflow exp
    write_predictions(tmp_path, splits, make_task("multiclass", splits.classes), logits)
    header, *rows = (tmp_path / "test_predictions.tsv").read_text().splitlines()
    assert header.split("\t") == ["path", "true", "predicted", "probability"]
    fields = [row.split("\t") for row in rows]
    assert [f[:3] for f in fields] == [
        ["cats/a.jpg", "cats", "cats"],
        ["dogs/b.jpg", "dogs", "cats"],  # a tie goes to the first class, as argmax does
        ["dogs/c.jpg", "dogs", "cats"],
    ]
    assert [float(f[3]) for f in fields] == [round(1 / (1 + np.exp(-2.0)), 6), 0.5, 1.0]


def test_multilabel_predictions_list_every_label_given_with_its_probability(tmp_path: Path) -> None:
    test = (Sample(Path("a.jpg"), -1, (0, 2)), Sample(Path("b.jpg"), -1, ()))
    splits = DataSplits(classes=("sky", "tree", "car"), train=(), val=(), test=test, task="multilabel")
    task = make_task("multilabel", splits.classes, (0.5, 0.5, 0.2))
    logits = np.array([[2.0, -3.0, -1.0], [-4.0, -2.0, -3.0]], dtype=np.float32)
    write_predictions(tmp_path, splits, task, logits)
    rows = [row.split("\t") for row in (tmp_path / "test_predictions.tsv").read_text().splitlines()[1:]]
    assert rows[0][:3] == ["a.jpg", "sky;car", "sky;car"]  # car: 0.27 is above its threshold of 0.2
    assert rows[1][:3] == ["b.jpg", "", "tree"]  # none given: the most probable one, as servers answer
    assert rows[0][3] == f"{1 / (1 + np.exp(-2.0)):.6f};{1 / (1 + np.exp(1.0)):.6f}"
