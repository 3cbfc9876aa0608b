"""The serving sweep: every server up at once, then the points interleaved server by server.

Interleaving (rather than one server's whole sweep after another's) exposes every server to the
same background load, so the ratios between them hold even on a busy machine. Around each point
the server's own CPU time and the machine's busy time are sampled: CPU per request, and how many
cores something else was using meanwhile.

    servers = start_servers(plan, store=store, package_dir=pkg, work=tmp)
    try:
        points = asyncio.run(sweep(servers, images, plan))
    finally:
        stop_servers(servers)
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import procs
from bench.clients import make_client
from bench.labels import BACKENDS, OursConfig, config_label, parse_config, parse_label
from bench.loadgen import LoadResult, closed_loop, open_loop
from bench.servers import Running, start_ours, start_torchserve

logger = logging.getLogger(__name__)
__all__ = ["BACKENDS", "OursConfig", "config_label", "parse_config", "parse_label"]  # where bench found them before

# ours-<short>[-<precision>]-b<max batch size>: batching on (8) and off (1), each backend, fp32
DEFAULT_CONFIGS = ("ours-ort-b8", "ours-ort-b1", "ours-ts-b8", "ours-ts-b1")
PAIRED_BLOCK = 8  # paired overhead: served requests, then raw pipeline steps, this many at a time
PAIRED_PAUSE_S = 0.01  # between blocks, so the other side's threads go idle
PROBE_CLIENT = "blocking"  # the paired overhead's client: the least client CPU per request
GOAL_SERVER = "ours-ort-b8"  # the goals are judged on our default: ONNX Runtime, batching on
GOAL_CONCURRENCY = 8  # ... and their throughput ratios at this concurrency
TORCHSERVE = "torchserve"  # TorchServe with the TorchScript archive (the baseline)
TORCHSERVE_LABELS = {"torchscript": TORCHSERVE, "onnx": "torchserve-onnx"}  # archive format -> label


@dataclass(frozen=True)
class Plan:
    """What to measure."""

    configs: tuple[str, ...]  # ours-<short>[-<precision>]-b<N>, see parse_label
    torchserve: tuple[str, ...]  # archive formats to start TorchServe with: torchscript, onnx
    protocols: tuple[str, ...]
    concurrency: tuple[int, ...]
    duration_s: float
    warmup_s: float
    repeats: int
    open_rate: float  # arrivals per second; 0 skips the open-loop points
    open_protocols: tuple[str, ...]
    open_servers: tuple[str, ...] = ("ours-ort-b8", "ours-ts-b8", *TORCHSERVE_LABELS.values())
    device: str = "cpu"
    ts_batch_size: int = 8
    ts_max_batch_delay_ms: int = 50
    timeout_s: float = 30.0
    serve_args: tuple[str, ...] = ()  # more flags for every ``serve``, e.g. --decode-workers 12
    http_client: str = "lean"  # the load generator's HTTP library (bench.clients.HTTP_CLIENTS)
    ts_precision: str = "fp32"  # our TorchServe handler's precision (the fp32 baseline unless asked otherwise)


def start_servers(plan: Plan, *, store: Path, package_dir: Path, model: str, work: Path) -> list[Running]:
    """Start every server of the plan (each waits until ready); on failure stop those already up."""
    servers: list[Running] = []
    work.mkdir(parents=True, exist_ok=True)
    try:
        for label in plan.configs:
            config = parse_label(label)
            extra = ("--precision", config.precision, "--device", plan.device, *plan.serve_args)
            servers.append(
                start_ours(
                    store, model=model, backend=config.backend, max_batch_size=config.max_batch_size, work=work,
                    label=label, extra=extra,
                )
            )  # fmt: skip
            logger.info("started %s (pid %d)", label, servers[-1].root_pid)
        for fmt in plan.torchserve:
            label = TORCHSERVE_LABELS[fmt]
            ts_work = work / label
            ts_work.mkdir(parents=True, exist_ok=True)
            servers.append(
                start_torchserve(
                    package_dir,
                    work=ts_work,
                    fmt=fmt,
                    label=label,
                    batch_size=plan.ts_batch_size,
                    max_batch_delay_ms=plan.ts_max_batch_delay_ms,
                    precision=plan.ts_precision,
                )
            )
            logger.info("started %s (java pid %d)", label, servers[-1].root_pid)
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: list[Running]) -> dict[str, list[int]]:
    """Stop every server; returns, per server, the pids that had to be killed (normally none)."""
    killed = {}
    for server in servers:
        killed[server.label] = server.stop()
        logger.info("stopped %s", server.label)
    return killed


def memory(server: Running) -> dict[str, Any]:
    """Peak and current RSS of each process of the server, and whether torch's library is mapped."""
    processes = []
    for pid in server.pids():
        processes.append(
            {
                "pid": pid,
                "command": procs.command_name(pid),
                "peak_rss_mib": procs.peak_rss_mib(pid),
                "rss_mib": procs.rss_mib(pid),
                "libtorch_mapped": procs.maps_library(pid, "libtorch"),
            }
        )
    return {
        "server": server.label,
        "processes": processes,
        "peak_rss_mib_total": sum(p["peak_rss_mib"] for p in processes),
    }


