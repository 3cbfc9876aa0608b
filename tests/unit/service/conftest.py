"""A real, tiny model package shared by the service unit tests: no mocks of our own components.

``tiny_export`` trains nothing: it builds a small CNN (Conv2d -> AdaptiveAvgPool -> Flatten -> Linear,
3 classes), exports it to TorchScript and ONNX with ``finetune.export.export_and_check`` (which loads
both back and compares them with the eager model) once per session. ``tiny_store`` publishes it with
``finetune.publish.publish_package`` into a fresh store per test, so a test may tamper with its copy;
``shared_tiny_store`` is one store per module, for tests that only read it.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.dataplane import DataPlane
from service.http_app import create_app
from service.manifest import Preprocess
from service.repository import ModelRepository
from service.settings import Settings

if TYPE_CHECKING:
    from finetune.publish import PackageSpec

TINY = "tiny"
LABELS = ("a", "b", "c")
CROP = 32
FORMATS = ("torchscript", "onnx")


@dataclass(frozen=True)
class TinyExport:
    """The exported files of the tiny model and what publishing them needs."""

    export_dir: Path
    spec: PackageSpec


@dataclass(frozen=True)
class TinyStore:
    """A model store holding ``tiny/1``; ``publish()`` adds the next version of the same model."""

    store: Path
    export: TinyExport

    @property
    def folder(self) -> Path:
        return self.store / TINY / "1"

    @property
    def preprocess(self) -> Preprocess:
        return self.export.spec.preprocess

    def publish(self, *, name: str = TINY) -> Path:
        from finetune.publish import PackageSpec, publish_package

        spec = PackageSpec(
            name=name,
            backbone=self.export.spec.backbone,
            labels=self.export.spec.labels,
            preprocess=self.export.spec.preprocess,
            metrics={},
            extra={},
        )
        return publish_package(spec, export_dir=self.export.export_dir, store=self.store, formats=FORMATS)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    """A tiny CNN exported to TorchScript and ONNX, each checked against the eager model."""
    import torch  # lazily: the settings and CLI tests need no torch
    from torch import nn

    from finetune.export import export_and_check
    from finetune.publish import PackageSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, len(LABELS)))
    images = torch.rand(4, 3, CROP, CROP)
    export_dir = tmp_path_factory.mktemp("tiny-export")
    export_and_check(model, images, export_dir, formats=FORMATS)
    spec = PackageSpec(
        name=TINY,
        backbone="test",
        labels=LABELS,
        preprocess=Preprocess(resize=36, crop=CROP),
        metrics={},
        extra={},
    )
    return TinyExport(export_dir, spec)


def _publish_store(root: Path, export: TinyExport) -> TinyStore:
    from finetune.publish import publish_package

    store = root / "store"
    published = publish_package(export.spec, export_dir=export.export_dir, store=store, formats=FORMATS)
    assert published == store / TINY / "1"
    return TinyStore(store, export)


@pytest.fixture
def tiny_store(tmp_path: Path, tiny_export: TinyExport) -> TinyStore:
    """A fresh store with the tiny model published as version 1: the test may change it."""
    return _publish_store(tmp_path, tiny_export)


@pytest.fixture(scope="module")
def shared_tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_export: TinyExport) -> TinyStore:
    """Like ``tiny_store``, one per test module, for tests that only read it (and module-scoped servers)."""
    return _publish_store(tmp_path_factory.mktemp("shared"), tiny_export)


def png_bytes(seed: int, *, width: int = 40, height: int = 48) -> bytes:
    """A noisy RGB PNG, different for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def png() -> Callable[..., bytes]:
    """``png(seed, width=40, height=48)``: encoded PNG bytes of a noisy image."""
    return png_bytes


@contextmanager
def serving(
    store: Path, *, load: bool = True, extend: Callable[[FastAPI], None] | None = None, **overrides: Any
) -> Iterator[TestClient]:
    """An in-process app (the real DataPlane and repository) over ``store``, models loaded unless ``load`` is
    false; ``extend`` adds routes first; shut down on exit. Settings: CPU, batches of 4, 2 decode workers."""
    values: dict[str, Any] = {"device": "cpu", "max_batch_size": 4, "decode_workers": 2, "drain_timeout_s": 5.0}
    settings = Settings(model_store=store, **{**values, **overrides})
    repository = ModelRepository(settings)
    plane = DataPlane(repository, settings)
    app = create_app(plane)
    if extend is not None:
        extend(app)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.portal is not None
        if load:
            client.portal.call(repository.load_all)
        try:
            yield client
        finally:
            client.portal.call(functools.partial(plane.shutdown, timeout=5.0))
