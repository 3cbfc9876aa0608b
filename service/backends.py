"""Model backends behind one small contract; which ones exist is :mod:`service.registry`'s business.

A backend takes a float32 batch ``(N, 3, H, W)`` and returns float32 logits ``(N, C)``. Each
engine lives in its own module (``service.backend_<name>``), imported only when that backend is
loaded: an ONNX-only server never imports torch.

    backend = load_backend(Path("model_store/flowers/1"), manifest, requested="auto", precision="fp32")
    warm_up(backend, manifest, batch_sizes=(1, 8))
    logits = backend.run(batch)
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Protocol

import numpy as np

from service import registry
from service.errors import PackageError
from service.manifest import Manifest

logger = logging.getLogger(__name__)

BACKEND_CHOICES = registry.BACKEND_CHOICES
CUDA_EP = "CUDAExecutionProvider"
# Present on a host whose NVIDIA driver is loaded; a hint checked before importing torch for CUDA.
_NVIDIA_HINTS = (Path("/proc/driver/nvidia/version"), Path("/dev/nvidiactl"))


class Backend(Protocol):
    """What the batcher calls: one batch in, one row of logits per image out."""

    name: str  # a registry name: "onnxruntime", "openvino", "torchscript"
    device: str  # "cpu" | "cuda:0"
    precision: str  # "fp32" | "bf16" | "int8"

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, C) logits; safe to call from several worker threads."""
        ...


@dataclass(frozen=True)
class LoadOptions:
    """How to load one backend: where, at which precision, with how many threads and workers."""

    device: str = "cpu"
    precision: str = "fp32"
    intra_op_threads: int = 0  # 0: the engine's default
    intra_op_spinning: bool = True  # ONNX Runtime's threads busy-wait between operators
    instances: int = 1  # batcher workers calling run() at once


def installed(backend: str) -> bool:
    """Whether the engine a backend needs can be imported here (checked without importing it)."""
    return find_spec(registry.backend_spec(backend).package) is not None


# What to do when an engine is missing on purpose: the slim CPU image leaves torch out.
_ENGINE_HINTS = {
    "torch": (
        "the slim CPU image imgclf-cpu (Dockerfile target serve-cpu) has none; serve TorchScript packages with "
        "the `serve` image (imgclf, target serve), or publish the model with ONNX too "
        "(finetune --export-formats torchscript,onnx)"
    ),
}


def not_installed(backend: str) -> str:
    """Why ``backend`` cannot run here: its engine is not installed, and what to use instead."""
    package = registry.backend_spec(backend).package
    hint = _ENGINE_HINTS.get(package)
    return f"{backend} needs {package}, which is not installed here" + (f": {hint}" if hint else "")


def resolve_device(device: str, *, backend: str = "torchscript") -> str:
    """Turn "auto" into "cuda:0" or "cpu" and normalize "cuda" to "cuda:0".

    CUDA for "auto" means the backend's own way to the GPU is there (the registry's ``gpu``):
    onnxruntime lists its CUDA provider (torch is not imported), or torch sees a CUDA device; a
    CPU-only backend resolves to "cpu".
    """
    if device != "auto":
        return _normalize_device(device)
    gpu = registry.backend_spec(backend).gpu
    if gpu == "onnxruntime":
        return "cuda:0" if _onnxruntime_has_cuda() else "cpu"
    if gpu == "torch":
        return "cuda:0" if _torch_has_cuda() else "cpu"
    return "cpu"


def _normalize_device(device: str) -> str:
    if device == "cpu":
        return device
    if device == "cuda":
        return "cuda:0"
    if device.startswith("cuda:") and device[5:].isdigit():
        return device
    raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:<index>")


def device_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


def _onnxruntime_has_cuda() -> bool:
    """onnxruntime-gpu lists its CUDA provider even without a driver: require the driver too."""
    import onnxruntime as ort

    return CUDA_EP in ort.get_available_providers() and any(hint.exists() for hint in _NVIDIA_HINTS)


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _only_torch_reaches_gpu(manifest: Manifest) -> bool:
    """True when the package has both formats, there is a GPU, and only torch can use it.

    The pinned ``onnxruntime`` wheel is CPU-only: on a GPU host, TorchScript on CUDA beats it.
    Checks the cheap signs first so a CPU host never imports torch for this.
    """
    if not {"onnx", "torchscript"} <= set(manifest.formats) or _onnxruntime_has_cuda():
        return False
    return any(hint.exists() for hint in _NVIDIA_HINTS) and _torch_has_cuda()


