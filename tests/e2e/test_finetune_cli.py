"""The ``finetune`` command end to end, as a user runs it: a real subprocess on a real folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from service.manifest import load_manifest, verify_files
from tests.conftest import make_image_folder

pytestmark = pytest.mark.e2e
BASE_ARGS = [
    "--backbone", "resnet18", "--weights", "none", "--img-size", "48", "--batch-size", "8",
    "--workers", "0", "--val-split", "0.25", "--test-split", "0.25", "--tensorboard", "false",
]  # fmt: skip


def finetune(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "finetune"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_ok(*args: str, cwd: Path) -> str:
    proc = finetune(*args, cwd=cwd)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def test_full_run_on_generated_images(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "shapes", {"red": 12, "green": 12, "blue": 12})
    (data / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    output = run_ok(
        "--data", str(data), "--epochs", "2", "--tensorboard", "true", "--output-dir", "runs",
        "--run-name", "r1", "--model-store", "store", *BASE_ARGS[:-2], cwd=tmp_path,
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "r1"
    assert "broken.jpg" in output and "broken.jpg" in (run_dir / "report.md").read_text()
    for name in ("config.yaml", "splits/train.txt", "checkpoints/best.pt", "checkpoints/last.pt", "metrics.json",
                 "report.md", "test_metrics.json", "test_confusion_matrix.csv", "test_confusion_matrix.png",
                 "export/model.pt", "export/model.onnx", "train.log", "test_predictions.tsv"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    package = tmp_path / "store" / "shapes" / "1"
    manifest = load_manifest(package)
    verify_files(package, manifest)
    assert manifest.labels == ("blue", "green", "red")
    assert manifest.preprocess.crop == 48 and manifest.backbone == "resnet18"
    assert set(manifest.metrics["export_parity"]) == {"torchscript", "onnx"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == 9 and len(metrics["history"]) == 2
    assert f"published: {package}" in output or "published: store/shapes/1" in output


def test_user_errors_are_one_clear_line(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imgs", {"a": 10, "b": 1})
    proc = finetune("--data", str(data), *BASE_ARGS, cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "'b'" in err or " b " in err or "b:" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists(), "a run that never started left its folder behind"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "nonexistent"], "nonexistent"),
        (["--backbone", "nope"], "nope"),
    ],
)
def test_a_run_that_never_starts_leaves_nothing_behind(tmp_path: Path, args: list[str], message: str) -> None:
    data = make_image_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    (tmp_path / "runs").mkdir()  # the user's runs/ folder, with an earlier run in it, stays
    (tmp_path / "runs" / "earlier").mkdir()
    proc = finetune("--data", str(data), *BASE_ARGS, *args, cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and message in err and "Traceback" not in err, err
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["earlier"]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def test_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imgs", {"a": 12, "b": 12, "c": 12})
    common = ["--data", str(data), "--epochs", "4", "--model-store", "store", "--patience", "10", "--ema", "true",
              *BASE_ARGS]  # fmt: skip
    run_ok(*common, "--run-name", "straight", "--output-dir", "runs", cwd=tmp_path)

    proc = finetune(*common, "--run-name", "killed", "--output-dir", "runs", cwd=tmp_path)
    last = tmp_path / "runs" / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "runs" / "killed" / "published.txt").exists()

    run_ok("--resume", str(tmp_path / "runs" / "killed"), cwd=tmp_path)
    straight, resumed = _final_weights(tmp_path / "runs" / "straight"), _final_weights(tmp_path / "runs" / "killed")
    for key, tensor in straight.items():
        assert torch.allclose(tensor.float(), resumed[key].float(), atol=1e-6), key
    hist = [json.loads((tmp_path / "runs" / r / "history.json").read_text()) for r in ("straight", "killed")]
    assert [row["val_loss"] for row in hist[0]] == pytest.approx([row["val_loss"] for row in hist[1]], abs=1e-6)
    assert (tmp_path / "store" / "imgs" / "2" / "manifest.json").is_file()
