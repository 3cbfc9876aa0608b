"""The same bad v2 request over HTTP (JSON and binary) and gRPC is refused alike: same status class, same message.

The request rules live once (``service.rules``, ``service.codec``, the data plane); this table proves
the adapters add none of their own. One real data plane over the tiny model, on one event loop in a
background thread, answers a real ``grpc.aio`` server on a loopback port and the HTTP app (through
httpx's ASGI transport, on the same loop).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import numpy as np
import pytest

from service import codec, protos
from service.dataplane import DataPlane
from service.grpc_adapter import add_servicers, parameters_to_proto
from service.http_app import create_app
from service.repository import ModelRepository
from service.settings import Settings
from service.types import NUMPY_DTYPES
from tests.unit.service.conftest import png_bytes

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore

HTTP_JSON, HTTP_BINARY, GRPC = "http_json", "http_binary", "grpc"
PROTOCOLS = (HTTP_JSON, HTTP_BINARY, GRPC)
HTTP_TO_GRPC = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 504: "DEADLINE_EXCEEDED"}
IMAGE = png_bytes(3)


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]  # bytes for BYTES, numbers otherwise


@dataclass(frozen=True)
class Case:
    inputs: list[Tensor]
    message: str  # the exact message every protocol answers
    outputs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout_header: str | None = None
    status: int = 400


def _image(*, name: str = "image", shape: list[int] | None = None, count: int = 1) -> Tensor:
    return Tensor(name, "BYTES", [count] if shape is None else shape, [IMAGE] * count)


def _pixels(shape: list[int], *, name: str = "input", datatype: str = "FP32") -> Tensor:
    return Tensor(name, datatype, shape, [0] * int(np.prod(shape)))


def _classification(value: Any) -> list[tuple[str, dict[str, Any]]]:
    return [("probabilities", {"classification": value})]


BAD_TIMEOUT = "invalid timeout: parameter 'timeout' must be a positive number of microseconds (got {})"
BAD_HEADER = "invalid timeout: header X-Request-Timeout-Ms must be a positive number of milliseconds (got {})"
BAD_K = "output 'probabilities': classification must be a non-negative integer"
ONE_INPUT = "expected exactly one input ('image' BYTES or 'input' FP32), got {}"
CASES: dict[str, Case] = {
    "input-name": Case([_image(name="nope")], "unknown input 'nope'; send 'image' (BYTES) or 'input' (FP32)"),
    "datatype-int32": Case(
        [_pixels([1, 3, 32, 32], datatype="INT32")], "input 'input': datatype INT32 not supported; send FP32"
    ),
    "image-as-fp32": Case([_pixels([1], name="image")], "input 'image': datatype FP32 not supported; send BYTES"),
    "datatype-unknown": Case([Tensor("image", "FP8", [1], [0])], "input 'image': unknown datatype 'FP8'"),
    "bytes-count-short": Case([Tensor("image", "BYTES", [2], [IMAGE])], "input 'image': 1 elements for shape [2] (2)"),
    "bytes-count-long": Case(
        [Tensor("image", "BYTES", [1], [IMAGE, IMAGE])], "input 'image': more than the 1 elements its shape [1] holds"
    ),
    "shape-negative": Case(
        [Tensor("image", "BYTES", [-1], [])], "input 'image': shape [-1] must be non-negative integers"
    ),
    "no-images": Case([Tensor("image", "BYTES", [0], [])], "input 'image': no images"),
    "fp32-shape": Case([_pixels([1, 3, 16, 16])], "input 'input': shape [1, 3, 16, 16] does not match [N, 3, 32, 32]"),
    "two-inputs": Case([_image(), _image()], ONE_INPUT.format(2)),
    "no-inputs": Case([], ONE_INPUT.format(0)),
    "output-unknown": Case([_image()], "unknown output 'x'; this model has logits, probabilities", outputs=[("x", {})]),
    "classification-negative": Case([_image()], BAD_K, outputs=_classification(-1)),
    "classification-string": Case([_image()], BAD_K, outputs=_classification("3")),
    "classification-float": Case([_image()], BAD_K, outputs=_classification(1.5)),
    "classification-boolean": Case([_image()], BAD_K, outputs=_classification(True)),
    "timeout-word": Case([_image()], BAD_TIMEOUT.format("'abc'"), parameters={"timeout": "abc"}),
    "timeout-negative": Case([_image()], BAD_TIMEOUT.format(-5), parameters={"timeout": -5}),
    "timeout-zero": Case([_image()], BAD_TIMEOUT.format(0), parameters={"timeout": 0}),
    "timeout-boolean": Case([_image()], BAD_TIMEOUT.format(True), parameters={"timeout": True}),
    "timeout-nan": Case([_image()], BAD_TIMEOUT.format("'nan'"), parameters={"timeout": "nan"}),
    "timeout-header-word": Case([_image()], BAD_HEADER.format("'soon'"), timeout_header="soon"),
    "timeout-header-inf": Case([_image()], BAD_HEADER.format("'inf'"), timeout_header="inf"),
    "timeout-passed": Case(  # 1 µs: refused without being computed
        [_image()], "the request's deadline passed before it could be computed", parameters={"timeout": 1}, status=504
    ),
}


# ---- one data plane, served over HTTP and gRPC on one loop --------------------------------------
class Served:
    """A loaded data plane, its HTTP app and a gRPC server, on an event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="parity-server", daemon=True)
        self.grpc_port = 0

    async def _start(self) -> None:
        self.repository = ModelRepository(self.settings)
        await self.repository.load_all()
        self.plane = DataPlane(self.repository, self.settings)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(self.plane)), base_url="http://t")
        self.grpc = grpc.aio.server()
        add_servicers(self.grpc, self.plane)
        self.grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")
        await self.grpc.start()

    async def _stop(self) -> None:
        await self.grpc.stop(None)
        await self.http.aclose()
        await self.plane.shutdown(timeout=5.0)

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def __enter__(self) -> Served:
        self.thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="module")
