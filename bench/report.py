"""Render BENCHMARKS.md from the results dictionary (the same that is saved as bench/results.json).

Everything printed is computed from the results, except ``bench/analysis.md`` (profiles and
proposed fixes, written by hand), which is appended as it is when present.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.figures import (
    TORCHSERVE_FORMATS,
    backend_of,
    closed,
    describe,
    open_loop,
    overhead,
    paired_overhead,
    paired_ratios,
    paired_throughput,
    peak_rss,
    ratio,
    raw_timing,
    served,
    val,
)
from bench.serving import GOAL_CONCURRENCY, GOAL_SERVER, PAIRED_BLOCK, PAIRED_PAUSE_S, TORCHSERVE

ANALYSIS = Path(__file__).resolve().with_name("analysis.md")


ANCHORS = """\
Measured before this harness existed (from the issue; other runs, not comparable to the table above
except as orders of magnitude):

- ResNet-18 224 px on this kind of 2-core CPU: raw ONNX Runtime 56-61 img/s, frozen TorchScript
  45-60 img/s, eager PyTorch 36-40 img/s; TorchServe 0.12 TorchScript batch 8 / 50 ms 34.8 req/s at
  concurrency 8, single request 33-38 ms.
- GPU (public figures): Triton on A100, ResNet-50 FP16, 4,894 img/s at concurrency 96 with p99
  22.8 ms; MLPerf Inference H100 ResNet-50 INT8 TensorRT (offline) 88,714 img/s; ResNet-50 AMP
  training on A100 about 2,470 img/s.
