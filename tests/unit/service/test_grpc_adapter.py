"""The gRPC adapters, spoken to by the real tritonclient and by stubs generated from the TorchServe proto.

The server is a real ``grpc.aio`` server on a loopback port, in a background thread with its own
event loop. Behind it is ``MiniPlane``: the DataPlane interface implemented deterministically in a
few lines (logits = mean of each colour channel), so that these tests exercise only the adapters.
The real data plane is tested end to end against the real server elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import empty_pb2
from PIL import Image
from tritonclient.utils import InferenceServerException

from service import protos
from service.errors import Forbidden, InvalidInput, ModelNotFound, QueueFull, Unauthorized
from service.grpc_adapter import add_servicers, parameters_from_proto, parameters_to_proto
from service.types import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelStatus,
    ServerMetadata,
    TensorMetadata,
)

LABELS = ["red", "green", "blue"]


def _png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


class MiniPlane:
    """The DataPlane interface, deterministic: model "mini" scores each colour channel by its mean."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.is_ready = True
        self.inference_token = ""
        self.management_enabled = True
        self.management_token = "admin"
        self.requests: list[InferRequest] = []
        self.deadlines: list[float | None] = []
        self.loaded: list[str] = []

    async def live(self) -> bool:
        return True

    async def ready(self) -> bool:
        return self.is_ready

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("mini-server", "0.0.1", ["classification", "model_repository"])

    def _check_model(self, name: str) -> None:
        if name == "busy":
            raise QueueFull("queue of model 'busy' is full")
        if name == "boom":
            raise RuntimeError("secret internal detail")
        if name != "mini":
            raise ModelNotFound(f"no model named '{name}'")

    async def model_ready(self, name: str, version: str | None = None) -> bool:
        self._check_model(name)
        return version in (None, "1")

    async def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        self._check_model(name)
        return ModelMetadata(
            name="mini",
            versions=["1"],
            platform="mini_platform",
            inputs=[TensorMetadata("image", "BYTES", [-1]), TensorMetadata("pixels", "FP32", [-1, 3, -1, -1])],
            outputs=[TensorMetadata("logits", "FP32", [-1, 3])],
        )

    def _logits(self, request: InferRequest) -> np.ndarray:
        tensor = request.inputs[0]
        if tensor.datatype == "BYTES":
            try:
                images = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in tensor.data]
            except OSError as exc:
                raise InvalidInput(f"input '{tensor.name}': not an image") from exc
            return np.stack([image.reshape(-1, 3).mean(axis=0) / 255 for image in images]).astype(np.float32)
        pixels = np.asarray(tensor.data, dtype=np.float32)
        return pixels.mean(axis=(2, 3))

    async def infer(self, request: InferRequest) -> InferResponse:
        self.requests.append(request)
        self._check_model(request.model)
        logits = self._logits(request)
        outputs = []
        for wanted in request.outputs or [None]:
            k = wanted.classification if wanted is not None else 0
            if k:
                order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
                data = [f"{logits[r, i]:f}:{i}:{LABELS[i]}".encode() for r in range(len(logits)) for i in order[r]]
                outputs.append(InferOutput("logits", "BYTES", [len(logits), k], data))
            else:
                outputs.append(InferOutput("logits", "FP32", list(logits.shape), logits, {"unit": "mean"}))
        return InferResponse("mini", "1", outputs, id=request.id, parameters={"batch": len(logits)})

    async def predict_images(
        self, name: str, version: str | None, images: list[bytes], *, protocol: str, deadline: float | None
    ) -> list[dict[str, float]]:
        self.deadlines.append(deadline)
        response = await self.infer(
            InferRequest(
                name,
                [InferInput("image", "BYTES", [len(images)], images)],
                version,
                deadline=deadline,
                protocol=protocol,
            )
        )
        logits = np.asarray(response.outputs[0].data)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return [{LABELS[i]: float(row[i]) for i in np.argsort(-row, kind="stable")} for row in probs]

    def check_inference_token(self, token: str | None) -> None:
        if self.inference_token and token != self.inference_token:
            raise Unauthorized("missing or wrong inference token")

    def check_management_token(self, token: str | None) -> None:
        if not self.management_enabled:
            raise Forbidden("model management is disabled")
        if token != self.management_token:
            raise Unauthorized("missing or wrong management token")

    async def repository_index(self) -> list[ModelStatus]:
        return [ModelStatus("mini", "1", "READY"), ModelStatus("old", "1", "UNAVAILABLE", "unloaded")]

    async def load_model(self, name: str) -> None:
        self._check_model(name)
        self.loaded.append(name)

    async def unload_model(self, name: str) -> None:
        self._check_model(name)
        self.loaded.remove(name)


