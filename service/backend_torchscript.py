"""TorchScript: ``model.pt`` in eval mode under ``torch.inference_mode``; bf16 casts the module and input.

bf16 on a CPU runs the whole module in bfloat16 with channels_last activations (oneDNN's bf16
kernels where the CPU has AVX512_BF16 or AMX); logits come back as float32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.backends import LoadOptions

logger = logging.getLogger(__name__)


class TorchScriptBackend:
    """A TorchScript module; ``intra_op_threads`` > 0 sets torch's thread count, which is process-wide."""

    def __init__(self, path: Path, options: LoadOptions | None = None) -> None:
        import torch

        options = options or LoadOptions()
        device = options.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("device %s asked for, but torch sees no CUDA device; using CPU", device)
            device = "cpu"
        if options.intra_op_threads > 0:
            torch.set_num_threads(options.intra_op_threads)
        self._device = torch.device(device)
        self._dtype = torch.bfloat16 if options.precision == "bf16" else torch.float32
        module: Any = torch.jit.load(str(path), map_location=self._device)  # type: ignore[no-untyped-call]
        module = module.eval()
        if self._dtype != torch.float32:
            module = module.to(dtype=self._dtype)
        self._module = module
        self._channels_last = self._dtype != torch.float32
        self.name = "torchscript"
        self.precision = options.precision
        self.device = device

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of ``batch``, moved to the module's device and back to host memory as float32."""
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._device, self._dtype)
        if self._channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = self._module(tensor)
        return np.asarray(logits.to("cpu", torch.float32).numpy(), dtype=np.float32)


def load(path: Path, options: LoadOptions) -> TorchScriptBackend:
    return TorchScriptBackend(path, options)
