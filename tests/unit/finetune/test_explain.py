"""Grad-CAM (``finetune/explain.py``): the heatmap points at the region that decides the class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import VisionTransformer

from finetune import explain
from finetune.export import export_and_check
from finetune.publish import PackageSpec, publish_package
from service.manifest import Preprocess, load_manifest, verify_files

SIZE = 32
LABELS = ("empty", "square")


def square_images(n: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dim noise; label 1 adds a bright 6x6 square somewhere inside the top-left quadrant."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.3, size=(n, 3, SIZE, SIZE)).astype(np.float32)
    labels = rng.integers(0, 2, size=n)
    for image, label in zip(images, labels, strict=True):
        if label:
            top, left = rng.integers(1, SIZE // 2 - 7, size=2)
            image[:, top : top + 6, left : left + 6] = 1.0
    return torch.from_numpy(images), torch.from_numpy(labels)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(LABELS)),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    model = tiny_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    images, labels = square_images(256, seed=0)
    for step in range(60):
        batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_heatmap_mass_is_in_the_deciding_quadrant(trained: nn.Module, tmp_path: Path) -> None:
    images, labels = square_images(32, seed=1)
    with torch.no_grad():
        assert (trained(images).argmax(1) == labels).float().mean() > 0.9  # the model learned the task
    assert explain.export_cam(trained, "tiny", images[:2], tmp_path / "cam.pt") == "3"  # the last ReLU
    cam = torch.jit.load(str(tmp_path / "cam.pt"))
    squares = images[labels == 1]
    heat = explain.grad_cam(cam, squares, class_index=1)
    assert heat.shape == (len(squares), SIZE, SIZE) and heat.min() >= 0 and heat.max() <= 1
    quadrant = heat[:, : SIZE // 2, : SIZE // 2].sum(axis=(1, 2)) / heat.sum(axis=(1, 2))
    assert quadrant.min() > 0.5, quadrant


def test_transformers_are_refused_by_name(tmp_path: Path) -> None:
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)
    with pytest.raises(ValueError, match=r"vit_tiny.*no last convolutional feature map"):
        explain.export_cam(vit, "vit_tiny", torch.rand(1, 3, 32, 32), tmp_path / "cam.pt")
    assert not (tmp_path / "cam.pt").exists()
    assert explain.export_for_package(vit, "vit_tiny", torch.rand(1, 3, 32, 32), tmp_path) == ()


def test_overlay_has_the_image_size() -> None:
    picture = explain.overlay(Image.new("RGB", (40, 30)), np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    assert picture.size == (40, 30) and picture.mode == "RGB"


def publish_explainable(model: nn.Module, store: Path, work: Path) -> Path:
    """Export ``model`` (ONNX + cam.pt) and publish it as ``squares/1`` with manifest extra 'explain'."""
    example = torch.rand(2, 3, SIZE, SIZE)
    export_and_check(model, example, work, formats=("onnx",))
    extra = explain.export_for_package(model, "tiny", example, work)
    spec = PackageSpec(
        name="squares",
        backbone="tiny",
        labels=LABELS,
        preprocess=Preprocess(resize=SIZE, crop=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        metrics={},
        extra={explain.EXPLAIN_KEY: extra[0]},
    )
    return publish_package(spec, export_dir=work, store=store, formats=("onnx",), extra_files=extra)


def test_explain_command_on_a_published_package(
    trained: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = publish_explainable(trained, tmp_path / "store", tmp_path / "export")
    manifest = load_manifest(package)
    assert manifest.extra["explain"] == "cam.pt" and "cam.pt" in manifest.files
    verify_files(package, manifest)
    images, labels = square_images(8, seed=2)
    index = int(labels.argmax())
    photo = tmp_path / "photo.png"
    Image.fromarray(np.uint8(images[index].permute(1, 2, 0).numpy() * 255)).save(photo)
    args = explain.get_args_parser().parse_args(
        [str(photo), "--package", str(package), "--out", str(tmp_path / "h.png")]
    )
    assert explain.main(args) == 0
    assert "predicted: square" in capsys.readouterr().out
    with Image.open(tmp_path / "h.png") as heat:
        assert heat.size == (SIZE, SIZE)
    bad = explain.get_args_parser().parse_args([str(photo), "--package", str(package), "--class", "nope"])
    assert explain.main(bad) == 2
