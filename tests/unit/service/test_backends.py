from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from service import backends, registry
from service.backend_onnxruntime import OnnxBackend
from service.backend_openvino import OpenVinoBackend
from service.backend_torchscript import TorchScriptBackend
from service.backends import LoadOptions, choose_backend, load_backend, open_backend, resolve_device, warm_up
from service.errors import PackageError
from service.manifest import Manifest, Preprocess, TensorSpec

REPO = Path(__file__).resolve().parents[3]
SIZE, CLASSES = 16, 3


@dataclasses.dataclass(frozen=True)
class Package:
    folder: Path
    model: nn.Module
    manifest: Manifest


def _manifest(*, formats: tuple[str, ...] = ("onnx", "torchscript"), classes: int = CLASSES) -> Manifest:
    files = {"onnx": "model.onnx", "torchscript": "model.pt"}
    return Manifest(
        name="tiny",
        version=1,
        backbone="tiny-cnn",
        labels=tuple(f"class{i}" for i in range(classes)),
        preprocess=Preprocess(resize=SIZE, crop=SIZE),
        inputs=(TensorSpec("input", "FP32", (-1, 3, SIZE, SIZE)),),
        outputs=(TensorSpec("logits", "FP32", (-1, classes)),),
        files={},
        formats={f: files[f] for f in formats},
    )


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    """A tiny CNN exported to TorchScript and ONNX (dynamic batch) in one package folder."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES)).eval()
    folder = tmp_path_factory.mktemp("package")
    example = torch.randn(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.jit.trace(model, example).save(str(folder / "model.pt"))  # type: ignore[no-untyped-call]
        torch.onnx.export(
            model,
            (example,),
            str(folder / "model.onnx"),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    manifest = _manifest()
    (folder / "manifest.json").write_text(manifest.to_json())
    return Package(folder, model, manifest)


def _eager(model: nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


@pytest.mark.parametrize(
    ("factory", "file_name"),
    [(OnnxBackend, "model.onnx"), (OpenVinoBackend, "model.onnx"), (TorchScriptBackend, "model.pt")],
)
@pytest.mark.parametrize("n", [1, 5])
def test_backends_match_the_eager_model(package: Package, factory: Any, file_name: str, n: int) -> None:
    backend = factory(package.folder / file_name)
    batch = np.random.default_rng(n).standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)
    logits = backend.run(batch)
    assert logits.dtype == np.float32 and logits.shape == (n, CLASSES)
    np.testing.assert_allclose(logits, _eager(package.model, batch), atol=1e-4)
    assert backend.device == "cpu"


@pytest.mark.parametrize(
    ("formats", "requested", "expected"),
    [
        (("onnx", "torchscript"), "auto", "onnxruntime"),
        (("torchscript",), "auto", "torchscript"),
        (("onnx",), "auto", "onnxruntime"),
        (("onnx", "torchscript"), "torchscript", "torchscript"),
        (("onnx",), "onnxruntime", "onnxruntime"),
    ],
)
def test_choose_backend(formats: tuple[str, ...], requested: str, expected: str) -> None:
    assert choose_backend(_manifest(formats=formats), requested) == expected


def test_choose_backend_refusals() -> None:
    with pytest.raises(PackageError, match="torchscript needs a torchscript file; the package has onnx"):
        choose_backend(_manifest(formats=("onnx",)), "torchscript")
    with pytest.raises(PackageError, match="the package has no model files"):
        choose_backend(_manifest(formats=()), "auto")
    with pytest.raises(ValueError, match="tensorrt"):
        choose_backend(_manifest(), "tensorrt")
    both = _manifest()
    assert choose_backend(both, "auto", prefer_torchscript=True) == "torchscript"
    assert choose_backend(_manifest(formats=("onnx",)), "auto", prefer_torchscript=True) == "onnxruntime"


def test_every_registered_backend_loads_through_its_module(package: Package) -> None:
    batch = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE), dtype=np.float32)
    for name, spec in registry.BACKENDS.items():
        path = package.folder / registry.FORMAT_FILES[spec.precisions["fp32"]]
        backend = open_backend(name, path, LoadOptions())
        assert (backend.name, backend.precision, backend.device) == (name, "fp32", "cpu")
        np.testing.assert_allclose(backend.run(batch), _eager(package.model, batch), atol=1e-4)


@pytest.mark.parametrize("name", ["openvino", "torchscript"])
def test_bf16_stays_close_to_fp32(package: Package, name: str) -> None:
    path = package.folder / registry.FORMAT_FILES[registry.backend_spec(name).precisions["bf16"]]
    backend = open_backend(name, path, LoadOptions(precision="bf16"))
    batch = np.random.default_rng(1).standard_normal((4, 3, SIZE, SIZE), dtype=np.float32)
    assert backend.precision == "bf16" and backend.run(batch).dtype == np.float32
    np.testing.assert_allclose(backend.run(batch), _eager(package.model, batch), atol=0.1)


def test_choose_backend_by_precision(package: Package) -> None:
    with_int8 = dataclasses.replace(_manifest(), formats={"onnx": "model.onnx", "onnx_int8": "model.int8.onnx"})
    assert choose_backend(with_int8, "auto", precision="int8") == "onnxruntime"
    assert choose_backend(with_int8, "auto", precision="bf16") == "openvino"
    assert choose_backend(_manifest(), "openvino", precision="bf16") == "openvino"
    with pytest.raises(PackageError, match="onnxruntime has no bf16 precision"):
        choose_backend(_manifest(), "onnxruntime", precision="bf16")
    with pytest.raises(PackageError, match="openvino needs a onnx_int8 file"):
        choose_backend(_manifest(), "openvino", precision="int8")


def test_load_backend_and_warm_up(package: Package) -> None:
    onnx = load_backend(package.folder, package.manifest, requested="auto", device="cpu")
    script = load_backend(package.folder, package.manifest, requested="torchscript", device="cpu")
    assert (onnx.name, script.name) == ("onnxruntime", "torchscript")
    for backend in (onnx, script):
        warm_up(backend, package.manifest, batch_sizes=(1, 4))


@pytest.mark.parametrize("spinning", [True, False])
def test_onnx_intra_op_spinning_setting(package: Package, spinning: bool) -> None:
    backend = load_backend(package.folder, package.manifest, requested="onnxruntime", intra_op_spinning=spinning)
    assert isinstance(backend, OnnxBackend)
    options = backend._session.get_session_options()
    if spinning:  # ONNX Runtime's default is left alone
        with pytest.raises(Exception, match="allow_spinning"):
            options.get_session_config_entry("session.intra_op.allow_spinning")
    else:
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    warm_up(backend, package.manifest, batch_sizes=(2,))


def test_warm_up_catches_a_wrong_number_of_classes(package: Package) -> None:
    backend = load_backend(package.folder, package.manifest, device="cpu")
    with pytest.raises(PackageError, match=r"returns \(1, 3\).*promises \(1, 5\)"):
        warm_up(backend, _manifest(classes=5))


def test_broken_model_file_is_a_package_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(PackageError, match="onnxruntime cannot load"):
        load_backend(tmp_path, _manifest(formats=("onnx",)), device="cpu")
    with pytest.raises(PackageError, match="torchscript cannot load"):
        load_backend(tmp_path, _manifest(formats=("torchscript",)), device="cpu")  # model.pt is missing


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [resolve_device(d) for d in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu")
    monkeypatch.setattr(backends, "_onnxruntime_has_cuda", lambda: True)
    monkeypatch.setattr(backends, "_torch_has_cuda", lambda: False)
    assert resolve_device("auto", backend="onnxruntime") == "cuda:0"
    assert resolve_device("auto", backend="torchscript") == "cpu"


def test_torch_is_consulted_for_the_gpu_only_where_a_driver_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def torch_must_not_be_asked() -> bool:
        raise AssertionError("checked torch on a host without an NVIDIA driver")

    monkeypatch.setattr(backends, "_onnxruntime_has_cuda", lambda: False)
    monkeypatch.setattr(backends, "_NVIDIA_HINTS", (tmp_path / "absent",))
    monkeypatch.setattr(backends, "_torch_has_cuda", torch_must_not_be_asked)
    assert not backends._only_torch_reaches_gpu(_manifest())
    (tmp_path / "absent").touch()
    monkeypatch.setattr(backends, "_torch_has_cuda", lambda: True)
    assert backends._only_torch_reaches_gpu(_manifest())
    assert not backends._only_torch_reaches_gpu(_manifest(formats=("onnx",)))


def test_cuda_without_a_cuda_provider_falls_back_to_cpu(package: Package) -> None:
    if backends._onnxruntime_has_cuda():
        pytest.skip("this onnxruntime has CUDA")
    assert OnnxBackend(package.folder / "model.onnx", LoadOptions(device="cuda:0")).device == "cpu"


def test_an_onnx_only_server_never_imports_torch(package: Package) -> None:
    script = f"""
