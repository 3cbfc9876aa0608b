from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn

from finetune import export
from finetune.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportCheckError,
    compare_logits,
    export_and_check,
    export_onnx,
    export_torchscript,
    run_onnx,
    run_torchscript,
)
from service.manifest import Preprocess
from service.preprocess import preprocess_image
from service.registry import EXPORT_FORMATS, FORMAT_FILES
from tests.conftest import make_image_folder

SIZE = 64


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Tensor:
    """Five real preprocessed images (N, 3, 64, 64), as the trainer would pass from its validation split."""
    root = make_image_folder(tmp_path_factory.mktemp("val"), {"red": 2, "green": 2, "blue": 1}, size=80)
    spec = Preprocess(resize=72, crop=SIZE)
    arrays = []
    for path in sorted(root.rglob("*.png")):
        with Image.open(path) as image:
            arrays.append(preprocess_image(image, spec))
    return torch.from_numpy(np.stack(arrays))


def _vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(
        image_size=SIZE, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head: all logits 0
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=4),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=4),
    "vit": _vit,
}


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class FrozenBranch(TinyNet):
    """A Python branch on the batch size: a trace freezes the branch its example took."""

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        if x.shape[0] == 2:
            return logits
        return logits.flip(1)


class FrozenBatch(TinyNet):
    """``int()`` turns the traced batch size into a constant: the export cannot run other batch sizes."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).reshape(int(x.shape[0]), -1))


@pytest.mark.parametrize("name", list(MODELS))
def test_export_and_check_passes(name: str, images: Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().train()
    reports = export_and_check(model, images, tmp_path)
    assert not model.training
    assert set(reports) == {"torchscript", "onnx"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FORMAT_FILES[f] for f in EXPORT_FORMATS)  # no .data
    for fmt, report in reports.items():
        assert report.passed and report.format == fmt
        assert report.num_images == len(images) and report.top1_agreement == 1.0
        assert report.max_abs_diff <= report.tolerance
        json.dumps(report.to_dict())
    assert reports["onnx"].opset == 18 and reports["torchscript"].opset is None


def test_dynamic_batch_axis(images: Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MODELS["vit"]().eval()  # the class token is expanded to the batch size inside forward
    ts = export_torchscript(model, images[:2], tmp_path / "model.pt")
    ox = export_onnx(model, images[:2], tmp_path / "model.onnx")
    for n in (1, 5):
        batch = images[:n]
        with torch.no_grad():
            reference = model(batch).numpy()
        for fmt, candidate in (
            ("torchscript", run_torchscript(ts, batch.numpy())),
            ("onnx", run_onnx(ox, batch.numpy())),
        ):
            assert candidate.shape == (n, 4)
            assert compare_logits(reference, candidate, fmt=fmt).passed


def test_onnx_file_is_single_with_named_dynamic_io(images: Tensor, tmp_path: Path) -> None:
    path = export_onnx(TinyNet(), images[:2], tmp_path / "model.onnx", opset=17)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    proto = onnx.load(str(path))
    assert export.onnx_opset(path) == 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME) == ("input", "logits")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and [d.dim_value for d in in_dims[1:]] == [3, SIZE, SIZE]
    assert out.type.tensor_type.shape.dim[0].dim_param


def test_compare_logits() -> None:
    reference = np.array([[2.0, 1.0, 0.0], [1.0, 0.9995, -1.0]])
    assert compare_logits(reference, reference.copy(), fmt="onnx").passed
    ok = compare_logits(reference, reference + 1e-4, fmt="onnx", atol=1e-3, rtol=1e-3)
    assert ok.passed and ok.tolerance == pytest.approx(1e-3 + 2e-3)

    perturbed = compare_logits(reference, reference + np.array([0.01, 0.0, 0.0]), fmt="onnx")
    assert not perturbed.passed and perturbed.top1_agreement == 1.0
    assert perturbed.max_abs_diff == pytest.approx(0.01)

    flipped = reference.copy()
    flipped[1, :2] = [0.9995, 1.0]  # within tolerance, but the top-1 class changes
    report = compare_logits(reference, flipped, fmt="torchscript")
    assert report.max_abs_diff <= report.tolerance
    assert not report.passed and report.top1_agreement == 0.5


@pytest.mark.parametrize("candidate", [np.zeros((1, 3)), np.full((2, 3), np.nan)])
def test_compare_logits_fails_on_wrong_shape_or_nan(candidate: np.ndarray) -> None:
    report = compare_logits(np.zeros((2, 3)), candidate, fmt="onnx")
    assert not report.passed and report.max_abs_diff == float("inf")


def test_real_mismatch_raises(images: Tensor, tmp_path: Path) -> None:
    with pytest.raises(ExportCheckError) as caught:
        export_and_check(FrozenBranch(), images, tmp_path)
    message = str(caught.value)
    for needle in ("torchscript", "onnx", "tolerance", "top-1 agreement", "FAILED"):
        assert needle in message
    assert {r.format for r in caught.value.reports} == {"torchscript", "onnx"}
    assert all(r.top1_agreement < 1.0 for r in caught.value.reports)


def test_export_that_cannot_run_other_batch_sizes_raises(images: Tensor, tmp_path: Path) -> None:
    with pytest.raises(ExportCheckError, match="could not be made or run on a batch of 5"):
        export_and_check(FrozenBatch(), images, tmp_path, formats=("onnx",))


def test_small_onnx_drift_raises(images: Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def drifting(path: Path, batch: np.ndarray) -> np.ndarray:
        return run_onnx(path, batch) + 0.05

    monkeypatch.setitem(export.EXPORTERS, "onnx", (export.export_onnx, drifting))
    with pytest.raises(ExportCheckError) as caught:
        export_and_check(TinyNet(), images, tmp_path)
    (report,) = caught.value.reports
    assert report.format == "onnx" and report.top1_agreement == 1.0
    assert report.max_abs_diff == pytest.approx(0.05, rel=1e-3)


def test_every_exported_format_of_the_registry_has_an_exporter() -> None:
    assert set(export.EXPORTERS) == set(EXPORT_FORMATS)


def test_unknown_format(images: Tensor, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown export formats"):
        export_and_check(TinyNet(), images, tmp_path, formats=("tflite",))


@pytest.mark.slow
def test_swin_exports(images: Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None, num_classes=4)
    reports = export_and_check(model, images, tmp_path)
    assert all(report.passed for report in reports.values())