class ServerThread:
    """A grpc.aio server with the adapters, on a free loopback port, in a thread with its own loop."""

    def __init__(self, plane: MiniPlane) -> None:
        self.plane = plane
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-server", daemon=True)
        self.server: Any = None
        self.port = 0

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        add_servicers(self.server, self.plane)  # type: ignore[arg-type]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(MiniPlane()) as running:
        yield running


@pytest.fixture(autouse=True)
def plane(server: ServerThread) -> MiniPlane:
    """The server's data plane, reset before every test."""
    server.plane.reset()
    return server.plane


@pytest.fixture
def client(server: ServerThread) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.url) as connection:
        yield connection


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.url) as opened:
        yield opened


def _status(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


# ---- v2 through tritonclient --------------------------------------------------------------------


def test_health_and_metadata(client: triton.InferenceServerClient, plane: MiniPlane) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mini")
    assert client.is_model_ready("mini", "1")
    assert not client.is_model_ready("mini", "2")
    plane.is_ready = False
    assert not client.is_server_ready()
    server_meta = client.get_server_metadata()
    assert (server_meta.name, server_meta.version) == ("mini-server", "0.0.1")
    assert list(server_meta.extensions) == ["classification", "model_repository"]
    meta = client.get_model_metadata("mini", as_json=True)
    assert meta["name"] == "mini" and meta["versions"] == ["1"] and meta["platform"] == "mini_platform"
    assert meta["inputs"][1] == {"name": "pixels", "datatype": "FP32", "shape": ["-1", "3", "-1", "-1"]}
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "3"]}]


def test_infer_bytes_images(client: triton.InferenceServerClient, plane: MiniPlane) -> None:
    images = np.array([_png((255, 0, 0)), _png((0, 0, 255))], dtype=np.object_)
    tensor = triton.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(images)
    result = client.infer("mini", [tensor], model_version="1", request_id="req-1")
    logits = result.as_numpy("logits")
    np.testing.assert_allclose(logits, [[1, 0, 0], [0, 0, 1]])
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("mini", "1", "req-1")
    assert response.parameters["batch"].int64_param == 2
    assert response.outputs[0].parameters["unit"].string_param == "mean"
    request = plane.requests[-1]
    assert (request.model, request.version, request.protocol, request.id) == ("mini", "1", "grpc_v2", "req-1")
    assert request.inputs[0].data == list(images)
    assert request.outputs is None


def test_infer_fp32_with_classification(client: triton.InferenceServerClient, plane: MiniPlane) -> None:
    pixels = np.zeros((1, 3, 4, 4), dtype=np.float32)
    pixels[0, 1] = 0.75
    pixels[0, 2] = 0.25
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    output = triton.InferRequestedOutput("logits", class_count=2)
    result = client.infer("mini", [tensor], outputs=[output])
    assert result.as_numpy("logits").tolist() == [[b"0.750000:1:green", b"0.250000:2:blue"]]
    request = plane.requests[-1]
    np.testing.assert_array_equal(request.inputs[0].data, pixels)
    assert request.outputs is not None and request.outputs[0].classification == 2
    assert request.version is None


def _infer_request(messages: Any, **fields: Any) -> Any:
    return messages.ModelInferRequest(model_name="mini", **fields)


