"""The HTTP app in process (Starlette's TestClient) over a real DataPlane and ModelRepository.

The batchers start on the event loop that serves the requests: the repository is loaded through
the TestClient's portal, inside the ``with`` block, and shut down there too.
"""

from __future__ import annotations

import base64
import gc
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tritonclient.http as triton_http
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.http_v2 import HEADER_LENGTH
from service.preprocess import preprocess_bytes
from service.tasks import softmax
from tests.unit.service.conftest import serving

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore

PngFactory = Callable[..., bytes]


@contextmanager
def _unclosed_uploads() -> Iterator[list[str]]:
    """Collect the ResourceWarnings of multipart upload files the app leaves open."""
    leaked: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield leaked
        gc.collect(0)  # the form is freed by reference counting; a full collection costs a second
    leaked += [str(w.message) for w in caught]
    assert all("SpooledTemporaryFile" in message for message in leaked), leaked


@pytest.fixture(scope="module")
def client(shared_tiny_store: TinyStore) -> Iterator[TestClient]:
    """One app for the tests that change nothing (the others build their own with ``_serving``)."""
    with serving(shared_tiny_store.store) as test_client:
        yield test_client


def _expected(tiny_store: TinyStore, images: list[bytes]) -> np.ndarray:
    from finetune.export import run_onnx

    batch = np.stack([preprocess_bytes(data, tiny_store.preprocess) for data in images])
    return run_onnx(tiny_store.folder / "model.onnx", batch)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- v2 inference -----------------------------------------------------------------------------
def test_v2_json_inference(client: TestClient, shared_tiny_store: TinyStore, png: PngFactory) -> None:
    images = [png(1), png(2, width=50, height=36)]
    body = {
        "id": "abc",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [_b64(x) for x in images]}],
    }
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("tiny", "1", "abc")
    logits, probabilities = answer["outputs"]
    assert (logits["name"], logits["datatype"], logits["shape"]) == ("logits", "FP32", [2, 3])
    expected = _expected(shared_tiny_store, images)
    np.testing.assert_allclose(np.reshape(logits["data"], (2, 3)), expected, atol=1e-5)
    np.testing.assert_allclose(np.reshape(probabilities["data"], (2, 3)), softmax(expected), atol=1e-5)


def test_v2_json_fp32_inference_on_a_version(client: TestClient, shared_tiny_store: TinyStore) -> None:
    pixels = np.random.default_rng(3).standard_normal((1, 3, 32, 32), dtype=np.float32)
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": pixels.ravel().tolist()}],
        "outputs": [{"name": "logits"}],
    }
    response = client.post("/v2/models/tiny/versions/1/infer", json=body)
    assert response.status_code == 200, response.text
    (logits,) = response.json()["outputs"]
    from finetune.export import run_onnx

    expected = run_onnx(shared_tiny_store.folder / "model.onnx", pixels)
    np.testing.assert_allclose(np.reshape(logits["data"], (1, 3)), expected, atol=1e-5)
    missing = client.post("/v2/models/tiny/versions/9/infer", json=body)
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'tiny' has no version '9'"})


def test_v2_binary_inference_with_tritonclients_encoding(
    client: TestClient, shared_tiny_store: TinyStore, png: PngFactory
) -> None:
    images = [png(3), png(4), png(5, width=33, height=90)]
    tensor = triton_http.InferInput("image", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    outputs = [
        triton_http.InferRequestedOutput("probabilities", binary_data=True),
        triton_http.InferRequestedOutput("logits", binary_data=True, class_count=2),
    ]
    body, json_size = triton_http.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    assert json_size is not None
    response = client.post(
        "/v2/models/tiny/infer",
        content=body,
        headers={HEADER_LENGTH: str(json_size), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    result = triton_http.InferenceServerClient.parse_response_body(
        response.content, header_length=int(response.headers[HEADER_LENGTH])
    )
    expected = _expected(shared_tiny_store, images)
    np.testing.assert_allclose(result.as_numpy("probabilities"), softmax(expected), atol=1e-5)
    top2 = result.as_numpy("logits")
    assert top2.shape == (3, 2)
    for row, strings in enumerate(top2):
        order = np.argsort(-expected[row], kind="stable")[:2]
        assert [s.decode().split(":", 1)[1] for s in strings] == [f"{i}:{'abc'[i]}" for i in order]


def test_v2_binary_output_for_a_json_request(client: TestClient) -> None:
    pixels = np.zeros((2, 3, 32, 32), np.float32)
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32], "data": pixels.ravel().tolist()}],
        "parameters": {"binary_data_output": True},
    }
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    result = triton_http.InferenceServerClient.parse_response_body(
        response.content, header_length=int(response.headers[HEADER_LENGTH])
    )
    assert result.as_numpy("logits").shape == (2, 3) and result.as_numpy("probabilities").shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"content": b"{not json"}, 400, "request body is not valid JSON"),
        ({"json": {"inputs": []}}, 400, r"expected exactly one input .*, got 0"),
        ({"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]}}, 400, "base64"),
        ({"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}]}}, 400, "image"),
        ({"json": {"inputs": [], "parameters": [1]}}, 400, "'parameters' must be an object"),
        ({"json": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1]}]}}, 400, "not match"),
    ],
)  # fmt: skip
def test_v2_client_errors_answer_an_error_object(
    client: TestClient, kwargs: dict[str, Any], status: int, message: str
) -> None:
    response = client.post("/v2/models/tiny/infer", **kwargs)
    assert response.status_code == status
    assert list(response.json()) == ["error"] and re.search(message, response.json()["error"])


