"""The HTTP application: v2 and TorchServe routes, management, /metrics, the page at /, and the one error mapping."""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import http_torchserve, http_ui, http_v2, metrics
from service.dataplane import DataPlane
from service.errors import QueueFull, ServiceError
from service.http_common import bearer_token
from service.http_gate import error_payload
from service.versions import parse_pin

logger = logging.getLogger(__name__)


def error_response(request: Request, status: int, message: str, kind: str) -> JSONResponse:
    """v2 routes answer {"error": ...}; TorchServe routes answer TorchServe's {code, type, message}."""
    return JSONResponse(error_payload(request.url.path, status, message, kind), status_code=status)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    response = error_response(request, exc.http_status, exc.message, type(exc).__name__)
    if isinstance(exc, QueueFull):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, 400, f"invalid request: {exc}", "InvalidInput")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(request, exc.status_code, str(exc.detail), "HTTPException")


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client closed the connection (or was closed by the body timeout) before its body was complete:
    nobody reads an answer; counted as a timeout where one fired (http_limits), logged only at DEBUG."""
    logger.debug("client left before its request body was complete: %s %s", request.method, request.url.path)
    return error_response(
        request, 400, "the connection closed before the request body was complete", "ClientDisconnect"
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = uuid.uuid4().hex[:12]
    logger.error("request %s %s failed (id %s)", request.method, request.url.path, request_id, exc_info=exc)
    return error_response(request, 500, f"internal server error (request id {request_id})", "InternalServerError")


def management_router(plane: DataPlane) -> APIRouter:
    """Triton's model repository extension; off unless enabled, and then behind a token."""
    router = APIRouter()

    @router.post("/v2/repository/index")
    async def index(request: Request) -> list[dict[str, Any]]:
        plane.check_management_token(bearer_token(request))
        return [asdict(row) for row in await plane.repository_index()]

    @router.post("/v2/repository/models/{model}/load")
    async def load(model: str, request: Request) -> Response:
        plane.check_management_token(bearer_token(request))
        await plane.load_model(model)
        return Response(status_code=200)

    @router.post("/v2/repository/models/{model}/unload")
    async def unload(model: str, request: Request) -> Response:
        plane.check_management_token(bearer_token(request))
        await plane.unload_model(model)
        return Response(status_code=200)

    @router.post("/v2/repository/models/{model}/default")
    async def pin_default(model: str, request: Request) -> dict[str, str]:
        """Body ``{"version": "2"}`` pins the default version; ``{"version": null}`` unpins."""
        plane.check_management_token(bearer_token(request))
        return await plane.set_default_version(model, parse_pin(await request.body()))

    return router


def create_app(plane: DataPlane, *, metrics_route: bool = True) -> FastAPI:
    app = FastAPI(title="imgclf inference server", version="0.1.0")
    app.include_router(http_v2.build_router(plane))
    app.include_router(http_torchserve.build_router(plane))
    app.include_router(management_router(plane))
    if plane.settings.ui:
        app.include_router(http_ui.build_router(plane))
    if metrics_route:

        @app.get("/metrics")
        async def prometheus() -> Response:
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected_error)
    return app
