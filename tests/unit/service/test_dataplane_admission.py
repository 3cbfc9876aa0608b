"""Admission: requests still being decoded count against ``max_queue_size``, and a refusal decodes nothing.

Without this, a flood waits, unbounded, in front of the decode threads and is refused only after
paying for decoding; the queue's bound would bound nothing.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from starlette.requests import Request

from service import dataplane, http_app, http_torchserve, http_v2, metrics
from service.dataplane import DataPlane
from service.errors import QueueFull
from service.repository import ModelRepository
from service.settings import Settings
from service.types import InferInput, InferRequest

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore


def _request(image: bytes) -> InferRequest:
    return InferRequest(model="tiny", inputs=[InferInput("image", "BYTES", [1], [image])])


def test_a_full_model_refuses_before_decoding(tiny_store: TinyStore, png: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(model_store=tiny_store.store, device="cpu", max_queue_size=2, decode_workers=4)
    release, decoded = threading.Event(), []
    original = dataplane.preprocess_bytes

    def slow_decode(data: bytes, *args: Any, **kwargs: Any) -> np.ndarray:
        decoded.append(data)
        release.wait(timeout=30)
        return original(data, *args, **kwargs)

    monkeypatch.setattr(dataplane, "preprocess_bytes", slow_decode)

    async def main() -> None:
        repository = ModelRepository(settings)
        await repository.load_all()
        plane = DataPlane(repository, settings)
        try:
            held = [asyncio.create_task(plane.infer(_request(png(i)))) for i in range(2)]
            while len(decoded) < 2:  # both admitted and decoding
                await asyncio.sleep(0.01)
            with pytest.raises(QueueFull, match="2 requests waiting"):
                await plane.infer(_request(png(9)))
            assert len(decoded) == 2  # the refused request was never decoded
            release.set()
            answers = await asyncio.gather(*held)
            assert [a.outputs[0].data.shape[0] for a in answers] == [1, 1]
            await plane.infer(_request(png(3)))  # room again once they are done
        finally:
            release.set()
            await plane.shutdown(timeout=5)

    asyncio.run(main())


# ---- admission by expected wait -------------------------------------------------------------------


class HeldDecodes:
    """Monkeypatches decoding so that admitted requests stay 'being decoded' until ``release``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release, self.decoded = threading.Event(), []
        original = dataplane.preprocess_bytes

        def held(data: bytes, *args: Any, **kwargs: Any) -> np.ndarray:
            self.decoded.append(data)
            self.release.wait(timeout=30)
            return original(data, *args, **kwargs)

        monkeypatch.setattr(dataplane, "preprocess_bytes", held)

    async def admitted(self, count: int) -> None:
        while len(self.decoded) < count:
            await asyncio.sleep(0.01)


async def _plane(settings: Settings) -> DataPlane:
    repository = ModelRepository(settings)
    await repository.load_all()
    return DataPlane(repository, settings)


def _settings(tiny_store: TinyStore, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"device": "cpu", "max_batch_size": 1, "decode_workers": 4, "max_queue_size": 64}
    return Settings(model_store=tiny_store.store, **{**values, **overrides})


def _refused(model: str, protocol: str) -> float:
    labels = {"model": model, "version": "", "protocol": protocol, "outcome": "rejected"}
    return metrics.REGISTRY.get_sample_value("inference_requests_total", labels) or 0.0


@pytest.mark.parametrize("wait_ms", [500.0, 0.0])
def test_a_long_expected_wait_is_refused_once_service_time_is_known(
    tiny_store: TinyStore, png: Any, monkeypatch: pytest.MonkeyPatch, wait_ms: float
) -> None:
    held = HeldDecodes(monkeypatch)
    settings = _settings(tiny_store, max_queue_wait_ms=wait_ms)

    async def main() -> None:
        plane = await _plane(settings)
        try:
            batcher = plane.repository.get("tiny").batcher
            assert batcher is not None
            first = asyncio.create_task(plane.infer(_request(png(1))))
            await held.admitted(1)
            second = asyncio.create_task(plane.infer(_request(png(2))))  # cold start: the length bound only
            await held.admitted(2)
            batcher.compute_per_image.value = 0.4  # as if measured: 2 images ahead and itself, 1.2 s > 0.5 s
            refused_before = _refused("tiny", "test")
            if wait_ms == 0:  # the wait bound is off: the length bound (64) only
                plane.check_admission("tiny", protocol="test")
            else:
                with pytest.raises(QueueFull, match=r"2 requests waiting, an expected wait of 1\.2\ds") as caught:
                    plane.check_admission("tiny", protocol="test")
                assert caught.value.retry_after_s == 2
                assert _refused("tiny", "test") == refused_before + 1
                with pytest.raises(QueueFull, match="expected wait"):
                    await plane.infer(_request(png(3)))
                assert len(held.decoded) == 2  # refused before decoding
            held.release.set()
            await asyncio.gather(first, second)
            plane.check_admission("tiny")  # nothing ahead: admitted
        finally:
            held.release.set()
            await plane.shutdown(timeout=5)

    asyncio.run(main())


def test_an_http_flood_is_refused_before_its_body_is_read(
    tiny_store: TinyStore, png: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldDecodes(monkeypatch)
    settings = _settings(tiny_store, max_queue_size=1)
    reads: list[str] = []

    async def receive() -> dict[str, Any]:
        reads.append("body")
        return {"type": "http.request", "body": png(5), "more_body": False}

    async def main() -> None:
        plane = await _plane(settings)
        try:
            first = asyncio.create_task(plane.infer(_request(png(1))))
            await held.admitted(1)
            for route in (http_torchserve._predict, http_v2._infer):
                scope = {"type": "http", "method": "POST", "path": "/predictions/tiny", "headers": []}
                with pytest.raises(QueueFull, match="1 requests waiting"):
                    await route(plane, Request(scope, receive), "tiny", None)
            assert reads == []
            held.release.set()
            await first
        finally:
            held.release.set()
            await plane.shutdown(timeout=5)

    asyncio.run(main())


def test_a_429_carries_retry_after() -> None:
    scope = {"type": "http", "method": "POST", "path": "/predictions/tiny", "headers": []}
    response = asyncio.run(http_app._service_error(Request(scope), QueueFull("full", retry_after_s=3)))
    assert (response.status_code, response.headers["retry-after"]) == (429, "3")