def test_v2_timeouts(client: TestClient, png: PngFactory) -> None:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(png(6))]}]}
    late = client.post("/v2/models/tiny/infer", json={**body, "parameters": {"timeout": 1}})  # 1 µs
    assert late.status_code == 504 and "deadline passed" in late.json()["error"]
    bad = client.post("/v2/models/tiny/infer", json=body, headers={"X-Request-Timeout-Ms": "soon"})
    assert bad.status_code == 400 and "invalid timeout" in bad.json()["error"]
    fine = client.post("/v2/models/tiny/infer", json=body, headers={"X-Request-Timeout-Ms": "30000"})
    assert fine.status_code == 200


# ---- TorchServe API ---------------------------------------------------------------------------
def _probabilities(tiny_store: TinyStore, image: bytes) -> dict[str, float]:
    row = softmax(_expected(tiny_store, [image]))[0]
    return {"abc"[i]: float(row[i]) for i in np.argsort(-row, kind="stable")}


def _assert_answer(answer: dict[str, float], expected: dict[str, float]) -> None:
    assert list(answer) == list(expected)  # best first
    np.testing.assert_allclose(list(answer.values()), list(expected.values()), atol=1e-5)


@pytest.mark.parametrize(
    ("method", "path", "how"),
    [
        ("POST", "/predictions/tiny", "raw"),
        ("PUT", "/predictions/tiny", "raw"),
        ("POST", "/predictions/tiny/1", "raw"),
        ("POST", "/predictions/tiny", "multipart-data"),
        ("PUT", "/predictions/tiny", "multipart-body"),
        ("POST", "/predictions/tiny", "multipart-text-field"),
    ],
)
def test_predictions(
    client: TestClient, shared_tiny_store: TinyStore, png: PngFactory, method: str, path: str, how: str
) -> None:
    image = png(7)
    kwargs: dict[str, Any] = {
        "raw": {"content": image, "headers": {"Content-Type": "image/png"}},
        "multipart-data": {"files": {"data": ("x.png", image, "image/png")}, "data": {"other": "1"}},
        "multipart-body": {"files": {"body": ("x.png", image, "image/png"), "other": ("y.txt", b"z", "text/plain")}},
        "multipart-text-field": {"files": {"data": (None, image)}},  # a form field with no file name
    }[how]
    with _unclosed_uploads():
        response = client.request(method, path, **kwargs)
    assert response.status_code == 200, response.text
    _assert_answer(response.json(), _probabilities(shared_tiny_store, image))


def test_predictions_top_k_follows_the_settings(shared_tiny_store: TinyStore, png: PngFactory) -> None:
    with serving(shared_tiny_store.store, default_top_k=1) as client:
        answer = client.post("/predictions/tiny", content=png(8)).json()
    assert list(answer) == list(_probabilities(shared_tiny_store, png(8)))[:1]


@pytest.mark.parametrize(
    ("names", "got"),
    [(("first", "second"), "'first', 'second'"), (("file",), "'file'"), (("data", "body"), "'data', 'body'")],
)
def test_a_multipart_form_without_one_image_field_is_refused(
    client: TestClient, png: PngFactory, names: tuple[str, ...], got: str
) -> None:
    files = {name: (f"{name}.png", png(9), "image/png") for name in names}  # the rule never guesses the field
    with _unclosed_uploads():
        response = client.post("/predictions/tiny", files=files)
    assert response.status_code == 400
    assert response.json() == {
        "code": 400,
        "type": "InvalidInput",
        "message": f"send one image as the raw request body or as a multipart/gRPC field named 'data' (got {got})",
    }


def test_multipart_upload_files_are_closed(client: TestClient, png: PngFactory) -> None:
    with _unclosed_uploads() as leaked:
        assert client.post("/predictions/tiny", files={"data": ("x.png", png(9), "image/png")}).status_code == 200
    assert leaked == []


def test_a_text_form_field_that_is_not_an_image_is_a_client_error(client: TestClient) -> None:
    response = client.post("/predictions/tiny", files={"data": (None, "naïve € text".encode())})
    assert response.status_code == 400


