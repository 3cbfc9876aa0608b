"""Overload and soak against a real ``serve`` with a small queue: refuse fast, answer the rest, keep memory flat.

No absolute timing thresholds: latencies are compared with each other and with the batch compute
time the server itself measured during the same run (``inference_compute_duration_seconds``).
Every loop is bounded in count and in time; everything is on loopback.
"""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service import codec
from service.protos import load_torchserve, load_v2
from tests.e2e.conftest import Package, Server, start_server
from tests.e2e.protocols import v2_body

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
QUEUE_SIZE, BATCH_SIZE = 4, 2
FLOOD_CLIENTS, FLOOD_SECONDS, FLOOD_MAX_REQUESTS = 64, 3.0, 3000
SOAK_REQUESTS, SOAK_SECONDS, SOAK_WARMUP = 2000, 12.0, 100
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def small_queue(demo_package: Package, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # one compute thread: on a small machine the model, not the HTTP layer, must be the bottleneck
    flags = ["--max-queue-size", str(QUEUE_SIZE), "--max-batch-size", str(BATCH_SIZE), "--intra-op-threads", "1"]
    log = tmp_path_factory.mktemp("overload") / "serve.log"
    server = start_server(demo_package.store, log, *flags)
    yield server
    assert server.stop() == 0, log.read_text()
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def good(demo_package: Package) -> tuple[bytes, str]:
    path, label = sorted(demo_package.predictions.items())[0]
    return path.read_bytes(), label


def rss_bytes(server: Server) -> int:
    """Resident memory of the server process (VmRSS)."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/<pid>/status")


def histogram(server: Server, name: str) -> dict[str, float]:
    """Cumulative bucket counts (by upper bound, "+Inf" included) and _sum/_count, summed over labels."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            key = sample.labels.get("le", sample.name.removeprefix(name))
            if sample.labels.get("model", "demo") == "demo":
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def quantile_bound(before: dict[str, float], after: dict[str, float], q: float) -> float:
    """Upper bound of the bucket holding the q-quantile of what was observed between two snapshots."""
    buckets = sorted((float(k), after[k] - before.get(k, 0.0)) for k in after if not k.startswith("_"))
    total = buckets[-1][1]
    return next(bound for bound, count in buckets if count >= q * total)


def mean_delta(before: dict[str, float], after: dict[str, float]) -> float:
    count = after["_count"] - before.get("_count", 0.0)
    return (after["_sum"] - before.get("_sum", 0.0)) / count


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- the clients: one request each, an outcome and its latency ------------------------------------


@dataclass(frozen=True)
class Result:
    protocol: str
    status: int | str
    seconds: float
    label: str | None
    message: str


Send = Callable[[], Awaitable[Result]]


def http_sender(client: httpx.AsyncClient, url: str, image: bytes) -> Send:
    async def send() -> Result:
        start = time.perf_counter()
        response = await client.post(f"{url}/predictions/demo", content=image)
        seconds = time.perf_counter() - start
        body = response.json()
        label = next(iter(body)) if response.status_code == 200 else None
        return Result("http", response.status_code, seconds, label, str(body.get("message", "")))

    return send


def grpc_sender(channel: grpc.aio.Channel, image: bytes) -> Send:
    messages, stub = load_v2().messages, load_v2().services.GRPCInferenceServiceStub(channel)

    async def send() -> Result:
        request = messages.ModelInferRequest(model_name="demo")
        request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(image)
        request.outputs.add(name="probabilities").parameters["classification"].int64_param = 1
        start = time.perf_counter()
        try:
            reply = await stub.ModelInfer(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return Result("grpc", exc.code().name, time.perf_counter() - start, None, exc.details() or "")
        seconds = time.perf_counter() - start
        top = codec.deserialize_bytes_tensor(reply.raw_output_contents[0], name="probabilities")[0]
        return Result("grpc", "OK", seconds, top.decode().split(":", 2)[2], "")

    return send


async def run_workers(senders: list[Send], *, seconds: float, max_requests: int) -> list[Result]:
    """Each sender in its own loop until ``seconds`` pass or ``max_requests`` were sent in all."""
    results: list[Result] = []
    stop = time.monotonic() + seconds
    budget = [max_requests]

    async def loop(send: Send) -> None:
        while time.monotonic() < stop and budget[0] > 0:
            budget[0] -= 1
            results.append(await send())

    await asyncio.gather(*(loop(send) for send in senders))
    return results


async def flood(server: Server, image: bytes) -> list[Result]:
    limits = httpx.Limits(max_connections=FLOOD_CLIENTS)
    async with (
        httpx.AsyncClient(timeout=60, limits=limits) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        senders = [http_sender(client, server.url, image) for _ in range(FLOOD_CLIENTS // 2)]
        senders += [grpc_sender(channel, image) for _ in range(FLOOD_CLIENTS // 2)]
        return await run_workers(senders, seconds=FLOOD_SECONDS, max_requests=FLOOD_MAX_REQUESTS)


# ---- flood ----------------------------------------------------------------------------------------


def test_flood_is_refused_fast_and_the_accepted_are_answered(small_queue: Server, good: tuple[bytes, str]) -> None:
    image, label = good
    for _ in range(5):  # warm up: first-request costs out of the way
        assert httpx.post(f"{small_queue.url}/predictions/demo", content=image, timeout=60).status_code == 200
    rss_before = rss_bytes(small_queue)
    compute_before = histogram(small_queue, "inference_compute_duration_seconds")
    request_before = histogram(small_queue, "inference_request_duration_seconds")

    results = asyncio.run(flood(small_queue, image))

    batch_seconds = mean_delta(compute_before, histogram(small_queue, "inference_compute_duration_seconds"))
    server_p99 = quantile_bound(request_before, histogram(small_queue, "inference_request_duration_seconds"), 0.99)
    accepted = [r for r in results if r.status in (200, "OK")]
    refused = [r for r in results if r.status in (429, "RESOURCE_EXHAUSTED")]
    summary = _summary(results, batch_seconds, server_p99)
    assert len(accepted) + len(refused) == len(results), summary  # nothing but answers and clean refusals
    assert {r.protocol for r in refused} == {"http", "grpc"}, summary  # both protocols share the queue's limit
    assert all("requests waiting" in r.message for r in refused), summary
    assert all(r.label == label for r in accepted), summary
    # refusals come at once: well before the slow tail of the accepted
    assert statistics.median(r.seconds for r in refused) < 0.5 * p([r.seconds for r in accepted], 0.99), summary
    # inside the server an accepted request waits for at most the queue ahead of it: a few batches
    batches_ahead = QUEUE_SIZE // BATCH_SIZE + 2
    assert server_p99 <= max(10 * batches_ahead * batch_seconds, 0.25), summary
    growth = rss_bytes(small_queue) - rss_before
    assert growth < 64 * MIB, f"RSS grew by {growth / MIB:.1f} MiB in the flood; {summary}"
    assert httpx.get(f"{small_queue.url}/v2/health/ready").status_code == 200


def _summary(results: list[Result], batch_seconds: float, server_p99: float) -> str:
    def stats(rows: list[Result]) -> str:
        latencies = [r.seconds for r in rows]
        return f"n={len(rows)} p50={p(latencies, 0.5):.3f} p99={p(latencies, 0.99):.3f}" if rows else "n=0"

    groups = {f"{r.protocol}:{r.status}" for r in results}
    parts = [f"{g} {stats([r for r in results if f'{r.protocol}:{r.status}' == g])}" for g in sorted(groups)]
    return f"batch={batch_seconds:.3f}s server_p99<={server_p99}s; " + "; ".join(parts)


# ---- soak -----------------------------------------------------------------------------------------


def _tiny_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (30, 160, 40)).save(out, "PNG")
    return out.getvalue()


def soak_senders(server: Server, client: httpx.AsyncClient, channel: grpc.aio.Channel, image: bytes) -> list[Send]:
    """One sender per protocol, each checking only that its answer is a full one."""
    torchserve = load_torchserve()
    ts_stub = torchserve.services.InferenceAPIsServiceStub(channel)
    body, headers = v2_body(image, binary=True)

    async def http_v2() -> Result:
        response = await client.post(f"{server.url}/v2/models/demo/infer", content=body, headers=headers)
        return Result("http_v2", response.status_code, 0.0, json.loads(response.content)["outputs"][0]["name"], "")

    async def grpc_torchserve() -> Result:
        request = torchserve.messages.PredictionsRequest(model_name="demo", input={"data": image})
        reply = await ts_stub.Predictions(request, timeout=60)
        return Result("grpc_torchserve", "OK", 0.0, next(iter(json.loads(reply.prediction))), "")

    return [http_sender(client, server.url, image), grpc_sender(channel, image), http_v2, grpc_torchserve]


async def soak(server: Server, image: bytes, *, requests: int, seconds: float) -> list[Result]:
    async with (
        httpx.AsyncClient(timeout=60) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        return await run_workers(soak_senders(server, client, channel, image), seconds=seconds, max_requests=requests)


def test_soak_keeps_memory_flat(small_queue: Server) -> None:
    image = _tiny_png()
    warmup = asyncio.run(soak(small_queue, image, requests=SOAK_WARMUP, seconds=SOAK_SECONDS))
    assert all(r.status in (200, "OK") for r in warmup)
    before = rss_bytes(small_queue)
    start = time.monotonic()
    results = asyncio.run(soak(small_queue, image, requests=SOAK_REQUESTS, seconds=SOAK_SECONDS))
    elapsed = time.monotonic() - start
    growth = rss_bytes(small_queue) - before
    failed = [r for r in results if r.status not in (200, "OK")]
    assert not failed, failed[:5]
    assert len(results) >= 300, f"only {len(results)} requests in {elapsed:.1f}s: too few to say anything"
    assert growth < 30 * MIB, f"RSS grew by {growth / MIB:.1f} MiB over {len(results)} requests"
