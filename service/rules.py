"""The request rules every adapter (HTTP and gRPC, v2 and TorchServe) and the TorchServe handler share.

Protocol-neutral: plain values in, plain values (or :class:`InvalidInput` naming the problem) out, so a
request refused over one protocol is refused over every other with the same message. The adapters only
find the values in their wire format (JSON, protobuf, headers, metadata) and pass them here.

Deadlines: the earliest of the limits the client gave (the transport's deadline, e.g. gRPC's; the
``timeout`` parameter in microseconds; the ``X-Request-Timeout-Ms`` header or gRPC metadata in
milliseconds); the server's default only when the client gave none.

    deadline(parameters={"timeout": 2_000_000}, header="500", transport_s=None, default_s=0.0)  # now + 0.5 s
    image_field({"data": b"...", "other": b"x"})                                               # ("data", b"...")

Shipped in the TorchServe archive (``finetune.torchserve.SHARED_MODULES``): it imports only ``service.errors``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from service.errors import InvalidInput

TIMEOUT_PARAMETER = "timeout"  # v2 request parameter, microseconds (what tritonclient's timeout= sends)
TIMEOUT_HEADER = "X-Request-Timeout-Ms"  # HTTP header, or gRPC metadata key (lower case), milliseconds
CLASSIFICATION = "classification"  # v2 output parameter: top-k "score:index:label" strings
IMAGE_FIELD = "data"  # multipart form field, gRPC PredictionsRequest.input key
BODY_FIELD = "body"  # TorchServe's name for a raw request body
MAX_TOP_K = 2**63 - 1  # the classification value must fit an int64 (gRPC's int64_param)

V = TypeVar("V")


class Tensor(Protocol):
    """What the input rule reads of a request's input tensor."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...


# ---- credentials --------------------------------------------------------------------------------


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization`` value (HTTP header or gRPC metadata) ``Bearer <token>``, if it is one."""
    value = value or ""
    return value[7:].strip() if value[:7].lower() == "bearer " else None


# ---- deadlines ----------------------------------------------------------------------------------


def timeout_seconds(value: object, *, unit_s: float, source: str, unit: str) -> float:
    """A positive, finite number of ``unit`` (an int, a float or their decimal string) -> seconds."""
    number = math.nan
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):  # not a number: refused below
            number = float(value)
    if not (math.isfinite(number) and number > 0):  # NaN or inf would corrupt the batcher's timer heap
        raise InvalidInput(f"invalid timeout: {source} must be a positive number of {unit} (got {value!r})")
    return number * unit_s


def parameter_timeout_s(parameters: Mapping[str, Any]) -> float | None:
    """The v2 ``timeout`` parameter (µs) in seconds, if the request has one."""
    if TIMEOUT_PARAMETER not in parameters:
        return None
    return timeout_seconds(
        parameters[TIMEOUT_PARAMETER], unit_s=1e-6, source=f"parameter '{TIMEOUT_PARAMETER}'", unit="microseconds"
    )


def header_timeout_s(value: str | None) -> float | None:
    """The ``X-Request-Timeout-Ms`` header (or gRPC metadata) in seconds, if sent."""
    if value is None:
        return None
    return timeout_seconds(value, unit_s=1e-3, source=f"header {TIMEOUT_HEADER}", unit="milliseconds")


def deadline(
    *,
    parameters: Mapping[str, Any],
    header: str | None,
    transport_s: float | None,
    default_s: float,
    now: float | None = None,
) -> float | None:
    """Absolute ``time.monotonic()`` deadline: the earliest of the client's limits, else ``default_s`` (0: none).

    ``transport_s`` is the time left of the transport's own deadline (gRPC), ``header`` the raw
    ``X-Request-Timeout-Ms`` value. Every limit given is checked, even when another is earlier.
    """
    given = [parameter_timeout_s(parameters), header_timeout_s(header), transport_s]
    limits = [limit for limit in given if limit is not None]
    if not limits and default_s > 0:
        limits.append(default_s)
    if not limits:
        return None
    return (time.monotonic() if now is None else now) + min(limits)


# ---- outputs ------------------------------------------------------------------------------------


def classification(parameters: Mapping[str, Any], output: str) -> int:
    """The ``classification`` parameter of a requested output: top-k (0: the plain tensor)."""
    k = parameters.get(CLASSIFICATION, 0)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_K:
        raise InvalidInput(f"output '{output}': classification must be a non-negative integer")
    return k


def top_k(k: int, labels: int) -> int:
    """How many labels a TorchServe-style answer holds: ``k`` within [1, labels]."""
    return max(1, min(k, labels))


def check_outputs(requested: Iterable[str], available: Sequence[str]) -> None:
    """Each requested output is one the model has (one may be asked for twice: say, as top-k and as a tensor)."""
    for name in requested:
        if name not in available:
            raise InvalidInput(f"unknown output '{name}'; this model has {', '.join(available)}")


# ---- inputs -------------------------------------------------------------------------------------


def check_inputs(inputs: Sequence[Tensor], *, image_input: str, tensor_input: str) -> None:
    """Exactly one input: ``image_input`` as BYTES (encoded images) or ``tensor_input`` as FP32."""
    if len(inputs) != 1:
        raise InvalidInput(
            f"expected exactly one input ('{image_input}' BYTES or '{tensor_input}' FP32), got {len(inputs)}"
        )
    tensor = inputs[0]
    wanted = {image_input: "BYTES", tensor_input: "FP32"}.get(tensor.name)
    if wanted is None:
        raise InvalidInput(f"unknown input '{tensor.name}'; send '{image_input}' (BYTES) or '{tensor_input}' (FP32)")
    if tensor.datatype != wanted:
        raise InvalidInput(f"input '{tensor.name}': datatype {tensor.datatype} not supported; send {wanted}")


def image_field(fields: Mapping[str, V]) -> tuple[str, V]:
    """(field name, value) of a TorchServe request's image: the raw body (``body``) or the field ``data``.

    Exactly one of the two: other fields are left alone (a form may carry more), and a request with both
    or neither is refused, never guessed.
    """
    present = [name for name in (IMAGE_FIELD, BODY_FIELD) if name in fields]
    if len(present) != 1:
        got = ", ".join(repr(str(k)) for k in fields) or "nothing"
        raise InvalidInput(
            f"send one image as the raw request body or as a multipart/gRPC field named {IMAGE_FIELD!r} (got {got})"
        )
    return present[0], fields[present[0]]
