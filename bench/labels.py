"""Our servers' benchmark labels: ``ours-<short>[-<precision>]-b<max batch size>``, short names from the registry.

parse_label("ours-ov-int8-b8")   # OursConfig(backend="openvino", precision="int8", max_batch_size=8)
parse_label("ours-ort-b8")       # no precision: fp32, the meaning those labels always had
config_label("auto", "auto", 8)  # "ours-auto-auto-b8": serve --backend auto --precision auto
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service import registry

BACKENDS = registry.SHORT_NAMES  # label short name -> backend ("ort" -> "onnxruntime"); "auto" besides
AUTO = "auto"


@dataclass(frozen=True)
class OursConfig:
    """One of our servers as a label names it: ``serve --backend B --precision P --max-batch-size N``."""

    backend: str  # a registry name, or "auto"
    precision: str  # fp32 | bf16 | int8 | auto
    max_batch_size: int

    @property
    def label(self) -> str:
        return config_label(self.backend, self.precision, self.max_batch_size)


def _short(backend: str) -> str:
    return AUTO if backend == AUTO else registry.backend_spec(backend).short


def config_label(backend: str, precision: str, max_batch_size: int) -> str:
    """("openvino", "int8", 8) -> ``ours-ov-int8-b8``; the inverse of :func:`parse_label`."""
    return f"ours-{_short(backend)}-{precision}-b{max_batch_size}"


def parse_label(label: str) -> OursConfig:
    """``ours-ov-int8-b8`` -> OursConfig("openvino", "int8", 8); ``ours-ort-b8`` (no precision) means fp32.

    The short names are the registry's (plus ``auto`` for ``--backend auto``); a precision the
    backend cannot run (``ours-ts-int8-b8``) is a ValueError, as an unknown name is.
    """
    shorts = "|".join(map(re.escape, (*BACKENDS, AUTO)))
    precisions = "|".join(registry.PRECISION_CHOICES)
    match = re.fullmatch(rf"ours-({shorts})(?:-({precisions}))?-b([1-9][0-9]*)", label)
    if match is None:
        raise ValueError(
            f"server configuration {label!r} is not ours-<{'|'.join((*BACKENDS, AUTO))}>[-<{precisions}>]-b<max batch "
            "size>"
        )
    backend = AUTO if match[1] == AUTO else BACKENDS[match[1]]
    precision = match[2] or "fp32"
    if backend != AUTO and precision != AUTO and registry.backend_spec(backend).format_for(precision) is None:
        raise ValueError(f"server configuration {label!r}: {backend} has no {precision} precision")
    return OursConfig(backend, precision, int(match[3]))


def parse_config(label: str) -> tuple[str, int]:
    """``ours-ort-b8`` -> ("onnxruntime", 8): our server's backend and max batch size (see :func:`parse_label`)."""
    config = parse_label(label)
    return config.backend, config.max_batch_size