def choose_backend(
    manifest: Manifest, requested: str, *, precision: str = "fp32", prefer_torchscript: bool = False
) -> str:
    """The backend to serve ``manifest`` with at ``precision``, by rule (nothing is timed here).

    ``requested`` is "auto" or a registry name. "auto" takes the first registered backend that is
    installed and whose file for ``precision`` the package has (TorchScript first when
    ``prefer_torchscript``). A requested backend that lacks the precision, or whose file the package
    lacks, is a PackageError naming what there is. :mod:`service.precision` times the candidates instead.
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"backend {requested!r} is not one of {', '.join(BACKEND_CHOICES)}")
    formats = set(manifest.formats)
    has = ", ".join(sorted(formats)) or "no model files"
    if requested != "auto":
        fmt = registry.backend_spec(requested).format_for(precision)
        if fmt is None:
            raise PackageError(f"{requested} has no {precision} precision")
        if fmt not in formats:
            raise PackageError(
                f"{manifest.name} v{manifest.version}: {requested} needs a {fmt} file; the package has {has}"
            )
        if not installed(requested):
            raise PackageError(f"{manifest.name} v{manifest.version}: {not_installed(requested)}")
        return requested
    order = sorted(registry.BACKEND_NAMES, key=lambda b: not (prefer_torchscript and b == "torchscript"))
    readers = [name for name in order if registry.backend_spec(name).format_for(precision) in formats]
    for name in readers:
        if installed(name):
            return name
    missing = "".join(f"; {not_installed(name)}" for name in readers)
    raise PackageError(
        f"{manifest.name} v{manifest.version}: nothing serves it at {precision}; the package has {has}{missing}"
    )


def load_backend(
    package_dir: Path,
    manifest: Manifest,
    *,
    requested: str = "auto",
    precision: str = "fp32",
    device: str = "auto",
    options: LoadOptions | None = None,
    intra_op_threads: int = 0,
    intra_op_spinning: bool = True,
) -> Backend:
    """Build one backend at one precision for a package whose files were already verified.

    PackageError if it cannot load. ``options`` carries the thread settings (the two keyword
    arguments are shorthands for them); its device and precision are set from the arguments.
    """
    prefer_torch = requested == "auto" and device != "cpu" and _only_torch_reaches_gpu(manifest)
    name = choose_backend(manifest, requested, precision=precision, prefer_torchscript=prefer_torch)
    spec = registry.backend_spec(name)
    file_name = manifest.formats[spec.precisions[precision]]
    if Path(file_name).name != file_name:
        raise PackageError(f"{package_dir}: model file {file_name!r} is not a plain file name")
    path = package_dir / file_name
    base = options or LoadOptions(intra_op_threads=intra_op_threads, intra_op_spinning=intra_op_spinning)
    resolved = replace(base, device=resolve_device(device, backend=name), precision=precision)
    try:
        backend = open_backend(name, path, resolved)
    except PackageError:
        raise
    except Exception as exc:  # loaders raise many types; every one means this package cannot be served
        raise PackageError(f"{path}: {name} cannot load it: {exc}") from exc
    logger.info(
        "loaded %s v%s with %s %s on %s", manifest.name, manifest.version, backend.name, precision, backend.device
    )
    return backend


def open_backend(name: str, path: Path, options: LoadOptions) -> Backend:
    """Load model file ``path`` with the registered backend ``name`` (its module is imported now)."""
    module = importlib.import_module(registry.backend_spec(name).module)
    backend: Backend = module.load(path, options)
    return backend


def warm_up(backend: Backend, manifest: Manifest, *, batch_sizes: Sequence[int] = (1,)) -> None:
    """Run zeros of the manifest's input shape once per batch size; PackageError on a wrong output.

    Proves the model accepts the advertised input and returns ``(N, task width)`` finite logits,
    and pays one-time costs (allocation, kernel selection) before the first real request.
    """
    shape = _image_shape(manifest)
    for size in batch_sizes:
        batch = np.zeros((size, *shape), dtype=np.float32)
        try:
            logits = backend.run(batch)
        except Exception as exc:  # the advertised input does not run: the package is broken
            raise PackageError(f"{manifest.name} v{manifest.version}: warm-up on {batch.shape} failed: {exc}") from exc
        expected = (size, manifest.head.width)
        if tuple(logits.shape) != expected:
            raise PackageError(
                f"{manifest.name} v{manifest.version}: model returns {tuple(logits.shape)} for {batch.shape}, "
                f"the manifest promises {expected} (a {manifest.task} model of {manifest.num_classes} labels)"
            )
        if not np.isfinite(logits).all():
            raise PackageError(f"{manifest.name} v{manifest.version}: warm-up logits are not finite")


def _image_shape(manifest: Manifest) -> tuple[int, ...]:
    """(C, H, W) from the input spec when it is fully static, else from the preprocessing."""
    if manifest.inputs:
        dims = manifest.inputs[0].shape[1:]
        if len(dims) == 3 and all(d > 0 for d in dims):
            return tuple(dims)
    return manifest.preprocess.input_shape
