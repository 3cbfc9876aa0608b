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

import asyncio
import socket
import struct
from collections.abc import Callable
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


class _ResponseParser:
    """Incremental HTTP/1.1 response parser: ``feed`` bytes until it returns the whole answer."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._head: tuple[int, dict[str, str]] | None = None
        self._body_end = -1  # Content-Length of the answer being read; -1 until its head is in

    def feed(self, data: bytes) -> Answer | None:
        self._buffer += data
        if self._head is None and not self._parse_head():
            return None
        assert self._head is not None
        status, headers = self._head
        if headers.get("transfer-encoding", "").lower() == "chunked":
            found = _dechunked(self._buffer)
            if found is None:
                return None
            body = found
        elif len(self._buffer) < self._body_end:
            return None
        else:
            body = bytes(self._buffer[: self._body_end])
        self._buffer, self._head, self._body_end = bytearray(), None, -1
        return Answer(status, headers, body)

    def _parse_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self._head = (int(lines[0].split(" ", 2)[1]), headers)
        self._body_end = int(headers.get("content-length", "0"))
        return True


def _dechunked(buffer: bytearray) -> bytes | None:
    """The payload of a chunked body once the whole body is in ``buffer`` (no trailers expected), else None."""
    out, at = bytearray(), 0
    while (line_end := buffer.find(b"\r\n", at)) >= 0:
        size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        at = line_end + 2 + size + 2
        if len(buffer) < at:
            return None
        if size == 0:
            return bytes(out)
        out += buffer[line_end + 2 : at - 2]
    return None


def _request_head(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
    return (head + "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n").encode("latin-1")


def _closes(answer: Answer) -> bool:
    return answer.headers.get("connection", "").lower() == "close"


class _Http11Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, the answer parsed as it arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = _ResponseParser()
        self._answer: asyncio.Future[Answer] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError(f"the server closed the connection: {exc}"))

    def request(self, head: bytes, body: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None and self._answer is None
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.writelines((head, body))
        return self._answer

    def data_received(self, data: bytes) -> None:
        answer = self._parser.feed(data)
        if answer is None or self._answer is None:
            return
        waiter, self._answer = self._answer, None
        if _closes(answer) and self.transport is not None:
            self.transport.close()
        if not waiter.done():
            waiter.set_result(answer)


class LeanTransport:
    """A minimal asyncio HTTP/1.1 client: prebuilt request heads, keep-alive, at most ``concurrency`` connections.

    It spends about a third of aiohttp's CPU per request (measured on this machine), which matters
    when the load generator shares the server's cores and every millisecond of it adds to latency.
    """

    def __init__(self, endpoint: Endpoint, concurrency: int) -> None:
        self._endpoint = endpoint
        self._host = f"{endpoint.host}:{endpoint.http_port}"
        self._idle: list[_Http11Connection] = []
        self._slots = asyncio.Semaphore(max(concurrency, 1))
        self._open: set[_Http11Connection] = set()

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        async with self._slots:
            connection = await self._connection()
            try:
                answer = await connection.request(_request_head(self._host, path, body, headers), body)
            except BaseException:
                self._discard(connection)
                raise
            if connection.closed:
                self._discard(connection)
            else:
                self._idle.append(connection)
            return answer

    async def _connection(self) -> _Http11Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
            self._open.discard(connection)
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(_Http11Connection, self._endpoint.host, self._endpoint.http_port)
        self._open.add(connection)
        return connection

    def _discard(self, connection: _Http11Connection) -> None:
        self._open.discard(connection)
        if connection.transport is not None:
            connection.transport.close()

    async def aclose(self) -> None:
        for connection in list(self._open):
            self._discard(connection)
        self._idle.clear()


class BlockingTransport:
    """One blocking keep-alive socket, for concurrency 1 only: ``post`` never yields to the event loop.

    The latency probe: it spends the least client CPU per request (no event loop wake-ups), so a
    request's latency is as close to the server's as a client on the same machine can measure.
    """

    def __init__(self, endpoint: Endpoint, concurrency: int) -> None:
        if concurrency != 1:
            raise ValueError(f"the blocking HTTP client sends one request at a time, not {concurrency}")
        self._endpoint = endpoint
        self._host = f"{endpoint.host}:{endpoint.http_port}"
        self._socket: socket.socket | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        if self._socket is None:
            self._socket = socket.create_connection((self._endpoint.host, self._endpoint.http_port), timeout=60.0)
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._socket.sendall(_request_head(self._host, path, body, headers) + body)
            parser = _ResponseParser()
            while (answer := parser.feed(self._socket.recv(1 << 16) or _eof())) is None:
                pass
        except BaseException:
            await self.aclose()
            raise
        if _closes(answer):
            await self.aclose()
        return answer

    async def aclose(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _eof() -> bytes:
    raise ConnectionError("the server closed the connection before answering")


HTTP_CLIENTS: dict[str, Callable[[Endpoint, int], HttpTransport]] = {
    "blocking": BlockingTransport,
    "lean": LeanTransport,
    "aiohttp": AiohttpTransport,
    "httpx": HttpxTransport,
}


SWEEP_CLIENTS = tuple(name for name in HTTP_CLIENTS if name != "blocking")  # any concurrency


def http_transport(kind: str, endpoint: Endpoint, concurrency: int) -> HttpTransport:
    if kind not in HTTP_CLIENTS:
        raise ValueError(f"unknown HTTP client {kind!r}; choose from {', '.join(HTTP_CLIENTS)}")
    return HTTP_CLIENTS[kind](endpoint, concurrency)


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


class _GrpcCall:
    """One unary method over one channel: grpc.aio, or with ``client="blocking"`` the synchronous stub.

    The blocking call never yields to the event loop (concurrency 1 only: the latency probe).
    """

    def __init__(self, endpoint: Endpoint, method: Callable[[Any], Any], client: str) -> None:
        self._blocking = client == "blocking"
        if self._blocking:
            self._sync_channel = grpc.insecure_channel(endpoint.grpc_address, options=GRPC_OPTIONS)
            self._call = method(self._sync_channel)
        else:
            self._aio_channel = grpc.aio.insecure_channel(endpoint.grpc_address, options=GRPC_OPTIONS)
            self._call = method(self._aio_channel)

    async def __call__(self, request: Any) -> Any:
        if self._blocking:
            return self._call(request, timeout=60.0)
        return await self._call(request, timeout=60.0)

    async def aclose(self) -> None:
        if self._blocking:
            self._sync_channel.close()
        else:
            await self._aio_channel.close()


class V2GrpcClient:
    """``inference.GRPCInferenceService/ModelInfer`` over one channel (HTTP/2 multiplexes the calls).

    ``http`` is the client kind; only "blocking" (synchronous stub, concurrency 1) changes gRPC's.
    """

    def __init__(
        self, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int, http: str = ""
    ) -> None:
        from service.protos import load_v2

        v2 = load_v2()
        self._grpc = _GrpcCall(endpoint, lambda channel: v2.services.GRPCInferenceServiceStub(channel).ModelInfer, http)
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
        response: Any = await self._grpc(self._requests[index % len(self._requests)])
        if not response.raw_output_contents:
            raise BadAnswer("ModelInfer answered without output tensors")

    async def aclose(self) -> None:
        await self._grpc.aclose()


class TsGrpcClient:
    """TorchServe's ``InferenceAPIsService/Predictions`` with the JPEG under ``data``."""

    def __init__(
        self, endpoint: Endpoint, *, model: str, images: list[bytes], concurrency: int, http: str = ""
    ) -> None:
        from service.protos import load_torchserve

        ts = load_torchserve()
        self._grpc = _GrpcCall(endpoint, lambda chan: ts.services.InferenceAPIsServiceStub(chan).Predictions, http)
        self._requests = [ts.messages.PredictionsRequest(model_name=model, input={"data": image}) for image in images]

    async def send(self, index: int) -> None:
        response: Any = await self._grpc(self._requests[index % len(self._requests)])
        if not response.prediction.startswith(b"{"):
            raise BadAnswer(f"not a JSON object of label probabilities: {response.prediction[:200]!r}")

    async def aclose(self) -> None:
        await self._grpc.aclose()


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
