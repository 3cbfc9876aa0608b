"""Connection limits for the HTTP listener: a uvicorn protocol that refuses and times out slow clients.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but not the time a client
takes to send a request's head or body, so a client trickling one byte a second (slowloris) holds
its connection forever; and its ``limit_concurrency`` answers 503 to requests on connections
already open once enough *idle* connections exist, so a flood of idle sockets would starve live
clients. This protocol instead:

* refuses a connection beyond ``max_connections`` when it is accepted (a 503 with
  ``Connection: close``), never one already serving;
* closes a connection whose request head has not arrived within ``header_timeout_s`` of its first
  byte (or of the connection, for the first request): 408, then close;
* closes a connection whose request body has not arrived within ``body_timeout_s`` of its head;
* asks the admission gate (:mod:`service.http_gate`) as soon as a request head is parsed, and writes its
  refusal (429, 503, 404) without starting the application; the body is read and dropped, and the
  connection's next request is left unread for the refusal's pause.

Every refusal is counted in ``inference_connections_refused_total{protocol="http",reason}``.

    config = uvicorn.Config(app, http=protocol_class(HttpLimits(max_connections=1000)))
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics
from service.http_gate import Gate, Refusal

PROTOCOL = "http"


def _plain(status: bytes, text: bytes, *extra: bytes) -> bytes:
    """A whole HTTP/1.1 response that closes its connection."""
    head = [b"HTTP/1.1 " + status, b"content-type: text/plain; charset=utf-8", b"connection: close", *extra]
    return b"\r\n".join([*head, b"content-length: %d" % len(text), b"", text])


_REFUSED = _plain(b"503 Service Unavailable", b"the server has too many connections", b"retry-after: 1")
_TIMED_OUT = _plain(b"408 Request Timeout", b"the request head came too slowly")


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on one HTTP listener's connections (seconds; ``max_connections`` open at once)."""

    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap and head/body deadlines (see the module)."""

    limits: ClassVar[HttpLimits] = HttpLimits()
    gate: ClassVar[Gate | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False
        self._dropping = False  # this request was answered from its head: its body is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            metrics.CONNECTIONS_REFUSED.labels(PROTOCOL, "max_connections").inc()
            transport.write(_REFUSED)
            transport.close()
            return
        super().connection_made(transport)
        metrics.CONNECTIONS_OPEN.labels(PROTOCOL).set(len(self.connections))
        self._arm("header_timeout", self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused:
            return
        super().connection_lost(exc)
        metrics.CONNECTIONS_OPEN.labels(PROTOCOL).set(len(self.connections))

    # httptools parser callbacks: a request's head starts, ends; its body ends
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._dropping = False
        if self._deadline is None:  # the first request's clock started with the connection
            self._arm("header_timeout", self.limits.header_timeout_s)

    def on_headers_complete(self) -> None:
        refusal = self._ask_gate()
        if refusal is None:
            super().on_headers_complete()
        else:
            self._refuse(refusal)
        self._arm("body_timeout", self.limits.body_timeout_s)

    def on_body(self, body: bytes) -> None:
        if not self._dropping:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._dropping:
            super().on_message_complete()
        self._disarm()

    def _ask_gate(self) -> Refusal | None:
        """The gate's refusal of this request, when it may answer one: a keep-alive request with nothing
        else being answered on the connection (no pipelining), not waiting for ``100 Continue``."""
        idle = self.cycle is None or self.cycle.response_complete
        if self.gate is None or not idle or self.expect_100_continue or not self.parser.should_keep_alive():
            return None
        path = httptools.parse_url(self.url).path.decode("ascii", errors="replace")
        method = self.parser.get_method().decode("ascii", errors="replace")
        return self.gate(method, urllib.parse.unquote(path) if "%" in path else path, self.headers)

    def _refuse(self, refusal: Refusal) -> None:
        """Answer from the head; then, for a pause, leave the connection's next request unread."""
        self._dropping = True
        self.transport.write(refusal.response(self.server_state.default_headers))
        self.on_response_complete()  # keep-alive timer armed, reading resumed: as after any response
        if refusal.pause_s > 0 and not self.transport.is_closing():
            self.flow.pause_reading()
            self.loop.call_later(refusal.pause_s, self._resume)

    def _resume(self) -> None:
        if not self.transport.is_closing():
            self.flow.resume_reading()

    def _arm(self, reason: str, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, reason)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, reason: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        metrics.CONNECTIONS_REFUSED.labels(PROTOCOL, reason).inc()
        if reason == "header_timeout" and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(_TIMED_OUT)  # nothing else is being answered on this connection
        self.transport.close()


def protocol_class(limits: HttpLimits, gate: Gate | None = None) -> type[LimitedHttpProtocol]:
    """A :class:`LimitedHttpProtocol` bound to ``limits`` and ``gate``, for ``uvicorn.Config(http=...)``."""
    return type(
        "ServeHttpProtocol",
        (LimitedHttpProtocol,),
        {"limits": limits, "gate": None if gate is None else staticmethod(gate)},
    )
