"""The registry is the one list of backends and formats: every other list is derived from it."""

from __future__ import annotations

import importlib

import pytest

from finetune import config, export, torchserve
from service import cli, registry, settings
from service.registry import BACKENDS, FORMAT_FILES, FORMATS


def test_every_backend_reads_registered_formats_and_has_a_loader() -> None:
    for spec in BACKENDS.values():
        assert spec.precisions["fp32"] in FORMATS
        assert set(spec.precisions) <= set(registry.PRECISIONS)
        assert set(spec.formats) <= set(FORMATS)
        assert callable(importlib.import_module(spec.module).load)
    for fmt in FORMATS.values():
        assert fmt.exported or fmt.derived_from in FORMATS


def test_one_format_feeds_several_backends() -> None:
    assert registry.backends_reading("onnx") == ("onnxruntime", "openvino")
    assert registry.backends_reading("onnx_int8") == ("onnxruntime", "openvino")
    assert registry.derived_formats("onnx") == ("onnx_int8",)
    assert registry.fp32_format("torchscript") == "torchscript"


def test_every_other_list_is_derived() -> None:
    assert settings.BACKENDS == cli.BACKENDS == ("auto", *BACKENDS)
    assert settings.PRECISIONS == ("auto", "fp32", "bf16", "int8")
    assert ("none", *registry.EXPORT_FORMATS, "both") == config.TORCHSERVE_MODES
    assert set(export.EXPORTERS) == set(registry.EXPORT_FORMATS) == set(torchserve.FORMATS)
    modules = {f"{spec.module.rpartition('.')[2]}.py" for spec in BACKENDS.values()}
    assert modules <= set(torchserve.SHARED_MODULES)
    assert set(FORMAT_FILES) == set(FORMATS)
    assert {name: spec.platform for name, spec in BACKENDS.items()} == dict(registry.PLATFORMS)


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose from onnxruntime, openvino, torchscript"):
        registry.backend_spec("tensorrt")
