"""``python -m bench``: measure serving and training side by side, write BENCHMARKS.md and bench/results.json.

python -m bench                        # the full run (about an hour on 2 cores)
python -m bench --quick --store S --model M --skip-torchserve   # seconds: the smoke test's run
python -m bench --render bench/results.json     # rewrite BENCHMARKS.md from saved results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import flood as flood_bench
from bench import machine, precision_report, quality_report, raw, report, serving, training
from bench import predict as predict_bench
from bench.clients import PROTOCOLS, SWEEP_CLIENTS
from bench.servers import REPO, Running

logger = logging.getLogger("bench")
DEMO_IMAGES = training.DEMO_DATA


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in _csv(text))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark our server (ONNX Runtime and TorchScript, batching on and off, HTTP v2, gRPC v2, "
        "TorchServe's API) against real TorchServe and the raw backends on the same model and JPEGs, plus "
        "finetune's training speed; writes BENCHMARKS.md and bench/results.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    out = parser.add_argument_group("outputs")
    out.add_argument("--output-md", type=Path, default=REPO / "BENCHMARKS.md", help="the report")
    out.add_argument("--output-json", type=Path, default=REPO / "bench" / "results.json", help="every figure")
    out.add_argument("--work-dir", type=Path, help="keep packages, logs and runs here (default: a temp dir, removed)")
    out.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="only rewrite --output-md from saved results")
    out.add_argument("--note", default="", help="a line for the report, e.g. what else ran on the machine")
    model = parser.add_argument_group("model")
    model.add_argument("--store", type=Path, help="serve this existing model store instead of building a package")
    model.add_argument("--model", help="model name in --store (default: the only one)")
    model.add_argument("--backbone", default="resnet18", help="backbone of the package finetune builds")
    model.add_argument("--img-size", type=int, default=224)
    model.add_argument("--device", default="cpu", help="cpu or cuda, for servers, raw backends and training")
    serve = parser.add_argument_group("serving")
    serve.add_argument(
        "--configs", type=_csv, default=serving.DEFAULT_CONFIGS, help="our servers: ours-<ort|ts>-b<max batch size>"
    )
    serve.add_argument("--serve-args", default="", help="more flags for every serve, e.g. '--decode-workers 12'")
    serve.add_argument("--skip-torchserve", action="store_true", help="do not start real TorchServe")
    serve.add_argument(
        "--torchserve-formats", type=_csv, default=("torchscript", "onnx"), help="TorchServe archives to serve"
    )
    serve.add_argument("--protocols", type=_csv, default=("v2-http", "v2-grpc", "ts-http"), help=f"of {PROTOCOLS}")
    serve.add_argument("--concurrency", type=_ints, default=(1, 4, 8, 32), help="closed-loop levels")
    serve.add_argument("--duration", type=float, default=6.0, help="seconds measured per point")
    serve.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each point")
    serve.add_argument("--repeats", type=int, default=5, help="rounds of the whole closed-loop sweep (median)")
    serve.add_argument("--open-rate", type=float, help="open-loop arrivals/s (default: half the raw ceiling; 0: off)")
    serve.add_argument(
        "--overhead-rounds", type=int, default=5, help="rounds of served c=1 interleaved with the raw pipeline"
    )
    serve.add_argument(
        "--ratio-rounds", type=int, default=10, help="rounds of adjacent ours / TorchServe / raw windows at c=8"
    )
    serve.add_argument("--ratio-window", type=float, default=3.0, help="seconds per window of those rounds")
    serve.add_argument("--http-client", choices=SWEEP_CLIENTS, default="lean", help="HTTP library of the load")
    serve.add_argument("--open-protocols", type=_csv, default=("ts-http",), help="protocols of the open-loop points")
    serve.add_argument("--raw-duration", type=float, default=4.0, help="seconds per raw backend measurement")
    serve.add_argument("--raw-fp16", action="store_true", help="also time the TorchScript model cast to FP16 (GPU)")
    train = parser.add_argument_group("training")
    train.add_argument("--skip-training", action="store_true")
    train.add_argument("--train-backbones", type=_csv, default=("resnet18", "resnet50"))
    train.add_argument("--train-images-per-class", type=int, default=20, help="JPEGs per demo class (5 classes)")
    train.add_argument("--train-copies", type=int, default=1, help="repeat the images N times (bigger epochs on GPU)")
    train.add_argument("--train-batch-size", type=int, default=16)
    train.add_argument("--train-workers", type=int, default=2, help="finetune --workers (its default)")
    parser.add_argument("--quick", action="store_true", help="seconds: 1 concurrency, short points, no training")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


@dataclass(frozen=True)
class Options:
    """The resolved options of one run (saved into results.json)."""

    store: str | None
    model: str | None
    backbone: str
    img_size: int
    device: str
    plan: serving.Plan
    raw_duration: float
    raw_fp16: bool
    overhead_rounds: int
    ratio_rounds: int
    ratio_window: float
    open_rate: float | None
    training: bool
    train_backbones: tuple[str, ...]
    train_images_per_class: int
    train_copies: int
    train_batch_size: int
    train_workers: int
    note: str


def resolve(args: argparse.Namespace) -> Options:
    """Flags -> Options; ``--quick`` overrides the durations, levels, rounds and training (``--open-rate`` stays)."""
    for label in args.configs:
        serving.parse_config(label)
    if not set(args.protocols) | set(args.open_protocols) <= set(PROTOCOLS):
        raise ValueError(f"unknown protocol in {args.protocols} / {args.open_protocols}; choose from {PROTOCOLS}")
    plan = serving.Plan(
        configs=tuple(args.configs),
        torchserve=() if args.skip_torchserve else tuple(args.torchserve_formats),
        protocols=tuple(args.protocols),
        concurrency=tuple(args.concurrency),
        duration_s=args.duration,
        warmup_s=args.warmup,
        repeats=args.repeats,
        open_rate=0.0,  # decided after the raw measurement unless given
        open_protocols=tuple(args.open_protocols),
        device=args.device,
        serve_args=tuple(shlex.split(args.serve_args)),
        http_client=args.http_client,
    )
    options = Options(
        store=str(args.store) if args.store else None, model=args.model, backbone=args.backbone,
        img_size=args.img_size, device=args.device, plan=plan, raw_duration=args.raw_duration, raw_fp16=args.raw_fp16,
        overhead_rounds=args.overhead_rounds, ratio_rounds=args.ratio_rounds, ratio_window=args.ratio_window,
        open_rate=args.open_rate, training=not args.skip_training, train_backbones=tuple(args.train_backbones),
        train_images_per_class=args.train_images_per_class, train_copies=args.train_copies,
        train_batch_size=args.train_batch_size, train_workers=args.train_workers, note=args.note,
    )  # fmt: skip
    if args.quick:
        quick = replace(plan, concurrency=(1, 8), duration_s=0.5, warmup_s=0.2, repeats=1)
        if tuple(args.configs) == serving.DEFAULT_CONFIGS:
            quick = replace(quick, configs=("ours-ort-b8", "ours-ts-b8"))
        options = replace(
            options, plan=quick, raw_duration=0.5, training=False, overhead_rounds=1, ratio_rounds=1, ratio_window=0.5
        )
        options = replace(options, open_rate=args.open_rate if args.open_rate is not None else 10.0)
    return options


def _images() -> list[bytes]:
    """Every demo JPEG, sorted: the request payloads."""
    return [p.read_bytes() for p in sorted(DEMO_IMAGES.glob("*/*.jpg"))]


def _package(options: Options, work: Path, results: dict[str, Any]) -> tuple[Path, Path, str]:
    """(store, package dir, model name): the given store's newest version, or one built by finetune now."""
    if options.store is not None:
        store = Path(options.store)
        names = sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
        model = options.model or (names[0] if len(names) == 1 else "")
        if model not in names:
            raise ValueError(f"--model: choose one of {names} in {store}")
        return store, newest_version(store / model), model
    data = _training_data(options, work)
    run = training.run_finetune(
        data, backbone=options.backbone, probe=False, work=work / "package", name=options.backbone,
        img_size=options.img_size, batch_size=options.train_batch_size, workers=options.train_workers,
        formats="torchscript,onnx", device=options.device,
    )  # fmt: skip
    results["training"].append(run.to_dict())
    assert run.package_dir is not None
    return work / "package" / "store", Path(run.package_dir), options.backbone


