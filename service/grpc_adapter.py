"""gRPC adapters over the data plane: Open Inference Protocol v2 and TorchServe's inference API.

Thin: each RPC converts its message to ``service.types``, calls the :class:`DataPlane` and converts
the answer back. Errors are mapped in one place (:func:`_rpc`): a ``ServiceError`` becomes its
``grpc_code`` with its message; anything else is logged with its traceback and answered INTERNAL.

    server = grpc.aio.server()
    add_servicers(server, plane, default_timeout_s=settings.request_timeout_s)
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from service import codec, protos, rules
from service.errors import InvalidInput, ServiceError
from service.types import InferInput, InferRequest, InferResponse, RequestedOutput

if TYPE_CHECKING:
    from service.dataplane import DataPlane

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal server error (logged on the server)"

# the InferTensorContents list that carries each datatype; FP16 travels only as raw bytes
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# trailing metadata of a RESOURCE_EXHAUSTED answer that may be retried: gRPC's own retry pushback (gRFC A6),
# which a client's retry policy honours, in milliseconds
RETRY_PUSHBACK = "grpc-retry-pushback-ms"

S = TypeVar("S")
R = TypeVar("R")


def add_servicers(server: Any, dataplane: DataPlane, *, default_timeout_s: float = 0.0) -> None:
    """Register both services on a ``grpc.aio.Server``; requests without a deadline get ``default_timeout_s``."""
    v2, torchserve = protos.load_v2(), protos.load_torchserve()
    v2.services.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(dataplane, v2.messages, default_timeout_s=default_timeout_s), server
    )
    torchserve.services.add_InferenceAPIsServiceServicer_to_server(
        TorchServeServicer(dataplane, torchserve.messages, default_timeout_s=default_timeout_s), server
    )


# ---- shared: errors, tokens, deadlines ----------------------------------------------------------


def _rpc(handler: Callable[[S, Any, Any], Awaitable[R]]) -> Callable[[S, Any, Any], Awaitable[R]]:
    """Map ServiceError to its status code and anything else to INTERNAL (logged, never sent)."""

    @functools.wraps(handler)
    async def wrapper(self: S, request: Any, context: Any) -> R:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except ServiceError as exc:
            code, message = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL), exc.message
            trailers = retry_metadata(exc)
        except Exception:
            request_id = getattr(request, "id", "")  # ModelInferRequest.id, when the client set one
            logger.exception("gRPC %s from %s failed (request id %r)", handler.__name__, context.peer(), request_id)
            code, message, trailers = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, ()
        await context.abort(code, message, trailing_metadata=trailers)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and (token := rules.bearer(value)) is not None:
            return token
    return None


def retry_metadata(exc: ServiceError) -> tuple[tuple[str, str], ...]:
    """``grpc-retry-pushback-ms`` for an error that says when to retry (a full queue), else nothing."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is None:
        return ()
    return ((RETRY_PUSHBACK, str(int(retry_after_s * 1000))),)


def _metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name.lower() == key and isinstance(value, str):
            return value
    return None


def request_deadline(context: Any, parameters: Mapping[str, Any], default_s: float = 0.0) -> float | None:
    """Absolute ``time.monotonic()`` deadline (see :func:`service.rules.deadline`): the earliest of the gRPC
    deadline, the v2 ``timeout`` parameter (µs) and ``x-request-timeout-ms`` metadata; else ``default_s``."""
    return rules.deadline(
        parameters=parameters,
        header=_metadata_value(context.invocation_metadata(), rules.TIMEOUT_HEADER.lower()),
        transport_s=context.time_remaining(),
        default_s=default_s,
    )


def _optional(version: str) -> str | None:
    return version or None


# ---- v2 parameters and tensors -----------------------------------------------------------------


def parameters_from_proto(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """map<string, InferParameter> -> plain values (unset parameters are left out)."""
    values = {}
    for key, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        if which is not None:
            values[key] = getattr(parameter, which)
    return values


def parameters_to_proto(target: Any, values: Mapping[str, Any]) -> None:
    """Plain values -> a map<string, InferParameter> field (anything else is sent as its string)."""
    for key, item in values.items():
        parameter = target[key]
        value = item.item() if isinstance(item, np.generic) else item
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int) and value >= 2**63:
            parameter.uint64_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = value if isinstance(value, str) else json.dumps(value, default=str)


def _typed_contents(tensor: Any) -> list[Any]:
    name, datatype = tensor.name, tensor.datatype
    codec.check_datatype(datatype, name=name)
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} has no typed contents; send it in raw_input_contents")
    return list(getattr(tensor.contents, field))


def input_from_proto(tensor: Any, raw: bytes | None) -> InferInput:
    """One ``InferInputTensor`` (and its raw bytes, when the request uses raw_input_contents)."""
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    if not name:
        raise InvalidInput("every input needs a name")
    if raw is not None:
        if tensor.HasField("contents") and tensor.contents.ByteSize() > 0:
            raise InvalidInput(f"input '{name}': data in both contents and raw_input_contents")
        data = codec.decode_raw(raw, datatype, shape, name=name)
    else:
        data = codec.from_values(_typed_contents(tensor), datatype, shape, name=name)
    return InferInput(name, datatype, shape, data, parameters_from_proto(tensor.parameters))


def requested_output_from_proto(tensor: Any) -> RequestedOutput:
    parameters = parameters_from_proto(tensor.parameters)
    return RequestedOutput(tensor.name, rules.classification(parameters, tensor.name), parameters)