def test_typed_contents(channel: grpc.Channel, plane: MiniPlane) -> None:
    v2 = protos.load_v2()
    stub = v2.services.GRPCInferenceServiceStub(channel)
    request = _infer_request(v2.messages)
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 3, 1, 2]).contents.fp32_contents.extend(
        [1, 1, 2, 2, 3, 3]
    )
    response = stub.ModelInfer(request)
    assert list(response.outputs[0].shape) == [1, 3]
    assert np.frombuffer(response.raw_output_contents[0], "<f4").tolist() == [1, 2, 3]

    request = _infer_request(v2.messages)
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(_png((0, 255, 0)))
    response = stub.ModelInfer(request)
    assert np.frombuffer(response.raw_output_contents[0], "<f4").tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"raw_input_contents": [b"\x00" * 5]}, "input 'pixels': 5 bytes of raw data"),
        ({"raw_input_contents": [b"", b""]}, "2 raw_input_contents for 1 inputs"),
        ({}, r"input 'pixels': 0 elements for shape \[1, 3, 1, 1\]"),
    ],
)
def test_malformed_tensors_are_invalid_argument(channel: grpc.Channel, fields: dict[str, Any], fragment: str) -> None:
    v2 = protos.load_v2()
    request = _infer_request(v2.messages, **fields)
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 3, 1, 1])
    with pytest.raises(grpc.RpcError) as caught:
        v2.services.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() is not None and fragment.replace("\\", "") in caught.value.details()


def test_fp16_needs_raw_contents(channel: grpc.Channel) -> None:
    v2 = protos.load_v2()
    request = _infer_request(v2.messages)
    request.inputs.add(name="pixels", datatype="FP16", shape=[1])
    with pytest.raises(grpc.RpcError) as caught:
        v2.services.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send it in raw_input_contents" in (caught.value.details() or "")


def _image_input(data: bytes = b"") -> triton.InferInput:
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data or _png((1, 2, 3))], dtype=np.object_))
    return tensor


@pytest.mark.parametrize(
    ("model", "data", "status", "fragment"),
    [
        ("nope", b"", "StatusCode.NOT_FOUND", "no model named 'nope'"),
        ("busy", b"", "StatusCode.RESOURCE_EXHAUSTED", "queue of model 'busy' is full"),
        ("mini", b"not an image", "StatusCode.INVALID_ARGUMENT", "input 'image': not an image"),
    ],
)
def test_service_errors_map_to_status_codes(
    client: triton.InferenceServerClient, model: str, data: bytes, status: str, fragment: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [_image_input(data)])
    assert _status(caught) == status
    assert fragment in str(caught.value.message())


def test_a_full_queue_carries_a_retry_pushback(channel: grpc.Channel) -> None:
    v2 = protos.load_v2()
    request = v2.messages.ModelInferRequest(model_name="busy")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(_png((1, 2, 3)))
    with pytest.raises(grpc.RpcError) as caught:
        v2.services.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("grpc-retry-pushback-ms", "1000") in tuple(caught.value.trailing_metadata() or ())


def test_deadline_metadata_and_parameter_forms(client: triton.InferenceServerClient, plane: MiniPlane) -> None:
    before = time.monotonic()
    client.infer("mini", [_image_input()], headers={"x-request-timeout-ms": "1500"}, client_timeout=30.0)
    deadline = plane.requests[-1].deadline
    assert deadline is not None and before + 1 < deadline <= time.monotonic() + 1.5  # the earliest limit
    with pytest.raises(InferenceServerException) as caught:
        client.infer("mini", [_image_input()], headers={"x-request-timeout-ms": "soon"})
    assert _status(caught) == "StatusCode.INVALID_ARGUMENT"
    assert "invalid timeout: header X-Request-Timeout-Ms" in str(caught.value.message())


