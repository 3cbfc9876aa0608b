"""A small asyncio load generator: closed loop at a fixed concurrency, open loop at a fixed rate.

    result = await closed_loop(send, concurrency=8, duration_s=6.0, warmup_s=1.0)
    print(result.throughput, result.p99_ms)

``send(i)`` sends request number ``i`` (the caller picks the payload, e.g. ``images[i % n]``) and
raises on any failure. Every loop is bounded twice: by time and by a request count; each request
by its own timeout.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Send = Callable[[int], Awaitable[None]]
MAX_REQUESTS = 200_000
ERROR_BACKOFF_S = 0.01  # a failing target must not turn the loop into a busy spin


@dataclass
class _Tally:
    """What one measured window collected."""

    latencies: list[float] = field(default_factory=list)  # seconds
    errors: int = 0
    first_error: str = ""
    issued: int = 0
    dropped: int = 0  # open loop: arrivals refused because max_in_flight were outstanding

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"[:300]


@dataclass(frozen=True)
class LoadResult:
    """One measured point. Latencies in milliseconds; ``client_cpu`` in cores used by this process."""

    mode: str  # "closed" | "open"
    concurrency: int  # closed: workers; open: most requests in flight
    rate: float  # open: target arrivals per second; closed: 0
    requests: int  # answered successfully inside the window
    errors: int
    dropped: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    client_cpu: float
    first_error: str = ""

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"throughput": self.throughput}


def summarize(
    tally: _Tally, *, mode: str, concurrency: int, rate: float, seconds: float, cpu_seconds: float
) -> LoadResult:
    lat = np.asarray(tally.latencies, dtype=np.float64) * 1000.0
    pct = np.percentile(lat, [50, 95, 99]) if lat.size else np.full(3, np.nan)
    return LoadResult(
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        requests=int(lat.size),
        errors=tally.errors,
        dropped=tally.dropped,
        seconds=seconds,
        p50_ms=float(pct[0]),
        p95_ms=float(pct[1]),
        p99_ms=float(pct[2]),
        mean_ms=float(lat.mean()) if lat.size else float("nan"),
        max_ms=float(lat.max()) if lat.size else float("nan"),
        client_cpu=cpu_seconds / seconds if seconds > 0 else 0.0,
        first_error=tally.first_error,
    )


async def _timed_send(send: Send, index: int, tally: _Tally, *, started: float, timeout_s: float) -> None:
    """Send one request; record its latency from ``started`` (its scheduled time) or its failure."""
    try:
        async with asyncio.timeout(timeout_s):  # unlike wait_for, no extra task per request
            await send(index)
    except Exception as exc:  # every failure is counted and the first one reported
        tally.failed(exc)
        await asyncio.sleep(ERROR_BACKOFF_S)
        return
    tally.latencies.append(time.perf_counter() - started)


async def _closed_window(
    send: Send, *, concurrency: int, duration_s: float, max_requests: int, timeout_s: float
) -> tuple[_Tally, float]:
    tally = _Tally()
    start = time.perf_counter()
    end = start + duration_s

    async def worker() -> None:
        while time.perf_counter() < end and tally.issued < max_requests:
            index = tally.issued
            tally.issued += 1
            await _timed_send(send, index, tally, started=time.perf_counter(), timeout_s=timeout_s)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally, time.perf_counter() - start


async def closed_loop(
    send: Send,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    max_requests: int = MAX_REQUESTS,
    timeout_s: float = 30.0,
) -> LoadResult:
    """``concurrency`` workers, each sending its next request when the previous one is answered.

    A warm-up window (not counted) comes first. The window lasts ``duration_s`` plus the time the
    requests still in flight at its end take; throughput is answers over that whole time.
    """
    if warmup_s > 0:
        await _closed_window(
            send, concurrency=concurrency, duration_s=warmup_s, max_requests=max_requests, timeout_s=timeout_s
        )
    cpu = time.process_time()
    tally, seconds = await _closed_window(
        send, concurrency=concurrency, duration_s=duration_s, max_requests=max_requests, timeout_s=timeout_s
    )
    cpu = time.process_time() - cpu
    return summarize(tally, mode="closed", concurrency=concurrency, rate=0.0, seconds=seconds, cpu_seconds=cpu)


async def open_loop(
    send: Send,
    *,
    rate: float,
    duration_s: float,
    max_in_flight: int = 256,
    timeout_s: float = 30.0,
    seed: int = 0,
) -> LoadResult:
    """Poisson arrivals at ``rate`` per second for ``duration_s``, whatever the answers do.

    Latency counts from each request's scheduled arrival, so a generator that falls behind does
    not hide queueing (no coordinated omission). Arrivals beyond ``max_in_flight`` outstanding
    requests are dropped and counted, which bounds the loop when the target cannot keep up.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(seed)
    tally = _Tally()
    tasks: set[asyncio.Task[None]] = set()
    cpu = time.process_time()
    start = time.perf_counter()
    arrival = start
    while (arrival := arrival + rng.expovariate(rate)) < start + duration_s and tally.issued < MAX_REQUESTS:
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            tally.dropped += 1
            continue
        task = asyncio.create_task(_timed_send(send, tally.issued, tally, started=arrival, timeout_s=timeout_s))
        tally.issued += 1
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    return summarize(tally, mode="open", concurrency=max_in_flight, rate=rate, seconds=seconds, cpu_seconds=cpu)
