"""Looking figures up in the results dictionary (bench/results.json): medians over rounds, ratios, names.

closed(results, "ours-ort-b8", "v2-http", 8)["throughput"]     # median over the rounds
raw_timing(results, "onnxruntime", 8)["items_per_second"]
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.serving import TORCHSERVE_LABELS, parse_config, parse_label

TORCHSERVE_FORMATS = {label: fmt for fmt, label in TORCHSERVE_LABELS.items()}
BACKEND_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "torchscript": "TorchScript", "auto": "auto"}


def describe(results: dict[str, Any], server: str) -> str:
    """A server label in words: ``ours-ort-b8`` -> "ours, ONNX Runtime, batch ≤ 8"."""
    plan = results.get("serving", {}).get("plan", {})
    if server in TORCHSERVE_FORMATS:
        batch, delay = plan.get("ts_batch_size", "?"), plan.get("ts_max_batch_delay_ms", "?")
        archive = "TorchScript" if TORCHSERVE_FORMATS[server] == "torchscript" else "ONNX (ONNX Runtime)"
        return f"TorchServe 0.12, {archive} .mar, batch {batch} / {delay} ms"
    config = parse_label(server)
    size, precision = config.max_batch_size, "" if config.precision == "fp32" else f" {config.precision}"
    return (
        f"ours, {BACKEND_NAMES.get(config.backend, config.backend)}{precision}, batch {'≤ ' if size > 1 else ''}{size}"
    )


def backend_of(server: str) -> str:
    if server in TORCHSERVE_FORMATS:
        return "torchscript" if TORCHSERVE_FORMATS[server] == "torchscript" else "onnxruntime"
    return parse_config(server)[0]


def points(results: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    found = results.get("serving", {}).get("points", [])
    return [p for p in found if all(p.get(k) == v for k, v in match.items())]


def closed(results: dict[str, Any], server: str, protocol: str, concurrency: int) -> dict[str, float] | None:
    """Median over rounds of one closed-loop point's figures, or None when not measured."""
    keys = ("throughput", "p50_ms", "p95_ms", "p99_ms", "errors", "server_cpu_ms_per_request", "other_load_cores",
            "client_cpu")  # fmt: skip
    found = points(results, server=server, protocol=protocol, mode="closed", concurrency=concurrency)
    return _median_point(found, keys)


def open_loop(results: dict[str, Any]) -> list[tuple[str, str, dict[str, float]]]:
    """(server, protocol, figures) per open-loop point, in the order first measured: medians over the rounds,
    errors and dropped requests summed over them."""
    pairs = dict.fromkeys((p["server"], p["protocol"]) for p in points(results, mode="open"))
    answer = []
    for server, protocol in pairs:
        mine = points(results, mode="open", server=server, protocol=protocol)
        figures = _median_point(mine, ("rate", "throughput", "p50_ms", "p95_ms", "p99_ms"))
        assert figures is not None
        totals = {k: float(sum(p[k] for p in mine)) for k in ("errors", "dropped")}
        answer.append((server, protocol, figures | totals | {"rounds": float(len(mine))}))
    return answer


def _median_point(found: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float] | None:
    """Each of ``keys`` as the median over the rounds' points, with the throughput's range."""
    if not found:
        return None
    figures = {k: statistics.median(float(p[k]) for p in found) for k in keys}
    rates = [float(p["throughput"]) for p in found]
    return figures | {"throughput_min": min(rates), "throughput_max": max(rates)}


def paired_ratios(
    results: dict[str, Any], mine: tuple[str, str], theirs: tuple[str, str], concurrency: int
) -> list[float]:
    """Throughput ratio of two (server, protocol) points round by round: each pair measured minutes apart at most."""

    def by_round(server: str, protocol: str) -> dict[int, float]:
        found = points(results, server=server, protocol=protocol, mode="closed", concurrency=concurrency)
        return {int(p.get("round", 0)): float(p["throughput"]) for p in found}

    a, b = by_round(*mine), by_round(*theirs)
    return [a[r] / b[r] for r in sorted(a) if r in b and b[r] > 0]


def raw_timing(results: dict[str, Any], backend: str, batch: int) -> dict[str, Any] | None:
    for timing in results.get("raw", {}).get("backends", []):
        if timing["name"] == backend and timing["batch"] == batch:
            return dict(timing)
    return None


def val(figures: dict[str, Any] | None, key: str) -> float | None:
    """``figures[key]`` as a float, None when the figures were not measured."""
    return None if figures is None else float(figures[key])


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def served(results: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (server, protocol) with closed-loop points, in the order they were measured."""
    seen: dict[tuple[str, str], None] = {}
    for p in points(results, mode="closed"):
        seen[(p["server"], p["protocol"])] = None
    return list(seen)


def peak_rss(results: dict[str, Any], server: str) -> float | None:
    """Peak RSS (MiB, all the server's processes) after the sweep."""
    for entry in results.get("serving", {}).get("memory_after_load", []):
        if entry["server"] == server:
            return float(entry["peak_rss_mib_total"])
    return None


def paired_overhead(results: dict[str, Any], server: str, protocol: str) -> dict[str, float] | None:
    """Medians over the rounds of served c=1 p50 interleaved with the raw pipeline (decode, preprocess, batch 1)."""
    pairs = [
        p
        for p in results.get("serving", {}).get("paired_overhead", [])
        if p["server"] == server and p["protocol"] == protocol
    ]
    if not pairs:
        return None
    diffs, beyond = [p["overhead_ms"] for p in pairs], [p["beyond_decode_ms"] for p in pairs]
    return {
        "p50": statistics.median(p["served_p50_ms"] for p in pairs),
        "raw": statistics.median(p["raw_p50_ms"] for p in pairs),
        "pre": statistics.median(p["pre_p50_ms"] for p in pairs),
        "total": statistics.median(diffs),
        "server": statistics.median(beyond),
        "total_min": min(diffs), "total_max": max(diffs), "server_min": min(beyond), "server_max": max(beyond),
        "rounds": len(pairs),
    }  # fmt: skip


def paired_throughput(results: dict[str, Any], protocol: str) -> dict[str, float | None] | None:
    """Medians over the rounds of adjacent ours / TorchServe / raw windows (one protocol of ours), with ranges.

    ``vs_torchserve`` and ``vs_raw`` are medians of the round-by-round ratios, not ratios of medians.
    """
    rounds = [p for p in results.get("serving", {}).get("paired_throughput", []) if p["protocol"] == protocol]
    if not rounds:
        return None
    figures: dict[str, float | None] = {"rounds": float(len(rounds))}
    for key in ("ours", "torchserve", "raw", "vs_torchserve", "vs_raw"):
        values = [float(p[key]) for p in rounds if p.get(key) is not None]
        figures[key] = statistics.median(values) if values else None
        figures[key + "_min"] = min(values) if values else None
        figures[key + "_max"] = max(values) if values else None
    return figures


def overhead(results: dict[str, Any], server: str, protocol: str, backend: str) -> dict[str, float] | None:
    """Served p50 at concurrency 1 against the raw backend's batch-1 p50, and against decode+preprocess too."""
    point, raw1 = closed(results, server, protocol, 1), raw_timing(results, backend, 1)
    pre = results.get("raw", {}).get("preprocess")
    if point is None or raw1 is None or pre is None:
        return None
    total = point["p50_ms"] - raw1["p50_ms"]
    return {"p50": point["p50_ms"], "raw": raw1["p50_ms"], "pre": pre["p50_ms"], "total": total,
            "server": total - pre["p50_ms"]}  # fmt: skip
