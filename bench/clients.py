"""Protocol clients for the load generator: each sends one real JPEG per request and checks the answer.

    client = make_client("v2-http", endpoint, model="resnet18", images=jpegs, concurrency=8)
    await client.send(0)          # images[0 % len(images)]
    await client.aclose()

Request bodies are built once per image, so the load generator spends its time sending, not
encoding. Protocols: ``v2-http`` (Open Inference Protocol over HTTP, Triton's binary tensor
extension), ``v2-grpc`` (``inference.GRPCInferenceService/ModelInfer``), ``ts-http`` (TorchServe's
``POST /predictions/{model}``) and ``ts-grpc`` (TorchServe's ``InferenceAPIsService/Predictions``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import httpx
import numpy as np

PROTOCOLS = ("v2-http", "v2-grpc", "ts-http", "ts-grpc")
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens on loopback."""

    http_port: int
    grpc_port: int
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"


class Client(Protocol):
    async def send(self, index: int) -> None: ...

    async def aclose(self) -> None: ...


class BadAnswer(RuntimeError):
    """The server answered, but not with a successful inference."""


HTTP_CLIENTS = ("aiohttp", "httpx")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class HttpTransport(Protocol):
    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer: ...

    async def aclose(self) -> None: ...


class HttpxTransport:
    """httpx.AsyncClient with one pooled connection per concurrent request."""

    def __init__(self, endpoint: Endpoint, concurrency: int) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        # trust_env=False: a proxy from the environment must never sit between us and loopback
        self._client = httpx.AsyncClient(base_url=endpoint.url, limits=limits, timeout=60.0, trust_env=False)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        response = await self._client.post(path, content=body, headers=headers)
        return Answer(response.status_code, dict(response.headers), response.content)

    async def aclose(self) -> None:
        await self._client.aclose()


class AiohttpTransport:
    """aiohttp's client (C-accelerated HTTP parser: about a third of httpx's CPU per request)."""

    def __init__(self, endpoint: Endpoint, concurrency: int) -> None:
        import aiohttp

        self._url = endpoint.url
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60.0), trust_env=False
        )

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        async with self._session.post(self._url + path, data=body, headers=headers) as response:
            return Answer(response.status, dict(response.headers), await response.read())

    async def aclose(self) -> None:
        await self._session.close()


def http_transport(kind: str, endpoint: Endpoint, concurrency: int) -> HttpTransport:
    if kind not in HTTP_CLIENTS:
        raise ValueError(f"unknown HTTP client {kind!r}; choose from {', '.join(HTTP_CLIENTS)}")
    return AiohttpTransport(endpoint, concurrency) if kind == "aiohttp" else HttpxTransport(endpoint, concurrency)


def _check(answer: Answer) -> None:
    if answer.status != 200:
        raise BadAnswer(f"HTTP {answer.status}: {answer.body[:200]!r}")


class V2HttpClient:
    """``POST /v2/models/{m}/infer`` with the image as a binary BYTES tensor, binary probabilities back."""

    def __init__(
        self, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int, http: str = "aiohttp"
    ) -> None:
        import tritonclient.http as triton_http

        self._http = http_transport(http, endpoint, concurrency)
        self._path = f"/v2/models/{model}/infer"
        self._bodies: list[tuple[bytes, dict[str, str]]] = []
        for image in images:
            tensor = triton_http.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
            wanted = [triton_http.InferRequestedOutput("probabilities", binary_data=True)]
            body, json_size = triton_http.InferenceServerClient.generate_request_body([tensor], outputs=wanted)
            headers = {"Content-Type": "application/octet-stream"}
            if json_size is not None:
                headers["Inference-Header-Content-Length"] = str(json_size)
            self._bodies.append((body, headers))

    async def send(self, index: int) -> None:
        body, headers = self._bodies[index % len(self._bodies)]
        answer = await self._http.post(self._path, body, headers)
        _check(answer)
        if not any(k.lower() == "inference-header-content-length" for k in answer.headers):
            raise BadAnswer("answer without Triton's binary tensor header")

    async def aclose(self) -> None:
        await self._http.aclose()


class TsHttpClient:
    """TorchServe's ``POST /predictions/{model}`` with the JPEG as the raw body."""

    def __init__(
        self, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int, http: str = "aiohttp"
    ) -> None:
        self._http = http_transport(http, endpoint, concurrency)
        self._path = f"/predictions/{model}"
        self._images = images

    async def send(self, index: int) -> None:
        answer = await self._http.post(self._path, self._images[index % len(self._images)], {})
        _check(answer)
        if not answer.body.startswith(b"{"):
            raise BadAnswer(f"not a JSON object of label probabilities: {answer.body[:200]!r}")

    async def aclose(self) -> None:
        await self._http.aclose()


class V2GrpcClient:
    """``inference.GRPCInferenceService/ModelInfer`` over one channel (HTTP/2 multiplexes the calls)."""

    def __init__(
        self, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int, http: str = ""
    ) -> None:
        from service.protos import load_v2

        v2 = load_v2()
        self._channel = grpc.aio.insecure_channel(endpoint.grpc_address, options=GRPC_OPTIONS)
        self._call = v2.services.GRPCInferenceServiceStub(self._channel).ModelInfer
        tensor = v2.messages.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
        wanted = v2.messages.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")
        self._requests = [
            v2.messages.ModelInferRequest(
                model_name=model,
                inputs=[tensor],
                outputs=[wanted],
                raw_input_contents=[struct.pack("<I", len(image)) + image],
            )
            for image in images
        ]

    async def send(self, index: int) -> None:
        response: Any = await self._call(self._requests[index % len(self._requests)], timeout=60.0)
        if not response.raw_output_contents:
            raise BadAnswer("ModelInfer answered without output tensors")

    async def aclose(self) -> None:
        await self._channel.close()


class TsGrpcClient:
    """TorchServe's ``InferenceAPIsService/Predictions`` with the JPEG under ``data``."""

    def __init__(
        self, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int, http: str = ""
    ) -> None:
        from service.protos import load_torchserve

        ts = load_torchserve()
        self._channel = grpc.aio.insecure_channel(endpoint.grpc_address, options=GRPC_OPTIONS)
        self._call = ts.services.InferenceAPIsServiceStub(self._channel).Predictions
        self._requests = [ts.messages.PredictionsRequest(model_name=model, input={"data": image}) for image in images]

    async def send(self, index: int) -> None:
        response: Any = await self._call(self._requests[index % len(self._requests)], timeout=60.0)
        if not response.prediction.startswith(b"{"):
            raise BadAnswer(f"not a JSON object of label probabilities: {response.prediction[:200]!r}")

    async def aclose(self) -> None:
        await self._channel.close()


_CLIENTS: dict[str, type[V2HttpClient | TsHttpClient | V2GrpcClient | TsGrpcClient]] = {
    "v2-http": V2HttpClient,
    "v2-grpc": V2GrpcClient,
    "ts-http": TsHttpClient,
    "ts-grpc": TsGrpcClient,
}


def make_client(
    protocol: str, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int, http: str = "aiohttp"
) -> Client:
    """A client for ``protocol`` (one of PROTOCOLS; ``http``: the HTTP library); call it inside the event loop."""
    if protocol not in _CLIENTS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    return _CLIENTS[protocol](endpoint, model=model, images=images, concurrency=concurrency, http=http)
