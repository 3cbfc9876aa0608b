from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from finetune.cli import run
from finetune.lr_find import exponential_lrs, smooth, suggest
from tests.conftest import make_image_folder


def test_exponential_lrs_span_the_range() -> None:
    lrs = exponential_lrs(1e-5, 1.0, 6)
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in itertools.pairwise(lrs)]
    assert ratios == pytest.approx([10.0] * 5)
    with pytest.raises(ValueError, match="start-lr"):
        exponential_lrs(1.0, 0.1, 10)


def test_suggestion_is_the_steepest_descent_before_the_minimum() -> None:
    lrs = exponential_lrs(1e-4, 1.0, 41)
    # a loss that is flat, falls fastest around 1e-2, bottoms out near 1e-1, then explodes
    losses = [2.0 - math.tanh(3 * (math.log10(lr) + 2)) + (10 * lr) ** 4 for lr in lrs]
    assert smooth(losses, beta=0.0) == pytest.approx(losses)
    assert suggest(lrs, losses) == pytest.approx(1e-2, rel=0.6)


def test_range_test_on_a_small_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "imgs", {"a": 8, "b": 8, "c": 8})
    monkeypatch.chdir(tmp_path)
    args = ["lr-find", "--data", str(data), "--backbone", "resnet18", "--weights", "none", "--img-size", "32",
            "--batch-size", "8", "--workers", "0", "--steps", "30", "--start-lr", "1e-5", "--end-lr", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_code:
        run(args)
    assert exit_code.value.code == 0
    (out,) = (tmp_path / "runs").glob("lr-find-imgs-*")
    result = json.loads((out / "lr_find.json").read_text())
    assert 1e-5 <= result["suggestion"] <= 1.0
    assert len(result["losses"]) == len(result["lrs"]) <= 30
    assert (out / "lr_find.png").stat().st_size > 1000


def test_sweep_tabulates_every_grid_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "imgs", {"a": 8, "b": 8, "c": 8})
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--lrs", "1e-3,1e-2", "--batch-sizes", "8", "--data", str(data), "--backbone", "resnet18",
            "--weights", "none", "--img-size", "32", "--epochs", "1", "--workers", "0", "--tensorboard", "false",
            "--export-formats", "onnx", "--torchserve", "none"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_code:
        run(args)
    assert exit_code.value.code == 0
    (out,) = (tmp_path / "runs").glob("sweep-imgs-*")
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["lr", "batch_size", "best_val_accuracy"] and len(rows) == 3
    assert {p.name for p in (tmp_path / "model_store").iterdir()} == {"imgs-lr0.001-bs8", "imgs-lr0.01-bs8"}