def served(shared_tiny_store: TinyStore) -> Iterator[Served]:
    values: dict[str, Any] = {"device": "cpu", "max_batch_size": 4, "decode_workers": 2, "drain_timeout_s": 5.0}
    with Served(Settings(model_store=shared_tiny_store.store, **values)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(served: Served) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        yield protos.load_v2().services.GRPCInferenceServiceStub(channel)


# ---- the three encodings of one case ------------------------------------------------------------
def _raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return codec.serialize_bytes_tensor(tensor.data)
    dtype = NUMPY_DTYPES.get(tensor.datatype, np.uint8)  # FP8: any bytes, refused by its name
    return np.asarray(tensor.data, dtype=dtype).tobytes()


def _http_body(case: Case, *, binary: bool) -> tuple[bytes, dict[str, str]]:
    inputs, blobs = [], []
    for tensor in case.inputs:
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            blobs.append(_raw(tensor))
            item["parameters"] = {"binary_data_size": len(blobs[-1])}
        elif tensor.datatype == "BYTES":
            item["data"] = [base64.b64encode(x).decode() for x in tensor.data]
        else:
            item["data"] = tensor.data
        inputs.append(item)
    header: dict[str, Any] = {"inputs": inputs, "parameters": case.parameters}
    if case.outputs:
        header["outputs"] = [{"name": name, "parameters": params} for name, params in case.outputs]
    text = json.dumps(header).encode()
    headers = {"X-Request-Timeout-Ms": case.timeout_header} if case.timeout_header is not None else {}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(text))
    return text + b"".join(blobs), headers


def _http(served: Served, case: Case, *, binary: bool) -> tuple[str, str]:
    content, headers = _http_body(case, binary=binary)
    response = served.call(served.http.post("/v2/models/tiny/infer", content=content, headers=headers))
    if response.status_code == 200:
        return "OK", ""
    return HTTP_TO_GRPC.get(response.status_code, str(response.status_code)), response.json()["error"]


def _grpc(stub: Any, case: Case) -> tuple[str, str]:
    messages = protos.load_v2().messages
    request = messages.ModelInferRequest(model_name="tiny")
    for tensor in case.inputs:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        request.raw_input_contents.append(_raw(tensor))
    for name, params in case.outputs:
        parameters_to_proto(request.outputs.add(name=name).parameters, params)
    parameters_to_proto(request.parameters, case.parameters)
    metadata = [("x-request-timeout-ms", case.timeout_header)] if case.timeout_header is not None else []
    try:
        stub.ModelInfer(request, metadata=metadata, timeout=60)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def _answers(served: Served, stub: Any, case: Case) -> dict[str, tuple[str, str]]:
    return {
        HTTP_JSON: _http(served, case, binary=False),
        HTTP_BINARY: _http(served, case, binary=True),
        GRPC: _grpc(stub, case),
    }


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_request_is_refused_alike_on_every_protocol(served: Served, stub: Any, name: str) -> None:
    case = CASES[name]
    answers = _answers(served, stub, case)
    assert answers == dict.fromkeys(PROTOCOLS, (HTTP_TO_GRPC[case.status], case.message)), answers


def test_a_good_request_is_answered_on_every_protocol(served: Served, stub: Any) -> None:
    case = Case([_image()], "", outputs=_classification(1), parameters={"timeout": "30000000"}, timeout_header="9e3")
    assert _answers(served, stub, case) == dict.fromkeys(PROTOCOLS, ("OK", ""))
