"""``python -m bench --quick``: the benchmark harness runs end to end in seconds. No timing is asserted.

Our server (ONNX Runtime and TorchScript) over the package ``finetune --demo`` made, every protocol,
the raw backends, memory readings and the report; TorchServe and training are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import procs
from bench.__main__ import get_args_parser, main
from tests.e2e.conftest import Package

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_quick_benchmark_measures_every_protocol_and_cleans_up(demo_package: Package, tmp_path: Path) -> None:
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    argv = [
        "--quick", "--skip-torchserve", "--store", str(demo_package.store), "--model", demo_package.name,
        "--output-md", str(md), "--output-json", str(js), "--work-dir", str(tmp_path / "work"),
    ]  # fmt: skip
    assert main(get_args_parser().parse_args(argv)) == 0

    results = json.loads(js.read_text())
    serving = results["serving"]
    closed = [p for p in serving["points"] if p["mode"] == "closed"]
    servers = {"ours-ort-b8", "ours-ts-b8"}
    assert {(p["server"], p["protocol"], p["concurrency"]) for p in closed} == {
        (s, p, c) for s in servers for p in ("v2-http", "v2-grpc", "ts-http") for c in (1, 8)
    }
    assert {p["server"] for p in serving["points"] if p["mode"] == "open"} == servers
    for point in serving["points"]:
        assert point["requests"] > 0 and point["errors"] == 0, point

    assert {(t["name"], t["batch"]) for t in results["raw"]["backends"]} == {
        (b, n) for b in ("onnxruntime", "torchscript") for n in (1, 8)
    }
    assert results["raw"]["preprocess"]["calls"] > 0
    ratios = serving["paired_throughput"]  # adjacent windows of ours and the raw backend (no TorchServe here)
    assert [(p["server"], p["protocol"]) for p in ratios] == [
        ("ours-ort-b8", p) for p in ("v2-http", "v2-grpc", "ts-http")
    ]
    for entry in ratios:
        assert entry["ours"] > 0 and entry["raw"] > 0 and entry["vs_raw"] == entry["ours"] / entry["raw"]
        assert entry["torchserve"] is None and entry["vs_torchserve"] is None
    paired = serving["paired_overhead"]
    assert {(p["server"], p["protocol"]) for p in paired} == {
        ("ours-ort-b8", p) for p in ("v2-http", "v2-grpc", "ts-http")
    }
    for pair in paired:  # interleaved with the raw pipeline: both sides timed, decode apart
        assert pair["requests"] > 0 and pair["served_p50_ms"] > 0 and pair["raw_p50_ms"] > 0 and pair["pre_p50_ms"] > 0
        assert pair["raw_jpeg_p50_ms"] > pair["raw_p50_ms"]

    memory = {m["server"]: m for m in serving["memory_after_load"]}
    (ort,) = memory["ours-ort-b8"]["processes"]
    (ts,) = memory["ours-ts-b8"]["processes"]
    assert not ort["libtorch_mapped"] and ts["libtorch_mapped"]  # an ONNX-only server never imports torch
    assert ort["peak_rss_mib"] > 0
    assert not any(serving["left_running"].values())
    assert not any(procs.alive(p["pid"]) and procs.command_name(p["pid"]) == p["command"] for p in (ort, ts))

    report = md.read_text()
    assert results["command"].startswith("python -m bench") and "--quick" in results["command"]
    assert results["command"] in report
    assert "Paired measurement" in report and "Paired rounds" in report
    for section in ("## Goals", "## Serving: closed loop", "## Raw backends", "## Memory", "## GPU"):
        assert section in report


def test_ab_compares_variants_and_their_paired_overhead(
    demo_package: Package, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import ab

    common = ["--store", str(demo_package.store), "--model", demo_package.name, "--duration", "0.5"]
    variants = [
        "--variant",
        "ort=--backend onnxruntime",
        "--variant",
        "asyncio=--backend onnxruntime --event-loop asyncio",
    ]
    assert ab.main(ab.get_args_parser().parse_args([*common, *variants, "--concurrency", "2", "--rounds", "1"])) == 0
    throughput = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in throughput] == [["asyncio", "c=2"], ["ort", "c=2"]], throughput
    assert ab.main(ab.get_args_parser().parse_args([*common, *variants[:2], "--paired-rounds", "2"])) == 0
    (paired,) = capsys.readouterr().out.splitlines()
    assert paired.startswith("ort ") and "overhead" in paired and "beyond decode" in paired, paired
    assert len(paired.split("(rounds: ")[1].split(")")[0].split()) == 2, paired
