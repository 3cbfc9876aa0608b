"""A cap on the gRPC calls in progress that counts what it refuses.

grpc's own ``maximum_concurrent_rpcs`` refuses calls over the cap with RESOURCE_EXHAUSTED before any
interceptor runs, so nothing on the server sees them: an operator could not tell a cap being hit from
clients that are simply slow. This interceptor applies the same cap itself, in front of every method
(unary or streaming: a stream counts as one call for its whole life), and counts each refusal in
``inference_connections_refused_total{protocol="grpc",reason="max_concurrent_rpcs"}``.

    server = grpc.aio.server(interceptors=[ConcurrentRpcCap(1000)])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service import metrics

REASON = "max_concurrent_rpcs"
_BUILDERS = {  # RpcMethodHandler field -> the grpc function that builds a handler of that kind
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class ConcurrentRpcCap(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """At most ``limit`` calls in progress; beyond it RESOURCE_EXHAUSTED, counted (see the module)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.active = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        for kind, build in _BUILDERS.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                return build(
                    self._capped(behavior),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _capped(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def capped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.active >= self.limit:
                metrics.CONNECTIONS_REFUSED.labels("grpc", REASON).inc()
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server has {self.active} calls in progress, its limit "
                    "(--grpc-max-concurrent-rpcs); retry later",
                )
            self.active += 1
            try:
                return await behavior(request, context)
            finally:
                self.active -= 1

        return capped
