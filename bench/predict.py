"""``python -m bench.predict``: offline ``predict`` against the raw engine it runs, on the same images, in one run.

python -m bench.predict                                       # the demo package, made by finetune --demo if absent
python -m bench.predict --package model_store/flowers/2 --images 320 --rounds 3

Per round (each ``predict`` run is bracketed by raw windows, whose mean is that round's raw figure):
- ``predict``: the real console script (a subprocess) over a list of ``--images`` demo JPEGs, at
  ``--backend onnxruntime --precision fp32``; its figure is its own summary line, images/s of the
  whole pipeline (read, decode, preprocess, model, answers, CSV rows), start-up and model loading left out;
- raw: one ``onnxruntime.InferenceSession`` on the package's ``model.onnx`` with the same intra-op
  threads, fed the same images read and preprocessed (``service.preprocess.preprocess_bytes``) by a
  pool of the same number of threads, a batch at a time, at the same batch size; no rows written.

Prints, and writes as the section ``## Offline prediction`` of BENCHMARKS.md (the rest of the file is kept),
medians over the rounds, the median and range of the same-round ratios predict / raw (goal >= 0.85), the CPU,
its flags and the date.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import machine, precision_report, training
from bench.servers import REPO
from service.manifest import Preprocess, load_manifest
from service.precision import CPU_FLAGS, host_features
from service.preprocess import preprocess_bytes

logger = logging.getLogger("bench.predict")
GOAL = 0.85
HEADING = "## Offline prediction (python -m bench.predict)"
BIN = Path(sys.executable).parent
_RATE = re.compile(r"(\d+) images in [\d.]+ s \(([\d.]+) img/s\)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.predict",
        description=__doc__.split("\n\n")[0] if __doc__ else "",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    work = Path(tempfile.gettempdir()) / "predict-bench"
    parser.add_argument("--package", type=Path, help="package folder (default: finetune --demo's, made in --work-dir)")
    parser.add_argument("--work-dir", type=Path, default=work, help="the demo package and the image list (reused)")
    parser.add_argument("--images", type=int, default=320, help="images per run: the demo photos, cycled")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of predict then raw (medians over them)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4, help="decode threads, both sides (predict's default)")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime threads, both sides")
    parser.add_argument("--output-md", type=Path, default=REPO / "BENCHMARKS.md", help="its section is replaced")
    parser.add_argument("--output-json", type=Path, help="also write every figure here")
    return parser


def demo_package(work: Path) -> Path:
    """The package ``finetune --demo`` makes (1 epoch, ONNX only) in ``work``, made now if absent."""
    store = work / "store"
    existing = sorted(store.glob("*/*/manifest.json"))
    if existing:
        return existing[-1].parent
    cmd = [
        sys.executable, "-m", "finetune.cli", "--demo", "--epochs", "1", "--freeze-epochs", "1",
        "--tensorboard", "false", "--export-formats", "onnx", "--torchserve", "none",
        "--model-store", str(store), "--output-dir", str(work / "runs"), "--run-name", "predict-bench",
    ]  # fmt: skip
    logger.info("making the demo package: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
    return sorted(store.glob("*/*/manifest.json"))[-1].parent


def image_list(work: Path, count: int) -> tuple[Path, list[Path]]:
    """A CSV listing ``count`` demo JPEGs (cycled), and the paths it lists."""
    photos = sorted(training.DEMO_DATA.rglob("*.jpg"))
    paths = [photos[i % len(photos)] for i in range(count)]
    listing = work / f"images-{count}.csv"
    with listing.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path"])
        writer.writerows([str(p)] for p in paths)
    return listing, paths


def run_predict(package: Path, listing: Path, out: Path, args: argparse.Namespace) -> float:
    """Images/s of one ``predict`` run, from its summary line."""
    cmd = [
        str(BIN / "predict"), str(listing), "--package", str(package), "--out", str(out), "--overwrite",
        "--backend", "onnxruntime", "--precision", "fp32", "--device", "cpu", "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--intra-op-threads", str(args.intra_op_threads),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = _RATE.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"predict failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return float(found.group(2))


class RawEngine:
    """An ONNX Runtime session on ``model.onnx`` fed images decoded by a thread pool, one batch after another."""

    def __init__(self, package: Path, *, threads: int, workers: int) -> None:
        import onnxruntime as ort

        manifest = load_manifest(package)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        model = package / manifest.formats["onnx"]
        self.session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.spec: Preprocess = manifest.preprocess
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def _decode(self, path: Path) -> np.ndarray:
        return preprocess_bytes(path.read_bytes(), self.spec)

    def images_per_second(self, paths: Sequence[Path], batch_size: int) -> float:
        self.run(paths[:batch_size], batch_size)  # warm-up
        start = time.perf_counter()
        self.run(paths, batch_size)
        return len(paths) / (time.perf_counter() - start)

    def run(self, paths: Sequence[Path], batch_size: int) -> None:
        for i in range(0, len(paths), batch_size):
            batch = np.stack(list(self.pool.map(self._decode, paths[i : i + batch_size])))
            self.session.run(None, {self.input: batch})


def measure(args: argparse.Namespace) -> dict[str, Any]:
    args.work_dir.mkdir(parents=True, exist_ok=True)
    package = args.package or demo_package(args.work_dir)
    listing, paths = image_list(args.work_dir, args.images)
    raw = RawEngine(package, threads=args.intra_op_threads, workers=args.workers)
    rounds = []
    before = raw.images_per_second(paths, args.batch_size)
    for number in range(args.rounds):
        served = run_predict(package, listing, args.work_dir / "predictions.csv", args)
        after = raw.images_per_second(paths, args.batch_size)
        ceiling = (before + after) / 2  # the raw windows either side: this machine's speed drifts
        rounds.append({"predict": served, "raw": ceiling, "ratio": served / ceiling})
        before = after
        logger.info(
            "round %d: predict %.1f img/s, raw %.1f img/s, %.2fx", number + 1, served, ceiling, served / ceiling
        )
    manifest = load_manifest(package)
    host = host_features()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "package": f"{package} ({manifest.backbone}, {manifest.preprocess.crop} px)",
        "images": args.images,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "intra_op_threads": args.intra_op_threads,
        "cpu": host.model,
        "flags": {flag: flag in host.flags for flag in CPU_FLAGS},
        "machine": machine.machine(),
        "rounds": rounds,
        "predict": statistics.median(r["predict"] for r in rounds),
        "raw": statistics.median(r["raw"] for r in rounds),
        "ratio": statistics.median(r["ratio"] for r in rounds),
    }


def render(results: dict[str, Any]) -> str:
    flags = ", ".join(f"{flag} {'yes' if there else 'no'}" for flag, there in results["flags"].items())
    verdict = "met" if results["ratio"] >= GOAL else "not met"
    ratios = [r["ratio"] for r in results["rounds"]]
    return "\n".join(
        [
            HEADING,
            "",
            f"Command: `{results['command']}`.",
            f"Package {results['package']}; {results['images']} demo JPEGs per run; batch {results['batch_size']}, "
            f"{results['workers']} decode threads, intra-op threads {results['intra_op_threads'] or 'default'}.",
            f"CPU: {results['cpu']}, {results['machine']['usable_cpus']} usable CPUs; flags: {flags}. "
            f"Date: {results['date']}. Medians of {len(results['rounds'])} rounds; "
            f"load average at the end {results['machine']['load_average'][0]:.2f}. Other work shared the CPUs: "
            "absolute figures are noisy, the same-round ratios are the result.",
            "",
            "| | img/s (decode included) |",
            "|---|---|",
            f"| `predict` (ONNX Runtime fp32) | {results['predict']:.1f} |",
            f"| raw ONNX Runtime session, same images, batch and threads | {results['raw']:.1f} |",
            f"| predict / raw, median of same-round ratios (goal >= {GOAL}) | {results['ratio']:.2f}x ({verdict}; "
            f"rounds {min(ratios):.2f}-{max(ratios):.2f}x) |",
        ]
    )


def main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.images < args.batch_size or args.rounds < 1:
        print("python -m bench.predict: --images must be >= --batch-size and --rounds >= 1", file=sys.stderr)
        return 2
    results = measure(args)
    results["command"] = shlex.join(["python", "-m", "bench.predict", *argv])
    if args.output_json is not None:
        args.output_json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    section = render(results)
    existing = args.output_md.read_text(encoding="utf-8") if args.output_md.is_file() else ""
    args.output_md.write_text(precision_report.replace_section(existing, section, heading=HEADING), encoding="utf-8")
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args(), sys.argv[1:]))