"""


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- looking up figures -----------------------------------------------------------------------
def spread(figures: dict[str, float] | None) -> str:
    """Median throughput and, over several rounds, its range: "37.6 (36.4–38.9)"."""
    if figures is None:
        return "–"
    if figures["throughput_min"] == figures["throughput_max"]:
        return fmt(figures["throughput"])
    return f"{fmt(figures['throughput'])} ({fmt(figures['throughput_min'])}–{fmt(figures['throughput_max'])})"


# ---- sections ---------------------------------------------------------------------------------
def header(results: dict[str, Any]) -> str:
    m, v, opts = results["machine"], results["versions"], results["options"]
    model = results.get("model", {})
    pre = model.get("manifest", {}).get("preprocess", {})
    gpu = m.get("gpu") or "none (CPU only)"
    lines = [
        "# Benchmarks\n",
        "Regenerate (writes this file and `bench/results.json`):\n",
        f"```bash\n. .venv/bin/activate && {results['command']}\n```\n",
        f"- Date: {results['started']} to {results.get('finished', '?')} (UTC)",
        f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), "
        f"{m['memory_gib']} GiB RAM, GPU: {gpu}, Linux {m['kernel']}",
        f"- Load average (1/5/15 min) at start {_load(m.get('load_average'))}, "
        f"at end {_load(m.get('load_average_end'))}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Model: `{model.get('name')}` ({opts['backbone'] if not opts.get('store') else 'given store'}, "
        f"random weights; input {pre.get('crop')} px after resize {pre.get('resize')}), package formats "
        f"{', '.join(model.get('manifest', {}).get('formats', {}))}",
        f"- Payloads: the {model.get('images')} real JPEGs of `finetune/demo_data` (256×256, ~8.5 KB), one per "
        "request, cycled",
    ]
    if opts.get("note"):
        lines.append(f"- Note: {opts['note']}")
    lines.append(_contention(results))
    return "\n".join(lines) + "\n"


def _load(values: list[float] | None) -> str:
    return " / ".join(f"{x:.2f}" for x in values) if values else "?"


def _contention(results: dict[str, Any]) -> str:
    found = results.get("serving", {}).get("points", [])
    if not found:
        return ""
    loads = [p["other_load_cores"] for p in found]
    steal = [p["steal_cores"] for p in found if "steal_cores" in p]
    cores = results["machine"]["usable_cpus"]
    stolen = (
        f"; CPU time the hypervisor gave to other guests (steal): median {statistics.median(steal):.2f} cores"
        if steal
        else ""
    )
    return (
        f"- Other work on the machine during the serving points (busy CPU not used by the servers or the load "
        f"generator): median {statistics.median(loads):.2f}, max {max(loads):.2f} of {cores} cores{stolen}. "
        "Every comparison below is between figures measured in this same run, interleaved point by point; "
        "repeated points still differ by up to ±15 % on this shared VM, so the ratio table gives each "
        "median's range over the rounds."
    )


def goals(results: dict[str, Any]) -> str:
    """The issue's targets, each with the figure it is judged on (ours: ONNX Runtime, batch ≤ 8)."""
    c, ours = GOAL_CONCURRENCY, GOAL_SERVER
    theirs = val(closed(results, TORCHSERVE, "ts-http", c), "throughput")
    raw8 = val(raw_timing(results, "onnxruntime", 8), "items_per_second")
    over = paired_overhead(results, ours, "v2-http") or overhead(results, ours, "v2-http", "onnxruntime")
    wait = max((r["data_wait_fraction"] for r in results.get("training", [])), default=None)
    rows = []
    for protocol, api in (("ts-http", "same API, /predictions"), ("v2-http", "v2 HTTP"), ("v2-grpc", "v2 gRPC")):
        mine = val(closed(results, ours, protocol, c), "throughput")
        name = f"throughput / TorchServe (TorchScript .mar, /predictions), c={c}: ours over {api}"
        rounds = paired_ratios(results, (ours, protocol), (TORCHSERVE, "ts-http"), c)
        sweep = (ratio(mine, theirs), rounds)
        rows.append(_ratio_goal(name, 1.5, paired_throughput(results, protocol), "vs_torchserve", sweep))
    for protocol, api in (("v2-http", "v2 HTTP"), ("v2-grpc", "v2 gRPC"), ("ts-http", "/predictions")):
        mine = val(closed(results, ours, protocol, c), "throughput")
        name = f"throughput / raw ONNX Runtime batch 8, c={c}: ours over {api}"
        rows.append(_ratio_goal(name, 0.85, paired_throughput(results, protocol), "vs_raw", (ratio(mine, raw8), [])))
    rows += [
        _goal("p50 overhead at c=1 (v2 HTTP) beyond decode+preprocess", "≤ 3 ms", val(over, "server"),
              lambda x: x <= 3.0, " ms", 1),
        _goal("p50 overhead at c=1 (v2 HTTP) including decode+preprocess", "≤ 3 ms", val(over, "total"),
              lambda x: x <= 3.0, " ms", 1),
        _goal("server peak RSS, one model, ONNX Runtime backend", "≤ 400 MiB", peak_rss(results, ours),
              lambda x: x <= 400, " MiB", 0),
        _goal("data-loading wait, share of training step time (worst run)", "< 10 %",
              None if wait is None else 100 * wait, lambda x: x < 10, " %", 1),
    ]  # fmt: skip
    return (
        "## Goals\n\nOurs = our server with ONNX Runtime (the default backend), batch ≤ 8; figures are medians "
        "over the rounds. A throughput ratio is judged on the paired rounds when the run has them (the median of "
        "the ratios of adjacent windows, with their range; see the next section), with the sweep's ratio of "
        "medians beside it; otherwise on the sweep's.\n\n" + table(["goal", "target", "measured", "met"], rows)
    )


def _ratio_goal(
    name: str,
    floor: float,
    paired: dict[str, float | None] | None,
    key: str,
    sweep: tuple[float | None, list[float]],
) -> list[str]:
    """A ``≥ floor×`` goal on the paired rounds' median ratio when measured, else on the sweep's ratio of medians."""

    def check(x: float) -> bool:
        return x >= floor

    target = f"≥ {floor:g}×"
    value, rounds = sweep
    if paired is not None and paired[key] is not None:
        row = _goal(name, target, paired[key], check, "×", 2)
        low, high = paired[key + "_min"], paired[key + "_max"]
        sweep_text = "" if value is None else f"; sweep {fmt(value, 2)}×"
        row[2] += f" (paired rounds {fmt(low, 2)}–{fmt(high, 2)}{sweep_text})"
        return row
    row = _goal(name, target, value, check, "×", 2)
    if len(rounds) > 1:
        row[2] += f" (round by round {fmt(min(rounds), 2)}–{fmt(max(rounds), 2)})"
    return row


