"""The load generator's own HTTP/1.1 clients against a real loopback server: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
import socketserver
import threading
from collections.abc import Awaitable, Callable
from typing import BinaryIO

import pytest

from bench.clients import BlockingTransport, Endpoint, LeanTransport, _ResponseParser, http_transport


def test_parser_assembles_an_answer_fed_byte_by_byte() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Thing: a:b\r\n\r\nhello"
    parser = _ResponseParser()
    answers = [parser.feed(raw[i : i + 1]) for i in range(len(raw))]
    assert answers[:-1] == [None] * (len(raw) - 1)
    last = answers[-1]
    assert last is not None and (last.status, last.body, last.headers["x-thing"]) == (200, b"hello", "a:b")


def test_parser_dechunks_and_keeps_what_follows_for_the_next_answer() -> None:
    parser = _ResponseParser()
    chunked = b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n4;x=1\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"
    assert parser.feed(chunked[:-3]) is None
    answer = parser.feed(chunked[-3:])
    assert answer is not None and (answer.status, answer.body) == (503, b"abcdef")
    empty = parser.feed(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    assert empty is not None and (empty.status, empty.body) == (204, b"")


class _Server:
    """A loopback HTTP/1.1 server in its own threads (the blocking client holds the test's event loop).

    It answers with the path, body length and X-Test header; chunked on odd requests, Content-Length
    on even ones; ``X-Test: close`` asks for Connection: close, ``X-Test: drop`` hangs up without answering.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with server._lock:
                    server.connections += 1
                while server.answer(self.rfile, self.wfile):
                    pass

        self._tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._tcp.daemon_threads = True
        self.port = self._tcp.server_address[1]
        threading.Thread(target=self._tcp.serve_forever, args=(0.02,), daemon=True).start()

    def answer(self, rfile: BinaryIO, wfile: BinaryIO) -> bool:
        """Answer one request; False when the connection is to end."""
        request_line = rfile.readline().decode("latin-1").strip()
        if not request_line:
            return False
        headers = {}
        while (line := rfile.readline().decode("latin-1").strip()) != "":
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = rfile.read(int(headers["content-length"]))
        test = headers.get("x-test", "")
        if test == "drop":
            return False
        with self._lock:
            self.requests += 1
            number = self.requests
        text = f"{request_line.split()[1]} {len(body)} {test}".encode()
        if number % 2:
            wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            wfile.write(f"{len(text):x}\r\n".encode() + text + b"\r\n0\r\n\r\n")
        else:
            close = b"Connection: close\r\n" if test == "close" else b""
            wfile.write(b"HTTP/1.1 200 OK\r\n" + close + f"Content-Length: {len(text)}\r\n\r\n".encode() + text)
        wfile.flush()
        return test != "close"

    def stop(self) -> None:
        self._tcp.shutdown()
        self._tcp.server_close()


def _run(test: Callable[[Endpoint], Awaitable[None]]) -> _Server:
    """Run ``test`` against a fresh server on a free loopback port; returns the server's tally."""
    state = _Server()
    try:
        asyncio.run(test(Endpoint(http_port=state.port, grpc_port=0)))
    finally:
        state.stop()
    return state


@pytest.mark.parametrize("kind", ["lean", "blocking"])
def test_keep_alive_chunked_and_plain_answers(kind: str) -> None:
    async def test(endpoint: Endpoint) -> None:
        transport = http_transport(kind, endpoint, 1)
        try:
            for i in range(4):
                answer = await transport.post(f"/p{i}", b"x" * (1000 * i), {"X-Test": str(i)})
                assert (answer.status, answer.body) == (200, f"/p{i} {1000 * i} {i}".encode())
        finally:
            await transport.aclose()

    state = _run(test)
    assert (state.requests, state.connections) == (4, 1)


@pytest.mark.parametrize("kind", ["lean", "blocking"])
def test_server_closing_is_followed_by_a_new_connection(kind: str) -> None:
    async def test(endpoint: Endpoint) -> None:
        transport = http_transport(kind, endpoint, 1)
        try:
            await transport.post("/a", b"", {})
            assert (await transport.post("/b", b"", {"X-Test": "close"})).body == b"/b 0 close"  # Connection: close
            assert (await transport.post("/c", b"", {})).status == 200
        finally:
            await transport.aclose()

    assert _run(test).connections == 2


@pytest.mark.parametrize("kind", ["lean", "blocking"])
def test_a_connection_dropped_before_the_answer_fails_the_request(kind: str) -> None:
    async def test(endpoint: Endpoint) -> None:
        transport = http_transport(kind, endpoint, 1)
        try:
            await transport.post("/a", b"", {})
            with pytest.raises(ConnectionError):
                await transport.post("/b", b"", {"X-Test": "drop"})
            assert (await transport.post("/c", b"", {})).body == b"/c 0 "  # the next one reconnects
        finally:
            await transport.aclose()

    assert _run(test).connections == 2


def test_lean_transport_runs_requests_concurrently_on_as_many_connections() -> None:
    async def test(endpoint: Endpoint) -> None:
        transport = LeanTransport(endpoint, 3)
        try:
            answers = await asyncio.gather(*(transport.post(f"/{i}", b"", {}) for i in range(12)))
        finally:
            await transport.aclose()
        assert sorted(a.body for a in answers) == sorted(f"/{i} 0 ".encode() for i in range(12))

    assert 1 < _run(test).connections <= 3


def test_blocking_transport_refuses_concurrency() -> None:
    with pytest.raises(ValueError, match="one request at a time"):
        BlockingTransport(Endpoint(http_port=1, grpc_port=0), 8)
