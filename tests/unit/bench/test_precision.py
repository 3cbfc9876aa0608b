"""The precision benchmark's pure parts: same-round ratios, goals and their verdicts, the report, the targets."""

from __future__ import annotations

from typing import Any

import pytest

from bench import precision_goals as pg
from bench.precision_report import HEADING, render_section, replace_section, section_of
from bench.precision_run import targets


def _w(round_: int, target: str, throughput: float, *, c: int = 32, protocol: str = pg.TS_API, **more: Any) -> dict:
    return {"round": round_, "payload": more.pop("payload", pg.SMALL), "concurrency": c, "target": target,
            "protocol": protocol, "throughput": throughput, "errors": more.pop("errors", 0), **more}  # fmt: skip


def test_ratios_are_medians_of_same_round_ratios_against_torchserves_best_variant() -> None:
    windows = [
        _w(0, pg.AUTO_SERVER, 90.0), _w(0, pg.TS_TORCHSCRIPT_FP32, 20.0), _w(0, pg.TS_ONNX_FP32, 30.0),
        _w(1, pg.AUTO_SERVER, 60.0), _w(1, pg.TS_TORCHSCRIPT_FP32, 25.0), _w(1, pg.TS_ONNX_FP32, 15.0),
        _w(2, pg.AUTO_SERVER, 80.0), _w(2, pg.TS_TORCHSCRIPT_FP32, 20.0), _w(2, pg.TS_ONNX_FP32, 10.0, errors=3),
        _w(3, pg.AUTO_SERVER, 99.0, errors=1), _w(3, pg.TS_ONNX_FP32, 1.0),  # a window with errors does not count
    ]  # fmt: skip
    best = pg.best_of(windows, pg.TORCHSERVE_FP32, payload=pg.SMALL, concurrency=32, protocol=pg.TS_API)
    assert best == {0: 30.0, 1: 25.0, 2: 20.0, 3: 1.0}
    ours = pg.round_values(windows, payload=pg.SMALL, concurrency=32, target=pg.AUTO_SERVER, protocol=pg.TS_API)
    assert pg.median_ratio(ours, best) == pytest.approx(3.0)  # rounds 0-2: 3.0, 2.4, 4.0
    assert pg.median_ratio({}, best) is None


def _results(*, flags: dict[str, bool], windows: list[dict], rss: float = 350.0, ready: float = 7.5) -> dict:
    return {
        "host": {"cpu": "AMD EPYC", "flags": flags},
        "machine": {"logical_cpus": 2, "memory_gib": 23.4, "load_average": [1.0, 1.0, 1.0]},
        "auto": {"platform": "openvino_onnx", "precision": "int8", "engine_key": "ov-int8", "reason": ""},
        "servers": {
            pg.OPENVINO_SERVER: {"ready_s": 3.0, "memory": {"rss_mib": rss, "peak_rss_mib": rss + 10}},
            pg.AUTO_SERVER: {"ready_s": ready, "metadata": {"platform": "openvino_onnx", "precision": "int8"}},
        },
        "raw": {"batch": 8, "images_per_second": {"ort-fp32": 40.0, "ov-int8": 180.0}, "rounds": [{}],
                "drift": {"ov-int8": 0.031}, "skipped": {"ts-int8": "no such precision"}},
        "windows": windows,
    }  # fmt: skip


def _goal_windows() -> list[dict]:
    windows = []
    for r in range(3):
        windows += [_w(r, pg.AUTO_SERVER, 100.0, p99_ms=50.0), _w(r, pg.TS_TORCHSCRIPT_FP32, 40.0),
                    _w(r, pg.TS_ONNX_FP32, 45.0), _w(r, pg.TS_ONNX_AUTO, 70.0, p99_ms=80.0)]  # fmt: skip
        windows += [_w(r, pg.AUTO_SERVER, 90.0, c=8, p99_ms=30.0), _w(r, pg.TS_ONNX_AUTO, 60.0, c=8, p99_ms=20.0)]
        windows += [_w(r, pg.AUTO_SERVER, 95.0, c=8, protocol=pg.V2_API), _w(r, "raw-ov-int8", 180.0, c=8, protocol="")]
        ceiling = _w(r, pg.CEILING, 20.0, c=8, protocol="", payload=pg.PHONE, p50_ms=90.0)
        windows += [_w(r, pg.AUTO_SERVER, 12.0, c=8, payload=pg.PHONE), ceiling]
    return windows