def _goal(
    name: str, target: str, value: float | None, check: Callable[[float], bool] | None, unit: str, digits: int
) -> list[str]:
    if value is None:
        return [name, target, "not measured", "–"]
    verdict = "–" if check is None else ("**met**" if check(value) else "**not met**")
    while check is not None and digits < 4 and check(round(value, digits)) != check(value):
        digits += 1  # 0.848 must not read as 0.85 beside "not met"
    return [name, target, f"{fmt(value, digits)}{unit}", verdict]


def raw_section(results: dict[str, Any]) -> str:
    raw = results.get("raw")
    if not raw:
        return ""
    rows = [
        [t["name"], str(t["batch"]), fmt(t["p50_ms"], 2), fmt(t["p95_ms"], 2), fmt(t["items_per_second"])]
        for t in raw["backends"]
    ]
    pre = raw["preprocess"]
    rows.append(["decode + preprocess (`service.preprocess.preprocess_bytes`, 1 thread)", "1", fmt(pre["p50_ms"], 2),
                 fmt(pre["p95_ms"], 2), fmt(pre["items_per_second"])])  # fmt: skip
    return (
        "## Raw backends, no server (the ceiling)\n\n"
        "`service.backends`' own classes with the server's defaults, on batches of the same JPEGs preprocessed "
        "as the server does; one call at a time.\n\n"
        + table(["backend", "batch", "p50 ms / call", "p95 ms / call", "images/s"], rows)
    )


def serving_section(results: dict[str, Any]) -> str:
    plan = results.get("serving", {}).get("plan")
    if not plan:
        return ""
    levels = plan["concurrency"]
    rows_t, rows_l = [], []
    for server, protocol in served(results):
        figures = [closed(results, server, protocol, c) for c in levels]
        name = f"{describe(results, server)} · `{protocol}`"
        rows_t.append([name] + [fmt(val(f, "throughput")) for f in figures] + [_errors(figures)])
        rows_l.append([name] + [f"{fmt(val(f, 'p50_ms'))} / {fmt(val(f, 'p99_ms'))}" for f in figures])
    intro = (
        f"## Serving: closed loop\n\nEach point: {plan['warmup_s']:g} s warm-up, then {plan['duration_s']:g} s "
        f"measured; {plan['repeats']} rounds of the whole sweep, each point interleaved server by server; the "
        "figures are the median of the rounds. One JPEG per request; our load generator (`bench/loadgen.py`, "
        f"asyncio + {_http_client(plan)} / grpc.aio) on the same machine. "
        "`v2-http`: Open Inference Protocol, binary BYTES tensor in, binary probabilities out; `v2-grpc`: "
        "`ModelInfer`; `ts-http`: TorchServe's `POST /predictions/{model}`, top-5 JSON out.\n\n"
        "Throughput (requests/s = images/s):\n\n"
    )
    conc = [f"c={c}" for c in levels]
    return (
        intro
        + table(["server · protocol", *conc, "errors"], rows_t)
        + "\nLatency p50 / p99 (ms):\n\n"
        + table(["server · protocol", *conc], rows_l)
        + _cpu_table(results)
    )


def _errors(figures: list[dict[str, float] | None]) -> str:
    return str(int(sum(f["errors"] for f in figures if f)))


def _cpu_table(results: dict[str, Any]) -> str:
    c = GOAL_CONCURRENCY
    rows = []
    for server, protocol in served(results):
        f = closed(results, server, protocol, c)
        if f:
            rows.append([f"{describe(results, server)} · `{protocol}`", fmt(f["server_cpu_ms_per_request"]),
                         fmt(f["other_load_cores"], 2)])  # fmt: skip
    return (
        f"\nServer CPU time per request at c={c} (all its processes and threads; TorchServe: java + worker), and "
        "the cores other work used meanwhile:\n\n"
        + table(["server · protocol", "CPU ms / request", "other load (cores)"], rows)
    )


