"""Grad-CAM explanations over HTTP (``POST /explanations/{model}[/{version}]``) on real packages."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.unit.service.conftest import serving

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore

CROP = 32


def publish_explainable(store: Path, work: Path) -> Path:
    """A tiny CNN published as ``cammed/1`` with ONNX and its Grad-CAM module (manifest extra 'explain')."""
    import torch
    from torch import nn

    from finetune.explain import export_for_package
    from finetune.export import export_and_check
    from finetune.publish import PackageSpec, publish_package
    from service.manifest import Preprocess

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    example = torch.rand(2, 3, CROP, CROP)
    export_and_check(model, example, work, formats=("onnx",))
    extra = export_for_package(model, "tiny", example, work)
    spec = PackageSpec("cammed", "tiny", ("x", "y"), Preprocess(resize=36, crop=CROP), {}, {"explain": extra[0]})
    return publish_package(spec, export_dir=work, store=store, formats=("onnx",), extra_files=extra)


@pytest.fixture
def client(tiny_store: TinyStore, tmp_path: Path) -> Iterator[TestClient]:
    publish_explainable(tiny_store.store, tmp_path / "export")
    with serving(tiny_store.store) as test_client:
        yield test_client


def test_heatmap_as_png_and_json(client: TestClient, png: Callable[..., bytes]) -> None:
    response = client.post("/explanations/cammed", content=png(1))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as picture:
        assert picture.size == (CROP, CROP) and picture.mode == "L"
    response = client.post("/explanations/cammed/1?format=json", content=png(1))
    heat = np.asarray(response.json())
    assert response.status_code == 200 and heat.shape == (CROP, CROP)
    assert heat.min() >= 0 and heat.max() <= 1
    accept = client.post("/explanations/cammed", content=png(1), headers={"Accept": "application/json"})
    assert np.asarray(accept.json()).shape == (CROP, CROP)


def test_a_requested_label_is_explained_instead_of_the_predicted_one(
    client: TestClient, png: Callable[..., bytes]
) -> None:
    image = png(3)
    default = np.asarray(client.post("/explanations/cammed?format=json", content=image).json())
    x, y = (
        np.asarray(client.post(f"/explanations/cammed?format=json&label={label}", content=image).json())
        for label in "xy"
    )
    assert any(np.array_equal(default, heat) for heat in (x, y))  # the default is the predicted label's
    assert not np.allclose(x, y)  # two labels, two different maps of evidence


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/explanations/tiny", 400, "has no Grad-CAM module"),
        ("/explanations/nope", 404, "not found"),
        ("/explanations/cammed/9", 404, "no version '9'"),
        ("/explanations/cammed?format=svg", 400, "choose png"),
        ("/explanations/cammed?label=z", 400, "label 'z' is not one of the model's labels: x, y"),
    ],
)
def test_clear_errors(client: TestClient, png: Callable[..., bytes], path: str, status: int, message: str) -> None:
    response = client.post(path, content=png(2))
    assert response.status_code == status
    assert message in response.json()["message"] and response.json()["code"] == status


def test_undecodable_image_is_a_client_error(client: TestClient) -> None:
    assert client.post("/explanations/cammed", content=b"not an image").status_code == 400


def test_the_server_modules_do_not_import_torch() -> None:
    code = "import sys, service.dataplane, service.http_app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
