"""The admission gate over a real DataPlane: which requests it answers from their head, and in which format."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import pytest

from service.http_gate import AdmissionGate, Refusal
from tests.unit.service.test_dataplane_admission import HeldDecodes, _plane, _request, _settings

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore

TOKEN = [(b"authorization", b"Bearer secret")]


def _body(refusal: Refusal | None) -> dict[str, Any]:
    assert refusal is not None
    return dict(json.loads(refusal.body))


def test_a_full_model_is_refused_in_each_route_format_and_the_rest_goes_to_the_application(
    tiny_store: TinyStore, png: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldDecodes(monkeypatch)
    settings = _settings(tiny_store, max_queue_size=1, inference_token="secret")

    async def main() -> None:
        plane = await _plane(settings)
        gate = AdmissionGate(plane, pause_s=0.25)
        try:
            assert gate("POST", "/predictions/tiny", TOKEN) is None  # room: routed as usual
            first = asyncio.create_task(plane.infer(_request(png(1))))
            await held.admitted(1)  # the one request allowed is being decoded: the model is full

            refusal = gate("POST", "/predictions/tiny", TOKEN)
            assert refusal is not None and refusal.status == 429 and refusal.pause_s == 0.25
            assert (b"retry-after", b"1") in refusal.headers
            assert _body(refusal) == {"code": 429, "type": "QueueFull", "message": _body(refusal)["message"]}
            assert "1 requests waiting" in _body(refusal)["message"]
            response = refusal.response([(b"server", b"x")])
            assert response.startswith(b"HTTP/1.1 429 Too Many Requests\r\nserver: x\r\n")
            assert response.endswith(b"\r\n\r\n" + refusal.body)

            v2 = gate("PUT", "/v2/models/tiny/versions/1/infer", TOKEN)
            assert v2 is not None and list(_body(v2)) == ["error"]  # v2's format
            unknown = gate("POST", "/v2/models/nope/infer", TOKEN)
            assert unknown is not None and unknown.status == 404 and unknown.pause_s == 0  # not paced
            assert gate("POST", "/predictions/tiny", []) is None  # no token: the application answers 401
            assert gate("GET", "/v2/models/tiny", TOKEN) is None  # not an inference route
            assert gate("POST", "/explanations/tiny", TOKEN) is None
            bad_deadline = [*TOKEN, (b"x-request-timeout-ms", b"soon")]
            assert gate("POST", "/predictions/tiny", bad_deadline) is None  # the application names the error
            held.release.set()
            await first
            assert gate("POST", "/predictions/tiny", TOKEN) is None  # room again
        finally:
            held.release.set()
            await plane.shutdown(timeout=5)

    asyncio.run(main())