def infer_request_from_proto(request: Any, *, deadline: float | None) -> InferRequest:
    """``ModelInferRequest`` -> :class:`InferRequest`."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input")
    return InferRequest(
        model=request.model_name,
        version=_optional(request.model_version),
        id=request.id,
        inputs=[input_from_proto(tensor, raw[i] if raw else None) for i, tensor in enumerate(request.inputs)],
        outputs=[requested_output_from_proto(tensor) for tensor in request.outputs] or None,
        parameters=parameters_from_proto(request.parameters),
        deadline=deadline,
        protocol="grpc_v2",
    )


def infer_response_to_proto(response: InferResponse, messages: Any) -> Any:
    """:class:`InferResponse` -> ``ModelInferResponse``, every output in raw_output_contents."""
    message = messages.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    parameters_to_proto(message.parameters, response.parameters)
    for output in response.outputs:
        tensor = message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        parameters_to_proto(tensor.parameters, output.parameters)
        message.raw_output_contents.append(codec.encode_raw(output.data, output.datatype))
    return message


# ---- Open Inference Protocol v2 -----------------------------------------------------------------


class InferenceServicer:
    """``inference.GRPCInferenceService`` (registered by duck typing, not by subclassing generated code)."""

    def __init__(self, dataplane: DataPlane, messages: Any, *, default_timeout_s: float = 0.0) -> None:
        self.dataplane = dataplane
        self.messages = messages
        self.default_timeout_s = default_timeout_s

    @_rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return self.messages.ServerLiveResponse(live=await self.dataplane.live())

    @_rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return self.messages.ServerReadyResponse(ready=await self.dataplane.ready())

    @_rpc
    async def ModelReady(self, request: Any, context: Any) -> Any:
        ready = await self.dataplane.model_ready(request.name, _optional(request.version))
        return self.messages.ModelReadyResponse(ready=ready)

    @_rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        meta = self.dataplane.server_metadata()
        return self.messages.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        meta = await self.dataplane.model_metadata(request.name, _optional(request.version))
        tensor = self.messages.ModelMetadataResponse.TensorMetadata
        return self.messages.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    @_rpc
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        self.dataplane.check_inference_token(bearer_token(context.invocation_metadata()))
        parameters = parameters_from_proto(request.parameters)
        deadline = request_deadline(context, parameters, self.default_timeout_s)
        response = await self.dataplane.infer(infer_request_from_proto(request, deadline=deadline))
        return infer_response_to_proto(response, self.messages)

    @_rpc
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        self.dataplane.check_management_token(bearer_token(context.invocation_metadata()))
        rows = await self.dataplane.repository_index()
        index = self.messages.RepositoryIndexResponse.ModelIndex
        return self.messages.RepositoryIndexResponse(
            models=[
                index(name=row.name, version=row.version, state=row.state, reason=row.reason)
                for row in rows
                if row.state == "READY" or not request.ready
            ]
        )

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        self.dataplane.check_management_token(bearer_token(context.invocation_metadata()))
        if request.parameters:
            raise InvalidInput("load parameters (config or file overrides) are not supported")
        await self.dataplane.load_model(request.model_name)
        return self.messages.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        self.dataplane.check_management_token(bearer_token(context.invocation_metadata()))
        await self.dataplane.unload_model(request.model_name)
        return self.messages.RepositoryModelUnloadResponse()


# ---- TorchServe --------------------------------------------------------------------------------


def torchserve_json(value: Any) -> bytes:
    """JSON the way TorchServe writes it (two-space indent)."""
    return json.dumps(value, indent=2).encode("utf-8")


class TorchServeServicer:
    """``org.pytorch.serve.grpc.inference.InferenceAPIsService``."""

    def __init__(self, dataplane: DataPlane, messages: Any, *, default_timeout_s: float = 0.0) -> None:
        self.dataplane = dataplane
        self.messages = messages
        self.default_timeout_s = default_timeout_s

    @_rpc
    async def Ping(self, request: Any, context: Any) -> Any:
        status = "Healthy" if await self.dataplane.ready() else "Unhealthy"
        return self.messages.TorchServeHealthResponse(health=torchserve_json({"status": status}).decode())

    @_rpc
    async def Predictions(self, request: Any, context: Any) -> Any:
        return await self._predict(request, context, "grpc_torchserve")

    @_rpc
    async def StreamPredictions(self, request: Any, context: Any) -> None:
        await context.write(await self._predict(request, context, "grpc_torchserve"))

    @_rpc
    async def StreamPredictions2(self, requests: AsyncIterator[Any], context: Any) -> None:
        """One answer per request; a failed request is answered in-band (``status``), the stream goes on."""
        async for request in requests:
            try:
                response = await self._predict(request, context, "grpc_torchserve")
            except ServiceError as exc:
                code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
                response = self.messages.PredictionResponse(status={"code": code.value[0], "message": exc.message})
            if request.HasField("sequence_id"):
                response.sequence_id = request.sequence_id
            await context.write(response)

    async def _predict(self, request: Any, context: Any, protocol: str) -> Any:
        self.dataplane.check_inference_token(bearer_token(context.invocation_metadata()))
        if not request.model_name:
            raise InvalidInput("model_name is required")
        _, image = rules.image_field(request.input)
        deadline = request_deadline(context, {}, self.default_timeout_s)
        answers = await self.dataplane.predict_images(
            request.model_name, _optional(request.model_version), [image], protocol=protocol, deadline=deadline
        )
        return self.messages.PredictionResponse(prediction=torchserve_json(answers[0]))
