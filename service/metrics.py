"""Prometheus metrics of the server, declared once here with fixed label sets.

They live on the module's own :data:`REGISTRY`, not the process-wide default one, so tests
and several servers in one process never collide. Each stage is timed separately:
queue (batcher), preprocess (dataplane), compute (batcher), and the whole request (dataplane).

    metrics.REQUESTS.labels("flowers", "1", "http_v2", metrics.outcome_for(None)).inc()
    body, content_type = metrics.render()
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.errors import (
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    QueueFull,
    ServiceError,
    ShuttingDown,
    Unauthorized,
)

REGISTRY = CollectorRegistry()

# From half a millisecond (one small CPU batch) to ten seconds (a stalled queue).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

_MODEL = ("model", "version")
# "rejected": the queue was full; "cancelled": the client went away before its answer.
OUTCOMES = ("success", "invalid", "not_found", "unavailable", "rejected", "timeout", "cancelled", "error")

REQUEST_SECONDS = Histogram(
    "inference_request_duration_seconds",
    "End-to-end time of an inference request, from receipt to response.",
    (*_MODEL, "protocol"),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_SECONDS = Histogram(
    "inference_queue_duration_seconds",
    "Time a request waited in the model's batch queue.",
    _MODEL,
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
PREPROCESS_SECONDS = Histogram(
    "inference_preprocess_duration_seconds",
    "Time to decode and preprocess the images of one request.",
    _MODEL,
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
COMPUTE_SECONDS = Histogram(
    "inference_compute_duration_seconds",
    "Time the backend took to compute one batch.",
    _MODEL,
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "inference_batch_size",
    "Images per computed batch.",
    _MODEL,
    buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)
REQUESTS = Counter(
    "inference_requests",
    "Inference requests by outcome: " + ", ".join(OUTCOMES) + ".",
    (*_MODEL, "protocol", "outcome"),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "inference_queue_depth",
    "Requests waiting in the model's batch queue.",
    _MODEL,
    registry=REGISTRY,
)
MODEL_READY = Gauge(
    "inference_model_ready",
    "1 when the model version is loaded and serving, else 0.",
    _MODEL,
    registry=REGISTRY,
)
# load/reload: a version read, verified, checked and warmed up (failure: it stays or becomes UNAVAILABLE);
# unload: a version drained and released; default: a version became the one unversioned requests get.
TRANSITIONS_KINDS = ("load", "reload", "unload", "default")
MODEL_TRANSITIONS = Counter(
    "inference_model_transitions",
    "Model version lifecycle transitions (" + ", ".join(TRANSITIONS_KINDS) + ") by outcome: success, failure.",
    (*_MODEL, "transition", "outcome"),
    registry=REGISTRY,
)
GPU_MEMORY_BYTES = Gauge(
    "inference_gpu_memory_bytes",
    "GPU memory held by this process's PyTorch allocator.",
    ("device",),
    registry=REGISTRY,
)

# max_connections: refused when accepted; header_timeout / body_timeout: closed, a request's head or body too slow;
# max_concurrent_rpcs: a gRPC call refused (RESOURCE_EXHAUSTED) while the cap's calls are in progress.
CONNECTION_REFUSALS = ("max_connections", "header_timeout", "body_timeout", "max_concurrent_rpcs")
CONNECTIONS_REFUSED = Counter(
    "inference_connections_refused",
    "Connections refused or closed by the server (" + ", ".join(CONNECTION_REFUSALS) + ").",
    ("protocol", "reason"),
    registry=REGISTRY,
)
CONNECTIONS_OPEN = Gauge(
    "inference_connections_open",
    "Client connections open now.",
    ("protocol",),
    registry=REGISTRY,
)

# Most specific first: PayloadTooLarge is an InvalidInput, QueueFull must not read as "invalid".
_OUTCOME_OF: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (QueueFull, "rejected"),
    ((DeadlineExceeded, TimeoutError), "timeout"),
    ((InvalidInput, Unauthorized, Forbidden), "invalid"),
    (ModelNotFound, "not_found"),
    ((ModelNotReady, ShuttingDown), "unavailable"),
    (asyncio.CancelledError, "cancelled"),
    (ServiceError, "error"),
)


def outcome_for(exc: BaseException | None) -> str:
    """The ``outcome`` label of a request that ended with ``exc`` (None: success).

    Refused credentials count as "invalid" (the client's fault); a client that went away
    counts as "cancelled", not as a server error.
    """
    if exc is None:
        return "success"
    for kinds, outcome in _OUTCOME_OF:
        if isinstance(exc, kinds):
            return outcome
    return "error"


def update_gpu_memory() -> None:
    """Refresh :data:`GPU_MEMORY_BYTES`; a no-op unless torch is already imported and sees CUDA.

    Never imports torch itself: an ONNX-only server must not pay for it.
    """
    torch = sys.modules.get("torch")
    # Another thread may be importing torch right now (the first explanation does): the module is in
    # sys.modules before its attributes are. Report nothing until it is whole, rather than fail the scrape.
    is_available = getattr(getattr(torch, "cuda", None), "is_available", None)
    if torch is None or is_available is None or not is_available():
        return
    for index in range(torch.cuda.device_count()):
        # Reserved, not allocated: what the caching allocator holds is what the device has lost.
        GPU_MEMORY_BYTES.labels(f"cuda:{index}").set(torch.cuda.memory_reserved(index))


def forget_model(model: str, version: str) -> None:
    """Drop an unloaded model version's gauges so a stale queue depth or readiness is not reported."""
    for gauge in (QUEUE_DEPTH, MODEL_READY):
        with contextlib.suppress(KeyError):  # never set for this version
            gauge.remove(model, version)


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of :data:`REGISTRY` and its content type."""
    update_gpu_memory()
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
