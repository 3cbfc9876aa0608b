"""One process, one event loop: HTTP (uvicorn) and gRPC (grpc.aio) over the same data plane.

SIGTERM/SIGINT: stop accepting, finish every accepted request (HTTP and gRPC), drain the
batchers, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import grpc
import uvicorn

from service import metrics
from service.dataplane import DataPlane
from service.grpc_adapter import add_servicers
from service.http_app import create_app
from service.repository import ModelRepository
from service.settings import Settings

logger = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: this process owns SIGTERM and orders the shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _grpc_server(plane: DataPlane, settings: Settings) -> grpc.aio.Server:
    limit = settings.max_payload_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024)),
        ]
    )
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


async def serve(settings: Settings) -> None:
    """Load the store, serve until SIGTERM/SIGINT, then shut down gracefully."""
    repository = ModelRepository(settings)
    await repository.load_all()
    plane = DataPlane(repository, settings)
    grpc_server = _grpc_server(plane, settings)
    http_server = _http_server(plane, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await grpc_server.start()
    http_task = asyncio.create_task(http_server.serve())
    _start_metrics_server(settings)
    logger.info(
        "serving %s: HTTP %s:%d, gRPC %s:%d (event loop: %s)",
        settings.model_store, settings.host, settings.http_port, settings.host, settings.grpc_port,
        type(loop).__module__.split(".")[0],
    )  # fmt: skip
    done, _ = await asyncio.wait({http_task, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if http_task in done and http_task.exception() is not None:
        await grpc_server.stop(grace=None)
        raise http_task.exception()  # type: ignore[misc]
    logger.info("shutting down: finishing in-flight requests (up to %.0f s)", settings.drain_timeout_s)
    http_server.should_exit = True
    await asyncio.gather(grpc_server.stop(grace=settings.drain_timeout_s), http_task)
    await plane.shutdown(timeout=settings.drain_timeout_s)
    logger.info("stopped")
