"""One image request over each of the server's protocols, answered as a protocol-neutral :class:`Outcome`.

Used by the reliability and security tests: the same case is sent over KServe v2 HTTP (JSON with
base64, and Triton's binary extension), v2 gRPC (an unmodified ``tritonclient.grpc``), TorchServe's
``/predictions`` and TorchServe's gRPC ``Predictions``, and every answer is checked the same way.
"""

from __future__ import annotations

import base64
import json
import ssl
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from service import codec
from service.protos import load_torchserve, load_v2

HTTP_V2_JSON, HTTP_V2_BINARY, GRPC_V2 = "http_v2_json", "http_v2_binary", "grpc_v2"
HTTP_TORCHSERVE, GRPC_TORCHSERVE = "http_torchserve", "grpc_torchserve"
PROTOCOLS = (HTTP_V2_JSON, HTTP_V2_BINARY, GRPC_V2, HTTP_TORCHSERVE, GRPC_TORCHSERVE)
V2_PROTOCOLS = (HTTP_V2_JSON, HTTP_V2_BINARY, GRPC_V2)
# the gRPC status each HTTP status of service/errors.py maps to
GRPC_CODE = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """What came back: an HTTP status (int) or a gRPC code name ("OK" on success), the error text, the top-1 label."""

    protocol: str
    status: int | str
    message: str = ""
    label: str | None = None
    body: str = ""  # the raw HTTP body or gRPC details, to check for leaked internals

    @property
    def ok(self) -> bool:
        return self.status in (200, "OK")

    def is_refusal(self, http_status: int) -> bool:
        """The refusal ``http_status`` on HTTP, or the gRPC code it maps to."""
        expected: int | str = http_status if self.protocol.startswith("http") else GRPC_CODE[http_status]
        return self.status == expected


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens and how to reach it (TLS root certificate, bearer token)."""

    http_port: int
    grpc_port: int
    root_cert: bytes | None = None
    token: str | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.root_cert else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def http_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def grpc_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def channel(self) -> grpc.Channel:
        if self.root_cert is None:
            return grpc.insecure_channel(self.grpc_address)
        return grpc.secure_channel(self.grpc_address, grpc.ssl_channel_credentials(root_certificates=self.root_cert))

    def http_client(self) -> httpx.Client:
        """A client that trusts exactly this endpoint's root certificate, when it has one."""
        verify = ssl.create_default_context(cadata=self.root_cert.decode()) if self.root_cert else True
        return httpx.Client(base_url=self.url, timeout=TIMEOUT_S, verify=verify)


def send_image(
    endpoint: Endpoint,
    protocol: str,
    data: bytes,
    *,
    model: str = "demo",
    version: str | None = None,
    http: httpx.Client | None = None,
) -> Outcome:
    """Send one encoded image for classification over ``protocol``."""
    if protocol.startswith("http"):
        client = http or endpoint.http_client()
        try:
            return _send_http(endpoint, client, protocol, data, model, version)
        finally:
            if http is None:
                client.close()
    if protocol == GRPC_V2:
        return _send_triton_grpc(endpoint, data, model, version)
    return _send_torchserve_grpc(endpoint, data, model, version)


def _send_http(
    endpoint: Endpoint, client: httpx.Client, protocol: str, data: bytes, model: str, version: str | None
) -> Outcome:
    headers = endpoint.http_headers()
    if protocol == HTTP_TORCHSERVE:
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        response = client.post(path, content=data, headers=headers)
    else:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        content, extra = v2_body(data, binary=protocol == HTTP_V2_BINARY)
        response = client.post(path, content=content, headers={**headers, **extra})
    return http_outcome(protocol, response)


def v2_body(data: bytes, *, binary: bool, outputs: list[dict[str, Any]] | None = None) -> tuple[bytes, dict[str, str]]:
    """A v2 infer body for one image: JSON with base64, or a JSON header followed by the binary tensor."""
    outputs = outputs if outputs is not None else [{"name": "probabilities", "parameters": {"classification": 1}}]
    tensor: dict[str, Any] = {"name": "image", "datatype": "BYTES", "shape": [1]}
    if not binary:
        tensor["data"] = [base64.b64encode(data).decode()]
        return json.dumps({"inputs": [tensor], "outputs": outputs}).encode(), {"Content-Type": "application/json"}
    raw = codec.serialize_bytes_tensor([data])
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor], "outputs": outputs}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    return header + raw, headers


