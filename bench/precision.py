"""``python -m bench.precision``: what each precision buys, served and raw, against TorchServe, in one run.

python -m bench.precision --work-dir /tmp/precision-bench      # about 15 minutes on 2 cores
python -m bench.precision --quick                              # a smoke check: 1 round, 1 s windows, c=8
python -m bench.precision --render bench/precision.json        # rewrite the BENCHMARKS.md section only

One package (resnet18 224 px made by the real ``finetune ... --int8 true`` on the demo photos), every
engine and precision this host runs (raw, batch 8), our server at each of them and at
``--backend auto --precision auto``, TorchServe 0.12 with the fp32 archives and with our ONNX
archive at ``--precision auto``, the host's decode-and-preprocess ceiling, two payloads (the demo's
small JPEGs, 12 MP phone photos). Writes bench/precision.json and the section
``## Precision (issue H)`` at the end of BENCHMARKS.md (the rest of the file is left as it is).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine, precision_goals, precision_report, training
from bench.precision_run import Payloads, Setup, measure_all, package_summary
from bench.servers import REPO
from service.precision import CPU_FLAGS, host_features

logger = logging.getLogger("bench.precision")
PHONE_PHOTOS = 6


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.precision",
        description=__doc__.split("\n\n")[0] if __doc__ else "",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    work = Path(tempfile.gettempdir()) / "precision-bench"
    parser.add_argument("--work-dir", type=Path, default=work, help="package, photos, logs (kept and reused)")
    parser.add_argument("--output-md", type=Path, default=REPO / "BENCHMARKS.md", help="its last section is ours")
    parser.add_argument("--output-json", type=Path, default=REPO / "bench" / "precision.json")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the section from saved results")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of paired windows (medians over them)")
    parser.add_argument("--window", type=float, default=3.0, help="seconds measured per window")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each served window")
    parser.add_argument("--concurrency", type=_ints, default=(8, 32), help="closed-loop levels")
    parser.add_argument("--phone-photos", type=int, default=PHONE_PHOTOS, help="12 MP JPEGs made from demo photos")
    parser.add_argument("--raw-rounds", type=int, default=2, help="rounds of every raw engine before the servers")
    parser.add_argument("--raw-window", type=float, default=2.0, help="seconds per raw engine per round")
    parser.add_argument("--decode-workers", type=int, default=os.cpu_count() or 2, help="processes of the ceiling")
    parser.add_argument("--skip-torchserve", action="store_true", help="do not start TorchServe")
    parser.add_argument("--note", default="", help="a line for the report, e.g. what else ran meanwhile")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 s windows, c=8, fewer servers: a smoke check")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


@dataclass(frozen=True)
class Options:
    """The resolved options of one run (saved with the results)."""

    rounds: int
    window_s: float
    warmup_s: float
    concurrency: tuple[int, ...]
    phone_photos: int
    raw_rounds: int
    raw_window_s: float
    decode_workers: int
    torchserve: bool
    quick: bool


def resolve(args: argparse.Namespace) -> Options:
    if args.quick:
        return Options(rounds=1, window_s=1.0, warmup_s=0.3, concurrency=(8,), phone_photos=2, raw_rounds=1,
                       raw_window_s=0.5, decode_workers=args.decode_workers, torchserve=not args.skip_torchserve,
                       quick=True)  # fmt: skip
    if args.rounds < 1 or args.window <= 0 or not args.concurrency:
        raise ValueError("--rounds must be >= 1, --window > 0 and --concurrency non-empty")
    return Options(rounds=args.rounds, window_s=args.window, warmup_s=args.warmup, concurrency=args.concurrency,
                   phone_photos=args.phone_photos, raw_rounds=args.raw_rounds, raw_window_s=args.raw_window,
                   decode_workers=args.decode_workers, torchserve=not args.skip_torchserve, quick=False)  # fmt: skip


def host_section() -> dict[str, Any]:
    host = host_features()
    return {"cpu": host.model, "flags": {flag: flag in host.flags for flag in CPU_FLAGS}, "described": host.describe()}


def package(work: Path, results: dict[str, Any]) -> tuple[Path, Path, str]:
    """(store, package dir, model): the one made by ``finetune --int8 true`` in ``work``, made now if absent."""
    store, model = work / "package" / "store", "resnet18"
    existing = sorted((store / model).glob("*/manifest.json")) if (store / model).is_dir() else []
    if existing:
        package_dir = existing[-1].parent
        logger.info("reusing the package %s", package_dir)
        results["package"] = {"dir": str(package_dir), "finetune_wall_s": None, "reused": True}
    else:
        run = training.run_finetune(
            training.DEMO_DATA, backbone=model, probe=False, work=work / "package", name=model,
            formats="torchscript,onnx", extra=("--int8", "true"),
        )  # fmt: skip
        assert run.package_dir is not None
        package_dir = Path(run.package_dir)
        results["package"] = {"dir": str(package_dir), "finetune_wall_s": run.wall_seconds, "reused": False}
        logger.info("finetune made %s in %.0f s", package_dir, run.wall_seconds)
    results["package"]["summary"] = package_summary(package_dir, results["package"]["finetune_wall_s"])
    return store, package_dir, model


def run_benchmark(options: Options, work: Path, command: str) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": command, "started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine.machine(),
        "host": host_section(), "versions": machine.versions(), "options": asdict(options), "servers": {},
    }  # fmt: skip
    results["options"]["decode_workers"] = options.decode_workers
    store, package_dir, model = package(work, results)
    payloads = Payloads.make(work, phone_photos=options.phone_photos)
    results["payloads"] = payloads.titles()
    setup = Setup(store=store, package_dir=package_dir, model=model, work=work / "serve", options=options)
    measure_all(setup, payloads, results)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["seconds"] = time.monotonic() - started
    results["goals"] = [asdict(g) | {"verdict": g.verdict} for g in precision_goals.goals(results)]
    return results


def write(results: dict[str, Any], *, md: Path, js: Path) -> None:
    js.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    existing = md.read_text(encoding="utf-8") if md.is_file() else ""
    md.write_text(precision_report.replace_section(existing, precision_report.render_section(results)), "utf-8")
    logger.info("wrote %s and the last section of %s", js, md)


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "bench.precision", *argv])


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)  # fmt: skip
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        write(results, md=args.output_md, js=args.render)
        return 0
    try:
        options = resolve(args)
    except ValueError as exc:
        print(f"python -m bench.precision: {exc}", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = run_benchmark(options, args.work_dir, command_line(argv))
    if args.note:
        results["note"] = args.note
    write(results, md=args.output_md, js=args.output_json)
    print(precision_report.render_section(results))  # the report itself, on stdout
    return 0


def run(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    raise SystemExit(main(get_args_parser().parse_args(argv), argv))


if __name__ == "__main__":
    run()