def test_unexpected_errors_are_internal_without_details(
    client: triton.InferenceServerClient, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="service.grpc_adapter"),
        pytest.raises(InferenceServerException) as caught,
    ):
        client.infer("boom", [_image_input()])
    assert _status(caught) == "StatusCode.INTERNAL"
    message = str(caught.value.message())
    assert "secret" not in message and "Traceback" not in message and "RuntimeError" not in message
    assert any(record.exc_info and "secret internal detail" in str(record.exc_info[1]) for record in caplog.records)


def test_model_metadata_not_found(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert _status(caught) == "StatusCode.NOT_FOUND"


def test_deadline_propagates(client: triton.InferenceServerClient, plane: MiniPlane) -> None:
    client.infer("mini", [_image_input()])
    assert plane.requests[-1].deadline is None

    before = time.monotonic()
    client.infer("mini", [_image_input()], client_timeout=30.0)
    deadline = plane.requests[-1].deadline
    assert deadline is not None and before + 25 < deadline <= time.monotonic() + 31  # grpc rounds timeouts up

    client.infer("mini", [_image_input()], client_timeout=30.0, timeout=2_000_000)  # v2 "timeout" in µs
    deadline = plane.requests[-1].deadline
    assert deadline is not None and before < deadline <= time.monotonic() + 2


def test_invalid_timeout_parameter(channel: grpc.Channel) -> None:
    v2 = protos.load_v2()
    request = _infer_request(v2.messages)
    request.parameters["timeout"].int64_param = -5
    with pytest.raises(grpc.RpcError) as caught:
        v2.services.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_inference_token(client: triton.InferenceServerClient, plane: MiniPlane) -> None:
    plane.inference_token = "s3cret"
    with pytest.raises(InferenceServerException) as caught:
        client.infer("mini", [_image_input()])
    assert _status(caught) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException):
        client.infer("mini", [_image_input()], headers={"authorization": "Bearer wrong"})
    client.infer("mini", [_image_input()], headers={"authorization": "Bearer s3cret"})
    assert client.is_server_ready()  # health and metadata stay open


def test_repository_extension(client: triton.InferenceServerClient, plane: MiniPlane) -> None:
    admin = {"authorization": "Bearer admin"}
    index = client.get_model_repository_index(headers=admin)
    assert [(m.name, m.state, m.reason) for m in index.models] == [
        ("mini", "READY", ""),
        ("old", "UNAVAILABLE", "unloaded"),
    ]
    client.load_model("mini", headers=admin)
    assert plane.loaded == ["mini"]
    client.unload_model("mini", headers=admin)
    assert plane.loaded == []
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("mini", headers=admin, config='{"backend": "x"}')
    assert _status(caught) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("mini")
    assert _status(caught) == "StatusCode.UNAUTHENTICATED"
    plane.management_enabled = False
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_repository_index(headers=admin)
    assert _status(caught) == "StatusCode.PERMISSION_DENIED"


def test_repository_index_ready_only(channel: grpc.Channel) -> None:
    v2 = protos.load_v2()
    stub = v2.services.GRPCInferenceServiceStub(channel)
    index = stub.RepositoryIndex(
        v2.messages.RepositoryIndexRequest(ready=True), metadata=[("authorization", "Bearer admin")]
    )
    assert [m.name for m in index.models] == ["mini"]


# ---- TorchServe ---------------------------------------------------------------------------------


@pytest.fixture
def torchserve(channel: grpc.Channel) -> tuple[Any, Any]:
    modules = protos.load_torchserve()
    return modules.services.InferenceAPIsServiceStub(channel), modules.messages


def test_torchserve_ping(torchserve: tuple[Any, Any], plane: MiniPlane) -> None:
    stub, _ = torchserve
    health = stub.Ping(empty_pb2.Empty()).health
    assert json.loads(health) == {"status": "Healthy"}
    assert health == '{\n  "status": "Healthy"\n}'  # TorchServe's pretty-printed JSON
    plane.is_ready = False
    assert json.loads(stub.Ping(empty_pb2.Empty()).health) == {"status": "Unhealthy"}