def http_outcome(protocol: str, response: httpx.Response) -> Outcome:
    text = response.text
    try:
        body = response.json()
    except ValueError:
        return Outcome(protocol, response.status_code, text, None, text)
    if response.status_code != 200:
        message = body.get("message", body.get("error", "")) if isinstance(body, dict) else text
        return Outcome(protocol, response.status_code, str(message), None, text)
    if protocol == HTTP_TORCHSERVE:
        return Outcome(protocol, 200, "", next(iter(body)), text)
    strings = next(o for o in body["outputs"] if o["name"] == "probabilities")["data"]
    return Outcome(protocol, 200, "", strings[0].split(":", 2)[2], text)


def _send_triton_grpc(endpoint: Endpoint, data: bytes, model: str, version: str | None) -> Outcome:
    if endpoint.root_cert is not None:  # tritonclient reads certificates from files; use a channel of our own
        return _send_v2_stub(endpoint, data, model, version)
    client = triton_grpc.InferenceServerClient(endpoint.grpc_address)
    try:
        tensor = triton_grpc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
        wanted = [triton_grpc.InferRequestedOutput("probabilities", class_count=1)]
        headers = dict(endpoint.grpc_metadata())
        result = client.infer(
            model, [tensor], model_version=version or "", outputs=wanted, headers=headers, client_timeout=TIMEOUT_S
        )
        label = result.as_numpy("probabilities").reshape(-1)[0].decode().split(":", 2)[2]
        return Outcome(GRPC_V2, "OK", "", label)
    except InferenceServerException as exc:
        code = (exc.status() or "").removeprefix("StatusCode.")
        return Outcome(GRPC_V2, code, exc.message() or "", None, str(exc))
    finally:
        client.close()


def _send_v2_stub(endpoint: Endpoint, data: bytes, model: str, version: str | None) -> Outcome:
    """v2 ModelInfer with the generated stub (for TLS with an in-memory root certificate)."""
    messages = load_v2().messages
    request = messages.ModelInferRequest(model_name=model, model_version=version or "")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(data)
    output = request.outputs.add(name="probabilities")
    output.parameters["classification"].int64_param = 1
    reply, error = grpc_call(endpoint, "v2", "ModelInfer", request)
    if error is not None:
        return Outcome(GRPC_V2, error.code().name, error.details() or "", None, error.details() or "")
    strings = codec.deserialize_bytes_tensor(reply.raw_output_contents[0], name="probabilities")
    return Outcome(GRPC_V2, "OK", "", strings[0].decode().split(":", 2)[2])


def _send_torchserve_grpc(endpoint: Endpoint, data: bytes, model: str, version: str | None) -> Outcome:
    messages = load_torchserve().messages
    request = messages.PredictionsRequest(model_name=model, model_version=version or "", input={"data": data})
    reply, error = grpc_call(endpoint, "torchserve", "Predictions", request)
    if error is not None:
        return Outcome(GRPC_TORCHSERVE, error.code().name, error.details() or "", None, error.details() or "")
    return Outcome(GRPC_TORCHSERVE, "OK", "", next(iter(json.loads(reply.prediction))))


def grpc_call(endpoint: Endpoint, service: str, method: str, request: Any) -> tuple[Any, grpc.RpcError | None]:
    """Call ``method`` of the v2 or TorchServe service; returns (reply, None) or (None, the RpcError)."""
    protos = load_v2() if service == "v2" else load_torchserve()
    stub_class = (
        protos.services.GRPCInferenceServiceStub if service == "v2" else protos.services.InferenceAPIsServiceStub
    )
    with endpoint.channel() as channel:
        stub = stub_class(channel)
        try:
            return getattr(stub, method)(request, metadata=endpoint.grpc_metadata(), timeout=TIMEOUT_S), None
        except grpc.RpcError as exc:
            return None, exc
