"""The precision benchmark's section of BENCHMARKS.md, rendered from its results (bench/precision.json).

text = render_section(results)
md.write_text(replace_section(md.read_text(), text))     # the rest of the file is left as it was
"""

from __future__ import annotations

from typing import Any

from bench import precision_goals as pg
from bench.report import fmt, table

HEADING = "## Precision (issue H): python -m bench.precision"
FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni")


def replace_section(document: str, section: str, *, heading: str = HEADING) -> str:
    """``document`` with its section under ``heading`` (the precision one unless told; to the next ``## ``
    heading or the end) replaced by ``section``, or ``section`` appended at the end when there is none."""
    body = section.rstrip("\n") + "\n"
    start = document.find(heading)
    if start < 0:
        return document.rstrip("\n") + "\n\n" + body
    end = document.find("\n## ", start + len(heading))
    rest = "" if end < 0 else "\n" + document[end + 1 :]
    return document[:start] + body + rest


def section_of(document: str, *, heading: str = HEADING) -> str:
    """The section of ``document`` under ``heading`` (the precision one unless told; "" when it has none):
    what ``python -m bench`` carries over."""
    start = document.find(heading)
    if start < 0:
        return ""
    end = document.find("\n## ", start + len(heading))
    return document[start:] if end < 0 else document[start : end + 1]


def render_section(results: dict[str, Any]) -> str:
    parts = [_header(results), _goals(results), _choice(results), _raw(results)]
    parts += [_served(results, pg.SMALL), _served(results, pg.PHONE), _ceiling(results), _servers(results)]
    return "\n".join(p for p in parts if p)


def _header(results: dict[str, Any]) -> str:
    host, machine = results.get("host", {}), results.get("machine", {})
    flags = ", ".join(f"{f} {'yes' if host.get('flags', {}).get(f) else 'no'}" for f in FLAGS)
    versions = ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items())
    package = results.get("package", {})
    options = results.get("options", {})
    lines = [
        HEADING, "",
        f"Command: `{results.get('command', '')}`, run {results.get('started', '?')} to {results.get('finished', '?')}"
        f" ({fmt(results.get('seconds'), 0)} s).",
        f"Machine: {host.get('cpu', '?')}, {machine.get('logical_cpus', '?')} logical CPUs, "
        f"{machine.get('memory_gib', '?')} GiB; flags: {flags}. Load average at start "
        f"{load_averages(machine.get('load_average'))}, at end {load_averages(machine.get('load_average_end'))}.",
        f"Versions: {versions}.",
        f"Package: {package.get('summary', '?')}",
        f"Method: {options.get('rounds', '?')} round(s); in each, every server, raw engine and ceiling gets one "
        f"{options.get('window_s', '?')} s closed-loop window (after {options.get('warmup_s', '?')} s unmeasured) per "
        "concurrency and payload, in an order of its own. Figures are medians over the rounds; every ratio is the "
        "median of same-round ratios. Other work shared the 2 cores, so absolute figures are noisy; the ratios are "
        "the result.",
    ]  # fmt: skip
    if results.get("note"):
        lines.append(f"Note: {results['note']}")
    return "\n".join(lines) + "\n"


def load_averages(values: list[float] | None) -> str:
    """A machine's 1/5/15-minute load averages as ``a/b/c`` (``?`` when not recorded)."""
    return "/".join(f"{v:.2f}" for v in values) if values else "?"


def _goals(results: dict[str, Any]) -> str:
    rows = [[g.name, g.target, g.shown(), f"**{g.verdict}**"] for g in pg.goals(results)]
    return "### Goals, judged on this host\n\n" + table(["Goal", "Target", "Measured", "Verdict"], rows)


def _choice(results: dict[str, Any]) -> str:
    auto = results.get("auto", {})
    if not auto:
        return ""
    lines = [
        "### What `serve --backend auto --precision auto` chose",
        "",
        f"`GET /v2/models/{{m}}`: platform `{auto.get('platform')}`, precision `{auto.get('precision')}`"
        f" (raw engine `{auto.get('engine_key')}`); reason: {auto.get('reason') or '(none)'}.",
        f"Notes: {auto.get('precision_notes') or '(none)'}.",
        "TorchServe with our ONNX archive at `--precision auto` chose: "
        f"{results.get('torchserve_auto_choice') or '(its log does not say)'}.",
    ]
    return "\n".join(lines) + "\n"