async def measure(
    server: Running, protocol: str, images: list[bytes], plan: Plan, *, concurrency: int, rate: float
) -> dict[str, Any]:
    """One point: warm up, then a closed loop at ``concurrency`` (or an open loop at ``rate``)."""
    client = make_client(
        protocol, server.endpoint, model=server.model, images=images, concurrency=max(concurrency, 1),
        http=plan.http_client,
    )  # fmt: skip
    try:
        if plan.warmup_s > 0:
            await closed_loop(
                client.send,
                concurrency=max(concurrency, 1),
                duration_s=plan.warmup_s,
                warmup_s=0,
                timeout_s=plan.timeout_s,
            )
        pids = server.pids()
        server_cpu, busy, steal = procs.cpu_seconds(pids), procs.system_busy_seconds(), procs.steal_seconds()
        start = time.perf_counter()
        if rate > 0:
            result = await open_loop(client.send, rate=rate, duration_s=plan.duration_s, timeout_s=plan.timeout_s)
        else:
            result = await closed_loop(
                client.send, concurrency=concurrency, duration_s=plan.duration_s, warmup_s=0, timeout_s=plan.timeout_s
            )
        seconds = time.perf_counter() - start
        server_cpu = procs.cpu_seconds(pids) - server_cpu
        busy = procs.system_busy_seconds() - busy
        steal = procs.steal_seconds() - steal
    finally:
        await client.aclose()
    point = _point(server, protocol, result, server_cpu=server_cpu, busy=busy, seconds=seconds)
    return point | {"steal_cores": steal / seconds if seconds > 0 else 0.0}


async def paired_overhead(
    server: Running,
    images: list[bytes],
    plan: Plan,
    *,
    raw_step: Callable[[int], tuple[float, float]],
    rounds: int,
    block: int = PAIRED_BLOCK,
    pause_s: float = PAIRED_PAUSE_S,
) -> list[dict[str, Any]]:
    """Served latency at concurrency 1 interleaved with the raw pipeline, ``block`` requests at a time.

    ``raw_step(i)`` decodes and preprocesses image ``i`` and runs the backend on it at batch 1 in
    this process, returning both times in seconds. Each round alternates a block of raw steps and a
    block of served requests for ``plan.duration_s``, so both sides see the same seconds of a machine
    whose speed drifts by more than the overhead being measured; a short pause between blocks lets
    the other side's threads go idle. Per round: the p50 of each side and their differences.
    """
    pairs = []
    for round_ in range(rounds):
        for protocol in plan.protocols:
            if protocol not in server.protocols:
                continue
            client = make_client(protocol, server.endpoint, model=server.model, images=images, concurrency=1,
                                 http=PROBE_CLIENT)  # fmt: skip
            try:
                pair = await interleaved(client.send, raw_step, duration_s=plan.duration_s, warmup_s=plan.warmup_s,
                                         timeout_s=plan.timeout_s, block=block, pause_s=pause_s)  # fmt: skip
            finally:
                await client.aclose()
            pairs.append({"round": round_, "server": server.label, "protocol": protocol, **pair})
            logger.info("%-12s %-8s c=1 p50 %6.2f ms, raw model %6.2f ms, decode+model %6.2f ms: overhead %5.2f ms, "
                        "%5.2f ms beyond decode", server.label, protocol, pair["served_p50_ms"], pair["raw_p50_ms"],
                        pair["raw_jpeg_p50_ms"], pair["overhead_ms"], pair["beyond_decode_ms"])  # fmt: skip
    return pairs