import dataclasses, sys
from pathlib import Path
import service.metrics
from service import backends
from service.manifest import load_manifest
folder = Path({str(package.folder)!r})
manifest = dataclasses.replace(load_manifest(folder), formats={{"onnx": "model.onnx"}})
backend = backends.load_backend(folder, manifest)  # auto backend, auto device
backends.warm_up(backend, manifest, batch_sizes=(1, 2))
service.metrics.render()
assert backend.name == "onnxruntime", backend.name
assert "torch" not in sys.modules, "torch was imported"
"""
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120)


def test_without_torch_a_torchscript_package_is_refused_naming_the_image_to_use(
    package: Package, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slim CPU image (serve-cpu) has no torch: a TorchScript-only package must say where it runs.

    ``sys.modules["torch"] = None`` is what a missing torch looks like to both seams: the registry's
    ``installed`` check (find_spec answers None) and the loader's import (ImportError).
    """
    from service import precision

    monkeypatch.setitem(sys.modules, "torch", None)
    assert not backends.installed("torchscript") and backends.installed("onnxruntime")
    only_ts = dataclasses.replace(package.manifest, formats={"torchscript": "model.pt"})
    for attempt in (
        lambda: choose_backend(only_ts, "auto"),
        lambda: choose_backend(package.manifest, "torchscript"),
        lambda: precision.select(package.folder, only_ts, device="cpu"),  # what the server runs at load
    ):
        with pytest.raises(PackageError, match=r"torchscript needs torch, which is not installed") as refused:
            attempt()
        assert "imgclf-cpu" in str(refused.value) and "the `serve` image" in str(refused.value)
    assert choose_backend(package.manifest, "auto") == "onnxruntime"  # ONNX still served