# ---- health, metadata, readiness -------------------------------------------------------------
def test_health_and_ping(shared_tiny_store: TinyStore) -> None:
    with serving(shared_tiny_store.store, load=False) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 503  # nothing loaded yet
        ping = client.get("/ping")
        assert (ping.status_code, ping.json()) == (500, {"status": "Unhealthy"})
    with serving(shared_tiny_store.store) as client:
        assert client.get("/v2/health/ready").status_code == 200
        ping = client.get("/ping")
        assert (ping.status_code, ping.json()) == (200, {"status": "Healthy"})


def test_server_and_model_metadata(client: TestClient) -> None:
    server = client.get("/v2").json()
    assert server["name"] == "imgclf" and "binary_tensor_data" in server["extensions"]
    meta = client.get("/v2/models/tiny").json()
    assert client.get("/v2/models/tiny/versions/1").json() == meta
    assert meta.pop("platform") in ("onnxruntime_onnx", "openvino_onnx")  # auto: the faster, timed at load
    assert "no parity set" in meta.pop("precision_notes")
    assert meta == {
        "name": "tiny",
        "versions": ["1"],
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
        ],
        "ready": True,
        "reason": "",
        "labels": ["a", "b", "c"],
        "precision": "fp32",
        "task": "multiclass",
        "thresholds": [],
        "default_version": "1",
        "pinned_version": "",
        "version_states": [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}],
        "backbone": "test",
        "metrics": {},  # the tiny package's run measured nothing
        "preprocess": {
            "resize": 36,
            "crop": 32,
            "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "channel_order": "RGB",
            "layout": "NCHW",
            "jpeg_draft": False,
        },
        "explainable": False,
    }
    missing = client.get("/v2/models/nope")
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope' not found"})
    no_version = client.get("/v2/models/tiny/versions/4")
    assert (no_version.status_code, no_version.json()) == (404, {"error": "model 'tiny' has no version '4'"})


def test_metadata_of_a_broken_package_says_why(tiny_store: TinyStore) -> None:
    with (tiny_store.folder / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with serving(tiny_store.store) as client:
        meta = client.get("/v2/models/tiny").json()
        assert meta["ready"] is False and meta["state"]["ready"] is False
        assert "sha256" in meta["state"]["reason"] and str(tiny_store.store) not in meta["state"]["reason"]
        infer = client.post("/predictions/tiny", content=b"x")
        assert infer.status_code == 503 and infer.json()["type"] == "ModelNotReady"
        assert "sha256" in infer.json()["message"]


def test_readiness_endpoints(client: TestClient) -> None:
    assert client.get("/v2/models/tiny/ready").status_code == 200
    assert client.get("/v2/models/tiny/versions/1/ready").status_code == 200
    not_ready = client.get("/v2/models/tiny/versions/2/ready")
    assert (not_ready.status_code, not_ready.json()) == (503, {"error": "model is not ready"})
    assert client.get("/v2/models/nope/ready").status_code == 404


# ---- one error mapping, two formats ----------------------------------------------------------
def test_error_formats_differ_by_protocol(client: TestClient, png: PngFactory) -> None:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(png(10))]}]}
    v2 = client.post("/v2/models/nope/infer", json=body)
    assert (v2.status_code, v2.json()) == (404, {"error": "model 'nope' not found"})
    torchserve = client.post("/predictions/nope", content=png(10))
    assert (torchserve.status_code, torchserve.json()) == (
        404,
        {"code": 404, "type": "ModelNotFound", "message": "model 'nope' not found"},
    )
    corrupt = client.post("/predictions/tiny", content=b"not an image")
    assert corrupt.status_code == 400 and corrupt.json()["type"] == "InvalidInput"
    assert corrupt.json()["message"].startswith("image[0]: not a recognised image")
    route = client.get("/v2/nothing/here")
    assert (route.status_code, route.json()) == (404, {"error": "Not Found"})
    method = client.get("/predictions/tiny")
    assert (method.status_code, method.json()) == (
        405,
        {"code": 405, "type": "HTTPException", "message": "Method Not Allowed"},
    )


