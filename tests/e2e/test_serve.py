"""``serve`` end to end: a real server process over a package made by ``finetune``, real clients.

Every protocol must give, image by image, the top-1 label that finetune's own evaluation gave.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf import empty_pb2
from prometheus_client.parser import text_string_to_metric_families

from service.manifest import load_manifest
from service.preprocess import preprocess_bytes
from service.protos import load_torchserve
from tests.e2e.conftest import Package, Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _images(package: Package, count: int = 8) -> list[tuple[Path, bytes, str]]:
    items = sorted(package.predictions.items())[:count]
    return [(path, path.read_bytes(), label) for path, label in items]


def _top_labels(strings: np.ndarray) -> list[str]:
    """Triton classification strings b"value:index:label" (top-1 per row) -> labels."""
    return [s.decode().split(":", 2)[2] for s in strings.reshape(len(strings), -1)[:, 0]]


def test_tritonclient_http_binary_bytes(server: Server, demo_package: Package) -> None:
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("demo")
    metadata = client.get_model_metadata("demo")
    assert {i["name"] for i in metadata["inputs"]} == {"image", "input"}
    images = _images(demo_package)
    tensor = triton_http.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array([data for _, data, _ in images], dtype=np.object_), binary_data=True)
    outputs = [
        triton_http.InferRequestedOutput("probabilities", binary_data=True, class_count=1),
        triton_http.InferRequestedOutput("logits", binary_data=True),
    ]
    result = client.infer("demo", [tensor], outputs=outputs)
    assert _top_labels(result.as_numpy("probabilities")) == [label for _, _, label in images]
    assert result.as_numpy("logits").shape == (len(images), 5)


def test_tritonclient_grpc(server: Server, demo_package: Package) -> None:
    client = triton_grpc.InferenceServerClient(url=server.grpc_address)
    assert client.is_server_live() and client.is_model_ready("demo")
    assert client.get_model_metadata("demo").name == "demo"
    for path, data, label in _images(demo_package, 4):
        tensor = triton_grpc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
        result = client.infer(
            "demo", [tensor], outputs=[triton_grpc.InferRequestedOutput("probabilities", class_count=3)]
        )
        strings = result.as_numpy("probabilities")
        assert strings.shape == (1, 3)
        assert _top_labels(strings) == [label], path


def test_plain_http_json_fp32(server: Server, demo_package: Package) -> None:
    manifest = load_manifest(demo_package.store / "demo" / "1")
    path, data, label = _images(demo_package, 1)[0]
    array = preprocess_bytes(data, manifest.preprocess)[None]
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(array.shape), "data": array.ravel().tolist()}]
    }
    response = httpx.post(f"{server.url}/v2/models/demo/versions/1/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    probs = np.asarray(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    assert manifest.labels[int(probs.argmax())] == label, path
    assert probs.sum() == pytest.approx(1.0, abs=1e-4)


def test_torchserve_http_and_grpc(server: Server, demo_package: Package) -> None:
    protos = load_torchserve()
    pb2, pb2_grpc = protos.messages, protos.services
    assert httpx.get(f"{server.url}/ping").json() == {"status": "Healthy"}
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb2_grpc.InferenceAPIsServiceStub(channel)
        assert json.loads(stub.Ping(empty_pb2.Empty()).health)["status"] == "Healthy"
        for path, data, label in _images(demo_package, 4):
            answer = httpx.put(f"{server.url}/predictions/demo", content=data, timeout=60).json()
            assert next(iter(answer)) == label, path
            assert list(answer.values()) == sorted(answer.values(), reverse=True)
            reply = stub.Predictions(pb2.PredictionsRequest(model_name="demo", input={"data": data}))
            assert next(iter(json.loads(reply.prediction))) == label, path
    multipart = httpx.post(f"{server.url}/predictions/demo/1", files={"data": ("x.jpg", data)}, timeout=60)
    assert next(iter(multipart.json())) == label


def test_errors_name_the_problem(server: Server) -> None:
    missing = httpx.post(f"{server.url}/predictions/nope", content=b"x")
    assert missing.status_code == 404 and missing.json()["code"] == 404
    bad_image = httpx.post(f"{server.url}/predictions/demo", content=b"not an image")
    assert bad_image.status_code == 400 and "not a recognised image" in bad_image.json()["message"]
    bad_json = httpx.post(
        f"{server.url}/v2/models/demo/infer", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]
    client = triton_grpc.InferenceServerClient(url=server.grpc_address)
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"garbage"], dtype=np.object_))
    with pytest.raises(Exception, match="not a recognised image"):
        client.infer("demo", [tensor])


def test_metrics_after_traffic(server: Server, demo_package: Package) -> None:
    _, data, _ = _images(demo_package, 1)[0]
    assert httpx.post(f"{server.url}/predictions/demo", content=data, timeout=60).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for stage in ("request_duration", "queue_duration", "preprocess_duration", "compute_duration"):
        _assert_histogram_has_traffic(families, f"inference_{stage}_seconds")
    _assert_histogram_has_traffic(families, "inference_batch_size")
    assert families["inference_queue_depth"].type == "gauge"
    ready = [s.value for s in families["inference_model_ready"].samples if s.labels["model"] == "demo"]
    assert ready == [1.0]
    requests = families["inference_requests"]
    outcomes = {s.labels["outcome"] for s in requests.samples if s.labels.get("model") == "demo"}
    assert "success" in outcomes


def _assert_histogram_has_traffic(families: dict[str, Any], name: str) -> None:
    family = families[name]
    assert family.type == "histogram", name
    counts = [s.value for s in family.samples if s.name.endswith("_count") and s.labels.get("model") == "demo"]
    assert counts and max(counts) >= 1, name
