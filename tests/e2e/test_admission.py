"""Admission by expected wait against a real ``serve``: a flood gets fast 429s with Retry-After, the accepted succeed.

The queue's length bound (``--max-queue-size``) is set far above the number of clients, so every
refusal here comes from the wait bound (``--max-queue-wait-ms``), which the server judges from the
service time it measured. No absolute timing thresholds: refusals are compared with the accepted.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.e2e.conftest import Package, Server, start_server
from tests.e2e.protocols import v2_body

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CLIENTS, SECONDS, MAX_REQUESTS = 48, 3.0, 3000
FLAGS = ("--max-queue-size", "10000", "--max-queue-wait-ms", "50", "--max-batch-size", "2", "--intra-op-threads", "1")


@pytest.fixture(scope="module")
def waiting_server(demo_package: Package, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("admission") / "serve.log"
    server = start_server(demo_package.store, log, *FLAGS)
    yield server
    assert server.stop() == 0, log.read_text()
    assert "Traceback" not in log.read_text()


@dataclass(frozen=True)
class Outcome:
    route: str
    status: int
    seconds: float
    label: str | None
    retry_after: str | None
    message: str


async def _send(client: httpx.AsyncClient, url: str, route: str, image: bytes) -> Outcome:
    start = time.perf_counter()
    if route == "torchserve":
        response = await client.post(f"{url}/predictions/demo", content=image)
    else:
        body, headers = v2_body(image, binary=False)
        response = await client.post(f"{url}/v2/models/demo/infer", content=body, headers=headers)
    seconds, data = time.perf_counter() - start, response.json()
    label = None
    if response.status_code == 200:
        label = next(iter(data)) if route == "torchserve" else data["outputs"][0]["data"][0].split(":", 2)[2]
    message = str(data.get("message", data.get("error", ""))) if response.status_code != 200 else ""
    return Outcome(route, response.status_code, seconds, label, response.headers.get("retry-after"), message)


async def _flood(server: Server, image: bytes) -> list[Outcome]:
    """Closed-loop clients that retry at once, half on each HTTP protocol, bounded in time and count."""
    results: list[Outcome] = []
    stop, budget = time.monotonic() + SECONDS, [MAX_REQUESTS]

    async def loop(client: httpx.AsyncClient, route: str) -> None:
        while time.monotonic() < stop and budget[0] > 0:
            budget[0] -= 1
            results.append(await _send(client, server.url, route, image))

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=CLIENTS)) as client:
        routes = ["torchserve", "v2"] * (CLIENTS // 2)
        await asyncio.gather(*(loop(client, route) for route in routes))
    return results


def test_a_flood_gets_fast_429s_with_retry_after_and_the_accepted_succeed(
    waiting_server: Server, demo_package: Package
) -> None:
    path, label = sorted(demo_package.predictions.items())[0]
    image = path.read_bytes()
    for _ in range(5):  # warm up, and give the server its first measured service times
        assert httpx.post(f"{waiting_server.url}/predictions/demo", content=image, timeout=60).status_code == 200

    results = asyncio.run(_flood(waiting_server, image))

    accepted = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status == 429]
    summary = _summary(results)
    assert len(accepted) + len(refused) == len(results), summary  # answers and clean refusals only
    assert accepted and refused, summary
    assert {r.route for r in refused} == {"torchserve", "v2"}, summary
    assert all(r.label == label for r in accepted), summary
    # the length bound is far away: every refusal is the wait bound's, with a whole number of seconds to wait
    assert all("expected wait" in r.message for r in refused), summary
    assert all(r.retry_after is not None and r.retry_after.isdigit() and int(r.retry_after) >= 1 for r in refused)
    # refused at once: well before the accepted are answered
    assert statistics.median(r.seconds for r in refused) < statistics.median(r.seconds for r in accepted), summary
    assert httpx.get(f"{waiting_server.url}/v2/health/ready", timeout=30).status_code == 200


def _summary(results: list[Outcome]) -> str:
    def stats(rows: list[Outcome]) -> str:
        latencies = sorted(r.seconds for r in rows)
        return f"n={len(rows)} p50={latencies[len(rows) // 2]:.3f} max={latencies[-1]:.3f}" if rows else "n=0"

    groups = sorted({(r.route, r.status) for r in results})
    return "; ".join(
        f"{route}:{status} {stats([r for r in results if (r.route, r.status) == (route, status)])}"
        for route, status in groups
    )
