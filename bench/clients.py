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


def _http_client(endpoint: Endpoint, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env=False: a proxy from the environment must never sit between us and loopback
    return httpx.AsyncClient(base_url=endpoint.url, limits=limits, timeout=60.0, trust_env=False)


def _check(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise BadAnswer(f"HTTP {response.status_code}: {response.text[:200]}")


class V2HttpClient:
    """``POST /v2/models/{m}/infer`` with the image as a binary BYTES tensor, binary probabilities back."""

    def __init__(self, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int) -> None:
        import tritonclient.http as triton_http

        self._http = _http_client(endpoint, concurrency)
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
        response = await self._http.post(self._path, content=body, headers=headers)
        _check(response)
        if "Inference-Header-Content-Length" not in response.headers:
            raise BadAnswer("answer without Triton's binary tensor header")

    async def aclose(self) -> None:
        await self._http.aclose()


class TsHttpClient:
    """TorchServe's ``POST /predictions/{model}`` with the JPEG as the raw body."""

    def __init__(self, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int) -> None:
        self._http = _http_client(endpoint, concurrency)
        self._path = f"/predictions/{model}"
        self._images = images

    async def send(self, index: int) -> None:
        response = await self._http.post(self._path, content=self._images[index % len(self._images)])
        _check(response)
        if not response.content.startswith(b"{"):
            raise BadAnswer(f"not a JSON object of label probabilities: {response.text[:200]}")

    async def aclose(self) -> None:
        await self._http.aclose()


class V2GrpcClient:
    """``inference.GRPCInferenceService/ModelInfer`` over one channel (HTTP/2 multiplexes the calls)."""

    def __init__(self, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int) -> None:
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

    def __init__(self, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int) -> None:
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


def make_client(protocol: str, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int) -> Client:
    """A client for ``protocol`` (one of PROTOCOLS); call it from inside the running event loop."""
    if protocol not in _CLIENTS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    return _CLIENTS[protocol](endpoint, model=model, images=images, concurrency=concurrency)
