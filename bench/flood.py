"""``python -m bench.flood``: overload that keeps its promise, ours and TorchServe under the same flood, in one run.

python -m bench.flood                                    # resnet18 224 px (finetune builds it), c=8 and 256, 20 s
python -m bench.flood --quick --store S --model M --skip-torchserve       # seconds: a smoke run, writes nothing

Closed-loop clients over TorchServe's ``POST /predictions/{model}`` (the JPEG as the body) that retry at
once, whatever the answer (no back-off: ``Retry-After`` is ignored, the worst case). Each server runs
alone, first at the first ``--concurrency`` level (its peak, 8 by default), then at the others (the flood,
256). Per point: goodput (answered requests/s) and its ratio to the server's own peak, latency of the
answered (p50/p99), refusals/s by status, the server's RSS (before, highest sampled, after) and CPU.
Goals (issue K, item 5): goodput >= 0.6x the peak, accepted p99 <= 1 s, RSS bounded.

Writes the section ``## Overload`` of BENCHMARKS.md (the rest of the file is kept) and bench/flood.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine, precision_report, procs, training
from bench.clients import http_transport
from bench.servers import REPO, Running, start_ours, start_torchserve
from service.precision import host_features

logger = logging.getLogger("bench.flood")
HEADING = "## Overload (python -m bench.flood)"
FLAGS = ("amx_tile", "avx512_bf16", "avx512_vnni")
GOAL_RATIO, GOAL_P99_S, GOAL_RSS_GROWTH = 0.6, 1.0, 1.25  # goodput vs peak; accepted p99; flood RSS vs peak RSS
RSS_EVERY_S = 0.5
WORK = Path(tempfile.gettempdir()) / "flood-bench"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flood",
        description=__doc__.split("\n\n")[0] if __doc__ else "",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--store", type=Path, help="serve this model store (default: finetune builds --backbone)")
    parser.add_argument("--model", help="model name in --store (default: the only one)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--work-dir", type=Path, default=WORK, help="the package (reused) and the servers' logs")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at the peak level before measuring")
    parser.add_argument(
        "--concurrency", type=_ints, default=(8, 256), help="closed-loop clients; the first level is the peak"
    )
    parser.add_argument("--serve-args", default="", help="more flags for our serve, e.g. '--max-queue-wait-ms 300'")
    parser.add_argument("--skip-torchserve", action="store_true", help="do not start real TorchServe")
    parser.add_argument("--quick", action="store_true", help="2 s points at c=4 and 32, no report written")
    parser.add_argument("--output-md", type=Path, help="its section is replaced (default BENCHMARKS.md; none --quick)")
    parser.add_argument("--output-json", type=Path, help="every figure (default bench/flood.json; none with --quick)")
    parser.add_argument("--note", default="", help="a line for the report, e.g. what else ran on the machine")
    return parser


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


# ---- one point: closed-loop clients that retry at once ----------------------------------------------


@dataclass
class Tally:
    """What the clients saw in one window."""

    answered: list[float] = field(default_factory=list)  # seconds, per 200
    refused: dict[int, int] = field(default_factory=dict)  # status -> count
    refused_seconds: list[float] = field(default_factory=list)
    errors: int = 0  # no answer at all (connection reset, ...)


async def _client(transport: Any, path: str, image: bytes, stop: float, tally: Tally) -> None:
    while time.monotonic() < stop:
        start = time.perf_counter()
        try:
            answer = await transport.post(path, image, {"Content-Type": "application/octet-stream"})
        except (OSError, ConnectionError):
            tally.errors += 1
            await asyncio.sleep(0.01)  # a dead server must not spin the loop
            continue
        seconds = time.perf_counter() - start
        if answer.status == 200:
            tally.answered.append(seconds)
        else:
            tally.refused[answer.status] = tally.refused.get(answer.status, 0) + 1
            tally.refused_seconds.append(seconds)


async def _rss_sampler(server: Running, stop: float, peak: list[float]) -> None:
    while time.monotonic() < stop:
        peak[0] = max(peak[0], _rss_mib(server))
        await asyncio.sleep(RSS_EVERY_S)


def _rss_mib(server: Running) -> float:
    return sum(procs.rss_mib(pid) for pid in server.pids())


async def point(server: Running, image: bytes, *, concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` clients for ``seconds``; the figures of that window."""
    transport = http_transport("lean", server.endpoint, concurrency)
    path, tally = f"/predictions/{server.model}", Tally()
    rss_before = _rss_mib(server)
    peak = [rss_before]
    pids = server.pids()
    cpu_before, started = procs.cpu_seconds(pids), time.monotonic()
    stop = started + seconds
    try:
        clients = [_client(transport, path, image, stop, tally) for _ in range(concurrency)]
        await asyncio.gather(_rss_sampler(server, stop, peak), *clients)
    finally:
        await transport.aclose()
    elapsed = time.monotonic() - started
    return summarize(
        tally, concurrency=concurrency, elapsed=elapsed, cpu_s=procs.cpu_seconds(server.pids()) - cpu_before,
        rss=(rss_before, peak[0], _rss_mib(server)),
    )  # fmt: skip


