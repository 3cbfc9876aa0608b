"""The HTTP connection limits on a real uvicorn server on loopback, with raw sockets as clients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import uvicorn

from service import metrics
from service.http_gate import Refusal
from service.http_limits import HttpLimits, protocol_class

LIMITS = HttpLimits(max_connections=3, header_timeout_s=0.3, body_timeout_s=0.4)
GET = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"


SEEN: list[str] = []  # paths the application was asked to answer
PAUSE_S = 0.3


class RefuseFull:
    """A gate that refuses every request to ``/full`` with a 429 and a pause."""

    def __call__(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> Refusal | None:
        if path != "/full":
            return None
        return Refusal(429, ((b"retry-after", b"1"),), b'{"error":"full"}', PAUSE_S)


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    SEEN.append(scope["path"])
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.asynccontextmanager
async def _server() -> AsyncIterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    http = protocol_class(LIMITS, RefuseFull())
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, http=http, log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def _first_line(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    return (await asyncio.wait_for(reader.readline(), timeout)).strip()


def _count(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "inference_connections_refused_total", {"protocol": "http", "reason": reason}
    )
    return value or 0.0


def test_a_request_is_answered_and_a_slow_head_gets_408() -> None:
    async def scenario() -> None:
        before = _count("header_timeout")
        async with _server() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET)
            assert await _first_line(reader) == b"HTTP/1.1 200 OK"
            await reader.readuntil(b"ok")
            writer.write(b"GET / HTTP/1.1\r\nhost")  # the next request's head never ends
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await _first_line(reader) == b"HTTP/1.1 408 Request Timeout"
            await asyncio.wait_for(reader.read(), 3.0)  # then closed
            assert 0.2 <= loop.time() - started < 2.0
            writer.close()
        assert _count("header_timeout") == before + 1

    asyncio.run(scenario())


def test_a_slow_body_is_closed() -> None:
    async def scenario() -> None:
        before = _count("body_timeout")
        async with _server() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\nabc")
            assert await asyncio.wait_for(reader.read(), 3.0) == b""
            writer.close()
        assert _count("body_timeout") == before + 1

    asyncio.run(scenario())


def test_connections_beyond_the_cap_are_refused_with_503() -> None:
    extra = 2

    async def scenario() -> None:
        before = _count("max_connections")
        async with _server() as port:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(LIMITS.max_connections)]
            await asyncio.sleep(0.05)
            for _ in range(extra):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert await _first_line(reader, timeout=0.2) == b"HTTP/1.1 503 Service Unavailable"
                writer.close()
            reader, writer = held[0]
            writer.write(GET)  # those already open are served
            assert await _first_line(reader) == b"HTTP/1.1 200 OK"
            for _, writer in held:
                writer.close()
        assert _count("max_connections") == before + extra

    asyncio.run(scenario())


def test_a_gate_refusal_is_written_from_the_head_and_the_connection_paced_then_kept() -> None:
    async def scenario() -> None:
        async with _server() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            loop = asyncio.get_running_loop()
            SEEN.clear()
            writer.write(b"POST /full HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello")
            assert await _first_line(reader) == b"HTTP/1.1 429 Too Many Requests"
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3.0)
            assert b"retry-after: 1" in head and b"content-length: 16" in head
            assert await reader.readexactly(16) == b'{"error":"full"}'
            writer.write(GET)  # retried at once, on the same connection
            started = loop.time()
            assert await _first_line(reader) == b"HTTP/1.1 200 OK"  # the body was dropped, the connection kept
            await reader.readuntil(b"ok")
            assert loop.time() - started >= PAUSE_S * 0.9  # the next request waited unread
            assert SEEN == ["/"]  # the application never saw the refused request
            writer.close()

    asyncio.run(scenario())


def test_a_request_waiting_for_100_continue_goes_to_the_application() -> None:
    async def scenario() -> None:
        async with _server() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            SEEN.clear()
            writer.write(b"POST /full HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
            assert await _first_line(reader) == b"HTTP/1.1 100 Continue"
            assert await _first_line(reader) == b""
            writer.write(b"hi")
            assert await _first_line(reader) == b"HTTP/1.1 200 OK"
            assert SEEN == ["/full"]
            writer.close()

    asyncio.run(scenario())
