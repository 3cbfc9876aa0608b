"""ONNX Runtime: ``model.onnx`` at fp32, the calibrated ``model.int8.onnx`` at int8; CUDA when asked and present."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.backends import CUDA_EP, LoadOptions, device_index
from service.errors import PackageError

logger = logging.getLogger(__name__)


class OnnxBackend:
    """An ONNX Runtime session; CUDA when asked for and this onnxruntime has it, else CPU."""

    def __init__(self, path: Path, options: LoadOptions | None = None) -> None:
        import onnxruntime as ort

        options = options or LoadOptions()
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.intra_op_threads > 0:
            session_options.intra_op_num_threads = options.intra_op_threads
        if not options.intra_op_spinning:  # idle threads sleep instead of burning a shared core or a CPU quota
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = _providers(options.device, ort.get_available_providers())
        self._session: Any = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise PackageError(f"{path}: expected one input and at least one output, got {len(inputs)} inputs")
        self._input_name: str = inputs[0].name
        self._output_names: list[str] = [outputs[0].name]
        self.name = "onnxruntime"
        self.precision = options.precision
        self.device = options.device if CUDA_EP in self._session.get_providers() else "cpu"

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of ``batch``; ONNX Runtime sessions are safe to call from several threads."""
        feed = {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        (logits,) = self._session.run(self._output_names, feed)
        return np.asarray(logits, dtype=np.float32)


def _providers(device: str, available: Sequence[str]) -> list[Any]:
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if CUDA_EP in available:
        return [(CUDA_EP, {"device_id": device_index(device)}), "CPUExecutionProvider"]
    logger.warning("device %s asked for, but this onnxruntime has no %s (onnxruntime-gpu); using CPU", device, CUDA_EP)
    return ["CPUExecutionProvider"]


def load(path: Path, options: LoadOptions) -> OnnxBackend:
    return OnnxBackend(path, options)
