from __future__ import annotations

import os
from pathlib import Path

import pytest

from finetune.publish import PackageSpec, PublishError, publish_package
from service.manifest import Preprocess, load_manifest, verify_files

SPEC = PackageSpec(
    name="pets",
    backbone="resnet18",
    labels=("cat", "dog"),
    preprocess=Preprocess(resize=72, crop=64),
    metrics={"test": {"accuracy": 0.9}},
    extra={"run": "runs/pets-1"},
)


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"torchscript")
    (folder / "model.onnx").write_bytes(b"onnx")
    return folder


def test_publish_writes_a_verified_manifest(tmp_path: Path, export_dir: Path) -> None:
    store = tmp_path / "store"
    package = publish_package(SPEC, export_dir=export_dir, store=store, formats=("torchscript", "onnx"))
    assert package == store / "pets" / "1"
    manifest = load_manifest(package)
    verify_files(package, manifest)
    assert manifest.labels == ("cat", "dog") and manifest.version == 1
    assert manifest.inputs[0].shape == (-1, 3, 64, 64) and manifest.outputs[0].shape == (-1, 2)
    assert set(manifest.versions) >= {"torch", "torchvision", "onnx"}
    assert manifest.formats == {"torchscript": "model.pt", "onnx": "model.onnx"}
    assert sorted(os.listdir(store / "pets")) == ["1"]  # no staging folder left behind


def test_versions_increment_and_explicit_version_is_not_overwritten(tmp_path: Path, export_dir: Path) -> None:
    store = tmp_path / "store"
    publish_package(SPEC, export_dir=export_dir, store=store, formats=("onnx",))
    second = publish_package(SPEC, export_dir=export_dir, store=store, formats=("onnx",))
    assert second.name == "2" and load_manifest(second).version == 2
    with pytest.raises(PublishError, match="already exists"):
        publish_package(SPEC, export_dir=export_dir, store=store, formats=("onnx",), version=1)
    assert publish_package(SPEC, export_dir=export_dir, store=store, formats=("onnx",), version=7).name == "7"


def test_missing_export_and_unwritable_store(tmp_path: Path, export_dir: Path) -> None:
    (export_dir / "model.onnx").unlink()
    with pytest.raises(PublishError, match="missing exported files"):
        publish_package(SPEC, export_dir=export_dir, store=tmp_path / "s", formats=("onnx",))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PublishError, match="cannot create"):
        publish_package(SPEC, export_dir=export_dir, store=blocker, formats=("torchscript",))


def test_failed_copy_leaves_no_package(tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"

    def broken_copy(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("finetune.publish.shutil.copy2", broken_copy)
    with pytest.raises(PublishError, match="No space left"):
        publish_package(SPEC, export_dir=export_dir, store=store, formats=("onnx",))
    assert os.listdir(store / "pets") == []