async def paired_throughput(
    server: Running,
    baseline: Running | None,
    images: list[bytes],
    plan: Plan,
    *,
    raw_window: Callable[[float], float],
    rounds: int,
    window_s: float,
    concurrency: int = GOAL_CONCURRENCY,
) -> list[dict[str, Any]]:
    """The goals' throughput ratios from adjacent short windows, median over many rounds.

    Per round and protocol of ``server``: one closed-loop window of ours, one of ``baseline``
    (TorchServe, over its own API; None skips it) and ``raw_window(window_s)`` (the raw backend
    in this process, items/s), in an order of their own each time, ``window_s`` each after a
    short unmeasured warm-up. The three sit within seconds of each other, so a slow spell of the
    machine (on this VM: 30-40 % slower for seconds at a time) mostly slows all of them, or
    spoils one round that the median then outvotes.
    """
    window = replace(plan, duration_s=window_s, warmup_s=min(plan.warmup_s, window_s))
    found = []
    for round_ in range(rounds):
        for protocol in [p for p in plan.protocols if p in server.protocols]:
            sides: dict[str, float | None] = {"ours": None, "torchserve": None, "raw": None}
            order = ["ours", "raw"] + (["torchserve"] if baseline is not None else [])
            for side in shuffled(order, 1 + round_ * len(plan.protocols) + plan.protocols.index(protocol)):
                if side == "raw":
                    sides["raw"] = raw_window(window_s)
                    continue
                target, api = (server, protocol) if side == "ours" else (baseline, "ts-http")
                assert target is not None
                point = await measure(target, api, images, window, concurrency=concurrency, rate=0.0)
                sides[side] = point["throughput"] if point["errors"] == 0 else None
            ours, theirs, raw = sides["ours"], sides["torchserve"], sides["raw"]
            entry = {
                "round": round_, "server": server.label, "protocol": protocol, "concurrency": concurrency,
                "ours": ours, "torchserve": theirs, "raw": raw,
                "vs_torchserve": ours / theirs if ours is not None and theirs else None,
                "vs_raw": ours / raw if ours is not None and raw else None,
            }  # fmt: skip
            found.append(entry)
            logger.info("paired c=%d %-8s ours %5.1f req/s, TorchServe %s, raw %5.1f img/s", concurrency, protocol,
                        ours or 0.0, "-" if theirs is None else f"{theirs:5.1f} req/s", raw or 0.0)  # fmt: skip
    return found


