"""Publish checked exports as a versioned package ``model_store/<name>/<version>/``.

The folder is written under a temporary name inside the model's folder and renamed into
place, so a server scanning the store never sees half a package.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.manifest import MANIFEST_FILE, Manifest, Preprocess, TensorSpec, next_version, sha256_file
from service.manifest import validate_name as _validate_name
from service.registry import FORMAT_FILES
from service.tasks import make_task

logger = logging.getLogger(__name__)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class PublishError(RuntimeError):
    """The package could not be published (version taken, unwritable store, missing export)."""


@dataclass(frozen=True)
class PackageSpec:
    """What a package is made of, apart from its model files; ``parity`` names the parity set's files."""

    name: str
    backbone: str
    labels: tuple[str, ...]
    preprocess: Preprocess
    metrics: dict[str, Any]
    extra: dict[str, Any]
    parity: dict[str, str] = field(default_factory=dict)
    task: str = "multiclass"  # service.tasks
    thresholds: tuple[float, ...] = ()


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PublishError(f"model store {folder} is not writable: {exc.strerror or exc}") from exc


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced the exports."""
    import onnx
    import onnxruntime
    import torch
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def build_manifest(
    spec: PackageSpec, *, version: int, export_dir: Path, formats: tuple[str, ...], extra_files: tuple[str, ...] = ()
) -> Manifest:
    """The manifest of a package whose model files (and ``extra_files``) are in ``export_dir``."""
    names = [FORMAT_FILES[fmt] for fmt in formats] + list(extra_files)
    files = {name: sha256_file(export_dir / name) for name in names}
    channels, height, width = spec.preprocess.input_shape
    width_out = make_task(spec.task, spec.labels, spec.thresholds).width
    return Manifest(
        name=spec.name,
        version=version,
        backbone=spec.backbone,
        labels=spec.labels,
        preprocess=spec.preprocess,
        inputs=(TensorSpec(INPUT_NAME, "FP32", (-1, channels, height, width)),),
        outputs=(TensorSpec(OUTPUT_NAME, "FP32", (-1, width_out)),),
        files=files,
        formats={fmt: FORMAT_FILES[fmt] for fmt in formats},
        metrics=spec.metrics,
        versions=library_versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        extra=spec.extra,
        parity=dict(spec.parity),
        task=spec.task,
        thresholds=tuple(spec.thresholds),
    )


def publish_package(
    spec: PackageSpec,
    *,
    export_dir: Path,
    store: Path,
    formats: tuple[str, ...],
    version: int | None = None,
    extra_files: tuple[str, ...] = (),
) -> Path:
    """Copy the exports and a manifest into ``store/<name>/<version>/`` atomically; returns that folder.

    ``extra_files`` (e.g. the Grad-CAM ``cam.pt``) and the parity set's files are copied too and listed
    in the manifest with their sha256.
    """
    _validate(spec.name)
    extra_files = (*extra_files, *(name for name in spec.parity.values() if name not in extra_files))
    wanted = [FORMAT_FILES[f] for f in formats] + list(extra_files)
    missing = [name for name in wanted if not (export_dir / name).is_file()]
    if missing:
        raise PublishError(f"cannot publish {spec.name}: missing exported files {missing} in {export_dir}")
    model_dir = store / spec.name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PublishError(f"cannot create {model_dir}: {exc.strerror or exc}") from exc
    chosen = version if version is not None else next_version(store, spec.name)
    staging = model_dir / f".staging-{chosen}-{os.getpid()}"
    try:
        _write_staging(spec, export_dir=export_dir, staging=staging, version=chosen, files=(formats, extra_files))
        return _rename_into_place(staging, model_dir, chosen, explicit=version is not None)
    except OSError as exc:
        raise PublishError(f"cannot publish {spec.name} into {model_dir}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _validate(name: str) -> None:
    try:
        _validate_name(name)
    except ValueError as exc:
        raise PublishError(str(exc)) from exc


def _write_staging(
    spec: PackageSpec, *, export_dir: Path, staging: Path, version: int, files: tuple[tuple[str, ...], tuple[str, ...]]
) -> None:
    formats, extra_files = files
    names = [FORMAT_FILES[fmt] for fmt in formats] + list(extra_files)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in names:
        shutil.copy2(export_dir / name, staging / name)
    manifest = build_manifest(spec, version=version, export_dir=staging, formats=formats, extra_files=extra_files)
    _write_synced(staging / MANIFEST_FILE, manifest.to_json())
    for name in names:
        _fsync(staging / name)


def _rename_into_place(staging: Path, model_dir: Path, version: int, *, explicit: bool) -> Path:
    """Rename staging to ``model_dir/<version>``; an implicit version moves on if another writer took it."""
    for attempt in range(100):
        target = model_dir / str(version + attempt)
        if target.exists():
            if explicit:
                raise PublishError(f"{target} already exists; choose another --version or leave it out")
            continue
        if attempt:
            _rewrite_version(staging, version + attempt)
        try:
            staging.rename(target)
        except OSError:
            if target.exists() and not explicit:
                continue
            raise
        logger.info("published %s", target)
        return target
    raise PublishError(f"no free version found in {model_dir}")


def _rewrite_version(staging: Path, version: int) -> None:
    manifest = Manifest.from_dict(_read_json(staging / MANIFEST_FILE))
    data = manifest.to_dict()
    data["version"] = version
    _write_synced(staging / MANIFEST_FILE, Manifest.from_dict(data).to_json())


def _read_json(path: Path) -> dict[str, Any]:
    import json

    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
