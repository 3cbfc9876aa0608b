"""``finetune sweep``: a grid over learning rate and batch size on one split, with a results table.

    finetune sweep --lrs 1e-3,3e-3,1e-2 --batch-sizes 16,32 --backbone resnet18 --data ./imgs

Each grid point is an ordinary run (same seed, so the same split; published as
``<name>-lr<lr>-bs<bs>``); ``runs/sweep-<time>/sweep.{md,csv}`` ranks them by validation accuracy.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune import cli
from finetune.config import TrainConfig

logger = logging.getLogger(__name__)
COLUMNS = ("lr", "batch_size", "best_val_accuracy", "test_accuracy", "test_macro_f1", "train_time_s", "package")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(value) for value in _floats(text))


def get_args_parser() -> argparse.ArgumentParser:
    """``finetune``'s parser (every training flag) plus the grid."""
    parser = cli.get_args_parser()
    parser.prog = "finetune sweep"
    parser.description = "Train one run per (learning rate, batch size) on the same split and tabulate the results."
    group = parser.add_argument_group("sweep")
    group.add_argument("--lrs", type=_floats, required=True, help="comma list of learning rates")
    group.add_argument(
        "--batch-sizes", type=_ints, default=None, help="comma list of batch sizes (default: --batch-size)"
    )
    return parser


def sweep(base: TrainConfig, lrs: Sequence[float], batch_sizes: Sequence[int]) -> Path:
    """Run the grid; returns the folder holding sweep.md and sweep.csv."""
    from finetune.engine import default_name, run_training

    name = default_name(base)
    out_dir = base.output_dir / f"sweep-{name}-{datetime.now():%Y%m%d-%H%M%S}"
    rows: list[dict[str, Any]] = []
    for lr, batch_size in itertools.product(lrs, batch_sizes):
        tag = f"lr{lr:g}-bs{batch_size}"
        config = base.replace(lr=lr, batch_size=batch_size, name=f"{name}-{tag}", output_dir=out_dir, run_name=tag)
        start = time.perf_counter()
        result = run_training(config)
        history = json.loads((result.run_dir / "metrics.json").read_text(encoding="utf-8"))
        rows.append(
            {
                "lr": lr, "batch_size": batch_size,
                "best_val_accuracy": float(history["best_val"].get("val_accuracy", 0.0)),
                "test_accuracy": float(result.test_metrics["accuracy"]),
                "test_macro_f1": float(result.test_metrics["macro"]["f1"]),
                "train_time_s": time.perf_counter() - start, "package": str(result.package_dir),
            }
        )  # fmt: skip
    rows.sort(key=lambda row: row["best_val_accuracy"], reverse=True)
    write_table(rows, out_dir)
    return out_dir


def write_table(rows: Sequence[dict[str, Any]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(key, row[key]) for key in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (out_dir / "sweep.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _cell(key: str, value: Any) -> str:
    if key == "lr":
        return f"{value:g}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(args: argparse.Namespace) -> int:
    from finetune import errors

    lrs, batch_sizes = vars(args).pop("lrs"), vars(args).pop("batch_sizes")
    try:
        base = cli.resolve_config(args)
        out_dir = sweep(base, lrs, batch_sizes or (base.batch_size,))
    except errors.USER_ERRORS as exc:
        logger.error("%s", exc)
        return 2
    print((out_dir / "sweep.md").read_text(encoding="utf-8"))
    print(f"sweep folder: {out_dir}")
    return 0
