"""The parity set: the evidence a server checks a precision against, on its own host, before serving it.

A package carries a few validation images as the model sees them (uint8 (N, H, W, 3), before
normalization) and the eager fp32 model's logits for them (``manifest.parity``). A backend at some
precision runs the images again; its logits must stay within :data:`DRIFT_TOLERANCE` of the stored
ones, relative to their scale, and every answer the fp32 model is confident of (probability >= 0.8
either way, per the task: an image's top-1 class, or an image's decision on one label) must not change.

    parity = load_parity(package_dir, manifest)          # None for a package made before parity sets
    parity_failure(parity.logits, backend.run(parity.inputs), "int8", manifest.head)   # "" when it may serve
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import PackageError
from service.manifest import Manifest
from service.preprocess import normalize_array
from service.tasks import Task

# Largest drift of a precision's logits from the stored fp32 logits, as the RMS of the difference
# over the RMS of the fp32 logits (both centred per image where the task ignores a shift, as a softmax
# does; a sigmoid does not). Measured on
# the demo package: ~1e-6 for fp32 engines, ~0.01 for bf16, ~0.03-0.05 for int8; a model whose int8
# weights were scaled drifts by 0.3 and more.
DRIFT_TOLERANCE = {"fp32": 1e-3, "bf16": 0.08, "int8": 0.15}


@dataclass(frozen=True)
class ParitySet:
    """Preprocessed images as float32 (N, 3, H, W) and the eager fp32 model's logits (N, C) for them."""

    inputs: np.ndarray
    logits: np.ndarray


def load_parity(package_dir: Path, manifest: Manifest) -> ParitySet | None:
    """The package's parity set, or None for a package made before there were parity sets."""
    if not manifest.parity:
        return None
    try:
        images = np.load(package_dir / manifest.parity["images"], allow_pickle=False)
        logits = np.load(package_dir / manifest.parity["logits"], allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PackageError(f"{package_dir}: unreadable parity set: {exc}") from exc
    crop = manifest.preprocess.crop
    if (
        images.dtype != np.uint8
        or images.shape[1:] != (crop, crop, 3)
        or logits.shape != (len(images), manifest.head.width)
    ):
        raise PackageError(
            f"{package_dir}: parity set of shape {images.shape} {images.dtype} / {logits.shape} does not match "
            f"the manifest's {crop}x{crop} input and {manifest.head.width} outputs"
        )
    inputs = np.stack([normalize_array(image, manifest.preprocess) for image in images])
    return ParitySet(inputs, logits.astype(np.float32))


def drift(reference: np.ndarray, candidate: np.ndarray, *, centred: bool = True) -> float:
    """RMS of the difference over RMS of the reference, both centred per row when ``centred``
    (inf on a shape or NaN problem)."""
    if reference.shape != candidate.shape or not np.isfinite(candidate).all():
        return float("inf")
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    if centred:
        ref, cand = ref - ref.mean(axis=1, keepdims=True), cand - cand.mean(axis=1, keepdims=True)
    scale = float(np.sqrt(np.mean(ref**2))) or 1.0
    return float(np.sqrt(np.mean((cand - ref) ** 2))) / scale


def parity_failure(reference: np.ndarray, candidate: np.ndarray, precision: str, task: Task) -> str:
    """Why ``candidate`` logits may not stand in for the fp32 ``reference`` (empty when they may)."""
    moved = drift(reference, candidate, centred=task.shift_invariant)
    tolerance = DRIFT_TOLERANCE[precision]
    if moved > tolerance:
        return f"logits drift {moved:.3g} of their scale on the parity set (tolerance {tolerance:g})"
    flipped, confident = task.confident_flips(reference, candidate)
    if flipped:
        what = {"multiclass": "images change their top-1 class", "multilabel": "image labels change their answer"}
        return f"{flipped} of {confident} confident parity {what.get(task.name, 'images change their answer')}"
    return ""
