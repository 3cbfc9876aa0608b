"""What the v2 model metadata adds from the manifest (service.model_summary), on the tiny package."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from service.manifest import load_manifest
from service.model_summary import manifest_summary

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore


def test_summary_of_a_package(shared_tiny_store: TinyStore) -> None:
    manifest = load_manifest(shared_tiny_store.folder)
    test = {"accuracy": 0.75, "macro_f1": 0.5, "num_samples": 8}
    described = dataclasses.replace(manifest, metrics={"test": test, "best_val": {"epoch": 1}})
    summary = manifest_summary(described)
    assert summary["backbone"] == "test" and summary["metrics"] == {"test": test}  # test metrics only
    assert summary["preprocess"]["resize"] == 36 and summary["preprocess"]["crop"] == 32
    assert summary["preprocess"]["mean"] == [0.485, 0.456, 0.406]  # a list: JSON, whichever encoder
    assert summary["explainable"] is False


def test_explainable_only_with_a_listed_grad_cam_file(shared_tiny_store: TinyStore) -> None:
    manifest = load_manifest(shared_tiny_store.folder)
    listed = next(iter(manifest.files))
    assert manifest_summary(dataclasses.replace(manifest, extra={"explain": listed}))["explainable"] is True
    assert manifest_summary(dataclasses.replace(manifest, extra={"explain": "cam.pt"}))["explainable"] is False


def test_no_manifest_no_summary() -> None:
    assert manifest_summary(None) == {}