def test_payload_over_the_limit_is_413_on_every_route(shared_tiny_store: TinyStore) -> None:
    big = b"\0" * 3000
    with serving(shared_tiny_store.store, max_payload_bytes=2000) as client:
        v2 = client.post("/v2/models/tiny/infer", content=big)
        assert (v2.status_code, v2.json()) == (413, {"error": "request body of 3000 bytes is over the limit of 2000"})
        chunked = client.post("/v2/models/tiny/infer", content=iter([big[:1500], big[1500:]]))
        assert (chunked.status_code, chunked.json()) == (
            413,
            {"error": "request body is over the limit of 2000 bytes"},
        )
        for response in (
            client.post("/predictions/tiny", content=big),
            client.put("/predictions/tiny", content=iter([big])),
        ):
            assert response.status_code == 413
            assert response.json()["type"] == "PayloadTooLarge" and "2000" in response.json()["message"]
        with _unclosed_uploads():
            upload = client.post("/predictions/tiny", files={"data": ("x.png", big, "image/png")})
        assert upload.status_code == 413 and upload.json()["type"] == "PayloadTooLarge"
        form = (
            b'--xyz\r\nContent-Disposition: form-data; name="data"; filename="x.png"\r\n\r\n' + big + b"\r\n--xyz--\r\n"
        )
        chunked_upload = client.post(
            "/predictions/tiny",
            content=iter([form[:1000], form[1000:]]),  # no Content-Length
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        )
        assert chunked_upload.status_code == 413
        assert chunked_upload.json()["message"] == "request body is over the limit of 2000 bytes"


def test_an_unexpected_exception_is_a_500_with_a_request_id_and_no_traceback(
    shared_tiny_store: TinyStore, caplog: pytest.LogCaptureFixture
) -> None:
    def extend(app: FastAPI) -> None:
        async def explode() -> None:
            raise RuntimeError("secret internal detail")

        app.add_api_route("/v2/explode", explode, methods=["GET"])
        app.add_api_route("/ping/explode", explode, methods=["GET"])  # a TorchServe-style path

    with (
        caplog.at_level(logging.ERROR, logger="service.http_app"),
        serving(shared_tiny_store.store, extend=extend) as client,
    ):
        v2 = client.get("/v2/explode")
        torchserve = client.get("/ping/explode")
    assert v2.status_code == 500 and list(v2.json()) == ["error"]
    assert torchserve.status_code == 500 and torchserve.json()["type"] == "InternalServerError"
    for text in (v2.json()["error"], torchserve.json()["message"]):
        match = re.fullmatch(r"internal server error \(request id ([0-9a-f]{12})\)", text)
        assert match is not None, text
        logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None  # the log has the traceback
    for response in (v2, torchserve):
        assert (
            "secret" not in response.text and "Traceback" not in response.text and "RuntimeError" not in response.text
        )


# ---- tokens and management --------------------------------------------------------------------
def test_an_inference_token_guards_both_apis(shared_tiny_store: TinyStore, png: PngFactory) -> None:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(png(11))]}]}
    with serving(shared_tiny_store.store, inference_token="let-me-in") as client:
        v2 = client.post("/v2/models/tiny/infer", json=body)
        assert v2.status_code == 401 and "inference token" in v2.json()["error"]
        wrong = client.post("/predictions/tiny", content=png(11), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["type"] == "Unauthorized"
        auth = {"Authorization": "Bearer let-me-in"}
        assert client.post("/v2/models/tiny/infer", json=body, headers=auth).status_code == 200
        assert client.post("/predictions/tiny", content=png(11), headers=auth).status_code == 200
        assert client.get("/v2/models/tiny").status_code == 200  # metadata and health stay open


def test_management_is_off_by_default(client: TestClient) -> None:
    for path in ("/v2/repository/index", "/v2/repository/models/tiny/unload", "/v2/repository/models/tiny/load"):
        response = client.post(path, headers={"Authorization": "Bearer anything"})
        assert response.status_code == 403 and "disabled" in response.json()["error"]


def test_management_with_a_token(tiny_store: TinyStore, png: PngFactory) -> None:
    auth = {"Authorization": "Bearer adm"}
    with serving(tiny_store.store, enable_management=True, management_token="adm") as client:
        assert client.post("/v2/repository/index").status_code == 401
        assert client.post("/v2/repository/index", headers={"Authorization": "Bearer x"}).status_code == 401
        index = client.post("/v2/repository/index", headers=auth)
        assert index.json() == [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
        assert client.post("/v2/repository/models/tiny/unload", headers=auth).status_code == 200
        assert client.post("/predictions/tiny", content=png(12)).status_code == 404
        assert client.post("/v2/repository/index", headers=auth).json()[0]["reason"] == "unloaded"
        tiny_store.publish()
        assert client.post("/v2/repository/models/tiny/load", headers=auth).status_code == 200
        assert client.get("/v2/models/tiny").json()["versions"] == ["1", "2"]
        assert client.post("/predictions/tiny", content=png(12)).status_code == 200
        ghost = client.post("/v2/repository/models/ghost/load", headers=auth)
        assert ghost.status_code == 404 and "no versions of model 'ghost'" in ghost.json()["error"]


def test_metrics_route(client: TestClient, png: PngFactory) -> None:
    assert client.post("/predictions/tiny", content=png(13)).status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert 'inference_requests_total{model="tiny",outcome="success",protocol="http_torchserve",version="1"}' in (
        response.text
    )
