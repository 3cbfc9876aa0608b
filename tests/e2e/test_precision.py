"""Reduced precisions end to end: the demo fine-tune (real weights, real photos) exported with ``--int8 true``,
served at each precision on this CPU over v2 HTTP and gRPC, its answers judged against finetune's fp32
evaluation by the guard's criteria; a deliberately broken int8 model is refused at load and fp32 served.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from finetune.guard import ALPHA, MAX_DROP_POINTS, mcnemar_one_sided
from service.manifest import MANIFEST_FILE, sha256_file
from service.precision import host_features
from service.tasks import CONFIDENT
from tests.e2e.conftest import BIN, Package, Server, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BATCH = 8


def _rows(package: Package) -> list[dict[str, str]]:
    """finetune's own fp32 evaluation of every test image: path, true, predicted, probability."""
    with (package.run_dir / "test_predictions.tsv").open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module", params=["fp32", "bf16", "int8"])
def precise_server(
    request: pytest.FixtureRequest, demo_package: Package, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Server]]:
    log = tmp_path_factory.mktemp(f"serve-{request.param}") / "serve.log"
    server = start_server(demo_package.store, log, "--precision", request.param, "--max-batch-size", str(BATCH))
    yield request.param, server
    assert server.stop() == 0, log.read_text()


def _labels_http(server: Server, images: list[bytes]) -> list[str]:
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    labels: list[str] = []
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        tensor = triton_http.InferInput("image", [len(chunk)], "BYTES")
        tensor.set_data_from_numpy(np.array(chunk, dtype=np.object_), binary_data=True)
        wanted = [triton_http.InferRequestedOutput("probabilities", binary_data=True, class_count=1)]
        strings = client.infer("demo", [tensor], outputs=wanted).as_numpy("probabilities")
        labels += [s.decode().split(":", 2)[2] for s in strings.reshape(len(chunk), -1)[:, 0]]
    return labels


def _labels_grpc(server: Server, images: list[bytes]) -> list[str]:
    client = triton_grpc.InferenceServerClient(url=server.grpc_address)
    labels: list[str] = []
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        tensor = triton_grpc.InferInput("image", [len(chunk)], "BYTES")
        tensor.set_data_from_numpy(np.array(chunk, dtype=np.object_))
        wanted = [triton_grpc.InferRequestedOutput("probabilities", class_count=1)]
        strings = client.infer("demo", [tensor], outputs=wanted).as_numpy("probabilities")
        labels += [s.decode().split(":", 2)[2] for s in strings.reshape(len(chunk), -1)[:, 0]]
    return labels


def test_each_precision_answers_within_the_guard(precise_server: tuple[str, Server], demo_package: Package) -> None:
    precision, server = precise_server
    meta = httpx.get(f"{server.url}/v2/models/demo", timeout=10).json()
    why_not = host_features().unsupported(precision)
    assert meta["precision"] == ("fp32" if why_not else precision), meta
    assert meta["platform"] in ("onnxruntime_onnx", "openvino_onnx")  # auto backend: an ONNX engine, timed
    rows = _rows(demo_package)
    images = [Path(row["path"]).read_bytes() for row in rows]
    served = _labels_http(server, images)
    assert _labels_grpc(server, images) == served  # one server, one answer whatever the protocol
    fp32 = [row["predicted"] for row in rows]
    if meta["precision"] == "fp32":
        assert served == fp32  # fp32 answers are finetune's own evaluation, image by image
        return
    confident = [i for i, row in enumerate(rows) if float(row["probability"]) >= CONFIDENT]
    assert [served[i] for i in confident] == [fp32[i] for i in confident]  # >= 99 % of a few dozen: all
    truth = [row["true"] for row in rows]
    losses = sum(f == t != s for f, s, t in zip(fp32, served, truth, strict=True))
    gains = sum(s == t != f for f, s, t in zip(fp32, served, truth, strict=True))
    drop = 100.0 * (losses - gains) / len(rows)
    assert drop <= MAX_DROP_POINTS or mcnemar_one_sided(losses, gains) >= ALPHA, (losses, gains)


