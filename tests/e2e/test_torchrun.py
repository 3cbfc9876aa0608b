"""``finetune`` under torchrun: 2 processes, DDP over gloo on CPU, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.manifest import load_manifest, verify_files
from tests.conftest import make_image_folder

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ARGS = [
    "--backbone", "resnet18", "--weights", "none", "--img-size", "48", "--batch-size", "8", "--workers", "0",
    "--epochs", "2", "--tensorboard", "false", "--export-formats", "onnx", "--torchserve", "none",
]  # fmt: skip


def _finetune(prefix: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*prefix, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imgs", {"cat": 12, "dog": 12, "owl": 12})
    single = [sys.executable, "-m", "finetune.cli"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "finetune.cli",
    ]
    _finetune(single, "--data", str(data), *ARGS, "--run-name", "one", "--model-store", "store1", cwd=tmp_path)
    _finetune(torchrun, "--data", str(data), *ARGS, "--run-name", "ddp", "--model-store", "store2", cwd=tmp_path)

    packages = list((tmp_path / "store2" / "imgs").iterdir())
    assert [p.name for p in packages] == ["1"], "exactly one package from the 2-process run"
    ddp, one = load_manifest(packages[0]), load_manifest(tmp_path / "store1" / "imgs" / "1")
    verify_files(packages[0], ddp)
    assert ddp.labels == one.labels == ("cat", "dog", "owl")
    runs = tmp_path / "runs"
    assert (runs / "ddp" / "splits" / "test.txt").read_text() == (runs / "one" / "splits" / "test.txt").read_text()
    history = json.loads((runs / "ddp" / "history.json").read_text())
    assert len(history) == 2
    assert sorted(p.name for p in (runs / "ddp" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
