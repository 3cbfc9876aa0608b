"""``finetune`` as a user runs it, timed: one short epoch, images/s and data wait from ``history.json``.

data = make_subset(DEMO_DATA, tmp / "data", per_class=20)     # real JPEGs, ~100 images
run = run_finetune(data, backbone="resnet18", probe=False, work=tmp, name="resnet18")
run.images_per_second, run.data_wait_fraction, run.package_dir
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.servers import REPO, child_env

logger = logging.getLogger(__name__)
DEMO_DATA = REPO / "finetune" / "demo_data"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class TrainRun:
    """One finetune run: its first epoch's speed and how much of it waited for data."""

    backbone: str
    mode: str  # "full" | "linear probe"
    img_size: int
    train_images: int  # images the epoch trained on
    batch_size: int
    workers: int
    images_per_second: float
    data_wait_fraction: float
    wall_seconds: float  # the whole command: setup, epoch, evaluation, export, checks, publish
    device: str
    run_dir: str
    package_dir: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_subset(source: Path, target: Path, *, per_class: int, copies: int = 1) -> Path:
    """Copy the first ``per_class`` images of each class folder of ``source`` (sorted) into ``target``.

    ``copies`` > 1 writes each image that many times (``<stem>-<k><suffix>``): a bigger epoch of
    the same real JPEGs, for hardware where ~100 images are over before the timing means much.
    """
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:per_class]
        (target / folder.name).mkdir(parents=True, exist_ok=True)
        for file in files:
            for k in range(copies):
                name = file.name if k == 0 else f"{file.stem}-{k}{file.suffix}"
                shutil.copy2(file, target / folder.name / name)
    return target


def run_finetune(
    data: Path,
    *,
    backbone: str,
    probe: bool,
    work: Path,
    name: str,
    img_size: int = 224,
    batch_size: int = 16,
    workers: int = 2,
    formats: str = "torchscript",
    device: str = "cpu",
    extra: tuple[str, ...] = (),
    timeout_s: float = 1800.0,
) -> TrainRun:
    """``finetune --backbone B --weights none --epochs 1 ...`` into ``work``; raises with its log on failure."""
    run_name = f"{name}-{'probe' if probe else 'full'}"
    cmd = [
        sys.executable, "-m", "finetune.cli", "--data", str(data), "--backbone", backbone, "--weights", "none",
        "--epochs", "1", "--freeze-epochs", "1" if probe else "0", "--img-size", str(img_size),
        "--batch-size", str(batch_size), "--workers", str(workers), "--device", device,
        "--tensorboard", "false", "--export-formats", formats, "--name", name, "--run-name", run_name,
        "--output-dir", str(work / "runs"), "--model-store", str(work / "store"), *extra,
    ]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"finetune-{run_name}.log"
    start = time.perf_counter()
    with log.open("wb") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO, timeout=timeout_s)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"finetune failed ({done.returncode}); log {log}:\n{log.read_text()[-4000:]}")
    run_dir = work / "runs" / run_name
    (epoch,) = json.loads((run_dir / "history.json").read_text())
    published = run_dir / "published.txt"
    package = published.read_text().strip() if published.is_file() else None
    images = _trained_images(run_dir, batch_size)
    return TrainRun(
        backbone=backbone,
        mode="linear probe" if probe else "full",
        img_size=img_size,
        train_images=images,
        batch_size=batch_size,
        workers=workers,
        images_per_second=float(epoch["images_per_second"]),
        data_wait_fraction=float(epoch["data_wait_fraction"]),
        wall_seconds=wall,
        device=device,
        run_dir=str(run_dir),
        package_dir=package,
    )


def _trained_images(run_dir: Path, batch_size: int) -> int:
    """Images in one training epoch: the train split, less the incomplete last batch (drop_last)."""
    train = [line for line in (run_dir / "splits" / "train.txt").read_text().splitlines() if line.strip()]
    return len(train) // batch_size * batch_size if len(train) > batch_size else len(train)
