"""Our servers' labels: ``ours-<short>[-<precision>]-b<N>``; the old ones without a precision still mean fp32."""

from __future__ import annotations

import pytest

from bench import precision_goals as pg
from bench.figures import describe
from bench.labels import OursConfig, config_label, parse_config, parse_label
from bench.precision_run import raw_key_variant


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("ours-ort-b8", OursConfig("onnxruntime", "fp32", 8)),  # the old labels keep their meaning: fp32
        ("ours-ts-b1", OursConfig("torchscript", "fp32", 1)),
        ("ours-ov-int8-b8", OursConfig("openvino", "int8", 8)),
        ("ours-ov-bf16-b16", OursConfig("openvino", "bf16", 16)),
        ("ours-ort-fp32-b8", OursConfig("onnxruntime", "fp32", 8)),
        ("ours-auto-auto-b8", OursConfig("auto", "auto", 8)),
        ("ours-ts-auto-b8", OursConfig("torchscript", "auto", 8)),
    ],
)
def test_labels_name_backend_precision_and_batch(label: str, expected: OursConfig) -> None:
    assert parse_label(label) == expected
    assert parse_config(label) == (expected.backend, expected.max_batch_size)
    assert parse_label(expected.label) == expected  # the explicit label round-trips


@pytest.mark.parametrize(
    "label", ["ours-ts-int8-b8", "ours-ort-bf16-b8", "ours-trt-b8", "ours-ov-fp16-b8", "ours-ov-int8", "ours-ort-b0"]
)
def test_labels_that_name_nothing_servable_are_refused(label: str) -> None:
    with pytest.raises(ValueError, match=label):
        parse_label(label)


def test_labels_are_made_from_registry_short_names() -> None:
    assert config_label("openvino", "int8", 8) == "ours-ov-int8-b8"
    assert config_label("auto", "auto", 8) == pg.AUTO_SERVER
    assert config_label("onnxruntime", "fp32", 8) == pg.FP32_SERVER
    assert describe({}, "ours-ov-int8-b8") == "ours, OpenVINO int8, batch ≤ 8"
    assert describe({}, "ours-ort-b8") == "ours, ONNX Runtime, batch ≤ 8"
    assert raw_key_variant("ov-int8") == ("openvino", "int8")
