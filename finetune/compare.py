"""``finetune compare``: fine-tune several backbones on the same split with the same budget, then tabulate.

finetune compare --backbones resnet18,mobilenet_v3_small --data ./imgs --epochs 5

Every backbone gets the same resolved config (seed, splits, epochs, batch size, ...) apart from
``backbone`` and ``name`` (``<name>-<backbone>``), and is published like any run. The folder
``runs/compare-<timestamp>/`` holds each backbone's run folder, comparison.{md,csv,png} and report.html.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from finetune import cli, report_html
from finetune.config import TrainConfig

logger = logging.getLogger(__name__)
COLUMNS = {
    "backbone": "backbone",
    "parameters": "parameters",
    "gflops": "GFLOPs",
    "train_time_s": "train time (s)",
    "train_images_per_s": "train images/s",
    "best_val_accuracy": "best val accuracy",
    "test_accuracy": "test accuracy",
    "test_macro_f1": "test macro F1",
    "onnx_mb": "ONNX size (MB)",
    "latency_ms": "ONNX latency (ms/image)",
    "package": "package",
}


@dataclass(frozen=True)
class Row:
    """One backbone's line of the comparison (see ``COLUMNS`` for the headers)."""

    backbone: str
    parameters: int
    gflops: float
    train_time_s: float
    train_images_per_s: float
    best_val_accuracy: float
    test_accuracy: float
    test_macro_f1: float
    onnx_mb: float
    latency_ms: float
    package: str


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(names) < 2:
        raise argparse.ArgumentTypeError("--backbones needs at least two comma-separated backbone names")
    return names


def get_args_parser() -> argparse.ArgumentParser:
    """``finetune``'s parser (every training flag) plus ``--backbones`` and ``--latency-runs``."""
    parser = cli.get_args_parser()
    parser.prog = "finetune compare"
    parser.description = (
        "Fine-tune each of several backbones on the same split with the same settings, publish each, and write "
        "a comparison table (Markdown, CSV, PNG) of size, compute, speed and accuracy into runs/compare-<time>/."
    )
    group = parser.add_argument_group("comparison")
    group.add_argument("--backbones", type=_names, required=True, help="comma list, e.g. resnet18,mobilenet_v3_small")
    group.add_argument("--latency-runs", type=int, default=20, help="timed ONNX runs per backbone (median reported)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Train and compare; returns the process exit code."""
    from finetune import errors

    values = vars(args).copy()
    names: tuple[str, ...] = values.pop("backbones")
    latency_runs: int = values.pop("latency_runs", 20)
    try:
        base = cli.resolve_config(argparse.Namespace(**values))
        out_dir = compare(base, names, latency_runs=latency_runs)
    except errors.USER_ERRORS as exc:
        logger.error("%s", exc)
        return 2
    print((out_dir / "comparison.md").read_text(encoding="utf-8"))
    print(f"comparison folder: {out_dir}")
    return 0


def compare(base: TrainConfig, names: Sequence[str], *, latency_runs: int = 20) -> Path:
    """Run ``base`` once per backbone and write the comparison; returns ``runs/compare-<timestamp>/``."""
    from finetune.engine import default_name

    if "onnx" not in base.export_formats:
        raise ValueError("finetune compare measures the exported ONNX model: keep onnx in --export-formats")
    out_dir = base.output_dir / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    prefix = default_name(base)
    rows = [_run_one(base, name, prefix=prefix, out_dir=out_dir, latency_runs=latency_runs) for name in names]
    write_table(rows, out_dir)
    return out_dir


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")


def _run_one(base: TrainConfig, backbone: str, *, prefix: str, out_dir: Path, latency_runs: int) -> Row:
    from finetune.engine import run_training

    config = base.replace(backbone=backbone, name=f"{prefix}-{_safe(backbone)}", output_dir=out_dir)
    config = config.replace(run_name=_safe(backbone))
    logger.info("compare: training %s", backbone)
    start = time.perf_counter()
    result = run_training(config)
    elapsed = time.perf_counter() - start
    if result.package_dir is None:
        raise RuntimeError(f"{backbone}: the run published no package")
    return _measure(config, result.run_dir, result.package_dir, result.test_metrics, elapsed, latency_runs)


def _measure(
    config: TrainConfig, run_dir: Path, package: Path, test: dict[str, Any], elapsed: float, latency_runs: int
) -> Row:
    from service.manifest import load_manifest

    manifest = load_manifest(package)
    stored = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    history = stored.get("history", [])
    parameters, flops = count_compute(config, num_classes=manifest.head.width)
    onnx_path = package / manifest.formats["onnx"]
    return Row(
        backbone=config.backbone,
        parameters=parameters,
        gflops=flops / 1e9,
        train_time_s=elapsed,
        train_images_per_s=float(np.mean([row["images_per_second"] for row in history])) if history else 0.0,
        best_val_accuracy=float(stored.get("best_val", {}).get("val_accuracy", 0.0)),
        test_accuracy=float(test["accuracy"]),
        test_macro_f1=float(test["macro"]["f1"]),
        onnx_mb=onnx_path.stat().st_size / 1e6,
        latency_ms=onnx_latency_ms(onnx_path, manifest.preprocess.input_shape, runs=latency_runs),
        package=str(package),
    )


def count_compute(config: TrainConfig, *, num_classes: int) -> tuple[int, int]:
    """(parameters, FLOPs of one eval-size image); FlopCounterMode counts 2 FLOPs per multiply-add."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from finetune.backbones import create_backbone

    backbone = create_backbone(config.backbone, num_classes=num_classes, weights="none", img_size=config.img_size)
    model = backbone.model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *backbone.preprocess.input_shape))
    return parameters, int(counter.get_total_flops())


def onnx_latency_ms(path: Path, input_shape: tuple[int, int, int], *, runs: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of one batch-1 onnxruntime run of the exported model (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).random((1, *input_shape), dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return float(statistics.median(times))


def _format(key: str, value: Any) -> str:
    if isinstance(value, float):
        if "accuracy" in key or "f1" in key:
            return f"{value:.4f}"
        return f"{value:.3g}" if key == "gflops" else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_table(rows: Sequence[Row], out_dir: Path) -> None:
    """comparison.md (formatted), comparison.csv (raw values), comparison.png and report.html (the plot, the
    table and a link to each run's report) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_format(key, getattr(row, key)) for key in COLUMNS) + " |")
    (out_dir / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (out_dir / "comparison.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows([getattr(row, key) for key in COLUMNS] for row in rows)
    plot(rows, out_dir / "comparison.png")
    cells = [[_format(key, getattr(row, key)) for key in COLUMNS] for row in rows]
    links = [f"{_safe(row.backbone)}/{report_html.REPORT}" for row in rows]  # each run's folder (_run_one)
    report_html.write_comparison(out_dir, list(COLUMNS.values()), cells, links)


def plot(rows: Sequence[Row], path: Path) -> None:
    """Test accuracy against training time, one labelled point per backbone (marker area ~ parameters)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    largest = max(row.parameters for row in rows) or 1
    for row in rows:
        ax.scatter(row.train_time_s, row.test_accuracy, s=40 + 400 * row.parameters / largest, alpha=0.6)
        ax.annotate(row.backbone, (row.train_time_s, row.test_accuracy), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("train time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs training time (marker area ~ parameters)")
    ax.grid(alpha=0.3)
    fig.savefig(path)
