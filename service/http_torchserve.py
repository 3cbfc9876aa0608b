"""TorchServe's inference API over HTTP, for users migrating off TorchServe.

``POST /predictions/{model}[/{version}]`` with the image as the raw body (or a multipart field)
answers ``{"label": probability, ...}`` like TorchServe's image classifier; ``GET /ping``.
``POST /explanations/{model}[/{version}]`` answers the Grad-CAM heatmap of the predicted class (or of
``?label=<name>``) as a grayscale PNG, or as a JSON array of rows in [0, 1] with ``?format=json`` (or
``Accept: application/json``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Message, Receive

from service import rules
from service.dataplane import DataPlane
from service.errors import InvalidInput
from service.explain import heatmap_png
from service.http_common import bearer_token, read_body, request_deadline

MULTIPART = "multipart/form-data"
# the routes read the raw request, so FastAPI cannot infer this: say it in the OpenAPI description
IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            MULTIPART: {"schema": {"type": "object", "properties": {"data": {"type": "string", "format": "binary"}}}},
        },
    }
}


async def image_from_request(request: Request, limit: int) -> bytes:
    """The raw body, or the multipart field the image rule names (:func:`service.rules.image_field`)."""
    body = await read_body(request, limit)  # capped while it streams, multipart or not
    if not request.headers.get("content-type", "").startswith(MULTIPART):
        return body
    async with Request(request.scope, _replay(body)).form() as form:  # closes the upload's temp files
        _, chosen = rules.image_field(dict(form.multi_items()))
        if isinstance(chosen, str):
            return _field_bytes(chosen)
        data: bytes = await chosen.read()
    return data


def _replay(body: bytes) -> Receive:
    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _field_bytes(text: str) -> bytes:
    """Undo Starlette's decoding of a form field: UTF-8 when the bytes were valid UTF-8, else latin-1."""
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    return text.encode("utf-8")


def build_router(plane: DataPlane) -> APIRouter:
    router = APIRouter()

    @router.get("/ping")
    async def ping() -> JSONResponse:
        healthy = await plane.ready()
        return JSONResponse({"status": "Healthy" if healthy else "Unhealthy"}, status_code=200 if healthy else 500)

    # TorchServe's docs use `curl -T image.jpg`, which sends PUT: accept both
    @router.api_route("/predictions/{model}", methods=["POST", "PUT"], openapi_extra=IMAGE_BODY)
    async def predictions(model: str, request: Request) -> JSONResponse:
        return await _predict(plane, request, model, None)

    @router.api_route("/predictions/{model}/{version}", methods=["POST", "PUT"], openapi_extra=IMAGE_BODY)
    async def predictions_version(model: str, version: str, request: Request) -> JSONResponse:
        return await _predict(plane, request, model, version)

    @router.post("/explanations/{model}")
    async def explanations(model: str, request: Request) -> Response:
        return await _explain(plane, request, model, None)

    @router.post("/explanations/{model}/{version}")
    async def explanations_version(model: str, version: str, request: Request) -> Response:
        return await _explain(plane, request, model, version)

    return router


async def _explain(plane: DataPlane, request: Request, model: str, version: str | None) -> Response:
    plane.check_inference_token(bearer_token(request))
    wanted = request.query_params.get("format") or (
        "json" if "application/json" in request.headers.get("accept", "") else "png"
    )
    if wanted not in ("png", "json"):
        raise InvalidInput(f"format={wanted!r}: choose png (default) or json")
    image = await image_from_request(request, plane.settings.max_payload_bytes)
    heatmap = await plane.explain(model, version, image, request.query_params.get("label"))
    if wanted == "json":
        return JSONResponse(heatmap.round(4).tolist())
    return Response(heatmap_png(heatmap), media_type="image/png")


async def _predict(plane: DataPlane, request: Request, model: str, version: str | None) -> JSONResponse:
    plane.check_inference_token(bearer_token(request))
    plane.check_admission(model, version, protocol="http_torchserve")  # a flood is refused before its body is read
    image = await image_from_request(request, plane.settings.max_payload_bytes)
    deadline = request_deadline(request, {}, plane.settings.request_timeout_s)
    answers = await plane.predict_images(model, version, [image], protocol="http_torchserve", deadline=deadline)
    return JSONResponse(answers[0])  # built directly: FastAPI's generic encoder costs more than the answer
