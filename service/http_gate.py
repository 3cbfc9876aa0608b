"""Admission from the request head: an inference request the model has no room for is refused before routing.

Under a flood of clients that retry at once, what a refusal costs is what the model loses: every
microsecond the event loop spends refusing is taken from decoding and computing on the same cores. A
refusal through the web framework (routing, a Request object, the exception handlers, a JSONResponse)
costs several times what the answer needs. So the HTTP protocol (:mod:`service.http_limits`) asks this
gate as soon as a request's head is parsed: for ``POST``/``PUT`` to an inference route (TorchServe
``/predictions/{m}[/{v}]``, v2 ``/v2/models/{m}[/versions/{v}]/infer``) whose token is right, the data
plane's own admission rule (:meth:`DataPlane.check_admission`) decides, and a refusal is written as a
whole HTTP response in the route's own error format (the same body the application would send). The body
is then read and dropped, the connection kept alive.

A refused connection is also *paced*: its next request is left unread for ``pause_s`` (TCP backpressure;
the client's bytes wait in its socket, not in our CPU). A client that honours ``Retry-After`` never
notices; one that retries at once is slowed to a few tries a second instead of thousands, which is what
keeps the accepted requests' latency and the goodput when 32x more clients than the model can serve
hammer it. Anything the gate does not decide (a bad token, a malformed deadline header, an admitted
request) goes to the application, which checks again and answers as usual.

    gate = AdmissionGate(plane, pause_s=0.25)
    refusal = gate("POST", "/predictions/demo", headers)        # None: let the application answer
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

from service import rules
from service.dataplane import DataPlane
from service.errors import QueueFull, ServiceError

_INFER = re.compile(
    r"^/(?:predictions/(?P<ts>[^/]+)(?:/(?P<ts_version>[^/]+))?"
    r"|v2/models/(?P<v2>[^/]+)(?:/versions/(?P<v2_version>[^/]+))?/infer)/?$"
)
TORCHSERVE_PREFIXES = ("/predictions", "/explanations", "/ping")


def error_payload(path: str, status: int, message: str, kind: str) -> dict[str, object]:
    """The error body of a route: TorchServe's ``{code, type, message}`` on its routes, else v2's ``{error}``."""
    if path.startswith(TORCHSERVE_PREFIXES):
        return {"code": status, "type": kind, "message": message}
    return {"error": message}


def json_bytes(payload: object) -> bytes:
    """JSON as Starlette's JSONResponse renders it (compact, UTF-8)."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


class Gate(Protocol):
    """What the HTTP protocol asks once a request head is parsed: a refusal to write, or None to route it."""

    def __call__(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]], /) -> Refusal | None: ...


@dataclass(frozen=True)
class Refusal:
    """What the protocol writes instead of running the application, and how long it then leaves the
    connection unread."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    pause_s: float

    def response(self, default_headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """The whole HTTP/1.1 response (keep-alive)."""
        phrase = HTTPStatus(self.status).phrase.encode("ascii")
        lines = [b"HTTP/1.1 %d %s" % (self.status, phrase)]
        lines += [name + b": " + value for name, value in (*default_headers, *self.headers)]
        lines += [b"content-length: %d" % len(self.body), b"", self.body]
        return b"\r\n".join(lines)


class AdmissionGate:
    """Decides, from a request's method, path and headers, whether to refuse it before routing (see the module)."""

    def __init__(self, plane: DataPlane, *, pause_s: float) -> None:
        self.plane = plane
        self.pause_s = pause_s

    def __call__(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> Refusal | None:
        """``path`` is percent-decoded, as in the ASGI scope."""
        match = _INFER.match(path) if method in ("POST", "PUT") else None
        if match is None:
            return None
        found = {name: value for name, value in headers if name in (b"authorization", _TIMEOUT)}
        try:
            self.plane.check_inference_token(rules.bearer(_text(found.get(b"authorization"))))
            header = _text(found.get(_TIMEOUT))
            default_s = self.plane.settings.request_timeout_s
            deadline = rules.deadline(parameters={}, header=header, transport_s=None, default_s=default_s)
        except ServiceError:
            return None  # the application answers these (401, 400) with its usual message
        torchserve = match["ts"] is not None
        model, version = match["ts"] or match["v2"], match["ts_version"] or match["v2_version"]
        protocol = "http_torchserve" if torchserve else "http_v2"
        try:
            self.plane.check_admission(model, version, deadline=deadline, protocol=protocol)
        except ServiceError as exc:
            return self._refusal(path, exc)
        return None

    def _refusal(self, path: str, exc: ServiceError) -> Refusal:
        status = exc.http_status
        headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),)
        pause = 0.0
        if isinstance(exc, QueueFull):
            headers += ((b"retry-after", str(exc.retry_after_s).encode("ascii")),)
            pause = self.pause_s
        body = json_bytes(error_payload(path, status, exc.message, type(exc).__name__))
        return Refusal(status, headers, body, pause)


_TIMEOUT = rules.TIMEOUT_HEADER.lower().encode("ascii")


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None
