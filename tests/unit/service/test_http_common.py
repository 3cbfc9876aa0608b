"""What both HTTP adapters share: the bearer token, the bounded body (drained past the limit), the deadline.

No app and no model: Starlette ``Request`` objects are built from bare ASGI scopes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import pytest
from starlette.requests import Request

from service import http_common
from service.errors import InvalidInput, PayloadTooLarge
from service.http_common import bearer_token, read_body, request_deadline


class Body:
    """The ASGI ``receive`` of a request whose body arrives in ``chunks``; counts what was read."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.messages: list[dict[str, Any]] = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        self.messages.append({"type": "http.request", "body": b"", "more_body": False})
        self.read = 0

    async def __call__(self) -> dict[str, Any]:
        message = self.messages.pop(0)
        self.read += len(message["body"])
        return message


def _request(headers: dict[str, str] | None = None, chunks: Iterable[bytes] = (), body: Body | None = None) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/m/infer",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    return Request(scope, body or Body(chunks))


# ---- request_deadline -------------------------------------------------------------------------
def _seconds_left(deadline: float | None) -> float:
    assert deadline is not None
    return deadline - time.monotonic()


def test_the_earliest_of_the_parameter_and_the_header_wins() -> None:
    header = _request({"X-Request-Timeout-Ms": "250"})
    assert 0.1 < _seconds_left(request_deadline(header, {"timeout": 2_000_000}, 9.0)) <= 0.25
    assert 1.5 < _seconds_left(request_deadline(_request({"X-Request-Timeout-Ms": "5000"}), {"timeout": 2e6}, 9.0)) <= 2


def test_the_timeout_header_is_in_milliseconds() -> None:
    assert 0.1 < _seconds_left(request_deadline(_request({"X-Request-Timeout-Ms": "250.5"}), {}, 9.0)) <= 0.2505


def test_the_default_applies_only_when_the_request_has_no_timeout() -> None:
    assert 2.5 < _seconds_left(request_deadline(_request(), {}, 3.0)) <= 3.0
    assert 5.5 < _seconds_left(request_deadline(_request(), {"timeout": "6000000"}, 3.0)) <= 6.0  # longer: honoured
    assert request_deadline(_request(), {}, 0.0) is None
    assert request_deadline(_request(), {"other": 1}, 0.0) is None


@pytest.mark.parametrize(
    ("headers", "parameters", "message"),
    [
        ({}, {"timeout": "soon"}, "parameter 'timeout' must be a positive number of microseconds"),
        ({}, {"timeout": None}, "parameter 'timeout'"),
        ({}, {"timeout": [1]}, "parameter 'timeout'"),
        ({}, {"timeout": True}, "parameter 'timeout'"),
        ({}, {"timeout": "NaN"}, "parameter 'timeout'"),
        ({}, {"timeout": 0}, "parameter 'timeout'"),
        ({}, {"timeout": -5}, r"\(got -5\)"),
        ({"X-Request-Timeout-Ms": "abc"}, {}, "header X-Request-Timeout-Ms must be a positive number of milliseconds"),
        ({"X-Request-Timeout-Ms": "-1"}, {}, "header X-Request-Timeout-Ms"),
        ({"X-Request-Timeout-Ms": "0"}, {}, "header X-Request-Timeout-Ms"),
        ({"X-Request-Timeout-Ms": "nan"}, {}, "header X-Request-Timeout-Ms"),
        ({"X-Request-Timeout-Ms": "inf"}, {}, "header X-Request-Timeout-Ms"),
        ({"X-Request-Timeout-Ms": "abc"}, {"timeout": 5}, "header"),  # checked even when another limit is given
    ],
)
def test_invalid_timeouts(headers: dict[str, str], parameters: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=f"invalid timeout: .*{message}"):
        request_deadline(_request(headers), parameters, 3.0)


# ---- bearer_token -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER x.y", "x.y"), ("Basic abc", None), (None, None)],
)
def test_bearer_token(value: str | None, token: str | None) -> None:
    assert bearer_token(_request({} if value is None else {"Authorization": value})) == token


# ---- read_body --------------------------------------------------------------------------------
def test_read_body_joins_the_chunks_under_the_limit() -> None:
    assert asyncio.run(read_body(_request(chunks=[b"ab", b"cd"]), 4)) == b"abcd"


def test_a_declared_length_over_the_limit_is_refused_after_the_body_is_drained() -> None:
    body = Body([b"abc", b"de"])
    with pytest.raises(PayloadTooLarge, match="request body of 5 bytes is over the limit of 4"):
        asyncio.run(read_body(_request({"Content-Length": "5"}, body=body), 4))
    assert body.read == 5 and not body.messages  # read to its end: the client gets to read the 413


def test_a_stream_that_grows_past_the_limit_is_refused_after_the_body_is_drained() -> None:
    body = Body([b"abc", b"de", b"fgh"])  # no Content-Length: chunked
    with pytest.raises(PayloadTooLarge, match="request body is over the limit of 4 bytes"):
        asyncio.run(read_body(_request(body=body), 4))
    assert body.read == 8 and not body.messages


def test_draining_stops_at_its_own_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_common, "DRAIN_BYTES", 6)
    body = Body([b"abc", b"de", *[b"xyz"] * 6])
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(_request(body=body), 4))
    assert body.read == 5 + 9 and body.messages  # past 6 more bytes it gave up: the rest is left unread
    declared = Body([b"abcdefgh"])
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(_request({"Content-Length": "8"}, body=declared), 4))
    assert declared.read == 0  # declared over the drain bound: answered at once


def test_a_client_that_expects_100_continue_is_answered_without_reading() -> None:
    body = Body([b"abcde"])
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(_request({"Content-Length": "5", "Expect": "100-continue"}, body=body), 4))
    assert body.read == 0  # it has not sent the body, and will not after a 413