def ratios_section(results: dict[str, Any]) -> str:
    c = GOAL_CONCURRENCY
    found = {label: closed(results, label, "ts-http", c) for label in TORCHSERVE_FORMATS}
    theirs = {label: f for label, f in found.items() if f is not None}
    rows = []
    for server, protocol in served(results):
        if server in TORCHSERVE_FORMATS:
            continue
        f = closed(results, server, protocol, c)
        backend = backend_of(server)
        raw8 = raw_timing(results, backend, 8)
        vs_raw = fmt(ratio(val(f, "throughput"), val(raw8, "items_per_second")), 2)
        vs_ts = [fmt(ratio(val(f, "throughput"), val(t, "throughput")), 2) for t in theirs.values()]
        name = f"{describe(results, server)} · `{protocol}`"
        rows.append([name, spread(f), *vs_ts, f"{vs_raw} (raw {backend} batch 8)"])
    paired = _paired_throughput_table(results)
    if not rows and not paired:
        return ""
    bases = "; ".join(f"{describe(results, k)}: {spread(t)} req/s" for k, t in theirs.items())
    header = ["ours", "req/s (range over rounds)", *(f"÷ {_short(k)}" for k in theirs), "÷ raw backend"]
    sweep = (
        f"From the sweep (medians of points measured up to minutes apart), every server. TorchServe `/predictions` "
        f"at c={c}: {bases or 'not measured'}.\n\n" + table(header, rows)
    )
    return f"## Ratios at concurrency {c}\n\n" + paired + (sweep if rows else "")


def _ranged(figures: dict[str, float | None], key: str, digits: int) -> str:
    """ "0.91 (0.80–0.97)": a paired median and its range over the rounds."""
    if figures[key] is None:
        return "–"
    if figures[key + "_min"] == figures[key + "_max"]:
        return fmt(figures[key], digits)
    return f"{fmt(figures[key], digits)} ({fmt(figures[key + '_min'], digits)}–{fmt(figures[key + '_max'], digits)})"


def _paired_throughput_table(results: dict[str, Any]) -> str:
    found = results.get("serving", {}).get("paired_throughput", [])
    rows = []
    for protocol in dict.fromkeys(p["protocol"] for p in found):
        f = paired_throughput(results, protocol)
        assert f is not None
        rows.append([f"{describe(results, GOAL_SERVER)} · `{protocol}`", _ranged(f, "ours", 1),
                     _ranged(f, "torchserve", 1), _ranged(f, "raw", 1), _ranged(f, "vs_torchserve", 2),
                     _ranged(f, "vs_raw", 2)])  # fmt: skip
    if not rows:
        return ""
    rounds = max(int(p["round"]) for p in found) + 1
    theirs = any(p.get("torchserve") is not None for p in found)
    window = results.get("options", {}).get("ratio_window")
    seconds = f"{window:g} s" if isinstance(window, int | float) else "short"
    return (
        f"Paired rounds (the throughput goals' figures), after the sweep with the servers not involved stopped: "
        f"{rounds} round(s); in each, per protocol, one {seconds} closed-loop window at c={GOAL_CONCURRENCY} of ours, "
        + (f"one of {describe(results, TORCHSERVE)} over `/predictions` " if theirs else "")
        + "and one of raw ONNX Runtime at batch 8 in the benchmark process, back to back in an order of their "
        "own. Ratios are taken within a round (seconds apart), then their median over the rounds; every figure "
        "with its range over the rounds.\n\n"
        + table(
            ["ours · protocol", "ours req/s", "TorchServe req/s", "raw img/s", "ours ÷ TorchServe", "ours ÷ raw"],
            rows,
        )
        + "\n"
    )


def _http_client(plan: dict[str, Any]) -> str:
    name = plan.get("http_client", "httpx")
    return "its own HTTP/1.1 client (`bench.clients.LeanTransport`)" if name == "lean" else name


def _short(label: str) -> str:
    return "TorchServe (TorchScript)" if TORCHSERVE_FORMATS[label] == "torchscript" else "TorchServe (ONNX)"


