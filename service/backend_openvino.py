"""OpenVINO on the CPU: ``model.onnx`` at fp32 or bf16 (its inference-precision hint), ``model.int8.onnx`` at int8.

The ONNX file is read directly (no IR conversion step: compiling resnet18 takes about 0.1 s).
The batch axis stays dynamic. Each thread that runs batches (one per batcher worker) gets its own
infer request; the compiled model has as many streams as there are workers.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from service.backends import LoadOptions
from service.errors import PackageError

_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the layers left in float run in f32


class OpenVinoBackend:
    """A compiled OpenVINO model; thread-safe through one infer request per calling thread."""

    def __init__(self, path: Path, options: LoadOptions | None = None) -> None:
        import openvino as ov

        options = options or LoadOptions()
        if options.device != "cpu":
            raise PackageError(f"openvino serves on the CPU here, not {options.device}")
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINTS[options.precision],
            "PERFORMANCE_HINT": "LATENCY" if options.instances == 1 else "THROUGHPUT",
            "NUM_STREAMS": str(options.instances),
        }
        if options.intra_op_threads > 0:
            config["INFERENCE_NUM_THREADS"] = options.intra_op_threads
        core = ov.Core()
        model = core.read_model(str(path))
        if len(model.inputs) != 1 or not model.outputs:
            raise PackageError(f"{path}: expected one input and at least one output, got {len(model.inputs)} inputs")
        self._compiled: Any = core.compile_model(model, "CPU", config)
        self._output = self._compiled.output(0)
        self._local = threading.local()
        self.name = "openvino"
        self.precision = options.precision
        self.device = "cpu"

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of ``batch``, copied out of the request's output buffer (reused by its next run)."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        results = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.array(results[self._output], dtype=np.float32)


def load(path: Path, options: LoadOptions) -> OpenVinoBackend:
    return OpenVinoBackend(path, options)
