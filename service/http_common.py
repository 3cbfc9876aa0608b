"""What both HTTP adapters (v2 and TorchServe) read the same way: the bearer token, a bounded body, the deadline.

The rules themselves are protocol-neutral and live in :mod:`service.rules`; this module only finds their
values in a Starlette request.

    plane.check_inference_token(bearer_token(request))
    body = await read_body(request, plane.settings.max_payload_bytes)          # 413 past the limit
    deadline = request_deadline(request, parameters, plane.settings.request_timeout_s)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import ClientDisconnect, Request

from service import rules
from service.errors import PayloadTooLarge

TIMEOUT_HEADER = rules.TIMEOUT_HEADER
# A body over the limit is read to its end and dropped, up to this much and this long, before the 413 is
# sent: a server that answers and closes with the body unread resets the connection, and the client,
# still sending, never reads the answer (nginx's "lingering close" does the same).
DRAIN_BYTES = 1 << 30
DRAIN_SECONDS = 10.0


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    return rules.bearer(request.headers.get("authorization"))


def request_deadline(request: Request, parameters: dict[str, Any], default_s: float) -> float | None:
    """Absolute monotonic deadline of an HTTP request (see :func:`service.rules.deadline`)."""
    return rules.deadline(
        parameters=parameters, header=request.headers.get(TIMEOUT_HEADER), transport_s=None, default_s=default_s
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; past ``limit`` bytes, :class:`PayloadTooLarge` once the rest is drained."""
    stream = request.stream()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request, stream, int(declared))
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _drain(request, stream, None)
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, stream: AsyncIterator[bytes], declared: int | None) -> None:
    """Read and drop the rest of the body, within :data:`DRAIN_BYTES` and :data:`DRAIN_SECONDS`."""
    if request.headers.get("expect", "").lower() == "100-continue":
        return  # the client waits for our answer before it sends the body: it sends none
    if declared is not None and declared > DRAIN_BYTES:
        return  # too much to wait for: answer at once (the client may see a reset)
    stop, size = time.monotonic() + DRAIN_SECONDS, 0
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > DRAIN_BYTES or time.monotonic() > stop:
                return
    except ClientDisconnect:
        return
