"""Open Inference Protocol v2 over HTTP (KServe / Triton), with Triton's binary tensor extension.

Thin: converts JSON (or JSON header + binary tensors) to and from ``service.types`` and calls
the data plane; errors are mapped once, in ``service.http_app``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service import codec, rules
from service.dataplane import DataPlane
from service.errors import InvalidInput, ModelNotReady
from service.http_common import bearer_token, read_body, request_deadline
from service.types import NUMPY_DTYPES, InferInput, InferOutput, InferRequest, InferResponse, RequestedOutput

HEADER_LENGTH = "Inference-Header-Content-Length"
_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": ["BYTES", *NUMPY_DTYPES]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array", "description": "row-major elements; BYTES as base64 strings"},
        "parameters": {"type": "object"},
    },
}
_REQUESTED_OUTPUT = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
}
# infer reads the raw request (JSON, or JSON + binary tensors), so FastAPI cannot infer this body
INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
                        "outputs": {"type": "array", "items": _REQUESTED_OUTPUT},
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"binary tensor extension: a JSON header of {HEADER_LENGTH} bytes, then the tensors",
            },
        },
    }
}


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON part of a request and, with the binary extension, the bytes after it."""
    end = len(body)
    if header_length is not None:
        try:
            end = int(header_length)
        except ValueError as exc:
            raise InvalidInput(f"{HEADER_LENGTH} is not an integer") from exc
        if not 0 <= end <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH}={end} but the body has {len(body)} bytes")
    try:
        header = json.loads(body[:end])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object")
    return header, body[end:]


def _shape(item: dict[str, Any]) -> list[int]:
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input '{item.get('name')}': shape must be a list of non-negative integers")
    codec.element_count(shape, name=str(item.get("name")))  # negative dimensions: the codec's message
    return shape


def _json_data(item: dict[str, Any], name: str, datatype: str, shape: list[int]) -> np.ndarray | list[bytes]:
    data = item.get("data")
    if data is None:
        raise InvalidInput(f"input '{name}': no data (and no binary_data_size)")
    flat = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else np.asarray([data], dtype=object)
    codec.check_element_count(flat.size, shape, name=name)
    if datatype == "BYTES":
        try:
            return [base64.b64decode(str(x), validate=True) for x in flat]
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"input '{name}': BYTES elements in JSON must be base64 strings ({exc})") from exc
    try:
        return np.asarray(flat.tolist(), dtype=NUMPY_DTYPES[datatype]).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}': data is not {datatype}: {exc}") from exc


def parse_inputs(header: dict[str, Any], binary: bytes) -> list[InferInput]:
    items = header.get("inputs")
    if not isinstance(items, list):  # an empty list is the data plane's to refuse, as over gRPC
        raise InvalidInput("request has no 'inputs' list")
    inputs, offset = [], 0
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("each input needs a 'name'")
        name, datatype, shape = item["name"], str(item.get("datatype", "")), _shape(item)
        codec.check_datatype(datatype, name=name)
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input '{name}': binary_data_size {size} runs past the end of the body")
            data = codec.decode_raw(binary[offset : offset + size], datatype, shape, name=name)
            offset += size
        else:
            data = _json_data(item, name, datatype, shape)
        inputs.append(InferInput(name, datatype, shape, data, dict(params) if isinstance(params, dict) else {}))
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return inputs


def parse_outputs(header: dict[str, Any]) -> list[RequestedOutput] | None:
    items = header.get("outputs")
    if items is None:
        return None
    if not isinstance(items, list):
        raise InvalidInput("'outputs' must be a list")
    outputs = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("each requested output needs a 'name'")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"output '{item['name']}': 'parameters' must be an object")
        outputs.append(RequestedOutput(item["name"], rules.classification(params, item["name"]), dict(params)))
    return outputs


def _wants_binary(output: InferOutput, default: bool) -> bool:
    return bool(output.parameters.get("binary_data", default))


def encode_response(response: InferResponse, binary_default: bool) -> Response:
    """JSON, or JSON header + binary outputs when the client asked for binary data."""
    blobs: list[bytes] = []
    outputs = []
    for out in response.outputs:
        item: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if _wants_binary(out, binary_default):
            raw = codec.encode_raw(out.data, out.datatype)
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif out.datatype == "BYTES":
            item["data"] = [x.decode("utf-8", "replace") for x in out.data]
        else:
            item["data"] = np.asarray(out.data).reshape(-1).tolist()
        outputs.append(item)
    body = {"model_name": response.model, "model_version": response.version, "id": response.id, "outputs": outputs}
    if not blobs:
        return JSONResponse(body)
    header = json.dumps(body).encode()
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def build_router(plane: DataPlane) -> APIRouter:
    router = APIRouter()

    @router.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return asdict(plane.server_metadata())

    @router.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200 if await plane.live() else 503)

    @router.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if await plane.ready() else 503)

    _add_model_list(router, plane)

    @router.get("/v2/models/{model}")
    async def model_metadata(model: str) -> dict[str, Any]:
        return _metadata_json(await plane.model_metadata(model))

    @router.get("/v2/models/{model}/versions/{version}")
    async def version_metadata(model: str, version: str) -> dict[str, Any]:
        return _metadata_json(await plane.model_metadata(model, version))

    @router.get("/v2/models/{model}/ready")
    async def model_ready(model: str) -> Response:
        return _ready_response(await plane.model_ready(model))

    @router.get("/v2/models/{model}/versions/{version}/ready")
    async def version_ready(model: str, version: str) -> Response:
        return _ready_response(await plane.model_ready(model, version))

    @router.post("/v2/models/{model}/infer", openapi_extra=INFER_BODY)
    async def infer(model: str, request: Request) -> Response:
        return await _infer(plane, request, model, None)

    @router.post("/v2/models/{model}/versions/{version}/infer", openapi_extra=INFER_BODY)
    async def infer_version(model: str, version: str, request: Request) -> Response:
        return await _infer(plane, request, model, version)

    return router


def _add_model_list(router: APIRouter, plane: DataPlane) -> None:
    @router.get("/v2/models")
    async def model_names(request: Request) -> dict[str, list[str]]:
        """KServe's list of models: every model the server knows, in any state (the page at / starts here);
        behind the inference token when one is set, so names cannot be listed without it."""
        plane.check_inference_token(bearer_token(request))
        return {"models": sorted({row.name for row in await plane.repository_index()})}


def _ready_response(ready: bool) -> Response:
    if not ready:
        raise ModelNotReady("model is not ready")
    return Response(status_code=200)


def _metadata_json(meta: Any) -> dict[str, Any]:
    data: dict[str, Any] = asdict(meta)
    if not data["ready"]:
        data["state"] = {"ready": False, "reason": data["reason"]}
    return data


async def _infer(plane: DataPlane, request: Request, model: str, version: str | None) -> Response:
    plane.check_inference_token(bearer_token(request))
    plane.check_admission(model, version, protocol="http_v2")  # a flood is refused before its body is read
    body = await read_body(request, plane.settings.max_payload_bytes)
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    infer_request = InferRequest(
        model=model,
        version=version,
        id=str(header.get("id", "")),
        inputs=parse_inputs(header, binary),
        outputs=parse_outputs(header),
        parameters=params,
        deadline=request_deadline(request, params, plane.settings.request_timeout_s),
        protocol="http_v2",
    )
    response = await plane.infer(infer_request)
    return encode_response(response, binary_default=bool(params.get("binary_data_output", False)))
