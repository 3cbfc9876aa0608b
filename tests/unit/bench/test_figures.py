"""The report's open-loop table: one row per server and protocol, medians over the rounds."""

from __future__ import annotations

from typing import Any

from bench.figures import open_loop
from bench.report import open_section


def _point(server: str, round_: int, throughput: float, p50: float, *, dropped: int = 0) -> dict[str, Any]:
    return {
        "mode": "open", "server": server, "protocol": "ts-http", "round": round_, "rate": 20.0,
        "throughput": throughput, "p50_ms": p50, "p95_ms": 2 * p50, "p99_ms": 3 * p50, "errors": 0, "dropped": dropped,
    }  # fmt: skip


def test_open_loop_rounds_fold_into_one_row_per_server() -> None:
    points = [
        _point("ours-ort-b8", 0, 18.0, 40.0), _point("torchserve", 0, 9.0, 3000.0, dropped=2),
        _point("ours-ort-b8", 1, 19.0, 50.0), _point("torchserve", 1, 8.0, 3500.0),
        _point("ours-ort-b8", 2, 18.5, 45.0), _point("torchserve", 2, 9.5, 3100.0, dropped=1),
    ]  # fmt: skip
    results = {"serving": {"plan": {"duration_s": 6}, "points": points}}

    rows = open_loop(results)

    assert [server for server, _, _ in rows] == ["ours-ort-b8", "torchserve"]
    ours, theirs = rows[0][2], rows[1][2]
    assert (ours["throughput"], ours["throughput_min"], ours["throughput_max"]) == (18.5, 18.0, 19.0)
    assert ours["p50_ms"] == 45.0
    assert (theirs["p50_ms"], theirs["dropped"], theirs["rounds"]) == (3100.0, 3.0, 3.0)
    section = open_section(results)
    assert section.count("\n| ours") == 1 and "18.5 (18.0–19.0)" in section and "Medians over 3 round(s)" in section