def _quantile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def summarize(
    tally: Tally, *, concurrency: int, elapsed: float, cpu_s: float, rss: tuple[float, float, float]
) -> dict[str, Any]:
    """A point's figures: rates per second of the window, latencies in seconds, RSS in MiB."""
    refused = sum(tally.refused.values())
    return {
        "concurrency": concurrency, "seconds": elapsed, "answered": len(tally.answered), "refused": refused,
        "refused_by_status": {str(k): v for k, v in sorted(tally.refused.items())}, "errors": tally.errors,
        "goodput": len(tally.answered) / elapsed, "refusals_per_s": refused / elapsed,
        "accepted_p50_s": _quantile(tally.answered, 0.5), "accepted_p99_s": _quantile(tally.answered, 0.99),
        "refused_p50_s": _quantile(tally.refused_seconds, 0.5), "server_cpu_s": cpu_s,
        "rss_before_mib": rss[0], "rss_peak_mib": rss[1], "rss_after_mib": rss[2],
    }  # fmt: skip


async def measure(
    server: Running, image: bytes, *, levels: Sequence[int], seconds: float, warmup: float
) -> list[dict[str, Any]]:
    """Warm up at the peak level, then each level in turn; each point carries its ratio to the first (the peak)."""
    await point(server, image, concurrency=levels[0], seconds=warmup)
    points: list[dict[str, Any]] = []
    for level in levels:
        figures = await point(server, image, concurrency=level, seconds=seconds)
        figures["server"] = server.label
        figures["goodput_ratio"] = figures["goodput"] / points[0]["goodput"] if points and points[0]["goodput"] else 1.0
        logger.info(
            "%s c=%d: %.1f answered/s (%.2fx peak), accepted p99 %s, %.0f refused/s, RSS peak %.0f MiB",
            server.label, level, figures["goodput"], figures["goodput_ratio"], _ms(figures["accepted_p99_s"]),
            figures["refusals_per_s"], figures["rss_peak_mib"],
        )  # fmt: skip
        points.append(figures)
    return points


# ---- the run ---------------------------------------------------------------------------------------


def package(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """(store, package dir, model): ``--store``'s newest version of ``--model``, or one finetune builds now."""
    if args.store is not None:
        names = sorted(p.name for p in args.store.iterdir() if p.is_dir() and not p.name.startswith("."))
        model = args.model or (names[0] if len(names) == 1 else "")
        if model not in names:
            raise ValueError(f"--model: choose one of {names} in {args.store}")
        versions = [p for p in (args.store / model).iterdir() if p.name.isdigit()]
        return args.store, max(versions, key=lambda p: int(p.name)), model
    existing = sorted((work / "package" / "store").glob(f"{args.backbone}/*/manifest.json"))
    if existing:
        return work / "package" / "store", existing[-1].parent, args.backbone
    data = training.make_subset(training.DEMO_DATA, work / "data", per_class=20)
    run = training.run_finetune(
        data, backbone=args.backbone, probe=False, work=work / "package", name=args.backbone,
        img_size=args.img_size, formats="torchscript,onnx",
    )  # fmt: skip
    assert run.package_dir is not None
    return work / "package" / "store", Path(run.package_dir), args.backbone


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    store, package_dir, model = package(args, work)
    image = sorted(training.DEMO_DATA.glob("*/*.jpg"))[0].read_bytes()
    levels, seconds, warmup = _plan(args)
    results: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "bench.flood", *sys.argv[1:]]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine.machine(),
        "flags": _flags(), "model": model, "package": str(package_dir), "levels": list(levels), "seconds": seconds,
        "note": args.note, "points": [],
    }  # fmt: skip
    extra = ("--precision", "fp32", *shlex.split(args.serve_args))
    ours = functools.partial(
        start_ours, store, model=model, backend="onnxruntime", max_batch_size=8, work=work, label="ours", extra=extra
    )
    starters: list[Callable[[], Running]] = [ours]
    if not args.skip_torchserve:
        (work / "torchserve").mkdir(parents=True, exist_ok=True)
        starters.append(functools.partial(start_torchserve, package_dir, work=work / "torchserve", batch_size=8))
    for start in starters:  # one server at a time: each has the machine to itself
        server = start()
        try:
            results["points"] += asyncio.run(measure(server, image, levels=levels, seconds=seconds, warmup=warmup))
        finally:
            results.setdefault("killed_at_stop", {})[server.label] = server.stop()
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["load_average_end"] = list(os.getloadavg())
    return results


