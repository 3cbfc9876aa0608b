"""A run that stops before its first checkpoint leaves nothing behind: its folder, ``runs/`` and the model
store are removed when this run made them (and they hold nothing else)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from finetune.config import TrainConfig
from finetune.runfolder import RunFolder


def test_discard_removes_the_run_folder_runs_and_a_store_it_made(tmp_path: Path) -> None:
    config = TrainConfig(data=tmp_path / "data", model_store=tmp_path / "model_store")
    folder = RunFolder(tmp_path / "runs" / "r1")
    folder.open(config)
    assert (folder.path / "config.yaml").is_file() and config.model_store.is_dir()
    folder.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_discard_keeps_a_store_and_runs_that_existed(tmp_path: Path) -> None:
    store, runs = tmp_path / "model_store", tmp_path / "runs"
    store.mkdir()
    (runs / "earlier").mkdir(parents=True)
    folder = RunFolder(runs / "r2")
    folder.open(TrainConfig(data=tmp_path / "data", model_store=store))
    folder.discard()
    assert store.is_dir() and sorted(p.name for p in runs.iterdir()) == ["earlier"]


def test_a_typo_on_the_command_line_leaves_no_folder(tmp_path: Path) -> None:
    finetune = Path(sys.executable).with_name("finetune")
    done = subprocess.run(
        [str(finetune), "--data", str(tmp_path / "nope")], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode != 0 and "no such folder" in done.stderr
    assert list(tmp_path.iterdir()) == []
