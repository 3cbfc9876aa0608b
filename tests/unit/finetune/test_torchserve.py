"""TorchServe packaging (``finetune/torchserve.py``, ``finetune/package_cli.py``) and our handler
(``finetune/ts_handler.py``) run in-process with a fake TorchServe context, on a tiny real package."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from finetune import torchserve, ts_handler
from finetune.config import TrainConfig
from finetune.export import export_onnx, export_torchscript
from finetune.package_cli import get_args_parser, main
from finetune.publish import PackageSpec, publish_package
from finetune.torchserve import (
    ArchiveError,
    Ports,
    archive_for_torchserve,
    archive_name,
    build_mar,
    modes_to_formats,
    write_config_properties,
)
from service.manifest import Preprocess
from service.preprocess import preprocess_bytes

REPO = Path(__file__).resolve().parents[3]
SIZE = 16
LABELS = ("red", "green", "blue")


@dataclass(frozen=True)
class TinyPackage:
    folder: Path
    model: nn.Module


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> TinyPackage:
    """A tiny CNN exported to TorchScript and ONNX and published as ``store/tiny/1``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    root = tmp_path_factory.mktemp("tiny")
    example = torch.randn(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_torchscript(model, example, root / "export" / "model.pt")
        export_onnx(model, example, root / "export" / "model.onnx")
    spec = PackageSpec(
        name="tiny",
        backbone="tiny-cnn",
        labels=LABELS,
        preprocess=Preprocess(resize=SIZE, crop=SIZE),
        metrics={},
        extra={},
    )
    folder = publish_package(spec, export_dir=root / "export", store=root / "store", formats=("torchscript", "onnx"))
    return TinyPackage(folder, model)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _properties(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_names_and_modes() -> None:
    assert archive_name("demo", "torchscript") == "demo.mar"
    assert archive_name("demo", "onnx") == "demo-onnx.mar"
    assert modes_to_formats("none") == () and modes_to_formats("onnx") == ("onnx",)
    assert modes_to_formats("both") == ("onnx", "torchscript")  # the default format last: config loads it
    with pytest.raises(ArchiveError, match="unknown TorchServe archive format"):
        archive_name("demo", "tensorrt")
    with pytest.raises(ValueError, match="not one of"):
        modes_to_formats("all")


def test_build_mar_contents_and_config(package: TinyPackage, tmp_path: Path) -> None:
    out = tmp_path / "ts_store"
    mar = build_mar(package.folder, out_dir=out, batch_size=4, max_batch_delay_ms=20, workers=2)
    assert mar == out / "tiny.mar"
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        mar_manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        model_config = yaml.safe_load(archive.read("model-config.yaml"))
        shipped = {m: archive.read(f"service/{m}") for m in torchserve.SHARED_MODULES}
        assert json.loads(archive.read("manifest.json"))["labels"] == list(LABELS)
    assert mar_manifest["model"] == {
        "modelName": "tiny",
        "modelVersion": "1",
        "serializedFile": "model.pt",
        "handler": "ts_handler.py",
        "configFile": "model-config.yaml",
    }
    assert "model.onnx" not in names and {"ts_handler.py", "model.pt", "service/__init__.py"} <= names
    for module, data in shipped.items():  # byte-identical: one preprocessing, not a second copy
        assert data == (REPO / "service" / module).read_bytes(), module
    assert model_config == {
        "minWorkers": 2,
        "maxWorkers": 2,
        "batchSize": 4,
        "maxBatchDelay": 20,
        "responseTimeout": 120,
        "handler": {"top_k": 5, "precision": "auto"},
    }
    props = _properties(out / "config.properties")
    assert props["inference_address"] == "http://127.0.0.1:8080"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["metrics_address"] == "http://127.0.0.1:8082"
    assert (props["grpc_inference_address"], props["grpc_inference_port"]) == ("127.0.0.1", "7070")
    assert (props["grpc_management_address"], props["grpc_management_port"]) == ("127.0.0.1", "7071")
    assert props["model_store"] == str(out.resolve()) and props["load_models"] == "tiny=tiny.mar"
    assert props["install_py_dep_per_model"] == "false" and props["disable_token_authorization"] == "true"
    assert props["default_workers_per_model"] == "2" and "enable_model_api" not in props
    assert sorted(p.name for p in out.iterdir()) == ["config.properties", "tiny.mar"]  # no staging left


def test_config_properties_ports_and_load_models_merge(package: TinyPackage, tmp_path: Path) -> None:
    out = tmp_path / "ts_store"
    out.mkdir()
    (out / "other.mar").write_bytes(b"x")
    write_config_properties(out, models={"other": "other.mar", "gone": "gone.mar"})
    ports = Ports(9080, 9081, 9082, 9070, 9071)
    onnx = build_mar(package.folder, out_dir=out, fmt="onnx", ports=ports)
    assert onnx.name == "tiny-onnx.mar"
    with zipfile.ZipFile(onnx) as archive:
        assert json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"] == "model.onnx"
        assert "model.pt" not in archive.namelist()
    props = _properties(out / "config.properties")
    assert props["load_models"] == "other=other.mar,tiny=tiny-onnx.mar"  # gone.mar no longer exists
    assert props["inference_address"] == "http://127.0.0.1:9080" and props["grpc_management_port"] == "9071"


def test_build_mar_refuses_bad_packages(package: TinyPackage, tmp_path: Path) -> None:
    copy = tmp_path / "store" / "tiny" / "1"
    copy.mkdir(parents=True)
    for item in package.folder.iterdir():
        copy.joinpath(item.name).write_bytes(item.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["formats"] = {"torchscript": "model.pt"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArchiveError, match="no onnx model to archive; the package has torchscript"):
        build_mar(copy, out_dir=tmp_path / "out", fmt="onnx")
    (copy / "model.pt").write_bytes(b"tampered")
    with pytest.raises(ArchiveError, match="sha256"):
        build_mar(copy, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_shared_modules_must_not_import_unshipped_ones(
    package: TinyPackage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torchserve, "SHARED_MODULES", ("manifest.py", "registry.py", "preprocess.py", "backends.py"))
    with pytest.raises(ArchiveError, match=r"imports \['service.errors'\]"):
        build_mar(package.folder, out_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_archive_for_torchserve_modes(package: TinyPackage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert archive_for_torchserve(package.folder, store=tmp_path, mode="none") == []
    built = archive_for_torchserve(package.folder, store=tmp_path, mode="both")
    assert [p.name for p in built] == ["tiny-onnx.mar", "tiny.mar"]
    assert _properties(tmp_path / "config.properties")["load_models"] == "tiny=tiny.mar"
    monkeypatch.setattr(torchserve, "find_spec", lambda name: None)
    assert archive_for_torchserve(package.folder, store=tmp_path / "x", mode="onnx") == []
    with pytest.raises(ArchiveError, match="torch-model-archiver is not installed"):
        build_mar(package.folder, out_dir=tmp_path / "y")


def test_trainconfig_torchserve_mode(tmp_path: Path) -> None:
    assert TrainConfig(data=tmp_path).torchserve == "torchscript"
    assert TrainConfig(data=tmp_path, torchserve="both").torchserve == "both"
    with pytest.raises(ValueError, match="torchserve='tgz' is not one of"):
        TrainConfig(data=tmp_path, torchserve="tgz")


def test_archive_for_torchserve_skips_formats_the_package_lacks(
    package: TinyPackage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "store" / "tiny" / "1"
    copy.mkdir(parents=True)
    for item in ("manifest.json", "model.onnx"):
        copy.joinpath(item).write_bytes(package.folder.joinpath(item).read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["formats"], manifest["files"] = {"onnx": "model.onnx"}, {"model.onnx": manifest["files"]["model.onnx"]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    built = archive_for_torchserve(copy, store=tmp_path / "store", mode="both")
    assert [p.name for p in built] == ["tiny-onnx.mar"]
    assert "no torchscript TorchServe archive: the package has no torchscript model" in caplog.text


def test_package_cli(package: TinyPackage, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = get_args_parser().parse_args(
        [str(package.folder), "--format", "both", "--out-dir", str(tmp_path), "--http-port", "9180"]
    )
    assert main(args) == 0
    assert {"tiny.mar", "tiny-onnx.mar"} <= {p.name for p in tmp_path.iterdir()}
    props = _properties(tmp_path / "config.properties")
    assert props["management_address"] == "http://127.0.0.1:9181" and props["grpc_inference_port"] == "7070"
    assert "archived: " in capsys.readouterr().out
    assert main(get_args_parser().parse_args([str(tmp_path / "nope" / "1")])) == 2


# ---- the handler, in-process ---------------------------------------------------------------------


@dataclass
class FakeContext:
    """The parts of TorchServe's ``ts.context.Context`` our handler uses."""

    system_properties: dict[str, Any]
    manifest: dict[str, Any]
    model_yaml_config: dict[str, Any]
    statuses: dict[int, tuple[int, str]] = field(default_factory=dict)
    content_types: dict[int, str] = field(default_factory=dict)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value


def _unpacked(mar: Path, into: Path) -> FakeContext:
    """Unzip an archive as TorchServe does and build the context TorchServe would pass."""
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(into)
    return FakeContext(
        system_properties={"model_dir": str(into), "gpu_id": None, "batch_size": 4},
        manifest=json.loads((into / "MAR-INF" / "MANIFEST.json").read_text()),
        model_yaml_config=yaml.safe_load((into / "model-config.yaml").read_text()),
    )


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_handler_answers_a_batch_and_fails_only_bad_requests(package: TinyPackage, tmp_path: Path, fmt: str) -> None:
    context = _unpacked(build_mar(package.folder, out_dir=tmp_path / "store", fmt=fmt), tmp_path / "model")
    classifier = ts_handler.ImageClassifier.from_context(context)
    assert classifier.backend.name in {"torchscript": ("torchscript",), "onnx": ("onnxruntime", "openvino")}[fmt]
    images = [_png((220, 20, 20)), _png((20, 200, 30), (64, 48)), _png((10, 10, 230))]
    rows: list[dict[str, Any]] = [
        {"body": images[0]},
        {"data": bytearray(images[1])},  # multipart field / gRPC input as TorchServe hands it over
        {"body": b"not an image"},
        {"file": images[2]},
        {"body": {"decoded": "json"}},
        {"body": images[2]},
    ]
    answers = classifier.handle(rows, context)
    assert len(answers) == len(rows) and set(context.content_types.values()) == {"application/json"}
    spec = classifier.manifest.preprocess
    with torch.no_grad():
        batch = torch.from_numpy(np.stack([preprocess_bytes(img, spec) for img in images]))
        expected = torch.softmax(package.model(batch), dim=1).numpy()
    for answer, probs in zip([answers[0], answers[1], answers[5]], expected, strict=True):
        assert list(answer) == [LABELS[i] for i in np.argsort(-probs, kind="stable")]  # top-k, best first
        assert list(answer.values()) == pytest.approx(sorted(probs, reverse=True), abs=1e-5)
    assert answers[2] == {
        "code": 400,
        "type": "InvalidInput",
        "message": "body: not a recognised image (JPEG, PNG, WebP, BMP, GIF, TIFF)",
    }
    assert "field named 'data' (got 'file')" in answers[3]["message"]
    assert "body: expected encoded image bytes, got dict" in answers[4]["message"]
    assert sorted(context.statuses) == [2, 3, 4] and {c for c, _ in context.statuses.values()} == {400}


def test_handler_entry_point_and_top_k(package: TinyPackage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    context = _unpacked(build_mar(package.folder, out_dir=tmp_path / "store"), tmp_path / "model")
    context.model_yaml_config["handler"]["top_k"] = 2
    monkeypatch.setattr(ts_handler, "_classifier", None)
    assert ts_handler.handle(None, context) is None  # TorchServe's initialize call
    (answer,) = ts_handler.handle([{"body": _png((200, 0, 0))}], context) or []
    assert len(answer) == 2 and sum(answer.values()) < 1.0


def test_handler_refuses_a_model_file_that_does_not_match(package: TinyPackage, tmp_path: Path) -> None:
    context = _unpacked(build_mar(package.folder, out_dir=tmp_path / "store"), tmp_path / "model")
    (tmp_path / "model" / "model.pt").write_bytes(b"swapped")
    with pytest.raises(ts_handler.PackageError, match="sha256 does not match"):
        ts_handler.ImageClassifier.from_context(context)
    context.manifest["model"]["serializedFile"] = "weights.pth"
    with pytest.raises(ts_handler.PackageError, match=r"'weights\.pth' is not a model file of tiny v1"):
        ts_handler.ImageClassifier.from_context(context)


def test_archive_is_self_contained(package: TinyPackage, tmp_path: Path) -> None:
    """In the unpacked archive, the handler imports the shipped ``service`` modules, not the repository's."""
    _unpacked(build_mar(package.folder, out_dir=tmp_path / "store"), tmp_path / "model")
    code = "import ts_handler, service.preprocess as p, service.backends as b; print(p.__file__); print(b.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path / "model", capture_output=True, text=True, check=True
    )
    for line in result.stdout.split():
        assert Path(line).resolve().is_relative_to((tmp_path / "model").resolve()), result.stdout


def _with_int8(package: TinyPackage, root: Path) -> Path:
    """The tiny package again, as version 2, with an "int8" model (a copy of the fp32 ONNX) and a parity set."""
    from finetune.release import write_parity_set
    from service.manifest import load_manifest
    from service.preprocess import normalize_array

    export = package.folder.parents[2] / "export"
    (export / "model.int8.onnx").write_bytes((export / "model.onnx").read_bytes())
    manifest = load_manifest(package.folder)
    pixels = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        inputs = torch.from_numpy(np.stack([normalize_array(p, manifest.preprocess) for p in pixels]))
        write_parity_set(export, pixels, package.model(inputs).numpy())
    spec = PackageSpec(
        name="tiny",
        backbone="tiny-cnn",
        labels=LABELS,
        preprocess=manifest.preprocess,
        metrics={},
        extra={},
        parity={"images": "parity_images.npy", "logits": "parity_logits.npy"},
    )
    formats = ("torchscript", "onnx", "onnx_int8")
    return publish_package(spec, export_dir=export, store=root / "store", formats=formats, version=2)


def test_the_onnx_archive_carries_int8_and_the_handler_serves_it(package: TinyPackage, tmp_path: Path) -> None:
    folder = _with_int8(package, tmp_path)
    onnx_mar = build_mar(folder, out_dir=tmp_path / "ts", fmt="onnx", precision="int8")
    with zipfile.ZipFile(onnx_mar) as archive:
        assert {"model.onnx", "model.int8.onnx", "parity_images.npy", "parity_logits.npy"} <= set(archive.namelist())
    context = _unpacked(onnx_mar, tmp_path / "onnx")
    assert context.model_yaml_config["handler"]["precision"] == "int8"
    classifier = ts_handler.ImageClassifier.from_context(context)
    assert (classifier.backend.name in ("onnxruntime", "openvino"), classifier.backend.precision) == (True, "int8")
    (answer,) = classifier.handle([{"body": _png((220, 20, 20))}], context)
    assert next(iter(answer)) in LABELS
    ts_mar = build_mar(folder, out_dir=tmp_path / "ts", fmt="torchscript", precision="fp32")
    with zipfile.ZipFile(ts_mar) as archive:
        names = set(archive.namelist())
    assert "model.int8.onnx" not in names and "parity_logits.npy" in names
    with pytest.raises(ArchiveError, match="precision 'fp16' is not one of auto, fp32, bf16, int8"):
        build_mar(folder, out_dir=tmp_path / "ts", precision="fp16")


def test_the_archive_refuses_a_shipped_module_or_handler_importing_an_unshipped_one(tmp_path: Path) -> None:
    shared = tmp_path / "service"
    shared.mkdir()
    (shared / "rules.py").write_text("import numpy\n", encoding="utf-8")
    (shared / "tasks.py").write_text(
        "from service import rules\nfrom service.rules import deadline\n", encoding="utf-8"
    )
    handler = tmp_path / "ts_handler.py"
    handler.write_text("from service.tasks import make_task\n", encoding="utf-8")
    torchserve._check_closed(shared, handler)  # closed: every service import is shipped

    (shared / "tasks.py").write_text("from service.admission import Ewma\n", encoding="utf-8")
    with pytest.raises(torchserve.ArchiveError, match=r"service/tasks\.py imports \['service\.admission'\]"):
        torchserve._check_closed(shared, handler)
    (shared / "tasks.py").write_text("import service.rules\n", encoding="utf-8")
    handler.write_text("import service.http_gate as gate\n", encoding="utf-8")
    with pytest.raises(torchserve.ArchiveError, match=r"^ts_handler\.py imports \['service\.http_gate'\]"):
        torchserve._check_closed(shared, handler)


def test_the_shipped_modules_of_this_checkout_are_closed(tmp_path: Path) -> None:
    shared = tmp_path / "service"
    shared.mkdir()
    for module in torchserve.SHARED_MODULES:
        (shared / module).write_bytes((torchserve.SERVICE_DIR / module).read_bytes())
    torchserve._check_closed(shared, torchserve.HANDLER)