def newest_version(model_dir: Path) -> Path:
    """The package folder of a model's highest numbered version in a store."""
    return max((p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _training_data(options: Options, work: Path) -> Path:
    target = work / "data"
    if not target.is_dir():
        training.make_subset(DEMO_IMAGES, target, per_class=options.train_images_per_class, copies=options.train_copies)
    return target


def _sampler(options: Options, package_dir: Path, images: list[bytes]) -> raw.RawSampler:
    """The raw backends of the configured servers (ONNX Runtime when none), at batch 1, 8 and theirs."""
    backends = tuple(dict.fromkeys(serving.parse_config(c)[0] for c in options.plan.configs)) or ("onnxruntime",)
    backends += ("torchscript-fp16",) if options.raw_fp16 else ()
    sizes = tuple(sorted({1, 8} | {serving.parse_config(c)[1] for c in options.plan.configs}))
    return raw.RawSampler(
        package_dir,
        images,
        backends=backends,
        batch_sizes=sizes,
        duration_s=options.raw_duration,
        device=options.device,
    )


def _sample(sampler: raw.RawSampler) -> None:
    for timing in sampler.sample():
        logger.info(
            "raw %s batch %d: %.1f items/s, p50 %.2f ms",
            timing.name, timing.batch, timing.items_per_second, timing.p50_ms,
        )  # fmt: skip


def _open_rate(options: Options, raw_results: dict[str, Any]) -> float:
    """Half the best raw batch-8 throughput, unless given."""
    if options.open_rate is not None:
        return options.open_rate
    best = max((t["items_per_second"] for t in raw_results["backends"] if t["batch"] == 8), default=0.0)
    return round(best / 2, 1)


def _serve(
    options: Options, package: tuple[Path, Path, str], images: list[bytes], work: Path, sampler: raw.RawSampler
) -> dict[str, Any]:
    """Start the servers, sweep (raw rounds in between), read memory, stop them all."""
    store, package_dir, model = package
    plan = replace(options.plan, open_rate=_open_rate(options, sampler.summary()))
    started = time.perf_counter()
    servers = serving.start_servers(plan, store=store, package_dir=package_dir, model=model, work=work / "serve")
    killed: dict[str, list[int]] = {}
    try:
        idle = [serving.memory(s) for s in servers]
        points = asyncio.run(serving.sweep(servers, images, plan, between=lambda: _sample(sampler)))
        loaded = [serving.memory(s) for s in servers]
        # the paired phases need one or two servers: the others (TorchServe's JVMs have timers) stop first
        killed = serving.stop_servers([s for s in servers if s.label not in (serving.GOAL_SERVER, serving.TORCHSERVE)])
        ratios = _paired_throughput(options, plan, servers, images, sampler)
        killed |= serving.stop_servers([s for s in servers if s.label == serving.TORCHSERVE])
        paired = _paired_overhead(options, plan, servers, images, sampler)
    finally:
        killed |= serving.stop_servers([s for s in servers if s.label not in killed])
    leftovers = {s.label: s.leftovers() for s in servers}
    return {
        "plan": asdict(plan), "points": points, "paired_throughput": ratios, "paired_overhead": paired,
        "memory_ready": idle, "memory_after_load": loaded, "killed_at_stop": killed, "left_running": leftovers,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip


def _paired_throughput(
    options: Options, plan: serving.Plan, servers: list[Running], images: list[bytes], sampler: raw.RawSampler
) -> list[dict[str, Any]]:
    """The throughput goals' ratios: ours (ONNX Runtime, batch <= 8), TorchServe and raw batch 8 side by side."""
    target = next((s for s in servers if s.label == serving.GOAL_SERVER), None)
    if target is None or options.ratio_rounds <= 0 or "onnxruntime" not in sampler.backends or 8 not in sampler.batches:
        return []
    baseline = next((s for s in servers if s.label == serving.TORCHSERVE), None)
    return asyncio.run(
        serving.paired_throughput(
            target, baseline, images, plan, rounds=options.ratio_rounds, window_s=options.ratio_window,
            raw_window=lambda seconds: sampler.throughput("onnxruntime", 8, seconds),
        )
    )  # fmt: skip


def _paired_overhead(
    options: Options, plan: serving.Plan, servers: list[Running], images: list[bytes], sampler: raw.RawSampler
) -> list[dict[str, Any]]:
    """The latency-overhead goal's server (ONNX Runtime, batch <= 8), each protocol paired with raw batch 1."""
    target = next((s for s in servers if s.label == serving.GOAL_SERVER), None)
    if target is None or options.overhead_rounds <= 0 or "onnxruntime" not in sampler.backends:
        return []
    return asyncio.run(
        serving.paired_overhead(
            target, images, plan, rounds=options.overhead_rounds,
            raw_step=lambda i: sampler.jpeg_step("onnxruntime", i),
        )
    )  # fmt: skip


def _train(options: Options, work: Path, results: dict[str, Any]) -> None:
    data = _training_data(options, work)
    done = {(r["backbone"], r["mode"]) for r in results["training"]}
    for backbone in options.train_backbones:
        for probe in (False, True):
            if (backbone, "linear probe" if probe else "full") in done:
                continue
            run = training.run_finetune(
                data, backbone=backbone, probe=probe, work=work / "train", name=backbone, img_size=options.img_size,
                batch_size=options.train_batch_size, workers=options.train_workers, device=options.device,
            )  # fmt: skip
            logger.info(
                "finetune %s %s: %.2f img/s, data wait %.1f%%",
                backbone, run.mode, run.images_per_second, 100 * run.data_wait_fraction,
            )  # fmt: skip
            results["training"].append(run.to_dict())


def run_benchmark(options: Options, work: Path, command: str) -> dict[str, Any]:
    results: dict[str, Any] = {
        "command": command, "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine.machine(), "versions": machine.versions(), "options": asdict(options), "training": [],
    }  # fmt: skip
    images = _images()
    package = _package(options, work, results)
    results["model"] = {"name": package[2], "package": str(package[1]), "images": len(images)}
    results["model"]["manifest"] = json.loads((package[1] / "manifest.json").read_text())
    sampler = _sampler(options, package[1], images)
    _sample(sampler)
    results["serving"] = _serve(options, package, images, work, sampler)
    results["raw"] = sampler.summary()
    if options.training:
        _train(options, work, results)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["machine"]["load_average_end"] = list(os.getloadavg())
    return results


def write(results: dict[str, Any], *, md: Path, js: Path) -> None:
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    md.write_text(_keep_sections(md, report.render(results)), encoding="utf-8")
    logger.info("wrote %s and %s", md, js)


def _keep_sections(md: Path, text: str) -> str:
    """``text`` with the sections of the old report that other benchmarks write carried over
    (``python -m bench.precision``, ``python -m bench.quality``, ``python -m bench.predict``,
    ``python -m bench.flood``; this run measures none of them)."""
    old = md.read_text(encoding="utf-8") if md.is_file() else ""
    for heading in (precision_report.HEADING, quality_report.HEADING, predict_bench.HEADING, flood_bench.HEADING):
        kept = precision_report.section_of(old, heading=heading)
        text = precision_report.replace_section(text, kept, heading=heading) if kept else text
    return text


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run: ``python -m bench`` and every flag that differs from its default."""
    parts = ["python", "-m", "bench"]
    for action in get_args_parser()._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest == "help" or value == action.default:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:
            parts.append(flag)
        elif isinstance(value, tuple):
            parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.render is not None:
        results = json.loads(args.render.read_text())
        args.output_md.write_text(_keep_sections(args.output_md, report.render(results)), encoding="utf-8")
        return 0
    try:
        options = resolve(args)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    command = command_line(args)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run_benchmark(options, work, command)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    write(results, md=args.output_md, js=args.output_json)
    return 0


def run(argv: Sequence[str] | None = None) -> None:
    raise SystemExit(main(get_args_parser().parse_args(argv)))


if __name__ == "__main__":
    run()