def _paired_overhead_table(results: dict[str, Any]) -> str:
    rows = []
    for protocol in dict.fromkeys(p["protocol"] for p in results.get("serving", {}).get("paired_overhead", [])):
        o = paired_overhead(results, GOAL_SERVER, protocol)
        if o is not None:
            ranged = [  # median (range)
                f"{fmt(o[k], 2)} ({fmt(o[k + '_min'], 2)} to {fmt(o[k + '_max'], 2)})" for k in ("total", "server")
            ]
            rows.append([f"{describe(results, GOAL_SERVER)} · `{protocol}`", fmt(o["p50"], 2), fmt(o["raw"], 2),
                         ranged[0], fmt(o["pre"], 2), ranged[1]])  # fmt: skip
    if not rows:
        return ""
    plan = results["serving"]["plan"]
    rounds = max(int(p["round"]) for p in results["serving"]["paired_overhead"]) + 1
    return (
        f"Paired measurement (the goal's figure), after the sweep with the other servers stopped: {rounds} "
        f"rounds of {plan['duration_s']:g} s per protocol, each alternating blocks of {PAIRED_BLOCK} served requests "
        f"at concurrency 1 with blocks of {PAIRED_BLOCK} raw pipeline steps in the benchmark process (decode + "
        "preprocess of one JPEG, then the backend at batch 1, timed separately), "
        f"{PAIRED_PAUSE_S * 1000:g} ms apart. Both sides thus see the same seconds "
        "of a machine whose speed drifts by more than the overhead. Medians over the rounds, with the range of "
        "the round-by-round figures; overhead = served p50 minus the model's p50, beyond decode = served p50 "
        "minus the p50 of decode + preprocess + model.\n\n"
        + table(
            [
                "server · protocol",
                "served p50 ms",
                "raw b1 p50 ms",
                "overhead ms (range)",
                "decode+preprocess ms",
                "beyond decode ms (range)",
            ],
            rows,
        )
        + "\nFrom the sweep above (medians of points measured minutes apart from the raw rounds), every "
        "server:\n\n"
    )


def overhead_section(results: dict[str, Any]) -> str:
    rows = []
    for server, protocol in served(results):
        o = overhead(results, server, protocol, backend_of(server))
        f = closed(results, server, protocol, 1)
        if o is None or f is None:
            continue
        client = 1000.0 * f["client_cpu"] / f["throughput"] if f["throughput"] else None
        name = f"{describe(results, server)} · `{protocol}`"
        rows.append([name, *(fmt(o[k], 2) for k in ("p50", "raw", "total", "pre", "server")), fmt(client, 2)])
    if not rows:
        return ""
    return (
        "## Latency overhead at concurrency 1\n\nOne request at a time: served p50 minus the raw backend's "
        "batch-1 p50 (same backend); of that, decode + preprocess of one JPEG (measured alone), and the rest "
        "(protocol, framework, queue, thread hand-offs, and the load generator's own work: its CPU time per "
        "request is in the last column, and at concurrency 1 it adds to the latency).\n\n"
        + _paired_overhead_table(results)
        + table(
            [
                "server · protocol",
                "served p50 ms",
                "raw b1 p50 ms",
                "overhead ms",
                "decode+preprocess ms",
                "rest ms",
                "load generator CPU ms",
            ],
            rows,
        )
    )


def open_section(results: dict[str, Any]) -> str:
    found = open_loop(results)
    if not found:
        return ""
    rows = [
        [f"{describe(results, server)} · `{protocol}`", spread(f), fmt(f["p50_ms"]),
         fmt(f["p95_ms"]), fmt(f["p99_ms"]), str(int(f["errors"])), str(int(f["dropped"]))]
        for server, protocol, f in found
    ]  # fmt: skip
    rate, rounds = found[0][2]["rate"], int(found[0][2]["rounds"])
    return (
        f"## Serving: open loop at {rate:g} requests/s\n\nPoisson arrivals (seeded) for "
        f"{results['serving']['plan']['duration_s']:g} s, whatever the answers do; latency counted from each "
        "request's scheduled arrival; at most 256 in flight (more are dropped and counted). The rate is half "
        f"the best raw batch-8 throughput unless `--open-rate` says otherwise. Medians over {rounds} round(s) "
        "(answered/s: range over the rounds); errors and dropped requests: all rounds together.\n\n"
        + table(["server · protocol", "answered/s", "p50 ms", "p95 ms", "p99 ms", "errors", "dropped"], rows)
    )


