"""Model backends: ONNX Runtime and TorchScript behind one small contract.

A backend takes a float32 batch ``(N, 3, H, W)`` and returns float32 logits ``(N, C)``.
onnxruntime and torch are imported only by the backend that needs them: an ONNX-only
server never imports torch.

    backend = load_backend(Path("model_store/flowers/1"), manifest, requested="auto", device="auto")
    warm_up(backend, manifest, batch_sizes=(1, 8))
    logits = backend.run(batch)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.errors import PackageError
from service.manifest import Manifest

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT_OF_BACKEND = {"onnxruntime": "onnx", "torchscript": "torchscript"}
BACKEND_CHOICES = ("auto", *FORMAT_OF_BACKEND)
_CUDA_EP = "CUDAExecutionProvider"
# Present on a host whose NVIDIA driver is loaded; a hint checked before importing torch for CUDA.
_NVIDIA_HINTS = (Path("/proc/driver/nvidia/version"), Path("/dev/nvidiactl"))


class Backend(Protocol):
    """What the batcher calls: one batch in, one row of logits per image out."""

    name: str  # "onnxruntime" | "torchscript"
    device: str  # "cpu" | "cuda:0"

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, C) logits; called from one worker thread at a time."""
        ...


class OnnxBackend:
    """An ONNX Runtime session; CUDA when asked for and this onnxruntime has it, else CPU."""

    def __init__(
        self, path: Path, *, device: str = "cpu", intra_op_threads: int = 0, intra_op_spinning: bool = True
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 0:
            options.intra_op_num_threads = intra_op_threads
        if not intra_op_spinning:  # idle threads sleep instead of burning a shared core or a CPU quota
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = _onnx_providers(device, ort.get_available_providers())
        self._session: Any = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise PackageError(f"{path}: expected one input and at least one output, got {len(inputs)} inputs")
        self._input_name: str = inputs[0].name
        self._output_names: list[str] = [outputs[0].name]
        self.name = "onnxruntime"
        self.device = device if _CUDA_EP in self._session.get_providers() else "cpu"

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of ``batch``; ONNX Runtime sessions are safe to call from several threads."""
        feed = {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        (logits,) = self._session.run(self._output_names, feed)
        return np.asarray(logits, dtype=np.float32)


def _onnx_providers(device: str, available: Sequence[str]) -> list[Any]:
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if _CUDA_EP in available:
        return [(_CUDA_EP, {"device_id": _device_index(device)}), "CPUExecutionProvider"]
    logger.warning("device %s asked for, but this onnxruntime has no %s (onnxruntime-gpu); using CPU", device, _CUDA_EP)
    return ["CPUExecutionProvider"]


class TorchScriptBackend:
    """A TorchScript module in eval mode, run under ``torch.inference_mode``.

    ``intra_op_threads`` > 0 sets torch's thread count, which is process-wide.
    """

    def __init__(self, path: Path, *, device: str = "cpu", intra_op_threads: int = 0) -> None:
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("device %s asked for, but torch sees no CUDA device; using CPU", device)
            device = "cpu"
        if intra_op_threads > 0:
            torch.set_num_threads(intra_op_threads)
        self._device = torch.device(device)
        module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location=self._device)  # type: ignore[no-untyped-call]
        self._module = module.eval()
        self.name = "torchscript"
        self.device = device

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of ``batch``, moved to the module's device and back to host memory."""
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.inference_mode():
            logits = self._module(tensor.to(self._device))
        return np.asarray(logits.to("cpu", torch.float32).numpy(), dtype=np.float32)


def resolve_device(device: str, *, backend: str = "torchscript") -> str:
    """Turn "auto" into "cuda:0" or "cpu" and normalize "cuda" to "cuda:0".

    For ``backend="onnxruntime"`` CUDA means onnxruntime lists its CUDA provider (torch is not
    imported); otherwise it means torch imports and sees a CUDA device.
    """
    if device != "auto":
        return _normalize_device(device)
    if backend == "onnxruntime":
        return "cuda:0" if _onnxruntime_has_cuda() else "cpu"
    return "cuda:0" if _torch_has_cuda() else "cpu"


def _normalize_device(device: str) -> str:
    if device == "cpu":
        return device
    if device == "cuda":
        return "cuda:0"
    if device.startswith("cuda:") and device[5:].isdigit():
        return device
    raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:<index>")


def _device_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


def _onnxruntime_has_cuda() -> bool:
    """onnxruntime-gpu lists its CUDA provider even without a driver: require the driver too."""
    import onnxruntime as ort

    return _CUDA_EP in ort.get_available_providers() and any(hint.exists() for hint in _NVIDIA_HINTS)


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


def choose_backend(manifest: Manifest, requested: str, *, prefer_torchscript: bool = False) -> str:
    """The backend to serve ``manifest`` with: "onnxruntime" or "torchscript".

    ``requested`` is auto|onnxruntime|torchscript. "auto" takes ONNX Runtime when the package
    has an ONNX file (TorchScript when ``prefer_torchscript`` and the package has one), else
    TorchScript. A requested format the package lacks is a PackageError naming what it has.
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"backend {requested!r} is not one of {', '.join(BACKEND_CHOICES)}")
    formats = set(manifest.formats)
    has = ", ".join(sorted(formats)) or "no model files"
    if requested == "auto":
        if "onnx" in formats and not (prefer_torchscript and "torchscript" in formats):
            return "onnxruntime"
        if "torchscript" in formats:
            return "torchscript"
        raise PackageError(f"{manifest.name} v{manifest.version}: nothing to serve; the package has {has}")
    fmt = FORMAT_OF_BACKEND[requested]
    if fmt not in formats:
        raise PackageError(
            f"{manifest.name} v{manifest.version}: {requested} needs a {fmt} file; the package has {has}"
        )
    return requested


def load_backend(
    package_dir: Path,
    manifest: Manifest,
    *,
    requested: str = "auto",
    device: str = "auto",
    intra_op_threads: int = 0,
    intra_op_spinning: bool = True,
) -> Backend:
    """Build the backend for a package whose files were already verified; PackageError if it cannot load."""
    prefer_torch = requested == "auto" and device != "cpu" and _only_torch_reaches_gpu(manifest)
    name = choose_backend(manifest, requested, prefer_torchscript=prefer_torch)
    resolved = resolve_device(device, backend=name)
    file_name = manifest.formats[FORMAT_OF_BACKEND[name]]
    if Path(file_name).name != file_name:
        raise PackageError(f"{package_dir}: model file {file_name!r} is not a plain file name")
    path = package_dir / file_name
    try:
        backend: Backend = (
            OnnxBackend(path, device=resolved, intra_op_threads=intra_op_threads, intra_op_spinning=intra_op_spinning)
            if name == "onnxruntime"
            else TorchScriptBackend(path, device=resolved, intra_op_threads=intra_op_threads)
        )
    except PackageError:
        raise
    except Exception as exc:  # loaders raise many types; every one means this package cannot be served
        raise PackageError(f"{path}: {name} cannot load it: {exc}") from exc
    logger.info("loaded %s v%s with %s on %s", manifest.name, manifest.version, backend.name, backend.device)
    return backend


def warm_up(backend: Backend, manifest: Manifest, *, batch_sizes: Sequence[int] = (1,)) -> None:
    """Run zeros of the manifest's input shape once per batch size; PackageError on a wrong output.

    Proves the model accepts the advertised input and returns ``(N, num_classes)`` finite logits,
    and pays one-time costs (allocation, kernel selection) before the first real request.
    """
    shape = _image_shape(manifest)
    for size in batch_sizes:
        batch = np.zeros((size, *shape), dtype=np.float32)
        try:
            logits = backend.run(batch)
        except Exception as exc:  # the advertised input does not run: the package is broken
            raise PackageError(f"{manifest.name} v{manifest.version}: warm-up on {batch.shape} failed: {exc}") from exc
        expected = (size, manifest.num_classes)
        if tuple(logits.shape) != expected:
            raise PackageError(
                f"{manifest.name} v{manifest.version}: model returns {tuple(logits.shape)} for {batch.shape}, "
                f"the manifest promises {expected} ({manifest.num_classes} labels)"
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
