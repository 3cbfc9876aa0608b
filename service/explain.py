"""Grad-CAM heatmaps for packages that carry a Grad-CAM module (``manifest.extra["explain"]``, e.g. ``cam.pt``).

The module (written by ``finetune.explain.export_cam``) is TorchScript returning ``(logits, activations
of the last conv feature map)``. torch is imported only when a heatmap is asked for, so an ONNX-only
server never loads it otherwise. Computation runs on the CPU, outside the batcher.

    explainer = Explainer()
    heatmaps = explainer.explain(package_dir, manifest, batch)     # (N, H, W) float32 in [0, 1]
    png = heatmap_png(heatmaps[0])
"""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import InvalidInput
from service.manifest import Manifest
from service.tasks import Task

if TYPE_CHECKING:
    import torch

EXPLAIN_KEY = "explain"


def cam_file(manifest: Manifest) -> str:
    """The package's Grad-CAM file name; InvalidInput when the package has none."""
    name = manifest.extra.get(EXPLAIN_KEY)
    if not isinstance(name, str) or name not in manifest.files:
        raise InvalidInput(
            f"model '{manifest.name}' version {manifest.version} has no Grad-CAM module, so it cannot be explained "
            "(explanations need a CNN backbone fine-tuned by a finetune that exports cam.pt)"
        )
    return name


def grad_cam_with_logits(
    cam_module: Any, batch: torch.Tensor, class_index: int | None = None, task: Task | None = None
) -> tuple[np.ndarray, torch.Tensor]:
    """(heatmaps (N, H, W) in [0, 1], logits): Grad-CAM of label ``class_index`` (default: each image's first
    answer under ``task``, its top class without one).

    The label's logit's gradient w.r.t. the activations, averaged over space, weights the channels;
    their ReLU'd sum is upsampled to the input size and scaled per image to [0, 1]. A binary model's
    one logit speaks for its positive label (index 1); its negative label's score is the negated logit.
    """
    import torch

    inputs = batch.detach().float().clone().requires_grad_(True)  # puts the activations on the autograd graph
    # the optimizing executor, from the third call on, may fuse the activations out of the autograd graph
    with torch.enable_grad(), torch.jit.optimized_execution(False):  # type: ignore[attr-defined]
        logits, activations = cam_module(inputs)
        chosen = _chosen(logits.detach(), class_index, task)
        if logits.shape[1] == 1:  # binary: (negative, positive) share the positive label's logit
            score = (logits[:, 0] * (2 * chosen - 1).to(logits.dtype)).sum()
        else:
            score = logits.gather(1, chosen[:, None]).sum()
        (grads,) = torch.autograd.grad(score, activations)
    with torch.no_grad():
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * activations).sum(dim=1, keepdim=True))
        cam = torch.nn.functional.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        low = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - low
        heat = torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
    return heat.numpy().astype(np.float32), logits.detach()


def _chosen(logits: torch.Tensor, class_index: int | None, task: Task | None) -> torch.Tensor:
    import torch

    if class_index is not None:
        return torch.full((len(logits),), class_index, dtype=torch.long)
    if task is None:
        return logits.argmax(dim=1)
    ranked = task.ranked(task.probabilities(logits.float().numpy()), 1, at_least_one=True)
    return torch.tensor([row[0] for row in ranked], dtype=torch.long)


def load_cam(path: Path) -> Any:
    """Load a Grad-CAM TorchScript file on the CPU (torch's jit deprecation notice kept quiet)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]


class Explainer:
    """Grad-CAM modules loaded on first use, one per package folder, and the heatmaps they compute."""

    def __init__(self) -> None:
        self._modules: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def module(self, package_dir: Path, manifest: Manifest) -> Any:
        path = package_dir / cam_file(manifest)
        with self._lock:
            if path not in self._modules:
                self._modules[path] = load_cam(path)
            return self._modules[path]

    def explain(self, package_dir: Path, manifest: Manifest, batch: np.ndarray, label: str | None = None) -> np.ndarray:
        """Heatmaps (N, H, W) in [0, 1] of ``label`` (default: each image's first answer: its predicted class,
        its most probable label above threshold); ``batch`` is preprocessed NCHW."""
        import torch

        cam_module = self.module(package_dir, manifest)
        index = label_index(manifest, label)
        return grad_cam_with_logits(cam_module, torch.from_numpy(batch), index, manifest.head)[0]


def label_index(manifest: Manifest, label: str | None) -> int | None:
    """The index of a requested label; InvalidInput naming the labels when it is not one of them."""
    if label is None:
        return None
    if label not in manifest.labels:
        raise InvalidInput(f"label {label!r} is not one of the model's labels: {', '.join(manifest.labels)}")
    return manifest.labels.index(label)


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """A (H, W) heatmap in [0, 1] as an 8-bit grayscale PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(heatmap, 0.0, 1.0) * 255)).save(buffer, format="PNG")
    return buffer.getvalue()