def test_the_package_carries_its_evidence(demo_package: Package) -> None:
    manifest = json.loads((demo_package.store / "demo" / "1" / MANIFEST_FILE).read_text())
    assert manifest["formats"]["onnx_int8"] == "model.int8.onnx"
    assert set(manifest["parity"]) == {"images", "logits"} and manifest["parity"]["images"] in manifest["files"]
    int8 = manifest["metrics"]["precisions"]["int8"]
    assert int8["verdict"] in ("pass", "inconclusive") and int8["recipe"].startswith("nncf-")
    for figures in int8["backends"].values():
        assert figures["images"] == 66 and {"mcnemar_p", "confident_agreement", "recall_change"} <= set(figures)
    report = (demo_package.run_dir / "report.md").read_text()
    assert "int8 on openvino (nncf-" in report


def _break_int8(package_dir: Path) -> None:
    """Scale every float tensor of model.int8.onnx (weights, scales), then re-sign the manifest as a publisher would."""
    path = package_dir / "model.int8.onnx"
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1:
            tensor.CopyFrom(onnx.numpy_helper.from_array(array * 3.0, tensor.name))
    onnx.save(model, str(path))
    manifest_path = package_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.int8.onnx"] = sha256_file(path)
    manifest_path.write_text(json.dumps(manifest, indent=2))


def test_a_broken_int8_model_is_refused_at_load_and_fp32_served(demo_package: Package, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(demo_package.store / "demo" / "1", store / "demo" / "1")
    _break_int8(store / "demo" / "1")
    log = tmp_path / "serve.log"
    server = start_server(store, log, "--precision", "int8")
    try:
        meta = httpx.get(f"{server.url}/v2/models/demo", timeout=10).json()
        assert meta["ready"] is True and meta["precision"] == "fp32", meta
        assert "int8 refused: logits drift" in meta["reason"]
        rows = _rows(demo_package)[:8]
        served = _labels_http(server, [Path(row["path"]).read_bytes() for row in rows])
        assert served == [row["predicted"] for row in rows]
    finally:
        assert server.stop() == 0
    assert "int8 refused: logits drift" in log.read_text()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--precision", "fp8"], {}, "serve: precision='fp8' is not one of auto, fp32, bf16, int8"),
        (
            [],
            {"SERVE_MODEL_PRECISIONS": "demo=fp16"},
            "serve: model_precisions[demo]='fp16' is not one of auto, fp32, bf16, int8",
        ),
    ],
)
def test_bad_precision_values_fail_at_start_with_one_line(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [str(BIN / "serve"), "--model-store", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [message]


def test_finetune_quantize_publishes_an_existing_package_again_with_int8(demo_package: Package, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(demo_package.store / "demo" / "1", store / "demo" / "1")
    manifest_path = store / "demo" / "1" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    (store / "demo" / "1" / "model.int8.onnx").unlink()  # a package made without --int8 true
    del manifest["formats"]["onnx_int8"], manifest["files"]["model.int8.onnx"]
    manifest_path.write_text(json.dumps(manifest))
    quantize = [str(BIN / "finetune"), "quantize", str(store / "demo" / "1")]
    result = subprocess.run(quantize, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"published: {store / 'demo' / '2'}"
    published = json.loads((store / "demo" / "2" / MANIFEST_FILE).read_text())
    assert published["formats"] == manifest["formats"] | {"onnx_int8": "model.int8.onnx"}
    assert published["extra"]["quantized_from"] == "demo/1" and published["parity"] == manifest["parity"]
    assert published["metrics"]["precisions"]["int8"]["verdict"] in ("pass", "inconclusive")
    assert published["metrics"]["test"] == manifest["metrics"]["test"]
    elsewhere = subprocess.run([*quantize, "--run", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert elsewhere.returncode == 2 and "no run folder with splits" in elsewhere.stderr