def _plan(args: argparse.Namespace) -> tuple[tuple[int, ...], float, float]:
    if args.quick:
        return (4, 32), 2.0, 0.5
    return tuple(args.concurrency), args.seconds, args.warmup


def _flags() -> dict[str, bool]:
    host = host_features()
    return {flag: flag in host.flags for flag in FLAGS}


# ---- the report ------------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    """The ``## Overload`` section: one row per server and level, then the goals judged per server."""
    host = results["machine"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in results["flags"].items())
    lines = [
        HEADING, "",
        f"{results['started']}, {host.get('cpu', '?')} ({flags}), {host.get('usable_cpus', '?')} usable CPUs, "
        f"load average {_load(host.get('load_average'))} at the start; "
        f"model {results['model']}; {results['seconds']:.0f} s per point; `{results['command']}`.",
        *([results["note"]] if results.get("note") else []), "",
        "Closed-loop clients over `POST /predictions` that retry at once (no back-off); the first level is each "
        "server's peak. Ours: ONNX Runtime fp32, batch <= 8, default admission; TorchServe 0.12: TorchScript, "
        "batch 8.", "",
        "| server | clients | answered/s | vs its peak | accepted p50 | accepted p99 | refused/s (status) "
        "| refused p50 | RSS before / peak / after | server CPU |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]  # fmt: skip
    lines += [_row(p) for p in results["points"]]
    lines += ["", *_goals(results["points"])]
    return "\n".join(lines) + "\n"


def _load(values: list[float] | None) -> str:
    return " ".join(f"{v:.1f}" for v in values) if values else "?"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f} ms"


def _row(p: dict[str, Any]) -> str:
    statuses = ", ".join(f"{v} x {k}" for k, v in p["refused_by_status"].items()) or "none"
    errors = f"; {p['errors']} no answer" if p["errors"] else ""
    return (
        f"| {p['server']} | {p['concurrency']} | {p['goodput']:.1f} | {p['goodput_ratio']:.2f}x "
        f"| {_ms(p['accepted_p50_s'])} | {_ms(p['accepted_p99_s'])} | {p['refusals_per_s']:.0f} ({statuses}{errors}) "
        f"| {_ms(p['refused_p50_s'])} | {p['rss_before_mib']:.0f} / {p['rss_peak_mib']:.0f} / "
        f"{p['rss_after_mib']:.0f} MiB | {p['server_cpu_s'] / p['seconds']:.2f} cores |"
    )


def _goals(points: list[dict[str, Any]]) -> list[str]:
    """Per server, at its most loaded level: goodput >= 0.6x its peak, accepted p99 <= 1 s, RSS bounded."""
    lines = []
    for server in dict.fromkeys(p["server"] for p in points):
        mine = [p for p in points if p["server"] == server]
        peak, flood = mine[0], mine[-1]
        p99 = flood["accepted_p99_s"]
        checks = [
            ("goodput", flood["goodput_ratio"] >= GOAL_RATIO, f"{flood['goodput_ratio']:.2f}x >= {GOAL_RATIO}x"),
            ("accepted p99", p99 is not None and p99 <= GOAL_P99_S, f"{_ms(p99)} <= {GOAL_P99_S:.0f} s"),
            ("RSS", flood["rss_peak_mib"] <= GOAL_RSS_GROWTH * max(peak["rss_peak_mib"], 1.0),
             f"{flood['rss_peak_mib']:.0f} <= {GOAL_RSS_GROWTH}x {peak['rss_peak_mib']:.0f} MiB"),
        ]  # fmt: skip
        verdicts = "; ".join(f"{name} {text} {'met' if ok else 'NOT met'}" for name, ok, text in checks)
        lines.append(f"- {server} at c={flood['concurrency']}: {verdicts}.")
    return lines


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run(args, work)
    except ValueError as exc:
        print(f"python -m bench.flood: {exc}", file=sys.stderr)
        return 2
    section = render(results)
    print(section)
    md = args.output_md or (None if args.quick else REPO / "BENCHMARKS.md")
    js = args.output_json or (None if args.quick else REPO / "bench" / "flood.json")
    if js is not None:
        js.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    if md is not None:
        existing = md.read_text(encoding="utf-8") if md.is_file() else ""
        md.write_text(precision_report.replace_section(existing, section, heading=HEADING), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
