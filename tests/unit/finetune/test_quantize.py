"""INT8 calibration with NNCF and the evidence it is published on, on a tiny real model and real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from finetune import quantize
from finetune.data import Sample
from finetune.export import export_and_check
from service.manifest import Preprocess
from service.tasks import make_task

SPEC = Preprocess(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLASSES = ("red", "green", "blue")


def _samples(root: Path, count: int) -> list[Sample]:
    """``count`` images per class, each class a dominant colour with noise."""
    rng = np.random.default_rng(0)
    samples = []
    for label in range(len(CLASSES)):
        for i in range(count):
            pixels = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
            pixels[..., label] += 180
            path = root / f"{label}-{i}.png"
            Image.fromarray(pixels).save(path)
            samples.append(Sample(path, label))
    return samples


def _model() -> nn.Module:
    """A 'trained' colour classifier: the mean of each channel, scaled, is the logit of its class."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    )
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
        for c in range(3):
            model[0].weight[c, c, 1, 1] = 1.0
            model[0].bias[c] = 1.0
        model[4].weight.zero_()
        model[4].weight[:, :3] = 4.0 * torch.eye(3)
        model[4].bias.zero_()
    return model.eval()


def test_stratified_sample_keeps_every_class_and_is_seeded(tmp_path: Path) -> None:
    samples = [Sample(tmp_path / f"{i}.png", i % 3) for i in range(90)] + [Sample(tmp_path / "x.png", 3)]
    chosen = quantize.stratified_sample(samples, 10, seed=0)
    assert len(chosen) == 10 and {s.label for s in chosen} == {0, 1, 2, 3}
    assert chosen == quantize.stratified_sample(samples, 10, seed=0) != quantize.stratified_sample(samples, 10, seed=1)
    assert quantize.stratified_sample(samples[:5], 10, seed=0) == samples[:5]


def test_quantize_int8_writes_a_qdq_model_both_engines_run(tmp_path: Path) -> None:
    model = _model()
    export_and_check(model, torch.rand(4, 3, 16, 16), tmp_path, formats=("onnx",))
    calibration = np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32)
    path = quantize.quantize_int8(tmp_path / "model.onnx", calibration, tmp_path / "model.int8.onnx", recipe="mixed")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    names = quantize._float_ends(onnx.load(str(tmp_path / "model.onnx")))
    assert len(names) == 2  # the first Conv and the last Gemm


@pytest.mark.parametrize("int8", [True, False])
def test_evaluate_publishes_int8_only_when_it_passes(tmp_path: Path, int8: bool) -> None:
    model = _model()
    export = tmp_path / "export"
    export_and_check(model, torch.rand(4, 3, 16, 16), export, formats=("onnx",))
    samples = _samples(tmp_path, 12)
    options = quantize.Int8Options(samples[::2], size=12) if int8 else None
    evidence = quantize.evaluate(
        export, quantize.eager_runner(model), samples[1::2], SPEC, task=make_task("multiclass", CLASSES), int8=options
    )
    assert set(evidence.metrics) == ({"bf16", "int8"} if int8 else {"bf16"})
    if not int8:
        assert evidence.formats == () and not (export / "model.int8.onnx").exists()
        return
    found = evidence.metrics["int8"]
    assert found["verdict"] == "pass" and found["recipe"] == "nncf-performance" and found["calibration_images"] == 12
    assert set(found["backends"]) == {"onnxruntime", "openvino"}
    assert found["backends"]["openvino"]["images"] == 18 and found["backends"]["openvino"]["accuracy"] == 1.0
    assert evidence.formats == ("onnx_int8",) and (export / "model.int8.onnx").is_file()
    assert any(line.startswith("int8 on openvino (nncf-performance): pass") for line in evidence.lines())


def test_evaluate_gives_up_after_every_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    export = tmp_path / "export"
    export_and_check(model, torch.rand(4, 3, 16, 16), export, formats=("onnx",))
    samples = _samples(tmp_path, 6)

    def broken(onnx_path: Path, calibration: np.ndarray, out_path: Path, *, recipe: str) -> Path:
        proto = onnx.load(str(onnx_path))
        for tensor in proto.graph.initializer:  # a quantizer that ruins the weights
            array = -onnx.numpy_helper.to_array(tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
        onnx.save(proto, str(out_path))
        return out_path

    monkeypatch.setattr(quantize, "quantize_int8", broken)
    evidence = quantize.evaluate(
        export,
        quantize.eager_runner(model),
        samples,
        SPEC,
        task=make_task("multiclass", CLASSES),
        int8=quantize.Int8Options(samples),
    )
    assert evidence.metrics["int8"]["verdict"] == "fail" and evidence.formats == ()
    assert [t["recipe"] for t in evidence.metrics["int8"]["tried"]] == [f"nncf-{r}" for r in quantize.RECIPES]
    assert not (export / "model.int8.onnx").exists()
