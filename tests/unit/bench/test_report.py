from __future__ import annotations

from typing import Any

from bench.figures import paired_throughput
from bench.report import _goal, goals, ratios_section


def test_a_goal_shows_enough_digits_that_the_figure_agrees_with_its_verdict() -> None:
    at_least = lambda x: x >= 0.85  # noqa: E731
    assert _goal("ratio", "≥ 0.85×", 0.848, at_least, "×", 2)[2:] == ["0.848×", "**not met**"]
    assert _goal("ratio", "≥ 0.85×", 0.8512, at_least, "×", 2)[2:] == ["0.85×", "**met**"]
    assert _goal("ms", "≤ 3 ms", 3.04, lambda x: x <= 3.0, " ms", 1)[2:] == ["3.04 ms", "**not met**"]
    assert _goal("ratio", "≥ 1.5×", None, at_least, "×", 2)[2:] == ["not measured", "–"]


def _closed(server: str, protocol: str, round_: int, throughput: float) -> dict[str, Any]:
    return {"mode": "closed", "server": server, "protocol": protocol, "concurrency": 8, "round": round_,
            "throughput": throughput, "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0, "errors": 0,
            "server_cpu_ms_per_request": 1.0, "other_load_cores": 0.0, "client_cpu": 0.0}  # fmt: skip


def _paired(round_: int, ours: float, torchserve: float | None, raw: float) -> dict[str, Any]:
    return {"round": round_, "server": "ours-ort-b8", "protocol": "v2-http", "concurrency": 8, "ours": ours,
            "torchserve": torchserve, "raw": raw, "vs_torchserve": None if torchserve is None else ours / torchserve,
            "vs_raw": ours / raw}  # fmt: skip


def _goal_row(report: str, start: str) -> str:
    (row,) = [line for line in report.splitlines() if line.startswith(f"| {start}")]
    return row


def test_throughput_goals_are_judged_on_the_median_of_same_round_ratios() -> None:
    # three rounds in which the machine ran at 100 %, 60 % and 100 % speed: every side slowed together
    paired = [_paired(0, 33.0, 21.0, 37.0), _paired(1, 18.0, 12.0, 22.0), _paired(2, 34.0, 22.0, 38.0)]
    sweep = [_closed("ours-ort-b8", "v2-http", r, t) for r, t in enumerate((33.0, 20.0, 34.0))]
    sweep += [_closed("torchserve", "ts-http", r, t) for r, t in enumerate((21.0, 22.0, 13.0))]
    results: dict[str, Any] = {"serving": {"plan": {}, "points": sweep, "paired_throughput": paired},
               "raw": {"backends": [{"name": "onnxruntime", "batch": 8, "items_per_second": 37.0}]}}  # fmt: skip

    section = goals(results)
    statistics = paired_throughput(results, "v2-http")

    assert statistics is not None and statistics["rounds"] == 3
    # the median of the rounds' ratios (1.571, 1.500, 1.545), not the ratio of the medians (33 / 21 = 1.571)
    assert statistics["vs_torchserve"] == 34.0 / 22.0
    assert statistics["vs_torchserve_min"] == 18.0 / 12.0 and statistics["vs_torchserve_max"] == 33.0 / 21.0
    assert statistics["vs_raw"] == 33.0 / 37.0  # the ratios 0.892, 0.818, 0.895
    versus_ts = _goal_row(section, "throughput / TorchServe (TorchScript .mar, /predictions), c=8: ours over v2 HTTP")
    assert "| 1.55× (paired rounds 1.50–1.57; sweep 1.57×) | **met** |" in versus_ts
    versus_raw = _goal_row(section, "throughput / raw ONNX Runtime batch 8, c=8: ours over v2 HTTP")
    assert "| 0.89× (paired rounds 0.82–0.89; sweep 0.89×) | **met** |" in versus_raw
    # without paired rounds (an older results.json) the sweep's ratio of medians decides, as before
    del results["serving"]["paired_throughput"]
    row = _goal_row(goals(results), "throughput / TorchServe (TorchScript .mar, /predictions), c=8: ours over v2 HTTP")
    assert "| 1.57× (round by round 0.91–2.62) | **met** |" in row


def test_a_run_without_torchserve_leaves_its_paired_ratio_unmeasured() -> None:
    results = {"serving": {"plan": {}, "points": [], "paired_throughput": [_paired(0, 30.0, None, 40.0)]}}

    section = goals(results)

    row = _goal_row(section, "throughput / TorchServe (TorchScript .mar, /predictions), c=8: ours over v2 HTTP")
    assert row.endswith("| not measured | – |")
    row = _goal_row(section, "throughput / raw ONNX Runtime batch 8, c=8: ours over v2 HTTP")
    assert "| 0.75× (paired rounds 0.75–0.75) | **not met** |" in row
    section = ratios_section(results)
    assert "· `v2-http` | 30.0 | – | 40.0 | – | 0.75 |" in section and "TorchServe" not in section.split("|")[0]
