"""A run's parts in their order (finetune.setup), and a whole Trainer run on a tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import WeightedRandomSampler

from finetune.config import TrainConfig
from finetune.distributed import DistContext
from finetune.engine import run_training
from finetune.loop import Runtime
from finetune.setup import RUN_INFO, make_parts
from service.manifest import load_manifest
from tests.conftest import make_image_folder

TINY = {"backbone": "mobilenet_v3_small", "weights": "none", "img_size": 32, "workers": 0, "batch_size": 8}


def _config(data: Path, tmp_path: Path, **changes: object) -> TrainConfig:
    settings = {**TINY, "output_dir": tmp_path / "runs", "model_store": tmp_path / "store", **changes}
    return TrainConfig(data=data, tensorboard=False, **settings)  # type: ignore[arg-type]


def test_parts_follow_from_the_data_multiclass_with_a_balancing_sampler(image_folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cpu = Runtime(torch.device("cpu"))
    parts = make_parts(_config(image_folder, tmp_path, balance="sampler"), run_dir, cpu, DistContext(), resuming=False)
    assert parts.task.name == "multiclass" and parts.splits.classes == ("blue", "green", "red")
    assert isinstance(parts.criterion, nn.CrossEntropyLoss) and parts.loaders.balance == "sampler"
    loader = parts.loaders.train(0)
    assert isinstance(loader.sampler, WeightedRandomSampler)
    images, targets = next(iter(loader))
    assert images.shape[1:] == (3, 32, 32) and targets.dtype == torch.int64
    assert parts.model(images).shape == (len(images), 3)
    assert (run_dir / "splits" / "task.txt").read_text().strip() == "multiclass"
    assert json.loads((run_dir / RUN_INFO).read_text())["labels"] == ["blue", "green", "red"]


def test_parts_of_a_multilabel_label_file(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imgs", {"a": 8, "b": 8, "c": 8})
    rows = [
        f"{p.relative_to(data)},{p.parent.name};{'b' if i % 2 else 'c'}"
        for i, p in enumerate(sorted(data.rglob("*.png")))
    ]
    (data / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = _config(data, tmp_path, labels=Path("labels.csv"))
    parts = make_parts(config, run_dir, Runtime(torch.device("cpu")), DistContext(), resuming=False)
    assert parts.task.name == "multilabel" and isinstance(parts.criterion, nn.BCEWithLogitsLoss)
    images, targets = next(iter(parts.loaders.eval(parts.splits.val)))
    assert targets.dtype == torch.float32 and targets.shape == (len(images), 3) and (targets.sum(dim=1) >= 1).all()
    with pytest.raises(ValueError, match="--mix mixup mixes one-label targets"):
        make_parts(config.replace(mix="mixup"), run_dir, Runtime(torch.device("cpu")), DistContext(), resuming=True)


def test_a_tiny_run_trains_tests_and_publishes_a_binary_model(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imgs", {"no": 10, "yes": 10})
    config = _config(
        data, tmp_path, task="binary", epochs=2, export_formats=("onnx",), torchserve="none", error_analysis=2
    )
    result = run_training(config)
    assert result.package_dir is not None and 0.0 <= result.test_metrics["roc_auc"] <= 1.0
    manifest = load_manifest(result.package_dir)
    assert manifest.task == "binary" and manifest.labels == ("no", "yes") and manifest.outputs[0].shape == (-1, 1)
    assert "ROC AUC" in result.summary() and (result.run_dir / "report.md").is_file()
    assert (result.run_dir / "report.html").is_file()  # finetune.report_html, binary metrics included
