"""bench.flood's figures and report, from made-up tallies (no server, nothing timed)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from bench import flood


def _point(server: str, concurrency: int, answered: int, p99: float, rss: float, ratio: float) -> dict[str, Any]:
    tally = flood.Tally(
        answered=[0.1] * (answered - answered // 10) + [p99] * (answered // 10),
        refused={429: 300, 503: 100},
        refused_seconds=[0.01],
    )
    figures = flood.summarize(tally, concurrency=concurrency, elapsed=10.0, cpu_s=15.0, rss=(400.0, rss, 410.0))
    return {**figures, "server": server, "goodput_ratio": ratio}


def test_summarize_counts_rates_and_quantiles() -> None:
    tally = flood.Tally(answered=[0.2, 0.1, 0.3, 0.4], refused={429: 30}, refused_seconds=[0.01] * 30, errors=2)
    figures = flood.summarize(tally, concurrency=8, elapsed=2.0, cpu_s=3.0, rss=(1.0, 2.0, 1.5))
    assert (figures["goodput"], figures["refusals_per_s"], figures["errors"]) == (2.0, 15.0, 2)
    assert (figures["accepted_p50_s"], figures["accepted_p99_s"], figures["refused_p50_s"]) == (0.3, 0.4, 0.01)
    assert figures["refused_by_status"] == {"429": 30}
    empty = flood.summarize(flood.Tally(), concurrency=1, elapsed=1.0, cpu_s=0.0, rss=(0, 0, 0))
    assert empty["accepted_p99_s"] is None and empty["goodput"] == 0.0


def test_render_shows_each_server_side_by_side_and_judges_the_goals() -> None:
    results = {
        "started": "2026-01-01T00:00:00+00:00", "machine": {"cpu": "Some CPU", "usable_cpus": 2, "load_average": [1.0]},
        "flags": {"amx_tile": False, "avx512_bf16": True, "avx512_vnni": True}, "model": "resnet18", "seconds": 10.0,
        "command": "python -m bench.flood", "note": "",
        "points": [
            _point("ours", 8, 800, 0.2, 500.0, 1.0), _point("ours", 256, 600, 0.9, 520.0, 0.75),
            _point("torchserve", 8, 700, 0.3, 900.0, 1.0), _point("torchserve", 256, 200, 3.3, 1500.0, 0.29),
        ],
    }  # fmt: skip
    text = flood.render(results)
    assert text.startswith(flood.HEADING)
    assert "Some CPU (amx_tile no, avx512_bf16 yes, avx512_vnni yes)" in text
    assert "| ours | 256 | 60.0 | 0.75x | 100 ms | 900 ms | 40 (300 x 429, 100 x 503) |" in text
    assert "- ours at c=256: goodput 0.75x >= 0.6x met; accepted p99 900 ms <= 1 s met; RSS 520" in text
    assert "- torchserve at c=256: goodput 0.29x >= 0.6x NOT met; accepted p99 3300 ms <= 1 s NOT met" in text


def test_python_m_bench_keeps_the_overload_section(tmp_path: Path) -> None:
    bench_main = importlib.import_module("bench.__main__")
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Old report\n\n## Goals\nold\n\n{flood.HEADING}\n\nflood figures\n", encoding="utf-8")
    text = bench_main._keep_sections(md, "# New report\n\n## Goals\nnew\n")
    assert "new" in text and "old" not in text
    assert f"{flood.HEADING}\n\nflood figures\n" in text
