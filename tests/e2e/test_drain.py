"""SIGTERM's grace period under closed-loop load from unmodified Triton clients (HTTP v2 and gRPC v2).

On the signal the server reports not ready at once on every protocol but keeps answering for
``--drain-grace-s``; clients that keep sending during it (a load balancer takes a moment to notice)
are answered, never CANCELLED or reset; then the process exits 0 within grace + the longest deadline.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Package, Server, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
GRACE_S = 3.0
DEADLINE_S = 5.0  # --request-timeout-s: the longest any request may take
WORKERS = 4  # closed-loop clients per protocol
LOAD_BEFORE_S = 1.5  # of load before the signal
NOTICED_AFTER_S = GRACE_S - 1.0  # when the clients stop sending new requests, as a load balancer would
EXIT_SLACK_S = 5.0  # process teardown on a loaded machine


@dataclass(frozen=True)
class Sent:
    protocol: str
    sent_at: float
    status: str  # "OK" or what went wrong: a status, a gRPC code, an exception's type
    label: str | None


@dataclass
class Health:
    """Readiness seen on each protocol while the grace period runs."""

    http_ready: list[int] = field(default_factory=list)
    grpc_ready: list[bool] = field(default_factory=list)
    ping: list[str] = field(default_factory=list)


def _inputs(module: object, image: bytes) -> tuple[list[object], list[object]]:
    tensor = module.InferInput("image", [1], "BYTES")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    return [tensor], [module.InferRequestedOutput("probabilities", class_count=1)]  # type: ignore[attr-defined]


def _label(result: object) -> str:
    return str(result.as_numpy("probabilities").reshape(-1)[0].decode().split(":", 2)[2])  # type: ignore[attr-defined]


async def _send(protocol: str, client: object, image: bytes) -> Sent:
    module = triton_http if protocol == "http" else triton_grpc
    inputs, outputs = _inputs(module, image)
    sent_at = time.monotonic()
    extra = {"client_timeout": DEADLINE_S + 5} if protocol == "grpc" else {}
    try:
        result = await client.infer("demo", inputs, outputs=outputs, **extra)  # type: ignore[attr-defined]
    except InferenceServerException as exc:
        return Sent(protocol, sent_at, str(exc.status() or exc.message()).removeprefix("StatusCode."), None)
    except Exception as exc:  # a reset or refused connection: the point of the test is that none happen
        return Sent(protocol, sent_at, type(exc).__name__, None)
    return Sent(protocol, sent_at, "OK", _label(result))


async def _closed_loop(protocol: str, client: object, image: bytes, stop: list[float], out: list[Sent]) -> None:
    while time.monotonic() < stop[0]:
        out.append(await _send(protocol, client, image))


async def _watch_health(server: Server, grpc_client: triton_grpc.InferenceServerClient, health: Health) -> None:
    """Readiness on the three protocols, a few times during the grace period (listeners still open)."""
    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(3):
            await asyncio.sleep(0.3)
            health.http_ready.append((await client.get(f"{server.url}/v2/health/ready")).status_code)
            health.ping.append((await client.get(f"{server.url}/ping")).json()["status"])
            health.grpc_ready.append(await grpc_client.is_server_ready())


async def _load_then_sigterm(server: Server, image: bytes) -> tuple[list[Sent], Health, float, float]:
    """Closed-loop load, SIGTERM, load on through most of the grace; returns results, health, signal and exit times."""
    sent: list[Sent] = []
    health = Health()
    stop = [float("inf")]
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}", conn_limit=WORKERS)
    grpc_client = triton_grpc.InferenceServerClient(server.grpc_address)
    try:
        workers = [_closed_loop("http", http_client, image, stop, sent) for _ in range(WORKERS)]
        workers += [_closed_loop("grpc", grpc_client, image, stop, sent) for _ in range(WORKERS)]
        load = asyncio.gather(*workers)
        await asyncio.sleep(LOAD_BEFORE_S)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        stop[0] = signalled + NOTICED_AFTER_S
        await asyncio.gather(load, _watch_health(server, grpc_client, health))
        while server.process.poll() is None and time.monotonic() < signalled + GRACE_S + DEADLINE_S + 30:
            await asyncio.sleep(0.05)
        return sent, health, signalled, time.monotonic()
    finally:
        await http_client.close()
        await grpc_client.close()


def test_sigterm_grace_keeps_answering_while_not_ready(demo_package: Package, tmp_path: Path) -> None:
    path, label = sorted(demo_package.predictions.items())[0]
    log = tmp_path / "serve.log"
    flags = ["--drain-grace-s", str(GRACE_S), "--request-timeout-s", str(DEADLINE_S), "--max-batch-size", "4"]
    server = start_server(demo_package.store, log, *flags)
    try:
        assert httpx.post(f"{server.url}/predictions/demo", content=path.read_bytes(), timeout=60).status_code == 200
        sent, health, signalled, exited = asyncio.run(_load_then_sigterm(server, path.read_bytes()))
    finally:
        code = server.stop(timeout=60)
    assert code == 0, log.read_text()
    assert exited - signalled <= GRACE_S + DEADLINE_S + EXIT_SLACK_S, exited - signalled
    assert exited - signalled >= GRACE_S - 0.5, "the listeners closed before the grace period ended"
    before = [s for s in sent if s.sent_at < signalled]
    during = [s for s in sent if s.sent_at >= signalled]
    assert {(s.status, s.label) for s in before} == {("OK", label)}, before
    assert len(during) >= 2 * WORKERS, "nothing was sent during the grace period"
    assert {s.protocol for s in during} == {"http", "grpc"}
    for s in during:  # answered in full; a refusal may only be a clean one, never CANCELLED or a reset
        assert (s.status, s.label) == ("OK", label) or s.status in ("503", "UNAVAILABLE"), during
    assert health.http_ready and set(health.http_ready) == {503}, health
    assert set(health.grpc_ready) == {False}, health
    assert set(health.ping) == {"Unhealthy"}, health
    assert "Traceback" not in log.read_text()