def test_goals_are_judged_with_the_hosts_threshold() -> None:
    with_bf16 = {g.name: g for g in pg.goals(_results(flags={"avx512_bf16": True}, windows=_goal_windows()))}
    without = {g.name: g for g in pg.goals(_results(flags={"avx512_vnni": True}, windows=_goal_windows()))}
    first = next(iter(with_bf16))
    assert with_bf16[first].figure == pytest.approx(100.0 / 45.0)
    assert (with_bf16[first].threshold, with_bf16[first].verdict) == (3.0, "not met")
    assert (without[first].threshold, without[first].verdict) == (1.5, "met")
    verdicts = [g.verdict for g in with_bf16.values()]
    # c=8 img/s 1.5x met, p99 worse; c=32 img/s 1.43x met, p99 lower; raw c=8 met, c=32 unmeasured; phone 0.6 not met
    assert verdicts == ["not met", "met", "not met", "met", "met", "met", "not measured", "not met", "not measured",
                        "met", "met"]  # fmt: skip


def test_a_goal_shows_the_digits_its_verdict_needs() -> None:
    assert pg.Goal("x", "≥ 0.4×", 0.3996, 0.4, "ge").shown() == "0.3996×"
    assert pg.Goal("x", "≥ 0.4×", 0.4, 0.4, "ge").shown() == "0.40×"
    assert pg.Goal("x", "≤ 400 MiB", 401.2, 400.0, "le", " MiB").shown() == "401.20 MiB"
    assert pg.Goal("x", "≥ 1.3×", None, 1.3, "ge").verdict == "not measured"


def test_the_report_section_has_the_heading_goals_and_tables() -> None:
    results = _results(flags={"avx512_bf16": True, "avx512_vnni": True}, windows=_goal_windows(), rss=420.0)
    results |= {"command": "python -m bench.precision", "started": "2026-12-02T19:00:00+00:00"}
    section = render_section(results)
    assert section.startswith(HEADING + "\n")
    assert "avx512_bf16 yes" in section and "amx_tile no" in section
    assert "| RSS of `serve` with OpenVINO" in section and "420.00 MiB | **not met**" in section
    assert "### Raw engines, batch 8" in section and "| ov-int8 | 180.0 | 4.50× | 0.031 |" in section
    assert "### Decode-and-preprocess ceiling" in section and "### Served: phone" in section


def test_the_section_replaces_only_itself_at_the_end_of_the_report() -> None:
    document = "# Benchmarks\n\n## Goals\n\ntext\n"
    once = replace_section(document, HEADING + "\n\nfirst\n")
    assert once == document + "\n" + HEADING + "\n\nfirst\n"
    twice = replace_section(once, HEADING + "\n\nsecond\n")
    assert twice == document + "\n" + HEADING + "\n\nsecond\n"
    assert section_of(twice) == HEADING + "\n\nsecond\n"
    later = twice + "\n## Later section\n\nkept\n"
    assert replace_section(later, HEADING + "\n\nthird\n").endswith("third\n\n## Later section\n\nkept\n")
    assert section_of(document) == ""


def test_each_payload_measures_its_targets() -> None:
    class _Server:
        def __init__(self, kind: str) -> None:
            self.kind = kind

    servers: dict[str, Any] = {pg.AUTO_SERVER: _Server("ours"), "ours-ov-int8-b8": _Server("ours"),
                               pg.TS_ONNX_AUTO: _Server("torchserve")}  # fmt: skip
    small = targets(servers, pg.SMALL, "ov-int8")
    assert (pg.AUTO_SERVER, pg.V2_API) in small and (pg.AUTO_SERVER, pg.TS_API) in small
    assert ("raw-ov-int8", "") in small and (pg.CEILING, "") in small and (pg.TS_ONNX_AUTO, pg.TS_API) in small
    phone = targets(servers, pg.PHONE, "ov-int8")
    assert phone == [(pg.AUTO_SERVER, pg.TS_API), (pg.TS_ONNX_AUTO, pg.TS_API), (pg.CEILING, "")]
