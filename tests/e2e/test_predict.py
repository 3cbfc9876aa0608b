"""The real ``predict`` console script on a package made by ``finetune``: the run's own test answers, image by
image; a corrupt file listed with its reason; SIGKILL mid-run, then ``--resume``: one row per image."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, Package

pytestmark = pytest.mark.e2e
FP32 = ("--precision", "fp32", "--device", "cpu")  # finetune's test answers are the eager fp32 model's


def _tsv(package: Package) -> list[dict[str, str]]:
    with (package.run_dir / "test_predictions.tsv").open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _predict(package: Package, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "predict"), "--package", str(package.store / package.name / "1"), *FP32, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_answers_agree_with_the_runs_test_predictions(demo_package: Package, tmp_path: Path) -> None:
    expected = {Path(row["path"]).resolve(): row for row in _tsv(demo_package)}
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    listing = tmp_path / "test.csv"
    with listing.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "note"])
        writer.writerows([str(path), "test split"] for path in expected)
        writer.writerow(["corrupt.jpg", "relative to the list's folder"])
    out = tmp_path / "predictions.csv"
    done = _predict(demo_package, str(listing), "--out", str(out), "--top-k", "1")
    assert done.returncode == 0, done.stderr
    rows = _csv(out)
    assert [row["path"] for row in rows] == [*map(str, expected), "corrupt.jpg"]
    assert rows[-1]["labels"] == "" and rows[-1]["error"].startswith("corrupt.jpg: ")
    assert "corrupt or truncated" in rows[-1]["error"] or "not a recognised image" in rows[-1]["error"]
    for row in rows[:-1]:
        want = expected[Path(row["path"])]
        assert row["error"] == "" and row["labels"] == want["predicted"], row
        assert abs(float(row["scores"]) - float(want["probability"])) <= 1e-4, row


def test_sigkill_then_resume_gives_one_row_per_image(demo_package: Package, tmp_path: Path) -> None:
    sources = sorted({Path(row["path"]).resolve() for row in _tsv(demo_package)})
    folder = tmp_path / "many"
    folder.mkdir()
    for copy in range(max(2, 400 // len(sources))):  # hard links: many images, no copying
        for i, source in enumerate(sources):
            os.link(source, folder / f"{copy:03d}-{i:03d}{source.suffix}")
    total = len(list(folder.iterdir()))
    out = tmp_path / "predictions.jsonl"
    argv = [str(folder), "--out", str(out), "--batch-size", "2", "--workers", "1", "--intra-op-threads", "1"]
    cmd = [str(BIN / "predict"), "--package", str(demo_package.store / demo_package.name / "1"), *FP32, *argv]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if out.is_file() and out.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.02)
        assert process.poll() is None, "predict finished (or failed) before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    before = out.read_bytes().count(b"\n")
    assert 20 <= before < total
    done = _predict(demo_package, *argv, "--resume")
    assert done.returncode == 0, done.stderr
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert len(paths) == total and sorted(paths) == sorted(str(p) for p in folder.iterdir())
    assert "already in the output" in done.stderr