def _raw(results: dict[str, Any]) -> str:
    raw = results.get("raw", {})
    speeds: dict[str, float] = raw.get("images_per_second", {})
    if not speeds:
        return ""
    base = speeds.get("ort-fp32")
    rows = [
        [key, fmt(value, 1), fmt(value / base, 2) + "×" if base else "–", _drift(raw.get("drift", {}).get(key))]
        for key, value in speeds.items()
    ]
    skipped = "; ".join(f"{k}: {why}" for k, why in raw.get("skipped", {}).items()) or "nothing"
    head = (
        f"### Raw engines, batch {raw.get('batch', 8)}, no server (median of {len(raw.get('rounds', []))} rounds)\n\n"
    )
    header = ["Engine", "img/s", "× ORT fp32", "logit drift vs fp32 (parity set)"]
    return head + table(header, rows) + f"\nNot measured: {skipped}.\n"


def _drift(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _served(results: dict[str, Any], payload: str) -> str:
    windows = [w for w in results.get("windows", []) if w["payload"] == payload]
    if not windows:
        return ""
    rows = []
    for concurrency in sorted({w["concurrency"] for w in windows}):
        baseline = pg.best_of(windows, pg.TORCHSERVE_FP32, payload=payload, concurrency=concurrency, protocol=pg.TS_API)
        for target, protocol in sorted(
            dict.fromkeys((w["target"], w.get("protocol", "")) for w in windows), key=_order
        ):
            rows.append(_served_row(windows, payload, concurrency, target, protocol, baseline))
    title = results.get("payloads", {}).get(payload, payload)
    header = ["Target", "Protocol", "c", "img/s", "× TorchServe best fp32", "p50 ms", "p99 ms", "server CPU ms/req"]
    return f"### Served: {title}\n\n" + table(header, [r for r in rows if r])


def _order(pair: tuple[str, str]) -> tuple[int, str, str]:
    """Auto first, then fp32, our other servers, TorchServe, the raw engine, the ceiling."""
    target, protocol = pair
    ranks = {pg.AUTO_SERVER: 0, pg.FP32_SERVER: 1, pg.CEILING: 6}
    rank = ranks.get(target, 2 if target.startswith("ours-") else 3 if target.startswith("torchserve") else 5)
    return rank, target, protocol


def _served_row(
    windows: list[dict[str, Any]],
    payload: str,
    concurrency: int,
    target: str,
    protocol: str,
    baseline: dict[int, float],
) -> list[str]:
    pick: dict[str, Any] = {"payload": payload, "concurrency": concurrency, "target": target, "protocol": protocol}
    speed = pg.round_values(windows, **pick)
    if not speed and not any(w["target"] == target and w["concurrency"] == concurrency for w in windows):
        return []
    errors = sum(int(w.get("errors", 0)) for w in windows if all(w.get(k, "") == v for k, v in pick.items()))
    figures = [pg.median(pg.round_values(windows, field=f, **pick).values()) for f in ("p50_ms", "p99_ms")]
    cpu = pg.cpu_ms_per_request(windows, payload=payload, concurrency=concurrency, target=target, protocol=protocol)
    ratio = pg.median_ratio(speed, baseline) if target != pg.CEILING and not target.startswith("raw-") else None
    shown = fmt(pg.median(speed.values()), 1) + (f" ({errors} errors)" if errors else "")
    return [target, protocol or "–", str(concurrency), shown, "–" if ratio is None else f"{ratio:.2f}×",
            fmt(figures[0], 1), fmt(figures[1], 1), fmt(cpu, 1)]  # fmt: skip


def _ceiling(results: dict[str, Any]) -> str:
    windows = [w for w in results.get("windows", []) if w["target"] == pg.CEILING]
    if not windows:
        return ""
    rows = []
    for payload in dict.fromkeys(w["payload"] for w in windows):
        mine = [w for w in windows if w["payload"] == payload]
        title = results.get("payloads", {}).get(payload, payload)
        speed, one = pg.median(w["throughput"] for w in mine), pg.median(w["p50_ms"] for w in mine)
        rows.append([title, fmt(speed, 1), fmt(one, 1), str(len(mine))])
    head = (
        "### Decode-and-preprocess ceiling (no model, no server: `service.preprocess.preprocess_bytes` in "
        f"{results.get('options', {}).get('decode_workers', 2)} processes)\n\n"
    )
    return head + table(["Payload", "img/s", "one image p50 ms", "windows"], rows)


def _servers(results: dict[str, Any]) -> str:
    rows = []
    for label, server in results.get("servers", {}).items():
        memory, meta = server.get("memory", {}), server.get("metadata", {})
        served = f"{meta.get('platform', '')} {meta.get('precision', '')}".strip() or "–"
        why = server.get("error", "") or meta.get("reason", "")
        rss, peak = fmt(memory.get("rss_mib"), 0), fmt(memory.get("peak_rss_mib"), 0)
        rows.append([label, fmt(server.get("ready_s"), 1), rss, peak, served, why])
    head = "### Servers: start to ready, memory after the load (VmRSS of the whole process tree)\n\n"
    header = ["Server", "start → ready s", "RSS MiB", "peak RSS MiB", "serves", "reason / error"]
    return head + table(header, rows)
