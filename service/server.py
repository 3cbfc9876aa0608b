"""One process, one event loop: HTTP (uvicorn) and gRPC (grpc.aio) over the same data plane.

SIGTERM/SIGINT: report not ready at once but keep serving for ``drain_grace_s`` (load balancers
notice and stop sending; a second signal ends the grace early), then close the listeners, finish
every accepted request (HTTP and gRPC) within ``drain_timeout_s``, drain the batchers, exit 0.

Connections are bounded on both listeners: ``max_connections`` each, HTTP request heads and bodies
within ``header_timeout_s`` / ``body_timeout_s`` (service.http_limits), gRPC calls at
``grpc_max_concurrent_rpcs`` and its handshake within ``header_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import Iterator

import grpc
import uvicorn

from service import metrics
from service.control import ModelControl
from service.dataplane import DataPlane
from service.grpc_adapter import add_servicers
from service.grpc_limits import ConcurrentRpcCap
from service.http_app import create_app
from service.http_gate import AdmissionGate
from service.http_limits import HttpLimits, protocol_class
from service.repository import ModelRepository
from service.settings import Settings

logger = logging.getLogger(__name__)

GRPC_KEEPALIVE_TIME_MS = 60_000  # ping a connection silent this long, to find peers that vanished
GRPC_KEEPALIVE_TIMEOUT_MS = 20_000  # and close it when the ping is not answered within this
GRPC_MAX_CONNECTION_IDLE_MS = 300_000  # GOAWAY to a connection without calls this long (clients reconnect)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: this process owns SIGTERM and orders the shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _grpc_options(settings: Settings) -> list[tuple[str, int]]:
    limit = settings.max_payload_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024)),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        ("grpc.server_handshake_timeout_ms", math.ceil(settings.header_timeout_s * 1000)),
        ("grpc.keepalive_time_ms", GRPC_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", GRPC_KEEPALIVE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", GRPC_MAX_CONNECTION_IDLE_MS),
    ]


def _grpc_server(plane: DataPlane, settings: Settings) -> grpc.aio.Server:
    cap = ConcurrentRpcCap(settings.grpc_max_concurrent_rpcs)  # not grpc's own: it refuses without a trace
    server = grpc.aio.server(options=_grpc_options(settings), interceptors=[cap])
    add_servicers(server, plane, default_timeout_s=settings.request_timeout_s)
    address = f"{settings.host}:{settings.grpc_port}"
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    return server


def _http_server(plane: DataPlane, settings: Settings) -> _Uvicorn:
    config = uvicorn.Config(
        create_app(plane, metrics_route=settings.metrics_port == 0),
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        lifespan="off",
        # Not uvicorn's limit_concurrency: it answers 503 on open connections once enough idle ones exist.
        http=protocol_class(
            HttpLimits(
                max_connections=settings.max_connections,
                header_timeout_s=settings.header_timeout_s,
                body_timeout_s=settings.body_timeout_s,
            ),
            AdmissionGate(plane, pause_s=settings.refusal_pause_ms / 1000),
        ),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
    )
    return _Uvicorn(config)


def _start_metrics_server(settings: Settings) -> None:
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.REGISTRY)
        logger.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)


class _Signals:
    """SIGTERM/SIGINT: the first starts the shutdown, a second one ends its grace period early."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.first = asyncio.Event()
        self.again = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._received)

    def _received(self) -> None:
        (self.again if self.first.is_set() else self.first).set()


async def _grace(plane: DataPlane, signals: _Signals, seconds: float) -> None:
    """Not ready, still serving, listeners open: until ``seconds`` pass or another signal comes."""
    plane.begin_leaving()
    if seconds > 0 and not signals.again.is_set():
        logger.info("shutting down: not ready; serving %.1f s more before closing the listeners", seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signals.again.wait(), seconds)


async def serve(settings: Settings) -> None:
    """Load the store, serve until SIGTERM/SIGINT, then shut down gracefully."""
    repository = ModelRepository(settings)
    control = ModelControl(repository, settings)
    await control.start()
    plane = DataPlane(repository, settings)
    grpc_server = _grpc_server(plane, settings)
    http_server = _http_server(plane, settings)
    loop = asyncio.get_running_loop()
    signals = _Signals(loop)
    await grpc_server.start()
    http_task = asyncio.create_task(http_server.serve())
    _start_metrics_server(settings)
    logger.info(
        "serving %s: HTTP %s:%d, gRPC %s:%d (event loop: %s)",
        settings.model_store, settings.host, settings.http_port, settings.host, settings.grpc_port,
        type(loop).__module__.split(".")[0],
    )  # fmt: skip
    stopping = asyncio.create_task(signals.first.wait())
    done, _ = await asyncio.wait({http_task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if http_task in done and http_task.exception() is not None:
        await grpc_server.stop(grace=None)
        raise http_task.exception()  # type: ignore[misc]
    await _grace(plane, signals, settings.drain_grace_s)
    logger.info("shutting down: finishing in-flight requests (up to %.0f s)", settings.drain_timeout_s)
    http_server.should_exit = True
    await asyncio.gather(grpc_server.stop(grace=settings.drain_timeout_s), http_task)
    await control.stop()
    await plane.shutdown(timeout=settings.drain_timeout_s)
    logger.info("stopped")
