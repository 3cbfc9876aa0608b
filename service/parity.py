"""The parity set: the evidence a server checks a precision against, on its own host, before serving it.

A package carries a few validation images as the model sees them (uint8 (N, H, W, 3), before
normalization) and the eager fp32 model's logits for them (``manifest.parity``). A backend at some
precision runs the images again; its logits must stay within :data:`DRIFT_TOLERANCE` of the stored
ones, relative to their scale, and every confident image (fp32 top-1 probability >= 0.8) must keep
its class.

    parity = load_parity(package_dir, manifest)          # None for a package made before parity sets
    parity_failure(parity.logits, backend.run(parity.inputs), "int8")   # "" when it may serve
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import PackageError
from service.manifest import Manifest
from service.preprocess import normalize_array

CONFIDENT = 0.8  # fp32 top-1 probability from which an image counts as confident
# Largest drift of a precision's logits from the stored fp32 logits, as the RMS of the difference
# over the RMS of the fp32 logits (both centred per image: a softmax ignores a shift). Measured on
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
        or logits.shape != (len(images), len(manifest.labels))
    ):
        raise PackageError(
            f"{package_dir}: parity set of shape {images.shape} {images.dtype} / {logits.shape} does not match "
            f"the manifest's {crop}x{crop} input and {len(manifest.labels)} labels"
        )
    inputs = np.stack([normalize_array(image, manifest.preprocess) for image in images])
    return ParitySet(inputs, logits.astype(np.float32))


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


def drift(reference: np.ndarray, candidate: np.ndarray) -> float:
    """RMS of the difference over RMS of the reference, both centred per row (inf on a shape or NaN problem)."""
    if reference.shape != candidate.shape or not np.isfinite(candidate).all():
        return float("inf")
    ref = reference - reference.mean(axis=1, keepdims=True)
    diff = (candidate - candidate.mean(axis=1, keepdims=True)) - ref
    scale = float(np.sqrt(np.mean(ref**2))) or 1.0
    return float(np.sqrt(np.mean(diff**2))) / scale


def parity_failure(reference: np.ndarray, candidate: np.ndarray, precision: str) -> str:
    """Why ``candidate`` logits may not stand in for the fp32 ``reference`` (empty when they may)."""
    moved = drift(reference, candidate)
    tolerance = DRIFT_TOLERANCE[precision]
    if moved > tolerance:
        return f"logits drift {moved:.3g} of their scale on the parity set (tolerance {tolerance:g})"
    confident = softmax(reference).max(axis=1) >= CONFIDENT
    flipped = int((reference.argmax(axis=1) != candidate.argmax(axis=1))[confident].sum())
    if flipped:
        return f"{flipped} of {int(confident.sum())} confident parity images change their top-1 class"
    return ""