def memory_section(results: dict[str, Any]) -> str:
    serving = results.get("serving", {})
    ready = {m["server"]: m for m in serving.get("memory_ready", [])}
    rows = []
    for entry in serving.get("memory_after_load", []):
        before = {p["pid"]: p for p in ready.get(entry["server"], {}).get("processes", [])}
        for proc in entry["processes"]:
            start = before.get(proc["pid"], {})
            rows.append([describe(results, entry["server"]), proc["command"],
                         fmt(start.get("peak_rss_mib"), 0), fmt(proc["peak_rss_mib"], 0),
                         "yes" if proc["libtorch_mapped"] else "no"])  # fmt: skip
    if not rows:
        return ""
    left = {k: v for k, v in serving.get("left_running", {}).items() if v}
    killed = {k: v for k, v in serving.get("killed_at_stop", {}).items() if v}
    tail = (
        f"\nProcesses left running after the stop: {left or 'none'}; killed after a graceful stop failed: "
        f"{killed or 'none'}.\n"
    )
    return (
        "## Memory\n\nPeak resident set (`VmHWM` from `/proc/<pid>/status`) once ready, and after the whole sweep; "
        "`libtorch` mapped: whether `/proc/<pid>/maps` holds torch's native library (an ONNX-only server "
        "must not import torch).\n\n"
        + table(["server", "process", "peak RSS ready (MiB)", "peak RSS after load (MiB)", "libtorch mapped"], rows)
        + tail
    )


def training_section(results: dict[str, Any]) -> str:
    runs = results.get("training", [])
    if not runs:
        return ""
    rows = [
        [r["backbone"], r["mode"], f"{r['img_size']} px", str(r["train_images"]), str(r["batch_size"]),
         str(r["workers"]), fmt(r["images_per_second"], 2), fmt(100 * r["data_wait_fraction"], 1),
         fmt(r["wall_seconds"], 0)]
        for r in runs
    ]  # fmt: skip
    device = runs[0]["device"]
    return (
        f"## Training (`finetune`, {device})\n\nOne epoch, `--weights none` (random init: speed only), default "
        "augmentation, real JPEGs from `finetune/demo_data` split 70/15/15; images/s and data wait as "
        "`finetune` itself records them in the run's `history.json` (wait = time blocked on the DataLoader / "
        "epoch time; the first batch includes starting the worker processes). Wall time is the whole command "
        "(setup, epoch, validation, test, export and its checks, publish).\n\n"
        + table(["backbone", "mode", "input", "images", "batch", "workers", "images/s", "data wait %", "wall s"], rows)
    )


def gpu_section(results: dict[str, Any]) -> str:
    gpu = results["machine"].get("gpu")
    state = (
        f"This run had a GPU ({gpu})."
        if gpu
        else "**There was no GPU on this machine: no GPU figure of ours is reported.** "
        "`bench/gpu.sh` is ready for a GPU host (a few minutes): ResNet-50 served JPEG-in at high concurrency "
        "(throughput, p99), the raw backend (FP32 and FP16), and `finetune` with AMP and channels_last."
    )
    return f"## GPU\n\n{state}\n\n{ANCHORS}"


def render(results: dict[str, Any]) -> str:
    sections = [
        header(results), goals(results), ratios_section(results), serving_section(results), open_section(results),
        overhead_section(results), raw_section(results), memory_section(results), training_section(results),
        gpu_section(results),
    ]  # fmt: skip
    if ANALYSIS.is_file():
        sections.append(ANALYSIS.read_text(encoding="utf-8"))
    return "\n".join(s for s in sections if s)
