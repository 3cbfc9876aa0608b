"""The precision benchmark's measuring: start every server, then rounds of paired windows, then stop them all.

Within a round, each (payload, concurrency) gets one short window of every target (our servers at each
precision and at auto, TorchServe's variants, the raw engine auto chose, the decode ceiling) in an
order of its own, so their ratios compare the same seconds of a machine whose speed drifts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from bench import precision_goals as pg
from bench import serving
from bench.engines import RawEngines, Variant, variants
from bench.photos import DecodeCeiling, phone_photos
from bench.servers import Running, start_serve, start_torchserve
from bench.training import DEMO_DATA
from service import registry
from service.manifest import load_manifest
from service.precision import host_features

logger = logging.getLogger(__name__)
TORCHSERVE = {pg.TS_TORCHSCRIPT_FP32: ("torchscript", "fp32"), pg.TS_ONNX_FP32: ("onnx", "fp32"),
              pg.TS_ONNX_AUTO: ("onnx", "auto")}  # fmt: skip
QUICK_SERVERS = (pg.AUTO_SERVER, pg.FP32_SERVER, pg.OPENVINO_SERVER, pg.TS_TORCHSCRIPT_FP32, pg.TS_ONNX_AUTO)


@dataclass(frozen=True)
class Payloads:
    """The request bodies of each payload class, and their files (the ceiling's workers read those)."""

    files: dict[str, list[Path]]

    @classmethod
    def make(cls, work: Path, *, phone_photos: int) -> Payloads:
        small = sorted(DEMO_DATA.glob("*/*.jpg"))
        return cls({pg.SMALL: small, pg.PHONE: _phone(small, work, phone_photos)})

    def images(self, kind: str) -> list[bytes]:
        return [p.read_bytes() for p in self.files[kind]]

    def titles(self) -> dict[str, str]:
        def mean_kb(paths: list[Path]) -> float:
            return statistics.fmean(p.stat().st_size for p in paths) / 1000 if paths else 0.0

        return {
            pg.SMALL: f"small JPEGs (the {len(self.files[pg.SMALL])} demo photos, 256x256, "
            f"{mean_kb(self.files[pg.SMALL]):.0f} kB on average)",
            pg.PHONE: f"phone-size JPEGs ({len(self.files[pg.PHONE])} demo photos upscaled to 4032x3024 with grain, "
            f"quality 90, {mean_kb(self.files[pg.PHONE]) / 1000:.1f} MB on average)",
        }


def _phone(small: list[Path], work: Path, count: int) -> list[Path]:
    return phone_photos(small, cache=work / "phone-photos", count=count)


@dataclass(frozen=True)
class Setup:
    store: Path
    package_dir: Path
    model: str
    work: Path
    options: Any  # bench.precision.Options


def package_summary(package_dir: Path, wall_s: float | None) -> str:
    """The package in words: what made it, its files, the export guard's verdicts."""
    manifest = load_manifest(package_dir)
    verdicts = manifest.metrics.get("precisions", {})
    judged = "; ".join(f"{p} {v.get('verdict', '?')}" for p, v in verdicts.items()) or "no reduced precision judged"
    made = f"in {wall_s:.0f} s" if wall_s else "(reused from an earlier run)"
    int8 = "" if "onnx_int8" in manifest.formats else " int8 was not published (refused or inconclusive)."
    return (
        f"resnet18 224 px, random init, made by `finetune --backbone resnet18 --weights none --epochs 1 --int8 true` "
        f"on finetune/demo_data {made}; files {', '.join(sorted(manifest.formats.values()))}; "
        f"the export's accuracy guard: {judged}.{int8}"
    )


def our_labels(package_dir: Path, quick: bool) -> list[str]:
    """Ours at auto, at fp32 on ONNX Runtime, and at every (backend, precision) this host and package allow."""
    found, _ = variants(load_manifest(package_dir), host_features())
    labels = [pg.AUTO_SERVER, pg.FP32_SERVER]
    labels += [serving.config_label(v.backend, v.precision, 8) for v in found]
    labels = list(dict.fromkeys(labels))
    return [label for label in labels if label in QUICK_SERVERS] if quick else labels


def start_all(setup: Setup, results: dict[str, Any]) -> dict[str, Running]:
    """Every server, one after the other (each one's start to ready is timed while the others idle)."""
    servers: dict[str, Running] = {}
    labels = our_labels(setup.package_dir, setup.options.quick)
    ts = [
        label
        for label in TORCHSERVE
        if setup.options.torchserve and (not setup.options.quick or label in QUICK_SERVERS)
    ]
    setup.work.mkdir(parents=True, exist_ok=True)
    for label in [*labels, *ts]:
        try:
            servers[label] = _start(setup, label)
        except Exception as exc:  # a server that does not start is a finding; the rest still run
            logger.error("%s did not start: %s", label, exc)
            results["servers"][label] = {"error": str(exc)[-500:]}
            continue
        results["servers"][label] = {"kind": servers[label].kind, "ready_s": servers[label].ready_s}
        logger.info("%s ready in %.1f s", label, servers[label].ready_s)
    return servers


def _start(setup: Setup, label: str) -> Running:
    if label in TORCHSERVE:
        fmt, precision = TORCHSERVE[label]
        work = setup.work / label
        work.mkdir(parents=True, exist_ok=True)
        return start_torchserve(setup.package_dir, work=work, fmt=fmt, label=label, precision=precision)
    config = serving.parse_label(label)
    flags = ("--backend", config.backend, "--precision", config.precision, "--max-batch-size",
             str(config.max_batch_size), "--device", "cpu")  # fmt: skip
    return start_serve(setup.store, model=setup.model, work=setup.work, label=label, flags=flags,
                       ready_path="/v2/health/ready")  # fmt: skip


def metadata(server: Running) -> dict[str, Any]:
    """``GET /v2/models/{m}``: platform, precision, reason and the precision notes."""
    answer = httpx.get(f"{server.endpoint.url}/v2/models/{server.model}", timeout=10, trust_env=False).json()
    return {k: answer.get(k) for k in ("platform", "precision", "reason", "precision_notes")}


def auto_choice(server: Running) -> dict[str, Any]:
    """What ``--backend auto --precision auto`` serves, and the raw engine that is the same."""
    found = metadata(server)
    backend = {platform: name for name, platform in registry.PLATFORMS.items()}.get(found["platform"] or "", "")
    key = Variant(backend, found["precision"]).key if backend and found.get("precision") else ""
    return found | {"backend": backend, "engine_key": key}


def torchserve_choice(server: Running) -> str:
    """What our handler inside TorchServe loaded, from its worker's log ("" when it did not say)."""
    if server.work is None:
        return ""
    lines = [line for log in sorted((server.work / "logs").glob("*.log")) for line in _read(log).splitlines()]
    found = [re.sub(r"^.*?(loaded )", r"\1", line) for line in lines if re.search(r"loaded .+ with ", line)]
    return found[-1].strip()[:300] if found else ""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def targets(servers: dict[str, Running], payload: str, raw_key: str) -> list[tuple[str, str]]:
    """(target, protocol) pairs measured for ``payload`` each round and concurrency."""
    found: list[tuple[str, str]] = []
    ours = [label for label, s in servers.items() if s.kind == "ours"]
    theirs = [label for label, s in servers.items() if s.kind == "torchserve"]
    if payload == pg.SMALL:
        found += [(label, pg.V2_API) for label in ours]
        found += [(label, pg.TS_API) for label in (pg.AUTO_SERVER, pg.FP32_SERVER) if label in servers]
        found += [(pg.raw_target(raw_key), "")] if raw_key else []
    else:
        found += [(label, pg.TS_API) for label in (pg.AUTO_SERVER, pg.FP32_SERVER) if label in servers]
    return found + [(label, pg.TS_API) for label in theirs] + [(pg.CEILING, "")]


async def rounds(
    setup: Setup, servers: dict[str, Running], payloads: Payloads, engines: RawEngines, ceiling: DecodeCeiling,
    raw_key: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every round: per payload and concurrency, one window of every target in a shuffled order."""
    options = setup.options
    plan = serving.Plan(configs=(), torchserve=(), protocols=(pg.V2_API, pg.TS_API), concurrency=options.concurrency,
                        duration_s=options.window_s, warmup_s=options.warmup_s, repeats=options.rounds, open_rate=0.0,
                        open_protocols=())  # fmt: skip
    images = {kind: payloads.images(kind) for kind in payloads.files}
    windows = []
    for round_ in range(options.rounds):
        for payload in (pg.SMALL, pg.PHONE):
            for concurrency in options.concurrency:
                order = targets(servers, payload, raw_key)
                seed = 1 + round_ * 10 + concurrency + (0 if payload == pg.SMALL else 5)
                for target, protocol in serving.shuffled(order, seed):
                    where = {"round": round_, "payload": payload, "concurrency": concurrency, "target": target,
                             "protocol": protocol}  # fmt: skip
                    found = await _window(target, protocol, servers, images[payload], plan, engines, ceiling,
                                          payload=payload, concurrency=concurrency, raw_key=raw_key)  # fmt: skip
                    windows.append(where | found)
                    logger.info("r%d %-5s c=%-2d %-22s %-7s %7.1f img/s  p99 %s ms  errors %s", round_, payload,
                                concurrency, target, protocol or "-", found["throughput"] or 0.0,
                                f"{found.get('p99_ms', 0.0):.0f}", found.get("errors", 0))  # fmt: skip
    return windows


async def _window(
    target: str, protocol: str, servers: dict[str, Running], images: list[bytes], plan: serving.Plan,
    engines: RawEngines, ceiling: DecodeCeiling, *, payload: str, concurrency: int, raw_key: str,
) -> dict[str, Any]:  # fmt: skip
    if target == pg.CEILING:
        found = ceiling.window(payload, seconds=plan.duration_s)
        return {"kind": "ceiling", "throughput": found["images_per_second"], "p50_ms": found["p50_ms"], "errors": 0}
    if target == pg.raw_target(raw_key):
        backend, precision = raw_key_variant(raw_key)
        return {"kind": "raw", "throughput": engines.throughput(backend, precision, plan.duration_s), "errors": 0}
    server = servers[target]
    window = replace(plan, warmup_s=plan.warmup_s if payload == pg.SMALL else 0.0)
    point = await serving.measure(server, protocol, images, window, concurrency=concurrency, rate=0.0)
    keep = ("kind", "throughput", "p50_ms", "p99_ms", "errors", "first_error", "server_cpu_ms_per_request",
            "server_cpu_cores", "requests", "seconds")  # fmt: skip
    return {k: point.get(k) for k in keep}


def raw_key_variant(key: str) -> tuple[str, str]:
    """``ov-int8`` -> ("openvino", "int8")."""
    short, _, precision = key.partition("-")
    return registry.SHORT_NAMES[short], precision


def measure_all(setup: Setup, payloads: Payloads, results: dict[str, Any]) -> None:
    """Raw engines, then the servers: their choices, the rounds, their memory; every server is stopped."""
    engines = RawEngines(setup.package_dir, payloads.images(pg.SMALL))
    for _ in range(setup.options.raw_rounds):
        engines.sample(setup.options.raw_window_s)
    servers = start_all(setup, results)
    try:
        _describe(servers, results)
        raw_key = results.get("auto", {}).get("engine_key", "")
        if raw_key and raw_key not in engines.engines:
            logger.warning("auto serves %s, which was not loaded raw: no raw ceiling for it", raw_key)
            raw_key = ""
        with DecodeCeiling(setup.package_dir, payloads.files, workers=setup.options.decode_workers) as ceiling:
            results["windows"] = asyncio.run(rounds(setup, servers, payloads, engines, ceiling, raw_key))
        for label, server in servers.items():
            memory = serving.memory(server)
            results["servers"][label]["memory"] = {
                "rss_mib": sum(p["rss_mib"] for p in memory["processes"]),
                "peak_rss_mib": memory["peak_rss_mib_total"],
                "processes": memory["processes"],
            }
    finally:
        killed = serving.stop_servers(list(servers.values()))
        for label, server in servers.items():
            results["servers"][label] |= {"killed_at_stop": killed.get(label, []), "left_running": server.leftovers()}
    results["raw"] = engines.summary()


def _describe(servers: dict[str, Running], results: dict[str, Any]) -> None:
    for label, server in servers.items():
        if server.kind == "ours":
            results["servers"][label]["metadata"] = metadata(server)
        elif TORCHSERVE[label][1] == "auto":
            results["torchserve_auto_choice"] = torchserve_choice(server)
    if pg.AUTO_SERVER in servers:
        results["auto"] = auto_choice(servers[pg.AUTO_SERVER])
        logger.info("auto serves %s", json.dumps(results["auto"]))
