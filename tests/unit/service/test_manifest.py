from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.errors import PackageError
from service.manifest import (
    Manifest,
    Preprocess,
    TensorSpec,
    load_manifest,
    next_version,
    package_versions,
    sha256_file,
    validate_name,
    verify_files,
)


def _manifest(files: dict[str, str]) -> Manifest:
    return Manifest(
        name="flowers",
        version=2,
        backbone="resnet18",
        labels=("daisy", "rose"),
        preprocess=Preprocess(resize=256, crop=224),
        inputs=(TensorSpec("input", "FP32", (-1, 3, 224, 224)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 2)),),
        files=files,
        formats={"onnx": "model.onnx"},
        metrics={"test": {"accuracy": 0.5}},
    )


def test_round_trip_through_json(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx bytes")
    manifest = _manifest({"model.onnx": sha256_file(model)})
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.preprocess.input_shape == (3, 224, 224)
    verify_files(tmp_path, loaded)


def test_checksum_mismatch_and_missing_file_are_package_errors(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(PackageError, match="does not match"):
        verify_files(tmp_path, _manifest({"model.onnx": "0" * 64}))
    with pytest.raises(PackageError, match="missing"):
        verify_files(tmp_path, _manifest({"model.pt": "0" * 64}))
    with pytest.raises(PackageError, match="missing"):
        verify_files(tmp_path, _manifest({"../model.onnx": "0" * 64}))


def test_invalid_manifests(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"no manifest\.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="unreadable"):
        load_manifest(tmp_path)
    data = json.loads(_manifest({}).to_json())
    del data["labels"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="labels"):
        load_manifest(tmp_path)


def test_the_task_defaults_to_multiclass_and_an_unknown_one_is_a_load_error(tmp_path: Path) -> None:
    data = json.loads(_manifest({}).to_json())
    del data["task"], data["thresholds"]  # a package made before there were tasks
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    old = load_manifest(tmp_path)
    assert old.task == "multiclass" and old.head.name == "multiclass" and old.head.width == 2
    for task, thresholds, message in (
        ("regression", [], "unknown task 'regression'; known tasks: multiclass, multilabel, binary"),
        ("multilabel", [0.5], "multilabel with 2 labels needs 2 thresholds"),
    ):
        (tmp_path / "manifest.json").write_text(json.dumps(data | {"task": task, "thresholds": thresholds}))
        with pytest.raises(PackageError, match=message):
            load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(data | {"task": "binary", "thresholds": [0.3]}))
    binary = load_manifest(tmp_path)
    assert (
        binary.head.width == 1 and binary.thresholds == (0.3,) and json.loads(binary.to_json())["thresholds"] == [0.3]
    )


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "", "x" * 200, "a b"])
def test_names_with_path_tricks_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        validate_name(name)


def test_preprocess_validation() -> None:
    with pytest.raises(ValueError, match="crop"):
        Preprocess(resize=100, crop=224)
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(resize=256, crop=224, interpolation="magic")


def test_versions(tmp_path: Path) -> None:
    assert next_version(tmp_path, "m") == 1
    for version in ("1", "3", ".staging-4-1", "abc", "0"):
        (tmp_path / "m" / version).mkdir(parents=True)
    assert package_versions(tmp_path, "m") == [1, 3]
    assert next_version(tmp_path, "m") == 4
