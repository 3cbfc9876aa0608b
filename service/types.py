"""Protocol-neutral request and response types: what the HTTP and gRPC adapters convert to and from.

Tensors follow the Open Inference Protocol v2: a name, a datatype (``FP32``, ``BYTES``, ...), a
shape and the data. ``BYTES`` data is a list of ``bytes``; numeric data is a NumPy array already in
``shape``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Parameters = dict[str, Any]

# KServe v2 datatype -> NumPy dtype (BYTES is handled as list[bytes])
NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


@dataclass
class InferInput:
    """One input tensor of a request."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    parameters: Parameters = field(default_factory=dict)


@dataclass
class RequestedOutput:
    """An output the client asked for; ``classification`` > 0 asks for top-k "score:index:label" strings."""

    name: str
    classification: int = 0
    parameters: Parameters = field(default_factory=dict)


@dataclass
class InferRequest:
    """A protocol-neutral inference request.

    ``deadline`` is an absolute ``time.monotonic()`` value (None = no deadline); ``protocol`` names
    the adapter that received it ("http_v2", "grpc_v2", "http_torchserve", "grpc_torchserve") for metrics.
    """

    model: str
    inputs: list[InferInput]
    version: str | None = None
    id: str = ""
    outputs: list[RequestedOutput] | None = None
    parameters: Parameters = field(default_factory=dict)
    deadline: float | None = None
    protocol: str = "http_v2"


@dataclass
class InferOutput:
    """One output tensor of a response; ``data`` is a NumPy array, or list[bytes] for BYTES."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    parameters: Parameters = field(default_factory=dict)


@dataclass
class InferResponse:
    model: str
    version: str
    outputs: list[InferOutput]
    id: str = ""
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    """What ``GET /v2/models/{m}`` and gRPC ``ModelMetadata`` return."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    ready: bool = False
    reason: str = ""  # not ready: why; ready: how its backend and precision were chosen
    labels: list[str] = field(default_factory=list)
    precision: str = ""  # fp32, bf16 or int8: what the model is computed at
    precision_notes: str = ""  # how the backend and precision were chosen: what was ruled out, the timings
    task: str = ""  # multiclass, multilabel or binary (service.tasks)
    thresholds: list[float] = field(default_factory=list)  # multilabel: per label; binary: the positive label's
    default_version: str = ""  # the version unversioned requests get ("" when none is ready)
    pinned_version: str = ""  # the pin (management API or <model>/DEFAULT); it wins while it is READY
    version_states: list[ModelStatus] = field(default_factory=list)  # every version: LOADING, READY, ...
    backbone: str = ""  # what the package was fine-tuned from (service.model_summary)
    metrics: dict[str, Any] = field(default_factory=dict)  # {"test": {...}}: the run's test metrics
    preprocess: dict[str, Any] = field(default_factory=dict)  # the eval preprocessing: resize, crop, ...
    explainable: bool = False  # carries a Grad-CAM module: POST /explanations/... answers


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]


@dataclass(frozen=True)
class ModelStatus:
    """One row of the repository index: a model version and its state."""

    name: str
    version: str
    state: str  # READY, UNAVAILABLE, LOADING, UNLOADING
    reason: str = ""
