"""``finetune quantize``: calibrate int8 for a package published earlier, and publish it as the next version.

finetune quantize model_store/flowers/1                       # the run's splits, named in the manifest
finetune quantize model_store/flowers/1 --run runs/flowers-20261127-101500 --calibration-images 500

The package's own fp32 ONNX model is the reference: int8 is calibrated on a stratified sample of the
run's training split and judged, with bf16, on its validation and test images exactly as
``finetune --int8 true`` does (:mod:`finetune.quantize`). A package is never changed in place: what
passes is published as a new version holding the same files, the int8 model and a parity set.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from finetune import data, quantize
from finetune.guard import MAX_DROP_POINTS
from finetune.publish import PackageSpec, PublishError, publish_package
from finetune.release import PARITY_FILES, PARITY_IMAGES, write_parity_set
from service.backends import LoadOptions, open_backend
from service.errors import PackageError
from service.manifest import Manifest, load_manifest, verify_files
from service.preprocess import normalize_array
from service.registry import FORMAT_FILES

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune quantize",
        description="Calibrate an int8 model for a published package, judge it (and bf16) against the package's "
        "fp32 model on the run's held-out images, and publish the result as the package's next version.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("package", type=Path, help="a published package folder, e.g. model_store/flowers/1")
    parser.add_argument("--run", type=Path, help="the run folder whose splits to use (default: the manifest's run)")
    parser.add_argument("--calibration-images", type=int, default=300, help="stratified sample of the training split")
    parser.add_argument("--max-accuracy-drop", type=float, default=MAX_DROP_POINTS, help="points, paired test")
    parser.add_argument("--version", type=int, help="version to publish (default: the next free integer)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(args: argparse.Namespace) -> int:
    """Calibrate, judge, publish; returns the process exit code."""
    try:
        published = quantize_package(
            args.package,
            run_dir=args.run,
            calibration_images=args.calibration_images,
            max_accuracy_drop=args.max_accuracy_drop,
            version=args.version,
        )
    except (PackageError, PublishError, data.DataError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if published is None:
        return 1
    print(f"published: {published}")
    return 0


def quantize_package(
    package: Path,
    *,
    run_dir: Path | None = None,
    calibration_images: int = 300,
    max_accuracy_drop: float = MAX_DROP_POINTS,
    version: int | None = None,
) -> Path | None:
    """Publish ``package`` again with int8 if int8 passes its guard; None (and the figures logged) if not."""
    manifest = load_manifest(package)
    verify_files(package, manifest)
    if "onnx" not in manifest.formats:
        raise PackageError(f"{package}: int8 is calibrated from model.onnx; the package has {sorted(manifest.formats)}")
    splits = data.load_splits(_run_dir(manifest, run_dir))
    reference = open_backend("onnxruntime", package / manifest.formats["onnx"], LoadOptions()).run
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=package.parent) as tmp:
        staging = Path(tmp)
        for name in manifest.files:
            shutil.copy2(package / name, staging / name)
        if not manifest.parity:
            pixels = quantize.load_pixels(splits.val[:PARITY_IMAGES], manifest.preprocess)
            write_parity_set(
                staging, pixels, reference(np.stack([normalize_array(p, manifest.preprocess) for p in pixels]))
            )
        held_out = tuple({s.path: s for s in (*splits.val, *splits.test)}.values())
        evidence = quantize.evaluate(
            staging,
            reference,
            held_out,
            manifest.preprocess,
            task=manifest.head,
            int8=quantize.Int8Options(splits.train, calibration_images),
            max_accuracy_drop=max_accuracy_drop,
        )
        for line in evidence.lines():
            logger.info("precision %s", line)
        if not evidence.formats:
            logger.error("int8 did not pass the accuracy guard; nothing published (%s)", package)
            return None
        return _publish(package, manifest, staging, evidence, version)


def _run_dir(manifest: Manifest, run_dir: Path | None) -> Path:
    chosen = run_dir or (Path(manifest.extra["run"]) if manifest.extra.get("run") else None)
    if chosen is None or not (chosen / data.SPLITS_DIR).is_dir():
        raise data.DataError(
            f"no run folder with splits for {manifest.name} v{manifest.version} ({chosen or 'none named'}): "
            "pass --run RUN_DIR, the folder finetune wrote when it made the package"
        )
    return chosen


def _publish(
    package: Path, manifest: Manifest, staging: Path, evidence: quantize.Evidence, version: int | None
) -> Path:
    model_files = {FORMAT_FILES[fmt] for fmt in manifest.formats}
    extra_files = tuple(n for n in manifest.files if n not in model_files and n not in PARITY_FILES.values())
    spec = PackageSpec(
        name=manifest.name,
        backbone=manifest.backbone,
        labels=manifest.labels,
        preprocess=manifest.preprocess,
        metrics=manifest.metrics | {"precisions": evidence.metrics},
        extra=manifest.extra | {"quantized_from": f"{manifest.name}/{manifest.version}"},
        parity=dict(manifest.parity or PARITY_FILES),
    )
    formats = (*(f for f in manifest.formats if f not in evidence.formats), *evidence.formats)
    store = package.resolve().parents[1]
    return publish_package(
        spec, export_dir=staging, store=store, formats=formats, version=version, extra_files=extra_files
    )
