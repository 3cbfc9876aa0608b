"""Choosing the backend and precision: CPU flags, the parity guard, fallbacks, on a real tiny package.

The package's "int8" file is the fp32 ONNX model itself (a stand-in that passes every check, so the
mechanics are tested without calibration noise) or that model with its weights scaled (a broken
int8 model, refused); real NNCF int8 is tested in tests/unit/finetune/test_quantize.py and end to end.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from service import precision, registry
from service.errors import PackageError
from service.manifest import load_manifest
from service.parity import drift, load_parity, parity_failure
from service.precision import HostFeatures, host_features, select
from service.tasks import make_task
from tests.unit.service.conftest import TinyExport

XEON_AMX = HostFeatures("Intel Xeon", frozenset({"avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}))
EPYC = HostFeatures("AMD EPYC", frozenset({"avx512f", "avx512_bf16", "avx512_vnni"}))
OLD = HostFeatures("old CPU", frozenset({"avx2"}))


def test_host_features_read_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n\n")
    found = host_features(cpuinfo)
    assert (found.model, found.bf16, found.int8) == ("AMD EPYC", True, True)
    assert found.describe() == "AMD EPYC (avx512f, avx512_bf16, avx512_vnni)"
    assert host_features(tmp_path / "absent") == HostFeatures("", frozenset())


def test_what_a_cpu_should_not_run() -> None:
    assert XEON_AMX.unsupported("bf16") == "" and XEON_AMX.unsupported("int8") == ""
    assert "bf16 instructions" in OLD.unsupported("bf16")
    assert "VNNI or AMX" in OLD.unsupported("int8")
    assert OLD.unsupported("fp32") == ""


def test_drift_is_relative_to_the_logits_scale_and_ignores_a_shift() -> None:
    reference = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32) * 4
    assert drift(reference, reference + 3.0) == pytest.approx(0.0, abs=1e-6)
    assert drift(reference, reference * 1.1) == pytest.approx(0.1, rel=1e-3)
    assert drift(reference, reference[:4]) == float("inf")
    assert drift(reference, np.full_like(reference, np.nan)) == float("inf")


MULTICLASS = make_task("multiclass", ["c0", "c1", "c2"])


def test_parity_failure_decisions() -> None:
    rng = np.random.default_rng(1)
    reference = np.zeros((60, 3), dtype=np.float32)
    reference[np.arange(60), np.arange(60) % 3] = 6.0  # every image confident (p ~ 0.99)
    noise = rng.normal(0, 0.05, reference.shape).astype(np.float32)
    assert parity_failure(reference, reference + noise, "bf16", MULTICLASS) == ""
    assert "drift" in parity_failure(reference, reference * 1.5, "int8", MULTICLASS)
    assert "drift" in parity_failure(reference, reference + noise, "fp32", MULTICLASS)  # fp32 is held to 1e-3
    flipped = reference.copy()
    flipped[0] = [5.0, 5.5, 0.5]  # one confident image changes class: a drift within the tolerance
    said = parity_failure(reference, flipped, "int8", MULTICLASS)
    assert "1 of 60 confident parity images change their top-1 class" in said


def test_parity_of_sigmoid_tasks_counts_a_shift_and_each_confident_label() -> None:
    multilabel = make_task("multilabel", ["a", "b", "c"], [0.5, 0.5, 0.3])
    reference = np.tile(np.array([[4.0, -4.0, 3.0]], dtype=np.float32), (100, 1))
    assert parity_failure(reference, reference, "fp32", multilabel) == ""
    assert "drift" in parity_failure(reference, reference + 3.0, "int8", multilabel)  # a sigmoid is not shift-free
    nudged = reference.copy()
    nudged[0, 1] = 0.5  # label b of one image flips from a confident no to yes; a small drift
    assert "1 of 300 confident parity image labels change their answer" in parity_failure(
        reference, nudged, "int8", multilabel
    )
    binary = make_task("binary", ["no", "yes"], [0.5])
    logits = np.tile(np.array([[-3.0], [3.0]], dtype=np.float32), (200, 1))
    flipped = logits.copy()
    flipped[0] = 0.2  # a confident no (p=0.05) becomes a yes
    assert "1 of 400 confident parity images change their answer" in parity_failure(logits, flipped, "int8", binary)


# ---- select() on a real package --------------------------------------------------------------------------
def _package(tmp_path: Path, tiny_export: TinyExport, *, int8: str = "same", parity: bool = True) -> Path:
    """A published tiny package with a parity set and an "int8" file (the fp32 model, or ``int8="scaled"``)."""
    import onnx
    import torch

    from finetune.publish import publish_package
    from finetune.release import write_parity_set
    from service.preprocess import normalize_array

    export = tmp_path / "export"
    shutil.copytree(tiny_export.export_dir, export)
    model = onnx.load(str(export / "model.onnx"))
    if int8 == "scaled":
        for tensor in model.graph.initializer:
            array = onnx.numpy_helper.to_array(tensor) * 3.0
            tensor.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), tensor.name))
    onnx.save(model, str(export / "model.int8.onnx"))
    spec = tiny_export.spec
    pixels = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    inputs = np.stack([normalize_array(p, spec.preprocess) for p in pixels])
    module = torch.jit.load(str(export / "model.pt"))  # type: ignore[no-untyped-call]
    with torch.no_grad():
        write_parity_set(export, pixels, module(torch.from_numpy(inputs)).numpy())
    parity_files = {"images": "parity_images.npy", "logits": "parity_logits.npy"} if parity else {}
    spec = dataclasses.replace(spec, parity=parity_files)
    formats = ("torchscript", "onnx", "onnx_int8")
    return publish_package(spec, export_dir=export, store=tmp_path / "store", formats=formats)


def test_auto_times_the_candidates_and_keeps_the_fastest(tmp_path: Path, tiny_export: TinyExport) -> None:
    folder = _package(tmp_path, tiny_export)
    choice = select(folder, load_manifest(folder), host=EPYC, batch_size=4)
    assert choice.reason == ""  # nothing refused
    timed = next(note for note in choice.notes if note.startswith("ms/image at batch 4"))
    for pair in ("onnxruntime fp32", "openvino fp32", "openvino bf16", "onnxruntime int8", "openvino int8"):
        assert pair in timed
    assert "torchscript" not in timed  # auto uses TorchScript only for a package without ONNX


def test_a_cpu_without_bf16_or_vnni_gets_fp32(tmp_path: Path, tiny_export: TinyExport) -> None:
    folder = _package(tmp_path, tiny_export)
    choice = select(folder, load_manifest(folder), host=OLD, batch_size=2)
    assert choice.precision == "fp32" and choice.reason == ""  # auto: not a refusal, a note
    assert any("bf16 instructions" in n for n in choice.notes) and any("VNNI" in n for n in choice.notes)
    asked = select(folder, load_manifest(folder), backend="openvino", precision="bf16", host=OLD)
    assert (asked.backend.name, asked.precision) == ("openvino", "fp32")
    assert "bf16: this CPU has no bf16 instructions" in asked.reason


def test_a_broken_int8_model_is_refused_and_fp32_served(tmp_path: Path, tiny_export: TinyExport) -> None:
    folder = _package(tmp_path, tiny_export, int8="scaled")
    choice = select(folder, load_manifest(folder), backend="onnxruntime", precision="int8", host=EPYC)
    assert (choice.backend.name, choice.precision) == ("onnxruntime", "fp32")
    assert choice.reason.startswith("onnxruntime int8 refused: logits drift")
    auto = select(folder, load_manifest(folder), host=EPYC, batch_size=2)
    assert auto.precision in ("fp32", "bf16")
    assert "onnxruntime int8 refused" in auto.reason and "openvino int8 refused" in auto.reason


def test_the_export_verdict_refuses_before_anything_loads(tmp_path: Path, tiny_export: TinyExport) -> None:
    folder = _package(tmp_path, tiny_export)
    failed = {"int8": {"verdict": "fail", "summary": "loses 2 points"}}
    manifest = dataclasses.replace(load_manifest(folder), metrics={"precisions": failed})
    choice = select(folder, manifest, backend="onnxruntime", precision="int8", host=EPYC)
    assert choice.precision == "fp32" and "refused by the export's accuracy guard (loses 2 points)" in choice.reason
    per_backend = {"bf16": {"verdict": "pass", "backends": {"openvino": {"verdict": "fail", "summary": "x"}}}}
    manifest = dataclasses.replace(manifest, metrics={"precisions": per_backend})
    assert "openvino bf16: refused" in select(folder, manifest, precision="bf16", host=EPYC).reason


def test_no_parity_set_means_no_reduced_precision(tmp_path: Path, tiny_export: TinyExport) -> None:
    folder = _package(tmp_path, tiny_export, parity=False)
    manifest = load_manifest(folder)
    assert load_parity(folder, manifest) is None
    assert select(folder, manifest, host=XEON_AMX, batch_size=2).precision == "fp32"
    choice = select(folder, manifest, precision="int8", host=XEON_AMX)
    assert choice.precision == "fp32" and "no parity set" in choice.reason


def test_fp32_that_disagrees_with_its_parity_set_is_a_broken_package(tmp_path: Path, tiny_export: TinyExport) -> None:
    folder = _package(tmp_path, tiny_export)
    manifest = load_manifest(folder)
    logits = np.load(folder / "parity_logits.npy")
    np.save(folder / "parity_logits.npy", logits * 2.0)  # the served fp32 model no longer matches
    with pytest.raises(PackageError, match="fp32 disagrees with the package's parity set"):
        select(folder, manifest, precision="fp32", backend="onnxruntime", host=EPYC)


def test_a_parity_set_of_the_wrong_shape_is_a_package_error(tmp_path: Path, tiny_export: TinyExport) -> None:
    folder = _package(tmp_path, tiny_export)
    np.save(folder / "parity_images.npy", np.zeros((8, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(PackageError, match="does not match the manifest's 32x32 input"):
        load_parity(folder, load_manifest(folder))


def test_gpu_serves_fp32(tmp_path: Path, tiny_export: TinyExport, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _package(tmp_path, tiny_export)
    notes = precision._Notes()
    request = precision._Request("onnxruntime", registry.PRECISIONS, "cuda:0", precision.LoadOptions())
    pairs = precision._candidates(load_manifest(folder), request, XEON_AMX, notes, parity=True)
    assert pairs == [("onnxruntime", "fp32")]
    assert "int8: reduced precisions are served on the CPU only" in notes.said


def test_unknown_precision() -> None:
    with pytest.raises(ValueError, match="precision 'fp8' is not one of auto, fp32, bf16, int8"):
        select(Path("."), None, precision="fp8")  # type: ignore[arg-type]