async def interleaved(
    send: Callable[[int], Awaitable[None]],
    raw_step: Callable[[int], tuple[float, float]],
    *,
    duration_s: float,
    warmup_s: float,
    timeout_s: float,
    block: int = PAIRED_BLOCK,
    pause_s: float = PAIRED_PAUSE_S,
) -> dict[str, Any]:
    """``block`` raw steps, then ``block`` served requests, alternating for ``duration_s``: the p50 of each side."""
    if warmup_s > 0:
        await closed_loop(send, concurrency=1, duration_s=warmup_s, warmup_s=0, timeout_s=timeout_s)
    served: list[float] = []
    pre: list[float] = []
    model: list[float] = []
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        for _ in range(block):  # blocks the event loop on purpose: nothing else is in flight at concurrency 1
            decode_s, model_s = raw_step(len(pre))
            pre.append(decode_s)
            model.append(model_s)
        await asyncio.sleep(pause_s)
        for _ in range(block):
            started = time.perf_counter()
            async with asyncio.timeout(timeout_s):
                await send(len(served))
            served.append(time.perf_counter() - started)
        await asyncio.sleep(pause_s)
    ms = {name: 1000.0 * float(np.median(v)) for name, v in
          (("served", served), ("pre", pre), ("model", model), ("jpeg", np.add(pre, model)))}  # fmt: skip
    return {
        "requests": len(served), "served_p50_ms": ms["served"], "raw_p50_ms": ms["model"],
        "pre_p50_ms": ms["pre"], "raw_jpeg_p50_ms": ms["jpeg"], "overhead_ms": ms["served"] - ms["model"],
        "beyond_decode_ms": ms["served"] - ms["jpeg"],
    }  # fmt: skip


def _point(
    server: Running, protocol: str, result: LoadResult, *, server_cpu: float, busy: float, seconds: float
) -> dict[str, Any]:
    client_cores = result.client_cpu
    server_cores = server_cpu / seconds if seconds > 0 else 0.0
    point = {"server": server.label, "kind": server.kind, "protocol": protocol, **result.to_dict()}
    point["server_cpu_cores"] = server_cores
    point["server_cpu_ms_per_request"] = 1000.0 * server_cpu / result.requests if result.requests else float("nan")
    point["other_load_cores"] = max(0.0, busy / seconds - server_cores - client_cores) if seconds > 0 else 0.0
    if result.errors:
        logger.warning("%s %s: %d errors, first: %s", server.label, protocol, result.errors, result.first_error)
    return point


def _targets(
    servers: list[Running], protocols: tuple[str, ...], only: tuple[str, ...] | None = None
) -> list[tuple[Running, str]]:
    return [
        (server, protocol)
        for protocol in protocols
        for server in servers
        if protocol in server.protocols and (only is None or server.label in only)
    ]


def shuffled(items: list[Any], round_: int) -> list[Any]:
    """``items`` as they are in round 0, in an order of its own (seeded by the round) in every later one."""
    order = list(items)
    if round_ > 0:
        random.Random(round_).shuffle(order)
    return order


async def sweep(
    servers: list[Running], images: list[bytes], plan: Plan, *, between: Callable[[], object] | None = None
) -> list[dict[str, Any]]:
    """Closed-loop points (every concurrency, protocol and server, ``repeats`` rounds), then open-loop ones.

    ``between`` (e.g. a round of raw backend timings) runs after each concurrency level's points,
    while the servers idle. Each round takes a level's points in a different order, so no point
    always follows the same one (a TorchScript server's OpenMP threads still spinning, a JVM's
    collector) and whatever a neighbour costs is spread over all of them.
    """
    points = []
    for round_ in range(plan.repeats):
        for concurrency in plan.concurrency:
            for server, protocol in shuffled(_targets(servers, plan.protocols), round_):
                point = await measure(server, protocol, images, plan, concurrency=concurrency, rate=0.0)
                points.append(point | {"round": round_})
                logger.info(
                    "%-12s %-8s c=%-3d %7.1f req/s  p50 %6.1f ms  p99 %6.1f ms  errors %d",
                    server.label, protocol, concurrency, point["throughput"], point["p50_ms"], point["p99_ms"],
                    point["errors"],
                )  # fmt: skip
            if between is not None:
                between()
        if plan.open_rate > 0:
            for server, protocol in _targets(servers, plan.open_protocols, plan.open_servers):
                point = await measure(server, protocol, images, plan, concurrency=0, rate=plan.open_rate)
                points.append(point | {"round": round_})
                logger.info(
                    "%-12s %-8s open %.1f/s: %7.1f req/s  p50 %6.1f ms  p99 %6.1f ms  dropped %d",
                    server.label, protocol, plan.open_rate, point["throughput"], point["p50_ms"], point["p99_ms"],
                    point["dropped"],
                )  # fmt: skip
    return points