@pytest.mark.parametrize("key", ["data", "body"])
def test_torchserve_predictions(torchserve: tuple[Any, Any], plane: MiniPlane, key: str) -> None:
    stub, messages = torchserve
    response = stub.Predictions(messages.PredictionsRequest(model_name="mini", input={key: _png((0, 0, 255))}))
    prediction = json.loads(response.prediction)
    assert list(prediction) == ["blue", "red", "green"]  # best first
    assert prediction["blue"] == pytest.approx(np.e / (np.e + 2))
    assert plane.requests[-1].protocol == "grpc_torchserve"
    assert plane.deadlines[-1] is None


def test_torchserve_predictions_errors(torchserve: tuple[Any, Any], plane: MiniPlane) -> None:
    stub, messages = torchserve
    cases = [
        (messages.PredictionsRequest(model_name="nope", input={"data": _png((0, 0, 0))}), grpc.StatusCode.NOT_FOUND),
        (
            messages.PredictionsRequest(model_name="mini", input={"a": b"1", "b": b"2"}),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (  # the image rule is never guessed: not the only field, not both (service.rules.image_field)
            messages.PredictionsRequest(model_name="mini", input={"image": _png((0, 0, 0))}),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            messages.PredictionsRequest(model_name="mini", input={"data": b"1", "body": b"2"}),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (messages.PredictionsRequest(input={"data": _png((0, 0, 0))}), grpc.StatusCode.INVALID_ARGUMENT),
        (messages.PredictionsRequest(model_name="boom", input={"data": _png((0, 0, 0))}), grpc.StatusCode.INTERNAL),
    ]
    for request, code in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predictions(request)
        assert caught.value.code() == code
    plane.inference_token = "t"
    request = messages.PredictionsRequest(model_name="mini", input={"data": _png((0, 0, 0))})
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predictions(request)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Predictions(request, metadata=[("authorization", "Bearer t")]).prediction


def test_torchserve_deadline(torchserve: tuple[Any, Any], plane: MiniPlane) -> None:
    stub, messages = torchserve
    stub.Predictions(messages.PredictionsRequest(model_name="mini", input={"data": _png((9, 9, 9))}), timeout=30)
    deadline = plane.deadlines[-1]
    assert deadline is not None and time.monotonic() + 25 < deadline <= time.monotonic() + 31


def test_torchserve_streams(torchserve: tuple[Any, Any]) -> None:
    stub, messages = torchserve
    good = messages.PredictionsRequest(model_name="mini", input={"data": _png((255, 0, 0))})
    answers = list(stub.StreamPredictions(good))
    assert len(answers) == 1 and next(iter(json.loads(answers[0].prediction))) == "red"

    requests = [
        messages.PredictionsRequest(model_name="mini", input={"data": _png((0, 255, 0))}, sequence_id="s1"),
        messages.PredictionsRequest(model_name="nope", input={"data": _png((0, 255, 0))}, sequence_id="s1"),
        good,
    ]
    answers = list(stub.StreamPredictions2(iter(requests)))
    assert [a.sequence_id for a in answers] == ["s1", "s1", ""]
    assert next(iter(json.loads(answers[0].prediction))) == "green"
    assert answers[1].HasField("status") and answers[1].status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "nope" in answers[1].status.message and not answers[1].prediction
    assert not answers[2].HasField("status") and not answers[2].HasField("sequence_id")


def test_parameters_round_trip() -> None:
    message = protos.load_v2().messages.ModelInferResponse()
    values = {"a": np.int64(3), "b": np.float32(0.5), "c": True, "d": 2**64 - 1, "e": [1, 2], "f": "s", "g": -4}
    parameters_to_proto(message.parameters, values)
    assert parameters_from_proto(message.parameters) == {
        "a": 3, "b": 0.5, "c": True, "d": 2**64 - 1, "e": "[1, 2]", "f": "s", "g": -4,
    }  # fmt: skip
    assert message.parameters["d"].WhichOneof("parameter_choice") == "uint64_param"
