"""The gRPC concurrent-call cap on a real grpc.aio server on loopback: refusals beyond it, counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from service import metrics
from service.grpc_limits import REASON, ConcurrentRpcCap


def _refused() -> float:
    labels = {"protocol": "grpc", "reason": REASON}
    return metrics.REGISTRY.get_sample_value("inference_connections_refused_total", labels) or 0.0


def _same(data: bytes) -> bytes:
    return data


def test_calls_beyond_the_cap_are_refused_and_counted_and_the_cap_frees_as_calls_end() -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def hold(request: bytes, context: Any) -> bytes:
            await release.wait()
            return request

        async def echo_stream(requests: AsyncIterator[bytes], context: Any) -> None:
            async for request in requests:
                await context.write(request)

        handlers = {
            "Hold": grpc.unary_unary_rpc_method_handler(hold, _same, _same),
            "Echo": grpc.stream_stream_rpc_method_handler(echo_stream, _same, _same),
        }
        cap = ConcurrentRpcCap(2)
        server = grpc.aio.server(interceptors=[cap])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        before = _refused()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/t.T/Hold", _same, _same)
                stream = channel.stream_stream("/t.T/Echo", _same, _same)
                held = [asyncio.ensure_future(call(b"a")), asyncio.ensure_future(call(b"b"))]
                while cap.active < 2:  # both in progress: the cap is full
                    await asyncio.sleep(0.01)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(b"c")
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "2 calls in progress" in (caught.value.details() or "")
                echo = stream()
                with pytest.raises(grpc.aio.AioRpcError) as refused_stream:
                    await echo.write(b"x")
                    await echo.read()
                assert refused_stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert _refused() == before + 2
                release.set()
                assert await asyncio.gather(*held) == [b"a", b"b"]
                echo = stream()  # room again: a stream is one call for its whole life
                await echo.write(b"y")
                assert await echo.read() == b"y"
                await echo.done_writing()
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_the_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConcurrentRpcCap(0)
